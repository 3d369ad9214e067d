//! Training checkpoints: one safetensors file per directory, written atomically.
//!
//! Layout: every parameter whole, under its own name (so `shardc eval --weights` reads it
//! whatever the mesh); AdamW moments under their names when every rank holds the same ones, else
//! under `rank<r>/<name>` (ZeRO shards, tensor-parallel chunks). The header's metadata records
//! the format and what a resuming run must agree on (the caller's identity map), plus the step.
//! Which arguments are parameters and moments, and how each rank holds a parameter, is read off
//! the step graph's signature (roles and layouts), never off names.

use crate::train::Trainer;
use shardc_ir::import::weights::{read_metadata, read_tensors, write_tensors_with_metadata};
use shardc_ir::import::ImportError;
use shardc_ir::{Graph, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The file inside a checkpoint directory.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// The `format` metadata value of the layout this module writes.
pub const CHECKPOINT_FORMAT: &str = "shardc-checkpoint-v1";

/// Why a checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot create {}: {source}", .path.display())]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("{}: no checkpoint here (expected {CHECKPOINT_FILE}, written by `shardc train --checkpoint DIR`)", .0.display())]
    Missing(PathBuf),
    #[error(
        "{}: the checkpoint was written with {key} = {found}, but this run has {key} = {want}; resume with the same settings",
        .path.display()
    )]
    Mismatch { path: PathBuf, key: String, found: String, want: String },
    #[error("{}: metadata has no valid `step`", .0.display())]
    NoStep(PathBuf),
    #[error(transparent)]
    File(#[from] ImportError),
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
pub fn save(dir: &Path, trainer: &Trainer, metadata: BTreeMap<String, String>) -> Result<PathBuf, CheckpointError> {
    std::fs::create_dir_all(dir).map_err(|source| CheckpointError::CreateDir { path: dir.to_path_buf(), source })?;
    let step = trainer.graph();
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    let sig = step.signature();
    for (p, _) in sig.params() {
        let name = step.name_of(p);
        tensors.insert(name.to_string(), sig.whole_param(p, |r| &trainer.rank_values(r)[name]));
    }
    let (differ, moments) = (moments_differ(step), sig.moment_names());
    for r in 0..trainer.ranks() {
        for (k, v) in trainer.rank_values(r).iter().filter(|(k, _)| moments.contains(k.as_str())) {
            if differ {
                tensors.insert(rank_key(r, k), v.clone());
            } else if r == 0 {
                tensors.insert(k.clone(), v.clone());
            }
        }
    }
    let mut meta: HashMap<String, String> = metadata.into_iter().collect();
    meta.insert("format".into(), CHECKPOINT_FORMAT.into());
    let path = dir.join(CHECKPOINT_FILE);
    write_tensors_with_metadata(&path, &tensors, Some(meta))?;
    Ok(path)
}

/// Every rank's starting state for `step` from whole parameters (and, when resuming, the
/// checkpoint's moments).
pub fn rank_states(step: &Graph, full: &HashMap<String, Tensor>) -> Vec<HashMap<String, Tensor>> {
    let differ = moments_differ(step);
    let sig = step.signature();
    let moments = sig.moment_names();
    let mut states = sig.rank_params(full);
    for (r, m) in states.iter_mut().enumerate() {
        for (k, v) in full {
            if let Some(rest) = k.strip_prefix(&rank_key(r, "")) {
                m.insert(rest.to_string(), v.clone());
            } else if moments.contains(k.as_str()) && !differ {
                m.entry(k.clone()).or_insert_with(|| v.clone());
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
    let path = dir.join(CHECKPOINT_FILE);
    if !path.is_file() {
        return Err(CheckpointError::Missing(dir.to_path_buf()));
    }
    let meta = read_metadata(&path)?;
    let format = (String::from("format"), CHECKPOINT_FORMAT.to_string());
    for (key, want) in std::iter::once(&format).map(|(k, v)| (k, v)).chain(identity.iter()) {
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
    Ok(Resumed { states: rank_states(step, &all), step: at, metadata: meta })
}
