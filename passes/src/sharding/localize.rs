//! Localize: the extracted terms become the per-rank forward program.
//!
//! After this pass: the graph verifies; its shapes are what one rank holds; every collective
//! is explicit (`all_gather`, `all_reduce`, `reduce_scatter` over the tensor-parallel axis) and
//! says the rule that put it there (`[rule "tp/matmul-row"]`); every node keeps the layer of the
//! forward value it computes; parameters that are only ever used split are per-rank shards (same
//! name, the chunk's shape, their layout `[split tp D]` saying along which dim of the whole
//! parameter); a replicated value entering split or partial
//! compute goes through `identity {axis}` (Megatron's f), so that autodiff sums its gradient.
//! Identical layers get identical programs: layer 0's chosen terms are emitted once per layer
//! with that layer's parameters and its predecessor's output.

use super::extract::{Cost, Extraction};
use super::lang::Sh;
use super::{Layout, Search, SearchStats, ShardError};
use shardc_ir::attrs::{Attr, Attrs, Choice, GatherAdjoint, ReduceKind};
use shardc_ir::ops::Op;
use shardc_ir::{ArgKind, ArgRole, Builder, DType, Graph, Origin, Output, OutputRole, ParamLayout, Split, ValueId};
use std::collections::{BTreeSet, HashMap, HashSet};

/// The per-rank forward program and what `shardc plan` / `explain` report about it.
#[derive(Clone, Debug)]
pub struct Sharded {
    pub graph: Graph,
    /// Every emitted value: its name, the forward value it holds, the layout, the rule that
    /// produced its term (none for the forward graph's own ops on replicated values).
    pub values: Vec<ValueLayout>,
    pub stats: SearchStats,
    /// Every e-class the search built: the layouts each forward value could have had, the
    /// cheapest way to get each, and its cost (for `shardc explain`).
    pub alternatives: Vec<Alternative>,
    /// The extracted cost of the loss (parameter bytes, seconds, activation bytes) as the
    /// extraction weighs them.
    pub cost: Cost,
}

impl Sharded {
    /// Parameters stored split (their layouts' `split`): name -> dim of the full parameter.
    pub fn param_splits(&self) -> HashMap<String, usize> {
        self.graph
            .signature()
            .params()
            .filter_map(|(v, l)| l.split.as_ref().map(|s| (self.graph.name_of(v).to_string(), s.dim)))
            .collect()
    }

    /// The forward graph on its own (global over `tp`) shapes with every value's sharding as the
    /// per-rank program holds it (`@[_, _, tp]`, `partial(tp)`; a value held in several layouts
    /// shows the one its own op computes), for people and the verifier: DESIGN.md's "sharding"
    /// stage, before localize.
    pub fn annotated_forward(&self, forward: &Graph, axis: &str) -> Graph {
        let mut g = forward.clone();
        let mut layouts: HashMap<ValueId, Layout> = HashMap::new();
        for v in self.values.iter().filter(|v| v.own) {
            layouts.entry(v.forward).or_insert(v.layout);
        }
        for (name, split) in &self.param_splits() {
            if let Some(v) = g.find(name) {
                let rank = g.ty(v).rank();
                let mut dims = vec![Vec::new(); rank];
                dims[*split] = vec![axis.to_string()];
                g.values[v.index()].sharding = Some(shardc_ir::Sharding { dims, partial: Vec::new() });
            }
        }
        for i in 0..g.values.len() {
            let Some(layout) = layouts.get(&ValueId(i as u32)) else { continue };
            let rank = g.values[i].ty.rank();
            let mut sh = shardc_ir::Sharding::replicated(rank);
            match *layout {
                Layout::Partial => sh.partial.push(axis.to_string()),
                Layout::Split(d) if (d as usize) < rank => sh.dims[d as usize].push(axis.to_string()),
                _ => continue,
            }
            g.values[i].sharding = Some(sh);
        }
        g
    }
}

/// One e-class: a forward value in one layout, the cheapest e-node for it and its cost.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Alternative {
    pub forward_value: String,
    pub layout: Layout,
    /// The chosen e-node, e.g. `matmul(replicated, split on dim 1)` or `all_gather[2]`.
    pub best: String,
    pub rule: Option<String>,
    /// (weight-state bytes, seconds, other bytes) as the extraction weighs them.
    pub cost: Cost,
    /// Alternatives of one forward value are listed together; `chosen` marks the layouts the
    /// per-rank program uses.
    pub chosen: bool,
}

/// One value of the per-rank program, for `shardc explain`.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ValueLayout {
    pub name: String,
    pub forward_value: String,
    /// The forward value's id (in the graph the pass sharded).
    #[serde(skip)]
    pub forward: ValueId,
    /// Whether this is the forward value computed by its own op (or the parameter itself),
    /// rather than a collective or conversion of it.
    pub own: bool,
    pub layout: Layout,
    pub rule: Option<String>,
    /// The transformer layer of the value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer: Option<u32>,
    /// A compute copy (cast) of a parameter, which shares the parameter's layout.
    pub weight_copy: bool,
}

struct Lower<'a> {
    s: &'a Search,
    ext: &'a Extraction,
    b: Builder,
    memo: HashMap<(egg::Id, usize), ValueId>,
    ident: HashMap<ValueId, ValueId>,
    args: HashMap<(ValueId, Layout), ValueId>,
    /// Dry run: the layouts each parameter is used in. Real run: the layout it is stored in.
    uses: HashMap<ValueId, BTreeSet<Layout>>,
    stored: Option<HashMap<ValueId, Layout>>,
    varies: HashSet<ValueId>,
    /// Parameters and their compute copies (casts) in the per-rank program.
    weights: HashSet<ValueId>,
    /// Dry run: (class, layer) pairs some consumer uses whole (not as the replicated operand of
    /// split compute). Real run: read to choose how each all_gather differentiates.
    whole_use: HashSet<(egg::Id, usize)>,
    /// The e-classes of each (forward value, layout), to find a layer's output for the next.
    by_layout: std::collections::BTreeMap<(ValueId, Layout), Vec<egg::Id>>,
    /// All-gathered values whose every consumer is split compute: their adjoints are partial
    /// and the all_gather's reduce-scatter sums them, so they need no `identity`.
    partial_grad: HashSet<ValueId>,
    /// The layer of the forward value being emitted: the layer of the nodes made for it.
    layer: Option<u32>,
    out: Sharded,
}

impl<'a> Lower<'a> {
    fn new(
        s: &'a Search,
        ext: &'a Extraction,
        stored: Option<HashMap<ValueId, Layout>>,
        whole_use: HashSet<(egg::Id, usize)>,
    ) -> Self {
        let g = &s.ctx().graph;
        let mut b = Builder::new(g.name.clone());
        b.graph.mesh = g.mesh.clone();
        Lower {
            s,
            ext,
            b,
            memo: HashMap::new(),
            ident: HashMap::new(),
            args: HashMap::new(),
            uses: HashMap::new(),
            stored,
            varies: HashSet::new(),
            weights: HashSet::new(),
            whole_use,
            by_layout: super::classes_by_layout(s),
            partial_grad: HashSet::new(),
            layer: None,
            out: Sharded {
                graph: Graph::new(""),
                values: Vec::new(),
                stats: s.stats.clone(),
                alternatives: Vec::new(),
                cost: Cost::default(),
            },
        }
    }

    fn g(&self) -> &'a Graph {
        &self.s.ctx().graph
    }

    fn axis(&self) -> Attrs {
        Attrs::new().with("axis", Attr::Str(self.s.ctx().opts.axis.clone()))
    }

    fn n(&self) -> usize {
        self.s.ctx().opts.size
    }

    fn op(&mut self, op: Op, ins: &[ValueId], attrs: Attrs, name: &str) -> Result<ValueId, ShardError> {
        let layer = self.layer;
        self.b.with_origin(Origin::Model).in_layer(layer);
        let v = self.b.op(op, ins, attrs, name).map_err(ShardError::Internal)?;
        if ins.iter().any(|i| self.varies.contains(i)) {
            self.varies.insert(v);
        }
        Ok(v)
    }

    fn collective(&mut self, op: Op, x: ValueId, attrs: Attrs, name: &str, rule: &str) -> Result<ValueId, ShardError> {
        let v = self.op(op, &[x], attrs, name)?;
        self.b.graph.nodes.last_mut().expect("just added").origin = Origin::Rule(rule.to_string());
        Ok(v)
    }

    /// The layer context a class is emitted in: layer 0's values in `ctx`, others once.
    fn norm_ctx(&self, value: ValueId, ctx: usize) -> usize {
        match &self.s.ctx().template {
            Some(t) if t.layer0.contains(&value) => ctx,
            _ => 0,
        }
    }

    fn actual_value(&self, v: ValueId, ctx: usize) -> ValueId {
        match &self.s.ctx().template {
            Some(t) if ctx > 0 => {
                if let Some(&p) = t.params[ctx].get(&v) {
                    return p;
                }
                match self.s.ctx().producer.get(&v) {
                    Some(&i) if t.in_layer0(i) => self.g().nodes[t.node_in(i, ctx)].output(),
                    _ => v,
                }
            }
            _ => v,
        }
    }

    fn local_shape(&self, value: ValueId, layout: Layout) -> Vec<usize> {
        let mut shape = self.g().ty(value).shape.clone();
        if let Layout::Split(d) = layout {
            shape[d as usize] /= self.n();
        }
        shape
    }

    /// Emits a child of a node of value `parent` in layer `ctx`; `split` says the node is split
    /// or partial compute using the child (replicated) whole.
    fn emit_child(&mut self, child: egg::Id, parent: ValueId, ctx: usize, split: bool) -> Result<ValueId, ShardError> {
        let kd = self.s.data(child).clone();
        if let Some(t) = &self.s.ctx().template {
            if kd.value == t.input && ctx > 0 && t.layer0.contains(&parent) {
                // Layer `ctx` reads layer `ctx - 1`'s output in the same layout.
                if let Some(ids) = self.by_layout.get(&(t.output0, kd.layout)) {
                    return self.emit(ids[0], ctx - 1, split);
                }
                let rep = self.by_layout[&(t.output0, Layout::Replicated)][0];
                let v = self.emit(rep, ctx - 1, false)?;
                return self.convert(v, t.output0, kd.layout);
            }
            if t.layer0.contains(&kd.value) {
                let c = if t.layer0.contains(&parent) { ctx } else { t.layers - 1 };
                return self.emit(child, c, split);
            }
        }
        self.emit(child, 0, split)
    }

    /// Replicated `v` to `layout` without communication (only a split is reachable so).
    fn convert(&mut self, v: ValueId, value: ValueId, layout: Layout) -> Result<ValueId, ShardError> {
        match layout {
            Layout::Replicated => Ok(v),
            Layout::Split(d) => {
                let name = format!("{}.tp_chunk", self.b.graph.name_of(v));
                let attrs = self.axis().with("dim", Attr::Int(d as i64));
                self.collective(Op::TakeShard, v, attrs, &name, "localize/layer-input")
            }
            Layout::Partial => Err(ShardError::PartialLayerInput(self.g().name_of(value).to_string())),
        }
    }

    fn param(&mut self, orig: ValueId, layout: Layout) -> Result<ValueId, ShardError> {
        let stored = match &self.stored {
            None => {
                self.uses.entry(orig).or_default().insert(layout);
                Layout::Replicated
            }
            Some(m) => m.get(&orig).copied().unwrap_or(Layout::Replicated),
        };
        let arg = self.arg(orig, stored)?;
        if stored == layout {
            return Ok(arg);
        }
        let Layout::Split(d) = layout else {
            return Err(ShardError::PartialParameter(self.g().name_of(orig).to_string()));
        };
        if let Some(&v) = self.args.get(&(orig, layout)) {
            return Ok(v);
        }
        let name = format!("{}.tp_chunk", self.g().name_of(orig));
        let attrs = self.axis().with("dim", Attr::Int(d as i64));
        let v = self.collective(Op::TakeShard, arg, attrs, &name, "localize/replicated-parameter-chunk")?;
        self.args.insert((orig, layout), v);
        Ok(v)
    }

    fn arg(&mut self, orig: ValueId, layout: Layout) -> Result<ValueId, ShardError> {
        if let Some(&v) = self.args.get(&(orig, layout)) {
            return Ok(v);
        }
        let g = self.g();
        let (kind, mut role) =
            g.arg_of(orig).map(|a| (a.kind, a.role.clone())).unwrap_or((ArgKind::Input, ArgRole::Other));
        let ty = g.ty(orig);
        let shape = self.local_shape(orig, layout);
        if let (Layout::Split(d), ArgRole::Param(l)) = (layout, &mut role) {
            let axis = self.s.ctx().opts.axis.clone();
            *l = ParamLayout { split: Some(Split { axis, dim: d as usize }), ..l.clone() };
        }
        self.b.in_layer(g.layer(orig));
        let v = self.b.arg_with_role(kind, role, g.name_of(orig), &shardc_ir::TensorType::new(ty.dtype, shape));
        if kind == ArgKind::Param {
            self.varies.insert(v);
            self.weights.insert(v);
        }
        self.args.insert((orig, layout), v);
        Ok(v)
    }

    /// Megatron's f on a replicated operand of split or partial compute.
    fn enter_region(&mut self, v: ValueId) -> Result<ValueId, ShardError> {
        if !self.varies.contains(&v) || !self.b.ty(v).dtype.is_float() {
            return Ok(v);
        }
        if let Some(&f) = self.ident.get(&v) {
            return Ok(f);
        }
        let name = format!("{}.tp_f", self.b.graph.name_of(v));
        // A replicated parameter read by split compute (a norm scale or bias under sequence
        // parallelism): its gradient's sum is part of the gradient synchronisation.
        let param = self.weights.contains(&v);
        let rule = if param {
            "localize/replicated-parameter-in-parallel-region"
        } else {
            "localize/replicated-into-parallel-region"
        };
        let f = self.collective(Op::Identity, v, self.axis(), &name, rule)?;
        self.ident.insert(v, f);
        Ok(f)
    }

    fn emit(&mut self, class: egg::Id, ctx: usize, split: bool) -> Result<ValueId, ShardError> {
        let class = self.s.eg.find(class);
        let data = self.s.data(class).clone();
        let ctx = self.norm_ctx(data.value, ctx);
        if self.stored.is_none() && !split {
            self.whole_use.insert((class, ctx));
        }
        if let Some(&v) = self.memo.get(&(class, ctx)) {
            return Ok(v);
        }
        let node = self.ext.best[&class].clone();
        let rule = self.s.provenance.get(&node).copied();
        let actual = self.actual_value(data.value, ctx);
        let vname = self.g().name_of(actual).to_string();
        let layer = self.g().layer(actual);
        let outer_layer = std::mem::replace(&mut self.layer, layer);
        let v = self.emit_node(&node, class, &data, ctx, actual, &vname, rule)?;
        self.layer = outer_layer;
        // Parameters' casts (mixed precision's compute copies) are ops among the weights.
        let weight_copy = matches!(node, Sh::Op(..)) && self.weights.contains(&v);
        let own = match &node {
            Sh::Op(..) | Sh::Arg(_) | Sh::VocabCrossEntropy(..) => true,
            Sh::Shard(..) => self.s.ctx().params.contains(&data.value),
            _ => false,
        };
        self.out.values.push(ValueLayout {
            name: self.b.graph.name_of(v).to_string(),
            forward_value: vname,
            forward: actual,
            own,
            layout: data.layout,
            rule: rule.map(str::to_string),
            layer: self.b.graph.layer(v),
            weight_copy,
        });
        self.memo.insert((class, ctx), v);
        Ok(v)
    }

    /// The nodes of the chosen e-node `node` of `class` (forward value `actual` in layer `ctx`).
    #[allow(clippy::too_many_arguments)]
    fn emit_node(
        &mut self,
        node: &Sh,
        class: egg::Id,
        data: &super::Data,
        ctx: usize,
        actual: ValueId,
        vname: &str,
        rule: Option<&'static str>,
    ) -> Result<ValueId, ShardError> {
        let v = match node {
            Sh::Arg(_) => {
                if self.s.ctx().params.contains(&data.value) {
                    self.param(actual, Layout::Replicated)?
                } else {
                    self.arg(actual, Layout::Replicated)?
                }
            }
            Sh::Shard(d, [x]) => {
                if self.s.ctx().params.contains(&data.value) {
                    self.param(actual, data.layout)?
                } else {
                    let xv = self.emit_child(*x, data.value, ctx, false)?;
                    let attrs = self.axis().with("dim", Attr::Int(*d as i64));
                    self.collective(Op::TakeShard, xv, attrs, &format!("{vname}.tp_chunk"), rule.unwrap_or("shard"))?
                }
            }
            Sh::Op(i, ch) => {
                let g = self.g();
                let i = *i as usize;
                let real = match &self.s.ctx().template {
                    Some(t) if t.in_layer0(i) => t.node_in(i, ctx),
                    _ => i,
                };
                let n = &g.nodes[real];
                let mut ins = Vec::new();
                for &c in ch {
                    let split = data.layout != Layout::Replicated && self.s.data(c).layout == Layout::Replicated;
                    let mut v = self.emit_child(c, data.value, ctx, split)?;
                    if split && !self.partial_grad.contains(&v) {
                        v = self.enter_region(v)?;
                    }
                    ins.push(v);
                }
                let mut attrs = n.attrs.clone();
                if attrs.get("shape").is_some() {
                    let shape = self.local_shape(data.value, data.layout).iter().map(|&d| d as i64).collect();
                    attrs = attrs.with("shape", Attr::Ints(shape));
                }
                let v = self.op(n.op, &ins, attrs, vname)?;
                if n.op == Op::Cast && self.weights.contains(&ins[0]) {
                    self.weights.insert(v);
                }
                v
            }
            Sh::AllGather(d, [x]) => {
                let xv = self.emit_child(*x, data.value, ctx, false)?;
                let mut attrs = self.axis().with("dim", Attr::Int(*d as i64));
                let whole = self.whole_use.contains(&(class, ctx));
                if whole {
                    attrs = attrs.with("grad", GatherAdjoint::Slice.attr());
                }
                let rule = rule.unwrap_or("forward");
                let v = self.collective(Op::AllGather, xv, attrs, &format!("{vname}.tp_gather"), rule)?;
                if !whole {
                    self.partial_grad.insert(v);
                }
                v
            }
            Sh::AllReduce([x]) => {
                let xv = self.emit_child(*x, data.value, ctx, false)?;
                let rule = rule.unwrap_or("forward");
                self.collective(Op::AllReduce, xv, self.axis(), &format!("{vname}.tp_sum"), rule)?
            }
            Sh::ReduceScatter(d, [x]) => {
                let xv = self.emit_child(*x, data.value, ctx, false)?;
                let attrs = self.axis().with("dim", Attr::Int(*d as i64));
                let rule = rule.unwrap_or("forward");
                self.collective(Op::ReduceScatter, xv, attrs, &format!("{vname}.tp_scatter"), rule)?
            }
            Sh::VocabEmbedding(_, [w, ids]) => {
                let wv = self.emit_child(*w, data.value, ctx, false)?;
                let iv = self.emit_child(*ids, data.value, ctx, false)?;
                self.vocab_embedding(wv, iv, vname)?
            }
            Sh::VocabCrossEntropy(_, [l, t]) => {
                let lv = self.emit_child(*l, data.value, ctx, false)?;
                let tv = self.emit_child(*t, data.value, ctx, false)?;
                self.vocab_cross_entropy(lv, tv, vname, rule.unwrap_or("forward"))?
            }
        };
        let expected = self.local_shape(data.value, data.layout);
        if self.b.ty(v).shape != expected {
            return Err(ShardError::Internal(format!(
                "`%{}` came out {} but its layout ({}) needs {expected:?}",
                self.b.graph.name_of(v),
                self.b.ty(v),
                data.layout
            )));
        }
        Ok(v)
    }

    fn int(&mut self, x: i64, name: &str) -> Result<ValueId, ShardError> {
        let v = self.b.scalar(x as f64, DType::I64, name).map_err(ShardError::Internal)?;
        Ok(v)
    }

    /// Ids relative to this rank's vocabulary shard of `rows` rows: (clamped ids, 0/1 mask).
    fn local_ids(&mut self, ids: ValueId, rows: usize, name: &str) -> Result<(ValueId, ValueId), ShardError> {
        let r = self.op(Op::AxisIndex, &[], self.axis(), &format!("{name}.vocab_rank"))?;
        let rows_c = self.int(rows as i64, &format!("{name}.vocab_rows"))?;
        let off = self.op(Op::Mul, &[r, rows_c], Attrs::new(), &format!("{name}.vocab_offset"))?;
        let local = self.op(Op::Sub, &[ids, off], Attrs::new(), &format!("{name}.vocab_local"))?;
        let zero = self.int(0, &format!("{name}.vocab_zero"))?;
        let last = self.int(rows as i64 - 1, &format!("{name}.vocab_last"))?;
        let ge = self.op(Op::GreaterEqual, &[local, zero], Attrs::new(), &format!("{name}.vocab_ge"))?;
        let rest = self.op(Op::Sub, &[last, local], Attrs::new(), &format!("{name}.vocab_rest"))?;
        let le = self.op(Op::GreaterEqual, &[rest, zero], Attrs::new(), &format!("{name}.vocab_le"))?;
        let mask = self.op(Op::Mul, &[ge, le], Attrs::new(), &format!("{name}.vocab_mask"))?;
        let idx = self.op(Op::Mul, &[local, mask], Attrs::new(), &format!("{name}.vocab_ids"))?;
        Ok((idx, mask))
    }

    /// A 0/1 mask as `dtype` with a trailing unit dim, to scale rows.
    fn mask_rows(&mut self, mask: ValueId, dtype: DType, name: &str) -> Result<ValueId, ShardError> {
        let m = self.op(Op::Cast, &[mask], Attrs::new().with("dtype", Attr::DType(dtype)), &format!("{name}_f"))?;
        let mut shape: Vec<i64> = self.b.ty(mask).shape.iter().map(|&d| d as i64).collect();
        shape.push(1);
        self.op(Op::Reshape, &[m], Attrs::new().with("shape", Attr::Ints(shape)), &format!("{name}_rows"))
    }

    /// Megatron's VocabParallelEmbedding: look up the ids this rank's rows hold, zeros for
    /// the others; the caller's all_reduce sums the ranks' rows.
    fn vocab_embedding(&mut self, w: ValueId, ids: ValueId, name: &str) -> Result<ValueId, ShardError> {
        let rows = self.b.ty(w).shape[0];
        let (idx, mask) = self.local_ids(ids, rows, name)?;
        let e = self.op(Op::Embedding, &[w, idx], Attrs::new(), &format!("{name}.vocab_lookup"))?;
        let m = self.mask_rows(mask, self.b.ty(w).dtype, &format!("{name}.vocab_mask"))?;
        self.op(Op::Mul, &[e, m], Attrs::new(), &format!("{name}.vocab_partial"))
    }

    /// Megatron's vocab-parallel cross-entropy on logits `l` split over the vocabulary:
    /// `log(sum_v exp(l - M)) - (l_target - M)` with the global max M, the sum and the target
    /// logit each all-reduced. M only shifts (the shift cancels), so it carries no gradient.
    fn vocab_cross_entropy(&mut self, l: ValueId, t: ValueId, name: &str, rule: &str) -> Result<ValueId, ShardError> {
        let lt = self.b.ty(l).clone();
        let last = lt.rank() as i64 - 1;
        let rows = lt.shape[lt.rank() - 1];
        let keep = Attrs::new().with("dims", Attr::Ints(vec![last])).with("keepdim", Attr::Bool(true));
        let m = self.op(Op::ReduceMax, &[l], keep.clone(), &format!("{name}.vocab_max_local"))?;
        let max = self.axis().with("reduce", ReduceKind::Max.attr());
        let m = self.collective(Op::AllReduce, m, max, &format!("{name}.vocab_max"), rule)?;
        let z = self.op(Op::Sub, &[l, m], Attrs::new(), &format!("{name}.vocab_shifted"))?;
        let e = self.op(Op::Exp, &[z], Attrs::new(), &format!("{name}.vocab_exp"))?;
        let s = self.op(Op::ReduceSum, &[e], keep, &format!("{name}.vocab_sum_local"))?;
        let s = self.collective(Op::AllReduce, s, self.axis(), &format!("{name}.vocab_sum"), rule)?;
        let lse = self.op(Op::Log, &[s], Attrs::new(), &format!("{name}.vocab_lse"))?;
        let (idx, mask) = self.local_ids(t, rows, name)?;
        let tokens = self.b.ty(t).numel();
        let flat_ids = self.op(
            Op::Reshape,
            &[idx],
            Attrs::new().with("shape", Attr::Ints(vec![tokens as i64])),
            &format!("{name}.vocab_ids_flat"),
        )?;
        let iota = Attrs::new()
            .with("dtype", Attr::DType(DType::I64))
            .with("shape", Attr::Ints(vec![tokens as i64]))
            .with("dim", Attr::Int(0));
        let row = self.op(Op::Iota, &[], iota, &format!("{name}.vocab_row"))?;
        let rows_c = self.int(rows as i64, &format!("{name}.vocab_stride"))?;
        let base = self.op(Op::Mul, &[row, rows_c], Attrs::new(), &format!("{name}.vocab_base"))?;
        let at = self.op(Op::Add, &[base, flat_ids], Attrs::new(), &format!("{name}.vocab_at"))?;
        let zf = self.op(
            Op::Reshape,
            &[z],
            Attrs::new().with("shape", Attr::Ints(vec![(tokens * rows) as i64, 1])),
            &format!("{name}.vocab_flat"),
        )?;
        let picked = self.op(Op::Embedding, &[zf, at], Attrs::new(), &format!("{name}.vocab_pick"))?;
        let mut shape: Vec<i64> = self.b.ty(t).shape.iter().map(|&d| d as i64).collect();
        shape.push(1);
        let picked = self.op(
            Op::Reshape,
            &[picked],
            Attrs::new().with("shape", Attr::Ints(shape)),
            &format!("{name}.vocab_picked"),
        )?;
        let mrows = self.mask_rows(mask, lt.dtype, &format!("{name}.vocab_mask"))?;
        let picked = self.op(Op::Mul, &[picked, mrows], Attrs::new(), &format!("{name}.vocab_target_local"))?;
        let target = self.collective(Op::AllReduce, picked, self.axis(), &format!("{name}.vocab_target"), rule)?;
        let loss = self.op(Op::Sub, &[lse, target], Attrs::new(), &format!("{name}.vocab_loss"))?;
        let shape: Vec<i64> = self.b.ty(t).shape.iter().map(|&d| d as i64).collect();
        self.op(Op::Reshape, &[loss], Attrs::new().with("shape", Attr::Ints(shape)), name)
    }

    fn run(mut self) -> Result<Sharded, ShardError> {
        let roots = self.s.roots.clone();
        let mut outs = Vec::new();
        for &r in &roots {
            let value = self.s.data(r).value;
            let ctx = match &self.s.ctx().template {
                Some(t) if t.layer0.contains(&value) => t.layers - 1,
                _ => 0,
            };
            outs.push(self.emit(r, ctx, false)?);
        }
        // Arguments in the forward graph's order (argument ids are the order of definition).
        let forward_of: HashMap<ValueId, ValueId> = self.args.iter().map(|(&(orig, _), &v)| (v, orig)).collect();
        let mut args = self.b.graph.args.clone();
        args.sort_by_key(|a| forward_of.get(&a.value).copied().unwrap_or(ValueId(u32::MAX)));
        self.b.graph.args = args;
        self.out.cost = self.ext.cost[&self.s.eg.find(roots[0])];
        let mut outputs = Vec::new();
        for (o, v) in self.g().outputs.iter().zip(outs) {
            if matches!(o.role, OutputRole::Gradient(_) | OutputRole::Update(_)) {
                return Err(ShardError::NotAForwardGraph(self.g().name_of(o.value).to_string()));
            }
            outputs.push(Output::new(v, o.role.clone()));
        }
        let mut out = self.out;
        out.graph = self.b.finish_with(outputs).0;
        Ok(out)
    }
}

/// Emits the per-rank program of the extracted terms (see the module doc).
pub fn localize(s: &Search, ext: &Extraction) -> Result<Sharded, ShardError> {
    // A dry run finds the layouts each parameter is used in; one used only split is stored split.
    let mut dry = Lower::new(s, ext, None, HashSet::new());
    for &r in &s.roots {
        let value = s.data(r).value;
        let ctx = match &s.ctx().template {
            Some(t) if t.layer0.contains(&value) => t.layers - 1,
            _ => 0,
        };
        dry.emit(r, ctx, false)?;
    }
    let whole_use = std::mem::take(&mut dry.whole_use);
    let stored: HashMap<ValueId, Layout> = dry
        .uses
        .into_iter()
        .map(|(p, ls)| {
            let only = if ls.len() == 1 { *ls.iter().next().expect("one") } else { Layout::Replicated };
            (p, only)
        })
        .collect();
    let mut sharded = Lower::new(s, ext, Some(stored), whole_use).run()?;
    let used: HashSet<(String, Layout)> = sharded.values.iter().map(|v| (v.forward_value.clone(), v.layout)).collect();
    let g = &s.ctx().graph;
    for c in s.eg.classes() {
        let node = &ext.best[&c.id];
        let best = match node {
            Sh::Op(i, ch) => {
                let kids: Vec<String> = ch.iter().map(|&k| s.data(k).layout.to_string()).collect();
                format!("{}({})", g.nodes[*i as usize].op.name(), kids.join(", "))
            }
            Sh::Arg(_) => "argument".to_string(),
            Sh::VocabEmbedding(_, ch) | Sh::VocabCrossEntropy(_, ch) => {
                let kids: Vec<String> = ch.iter().map(|&k| s.data(k).layout.to_string()).collect();
                let op = if matches!(node, Sh::VocabEmbedding(..)) { "vocab_embedding" } else { "vocab_cross_entropy" };
                format!("{op}({})", kids.join(", "))
            }
            other => other.to_string(),
        };
        let (forward_value, layout) = (g.name_of(c.data.value).to_string(), c.data.layout);
        let chosen = used.contains(&(forward_value.clone(), layout));
        sharded.alternatives.push(Alternative {
            forward_value,
            layout,
            best,
            rule: s.provenance.get(node).map(|r| r.to_string()),
            cost: ext.cost[&c.id],
            chosen,
        });
    }
    sharded.alternatives.sort_by(|a, b| (&a.forward_value, &a.layout).cmp(&(&b.forward_value, &b.layout)));
    shardc_ir::verify::verify(&sharded.graph)
        .map_err(|e| ShardError::Internal(format!("the sharded program does not verify: {e}")))?;
    Ok(sharded)
}
