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
    /// The host library came from the kernel cache ([`cache_dir`]).
    pub cached: bool,
}

/// Compiles a per-rank step for the host and loads it.
pub fn load(step: &Graph) -> Result<Loaded> {
    let t = Instant::now();
    let cache = cache_dir();
    let host =
        shardc_codegen::compile_host(step, cache.as_deref()).context("compiling the step's kernels for the host")?;
    let table: Vec<(&str, usize)> = host
        .program
        .nodes
        .iter()
        .filter(|n| n.op == shardc_ir::Op::Fused)
        .map(|n| (n.attrs.str("kernel").unwrap_or_default(), n.inputs.len() + n.outputs.len()))
        .collect();
    let (kernels, cached) = (table.len(), host.cached);
    let lib = HostKernels::load(&host.library, &table)?;
    let program = HostProgram::new(host.program, &host.memory, lib, host.kernels.into_iter().collect())?;
    Ok(Loaded { program, kernels, compile_seconds: t.elapsed().as_secs_f64(), cached })
}

/// Where compiled host kernels are kept between runs: `$SHARDC_CACHE`, else
/// `$XDG_CACHE_HOME/shardc`, else `~/.cache/shardc`; none when `SHARDC_CACHE` is empty.
pub fn cache_dir() -> Option<std::path::PathBuf> {
    match std::env::var_os("SHARDC_CACHE") {
        Some(d) if d.is_empty() => None,
        Some(d) => Some(d.into()),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(std::path::PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache")))
            .map(|d| d.join("shardc")),
    }
}
