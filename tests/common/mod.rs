//! Helpers shared by the integration tests.

// Each test crate uses a subset of these helpers.
#![allow(dead_code)]

pub mod adamw;

use shardc_ir::tensor::max_rel_error;
use std::path::{Path, PathBuf};

/// Compares a trained parameter with a reference: relative error below `tol`, except GPT-2's
/// attention key bias. Its gradient is zero in exact arithmetic (softmax ignores a shift of all
/// scores of a query), so Adam turns rounding noise into steps of up to `lr` in either run: it
/// is only bounded by how far `steps` such steps can move it.
pub fn check_param(what: &str, name: &str, got: &[f64], want: &[f64], tol: f64, steps: usize, lr: f64) -> f64 {
    if name.ends_with("attn.k.bias") {
        let diff = got.iter().zip(want).fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff <= 2.0 * steps as f64 * lr,
            "{what}: %{name} moved {diff}, more than {steps} Adam steps of lr {lr} can"
        );
        return 0.0;
    }
    let err = max_rel_error(got, want);
    assert!(err < tol, "{what}: %{name}: rel err {err:e}");
    err
}

/// The text after `# key` on the comment lines of a test file, trimmed.
pub fn directives<'a>(src: &'a str, key: &str) -> Vec<&'a str> {
    src.lines()
        .filter_map(|l| l.trim().strip_prefix('#'))
        .filter_map(|l| l.trim().strip_prefix(key))
        .map(str::trim)
        .collect()
}

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every file below `rel` (relative to the repository root) whose name ends with `suffix`,
/// recursively, in sorted order.
pub fn files_ending(rel: &str, suffix: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, suffix: &str, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            if p.is_dir() {
                walk(&p, suffix, out);
            } else if p.file_name().is_some_and(|f| f.to_string_lossy().ends_with(suffix)) {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&root().join(rel), suffix, &mut out);
    out
}

/// Collectives over `tp` of one transformer layer in a `shardc plan --format json` document:
/// [all_reduce, all_gather, reduce_scatter] in the forward, then the same in the backward.
/// Sums of replicated parameters' gradients (gradient synchronisation, as Megatron does it)
/// are not counted.
pub fn tp_layer_counts(p: &serde_json::Value, layer: u64) -> [usize; 6] {
    let count = |phase: &str, kind: &str| {
        p["collectives"]
            .as_array()
            .expect("collectives")
            .iter()
            .filter(|c| c["layer"].as_u64() == Some(layer) && c["axis"] == "tp")
            .filter(|c| c["phase"] == phase && c["kind"] == kind)
            .filter(|c| !c["rule"].as_str().unwrap_or("").contains("replicated-parameter"))
            .count()
    };
    [
        count("forward", "all_reduce"),
        count("forward", "all_gather"),
        count("forward", "reduce_scatter"),
        count("backward", "all_reduce"),
        count("backward", "all_gather"),
        count("backward", "reduce_scatter"),
    ]
}
