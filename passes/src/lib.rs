//! IR to IR transformations and the analyses behind `shardc plan`.
//!
//! Not built yet. Its boundaries, fixed by DESIGN.md: every pass takes verified IR and returns
//! verified IR; the pipeline is autodiff, sharding (an egg e-graph whose language is private to
//! this crate), collectives, zero, localize, fusion and memory planning. Each pass's doc states
//! what holds after it, with a before/after example that is also a golden test under
//! `tests/passes/<pass>/`.
//!
//! Architecture Invariant: this crate never touches a GPU, MLIR or the file system.
