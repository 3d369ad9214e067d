//! Golden tests per pass: each `tests/passes/<pass>/<case>.tir` is run through the pass and the
//! printed result compared with `<case>.expected` beside it. `BLESS=1 cargo test` rewrites the
//! expected files; a change is reviewed as their diff.
//!
//! Passes: `autodiff` (gradients of the first output with respect to every `param`).

use shardc_ir::text::{parse, print};
use shardc_ir::verify::verify;
use shardc_ir::{ArgKind, Graph};
use std::path::{Path, PathBuf};

fn run_pass(pass: &str, g: &Graph) -> Graph {
    match pass {
        "autodiff" => {
            let params: Vec<_> = g.args_of(ArgKind::Param).collect();
            shardc_passes::autodiff::differentiate(g, g.outputs[0], &params).unwrap().graph
        }
        other => panic!("no pass named `{other}` in tests/pass_golden.rs"),
    }
}

fn check(pass: &str, path: &Path) -> Result<(), String> {
    let g = parse(&std::fs::read_to_string(path).unwrap()).map_err(|d| format!("{}:{d}", path.display()))?;
    let out = run_pass(pass, &g);
    verify(&out).map_err(|e| format!("{}: output does not verify: {e}", path.display()))?;
    let got = print(&out);
    let expected_path = path.with_extension("expected");
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(&expected_path, &got).unwrap();
        return Ok(());
    }
    let want = std::fs::read_to_string(&expected_path).unwrap_or_default();
    if got == want {
        return Ok(());
    }
    let mut diff = String::new();
    let (g_lines, w_lines): (Vec<_>, Vec<_>) = (got.lines().collect(), want.lines().collect());
    for i in 0..g_lines.len().max(w_lines.len()) {
        match (w_lines.get(i), g_lines.get(i)) {
            (Some(w), Some(g)) if w == g => {}
            (w, g) => diff.push_str(&format!("@@ line {}\n- {}\n+ {}\n", i + 1, w.unwrap_or(&""), g.unwrap_or(&""))),
        }
    }
    Err(format!("{} differs (BLESS=1 to accept):\n{diff}", expected_path.display()))
}

#[test]
fn passes_match_their_golden_files() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/passes");
    let mut failures = Vec::new();
    let mut count = 0;
    for pass_dir in std::fs::read_dir(&root).unwrap().flatten() {
        let pass = pass_dir.file_name().to_string_lossy().into_owned();
        for case in std::fs::read_dir(pass_dir.path()).unwrap().flatten() {
            let p = case.path();
            if p.extension().is_some_and(|e| e == "tir") {
                count += 1;
                if let Err(e) = check(&pass, &p) {
                    failures.push(e);
                }
            }
        }
    }
    assert!(count > 0, "no golden cases found");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
