//! Paper checks that need no sharding yet: the parameter counts of Megatron-LM's Table 1
//! configurations (Shoeybi et al. 2019: GPT-2 style, vocabulary 51,200, 1024 positions) come out
//! of our importer's graphs.

use shardc_ir::import::{import_dir, BuildOptions};

fn params(hidden: usize, heads: usize, layers: usize) -> usize {
    let dir = std::env::temp_dir().join(format!("shardc-megatron-{hidden}-{layers}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = serde_json::json!({
        "model_type": "gpt2", "vocab_size": 51200, "n_positions": 1024, "n_embd": hidden,
        "n_head": heads, "n_layer": layers, "activation_function": "gelu_new"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
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
