//! The options every compiling command shares (`--mesh`, `--auto`, `--world`, `--zero`,
//! `--sequence-parallel`, `--device-model`, `--memory-budget`, `--pad-vocab-to-multiple-of`):
//! checked against the model with errors that say what would work, turned into a training step,
//! and, with `--auto`, searched.

use crate::cli::ParallelArgs;
use anyhow::{anyhow, bail, Context, Result};
use shardc_ir::import::ModelConfig;
use shardc_ir::{DType, Graph, Mesh, ZeroStage};
use shardc_passes::cost::DeviceModel;
use shardc_passes::plan::{plan as plan_step, Plan, PlanInput};
use shardc_passes::sharding::{ShardOptions, Sharded};
use shardc_passes::train_step::{build_parallel_step, AdamW, DataParallel, TrainStep};
use std::path::Path;

/// One way to spread the step: a dp x tp mesh, a ZeRO stage, sequence parallelism.
#[derive(Clone, Debug, PartialEq)]
pub struct Setup {
    pub dp: usize,
    pub tp: usize,
    pub zero: ZeroStage,
    pub sp: bool,
}

impl Setup {
    /// The mesh, `dp` major (tensor-parallel ranks are neighbours, inside a node).
    pub fn mesh(&self) -> Mesh {
        let axes: Vec<String> = [("dp", self.dp), ("tp", self.tp)]
            .iter()
            .filter(|(_, n)| *n > 1)
            .map(|(a, n)| format!("{a}={n}"))
            .collect();
        Mesh::parse(&axes.join(",")).expect("well-formed mesh")
    }

    pub fn data_parallel(&self) -> Option<DataParallel> {
        (self.dp > 1).then(|| DataParallel { axis: "dp".into(), zero_stage: self.zero })
    }

    pub fn tensor_parallel(&self) -> Option<ShardOptions> {
        (self.tp > 1).then(|| ShardOptions::tp(self.tp, self.sp))
    }

    /// `dp=2,tp=4 zero=1 sp`, for people.
    pub fn describe(&self) -> String {
        let mesh = self.mesh();
        let mesh = if mesh.axes.is_empty() { "single device".to_string() } else { mesh.to_string() };
        format!("{mesh}, ZeRO-{}, sequence parallelism {}", self.zero, if self.sp { "on" } else { "off" })
    }
}

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
pub fn budget(par: &ParallelArgs, device: &DeviceModel) -> Result<f64> {
    match &par.memory_budget {
        Some(b) => crate::commands::parse_bytes(b).map_err(|e| anyhow!("--memory-budget: {e}")),
        None => Ok(device.memory_bytes),
    }
}

/// The model's config, when MODEL is a Hugging Face directory.
pub fn model_config(path: &Path) -> Option<ModelConfig> {
    let text = std::fs::read_to_string(path.join("config.json")).ok()?;
    shardc_ir::import::parse_config(&text).ok().map(|(c, _)| c)
}

fn divisors(n: usize) -> Vec<usize> {
    (1..=n).filter(|d| n.is_multiple_of(*d)).collect()
}

fn set(v: &[usize]) -> String {
    format!("{{{}}}", v.iter().map(usize::to_string).collect::<Vec<_>>().join(","))
}

/// Why `tp` cannot split `config`, with the sizes that would work.
pub fn check_tp(config: &ModelConfig, tp: usize, padded_vocab: usize) -> Result<()> {
    let fits = |n: usize| divisors(n).into_iter().filter(|d| config.ffn_hidden.is_multiple_of(*d)).collect::<Vec<_>>();
    if !config.heads.is_multiple_of(tp) {
        bail!("tp={tp} does not divide {} attention heads; use tp in {}", config.heads, set(&fits(config.heads)));
    }
    if !config.ffn_hidden.is_multiple_of(tp) {
        bail!(
            "tp={tp} does not divide the MLP's {} hidden units; use tp in {}",
            config.ffn_hidden,
            set(&fits(config.heads))
        );
    }
    if !padded_vocab.is_multiple_of(tp) {
        bail!(
            "tp={tp} does not divide the vocabulary of {padded_vocab} tokens; pad it with \
             --pad-vocab-to-multiple-of N (Megatron pads to a multiple of 128 x tp), or use tp in {}",
            set(&divisors(padded_vocab).into_iter().filter(|d| fits(config.heads).contains(d)).collect::<Vec<_>>())
        );
    }
    Ok(())
}

/// The vocabulary after `--pad-vocab-to-multiple-of` for `tp`.
pub fn padded_vocab(vocab: usize, par: &ParallelArgs, tp: usize) -> usize {
    match par.pad_vocab_to_multiple_of {
        Some(m) if m > 0 => vocab.div_ceil(m * tp) * m * tp,
        _ => vocab,
    }
}

/// Checks `setup` against the batch, sequence and model.
pub fn check(setup: &Setup, batch: usize, seq: usize, model: &Path, par: &ParallelArgs) -> Result<()> {
    if setup.zero != ZeroStage::Replicated && setup.dp == 1 {
        bail!("--zero {} needs a data-parallel mesh, e.g. --mesh dp=2", setup.zero);
    }
    if setup.sp && setup.tp == 1 {
        bail!("--sequence-parallel needs a tensor-parallel mesh, e.g. --mesh tp=2");
    }
    if !batch.is_multiple_of(setup.dp) {
        bail!(
            "--batch {batch} does not divide over dp={}; use dp in {} or a batch that is a multiple of {}",
            setup.dp,
            set(&divisors(batch)),
            setup.dp
        );
    }
    if setup.sp && !seq.is_multiple_of(setup.tp) {
        bail!(
            "--sequence-parallel splits the {seq} tokens of a row over tp={}; use a --seq that is a multiple of {}",
            setup.tp,
            setup.tp
        );
    }
    if setup.tp > 1 {
        if let Some(config) = model_config(model) {
            check_tp(&config, setup.tp, padded_vocab(config.vocab_size, par, setup.tp))?;
        }
    }
    Ok(())
}

/// What a user should know about a valid but unusual setup.
pub fn notes(setup: &Setup, model: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(c) = model_config(model).filter(|c| setup.tp > 1 && !c.kv_heads.is_multiple_of(setup.tp)) {
        out.push(format!(
            "tp={} does not divide the {} key/value heads: attention is not split by heads (q, k and v \
             are gathered and every rank computes all heads); Megatron would replicate key/value heads. \
             tp in {} splits attention.",
            setup.tp,
            c.kv_heads,
            set(&divisors(c.kv_heads))
        ));
    }
    out
}

/// `--zero N` as a stage.
pub fn zero_stage(n: u8) -> Result<ZeroStage> {
    ZeroStage::from_number(n).ok_or_else(|| anyhow!("--zero {n}: ZeRO has stages 0, 1, 2 and 3"))
}

/// The setup `--mesh`/`--zero`/`--sequence-parallel` ask for (not `--auto`).
pub fn explicit(par: &ParallelArgs, batch: usize, seq: usize, model: &Path) -> Result<Setup> {
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
    let setup = Setup {
        dp: mesh.axis_size("dp").unwrap_or(1),
        tp: mesh.axis_size("tp").unwrap_or(1),
        zero: zero_stage(par.zero)?,
        sp: par.sequence_parallel,
    };
    check(&setup, batch, seq, model, par)?;
    for n in notes(&setup, model) {
        eprintln!("note: {n}");
    }
    Ok(setup)
}

/// The forward graph for one dp rank's share of the batch, vocabulary padded if asked.
pub fn forward_graph(
    model: &Path,
    batch: usize,
    seq: usize,
    compute: DType,
    setup: &Setup,
    par: &ParallelArgs,
) -> Result<Graph> {
    let pad = par.pad_vocab_to_multiple_of.map(|m| m * setup.tp);
    crate::model::load_graph_padded(model, batch / setup.dp, seq, compute, pad)
}

/// The training step of `forward` (one dp rank's batch) on `setup`.
pub fn build(forward: &Graph, setup: &Setup, device: &DeviceModel) -> Result<(TrainStep, Option<Sharded>)> {
    let mut g = forward.clone();
    g.mesh = setup.mesh();
    let (dp, tp) = (setup.data_parallel(), setup.tensor_parallel());
    Ok(build_parallel_step(&g, &AdamW::default(), dp.as_ref(), tp.as_ref(), device)?)
}

/// What the plan of `step` needs besides the step.
pub fn plan_input(
    forward: &Graph,
    params_total: usize,
    setup: &Setup,
    sharded: Option<&Sharded>,
    compute: DType,
) -> PlanInput {
    let per_rank = sharded.map_or(forward, |s| &s.graph);
    // A .tir graph fixes its own dtypes: mixed precision if it computes in bf16/f16.
    let mixed = compute != DType::F32 && forward.values.iter().any(|v| matches!(v.ty.dtype, DType::Bf16 | DType::F16));
    PlanInput::of(per_rank, params_total, setup.dp, setup.zero, mixed)
}

/// What a compiling command compiles: a model for a global batch of `batch` x `seq` tokens.
#[derive(Clone, Copy, Debug)]
pub struct Job<'a> {
    pub model: &'a Path,
    pub batch: usize,
    pub seq: usize,
    pub compute: DType,
}

/// One `--auto` candidate and its plan.
pub struct Candidate {
    pub setup: Setup,
    pub plan: Plan,
    pub fits: bool,
}

/// `--auto`: every dp x tp arrangement of `world` devices (tp inside a node and dividing the
/// model) or the one `--mesh` fixes, with and without sequence parallelism, at every ZeRO stage
/// (what `--zero` / `--sequence-parallel` fix stays fixed); planned, then ranked: plans that fit
/// the budget first, by predicted step time, then by memory.
pub fn auto(
    par: &ParallelArgs,
    shapes: &[(usize, usize)],
    job: Job,
    device: &DeviceModel,
    budget: f64,
) -> Result<Vec<Candidate>> {
    let Job { model, batch, seq, compute } = job;
    let sps: &[bool] = if par.sequence_parallel { &[true] } else { &[false, true] };
    let zeros: Vec<ZeroStage> = if par.zero > 0 { vec![zero_stage(par.zero)?] } else { ZeroStage::ALL.to_vec() };
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for &(dp, tp) in shapes {
        let mut forward = None;
        for &sp in sps {
            for &zero in &zeros {
                let setup = Setup { dp, tp, zero, sp };
                if let Err(e) = check(&setup, batch, seq, model, par) {
                    if !skipped.iter().any(|(t, _): &(usize, String)| *t == tp) {
                        skipped.push((tp, e.to_string()));
                    }
                    continue;
                }
                if forward.is_none() {
                    forward = Some(forward_graph(model, batch, seq, compute, &setup, par)?);
                }
                let forward = forward.as_ref().expect("built above");
                let params_total = forward.param_count();
                let (step, sharded) = build(forward, &setup, device)?;
                let input = plan_input(forward, params_total, &setup, sharded.as_ref(), compute);
                let plan = plan_step(&step, &input, device);
                let fits = plan.memory_per_device.total as f64 <= budget;
                out.push(Candidate { setup, plan, fits });
            }
        }
    }
    if out.is_empty() {
        let why: Vec<String> = skipped.into_iter().map(|(tp, e)| format!("  tp={tp}: {e}")).collect();
        bail!("--auto found no way to arrange the devices for this model and batch:\n{}", why.join("\n"));
    }
    // Fitting plans by time (then memory); if none fits, the smallest first: it says how far off
    // the budget is.
    let any_fits = out.iter().any(|c| c.fits);
    out.sort_by(|a, b| {
        let key = |c: &Candidate| {
            let (t, m) = (c.plan.predicted_step_seconds, c.plan.memory_per_device.total as f64);
            if any_fits {
                (!c.fits, t, m)
            } else {
                (false, m, t)
            }
        };
        key(a).partial_cmp(&key(b)).unwrap_or(std::cmp::Ordering::Equal)
    });
    Ok(out)
}

/// The setup a command runs with: `--auto` (returns the ranked candidates too) or the explicit one.
pub fn resolve(par: &ParallelArgs, job: Job, device: &DeviceModel) -> Result<(Setup, Option<Vec<Candidate>>)> {
    let Job { model, batch, seq, .. } = job;
    if !par.auto {
        if par.world.is_some() {
            bail!("--world needs --auto (or give the mesh itself with --mesh dp=D,tp=T)");
        }
        return Ok((explicit(par, batch, seq, model)?, None));
    }
    let shapes: Vec<(usize, usize)> = match (par.world, &par.mesh) {
        (Some(0), _) => bail!("--world must be at least 1"),
        (Some(world), None) => {
            // Tensor parallelism stays inside a node (the device model's fastest link).
            let node =
                device.links.first().map_or(world, |l| if l.ranks_per_group == 0 { world } else { l.ranks_per_group });
            divisors(world).into_iter().filter(|&t| t <= node).map(|tp| (world / tp, tp)).collect()
        }
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
    let budget = budget(par, device)?;
    let ranked = auto(par, &shapes, job, device, budget)?;
    Ok((ranked[0].setup.clone(), Some(ranked)))
}
