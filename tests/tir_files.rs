//! Data-driven tests over the `.tir` files in the repository.
//!
//! - Every `.tir` file under `tests/` and `examples/` (except `tests/tir/errors/`) parses,
//!   verifies, and round-trips: `parse(print(g)) == g`, the printer is a fixed point, and the
//!   serde JSON form reads back equal.
//! - `tests/tir/ops/*.tir` run on the reference interpreter. Comment lines give the data:
//!   `# input %x = [..]` feeds an argument (row-major), `# expect [rank R] %y = [..]` checks an
//!   output (rank 0 when no rank is given); f64 to 1e-9 relative, f32 to 1e-5.
//! - `tests/tir/errors/verify/*.tir` parse but fail verification with every `# error: TEXT`.
//! - `tests/tir/errors/parse/*.tir` fail to parse at `# error: LINE:COL TEXT`.

mod common;

use shardc_ir::interp::{run_spmd, Precision};
use shardc_ir::ops::Op;
use shardc_ir::tensor::max_rel_error;
use shardc_ir::text::{parse, print};
use shardc_ir::verify::verify;
use shardc_ir::{Graph, Tensor};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

fn numbers(s: &str) -> Vec<f64> {
    s.trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split(',')
        .map(|x| x.trim().parse::<f64>().expect("a number"))
        .collect()
}

#[test]
fn every_tir_file_round_trips() {
    let errors = common::root().join("tests/tir/errors");
    let files: Vec<PathBuf> = common::files_ending("tests", ".tir")
        .into_iter()
        .chain(common::files_ending("examples", ".tir"))
        .filter(|p| !p.starts_with(&errors))
        .collect();
    assert!(files.len() >= 6, "expected the repository's .tir files, found {}", files.len());
    for path in &files {
        let src = std::fs::read_to_string(path).unwrap();
        let g = parse(&src).unwrap_or_else(|d| panic!("{}:{d}", path.display()));
        verify(&g).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let printed = print(&g);
        let again = parse(&printed).unwrap_or_else(|d| panic!("{}: printed form does not parse: {d}", path.display()));
        assert_eq!(again, g, "{}: parse(print(g)) != g", path.display());
        assert_eq!(print(&again), printed, "{}: the printer is not a fixed point", path.display());
        let json = serde_json::to_string(&g).unwrap();
        let from_json: Graph = serde_json::from_str(&json).unwrap();
        assert_eq!(from_json, g, "{}: JSON round trip", path.display());
    }
    eprintln!("{} .tir files round-tripped", files.len());
}

fn run_case(path: &Path, precision: Precision, tol: f64, ops_seen: &mut BTreeSet<&'static str>) {
    let src = std::fs::read_to_string(path).unwrap();
    let g = parse(&src).unwrap_or_else(|d| panic!("{}:{d}", path.display()));
    verify(&g).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    g.nodes.iter().for_each(|n| {
        ops_seen.insert(n.op.name());
    });
    let mut inputs = HashMap::new();
    for line in common::directives(&src, "input") {
        let (name, values) = line.split_once('=').expect("# input %x = [..]");
        let name = name.trim().trim_start_matches('%');
        let v = g.find(name).unwrap_or_else(|| panic!("{}: no argument %{name}", path.display()));
        let ty = g.ty(v);
        let values = numbers(values);
        let t = if ty.dtype.is_float() {
            Tensor::f64(ty.dtype, ty.shape.clone(), values)
        } else {
            Tensor::int(ty.dtype, ty.shape.clone(), values.iter().map(|&x| x as i64).collect())
        };
        inputs.insert(name.to_string(), t);
    }
    let world = g.mesh.world_size();
    let outs = run_spmd(&g, &vec![inputs; world], precision).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let expects = common::directives(&src, "expect");
    assert!(!expects.is_empty(), "{}: no `# expect` lines", path.display());
    for line in expects {
        let (lhs, values) = line.split_once('=').expect("# expect %y = [..]");
        let lhs: Vec<&str> = lhs.split_whitespace().collect();
        let (rank, name) = match lhs.as_slice() {
            ["rank", r, name] => (r.parse::<usize>().unwrap(), *name),
            [name] => (0, *name),
            _ => panic!("{}: bad expect line `{line}`", path.display()),
        };
        let name = name.trim_start_matches('%');
        let v = g.find(name).unwrap_or_else(|| panic!("{}: no value %{name}", path.display()));
        let k = g
            .output_values()
            .position(|o| o == v)
            .unwrap_or_else(|| panic!("{}: %{name} is not an output", path.display()));
        let got = outs[rank][k].to_f64();
        let want = numbers(values);
        assert_eq!(got.len(), want.len(), "{}: %{name} has {} elements", path.display(), got.len());
        let err = max_rel_error(&got, &want);
        assert!(
            err <= tol,
            "{} ({precision:?}): rank {rank} %{name} = {got:?}, expected {want:?} (rel err {err:e})",
            path.display()
        );
    }
}

#[test]
fn op_files_compute_the_expected_values() {
    let files = common::files_ending("tests/tir/ops", ".tir");
    let mut seen = BTreeSet::new();
    for path in &files {
        run_case(path, Precision::F64, 1e-9, &mut seen);
        run_case(path, Precision::F32, 1e-5, &mut seen);
    }
    let missing: Vec<&str> = Op::ALL.iter().map(|o| o.name()).filter(|n| !seen.contains(n)).collect();
    assert!(missing.is_empty(), "ops without an interpreter test in tests/tir/ops: {missing:?}");
}

#[test]
fn verifier_error_files_fail_with_their_messages() {
    let files = common::files_ending("tests/tir/errors/verify", ".tir");
    assert!(!files.is_empty());
    for path in &files {
        let src = std::fs::read_to_string(path).unwrap();
        let g = parse(&src).unwrap_or_else(|d| panic!("{}: should parse: {d}", path.display()));
        let errs = verify(&g).expect_err(&format!("{} should fail verification", path.display()));
        let text = errs.to_string();
        let wanted = common::directives(&src, "error:");
        assert!(!wanted.is_empty(), "{}: no `# error:` lines", path.display());
        for w in wanted {
            assert!(text.contains(w), "{}: expected an error containing `{w}`, got:\n{text}", path.display());
        }
        // Every node error names its node and prints it.
        for e in &errs.0 {
            if let Some(i) = e.node {
                assert!(
                    e.context.contains(g.nodes[i].op.name()),
                    "{}: context `{}` does not show the op",
                    path.display(),
                    e.context
                );
            }
        }
    }
}

#[test]
fn parse_error_files_fail_at_their_location() {
    let files = common::files_ending("tests/tir/errors/parse", ".tir");
    assert!(!files.is_empty());
    for path in &files {
        let src = std::fs::read_to_string(path).unwrap();
        let d = parse(&src).expect_err(&format!("{} should not parse", path.display()));
        let wanted = common::directives(&src, "error:");
        let [w] = wanted.as_slice() else { panic!("{}: needs exactly one `# error: LINE:COL TEXT`", path.display()) };
        let (loc, text) = w.split_once(' ').expect("LINE:COL TEXT");
        assert_eq!(format!("{}:{}", d.line, d.col), loc, "{}: {d}", path.display());
        assert!(d.message.contains(text), "{}: expected `{text}` in `{}`", path.display(), d.message);
    }
}
