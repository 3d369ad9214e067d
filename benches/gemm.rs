//! Benchmark: f32 GEMM libraries for the host engine, on the shapes of a small GPT's training
//! step (`cargo bench --bench gemm`): `matrixmultiply` (what the reference interpreter uses)
//! and the `gemm` crate, on one thread and on all cores, best of 10 runs, in GFLOP/s.
//! The host engine uses `gemm` (runtime/src/exec.rs): equal or faster than `matrixmultiply` on
//! every shape here on one thread (measured 99-114 against 91-108 GFLOP/s on this project's
//! 2-core EPYC). Its own multi-core split is slower than one thread on the narrow shapes
//! (1024 x 512 x 128: 99 against 114), so the engine splits rows over threads itself.
//! PyTorch's MKL and NumPy's OpenBLAS on the same shapes: `scripts/bench_gemm_peers.py` (run by
//! `scripts/bench_train.sh`; 192-206 and 204-210 GFLOP/s on 2 threads in one run
//! here, the `gemm` crate 198-224).
//!
//! Second table: causal attention's products through the host engine's GEMM
//! (`shardc_runtime::matmul`), whole against causal blocks of 32, 64 and 128 rows, in
//! GFLOP/s of the whole product's FLOPs (what the step would do without the marks).

use std::time::Instant;

fn best(mut f: impl FnMut()) -> f64 {
    f();
    let mut b = f64::MAX;
    for _ in 0..10 {
        let t = Instant::now();
        f();
        b = b.min(t.elapsed().as_secs_f64());
    }
    b
}

fn main() {
    libraries();
    causal();
}

fn causal() {
    use shardc_runtime::matmul::MatMul;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // The small GPT's attention: 8 sequences x 6 heads, 256 positions, head dim 64.
    let (h, t, d) = (48usize, 256usize, 64usize);
    let data = |n: usize, s: usize| -> Vec<f32> { (0..n).map(|i| ((i * s) % 13) as f32 * 0.05 - 0.3).collect() };
    let (q, kk) = (data(h * t * d, 7), data(h * t * d, 5));
    let mut probs = data(h * t * t, 3);
    for (i, x) in probs.iter_mut().enumerate() {
        let (r, c) = ((i / t) % t, i % t);
        if c > r {
            *x = 0.0;
        }
    }
    // (name, A, A shape, B, B shape, out shape, transpose_a, transpose_b, mark)
    type Case<'a> = (&'a str, &'a [f32], [usize; 3], &'a [f32], [usize; 3], [usize; 3], bool, bool, bool);
    let cases: [Case; 3] = [
        ("scores q @ k^T (causal_out)", &q, [h, t, d], &kk, [h, t, d], [h, t, t], false, true, false),
        ("context p @ v (causal_a)", &probs, [h, t, t], &kk, [h, t, d], [h, t, d], false, false, true),
        ("dk ds^T @ q (causal_a, A^T)", &probs, [h, t, t], &q, [h, t, d], [h, t, d], true, false, true),
    ];
    println!();
    println!("causal attention products, {h} x {t} x {t} x {d}, GFLOP/s of the whole product (best of 10), {threads} threads");
    println!("{:>30} {:>8} {:>8} {:>8} {:>8}", "product", "whole", "block 32", "block 64", "block 128");
    for (name, a, sa, b, sb, so, tra, trb, mark_a) in cases {
        let flops = 2.0 * (h * t * t * d) as f64;
        let whole = MatMul::new(&sa, &sb, &so, tra, trb, None);
        let mut want = vec![0f32; so.iter().product()];
        let tw = best(|| whole.run_slices(a, b, &mut want, threads));
        let mut row = format!("{name:>30} {:>8.1}", flops / tw / 1e9);
        for block in [32, 64, 128] {
            let mut p = MatMul::new(&sa, &sb, &so, tra, trb, Some(mark_a));
            p.block = block;
            let mut got = vec![f32::NAN; want.len()];
            let tc = best(|| p.run_slices(a, b, &mut got, threads));
            for (i, (&x, &y)) in got.iter().zip(&want).enumerate() {
                let (r, c) = ((i / so[2]) % so[1], i % so[2]);
                let needed = mark_a || c <= r;
                assert!(
                    !needed || (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                    "{name}, block {block}: element {i} {x} vs {y}"
                );
                assert!(
                    needed || x == 0.0 || (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                    "{name}: element {i} above the diagonal is {x}"
                );
            }
            row += &format!(" {:>8.1}", flops / tc / 1e9);
        }
        println!("{row}");
    }
}

fn libraries() {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // (m, k, n): the bundled model (B*T = 1024 rows, d = 128, MLP 512, vocabulary 256) and the
    // small GPT of the CPU benchmark (B*T = 2048, d = 384, MLP 1536).
    let shapes = [
        (1024usize, 128usize, 512usize),
        (1024, 512, 128),
        (1024, 128, 128),
        (1024, 128, 256),
        (2048, 384, 1536),
        (2048, 1536, 384),
        (2048, 384, 384),
        (128, 32, 128),
    ];
    println!("f32 GEMM, GFLOP/s (best of 10), {threads} cores");
    println!(
        "{:>18} {:>16} {:>10} {:>10} {:>10}",
        "m x k x n",
        "matrixmultiply 1T",
        "gemm 1T",
        format!("gemm {threads}T"),
        format!("engine {threads}T")
    );
    for &(m, k, n) in &shapes {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut c = vec![0f32; m * n];
        let mut c2 = vec![0f32; m * n];
        let flops = 2.0 * (m * n * k) as f64;
        // SAFETY: the pointers and strides describe the dense row-major matrices above.
        let t_mm = best(|| unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                n,
                1.0,
                a.as_ptr(),
                k as isize,
                1,
                b.as_ptr(),
                n as isize,
                1,
                0.0,
                c.as_mut_ptr(),
                n as isize,
                1,
            )
        });
        let mut gemm_at = |par: gemm::Parallelism| {
            // SAFETY: as above.
            best(|| unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    c2.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    1,
                    k as isize,
                    b.as_ptr(),
                    1,
                    n as isize,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    par,
                )
            })
        };
        let (g1, gn) = (gemm_at(gemm::Parallelism::None), gemm_at(gemm::Parallelism::Rayon(threads)));
        let worst = c.iter().zip(&c2).map(|(x, y)| (x - y).abs() / (1.0 + x.abs())).fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "the two libraries disagree ({worst})");
        // The host engine's own split (runtime::matmul: rows over the threads).
        let engine = shardc_runtime::matmul::MatMul::new(&[m, k], &[k, n], &[m, n], false, false, None);
        let te = best(|| engine.run_slices(&a, &b, &mut c2, threads));
        println!(
            "{:>18} {:>16.1} {:>10.1} {:>10.1} {:>10.1}",
            format!("{m} x {k} x {n}"),
            flops / t_mm / 1e9,
            flops / g1 / 1e9,
            flops / gn / 1e9,
            flops / te / 1e9
        );
    }
}
