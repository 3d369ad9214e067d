//! Sequence-parallel rules (Korthikanti et al. 2022, "Reducing Activation Recomputation in
//! Large Transformer Models", section 4.2.2). Together with `tp/propagate-gather`, which moves
//! the all-gather through the residual add and the norm, they put Megatron's g / g-bar pair on
//! every tensor-parallel region boundary.

use super::lang::Sh;
use super::{Layout, Rule, Search};
use egg::Id;

pub fn rules() -> Vec<Rule> {
    vec![Rule {
        name: "sp/all-reduce-split",
        law: "all_reduce(x) = all_gather[seq](reduce_scatter[seq](x))",
        apply: all_reduce_split,
    }]
}

fn all_reduce_split(s: &mut Search) -> Vec<(Id, Id)> {
    const RULE: &str = "sp/all-reduce-split";
    let seq = s.ctx().opts.seq_dim;
    let mut found = Vec::new();
    for c in s.eg.classes() {
        if c.data.layout != Layout::Replicated || s.ctx().shape(c.data.value).len() <= seq + 1 {
            continue;
        }
        for n in &c.nodes {
            if let Sh::AllReduce([x]) = n {
                found.push((c.id, *x));
            }
        }
    }
    let mut unions = Vec::new();
    for (class, x) in found {
        let Some(rs) = s.add(Sh::ReduceScatter(seq as u8, [x]), RULE) else { continue };
        if let Some(g) = s.add(Sh::AllGather(seq as u8, [rs]), RULE) {
            unions.push((class, g));
        }
    }
    unions
}
