//! The compiled step on the host: codegen's lowering (fusion, memory plan, host kernels)
//! loaded into the runtime's executor. Glue between `shardc-codegen` and `shardc-runtime`,
//! which do not know each other.

use anyhow::{Context, Result};
use shardc_ir::Graph;
use shardc_runtime::exec::HostProgram;
use shardc_runtime::host_kernels::HostKernels;
use std::time::Instant;

/// What loading cost, for the run's first lines.
pub struct Loaded {
    pub program: HostProgram,
    pub kernels: usize,
    pub compile_seconds: f64,
}

/// Compiles a per-rank step for the host and loads it.
pub fn load(step: &Graph) -> Result<Loaded> {
    let t = Instant::now();
    let host = shardc_codegen::compile_host(step).context("compiling the step's kernels for the host")?;
    let table: Vec<(&str, usize)> = host
        .program
        .nodes
        .iter()
        .filter(|n| n.op == shardc_ir::Op::Fused)
        .map(|n| (n.attrs.str("kernel").unwrap_or_default(), n.inputs.len() + n.outputs.len()))
        .collect();
    let kernels = table.len();
    let lib = HostKernels::load(&host.library, &table)?;
    let program = HostProgram::new(host.program, &host.memory, lib, host.kernels.into_iter().collect())?;
    Ok(Loaded { program, kernels, compile_seconds: t.elapsed().as_secs_f64() })
}
