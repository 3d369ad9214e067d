//! Parallel strategies: how a training step is spread (a `dp` x `tp` mesh, a ZeRO stage,
//! sequence parallelism), whether a model and batch allow it (with errors that say what would),
//! and the `--auto` search over them.
//!
//! The search plans every candidate whole (the sharding pass, the training step and
//! [`crate::plan`] on it) and ranks them: plans that fit the memory budget first, by predicted
//! step time, then by memory; when none fits, the smallest first (it says how far off the
//! budget is). Alpa (Zheng et al. 2022) searches placements with an ILP over an operator graph;
//! our space is small enough (mesh shapes x sequence parallelism x ZeRO stage) to plan each point
//! exactly, so a ranking's numbers are the numbers of the plan the user then gets.
//!
//! This module reads no files: the caller passes the model's config (read once) and a function
//! that builds the forward graph for a strategy (which the search calls once per mesh shape).

use crate::cost::DeviceModel;
use crate::plan::{plan, Plan, PlanInput};
use crate::sharding::{ShardOptions, Sharded};
use crate::train_step::{build_parallel_step, AdamW, DataParallel, StepError, TrainStep};
use shardc_ir::import::ModelConfig;
use shardc_ir::{DType, Graph, Mesh, ZeroStage};

/// One way to spread the step: a dp x tp mesh, a ZeRO stage, sequence parallelism.
#[derive(Clone, Debug, PartialEq)]
pub struct Strategy {
    pub dp: usize,
    pub tp: usize,
    pub zero: ZeroStage,
    pub sp: bool,
}

impl Strategy {
    /// The mesh, `dp` major (tensor-parallel ranks are neighbours, inside a node).
    pub fn mesh(&self) -> Mesh {
        let axes: Vec<String> = [("dp", self.dp), ("tp", self.tp)]
            .iter()
            .filter(|(_, n)| *n > 1)
            .map(|(a, n)| format!("{a}={n}"))
            .collect();
        Mesh::parse(&axes.join(",")).expect("axis names are identifiers and sizes are positive")
    }

    pub fn data_parallel(&self) -> Option<DataParallel> {
        (self.dp > 1).then(|| DataParallel { axis: "dp".into(), zero_stage: self.zero })
    }

    pub fn tensor_parallel(&self) -> Option<ShardOptions> {
        (self.tp > 1).then(|| ShardOptions::tp(self.tp, self.sp))
    }

    /// `dp=2, tp=4, ZeRO-1, sequence parallelism on`, for people.
    pub fn describe(&self) -> String {
        let mesh = self.mesh();
        let mesh = if mesh.axes.is_empty() { "single device".to_string() } else { mesh.to_string() };
        format!("{mesh}, ZeRO-{}, sequence parallelism {}", self.zero, if self.sp { "on" } else { "off" })
    }
}

/// Why a strategy does not fit the model or the batch; each says what would.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum StrategyError {
    #[error("--zero {0} needs a data-parallel mesh, e.g. --mesh dp=2")]
    ZeroWithoutDataParallel(ZeroStage),
    #[error("--sequence-parallel needs a tensor-parallel mesh, e.g. --mesh tp=2")]
    SequenceParallelWithoutTensorParallel,
    #[error("--batch {batch} does not divide over dp={dp}; use dp in {} or a batch that is a multiple of {dp}", set(.fits))]
    Batch { batch: usize, dp: usize, fits: Vec<usize> },
    #[error(
        "--sequence-parallel splits the {seq} tokens of a row over tp={tp}; use a --seq that is a multiple of {tp}"
    )]
    Sequence { seq: usize, tp: usize },
    #[error("tp={tp} does not divide {heads} attention heads; use tp in {}", set(.fits))]
    Heads { tp: usize, heads: usize, fits: Vec<usize> },
    #[error("tp={tp} does not divide the MLP's {hidden} hidden units; use tp in {}", set(.fits))]
    Mlp { tp: usize, hidden: usize, fits: Vec<usize> },
    #[error(
        "tp={tp} does not divide the vocabulary of {vocab} tokens; pad it with --pad-vocab-to-multiple-of N \
         (Megatron pads to a multiple of 128 x tp), or use tp in {}",
        set(.fits)
    )]
    Vocabulary { tp: usize, vocab: usize, fits: Vec<usize> },
    #[error("--auto found no way to arrange the devices for this model and batch:\n{}", .0.join("\n"))]
    NoCandidate(Vec<String>),
    #[error("building the forward graph for {strategy}: {message}")]
    Forward { strategy: String, message: String },
    #[error(transparent)]
    Step(#[from] StepError),
}

fn divisors(n: usize) -> Vec<usize> {
    (1..=n).filter(|d| n.is_multiple_of(*d)).collect()
}

fn set(v: &[usize]) -> String {
    format!("{{{}}}", v.iter().map(usize::to_string).collect::<Vec<_>>().join(","))
}

/// The vocabulary after padding to a multiple of `multiple` x `tp` (Megatron's rule).
pub fn padded_vocab(vocab: usize, multiple: Option<usize>, tp: usize) -> usize {
    match multiple {
        Some(m) if m > 0 => vocab.div_ceil(m * tp) * m * tp,
        _ => vocab,
    }
}

/// Whether `tp` splits `config` (heads, MLP, the vocabulary padded to `padded_vocab`).
pub fn check_tp(config: &ModelConfig, tp: usize, padded_vocab: usize) -> Result<(), StrategyError> {
    let fits = |n: usize| divisors(n).into_iter().filter(|d| config.ffn_hidden.is_multiple_of(*d)).collect::<Vec<_>>();
    if !config.heads.is_multiple_of(tp) {
        return Err(StrategyError::Heads { tp, heads: config.heads, fits: fits(config.heads) });
    }
    if !config.ffn_hidden.is_multiple_of(tp) {
        return Err(StrategyError::Mlp { tp, hidden: config.ffn_hidden, fits: fits(config.heads) });
    }
    if !padded_vocab.is_multiple_of(tp) {
        let fits = divisors(padded_vocab).into_iter().filter(|d| fits(config.heads).contains(d)).collect();
        return Err(StrategyError::Vocabulary { tp, vocab: padded_vocab, fits });
    }
    Ok(())
}

/// What a strategy is checked against: the global batch and sequence, the model's config (for
/// Hugging Face models; a `.tir` graph has none), and the vocabulary padding multiple.
#[derive(Clone, Copy, Debug)]
pub struct Job<'a> {
    pub batch: usize,
    pub seq: usize,
    pub config: Option<&'a ModelConfig>,
    pub pad_vocab_to_multiple_of: Option<usize>,
}

/// Checks `s` against the job.
pub fn check(s: &Strategy, job: &Job) -> Result<(), StrategyError> {
    if s.zero != ZeroStage::Replicated && s.dp == 1 {
        return Err(StrategyError::ZeroWithoutDataParallel(s.zero));
    }
    if s.sp && s.tp == 1 {
        return Err(StrategyError::SequenceParallelWithoutTensorParallel);
    }
    if !job.batch.is_multiple_of(s.dp) {
        return Err(StrategyError::Batch { batch: job.batch, dp: s.dp, fits: divisors(job.batch) });
    }
    if s.sp && !job.seq.is_multiple_of(s.tp) {
        return Err(StrategyError::Sequence { seq: job.seq, tp: s.tp });
    }
    if let (true, Some(config)) = (s.tp > 1, job.config) {
        check_tp(config, s.tp, padded_vocab(config.vocab_size, job.pad_vocab_to_multiple_of, s.tp))?;
    }
    Ok(())
}

/// What a user should know about a valid but unusual strategy.
pub fn notes(s: &Strategy, config: Option<&ModelConfig>) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(c) = config.filter(|c| s.tp > 1 && !c.kv_heads.is_multiple_of(s.tp)) {
        out.push(format!(
            "tp={} does not divide the {} key/value heads: attention is not split by heads (q, k and v \
             are gathered and every rank computes all heads); Megatron would replicate key/value heads. \
             tp in {} splits attention.",
            s.tp,
            c.kv_heads,
            set(&divisors(c.kv_heads))
        ));
    }
    out
}

/// Every dp x tp arrangement of `world` devices with tp inside a node (the device model's
/// fastest link).
pub fn mesh_shapes(world: usize, device: &DeviceModel) -> Vec<(usize, usize)> {
    let node = device.links.first().map_or(world, |l| if l.ranks_per_group == 0 { world } else { l.ranks_per_group });
    divisors(world).into_iter().filter(|&t| t <= node).map(|tp| (world / tp, tp)).collect()
}

/// The training step of `forward` (one dp rank's batch) under `s`.
pub fn build(forward: &Graph, s: &Strategy, device: &DeviceModel) -> Result<(TrainStep, Option<Sharded>), StepError> {
    let mut g = forward.clone();
    g.mesh = s.mesh();
    let (dp, tp) = (s.data_parallel(), s.tensor_parallel());
    build_parallel_step(&g, &AdamW::default(), dp.as_ref(), tp.as_ref(), device)
}

/// What the plan of a step of `forward` under `s` needs besides the step.
pub fn plan_input(
    forward: &Graph,
    params_total: usize,
    s: &Strategy,
    sharded: Option<&Sharded>,
    compute: DType,
) -> PlanInput {
    let per_rank = sharded.map_or(forward, |s| &s.graph);
    // A .tir graph fixes its own dtypes: mixed precision if it computes in bf16/f16.
    let mixed = compute != DType::F32 && forward.values.iter().any(|v| matches!(v.ty.dtype, DType::Bf16 | DType::F16));
    PlanInput::of(per_rank, params_total, s.dp, s.zero, mixed)
}

/// One candidate of the search and its plan.
pub struct Candidate {
    pub strategy: Strategy,
    pub plan: Plan,
    pub fits: bool,
}

/// The space `--auto` searches: mesh shapes, and what the user fixed.
#[derive(Clone, Debug)]
pub struct Space {
    pub shapes: Vec<(usize, usize)>,
    /// Sequence parallelism fixed on (else both are tried).
    pub sequence_parallel: bool,
    /// A ZeRO stage fixed (else every stage is tried).
    pub zero: Option<ZeroStage>,
}

/// Plans every candidate of `space` and ranks them (see the module doc). `forward` builds the
/// forward graph of one dp rank's batch for a strategy; it is called once per mesh shape.
/// `compute` is the compute dtype (bf16 for mixed precision).
pub fn search(
    space: &Space,
    job: &Job,
    compute: DType,
    device: &DeviceModel,
    budget: u64,
    mut forward: impl FnMut(&Strategy) -> Result<Graph, String>,
) -> Result<Vec<Candidate>, StrategyError> {
    let sps: &[bool] = if space.sequence_parallel { &[true] } else { &[false, true] };
    let zeros: Vec<ZeroStage> = space.zero.map_or(ZeroStage::ALL.to_vec(), |z| vec![z]);
    let mut out = Vec::new();
    let mut skipped: Vec<(usize, String)> = Vec::new();
    for &(dp, tp) in &space.shapes {
        let mut graph = None;
        for &sp in sps {
            for &zero in &zeros {
                let s = Strategy { dp, tp, zero, sp };
                if let Err(e) = check(&s, job) {
                    if !skipped.iter().any(|(t, _)| *t == tp) {
                        skipped.push((tp, e.to_string()));
                    }
                    continue;
                }
                if graph.is_none() {
                    let g =
                        forward(&s).map_err(|message| StrategyError::Forward { strategy: s.describe(), message })?;
                    graph = Some(g);
                }
                let g = graph.as_ref().expect("built above");
                let (step, sharded) = build(g, &s, device)?;
                let input = plan_input(g, g.param_count(), &s, sharded.as_ref(), compute);
                let plan = plan(&step, &input, device);
                let fits = plan.memory_per_device.total as u64 <= budget;
                out.push(Candidate { strategy: s, plan, fits });
            }
        }
    }
    if out.is_empty() {
        return Err(StrategyError::NoCandidate(skipped.into_iter().map(|(tp, e)| format!("  tp={tp}: {e}")).collect()));
    }
    rank(&mut out);
    Ok(out)
}

/// Fitting plans by predicted time (then memory); if none fits, the smallest first.
fn rank(out: &mut [Candidate]) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpt(heads: usize, vocab: usize) -> ModelConfig {
        let json = format!(
            r#"{{"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": {heads}, "vocab_size": {vocab}, "n_positions": 64}}"#
        );
        shardc_ir::import::parse_config(&json).unwrap().0
    }

    fn job(config: Option<&ModelConfig>) -> Job<'_> {
        Job { batch: 8, seq: 16, config, pad_vocab_to_multiple_of: None }
    }

    #[test]
    fn checks_say_what_would_work() {
        let c = gpt(4, 256);
        let s = |dp, tp, zero, sp| Strategy { dp, tp, zero, sp };
        assert!(check(&s(2, 2, ZeroStage::OptimizerStates, true), &job(Some(&c))).is_ok());
        let e = check(&s(1, 3, ZeroStage::Replicated, false), &job(Some(&c))).unwrap_err();
        assert_eq!(e.to_string(), "tp=3 does not divide 4 attention heads; use tp in {1,2,4}");
        let e = check(&s(3, 1, ZeroStage::Replicated, false), &job(None)).unwrap_err();
        assert!(e.to_string().contains("use dp in {1,2,4,8}"), "{e}");
        assert_eq!(
            check(&s(1, 1, ZeroStage::Gradients, false), &job(None)),
            Err(StrategyError::ZeroWithoutDataParallel(ZeroStage::Gradients))
        );
        // A vocabulary of 101 does not split over tp=2 until it is padded.
        let odd = gpt(4, 101);
        assert!(matches!(
            check(&s(1, 2, ZeroStage::Replicated, false), &job(Some(&odd))),
            Err(StrategyError::Vocabulary { .. })
        ));
        let padded = Job { pad_vocab_to_multiple_of: Some(64), ..job(Some(&odd)) };
        assert!(check(&s(1, 2, ZeroStage::Replicated, false), &padded).is_ok());
        assert_eq!(padded_vocab(101, Some(64), 2), 128);
    }

    #[test]
    fn mesh_shapes_keep_tensor_parallelism_inside_a_node() {
        let shapes = mesh_shapes(32, &DeviceModel::h100());
        assert_eq!(shapes, vec![(32, 1), (16, 2), (8, 4), (4, 8)]);
    }

    #[test]
    fn search_ranks_fitting_plans_by_time() {
        let c = gpt(4, 256);
        let space = Space { shapes: vec![(2, 1), (1, 2)], sequence_parallel: false, zero: None };
        let build_forward = |s: &Strategy| {
            let opts = shardc_ir::import::BuildOptions::f32(8 / s.dp, 16, false);
            shardc_ir::import::build_graph(&c, opts).map(|b| b.graph)
        };
        let ranked = search(&space, &job(Some(&c)), DType::F32, &DeviceModel::h100(), u64::MAX, build_forward).unwrap();
        // dp=2: 4 ZeRO stages; tp=2: 2 (sequence parallelism off and on) at ZeRO-0.
        assert_eq!(ranked.len(), 6);
        assert!(ranked.iter().all(|c| c.fits));
        let times: Vec<f64> = ranked.iter().map(|c| c.plan.predicted_step_seconds).collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
        let none = search(&space, &job(Some(&c)), DType::F32, &DeviceModel::h100(), 1, build_forward).unwrap();
        let mem: Vec<usize> = none.iter().map(|c| c.plan.memory_per_device.total).collect();
        assert!(none.iter().all(|c| !c.fits) && mem.windows(2).all(|w| w[0] <= w[1]), "{mem:?}");
    }
}
