//! Extraction: the cheapest term per e-class under the cost model.
//!
//! The cost of a term is (weight-state bytes per device, predicted seconds of the forward
//! and backward, other bytes per device), compared in that order. The mesh the user gave
//! is used first to store the weight matrices split, as Megatron uses it; among plans that do,
//! the fastest wins, then the one with the smallest activations. (Which mesh, sequence
//! parallelism and ZeRO stage to use is `--auto`'s outer search over whole plans.)
//!
//! - Weight state: 16 bytes per f32 element of a parameter of rank 2 or more (value, gradient,
//!   two Adam moments); a `shard` of a parameter counts only its chunk. Vectors (biases, norm
//!   scales) count with the activations.
//! - Cross-entropy over all-gathered logits is not allowed where the logits exist split: the
//!   vocab-parallel cross-entropy is required (full-vocabulary logits would be the largest
//!   activation of the step).
//! - Time: the roofline of each op on its per-rank shapes (matmuls counted three times for the
//!   forward and the two backward products), plus the alpha-beta time of each collective over
//!   the tensor-parallel axis and of its adjoint: an all_gather's reduce-scatter, a
//!   reduce-scatter's all-gather, a `shard`'s all-gather, and the all-reduce of the gradient
//!   of a replicated result that split compute reads (Megatron's f), charged to the e-node that
//!   computes it (an all_gather's result needs none: its reduce-scatter sums); for a parameter
//!   (a norm scale under sequence parallelism) bandwidth only, as it joins the gradient
//!   synchronisation's buckets. An all_reduce's adjoint is free.
//! - Activations: every per-rank result's bytes.
//!
//! Layer 0's terms count once per layer. With sequence parallelism on, an all-reduce of a
//! `[batch, seq, ...]` activation is not allowed (it must be a reduce-scatter + all-gather).
//! egg's extractor sums the costs of a term's children (shared subterms count once per use);
//! it is deterministic (egg's `deterministic` feature; ties go to the first e-node in egg's
//! sorted order).

use super::lang::Sh;
use super::{Layout, Search};
use crate::cost::{collective_seconds, compute_seconds, CollectiveKind, DeviceModel};
use egg::{CostFunction, Extractor, Id, Language};
use shardc_ir::ops::Op;
use shardc_ir::DType;
use std::collections::{HashMap, HashSet};

/// What extraction minimises, compared in this order (lexicographically): the mesh is used to
/// split the weights first, then time decides how, then the other bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, PartialOrd, serde::Serialize)]
pub struct Cost {
    /// Bytes of weight-matrix state per device (parameter, gradient, optimizer state).
    pub weight_bytes: f64,
    /// Predicted seconds of the forward and backward.
    pub seconds: f64,
    /// Other bytes per device (activations, vectors' state).
    pub other_bytes: f64,
}

impl Cost {
    pub const fn new(weight_bytes: f64, seconds: f64, other_bytes: f64) -> Cost {
        Cost { weight_bytes, seconds, other_bytes }
    }

    fn scaled(self, w: f64) -> Cost {
        Cost::new(self.weight_bytes * w, self.seconds * w, self.other_bytes * w)
    }
}

impl std::ops::Add for Cost {
    type Output = Cost;
    fn add(self, o: Cost) -> Cost {
        Cost::new(self.weight_bytes + o.weight_bytes, self.seconds + o.seconds, self.other_bytes + o.other_bytes)
    }
}

/// The chosen e-node of every class and its cost.
pub struct Extraction {
    pub best: HashMap<Id, Sh>,
    pub cost: HashMap<Id, Cost>,
}

struct ShCost<'a> {
    s: &'a Search,
    device: &'a DeviceModel,
    /// Replicated classes that some split or partial e-node reads whole.
    split_read: HashSet<Id>,
}

const FORBIDDEN: Cost = Cost::new(f64::INFINITY, f64::INFINITY, f64::INFINITY);

impl ShCost<'_> {
    fn split_read(&self, enode: &Sh) -> bool {
        self.s.eg.lookup(enode.clone()).is_some_and(|c| self.split_read.contains(&c))
    }

    fn local_bytes(&self, c: Id) -> f64 {
        let d = &self.s.eg[c].data;
        let full = self.s.ctx().graph.ty(d.value).size_bytes() as f64;
        if matches!(d.layout, Layout::Split(_)) {
            full / self.s.ctx().opts.size as f64
        } else {
            full
        }
    }

    fn collective(&self, kind: CollectiveKind, bytes: f64) -> f64 {
        collective_seconds(self.device, kind, bytes, self.s.ctx().opts.size, 1)
    }

    /// This node's own cost, before weighting and children.
    fn own(&self, enode: &Sh, data: &super::Data) -> Cost {
        use CollectiveKind::*;
        let ctx = self.s.ctx();
        let n = ctx.opts.size as f64;
        let ty = ctx.graph.ty(data.value);
        let full = ty.size_bytes() as f64;
        let local = if matches!(data.layout, Layout::Split(_)) { full / n } else { full };
        let bw = self.device.memory_bandwidth;
        let param = ctx.params.contains(&data.value);
        // Weight matrices (and tables) are what the mesh is for; vectors (biases, norm scales)
        // are small and follow whatever is fastest.
        let matrix = ty.rank() >= 2;
        let state =
            |bytes: f64| if matrix { Cost::new(4.0 * bytes, 0.0, 0.0) } else { Cost::new(0.0, 0.0, 4.0 * bytes) };
        let f_param = if param && self.split_read(enode) {
            self.collective(AllReduce, full) - self.collective(AllReduce, 0.0)
        } else {
            0.0
        };
        match enode {
            Sh::Arg(_) if param => state(full) + Cost::new(0.0, f_param, 0.0),
            Sh::Arg(_) => Cost::new(0.0, 0.0, full),
            Sh::Shard(..) if param => state(local),
            Sh::Shard(..) => Cost::new(0.0, local / bw + self.collective(AllGather, full), local),
            Sh::Op(i, ch) => {
                let node = &ctx.graph.nodes[*i as usize];
                // Vocab-parallel cross-entropy is required where it applies: gathered
                // full-vocabulary logits would be the largest activation of the step.
                if node.op == Op::CrossEntropy && self.s.eg[ch[0]].nodes.iter().any(|m| matches!(m, Sh::AllGather(..)))
                {
                    return FORBIDDEN;
                }
                let ins: f64 = ch.iter().map(|&c| self.local_bytes(c)).sum();
                let mut time = if node.op == Op::MatMul {
                    let a = &self.s.eg[ch[0]].data;
                    let (ka, _) = super::propagate::contraction_dims(&ctx.graph, node);
                    let mut k = ctx.shape(a.value)[ka] as f64;
                    if a.layout == Layout::Split(ka as u8) {
                        k /= n;
                    }
                    let flops = 2.0 * (local / ty.dtype.size_bytes() as f64) * k;
                    3.0 * compute_seconds(self.device, flops, ins + local, ty.dtype == DType::Bf16)
                } else {
                    2.0 * (ins + local) / bw
                };
                // Megatron's f: a replicated result that split compute reads needs its
                // gradient summed over the axis (an all_gather's result does not: its
                // reduce-scatter sums). A parameter's sum joins the gradient synchronisation's
                // buckets: bandwidth, no latency of its own.
                if data.layout == Layout::Replicated && ty.dtype.is_float() && self.split_read(enode) {
                    time += self.collective(AllReduce, full);
                }
                Cost::new(0.0, time, local)
            }
            Sh::AllGather(..) => Cost::new(0.0, 2.0 * self.collective(AllGather, full), full),
            Sh::ReduceScatter(..) => Cost::new(0.0, 2.0 * self.collective(ReduceScatter, full), local),
            Sh::AllReduce(_) => {
                let seq = ctx.opts.seq_dim;
                let shape = ctx.shape(data.value);
                if ctx.opts.sequence_parallel && shape.len() > seq + 1 && shape[seq].is_multiple_of(ctx.opts.size) {
                    return FORBIDDEN;
                }
                Cost::new(0.0, self.collective(AllReduce, full), full)
            }
            Sh::VocabEmbedding(..) => Cost::new(0.0, 3.0 * full / bw, full),
            Sh::VocabCrossEntropy(_, [l, _]) => {
                let logits = self.local_bytes(*l);
                Cost::new(0.0, 3.0 * self.collective(AllReduce, full) + 6.0 * logits / bw, 3.0 * full + logits)
            }
        }
    }
}

impl CostFunction<Sh> for ShCost<'_> {
    type Cost = Cost;

    fn cost<C: FnMut(Id) -> Cost>(&mut self, enode: &Sh, mut costs: C) -> Cost {
        let ctx = self.s.ctx();
        let data = ctx.layout_of(enode, |c| self.s.eg[c].data.clone()).expect("only legal terms are in the e-graph");
        let value = data.value;
        let w = ctx.multiplier(value);
        let mut total = self.own(enode, &data).scaled(w);
        // A parameter's shard is loaded as a shard: the whole parameter never exists.
        if matches!(enode, Sh::Shard(..)) && ctx.params.contains(&value) {
            return total;
        }
        for &c in enode.children() {
            total = total + costs(c);
        }
        total
    }
}

/// Runs egg's extractor over every class.
pub fn extract(s: &Search, device: &DeviceModel) -> Extraction {
    let mut split_read = HashSet::new();
    for c in s.eg.classes() {
        if c.data.layout == Layout::Replicated {
            continue;
        }
        for n in &c.nodes {
            if let Sh::Op(..) = n {
                split_read.extend(
                    n.children().iter().map(|&k| s.eg.find(k)).filter(|&k| s.eg[k].data.layout == Layout::Replicated),
                );
            }
        }
    }
    let ext = Extractor::new(&s.eg, ShCost { s, device, split_read });
    let mut best = HashMap::new();
    let mut cost = HashMap::new();
    for c in s.eg.classes() {
        best.insert(c.id, ext.find_best_node(c.id).clone());
        cost.insert(c.id, ext.find_best_cost(c.id));
    }
    Extraction { best, cost }
}
