//! Reverse-mode differentiation: appends the backward pass to a graph.
//!
//! [`differentiate`] walks the nodes in reverse from a scalar loss, emits each node's adjoint
//! (the vector-Jacobian product) as IR ops after the forward nodes, accumulates the adjoints of
//! values used more than once with `add`, and returns the gradient of every requested
//! parameter. Only values that depend on a requested parameter get adjoints.
//!
//! After this pass: the graph verifies; its outputs are the original outputs followed by one
//! gradient per requested parameter (`%<param>.grad`, same type as the parameter; zeros when the
//! loss does not depend on it), each marked `[gradient %<param>]`. Every node it adds is in the
//! backward phase, says whose adjoint it is part of (`[backward, adjoint %y]`: the forward node
//! defining `%y`), and belongs to that node's layer.
//!
//! Collectives differentiate as DESIGN.md's table says: `all_reduce(sum)` -> identity,
//! `identity {axis}` -> `all_reduce` over the axis (Megatron's f and g), `all_gather` <->
//! `reduce_scatter` on the same dim (`all_gather {grad = "slice"}`, whose consumers are
//! replicated computations, -> `take_shard`), `all_to_all` -> `all_to_all` with split and concat swapped.
//!
//! Example (`tests/passes/autodiff/mul.tir`):
//! ```text
//! graph mul                                 graph mul
//! param %w: f32[3]                          param %w: f32[3]
//! input %x: f32[3]                          input %x: f32[3]
//! %y: f32[3] = mul(%w, %x)          ==>     %y: f32[3] = mul(%w, %x)
//! %loss: f32[] = reduce_sum(%y)             %loss: f32[] = reduce_sum(%y) {dims = [0]}
//!     {dims = [0]}                          %loss.grad: f32[] = full() {.. value = 1.0}
//! output %loss                              %loss.grad_r: f32[1] = reshape(%loss.grad) ..
//!                                           %y.grad: f32[3] = broadcast_to(%loss.grad_r) ..
//!                                           %w.grad: f32[3] = mul(%y.grad, %x)
//!                                           output %loss, %w.grad
//! ```

use shardc_ir::attrs::{Attr, Attrs, GatherAdjoint, ReduceKind};
use shardc_ir::ops::{normalize_dim, reduce_dims, Op};
use shardc_ir::{Builder, Graph, Origin, Output, OutputRole, Phase, ValueId};
use std::collections::HashMap;

/// Why a graph could not be differentiated.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("autodiff: {0}")]
pub struct AutodiffError(pub String);

/// The differentiated graph and, for each requested parameter, its gradient value.
pub struct Differentiated {
    pub graph: Graph,
    pub grads: Vec<ValueId>,
}

/// The output marked as the loss (`output %loss [loss]`).
pub fn loss_of(g: &Graph) -> Result<ValueId, AutodiffError> {
    let i = g.signature().output(&OutputRole::Loss).ok_or_else(|| {
        AutodiffError(format!(
            "graph `{}` has no output marked as the loss; mark it in the output line, e.g. `output %loss [loss]`",
            g.name
        ))
    })?;
    Ok(g.outputs[i].value)
}

/// Appends the gradients of the scalar `loss` with respect to `wrt` (see the module doc).
pub fn differentiate(g: &Graph, loss: ValueId, wrt: &[ValueId]) -> Result<Differentiated, AutodiffError> {
    let fail = |m: String| AutodiffError(m);
    let lt = g.ty(loss);
    if lt.rank() != 0 || !lt.dtype.is_float() {
        return Err(fail(format!("the loss `%{}` must be a floating scalar, found {lt}", g.name_of(loss))));
    }
    // needs[v]: v is floating and depends on a requested parameter through differentiable ops.
    let mut needs = vec![false; g.values.len()];
    for &p in wrt {
        needs[p.index()] = g.ty(p).dtype.is_float();
    }
    for n in &g.nodes {
        let depends = n.inputs.iter().any(|v| needs[v.index()]);
        // The global max of a vocab-parallel cross-entropy only shifts the logits (the shift
        // cancels), so `all_reduce {reduce = "max"}` carries no gradient, as in Megatron.
        let max = n.op == Op::AllReduce && n.attrs.choice_or_default::<ReduceKind>("reduce") == ReduceKind::Max;
        for &o in &n.outputs {
            needs[o.index()] = depends && g.ty(o).dtype.is_float() && !is_constant(n.op) && !max;
        }
    }
    let mut ad = Ad { b: Builder::from_graph(g.clone()), adj: HashMap::new() };
    ad.b.at(Phase::Backward, Origin::Adjoint(loss), g.layer(loss));
    let seed = ad.b.scalar(1.0, lt.dtype, &format!("{}.grad", g.name_of(loss))).map_err(fail)?;
    ad.adj.insert(loss, seed);
    for (i, n) in g.nodes.iter().enumerate().rev() {
        // The adjoints of the node's results that the loss depends on (each result's adjoint
        // is complete here: every use comes later in node order).
        let dys: Vec<Option<ValueId>> =
            n.outputs.iter().map(|o| if needs[o.index()] { ad.adj.get(o).copied() } else { None }).collect();
        if dys.iter().all(Option::is_none) {
            continue;
        }
        let wanted: Vec<bool> = n.inputs.iter().map(|v| needs[v.index()]).collect();
        ad.b.at(Phase::Backward, Origin::Adjoint(n.output()), g.layer(n.output()));
        let grads = match (n.op, dys.as_slice()) {
            (Op::Split, _) => ad.split_adjoint(g, i, &dys),
            (_, [Some(dy)]) => ad.adjoint(g, i, *dy, &wanted),
            _ => Err(format!("`{}` has {} results but one adjoint rule", n.op.name(), n.outputs.len())),
        }
        .map_err(|m| fail(format!("node {i} `%{}` ({}): {m}", g.name_of(n.output()), n.op.name())))?;
        for ((&v, grad), &w) in n.inputs.iter().zip(grads).zip(&wanted) {
            if let (Some(grad), true) = (grad, w) {
                ad.accumulate(g, v, grad).map_err(fail)?;
            }
        }
    }
    let mut grads = Vec::new();
    for &p in wrt {
        let name = format!("{}.grad", g.name_of(p));
        let grad = match ad.adj.get(&p) {
            Some(&a) => a,
            None => {
                ad.b.at(Phase::Backward, Origin::Adjoint(p), g.layer(p));
                let ty = g.ty(p).clone();
                let attrs = Attrs::new()
                    .with("value", Attr::Float(0.0))
                    .with("dtype", Attr::DType(ty.dtype))
                    .with("shape", Attr::Ints(ty.shape.iter().map(|&d| d as i64).collect()));
                ad.b.op(Op::Full, &[], attrs, &name).map_err(fail)?
            }
        };
        grads.push(grad);
    }
    let mut graph = ad.b.graph;
    // The final gradient of each parameter carries the name `%<param>.grad`; a partial sum that
    // took the name first gives it up.
    for (&p, &gv) in wrt.iter().zip(&grads) {
        let want = format!("{}.grad", g.name_of(p));
        if graph.name_of(gv) != want {
            if let Some(other) = graph.find(&want) {
                let mut k = 0;
                let free = loop {
                    k += 1;
                    let c = format!("{want}_part{k}");
                    if graph.find(&c).is_none() {
                        break c;
                    }
                };
                graph.values[other.index()].name = free;
            }
            graph.values[gv.index()].name = want;
        }
    }
    graph.outputs.extend(wrt.iter().zip(&grads).map(|(&p, &gv)| Output::new(gv, OutputRole::Gradient(p))));
    // Only nodes were appended, so the numbering is still canonical and `grads` stay valid.
    Ok(Differentiated { graph, grads })
}

/// True for the ops autodiff can propagate gradients through (everything but constants, masks
/// and the backward ops themselves).
pub fn is_differentiable(op: Op) -> bool {
    // A fused kernel exists only after the step is differentiated (fusion runs last).
    !is_constant(op) && !is_backward_op(op) && op != Op::Fused
}

/// The ops autodiff itself emits; differentiating them again would need second derivatives.
fn is_backward_op(op: Op) -> bool {
    matches!(
        op,
        Op::Pad
            | Op::GeluGrad
            | Op::SiluGrad
            | Op::LayerNormGrad
            | Op::LayerNormGammaGrad
            | Op::RmsNormGrad
            | Op::RmsNormGammaGrad
            | Op::EmbeddingGrad
            | Op::CrossEntropyGrad
    )
}

/// Ops whose result does not depend differentiably on their operands.
fn is_constant(op: Op) -> bool {
    matches!(op, Op::Full | Op::Iota | Op::AxisIndex | Op::GreaterEqual)
}

/// The bindings every adjoint rule reads: the node `n`, its operands `ins` and result `y`,
/// `name(v)` (the gradient's name for `v`), `shape(v)`, `h0` (the first operand's gradient
/// name) and `one(self, op, a, b, hint)` (a binary op).
macro_rules! site {
    ($g:ident, $i:ident => $n:ident, $ins:ident, $y:ident, $name:ident, $shape:ident, $h0:ident, $one:ident) => {
        let $n = &$g.nodes[$i];
        let ($ins, $y) = (&$n.inputs, $n.output());
        let ($name, $shape) = (|v: ValueId| format!("{}.grad", $g.name_of(v)), |v: ValueId| $g.ty(v).shape.clone());
        let $h0 = $ins.first().map(|&v| $name(v)).unwrap_or_default();
        let $one = |s: &mut Self, op: Op, a: ValueId, b: ValueId, hint: &str| s.b.binary(op, a, b, hint);
    };
}

struct Ad {
    b: Builder,
    adj: HashMap<ValueId, ValueId>,
}

type R<T> = Result<T, String>;

impl Ad {
    fn accumulate(&mut self, g: &Graph, v: ValueId, grad: ValueId) -> R<()> {
        let hint = format!("{}.grad", g.name_of(v));
        let total = match self.adj.get(&v) {
            Some(&prev) => self.b.binary(Op::Add, prev, grad, &hint)?,
            None => grad,
        };
        self.adj.insert(v, total);
        Ok(())
    }

    fn ty(&self, v: ValueId) -> shardc_ir::TensorType {
        self.b.graph.ty(v).clone()
    }

    fn scalar(&mut self, x: f64, like: ValueId, hint: &str) -> R<ValueId> {
        let dt = self.ty(like).dtype;
        self.b.scalar(x, dt, hint)
    }

    /// Sums `dy` down to `shape`, undoing numpy broadcasting.
    fn unbroadcast(&mut self, dy: ValueId, shape: &[usize], hint: &str) -> R<ValueId> {
        let out = self.ty(dy).shape;
        if out == shape {
            return Ok(dy);
        }
        let lead = out.len() - shape.len();
        let dims: Vec<i64> =
            (0..out.len()).filter(|&d| d < lead || (shape[d - lead] == 1 && out[d] != 1)).map(|d| d as i64).collect();
        let summed =
            if dims.is_empty() { dy } else { self.b.reduce(Op::ReduceSum, dy, &dims, &format!("{hint}_sum"))? };
        if self.ty(summed).shape == shape {
            Ok(summed)
        } else {
            self.b.reshape(summed, shape, hint)
        }
    }

    /// [`Self::unbroadcast`] of a value this pass just made: when nothing needs summing, the
    /// value itself takes the gradient's name.
    fn unbroadcast_fresh(&mut self, fresh: ValueId, shape: &[usize], hint: &str) -> R<ValueId> {
        let v = self.unbroadcast(fresh, shape, hint)?;
        if v == fresh {
            self.b.rename(v, hint);
        }
        Ok(v)
    }

    /// `dy` of a reduction result, broadcast back over the reduced dims of `x`.
    fn unreduce(&mut self, dy: ValueId, x_shape: &[usize], dims: &[usize], hint: &str) -> R<ValueId> {
        let kept: Vec<usize> = (0..x_shape.len()).map(|d| if dims.contains(&d) { 1 } else { x_shape[d] }).collect();
        let r = self.b.reshape(dy, &kept, &format!("{hint}_keep"))?;
        self.b.op(
            Op::BroadcastTo,
            &[r],
            Attrs::new().with("shape", Attr::Ints(x_shape.iter().map(|&d| d as i64).collect())),
            hint,
        )
    }

    fn matmul(&mut self, a: ValueId, b: ValueId, ta: bool, tb: bool, hint: &str) -> R<ValueId> {
        let mut attrs = Attrs::new();
        if ta {
            attrs = attrs.with("transpose_a", Attr::Bool(true));
        }
        if tb {
            attrs = attrs.with("transpose_b", Attr::Bool(true));
        }
        self.b.op(Op::MatMul, &[a, b], attrs, hint)
    }

    /// The adjoint of node `i` for output adjoint `dy`: one optional gradient per operand.
    fn adjoint(&mut self, g: &Graph, i: usize, dy: ValueId, wanted: &[bool]) -> R<Vec<Option<ValueId>>> {
        let n = &g.nodes[i];
        // By family; every op is listed, so a new op is a compile error here.
        Ok(match n.op {
            Op::Full
            | Op::Iota
            | Op::AxisIndex
            | Op::GreaterEqual
            | Op::Add
            | Op::Sub
            | Op::Mul
            | Op::Div
            | Op::Maximum
            | Op::Neg
            | Op::Exp
            | Op::Log
            | Op::Sqrt
            | Op::Rsqrt
            | Op::Tanh
            | Op::Gelu
            | Op::Silu
            | Op::Cast => self.elementwise_adjoint(g, i, dy, wanted)?,
            Op::Reshape | Op::Transpose | Op::Slice | Op::Concat | Op::BroadcastTo => {
                self.shape_adjoint(g, i, dy, wanted)?
            }
            Op::MatMul | Op::ReduceSum | Op::ReduceMean | Op::ReduceMax | Op::Softmax => {
                self.contraction_adjoint(g, i, dy, wanted)?
            }
            Op::LayerNorm | Op::RmsNorm | Op::Rope | Op::Embedding | Op::CrossEntropy => {
                self.layer_adjoint(g, i, dy, wanted)?
            }
            Op::AllReduce | Op::Identity | Op::AllGather | Op::TakeShard | Op::ReduceScatter | Op::AllToAll => {
                self.collective_adjoint(g, i, dy, wanted)?
            }
            // Listed, not matched by a wildcard: a new op is a compile error here.
            Op::Pad
            | Op::GeluGrad
            | Op::SiluGrad
            | Op::LayerNormGrad
            | Op::LayerNormGammaGrad
            | Op::RmsNormGrad
            | Op::RmsNormGammaGrad
            | Op::EmbeddingGrad
            | Op::CrossEntropyGrad => {
                return Err(format!("`{}` is a backward op; second derivatives are not supported", n.op.name()));
            }
            Op::Split => return Err("internal: `split` has several results; see Ad::split_adjoint".into()),
            Op::Fused => {
                return Err("a fused kernel has no adjoint: differentiate before fusion (fusion runs last)".into())
            }
        })
    }

    /// Adjoints of constants, elementwise arithmetic and activations.
    #[allow(unused_variables)]
    fn elementwise_adjoint(&mut self, g: &Graph, i: usize, dy: ValueId, wanted: &[bool]) -> R<Vec<Option<ValueId>>> {
        site!(g, i => n, ins, y, name, shape, h0, one);
        Ok(match n.op {
            Op::Full | Op::Iota | Op::AxisIndex | Op::GreaterEqual => vec![None; ins.len()],
            Op::Add | Op::Sub => {
                let da = if wanted[0] { Some(self.unbroadcast(dy, &shape(ins[0]), &h0)?) } else { None };
                let db = if wanted[1] {
                    let d =
                        if n.op == Op::Sub { self.b.unary(Op::Neg, dy, &format!("{}_neg", name(ins[1])))? } else { dy };
                    Some(self.unbroadcast(d, &shape(ins[1]), &name(ins[1]))?)
                } else {
                    None
                };
                vec![da, db]
            }
            Op::Mul => {
                let mut out = vec![None, None];
                for k in 0..2 {
                    if wanted[k] {
                        let p = one(self, Op::Mul, dy, ins[1 - k], &format!("{}_full", name(ins[k])))?;
                        out[k] = Some(self.unbroadcast_fresh(p, &shape(ins[k]), &name(ins[k]))?);
                    }
                }
                out
            }
            Op::Div => {
                let da = if wanted[0] {
                    let q = one(self, Op::Div, dy, ins[1], &format!("{h0}_full"))?;
                    Some(self.unbroadcast_fresh(q, &shape(ins[0]), &h0)?)
                } else {
                    None
                };
                // d(a/b)/db = -(a/b)/b = -y/b
                let db = if wanted[1] {
                    let hb = name(ins[1]);
                    let t = one(self, Op::Mul, dy, y, &format!("{hb}_dyy"))?;
                    let t = one(self, Op::Div, t, ins[1], &format!("{hb}_q"))?;
                    let t = self.b.unary(Op::Neg, t, &format!("{hb}_full"))?;
                    Some(self.unbroadcast_fresh(t, &shape(ins[1]), &hb)?)
                } else {
                    None
                };
                vec![da, db]
            }
            Op::Maximum => {
                let mask =
                    self.b.op(Op::GreaterEqual, &[ins[0], ins[1]], Attrs::new(), &format!("{}_mask", name(y)))?;
                let to_a = one(self, Op::Mul, dy, mask, &format!("{h0}_full"))?;
                let mut out = vec![None, None];
                if wanted[0] {
                    out[0] = Some(self.unbroadcast(to_a, &shape(ins[0]), &h0)?);
                }
                if wanted[1] {
                    let to_b = one(self, Op::Sub, dy, to_a, &format!("{}_full", name(ins[1])))?;
                    out[1] = Some(self.unbroadcast(to_b, &shape(ins[1]), &name(ins[1]))?);
                }
                out
            }
            Op::Neg => vec![Some(self.b.unary(Op::Neg, dy, &h0)?)],
            Op::Exp => vec![Some(one(self, Op::Mul, dy, y, &h0)?)],
            Op::Log => vec![Some(one(self, Op::Div, dy, ins[0], &h0)?)],
            Op::Sqrt => {
                // d sqrt(x) = 0.5 / sqrt(x)
                let half = self.scalar(0.5, y, &format!("{h0}_half"))?;
                let t = one(self, Op::Div, half, y, &format!("{h0}_d"))?;
                vec![Some(one(self, Op::Mul, dy, t, &h0)?)]
            }
            Op::Rsqrt => {
                // d x^-1/2 = -0.5 x^-3/2 = -0.5 y^3
                let c = self.scalar(-0.5, y, &format!("{h0}_c"))?;
                let y2 = one(self, Op::Mul, y, y, &format!("{h0}_y2"))?;
                let y3 = one(self, Op::Mul, y2, y, &format!("{h0}_y3"))?;
                let t = one(self, Op::Mul, y3, c, &format!("{h0}_d"))?;
                vec![Some(one(self, Op::Mul, dy, t, &h0)?)]
            }
            Op::Tanh => {
                // d tanh = 1 - y^2
                let one_ = self.scalar(1.0, y, &format!("{h0}_one"))?;
                let y2 = one(self, Op::Mul, y, y, &format!("{h0}_y2"))?;
                let t = one(self, Op::Sub, one_, y2, &format!("{h0}_d"))?;
                vec![Some(one(self, Op::Mul, dy, t, &h0)?)]
            }
            Op::Gelu => vec![Some(self.b.op(Op::GeluGrad, &[ins[0], dy], n.attrs.clone(), &h0)?)],
            Op::Silu => vec![Some(self.b.op(Op::SiluGrad, &[ins[0], dy], Attrs::new(), &h0)?)],
            Op::Cast => {
                let dt = g.ty(ins[0]).dtype;
                if !dt.is_float() {
                    return Err("the operand is an integer: it has no gradient".into());
                }
                vec![Some(self.b.op(Op::Cast, &[dy], Attrs::new().with("dtype", Attr::DType(dt)), &h0)?)]
            }
            other => return Err(format!("internal: `{}` is not an elementwise op", other.name())),
        })
    }

    /// Adjoints of data movement: reshape, transpose, slice, concat, broadcast.
    #[allow(unused_variables)]
    fn shape_adjoint(&mut self, g: &Graph, i: usize, dy: ValueId, wanted: &[bool]) -> R<Vec<Option<ValueId>>> {
        site!(g, i => n, ins, y, name, shape, h0, one);
        Ok(match n.op {
            Op::Reshape => vec![Some(self.b.reshape(dy, &shape(ins[0]), &h0)?)],
            Op::Transpose => {
                let perm = n.attrs.ints("perm").unwrap_or_default();
                let mut inv = vec![0i64; perm.len()];
                for (i, &p) in perm.iter().enumerate() {
                    inv[p as usize] = i as i64;
                }
                vec![Some(self.b.transpose(dy, &inv, &h0)?)]
            }
            Op::Slice => {
                let xs = shape(ins[0]);
                let dim = normalize_dim(n.attrs.int("dim").unwrap_or(0), xs.len())?;
                let (start, end) = (n.attrs.int("start").unwrap_or(0), n.attrs.int("end").unwrap_or(0));
                let attrs = Attrs::new()
                    .with("dim", Attr::Int(dim as i64))
                    .with("before", Attr::Int(start))
                    .with("after", Attr::Int(xs[dim] as i64 - end));
                vec![Some(self.b.op(Op::Pad, &[dy], attrs, &h0)?)]
            }
            Op::Concat => {
                let dim = normalize_dim(n.attrs.int("dim").unwrap_or(0), g.ty(y).rank())?;
                let mut start = 0i64;
                let mut out = Vec::new();
                for (k, &v) in ins.iter().enumerate() {
                    let len = g.ty(v).shape[dim] as i64;
                    out.push(if wanted[k] {
                        let attrs = Attrs::new()
                            .with("dim", Attr::Int(dim as i64))
                            .with("start", Attr::Int(start))
                            .with("end", Attr::Int(start + len));
                        Some(self.b.op(Op::Slice, &[dy], attrs, &name(v))?)
                    } else {
                        None
                    });
                    start += len;
                }
                out
            }
            Op::BroadcastTo => vec![Some(self.unbroadcast(dy, &shape(ins[0]), &h0)?)],
            other => return Err(format!("internal: `{}` is not a shape op", other.name())),
        })
    }

    /// Adjoints of matrix products, reductions and softmax.
    #[allow(unused_variables)]
    fn contraction_adjoint(&mut self, g: &Graph, i: usize, dy: ValueId, wanted: &[bool]) -> R<Vec<Option<ValueId>>> {
        site!(g, i => n, ins, y, name, shape, h0, one);
        Ok(match n.op {
            Op::MatMul => self.matmul_adjoint(g, i, dy, wanted)?,
            Op::ReduceSum | Op::ReduceMean => {
                let xs = shape(ins[0]);
                let dims = reduce_dims(&n.attrs, xs.len())?;
                let mut d = dy;
                if n.op == Op::ReduceMean {
                    let count: usize = dims.iter().map(|&k| xs[k]).product();
                    let c = self.scalar(1.0 / count as f64, dy, &format!("{h0}_inv_count"))?;
                    d = one(self, Op::Mul, dy, c, &format!("{h0}_scaled"))?;
                }
                vec![Some(self.unreduce(d, &xs, &dims, &h0)?)]
            }
            Op::ReduceMax => {
                let xs = shape(ins[0]);
                let dims = reduce_dims(&n.attrs, xs.len())?;
                let ymax = self.unreduce(y, &xs, &dims, &format!("{h0}_max"))?;
                let mask = self.b.op(Op::GreaterEqual, &[ins[0], ymax], Attrs::new(), &format!("{h0}_mask"))?;
                let spread = self.unreduce(dy, &xs, &dims, &format!("{h0}_spread"))?;
                vec![Some(one(self, Op::Mul, spread, mask, &h0)?)]
            }
            Op::Softmax => {
                // dx = y * (dy - sum(dy * y)) along the last dim (masked entries have y = 0).
                let r = g.ty(y).rank() as i64;
                let dyy = one(self, Op::Mul, dy, y, &format!("{h0}_dyy"))?;
                let attrs = Attrs::new().with("dims", Attr::Ints(vec![r - 1])).with("keepdim", Attr::Bool(true));
                let s = self.b.op(Op::ReduceSum, &[dyy], attrs, &format!("{h0}_sum"))?;
                let centered = one(self, Op::Sub, dy, s, &format!("{h0}_centered"))?;
                vec![Some(one(self, Op::Mul, y, centered, &h0)?)]
            }
            other => return Err(format!("internal: `{}` is not a contraction op", other.name())),
        })
    }

    /// Adjoints of normalisation, RoPE, embedding lookup and cross-entropy.
    #[allow(unused_variables)]
    fn layer_adjoint(&mut self, g: &Graph, i: usize, dy: ValueId, wanted: &[bool]) -> R<Vec<Option<ValueId>>> {
        site!(g, i => n, ins, y, name, shape, h0, one);
        Ok(match n.op {
            Op::LayerNorm | Op::RmsNorm => {
                let (gop, gamma_op) = if n.op == Op::LayerNorm {
                    (Op::LayerNormGrad, Op::LayerNormGammaGrad)
                } else {
                    (Op::RmsNormGrad, Op::RmsNormGammaGrad)
                };
                let eps = Attrs::new().with("eps", n.attrs.get("eps").cloned().unwrap_or(Attr::Float(1e-5)));
                let mut out = vec![None; ins.len()];
                if wanted[0] {
                    out[0] = Some(self.b.op(gop, &[ins[0], ins[1], dy], eps.clone(), &h0)?);
                }
                if wanted[1] {
                    out[1] = Some(self.b.op(gamma_op, &[ins[0], dy], eps, &name(ins[1]))?);
                }
                if ins.len() > 2 && wanted[2] {
                    let r = g.ty(y).rank();
                    let dims: Vec<i64> = (0..r as i64 - 1).collect();
                    out[2] = Some(if dims.is_empty() {
                        dy
                    } else {
                        self.b.reduce(Op::ReduceSum, dy, &dims, &name(ins[2]))?
                    });
                }
                out
            }
            Op::Rope => {
                let attrs = n.attrs.clone().with("inverse", Attr::Bool(!n.attrs.bool_or("inverse", false)));
                vec![Some(self.b.op(Op::Rope, &[dy, ins[1]], attrs, &h0)?), None]
            }
            Op::Embedding => {
                let rows = g.ty(ins[0]).shape[0] as i64;
                vec![
                    Some(self.b.op(
                        Op::EmbeddingGrad,
                        &[ins[1], dy],
                        Attrs::new().with("rows", Attr::Int(rows)),
                        &h0,
                    )?),
                    None,
                ]
            }
            Op::CrossEntropy => {
                vec![Some(self.b.op(Op::CrossEntropyGrad, &[ins[0], ins[1], dy], Attrs::new(), &h0)?), None]
            }
            other => return Err(format!("internal: `{}` is not a layer op", other.name())),
        })
    }

    /// Adjoints of collectives and Megatron's region markers (DESIGN.md's table).
    #[allow(unused_variables)]
    fn collective_adjoint(&mut self, g: &Graph, i: usize, dy: ValueId, wanted: &[bool]) -> R<Vec<Option<ValueId>>> {
        site!(g, i => n, ins, y, name, shape, h0, one);
        Ok(match n.op {
            Op::AllReduce => {
                if n.attrs.choice_or_default::<ReduceKind>("reduce") != ReduceKind::Sum {
                    return Err("only all_reduce(sum) is differentiable".into());
                }
                // Megatron's g: the sum is replicated; each rank's share gets the whole adjoint.
                vec![Some(dy)]
            }
            Op::Identity => {
                // Megatron's f: the replicated input's gradient is the sum over the axis.
                let axis = n.attrs.get("axis").cloned().unwrap_or(Attr::Str(String::new()));
                vec![Some(self.b.op(Op::AllReduce, &[dy], Attrs::new().with("axis", axis), &h0)?)]
            }
            Op::AllGather => {
                let (axis, dim) = (n.attrs.get("axis").cloned(), n.attrs.get("dim").cloned());
                let attrs = Attrs::new()
                    .with("axis", axis.unwrap_or(Attr::Str(String::new())))
                    .with("dim", dim.unwrap_or(Attr::Int(0)));
                if n.attrs.choice_or_default::<GatherAdjoint>("grad") == GatherAdjoint::Slice {
                    // Replicated consumers: every rank's adjoint is already the whole gradient
                    // (Megatron's gather_from_tensor_model_parallel_region): keep this rank's chunk.
                    vec![Some(self.b.op(Op::TakeShard, &[dy], attrs, &h0)?)]
                } else {
                    // The consumers' adjoints are partial: sum them, keep this rank's chunk.
                    vec![Some(self.b.op(Op::ReduceScatter, &[dy], attrs, &h0)?)]
                }
            }
            // Replicated -> sharded without communication; the replicated input's (full)
            // gradient is the concatenation of the shards' gradients.
            Op::TakeShard => vec![Some(self.b.op(Op::AllGather, &[dy], n.attrs.clone(), &h0)?)],
            Op::ReduceScatter => vec![Some(self.b.op(Op::AllGather, &[dy], n.attrs.clone(), &h0)?)],
            Op::AllToAll => {
                let attrs = Attrs::new()
                    .with("axis", n.attrs.get("axis").cloned().unwrap_or(Attr::Str(String::new())))
                    .with("split_dim", n.attrs.get("concat_dim").cloned().unwrap_or(Attr::Int(0)))
                    .with("concat_dim", n.attrs.get("split_dim").cloned().unwrap_or(Attr::Int(0)));
                vec![Some(self.b.op(Op::AllToAll, &[dy], attrs, &h0)?)]
            }
            other => return Err(format!("internal: `{}` is not a collective op", other.name())),
        })
    }

    /// `split`'s adjoint: the pieces' adjoints joined back along the dim, zeros for pieces the
    /// loss does not depend on.
    fn split_adjoint(&mut self, g: &Graph, i: usize, dys: &[Option<ValueId>]) -> R<Vec<Option<ValueId>>> {
        let n = &g.nodes[i];
        let x = n.inputs[0];
        let dim = n.attrs.int("dim").unwrap_or(0);
        let mut parts = Vec::new();
        for (&o, dy) in n.outputs.iter().zip(dys) {
            parts.push(match dy {
                Some(d) => *d,
                None => {
                    let ty = g.ty(o);
                    let attrs = Attrs::new()
                        .with("value", Attr::Float(0.0))
                        .with("dtype", Attr::DType(ty.dtype))
                        .with("shape", Attr::Ints(ty.shape.iter().map(|&d| d as i64).collect()));
                    self.b.op(Op::Full, &[], attrs, &format!("{}.grad_zero", g.name_of(o)))?
                }
            });
        }
        let attrs = Attrs::new().with("dim", Attr::Int(dim));
        Ok(vec![Some(self.b.op(Op::Concat, &parts, attrs, &format!("{}.grad", g.name_of(x)))?)])
    }

    /// C = op_a(A) op_b(B); see ARCHITECTURE.md for the four transpose cases.
    fn matmul_adjoint(&mut self, g: &Graph, i: usize, dc: ValueId, wanted: &[bool]) -> R<Vec<Option<ValueId>>> {
        let n = &g.nodes[i];
        let (a, b) = (n.inputs[0], n.inputs[1]);
        let (ta, tb) = (n.attrs.bool_or("transpose_a", false), n.attrs.bool_or("transpose_b", false));
        let (sa, sb) = (g.ty(a).shape.clone(), g.ty(b).shape.clone());
        let (ha, hb) = (format!("{}.grad", g.name_of(a)), format!("{}.grad", g.name_of(b)));
        let mut out = vec![None, None];
        if wanted[0] {
            // dA = dC op_b(B)^T, transposed back when A was.
            let full = if !ta {
                self.matmul(dc, b, false, !tb, &format!("{ha}_full"))?
            } else {
                self.matmul(b, dc, tb, true, &format!("{ha}_full"))?
            };
            out[0] = Some(self.unbroadcast_fresh(full, &sa, &ha)?);
        }
        if wanted[1] {
            let dc_shape = self.ty(dc).shape;
            if sb.len() == 2 && sa.len() > 2 && !ta {
                // A weight shared over batch dims: flatten them into one GEMM instead of a
                // batched product followed by a sum.
                let k = sa[sa.len() - 1];
                let rows: usize = sa[..sa.len() - 1].iter().product();
                let n_cols = dc_shape[dc_shape.len() - 1];
                let a2 = self.b.reshape(a, &[rows, k], &format!("{hb}_a2"))?;
                let dc2 = self.b.reshape(dc, &[rows, n_cols], &format!("{hb}_dc2"))?;
                out[1] = Some(if !tb {
                    self.matmul(a2, dc2, true, false, &hb)?
                } else {
                    self.matmul(dc2, a2, true, false, &hb)?
                });
            } else {
                // dB = op_a(A)^T dC, transposed back when B was.
                let full = if !tb {
                    self.matmul(a, dc, !ta, false, &format!("{hb}_full"))?
                } else {
                    self.matmul(dc, a, true, ta, &format!("{hb}_full"))?
                };
                out[1] = Some(self.unbroadcast_fresh(full, &sb, &hb)?);
            }
        }
        Ok(out)
    }
}
