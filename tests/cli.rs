//! End-to-end tests of the `shardc` binary, run the way a user runs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn shardc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shardc")).args(args).output().expect("shardc runs")
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("shardc-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn expected_loss(model: &str) -> f64 {
    let text = std::fs::read_to_string(root().join("tests/fixtures/hf").join(model).join("expected.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&text).unwrap()["loss"].as_f64().unwrap()
}

#[test]
fn import_check_and_eval_reproduce_hugging_face() {
    for model in ["gpt2-tiny", "llama-tiny"] {
        let dir = root().join("tests/fixtures/hf").join(model);
        let tokens = dir.join("tokens.bin");
        let want = expected_loss(model);
        // Straight from the directory, JSON output.
        let o = shardc(&["eval", s(&dir), "--data", s(&tokens), "--batch", "2", "--seq", "16", "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).expect("one JSON object on stdout");
        let loss = v["loss"].as_f64().unwrap();
        assert!(((loss - want) / want).abs() < 1e-5, "{model}: eval loss {loss}, Hugging Face {want}");
        // Through the text IR and a weights file.
        let (tir, weights) = (tmp(&format!("{model}.tir")), tmp(&format!("{model}.safetensors")));
        let o =
            shardc(&["import", s(&dir), "--batch", "2", "--seq", "16", "-o", s(&tir), "--weights-out", s(&weights)]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stderr(&o).contains("parameters"), "{}", stderr(&o));
        let o = shardc(&["check", s(&tir)]);
        assert!(o.status.success() && stdout(&o).contains(": ok: graph"), "{}", stderr(&o));
        let o =
            shardc(&["eval", s(&tir), "--weights", s(&weights), "--data", s(&tokens), "--batch", "2", "--seq", "16"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let line = stdout(&o).lines().last().unwrap().to_string();
        let loss: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(((loss - want) / want).abs() < 1e-5, "{model}: .tir eval printed `{line}`, Hugging Face {want}");
    }
}

#[test]
fn check_renders_errors_at_the_source_line() {
    let bad = tmp("bad.tir");
    std::fs::write(&bad, "graph g\ninput %x: f32[2, 3]\n%y: f32[3, 3] = matmul(%x, %x)\noutput %y\n").unwrap();
    let o = shardc(&["check", s(&bad)]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("error: `matmul` defining `%y`: contracting dimensions differ"), "{e}");
    assert!(e.contains("bad.tir:3:1") && e.contains("3 | %y: f32[3, 3] = matmul(%x, %x)"), "{e}");
    std::fs::write(&bad, "graph g\ninput %x: f32[2, 3]\n%y: f32[2, 3] = frob(%x)\noutput %y\n").unwrap();
    let e = stderr(&shardc(&["check", s(&bad)]));
    assert!(
        e.contains("unknown op `frob`")
            && e.contains("bad.tir:3:17")
            && e.contains(&format!("| {}^^^^", " ".repeat(16))),
        "{e}"
    );
}

#[test]
fn data_prepare_and_eval_errors_are_clear() {
    let text = tmp("tiny.txt");
    std::fs::write(&text, "To be, or not to be, that is the question.\n").unwrap();
    let bin = tmp("tiny.bin");
    let o = shardc(&["data", "prepare", s(&text), "-o", s(&bin)]);
    assert!(o.status.success() && stdout(&o).contains("wrote 43 tokens"), "{}", stdout(&o));
    let model = root().join("tests/fixtures/hf/gpt2-tiny");
    // 43 tokens hold 2 batches of 2 x 10; asking for 3 is an error that says so.
    let o = shardc(&["eval", s(&model), "--data", s(&bin), "--batch", "2", "--seq", "10", "--batches", "3"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("hold 2 batches of 2 x 10"), "{}", stderr(&o));
    // A sequence longer than the model's positions.
    let o = shardc(&["eval", s(&model), "--data", s(&bin), "--batch", "1", "--seq", "100"]);
    assert!(stderr(&o).contains("exceeds the model's 64 positions"), "{}", stderr(&o));
    // An unsupported model type names the file.
    let dir = tmp("bert");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), r#"{"model_type": "bert"}"#).unwrap();
    let o = shardc(&["import", s(&dir)]);
    assert!(stderr(&o).contains("config.json: model_type `bert` is not supported"), "{}", stderr(&o));
}

#[test]
fn a_model_without_weights_is_initialised_and_says_so() {
    let model = root().join("examples/shakespeare-char");
    let bin = tmp("shakespeare.bin");
    let o = shardc(&["data", "prepare", s(&root().join("examples/data/shakespeare.txt")), "-o", s(&bin)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = shardc(&["eval", s(&model), "--data", s(&bin), "--batch", "2", "--seq", "32", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    // An untrained byte-level model predicts about uniformly: loss near ln(256) = 5.545.
    let loss = v["loss"].as_f64().unwrap();
    assert!((loss - 256f64.ln()).abs() < 0.3, "untrained loss {loss}");
}

/// `shardc compile` writes per-rank programs that `shardc check` accepts: the training step,
/// the sharded forward, and the annotated global view; `explain` names rules and laws.
#[test]
fn compile_writes_programs_that_check_and_explain_names_the_rules() {
    let model = root().join("tests/fixtures/hf/llama-tiny");
    let dir = tmp("compile");
    std::fs::create_dir_all(&dir).unwrap();
    let mesh = ["--batch", "4", "--seq", "32", "--mesh", "dp=2,tp=2", "--zero", "1", "--sequence-parallel"];
    for stage in ["step", "forward", "sharded"] {
        let out = dir.join(format!("{stage}.tir"));
        let o = shardc(&[&["compile", s(&model)], &mesh[..], &["--stage", stage, "-o", s(&out)]].concat());
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stderr(&o).contains("dp=2, tp=2, ZeRO-1, sequence parallelism on"), "{}", stderr(&o));
        let o = shardc(&["check", s(&out)]);
        assert!(o.status.success(), "{stage}: {}", stderr(&o));
        let text = std::fs::read_to_string(&out).unwrap();
        match stage {
            "sharded" => {
                assert!(text.contains("param %layers.0.self_attn.q_proj.weight: f32[64, 64] @[tp, _]"), "{text}");
                assert!(text.contains("param %layers.0.mlp.down_proj.weight: f32[64, 128] @[_, tp]"));
            }
            _ => assert!(text.contains("reduce_scatter(") && text.contains("all_gather(")),
        }
    }
    // The compiler is deterministic: the same command writes the same bytes.
    let again = dir.join("again.tir");
    let o = shardc(&[&["compile", s(&model)], &mesh[..], &["-o", s(&again)]].concat());
    assert!(o.status.success());
    assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(dir.join("step.tir")).unwrap(), "deterministic output");
    // --check runs the compiled step against the unsharded one before writing it.
    let out = dir.join("checked.tir");
    let o = shardc(&[&["compile", s(&model)], &mesh[..], &["--precision", "f32", "--check", "-o", s(&out)]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("checked against the unsharded step") && out.is_file(), "{}", stderr(&o));
    let o = shardc(&[&["explain", s(&model), "l0.attn_out"], &mesh[..]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("tp/matmul-row") && text.contains("sp/all-reduce-split") && text.contains("law:"), "{text}");
}

/// Hostile inputs fail before any work, with an error naming the flag, file or tensor: an
/// overflowing batch, a config value outside its domain, a NaN in the weights, a checkpoint
/// directory that cannot be written.
#[test]
fn hostile_inputs_fail_before_any_work() {
    let gpt3 = root().join("examples/gpt3-175b");
    let o = shardc(&["plan", s(&gpt3), "--batch", "9007199254740992", "--seq", "2048", "--mesh", "dp=8"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("--batch and --seq are too large"), "{}", stderr(&o));

    let fixture = root().join("tests/fixtures/hf/gpt2-tiny");
    let tokens = fixture.join("train_tokens.bin");
    let eval = |dir: &Path| shardc(&["eval", s(dir), "--data", s(&tokens), "--batch", "2", "--seq", "8"]);

    // layer_norm_epsilon -1: refused when the config is read (it once gave `loss NaN`, exit 0).
    let bad = tmp("negative-eps");
    std::fs::create_dir_all(&bad).unwrap();
    let config = std::fs::read_to_string(fixture.join("config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&config).unwrap();
    json["layer_norm_epsilon"] = serde_json::json!(-1.0);
    std::fs::write(bad.join("config.json"), json.to_string()).unwrap();
    let o = eval(&bad);
    assert!(
        !o.status.success() && stderr(&o).contains("`layer_norm_epsilon` must be a positive number"),
        "{}",
        stderr(&o)
    );

    // `model.safetensors` that is a directory: an error, not a silent random initialisation.
    let weird = tmp("weights-dir");
    std::fs::create_dir_all(weird.join("model.safetensors")).unwrap();
    std::fs::copy(fixture.join("config.json"), weird.join("config.json")).unwrap();
    let o = eval(&weird);
    assert!(!o.status.success() && stderr(&o).contains("is not a readable file"), "{}", stderr(&o));

    // A NaN in a weight tensor: named with its file and tensor.
    let nan = tmp("nan-weights");
    std::fs::create_dir_all(&nan).unwrap();
    std::fs::copy(fixture.join("config.json"), nan.join("config.json")).unwrap();
    let mut st = std::fs::read(fixture.join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&st[8..8 + header_len]).unwrap();
    let (name, info) = header
        .as_object()
        .unwrap()
        .iter()
        .find(|(k, v)| *k != "__metadata__" && v["dtype"] == "F32")
        .expect("an f32 tensor");
    let start = 8 + header_len + info["data_offsets"][0].as_u64().unwrap() as usize;
    st[start..start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(nan.join("model.safetensors"), st).unwrap();
    let o = eval(&nan);
    let err = stderr(&o);
    assert!(!o.status.success() && err.contains("non-finite") && err.contains("model.safetensors"), "{err}");
    assert!(err.contains(&format!("`{}`", name.replace("transformer.", ""))) || err.contains("tensor `"), "{err}");

    // A 10-trillion-parameter config: refused with both figures before allocating anything
    // (unless this machine really has 38 TiB free).
    let huge = tmp("ten-trillion");
    std::fs::create_dir_all(&huge).unwrap();
    std::fs::write(
        huge.join("config.json"),
        r#"{"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 65536, "n_layer": 200, "n_head": 64}"#,
    )
    .unwrap();
    if shardc_runtime::machine::memory_available().is_some_and(|b| b < 1 << 45) {
        for cmd in ["eval", "train"] {
            let o = shardc(
                &[cmd, s(&huge), "--data", s(&tokens), "--batch", "1", "--seq", "8", "--steps", "1"]
                    [..if cmd == "eval" { 8 } else { 10 }],
            );
            let err = stderr(&o);
            assert!(!o.status.success() && err.contains("needs") && err.contains("available"), "{cmd}: {err}");
        }
    }

    // An unwritable checkpoint directory is reported before the first step, not after the last.
    let o = shardc(&[
        "train",
        s(&fixture),
        "--data",
        s(&tokens),
        "--batch",
        "2",
        "--seq",
        "8",
        "--steps",
        "3",
        "--checkpoint",
        "/proc/shardc-no-such-dir",
    ]);
    let err = stderr(&o);
    assert!(!o.status.success() && err.contains("--checkpoint /proc/shardc-no-such-dir: cannot write"), "{err}");
    assert!(!stdout(&o).contains("step 1") && !err.contains("step 1/"), "nothing trains: {err}");
}

/// `shardc export` inverts the importer: weights that went through a training step unchanged
/// (a learning rate far below every weight's ulp) come out bit for bit as the Hugging Face
/// fixture's, for GPT-2 (fused `c_attn` rebuilt from q, k, v) and Llama; a trained checkpoint's
/// export evaluates like the checkpoint itself. With the fixture venv (scripts/make_fixtures.sh),
/// transformers loads the exported directory and reproduces the fixture's loss.
#[test]
fn export_writes_what_hugging_face_and_import_read() {
    use shardc_ir::import::weights::read_tensors;
    for name in ["gpt2-tiny", "llama-tiny"] {
        let fixture = root().join("tests/fixtures/hf").join(name);
        let data = fixture.join("train_tokens.bin");
        let dir = tmp(&format!("export-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        let (ck, hf) = (dir.join("ck"), dir.join("hf"));
        let args = ["--batch", "2", "--seq", "8", "--steps", "1", "--lr", "1e-30", "--min-lr", "0", "--json"];
        let o = shardc(&[&["train", s(&fixture), "--data", s(&data), "--checkpoint", s(&ck)][..], &args].concat());
        assert!(o.status.success(), "{}", stderr(&o));
        let o = shardc(&["export", s(&ck), "--model", s(&fixture), "-o", s(&hf)]);
        assert!(o.status.success(), "{}", stderr(&o));
        let strip = |k: &str| k.trim_start_matches("transformer.").trim_start_matches("model.").to_string();
        let original: std::collections::HashMap<String, shardc_ir::Tensor> =
            read_tensors(&fixture.join("model.safetensors"))
                .unwrap()
                .into_iter()
                .map(|(k, v)| (strip(&k), v))
                .collect();
        let exported = read_tensors(&hf.join("model.safetensors")).unwrap();
        assert_eq!(exported.len(), original.len(), "{name}: every tensor once");
        for (k, t) in &exported {
            let o = &original[&strip(k)];
            assert_eq!((&t.shape, t.to_f32()), (&o.shape, o.to_f32()), "{name}: `{k}` differs from the fixture's");
        }
        // The exported directory evaluates like the original.
        let eval = |extra: &[&str]| {
            let o = shardc(
                &[
                    &["eval"][..],
                    extra,
                    &["--data", s(&fixture.join("tokens.bin")), "--batch", "2", "--seq", "16", "--json"],
                ]
                .concat(),
            );
            assert!(o.status.success(), "{}", stderr(&o));
            serde_json::from_str::<serde_json::Value>(&stdout(&o)).unwrap()["loss"].as_f64().unwrap()
        };
        assert_eq!(eval(&[s(&hf)]), eval(&[s(&fixture)]), "{name}");
        let python = root().join(".venv-fixtures/bin/python");
        let has_transformers = python.exists()
            && Command::new(&python).args(["-c", "import transformers"]).output().is_ok_and(|o| o.status.success());
        if !has_transformers {
            eprintln!(
                "{name}: no .venv-fixtures with transformers (scripts/make_fixtures.sh makes it): the transformers load is not checked here; the bit-exact comparison above is"
            );
            continue;
        }
        let script = "import sys, json, torch, transformers\n\
            m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).float().eval()\n\
            b = open(sys.argv[2], 'rb').read()\n\
            import struct\n\
            n = struct.unpack('<3i', b[:12])[2]\n\
            t = torch.tensor(struct.unpack('<%dH' % n, b[1024:1024 + 2 * n]), dtype=torch.long)\n\
            x, y = t[:32].view(2, 16), t[1:33].view(2, 16)\n\
            torch.set_grad_enabled(False)\n\
            logits = m(x).logits\n\
            print(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item())\n";
        let o = Command::new(&python).args(["-c", script, s(&hf), s(&fixture.join("tokens.bin"))]).output().unwrap();
        assert!(o.status.success(), "{name}: transformers could not load the export: {}", stderr(&o));
        let loss: f64 = stdout(&o).trim().parse().unwrap();
        let want = expected_loss(name);
        assert!(
            ((loss - want) / want).abs() < 1e-5,
            "{name}: transformers gives {loss} on the export, {want} on the fixture"
        );
    }
}
