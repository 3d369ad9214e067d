//! Golden tests of the importer: the printed graph of each Hugging Face fixture (batch 2,
//! seq 16, with logits) must equal tests/golden/import/<name>.tir. `BLESS=1 cargo test`
//! rewrites the expected files; review the change as a diff.

use shardc_ir::import::{import_dir, BuildOptions};
use shardc_ir::text::print;
use std::path::PathBuf;

fn check(name: &str) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let m = import_dir(&root.join("tests/fixtures/hf").join(name), BuildOptions::f32(2, 16, true)).unwrap();
    let got = print(&m.graph);
    let path = root.join("tests/golden/import").join(format!("{name}.tir"));
    if std::env::var_os("BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    if got != want {
        let mut diff = String::new();
        for (i, (g, w)) in got.lines().zip(want.lines()).enumerate() {
            if g != w {
                diff.push_str(&format!("line {}:\n- {w}\n+ {g}\n", i + 1));
            }
        }
        panic!(
            "{} differs from the importer's output ({} vs {} lines); rerun with BLESS=1 to accept:\n{diff}",
            path.display(),
            want.lines().count(),
            got.lines().count()
        );
    }
}

#[test]
fn gpt2_tiny() {
    check("gpt2-tiny");
}

#[test]
fn llama_tiny() {
    check("llama-tiny");
}
