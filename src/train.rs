//! `shardc train` and `shardc run`: the training loop on the CPU.
//!
//! The whole step (forward, loss, backward, clipping, AdamW) is one IR graph built by
//! `shardc_passes::train_step`; `train` compiles it and runs it on the host engine (or the
//! reference interpreter, `--engine interp`), `run` takes it from a bundle. The data order and the
//! learning rate are pure functions of the step number (and the seed), so a run resumed from a
//! checkpoint continues exactly the loss curve it would have had.

use crate::cli::{DataOrder, LoopArgs, RunArgs, TrainArgs};
use crate::commands::thousands;
use crate::model::{load_model, LoadedModel};
use crate::parallel::{self, Strategy};
use anyhow::{bail, Result};
use shardc_ir::interp::Precision;
use shardc_passes::train_step::{build_parallel_step, AdamW};
use shardc_runtime::checkpoint::{self, CHECKPOINT_FILE};
use shardc_runtime::data::TokenFile;
use shardc_runtime::init::Rng;
use shardc_runtime::train::{dp_shards, lr_at, Trainer};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

fn validate(a: &TrainArgs) -> Result<Option<checkpoint::DirLock>> {
    let lock = validate_loop(&a.lp)?;
    let checks: [(bool, &str); 4] = [
        (a.run.batch >= 1 && a.run.seq >= 1, "--batch and --seq must be at least 1"),
        ((0.0..1.0).contains(&a.beta1) && (0.0..1.0).contains(&a.beta2), "--beta1 and --beta2 must be in [0, 1)"),
        (a.eps > 0.0, "--eps must be positive"),
        (a.weight_decay >= 0.0 && a.grad_clip >= 0.0, "--weight-decay and --grad-clip must not be negative"),
    ];
    for (ok, msg) in checks {
        if !ok {
            bail!("{msg}");
        }
    }
    Ok(lock)
}

/// Checks the loop's flags; with `--checkpoint DIR`, takes the directory's lock (held by the
/// caller for the whole run), which proves it writable before the first step.
fn validate_loop(lp: &LoopArgs) -> Result<Option<checkpoint::DirLock>> {
    let checks: [(bool, &str); 4] = [
        (lp.steps >= 1, "--steps must be at least 1"),
        (lp.lr > 0.0 && lp.lr.is_finite(), "--lr must be a positive number"),
        (lp.min_lr.is_none_or(|m| m >= 0.0 && m <= lp.lr), "--min-lr must be between 0 and --lr"),
        (lp.save_every == 0 || lp.checkpoint.is_some(), "--save-every needs --checkpoint DIR"),
    ];
    for (ok, msg) in checks {
        if !ok {
            bail!("{msg}");
        }
    }
    // Fails now, before any step trains, when checkpoints could not be written there (a run
    // never trains for hours and then loses its weights) or another run writes there.
    match &lp.checkpoint {
        Some(dir) => match checkpoint::DirLock::acquire(dir) {
            Ok(lock) => Ok(Some(lock)),
            Err(e @ checkpoint::CheckpointError::Locked { .. }) => Err(e.into()),
            Err(e) => {
                bail!("--checkpoint {}: cannot write checkpoints there ({e}); nothing was trained", dir.display())
            }
        },
        None => Ok(None),
    }
}

/// A training run: the loop's options and the global batch shape.
struct Job<'a> {
    lp: &'a LoopArgs,
    batch: usize,
    seq: usize,
    data_path: &'a Path,
}

/// Row starts of the batch for 0-based step `k`.
fn batch_starts(a: &Job, data: &TokenFile, k: usize) -> Vec<usize> {
    match a.lp.data_order {
        DataOrder::Sequential => {
            let k = k % data.num_batches(a.batch, a.seq);
            (0..a.batch).map(|b| data.batch_start(k, b, a.batch, a.seq)).collect()
        }
        DataOrder::Random => {
            // Windows of seq + 1 tokens, each inside one file.
            (0..a.batch)
                .map(|b| {
                    let mut rng = Rng::new(
                        a.lp.seed
                            ^ (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                            ^ (b as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F),
                    );
                    data.random_start(rng.next_u64(), a.seq)
                })
                .collect()
        }
    }
}

fn batch(a: &Job, data: &TokenFile, k: usize) -> (Vec<i64>, Vec<i64>) {
    let (mut x, mut y) = (Vec::with_capacity(a.batch * a.seq), Vec::with_capacity(a.batch * a.seq));
    for s in batch_starts(a, data, k) {
        x.extend(data.window(s, a.seq));
        y.extend(data.window(s + 1, a.seq));
    }
    (x, y)
}

/// What a checkpoint must agree on with the run that resumes it.
fn run_identity(
    a: &Job,
    step: &shardc_ir::Graph,
    graph_name: &str,
    mesh: &str,
    zero: &str,
    sp: bool,
) -> BTreeMap<String, String> {
    // The training precision, read off the step: bf16 values mean mixed precision.
    let bf16 = step.values.iter().any(|v| v.ty.dtype == shardc_ir::DType::Bf16);
    BTreeMap::from([
        ("precision".to_string(), if bf16 { "bf16-mixed" } else { "f32" }.to_string()),
        ("graph".to_string(), graph_name.to_string()),
        ("batch".to_string(), a.batch.to_string()),
        ("seq".to_string(), a.seq.to_string()),
        ("data_order".to_string(), format!("{:?}", a.lp.data_order).to_lowercase()),
        ("seed".to_string(), a.lp.seed.to_string()),
        ("mesh".to_string(), mesh.to_string()),
        ("zero".to_string(), zero.to_string()),
        ("sequence_parallel".to_string(), sp.to_string()),
    ])
}

/// Saves a checkpoint of the state after `step` steps (see `shardc_runtime::checkpoint`).
fn save(
    dir: &Path,
    trainer: &Trainer,
    a: &Job,
    identity: &BTreeMap<String, String>,
    step: usize,
    data: &TokenFile,
) -> Result<PathBuf> {
    let mut meta = identity.clone();
    meta.insert("step".into(), step.to_string());
    let position = match a.lp.data_order {
        DataOrder::Sequential => data.batch_start(step % data.num_batches(a.batch, a.seq), 0, a.batch, a.seq),
        DataOrder::Random => 0,
    };
    meta.insert("data_position".into(), position.to_string());
    Ok(checkpoint::save(dir, trainer, meta, step, a.lp.keep_last)?)
}

struct Progress {
    tty: bool,
    start: Instant,
    first_step: usize,
    total: usize,
    tokens_per_step: usize,
}

impl Progress {
    fn tokens_per_s(&self, done: usize) -> f64 {
        (done - self.first_step) as f64 * self.tokens_per_step as f64 / self.start.elapsed().as_secs_f64().max(1e-9)
    }

    fn show(&self, step: usize, loss: f64, lr: f64) {
        let rate = self.tokens_per_s(step);
        let left = (self.total - step) as f64 * self.tokens_per_step as f64 / rate.max(1e-9);
        let eta = format!("{:02}:{:02}", (left / 60.0) as u64, (left % 60.0) as u64);
        if self.tty {
            let width = 24;
            let filled = width * step / self.total.max(1);
            eprint!(
                "\r\x1b[2Kstep {step:>w$}/{} [{}{}] loss {loss:.4} | lr {lr:.2e} | {rate:.0} tok/s | ETA {eta}",
                self.total,
                "=".repeat(filled),
                " ".repeat(width - filled),
                w = self.total.to_string().len()
            );
            let _ = std::io::stderr().flush();
        } else {
            let every = (self.total / 20).max(1);
            if step.is_multiple_of(every) || step == self.total || step == self.first_step + 1 {
                eprintln!("step {step}/{}: loss {loss:.4}, lr {lr:.2e}, {rate:.0} tokens/s, ETA {eta}", self.total);
            }
        }
    }

    fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

/// The model (one dp rank's share of the batch, vocabulary padded if asked) and the token file,
/// checked against each other.
fn model_and_data(a: &TrainArgs, setup: &Strategy, compute: shardc_ir::DType) -> Result<(LoadedModel, TokenFile)> {
    let local_batch = a.run.batch / setup.dp;
    if a.init_from.is_some() && a.lp.resume.is_some() {
        bail!("--resume continues a checkpoint (weights and optimizer); --init-from starts a new run from weights: give one");
    }
    let init = a.init_from.as_ref().map(|p| checkpoint::resolve(p).unwrap_or_else(|_| p.clone()));
    let mut model = load_model(&a.run.model, local_batch, a.run.seq, compute, init.as_deref(), a.lp.seed)?;
    if a.par.pad_vocab_to_multiple_of.is_some() {
        crate::model::pad_vocab(
            &mut model,
            &a.run.model,
            local_batch,
            a.run.seq,
            compute,
            a.par.pad_vocab_to_multiple_of.map(|m| m * setup.tp),
            a.lp.seed,
        )?;
    }
    let data = TokenFile::open(&a.run.data)?;
    if data.len() < a.run.seq + 1 || data.num_batches(a.run.batch, a.run.seq) == 0 {
        bail!(
            "{}: {} tokens are too few for one batch of {} x {} (needs {})",
            a.run.data.display(),
            data.len(),
            a.run.batch,
            a.run.seq,
            a.run.batch * a.run.seq + 1
        );
    }
    if let Some(v) = crate::commands::vocab_size(&model.graph) {
        if data.max_token().is_some_and(|m| m as usize >= v) {
            bail!(
                "{}: holds token id {} but the model's vocabulary has {v} entries",
                a.run.data.display(),
                data.max_token().unwrap_or(0)
            );
        }
    }
    Ok((model, data))
}

pub fn train(a: &TrainArgs) -> Result<()> {
    let _lock = validate(a)?;
    let device = parallel::device_model(&a.par)?;
    let compute = a.precision.compute_dtype();
    let job = parallel::Job { model: &a.run.model, batch: a.run.batch, seq: a.run.seq, compute };
    let (setup, ranked) = parallel::resolve(&a.par, job, &device)?;
    if let (Some(r), false) = (&ranked, a.lp.json) {
        eprintln!(
            "--auto chose {} (predicted {:.3} ms per step on {})",
            r[0].strategy.describe(),
            r[0].plan.predicted_step_seconds * 1e3,
            device.name
        );
    }
    let (model, data) = model_and_data(a, &setup, compute)?;
    let opt =
        AdamW { beta1: a.beta1, beta2: a.beta2, eps: a.eps, weight_decay: a.weight_decay, grad_clip: a.grad_clip };
    let mut g = model.graph.clone();
    g.mesh = setup.mesh();
    let (dp, tp) = (setup.data_parallel(), setup.tensor_parallel());
    let (step, _) = build_parallel_step(&g, &opt, dp.as_ref(), tp.as_ref(), &device)?;
    let j = Job { lp: &a.lp, batch: a.run.batch, seq: a.run.seq, data_path: &a.run.data };
    let identity =
        run_identity(&j, &step.graph, &model.graph.name, &setup.mesh().to_string(), &setup.zero.to_string(), setup.sp);
    let (initial, start, origin) = match &a.lp.resume {
        Some(dir) => resume(dir, &step.graph, &identity)?,
        None => (checkpoint::rank_states(&step.graph, &model.params), 0, model.weights_from.clone()),
    };
    let ranks = setup.dp * setup.tp;
    let what = format!(
        "{}{} ({} parameters from {origin})",
        model.graph.name,
        if ranks > 1 { format!(" on {ranks} simulated ranks ({})", setup.describe()) } else { String::new() },
        thousands(model.graph.param_count()),
    );
    let trainer = match a.lp.engine {
        crate::cli::Engine::Interp => Trainer::new_spmd(step.graph, initial, Precision::F32)?,
        crate::cli::Engine::Host => {
            let loaded = crate::host::load(&step.graph)?;
            if !a.lp.json {
                eprintln!(
                    "{} {} kernels for the host in {:.1} s; arena {} bytes per rank",
                    if loaded.cached { "loaded the cached" } else { "compiled" },
                    loaded.kernels,
                    loaded.compile_seconds,
                    thousands(loaded.program.arena_bytes())
                );
            }
            Trainer::new_host(loaded.program, initial, threads(&a.lp))?
        }
    };
    let val_graph = match (&a.lp.val_data, a.run.model.is_dir()) {
        (Some(_), true) => {
            let pad = a.par.pad_vocab_to_multiple_of.map(|m| m * setup.tp);
            let f32 = shardc_ir::DType::F32;
            Some(crate::model::load_graph_padded(&a.run.model, a.run.batch, a.run.seq, f32, pad)?)
        }
        _ => None,
    };
    let validation = Validation::new(&a.lp, val_graph, a.run.batch, a.run.seq)?;
    train_loop(&j, trainer, &data, &identity, start, &what, validation)
}

fn threads(lp: &LoopArgs) -> usize {
    lp.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

type RankStates = Vec<std::collections::HashMap<String, shardc_ir::Tensor>>;

fn resume(
    dir: &Path,
    step: &shardc_ir::Graph,
    identity: &BTreeMap<String, String>,
) -> Result<(RankStates, usize, String)> {
    let r = checkpoint::load(dir, step, identity)?;
    let file = checkpoint::resolve(dir).unwrap_or_else(|_| dir.join(CHECKPOINT_FILE));
    let at = format!("checkpoint {} at step {}", file.display(), r.step);
    Ok((r.states, r.step, at))
}

/// `shardc run BUNDLE`: the training loop over a compiled bundle.
pub fn run(a: &RunArgs) -> Result<()> {
    let _lock = validate_loop(&a.lp)?;
    let t = Instant::now();
    let bundle = shardc_bundle::Bundle::read(&a.bundle)?;
    let g = &bundle.header.program;
    let sig = g.signature();
    let tokens = sig.arg(&shardc_ir::ArgRole::Tokens).ok_or_else(|| {
        anyhow::anyhow!("{}: the bundle's program has no `tokens` input; it is not a training step", a.bundle.display())
    })?;
    let shape = g.ty(tokens).shape.clone();
    let dp = g.mesh.axis_size("dp").unwrap_or(1);
    let (batch, seq) = (shape[0] * dp, shape[1]);
    let setup = bundle.header.plan_json.as_ref().and_then(|p| p.get("setup").cloned());
    let zero = setup
        .as_ref()
        .and_then(|s| serde_json::from_value::<shardc_ir::ZeroStage>(s.get("zero")?.clone()).ok())
        .unwrap_or_default()
        .to_string();
    let sp = setup.as_ref().and_then(|s| s.get("sequence_parallel")).and_then(|b| b.as_bool()).unwrap_or(false);
    let j = Job { lp: &a.lp, batch, seq, data_path: &a.data };
    let data = TokenFile::open(&a.data)?;
    if data.len() < seq + 1 || data.num_batches(batch, seq) == 0 {
        bail!(
            "{}: {} tokens are too few for one batch of {batch} x {seq} (needs {})",
            a.data.display(),
            data.len(),
            batch * seq + 1
        );
    }
    let identity = run_identity(&j, g, &bundle.header.model.name, &g.mesh.to_string(), &zero, sp);
    let (initial, start, origin) = match (&a.lp.resume, &a.weights) {
        (Some(_), Some(_)) => bail!("--resume continues a checkpoint's weights; drop --weights"),
        (Some(dir), None) => resume(dir, g, &identity)?,
        (None, Some(w)) => {
            let params: std::collections::HashSet<&str> = sig.params().map(|(p, _)| g.name_of(p)).collect();
            // A Hugging Face model directory (its checkpoint's names mapped by the importer), or
            // a safetensors file under the program's parameter names (a shardc checkpoint).
            let ckpt = checkpoint::resolve(w).ok().filter(|_| w.is_dir() && !w.join("config.json").is_file());
            let w = ckpt.as_deref().unwrap_or(w);
            let tensors: std::collections::HashMap<String, shardc_ir::Tensor> = if w.is_dir() {
                let opts = shardc_ir::import::BuildOptions::f32(1, 1, false);
                shardc_ir::import::import_dir(w, opts)?
                    .weights
                    .ok_or_else(|| anyhow::anyhow!("{}: holds no model.safetensors", w.display()))?
            } else {
                shardc_ir::import::weights::read_tensors(w)?.into_iter().collect()
            };
            let whole: std::collections::HashMap<String, shardc_ir::Tensor> =
                tensors.into_iter().filter(|(k, _)| params.contains(k.as_str())).collect();
            if let Some(missing) = params.iter().find(|p| !whole.contains_key(**p)) {
                bail!("{}: has no tensor `{missing}` (the bundle's model needs every parameter by name)", w.display());
            }
            (checkpoint::rank_states(g, &whole), 0, w.display().to_string())
        }
        (None, None) => (
            checkpoint::rank_states(g, &shardc_runtime::init::init_params(g, a.lp.seed)),
            0,
            format!("GPT-2-style random initialisation (seed {})", a.lp.seed),
        ),
    };
    let what = format!(
        "{} from {} ({} ranks, {} parameters from {origin})",
        bundle.header.model.name,
        a.bundle.display(),
        g.mesh.world_size(),
        thousands(sig.params().map(|(p, l)| l.full_shape(&g.ty(p).shape, &g.mesh).iter().product::<usize>()).sum())
    );
    let trainer = match a.lp.engine {
        crate::cli::Engine::Interp => Trainer::from_bundle(&bundle, initial, Precision::F32)?,
        crate::cli::Engine::Host => {
            let program = shardc_runtime::exec::HostProgram::from_bundle(&bundle)?;
            Trainer::new_host(program, initial, threads(&a.lp))?
        }
    };
    if !a.lp.json {
        eprintln!(
            "loaded {} in {:.2} s ({} kernels)",
            a.bundle.display(),
            t.elapsed().as_secs_f64(),
            bundle.header.kernels.len()
        );
    }
    // The bundle's model config (when it came from a model directory) gives the forward graph.
    let val_graph = match (&a.lp.val_data, &bundle.header.model.config_json) {
        (Some(_), Some(text)) => {
            let (config, _) =
                shardc_ir::import::parse_config(text).map_err(|e| anyhow::anyhow!("the bundle's config: {e}"))?;
            let opts = shardc_ir::import::BuildOptions::f32(batch, seq, false);
            Some(shardc_ir::import::build_graph(&config, opts).map_err(|e| anyhow::anyhow!("{e}"))?.graph)
        }
        _ => None,
    };
    let validation = Validation::new(&a.lp, val_graph, batch, seq)?;
    train_loop(&j, trainer, &data, &identity, start, &what, validation)
}

/// Held-out loss during training (`--val-data`): the forward graph of the run's batch shape on
/// one device, the token file, and how many batches each validation reads.
pub(crate) struct Validation {
    graph: shardc_ir::Graph,
    data: TokenFile,
    batches: usize,
}

impl Validation {
    /// From `--val-data` (None without it); `graph` is the model's forward for batch x seq.
    fn new(lp: &LoopArgs, graph: Option<shardc_ir::Graph>, batch: usize, seq: usize) -> Result<Option<Validation>> {
        let Some(path) = &lp.val_data else {
            if lp.eval_every > 0 {
                bail!("--eval-every needs --val-data TOKENS");
            }
            return Ok(None);
        };
        let graph = graph.ok_or_else(|| anyhow::anyhow!("--val-data needs a model directory (config.json)"))?;
        let data = TokenFile::open(path)?;
        if lp.val_batches == 0 || data.num_batches(batch, seq) < lp.val_batches {
            bail!(
                "{}: {} tokens hold {} batches of {batch} x {seq}, fewer than --val-batches {} (at least 1)",
                path.display(),
                data.len(),
                data.num_batches(batch, seq),
                lp.val_batches
            );
        }
        if let Some(v) = crate::commands::vocab_size(&graph) {
            if data.max_token().is_some_and(|m| m as usize >= v) {
                bail!("{}: holds token ids beyond the model's vocabulary of {v}", path.display());
            }
        }
        Ok(Some(Validation { graph, data, batches: lp.val_batches }))
    }

    /// The mean loss of the trainer's current (gathered) weights over the first batches.
    fn loss(&self, trainer: &Trainer) -> Result<f64> {
        let g = &self.graph;
        let sig = g.signature();
        let name = |role: shardc_ir::ArgRole| sig.arg(&role).map(|v| g.name_of(v).to_string());
        let (Some(tok), Some(tgt)) = (name(shardc_ir::ArgRole::Tokens), name(shardc_ir::ArgRole::Targets)) else {
            bail!("the validation graph has no token inputs");
        };
        let loss_at = sig.output(&shardc_ir::OutputRole::Loss).ok_or_else(|| anyhow::anyhow!("no loss output"))?;
        let shape = g.ty(g.find(&tok).expect("the tokens input")).shape.clone();
        let mut inputs = checkpoint::whole_params(trainer);
        let mut sum = 0.0;
        for k in 0..self.batches {
            let (x, y) = self.data.batch(k, shape[0], shape[1])?;
            inputs.insert(tok.clone(), shardc_ir::Tensor::int(shardc_ir::DType::I64, shape.clone(), x));
            inputs.insert(tgt.clone(), shardc_ir::Tensor::int(shardc_ir::DType::I64, shape.clone(), y));
            let out = shardc_ir::interp::run(g, &inputs, shardc_ir::interp::Precision::F32)?;
            sum += out[loss_at].scalar().ok_or_else(|| anyhow::anyhow!("the loss is not a scalar"))?;
        }
        Ok(sum / self.batches as f64)
    }
}

/// The training loop shared by `train` and `run`: progress, JSON lines, checkpoints, Ctrl-C.
fn train_loop(
    a: &Job,
    mut trainer: Trainer,
    data: &TokenFile,
    identity: &BTreeMap<String, String>,
    start: usize,
    what: &str,
    validation: Option<Validation>,
) -> Result<()> {
    let lp = a.lp;
    if start >= lp.steps {
        bail!("the checkpoint is at step {start} already; ask for more --steps than that");
    }
    let mesh = trainer.graph().mesh.clone();
    let min_lr = lp.min_lr.unwrap_or(lp.lr / 10.0);
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        // A second handler cannot be installed in one process (tests call train() directly
        // only once); ignore that error rather than fail the run.
        let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
    }
    if !lp.json {
        eprintln!(
            "training {what} on {} ({} tokens, {} order), {} x {} tokens per step, steps {}..{}",
            a.data_path.display(),
            thousands(data.len()),
            format!("{:?}", lp.data_order).to_lowercase(),
            a.batch,
            a.seq,
            start + 1,
            lp.steps
        );
    }
    let progress = Progress {
        tty: !lp.json && std::io::stderr().is_terminal(),
        start: Instant::now(),
        first_step: start,
        total: lp.steps,
        tokens_per_step: a.batch * a.seq,
    };
    let (mut first_loss, mut last_loss) = (None, 0.0);
    let mut report = Report::default();
    if lp.trace.is_some() {
        trainer.trace_from(Instant::now());
    }
    let mut trace: Vec<serde_json::Value> = Vec::new();
    for k in start..lp.steps {
        if interrupted.load(Ordering::SeqCst) {
            progress.finish();
            match &lp.checkpoint {
                Some(dir) => {
                    let path = save(dir, &trainer, a, identity, k, data)?;
                    eprintln!(
                        "interrupted after step {k}; saved {} (continue with --resume {})",
                        path.display(),
                        dir.display()
                    );
                }
                None => eprintln!("interrupted after step {k}; nothing saved (no --checkpoint DIR was given)"),
            }
            std::process::exit(130);
        }
        let (x, y) = batch(a, data, k);
        let lr = lr_at(k, lp.lr, min_lr, lp.warmup, lp.steps);
        // Rank r trains on rows d*B/dp .. (d+1)*B/dp of the global batch, d its dp coordinate
        // (tensor-parallel ranks of one dp group see the same rows).
        let shards = dp_shards(&mesh, &x, &y);
        let t_step = Instant::now();
        let s = trainer.step_spmd(shards, lr, k + 1)?;
        let step_s = t_step.elapsed().as_secs_f64();
        if k == start && !lp.json {
            eprintln!("first step: {:.3} s", t_step.elapsed().as_secs_f64());
        }
        report.add(trainer.exec_stats());
        if lp.trace.is_some() {
            for (rank, stats) in trainer.exec_stats().iter().enumerate() {
                trace.extend(stats.events.iter().map(|(name, what, start, dur)| {
                    serde_json::json!({"name": name, "cat": what, "ph": "X", "pid": 0, "tid": rank,
                        "ts": start.as_secs_f64() * 1e6, "dur": dur.as_secs_f64() * 1e6, "args": {"step": k + 1}})
                }));
            }
        }
        first_loss.get_or_insert(s.loss);
        last_loss = s.loss;
        let validate = (lp.eval_every > 0 && (k + 1).is_multiple_of(lp.eval_every)) || k + 1 == lp.steps;
        let val_loss = match (&validation, validate) {
            (Some(v), true) => Some(v.loss(&trainer)?),
            _ => None,
        };
        if lp.json {
            let mut line = serde_json::json!({"step": k + 1, "loss": s.loss, "lr": lr, "grad_norm": s.grad_norm,
                "tokens_per_s": progress.tokens_per_s(k + 1), "step_s": step_s,
                "peak_rss_bytes": shardc_runtime::machine::peak_resident_bytes()});
            if let Some(v) = val_loss {
                line["val_loss"] = serde_json::json!(v);
            }
            println!("{line}");
        } else {
            progress.show(k + 1, s.loss, lr);
            if let Some(v) = val_loss {
                progress.finish();
                eprintln!("step {}: validation loss {v:.4}", k + 1);
            }
        }
        if let (Some(dir), true) =
            (&lp.checkpoint, lp.save_every > 0 && (k + 1).is_multiple_of(lp.save_every) && k + 1 < lp.steps)
        {
            save(dir, &trainer, a, identity, k + 1, data)?;
        }
    }
    progress.finish();
    if let Some(dir) = &lp.checkpoint {
        let path = save(dir, &trainer, a, identity, lp.steps, data)?;
        if !lp.json {
            eprintln!("saved {}", path.display());
        }
    }
    if lp.report {
        report.print(trainer.arena_bytes(), lp.json);
    }
    if let Some(path) = &lp.trace {
        if trainer.exec_stats().is_empty() {
            eprintln!("--trace: the interpreter engine records no trace (use --engine host)");
        } else {
            let ranks = trainer.exec_stats().len();
            trace.extend((0..ranks).map(|r| {
                serde_json::json!({"name": "thread_name", "ph": "M", "pid": 0, "tid": r, "args": {"name": format!("rank {r}")}})
            }));
            let doc = serde_json::json!({"traceEvents": trace, "displayTimeUnit": "ms"});
            std::fs::write(path, serde_json::to_vec(&doc)?)
                .map_err(|e| anyhow::anyhow!("cannot write the trace to {}: {e}", path.display()))?;
            if !lp.json {
                eprintln!(
                    "wrote {} ({} events; open it in ui.perfetto.dev or chrome://tracing)",
                    path.display(),
                    trace.len()
                );
            }
        }
    }
    if !lp.json {
        let secs = progress.start.elapsed().as_secs_f64();
        println!(
            "trained steps {}..{} in {secs:.1} s: loss {:.4} -> {last_loss:.4}, {:.0} tokens/s",
            start + 1,
            lp.steps,
            first_loss.unwrap_or(f64::NAN),
            progress.tokens_per_s(lp.steps)
        );
    }
    Ok(())
}

/// Where the host engine's time went, summed over steps, per rank.
#[derive(Default)]
struct Report {
    steps: usize,
    /// Per rank: (what, calls, seconds).
    ranks: Vec<Vec<(String, usize, f64)>>,
    /// Per rank: the highest arena byte written.
    high_water: Vec<usize>,
}

impl Report {
    fn add(&mut self, stats: &[shardc_runtime::exec::ExecStats]) {
        if stats.is_empty() {
            return;
        }
        self.steps += 1;
        self.ranks.resize(stats.len(), Vec::new());
        self.high_water.resize(stats.len(), 0);
        for (hw, s) in self.high_water.iter_mut().zip(stats) {
            *hw = (*hw).max(s.arena_high_water_bytes);
        }
        for (acc, s) in self.ranks.iter_mut().zip(stats) {
            for (what, calls, t) in &s.entries {
                match acc.iter_mut().find(|e| &e.0 == what) {
                    Some(e) => {
                        e.1 += calls;
                        e.2 += t.as_secs_f64();
                    }
                    None => acc.push((what.clone(), *calls, t.as_secs_f64())),
                }
            }
        }
    }

    fn print(&self, arena: Option<usize>, json: bool) {
        if self.steps == 0 {
            eprintln!("--report: the interpreter engine keeps no timings (use --engine host)");
            return;
        }
        if json {
            let ranks: Vec<serde_json::Value> = self
                .ranks
                .iter()
                .enumerate()
                .map(|(r, entries)| {
                    serde_json::json!({
                        "rank": r,
                        "arena_high_water_bytes": self.high_water[r],
                        "predicted_bytes": arena,
                        "seconds_per_step": entries.iter().map(|(w, c, t)| (w.clone(), serde_json::json!({"calls_per_step": *c / self.steps, "seconds": t / self.steps as f64}))).collect::<serde_json::Map<_, _>>(),
                    })
                })
                .collect();
            println!("{}", serde_json::json!({"report": {"steps": self.steps, "ranks": ranks}}));
            return;
        }
        let mut rows = self.ranks[0].clone();
        rows.sort_by(|a, b| b.2.total_cmp(&a.2));
        let total: f64 = rows.iter().map(|r| r.2).sum();
        eprintln!(
            "host engine, rank 0, per step (mean of {} steps; arena high-water {} of the planned {} bytes per rank):",
            self.steps,
            crate::commands::thousands(self.high_water.iter().copied().max().unwrap_or(0)),
            crate::commands::thousands(arena.unwrap_or(0))
        );
        for (what, calls, t) in rows {
            eprintln!(
                "  {what:<36} {:>5} calls {:>9.2} ms {:>5.1}%",
                calls / self.steps,
                t / self.steps as f64 * 1e3,
                100.0 * t / total.max(1e-12)
            );
        }
    }
}
