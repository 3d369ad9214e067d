//! The e-graph language of the sharding pass: the forward graph's ops over layout-carrying
//! children, plus the collectives and the free `shard` that change a value's layout.
//!
//! A term denotes what *one rank* holds of one forward value: the value is fixed by the term
//! (an op node names its forward node; a collective or shard denotes its child's value) and the
//! layout follows from the children (see [`super::Layout`]).

use egg::{Id, Language};
use std::fmt;

/// One e-node. Dimensions are indices into the value's global shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Sh {
    /// A graph argument (parameter or input), replicated on every rank.
    Arg(u32),
    /// Forward node `n` (its op and attributes) applied to the children, in the layout its
    /// children imply.
    Op(u32, Vec<Id>),
    /// This rank's chunk of a replicated value along a dim: no communication.
    Shard(u8, [Id; 1]),
    /// Concatenates the chunks of a value split along a dim.
    AllGather(u8, [Id; 1]),
    /// Sums a partial value.
    AllReduce([Id; 1]),
    /// Sums a partial value and keeps this rank's chunk along a dim.
    ReduceScatter(u8, [Id; 1]),
    /// Embedding node `n` on a vocabulary shard of its table: rows outside the shard give
    /// zeros, so the result is a partial sum (Megatron's VocabParallelEmbedding).
    VocabEmbedding(u32, [Id; 2]),
    /// Cross-entropy node `n` of logits split over the vocabulary: the max, the sum of
    /// exponentials and the target logit are all-reduced (Megatron's vocab-parallel
    /// cross-entropy); the result is replicated.
    VocabCrossEntropy(u32, [Id; 2]),
}

/// What distinguishes two e-nodes apart from their children.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ShKind {
    Arg(u32),
    Op(u32, usize),
    Shard(u8),
    AllGather(u8),
    AllReduce,
    ReduceScatter(u8),
    VocabEmbedding(u32),
    VocabCrossEntropy(u32),
}

impl Language for Sh {
    type Discriminant = ShKind;

    fn discriminant(&self) -> ShKind {
        match self {
            Sh::Arg(a) => ShKind::Arg(*a),
            Sh::Op(n, c) => ShKind::Op(*n, c.len()),
            Sh::Shard(d, _) => ShKind::Shard(*d),
            Sh::AllGather(d, _) => ShKind::AllGather(*d),
            Sh::AllReduce(_) => ShKind::AllReduce,
            Sh::ReduceScatter(d, _) => ShKind::ReduceScatter(*d),
            Sh::VocabEmbedding(n, _) => ShKind::VocabEmbedding(*n),
            Sh::VocabCrossEntropy(n, _) => ShKind::VocabCrossEntropy(*n),
        }
    }

    fn matches(&self, other: &Self) -> bool {
        self.discriminant() == other.discriminant()
    }

    fn children(&self) -> &[Id] {
        match self {
            Sh::Arg(_) => &[],
            Sh::Op(_, c) => c,
            Sh::Shard(_, c) | Sh::AllGather(_, c) | Sh::AllReduce(c) | Sh::ReduceScatter(_, c) => c,
            Sh::VocabEmbedding(_, c) | Sh::VocabCrossEntropy(_, c) => c,
        }
    }

    fn children_mut(&mut self) -> &mut [Id] {
        match self {
            Sh::Arg(_) => &mut [],
            Sh::Op(_, c) => c,
            Sh::Shard(_, c) | Sh::AllGather(_, c) | Sh::AllReduce(c) | Sh::ReduceScatter(_, c) => c,
            Sh::VocabEmbedding(_, c) | Sh::VocabCrossEntropy(_, c) => c,
        }
    }
}

impl fmt::Display for Sh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sh::Arg(a) => write!(f, "arg{a}"),
            Sh::Op(n, _) => write!(f, "node{n}"),
            Sh::Shard(d, _) => write!(f, "shard[{d}]"),
            Sh::AllGather(d, _) => write!(f, "all_gather[{d}]"),
            Sh::AllReduce(_) => write!(f, "all_reduce"),
            Sh::ReduceScatter(d, _) => write!(f, "reduce_scatter[{d}]"),
            Sh::VocabEmbedding(n, _) => write!(f, "vocab_embedding{n}"),
            Sh::VocabCrossEntropy(n, _) => write!(f, "vocab_cross_entropy{n}"),
        }
    }
}
