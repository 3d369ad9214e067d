//! Benchmark: f32 GEMM libraries for the host engine, on the shapes of a small GPT's training
//! step (`cargo bench --bench gemm`): `matrixmultiply` (what the reference interpreter uses)
//! and the `gemm` crate, on one thread and on all cores, best of 10 runs, in GFLOP/s.
//! The host engine uses `gemm` (runtime/src/exec.rs): equal or faster than `matrixmultiply` on
//! every shape here on one thread (measured 99-114 against 91-108 GFLOP/s on this project's
//! 2-core EPYC). Its own multi-core split is slower than one thread on the narrow shapes
//! (1024 x 512 x 128: 99 against 114), so the engine splits rows over threads itself.
//! OpenBLAS (Debian's) is not measured yet.

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
    println!("{:>18} {:>16} {:>10} {:>10}", "m x k x n", "matrixmultiply 1T", "gemm 1T", format!("gemm {threads}T"));
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
        println!(
            "{:>18} {:>16.1} {:>10.1} {:>10.1}",
            format!("{m} x {k} x {n}"),
            flops / t_mm / 1e9,
            flops / g1 / 1e9,
            flops / gn / 1e9
        );
    }
}
