//! Pass pipelines as strings, shared by `shardc opt --passes=...` and the golden tests.
//!
//! ```text
//! pipeline := pass (',' pass)*
//! pass     := NAME ('{' KEY '=' VALUE (' ' KEY '=' VALUE)* '}')?
//! ```
//! Passes:
//! - `autodiff`: gradients of the first output with respect to every parameter.
//! - `train-step`: the whole training step (autodiff, clipping, AdamW), with the options
//!   `beta1`, `beta2`, `eps`, `weight-decay`, `grad-clip` (defaults: nanoGPT's), for data
//!   parallelism `dp=AXIS` and `zero=0..3`, and for tensor parallelism `tp=AXIS` and `sp=0|1`
//!   (the sharding pass runs first, inside the step, so the gradient norm knows the chunks).
//! - `shard`: the sharding pass ([`crate::sharding`]) on a forward graph whose mesh has the
//!   axis: `tp=AXIS` (default `tp`), `sp=0|1` (sequence parallelism), with the bundled H100
//!   device model. The result is the per-rank forward program.
//! - `fuse`: the fusion pass ([`crate::fusion`]) on a per-rank program: memory-bound ops become
//!   `fused` kernels (no options).
//! - `bucket`: collective bucketing ([`crate::bucket`]) on a per-rank step, `bytes=N` per
//!   bucket (default 25 MiB).

use crate::autodiff::differentiate;
use crate::train_step::{AdamW, DataParallel};
use shardc_ir::{ArgKind, Graph};
use std::collections::BTreeMap;

/// One pass with its options.
#[derive(Clone, Debug, PartialEq)]
pub struct PassSpec {
    pub name: String,
    pub options: BTreeMap<String, String>,
}

const PASSES: &[&str] = &["autodiff", "train-step", "shard", "fuse", "bucket"];

/// Parses a pipeline string; errors name the offending part.
pub fn parse_pipeline(text: &str) -> Result<Vec<PassSpec>, String> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let end = rest.find([',', '{']).unwrap_or(rest.len());
        let name = rest[..end].trim().to_string();
        if !PASSES.contains(&name.as_str()) {
            return Err(format!("unknown pass `{name}`; passes are {}", PASSES.join(", ")));
        }
        rest = &rest[end..];
        let mut options = BTreeMap::new();
        if let Some(body) = rest.strip_prefix('{') {
            let close = body.find('}').ok_or_else(|| format!("pass `{name}`: `{{` without `}}`"))?;
            for kv in body[..close].split_whitespace() {
                let (k, v) =
                    kv.split_once('=').ok_or_else(|| format!("pass `{name}`: option `{kv}` must be KEY=VALUE"))?;
                options.insert(k.to_string(), v.to_string());
            }
            rest = &body[close + 1..];
        }
        rest = rest.trim_start().strip_prefix(',').unwrap_or(rest).trim_start();
        out.push(PassSpec { name, options });
    }
    if out.is_empty() {
        return Err("the pipeline is empty".into());
    }
    Ok(out)
}

fn number(spec: &PassSpec, key: &str, default: f64) -> Result<f64, String> {
    spec.options
        .get(key)
        .map_or(Ok(default), |v| v.parse().map_err(|_| format!("pass `{}`: `{key}={v}` is not a number", spec.name)))
}

fn check_options(spec: &PassSpec, known: &[&str]) -> Result<(), String> {
    match spec.options.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(format!(
            "pass `{}` has no option `{k}`; it takes {}",
            spec.name,
            if known.is_empty() { "none".into() } else { known.join(", ") }
        )),
        None => Ok(()),
    }
}

/// The sharding pass's options from a pass's `sp` option, for the mesh axis `axis` of `g`.
fn tp_options(spec: &PassSpec, g: &Graph, axis: &str) -> Result<crate::sharding::ShardOptions, String> {
    let size = g.mesh.axis_size(axis).ok_or_else(|| {
        format!("pass `{}`: the graph's mesh `{}` has no axis `{axis}`; add a `mesh {axis}=N` line", spec.name, g.mesh)
    })?;
    let sequence_parallel = number(spec, "sp", 0.0)? != 0.0;
    Ok(crate::sharding::ShardOptions { axis: axis.to_string(), size, sequence_parallel, seq_dim: 1 })
}

/// Runs one pass.
pub fn run_pass(spec: &PassSpec, g: &Graph) -> Result<Graph, String> {
    match spec.name.as_str() {
        "autodiff" => {
            check_options(spec, &[])?;
            let params: Vec<_> = g.args_of(ArgKind::Param).collect();
            let loss = crate::autodiff::loss_of(g).map_err(|e| e.to_string())?;
            Ok(differentiate(g, loss, &params).map_err(|e| e.to_string())?.graph)
        }
        "train-step" => {
            check_options(spec, &["beta1", "beta2", "eps", "weight-decay", "grad-clip", "dp", "zero", "tp", "sp"])?;
            // A per-rank program (collectives already in it) hides which parameters are chunks, so
            // the gradient norm could not be right: shard inside the step instead.
            if g.nodes
                .iter()
                .any(|n| n.op.is_collective() || matches!(n.op, shardc_ir::Op::Identity | shardc_ir::Op::TakeShard))
            {
                return Err("pass `train-step`: the graph is already a per-rank program (it has collectives), so the \
                            gradient norm cannot tell parameter chunks from replicated parameters; give the forward \
                            graph and the tensor-parallel options to train-step (`train-step{tp=tp sp=1 ...}`)"
                    .into());
            }
            let d = AdamW::default();
            let opt = AdamW {
                beta1: number(spec, "beta1", d.beta1)?,
                beta2: number(spec, "beta2", d.beta2)?,
                eps: number(spec, "eps", d.eps)?,
                weight_decay: number(spec, "weight-decay", d.weight_decay)?,
                grad_clip: number(spec, "grad-clip", d.grad_clip)?,
            };
            let zero = number(spec, "zero", 0.0)?;
            let stage = (zero.fract() == 0.0 && (0.0..=3.0).contains(&zero))
                .then(|| shardc_ir::ZeroStage::from_number(zero as u8))
                .flatten()
                .ok_or_else(|| format!("pass `train-step`: `zero={zero}` is not a ZeRO stage (0, 1, 2 or 3)"))?;
            let dp = match spec.options.get("dp") {
                Some(axis) => Some(DataParallel { axis: axis.clone(), zero_stage: stage }),
                None if zero != 0.0 => return Err("pass `train-step`: `zero` needs `dp=AXIS`".into()),
                None => None,
            };
            let tp = match spec.options.get("tp") {
                Some(axis) => Some(tp_options(spec, g, axis)?),
                None if spec.options.contains_key("sp") => return Err("pass `train-step`: `sp` needs `tp=AXIS`".into()),
                None => None,
            };
            let device = crate::cost::DeviceModel::h100();
            let (step, _) = crate::train_step::build_parallel_step(g, &opt, dp.as_ref(), tp.as_ref(), &device)
                .map_err(|e| e.to_string())?;
            Ok(step.graph)
        }
        "shard" => {
            check_options(spec, &["tp", "sp"])?;
            let axis = spec.options.get("tp").map_or("tp", String::as_str);
            let opts = tp_options(spec, g, axis)?;
            let device = crate::cost::DeviceModel::h100();
            Ok(crate::sharding::shard_forward(g, &opts, &device).map_err(|e| e.to_string())?.graph)
        }
        "fuse" => {
            check_options(spec, &[])?;
            Ok(crate::fusion::fuse(g).0)
        }
        "bucket" => {
            check_options(spec, &["bytes"])?;
            let bytes = number(spec, "bytes", crate::bucket::BUCKET_BYTES as f64)?;
            if bytes < 1.0 || bytes.fract() != 0.0 {
                return Err(format!("pass `bucket`: `bytes={bytes}` is not a positive whole number of bytes"));
            }
            Ok(crate::bucket::bucket(g, bytes as usize).0)
        }
        other => Err(format!("unknown pass `{other}`")),
    }
}

/// Runs a whole pipeline, verifying the graph after every pass.
pub fn run_pipeline(specs: &[PassSpec], g: &Graph) -> Result<Graph, String> {
    let mut g = g.clone();
    for spec in specs {
        g = run_pass(spec, &g)?;
        shardc_ir::verify::verify(&g)
            .map_err(|e| format!("after pass `{}` the graph does not verify (a compiler bug):\n{e}", spec.name))?;
    }
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipelines_parse_and_errors_name_the_part() {
        let p = parse_pipeline("autodiff").unwrap();
        assert_eq!(p[0].name, "autodiff");
        let p = parse_pipeline("train-step{dp=dp zero=1}").unwrap();
        assert_eq!(p[0].options["zero"], "1");
        assert!(parse_pipeline("frob").unwrap_err().contains("unknown pass `frob`"));
        assert!(parse_pipeline("train-step{dp}").unwrap_err().contains("KEY=VALUE"));
        assert!(parse_pipeline("").is_err());
    }

    #[test]
    fn sharding_refuses_multi_result_nodes_clearly() {
        let g = shardc_ir::text::parse(
            "graph g\nmesh tp=2\nparam %w: f32[4, 4]\ninput %x: f32[2, 4]\n\
             %h: f32[2, 4] = matmul(%x, %w)\n%a: f32[2, 1], %b: f32[2, 3] = split(%h) {dim = 1, sizes = [1, 3]}\n\
             %loss: f32[] = reduce_sum(%b) {dims = [0, 1]}\noutput %loss [loss]\n",
        )
        .unwrap();
        let e = run_pipeline(&parse_pipeline("shard").unwrap(), &g).unwrap_err();
        assert!(e.contains("`split` defining `%a` has 2 results"), "{e}");
        // Autodiff and the training step take them.
        let step =
            run_pipeline(&parse_pipeline("train-step").unwrap(), &shardc_ir::Graph { mesh: Default::default(), ..g })
                .unwrap();
        assert!(step.nodes.iter().any(|n| n.op == shardc_ir::Op::Split && n.outputs.len() == 2));
    }
}
