//! `shardc plan`: the plan of a training step, for people (text) or programs (JSON).

use crate::cli::{PlanArgs, PlanFormat};
use crate::commands::thousands;
use crate::model::load_graph;
use anyhow::{anyhow, bail, Context, Result};
use shardc_ir::Mesh;
use shardc_passes::cost::DeviceModel;
use shardc_passes::plan::{plan as plan_step, Plan};
use shardc_passes::train_step::{build_data_parallel_step, AdamW, DataParallel};
use std::collections::BTreeMap;

/// `80GiB`, `40GB`, `512MiB`, `1.5TiB` or a plain number of bytes.
pub fn parse_bytes(text: &str) -> Result<f64> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 =
        num.parse().map_err(|_| anyhow!("`{text}` is not a size; write e.g. 80GiB, 40GB or 1000000000"))?;
    let scale = match unit.trim() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KiB" => 1024.0,
        "MiB" => 1024f64.powi(2),
        "GiB" => 1024f64.powi(3),
        "TiB" => 1024f64.powi(4),
        other => bail!("`{text}`: unknown unit `{other}`; use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB"),
    };
    Ok(value * scale)
}

fn gib(bytes: usize) -> String {
    format!("{:.3} GiB", bytes as f64 / (1u64 << 30) as f64)
}

pub fn plan(a: &PlanArgs) -> Result<()> {
    let device = match &a.device_model {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
            DeviceModel::from_toml(&text).map_err(|e| anyhow!("{}: {e}", p.display()))?
        }
        None => DeviceModel::h100(),
    };
    let mesh = match &a.mesh {
        Some(m) => Mesh::parse(m).map_err(|e| anyhow!("--mesh {m}: {e}"))?,
        None => Mesh::default(),
    };
    if let Some(other) = mesh.axes.iter().find(|x| x.name != "dp") {
        bail!(
            "--mesh: axis `{}` is not supported yet; plans cover data parallelism (`dp=N`) with ZeRO 0-3 today",
            other.name
        );
    }
    let dp = mesh.axis_size("dp").unwrap_or(1);
    if a.zero > 0 && dp == 1 && a.mesh.is_none() {
        bail!("--zero {} needs a data-parallel mesh, e.g. --mesh dp=8", a.zero);
    }
    if a.zero > 3 {
        bail!("--zero {}: ZeRO has stages 0, 1, 2 and 3", a.zero);
    }
    if !a.batch.is_multiple_of(dp) {
        bail!("--batch {} does not divide over dp={dp}; use a batch that is a multiple of {dp}", a.batch);
    }
    let seq = a.seq.unwrap_or_else(|| crate::model::default_seq(&a.model));
    let mut graph = load_graph(&a.model, a.batch / dp, seq, a.precision.compute_dtype())?;
    let params_total = graph.param_count();
    graph.mesh = mesh.clone();
    let parallel = (!mesh.axes.is_empty()).then(|| DataParallel { axis: "dp".into(), zero_stage: a.zero });
    let step = build_data_parallel_step(&graph, &AdamW::default(), parallel.as_ref())?;
    let p = plan_step(&step, params_total, &device);
    let budget = match &a.memory_budget {
        Some(b) => parse_bytes(b).map_err(|e| anyhow!("--memory-budget: {e}"))?,
        None => device.memory_bytes,
    };
    let fits = p.memory_per_device.total as f64 <= budget;
    match a.format {
        PlanFormat::Json => {
            let mut v = serde_json::to_value(&p)?;
            v["memory_budget"] = serde_json::json!(budget);
            v["fits_memory_budget"] = serde_json::json!(fits);
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        PlanFormat::Text => {
            print_text(&p, a, seq, &device, &graph.name);
            let verdict = if fits { "fits" } else { "does NOT fit" };
            println!(
                "memory: {} per device {verdict} the budget of {} ({})",
                gib(p.memory_per_device.total),
                gib(budget as usize),
                if a.memory_budget.is_some() { "--memory-budget" } else { "the device model's memory" }
            );
        }
    }
    Ok(())
}

fn print_text(p: &Plan, a: &PlanArgs, seq: usize, device: &DeviceModel, name: &str) {
    let mesh = if p.mesh.is_empty() {
        "single device".to_string()
    } else {
        p.mesh.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
    };
    let precision = match a.precision {
        crate::cli::TrainPrecision::F32 => "f32",
        crate::cli::TrainPrecision::Bf16Mixed => "bf16 mixed precision",
    };
    println!(
        "plan: {name}, {} parameters, batch {} x {seq} tokens, {mesh}, ZeRO stage {}, {precision}",
        thousands(p.params_total),
        a.batch,
        a.zero
    );
    println!("device model: {}", device.name);
    println!();
    let m = &p.memory_per_device;
    println!("memory per device");
    for (k, v) in [
        ("parameters", m.params),
        ("gradients", m.grads),
        ("optimizer state", m.optimizer),
        ("activations", m.activations),
        ("total", m.total),
    ] {
        println!("  {k:<16} {:>14} bytes  {:>12}", thousands(v), gib(v));
    }
    println!();
    println!("communication per step (ring volume, ZeRO's count)");
    if p.comm_bytes_per_step.is_empty() {
        println!("  none");
    }
    for (axis, bytes) in &p.comm_bytes_per_step {
        println!(
            "  {axis:<4} {:>16} bytes  ({:.3} x the parameters' f32 bytes)",
            thousands(*bytes as usize),
            bytes / (p.params_total as f64 * 4.0).max(1.0)
        );
    }
    println!();
    // Collectives grouped by (phase, kind, axis, rule).
    let mut groups: BTreeMap<(&str, &str, &str, &str), (usize, usize)> = BTreeMap::new();
    for c in &p.collectives {
        let e = groups.entry((c.phase, c.kind, c.axis.as_str(), c.rule.as_str())).or_insert((0, 0));
        e.0 += 1;
        e.1 += c.bytes;
    }
    println!("collectives ({})", p.collectives.len());
    for ((phase, kind, axis, rule), (count, bytes)) in groups {
        println!("  {phase:<9} {count:>4} x {kind:<15} over {axis:<3} {:>14} bytes  {rule}", thousands(bytes));
    }
    println!();
    println!("FLOPs per step per device: {:.3e}", p.flops_per_step);
    println!(
        "predicted step time: {:.3} ms (roofline compute + alpha-beta collectives, no overlap)",
        p.predicted_step_seconds * 1e3
    );
}
