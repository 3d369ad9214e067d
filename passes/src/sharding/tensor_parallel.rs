//! Tensor-parallel rules (Megatron-LM, Shoeybi et al. 2019, section 3). `n` is the size of the
//! tensor-parallel axis; `shard[d]` is this rank's chunk along `d`, `all_gather[d]` concatenates
//! the chunks, `all_reduce` sums partial values.

use super::lang::Sh;
use super::propagate::{contraction_dims, split_inputs};
use super::{Layout, Rule, Search};
use egg::Id;
use shardc_ir::ops::Op;

pub fn rules() -> Vec<Rule> {
    vec![
        Rule {
            name: "tp/matmul-column",
            law: "matmul(x, w) = all_gather[-1](matmul(x, shard[cols](w)))",
            apply: matmul_column,
        },
        Rule {
            name: "tp/matmul-row",
            law: "matmul(all_gather[k](x), w) = all_reduce(matmul(x, shard[rows](w)))",
            apply: matmul_row,
        },
        Rule {
            name: "tp/propagate-gather",
            law: "f(.., all_gather[di](xi), ..) = all_gather[d](f(.., xi, ..)) when f commutes with the split (other operands: their shards)",
            apply: propagate_gather,
        },
        Rule {
            name: "tp/vocab-parallel-embedding",
            law: "embedding(w, ids) = all_reduce(masked_embedding(shard[0](w), ids - rank * V/n))",
            apply: vocab_embedding,
        },
        Rule {
            name: "tp/vocab-parallel-cross-entropy",
            law: "cross_entropy(all_gather[-1](l), t) = vocab_cross_entropy(l, t), its max, sum and target logit all-reduced",
            apply: vocab_cross_entropy,
        },
    ]
}

/// The replicated classes' op nodes of a given op, as (class, node index, children).
fn op_nodes(s: &Search, op: Op) -> Vec<(Id, u32, Vec<Id>)> {
    let g = &s.ctx().graph;
    let mut out = Vec::new();
    for c in s.eg.classes() {
        if c.data.layout != Layout::Replicated {
            continue;
        }
        for n in &c.nodes {
            if let Sh::Op(i, ch) = n {
                if g.nodes[*i as usize].op == op {
                    out.push((c.id, *i, ch.clone()));
                }
            }
        }
    }
    out
}

fn matmul_column(s: &mut Search) -> Vec<(Id, Id)> {
    const RULE: &str = "tp/matmul-column";
    let mut unions = Vec::new();
    for (class, i, ch) in op_nodes(s, Op::MatMul) {
        if !s.is_weight(ch[1]) || s.data(ch[0]).layout != Layout::Replicated {
            continue;
        }
        let node = s.ctx().graph.nodes[i as usize].clone();
        let r = s.ctx().shape(node.output()).len();
        let Some(reqs) = split_inputs(&s.ctx().graph, &node, r - 1, s.ctx().opts.size) else { continue };
        let Some(kb) = reqs[1] else { continue };
        let Some(w) = s.shard(ch[1], kb as u8, RULE) else { continue };
        let Some(m) = s.add(Sh::Op(i, vec![ch[0], w]), RULE) else { continue };
        if let Some(g) = s.add(Sh::AllGather(r as u8 - 1, [m]), RULE) {
            unions.push((class, g));
        }
    }
    unions
}

fn matmul_row(s: &mut Search) -> Vec<(Id, Id)> {
    const RULE: &str = "tp/matmul-row";
    let mut unions = Vec::new();
    for (class, i, ch) in op_nodes(s, Op::MatMul) {
        if !s.is_weight(ch[1]) {
            continue;
        }
        let node = s.ctx().graph.nodes[i as usize].clone();
        let (ka, kb) = contraction_dims(&s.ctx().graph, &node);
        let Some(x) = s.gathered(ch[0], ka as u8) else { continue };
        let Some(w) = s.shard(ch[1], kb as u8, RULE) else { continue };
        let Some(m) = s.add(Sh::Op(i, vec![x, w]), RULE) else { continue };
        if let Some(r) = s.add(Sh::AllReduce([m]), RULE) {
            unions.push((class, r));
        }
    }
    unions
}

fn propagate_gather(s: &mut Search) -> Vec<(Id, Id)> {
    const RULE: &str = "tp/propagate-gather";
    let n = s.ctx().opts.size;
    let mut found = Vec::new();
    for c in s.eg.classes() {
        if c.data.layout != Layout::Replicated {
            continue;
        }
        for node in &c.nodes {
            let Sh::Op(i, ch) = node else { continue };
            for (j, &cj) in ch.iter().enumerate() {
                for g in &s.eg[cj].nodes {
                    if let Sh::AllGather(dj, _) = g {
                        found.push((c.id, *i, ch.clone(), j, *dj));
                    }
                }
            }
        }
    }
    found.sort();
    found.dedup();
    let mut unions = Vec::new();
    for (class, i, ch, j, dj) in found {
        let node = s.ctx().graph.nodes[i as usize].clone();
        for d in 0..s.ctx().shape(node.output()).len() {
            let Some(reqs) = split_inputs(&s.ctx().graph, &node, d, n) else { continue };
            if reqs[j] != Some(dj as usize) {
                continue;
            }
            // Megatron's regions: outside a tensor-parallel region activations are whole, so
            // a sibling operand is cut (without communication) only if it is a weight, or
            // along the sequence under sequence parallelism.
            let seq_split = s.ctx().opts.sequence_parallel && d == s.ctx().opts.seq_dim;
            let mut kids = Vec::new();
            for (k, &ck) in ch.iter().enumerate() {
                let kid = match reqs[k] {
                    Some(dk) => match s.gathered(ck, dk as u8) {
                        Some(x) => Some(x),
                        None if seq_split || s.is_weight(ck) => s.shard(ck, dk as u8, RULE),
                        None => None,
                    },
                    None => Some(ck),
                };
                match kid {
                    Some(k) => kids.push(k),
                    None => break,
                }
            }
            if kids.len() != ch.len() {
                continue;
            }
            let local = Sh::Op(i, kids);
            let layout = s.ctx().layout_of(&local, |c| s.eg[c].data.clone()).map(|d| d.layout);
            if layout != Ok(Layout::Split(d as u8)) {
                continue;
            }
            let Some(m) = s.add(local, RULE) else { continue };
            if let Some(g) = s.add(Sh::AllGather(d as u8, [m]), RULE) {
                unions.push((class, g));
            }
        }
    }
    unions
}

fn vocab_embedding(s: &mut Search) -> Vec<(Id, Id)> {
    const RULE: &str = "tp/vocab-parallel-embedding";
    let mut unions = Vec::new();
    for (class, i, ch) in op_nodes(s, Op::Embedding) {
        // Token embeddings: ids that come from the data (position tables stay replicated, as
        // in Megatron; their ids are computed).
        let ids = s.data(ch[1]).value;
        let from_data = s.ctx().graph.args.iter().any(|a| a.value == ids && a.kind == shardc_ir::ArgKind::Input);
        if !s.is_weight(ch[0]) || !from_data {
            continue;
        }
        let Some(w) = s.shard(ch[0], 0, RULE) else { continue };
        let Some(e) = s.add(Sh::VocabEmbedding(i, [w, ch[1]]), RULE) else { continue };
        if let Some(r) = s.add(Sh::AllReduce([e]), RULE) {
            unions.push((class, r));
        }
    }
    unions
}

fn vocab_cross_entropy(s: &mut Search) -> Vec<(Id, Id)> {
    const RULE: &str = "tp/vocab-parallel-cross-entropy";
    let mut unions = Vec::new();
    for (class, i, ch) in op_nodes(s, Op::CrossEntropy) {
        let node = &s.ctx().graph.nodes[i as usize];
        let last = s.ctx().shape(node.inputs[0]).len() - 1;
        let Some(l) = s.gathered(ch[0], last as u8) else { continue };
        if let Some(ce) = s.add(Sh::VocabCrossEntropy(i, [l, ch[1]]), RULE) {
            unions.push((class, ce));
        }
    }
    unions
}
