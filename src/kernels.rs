//! `shardc compile --emit-kernels DIR`: every kernel of the fused step, as files to read.

use anyhow::{Context, Result};
use shardc_ir::Graph;
use std::path::Path;

/// Lowers the fused step's kernels and writes DIR/NAME.mlir, DIR/NAME.<arch>.ptx and
/// DIR/kernels.json.
pub fn emit(step: &Graph, dir: &Path) -> Result<()> {
    let kernels = shardc_codegen::lower_gpu(step, false)?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let write = |name: String, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))
    };
    let mut listing = Vec::new();
    for k in &kernels {
        write(format!("{}.mlir", k.desc.name), &k.desc.module())?;
        for (arch, ptx) in &k.ptx {
            write(format!("{}.{arch}.ptx", k.desc.name), ptx)?;
        }
        listing.push(serde_json::json!({
            "name": k.desc.name,
            "ops": k.desc.ops,
            "layout": k.desc.form,
            "work_items": k.desc.work_items,
            "gpu_block": shardc_codegen::mlir::GPU_TILE,
            "inputs": k.desc.inputs.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
            "outputs": k.desc.outputs.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
            "ptxas": k.ptxas,
        }));
    }
    let assembled = kernels.iter().all(|k| !k.ptxas.is_empty());
    let doc = serde_json::json!({
        "schema_version": 1,
        "abi": "NAME(lo: index, hi: index, operands..., results...): work items lo..hi; buffers are bare pointers to flat row-major arrays",
        "ptxas_checked": assembled,
        "kernels": listing,
    });
    write("kernels.json".into(), &serde_json::to_string_pretty(&doc)?)?;
    let regs = kernels.iter().flat_map(|k| k.ptxas.iter().map(|r| r.registers)).max();
    let spills: u32 =
        kernels.iter().flat_map(|k| k.ptxas.iter().map(|r| r.spill_stores_bytes + r.spill_loads_bytes)).sum();
    eprintln!(
        "wrote {} kernels to {} (.mlir, .sm_80.ptx, .sm_90.ptx, kernels.json){}",
        kernels.len(),
        dir.display(),
        match regs {
            Some(r) if assembled => format!("; ptxas: at most {r} registers, {spills} bytes of spills"),
            _ => "; ptxas not found, PTX not assembled (scripts/setup.sh installs it)".into(),
        }
    );
    Ok(())
}
