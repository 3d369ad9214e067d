//! Canonical form of the e-graph.
//!
//! `canonical/same-value-same-layout`: two classes that denote the same forward value in the
//! same (replicated or split) layout hold the same numbers on every rank, so they are one class. (Different rules
//! reach, say, the sequence shard of a residual both by `shard` of the replicated sum and by a
//! sum of shards; this law lets the extraction see both as one choice.)

use super::{classes_by_layout, Layout, Search};
use egg::Id;

/// Pairs of classes to merge.
pub fn same_value_same_layout(s: &Search) -> Vec<(Id, Id)> {
    let mut unions = Vec::new();
    for ((_, layout), ids) in classes_by_layout(s) {
        // Partial sums of one value may split it into different addends: not merged.
        if layout == Layout::Partial {
            continue;
        }
        for &other in &ids[1..] {
            unions.push((ids[0], other));
        }
    }
    unions
}
