//! Laws of the collectives themselves.

use super::lang::Sh;
use super::{Rule, Search};
use egg::Id;

pub fn rules() -> Vec<Rule> {
    vec![Rule { name: "collectives/shard-gather", law: "shard[d](all_gather[d](x)) = x", apply: shard_gather }]
}

fn shard_gather(s: &mut Search) -> Vec<(Id, Id)> {
    let mut unions = Vec::new();
    for c in s.eg.classes() {
        for n in &c.nodes {
            if let Sh::Shard(d, [x]) = n {
                if let Some(inner) = s.gathered(*x, *d) {
                    unions.push((c.id, inner));
                }
            }
        }
    }
    unions
}
