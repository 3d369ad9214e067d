//! The host's matrix products: (batched, broadcasting) f32 GEMMs through the `gemm` crate
//! (`cargo bench --bench gemm` chose it over `matrixmultiply`, and measured it against
//! PyTorch's MKL and NumPy's OpenBLAS on the same shapes), on the rank's threads.
//!
//! - A batch of row blocks times one matrix (a linear layer on [batch, seq, d]) runs as one
//!   taller product: B is packed once and the rows split over the threads.
//! - Batched products (attention) split the batch entries over the threads; a few large
//!   products split their rows.
//! - Causal attention's products (`passes::causal` marks them) go in blocks of rows, each over
//!   only the terms (`causal_a`: A is zero above its diagonal) or result columns
//!   (`causal_out`: the entries above the diagonal are not needed, and are written as zeros)
//!   its rows need: about half of the attention GEMMs' work.

use shardc_ir::{Graph, Node};

/// Which part of a product causal attention's zeros let a GEMM skip, with the diagonal's
/// offset (columns - rows of the causal matrix).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Causal {
    None,
    /// The result's entries above the diagonal are not needed (written as zeros).
    Out(isize),
    /// A is zero above its diagonal: result row i needs terms 0..=i + off.
    A(isize),
    /// Stored A (used transposed) is zero above its diagonal: result row i needs terms
    /// i - off and later.
    ATransposed(isize),
}

/// Rows per block of a causal product. `cargo bench --bench gemm` on the small GPT's attention
/// shapes (2 threads): 64 is best or tied on the `causal_a` products (250-290 GFLOP/s of whole-
/// product FLOPs against 160-185 unblocked); 32, 64 and 128 are within this machine's noise on
/// `causal_out`.
pub const CAUSAL_BLOCK: usize = 64;

/// One f32 matrix product's geometry over row-major buffers.
#[derive(Clone, Debug)]
pub struct MatMul {
    /// Rows, columns and terms of each product.
    m: usize,
    n: usize,
    k: usize,
    /// Row and column strides of A and B (transposes are strides).
    rsa: isize,
    csa: isize,
    rsb: isize,
    csb: isize,
    /// Element offsets of each product's A and B.
    a_off: Vec<usize>,
    b_off: Vec<usize>,
    causal: Causal,
    /// Rows per causal block.
    pub block: usize,
}

impl MatMul {
    /// The product `matmul` node `node` of `g` computes.
    pub fn of(g: &Graph, node: &Node) -> Self {
        let (ta, tb, out) = (g.ty(node.inputs[0]), g.ty(node.inputs[1]), g.ty(node.output()));
        let causal = if node.attrs.bool_or("causal_a", false) {
            Some(true)
        } else if node.attrs.bool_or("causal_out", false) {
            Some(false)
        } else {
            None
        };
        MatMul::new(
            &ta.shape,
            &tb.shape,
            &out.shape,
            node.attrs.bool_or("transpose_a", false),
            node.attrs.bool_or("transpose_b", false),
            causal,
        )
    }

    /// A product of `a` by `b` (their stored shapes; the last two dims are matrices, leading
    /// dims broadcast) into `out`. `causal`: Some(true) for `causal_a`, Some(false) for
    /// `causal_out`.
    pub fn new(a: &[usize], b: &[usize], out: &[usize], tra: bool, trb: bool, causal: Option<bool>) -> Self {
        let (ra, rb, ro) = (a.len(), b.len(), out.len());
        let (mut m, n) = (out[ro - 2], out[ro - 1]);
        let k = if tra { a[ra - 2] } else { a[ra - 1] };
        let (a_cols, b_cols) = (a[ra - 1], b[rb - 1]);
        let (rsa, csa) = if tra { (1, a_cols as isize) } else { (a_cols as isize, 1) };
        let (rsb, csb) = if trb { (1, b_cols as isize) } else { (b_cols as isize, 1) };
        let mut batch = &out[..ro - 2];
        let causal = match causal {
            None => Causal::None,
            Some(true) => {
                // Stored A is [rows, cols] with zeros where col > row + (cols - rows).
                let off = a[ra - 1] as isize - a[ra - 2] as isize;
                if tra {
                    Causal::ATransposed(off)
                } else {
                    Causal::A(off)
                }
            }
            Some(false) => Causal::Out(n as isize - m as isize),
        };
        let mut a_batch = &a[..ra - 2];
        if rb == 2 && !tra && a_batch == batch && causal == Causal::None {
            m *= batch.iter().product::<usize>();
            batch = &[];
            a_batch = &[];
        }
        let (a_mat, b_mat) = (a[ra - 2] * a[ra - 1], b[rb - 2] * b[rb - 1]);
        let a_off = batch_offsets(batch, a_batch).into_iter().map(|o| o * a_mat).collect();
        let b_off = batch_offsets(batch, &b[..rb - 2]).into_iter().map(|o| o * b_mat).collect();
        MatMul { m, n, k, rsa, csa, rsb, csb, a_off, b_off, causal, block: CAUSAL_BLOCK }
    }

    /// Runs the product on `threads` threads.
    ///
    /// # Safety
    /// `a`, `b` and `c` point to buffers holding the operands' and the result's elements (the
    /// shapes given to [`MatMul::new`]); `c` overlaps neither operand.
    pub unsafe fn run(&self, a: *const f32, b: *const f32, c: *mut f32, threads: usize) {
        struct Ptrs(*const f32, *const f32, *mut f32);
        // SAFETY: threads write disjoint rows of the result.
        unsafe impl Sync for Ptrs {}
        let ptrs = Ptrs(a, b, c);
        let (m, nn, k) = (self.m, self.n, self.k);
        let clamp = |x: isize, hi: usize| x.clamp(0, hi as isize) as usize;
        // Rows r0..r0 + rows of batch entry `bi`, terms k0..k1, result columns 0..cols (the
        // columns cols..nn of those rows are zeroed).
        let call = |bi: usize, r0: usize, rows: usize, k0: usize, k1: usize, cols: usize| {
            let p = &ptrs;
            // SAFETY: rows r0..r0 + rows of batch entry `bi` of each operand and of the result,
            // terms k0..k1 <= k and columns <= nn lie inside their buffers (the caller's
            // contract), with the strides computed in `new`.
            unsafe {
                let c = p.2.add(bi * m * nn + r0 * nn);
                if k1 > k0 && cols > 0 {
                    gemm::gemm(
                        rows,
                        cols,
                        k1 - k0,
                        c,
                        1,
                        nn as isize,
                        false,
                        p.0.add(self.a_off[bi]).offset(r0 as isize * self.rsa + k0 as isize * self.csa),
                        self.csa,
                        self.rsa,
                        p.1.add(self.b_off[bi]).offset(k0 as isize * self.rsb),
                        self.csb,
                        self.rsb,
                        0.0f32,
                        1.0f32,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    )
                }
                let from = if k1 > k0 { cols } else { 0 };
                if from < nn {
                    for r in 0..rows {
                        std::slice::from_raw_parts_mut(c.add(r * nn + from), nn - from).fill(0.0);
                    }
                }
            }
        };
        let one = |bi: usize, r0: usize, rows: usize| {
            if self.causal == Causal::None {
                return call(bi, r0, rows, 0, k, nn);
            }
            for b0 in (r0..r0 + rows).step_by(self.block.max(1)) {
                let b1 = (b0 + self.block).min(r0 + rows);
                match self.causal {
                    Causal::Out(off) => call(bi, b0, b1 - b0, 0, k, clamp(b1 as isize + off, nn)),
                    Causal::A(off) => call(bi, b0, b1 - b0, 0, clamp(b1 as isize + off, k), nn),
                    Causal::ATransposed(off) => call(bi, b0, b1 - b0, clamp(b0 as isize - off, k), k, nn),
                    Causal::None => unreachable!("handled above"),
                }
            }
        };
        let batches = self.a_off.len();
        if m * nn == 0 {
            return;
        }
        use rayon::prelude::*;
        if threads > 1 && batches >= threads {
            let per = batches.div_ceil(threads);
            (0..threads).into_par_iter().for_each(|t| {
                for bi in t * per..((t + 1) * per).min(batches) {
                    one(bi, 0, m);
                }
            });
        } else if threads > 1 && m >= 64 * threads {
            // Few large products: each split by rows over the threads (`cargo bench --bench
            // gemm`: the library's own parallel split is slower on the narrow shapes).
            let rows = m.div_ceil(threads);
            for bi in 0..batches {
                (0..threads).into_par_iter().for_each(|t| {
                    let r0 = t * rows;
                    one(bi, r0, rows.min(m - r0));
                });
            }
        } else {
            for bi in 0..batches {
                one(bi, 0, m);
            }
        }
    }

    /// [`MatMul::run`] on slices; panics when a slice is shorter than its operand.
    pub fn run_slices(&self, a: &[f32], b: &[f32], c: &mut [f32], threads: usize) {
        let need = |offs: &[usize], rs: isize, cs: isize, rows: usize, cols: usize| {
            let last = rows.saturating_sub(1) * rs as usize + cols.saturating_sub(1) * cs as usize;
            offs.iter().max().copied().unwrap_or(0) + if rows * cols == 0 { 0 } else { last + 1 }
        };
        assert!(a.len() >= need(&self.a_off, self.rsa, self.csa, self.m, self.k), "A is too short");
        assert!(b.len() >= need(&self.b_off, self.rsb, self.csb, self.k, self.n), "B is too short");
        assert!(c.len() >= self.a_off.len() * self.m * self.n, "the result is too short");
        // SAFETY: the lengths are checked above; `c` is borrowed mutably, so it overlaps
        // neither operand.
        unsafe { self.run(a.as_ptr(), b.as_ptr(), c.as_mut_ptr(), threads) }
    }
}

/// Offsets (in elements) of each batch entry of `inp`'s batch dims broadcast to `out`'s.
fn batch_offsets(out: &[usize], inp: &[usize]) -> Vec<usize> {
    let pad = out.len() - inp.len();
    let total: usize = out.iter().product();
    let mut strides = vec![0usize; out.len()];
    let mut s = 1;
    for d in (0..inp.len()).rev() {
        strides[d + pad] = if inp[d] == 1 { 0 } else { s };
        s *= inp[d];
    }
    (0..total)
        .map(|mut i| {
            let mut off = 0;
            for d in (0..out.len()).rev() {
                off += (i % out[d]) * strides[d];
                i /= out[d];
            }
            off
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, s: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * s) % 13) as f32 * 0.05 - 0.3).collect()
    }

    /// Every causal form against the whole product, with blocks that do not divide the rows
    /// and with more keys than queries (the diagonal's offset), on 1 and 3 threads.
    #[test]
    fn causal_blocks_give_the_whole_products_entries() {
        for (h, tq, tk, d) in [(3usize, 70usize, 70usize, 9usize), (2, 40, 70, 5), (1, 1, 1, 1)] {
            let off = tk as isize - tq as isize;
            let visible = |r: usize, c: usize| (c as isize) <= r as isize + off;
            let mut probs = data(h * tq * tk, 3);
            for (i, x) in probs.iter_mut().enumerate() {
                if !visible((i / tk) % tq, i % tk) {
                    *x = 0.0;
                }
            }
            let (q, k, v, dq) = (data(h * tq * d, 7), data(h * tk * d, 5), data(h * tk * d, 11), data(h * tq * d, 2));
            // (A, its shape, B, its shape, result shape, transpose_a, transpose_b, causal_a?)
            type Case<'a> = (&'a [f32], [usize; 3], &'a [f32], [usize; 3], [usize; 3], bool, bool, bool);
            let cases: [Case; 3] = [
                (&q, [h, tq, d], &k, [h, tk, d], [h, tq, tk], false, true, false),
                (&probs, [h, tq, tk], &v, [h, tk, d], [h, tq, d], false, false, true),
                (&probs, [h, tq, tk], &dq, [h, tq, d], [h, tk, d], true, false, true),
            ];
            for (a, sa, b, sb, so, tra, trb, mark_a) in cases {
                let mut want = vec![0f32; so.iter().product()];
                MatMul::new(&sa, &sb, &so, tra, trb, None).run_slices(a, b, &mut want, 1);
                for (block, threads) in [(32, 1), (7, 3), (64, 2)] {
                    let mut p = MatMul::new(&sa, &sb, &so, tra, trb, Some(mark_a));
                    p.block = block;
                    let mut got = vec![f32::NAN; want.len()];
                    p.run_slices(a, b, &mut got, threads);
                    for (i, (&x, &y)) in got.iter().zip(&want).enumerate() {
                        let (r, c) = ((i / so[2]) % so[1], i % so[2]);
                        if mark_a || visible(r, c) {
                            assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{so:?} element {i}: {x} vs {y}");
                        } else {
                            assert!(x == 0.0 || (x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{so:?} element {i}: {x}");
                        }
                    }
                }
            }
        }
    }
}
