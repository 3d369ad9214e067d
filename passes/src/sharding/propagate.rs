//! Which splits an op commutes with: the per-op facts every sharding rule relies on.
//!
//! [`split_inputs`] answers "if this node's output is split along dim `d` over `n` ranks, how
//! must each input be split so that every rank computes its own chunk with the unchanged op?"
//! (PyTorch DTensor calls these op strategies, GSPMD sharding propagation). `None` for an input
//! means it is used whole (replicated); `None` overall means the op does not commute with that
//! split (a reduction over the split dim, a norm over it, a causal mask's row dim, ...).

use shardc_ir::ops::Op;
use shardc_ir::{Graph, Node};

/// How each input must be split for the output to be split along `d` over `n` ranks.
pub fn split_inputs(g: &Graph, node: &Node, d: usize, n: usize) -> Option<Vec<Option<usize>>> {
    let out = &g.ty(node.output()).shape;
    if d >= out.len() || !out[d].is_multiple_of(n) {
        return None;
    }
    let shape = |i: usize| &g.ty(node.inputs[i]).shape;
    let r = out.len();
    // An input aligned with the output from the right (broadcasting): its matching dim, unless
    // it is absent or broadcast (size 1), in which case it is used whole.
    let aligned = |i: usize, d: usize| -> Option<usize> {
        let s = shape(i);
        let di = d as isize - (r as isize - s.len() as isize);
        (di >= 0 && s[di as usize] != 1).then_some(di as usize)
    };
    let all_aligned = || Some((0..node.inputs.len()).map(|i| aligned(i, d)).collect());
    match node.op {
        Op::Neg | Op::Exp | Op::Log | Op::Sqrt | Op::Rsqrt | Op::Tanh | Op::Gelu | Op::Silu | Op::Cast => {
            Some(vec![Some(d)])
        }
        Op::Add | Op::Sub | Op::Mul | Op::Div | Op::Maximum | Op::GreaterEqual => all_aligned(),
        Op::Transpose => {
            let perm = node.attrs.ints("perm")?;
            Some(vec![Some(usize::try_from(*perm.get(d)?).ok()?)])
        }
        Op::Reshape => reshape_dim(shape(0), out, d, n).map(|di| vec![Some(di)]),
        Op::MatMul => {
            let (ta, tb) = (node.attrs.bool_or("transpose_a", false), node.attrs.bool_or("transpose_b", false));
            let (ra, rb) = (shape(0).len(), shape(1).len());
            if d + 2 < r {
                // A batch dim: both operands' batch dims broadcast like elementwise operands.
                Some(vec![aligned(0, d), aligned(1, d)])
            } else if d == r - 2 {
                Some(vec![Some(if ta { ra - 1 } else { ra - 2 }), None])
            } else {
                Some(vec![None, Some(if tb { rb - 2 } else { rb - 1 })])
            }
        }
        Op::Softmax => {
            // The causal mask compares row and column positions: rows must stay whole too.
            let limit = if node.attrs.bool_or("causal", false) { r.saturating_sub(2) } else { r - 1 };
            (d < limit).then(|| vec![Some(d)])
        }
        Op::LayerNorm | Op::RmsNorm => {
            (d + 1 < r).then(|| std::iter::once(Some(d)).chain(node.inputs[1..].iter().map(|_| None)).collect())
        }
        Op::Rope => {
            // x[..., T, H, D]: positions follow a split of T; D pairs its halves.
            (d + 1 < r).then(|| vec![Some(d), (d + 3 == r).then_some(0)])
        }
        Op::Embedding => (d + 1 < r).then(|| vec![None, Some(d)]),
        Op::CrossEntropy => Some(vec![Some(d), Some(d)]),
        Op::ReduceSum | Op::ReduceMean | Op::ReduceMax => {
            let rin = shape(0).len();
            let dims = shardc_ir::ops::reduce_dims(&node.attrs, rin).ok()?;
            let keep = node.attrs.bool_or("keepdim", false);
            // Map output dim d back to an input dim that is not reduced.
            let kept: Vec<usize> =
                if keep { (0..rin).collect() } else { (0..rin).filter(|i| !dims.contains(i)).collect() };
            let di = *kept.get(d)?;
            (!dims.contains(&di)).then(|| vec![Some(di)])
        }
        // Every other op: no split of its result comes from splitting its operands alike
        // (constants, shape ops that move the split dim, collectives, backward ops, and
        // multi-result ops, which the sharding pass does not take). Listed, so that a new op is
        // a compile error here.
        Op::Full
        | Op::Iota
        | Op::AxisIndex
        | Op::Slice
        | Op::Concat
        | Op::Split
        | Op::BroadcastTo
        | Op::AllReduce
        | Op::AllGather
        | Op::ReduceScatter
        | Op::AllToAll
        | Op::Identity
        | Op::TakeShard
        | Op::Pad
        | Op::GeluGrad
        | Op::SiluGrad
        | Op::LayerNormGrad
        | Op::LayerNormGammaGrad
        | Op::RmsNormGrad
        | Op::RmsNormGammaGrad
        | Op::EmbeddingGrad
        | Op::CrossEntropyGrad
        | Op::Fused => None,
    }
}

/// The input dim of a reshape whose split (over `n` ranks) is the split of output dim `d`: the
/// dims before both hold the same number of elements and both extents divide by `n`, so each
/// rank's contiguous chunk is the same elements.
fn reshape_dim(input: &[usize], output: &[usize], d: usize, n: usize) -> Option<usize> {
    let before: usize = output[..d].iter().product();
    let mut prefix = 1;
    for (i, &e) in input.iter().enumerate() {
        if prefix == before && e.is_multiple_of(n) && output[d].is_multiple_of(n) && e != 1 {
            return Some(i);
        }
        prefix *= e;
        if prefix > before {
            return None;
        }
    }
    None
}

/// The contraction dims of a matmul's operands (a's columns, b's rows).
pub fn contraction_dims(g: &Graph, node: &Node) -> (usize, usize) {
    let (ra, rb) = (g.ty(node.inputs[0]).rank(), g.ty(node.inputs[1]).rank());
    let ka = if node.attrs.bool_or("transpose_a", false) { ra - 2 } else { ra - 1 };
    let kb = if node.attrs.bool_or("transpose_b", false) { rb - 1 } else { rb - 2 };
    (ka, kb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reshape_splits_follow_the_major_factor() {
        // [B, T, H*Dh] -> [B, T, H, Dh]: the hidden split is a head split when heads divide.
        assert_eq!(reshape_dim(&[2, 8, 64], &[2, 8, 4, 16], 2, 2), Some(2));
        assert_eq!(reshape_dim(&[2, 8, 64], &[2, 8, 4, 16], 2, 8), None);
        // Merging heads back.
        assert_eq!(reshape_dim(&[2, 8, 4, 16], &[2, 8, 64], 2, 4), Some(2));
        // The minor factor cannot carry the split.
        assert_eq!(reshape_dim(&[2, 8, 64], &[2, 8, 4, 16], 3, 2), None);
    }
}
