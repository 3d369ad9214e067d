//! Analyses of per-rank programs, behind `shardc plan`: which collectives run, over which mesh
//! axis, on how much data.
//!
//! Sizes are those of the full tensor a collective works on (the ring moves (n-1)/n of it per
//! rank): an `all_reduce`'s operand, an `all_gather`'s result, a `reduce_scatter`'s operand, an
//! `all_to_all`'s operand. Volumes are counted as the ZeRO paper counts them (an all-reduce of Psi
//! elements moves 2 Psi; see [`crate::cost`]).

use crate::cost::CollectiveKind;
use shardc_ir::{Graph, Op};
use std::collections::BTreeMap;

/// One collective of a program.
#[derive(Clone, Debug, PartialEq)]
pub struct CollectiveUse {
    pub kind: CollectiveKind,
    pub axis: String,
    /// Elements of the full tensor.
    pub elements: usize,
    pub bytes: usize,
    /// Index of the node in the graph.
    pub node: usize,
    /// The value it defines.
    pub value: String,
}

/// Every collective of `g`, in program order.
pub fn collectives(g: &Graph) -> Vec<CollectiveUse> {
    g.nodes
        .iter()
        .enumerate()
        .filter_map(|(i, n)| {
            let (kind, full) = match n.op {
                Op::AllReduce => (CollectiveKind::AllReduce, g.ty(n.inputs[0])),
                Op::AllGather => (CollectiveKind::AllGather, g.ty(n.output())),
                Op::ReduceScatter => (CollectiveKind::ReduceScatter, g.ty(n.inputs[0])),
                Op::AllToAll => (CollectiveKind::AllToAll, g.ty(n.inputs[0])),
                _ => return None,
            };
            Some(CollectiveUse {
                kind,
                axis: n.attrs.str("axis").unwrap_or_default().to_string(),
                elements: full.numel(),
                bytes: full.size_bytes(),
                node: i,
                value: g.name_of(n.output()).to_string(),
            })
        })
        .collect()
}

/// Communication volume per mesh axis, in elements, as ZeRO counts it.
pub fn volume_per_axis(g: &Graph) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for c in collectives(g) {
        *out.entry(c.axis).or_insert(0.0) += c.kind.volume(c.elements as f64);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_megatron_mlp() {
        let src = "graph g\nmesh tp=2\ninput %x: f32[4, 8]\n%y: f32[4, 8] = all_reduce(%x) {axis = \"tp\"}\n%z: f32[8, 8] = all_gather(%y) {axis = \"tp\", dim = 0}\noutput %z\n";
        let g = shardc_ir::text::parse(src).unwrap();
        let c = collectives(&g);
        assert_eq!(
            (c[0].kind, c[0].elements, c[1].kind, c[1].elements),
            (CollectiveKind::AllReduce, 32, CollectiveKind::AllGather, 64)
        );
        assert_eq!(volume_per_axis(&g)["tp"], 2.0 * 32.0 + 64.0);
    }
}
