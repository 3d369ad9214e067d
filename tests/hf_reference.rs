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
    let model = import_dir(&dir, BuildOptions::f32(b, t, true)).expect("imports");
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

/// Whole-model gradients: our autodiff of the imported graph against PyTorch's `loss.backward()`
/// (tests/fixtures/hf/*/expected_grads.safetensors), every parameter, in f32.
fn check_gradients(name: &str) -> f64 {
    use shardc_ir::import::weights::load_from_files;
    use shardc_ir::ArgKind;
    let dir = fixture(name);
    let model = import_dir(&dir, BuildOptions::f32(2, 16, false)).expect("imports");
    let params: Vec<_> = model.graph.args_of(ArgKind::Param).collect();
    let d = shardc_passes::autodiff::differentiate(
        &model.graph,
        shardc_passes::autodiff::loss_of(&model.graph).expect("a loss"),
        &params,
    )
    .expect("differentiates");
    verify(&d.graph).expect("the training graph verifies");
    let (expected, _) = load_from_files(&[dir.join("expected_grads.safetensors")], &model.sources).expect("grads load");
    let tensors = read_tensors(&dir.join("expected.safetensors")).unwrap();
    let mut inputs: HashMap<String, _> = model.weights.expect("fixture has weights");
    inputs.insert("tokens".into(), tensors["tokens"].clone());
    inputs.insert("targets".into(), tensors["targets"].clone());
    let out = run(&d.graph, &inputs, Precision::F32).expect("runs");
    // Relative to each tensor's largest gradient, except that a tensor whose true gradient is
    // zero up to rounding (GPT-2's key bias: softmax is invariant to it) is measured against the
    // model's largest gradient instead.
    let global = params
        .iter()
        .map(|&p| expected[model.graph.name_of(p)].to_f64().iter().fold(0.0f64, |m, x| m.max(x.abs())))
        .fold(0.0, f64::max);
    let mut worst = 0.0f64;
    for (k, &p) in params.iter().enumerate() {
        let pname = model.graph.name_of(p);
        let (got, want) = (out[1 + k].to_f64(), expected[pname].to_f64());
        let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-3 * global);
        let err = got.iter().zip(&want).fold(0.0f64, |m, (a, b)| m.max((a - b).abs())) / scale;
        assert!(err < 1e-4, "{name}: gradient of %{pname}: rel err {err:e} (largest expected {scale:e})");
        worst = worst.max(err);
    }
    eprintln!("{name}: {} parameter gradients, worst rel err {worst:.2e}", params.len());
    worst
}

#[test]
fn gpt2_gradients_match_pytorch() {
    check_gradients("gpt2-tiny");
}

#[test]
fn llama_gradients_match_pytorch() {
    check_gradients("llama-tiny");
}
