//! `shardc plan --format json` read by a program: the fields issue 4 names, ZeRO's communication
//! volumes and the per-device model-state memory of each stage, on the bundled char-level GPT.

use std::path::PathBuf;
use std::process::Command;

fn plan(args: &[&str]) -> serde_json::Value {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/shakespeare-char");
    let o = Command::new(env!("CARGO_BIN_EXE_shardc"))
        .args(["plan", model.to_str().unwrap(), "--batch", "8", "--seq", "64", "--format", "json"])
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("stdout is one JSON document")
}

#[test]
fn plan_json_has_the_documented_fields() {
    let p = plan(&["--mesh", "dp=4", "--zero", "1"]);
    for key in [
        "params_total",
        "mesh",
        "collectives",
        "memory_per_device",
        "comm_bytes_per_step",
        "flops_per_step",
        "predicted_step_seconds",
    ] {
        assert!(p.get(key).is_some(), "missing `{key}` in {p}");
    }
    for key in ["params", "grads", "optimizer", "activations", "total"] {
        assert!(p["memory_per_device"][key].as_u64().is_some(), "missing memory_per_device.{key}");
    }
    assert_eq!(p["mesh"]["dp"], 4);
    let c = &p["collectives"][0];
    for key in ["kind", "axis", "bytes", "phase", "rule"] {
        assert!(c.get(key).is_some(), "collective without `{key}`: {c}");
    }
    let kinds: std::collections::BTreeSet<&str> =
        p["collectives"].as_array().unwrap().iter().map(|c| c["kind"].as_str().unwrap()).collect();
    assert!(kinds.iter().all(|k| ["all_reduce", "all_gather", "reduce_scatter", "all_to_all"].contains(k)));
    assert!(
        p["collectives"].as_array().unwrap().iter().any(|c| c["layer"].as_u64() == Some(3)),
        "per-layer attribution"
    );
    assert!(p["flops_per_step"].as_f64().unwrap() > 0.0 && p["predicted_step_seconds"].as_f64().unwrap() > 0.0);
}

/// Communication per step over dp in units of the parameters' bytes: ZeRO's 2 Psi for stages
/// 0-2 and (up to) 3 Psi for stage 3. Memory: with Psi parameters, Nd = 4 ranks, f32 master
/// parameters, f32 gradients and f32 moments, the model states per device are
/// 16 Psi (stage 0), 4 Psi + 12 Psi/Nd (stages 1 and 2: the graph is the same) and 16 Psi/Nd
/// (stage 3), in bytes, up to the padding of each parameter to a multiple of Nd.
#[test]
fn zero_volumes_and_memory_per_stage() {
    let nd = 4.0;
    for stage in 0..=3u8 {
        let p = plan(&["--mesh", "dp=4", "--zero", &stage.to_string()]);
        let psi = p["params_total"].as_f64().unwrap();
        let comm = p["comm_bytes_per_step"]["dp"].as_f64().unwrap() / (4.0 * psi);
        let m = &p["memory_per_device"];
        let states =
            (m["params"].as_f64().unwrap() + m["grads"].as_f64().unwrap() + m["optimizer"].as_f64().unwrap()) / psi;
        let want = match stage {
            0 => 16.0,
            1 | 2 => 4.0 + 12.0 / nd,
            _ => 16.0 / nd,
        };
        eprintln!(
            "stage {stage}: comm {comm:.4} Psi (f32 bytes), model states {states:.4} Psi bytes (expected {want})"
        );
        let (lo, hi) = if stage == 3 { (2.5, 3.0) } else { (2.0, 2.0001) };
        assert!(comm >= lo && comm <= hi, "stage {stage}: {comm} Psi");
        assert!((states - want).abs() / want < 1e-3, "stage {stage}: model states {states} Psi bytes, expected {want}");
    }
}

#[test]
fn memory_budget_is_checked() {
    let p = plan(&["--memory-budget", "1MiB"]);
    assert_eq!(p["memory_budget"].as_f64(), Some(1048576.0));
    assert_eq!(p["fits_memory_budget"], false, "the char-level GPT's step does not fit in 1 MiB");
    let p = plan(&["--memory-budget", "80GiB"]);
    assert_eq!(p["fits_memory_budget"], true);
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/shakespeare-char");
    let o = Command::new(env!("CARGO_BIN_EXE_shardc"))
        .args(["plan", model.to_str().unwrap(), "--memory-budget", "80Gx"])
        .output()
        .unwrap();
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("unknown unit `Gx`"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
