//! shardc's intermediate representation.
//!
//! A [`Graph`] is one SPMD program over a device [`Mesh`]: typed SSA values with static shapes,
//! nodes in topological order, named arguments (parameters and data inputs) and outputs. Every
//! op is described once in the op table ([`ops`]); the parser, printer, verifier and interpreter
//! all read that table.
//!
//! Architecture Invariant: this crate knows nothing of egg, MLIR or CUDA. It is the vocabulary
//! every other crate speaks, and its interpreter ([`interp`]) is the oracle they are checked
//! against.

pub mod attrs;
pub mod graph;
mod id;
pub mod import;
pub mod interp;
pub mod mesh;
pub mod ops;
pub mod program;
pub mod sharding;
pub mod tensor;
pub mod text;
pub mod types;
pub mod verify;

pub use attrs::{Attr, Attrs};
pub use graph::{Arg, ArgKind, Builder, Graph, Node, Renumbering, Signature, Value, ValueId};
pub use mesh::Mesh;
pub use ops::Op;
pub use program::{
    ArgRole, FlatShard, Init, Moment, Origin, Output, OutputRole, ParamLayout, Phase, Split, StepRule, ZeroStage,
};
pub use sharding::Sharding;
pub use tensor::{Data, Tensor};
pub use types::{DType, Shape, TensorType, MAX_TENSOR_BYTES};
