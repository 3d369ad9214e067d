//! The sharding pass: Megatron-style tensor and sequence parallelism found by equality
//! saturation (egg) over the forward graph, then localized to a per-rank program.
//!
//! # How it works
//! - **E-classes are values in a layout.** Every term denotes what one rank holds of one forward
//!   value: replicated, split along a dim over the tensor-parallel axis, or a partial sum. The
//!   analysis data of a class is (value, layout) and `merge` asserts both agree, so two terms
//!   share a class only if every rank holds the same numbers for them.
//! - **Rules** ([`tensor_parallel`], [`sequence_parallel`], [`collectives`], [`canonical`]) each
//!   state one law (written beside it) and add a term only when the op's sharding rule
//!   ([`propagate::split_inputs`]) accepts the children's layouts, so every extractable program
//!   is well sharded by construction. Megatron's collectives come out of the laws: a
//!   column-parallel matmul leaves an `all_gather` that commutes down through the heads to the
//!   row-parallel matmul, where it turns into an `all_reduce`; sequence parallelism splits that
//!   `all_reduce` into `reduce_scatter` + `all_gather` and the `all_gather` commutes through
//!   the residual add and the norm to the next column-parallel matmul.
//! - **Extraction** ([`extract`]) minimises (weight-matrix state bytes, predicted seconds of the
//!   forward and backward, other bytes) per device: the mesh is used to split the weights, as
//!   Megatron uses it, and time (roofline compute on per-rank shapes plus the alpha-beta time of
//!   every collective and of its adjoint) decides how; which mesh, sequence parallelism and ZeRO
//!   stage to use is `--auto`'s outer search over whole plans.
//! - **Regions**: a sibling operand is cut without communication only if it is a weight, or
//!   along the sequence under sequence parallelism, so activations are never chunked along
//!   features outside a parallel region (Megatron's f/g boundaries).
//! - **Layers** ([`template`]): identical transformer layers are searched once (layer 0, its
//!   costs weighted by the layer count) and the chosen terms stamped on every layer, so the
//!   search does not grow with depth.
//! - **Localize** ([`localize`]): the extracted terms become per-rank IR. Split parameters become
//!   per-rank parameter shards; a replicated value entering split or partial compute passes
//!   through `identity {tp}` (Megatron's f), so autodiff all-reduces its gradient (unless an
//!   `all_gather` whose every consumer is split compute produced it: its reduce-scatter adjoint
//!   sums; one read whole is `all_gather {grad = "slice"}`); the
//!   vocab-parallel embedding and cross-entropy lower to masked lookups, local reductions and
//!   all-reduces (no rank ever holds full-vocabulary logits).
//!
//! Example (`tests/passes/shard/mlp.tir`, `mesh tp=2`; the per-rank result on the right):
//! ```text
//! param %w1: f32[16, 64]                       param %w1: f32[16, 32]      (column shard)
//! param %b1: f32[64]                           param %b1: f32[32]
//! param %w2: f32[64, 16]                       param %w2: f32[32, 16]      (row shard)
//! %h: f32[8, 64] = matmul(%x, %w1)             %h: f32[8, 32] = matmul(%x, %w1)
//! %hb: f32[8, 64] = add(%h, %b1)        ==>    %hb: f32[8, 32] = add(%h, %b1)
//! %a: f32[8, 64] = gelu(%hb)                   %a: f32[8, 32] = gelu(%hb)
//! %out: f32[8, 16] = matmul(%a, %w2)           %out: f32[8, 16] = matmul(%a, %w2)   (partial)
//!                                              %out.tp_sum: f32[8, 16] = all_reduce(%out) {axis = "tp"}
//! ```
//!
//! The pass handles one mesh axis (tensor parallelism); data parallelism and ZeRO over `dp`
//! are applied to the differentiated step by [`crate::train_step`], which treats the per-rank
//! parameters this pass produces like any other.

// The e-graph language and everything built on it are private to this crate.
mod canonical;
mod collectives;
mod extract;
mod lang;
mod localize;
pub mod propagate;
mod sequence_parallel;
pub mod template;
mod tensor_parallel;

use egg::{Analysis, DidMerge, EGraph, Id, Language};
use lang::Sh;
use shardc_ir::ops::Op;
use shardc_ir::{ArgKind, Graph, ValueId};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

pub use extract::Cost;
pub use localize::{Alternative, Sharded, ValueLayout};

/// What one rank holds of a value, relative to the tensor-parallel axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Layout {
    Replicated,
    /// Split along this dim (global index) into equal contiguous chunks, chunk r on rank r.
    Split(u8),
    /// Every rank holds an addend; the value is their sum.
    Partial,
}

impl serde::Serialize for Layout {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, so that width and alignment (`{:<18}`) apply.
        match self {
            Layout::Replicated => f.pad("replicated"),
            Layout::Split(d) => f.pad(&format!("split on dim {d}")),
            Layout::Partial => f.pad("partial sum"),
        }
    }
}

/// The analysis data of an e-class: which forward value, in which layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Data {
    pub value: ValueId,
    pub layout: Layout,
}

/// Options of the sharding pass.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardOptions {
    /// The tensor-parallel mesh axis and its size.
    pub axis: String,
    pub size: usize,
    /// Megatron's sequence parallelism (Korthikanti et al. 2022): all-reduces of activations
    /// become reduce-scatter + all-gather over the sequence dim, and the norms and residual adds
    /// between them run on sequence shards.
    pub sequence_parallel: bool,
    /// The sequence dim of `[batch, seq, ...]` activations (the importer's layout).
    pub seq_dim: usize,
}

impl ShardOptions {
    pub fn tp(size: usize, sequence_parallel: bool) -> Self {
        ShardOptions { axis: "tp".into(), size, sequence_parallel, seq_dim: 1 }
    }
}

/// Why a graph could not be sharded.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ShardError {
    #[error("sharding: the `{axis}` axis has size {size}; nothing to shard")]
    NothingToShard { axis: String, size: usize },
    #[error("sharding: the graph's mesh `{mesh}` has no axis `{axis}` of size {size}")]
    NoSuchAxis { mesh: String, axis: String, size: usize },
    #[error("sharding: `{op}` defining `%{value}` has {results} results; the sharding pass takes single-result ops (shard before fusing)")]
    MultiResult { op: &'static str, value: String, results: usize },
    #[error("sharding: output `%{0}` is a gradient or an update: shard the forward graph, before autodiff")]
    NotAForwardGraph(String),
    #[error("sharding: parameter `%{0}` cannot be a partial sum")]
    PartialParameter(String),
    #[error("sharding: layer input `%{0}` would have to be a partial sum")]
    PartialLayerInput(String),
    /// A compiler bug: the pass built something that does not hold together.
    #[error("sharding: internal: {0}")]
    Internal(String),
}

/// The forward graph and facts the rules and the cost model read.
pub(crate) struct Ctx {
    pub graph: Graph,
    pub opts: ShardOptions,
    pub template: Option<template::Template>,
    /// Parameters, and casts of parameters (mixed precision's compute copies).
    pub weights: HashSet<ValueId>,
    pub params: HashSet<ValueId>,
    /// Node index producing each value.
    pub producer: HashMap<ValueId, usize>,
}

impl Ctx {
    fn new(graph: Graph, opts: ShardOptions) -> Ctx {
        let params: HashSet<ValueId> = graph.args_of(ArgKind::Param).collect();
        let mut weights = params.clone();
        for n in &graph.nodes {
            if n.op == Op::Cast && weights.contains(&n.inputs[0]) {
                weights.insert(n.output());
            }
        }
        let producer = graph.nodes.iter().enumerate().map(|(i, n)| (n.output(), i)).collect();
        let template = template::find(&graph);
        Ctx { graph, opts, template, weights, params, producer }
    }

    pub fn shape(&self, v: ValueId) -> &[usize] {
        &self.graph.ty(v).shape
    }

    /// How many times a value's cost counts: the layer count for layer 0's values.
    pub fn multiplier(&self, v: ValueId) -> f64 {
        match &self.template {
            Some(t) if t.layer0.contains(&v) => t.layers as f64,
            _ => 1.0,
        }
    }

    /// The layout of an e-node given its children's data; `Err` says why it is not legal.
    pub fn layout_of(&self, node: &Sh, child: impl Fn(Id) -> Data) -> Result<Data, String> {
        let n = self.opts.size;
        let divides = |v: ValueId, d: u8| self.shape(v).get(d as usize).is_some_and(|&e| e % n == 0);
        match node {
            Sh::Arg(a) => Ok(Data { value: ValueId(*a), layout: Layout::Replicated }),
            Sh::Op(i, ch) => {
                let node = &self.graph.nodes[*i as usize];
                let value = node.output();
                let ls: Vec<Layout> = ch.iter().map(|&c| child(c).layout).collect();
                if ls.iter().all(|l| *l == Layout::Replicated) {
                    return Ok(Data { value, layout: Layout::Replicated });
                }
                if node.op == Op::MatMul {
                    let (ka, kb) = propagate::contraction_dims(&self.graph, node);
                    if ls == [Layout::Split(ka as u8), Layout::Split(kb as u8)] {
                        return Ok(Data { value, layout: Layout::Partial });
                    }
                }
                for d in 0..self.shape(value).len() {
                    let Some(reqs) = propagate::split_inputs(&self.graph, node, d, n) else { continue };
                    let fits = reqs.iter().zip(&ls).all(|(r, l)| match r {
                        Some(di) => *l == Layout::Split(*di as u8),
                        None => *l == Layout::Replicated,
                    });
                    if fits {
                        return Ok(Data { value, layout: Layout::Split(d as u8) });
                    }
                }
                Err(format!("{} does not take operands laid out as {ls:?}", node.op.name()))
            }
            Sh::Shard(d, [c]) => {
                let c = child(*c);
                if c.layout != Layout::Replicated || !divides(c.value, *d) {
                    return Err("shard takes a replicated value with a divisible dim".into());
                }
                Ok(Data { value: c.value, layout: Layout::Split(*d) })
            }
            Sh::AllGather(d, [c]) => {
                let c = child(*c);
                if c.layout != Layout::Split(*d) {
                    return Err("all_gather takes a value split on its dim".into());
                }
                Ok(Data { value: c.value, layout: Layout::Replicated })
            }
            Sh::AllReduce([c]) => {
                let c = child(*c);
                if c.layout != Layout::Partial {
                    return Err("all_reduce takes a partial sum".into());
                }
                Ok(Data { value: c.value, layout: Layout::Replicated })
            }
            Sh::ReduceScatter(d, [c]) => {
                let c = child(*c);
                if c.layout != Layout::Partial || !divides(c.value, *d) {
                    return Err("reduce_scatter takes a partial sum with a divisible dim".into());
                }
                Ok(Data { value: c.value, layout: Layout::Split(*d) })
            }
            Sh::VocabEmbedding(i, [w, ids]) => {
                let node = &self.graph.nodes[*i as usize];
                if child(*w).layout != Layout::Split(0) || child(*ids).layout != Layout::Replicated {
                    return Err("the vocab-parallel embedding takes a row-split table and whole ids".into());
                }
                Ok(Data { value: node.output(), layout: Layout::Partial })
            }
            Sh::VocabCrossEntropy(i, [l, t]) => {
                let node = &self.graph.nodes[*i as usize];
                let last = self.shape(node.inputs[0]).len() - 1;
                if child(*l).layout != Layout::Split(last as u8) || child(*t).layout != Layout::Replicated {
                    return Err("the vocab-parallel cross-entropy takes vocab-split logits".into());
                }
                Ok(Data { value: node.output(), layout: Layout::Replicated })
            }
        }
    }
}

/// The egg analysis: (value, layout) per class; merging classes that disagree is a bug in a rule.
pub(crate) struct ShAnalysis {
    pub ctx: Ctx,
}

impl Analysis<Sh> for ShAnalysis {
    type Data = Data;

    fn make(egraph: &mut EGraph<Sh, Self>, enode: &Sh, _id: Id) -> Data {
        let ctx = &egraph.analysis.ctx;
        match ctx.layout_of(enode, |c| egraph[c].data.clone()) {
            Ok(d) => d,
            Err(e) => panic!("a sharding rule added an illegal term {enode}: {e}"),
        }
    }

    fn merge(&mut self, a: &mut Data, b: Data) -> DidMerge {
        assert_eq!(*a, b, "a sharding rule merged classes of different values or layouts");
        DidMerge(false, false)
    }
}

pub(crate) type ShGraph = EGraph<Sh, ShAnalysis>;

/// The e-graph and which rule added each e-node.
pub(crate) struct Search {
    pub eg: ShGraph,
    pub provenance: HashMap<Sh, &'static str>,
    /// Class of each forward value, as written (replicated).
    pub class_of: HashMap<ValueId, Id>,
    pub roots: Vec<Id>,
    pub stats: SearchStats,
}

/// How big the search got.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct SearchStats {
    pub iterations: usize,
    pub enodes: usize,
    pub eclasses: usize,
    /// Forward nodes put into the e-graph (one layer of identical ones).
    pub searched_nodes: usize,
    pub layers_stamped: usize,
}

impl Search {
    pub fn ctx(&self) -> &Ctx {
        &self.eg.analysis.ctx
    }

    pub fn data(&self, c: Id) -> &Data {
        &self.eg[c].data
    }

    /// Adds `node` if the layouts of its children allow it; records the rule that added it.
    pub fn add(&mut self, node: Sh, rule: &'static str) -> Option<Id> {
        self.eg.analysis.ctx.layout_of(&node, |c| self.eg[c].data.clone()).ok()?;
        if self.eg.lookup(node.clone()).is_none() {
            self.provenance.insert(node.clone(), rule);
        }
        Some(self.eg.add(node))
    }

    /// The child of an `all_gather` along `d` in class `c`, if it has one.
    pub fn gathered(&self, c: Id, d: u8) -> Option<Id> {
        self.eg[c].nodes.iter().find_map(|n| match n {
            Sh::AllGather(e, [x]) if *e == d => Some(*x),
            _ => None,
        })
    }

    /// Is class `c` a (replicated) weight: a parameter or its compute copy?
    pub fn is_weight(&self, c: Id) -> bool {
        let d = self.data(c);
        d.layout == Layout::Replicated && self.ctx().weights.contains(&d.value)
    }

    /// This rank's chunk of replicated class `c` along `d`. A weight's compute copy is cast from
    /// the parameter's shard (so the parameter itself is stored split, not copied).
    pub fn shard(&mut self, c: Id, d: u8, rule: &'static str) -> Option<Id> {
        let value = self.data(c).value;
        if self.ctx().weights.contains(&value) && !self.ctx().params.contains(&value) {
            let i = self.ctx().producer[&value];
            let src = self.eg[c].nodes.iter().find_map(|n| match n {
                Sh::Op(j, ch) if *j as usize == i => Some(ch[0]),
                _ => None,
            })?;
            let s = self.shard(src, d, rule)?;
            return self.add(Sh::Op(i as u32, vec![s]), rule);
        }
        self.add(Sh::Shard(d, [c]), rule)
    }
}

/// A rule: a name with its law, and how to apply it once to the whole e-graph (returns pairs
/// of classes found equal).
pub(crate) struct Rule {
    pub name: &'static str,
    pub law: &'static str,
    pub apply: fn(&mut Search) -> Vec<(Id, Id)>,
}

/// Every rule's name and law (for `shardc explain`).
pub fn laws() -> Vec<(&'static str, &'static str)> {
    rules(&ShardOptions::tp(2, true)).iter().map(|r| (r.name, r.law)).collect()
}

/// Every rule, in the (deterministic) order they run.
pub(crate) fn rules(opts: &ShardOptions) -> Vec<Rule> {
    let mut r = tensor_parallel::rules();
    if opts.sequence_parallel {
        r.extend(sequence_parallel::rules());
    }
    r.extend(collectives::rules());
    r
}

const MAX_ITERATIONS: usize = 30;
const MAX_ENODES: usize = 200_000;

/// How big the e-graph of `forward` gets (for tests and benchmarks).
pub fn search_stats(forward: &Graph, opts: &ShardOptions) -> Result<SearchStats, ShardError> {
    Ok(search(forward, opts)?.stats)
}

/// Builds the e-graph of `forward` (one layer of identical ones) and saturates it.
pub(crate) fn search(forward: &Graph, opts: &ShardOptions) -> Result<Search, ShardError> {
    if opts.size < 2 {
        return Err(ShardError::NothingToShard { axis: opts.axis.clone(), size: opts.size });
    }
    if let Some(n) = forward.nodes.iter().find(|n| n.outputs.len() != 1) {
        return Err(ShardError::MultiResult {
            op: n.op.name(),
            value: forward.name_of(n.output()).to_string(),
            results: n.outputs.len(),
        });
    }
    let ctx = Ctx::new(forward.clone(), opts.clone());
    let template = ctx.template.clone();
    let mut s = Search {
        eg: EGraph::new(ShAnalysis { ctx }),
        provenance: HashMap::new(),
        class_of: HashMap::new(),
        roots: Vec::new(),
        stats: SearchStats::default(),
    };
    let redirect = |v: ValueId| match &template {
        Some(t) if v == t.last_output => t.output0,
        _ => v,
    };
    for (i, n) in forward.nodes.iter().enumerate() {
        if let Some(t) = &template {
            if !t.in_layer0(i) && i >= t.start && !t.after_layers(i) {
                continue;
            }
        }
        // Arguments enter when a searched node reads them (later layers' parameters never do).
        for &v in &n.inputs {
            if !s.class_of.contains_key(&v) {
                let id = s.eg.add(Sh::Arg(v.0));
                s.class_of.insert(v, id);
            }
        }
        let ch: Vec<Id> = n.inputs.iter().map(|&v| s.class_of[&redirect(v)]).collect();
        let id = s.eg.add(Sh::Op(i as u32, ch));
        s.class_of.insert(n.output(), id);
        s.stats.searched_nodes += 1;
    }
    for v in forward.output_values() {
        if !s.class_of.contains_key(&redirect(v)) {
            let id = s.eg.add(Sh::Arg(v.0));
            s.class_of.insert(v, id);
        }
    }
    s.roots = forward.output_values().map(|v| s.class_of[&redirect(v)]).collect();
    s.eg.rebuild();
    let rules = rules(opts);
    for it in 0..MAX_ITERATIONS {
        let before = (s.eg.total_number_of_nodes(), s.eg.number_of_classes());
        let mut unions = Vec::new();
        for r in &rules {
            unions.extend((r.apply)(&mut s));
        }
        for (a, b) in unions {
            s.eg.union(a, b);
        }
        s.eg.rebuild();
        for (a, b) in canonical::same_value_same_layout(&s) {
            s.eg.union(a, b);
        }
        s.eg.rebuild();
        s.stats.iterations = it + 1;
        if (s.eg.total_number_of_nodes(), s.eg.number_of_classes()) == before
            || s.eg.total_number_of_nodes() > MAX_ENODES
        {
            break;
        }
    }
    // Re-key provenance by canonical children.
    let prov: HashMap<Sh, &'static str> =
        std::mem::take(&mut s.provenance).into_iter().map(|(n, r)| (n.map_children(|c| s.eg.find(c)), r)).collect();
    s.provenance = prov;
    s.roots = s.roots.iter().map(|&r| s.eg.find(r)).collect();
    s.stats.enodes = s.eg.total_number_of_nodes();
    s.stats.eclasses = s.eg.number_of_classes();
    s.stats.layers_stamped = template.as_ref().map_or(0, |t| t.layers);
    Ok(s)
}

/// Shards the forward graph over `opts.axis` (which the graph's mesh must have): search,
/// extract, localize. See the module doc.
pub fn shard_forward(
    forward: &Graph,
    opts: &ShardOptions,
    device: &crate::cost::DeviceModel,
) -> Result<Sharded, ShardError> {
    if forward.mesh.axis_size(&opts.axis) != Some(opts.size) {
        return Err(ShardError::NoSuchAxis {
            mesh: forward.mesh.to_string(),
            axis: opts.axis.clone(),
            size: opts.size,
        });
    }
    let s = search(forward, opts)?;
    let ext = extract::extract(&s, device);
    localize::localize(&s, &ext)
}

/// Lists classes by (value, layout), for the canonical rule and for lookups.
pub(crate) fn classes_by_layout(s: &Search) -> BTreeMap<(ValueId, Layout), Vec<Id>> {
    let mut m: BTreeMap<(ValueId, Layout), Vec<Id>> = BTreeMap::new();
    for c in s.eg.classes() {
        m.entry((c.data.value, c.data.layout)).or_default().push(c.id);
    }
    for v in m.values_mut() {
        v.sort();
    }
    m
}
