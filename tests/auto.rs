//! `--auto`: the cost model chooses the mesh shape, sequence parallelism and ZeRO stage; the
//! tensor-parallel placements of the chosen plan are Megatron's, found by the e-graph search on
//! its own; a tight memory budget turns on what saves memory. Configs: Megatron's 8.3B GPT
//! (hidden 3072, 72 layers, 32 heads) and a Llama-2-7B-shaped model.

mod common;
use std::path::PathBuf;
use std::process::Command;

fn plan(model: &str, args: &[&str]) -> serde_json::Value {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/configs").join(model);
    let o = Command::new(env!("CARGO_BIN_EXE_shardc"))
        .args(["plan", dir.to_str().unwrap(), "--batch", "8", "--seq", "1024", "--auto", "--world", "8"])
        .args(["--format", "json"])
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn auto_arrives_at_megatron_placements() {
    for model in ["megatron-8.3b", "llama-7b"] {
        let p = plan(model, &[]);
        let s = &p["setup"];
        eprintln!("{model}: --auto --world 8 chose {s}; runners-up {}", p["auto"]);
        let tp = s["tp"].as_u64().unwrap();
        assert!(tp > 1, "{model}: a model of this size is split over tensor-parallel ranks");
        let sp = s["sequence_parallel"].as_bool().unwrap();
        let want = if sp { [0, 2, 2, 0, 2, 2] } else { [2, 0, 0, 2, 0, 0] };
        for layer in [0, 1, 5] {
            assert_eq!(common::tp_layer_counts(&p, layer), want, "{model} layer {layer}: Megatron's collectives");
        }
        let rules: std::collections::BTreeSet<&str> =
            p["collectives"].as_array().unwrap().iter().map(|c| c["rule"].as_str().unwrap()).collect();
        let expected: &[&str] = if sp {
            &["sp/all-reduce-split", "tp/vocab-parallel-cross-entropy"]
        } else {
            &["tp/matmul-row", "tp/vocab-parallel-embedding", "tp/vocab-parallel-cross-entropy"]
        };
        for r in expected {
            assert!(rules.iter().any(|x| x.starts_with(r)), "{model}: no collective from {r}: {rules:?}");
        }
        // The search is one layer's, whatever the depth.
        assert!(p["search"]["layers_stamped"].as_u64().unwrap() >= 32);
    }
}

#[test]
fn tight_budget_turns_on_memory_savings() {
    let roomy = plan("megatron-8.3b", &["--memory-budget", "1TiB"]);
    let tight = plan("megatron-8.3b", &["--memory-budget", "32GiB"]);
    let (a, b) = (&roomy["setup"], &tight["setup"]);
    let mem = |p: &serde_json::Value| p["memory_per_device"]["total"].as_f64().unwrap();
    eprintln!(
        "roomy: {a} {:.1} GiB; 32 GiB budget: {b} {:.1} GiB",
        mem(&roomy) / 2f64.powi(30),
        mem(&tight) / 2f64.powi(30)
    );
    assert_eq!(tight["fits_memory_budget"], true);
    assert!(mem(&tight) <= 32.0 * 2f64.powi(30) && mem(&tight) < mem(&roomy));
    let saves = b["zero"].as_u64() > a["zero"].as_u64()
        || (b["sequence_parallel"] == true && a["sequence_parallel"] == false)
        || b["tp"].as_u64() > a["tp"].as_u64();
    assert!(saves, "the tight budget turns on a higher ZeRO stage, sequence parallelism or more tp: {a} -> {b}");
    assert!(
        roomy["predicted_step_seconds"].as_f64() <= tight["predicted_step_seconds"].as_f64(),
        "with room, the fastest plan wins"
    );
}
