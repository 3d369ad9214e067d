//! IR to IR transformations and the analyses behind `shardc plan`.
//!
//! Built: [`sharding`] (tensor and sequence parallelism by equality saturation over an egg
//! e-graph whose language is private to this crate, then localized to a per-rank program),
//! [`autodiff`] (reverse mode over the whole op table, collectives included), [`train_step`]
//! (the whole step: forward, backward, gradient synchronisation and ZeRO over `dp`, clipping,
//! AdamW), [`fusion`] (kernels of the per-rank program), [`cost`] and [`plan`]. Coming
//! (DESIGN.md): memory planning. Every pass
//! takes verified IR and returns verified IR; each pass's doc states what holds after it, with a
//! before/after example that is also a golden test under `tests/passes/<pass>/`.
//!
//! Architecture Invariant: this crate never touches a GPU, MLIR or the file system.

pub mod analysis;
pub mod autodiff;
pub mod bucket;
pub mod causal;
pub mod cost;
pub mod fusion;
pub mod gather_late;
pub mod lowering;
pub mod memory;
pub mod pipeline;
pub mod plan;
pub mod sharding;
pub mod strategy;
pub mod train_step;
