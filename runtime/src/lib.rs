//! Executes compiled training steps.
//!
//! Today: token files and batches ([`data`]), parameter initialisation ([`init`]), the host
//! training loop's state ([`train`]), checkpoints ([`checkpoint`]), codegen's host kernels
//! ([`host_kernels`]), the host executor ([`exec`]: a compiled program on rank threads in the
//! planned arena) and the in-process communicator ([`comm`]); the reference interpreter in
//! `shardc-ir` is the oracle.
//!
//! Where this crate is going (DESIGN.md): a device-independent executor (schedule, memory
//! arena, checkpoints, data loading, metrics) over two traits, `Device` (Host, Cuda) and
//! `Communicator` (threads in one process; NCCL), running bundles produced by `shardc-codegen`.
//!
//! Architecture Invariant: this is the only crate that touches CUDA (through cudarc, loaded at
//! run time) and the only one that does device or network I/O. It never runs MLIR or a
//! compiler: a bundle is self-contained.

pub mod checkpoint;
pub mod comm;
pub mod data;
pub mod exec;
pub mod host_kernels;
pub mod init;
pub mod machine;
pub mod matmul;
mod native;
pub mod train;
