//! IR to IR transformations and the analyses behind `shardc plan`.
//!
//! Built: [`autodiff`] (reverse mode over the whole op table, collectives included) and
//! [`train_step`] (the whole step: forward, backward, clipping, AdamW).
//! Coming (DESIGN.md): sharding (an egg e-graph whose language is private to this crate),
//! collectives, zero, localize, fusion and memory planning. Every pass takes verified IR and
//! returns verified IR; each pass's doc states what holds after it, with a before/after example
//! that is also a golden test under `tests/passes/<pass>/`.
//!
//! Architecture Invariant: this crate never touches a GPU, MLIR or the file system.

pub mod analysis;
pub mod autodiff;
pub mod cost;
pub mod pipeline;
pub mod plan;
pub mod sharding;
pub mod train_step;
