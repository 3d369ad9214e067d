//! The plan of a training step: what every rank holds and does, and what it will cost, read off
//! the per-rank step graph (nothing here is estimated from formulas about the model).
//!
//! - `collectives`: every collective with its kind, mesh axis, full-tensor bytes, phase
//!   (forward, backward, optimizer), transformer layer when it belongs to one, and the rule that
//!   introduced it, all read off the node's annotations ([`shardc_ir::program`]): its origin's
//!   rule, or for an adjoint the rule of the forward node it is the adjoint of.
//! - `memory_per_device`: model states in the layout the GPU runtime keeps them, ZeRO's
//!   accounting (Rajbhandari et al. 2020, section 3.1): with bf16 mixed precision, bf16
//!   parameters (2 bytes per element), bf16 gradients (2) and f32 master weights plus two Adam
//!   moments as optimizer state (12); in f32, 4 + 4 + 8. Elements are this rank's parameters after
//!   tensor parallelism; ZeRO over `dp` divides (flat, padded shards) the optimizer state from
//!   stage 1, the gradients from stage 2 (reduce-scattered bucket by bucket during the backward)
//!   and the parameters at stage 3, so a stage's total is 16 Psi, 4 Psi + 12 Psi/Nd,
//!   2 Psi + 14 Psi/Nd or 16 Psi/Nd. Activations are the forward values the backward reads
//!   (what autodiff keeps alive), per rank.
//! - `comm_bytes_per_step`: per mesh axis, bytes as the ZeRO paper counts volume (an all-reduce
//!   moves twice its tensor).
//! - `flops_per_step`: 2 M N K per matrix product, per rank.
//! - `predicted_step_seconds`: roofline time of the matrix products plus the memory traffic of
//!   the other ops, plus the alpha-beta time of the collectives ([`crate::cost`]), without
//!   overlap.

use crate::analysis::collectives;
use crate::cost::{collective_seconds, compute_seconds, CollectiveKind, DeviceModel};
use crate::train_step::TrainStep;
use serde::Serialize;
use shardc_ir::{ArgKind, DType, Graph, Node, Op, Origin, Phase, StepRule, ValueId, ZeroStage};
use std::collections::{BTreeMap, HashMap, HashSet};

/// One collective of the plan.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PlannedCollective {
    pub kind: CollectiveKind,
    pub axis: String,
    pub bytes: usize,
    pub phase: Phase,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer: Option<u32>,
    pub rule: String,
    pub value: String,
}

/// Bytes per device.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Memory {
    pub params: usize,
    pub grads: usize,
    pub optimizer: usize,
    pub activations: usize,
    pub total: usize,
}

/// The plan of one training step on one rank.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    pub params_total: usize,
    pub mesh: BTreeMap<String, usize>,
    pub collectives: Vec<PlannedCollective>,
    pub memory_per_device: Memory,
    /// Bytes per mesh axis, as ZeRO counts volume (an all-reduce moves its tensor twice).
    pub comm_bytes_per_step: BTreeMap<String, u64>,
    pub flops_per_step: f64,
    pub predicted_step_seconds: f64,
}

fn matmul_flops(g: &Graph, n: &shardc_ir::Node) -> f64 {
    let a = g.ty(n.inputs[0]);
    let k = if n.attrs.bool_or("transpose_a", false) { a.shape[a.rank() - 2] } else { a.shape[a.rank() - 1] };
    2.0 * g.ty(n.output()).numel() as f64 * k as f64
}

/// What a plan needs besides the step graph.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanInput {
    /// The model's parameter count (the step's own arguments may be shards).
    pub params_total: usize,
    /// Elements of each parameter this rank holds before ZeRO (after tensor parallelism).
    pub params_per_rank: Vec<usize>,
    pub dp: usize,
    pub zero: ZeroStage,
    /// bf16 mixed precision (else f32 throughout).
    pub mixed: bool,
}

impl PlanInput {
    /// For a step of `forward` (per-rank parameters) without ZeRO details.
    pub fn of(forward: &Graph, params_total: usize, dp: usize, zero: ZeroStage, mixed: bool) -> PlanInput {
        let params_per_rank = forward.args_of(ArgKind::Param).map(|v| forward.ty(v).numel()).collect();
        PlanInput { params_total, params_per_rank, dp, zero, mixed }
    }

    /// (parameters, gradients, optimizer state) bytes per device; see the module doc.
    pub fn model_states(&self) -> (usize, usize, usize) {
        let n = self.dp.max(1);
        let whole: usize = self.params_per_rank.iter().sum();
        let shard: usize = self.params_per_rank.iter().map(|p| p.div_ceil(n)).sum();
        let (pb, gb, ob) = if self.mixed { (2, 2, 12) } else { (4, 4, 8) };
        let z = if n > 1 { self.zero } else { ZeroStage::Replicated };
        let params = pb * if z.shards_parameters() { shard } else { whole };
        let grads = gb * if z.shards_gradients() { shard } else { whole };
        let optimizer = ob * if z.shards_optimizer() { shard } else { whole };
        (params, grads, optimizer)
    }
}

/// The rule behind node `n` of `g`, from its origin: the sharding or training-step rule that
/// made it, or for part of an adjoint the rule of the forward node it differentiates (the
/// adjoint of ZeRO-3's parameter gather is its gradient reduce-scatter).
pub fn rule_of(g: &Graph, producer: &HashMap<ValueId, usize>, n: &Node) -> String {
    match &n.origin {
        Origin::Adjoint(v) => match producer.get(v).map(|&i| &g.nodes[i].origin) {
            Some(Origin::Step { rule: StepRule::GatherParameters, zero, .. }) => {
                format!("zero-{zero}/reduce-scatter-gradients")
            }
            forward => format!("{} (adjoint)", forward.and_then(Origin::rule_name).unwrap_or_else(|| "model".into())),
        },
        o => o.rule_name().unwrap_or_else(|| "model".to_string()),
    }
}

/// Reads the plan off a training step (see the module doc).
pub fn plan(step: &TrainStep, input: &PlanInput, device: &DeviceModel) -> Plan {
    let params_total = input.params_total;
    let g = &step.graph;
    let mesh: BTreeMap<String, usize> = g.mesh.axes.iter().map(|a| (a.name.clone(), a.size)).collect();
    // Stride of each axis: the product of the sizes of the faster (later) axes.
    let stride = |axis: &str| -> usize {
        let i = g.mesh.axes.iter().position(|a| a.name == axis).unwrap_or(0);
        g.mesh.axes[i + 1..].iter().map(|a| a.size).product()
    };
    let mut planned = Vec::new();
    let mut comm = BTreeMap::new();
    let mut seconds = 0.0;
    let producer: HashMap<ValueId, usize> =
        g.nodes.iter().enumerate().flat_map(|(i, n)| n.outputs.iter().map(move |&o| (o, i))).collect();
    for c in collectives(g) {
        let node = &g.nodes[c.node];
        let rule = rule_of(g, &producer, node);
        *comm.entry(c.axis.clone()).or_insert(0) += c.kind.volume(c.bytes as f64) as u64;
        let size = g.mesh.axis_size(&c.axis).unwrap_or(1);
        seconds += collective_seconds(device, c.kind, c.bytes as f64, size, stride(&c.axis));
        planned.push(PlannedCollective {
            kind: c.kind,
            axis: c.axis,
            bytes: c.bytes,
            phase: node.phase,
            layer: g.layer(node.output()),
            rule,
            value: c.value,
        });
    }
    let mut flops = 0.0;
    for n in &g.nodes {
        if n.op == Op::MatMul {
            let f = matmul_flops(g, n);
            flops += f;
            let bytes: usize =
                n.inputs.iter().map(|&v| g.ty(v).size_bytes()).sum::<usize>() + g.ty(n.output()).size_bytes();
            seconds += compute_seconds(device, f, bytes as f64, g.ty(n.output()).dtype == DType::Bf16);
        } else if !n.op.is_collective() {
            let bytes: usize =
                n.inputs.iter().map(|&v| g.ty(v).size_bytes()).sum::<usize>() + g.ty(n.output()).size_bytes();
            seconds += bytes as f64 / device.memory_bandwidth;
        }
    }
    // Activations: forward results that a backward node reads.
    let forward_values: HashSet<_> =
        g.nodes.iter().filter(|n| n.phase == Phase::Forward).flat_map(|n| n.outputs.iter().copied()).collect();
    let saved: HashSet<_> = g
        .nodes
        .iter()
        .filter(|n| n.phase == Phase::Backward)
        .flat_map(|n| n.inputs.iter().copied())
        .filter(|v| forward_values.contains(v))
        .collect();
    let activations = saved.iter().map(|&v| g.ty(v).size_bytes()).sum();
    let (params, grads, optimizer) = input.model_states();
    let mut memory = Memory { params, grads, optimizer, activations, total: 0 };
    memory.total = memory.params + memory.grads + memory.optimizer + memory.activations;
    Plan {
        params_total,
        mesh,
        collectives: planned,
        memory_per_device: memory,
        comm_bytes_per_step: comm,
        flops_per_step: flops,
        predicted_step_seconds: seconds,
    }
}

/// The version of the plan's JSON form ([`PlanReport`]); bumped when a field changes meaning or
/// goes away (new fields may appear without a bump).
pub const PLAN_SCHEMA_VERSION: u32 = 1;

/// Training precision, as the plan records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlanPrecision {
    F32,
    Bf16Mixed,
}

/// How the step is spread, as the plan records it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PlanSetup {
    pub dp: usize,
    pub tp: usize,
    pub zero: ZeroStage,
    pub sequence_parallel: bool,
}

/// One `--auto` candidate.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PlanCandidate {
    #[serde(flatten)]
    pub setup: PlanSetup,
    pub predicted_step_seconds: f64,
    pub memory_per_device: usize,
    pub fits_memory_budget: bool,
}

/// `shardc plan --format json`: the plan with what it is the plan of.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PlanReport {
    pub schema_version: u32,
    /// The model's graph name (`gpt2_4l_128d`).
    pub model: String,
    /// Rows per global batch and tokens per row.
    pub batch: usize,
    pub seq: usize,
    pub precision: PlanPrecision,
    pub setup: PlanSetup,
    #[serde(flatten)]
    pub plan: Plan,
    /// Bytes per device the plan must fit in.
    pub memory_budget: u64,
    pub fits_memory_budget: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub search: Option<crate::sharding::SearchStats>,
    /// With `--auto`: the best candidates, chosen first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto: Option<Vec<PlanCandidate>>,
    /// The memory planner's arena for the fused per-rank program (what the runtime allocates).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_plan: Option<ArenaSummary>,
    /// How the runtime coalesces the backward's and optimizer's collectives ([`crate::bucket`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buckets: Option<BucketReport>,
    /// Matmuls that skip causal attention's zeros ([`crate::causal`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub causal_products: Option<crate::causal::CausalSummary>,
}

/// Collective bucketing, as the lowering applies it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BucketReport {
    /// The most bytes one bucket moves.
    pub bucket_bytes: usize,
    /// Collectives coalesced, and the buckets they became.
    pub collectives_bucketed: usize,
    pub buckets: usize,
}

impl BucketReport {
    pub fn of(s: &crate::bucket::BucketSummary) -> BucketReport {
        BucketReport { bucket_bytes: crate::bucket::BUCKET_BYTES, collectives_bucketed: s.members, buckets: s.buckets }
    }
}

/// The memory planner's figures for one rank ([`crate::memory`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ArenaSummary {
    /// The arena: persistent region plus the step's peak, with fragmentation.
    pub arena_bytes: usize,
    /// Parameters, optimizer state and step inputs, kept across steps.
    pub persistent_bytes: usize,
    /// The most bytes live at once (no fragmentation).
    pub live_peak_bytes: usize,
    /// What is live at that peak, by class.
    pub at_peak: BTreeMap<String, usize>,
}

impl ArenaSummary {
    /// Plans the arena of a lowered program ([`crate::lowering`]).
    pub fn of_program(program: &Graph) -> ArenaSummary {
        let m = crate::memory::plan_memory(program);
        let at_peak = m.at_peak().into_iter().map(|(c, b)| (c.name().to_string(), b)).collect();
        ArenaSummary {
            arena_bytes: m.arena_bytes,
            persistent_bytes: m.persistent_bytes,
            live_peak_bytes: m.live_peak_bytes,
            at_peak,
        }
    }
}
