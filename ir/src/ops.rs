//! The op table: every op's name, arity, attributes and shape/dtype rule, in one place.
//!
//! Everything that needs to know about ops (parser, printer, verifier, interpreter, and the
//! passes) goes through [`Op::info`], so adding an op is one table row plus its interpreter
//! kernel. Shape rules see per-value types, the attributes and the mesh; they return the result
//! type (or, for a multi-result op, one type per result) or a sentence saying what is wrong.
//!
//! Conventions shared by the rules:
//! - Elementwise binary ops broadcast with numpy's rules; both operands have the same dtype.
//! - `dim`/`dims` attributes may be negative (counted from the end), as in PyTorch.
//! - Collectives describe what one rank does in an SPMD program: their shapes are per-rank.
//!   `all_gather` multiplies dimension `dim` by the axis size, `reduce_scatter` divides it,
//!   `all_to_all` divides `split_dim` and multiplies `concat_dim`.

use crate::attrs::{Attr, AttrKind, Attrs, GatherAdjoint, GeluApproximation, ReduceKind};
use crate::mesh::Mesh;
use crate::types::{broadcast_shapes, numel, DType, Shape, TensorType};
use serde::{Deserialize, Serialize};

/// How many operands an op takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arity {
    Exact(usize),
    AtLeast(usize),
}

impl Arity {
    pub fn accepts(self, n: usize) -> bool {
        match self {
            Arity::Exact(k) => n == k,
            Arity::AtLeast(k) => n >= k,
        }
    }
}

/// One attribute an op accepts.
#[derive(Clone, Copy, Debug)]
pub struct AttrSpec {
    pub name: &'static str,
    pub kind: AttrKind,
    pub required: bool,
}

const fn req(name: &'static str, kind: AttrKind) -> AttrSpec {
    AttrSpec { name, kind, required: true }
}

const fn opt(name: &'static str, kind: AttrKind) -> AttrSpec {
    AttrSpec { name, kind, required: false }
}

/// Everything the shape rule of an op sees.
pub struct InferCtx<'a> {
    pub inputs: &'a [&'a TensorType],
    pub attrs: &'a Attrs,
    pub mesh: &'a Mesh,
}

/// A shape and dtype rule: the result type, or what is wrong.
pub type ShapeRule = fn(&InferCtx) -> Result<Vec<TensorType>, String>;

/// What a shape rule function returns: one result type, or several (a multi-result op).
pub trait IntoResults {
    fn into_results(self) -> Vec<TensorType>;
}

impl IntoResults for TensorType {
    fn into_results(self) -> Vec<TensorType> {
        vec![self]
    }
}

impl IntoResults for Vec<TensorType> {
    fn into_results(self) -> Vec<TensorType> {
        self
    }
}

/// The row of the op table for one op.
pub struct OpInfo {
    pub name: &'static str,
    pub arity: Arity,
    pub attrs: &'static [AttrSpec],
    pub infer: ShapeRule,
    /// One line for `shardc --help`-style listings and the text-format docs.
    pub summary: &'static str,
}

macro_rules! op_table {
    ($( $variant:ident => $name:literal, $arity:expr, [$($attr:expr),*], $rule:expr, $summary:literal; )*) => {
        /// An IR operation. See the module doc for the conventions of the shape rules.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum Op { $($variant),* }

        impl Op {
            /// Every op, in table order.
            pub const ALL: &'static [Op] = &[$(Op::$variant),*];

            /// This op's row of the table.
            pub fn info(self) -> &'static OpInfo {
                match self {
                    $(Op::$variant => {
                        static INFO: OpInfo = OpInfo {
                            name: $name,
                            arity: $arity,
                            attrs: &[$($attr),*],
                            infer: {
                                fn rule(ctx: &InferCtx) -> Result<Vec<TensorType>, String> {
                                    ($rule)(ctx).map(IntoResults::into_results)
                                }
                                rule
                            },
                            summary: $summary,
                        };
                        &INFO
                    })*
                }
            }
        }
    };
}

use AttrKind as K;

op_table! {
    Full => "full", Arity::Exact(0), [req("value", K::Float), req("dtype", K::DType), req("shape", K::Ints)], infer_full,
        "a tensor filled with `value`";
    Iota => "iota", Arity::Exact(0), [req("dtype", K::DType), req("shape", K::Ints), req("dim", K::Int)], infer_full,
        "each element is its index along `dim`";
    AxisIndex => "axis_index", Arity::Exact(0), [req("axis", K::Str)], infer_axis_index,
        "this rank's coordinate on mesh axis `axis` (i64 scalar)";
    Add => "add", Arity::Exact(2), [], infer_binary, "a + b, broadcasting";
    Sub => "sub", Arity::Exact(2), [], infer_binary, "a - b, broadcasting";
    Mul => "mul", Arity::Exact(2), [], infer_binary, "a * b, broadcasting";
    Div => "div", Arity::Exact(2), [], infer_binary, "a / b, broadcasting";
    Maximum => "maximum", Arity::Exact(2), [], infer_binary, "max(a, b), broadcasting";
    Neg => "neg", Arity::Exact(1), [], infer_float_unary, "-x";
    Exp => "exp", Arity::Exact(1), [], infer_float_unary, "e^x";
    Log => "log", Arity::Exact(1), [], infer_float_unary, "natural logarithm";
    Sqrt => "sqrt", Arity::Exact(1), [], infer_float_unary, "square root";
    Rsqrt => "rsqrt", Arity::Exact(1), [], infer_float_unary, "1 / sqrt(x)";
    Tanh => "tanh", Arity::Exact(1), [], infer_float_unary, "hyperbolic tangent";
    Gelu => "gelu", Arity::Exact(1), [opt("approximate", K::Str)], infer_gelu,
        "GELU; approximate = \"tanh\" (GPT-2's gelu_new) or \"none\" (erf)";
    Silu => "silu", Arity::Exact(1), [], infer_float_unary, "x * sigmoid(x)";
    Cast => "cast", Arity::Exact(1), [req("dtype", K::DType)], infer_cast, "convert to `dtype`";
    Reshape => "reshape", Arity::Exact(1), [req("shape", K::Ints)], infer_reshape,
        "same elements in row-major order, new shape";
    Transpose => "transpose", Arity::Exact(1), [req("perm", K::Ints)], infer_transpose,
        "permute dimensions: output dim i is input dim perm[i]";
    Slice => "slice", Arity::Exact(1), [req("dim", K::Int), req("start", K::Int), req("end", K::Int)], infer_slice,
        "elements start..end along `dim`";
    Concat => "concat", Arity::AtLeast(1), [req("dim", K::Int)], infer_concat, "join along `dim`";
    Split => "split", Arity::Exact(1), [req("dim", K::Int), req("sizes", K::Ints)], infer_split,
        "cut along `dim` into pieces of `sizes` (one result each; they add up to the dim)";
    BroadcastTo => "broadcast_to", Arity::Exact(1), [req("shape", K::Ints)], infer_broadcast_to,
        "stretch to `shape` with numpy's rules";
    MatMul => "matmul", Arity::Exact(2), [opt("transpose_a", K::Bool), opt("transpose_b", K::Bool), opt("causal_a", K::Bool), opt("causal_out", K::Bool)], infer_matmul,
        "batched a[..., M, K] @ b[..., K, N]; batch dims broadcast";
    ReduceSum => "reduce_sum", Arity::Exact(1), [req("dims", K::Ints), opt("keepdim", K::Bool)], infer_reduce,
        "sum over `dims`";
    ReduceMax => "reduce_max", Arity::Exact(1), [req("dims", K::Ints), opt("keepdim", K::Bool)], infer_reduce,
        "maximum over `dims`";
    ReduceMean => "reduce_mean", Arity::Exact(1), [req("dims", K::Ints), opt("keepdim", K::Bool)], infer_reduce,
        "mean over `dims`";
    Softmax => "softmax", Arity::Exact(1), [opt("causal", K::Bool)], infer_softmax,
        "softmax over the last dim; causal masks key j > query i + (keys - queries)";
    LayerNorm => "layer_norm", Arity::Exact(3), [req("eps", K::Float)], infer_layer_norm,
        "(x - mean) / sqrt(var + eps) * gamma + beta over the last dim";
    RmsNorm => "rms_norm", Arity::Exact(2), [req("eps", K::Float)], infer_rms_norm,
        "x / sqrt(mean(x^2) + eps) * gamma over the last dim";
    Rope => "rope", Arity::Exact(2), [req("theta", K::Float), opt("inverse", K::Bool)], infer_rope,
        "rotary embedding of x[..., T, H, D] at positions[T] (rotate-half form); inverse rotates back";
    Embedding => "embedding", Arity::Exact(2), [], infer_embedding,
        "table[V, D] gathered at integer ids[...] -> [..., D]";
    CrossEntropy => "cross_entropy", Arity::Exact(2), [], infer_cross_entropy,
        "per-row -log softmax(logits[..., V])[target] -> [...]";
    AllReduce => "all_reduce", Arity::Exact(1), [req("axis", K::Str), opt("reduce", K::Str)], infer_all_reduce,
        "sum over the ranks of mesh axis `axis`";
    AllGather => "all_gather", Arity::Exact(1), [req("axis", K::Str), req("dim", K::Int), opt("grad", K::Str)], infer_all_gather,
        "concatenate the ranks' shards along `dim` (`grad = \"slice\"`: replicated consumers, see autodiff)";
    ReduceScatter => "reduce_scatter", Arity::Exact(1), [req("axis", K::Str), req("dim", K::Int)], infer_reduce_scatter,
        "sum over the ranks, each keeping its shard of `dim`";
    Identity => "identity", Arity::Exact(1), [req("axis", K::Str)], infer_identity,
        "forward no-op on a value replicated over `axis`; its gradient is all-reduced over `axis` (Megatron's f)";
    GreaterEqual => "greater_equal", Arity::Exact(2), [], infer_binary,
        "1 where a >= b else 0, broadcasting (a mask; not differentiable)";
    Pad => "pad", Arity::Exact(1), [req("dim", K::Int), req("before", K::Int), req("after", K::Int)], infer_pad,
        "zeros added before and after along `dim` (the adjoint of slice)";
    GeluGrad => "gelu_grad", Arity::Exact(2), [opt("approximate", K::Str)], infer_elementwise_grad,
        "gelu'(x) * dy for (x, dy)";
    SiluGrad => "silu_grad", Arity::Exact(2), [], infer_elementwise_grad, "silu'(x) * dy for (x, dy)";
    LayerNormGrad => "layer_norm_grad", Arity::Exact(3), [req("eps", K::Float)], infer_norm_grad,
        "d layer_norm / dx applied to dy, for (x, gamma, dy)";
    LayerNormGammaGrad => "layer_norm_gamma_grad", Arity::Exact(2), [req("eps", K::Float)], infer_gamma_grad,
        "sum over rows of dy * normalised x, for (x, dy) -> [D]";
    RmsNormGrad => "rms_norm_grad", Arity::Exact(3), [req("eps", K::Float)], infer_norm_grad,
        "d rms_norm / dx applied to dy, for (x, gamma, dy)";
    RmsNormGammaGrad => "rms_norm_gamma_grad", Arity::Exact(2), [req("eps", K::Float)], infer_gamma_grad,
        "sum over rows of dy * x / rms(x), for (x, dy) -> [D]";
    EmbeddingGrad => "embedding_grad", Arity::Exact(2), [req("rows", K::Int)], infer_embedding_grad,
        "scatter-add of dy[..., D] into [rows, D] at ids[...], for (ids, dy)";
    CrossEntropyGrad => "cross_entropy_grad", Arity::Exact(3), [], infer_cross_entropy_grad,
        "(softmax(logits) - onehot(targets)) * dy, for (logits, targets, dy)";
    TakeShard => "take_shard", Arity::Exact(1), [req("axis", K::Str), req("dim", K::Int)], infer_reduce_scatter,
        "this rank's chunk along `dim` of a value replicated over `axis` (no communication)";
    AllToAll => "all_to_all", Arity::Exact(1), [req("axis", K::Str), req("split_dim", K::Int), req("concat_dim", K::Int)], infer_all_to_all,
        "split `split_dim` across the ranks, concatenate what arrives along `concat_dim`";
    Fused => "fused", Arity::AtLeast(0), [req("kernel", K::Str)], infer_fused,
        "one kernel: the node's body (a graph) run on its operands; the results are the body's outputs";
}

impl Op {
    /// The op spelled `name` in the text format.
    pub fn from_name(name: &str) -> Option<Op> {
        Op::ALL.iter().copied().find(|op| op.info().name == name)
    }

    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// True for the ops that communicate between ranks.
    pub fn is_collective(self) -> bool {
        matches!(self, Op::AllReduce | Op::AllGather | Op::ReduceScatter | Op::AllToAll)
    }
}

/// Resolves a possibly negative dimension against `rank`.
pub fn normalize_dim(dim: i64, rank: usize) -> Result<usize, String> {
    let r = rank as i64;
    if r == 0 {
        Err(format!("dimension {dim} does not exist in a scalar"))
    } else if dim < -r || dim >= r {
        Err(format!("dimension {dim} is out of range for rank {rank}"))
    } else {
        Ok(if dim < 0 { (dim + r) as usize } else { dim as usize })
    }
}

fn shape_attr(attrs: &Attrs, name: &str) -> Result<Shape, String> {
    let v = attrs.ints(name).ok_or_else(|| format!("missing int list attribute `{name}`"))?;
    v.iter().map(|&d| usize::try_from(d).map_err(|_| format!("`{name}` has negative extent {d}"))).collect()
}

fn int_attr(attrs: &Attrs, name: &str) -> Result<i64, String> {
    attrs.int(name).ok_or_else(|| format!("missing int attribute `{name}`"))
}

fn axis_size(ctx: &InferCtx) -> Result<usize, String> {
    let axis = ctx.attrs.str("axis").ok_or("missing string attribute `axis`")?;
    ctx.mesh.axis_size(axis).ok_or_else(|| {
        if ctx.mesh.axes.is_empty() {
            format!("mesh axis `{axis}` is not declared: the graph has no `mesh` line")
        } else {
            format!("mesh axis `{axis}` is not declared in mesh `{}`", ctx.mesh)
        }
    })
}

fn float_input<'a>(ctx: &'a InferCtx, i: usize, role: &str) -> Result<&'a TensorType, String> {
    let t = ctx.inputs[i];
    if !t.dtype.is_float() {
        return Err(format!("{role} must be a floating type, found {}", t));
    }
    Ok(t)
}

fn int_input<'a>(ctx: &'a InferCtx, i: usize, role: &str) -> Result<&'a TensorType, String> {
    let t = ctx.inputs[i];
    if !t.dtype.is_int() {
        return Err(format!("{role} must be an integer type (i32 or i64), found {}", t));
    }
    Ok(t)
}

fn infer_full(ctx: &InferCtx) -> Result<TensorType, String> {
    let dtype = ctx.attrs.dtype("dtype").ok_or("missing dtype attribute `dtype`")?;
    let shape = shape_attr(ctx.attrs, "shape")?;
    if let Some(dim) = ctx.attrs.int("dim") {
        normalize_dim(dim, shape.len())?;
    }
    Ok(TensorType::new(dtype, shape))
}

fn infer_axis_index(ctx: &InferCtx) -> Result<TensorType, String> {
    axis_size(ctx)?;
    Ok(TensorType::new(DType::I64, vec![]))
}

fn infer_binary(ctx: &InferCtx) -> Result<TensorType, String> {
    let (a, b) = (ctx.inputs[0], ctx.inputs[1]);
    if a.dtype != b.dtype {
        return Err(format!("operands have different dtypes: {a} and {b}; insert a cast"));
    }
    let shape = broadcast_shapes(&a.shape, &b.shape).ok_or_else(|| format!("shapes {a} and {b} do not broadcast"))?;
    Ok(TensorType::new(a.dtype, shape))
}

fn infer_float_unary(ctx: &InferCtx) -> Result<TensorType, String> {
    Ok(float_input(ctx, 0, "the operand")?.clone())
}

fn infer_gelu(ctx: &InferCtx) -> Result<TensorType, String> {
    ctx.attrs.choice::<GeluApproximation>("approximate")?;
    infer_float_unary(ctx)
}

fn infer_cast(ctx: &InferCtx) -> Result<TensorType, String> {
    let dtype = ctx.attrs.dtype("dtype").ok_or("missing dtype attribute `dtype`")?;
    Ok(TensorType::new(dtype, ctx.inputs[0].shape.clone()))
}

fn infer_reshape(ctx: &InferCtx) -> Result<TensorType, String> {
    let x = ctx.inputs[0];
    let shape = shape_attr(ctx.attrs, "shape")?;
    if numel(&shape) != x.numel() {
        return Err(format!("cannot reshape {x} ({} elements) to {:?} ({} elements)", x.numel(), shape, numel(&shape)));
    }
    Ok(TensorType::new(x.dtype, shape))
}

fn infer_transpose(ctx: &InferCtx) -> Result<TensorType, String> {
    let x = ctx.inputs[0];
    let perm = ctx.attrs.ints("perm").ok_or("missing int list attribute `perm`")?;
    let mut seen = vec![false; x.rank()];
    if perm.len() != x.rank() {
        return Err(format!("perm {perm:?} has {} entries but the operand {x} has rank {}", perm.len(), x.rank()));
    }
    for &p in perm {
        match usize::try_from(p).ok().filter(|&p| p < x.rank()) {
            Some(p) if !seen[p] => seen[p] = true,
            _ => return Err(format!("perm {perm:?} is not a permutation of 0..{}", x.rank())),
        }
    }
    Ok(TensorType::new(x.dtype, perm.iter().map(|&p| x.shape[p as usize]).collect::<Shape>()))
}

fn infer_slice(ctx: &InferCtx) -> Result<TensorType, String> {
    let x = ctx.inputs[0];
    let dim = normalize_dim(int_attr(ctx.attrs, "dim")?, x.rank())?;
    let (start, end) = (int_attr(ctx.attrs, "start")?, int_attr(ctx.attrs, "end")?);
    if start < 0 || end < start || end as usize > x.shape[dim] {
        return Err(format!("slice {start}..{end} is not within 0..{} of dimension {dim} of {x}", x.shape[dim]));
    }
    let mut shape = x.shape.clone();
    shape[dim] = (end - start) as usize;
    Ok(TensorType::new(x.dtype, shape))
}

fn infer_split(ctx: &InferCtx) -> Result<Vec<TensorType>, String> {
    let x = ctx.inputs[0];
    let dim = normalize_dim(int_attr(ctx.attrs, "dim")?, x.rank())?;
    let sizes = ctx.attrs.ints("sizes").ok_or("missing int list attribute `sizes`")?;
    if sizes.is_empty() || sizes.iter().any(|&s| s < 1) {
        return Err(format!("sizes {sizes:?} must be one or more positive extents"));
    }
    let total = sizes.iter().try_fold(0i64, |a, &s| a.checked_add(s)).unwrap_or(i64::MAX);
    if total != x.shape[dim] as i64 {
        return Err(format!("sizes {sizes:?} add up to {total}, but dimension {dim} of {x} is {}", x.shape[dim]));
    }
    Ok(sizes
        .iter()
        .map(|&s| {
            let mut shape = x.shape.clone();
            shape[dim] = s as usize;
            TensorType::new(x.dtype, shape)
        })
        .collect())
}

fn infer_concat(ctx: &InferCtx) -> Result<TensorType, String> {
    let first = ctx.inputs[0];
    let dim = normalize_dim(int_attr(ctx.attrs, "dim")?, first.rank())?;
    let mut shape = first.shape.clone();
    for (i, t) in ctx.inputs.iter().enumerate().skip(1) {
        let same_elsewhere =
            t.rank() == first.rank() && (0..t.rank()).all(|d| d == dim || t.shape[d] == first.shape[d]);
        if t.dtype != first.dtype || !same_elsewhere {
            return Err(format!(
                "operand {i} is {t} but operand 0 is {first}; they must agree except in dimension {dim}"
            ));
        }
        shape[dim] = shape[dim].saturating_add(t.shape[dim]);
    }
    Ok(TensorType::new(first.dtype, shape))
}

fn infer_broadcast_to(ctx: &InferCtx) -> Result<TensorType, String> {
    let x = ctx.inputs[0];
    let shape = shape_attr(ctx.attrs, "shape")?;
    match broadcast_shapes(&x.shape, &shape) {
        Some(s) if s == shape => Ok(TensorType::new(x.dtype, shape)),
        _ => Err(format!("{x} does not broadcast to {shape:?}")),
    }
}

fn infer_matmul(ctx: &InferCtx) -> Result<TensorType, String> {
    let (a, b) = (float_input(ctx, 0, "the left operand")?, float_input(ctx, 1, "the right operand")?);
    if a.dtype != b.dtype {
        return Err(format!("operands have different dtypes: {a} and {b}; insert a cast"));
    }
    if a.rank() < 2 || b.rank() < 2 {
        return Err(format!("matmul needs operands of rank >= 2, found {a} and {b}"));
    }
    let (ta, tb) = (ctx.attrs.bool_or("transpose_a", false), ctx.attrs.bool_or("transpose_b", false));
    let (ra, rb) = (a.rank(), b.rank());
    let (m, ka) = if ta { (a.shape[ra - 1], a.shape[ra - 2]) } else { (a.shape[ra - 2], a.shape[ra - 1]) };
    let (kb, n) = if tb { (b.shape[rb - 1], b.shape[rb - 2]) } else { (b.shape[rb - 2], b.shape[rb - 1]) };
    if ka != kb {
        return Err(format!(
            "contracting dimensions differ: {a}{} has K = {ka}, {b}{} has K = {kb}",
            if ta { " (transposed)" } else { "" },
            if tb { " (transposed)" } else { "" }
        ));
    }
    let mut shape = broadcast_shapes(&a.shape[..ra - 2], &b.shape[..rb - 2])
        .ok_or_else(|| format!("batch dimensions of {a} and {b} do not broadcast"))?;
    shape.extend([m, n]);
    Ok(TensorType::new(a.dtype, shape))
}

/// Normalised, sorted, de-duplicated reduction dims.
pub fn reduce_dims(attrs: &Attrs, rank: usize) -> Result<Vec<usize>, String> {
    let dims = attrs.ints("dims").ok_or("missing int list attribute `dims`")?;
    let mut out = dims.iter().map(|&d| normalize_dim(d, rank)).collect::<Result<Vec<_>, _>>()?;
    out.sort_unstable();
    if out.windows(2).any(|w| w[0] == w[1]) {
        return Err(format!("dims {dims:?} name a dimension twice"));
    }
    Ok(out)
}

fn infer_reduce(ctx: &InferCtx) -> Result<TensorType, String> {
    let x = ctx.inputs[0];
    let dims = reduce_dims(ctx.attrs, x.rank())?;
    let keep = ctx.attrs.bool_or("keepdim", false);
    let shape = (0..x.rank())
        .filter_map(|d| match (dims.contains(&d), keep) {
            (true, true) => Some(1),
            (true, false) => None,
            (false, _) => Some(x.shape[d]),
        })
        .collect::<Shape>();
    Ok(TensorType::new(x.dtype, shape))
}

fn infer_softmax(ctx: &InferCtx) -> Result<TensorType, String> {
    let x = float_input(ctx, 0, "the operand")?;
    if x.rank() == 0 {
        return Err("softmax needs rank >= 1".into());
    }
    if ctx.attrs.bool_or("causal", false) {
        let r = x.rank();
        if r < 2 || x.shape[r - 1] < x.shape[r - 2] {
            return Err(format!("causal softmax needs [..., queries, keys] with keys >= queries, found {x}"));
        }
    }
    Ok(x.clone())
}

fn check_vector(x: &TensorType, v: &TensorType, role: &str) -> Result<(), String> {
    let d = *x.shape.last().ok_or("the normalised operand must have rank >= 1")?;
    if v.shape != [d] || v.dtype != x.dtype {
        return Err(format!("{role} must be {}[{d}] to match {x}, found {v}", x.dtype));
    }
    Ok(())
}

fn infer_layer_norm(ctx: &InferCtx) -> Result<TensorType, String> {
    let x = float_input(ctx, 0, "x")?;
    check_vector(x, ctx.inputs[1], "gamma")?;
    check_vector(x, ctx.inputs[2], "beta")?;
    Ok(x.clone())
}

fn infer_rms_norm(ctx: &InferCtx) -> Result<TensorType, String> {
    let x = float_input(ctx, 0, "x")?;
    check_vector(x, ctx.inputs[1], "gamma")?;
    Ok(x.clone())
}

fn infer_rope(ctx: &InferCtx) -> Result<TensorType, String> {
    let x = float_input(ctx, 0, "x")?;
    let pos = int_input(ctx, 1, "positions")?;
    let r = x.rank();
    if r < 3 || x.shape[r - 1] % 2 != 0 {
        return Err(format!("rope needs x[..., T, H, D] with even D, found {x}"));
    }
    if pos.shape != [x.shape[r - 3]] {
        return Err(format!("positions must be [{}] (one per token of {x}), found {pos}", x.shape[r - 3]));
    }
    Ok(x.clone())
}

fn infer_embedding(ctx: &InferCtx) -> Result<TensorType, String> {
    let table = float_input(ctx, 0, "the table")?;
    let ids = int_input(ctx, 1, "the ids")?;
    if table.rank() != 2 {
        return Err(format!("the table must be [rows, features], found {table}"));
    }
    let mut shape = ids.shape.clone();
    shape.push(table.shape[1]);
    Ok(TensorType::new(table.dtype, shape))
}

fn infer_cross_entropy(ctx: &InferCtx) -> Result<TensorType, String> {
    let logits = float_input(ctx, 0, "the logits")?;
    let targets = int_input(ctx, 1, "the targets")?;
    if logits.rank() == 0 || targets.shape[..] != logits.shape[..logits.rank() - 1] {
        return Err(format!(
            "targets must have the shape of the logits without their last dim: logits {logits}, targets {targets}"
        ));
    }
    Ok(TensorType::new(logits.dtype, targets.shape.clone()))
}

fn infer_all_reduce(ctx: &InferCtx) -> Result<TensorType, String> {
    axis_size(ctx)?;
    ctx.attrs.choice::<ReduceKind>("reduce")?;
    Ok(ctx.inputs[0].clone())
}

fn infer_all_gather(ctx: &InferCtx) -> Result<TensorType, String> {
    let n = axis_size(ctx)?;
    let x = ctx.inputs[0];
    let dim = normalize_dim(int_attr(ctx.attrs, "dim")?, x.rank())?;
    ctx.attrs.choice::<GatherAdjoint>("grad")?;
    let mut shape = x.shape.clone();
    shape[dim] = shape[dim].saturating_mul(n);
    Ok(TensorType::new(x.dtype, shape))
}

fn divide(x: &TensorType, dim: usize, n: usize, axis: &str) -> Result<usize, String> {
    if !x.shape[dim].is_multiple_of(n) {
        return Err(format!("dimension {dim} of {x} does not divide over the {n} ranks of axis `{axis}`"));
    }
    Ok(x.shape[dim] / n)
}

fn infer_reduce_scatter(ctx: &InferCtx) -> Result<TensorType, String> {
    let n = axis_size(ctx)?;
    let x = ctx.inputs[0];
    let dim = normalize_dim(int_attr(ctx.attrs, "dim")?, x.rank())?;
    let mut shape = x.shape.clone();
    shape[dim] = divide(x, dim, n, ctx.attrs.str("axis").unwrap_or_default())?;
    Ok(TensorType::new(x.dtype, shape))
}

fn infer_fused(_: &InferCtx) -> Result<Vec<TensorType>, String> {
    Err("a fused node's result types are its body's outputs (the verifier checks them there)".into())
}

fn infer_all_to_all(ctx: &InferCtx) -> Result<TensorType, String> {
    let n = axis_size(ctx)?;
    let x = ctx.inputs[0];
    let split = normalize_dim(int_attr(ctx.attrs, "split_dim")?, x.rank())?;
    let concat = normalize_dim(int_attr(ctx.attrs, "concat_dim")?, x.rank())?;
    let mut shape = x.shape.clone();
    shape[split] = divide(x, split, n, ctx.attrs.str("axis").unwrap_or_default())?;
    shape[concat] = shape[concat].saturating_mul(n);
    Ok(TensorType::new(x.dtype, shape))
}

fn infer_identity(ctx: &InferCtx) -> Result<TensorType, String> {
    axis_size(ctx)?;
    Ok(ctx.inputs[0].clone())
}

fn infer_pad(ctx: &InferCtx) -> Result<TensorType, String> {
    let x = ctx.inputs[0];
    let dim = normalize_dim(int_attr(ctx.attrs, "dim")?, x.rank())?;
    let (before, after) = (int_attr(ctx.attrs, "before")?, int_attr(ctx.attrs, "after")?);
    if before < 0 || after < 0 {
        return Err(format!("pad amounts must not be negative, found before = {before}, after = {after}"));
    }
    let mut shape = x.shape.clone();
    shape[dim] = shape[dim].saturating_add(before as usize).saturating_add(after as usize);
    Ok(TensorType::new(x.dtype, shape))
}

/// (x, dy) with equal float types -> that type.
fn infer_elementwise_grad(ctx: &InferCtx) -> Result<TensorType, String> {
    let x = float_input(ctx, 0, "x")?;
    if ctx.inputs[1] != x {
        return Err(format!("dy must have x's type {x}, found {}", ctx.inputs[1]));
    }
    ctx.attrs.choice::<GeluApproximation>("approximate")?;
    Ok(x.clone())
}

/// (x, gamma, dy) -> x's type.
fn infer_norm_grad(ctx: &InferCtx) -> Result<TensorType, String> {
    let x = float_input(ctx, 0, "x")?;
    check_vector(x, ctx.inputs[1], "gamma")?;
    if ctx.inputs[2] != x {
        return Err(format!("dy must have x's type {x}, found {}", ctx.inputs[2]));
    }
    Ok(x.clone())
}

/// (x, dy) -> [D].
fn infer_gamma_grad(ctx: &InferCtx) -> Result<TensorType, String> {
    let x = float_input(ctx, 0, "x")?;
    if ctx.inputs[1] != x {
        return Err(format!("dy must have x's type {x}, found {}", ctx.inputs[1]));
    }
    let d = *x.shape.last().ok_or("x must have rank >= 1")?;
    Ok(TensorType::new(x.dtype, vec![d]))
}

fn infer_embedding_grad(ctx: &InferCtx) -> Result<TensorType, String> {
    let ids = int_input(ctx, 0, "the ids")?;
    let dy = float_input(ctx, 1, "dy")?;
    let rows = usize::try_from(int_attr(ctx.attrs, "rows")?).map_err(|_| "rows must not be negative".to_string())?;
    if dy.rank() != ids.rank() + 1 || dy.shape[..ids.rank()] != ids.shape[..] {
        return Err(format!("dy must be the ids' shape plus a feature dim: ids {ids}, dy {dy}"));
    }
    Ok(TensorType::new(dy.dtype, vec![rows, dy.shape[ids.rank()]]))
}

fn infer_cross_entropy_grad(ctx: &InferCtx) -> Result<TensorType, String> {
    let logits = infer_cross_entropy(&InferCtx { inputs: &ctx.inputs[..2], attrs: ctx.attrs, mesh: ctx.mesh })?;
    if ctx.inputs[2] != &logits {
        return Err(format!("dy must have the per-row loss type {logits}, found {}", ctx.inputs[2]));
    }
    Ok(ctx.inputs[0].clone())
}

/// Checks `attrs` against the op's table row: every required attribute is present with its
/// kind, and nothing unknown is there.
pub fn check_attrs(op: Op, attrs: &Attrs) -> Result<(), String> {
    let info = op.info();
    for spec in info.attrs {
        match attrs.get(spec.name) {
            None if spec.required => {
                return Err(format!("missing required attribute `{}` ({})", spec.name, spec.kind.name()))
            }
            None => {}
            // An integer literal is accepted where a float is expected (`eps = 1` means 1.0).
            Some(Attr::Int(_)) if spec.kind == AttrKind::Float => {}
            Some(a) if a.kind() != spec.kind => {
                return Err(format!(
                    "attribute `{}` must be a {}, found a {}",
                    spec.name,
                    spec.kind.name(),
                    a.kind().name()
                ))
            }
            Some(_) => {}
        }
    }
    for (name, _) in attrs.iter() {
        if !info.attrs.iter().any(|s| s.name == name) {
            let known: Vec<_> = info.attrs.iter().map(|s| s.name).collect();
            return Err(if known.is_empty() {
                format!("`{}` takes no attributes, found `{name}`", info.name)
            } else {
                format!("`{}` has no attribute `{name}`; it takes {}", info.name, known.join(", "))
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_has_a_unique_name() {
        for (i, a) in Op::ALL.iter().enumerate() {
            assert_eq!(Op::from_name(a.name()), Some(*a));
            for b in &Op::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
            }
        }
    }

    #[test]
    fn negative_dims_count_from_the_end() {
        assert_eq!(normalize_dim(-1, 3), Ok(2));
        assert_eq!(normalize_dim(2, 3), Ok(2));
        assert!(normalize_dim(3, 3).is_err());
        assert!(normalize_dim(-4, 3).is_err());
        assert!(normalize_dim(0, 0).is_err());
    }
}
