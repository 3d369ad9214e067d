//! ZeRO-3's parameter gathers, just in time: a lowering pass that moves every node of a
//! parameter-gather chain (`all_gather` of a shard, then its slice, reshape and cast, origin
//! `[step gather-parameters]` or `[step gather-parameters-for-backward]`) to just before the
//! first node that reads its result.
//!
//! The training-step pass emits a phase's gathers together at its start (all the forward's
//! before the first layer, all the backward's regathers before the last layer's gradient), so
//! every whole parameter was live at once and the arena held the whole model: ZeRO-3 in name
//! only. DeepSpeed gathers each submodule's parameters as it runs (with a prefetch of the next
//! few, `stage3_prefetch_bucket_size`); FSDP gathers a unit before its forward and frees it
//! after. Here a gathered parameter lives from its layer's first use to its last, and the
//! memory planner's arena shows it (`shardc plan`'s memory planner figure).
//!
//! The move keeps every other node in place and the program SPMD: all ranks run the same
//! program, so their collectives stay in one order. The gathers read only arguments (the
//! shards), so moving them later never reads a value before it is computed.

use shardc_ir::{Graph, Origin, StepRule, ValueId};
use std::collections::HashMap;

/// Moves the parameter-gather chains of `g` next to their first readers (module doc); returns
/// the program and how many nodes moved.
pub fn gather_late(g: &Graph) -> (Graph, usize) {
    let n = g.nodes.len();
    let gathering = |i: usize| {
        matches!(
            g.nodes[i].origin,
            Origin::Step { rule: StepRule::GatherParameters | StepRule::RegatherParameters, .. }
        )
    };
    let producer: HashMap<ValueId, usize> =
        g.nodes.iter().enumerate().flat_map(|(i, node)| node.outputs.iter().map(move |&o| (o, i))).collect();
    // Movable: a gather-chain node whose inputs are arguments or other movable nodes' results.
    let mut movable = vec![false; n];
    for i in 0..n {
        movable[i] = gathering(i) && g.nodes[i].inputs.iter().all(|v| producer.get(v).is_none_or(|&p| movable[p]));
    }
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, node) in g.nodes.iter().enumerate() {
        for v in &node.inputs {
            if let Some(&p) = producer.get(v) {
                readers[p].push(i);
            }
        }
    }
    let returned: std::collections::HashSet<ValueId> = g.output_values().collect();
    // Where each movable node goes: before its earliest reader's position (a movable reader's
    // own target); nodes with no reader, or whose result the program returns, stay.
    let mut target: Vec<usize> = (0..n).collect();
    for i in (0..n).rev() {
        if !movable[i] || g.nodes[i].outputs.iter().any(|o| returned.contains(o)) || readers[i].is_empty() {
            movable[i] = false;
            continue;
        }
        target[i] = readers[i].iter().map(|&r| if movable[r] { target[r] } else { r }).min().expect("has readers");
    }
    let mut at: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut moved = 0;
    for i in 0..n {
        if movable[i] {
            at.entry(target[i]).or_default().push(i);
            moved += usize::from(target[i] > i + 1);
        }
    }
    let mut order = Vec::with_capacity(n);
    for (i, &moves) in movable.iter().enumerate() {
        if let Some(before) = at.get(&i) {
            order.extend(before);
        }
        if !moves {
            order.push(i);
        }
    }
    debug_assert_eq!(order.len(), n);
    let mut out = g.clone();
    out.nodes = order.into_iter().map(|i| g.nodes[i].clone()).collect();
    // Values are numbered in definition order: renumber after the move.
    out.finish();
    (out, moved)
}
