//! The options every compiling command shares (`--mesh`, `--auto`, `--world`, `--zero`,
//! `--sequence-parallel`, `--device-model`, `--memory-budget`, `--pad-vocab-to-multiple-of`),
//! turned into a [`Strategy`] (checked, searched and built by `shardc_passes::strategy`): this
//! module only parses the flags and reads the files the library does not.

use crate::cli::ParallelArgs;
use anyhow::{anyhow, bail, Context, Result};
use shardc_ir::import::ModelConfig;
use shardc_ir::{DType, Graph, Mesh, ZeroStage};
use shardc_passes::cost::DeviceModel;
use shardc_passes::strategy::{self as strategy, Space};
pub use shardc_passes::strategy::{Candidate, Strategy};
use std::path::Path;

pub fn device_model(par: &ParallelArgs) -> Result<DeviceModel> {
    match &par.device_model {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
            DeviceModel::from_toml(&text).map_err(|e| anyhow!("{}: {e}", p.display()))
        }
        None => Ok(DeviceModel::h100()),
    }
}

/// The memory budget per device, in bytes.
pub fn budget(par: &ParallelArgs, device: &DeviceModel) -> Result<u64> {
    match &par.memory_budget {
        Some(b) => Ok(crate::commands::parse_bytes(b).map_err(|e| anyhow!("--memory-budget: {e}"))? as u64),
        None => Ok(device.memory_bytes as u64),
    }
}

/// The model's config, when MODEL is a Hugging Face directory.
pub fn model_config(path: &Path) -> Option<ModelConfig> {
    let text = std::fs::read_to_string(path.join("config.json")).ok()?;
    shardc_ir::import::parse_config(&text).ok().map(|(c, _)| c)
}

/// `--zero N` as a stage.
pub fn zero_stage(n: u8) -> Result<ZeroStage> {
    ZeroStage::from_number(n).ok_or_else(|| anyhow!("--zero {n}: ZeRO has stages 0, 1, 2 and 3"))
}

/// What a compiling command compiles: a model for a global batch of `batch` x `seq` tokens.
#[derive(Clone, Copy, Debug)]
pub struct Job<'a> {
    pub model: &'a Path,
    pub batch: usize,
    pub seq: usize,
    pub compute: DType,
}

/// The library's view of a job on `batch` x `seq` tokens, with the model's config (read once by
/// the caller).
fn strategy_job<'c>(
    batch: usize,
    seq: usize,
    config: Option<&'c ModelConfig>,
    par: &ParallelArgs,
) -> strategy::Job<'c> {
    strategy::Job { batch, seq, config, pad_vocab_to_multiple_of: par.pad_vocab_to_multiple_of }
}

/// The strategy `--mesh`/`--zero`/`--sequence-parallel` ask for (not `--auto`).
pub fn explicit(par: &ParallelArgs, batch: usize, seq: usize, model: &Path) -> Result<Strategy> {
    let mesh = match &par.mesh {
        Some(m) => Mesh::parse(m).map_err(|e| anyhow!("--mesh {m}: {e}"))?,
        None => Mesh::default(),
    };
    if let Some(other) = mesh.axes.iter().find(|x| x.name != "dp" && x.name != "tp") {
        bail!(
            "--mesh: axis `{}` is not known; shardc shards over `dp` (data parallelism) and `tp` (tensor parallelism), e.g. --mesh dp=2,tp=4",
            other.name
        );
    }
    let names: Vec<&str> = mesh.axes.iter().map(|a| a.name.as_str()).collect();
    if names == ["tp", "dp"] {
        bail!("--mesh: put `dp` first (dp=D,tp=T): tensor-parallel ranks are neighbours, inside a node");
    }
    let s = Strategy {
        dp: mesh.axis_size("dp").unwrap_or(1),
        tp: mesh.axis_size("tp").unwrap_or(1),
        zero: zero_stage(par.zero)?,
        sp: par.sequence_parallel,
    };
    let config = model_config(model);
    strategy::check(&s, &strategy_job(batch, seq, config.as_ref(), par))?;
    for n in strategy::notes(&s, config.as_ref()) {
        eprintln!("note: {n}");
    }
    Ok(s)
}

/// The forward graph for one dp rank's share of the batch, vocabulary padded if asked.
pub fn forward_graph(
    model: &Path,
    batch: usize,
    seq: usize,
    compute: DType,
    s: &Strategy,
    par: &ParallelArgs,
) -> Result<Graph> {
    let pad = par.pad_vocab_to_multiple_of.map(|m| m * s.tp);
    crate::model::load_graph_padded(model, batch / s.dp, seq, compute, pad)
}

/// The strategy a command runs with: `--auto` (returns the ranked candidates too) or the
/// explicit one.
pub fn resolve(par: &ParallelArgs, job: Job, device: &DeviceModel) -> Result<(Strategy, Option<Vec<Candidate>>)> {
    let Job { model, batch, seq, compute } = job;
    if !par.auto {
        if par.world.is_some() {
            bail!("--world needs --auto (or give the mesh itself with --mesh dp=D,tp=T)");
        }
        return Ok((explicit(par, batch, seq, model)?, None));
    }
    let shapes: Vec<(usize, usize)> = match (par.world, &par.mesh) {
        (Some(0), _) => bail!("--world must be at least 1"),
        (Some(world), None) => strategy::mesh_shapes(world, device),
        (None, Some(_)) => {
            let fixed =
                explicit(&ParallelArgs { sequence_parallel: false, zero: 0, ..par.clone() }, batch, seq, model)?;
            vec![(fixed.dp, fixed.tp)]
        }
        (Some(_), Some(_)) => {
            bail!("--auto: give --world N (to choose the mesh shape) or --mesh (to keep it), not both")
        }
        (None, None) => bail!("--auto needs the number of devices (--world N) or a mesh to keep (--mesh dp=D,tp=T)"),
    };
    let space = Space {
        shapes,
        sequence_parallel: par.sequence_parallel,
        zero: if par.zero > 0 { Some(zero_stage(par.zero)?) } else { None },
    };
    let config = model_config(model);
    let budget = budget(par, device)?;
    let job = strategy_job(batch, seq, config.as_ref(), par);
    let ranked = strategy::search(&space, &job, compute, device, budget, |s| {
        forward_graph(model, batch, seq, compute, s, par).map_err(|e| format!("{e:#}"))
    })?;
    Ok((ranked[0].strategy.clone(), Some(ranked)))
}
