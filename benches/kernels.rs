//! Benchmark: the generated host kernels, per kernel family, in GB/s, against a plain Rust loop
//! computing the same thing and against this machine's measured copy bandwidth.
//!
//! `cargo bench --bench kernels` (or `scripts/bench_kernels.sh`). Each family is a small `.tir`
//! program that fusion turns into one kernel; codegen lowers it to host code, the runtime's
//! loader runs it. Bytes are what the kernel must move at least (every operand read once, every
//! result written once), f32, 4096 x 1024 unless said. Times are the best of several runs
//! (the machines are shared and noisy). The plain loop's results are checked against the
//! kernel's, so both do the same work.
//!
//! Columns: the kernel on 1 thread and on all cores; the plain loop on 1 thread (the fair
//! comparison of generated code with hand-written code is kernel-1T / loop-1T); copy bandwidth
//! (`copy_from_slice` moving the family's bytes, half read and half written, on all cores: the
//! kernel's ceiling at that working set, kernel-NT / copy-NT), and once for 512 MB (DRAM).

#[path = "../tests/common/adamw.rs"]
mod adamw;

use shardc_ir::{DType, Graph, Op};
use shardc_runtime::host_kernels::HostKernels;
use std::time::{Duration, Instant};

const R: usize = 4096;
const C: usize = 1024;

struct Rng(u64);
impl Rng {
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        lo + (hi - lo) * ((self.0 >> 40) as f32 / (1u64 << 24) as f32)
    }
}

enum Buf {
    F(Vec<f32>),
    I(Vec<i64>),
}

impl Buf {
    fn f(&self) -> &[f32] {
        match self {
            Buf::F(v) => v,
            Buf::I(_) => panic!("a float operand expected"),
        }
    }
    fn i(&self) -> &[i64] {
        match self {
            Buf::I(v) => v,
            Buf::F(_) => panic!("an integer operand expected"),
        }
    }
    fn ptr(&mut self) -> *mut u8 {
        match self {
            Buf::F(v) => v.as_mut_ptr() as *mut u8,
            Buf::I(v) => v.as_mut_ptr() as *mut u8,
        }
    }
    fn bytes(&self) -> usize {
        match self {
            Buf::F(v) => v.len() * 4,
            Buf::I(v) => v.len() * 8,
        }
    }
}

/// A plain Rust loop: operands (in the kernel's operand order) in, results out.
type Plain = fn(&[Buf], &mut [Vec<f32>]);

struct Family {
    name: &'static str,
    src: String,
    plain: Plain,
}

/// The best time of `f` over at least 3 runs and about half a second.
fn best(mut f: impl FnMut()) -> Duration {
    f();
    let (mut best, start, mut runs) = (Duration::MAX, Instant::now(), 0);
    while runs < 3 || (start.elapsed() < Duration::from_millis(500) && runs < 50) {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed());
        runs += 1;
    }
    best
}

fn gbps(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e9
}

fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044715 * x * x * x)).tanh())
}

fn rows_of(v: &mut [f32], c: usize) -> std::slice::ChunksMut<'_, f32> {
    v.chunks_mut(c)
}

fn families() -> Vec<Family> {
    let rc = format!("[{R}, {C}]");
    let adam_sizes = [4 * 1024 * 1024usize, 1024 * 1024, 3 * 1024 * 1024 + 7, 1024];
    let adam = adamw::multi_tensor_adamw(&adam_sizes);
    vec![
        Family {
            name: "elementwise (x * 0.5 + y)",
            src: format!(
                "graph ew\ninput %x: f32{rc}\ninput %y: f32{rc}\n%h: f32[] = full() {{dtype = f32, shape = [], value = 0.5}}\n\
                 %a: f32{rc} = mul(%x, %h)\n%o: f32{rc} = add(%a, %y)\noutput %o\n"
            ),
            plain: |i, o| {
                let (x, y) = (i[0].f(), i[1].f());
                for (k, v) in o[0].iter_mut().enumerate() {
                    *v = x[k] * 0.5 + y[k];
                }
            },
        },
        Family {
            name: "bias + GELU (tanh)",
            src: format!(
                "graph bg\ninput %x: f32{rc}\ninput %b: f32[{C}]\n%h: f32{rc} = add(%x, %b)\n\
                 %y: f32{rc} = gelu(%h) {{approximate = \"tanh\"}}\noutput %y\n"
            ),
            plain: |i, o| {
                let (x, b) = (i[0].f(), i[1].f());
                for (r, row) in rows_of(&mut o[0], C).enumerate() {
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = gelu(x[r * C + j] + b[j]);
                    }
                }
            },
        },
        Family {
            name: "SwiGLU (silu(g) * u)",
            src: format!(
                "graph sw\ninput %g: f32{rc}\ninput %u: f32{rc}\n%a: f32{rc} = silu(%g)\n%y: f32{rc} = mul(%a, %u)\noutput %y\n"
            ),
            plain: |i, o| {
                let (g, u) = (i[0].f(), i[1].f());
                for (k, v) in o[0].iter_mut().enumerate() {
                    *v = g[k] / (1.0 + (-g[k]).exp()) * u[k];
                }
            },
        },
        Family {
            name: "residual add + layer_norm",
            src: format!(
                "graph ln\ninput %x: f32{rc}\ninput %r: f32{rc}\ninput %g: f32[{C}]\ninput %b: f32[{C}]\n\
                 %s: f32{rc} = add(%x, %r)\n%y: f32{rc} = layer_norm(%s, %g, %b) {{eps = 1e-5}}\noutput %s, %y\n"
            ),
            plain: |i, o| {
                let (x, res, g, b) = (i[0].f(), i[1].f(), i[2].f(), i[3].f());
                let (s, y) = o.split_at_mut(1);
                for (r, (srow, yrow)) in s[0].chunks_mut(C).zip(y[0].chunks_mut(C)).enumerate() {
                    for j in 0..C {
                        srow[j] = x[r * C + j] + res[r * C + j];
                    }
                    let mean = srow.iter().sum::<f32>() / C as f32;
                    let var = srow.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / C as f32;
                    let rs = 1.0 / (var + 1e-5).sqrt();
                    for j in 0..C {
                        yrow[j] = (srow[j] - mean) * rs * g[j] + b[j];
                    }
                }
            },
        },
        Family {
            name: "rms_norm",
            src: format!(
                "graph rms\ninput %x: f32{rc}\ninput %g: f32[{C}]\n%y: f32{rc} = rms_norm(%x, %g) {{eps = 1e-6}}\noutput %y\n"
            ),
            plain: |i, o| {
                let (x, g) = (i[0].f(), i[1].f());
                for (r, row) in rows_of(&mut o[0], C).enumerate() {
                    let xs = &x[r * C..(r + 1) * C];
                    let rs = 1.0 / (xs.iter().map(|v| v * v).sum::<f32>() / C as f32 + 1e-6).sqrt();
                    for j in 0..C {
                        row[j] = xs[j] * rs * g[j];
                    }
                }
            },
        },
        Family {
            name: "causal softmax [4, 1024, 1024]",
            src: format!("graph sm\ninput %s: f32[4, {C}, {C}]\n%p: f32[4, {C}, {C}] = softmax(%s) {{causal = true}}\noutput %p\n"),
            plain: |i, o| {
                let s = i[0].f();
                for (r, row) in rows_of(&mut o[0], C).enumerate() {
                    let (xs, q) = (&s[r * C..(r + 1) * C], r % C);
                    let m = xs[..=q].iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                    let mut sum = 0.0;
                    for j in 0..=q {
                        row[j] = (xs[j] - m).exp();
                        sum += row[j];
                    }
                    for v in &mut row[..=q] {
                        *v /= sum;
                    }
                    row[q + 1..].fill(0.0);
                }
            },
        },
        Family {
            name: "cross-entropy (rows of 1024 logits)",
            src: format!("graph ce\ninput %x: f32{rc}\ninput %t: i64[{R}]\n%l: f32[{R}] = cross_entropy(%x, %t)\noutput %l\n"),
            plain: |i, o| {
                let (x, t) = (i[0].f(), i[1].i());
                for (r, v) in o[0].iter_mut().enumerate() {
                    let xs = &x[r * C..(r + 1) * C];
                    let m = xs.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                    let lse = m + xs.iter().map(|v| (v - m).exp()).sum::<f32>().ln();
                    *v = lse - xs[t[r] as usize];
                }
            },
        },
        Family {
            name: "RoPE [4096, 8, 128]",
            src: "graph rp\ninput %x: f32[4096, 8, 128]\ninput %pos: i64[4096]\n\
                  %y: f32[4096, 8, 128] = rope(%x, %pos) {inverse = false, theta = 10000.0}\noutput %y\n"
                .into(),
            plain: |i, o| {
                let (x, pos) = (i[0].f(), i[1].i());
                let (h, d) = (8, 128);
                let half = d / 2;
                // Angles in f64, as the kernel computes them (positions reach thousands of radians).
                let inv: Vec<f64> = (0..half).map(|k| 1.0 / 10000f64.powf((2 * k) as f64 / d as f64)).collect();
                for (bi, ys) in o[0].chunks_mut(d).enumerate() {
                    let xs = &x[bi * d..(bi + 1) * d];
                    let p = pos[bi / h] as f64;
                    for k in 0..half {
                        let (s, c) = (p * inv[k]).sin_cos();
                        let (s, c) = (s as f32, c as f32);
                        ys[k] = xs[k] * c - xs[k + half] * s;
                        ys[k + half] = xs[k + half] * c + xs[k] * s;
                    }
                }
            },
        },
        Family {
            name: "layer_norm backward (dx)",
            src: format!(
                "graph lnb\ninput %x: f32{rc}\ninput %g: f32[{C}]\ninput %dy: f32{rc}\n\
                 %dx: f32{rc} = layer_norm_grad(%x, %g, %dy) {{eps = 1e-5}}\noutput %dx\n"
            ),
            plain: |i, o| {
                let (x, g, dy) = (i[0].f(), i[1].f(), i[2].f());
                for (r, out) in rows_of(&mut o[0], C).enumerate() {
                    let (xs, ds) = (&x[r * C..(r + 1) * C], &dy[r * C..(r + 1) * C]);
                    let mean = xs.iter().sum::<f32>() / C as f32;
                    let var = xs.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / C as f32;
                    let rs = 1.0 / (var + 1e-5).sqrt();
                    let (mut mg, mut mgx) = (0.0f32, 0.0f32);
                    for j in 0..C {
                        mg += ds[j] * g[j];
                        mgx += ds[j] * g[j] * (xs[j] - mean) * rs;
                    }
                    let (mg, mgx) = (mg / C as f32, mgx / C as f32);
                    for j in 0..C {
                        out[j] = rs * (ds[j] * g[j] - mg - (xs[j] - mean) * rs * mgx);
                    }
                }
            },
        },
        Family {
            name: "bias gradient (column sums)",
            src: format!("graph bgr\ninput %dy: f32{rc}\n%db: f32[{C}] = reduce_sum(%dy) {{dims = [0]}}\noutput %db\n"),
            plain: |i, o| {
                let dy = i[0].f();
                o[0].fill(0.0);
                for row in dy.chunks(C) {
                    for (a, b) in o[0].iter_mut().zip(row) {
                        *a += b;
                    }
                }
            },
        },
        Family {
            name: "AdamW, multi-tensor (4 tensors, 8.4M elements)",
            src: adam,
            plain: |i, o| {
                let lr = i[0].f()[0];
                for k in 0..4 {
                    let (p, g, m, v) = (i[1 + 4 * k].f(), i[2 + 4 * k].f(), i[3 + 4 * k].f(), i[4 + 4 * k].f());
                    for e in 0..p.len() {
                        let m2 = m[e] * 0.9 + g[e] * 0.1;
                        let v2 = v[e] * 0.999 + g[e] * g[e] * 0.001;
                        o[3 * k][e] = p[e] - m2 / (v2.sqrt() + 1e-8) * lr;
                        o[3 * k + 1][e] = m2;
                        o[3 * k + 2][e] = v2;
                    }
                }
            },
        },
    ]
}

/// Copy bandwidth: `copy_from_slice` moving `bytes` (half read, half written) split over
/// `threads`: the same traffic as the kernel it is compared with, so caches count alike.
fn copy_bandwidth(bytes: usize, threads: usize) -> f64 {
    let n = bytes / 8;
    let src = vec![1.0f32; n];
    let mut dst = vec![0.0f32; n];
    let per = n.div_ceil(threads);
    let t = best(|| {
        std::thread::scope(|s| {
            for (d, c) in dst.chunks_mut(per).zip(src.chunks(per)) {
                s.spawn(move || d.copy_from_slice(c));
            }
        })
    });
    gbps(2 * n * 4, t)
}

fn main() {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let big = 512 << 20;
    println!("host kernels (generated through MLIR) vs a plain Rust loop, f32, on {threads} cores");
    println!(
        "copy bandwidth (512 MB moved): {:.1} GB/s on 1 thread, {:.1} GB/s on {threads}",
        copy_bandwidth(big, 1),
        copy_bandwidth(big, threads)
    );
    println!(
        "{:<46} {:>9} {:>10} {:>10} {:>10} {:>10} {:>7} {:>7}",
        "family",
        "MB moved",
        "kernel 1T",
        "loop 1T",
        format!("kernel {threads}T"),
        format!("copy {threads}T"),
        "k/loop",
        "k/copy"
    );
    let mut rng = Rng(0x2545F4914F6CDD1D);
    for fam in families() {
        let g = shardc_ir::text::parse(&fam.src).unwrap_or_else(|e| panic!("{}: {e}", fam.name));
        shardc_ir::verify::verify(&g).unwrap_or_else(|e| panic!("{}: {e}", fam.name));
        let (fused, _) = shardc_passes::fusion::fuse(&g);
        let kernels: Vec<&shardc_ir::Node> = fused.nodes.iter().filter(|n| n.op == Op::Fused).collect();
        assert_eq!(kernels.len(), 1, "{}: one kernel expected", fam.name);
        let (descs, so) = shardc_codegen::lower_host(&fused).unwrap_or_else(|e| panic!("{e}"));
        let desc = &descs[0];
        let lib = HostKernels::load(&so, &[(desc.name.as_str(), desc.inputs.len() + desc.outputs.len())]).unwrap();
        let body: &Graph = kernels[0].body.as_deref().unwrap();
        // Operands and results in the source program's order (what the plain loops take); the
        // kernel's own order is found by name.
        let mut inputs: Vec<Buf> = g
            .args
            .iter()
            .map(|a| {
                let ty = g.ty(a.value);
                match ty.dtype {
                    DType::I64 => Buf::I((0..ty.numel()).map(|k| (k * 7919 % C) as i64).collect()),
                    _ if ty.numel() == 1 => Buf::F(vec![1e-3]),
                    _ => Buf::F((0..ty.numel()).map(|_| rng.uniform(0.0, 2.0)).collect()),
                }
            })
            .collect();
        let mut outputs: Vec<Buf> = g.output_values().map(|v| Buf::F(vec![0.0; g.ty(v).numel()])).collect();
        let bytes: usize = inputs.iter().chain(&outputs).map(Buf::bytes).sum();
        let position = |names: Vec<&str>, name: &str| {
            names.iter().position(|n| *n == name).unwrap_or_else(|| panic!("{}: no %{name}", fam.name))
        };
        let arg_names = || g.args.iter().map(|a| g.name_of(a.value)).collect::<Vec<_>>();
        let out_names = || g.output_values().map(|v| g.name_of(v)).collect::<Vec<_>>();
        let in_ptrs: Vec<*mut u8> = inputs.iter_mut().map(Buf::ptr).collect();
        let out_ptrs: Vec<*mut u8> = outputs.iter_mut().map(Buf::ptr).collect();
        let ptrs: Vec<*mut u8> = body
            .args
            .iter()
            .map(|a| in_ptrs[position(arg_names(), body.name_of(a.value))])
            .chain(body.output_values().map(|v| out_ptrs[position(out_names(), body.name_of(v))]))
            .collect();
        let run = |t: usize| {
            // SAFETY: the buffers have the sizes and dtypes of the kernel's operands and results.
            best(|| unsafe { lib.run(&desc.name, desc.work_items, &ptrs, t) }.expect("the kernel runs"))
        };
        let (k1, kn) = (run(1), run(threads));
        drop(ptrs);
        let mut plain_out: Vec<Vec<f32>> = g.output_values().map(|v| vec![0.0; g.ty(v).numel()]).collect();
        let loop1 = best(|| (fam.plain)(&inputs, &mut plain_out));
        for (k, (got, want)) in outputs.iter().zip(&plain_out).enumerate() {
            // Both sides are f32, summing rows in different orders (the kernel's row loops
            // reassociate): 1e-5 absolute + 1e-3 relative.
            let worst = got.f().iter().zip(want).map(|(a, b)| (a - b).abs() / (1e-2 + b.abs())).fold(0.0f32, f32::max);
            assert!(worst < 1e-3, "{}: result {k} of the plain loop differs from the kernel's ({worst:e})", fam.name);
        }
        let copy_n = copy_bandwidth(bytes, threads);
        println!(
            "{:<46} {:>9.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>7.2} {:>7.2}",
            fam.name,
            bytes as f64 / 1e6,
            gbps(bytes, k1),
            gbps(bytes, loop1),
            gbps(bytes, kn),
            copy_n,
            loop1.as_secs_f64() / k1.as_secs_f64(),
            gbps(bytes, kn) / copy_n
        );
    }
    println!(
        "(GB/s of the bytes each family must move; copy: the same bytes copied; k/loop: kernel 1T over loop 1T; \
         k/copy: kernel {threads}T over copy {threads}T)"
    );
}
