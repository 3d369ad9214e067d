//! Bucketing: the many small gradient and parameter collectives of a data- or tensor-parallel
//! step coalesced into a few large ones, as PyTorch DDP (25 MB gradient buckets) and DeepSpeed
//! ZeRO (`reduce_bucket_size`, `allgather_bucket_size`) do at run time. Here it is a lowering
//! pass over the per-rank step (codegen runs it before fusion; `shardc plan` lists the logical,
//! per-parameter collectives and says the bucket size), so the bucketed program is still IR the
//! interpreter runs and the tests compare.
//!
//! Which collectives: those of the backward and optimizer phases (gradient all-reduces and
//! reduce-scatters, the all-gathers of updated parameter shards); the forward's stay where they
//! are (ZeRO-3's gathers just before use), and so do ZeRO-3's backward regathers
//! ([`crate::gather_late`] puts each before its first reader). Members of one bucket have the same kind, mesh axis,
//! dtype and phase; none depends on another (checked by following every value derived from a
//! member); a bucket holds at most [`BUCKET_BYTES`]. Reductions are elementwise across ranks, so
//! every element gets the same sum in the same order: the result is bit-identical.
//!
//! The rewrite, for members x_1..x_k:
//! - `all_reduce`: flatten each, `concat`, one `all_reduce`, `split`, reshape back;
//! - `reduce_scatter` over d ranks of 1-D x_i (n_i elements): each reshaped to `[d, n_i/d]`,
//!   `concat` along dim 1, one `reduce_scatter` along dim 0, `split` along the columns: rank r
//!   still gets chunk r of every member;
//! - `all_gather` of 1-D shards s_i (m_i elements): `concat`, one `all_gather` of `[1, S]` along
//!   dim 0, `split` the `[d, S]` result along dim 1 into `[d, m_i]`, flatten.
//!
//! The bucket runs where its last member ran; nodes are then put in a topological order that
//! keeps every other node's relative order.

use shardc_ir::{Attr, Attrs, Graph, Node, Op, Origin, Phase, TensorType, ValueId};
use std::collections::{BTreeSet, HashMap, HashSet};

/// The most bytes one bucket moves (DDP's default).
pub const BUCKET_BYTES: usize = 25 << 20;

/// What [`bucket`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BucketSummary {
    /// Collectives that were bucketed, and the buckets they became.
    pub members: usize,
    pub buckets: usize,
}

/// What members of one bucket share: kind, mesh axis, dtype, phase.
type Key = (Op, String, shardc_ir::DType, Phase);

/// The bucketing key of a node, or `None` when it is not bucketed.
fn key(g: &Graph, n: &Node) -> Option<Key> {
    if n.phase == Phase::Forward || n.outputs.len() != 1 || n.inputs.len() != 1 || !n.op.is_collective() {
        return None;
    }
    // ZeRO-3's backward regathers run one by one where they are needed (crate::gather_late).
    if matches!(n.origin, Origin::Step { rule: shardc_ir::StepRule::RegatherParameters, .. }) {
        return None;
    }
    let x = g.ty(n.inputs[0]);
    if !x.dtype.is_float() {
        return None;
    }
    let dim0 = n.attrs.int("dim").unwrap_or(0) == 0;
    let ok = match n.op {
        Op::AllReduce => n.attrs.str("reduce").is_none_or(|r| r == "sum"),
        Op::ReduceScatter | Op::AllGather => dim0 && x.rank() == 1,
        _ => false,
    };
    ok.then(|| (n.op, n.attrs.str("axis").unwrap_or_default().to_string(), x.dtype, n.phase))
}

/// Coalesces the backward and optimizer collectives of `g` into buckets of at most
/// `bucket_bytes` (module doc).
pub fn bucket(g: &Graph, bucket_bytes: usize) -> (Graph, BucketSummary) {
    // Form buckets in program order. Each open bucket (one per key) tracks every value derived
    // from its members so far: a node reading one cannot join it. A closed bucket takes no
    // more members, so its values are no longer followed (on a 96-layer model most gradients
    // fill a bucket alone: following every one of them would cost seconds).
    let mut buckets: Vec<Vec<usize>> = Vec::new();
    let mut bytes: Vec<usize> = Vec::new();
    // key -> (open bucket, its derived values)
    let mut open: HashMap<Key, (usize, HashSet<ValueId>)> = HashMap::new();
    for (i, n) in g.nodes.iter().enumerate() {
        for (_, taint) in open.values_mut() {
            if n.inputs.iter().any(|v| taint.contains(v)) {
                taint.extend(n.outputs.iter().copied());
            }
        }
        let Some(k) = key(g, n) else { continue };
        let size = g.ty(n.inputs[0]).size_bytes();
        let joins = open
            .get(&k)
            .is_some_and(|(b, taint)| bytes[*b] + size <= bucket_bytes && !n.inputs.iter().any(|v| taint.contains(v)));
        if !joins {
            buckets.push(Vec::new());
            bytes.push(0);
            open.insert(k.clone(), (buckets.len() - 1, HashSet::new()));
        }
        let (b, taint) = open.get_mut(&k).expect("just opened or joined");
        buckets[*b].push(i);
        bytes[*b] += size;
        taint.extend(n.outputs.iter().copied());
    }
    let buckets: Vec<Vec<usize>> = buckets.into_iter().filter(|b| b.len() > 1).collect();
    let mut summary = BucketSummary::default();
    if buckets.is_empty() {
        return (g.clone(), summary);
    }
    let mut out = g.clone();
    // Each node of the new program with the position it sorts by.
    let member_of: HashMap<usize, usize> =
        buckets.iter().enumerate().flat_map(|(b, ms)| ms.iter().map(move |&m| (m, b))).collect();
    let mut units: Vec<(usize, Vec<Node>)> = g
        .nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| !member_of.contains_key(i))
        .map(|(i, n)| (i, vec![n.clone()]))
        .collect();
    for (b, members) in buckets.iter().enumerate() {
        let nodes = rewrite(&mut out, g, members, b);
        units.push((*members.last().expect("buckets have members"), nodes));
        summary.members += members.len();
        summary.buckets += 1;
    }
    out.nodes = topological(units);
    out.finish();
    if let Err(e) = shardc_ir::verify::verify(&out) {
        panic!("bucketing broke the program (a compiler bug): {e}");
    }
    (out, summary)
}

/// The nodes that replace bucket `b`'s members; the members' results keep their ids.
fn rewrite(out: &mut Graph, g: &Graph, members: &[usize], b: usize) -> Vec<Node> {
    let first = &g.nodes[members[0]];
    let (op, phase) = (first.op, first.phase);
    let axis = first.attrs.str("axis").unwrap_or_default().to_string();
    let world = g.mesh.axis_size(&axis).unwrap_or(1);
    let origin = Origin::Rule(format!("bucket/{}", op.name()));
    let mut nodes = Vec::new();
    let mut add = |out: &mut Graph, op: Op, inputs: Vec<ValueId>, attrs: Attrs, results: Option<Vec<ValueId>>| {
        let outputs = match results {
            Some(r) => r,
            None => {
                let tys = out.infer_all(op, &inputs, &attrs).expect("bucket nodes are well-typed by construction");
                tys.into_iter()
                    .map(|t| {
                        let name = format!("bucket{b}.{}{}", op.name(), out.values.len());
                        out.fresh_value(name, t)
                    })
                    .collect()
            }
        };
        nodes.push(Node { op, inputs, attrs, outputs: outputs.clone(), phase, origin: origin.clone(), body: None });
        outputs
    };
    let int = |v: i64| Attr::Int(v);
    let ints = |v: Vec<i64>| Attr::Ints(v);
    let shape_of = |t: &TensorType| t.shape.iter().map(|&d| d as i64).collect::<Vec<_>>();
    let ins: Vec<ValueId> = members.iter().map(|&m| g.nodes[m].inputs[0]).collect();
    let results: Vec<ValueId> = members.iter().map(|&m| g.nodes[m].output()).collect();
    let coll_attrs = |dim: Option<i64>| {
        let a = Attrs::default().with("axis", Attr::Str(axis.clone()));
        match dim {
            Some(d) => a.with("dim", int(d)),
            None => a,
        }
    };
    match op {
        Op::AllReduce => {
            let flat: Vec<ValueId> = ins
                .iter()
                .map(|&x| {
                    let n = g.ty(x).numel() as i64;
                    if g.ty(x).rank() == 1 {
                        x
                    } else {
                        add(out, Op::Reshape, vec![x], Attrs::default().with("shape", ints(vec![n])), None)[0]
                    }
                })
                .collect();
            let sizes: Vec<i64> = flat.iter().map(|&v| out.ty(v).numel() as i64).collect();
            let cat = add(out, Op::Concat, flat, Attrs::default().with("dim", int(0)), None)[0];
            let summed = add(out, Op::AllReduce, vec![cat], coll_attrs(None), None)[0];
            let pieces = add(
                out,
                Op::Split,
                vec![summed],
                Attrs::default().with("dim", int(0)).with("sizes", ints(sizes)),
                None,
            );
            for ((&p, &r), &x) in pieces.iter().zip(&results).zip(&ins) {
                add(out, Op::Reshape, vec![p], Attrs::default().with("shape", ints(shape_of(g.ty(x)))), Some(vec![r]));
            }
        }
        Op::ReduceScatter => {
            let d = world as i64;
            let rows: Vec<ValueId> = ins
                .iter()
                .map(|&x| {
                    let n = g.ty(x).numel() as i64;
                    add(out, Op::Reshape, vec![x], Attrs::default().with("shape", ints(vec![d, n / d])), None)[0]
                })
                .collect();
            let sizes: Vec<i64> = ins.iter().map(|&x| g.ty(x).numel() as i64 / d).collect();
            let total: i64 = sizes.iter().sum();
            let cat = add(out, Op::Concat, rows, Attrs::default().with("dim", int(1)), None)[0];
            let mine = add(out, Op::ReduceScatter, vec![cat], coll_attrs(Some(0)), None)[0];
            let flat = add(out, Op::Reshape, vec![mine], Attrs::default().with("shape", ints(vec![total])), None)[0];
            add(
                out,
                Op::Split,
                vec![flat],
                Attrs::default().with("dim", int(0)).with("sizes", ints(sizes)),
                Some(results),
            );
        }
        Op::AllGather => {
            let sizes: Vec<i64> = ins.iter().map(|&x| g.ty(x).numel() as i64).collect();
            let total: i64 = sizes.iter().sum();
            let cat = add(out, Op::Concat, ins.clone(), Attrs::default().with("dim", int(0)), None)[0];
            let row = add(out, Op::Reshape, vec![cat], Attrs::default().with("shape", ints(vec![1, total])), None)[0];
            let all = add(out, Op::AllGather, vec![row], coll_attrs(Some(0)), None)[0];
            let blocks =
                add(out, Op::Split, vec![all], Attrs::default().with("dim", int(1)).with("sizes", ints(sizes)), None);
            for (&blk, &r) in blocks.iter().zip(&results) {
                let n = out.ty(r).numel() as i64;
                add(out, Op::Reshape, vec![blk], Attrs::default().with("shape", ints(vec![n])), Some(vec![r]));
            }
        }
        _ => unreachable!("only bucketed kinds reach here"),
    }
    nodes
}

/// The units' nodes in a topological order, each unit sorting by its position (Kahn's
/// algorithm, smallest position first).
fn topological(units: Vec<(usize, Vec<Node>)>) -> Vec<Node> {
    let producer: HashMap<ValueId, usize> = units
        .iter()
        .enumerate()
        .flat_map(|(u, (_, ns))| ns.iter().flat_map(move |n| n.outputs.iter().map(move |&o| (o, u))))
        .collect();
    let mut indegree = vec![0usize; units.len()];
    let mut succ: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); units.len()];
    for (u, (_, ns)) in units.iter().enumerate() {
        let inside: HashSet<ValueId> = ns.iter().flat_map(|n| n.outputs.iter().copied()).collect();
        let deps: BTreeSet<usize> = ns
            .iter()
            .flat_map(|n| n.inputs.iter())
            .filter(|v| !inside.contains(v))
            .filter_map(|v| producer.get(v).copied())
            .collect();
        indegree[u] = deps.len();
        for d in deps {
            succ[d].insert(u);
        }
    }
    let mut ready: BTreeSet<(usize, usize)> =
        (0..units.len()).filter(|&u| indegree[u] == 0).map(|u| (units[u].0, u)).collect();
    let mut order = Vec::with_capacity(units.len());
    while let Some((_, u)) = ready.pop_first() {
        order.push(u);
        for &s in &succ[u] {
            indegree[s] -= 1;
            if indegree[s] == 0 {
                ready.insert((units[s].0, s));
            }
        }
    }
    assert_eq!(order.len(), units.len(), "buckets hold no member that depends on another");
    let mut units: Vec<Option<Vec<Node>>> = units.into_iter().map(|(_, ns)| Some(ns)).collect();
    order.into_iter().flat_map(|u| units[u].take().expect("each unit once")).collect()
}
