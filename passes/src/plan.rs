//! The plan of a training step: what every rank holds and does, and what it will cost, read off
//! the per-rank step graph (nothing here is estimated from formulas about the model).
//!
//! - `collectives`: every collective with its kind, mesh axis, full-tensor bytes, phase
//!   (forward, backward, optimizer), transformer layer when it belongs to one, and the rule that
//!   introduced it ([`crate::train_step::collective_rule`], or the adjoint autodiff derived).
//! - `memory_per_device`: parameters and optimizer state are the step's `param` and `state`
//!   arguments; gradients are the gradients the optimizer consumes (averaged, and sharded under
//!   ZeRO 1-3); activations are the forward values the backward reads (what autodiff keeps alive).
//! - `comm_bytes_per_step`: per mesh axis, bytes as the ZeRO paper counts volume (an all-reduce
//!   moves twice its tensor).
//! - `flops_per_step`: 2 M N K per matrix product, per rank.
//! - `predicted_step_seconds`: roofline time of the matrix products plus the memory traffic of
//!   the other ops, plus the alpha-beta time of the collectives ([`crate::cost`]), without
//!   overlap.

use crate::analysis::collectives;
use crate::cost::{collective_seconds, compute_seconds, CollectiveKind, DeviceModel};
use crate::train_step::{collective_rule, TrainStep};
use serde::Serialize;
use shardc_ir::{ArgKind, DType, Graph, Op};
use std::collections::{BTreeMap, HashSet};

/// One collective of the plan.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PlannedCollective {
    pub kind: &'static str,
    pub axis: String,
    pub bytes: usize,
    pub phase: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer: Option<usize>,
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
    pub comm_bytes_per_step: BTreeMap<String, f64>,
    pub flops_per_step: f64,
    pub predicted_step_seconds: f64,
}

fn kind_name(k: CollectiveKind) -> &'static str {
    match k {
        CollectiveKind::AllReduce => "all_reduce",
        CollectiveKind::AllGather => "all_gather",
        CollectiveKind::ReduceScatter => "reduce_scatter",
        CollectiveKind::AllToAll => "all_to_all",
    }
}

/// The transformer layer a value belongs to, from the importer's names (`h3.…`, `l3.…`,
/// `h.3.…`, `layers.3.…`).
pub fn layer_of(name: &str) -> Option<usize> {
    for prefix in ["h.", "layers.", "h", "l"] {
        if let Some(rest) = name.strip_prefix(prefix) {
            let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            if !digits.is_empty() && rest[digits.len()..].starts_with('.') {
                return digits.parse().ok();
            }
        }
    }
    None
}

fn matmul_flops(g: &Graph, n: &shardc_ir::Node) -> f64 {
    let a = g.ty(n.inputs[0]);
    let k = if n.attrs.bool_or("transpose_a", false) { a.shape[a.rank() - 2] } else { a.shape[a.rank() - 1] };
    2.0 * g.ty(n.output).numel() as f64 * k as f64
}

/// Reads the plan off a training step (see the module doc). `params_total` is the model's
/// parameter count (the step's own arguments may be shards).
pub fn plan(step: &TrainStep, params_total: usize, device: &DeviceModel) -> Plan {
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
    for c in collectives(g) {
        let (rule, phase) = match collective_rule(&c.value) {
            Some((rule, phase)) if c.node >= step.forward_nodes => (rule.to_string(), phase),
            _ if c.node < step.forward_nodes => (format!("forward/{}", kind_name(c.kind)), "forward"),
            _ => (format!("autodiff/adjoint-{}", kind_name(c.kind)), "backward"),
        };
        *comm.entry(c.axis.clone()).or_insert(0.0) += c.kind.volume(c.bytes as f64);
        let size = g.mesh.axis_size(&c.axis).unwrap_or(1);
        seconds += collective_seconds(device, c.kind, c.bytes as f64, size, stride(&c.axis));
        planned.push(PlannedCollective {
            kind: kind_name(c.kind),
            axis: c.axis,
            bytes: c.bytes,
            phase,
            layer: layer_of(&c.value),
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
                n.inputs.iter().map(|&v| g.ty(v).size_bytes()).sum::<usize>() + g.ty(n.output).size_bytes();
            seconds += compute_seconds(device, f, bytes as f64, g.ty(n.output).dtype == DType::Bf16);
        } else if !n.op.is_collective() {
            let bytes: usize =
                n.inputs.iter().map(|&v| g.ty(v).size_bytes()).sum::<usize>() + g.ty(n.output).size_bytes();
            seconds += bytes as f64 / device.memory_bandwidth;
        }
    }
    let arg_bytes = |kind: ArgKind| g.args_of(kind).map(|v| g.ty(v).size_bytes()).sum::<usize>();
    let grads = step.optimizer_grads.iter().filter_map(|n| g.find(n)).map(|v| g.ty(v).size_bytes()).sum();
    // Activations: forward results that a backward node reads.
    let forward_values: HashSet<_> = g.nodes[..step.forward_nodes].iter().map(|n| n.output).collect();
    let saved: HashSet<_> = g.nodes[step.forward_nodes..step.backward_end]
        .iter()
        .flat_map(|n| n.inputs.iter().copied())
        .filter(|v| forward_values.contains(v))
        .collect();
    let activations = saved.iter().map(|&v| g.ty(v).size_bytes()).sum();
    let mut memory = Memory {
        params: arg_bytes(ArgKind::Param),
        grads,
        optimizer: arg_bytes(ArgKind::State),
        activations,
        total: 0,
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_come_from_the_importers_names() {
        assert_eq!(layer_of("h3.q"), Some(3));
        assert_eq!(layer_of("h.12.attn.q.weight.grad_sum"), Some(12));
        assert_eq!(layer_of("layers.0.mlp.up_proj.weight.gathered"), Some(0));
        assert_eq!(layer_of("l7.mlp_down"), Some(7));
        assert_eq!(layer_of("loss_sum"), None);
        assert_eq!(layer_of("logits"), None);
    }
}
