//! Gradient checks: autodiff against central finite differences in f64, for every graph in
//! tests/tir/grad/. Each file's first output is a scalar loss; every floating argument is
//! differentiated. Comment lines give the data:
//! - `# input %ids = [..]` fixes an argument (integer arguments must be fixed this way);
//! - `# range %p = LO HI` draws a floating argument uniformly from [LO, HI] (default [-1, 1]);
//! - `# sharded %a %b` marks arguments that differ per rank; the others are replicated, and a
//!   finite-difference probe moves every rank's copy together. The loss must be replicated.
//!
//! Tolerance: max |autodiff - fd| / max |fd| < 1e-6, with step 1e-5 in f64.
//!
//! The last test checks that every differentiable op of the op table appears in these files.

mod common;

use shardc_ir::interp::{run_spmd, Precision};
use shardc_ir::ops::Op;
use shardc_ir::tensor::max_rel_error;
use shardc_ir::text::parse;
use shardc_ir::verify::verify;
use shardc_ir::{Graph, Tensor};
use shardc_passes::autodiff::{differentiate, is_differentiable};
use shardc_runtime::init::Rng;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

type Inputs = Vec<HashMap<String, Tensor>>;

/// Per-rank inputs from the file's directives and a seeded generator.
fn inputs(g: &Graph, src: &str, path: &Path) -> (Inputs, BTreeSet<String>) {
    let world = g.mesh.world_size();
    let sharded: BTreeSet<String> = common::directives(src, "sharded")
        .iter()
        .flat_map(|l| l.split_whitespace())
        .map(|s| s.trim_start_matches('%').to_string())
        .collect();
    let mut fixed = HashMap::new();
    for l in common::directives(src, "input") {
        let (n, v) = l.split_once('=').unwrap();
        let vals: Vec<f64> =
            v.trim().trim_matches(|c| c == '[' || c == ']').split(',').map(|x| x.trim().parse().unwrap()).collect();
        fixed.insert(n.trim().trim_start_matches('%').to_string(), vals);
    }
    let mut ranges = HashMap::new();
    for l in common::directives(src, "range") {
        let parts: Vec<&str> = l.split_whitespace().collect();
        let lo: f64 = parts[2].parse().unwrap();
        let hi: f64 = parts[3].parse().unwrap();
        ranges.insert(parts[0].trim_start_matches('%').to_string(), (lo, hi));
    }
    let mut rng = Rng::new(7);
    let mut per_rank: Inputs = vec![HashMap::new(); world];
    for a in &g.args {
        let v = g.value(a.value);
        let n = v.ty.numel();
        let draw = |rng: &mut Rng| -> Vec<f64> {
            let (lo, hi) = ranges.get(&v.name).copied().unwrap_or((-1.0, 1.0));
            (0..n).map(|_| lo + (hi - lo) * rng.uniform()).collect()
        };
        let shared = if fixed.contains_key(&v.name) { fixed[&v.name].clone() } else { draw(&mut rng) };
        for (r, m) in per_rank.iter_mut().enumerate() {
            let vals = if sharded.contains(&v.name) && r > 0 { draw(&mut rng) } else { shared.clone() };
            assert_eq!(vals.len(), n, "{}: %{} needs {n} values", path.display(), v.name);
            let t = if v.ty.dtype.is_float() {
                Tensor::f64(v.ty.dtype, v.ty.shape.clone(), vals)
            } else {
                assert!(
                    fixed.contains_key(&v.name),
                    "{}: integer argument %{} needs an `# input` line",
                    path.display(),
                    v.name
                );
                Tensor::int(v.ty.dtype, v.ty.shape.clone(), vals.iter().map(|&x| x as i64).collect())
            };
            m.insert(v.name.clone(), t);
        }
    }
    (per_rank, sharded)
}

fn loss(g: &Graph, inputs: &Inputs) -> f64 {
    let out = run_spmd(g, inputs, Precision::F64).expect("runs");
    let l0 = out[0][0].scalar().unwrap();
    for (r, o) in out.iter().enumerate() {
        assert!(
            (o[0].scalar().unwrap() - l0).abs() <= 1e-12 * l0.abs().max(1.0),
            "the loss is not replicated (rank {r})"
        );
    }
    l0
}

fn perturb(inputs: &mut Inputs, name: &str, ranks: &[usize], i: usize, delta: f64) {
    for &r in ranks {
        let t = inputs[r].get_mut(name).unwrap();
        if let shardc_ir::Data::F64(v) = &mut t.data {
            v[i] += delta;
        }
    }
}

fn check(path: &Path, seen: &mut BTreeSet<&'static str>) {
    let src = std::fs::read_to_string(path).unwrap();
    let g = parse(&src).unwrap_or_else(|d| panic!("{}:{d}", path.display()));
    verify(&g).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let wrt: Vec<_> = g.args.iter().map(|a| a.value).filter(|&v| g.ty(v).dtype.is_float()).collect();
    let d = differentiate(&g, g.outputs[0].value, &wrt).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    verify(&d.graph).unwrap_or_else(|e| panic!("{}: the differentiated graph does not verify: {e}", path.display()));
    for n in &g.nodes {
        if n.inputs.iter().any(|v| g.ty(*v).dtype.is_float()) {
            seen.insert(n.op.name());
        }
    }
    let (mut ins, sharded) = inputs(&g, &src, path);
    let world = g.mesh.world_size();
    let grads = run_spmd(&d.graph, &ins, Precision::F64).expect("differentiated graph runs");
    let eps = 1e-5;
    for (k, &p) in wrt.iter().enumerate() {
        let name = g.name_of(p).to_string();
        let groups: Vec<Vec<usize>> =
            if sharded.contains(&name) { (0..world).map(|r| vec![r]).collect() } else { vec![(0..world).collect()] };
        for ranks in groups {
            let n = g.ty(p).numel();
            let mut fd = Vec::with_capacity(n);
            for i in 0..n {
                perturb(&mut ins, &name, &ranks, i, eps);
                let up = loss(&g, &ins);
                perturb(&mut ins, &name, &ranks, i, -2.0 * eps);
                let down = loss(&g, &ins);
                perturb(&mut ins, &name, &ranks, i, eps);
                fd.push((up - down) / (2.0 * eps));
            }
            let ad = grads[ranks[0]][1 + k].to_f64();
            // A replicated argument must get the same gradient on every rank.
            for &r in &ranks[1..] {
                assert_eq!(grads[r][1 + k].to_f64(), ad, "{}: %{name} gradient differs between ranks", path.display());
            }
            let err = max_rel_error(&ad, &fd);
            assert!(
                err < 1e-6 && fd.iter().any(|x| x.abs() > 1e-8),
                "{}: d loss / d %{name} (ranks {ranks:?}): rel err {err:e}\n autodiff {ad:?}\n fd       {fd:?}",
                path.display()
            );
        }
    }
}

#[test]
fn autodiff_matches_finite_differences() {
    let mut seen = BTreeSet::new();
    let files = common::files_ending("tests/tir/grad", ".tir");
    for path in &files {
        check(path, &mut seen);
    }
    eprintln!("{} gradient-check files, {} ops covered", files.len(), seen.len());
    let missing: Vec<&str> =
        Op::ALL.iter().filter(|o| is_differentiable(**o)).map(|o| o.name()).filter(|n| !seen.contains(n)).collect();
    assert!(missing.is_empty(), "differentiable ops without a gradient check in tests/tir/grad: {missing:?}");
}

#[test]
fn second_derivatives_are_refused_clearly() {
    let g = parse("graph g\ninput %x: f32[3]\ninput %dy: f32[3]\n%d: f32[3] = silu_grad(%x, %dy)\n%l: f32[] = reduce_sum(%d) {dims = [0]}\noutput %l\n").unwrap();
    let e = differentiate(&g, g.outputs[0].value, &[g.args[0].value]).err().unwrap();
    assert!(e.to_string().contains("second derivatives are not supported"), "{e}");
}

#[test]
fn fused_kernels_are_refused_clearly() {
    let src = "graph g\ninput %x: f32[3]\n%y: f32[3] = fused(%x) {kernel = \"k0_exp\"} {\n  input %a: f32[3]\n  %b: f32[3] = exp(%a)\n  output %b\n}\n%l: f32[] = reduce_sum(%y) {dims = [0]}\noutput %l\n";
    let g = parse(src).unwrap();
    let e = differentiate(&g, g.outputs[0].value, &[g.args[0].value]).err().unwrap();
    assert!(e.to_string().contains("differentiate before fusion"), "{e}");
}
