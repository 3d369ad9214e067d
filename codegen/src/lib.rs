//! Per-rank IR to MLIR to PTX and host code, and the bundle format.
//!
//! Not built yet. Its boundaries, fixed by DESIGN.md: input is a verified, localized per-rank
//! graph from `shardc-passes`; kernels are described once (scf.parallel / linalg over static
//! memrefs) and lowered two ways, to PTX (gpu + nvvm dialects, checked with ptxas) and to host
//! code (checked against the reference interpreter); matmuls become library calls (cuBLASLt on
//! the GPU, a tuned GEMM on the host). Output is a self-contained bundle.
//!
//! Architecture Invariant: the only crate that uses melior/MLIR. It executes nothing.
