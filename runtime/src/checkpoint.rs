//! Training checkpoints: a directory of step directories (`step-NNNNNNNN/checkpoint.safetensors`)
//! and a `latest` marker naming the newest complete one, written atomically.
//!
//! Layout: every parameter and every AdamW moment whole, under its own name (so `shardc eval
//! --weights` reads it, and `--resume` cuts it for any mesh, ZeRO stage or SP setting, as
//! Megatron's and torchtitan's distributed checkpoints reshard); the header records the format,
//! the run's settings (the caller's identity map: only [`RESUME_MUST_MATCH`] must agree), the
//! step and the checksums. Older layouts kept ZeRO shards and tensor-parallel chunks of moments
//! under `rank<r>/<name>`; they are still read on the mesh that wrote them.
//! Which arguments are parameters and moments, and how each rank holds a parameter, is read off
//! the step graph's signature (roles and layouts), never off names.
//!
//! Integrity: the file is written atomically (a temporary file of its own name, flushed, renamed,
//! the directory flushed); a run that writes checkpoints holds [`DirLock`] on the directory, so
//! a second writer fails at once naming the first, and temporaries left by a killed writer are
//! removed when the next one takes the lock; the header records a SHA-256 per tensor, and
//! loading checks every checksum, that every parameter and moment the step needs is there,
//! and that every value is finite, naming the file and the tensor.

use crate::train::Trainer;
use shardc_ir::import::weights::{read_metadata, read_tensors, write_tensors_with_metadata};
use shardc_ir::import::ImportError;
use shardc_ir::{Graph, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The file inside a checkpoint directory.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// The `format` metadata value of the layout this module writes (v3: every moment whole; v2:
/// moments per rank where ranks differ, with checksums; v1: v2 without checksums).
pub const CHECKPOINT_FORMAT: &str = "shardc-checkpoint-v3";
/// Earlier layouts, still read (on the mesh that wrote them).
const CHECKPOINT_FORMATS_PER_RANK: [&str; 2] = ["shardc-checkpoint-v2", "shardc-checkpoint-v1"];
/// What a resume must agree on with the checkpoint; the mesh, ZeRO stage and sequence
/// parallelism may change (a v3 checkpoint holds every tensor whole).
pub const RESUME_MUST_MATCH: [&str; 6] = ["graph", "batch", "seq", "data_order", "seed", "precision"];
/// The lock file of a directory being written.
pub const LOCK_FILE: &str = "checkpoint.lock";
/// The file naming a directory's newest complete checkpoint (`step-NNNNNNNN`).
pub const LATEST_FILE: &str = "latest";

/// The subdirectory of the checkpoint after `step` steps.
pub fn step_dir_name(step: usize) -> String {
    format!("step-{step:08}")
}

/// The checkpoint file `path` names: a checkpoint file itself; a step directory; or a
/// `--checkpoint` directory, through its `latest` marker (or, from older runs, the file at its top).
pub fn resolve(path: &Path) -> Result<PathBuf, CheckpointError> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    let latest = path.join(LATEST_FILE);
    if latest.is_file() {
        let name =
            std::fs::read_to_string(&latest).map_err(|source| CheckpointError::Io { path: latest.clone(), source })?;
        let name = name.trim();
        if !name.starts_with("step-") || name.contains(['/', '\\']) || name.contains("..") {
            return Err(CheckpointError::Damaged {
                path: latest,
                tensor: "(latest)".into(),
                problem: format!("names `{name}`, not a step directory"),
            });
        }
        let file = path.join(name).join(CHECKPOINT_FILE);
        return if file.is_file() { Ok(file) } else { Err(CheckpointError::Missing(path.join(name))) };
    }
    let file = path.join(CHECKPOINT_FILE);
    if file.is_file() {
        Ok(file)
    } else {
        Err(CheckpointError::Missing(path.to_path_buf()))
    }
}

/// Why a checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot create {}: {source}", .path.display())]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("{}: no checkpoint here (expected `{LATEST_FILE}` naming a step directory with {CHECKPOINT_FILE}, written by `shardc train --checkpoint DIR`)", .0.display())]
    Missing(PathBuf),
    #[error(
        "{}: the checkpoint was written with {key} = {found}, but this run has {key} = {want}; resume with the same settings",
        .path.display()
    )]
    Mismatch { path: PathBuf, key: String, found: String, want: String },
    #[error("{}: metadata has no valid `step`", .0.display())]
    NoStep(PathBuf),
    #[error("{}: tensor `{tensor}` {problem}; the checkpoint is damaged or incomplete (resume from an earlier one, or start over)", .path.display())]
    Damaged { path: PathBuf, tensor: String, problem: String },
    #[error("{}: another run (process {pid}) is writing checkpoints to this directory; give each run its own --checkpoint DIR", .dir.display())]
    Locked { dir: PathBuf, pid: u32 },
    #[error("{}: {source}", .path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    File(#[from] ImportError),
}

/// The lock a run holds on its checkpoint directory while it trains (removed when dropped).
#[derive(Debug)]
pub struct DirLock {
    path: PathBuf,
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists() || !Path::new("/proc/self").exists()
}

impl DirLock {
    /// Takes `dir` (made if missing) for this process: fails naming the holder when a live
    /// process holds it; takes over a dead holder's lock and removes the temporary files a
    /// killed save left.
    pub fn acquire(dir: &Path) -> Result<DirLock, CheckpointError> {
        std::fs::create_dir_all(dir)
            .map_err(|source| CheckpointError::CreateDir { path: dir.to_path_buf(), source })?;
        let path = dir.join(LOCK_FILE);
        let io = |source| CheckpointError::Io { path: path.clone(), source };
        for _ in 0..2 {
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    use std::io::Write;
                    write!(f, "{}", std::process::id()).map_err(io)?;
                    let lock = DirLock { path };
                    lock.remove_stale_temporaries(dir)?;
                    return Ok(lock);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path).ok().and_then(|t| t.trim().parse::<u32>().ok());
                    match holder {
                        Some(pid) if pid != std::process::id() && process_alive(pid) => {
                            return Err(CheckpointError::Locked { dir: dir.to_path_buf(), pid })
                        }
                        // A dead (or unreadable) holder's lock: take it over.
                        _ => std::fs::remove_file(&path).map_err(io)?,
                    }
                }
                Err(e) => return Err(io(e)),
            }
        }
        Err(CheckpointError::Io { path, source: std::io::Error::other("the lock kept reappearing") })
    }

    /// Removes what a killed save left: temporary files (of the checkpoint file, in the
    /// directory or a step directory, and of `latest`) and step directories with no complete
    /// checkpoint in them.
    fn remove_stale_temporaries(&self, dir: &Path) -> Result<(), CheckpointError> {
        use shardc_ir::import::weights::temp_prefix;
        let prefixes = [temp_prefix(&dir.join(CHECKPOINT_FILE)), temp_prefix(&dir.join(LATEST_FILE))];
        let stale = |name: &str| prefixes.iter().any(|p| name.starts_with(p.as_str()));
        let entries =
            std::fs::read_dir(dir).map_err(|source| CheckpointError::Io { path: dir.to_path_buf(), source })?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if stale(&name) {
                let _ = std::fs::remove_file(e.path());
            } else if name.starts_with("step-") && e.path().is_dir() {
                if let Ok(inner) = std::fs::read_dir(e.path()) {
                    for f in inner.flatten() {
                        if stale(&f.file_name().to_string_lossy()) {
                            let _ = std::fs::remove_file(f.path());
                        }
                    }
                }
                if !e.path().join(CHECKPOINT_FILE).is_file() {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
        Ok(())
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// SHA-256 of a tensor's stored bytes (little-endian f32, or i64 for integer tensors).
fn checksum(t: &Tensor) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    match &t.data {
        shardc_ir::Data::I64(v) => v.iter().for_each(|x| h.update(x.to_le_bytes())),
        _ => t.to_f32().iter().for_each(|x| h.update(x.to_le_bytes())),
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// How moment `m` of parameter `p` is laid out over `step`'s mesh: as the parameter (its
/// tensor-parallel chunk, its ZeRO-3 flat shard), or, when the moment is a flat shard of the
/// parameter's local tensor (ZeRO-1/2), that layout plus a flat shard over the mesh axis whose
/// size gives the moment's length. Read off the step's shapes and the parameter's layout.
pub fn moment_layout(step: &Graph, p: shardc_ir::ValueId, m: shardc_ir::ValueId) -> shardc_ir::ParamLayout {
    let layout = step.arg_of(p).and_then(|a| a.role.param_layout()).cloned().unwrap_or_default();
    let (local, mine) = (&step.ty(p).shape, &step.ty(m).shape);
    if local == mine {
        return layout;
    }
    let numel: usize = local.iter().product();
    let axis = step.mesh.axes.iter().find(|a| {
        layout.split.as_ref().is_none_or(|s| s.axis != a.name) && mine.len() == 1 && mine[0] == numel.div_ceil(a.size)
    });
    match axis {
        Some(a) => shardc_ir::ParamLayout {
            flat_shard: Some(shardc_ir::FlatShard { axis: a.name.clone(), shape: local.clone() }),
            ..layout
        },
        None => layout,
    }
}

/// Rank r's key for a tensor that differs between ranks.
pub fn rank_key(rank: usize, name: &str) -> String {
    format!("rank{rank}/{name}")
}

/// Whether the ranks of `step` hold different AdamW moments: a parameter is held in part
/// (tensor-parallel chunk or ZeRO-3 shard) or a moment is a shard of its parameter's (ZeRO-1/2).
pub fn moments_differ(step: &Graph) -> bool {
    let sig = step.signature();
    step.mesh.world_size() > 1
        && sig
            .params()
            .any(|(p, layout)| !layout.is_whole() || sig.moments_of(p).any(|(_, m)| step.ty(m) != step.ty(p)))
}

/// Writes the trainer's state to `dir` with `metadata` (the run's identity and whatever else
/// the caller records) and the format; returns the file written.
///
/// The checkpoint goes to `dir/step-NNNNNNNN/` (`at_step` steps taken), then `dir/latest` is
/// rewritten (atomically) to name it, so a crash at any point leaves `latest` naming a complete
/// checkpoint; with `keep_last` > 0, older step directories beyond that many are removed.
pub fn save(
    dir: &Path,
    trainer: &Trainer,
    metadata: BTreeMap<String, String>,
    at_step: usize,
    keep_last: usize,
) -> Result<PathBuf, CheckpointError> {
    let step_dir = dir.join(step_dir_name(at_step));
    std::fs::create_dir_all(&step_dir)
        .map_err(|source| CheckpointError::CreateDir { path: step_dir.clone(), source })?;
    let step = trainer.graph();
    let mut tensors: BTreeMap<String, Tensor> = whole_params(trainer).into_iter().collect();
    let sig = step.signature();
    // Every moment whole, like its parameter, so that any mesh can resume from it.
    for (p, layout) in sig.params() {
        let full = layout.full_shape(&step.ty(p).shape, &step.mesh);
        for (_, m) in sig.moments_of(p) {
            let name = step.name_of(m);
            let whole = moment_layout(step, p, m).assemble(&full, &step.mesh, |r| &trainer.rank_values(r)[name]);
            tensors.insert(name.to_string(), whole);
        }
    }
    let mut meta: HashMap<String, String> = metadata.into_iter().collect();
    meta.insert("format".into(), CHECKPOINT_FORMAT.into());
    let sums: BTreeMap<&str, String> = tensors.iter().map(|(k, t)| (k.as_str(), checksum(t))).collect();
    meta.insert("tensor_sha256".into(), serde_json::to_string(&sums).expect("a map of strings"));
    let path = step_dir.join(CHECKPOINT_FILE);
    write_tensors_with_metadata(&path, &tensors, Some(meta))?;
    shardc_ir::import::weights::write_atomically(&dir.join(LATEST_FILE), step_dir_name(at_step).as_bytes())?;
    if keep_last > 0 {
        let mut steps: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|source| CheckpointError::Io { path: dir.to_path_buf(), source })?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir() && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step-")))
            .collect();
        steps.sort();
        let extra = steps.len().saturating_sub(keep_last);
        for old in &steps[..extra] {
            if *old != step_dir {
                std::fs::remove_dir_all(old).map_err(|source| CheckpointError::Io { path: old.clone(), source })?;
            }
        }
    }
    Ok(path)
}

/// Every parameter whole (assembled from the ranks by its layout), under its name.
pub fn whole_params(trainer: &Trainer) -> HashMap<String, Tensor> {
    let step = trainer.graph();
    let sig = step.signature();
    sig.params()
        .map(|(p, _)| {
            let name = step.name_of(p);
            (name.to_string(), sig.whole_param(p, |r| &trainer.rank_values(r)[name]))
        })
        .collect()
}

/// Every rank's starting state for `step` from whole parameters (and, when resuming, the
/// checkpoint's moments).
pub fn rank_states(step: &Graph, full: &HashMap<String, Tensor>) -> Vec<HashMap<String, Tensor>> {
    let sig = step.signature();
    let mut states = sig.rank_params(full);
    for (r, m) in states.iter_mut().enumerate() {
        // Per-rank moments of an older checkpoint (written on this mesh).
        for (k, v) in full {
            if let Some(rest) = k.strip_prefix(&rank_key(r, "")) {
                m.insert(rest.to_string(), v.clone());
            }
        }
        // Whole moments, cut as this step lays them out.
        for (p, layout) in sig.params() {
            let want = layout.full_shape(&step.ty(p).shape, &step.mesh);
            for (_, mo) in sig.moments_of(p) {
                let name = step.name_of(mo);
                match full.get(name) {
                    Some(t) if !m.contains_key(name) && t.shape == want => {
                        m.insert(name.to_string(), moment_layout(step, p, mo).cut(t, &step.mesh, r));
                    }
                    Some(t) if !m.contains_key(name) && t.shape == step.ty(mo).shape => {
                        m.insert(name.to_string(), t.clone());
                    }
                    _ => {}
                }
            }
        }
    }
    states
}

/// A checkpoint read back.
pub struct Resumed {
    /// Every rank's parameters and moments.
    pub states: Vec<HashMap<String, Tensor>>,
    /// The steps taken before the checkpoint.
    pub step: usize,
    pub metadata: HashMap<String, String>,
}

/// Reads the checkpoint in `dir` for `step` after checking that it was written by a run with
/// the same `identity` (and this format).
pub fn load(dir: &Path, step: &Graph, identity: &BTreeMap<String, String>) -> Result<Resumed, CheckpointError> {
    let path = resolve(dir)?;
    let meta = read_metadata(&path)?;
    let format = meta.get("format").map(String::as_str).unwrap_or("(missing)");
    let per_rank = CHECKPOINT_FORMATS_PER_RANK.contains(&format);
    if format != CHECKPOINT_FORMAT && !per_rank {
        return Err(CheckpointError::Mismatch {
            path,
            key: "format".into(),
            found: format.to_string(),
            want: CHECKPOINT_FORMAT.into(),
        });
    }
    // A v3 checkpoint resumes on any mesh, ZeRO stage and SP setting; older ones where written.
    for (key, want) in identity.iter().filter(|(k, _)| per_rank || RESUME_MUST_MATCH.contains(&k.as_str())) {
        let found = meta.get(key).map(String::as_str).unwrap_or("(missing)");
        if found != want {
            return Err(CheckpointError::Mismatch {
                path,
                key: key.clone(),
                found: found.to_string(),
                want: want.clone(),
            });
        }
    }
    let at = meta.get("step").and_then(|s| s.parse().ok()).ok_or_else(|| CheckpointError::NoStep(path.clone()))?;
    let all: HashMap<String, Tensor> = read_tensors(&path)?.into_iter().collect();
    let damaged = |tensor: &str, problem: String| CheckpointError::Damaged {
        path: path.clone(),
        tensor: tensor.to_string(),
        problem,
    };
    if let Some(sums) = meta.get("tensor_sha256") {
        let sums: BTreeMap<String, String> = serde_json::from_str(sums)
            .map_err(|e| damaged("(header)", format!("has an unreadable checksum table ({e})")))?;
        for (name, want) in &sums {
            let t = all.get(name).ok_or_else(|| damaged(name, "is listed in the header but missing".into()))?;
            if &checksum(t) != want {
                return Err(damaged(name, "does not match its checksum".into()));
            }
        }
    }
    for (name, t) in &all {
        if let Some((i, _)) = t.first_non_finite() {
            return Err(damaged(name, format!("holds a non-finite value at element {i}")));
        }
    }
    let sig = step.signature();
    for (p, layout) in sig.params() {
        let name = step.name_of(p);
        let want = layout.full_shape(&step.ty(p).shape, &step.mesh);
        match all.get(name) {
            None => return Err(damaged(name, "is missing".into())),
            Some(t) if t.shape != want => {
                return Err(damaged(name, format!("has shape {:?}, but the step's parameter is {want:?}", t.shape)))
            }
            Some(_) => {}
        }
    }
    let states = rank_states(step, &all);
    // Every parameter and moment each rank starts from must be there.
    for (r, values) in states.iter().enumerate() {
        for a in &step.args {
            let is_state = matches!(a.role, shardc_ir::ArgRole::Param(_) | shardc_ir::ArgRole::Moment { .. });
            let name = step.name_of(a.value);
            if is_state && !values.contains_key(name) {
                let key = if per_rank && moments_differ(step) && !step.signature().params().any(|(p, _)| p == a.value) {
                    rank_key(r, name)
                } else {
                    name.to_string()
                };
                return Err(damaged(&key, "is missing".into()));
            }
        }
    }
    Ok(Resumed { states, step: at, metadata: meta })
}
