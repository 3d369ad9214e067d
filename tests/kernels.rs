//! Every kernel family, fused and host-lowered through MLIR, against the reference interpreter
//! (run in f64 on the kernel's body) on random inputs: sizes that divide no tile (1, 7, 97,
//! 1000, 4097 rows and columns), f32 and bf16, forward and backward.
//!
//! Tolerances, per family, as |got - want| <= atol + rtol |want|:
//! - f32, elementwise (flat and broadcast): 2e-6 + 2e-5 |want| (f32 arithmetic and libm vs
//!   f64);
//! - f32, row-wise (norms, softmax, cross-entropy, reductions): 1e-5 + 1e-4 |want| (sums of
//!   up to 4097 terms accumulated serially in f32);
//! - bf16: 2e-2 + 2e-2 |want| for one op, 6e-2 for chains and reductions. Both sides round to
//!   bf16 after every op; an f32 result on the other side of a rounding boundary is one bf16
//!   ulp (2^-8 relative) away, and chains carry such flips on.

mod common;
use shardc_ir::interp::{run, Precision};
use shardc_ir::{DType, Data, Graph, Op, Tensor};
use std::collections::HashMap;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * (self.next() as f32 / (1u64 << 31) as f32)
    }
}

#[derive(Clone, Copy)]
struct Tol {
    atol: f64,
    rtol: f64,
}

const EW: Tol = Tol { atol: 2e-6, rtol: 2e-5 };
const ROW: Tol = Tol { atol: 1e-5, rtol: 1e-4 };
const BF16_ONE: Tol = Tol { atol: 2e-2, rtol: 2e-2 };
const BF16_CHAIN: Tol = Tol { atol: 6e-2, rtol: 6e-2 };

/// A buffer in the dtype the kernel reads.
enum Buf {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
    I64(Vec<i64>),
}

impl Buf {
    fn ptr(&mut self) -> *mut u8 {
        match self {
            Buf::F32(v) => v.as_mut_ptr() as *mut u8,
            Buf::Bf16(v) => v.as_mut_ptr() as *mut u8,
            Buf::I64(v) => v.as_mut_ptr() as *mut u8,
        }
    }
    fn floats(&self) -> Vec<f64> {
        match self {
            Buf::F32(v) => v.iter().map(|&x| x as f64).collect(),
            Buf::Bf16(v) => v.iter().map(|&b| half::bf16::from_bits(b).to_f64()).collect(),
            Buf::I64(v) => v.iter().map(|&x| x as f64).collect(),
        }
    }
}

/// Fuses `src`, lowers its kernels to host code and checks each against the interpreter.
/// `int_range(name)` bounds integer operands (targets, positions). Returns the kernels' forms.
fn check(src: &str, tol: Tol, int_range: impl Fn(&str) -> i64, seed: u64) -> Vec<String> {
    check_with(src, tol, int_range, |_| (-2.0, 2.0), seed)
}

/// [`check`] with `float_range(name)` bounding each floating operand.
fn check_with(
    src: &str,
    tol: Tol,
    int_range: impl Fn(&str) -> i64,
    float_range: impl Fn(&str) -> (f32, f32),
    seed: u64,
) -> Vec<String> {
    let g = shardc_ir::text::parse(src).unwrap_or_else(|e| panic!("{e}\n{src}"));
    shardc_ir::verify::verify(&g).unwrap_or_else(|e| panic!("{e}\n{src}"));
    let (fused, _) = shardc_passes::fusion::fuse(&g);
    let kernels: Vec<&shardc_ir::Node> = fused.nodes.iter().filter(|n| n.op == Op::Fused).collect();
    assert!(!kernels.is_empty(), "nothing fused in\n{src}");
    let (descs, so) = shardc_codegen::lower_host(&fused).unwrap_or_else(|e| panic!("{e}"));
    let table: Vec<(&str, usize)> = descs.iter().map(|d| (d.name.as_str(), d.inputs.len() + d.outputs.len())).collect();
    let lib = shardc_runtime::host_kernels::HostKernels::load(&so, &table).expect("the library loads");
    let mut rng = Rng(seed);
    let mut forms = Vec::new();
    for (node, desc) in kernels.iter().zip(&descs) {
        let body: &Graph = node.body.as_deref().expect("fused nodes have bodies");
        let mut inputs = HashMap::new();
        let mut bufs = Vec::new();
        for a in &body.args {
            let (name, ty) = (body.name_of(a.value), body.ty(a.value));
            let n = ty.numel();
            let (t, b) = match ty.dtype {
                DType::F32 => {
                    let (lo, hi) = float_range(name);
                    let v: Vec<f32> = (0..n).map(|_| rng.uniform(lo, hi)).collect();
                    (Tensor { dtype: DType::F32, shape: ty.shape.clone(), data: Data::F32(v.clone()) }, Buf::F32(v))
                }
                DType::Bf16 => {
                    let (lo, hi) = float_range(name);
                    let v: Vec<half::bf16> = (0..n).map(|_| half::bf16::from_f32(rng.uniform(lo, hi))).collect();
                    let f: Vec<f32> = v.iter().map(|x| x.to_f32()).collect();
                    (
                        Tensor { dtype: DType::Bf16, shape: ty.shape.clone(), data: Data::F32(f) },
                        Buf::Bf16(v.iter().map(|x| x.to_bits()).collect()),
                    )
                }
                DType::I64 => {
                    let hi = int_range(name);
                    let v: Vec<i64> = (0..n).map(|_| (rng.next() % hi as u64) as i64).collect();
                    (Tensor { dtype: DType::I64, shape: ty.shape.clone(), data: Data::I64(v.clone()) }, Buf::I64(v))
                }
                other => panic!("no test inputs of {other:?}"),
            };
            inputs.insert(name.to_string(), t);
            bufs.push(b);
        }
        for o in body.output_values() {
            let ty = body.ty(o);
            bufs.push(match ty.dtype {
                DType::Bf16 => Buf::Bf16(vec![0x7FC0; ty.numel()]),
                _ => Buf::F32(vec![f32::NAN; ty.numel()]),
            });
        }
        let want = run(body, &inputs, Precision::F64).unwrap_or_else(|e| panic!("{e}"));
        let ptrs: Vec<*mut u8> = bufs.iter_mut().map(|b| b.ptr()).collect();
        // SAFETY: the buffers have the sizes and dtypes of the kernel's operands and results.
        unsafe { lib.run(&desc.name, desc.work_items, &ptrs, 2) }.expect("the kernel runs");
        let outs = &bufs[body.args.len()..];
        for (k, (w, got)) in want.iter().zip(outs).enumerate() {
            let (w, got) = (w.to_f64(), got.floats());
            let mut worst = (0.0f64, 0usize);
            for (i, (&a, &b)) in got.iter().zip(&w).enumerate() {
                if a.is_nan() && b.is_nan() {
                    continue; // both sides agree the result is undefined
                }
                let excess = (a - b).abs() / (tol.atol + tol.rtol * b.abs());
                if excess.is_nan() || excess > worst.0 {
                    worst = (if excess.is_nan() { f64::INFINITY } else { excess }, i);
                }
            }
            assert!(
                worst.0 <= 1.0,
                "kernel {} ({}), result {k} ({}): element {} is {} but the interpreter gives {} \
                 ({:.2}x the tolerance)\n{}",
                desc.name,
                desc.ops.join(", "),
                desc.outputs[k],
                worst.1,
                got[worst.1],
                w[worst.1],
                worst.0,
                desc.module()
            );
        }
        forms.push(format!("{:?}", desc.form));
    }
    forms
}

/// (rows, cols) that divide no tile: 1, 7, 97, 1000, 4097.
const SIZES: [(usize, usize); 6] = [(1, 1), (7, 7), (97, 1000), (1000, 97), (1, 4097), (7, 4097)];

fn dt(bf16: bool) -> &'static str {
    if bf16 {
        "bf16"
    } else {
        "f32"
    }
}

fn each_size(mut f: impl FnMut(usize, usize, bool)) {
    for (r, c) in SIZES {
        for bf16 in [false, true] {
            f(r, c, bf16);
        }
    }
}

fn tol(bf16: bool, base: Tol, chain: bool) -> Tol {
    match (bf16, chain) {
        (false, _) => base,
        (true, false) => BF16_ONE,
        (true, true) => BF16_CHAIN,
    }
}

fn none(_: &str) -> i64 {
    1
}

#[test]
fn elementwise_chains_flat() {
    each_size(|r, c, b| {
        let t = dt(b);
        let src = format!(
            "graph ew\ninput %x: {t}[{r}, {c}]\ninput %y: {t}[{r}, {c}]\ninput %s: {t}[]\n\
             %h: {t}[] = full() {{dtype = {t}, shape = [], value = 0.5}}\n\
             %a: {t}[{r}, {c}] = mul(%y, %h)\n%u: {t}[{r}, {c}] = add(%x, %a)\n\
             %v: {t}[{r}, {c}] = mul(%u, %s)\n%w: {t}[{r}, {c}] = tanh(%v)\n\
             %e: {t}[{r}, {c}] = exp(%w)\n%q: {t}[{r}, {c}] = div(%e, %y)\n\
             %n: {t}[{r}, {c}] = neg(%q)\n%m: {t}[{r}, {c}] = maximum(%n, %x)\noutput %m, %u\n"
        );
        let forms = check(&src, tol(b, EW, true), none, 1);
        assert!(forms.iter().all(|f| f.starts_with("Flat")), "{forms:?}");
    });
}

#[test]
fn bias_gelu_and_its_gradient() {
    each_size(|r, c, b| {
        let t = dt(b);
        for approx in ["tanh", "none"] {
            let src = format!(
                "graph bg\ninput %x: {t}[{r}, {c}]\ninput %bias: {t}[{c}]\ninput %dy: {t}[{r}, {c}]\n\
                 %h: {t}[{r}, {c}] = add(%x, %bias)\n%y: {t}[{r}, {c}] = gelu(%h) {{approximate = \"{approx}\"}}\n\
                 %d: {t}[{r}, {c}] = gelu_grad(%h, %dy) {{approximate = \"{approx}\"}}\noutput %y, %d\n"
            );
            let forms = check(&src, tol(b, EW, true), none, 2);
            // (A 1 x 1 bias is a scalar: the kernel is flat.)
            assert!(forms.iter().all(|f| f.starts_with(if r * c == 1 { "Flat" } else { "Rows" })), "{forms:?}");
        }
    });
}

#[test]
fn swiglu_and_silu_gradient() {
    each_size(|r, c, b| {
        let t = dt(b);
        let src = format!(
            "graph sw\ninput %g: {t}[{r}, {c}]\ninput %u: {t}[{r}, {c}]\ninput %dy: {t}[{r}, {c}]\n\
             %a: {t}[{r}, {c}] = silu(%g)\n%y: {t}[{r}, {c}] = mul(%a, %u)\n\
             %dg: {t}[{r}, {c}] = silu_grad(%g, %dy)\noutput %y, %dg\n"
        );
        check(&src, tol(b, EW, true), none, 3);
    });
}

#[test]
fn residual_layer_norm_and_rms_norm() {
    each_size(|r, c, b| {
        let t = dt(b);
        let src = format!(
            "graph ln\ninput %x: {t}[{r}, {c}]\ninput %res: {t}[{r}, {c}]\ninput %g: {t}[{c}]\ninput %bb: {t}[{c}]\n\
             %s: {t}[{r}, {c}] = add(%x, %res)\n%y: {t}[{r}, {c}] = layer_norm(%s, %g, %bb) {{eps = 1e-5}}\n\
             %z: {t}[{r}, {c}] = rms_norm(%s, %g) {{eps = 1e-6}}\noutput %s, %y, %z\n"
        );
        check(&src, tol(b, ROW, true), none, 4);
    });
}

#[test]
fn norm_backward() {
    each_size(|r, c, b| {
        let t = dt(b);
        let src = format!(
            "graph lnb\ninput %x: {t}[{r}, {c}]\ninput %g: {t}[{c}]\ninput %dy: {t}[{r}, {c}]\n\
             %dx: {t}[{r}, {c}] = layer_norm_grad(%x, %g, %dy) {{eps = 1e-5}}\n\
             %dz: {t}[{r}, {c}] = rms_norm_grad(%x, %g, %dy) {{eps = 1e-5}}\noutput %dx, %dz\n"
        );
        // Backward norms subtract means of products: cancellation makes small results
        // relatively noisier, so the absolute part is larger.
        let tl = if b { BF16_CHAIN } else { Tol { atol: 1e-4, rtol: 1e-4 } };
        check(&src, tl, none, 5);
    });
}

#[test]
fn causal_and_plain_softmax() {
    for t_len in [1usize, 7, 97] {
        for b in [false, true] {
            let t = dt(b);
            let src = format!(
                "graph sm\ninput %s: {t}[2, {t_len}, {t_len}]\n\
                 %k: {t}[] = full() {{dtype = {t}, shape = [], value = 0.125}}\n\
                 %x: {t}[2, {t_len}, {t_len}] = mul(%s, %k)\n\
                 %p: {t}[2, {t_len}, {t_len}] = softmax(%x) {{causal = true}}\noutput %p\n"
            );
            check(&src, tol(b, ROW, true), none, 6);
        }
    }
    each_size(|r, c, b| {
        let t = dt(b);
        let src = format!("graph sm\ninput %x: {t}[{r}, {c}]\n%p: {t}[{r}, {c}] = softmax(%x)\noutput %p\n");
        check(&src, tol(b, ROW, false), none, 7);
    });
}

#[test]
fn cross_entropy_and_its_gradient() {
    each_size(|r, c, b| {
        let t = dt(b);
        let src = format!(
            "graph ce\ninput %x: {t}[{r}, {c}]\ninput %y: i64[{r}]\ninput %dl: {t}[{r}]\n\
             %l: {t}[{r}] = cross_entropy(%x, %y)\n%d: {t}[{r}, {c}] = cross_entropy_grad(%x, %y, %dl)\noutput %l, %d\n"
        );
        check(&src, tol(b, ROW, true), |_| c as i64, 8);
    });
}

#[test]
fn cross_entropy_gradient_of_a_batch_of_sequences() {
    // Logits [B, T, V] with per-row operands [B, T] (targets, the loss's gradient): what one
    // device's step fuses (issue-11).
    for b in [false, true] {
        let t = dt(b);
        let src = format!(
            "graph ce\ninput %x: {t}[2, 7, 97]\ninput %y: i64[2, 7]\ninput %dl: {t}[2, 7]\n\
             %d: {t}[2, 7, 97] = cross_entropy_grad(%x, %y, %dl)\noutput %d\n"
        );
        check(&src, tol(b, ROW, true), |_| 97, 14);
    }
}

#[test]
fn vocab_parallel_cross_entropy_pieces() {
    // What tensor parallelism makes of cross-entropy before its all-reduces: a local max, the
    // shifted exponentials' sum, and the row-wise arithmetic on them.
    each_size(|r, c, b| {
        let t = dt(b);
        let src = format!(
            "graph vp\ninput %x: {t}[{r}, {c}]\n\
             %m: {t}[{r}, 1] = reduce_max(%x) {{dims = [1], keepdim = true}}\n\
             %d: {t}[{r}, {c}] = sub(%x, %m)\n%e: {t}[{r}, {c}] = exp(%d)\n\
             %s: {t}[{r}] = reduce_sum(%e) {{dims = [1]}}\n%ls: {t}[{r}] = log(%s)\n\
             %mean: {t}[{r}] = reduce_mean(%x) {{dims = [-1]}}\n%z: {t}[{r}] = sub(%ls, %mean)\noutput %m, %z, %e\n"
        );
        // `%s` reaches the last kernel as an operand: a sum of exponentials, positive.
        check_with(&src, tol(b, ROW, true), none, |n| if n == "s" { (0.1, 4.0) } else { (-2.0, 2.0) }, 9);
    });
}

#[test]
fn rope_forward_and_inverse() {
    for (t_len, heads, d) in [(1usize, 1usize, 2usize), (7, 3, 8), (97, 2, 64), (5, 1, 1000)] {
        for b in [false, true] {
            let t = dt(b);
            for inverse in [false, true] {
                let src = format!(
                    "graph rp\ninput %x: {t}[{t_len}, {heads}, {d}]\ninput %pos: i64[{t_len}]\n\
                     %y: {t}[{t_len}, {heads}, {d}] = rope(%x, %pos) {{inverse = {inverse}, theta = 10000.0}}\noutput %y\n"
                );
                // Angles up to 97 rad: f32 sin/cos of a large argument are good to ~1e-5.
                let tl = if b { BF16_ONE } else { Tol { atol: 5e-5, rtol: 1e-4 } };
                check(&src, tl, |_| 4096, 10);
            }
        }
    }
}

#[test]
fn bias_gradient_column_reduction_with_activation_gradient() {
    each_size(|r, c, b| {
        let t = dt(b);
        let src = format!(
            "graph bgr\ninput %h: {t}[{r}, {c}]\ninput %dy: {t}[{r}, {c}]\n\
             %d: {t}[{r}, {c}] = gelu_grad(%h, %dy) {{approximate = \"tanh\"}}\n\
             %db: {t}[{c}] = reduce_sum(%d) {{dims = [0]}}\noutput %d, %db\n"
        );
        if r < 2 {
            return; // a column reduction needs rank 2 with rows to reduce
        }
        let forms = check(&src, tol(b, ROW, true), none, 11);
        assert!(forms.iter().any(|f| f.starts_with("Columns")), "{forms:?}");
    });
}

#[test]
fn adamw_update_and_gradient_norm() {
    for n in [1usize, 7, 97, 1000, 4097] {
        let src = format!(
            "graph adam\ninput %p: f32[{n}]\ninput %g: f32[{n}]\ninput %m: f32[{n}]\ninput %v: f32[{n}]\ninput %lr: f32[]\n\
             %b1: f32[] = full() {{dtype = f32, shape = [], value = 0.9}}\n\
             %nb1: f32[] = full() {{dtype = f32, shape = [], value = 0.1}}\n\
             %b2: f32[] = full() {{dtype = f32, shape = [], value = 0.999}}\n\
             %nb2: f32[] = full() {{dtype = f32, shape = [], value = 0.001}}\n\
             %eps: f32[] = full() {{dtype = f32, shape = [], value = 1e-8}}\n\
             %md: f32[{n}] = mul(%m, %b1)\n%mi: f32[{n}] = mul(%g, %nb1)\n%m2: f32[{n}] = add(%md, %mi)\n\
             %gg: f32[{n}] = mul(%g, %g)\n%vd: f32[{n}] = mul(%v, %b2)\n%vi: f32[{n}] = mul(%gg, %nb2)\n\
             %v2: f32[{n}] = add(%vd, %vi)\n%sq: f32[{n}] = sqrt(%v2)\n%de: f32[{n}] = add(%sq, %eps)\n\
             %st: f32[{n}] = div(%m2, %de)\n%up: f32[{n}] = mul(%st, %lr)\n%p2: f32[{n}] = sub(%p, %up)\n\
             %ss: f32[] = reduce_sum(%gg) {{dims = [0]}}\noutput %p2, %m2, %v2, %ss\n"
        );
        // The second moment is a running mean of squares: never negative.
        check_with(&src, ROW, none, |name| if name == "v" { (0.0, 4.0) } else { (-2.0, 2.0) }, 12);
    }
}

#[test]
fn multi_tensor_adamw_over_a_bucket_of_parameters() {
    // Three parameters of odd sizes in the optimizer phase: one multi-tensor kernel updates all.
    let sizes = [1usize, 97, 4097, 7];
    let src = common::adamw::multi_tensor_adamw(&sizes);
    let forms = check_with(&src, ROW, none, |name| if name.starts_with('v') { (0.0, 4.0) } else { (-2.0, 2.0) }, 13);
    assert_eq!(forms, vec![format!("MultiTensor {{ elements: {sizes:?}, chunk: 64 }}")], "one launch for the bucket");
}

/// Scalars computed from scalar operands (a global gradient norm from per-parameter sums of
/// squares, its clipping coefficient) are computed once per work item, before the element
/// loop: inside it, LLVM cannot hoist their loads past the loop's stores (the buffers may
/// alias), and a bucket summing 100 norms per element ran 15x slower.
#[test]
fn scalars_of_scalar_operands_are_computed_before_the_element_loop() {
    let n = 4097;
    let src = format!(
        "graph clip\ninput %g: f32[{n}]\ninput %s0: f32[]\ninput %s1: f32[]\ninput %s2: f32[]\n\
         %a: f32[] = add(%s0, %s1)\n%b: f32[] = add(%a, %s2)\n%norm: f32[] = sqrt(%b)\n\
         %one: f32[] = full() {{dtype = f32, shape = [], value = 1.0}}\n\
         %den: f32[] = maximum(%norm, %one)\n%c: f32[] = div(%one, %den)\n\
         %cb: f32[{n}] = broadcast_to(%c) {{shape = [{n}]}}\n%y: f32[{n}] = mul(%g, %cb)\noutput %y, %norm\n"
    );
    check_with(&src, EW, none, |name| if name.starts_with('s') { (0.0, 4.0) } else { (-2.0, 2.0) }, 14);
    let g = shardc_ir::text::parse(&src).expect("parses");
    let (fused, _) = shardc_passes::fusion::fuse(&g);
    let (descs, _) = shardc_codegen::lower_host(&fused).expect("lowers");
    let text = descs[0].module();
    let (sqrt, inner) = (text.find("math.sqrt").expect("a sqrt"), text.find("scf.for").expect("an element loop"));
    assert!(sqrt < inner, "the norm is computed inside the element loop:\n{text}");
    assert_eq!(text.matches("math.sqrt").count(), 1, "the norm is computed once:\n{text}");
}

/// A body codegen cannot describe (a matmul belongs to the GEMM library, not to a kernel) is an
/// error naming the kernel and its fused ops, from both lowerings; never a silent fallback.
#[test]
fn a_kernel_that_cannot_be_lowered_is_an_error_naming_it() {
    let src = "graph bad\ninput %x: f32[4, 4]\ninput %w: f32[4, 4]\n\
               %y: f32[4, 4] = fused(%x, %w) {kernel = \"k7_odd\"} {\n  input %x: f32[4, 4]\n  input %w: f32[4, 4]\n\
               %e: f32[4, 4] = exp(%x)\n  %y: f32[4, 4] = matmul(%e, %w)\n  output %y\n}\noutput %y\n";
    let g = shardc_ir::text::parse(src).unwrap();
    shardc_ir::verify::verify(&g).unwrap();
    for e in [
        shardc_codegen::lower_host(&g).err().map(|e| e.to_string()),
        shardc_codegen::lower_gpu(&g, false).err().map(|e| e.to_string()),
    ] {
        let e = e.expect("lowering a matmul inside a kernel must fail");
        assert!(e.contains("k7_odd") && e.contains("exp, matmul"), "{e}");
    }
}

/// Host libraries are kept by the SHA-256 of what they are compiled from: the second compile of
/// the same step takes the cached library (and a damaged cache entry is rebuilt).
#[test]
fn host_kernels_are_compiled_once_and_cached() {
    let src = "graph c\ninput %x: f32[4, 8]\ninput %b: f32[8]\n%h: f32[4, 8] = add(%x, %b)\n%y: f32[4, 8] = gelu(%h) {approximate = \"tanh\"}\noutput %y\n";
    let g = shardc_ir::text::parse(src).unwrap();
    let dir = std::env::temp_dir().join(format!("shardc-kernel-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let first = shardc_codegen::compile_host(&g, Some(&dir)).unwrap();
    assert!(!first.cached);
    let second = shardc_codegen::compile_host(&g, Some(&dir)).unwrap();
    assert!(second.cached && second.library == first.library);
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        std::fs::write(e.path(), b"not a library").unwrap();
    }
    let third = shardc_codegen::compile_host(&g, Some(&dir)).unwrap();
    assert!(!third.cached && third.library.starts_with(b"\x7fELF"));
    std::fs::remove_dir_all(&dir).unwrap();
}
