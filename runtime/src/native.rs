//! Host code for the ops of a step that codegen does not turn into kernels: reductions whose
//! result is not a row statistic (a parameter's sum of squares for clipping, a bias gradient
//! over leading dims), norm weight gradients (`layer_norm_gamma_grad`, `rms_norm_gamma_grad`),
//! and embedding lookups and their gradients. f32 only; other dtypes, and reductions over
//! dims that are not adjacent, run through the interpreter's kernel as before
//! ([`handles`] says which).
//!
//! Before this module these ran through the reference interpreter (f64, one element at a
//! time) and took 13% of the small GPT's step. Here they accumulate in f32 with 16
//! independent partial sums per row (a loop LLVM vectorizes; the interpreter's f64 sums are
//! the oracle they are tested against to 1e-4), split over the rank's threads.

use rayon::prelude::*;
use shardc_ir::{DType, Graph, Node, Op};

/// Does [`run`] execute `n`?
pub(crate) fn handles(g: &Graph, n: &Node) -> bool {
    let f32s = |vs: &[shardc_ir::ValueId]| vs.iter().all(|&v| g.ty(v).dtype == DType::F32);
    let int = |v: shardc_ir::ValueId| matches!(g.ty(v).dtype, DType::I32 | DType::I64);
    if n.outputs.len() != 1 || !f32s(&n.outputs) {
        return false;
    }
    match n.op {
        Op::ReduceSum | Op::ReduceMean | Op::ReduceMax => f32s(&n.inputs) && reduce_view(g, n).is_some(),
        Op::LayerNormGammaGrad | Op::RmsNormGammaGrad => f32s(&n.inputs),
        Op::Embedding => g.ty(n.inputs[0]).dtype == DType::F32 && int(n.inputs[1]),
        Op::EmbeddingGrad => int(n.inputs[0]) && g.ty(n.inputs[1]).dtype == DType::F32,
        _ => false,
    }
}

/// A reduction as [outer, reduced, inner] over the operand's row-major layout (the reduced
/// dims adjacent), or None.
fn reduce_view(g: &Graph, n: &Node) -> Option<(usize, usize, usize)> {
    let x = g.ty(n.inputs[0]);
    let dims = shardc_ir::ops::reduce_dims(&n.attrs, x.rank()).ok()?;
    if dims.is_empty() {
        return Some((x.numel(), 1, 1));
    }
    let (a, b) = (dims[0], dims[dims.len() - 1]);
    if b - a + 1 != dims.len() {
        return None;
    }
    let p = |r: std::ops::Range<usize>| x.shape[r].iter().product::<usize>();
    Some((p(0..a), p(a..b + 1), p(b + 1..x.rank())))
}

/// Operands as bytes of the arena (f32 ones 4-byte aligned) and the result's bytes.
pub(crate) struct Buffers<'a> {
    pub ins: Vec<&'a [u8]>,
    pub out: &'a mut [u8],
}

pub(crate) fn f32s(b: &[u8]) -> &[f32] {
    // SAFETY: arena values of f32 type start at 64-byte aligned offsets (the memory plan);
    // any bit pattern is an f32.
    let (pre, mid, post) = unsafe { b.align_to::<f32>() };
    assert!(pre.is_empty() && post.is_empty(), "an f32 value is not 4-byte aligned in the arena");
    mid
}

pub(crate) fn f32s_mut(b: &mut [u8]) -> &mut [f32] {
    // SAFETY: as for `f32s`.
    let (pre, mid, post) = unsafe { b.align_to_mut::<f32>() };
    assert!(pre.is_empty() && post.is_empty(), "an f32 value is not 4-byte aligned in the arena");
    mid
}

/// Integer ids (i32 or i64) as indices into `rows` rows; an id outside them is an error.
fn ids(dt: DType, b: &[u8], rows: usize) -> Result<Vec<usize>, String> {
    let check = |id: i64| {
        usize::try_from(id)
            .ok()
            .filter(|&i| i < rows)
            .ok_or_else(|| format!("id {id} is outside the table's {rows} rows"))
    };
    match dt {
        DType::I32 => b.chunks_exact(4).map(|c| check(i32::from_ne_bytes(c.try_into().expect("4")) as i64)).collect(),
        _ => b.chunks_exact(8).map(|c| check(i64::from_ne_bytes(c.try_into().expect("8")))).collect(),
    }
}

/// Runs `n` (one [`handles`] accepts) with `threads` threads.
pub(crate) fn run(g: &Graph, n: &Node, bufs: Buffers<'_>, threads: usize) -> Result<(), String> {
    let out = f32s_mut(bufs.out);
    match n.op {
        Op::ReduceSum | Op::ReduceMean | Op::ReduceMax => {
            let (outer, red, inner) = reduce_view(g, n).ok_or("reduced dims are not adjacent")?;
            reduce(n.op, f32s(bufs.ins[0]), outer, red, inner, out, threads);
        }
        Op::LayerNormGammaGrad | Op::RmsNormGammaGrad => {
            let eps = n.attrs.float("eps").unwrap_or(1e-5) as f32;
            gamma_grad(f32s(bufs.ins[0]), f32s(bufs.ins[1]), eps, n.op == Op::LayerNormGammaGrad, out, threads);
        }
        Op::Embedding => {
            let t = g.ty(n.inputs[0]);
            let (rows, d) = (t.shape[0], t.shape[1]);
            let ids = ids(g.ty(n.inputs[1]).dtype, bufs.ins[1], rows)?;
            let table = f32s(bufs.ins[0]);
            out.par_chunks_mut(d.max(1)).zip(ids.par_iter()).for_each(|(row, &id)| {
                row.copy_from_slice(&table[id * d..(id + 1) * d]);
            });
        }
        Op::EmbeddingGrad => {
            let t = g.ty(n.output());
            let (rows, d) = (t.shape[0], t.shape[1]);
            let ids = ids(g.ty(n.inputs[0]).dtype, bufs.ins[0], rows)?;
            embedding_grad(&ids, f32s(bufs.ins[1]), d, out, threads);
        }
        op => return Err(format!("`{}` has no host implementation", op.name())),
    }
    Ok(())
}

const LANES: usize = 16;

/// The sum of `x` with 16 partial sums (vectorized), then a tree over the lanes.
fn sum(x: &[f32]) -> f32 {
    sum_of(x, |v| v)
}

/// The sum of `f` over `x`, as [`sum`] adds.
fn sum_of(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    let mut s = chunks.remainder().iter().map(|&v| f(v)).sum::<f32>();
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            acc[i] += acc[i + w];
        }
    }
    s += acc[0];
    s
}

/// The larger of two values; NaN wins, as in the interpreter.
fn max2(m: f32, v: f32) -> f32 {
    if v > m || v.is_nan() && !m.is_nan() {
        v
    } else {
        m
    }
}

fn max(x: &[f32]) -> f32 {
    x.iter().fold(f32::NEG_INFINITY, |m, &v| max2(m, v))
}

fn reduce(op: Op, x: &[f32], outer: usize, red: usize, inner: usize, out: &mut [f32], threads: usize) {
    let finish = |s: f32| if op == Op::ReduceMean { s / red as f32 } else { s };
    let fold = |c: &[f32]| if op == Op::ReduceMax { max(c) } else { sum(c) };
    if inner == 1 && outer < threads && red >= 1 << 16 {
        // Few long rows (a whole parameter's sum of squares): each split over the threads.
        for (o, y) in out.iter_mut().enumerate() {
            let row = &x[o * red..(o + 1) * red];
            let part = red.div_ceil(threads);
            let parts: Vec<f32> = row.par_chunks(part).map(fold).collect();
            *y = finish(fold(&parts));
        }
    } else if inner == 1 {
        let per = outer.div_ceil(threads.max(1)).max(1);
        out.par_chunks_mut(per).enumerate().for_each(|(t, ys)| {
            for (k, y) in ys.iter_mut().enumerate() {
                let o = t * per + k;
                let row = &x[o * red..(o + 1) * red];
                *y = finish(fold(row));
            }
        });
    } else {
        // Column sums: each output row accumulates `red` rows of `inner` contiguous values;
        // split over outer rows, or over column blocks when there are few.
        let block = if outer >= threads { inner } else { inner.div_ceil(threads).next_multiple_of(LANES) };
        out.par_chunks_mut(inner).enumerate().for_each(|(o, ys)| {
            ys.par_chunks_mut(block).enumerate().for_each(|(b, ys)| {
                let c0 = b * block;
                let init = if op == Op::ReduceMax { f32::NEG_INFINITY } else { 0.0 };
                ys.fill(init);
                for r in 0..red {
                    let row = &x[(o * red + r) * inner + c0..][..ys.len()];
                    if op == Op::ReduceMax {
                        for (y, &v) in ys.iter_mut().zip(row) {
                            *y = max2(*y, v);
                        }
                    } else {
                        for (y, &v) in ys.iter_mut().zip(row) {
                            *y += v;
                        }
                    }
                }
                ys.iter_mut().for_each(|y| *y = finish(*y));
            });
        });
    }
}

/// d gamma = sum over rows of dy * xhat, xhat = (x - mean) * rstd (mean 0 for rms_norm):
/// rows split over the threads, each with its own partial sums, added at the end.
fn gamma_grad(x: &[f32], dy: &[f32], eps: f32, centered: bool, out: &mut [f32], threads: usize) {
    let d = out.len().max(1);
    let rows = x.len() / d;
    let per = rows.div_ceil(threads.max(1)).max(1);
    let parts: Vec<Vec<f32>> = (0..rows.div_ceil(per))
        .into_par_iter()
        .map(|t| {
            let mut acc = vec![0f32; d];
            for r in t * per..((t + 1) * per).min(rows) {
                let (xs, ds) = (&x[r * d..(r + 1) * d], &dy[r * d..(r + 1) * d]);
                let mean = if centered { sum(xs) / d as f32 } else { 0.0 };
                let var = sum_of(xs, |v| (v - mean) * (v - mean)) / d as f32;
                let rstd = 1.0 / (var + eps).sqrt();
                for ((a, &v), &g) in acc.iter_mut().zip(xs).zip(ds) {
                    *a += g * (v - mean) * rstd;
                }
            }
            acc
        })
        .collect();
    out.fill(0.0);
    for p in &parts {
        for (y, &v) in out.iter_mut().zip(p) {
            *y += v;
        }
    }
}

/// A [rows, d] table of the rows of `dy` added at `ids`; columns split over the threads so
/// that no two threads add into one element.
fn embedding_grad(ids: &[usize], dy: &[f32], d: usize, out: &mut [f32], threads: usize) {
    out.fill(0.0);
    let block = d.div_ceil(threads.max(1)).next_multiple_of(LANES).min(d.max(1));
    struct Out(*mut f32);
    // SAFETY: each task writes only columns c0..c0 + block of every row, disjoint from the others.
    unsafe impl Sync for Out {}
    let o = Out(out.as_mut_ptr());
    (0..d.div_ceil(block)).into_par_iter().for_each(|b| {
        let o = &o;
        let (c0, c1) = (b * block, ((b + 1) * block).min(d));
        for (k, &id) in ids.iter().enumerate() {
            let src = &dy[k * d + c0..k * d + c1];
            // SAFETY: row `id` < rows (checked in `ids`), columns c0..c1 < d, this task's own.
            let dst = unsafe { std::slice::from_raw_parts_mut(o.0.add(id * d + c0), c1 - c0) };
            for (y, &v) in dst.iter_mut().zip(src) {
                *y += v;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    fn close(a: &[f32], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
            assert!((x as f64 - y).abs() <= 1e-4 * (1.0 + y.abs()), "element {i}: {x} against {y}");
        }
    }

    #[test]
    fn reductions_match_f64_sums_in_every_layout() {
        // (outer, reduced, inner) x threads: rows, a whole tensor split over threads,
        // column sums with many and with few output rows, odd sizes.
        for &(outer, red, inner) in &[(7, 33, 1), (1, 70_001, 1), (1, 1, 1), (3, 5, 37), (1, 130, 29), (64, 4, 1)] {
            for threads in [1, 2, 3] {
                let x = data(outer * red * inner, 7);
                for op in [Op::ReduceSum, Op::ReduceMean, Op::ReduceMax] {
                    let mut out = vec![0f32; outer * inner];
                    reduce(op, &x, outer, red, inner, &mut out, threads);
                    let want: Vec<f64> = (0..outer * inner)
                        .map(|k| {
                            let (o, i) = (k / inner, k % inner);
                            let vals = (0..red).map(|r| x[(o * red + r) * inner + i] as f64);
                            match op {
                                Op::ReduceMax => vals.fold(f64::NEG_INFINITY, f64::max),
                                Op::ReduceMean => vals.sum::<f64>() / red as f64,
                                _ => vals.sum(),
                            }
                        })
                        .collect();
                    close(&out, &want);
                }
            }
        }
        let mut out = [0f32];
        reduce(Op::ReduceMax, &[1.0, f32::NAN, 3.0], 1, 3, 1, &mut out, 1);
        assert!(out[0].is_nan(), "NaN propagates through max, as in the interpreter");
    }

    #[test]
    fn norm_weight_gradients_match_f64() {
        let (rows, d) = (37, 48);
        let (x, dy) = (data(rows * d, 1), data(rows * d, 2));
        for centered in [true, false] {
            for threads in [1, 2, 5] {
                let mut out = vec![0f32; d];
                gamma_grad(&x, &dy, 1e-5, centered, &mut out, threads);
                let mut want = vec![0f64; d];
                for r in 0..rows {
                    let xs: Vec<f64> = x[r * d..(r + 1) * d].iter().map(|&v| v as f64).collect();
                    let mean = if centered { xs.iter().sum::<f64>() / d as f64 } else { 0.0 };
                    let var = xs.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
                    let rstd = 1.0 / (var + 1e-5).sqrt();
                    for j in 0..d {
                        want[j] += dy[r * d + j] as f64 * (xs[j] - mean) * rstd;
                    }
                }
                close(&out, &want);
            }
        }
    }

    #[test]
    fn embedding_gradients_add_repeated_ids() {
        let (rows, d) = (5, 40);
        let ids = [3usize, 0, 3, 3, 4];
        let dy = data(ids.len() * d, 3);
        for threads in [1, 2, 3] {
            let mut out = vec![1f32; rows * d];
            embedding_grad(&ids, &dy, d, &mut out, threads);
            let mut want = vec![0f64; rows * d];
            for (k, &id) in ids.iter().enumerate() {
                for j in 0..d {
                    want[id * d + j] += dy[k * d + j] as f64;
                }
            }
            close(&out, &want);
        }
        let bad = 9i64.to_ne_bytes();
        assert_eq!(ids_of(&bad), Err("id 9 is outside the table's 5 rows".to_string()));
        fn ids_of(b: &[u8]) -> Result<Vec<usize>, String> {
            super::ids(DType::I64, b, 5)
        }
    }
}
