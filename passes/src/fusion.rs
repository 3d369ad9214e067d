//! Fusion: groups the local, memory-bound ops of a per-rank program into kernels.
//!
//! Each group becomes one `fused` node whose body is a graph of the grouped ops (DESIGN.md's
//! kernel boundary): codegen lowers each body to one GPU kernel and one host function, and the
//! interpreter still runs the fused program (it runs each body), so every differential check
//! holds with fusion on. Matmuls stay library calls (cuBLASLt, the host GEMM) and collectives
//! stay runtime calls; both end groups.
//!
//! ## Iteration spaces
//! A kernel iterates over one *space*, the shape of the tensor its work is laid out on:
//! - **rows**: a shape `[..., C]`, seen as `R = prod(...)` rows of `C` columns; one work item is
//!   one row. Elementwise ops, casts and broadcasts, and the row-wise ops (`softmax`, causal or
//!   not; `layer_norm`, `rms_norm` and their input gradients; `rope`; `cross_entropy` and its
//!   gradient; `reduce_sum`/`reduce_max`/`reduce_mean` over the last dim) live here.
//! - **columns**: a shape `[..., C]` reduced over every leading dim, one work item per column:
//!   bias gradients (`reduce_sum` over all but the last dim). The norm weight gradients
//!   (`layer_norm_gamma_grad`, `rms_norm_gamma_grad`) need each row's statistics in a column
//!   walk, a row-then-column reduction that is not fused yet: they stay runtime ops.
//!
//! ## Rules
//! Nodes are visited in program order. A kernel op starts a group of its own, then joins the
//! group of each operand's producer when all of these hold (XLA's producer-consumer fusion,
//! with TVM's "injective into reduction" rule):
//! 1. both work on the same space (same shape; rows with rows, or an elementwise producer into
//!    a column reduction: "input fusion");
//! 2. a group of column reductions holds no row op (a row op needs a whole row, a column work
//!    item sees one column);
//! 3. no path leaves the group and comes back to the node (that would be a cycle);
//! 4. both are in the same phase (forward, backward, optimizer): a kernel never mixes them, so
//!    recomputation and overlap can treat phases as units;
//! 5. the group stays under [`MAX_OPS`] ops (register pressure and compile time).
//!
//! A group stops at: a matmul, a collective, a view or copy whose layout the kernel cannot
//! index (`reshape`, `transpose`, `slice`, `concat`, `pad`, `split`, `embedding`, `take_shard`,
//! ...), a change of space (a reduction's smaller result feeding an elementwise op of another
//! shape), or the size cap. Constants (`full`) are copied into every kernel that reads them.
//! The results of a group are the values used after it (or returned by the program);
//! everything else stays in registers.
//!
//! ## Multi-tensor kernels
//! Then, horizontally (Apex's and PyTorch's multi-tensor AdamW): independent *flat* groups
//! (elementwise, reading only tensors of their shape and scalars) of the optimizer phase, and
//! the casts of parameters to the compute dtype, are bucketed in program order into kernels of
//! up to [`MAX_TENSORS`] tensors and [`BUCKET_ELEMENTS`] elements; a group joins an open bucket
//! when no path runs between them. One launch then updates a whole bucket of parameters.
//!
//! Not yet: sibling fusion of other independent groups (two reductions of one input), and the
//! per-parameter sums of squares of gradient clipping as one multi-tensor reduction.
//!
//! Before (`tests/passes/fuse/layer-norm.tir`, run as the `fuse` pass of a pipeline):
//! ```text
//! %s: f32[4, 8] = add(%x, %r)
//! %y: f32[4, 8] = layer_norm(%s, %g, %b) {eps = 1e-5}
//! %z: f32[4, 8] = matmul(%y, %w)
//! ```
//! After:
//! ```text
//! %s: f32[4, 8], %y: f32[4, 8] = fused(%x, %r, %g, %b) {kernel = "k0_layer_norm"} {
//!   input %x: f32[4, 8]
//!   ...
//!   output %s, %y
//! }
//! %z: f32[4, 8] = matmul(%y, %w)
//! ```

use shardc_ir::{Graph, Node, Op, TensorType, ValueId};
use std::collections::{BTreeSet, HashMap, HashSet};

/// The most ops one kernel holds.
pub const MAX_OPS: usize = 48;

/// How an op takes part in fusion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Output element i depends on input elements at i (broadcast): add, mul, cast, gelu, ...
    Elementwise,
    /// A row of the output depends on the same row of the input.
    Row,
    /// A column of the output is a reduction over every row.
    Column,
}

/// The family of a node, or `None` when it is not fused (matmul, collective, view, ...).
pub fn family(g: &Graph, n: &Node) -> Option<Family> {
    use Op::*;
    let floats = n.outputs.iter().chain(&n.inputs).all(|&v| g.ty(v).dtype.is_float());
    match n.op {
        Add | Sub | Mul | Div | Maximum | Neg | Exp | Log | Sqrt | Rsqrt | Tanh | Gelu | Silu | Cast | GeluGrad
        | SiluGrad
            if floats =>
        {
            Some(Family::Elementwise)
        }
        Softmax | LayerNorm | RmsNorm | Rope | LayerNormGrad | RmsNormGrad | CrossEntropy | CrossEntropyGrad => {
            Some(Family::Row)
        }
        ReduceSum | ReduceMax | ReduceMean if floats => {
            let x = g.ty(n.inputs[0]);
            let dims = reduced_dims(n, x.rank())?;
            let r = x.rank();
            if r >= 1 && dims == [r - 1] {
                Some(Family::Row)
            } else if r >= 2 && dims == (0..r - 1).collect::<Vec<_>>() && n.op == ReduceSum {
                Some(Family::Column)
            } else {
                None
            }
        }
        _ => None,
    }
}

fn reduced_dims(n: &Node, rank: usize) -> Option<Vec<usize>> {
    let mut dims: Vec<usize> =
        n.attrs.ints("dims")?.iter().map(|&d| shardc_ir::ops::normalize_dim(d, rank).ok()).collect::<Option<_>>()?;
    dims.sort_unstable();
    dims.dedup();
    Some(dims)
}

/// The shape a node iterates over (see the module doc).
fn space(g: &Graph, n: &Node, fam: Family) -> Vec<usize> {
    match fam {
        Family::Elementwise => g.ty(n.output()).shape.to_vec(),
        Family::Row | Family::Column => g.ty(n.inputs[0]).shape.to_vec(),
    }
}

struct Group {
    members: Vec<usize>,
    space: Vec<usize>,
    has_row: bool,
    has_column: bool,
    /// Several independent tensors (multi-tensor fusion): the space is the first one's.
    multi: bool,
}

/// What [`fuse`] did, for `compile`'s summary line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FusionSummary {
    pub kernels: usize,
    pub fused_ops: usize,
}

/// Groups the kernel ops of a verified per-rank program into `fused` nodes (see the module
/// doc). The result verifies and computes what `g` computes, bit for bit, on the interpreter.
pub fn fuse(g: &Graph) -> (Graph, FusionSummary) {
    let producer: HashMap<ValueId, usize> =
        g.nodes.iter().enumerate().flat_map(|(i, n)| n.outputs.iter().map(move |&o| (o, i))).collect();
    let fams: Vec<Option<Family>> = g.nodes.iter().map(|n| family(g, n)).collect();
    let mut group_of: Vec<Option<usize>> = vec![None; g.nodes.len()];
    let mut groups: Vec<Group> = Vec::new();

    for (i, n) in g.nodes.iter().enumerate() {
        let Some(fam) = fams[i] else { continue };
        let sp = space(g, n, fam);
        let gid = groups.len();
        groups.push(Group {
            members: vec![i],
            space: sp,
            has_row: fam == Family::Row,
            has_column: fam == Family::Column,
            multi: false,
        });
        group_of[i] = Some(gid);
        let mut candidates: Vec<usize> = n
            .inputs
            .iter()
            .filter_map(|v| producer.get(v))
            .filter_map(|&p| group_of[p])
            .filter(|&h| h != gid)
            .collect();
        candidates.dedup();
        for h in candidates {
            let cur = group_of[i].expect("just set");
            if h == cur || groups[h].members.is_empty() || groups[h].multi {
                continue;
            }
            let (a, b) = (&groups[h], &groups[cur]);
            let same_space = a.space == b.space;
            let row_with_col = (a.has_row && b.has_column) || (a.has_column && b.has_row);
            // Input fusion into a column reduction: the producer group is elementwise on the
            // reduction's input space.
            let same_phase = g.nodes[a.members[0]].phase == g.nodes[b.members[0]].phase;
            if !same_space || !same_phase || row_with_col || a.members.len() + b.members.len() > MAX_OPS {
                continue;
            }
            // A column group's results are column-shaped: nothing consumes them in its space.
            if a.has_column {
                continue;
            }
            if creates_cycle(g, &producer, &group_of, &groups, h, cur) {
                continue;
            }
            // Merge `cur` into `h`.
            let moved = std::mem::take(&mut groups[cur].members);
            for &m in &moved {
                group_of[m] = Some(h);
            }
            let (row, col) = (groups[cur].has_row, groups[cur].has_column);
            let dst = &mut groups[h];
            dst.members.extend(moved);
            dst.members.sort_unstable();
            dst.has_row |= row;
            dst.has_column |= col;
        }
    }
    horizontal(g, &producer, &mut group_of, &mut groups);
    build(g, &producer, &group_of, &groups)
}

/// Most tensors one multi-tensor kernel updates.
pub const MAX_TENSORS: usize = 32;

/// Most elements one multi-tensor kernel covers (a bucket, as DDP's and ZeRO's are).
pub const BUCKET_ELEMENTS: usize = 1 << 24;

/// Is the group elementwise over its space, reading only tensors of that shape and scalars
/// (what a flat kernel indexes directly)?
fn is_flat(g: &Graph, producer: &HashMap<ValueId, usize>, group: &Group) -> bool {
    let inside: HashSet<usize> = group.members.iter().copied().collect();
    !group.has_row
        && !group.has_column
        && group.members.iter().all(|&m| {
            g.nodes[m].inputs.iter().all(|v| {
                producer.get(v).is_some_and(|p| inside.contains(p) || g.nodes[*p].op == Op::Full) || {
                    let t = g.ty(*v);
                    t.numel() == 1 || t.shape.as_slice() == group.space.as_slice()
                }
            })
        })
}

/// Multi-tensor fusion (horizontal, as Apex's and PyTorch's fused AdamW do): independent flat
/// groups of the optimizer phase (each parameter's AdamW update, its clipping), and the casts
/// of parameters to the compute dtype, are bucketed into kernels of up to [`MAX_TENSORS`]
/// tensors and [`BUCKET_ELEMENTS`] elements, in program order. A group joins the open bucket
/// when no path runs between them (rule 3) and the caps hold.
fn horizontal(g: &Graph, producer: &HashMap<ValueId, usize>, group_of: &mut [Option<usize>], groups: &mut [Group]) {
    let reads_only_args = |grp: &Group| {
        grp.members.iter().all(|&m| {
            g.nodes[m]
                .inputs
                .iter()
                .all(|v| producer.get(v).is_none_or(|&p| grp.members.contains(&p) || g.nodes[p].op == Op::Full))
        })
    };
    let mut order: Vec<usize> = (0..groups.len()).filter(|&h| !groups[h].members.is_empty()).collect();
    order.sort_by_key(|&h| groups[h].members[0]);
    let candidates: Vec<usize> = order
        .into_iter()
        .filter(|&h| {
            let grp = &groups[h];
            let phase = g.nodes[grp.members[0]].phase;
            is_flat(g, producer, grp) && (phase == shardc_ir::Phase::Optimizer || reads_only_args(grp))
        })
        .collect();
    // (bucket group, tensors, elements)
    let mut open: Vec<(usize, usize, usize)> = Vec::new();
    for h in candidates {
        let phase = g.nodes[groups[h].members[0]].phase;
        let n: usize = groups[h].space.iter().product();
        let fits = |&(b, tensors, elements): &(usize, usize, usize)| {
            g.nodes[groups[b].members[0]].phase == phase
                && tensors < MAX_TENSORS
                && elements + n <= BUCKET_ELEMENTS
                && groups[b].members.len() + groups[h].members.len() <= MAX_TENSORS * MAX_OPS
        };
        let slot = open.iter().position(|b| fits(b) && !creates_cycle(g, producer, group_of, groups, b.0, h));
        match slot {
            Some(k) => {
                let b = open[k].0;
                let moved = std::mem::take(&mut groups[h].members);
                for &m in &moved {
                    group_of[m] = Some(b);
                }
                groups[b].members.extend(moved);
                groups[b].members.sort_unstable();
                groups[b].multi = true;
                open[k].1 += 1;
                open[k].2 += n;
            }
            None => open.push((h, 1, n)),
        }
        // Only the most recent buckets stay open: a bucket's kernel runs where its first
        // member was, so reaching far back would hold results (and memory) longer.
        if open.len() > 2 {
            open.remove(0);
        }
    }
}

/// Would putting group `a` and group `b` into one kernel make a cycle? True when an operand of
/// one of them is computed, through nodes of neither, from the other.
fn creates_cycle(
    g: &Graph,
    producer: &HashMap<ValueId, usize>,
    group_of: &[Option<usize>],
    groups: &[Group],
    a: usize,
    b: usize,
) -> bool {
    let both: HashSet<usize> = groups[a].members.iter().chain(&groups[b].members).copied().collect();
    let earliest = *both.iter().min().expect("groups are non-empty");
    // Walk back from the operands of both groups that neither group computes; reaching a node
    // of either group means a path leaves and comes back.
    let mut stack: Vec<usize> = both
        .iter()
        .flat_map(|&m| g.nodes[m].inputs.iter())
        .filter_map(|v| producer.get(v).copied())
        .filter(|p| !both.contains(p))
        .collect();
    let mut seen = HashSet::new();
    while let Some(x) = stack.pop() {
        if x < earliest || !seen.insert(x) {
            continue;
        }
        if both.contains(&x) {
            return true;
        }
        // A node of another group stands for its whole group (it becomes one node).
        let members: Vec<usize> = match group_of[x] {
            Some(h) if h != a && h != b => groups[h].members.clone(),
            _ => vec![x],
        };
        for m in members {
            if both.contains(&m) {
                return true;
            }
            seen.insert(m);
            for v in &g.nodes[m].inputs {
                if let Some(&p) = producer.get(v) {
                    stack.push(p);
                }
            }
        }
    }
    false
}

/// The fused program: each group as one `fused` node at a topological position, the other
/// nodes as they were.
fn build(
    g: &Graph,
    producer: &HashMap<ValueId, usize>,
    group_of: &[Option<usize>],
    groups: &[Group],
) -> (Graph, FusionSummary) {
    let mut summary = FusionSummary::default();
    // Units to order: a group (by its first member) or a single node.
    #[derive(Clone, Copy, PartialEq, Eq, Hash)]
    enum Unit {
        Node(usize),
        Group(usize),
    }
    let unit_of = |i: usize| match group_of[i] {
        Some(h) => Unit::Group(h),
        None => Unit::Node(i),
    };
    let used_outside: HashSet<ValueId> = g.output_values().collect();
    let mut users: HashMap<ValueId, Vec<usize>> = HashMap::new();
    for (i, n) in g.nodes.iter().enumerate() {
        for &v in &n.inputs {
            users.entry(v).or_default().push(i);
        }
    }
    // Stable topological order of the units: Kahn's algorithm keyed by each unit's first node.
    let mut units: Vec<Unit> = Vec::new();
    let mut seen_units = HashSet::new();
    for i in 0..g.nodes.len() {
        let u = unit_of(i);
        if seen_units.insert(u) {
            units.push(u);
        }
    }
    let members = |u: Unit| -> Vec<usize> {
        match u {
            Unit::Node(i) => vec![i],
            Unit::Group(h) => groups[h].members.clone(),
        }
    };
    let index_of: HashMap<Unit, usize> = units.iter().enumerate().map(|(k, &u)| (u, k)).collect();
    let mut indegree = vec![0usize; units.len()];
    let mut succ: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); units.len()];
    for (k, &u) in units.iter().enumerate() {
        let deps: BTreeSet<usize> = members(u)
            .iter()
            .flat_map(|&m| g.nodes[m].inputs.iter())
            .filter_map(|v| producer.get(v))
            .map(|&p| index_of[&unit_of(p)])
            .filter(|&d| d != k)
            .collect();
        indegree[k] = deps.len();
        for d in deps {
            succ[d].insert(k);
        }
    }
    let mut ready: BTreeSet<usize> = (0..units.len()).filter(|&k| indegree[k] == 0).collect();
    let mut order = Vec::with_capacity(units.len());
    while let Some(k) = ready.pop_first() {
        order.push(k);
        for &s in &succ[k] {
            indegree[s] -= 1;
            if indegree[s] == 0 {
                ready.insert(s);
            }
        }
    }
    assert_eq!(order.len(), units.len(), "fusion groups are acyclic by construction");

    let mut out = g.clone();
    out.nodes.clear();
    let mut kernel_no = 0usize;
    let mut owner: HashMap<ValueId, ValueId> = HashMap::new();
    for k in order {
        match units[k] {
            Unit::Node(i) => out.nodes.push(g.nodes[i].clone()),
            Unit::Group(h) => {
                let ms = &groups[h].members;
                let inside: HashSet<usize> = ms.iter().copied().collect();
                let results: Vec<ValueId> = ms
                    .iter()
                    .flat_map(|&m| g.nodes[m].outputs.iter().copied())
                    .filter(|v| {
                        used_outside.contains(v)
                            || users.get(v).is_some_and(|us| us.iter().any(|u| !inside.contains(u)))
                    })
                    .collect();
                let label = kernel_label(g, ms);
                let name = if groups[h].multi {
                    let what = if g.nodes[ms[0]].phase == shardc_ir::Phase::Optimizer { "adamw" } else { &label };
                    format!("k{kernel_no}_multi_tensor_{what}")
                } else {
                    format!("k{kernel_no}_{label}")
                };
                kernel_no += 1;
                summary.kernels += 1;
                summary.fused_ops += ms.len();
                let node = kernel_node(g, ms, &results, producer, name);
                for &m in ms {
                    for &v in &g.nodes[m].outputs {
                        owner.insert(v, node.output());
                    }
                }
                out.nodes.push(node);
            }
        }
    }
    // An `adjoint` origin naming a value that is now inside a kernel names that kernel's first
    // result instead (the node that computes it).
    let defined: HashSet<ValueId> =
        out.args.iter().map(|a| a.value).chain(out.nodes.iter().flat_map(|n| n.outputs.iter().copied())).collect();
    for n in &mut out.nodes {
        if let shardc_ir::Origin::Adjoint(v) = &mut n.origin {
            if !defined.contains(v) {
                if let Some(&k) = owner.get(v) {
                    *v = k;
                }
            }
        }
    }
    drop_dead_constants(&mut out);
    out.finish();
    if let Err(e) = shardc_ir::verify::verify(&out) {
        panic!("fusion broke the program (a compiler bug): {e}");
    }
    (out, summary)
}

/// `layer_norm`, `softmax`, ... after the group's first row or column op; `elementwise` else.
fn kernel_label(g: &Graph, members: &[usize]) -> String {
    let main = members
        .iter()
        .map(|&m| &g.nodes[m])
        .find(|n| family(g, n) != Some(Family::Elementwise))
        .unwrap_or(&g.nodes[members[0]]);
    let mut label = main.op.name().to_string();
    if members.len() == 1 && main.op == Op::Cast {
        label = "cast".into();
    }
    label
}

/// The `fused` node of a group: its body holds the members (and copies of the constants they
/// read); its operands are the values they read from outside; its results are `results`.
fn kernel_node(
    g: &Graph,
    members: &[usize],
    results: &[ValueId],
    producer: &HashMap<ValueId, usize>,
    name: String,
) -> Node {
    let inside: HashSet<ValueId> = members.iter().flat_map(|&m| g.nodes[m].outputs.iter().copied()).collect();
    let mut body = Graph::new(name.clone());
    let mut map: HashMap<ValueId, ValueId> = HashMap::new();
    let mut operands: Vec<ValueId> = Vec::new();
    let mut constants: Vec<ValueId> = Vec::new();
    for &m in members {
        for &v in &g.nodes[m].inputs {
            if inside.contains(&v) || map.contains_key(&v) || constants.contains(&v) {
                continue;
            }
            if producer.get(&v).is_some_and(|&p| g.nodes[p].op == Op::Full) {
                constants.push(v);
            } else {
                let id = body.fresh_value(g.name_of(v).to_string(), g.ty(v).clone());
                body.values[id.index()].layer = g.layer(v);
                body.args.push(shardc_ir::Arg { kind: shardc_ir::ArgKind::Input, value: id, role: Default::default() });
                map.insert(v, id);
                operands.push(v);
            }
        }
    }
    let copy = |body: &mut Graph, map: &mut HashMap<ValueId, ValueId>, n: &Node| {
        let outputs: Vec<ValueId> = n
            .outputs
            .iter()
            .map(|&o| {
                let id = body.fresh_value(g.name_of(o).to_string(), g.ty(o).clone());
                body.values[id.index()].layer = g.layer(o);
                map.insert(o, id);
                id
            })
            .collect();
        let mut c = n.clone();
        c.inputs = n.inputs.iter().map(|v| map[v]).collect();
        c.outputs = outputs;
        // Origins name values of the program, which the kernel's own graph does not hold: the
        // fused node keeps its first member's origin whole.
        match &mut c.origin {
            shardc_ir::Origin::Adjoint(_) => c.origin = shardc_ir::Origin::Model,
            shardc_ir::Origin::Step { param, .. } => *param = None,
            _ => {}
        }
        body.nodes.push(c);
    };
    for &c in &constants {
        copy(&mut body, &mut map, &g.nodes[producer[&c]]);
    }
    for &m in members {
        copy(&mut body, &mut map, &g.nodes[m]);
    }
    body.outputs = results.iter().map(|r| shardc_ir::Output::plain(map[r])).collect();
    // Phases inside a kernel follow program order; a kernel sits in its first member's phase.
    let first = &g.nodes[members[0]];
    let phase = first.phase;
    for n in &mut body.nodes {
        n.phase = phase;
    }
    body.finish();
    let mut attrs = shardc_ir::Attrs::new();
    attrs.0.insert("kernel".into(), shardc_ir::Attr::Str(name));
    Node {
        op: Op::Fused,
        inputs: operands,
        attrs,
        outputs: results.to_vec(),
        phase,
        origin: first.origin.clone(),
        body: Some(Box::new(body)),
    }
}

/// Removes `full` nodes nothing reads any more (their readers copied them).
fn drop_dead_constants(g: &mut Graph) {
    let mut used: HashSet<ValueId> = g.output_values().collect();
    for n in &g.nodes {
        used.extend(n.inputs.iter().copied());
    }
    g.nodes.retain(|n| n.op != Op::Full || n.outputs.iter().any(|o| used.contains(o)));
}

/// The types of a kernel's operands and results, for listings.
pub fn kernel_signature(n: &Node, g: &Graph) -> (Vec<TensorType>, Vec<TensorType>) {
    (n.inputs.iter().map(|&v| g.ty(v).clone()).collect(), n.outputs.iter().map(|&v| g.ty(v).clone()).collect())
}
