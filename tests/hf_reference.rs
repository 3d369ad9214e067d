//! Reference tests: our importer + interpreter reproduce Hugging Face's logits and loss on the
//! tiny random models in tests/fixtures/hf (made by scripts/make_fixtures.sh).

use shardc_ir::import::{import_dir, weights::read_tensors, BuildOptions};
use shardc_ir::interp::{run, Precision};
use shardc_ir::tensor::max_rel_error;
use shardc_ir::verify::verify;
use std::collections::HashMap;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf").join(name)
}

/// Imports the fixture, runs it, and returns (logits rel error, loss rel error).
fn check(name: &str, precision: Precision) -> (f64, f64) {
    let dir = fixture(name);
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let (b, t) = (expected["batch"].as_u64().unwrap() as usize, expected["seq"].as_u64().unwrap() as usize);
    let model = import_dir(&dir, BuildOptions { batch: b, seq: t, emit_logits: true }).expect("imports");
    assert!(model.warnings.is_empty(), "unexpected warnings: {:?}", model.warnings);
    verify(&model.graph).expect("imported graph verifies");
    let tensors = read_tensors(&dir.join("expected.safetensors")).unwrap();
    let mut inputs: HashMap<String, _> = model.weights.expect("fixture has weights");
    inputs.insert("tokens".into(), tensors["tokens"].clone());
    inputs.insert("targets".into(), tensors["targets"].clone());
    let out = run(&model.graph, &inputs, precision).expect("runs");
    let loss = out[0].scalar().unwrap();
    let logits_err = max_rel_error(&out[1].to_f64(), &tensors["logits"].to_f64());
    let want = expected["loss"].as_f64().unwrap();
    let loss_err = ((loss - want) / want).abs();
    eprintln!("{name} {precision:?}: loss {loss:.7} (HF {want:.7}), logits rel err {logits_err:.2e}, loss rel err {loss_err:.2e}");
    (logits_err, loss_err)
}

#[test]
fn gpt2_matches_hugging_face_in_f32() {
    let (logits, loss) = check("gpt2-tiny", Precision::F32);
    assert!(logits < 1e-5 && loss < 1e-5, "gpt2 f32: logits rel err {logits:e}, loss rel err {loss:e}");
}

#[test]
fn llama_matches_hugging_face_in_f32() {
    let (logits, loss) = check("llama-tiny", Precision::F32);
    assert!(logits < 1e-5 && loss < 1e-5, "llama f32: logits rel err {logits:e}, loss rel err {loss:e}");
}

#[test]
fn f64_interpretation_agrees_too() {
    for name in ["gpt2-tiny", "llama-tiny"] {
        let (logits, loss) = check(name, Precision::F64);
        assert!(logits < 1e-5 && loss < 1e-5, "{name} f64: logits rel err {logits:e}, loss rel err {loss:e}");
    }
}
