//! Per-rank IR to MLIR to PTX and host code, written into a bundle (`shardc-bundle`).
//!
//! Built: [`bundle_step`], the bundle of a compiled step (program, model, plan) without kernels.
//! Not built yet (the kernels issue), with its boundaries fixed by DESIGN.md: input is a
//! verified, localized per-rank graph from `shardc-passes`; kernels are described once
//! (scf.parallel / linalg over static memrefs) and lowered two ways, to PTX (gpu + nvvm dialects,
//! checked with ptxas) and to host code (checked against the reference interpreter); matmuls
//! become library calls (cuBLASLt on the GPU, a tuned GEMM on the host). Each kernel's code goes
//! into the bundle as sections ([`shardc_bundle::BlobKind`]).
//!
//! Architecture Invariant: the only crate that uses melior/MLIR. It executes nothing.

pub mod mlir;

use shardc_bundle::{Bundle, ModelInfo};
use shardc_ir::Graph;

/// Why a step could not be bundled.
#[derive(Debug, thiserror::Error)]
pub enum CodegenError {
    #[error("the step does not verify (a compiler bug):\n{0}")]
    Unverified(String),
}

/// The bundle of a per-rank training step: the program (its signature included), the model it
/// was compiled from and, when given, the plan JSON. Kernels are added by the lowerings.
pub fn bundle_step(
    step: &Graph,
    model: ModelInfo,
    plan_json: Option<serde_json::Value>,
) -> Result<Bundle, CodegenError> {
    shardc_ir::verify::verify(step).map_err(|e| CodegenError::Unverified(e.to_string()))?;
    let mut b = Bundle::new(env!("CARGO_PKG_VERSION"), model, step.clone());
    b.header.plan_json = plan_json;
    Ok(b)
}
