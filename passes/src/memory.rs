//! Memory planning: where every buffer of a per-rank program lives, in one static arena.
//!
//! Prior art: XLA's buffer assignment (liveness over a schedule, then a heap simulator placing
//! buffers), TFLite's arena planner ("greedy by size": largest buffer first, each at the lowest
//! offset free over its lifetime), PyTorch's caching allocator (no plan: blocks reused at run
//! time, fragmentation found at run time). shardc plans before launch, on the program the
//! runtime executes (usually the fused one: a `fused` node's body lives in registers, only its
//! results are buffers), so the predicted peak *is* the arena the runtime allocates once.
//!
//! The plan, for a program in its node order (the schedule):
//! 1. **Lifetimes**: a value is born at its node and dies at its last reader; arguments live the
//!    whole step; program outputs live to its end.
//! 2. **Sharing** (one storage for several values, by union of lifetimes):
//!    - views: a `reshape` result is its operand's bytes (row-major, no copy), and so is an
//!      `identity` (Megatron's f: a no-op in the forward);
//!    - in place: an elementwise node (an elementwise op, or a `fused` node whose body is only
//!      elementwise ops) writes a result into an operand's storage when the operand dies there,
//!      has the result's shape and dtype, is not a scalar, and the result depends on it inside
//!      the node (so the work item that writes element i is the one that read it: never across
//!      the pieces of a multi-tensor kernel; a scalar operand is read by every work item, so a
//!      scalar result never takes its place);
//!    - donation: an `update` result (a parameter's or moment's next value) is written into its
//!      argument's storage when the argument is not read after the update's node starts;
//!      otherwise the runtime copies it back at the end of the step ([`MemoryPlan::copy_back`]).
//! 3. **Placement**: arguments first, in order (the persistent region: parameters, moments,
//!    inputs, kept across steps); then every other storage, largest first, at the lowest
//!    [`ALIGN`]-aligned offset free throughout its lifetime (greedy by size).
//!
//! What holds after it: no two storages whose lifetimes overlap overlap in the arena
//! ([`MemoryPlan::check`]); `arena_bytes` is the arena's size; `live_peak_bytes` (the most bytes
//! live at once) is the lower bound any placement has, so their ratio is the fragmentation.

use shardc_ir::{ArgKind, ArgRole, Graph, Op, OutputRole, Phase, ValueId};
use std::collections::HashMap;

/// Every buffer starts at a multiple of this many bytes (a cache line; AVX-512 loads).
pub const ALIGN: usize = 64;

/// What a storage holds, for the plan's breakdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BufferClass {
    /// A parameter (or its shard), kept across steps.
    Parameter,
    /// Optimizer state (AdamW moments), kept across steps.
    OptimizerState,
    /// Step inputs: tokens, targets, learning rate, step number.
    Input,
    /// A forward value the backward reads (what recomputation would save).
    Activation,
    /// Everything else: gradients, workspace, results.
    Temporary,
}

impl BufferClass {
    /// The name the plan prints (as in its JSON form).
    pub fn name(self) -> &'static str {
        match self {
            BufferClass::Parameter => "parameter",
            BufferClass::OptimizerState => "optimizer_state",
            BufferClass::Input => "input",
            BufferClass::Activation => "activation",
            BufferClass::Temporary => "temporary",
        }
    }
}

/// One storage of the arena: a value and the values sharing it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Storage {
    /// The value that owns the storage (an argument, or the first value written into it).
    pub value: ValueId,
    /// Values sharing it (views, in-place results, donated updates), in program order.
    pub shared_by: Vec<ValueId>,
    pub bytes: usize,
    pub offset: usize,
    /// Lifetime in schedule positions: 0 is the step's start (arguments), node i is i + 1, the
    /// step's end is `nodes + 1`; both ends inclusive.
    pub first: usize,
    pub last: usize,
    pub class: BufferClass,
}

/// The arena plan of one program.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MemoryPlan {
    pub storages: Vec<Storage>,
    /// The arena's size: the persistent region and the step's peak.
    pub arena_bytes: usize,
    /// The persistent region (arguments), at the start of the arena.
    pub persistent_bytes: usize,
    /// The most bytes live at one position (a lower bound for any placement).
    pub live_peak_bytes: usize,
    /// Where that peak is (a schedule position, see [`Storage::first`]).
    pub live_peak_at: usize,
    /// `update` results that could not be written in place: (result, argument) pairs the
    /// runtime copies at the end of the step.
    pub copy_back: Vec<(ValueId, ValueId)>,
    /// Storage of every value (an index into `storages`); values inside fused bodies have none.
    #[serde(skip)]
    pub storage_of: HashMap<ValueId, usize>,
}

impl MemoryPlan {
    /// The offset of a value's bytes in the arena.
    pub fn offset_of(&self, v: ValueId) -> Option<usize> {
        self.storage_of.get(&v).map(|&s| self.storages[s].offset)
    }

    /// Bytes per class at the live peak (the breakdown `shardc plan` prints).
    pub fn at_peak(&self) -> Vec<(BufferClass, usize)> {
        let mut out: Vec<(BufferClass, usize)> = Vec::new();
        for s in self.storages.iter().filter(|s| s.first <= self.live_peak_at && self.live_peak_at <= s.last) {
            match out.iter_mut().find(|(c, _)| *c == s.class) {
                Some((_, b)) => *b += s.bytes,
                None => out.push((s.class, s.bytes)),
            }
        }
        out.sort();
        out
    }

    /// The invariant: storages alive at the same time never overlap in the arena, and each is
    /// inside it. Returns the first violation.
    pub fn check(&self) -> Result<(), String> {
        let mut by_offset: Vec<&Storage> = self.storages.iter().collect();
        by_offset.sort_by_key(|s| s.offset);
        for (i, a) in by_offset.iter().enumerate() {
            if a.offset + a.bytes > self.arena_bytes || a.offset % ALIGN != 0 {
                return Err(format!("storage of {:?} at {} + {} is outside the arena", a.value, a.offset, a.bytes));
            }
            for b in &by_offset[i + 1..] {
                if b.offset >= a.offset + a.bytes {
                    break;
                }
                if a.first <= b.last && b.first <= a.last {
                    return Err(format!(
                        "storages of {:?} ({}..{}, live {}..{}) and {:?} ({}..{}, live {}..{}) overlap",
                        a.value,
                        a.offset,
                        a.offset + a.bytes,
                        a.first,
                        a.last,
                        b.value,
                        b.offset,
                        b.offset + b.bytes,
                        b.first,
                        b.last
                    ));
                }
            }
        }
        Ok(())
    }
}

fn align(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// Is the node elementwise (what in-place writing needs): an op of fusion's elementwise
/// family, or a `fused` node whose body holds only those (and constants)?
fn elementwise(g: &Graph, n: &shardc_ir::Node) -> bool {
    use crate::fusion::{family, Family};
    match n.op {
        Op::Fused => n
            .body
            .as_deref()
            .is_some_and(|b| b.nodes.iter().all(|m| m.op == Op::Full || family(b, m) == Some(Family::Elementwise))),
        _ => family(g, n) == Some(Family::Elementwise),
    }
}

/// Does result `r` of node `n` depend on operand `k` inside the node?
fn depends(n: &shardc_ir::Node, k: usize, r: usize) -> bool {
    let Some(body) = n.body.as_deref() else { return true };
    let (x, y) = (body.args[k].value, body.output_values().nth(r).expect("a result per output"));
    let mut reach = std::collections::HashSet::from([x]);
    for m in &body.nodes {
        if m.inputs.iter().any(|v| reach.contains(v)) {
            reach.extend(m.outputs.iter().copied());
        }
    }
    reach.contains(&y)
}

/// Plans the arena of `g` (module doc).
pub fn plan_memory(g: &Graph) -> MemoryPlan {
    let end = g.nodes.len() + 1;
    let mut last_use: HashMap<ValueId, usize> = HashMap::new();
    for (i, n) in g.nodes.iter().enumerate() {
        for &v in &n.inputs {
            last_use.insert(v, i + 1);
        }
    }
    for v in g.output_values() {
        last_use.insert(v, end);
    }
    let born = |v: ValueId, i: usize| -> (usize, usize) { (i, last_use.get(&v).copied().unwrap_or(i)) };

    // Storages by owner; `root` maps each value to its storage's index.
    let mut storages: Vec<Storage> = Vec::new();
    let mut root: HashMap<ValueId, usize> = HashMap::new();
    let saved: std::collections::HashSet<ValueId> = {
        let mut forward: std::collections::HashSet<ValueId> = std::collections::HashSet::new();
        let mut saved = std::collections::HashSet::new();
        for n in &g.nodes {
            if n.phase == Phase::Forward {
                forward.extend(n.outputs.iter().copied());
            } else {
                saved.extend(n.inputs.iter().filter(|v| forward.contains(v)).copied());
            }
        }
        saved
    };
    for a in &g.args {
        let class = match (a.kind, &a.role) {
            (ArgKind::Param, _) => BufferClass::Parameter,
            (ArgKind::State, _) => BufferClass::OptimizerState,
            (_, ArgRole::Param(_)) => BufferClass::Parameter,
            _ => BufferClass::Input,
        };
        root.insert(a.value, storages.len());
        storages.push(Storage {
            value: a.value,
            shared_by: vec![],
            bytes: align(g.ty(a.value).size_bytes()),
            offset: 0,
            first: 0,
            last: end,
            class,
        });
    }
    let persistent = storages.len();
    // Updates and the arguments they may be donated to.
    let update_of: HashMap<ValueId, ValueId> = g
        .outputs
        .iter()
        .filter_map(|o| match o.role {
            OutputRole::Update(arg) => Some((o.value, arg)),
            _ => None,
        })
        .collect();
    let mut copy_back = Vec::new();
    for (i, n) in g.nodes.iter().enumerate() {
        let t = i + 1;
        for (r, &y) in n.outputs.iter().enumerate() {
            let ty = g.ty(y);
            // Donation: the argument is read by nothing after this node starts.
            if let Some(&arg) = update_of.get(&y) {
                let arg_last = storages[root[&arg]]
                    .shared_by
                    .iter()
                    .chain([&arg])
                    .map(|v| last_use.get(v).copied().unwrap_or(0))
                    .max()
                    .unwrap_or(0);
                let inplace_ok = arg_last < t
                    || (arg_last == t
                        && elementwise(g, n)
                        && ty.numel() > 1
                        && n.inputs
                            .iter()
                            .enumerate()
                            .any(|(k, &x)| root.get(&x) == Some(&root[&arg]) && g.ty(x) == ty && depends(n, k, r)));
                if inplace_ok && g.ty(arg).size_bytes() == ty.size_bytes() {
                    let s = root[&arg];
                    storages[s].shared_by.push(y);
                    root.insert(y, s);
                    continue;
                }
                copy_back.push((y, arg));
            }
            // A view of its operand (`identity` is Megatron's f: nothing in the forward).
            if matches!(n.op, Op::Reshape | Op::Identity) {
                let s = root[&n.inputs[0]];
                storages[s].shared_by.push(y);
                storages[s].last = storages[s].last.max(born(y, t).1);
                root.insert(y, s);
                continue;
            }
            // In place over an operand that dies here (not an argument: those persist).
            if elementwise(g, n) && ty.numel() > 1 {
                let victim = n.inputs.iter().enumerate().find(|&(k, &x)| {
                    let s = root[&x];
                    s >= persistent
                        && storages[s].last == t
                        && g.ty(x) == ty
                        && !n.outputs[..r].iter().any(|o| root.get(o) == Some(&s))
                        && depends(n, k, r)
                });
                if let Some((_, &x)) = victim {
                    let s = root[&x];
                    storages[s].shared_by.push(y);
                    storages[s].last = born(y, t).1;
                    root.insert(y, s);
                    continue;
                }
            }
            let class = if n.phase == Phase::Forward && saved.contains(&y) {
                BufferClass::Activation
            } else {
                BufferClass::Temporary
            };
            let (first, last) = born(y, t);
            root.insert(y, storages.len());
            storages.push(Storage {
                value: y,
                shared_by: vec![],
                bytes: align(ty.size_bytes()),
                offset: 0,
                first,
                last,
                class,
            });
        }
    }

    // Placement: the persistent region in argument order, then greedy by size.
    let mut offset = 0;
    for s in &mut storages[..persistent] {
        s.offset = offset;
        offset += s.bytes;
    }
    let persistent_bytes = offset;
    let mut order: Vec<usize> = (persistent..storages.len()).collect();
    order.sort_by(|&a, &b| storages[b].bytes.cmp(&storages[a].bytes).then(storages[a].first.cmp(&storages[b].first)));
    // Placed step storages, kept sorted by offset.
    let mut placed: Vec<usize> = Vec::new();
    let mut arena_bytes = persistent_bytes;
    for s in order {
        let (first, last, bytes) = (storages[s].first, storages[s].last, storages[s].bytes);
        let mut at = persistent_bytes;
        for &p in &placed {
            let q = &storages[p];
            if q.first > last || first > q.last {
                continue;
            }
            if q.offset >= at + bytes {
                break;
            }
            at = at.max(q.offset + q.bytes);
        }
        storages[s].offset = at;
        arena_bytes = arena_bytes.max(at + bytes);
        let pos = placed.partition_point(|&p| storages[p].offset <= at);
        placed.insert(pos, s);
    }

    // The live peak: bytes alive at each position.
    let mut delta = vec![0i64; end + 2];
    for s in &storages {
        delta[s.first] += s.bytes as i64;
        delta[s.last + 1] -= s.bytes as i64;
    }
    let (mut live, mut live_peak_bytes, mut live_peak_at) = (0i64, 0usize, 0usize);
    for (t, d) in delta.iter().enumerate().take(end + 1) {
        live += d;
        if live as usize > live_peak_bytes {
            (live_peak_bytes, live_peak_at) = (live as usize, t);
        }
    }
    MemoryPlan { storages, arena_bytes, persistent_bytes, live_peak_bytes, live_peak_at, copy_back, storage_of: root }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(src: &str) -> (Graph, MemoryPlan) {
        let g = shardc_ir::text::parse(src).unwrap();
        shardc_ir::verify::verify(&g).unwrap();
        let p = plan_memory(&g);
        p.check().unwrap();
        (g, p)
    }

    #[test]
    fn dead_buffers_are_reused_and_views_share() {
        // a and b die at c; d can take a's place. The reshape is a view of d.
        let (g, p) = plan(
            "graph g\ninput %x: f32[64, 64]\n%a: f32[64, 64] = exp(%x)\n%b: f32[64, 64] = tanh(%x)\n\
             %c: f32[64, 64] = matmul(%a, %b)\n%d: f32[64, 64] = matmul(%c, %c)\n%e: f32[4096] = reshape(%d) {shape = [4096]}\noutput %e\n",
        );
        let (a, d, e) = (g.find("a").unwrap(), g.find("d").unwrap(), g.find("e").unwrap());
        assert_eq!(p.offset_of(d), p.offset_of(e), "a reshape is a view");
        assert_eq!(p.persistent_bytes, 16384);
        // x persistent, then at most three 16 KiB step buffers live at once (a, b, c).
        assert_eq!(p.arena_bytes, 16384 * 4);
        assert_eq!(p.live_peak_bytes, 16384 * 4);
        assert_eq!(p.offset_of(d), p.offset_of(a), "d reuses a's bytes");
    }

    #[test]
    fn elementwise_results_are_written_in_place_and_updates_donated() {
        let (g, p) = plan(
            "graph g\nparam %w: f32[8]\ninput %x: f32[8]\n%a: f32[8] = exp(%x)\n%b: f32[8] = neg(%a)\n\
             %w2: f32[8] = sub(%w, %b) [optimizer]\noutput %w2 [update %w]\n",
        );
        let (w, a, b, w2) = (g.find("w").unwrap(), g.find("a").unwrap(), g.find("b").unwrap(), g.find("w2").unwrap());
        assert_eq!(p.offset_of(a), p.offset_of(b), "neg in place over a");
        assert_eq!(p.offset_of(w), p.offset_of(w2), "the update is donated to its argument");
        assert!(p.copy_back.is_empty());
    }

    #[test]
    fn an_update_read_after_it_is_made_is_copied_back() {
        let (g, p) = plan(
            "graph g\nparam %w: f32[8]\n%w2: f32[8] = exp(%w) [optimizer]\n%s: f32[8] = add(%w2, %w) [optimizer]\n\
             %l: f32[] = reduce_sum(%s) {dims = [0]} [optimizer]\noutput %l, %w2 [update %w]\n",
        );
        assert_eq!(p.copy_back, vec![(g.find("w2").unwrap(), g.find("w").unwrap())]);
        assert_ne!(p.offset_of(g.find("w").unwrap()), p.offset_of(g.find("w2").unwrap()));
    }

    #[test]
    fn multi_tensor_pieces_never_write_into_each_other() {
        // Two independent pieces of one fused kernel: b's result must not reuse a's operand.
        let (g, p) = plan(
            "graph g\ninput %x: f32[8]\ninput %y: f32[8]\n%a: f32[8] = exp(%x)\n%b: f32[8] = exp(%y)\n\
             %c: f32[8], %d: f32[8] = fused(%a, %b) {kernel = \"k0_multi\"} {\n  input %a: f32[8]\n  input %b: f32[8]\n\
             %c: f32[8] = neg(%b)\n  %d: f32[8] = neg(%a)\n  output %c, %d\n}\noutput %c, %d\n",
        );
        let off = |n: &str| p.offset_of(g.find(n).unwrap());
        assert_eq!(off("c"), off("b"));
        assert_eq!(off("d"), off("a"));
    }

    #[test]
    fn scalar_results_never_overwrite_a_scalar_every_work_item_reads() {
        // issue-11: a multi-tensor kernel's clipping coefficient was written over the gradient
        // norm's sum of squares while other pieces still read it.
        let (g, p) = plan(
            "graph g\ninput %s: f32[]\ninput %x: f32[8]\n\
             %c: f32[], %y: f32[8] = fused(%s, %x) {kernel = \"k0_multi\"} {\n  input %s: f32[]\n  input %x: f32[8]\n\
             %c: f32[] = sqrt(%s)\n  %y: f32[8] = mul(%x, %c)\n  output %c, %y\n}\noutput %c, %y\n",
        );
        assert_ne!(p.offset_of(g.find("c").unwrap()), p.offset_of(g.find("s").unwrap()));
    }
}
