//! Golden tests per pass: each `tests/passes/<pass>/<case>.tir` is run through the pass and the
//! printed result compared with `<case>.expected` beside it. `BLESS=1 cargo test` rewrites the
//! expected files; a change is reviewed as their diff.
//!
//! The pipeline is the directory name (`autodiff`), or the case's `# passes: ...` line, in the
//! syntax of `shardc opt --passes` (see `shardc_passes::pipeline`).

use shardc_ir::text::{parse, print};
use shardc_ir::verify::verify;
use shardc_passes::pipeline::{parse_pipeline, run_pipeline};
use std::path::{Path, PathBuf};

/// The pipeline of a case: its `# passes: ...` line, or the directory's pass name.
fn pipeline(pass: &str, src: &str) -> String {
    src.lines().find_map(|l| l.trim().strip_prefix("# passes:")).map_or(pass.to_string(), |p| p.trim().to_string())
}

fn check(pass: &str, path: &Path) -> Result<(), String> {
    let src = std::fs::read_to_string(path).unwrap();
    let g = parse(&src).map_err(|d| format!("{}:{d}", path.display()))?;
    let specs = parse_pipeline(&pipeline(pass, &src)).map_err(|e| format!("{}: {e}", path.display()))?;
    let out = run_pipeline(&specs, &g).map_err(|e| format!("{}: {e}", path.display()))?;
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
