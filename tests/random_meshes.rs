//! Property test of the whole compiler: random GPT-2 and Llama configurations (heads, grouped
//! key/value heads, widths, depth, vocabulary, tied embeddings, biases) on random valid meshes
//! (dp, tp, ZeRO stage, sequence parallelism) compile, and `shardc compile --check` finds the
//! compiled step equal to the unsharded step (one AdamW step, f64 storage, f32 compute: 1e-9).
//! `MESH_CASES=N` runs more cases (default 16; `MESH_CASES=400` ran 400 without a failure).

use shardc_runtime::init::Rng;
use std::process::Command;

fn pick<T: Copy>(rng: &mut Rng, xs: &[T]) -> T {
    xs[(rng.next_u64() % xs.len() as u64) as usize]
}

#[test]
fn random_models_on_random_meshes_compile_to_the_unsharded_step() {
    let cases: usize = std::env::var("MESH_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(16);
    let mut rng = Rng::new(2026);
    let dir = std::env::temp_dir().join(format!("shardc-random-meshes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for case in 0..cases {
        let tp = pick(&mut rng, &[1usize, 2, 4]);
        let dp = pick(&mut rng, &[1usize, 2]);
        let zero = if dp > 1 { pick(&mut rng, &[0u8, 1, 2, 3]) } else { 0 };
        let sp = tp > 1 && pick(&mut rng, &[false, true]);
        let head_dim = pick(&mut rng, &[4usize, 8]);
        let heads = tp * pick(&mut rng, &[1usize, 2]);
        let hidden = heads * head_dim;
        let layers = pick(&mut rng, &[1usize, 2, 3]);
        let vocab = pick(&mut rng, &[48usize, 60, 64, 96]);
        let pad = (!vocab.is_multiple_of(tp)).then_some(8);
        let config = if pick(&mut rng, &[false, true]) {
            let kv = pick(&mut rng, &[heads, (heads / 2).max(1)]);
            serde_json::json!({
                "model_type": "llama", "hidden_size": hidden, "intermediate_size": tp * pick(&mut rng, &[8usize, 12]),
                "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
                "vocab_size": vocab, "max_position_embeddings": 64, "tie_word_embeddings": pick(&mut rng, &[false, true]),
                "attention_bias": pick(&mut rng, &[false, true]), "mlp_bias": pick(&mut rng, &[false, true]),
            })
        } else {
            serde_json::json!({
                "model_type": "gpt2", "n_embd": hidden, "n_layer": layers, "n_head": heads, "vocab_size": vocab,
                "n_positions": 64, "tie_word_embeddings": pick(&mut rng, &[false, true]),
            })
        };
        let model = dir.join(format!("case{case}"));
        std::fs::create_dir_all(&model).unwrap();
        std::fs::write(model.join("config.json"), config.to_string()).unwrap();
        let mesh = format!("dp={dp},tp={tp}");
        let mut args: Vec<String> = ["compile", model.to_str().unwrap(), "--batch", "4", "--seq", "8", "--mesh", &mesh]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(["--zero".into(), zero.to_string(), "--precision".into(), "f32".into(), "--check".into()]);
        args.extend(["-o".into(), model.join("step.tir").to_str().unwrap().into()]);
        if sp {
            args.push("--sequence-parallel".into());
        }
        if let Some(m) = pad {
            args.extend(["--pad-vocab-to-multiple-of".into(), m.to_string()]);
        }
        let o = Command::new(env!("CARGO_BIN_EXE_shardc")).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        eprintln!(
            "case {case}: {config} {mesh} zero={zero} sp={sp}: {}",
            err.lines().find(|l| l.starts_with("checked")).unwrap_or("?")
        );
        assert!(
            o.status.success() && err.contains("checked against the unsharded step"),
            "case {case}: shardc {}\n{err}",
            args.join(" ")
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
