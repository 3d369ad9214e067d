//! `shardc inspect BUNDLE`: what a compiled bundle holds, as text or JSON.

use crate::commands::thousands;
use anyhow::Result;

/// `shardc inspect BUNDLE`: what a bundle holds.
pub fn inspect(a: &crate::cli::InspectArgs) -> Result<()> {
    let b = shardc_bundle::Bundle::read(&a.bundle)?;
    let h = &b.header;
    let g = &h.program;
    let size = std::fs::metadata(&a.bundle).map(|m| m.len()).unwrap_or(0);
    let arena = h.memory_plan.as_ref().map(|m| m.arena_bytes);
    let collectives = g.nodes.iter().filter(|n| n.op.is_collective()).count();
    if a.json {
        let doc = serde_json::json!({
            "file": a.bundle.display().to_string(),
            "bytes": size,
            "format_version": shardc_bundle::FORMAT_VERSION,
            "compiler_version": h.compiler_version,
            "model": h.model.name,
            "has_config": h.model.config_json.is_some(),
            "mesh": g.mesh.to_string(),
            "program": {"nodes": g.nodes.len(), "collectives": collectives, "kernels": h.kernels.len(), "parameter_elements_per_rank": g.param_count()},
            "arena_bytes_per_rank": arena,
            "host_target": h.host_target,
            "kernels": h.kernels.iter().map(|k| serde_json::json!({
                "name": k.name, "ops": k.ops, "work_items": k.work_items,
                "code": k.blobs.iter().map(|(kind, s)| serde_json::json!({"kind": kind, "section": h.sections[*s as usize].name, "bytes": h.sections[*s as usize].len})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "sections": h.sections,
            "plan": h.plan_json,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!(
        "{}: shardc bundle, format {}, written by shardc {}, {} bytes (checksums verified)",
        a.bundle.display(),
        shardc_bundle::FORMAT_VERSION,
        h.compiler_version,
        thousands(size as usize)
    );
    println!("model: {}{}", h.model.name, if h.model.config_json.is_some() { " (config.json included)" } else { "" });
    println!(
        "program: the per-rank training step on mesh {}: {} nodes, {} collectives, {} kernels, {} parameter elements per rank",
        if g.mesh.world_size() > 1 { g.mesh.to_string() } else { "(one device)".into() },
        g.nodes.len(),
        collectives,
        h.kernels.len(),
        thousands(g.param_count())
    );
    if let Some(m) = &h.memory_plan {
        println!(
            "memory plan: arena {} bytes per rank, {} values placed, {} updates copied back",
            thousands(m.arena_bytes as usize),
            thousands(m.slots.len()),
            m.copy_back.len()
        );
    }
    if let Some(t) = &h.host_target {
        println!(
            "host code: {} ({})",
            t.arch,
            if t.features.is_empty() { "baseline".to_string() } else { t.features.join(" ") }
        );
    }
    if let Some(p) = &h.plan_json {
        let step = p.pointer("/plan/predicted_step_seconds").and_then(|v| v.as_f64());
        let mem = p.pointer("/plan/memory_per_device/total").and_then(|v| v.as_u64());
        if let (Some(s), Some(m)) = (step, mem) {
            println!(
                "plan: predicted {:.3} ms per step, {} per device (shardc plan's model of the GPU run)",
                s * 1e3,
                crate::plan::gib(m as usize)
            );
        }
    }
    // Sections by what the kernel table says they hold (the host library is shared).
    let mut by_kind: std::collections::BTreeMap<&str, (usize, u64)> = Default::default();
    let mut seen = std::collections::HashSet::new();
    for (kind, section) in h.kernels.iter().flat_map(|k| &k.blobs) {
        if seen.insert(*section) {
            let kind = match kind {
                shardc_bundle::BlobKind::Mlir => "mlir",
                shardc_bundle::BlobKind::Ptx { .. } => "ptx",
                shardc_bundle::BlobKind::HostObject { .. } => "so",
            };
            let e = by_kind.entry(kind).or_default();
            e.0 += 1;
            e.1 += h.sections[*section as usize].len;
        }
    }
    println!(
        "sections: {}",
        by_kind
            .iter()
            .map(|(k, (n, b))| format!("{n} .{k} ({} bytes)", thousands(*b as usize)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("kernels:");
    for k in &h.kernels {
        println!("  {:<36} {:>8} work items  {}", k.name, k.work_items, k.ops.join(", "));
    }
    Ok(())
}
