//! What plans and `explain` say about collectives comes from the program's data (each node's
//! origin and phase, each value's layer), never from a value's name: every collective of every
//! plan of the bundled model, the Hugging Face fixtures and the GPT-3 175B config names the rule
//! that made it, and the phases and layers are those the passes recorded.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn shardc(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_shardc")).args(args).output().unwrap();
    // `plan` exits with 3 for a plan over its memory budget, printed all the same.
    let ok = o.status.success() || (args[0] == "plan" && o.status.code() == Some(3));
    assert!(ok, "shardc {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

/// (phase, rule) -> count of the plan's collectives.
fn rules(model: &str, batch: &str, seq: &str, setup: &[&str]) -> BTreeMap<(String, String), usize> {
    let dir = root().join(model);
    let mut args = vec!["plan", dir.to_str().unwrap(), "--batch", batch, "--seq", seq, "--format", "json"];
    args.extend_from_slice(setup);
    let p: serde_json::Value = serde_json::from_str(&shardc(&args)).expect("one JSON document");
    let mut out = BTreeMap::new();
    for c in p["collectives"].as_array().unwrap() {
        let (phase, rule) = (c["phase"].as_str().unwrap(), c["rule"].as_str().unwrap());
        assert!(
            !rule.is_empty() && !rule.starts_with("model"),
            "{model} {setup:?}: collective %{} has no rule of its own ({rule})",
            c["value"]
        );
        *out.entry((phase.to_string(), rule.to_string())).or_insert(0) += 1;
    }
    out
}

fn has(r: &BTreeMap<(String, String), usize>, phase: &str, rule: &str) -> bool {
    r.contains_key(&(phase.to_string(), rule.to_string()))
}

const SETUPS: &[&[&str]] = &[
    &["--mesh", "dp=2", "--zero", "0"],
    &["--mesh", "dp=2", "--zero", "1"],
    &["--mesh", "dp=2", "--zero", "2"],
    &["--mesh", "dp=2", "--zero", "3"],
    &["--mesh", "tp=2"],
    &["--mesh", "tp=2", "--sequence-parallel"],
    &["--mesh", "dp=2,tp=2", "--zero", "1", "--sequence-parallel"],
    &["--mesh", "dp=2,tp=2", "--zero", "3"],
];

#[test]
fn every_collective_of_every_plan_names_its_rule() {
    for model in ["examples/shakespeare-char", "tests/fixtures/hf/gpt2-tiny", "tests/fixtures/hf/llama-tiny"] {
        for setup in SETUPS {
            let r = rules(model, "4", "16", setup);
            let zero = setup.iter().position(|a| *a == "--zero").map(|i| setup[i + 1]);
            match zero {
                Some("0") => assert!(has(&r, "backward", "zero-0/all-reduce-gradients"), "{model} {setup:?}: {r:?}"),
                Some("1") | Some("2") => {
                    let z = zero.unwrap();
                    assert!(has(&r, "backward", &format!("zero-{z}/reduce-scatter-gradients")), "{r:?}");
                    assert!(has(&r, "optimizer", &format!("zero-{z}/gather-updated-parameters")), "{r:?}");
                }
                Some("3") => {
                    assert!(has(&r, "forward", "zero-3/gather-parameters"), "{r:?}");
                    assert!(has(&r, "backward", "zero-3/gather-parameters-for-backward"), "{r:?}");
                    assert!(has(&r, "backward", "zero-3/reduce-scatter-gradients"), "{r:?}");
                }
                _ => {}
            }
            if setup.iter().any(|a| a.contains("tp=")) {
                assert!(has(&r, "forward", "tp/vocab-parallel-cross-entropy"), "{model} {setup:?}: {r:?}");
                assert!(has(&r, "optimizer", "tensor-parallel/global-gradient-norm"), "{model} {setup:?}: {r:?}");
            }
        }
    }
    // GPT-3 175B (96 layers) as Megatron and ZeRO would run it.
    for setup in [
        &["--mesh", "dp=4,tp=8", "--zero", "1", "--sequence-parallel"][..],
        &["--mesh", "dp=4,tp=8", "--zero", "3", "--sequence-parallel"][..],
    ] {
        let r = rules("examples/gpt3-175b", "4", "2048", setup);
        let zero3 = setup.contains(&"3");
        let gather = if zero3 { "zero-3/gather-parameters" } else { "zero-1/gather-updated-parameters" };
        let phase = if zero3 { "forward" } else { "optimizer" };
        // One gather per parameter: 12 per layer (q, k, v with biases, the projections, two
        // norms' scale and shift, the MLP with biases) plus the embeddings and the final norm.
        let per_param = r[&(phase.to_string(), gather.to_string())];
        assert_eq!(per_param, 96 * 16 + 4, "{setup:?}: {r:?}");
    }
}

/// Per-layer collectives come out of the layer the importer recorded on the values.
#[test]
fn plan_layers_are_the_importers() {
    let dir = root().join("examples/shakespeare-char");
    let args = ["plan", dir.to_str().unwrap(), "--batch", "4", "--seq", "16", "--mesh", "tp=2", "--format", "json"];
    let p: serde_json::Value = serde_json::from_str(&shardc(&args)).unwrap();
    let mut per_layer: BTreeMap<u64, usize> = BTreeMap::new();
    for c in p["collectives"].as_array().unwrap() {
        if let Some(l) = c["layer"].as_u64() {
            *per_layer.entry(l).or_insert(0) += 1;
        }
    }
    // Four layers, each with Megatron's 2 forward + 2 backward all-reduces (plus the f
    // all-reduces of replicated norm parameters under tp): the same count in every layer.
    assert_eq!(per_layer.len(), 4, "{per_layer:?}");
    let counts: Vec<usize> = per_layer.values().copied().collect();
    assert!(counts.iter().all(|&c| c == counts[0] && c >= 4), "{per_layer:?}");
}

/// `explain` on a ZeRO-3 parameter: the stage that gathers it, and its gradient's reduce-scatter.
#[test]
fn explain_names_the_zero_stage_of_a_gathered_parameter() {
    let dir = root().join("examples/shakespeare-char");
    let out = shardc(&[
        "explain",
        dir.to_str().unwrap(),
        "--batch",
        "4",
        "--seq",
        "16",
        "--mesh",
        "dp=2,tp=2",
        "--zero",
        "3",
        "h.1.mlp.c_fc.weight",
    ]);
    assert!(out.contains("ZeRO-3"), "{out}");
    for rule in
        ["zero-3/gather-parameters]", "zero-3/gather-parameters-for-backward]", "zero-3/reduce-scatter-gradients]"]
    {
        assert!(out.contains(rule), "explain does not list a `{rule}` collective:\n{out}");
    }
}
