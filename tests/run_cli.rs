//! `shardc compile -o step.shardc`, `shardc inspect` and `shardc run` end to end, as a user runs
//! them: the bundle of the tiny GPT-2 fixture on dp=2 x tp=2 (ZeRO-1, sequence parallelism),
//! trained by the host engine from the bundle, against `shardc train` on the interpreter;
//! checkpoints and resume; damaged bundles refused by name.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("shardc-run-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn shardc<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_shardc")).args(args).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn losses(stdout: &str) -> Vec<f64> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["loss"].as_f64())
        .collect()
}

const MESH: [&str; 7] = ["--mesh", "dp=2,tp=2", "--zero", "1", "--sequence-parallel", "--precision", "f32"];

fn model() -> String {
    root().join("tests/fixtures/hf/gpt2-tiny").to_str().unwrap().to_string()
}

fn tokens() -> String {
    root().join("tests/fixtures/hf/gpt2-tiny/train_tokens.bin").to_str().unwrap().to_string()
}

fn compile(dir: &Path) -> PathBuf {
    let bundle = dir.join("step.shardc");
    let (code, _, err) = shardc(
        &[&["compile", &model(), "--batch", "4", "--seq", "8"][..], &MESH, &["-o", bundle.to_str().unwrap()]].concat(),
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("wrote") && err.contains("kernels for the host, sm_80 and sm_90"), "{err}");
    bundle
}

#[test]
fn a_bundle_runs_like_the_interpreter_and_resumes_exactly() {
    let dir = tmp("equal");
    let bundle = compile(&dir);
    let b = bundle.to_str().unwrap();

    let (code, out, err) = shardc(&["inspect", b]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("mesh dp=2, tp=2") && out.contains("memory plan: arena") && out.contains("kernels:"), "{out}");
    let (code, out, _) = shardc(&["inspect", b, "--json"]);
    assert_eq!(code, 0);
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(doc["kernels"].as_array().unwrap().len() > 20, "{doc}");
    assert_eq!(doc["plan"]["setup"]["tp"], 2);

    // A constant rate (--min-lr = --lr), so that a run stopped at step 3 has the same schedule.
    let steps = ["--steps", "6", "--lr", "3e-3", "--min-lr", "3e-3", "--json", "--data-order", "sequential"];
    let ckpt = dir.join("ckpt");
    let (code, out, err) = shardc(
        &[
            &["run", b, "--data", &tokens(), "--weights", &model()][..],
            &steps,
            &["--checkpoint", ckpt.to_str().unwrap()],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{err}");
    let host = losses(&out);
    let (code, out, err) = shardc(
        &[
            &["train", &model(), "--data", &tokens(), "--batch", "4", "--seq", "8", "--engine", "interp"][..],
            &MESH,
            &steps,
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{err}");
    let interp = losses(&out);
    assert_eq!(host.len(), 6);
    for (k, (h, i)) in host.iter().zip(&interp).enumerate() {
        assert!(((h - i) / i).abs() < 1e-4, "step {}: run {h}, train --engine interp {i}", k + 1);
    }

    // Stop after 3 steps, resume to 6: the same curve, bit for bit.
    let part = dir.join("part");
    let first = ["--steps", "3", "--lr", "3e-3", "--min-lr", "3e-3", "--json", "--data-order", "sequential"];
    let (code, _, err) = shardc(
        &[
            &["run", b, "--data", &tokens(), "--weights", &model()][..],
            &first,
            &["--checkpoint", part.to_str().unwrap()],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{err}");
    let (code, out, err) =
        shardc(&[&["run", b, "--data", &tokens()][..], &steps, &["--resume", part.to_str().unwrap()]].concat());
    assert_eq!(code, 0, "{err}");
    assert_eq!(losses(&out), host[3..].to_vec(), "the resumed run continues the curve exactly");

    // --report (one JSON line) and --trace (Chrome's trace format, a track per rank).
    let trace = dir.join("trace.json");
    let (code, out, err) = shardc(&[
        "run",
        b,
        "--data",
        &tokens(),
        "--steps",
        "2",
        "--json",
        "--report",
        "--trace",
        trace.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let ranks = report["report"]["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 4, "{report}");
    // What `shardc plan` predicts for these options is what each rank allocated and used.
    let (code, out, err) =
        shardc(&[&["plan", &model(), "--batch", "4", "--seq", "8"][..], &MESH, &["--format", "json"]].concat());
    assert_eq!(code, 0, "{err}");
    let plan: serde_json::Value = serde_json::from_str(&out).unwrap();
    let planned = plan["memory_plan"]["arena_bytes"].as_f64().unwrap();
    for r in ranks {
        let (hw, predicted) = (r["arena_high_water_bytes"].as_f64().unwrap(), r["predicted_bytes"].as_f64().unwrap());
        assert_eq!(predicted, planned, "the run's plan is `shardc plan`'s");
        assert!(
            hw <= predicted && hw >= 0.97 * predicted,
            "rank {}: high-water {hw} vs planned {predicted}",
            r["rank"]
        );
        assert!(r["seconds_per_step"]["gemm"]["calls_per_step"].as_u64().unwrap() > 0, "{r}");
    }
    let t: serde_json::Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
    let events = t["traceEvents"].as_array().unwrap();
    let tracks: std::collections::BTreeSet<u64> = events.iter().filter_map(|e| e["tid"].as_u64()).collect();
    assert_eq!(tracks.len(), 4);
    assert!(events.iter().any(|e| e["cat"].as_str().is_some_and(|c| c.starts_with("collective"))));
    assert!(events.iter().any(|e| e["cat"] == "gemm") && events.iter().any(|e| e["ph"] == "M"));

    // The checkpoint holds whole parameters: eval reads it on one device.
    let (code, out, err) = shardc(&[
        "eval",
        &model(),
        "--data",
        &tokens(),
        "--batch",
        "2",
        "--seq",
        "8",
        "--weights",
        ckpt.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("mean cross-entropy"), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn damaged_bundles_are_refused_by_name() {
    let dir = tmp("damaged");
    let bundle = compile(&dir);
    let bytes = std::fs::read(&bundle).unwrap();
    let run = |path: &Path| shardc(&["run", path.to_str().unwrap(), "--data", &tokens(), "--steps", "1"]);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "flipped",
            {
                let mut b = bytes.clone();
                let i = b.len() / 2;
                b[i] ^= 1;
                b
            },
            "corrupted",
        ),
        ("truncated", bytes[..bytes.len() - 100].to_vec(), "bundle"),
        (
            "version",
            {
                let mut b = bytes.clone();
                b[8] = 99;
                b
            },
            "format version 99",
        ),
        ("not", b"PK\x03\x04 a zip file".to_vec(), "not a shardc bundle"),
    ];
    for (name, data, want) in cases {
        let p = dir.join(format!("{name}.shardc"));
        std::fs::write(&p, data).unwrap();
        let (code, _, err) = run(&p);
        assert_ne!(code, 0, "{name}: {err}");
        assert!(err.contains(want) && !err.contains("panicked"), "{name}: {err}");
    }
    let (code, _, err) = run(&dir.join("missing.shardc"));
    assert!(code != 0 && err.contains("missing.shardc"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
