//! Paper checks: the parameter counts of Megatron-LM's Table 1 configurations (Shoeybi et al.
//! 2019: GPT-2 style, vocabulary 51,200, 1024 positions) as `shardc plan --format json` reports
//! them for the paper's tensor-parallel degree (1, 2, 4, 8 GPUs), and as the importer builds
//! them.

use shardc_ir::import::{import_dir, BuildOptions};
use std::process::Command;

/// A directory holding the Table 1 configuration's config.json (`tag` keeps callers apart).
fn config_dir(hidden: usize, heads: usize, layers: usize, tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("shardc-megatron-{tag}-{hidden}-{layers}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = serde_json::json!({
        "model_type": "gpt2", "vocab_size": 51200, "n_positions": 1024, "n_embd": hidden,
        "n_head": heads, "n_layer": layers, "activation_function": "gelu_new"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir
}

/// `params_total` of `shardc plan --format json --mesh tp=TP` for the config.
fn planned(hidden: usize, heads: usize, layers: usize, tp: usize) -> u64 {
    let dir = config_dir(hidden, heads, layers, "plan");
    let mut args = vec!["plan".to_string(), dir.to_str().unwrap().into(), "--batch".into(), "8".into()];
    args.extend(["--seq".into(), "1024".into(), "--format".into(), "json".into()]);
    if tp > 1 {
        args.extend(["--mesh".into(), format!("tp={tp}")]);
    }
    let o = Command::new(env!("CARGO_BIN_EXE_shardc")).args(&args).output().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let p: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    p["params_total"].as_u64().unwrap()
}

#[test]
fn megatron_table_1_parameter_counts_from_the_plan() {
    // (hidden, heads, layers, model-parallel GPUs, billions as the paper rounds them)
    for (h, a, l, tp, billions) in
        [(1536, 16, 40, 1, 1.2), (1920, 20, 54, 2, 2.5), (2304, 24, 64, 4, 4.2), (3072, 32, 72, 8, 8.3)]
    {
        let got = planned(h, a, l, tp) as f64 / 1e9;
        eprintln!("plan, hidden {h}, {l} layers, tp={tp}: {got:.3}B parameters (paper {billions}B)");
        assert!((got - billions).abs() < 0.05, "hidden {h}, layers {l}: {got:.3}B, paper says {billions}B");
    }
}

fn params(hidden: usize, heads: usize, layers: usize) -> usize {
    let dir = config_dir(hidden, heads, layers, "import");
    let m = import_dir(&dir, BuildOptions::f32(1, 1024, false)).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    m.graph.param_count()
}

#[test]
fn megatron_table_1_parameter_counts() {
    // (hidden, heads, layers, billions as the paper rounds them)
    for (h, a, l, billions) in [(1536, 16, 40, 1.2), (1920, 20, 54, 2.5), (2304, 24, 64, 4.2), (3072, 32, 72, 8.3)] {
        let p = params(h, a, l);
        let got = p as f64 / 1e9;
        eprintln!("hidden {h}, {l} layers: {p} parameters ({got:.2}B; paper {billions}B)");
        assert!((got - billions).abs() < 0.05, "hidden {h}, layers {l}: {got:.3}B, paper says {billions}B");
    }
}
