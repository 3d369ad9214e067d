//! The local (non-communicating) ops, one plain loop each.
//!
//! Kernels read shapes from the graph's static types. Reductions, norms, softmax and
//! cross-entropy accumulate in f64 and round once to the storage type, so f32 results differ
//! from a perfectly rounded computation by at most one rounding per op.

use super::grad_kernels as grad;
use super::real::Real;
use super::threads::par_fill;
pub use super::threads::worker_threads;
use super::Val;
use crate::attrs::{Attrs, GeluApproximation};
use crate::ops::{normalize_dim, reduce_dims, Op};
use crate::types::{numel, strides, DType, TensorType};

/// For each element of a tensor of shape `shape` (row-major), the offset `sum(i[d] * step[d])`.
pub(crate) fn strided_offsets(shape: &[usize], step: &[usize]) -> Vec<usize> {
    let n = numel(shape);
    let mut out = Vec::with_capacity(n);
    let r = shape.len();
    if r == 0 {
        out.push(0);
        return out;
    }
    if n == 0 {
        return out;
    }
    // The innermost dimension is a run with a fixed stride; an odometer walks the outer ones.
    let (inner, inner_step) = (shape[r - 1], step[r - 1]);
    let mut idx = vec![0usize; r - 1];
    let mut base = 0usize;
    loop {
        out.extend((0..inner).map(|i| base + i * inner_step));
        let mut d = r - 1;
        loop {
            if d == 0 {
                return out;
            }
            d -= 1;
            idx[d] += 1;
            base += step[d];
            if idx[d] < shape[d] {
                break;
            }
            base -= step[d] * shape[d];
            idx[d] = 0;
        }
    }
}

/// Offsets into a tensor of shape `inp` for each element of its broadcast to `out`.
pub(crate) fn broadcast_offsets(out: &[usize], inp: &[usize]) -> Vec<usize> {
    let pad = out.len() - inp.len();
    let s = strides(inp);
    let step: Vec<usize> = (0..out.len()).map(|d| if d < pad || inp[d - pad] == 1 { 0 } else { s[d - pad] }).collect();
    strided_offsets(out, &step)
}

fn gather<E: Copy>(src: &[E], offsets: &[usize]) -> Vec<E> {
    offsets.iter().map(|&o| src[o]).collect()
}

fn broadcast_to<E: Copy>(src: &[E], inp: &[usize], out: &[usize]) -> Vec<E> {
    if inp == out {
        src.to_vec()
    } else {
        gather(src, &broadcast_offsets(out, inp))
    }
}

fn binary<E: Copy>(a: &[E], sa: &[usize], b: &[E], sb: &[usize], out: &[usize], f: impl Fn(E, E) -> E) -> Vec<E> {
    if sa == out && sb == out {
        return a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect();
    }
    if sa == out && b.len() == 1 {
        return a.iter().map(|&x| f(x, b[0])).collect();
    }
    if sb == out && a.len() == 1 {
        return b.iter().map(|&y| f(a[0], y)).collect();
    }
    let oa = broadcast_offsets(out, sa);
    let ob = broadcast_offsets(out, sb);
    oa.iter().zip(&ob).map(|(&i, &j)| f(a[i], b[j])).collect()
}

fn map<T: Real>(x: &[T], dtype: DType, f: impl Fn(f64) -> f64 + Sync) -> Vec<T> {
    par_fill(x.len(), 1, |start, part| {
        for (o, &v) in part.iter_mut().zip(&x[start..]) {
            *o = T::from_f64(f(v.to_f64())).round_to(dtype);
        }
    })
}

/// `f(x, dy)` elementwise, in parallel.
fn map2<T: Real>(x: &[T], dy: &[T], dtype: DType, f: impl Fn(f64, f64) -> f64 + Sync) -> Vec<T> {
    par_fill(x.len(), 1, |start, part| {
        for ((o, &a), &b) in part.iter_mut().zip(&x[start..]).zip(&dy[start..]) {
            *o = T::from_f64(f(a.to_f64(), b.to_f64())).round_to(dtype);
        }
    })
}

/// GELU; `tanh` selects the tanh approximation (GPT-2's `gelu_new`).
pub fn gelu(x: f64, tanh: bool) -> f64 {
    if tanh {
        let c = (2.0 / std::f64::consts::PI).sqrt();
        0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
    } else {
        0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
    }
}

/// SiLU: x * sigmoid(x).
pub fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// Runs one local op. `ins` are the operand values, `tys` their types, `out` the result type.
/// Every result of a node: [`eval`] for single-result ops, the pieces for multi-result ones.
pub(crate) fn eval_results<T: Real>(
    op: Op,
    attrs: &Attrs,
    ins: &[&Val<T>],
    tys: &[&TensorType],
    outs: &[&TensorType],
    coord: impl Fn(&str) -> Option<usize>,
) -> Result<Vec<Val<T>>, String> {
    match op {
        Op::Split => {
            let x = tys[0];
            let dim = normalize_dim(attrs.int("dim").unwrap_or(0), x.rank())?;
            let s = strides(&x.shape);
            let mut start = 0;
            Ok(outs
                .iter()
                .map(|out| {
                    let base = start * s[dim];
                    start += out.shape[dim];
                    let offs: Vec<usize> = strided_offsets(&out.shape, &s).into_iter().map(|o| o + base).collect();
                    ins[0].gather(&offs)
                })
                .collect())
        }
        _ => Ok(vec![eval(op, attrs, ins, tys, outs[0], coord)?]),
    }
}

pub(crate) fn eval<T: Real>(
    op: Op,
    attrs: &Attrs,
    ins: &[&Val<T>],
    tys: &[&TensorType],
    out: &TensorType,
    coord: impl Fn(&str) -> Option<usize>,
) -> Result<Val<T>, String> {
    let dt = out.dtype;
    let f = |i: usize| -> Result<&[T], String> {
        match ins[i] {
            Val::F(v) => Ok(v),
            Val::I(_) => Err(format!("operand {i} must be floating")),
        }
    };
    let int = |i: usize| -> Result<&[i64], String> {
        match ins[i] {
            Val::I(v) => Ok(v),
            Val::F(_) => Err(format!("operand {i} must be an integer tensor")),
        }
    };
    let float_out = |v: Vec<T>| {
        if T::needs_rounding(dt) {
            Val::F(v.into_iter().map(|x| x.round_to(dt)).collect())
        } else {
            Val::F(v)
        }
    };
    Ok(match op {
        Op::Full => {
            let value = attrs.float("value").unwrap_or(0.0);
            if dt.is_float() {
                Val::F(vec![T::from_f64(value).round_to(dt); out.numel()])
            } else {
                Val::I(vec![value as i64; out.numel()])
            }
        }
        Op::Iota => {
            let dim = normalize_dim(attrs.int("dim").unwrap_or(0), out.rank())?;
            let s = strides(&out.shape);
            let idx = (0..out.numel()).map(|i| (i / s[dim]) % out.shape[dim]);
            if dt.is_float() {
                Val::F(idx.map(|i| T::from_f64(i as f64).round_to(dt)).collect())
            } else {
                Val::I(idx.map(|i| i as i64).collect())
            }
        }
        Op::AxisIndex => {
            let axis = attrs.str("axis").unwrap_or_default();
            Val::I(vec![coord(axis).ok_or_else(|| format!("mesh axis `{axis}` is not declared"))? as i64])
        }
        Op::Add | Op::Sub | Op::Mul | Op::Div | Op::Maximum => arith_kernel(op, ins, tys, out)?,
        Op::Neg => Val::F(map(f(0)?, dt, |x| -x)),
        Op::Exp => Val::F(map(f(0)?, dt, f64::exp)),
        Op::Log => Val::F(map(f(0)?, dt, f64::ln)),
        Op::Sqrt => Val::F(map(f(0)?, dt, f64::sqrt)),
        Op::Rsqrt => Val::F(map(f(0)?, dt, |x| 1.0 / x.sqrt())),
        Op::Tanh => Val::F(map(f(0)?, dt, f64::tanh)),
        Op::Silu => Val::F(map(f(0)?, dt, silu)),
        Op::Gelu => {
            let tanh = attrs.choice_or_default::<GeluApproximation>("approximate") == GeluApproximation::Tanh;
            Val::F(map(f(0)?, dt, |x| gelu(x, tanh)))
        }
        Op::Cast => match ins[0] {
            Val::F(v) if dt.is_float() => float_out(v.clone()),
            Val::F(v) => Val::I(v.iter().map(|&x| x.to_f64().trunc() as i64).collect()),
            Val::I(v) if dt.is_float() => Val::F(v.iter().map(|&x| T::from_f64(x as f64).round_to(dt)).collect()),
            Val::I(v) if dt == DType::I32 => Val::I(v.iter().map(|&x| x as i32 as i64).collect()),
            Val::I(v) => Val::I(v.clone()),
        },
        Op::Reshape => ins[0].clone(),
        Op::Transpose => {
            let perm = attrs.ints("perm").unwrap_or_default();
            let s = strides(&tys[0].shape);
            let step: Vec<usize> = perm.iter().map(|&p| s[p as usize]).collect();
            ins[0].gather(&strided_offsets(&out.shape, &step))
        }
        Op::Slice => {
            let x = tys[0];
            let dim = normalize_dim(attrs.int("dim").unwrap_or(0), x.rank())?;
            let s = strides(&x.shape);
            let base = attrs.int("start").unwrap_or(0) as usize * s[dim];
            let offs: Vec<usize> = strided_offsets(&out.shape, &s).into_iter().map(|o| o + base).collect();
            ins[0].gather(&offs)
        }
        Op::Concat => {
            let dim = normalize_dim(attrs.int("dim").unwrap_or(0), out.rank())?;
            concat(ins, tys, out, dim)
        }
        Op::Split => return Err("`split` has several results (the interpreter runs it through eval_results)".into()),
        Op::BroadcastTo => match ins[0] {
            Val::F(v) => Val::F(broadcast_to(v, &tys[0].shape, &out.shape)),
            Val::I(v) => Val::I(broadcast_to(v, &tys[0].shape, &out.shape)),
        },
        Op::MatMul => float_out(matmul(f(0)?, tys[0], f(1)?, tys[1], out, attrs)),
        Op::ReduceSum | Op::ReduceMean | Op::ReduceMax => reduce_kernel(op, attrs, ins[0], tys[0], dt)?,
        Op::Softmax => softmax_kernel(f(0)?, attrs, out),
        Op::LayerNorm | Op::RmsNorm => {
            let beta = if op == Op::LayerNorm { Some(f(2)?) } else { None };
            norm_kernel(f(0)?, f(1)?, beta, attrs, out)
        }
        Op::Rope => rope_kernel(f(0)?, int(1)?, attrs, out),
        Op::Embedding => {
            let (table, ids) = (f(0)?, int(1)?);
            let (rows, d) = (tys[0].shape[0], tys[0].shape[1]);
            let mut y = Vec::with_capacity(ids.len() * d);
            for &id in ids {
                if id < 0 || id as usize >= rows {
                    return Err(format!("id {id} is outside the table's {rows} rows"));
                }
                y.extend_from_slice(&table[id as usize * d..(id as usize + 1) * d]);
            }
            float_out(y)
        }
        Op::CrossEntropy => cross_entropy_kernel(f(0)?, int(1)?, tys[0], dt)?,
        Op::Identity => ins[0].clone(),
        Op::TakeShard => {
            let x = tys[0];
            let dim = normalize_dim(attrs.int("dim").unwrap_or(0), x.rank())?;
            let axis = attrs.str("axis").unwrap_or_default();
            let k = coord(axis).ok_or_else(|| format!("mesh axis `{axis}` is not declared"))?;
            let s = strides(&x.shape);
            let base = k * out.shape[dim] * s[dim];
            let offs: Vec<usize> = strided_offsets(&out.shape, &s).into_iter().map(|o| o + base).collect();
            ins[0].gather(&offs)
        }
        Op::GreaterEqual => {
            let (sa, sb) = (&tys[0].shape, &tys[1].shape);
            match (ins[0], ins[1]) {
                (Val::F(a), Val::F(b)) => {
                    Val::F(binary(a, sa, b, sb, &out.shape, |x, y| if x >= y { T::from_f64(1.0) } else { T::ZERO }))
                }
                (Val::I(a), Val::I(b)) => Val::I(binary(a, sa, b, sb, &out.shape, |x, y| (x >= y) as i64)),
                _ => return Err("operands must both be floating or both integer".into()),
            }
        }
        Op::Pad => pad_kernel(ins[0], tys[0], attrs, out)?,
        Op::GeluGrad => {
            let tanh = attrs.choice_or_default::<GeluApproximation>("approximate") == GeluApproximation::Tanh;
            Val::F(map2(f(0)?, f(1)?, dt, |x, g| grad::gelu_derivative(x, tanh) * g))
        }
        Op::SiluGrad => Val::F(map2(f(0)?, f(1)?, dt, |x, g| grad::silu_derivative(x) * g)),
        Op::LayerNormGrad | Op::RmsNormGrad => {
            let eps = attrs.float("eps").unwrap_or(1e-5);
            Val::F(grad::norm_grad(f(0)?, f(1)?, f(2)?, eps, op == Op::LayerNormGrad, dt))
        }
        Op::LayerNormGammaGrad | Op::RmsNormGammaGrad => {
            let eps = attrs.float("eps").unwrap_or(1e-5);
            Val::F(grad::norm_gamma_grad(f(0)?, f(1)?, out.shape[0], eps, op == Op::LayerNormGammaGrad, dt))
        }
        Op::EmbeddingGrad => Val::F(grad::embedding_grad(int(0)?, f(1)?, out.shape[0], out.shape[1], dt)?),
        Op::CrossEntropyGrad => {
            let v = *out.shape.last().unwrap_or(&1);
            Val::F(grad::cross_entropy_grad(f(0)?, int(1)?, f(2)?, v, dt)?)
        }
        Op::AllReduce | Op::AllGather | Op::ReduceScatter | Op::AllToAll => {
            return Err("collectives are executed by the SPMD driver".into())
        }
        Op::Fused => return Err("a fused node runs its body (the SPMD driver does)".into()),
    })
}

/// `add`, `sub`, `mul`, `div`, `maximum` with numpy broadcasting: floats rounded to the result
/// dtype, integers wrapping (division by zero is an error).
fn arith_kernel<T: Real>(op: Op, ins: &[&Val<T>], tys: &[&TensorType], out: &TensorType) -> Result<Val<T>, String> {
    let (sa, sb) = (&tys[0].shape, &tys[1].shape);
    let dt = out.dtype;
    Ok(match (ins[0], ins[1]) {
        (Val::F(a), Val::F(b)) => {
            let g: fn(T, T) -> T = match op {
                Op::Add => |x, y| x + y,
                Op::Sub => |x, y| x - y,
                Op::Mul => |x, y| x * y,
                Op::Div => |x, y| x / y,
                _ => |x, y| if y > x { y } else { x },
            };
            let v = binary(a, sa, b, sb, &out.shape, g);
            Val::F(if T::needs_rounding(dt) { v.into_iter().map(|x| x.round_to(dt)).collect() } else { v })
        }
        (Val::I(a), Val::I(b)) => {
            let mut div_by_zero = false;
            let v = binary(a, sa, b, sb, &out.shape, |x, y| match op {
                Op::Add => x.wrapping_add(y),
                Op::Sub => x.wrapping_sub(y),
                Op::Mul => x.wrapping_mul(y),
                Op::Div => x.checked_div(y).unwrap_or(0),
                _ => x.max(y),
            });
            if op == Op::Div {
                div_by_zero = binary(a, sa, b, sb, &out.shape, |_, y| (y == 0) as i64).contains(&1);
            }
            if div_by_zero {
                return Err("integer division by zero".into());
            }
            Val::I(v)
        }
        _ => return Err("operands must both be floating or both integer".into()),
    })
}

/// Per-row cross-entropy of `logits` (type `ty`, classes last) against `targets`, in f64.
fn cross_entropy_kernel<T: Real>(logits: &[T], targets: &[i64], ty: &TensorType, dt: DType) -> Result<Val<T>, String> {
    let v = *ty.shape.last().unwrap_or(&1);
    let mut y = Vec::with_capacity(targets.len());
    for (row, &t) in logits.chunks(v.max(1)).zip(targets) {
        if t < 0 || t as usize >= v {
            return Err(format!("target {t} is outside the {v} classes"));
        }
        let m = row.iter().fold(f64::NEG_INFINITY, |m, x| m.max(x.to_f64()));
        let lse = m + row.iter().map(|x| (x.to_f64() - m).exp()).sum::<f64>().ln();
        y.push(T::from_f64(lse - row[t as usize].to_f64()).round_to(dt));
    }
    Ok(Val::F(y))
}

/// `reduce_sum`, `reduce_mean`, `reduce_max` of `x` (type `ty`) over the `dims` attribute,
/// accumulated in f64 (floats) or wrapping i64.
fn reduce_kernel<T: Real>(op: Op, attrs: &Attrs, x_val: &Val<T>, ty: &TensorType, dt: DType) -> Result<Val<T>, String> {
    let x = ty;
    let dims = reduce_dims(attrs, x.rank())?;
    let count: usize = dims.iter().map(|&d| x.shape[d]).product();
    // Output stride of every input dim (0 for reduced dims).
    let kept: Vec<usize> = (0..x.rank()).filter(|d| !dims.contains(d)).map(|d| x.shape[d]).collect();
    let ks = strides(&kept);
    let mut k = 0;
    let step: Vec<usize> = (0..x.rank())
        .map(|d| {
            if dims.contains(&d) {
                0
            } else {
                k += 1;
                ks[k - 1]
            }
        })
        .collect();
    let offs = strided_offsets(&x.shape, &step);
    let n_out = numel(&kept);
    Ok(match x_val {
        Val::F(v) => {
            let init = if op == Op::ReduceMax { f64::NEG_INFINITY } else { 0.0 };
            let mut acc = vec![init; n_out];
            for (&o, &x) in offs.iter().zip(v.iter()) {
                let x = x.to_f64();
                acc[o] = if op == Op::ReduceMax {
                    if x > acc[o] || x.is_nan() {
                        x
                    } else {
                        acc[o]
                    }
                } else {
                    acc[o] + x
                };
            }
            if op == Op::ReduceMean {
                acc.iter_mut().for_each(|a| *a /= count as f64);
            }
            Val::F(acc.into_iter().map(|a| T::from_f64(a).round_to(dt)).collect())
        }
        Val::I(v) => {
            let mut acc = vec![if op == Op::ReduceMax { i64::MIN } else { 0 }; n_out];
            for (&o, &x) in offs.iter().zip(v.iter()) {
                acc[o] = if op == Op::ReduceMax { acc[o].max(x) } else { acc[o].wrapping_add(x) };
            }
            if op == Op::ReduceMean {
                acc.iter_mut().for_each(|a| *a /= count.max(1) as i64);
            }
            Val::I(acc)
        }
    })
}

/// Softmax over the last dim (causal: query i sees keys 0..=i + keys - queries), in f64.
fn softmax_kernel<T: Real>(x: &[T], attrs: &Attrs, out: &TensorType) -> Val<T> {
    let dt = out.dtype;
    let r = out.rank();
    let cols = out.shape[r - 1].max(1);
    let causal = attrs.bool_or("causal", false);
    let queries = if causal { out.shape[r - 2] } else { 1 };
    Val::F(par_fill(x.len(), cols, |start, part| {
        let mut row = vec![0.0f64; cols];
        for (k, ys) in part.chunks_mut(cols).enumerate() {
            let ri = start / cols + k;
            let xs = &x[ri * cols..(ri + 1) * cols];
            // Query i sees keys 0..=i + (keys - queries).
            let visible = if causal { (ri % queries) + (cols - queries) + 1 } else { cols };
            let m = xs[..visible].iter().fold(f64::NEG_INFINITY, |m, v| m.max(v.to_f64()));
            let mut sum = 0.0;
            for j in 0..visible {
                row[j] = (xs[j].to_f64() - m).exp();
                sum += row[j];
            }
            for j in 0..cols {
                ys[j] = if j < visible { T::from_f64(row[j] / sum).round_to(dt) } else { T::ZERO };
            }
        }
    }))
}

/// LayerNorm (with `beta`) or RMSNorm (without) over the last dim, statistics in f64.
fn norm_kernel<T: Real>(x: &[T], gamma: &[T], beta: Option<&[T]>, attrs: &Attrs, out: &TensorType) -> Val<T> {
    let dt = out.dtype;
    let eps = attrs.float("eps").unwrap_or(1e-5);
    let d = (*out.shape.last().unwrap_or(&1)).max(1);
    Val::F(par_fill(x.len(), d, |start, part| {
        for (k, ys) in part.chunks_mut(d).enumerate() {
            let xs = &x[start + k * d..start + (k + 1) * d];
            let n = d as f64;
            let (mean, var) = if beta.is_some() {
                let mean = xs.iter().map(|v| v.to_f64()).sum::<f64>() / n;
                (mean, xs.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / n)
            } else {
                (0.0, xs.iter().map(|v| v.to_f64().powi(2)).sum::<f64>() / n)
            };
            let inv = 1.0 / (var + eps).sqrt();
            for (j, (y, v)) in ys.iter_mut().zip(xs).enumerate() {
                let b = beta.map_or(0.0, |b| b[j].to_f64());
                *y = T::from_f64((v.to_f64() - mean) * inv * gamma[j].to_f64() + b).round_to(dt);
            }
        }
    }))
}

/// RoPE on `x[..., T, H, D]` at `positions` (the halves of D rotate as pairs).
fn rope_kernel<T: Real>(x: &[T], pos: &[i64], attrs: &Attrs, out: &TensorType) -> Val<T> {
    let dt = out.dtype;
    let r = out.rank();
    let (t, h, d) = (out.shape[r - 3], out.shape[r - 2], out.shape[r - 1]);
    let theta = attrs.float("theta").unwrap_or(10000.0);
    // The inverse rotation (the adjoint: rotations are orthogonal) turns by -angle.
    let sign = if attrs.bool_or("inverse", false) { -1.0 } else { 1.0 };
    let half = d / 2;
    let inv_freq: Vec<f64> = (0..half).map(|i| 1.0 / theta.powf((2 * i) as f64 / d as f64)).collect();
    let mut y = vec![T::ZERO; x.len()];
    for (bi, (xs, ys)) in x.chunks(d).zip(y.chunks_mut(d)).enumerate() {
        let p = sign * pos[(bi / h) % t] as f64;
        for i in 0..half {
            let (s, c) = (p * inv_freq[i]).sin_cos();
            let (x1, x2) = (xs[i].to_f64(), xs[i + half].to_f64());
            ys[i] = T::from_f64(x1 * c - x2 * s).round_to(dt);
            ys[i + half] = T::from_f64(x2 * c + x1 * s).round_to(dt);
        }
    }
    Val::F(y)
}

/// `x` placed at offset `before` along `dim` of a zero tensor of type `out`.
fn pad_kernel<T: Real>(v: &Val<T>, x: &TensorType, attrs: &Attrs, out: &TensorType) -> Result<Val<T>, String> {
    let dim = normalize_dim(attrs.int("dim").unwrap_or(0), x.rank())?;
    let os = strides(&out.shape);
    let base = attrs.int("before").unwrap_or(0) as usize * os[dim];
    let positions: Vec<usize> = strided_offsets(&x.shape, &os).into_iter().map(|o| o + base).collect();
    Ok(match v {
        Val::F(v) => {
            let mut y = vec![T::ZERO; out.numel()];
            positions.iter().zip(v).for_each(|(&o, &x)| y[o] = x);
            Val::F(y)
        }
        Val::I(v) => {
            let mut y = vec![0; out.numel()];
            positions.iter().zip(v).for_each(|(&o, &x)| y[o] = x);
            Val::I(y)
        }
    })
}

/// Concatenates `ins` along `dim` into a tensor of type `out`.
pub(crate) fn concat<T: Real>(ins: &[&Val<T>], tys: &[&TensorType], out: &TensorType, dim: usize) -> Val<T> {
    let os = strides(&out.shape);
    let mut positions: Vec<Vec<usize>> = Vec::new();
    let mut start = 0;
    for t in tys {
        positions.push(strided_offsets(&t.shape, &os).into_iter().map(|o| o + start * os[dim]).collect());
        start += t.shape[dim];
    }
    fn place<E: Copy + Default>(parts: Vec<&[E]>, positions: &[Vec<usize>], n: usize) -> Vec<E> {
        let mut y = vec![E::default(); n];
        for (p, pos) in parts.iter().zip(positions) {
            for (&v, &o) in p.iter().zip(pos) {
                y[o] = v;
            }
        }
        y
    }
    match ins[0] {
        Val::F(_) => Val::F(place(ins.iter().map(|v| v.floats()).collect(), &positions, out.numel())),
        Val::I(_) => Val::I(place(ins.iter().map(|v| v.ints()).collect(), &positions, out.numel())),
    }
}

fn matmul<T: Real>(a: &[T], ta: &TensorType, b: &[T], tb: &TensorType, out: &TensorType, attrs: &Attrs) -> Vec<T> {
    let (tra, trb) = (attrs.bool_or("transpose_a", false), attrs.bool_or("transpose_b", false));
    let (ra, rb, ro) = (ta.rank(), tb.rank(), out.rank());
    let (m, n) = (out.shape[ro - 2], out.shape[ro - 1]);
    let k = if tra { ta.shape[ra - 2] } else { ta.shape[ra - 1] };
    // Row and column strides of each matrix as stored, swapped when transposed.
    let (a_cols, b_cols) = (ta.shape[ra - 1], tb.shape[rb - 1]);
    let (rsa, csa) = if tra { (1, a_cols as isize) } else { (a_cols as isize, 1) };
    let (rsb, csb) = if trb { (1, b_cols as isize) } else { (b_cols as isize, 1) };
    let batch = &out.shape[..ro - 2];
    let a_mat = ta.shape[ra - 2] * ta.shape[ra - 1];
    let b_mat = tb.shape[rb - 2] * tb.shape[rb - 1];
    let a_off = broadcast_offsets(batch, &ta.shape[..ra - 2]);
    let b_off = broadcast_offsets(batch, &tb.shape[..rb - 2]);
    let mut c = vec![T::ZERO; out.numel()];
    let batches = numel(batch);
    let one = |bi: usize, cm: &mut [T]| {
        let (ao, bo) = (a_off[bi] * a_mat, b_off[bi] * b_mat);
        T::gemm(m, k, n, &a[ao..ao + a_mat], rsa, csa, &b[bo..bo + b_mat], rsb, csb, cm);
    };
    // Independent products of one batched matmul run on the host's cores; each output matrix is
    // written by exactly one thread with the same arithmetic, so results do not depend on it.
    let threads = worker_threads().min(batches);
    if threads > 1 && batches * m * n * k >= 1 << 18 {
        let per = batches.div_ceil(threads);
        std::thread::scope(|scope| {
            for (t, part) in c.chunks_mut(per * m * n).enumerate() {
                let one = &one;
                scope.spawn(move || {
                    for (j, cm) in part.chunks_mut((m * n).max(1)).enumerate() {
                        one(t * per + j, cm);
                    }
                });
            }
        });
    } else if worker_threads() > 1 && batches == 1 && m >= 64 && m * n * k >= 1 << 18 {
        // One large product: split its rows. Row i of C depends on row i of op(A) only, and the
        // sum over K runs in the same order in every split.
        let threads = worker_threads().min(m / 32);
        let rows = m.div_ceil(threads);
        let (ao, bo) = (a_off[0] * a_mat, b_off[0] * b_mat);
        std::thread::scope(|scope| {
            for (t, part) in c.chunks_mut(rows * n).enumerate() {
                let (a, b) = (&a[ao..ao + a_mat], &b[bo..bo + b_mat]);
                scope.spawn(move || {
                    let r0 = t * rows;
                    let mr = part.len() / n;
                    T::gemm(mr, k, n, &a[r0 * rsa as usize..], rsa, csa, b, rsb, csb, part);
                });
            }
        });
    } else {
        for (bi, cm) in c.chunks_mut((m * n).max(1)).enumerate().take(batches) {
            one(bi, cm);
        }
    }
    c
}
