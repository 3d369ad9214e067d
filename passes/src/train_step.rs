//! The whole training step as one graph: forward, loss, backward ([`crate::autodiff`]),
//! optional gradient clipping by global norm, and the AdamW update.
//!
//! After this pass the graph's arguments are the forward graph's (parameters as fp32 master
//! weights, data inputs), plus `state %<p>.adam_m` and `state %<p>.adam_v` per parameter and the
//! scalar inputs `%lr` (this step's learning rate, so that any schedule is the caller's) and
//! `%step` (1-based, for bias correction). Its outputs are `%loss`, `%grad_norm` (global L2 norm
//! of the gradients before clipping), then per parameter `%<p>.new`, `%<p>.adam_m.new`,
//! `%<p>.adam_v.new`, in parameter order.
//!
//! AdamW as PyTorch's `torch.optim.AdamW` computes it (Loshchilov & Hutter 2019), step t:
//! ```text
//! p <- p * (1 - lr * wd)                      decoupled decay: parameters of rank >= 2 only
//! m <- b1 m + (1 - b1) g                      (nanoGPT/Megatron: no decay on biases, norms)
//! v <- b2 v + (1 - b2) g^2
//! p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//! ```
//! Clipping as `torch.nn.utils.clip_grad_norm_`: g <- g * min(1, clip / (norm + 1e-6)).

use crate::autodiff::{differentiate, AutodiffError};
use shardc_ir::ops::Op;
use shardc_ir::{ArgKind, Builder, DType, Graph, ValueId};
use std::collections::HashMap;

/// AdamW hyper-parameters that are fixed for a run (the learning rate is a step input).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value; 0 disables clipping.
    pub grad_clip: f64,
}

impl Default for AdamW {
    /// nanoGPT's defaults.
    fn default() -> Self {
        AdamW { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, grad_clip: 1.0 }
    }
}

/// The training-step graph and the names that connect one step to the next.
pub struct TrainStep {
    pub graph: Graph,
    /// Parameter names, in the order of the per-parameter outputs.
    pub params: Vec<String>,
    /// Nodes `0..forward_nodes` are the forward pass (loss included), the nodes up to
    /// `backward_end` the backward pass; the rest synchronise gradients and update.
    pub forward_nodes: usize,
    pub backward_end: usize,
    /// The names of the gradients as the optimizer consumes them (averaged; sharded under ZeRO).
    pub optimizer_grads: Vec<String>,
    /// The rule behind each collective the sharding pass put in the forward (by value name);
    /// backward collectives map to the forward value they are the adjoint of (`adjoint_of`).
    pub rules: HashMap<String, String>,
    pub adjoint_of: HashMap<String, String>,
    /// Tensor parallelism: the axis, and the parameters stored split (name -> dim).
    pub tensor_parallel: Option<(String, HashMap<String, usize>)>,
}

/// The rule (a name for `shardc plan` and `shardc explain`) and phase of a collective this pass
/// adds, from the name it gives the collective's result. Collectives of the forward and backward
/// passes (autodiff's adjoints) are classified by position instead.
pub fn collective_rule(value: &str) -> Option<(&'static str, &'static str)> {
    let table: [(&str, &str, &str); 7] = [
        ("grad_sumsq_tp", "tensor-parallel/global-gradient-norm", "optimizer"),
        (".grad_sum", "zero-0/all-reduce-gradients", "backward"),
        (".grad_shard_sum", "zero-1/reduce-scatter-gradients", "backward"),
        (".regathered", "zero-3/gather-parameters-for-backward", "backward"),
        ("grad_sumsq_all", "zero-1/global-gradient-norm", "optimizer"),
        ("loss_sum", "data-parallel/average-loss", "optimizer"),
        (".gathered", "zero-1/gather-updated-parameters", "optimizer"),
    ];
    table.iter().find(|(suffix, _, _)| value.ends_with(suffix)).map(|&(_, rule, phase)| (rule, phase))
}

impl TrainStep {
    /// Output index of the new value of parameter `k`; its m and v follow.
    pub fn new_param_output(k: usize) -> usize {
        2 + 3 * k
    }
}

/// Builds the training step of a forward graph whose first output is the scalar loss.
pub fn build_train_step(forward: &Graph, opt: &AdamW) -> Result<TrainStep, AutodiffError> {
    build_data_parallel_step(forward, opt, None)
}

/// How the training step is spread over a data-parallel mesh axis (ZeRO, Rajbhandari et al.
/// 2020). Stages 1 and 2 build the same graph (they differ in when gradient memory is freed,
/// which the memory planner will account for). Stage 3 keeps the parameters as shards too (see
/// [`shard_parameters`]) and gathers them twice, for the forward and again for the backward.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataParallel {
    /// The mesh axis the batch is split over.
    pub axis: String,
    /// 0: replicated optimizer, gradients all-reduced. 1, 2: optimizer state partitioned over
    /// the axis, gradients reduce-scattered, updated parameters all-gathered.
    pub zero_stage: u8,
}

/// ZeRO-3's forward: every parameter becomes a flat, zero-padded shard argument of `1/n` of its
/// elements (same name), all-gathered over `axis`, unpadded and reshaped where the original
/// parameter was. Returns the graph and each parameter's original rank.
pub fn shard_parameters(
    g: &Graph,
    axis: &str,
    n: usize,
) -> Result<(Graph, std::collections::HashMap<String, usize>), String> {
    use shardc_ir::{Attr, Attrs};
    let mut b = Builder::new(g.name.clone());
    b.graph.mesh = g.mesh.clone();
    let mut map = std::collections::HashMap::new();
    let mut ranks = std::collections::HashMap::new();
    let mut pending = Vec::new();
    for a in &g.args {
        let v = g.value(a.value);
        if a.kind == ArgKind::Param {
            let padded = v.ty.numel().div_ceil(n) * n;
            let shard = b.arg(ArgKind::Param, &v.name, v.ty.dtype, &[padded / n]);
            ranks.insert(v.name.clone(), v.ty.rank());
            pending.push((a.value, shard, padded));
        } else {
            map.insert(a.value, b.arg(a.kind, &v.name, v.ty.dtype, &v.ty.shape));
        }
    }
    for (orig, shard, padded) in pending {
        let v = g.value(orig);
        let gather = Attrs::new().with("axis", Attr::Str(axis.to_string())).with("dim", Attr::Int(0));
        let mut full = b.op(Op::AllGather, &[shard], gather, &format!("{}.gathered", v.name))?;
        if padded != v.ty.numel() {
            let cut = Attrs::new()
                .with("dim", Attr::Int(0))
                .with("start", Attr::Int(0))
                .with("end", Attr::Int(v.ty.numel() as i64));
            full = b.op(Op::Slice, &[full], cut, &format!("{}.unpadded", v.name))?;
        }
        map.insert(orig, b.reshape(full, &v.ty.shape, &format!("{}.full", v.name))?);
    }
    for node in &g.nodes {
        let inputs: Vec<ValueId> = node.inputs.iter().map(|v| map[v]).collect();
        let out = b.op(node.op, &inputs, node.attrs.clone(), g.name_of(node.output))?;
        map.insert(node.output, out);
    }
    let outputs: Vec<ValueId> = g.outputs.iter().map(|v| map[v]).collect();
    Ok((b.finish(&outputs), ranks))
}

/// ZeRO-3's backward gathers the parameters again instead of keeping the forward's copies alive
/// (Rajbhandari et al. 2020, section 5.3: 3 Psi of traffic per step, not 2 Psi): every chain
/// `all_gather -> [slice] -> reshape [-> cast]` that rebuilds a parameter in the forward (the first
/// `forward_nodes` nodes) and whose result the backward uses (a weight in an input's gradient;
/// not a bias) is repeated at the start of the backward, and backward nodes use the copy.
fn regather_for_backward(g: Graph, forward_nodes: usize) -> Result<Graph, String> {
    let mut g = g;
    // Forward values that are parameter rebuilds: results of the gather chains.
    let mut chains: Vec<Vec<usize>> = Vec::new();
    for (i, n) in g.nodes[..forward_nodes].iter().enumerate() {
        if n.op == Op::AllGather && g.args.iter().any(|a| a.kind == ArgKind::Param && a.value == n.inputs[0]) {
            let mut chain = vec![i];
            let mut last = n.output;
            // Follow the slice/reshape (and, under mixed precision, the cast to the compute
            // dtype) that complete the rebuild.
            while let Some(j) = g.nodes[..forward_nodes]
                .iter()
                .position(|m| matches!(m.op, Op::Slice | Op::Reshape | Op::Cast) && m.inputs == [last])
            {
                chain.push(j);
                last = g.nodes[j].output;
            }
            chains.push(chain);
        }
    }
    let mut copies = Vec::new();
    let mut replace = std::collections::HashMap::new();
    let used_in_backward = |v: shardc_ir::ValueId| g.nodes[forward_nodes..].iter().any(|n| n.inputs.contains(&v));
    chains.retain(|chain| used_in_backward(g.nodes[*chain.last().expect("chains are non-empty")].output));
    for chain in &chains {
        let mut prev: Option<shardc_ir::ValueId> = None;
        for &i in chain {
            let n = g.nodes[i].clone();
            let name = format!("{}.regathered", g.name_of(n.output));
            let id = shardc_ir::ValueId(g.values.len() as u32);
            g.values.push(shardc_ir::Value { name, ty: g.ty(n.output).clone(), sharding: None });
            let inputs = match prev {
                Some(p) => vec![p],
                None => n.inputs.clone(),
            };
            copies.push(shardc_ir::Node { op: n.op, inputs, attrs: n.attrs.clone(), output: id });
            prev = Some(id);
        }
        let last = g.nodes[*chain.last().expect("chains are non-empty")].output;
        replace.insert(last, prev.expect("chains are non-empty"));
    }
    for n in &mut g.nodes[forward_nodes..] {
        for v in &mut n.inputs {
            if let Some(&r) = replace.get(v) {
                *v = r;
            }
        }
    }
    let tail = g.nodes.split_off(forward_nodes);
    g.nodes.extend(copies);
    g.nodes.extend(tail);
    if g.values.iter().map(|v| &v.name).collect::<std::collections::HashSet<_>>().len() != g.values.len() {
        return Err("re-gathered parameter names collide with existing values".into());
    }
    g.finish();
    Ok(g)
}

/// One parameter as the optimizer sees it: whole, or this rank's flat shard.
struct UpdateView {
    name: String,
    /// The parameter (or its shard) and its gradient (or the shard's), both f32.
    param: ValueId,
    grad: ValueId,
    /// Rank of the parameter itself (weight decay applies to rank >= 2).
    param_rank: usize,
    /// Shape of the AdamW moments.
    state_shape: Vec<usize>,
    /// For a shard: (elements, padded elements, parameter shape) to gather it back.
    shard: Option<(usize, usize, Vec<usize>)>,
}

/// [`build_train_step`] with data parallelism over `dp.axis`: each rank's `forward` sees its
/// own slice of the global batch; the reported loss and the gradients are averaged over the axis
/// (so the update equals the update of the global batch on one device). With `zero_stage` 0
/// every rank applies the same AdamW step to its full replica (gradients: `all_reduce`); with 1
/// or 2 each rank keeps the moments of its 1/n of every (flattened, zero-padded) parameter, gets
/// that shard's averaged gradient by `reduce_scatter`, updates it, and the new parameters are
/// reassembled with `all_gather`. `dp: None` is the single-device step.
pub fn build_data_parallel_step(
    forward: &Graph,
    opt: &AdamW,
    dp: Option<&DataParallel>,
) -> Result<TrainStep, AutodiffError> {
    build_step(forward, opt, dp, None)
}

/// The training step of a forward graph on a mesh with tensor parallelism (`tp`: the sharding
/// pass runs on the forward first, see [`crate::sharding`]) and data parallelism (`dp`). The
/// global gradient norm sums the squares of split parameters' chunks over the tensor-parallel
/// axis and counts replicated parameters once, as Megatron does. Returns the step and the
/// sharded forward (for `shardc plan` and `explain`).
pub fn build_parallel_step(
    forward: &Graph,
    opt: &AdamW,
    dp: Option<&DataParallel>,
    tp: Option<&crate::sharding::ShardOptions>,
    device: &crate::cost::DeviceModel,
) -> Result<(TrainStep, Option<crate::sharding::Sharded>), AutodiffError> {
    let Some(tp) = tp else { return Ok((build_step(forward, opt, dp, None)?, None)) };
    let sharded = crate::sharding::shard_forward(forward, tp, device).map_err(|e| AutodiffError(e.to_string()))?;
    let mut step = build_step(&sharded.graph, opt, dp, Some((&tp.axis, &sharded.param_splits)))?;
    step.rules.extend(sharded.rules.iter().map(|(k, v)| (k.clone(), v.clone())));
    Ok((step, Some(sharded)))
}

fn build_step(
    forward: &Graph,
    opt: &AdamW,
    dp: Option<&DataParallel>,
    tp_split: Option<(&str, &HashMap<String, usize>)>,
) -> Result<TrainStep, AutodiffError> {
    let fail = |m: String| AutodiffError(m);
    // ZeRO-3: the parameters themselves become flat shards, gathered where the forward uses them.
    let stage3 = match dp {
        Some(dp) if dp.zero_stage == 3 => {
            let n = forward.mesh.axis_size(&dp.axis).ok_or_else(|| {
                fail(format!("the forward graph's mesh `{}` has no axis `{}`", forward.mesh, dp.axis))
            })?;
            Some(shard_parameters(forward, &dp.axis, n).map_err(fail)?)
        }
        _ => None,
    };
    let forward = stage3.as_ref().map_or(forward, |(g, _)| g);
    let params: Vec<ValueId> = forward.args_of(ArgKind::Param).collect();
    let loss = *forward.outputs.first().ok_or_else(|| fail("the forward graph has no outputs".into()))?;
    let mut d = differentiate(forward, loss, &params)?;
    if stage3.is_some() {
        // Renumbering moves the gradients' ids; their names stay.
        let names: Vec<String> = d.grads.iter().map(|&v| d.graph.name_of(v).to_string()).collect();
        d.graph = regather_for_backward(d.graph, forward.nodes.len()).map_err(fail)?;
        d.grads = names.iter().map(|n| d.graph.find(n).expect("gradients keep their names")).collect();
    }
    let (forward_nodes, backward_end) = (forward.nodes.len(), d.graph.nodes.len());
    let adjoint_of = std::mem::take(&mut d.adjoint_of);
    let mut b = Builder::from_graph(d.graph);
    let f32s = |b: &mut Builder, x: f64, hint: &str| b.scalar(x, DType::F32, hint).map_err(fail);
    let mut loss = loss;
    let mut views = Vec::new();
    for (&p, &g) in params.iter().zip(&d.grads) {
        let ty = forward.ty(p);
        let name = forward.name_of(p).to_string();
        // Under ZeRO-3 the parameter is already this rank's flat shard; decay follows the
        // original parameter's rank.
        let param_rank = stage3.as_ref().and_then(|(_, ranks)| ranks.get(&name).copied()).unwrap_or(ty.rank());
        views.push(UpdateView { name, param: p, grad: g, param_rank, state_shape: ty.shape.clone(), shard: None });
    }
    let mut sharded_norm_axis = None;
    if let Some(dp) = dp {
        let axis = dp.axis.as_str();
        let n = forward
            .mesh
            .axis_size(axis)
            .ok_or_else(|| fail(format!("the forward graph's mesh `{}` has no axis `{axis}`", forward.mesh)))?;
        if dp.zero_stage > 3 {
            return Err(fail(format!("ZeRO has stages 0 to 3, not {}", dp.zero_stage)));
        }
        let inv = f32s(&mut b, 1.0 / n as f64, "dp_inv_ranks")?;
        let on_axis = shardc_ir::Attrs::new().with("axis", shardc_ir::Attr::Str(axis.to_string()));
        let dim0 = on_axis.clone().with("dim", shardc_ir::Attr::Int(0));
        let sum = b.op(Op::AllReduce, &[loss], on_axis.clone(), "loss_sum").map_err(fail)?;
        loss = b.binary(Op::Mul, sum, inv, "loss_mean").map_err(fail)?;
        for v in &mut views {
            let name = v.name.clone();
            if dp.zero_stage == 3 {
                // The adjoint of the forward all_gather already reduce-scattered (summed) the
                // gradient into this rank's shard.
                v.grad = b.binary(Op::Mul, v.grad, inv, &format!("{name}.grad_shard")).map_err(fail)?;
                continue;
            }
            if dp.zero_stage == 0 {
                let sum = b.op(Op::AllReduce, &[v.grad], on_axis.clone(), &format!("{name}.grad_sum")).map_err(fail)?;
                v.grad = b.binary(Op::Mul, sum, inv, &format!("{name}.grad_mean")).map_err(fail)?;
                continue;
            }
            // Flatten, pad to a multiple of n, and keep this rank's 1/n.
            let shape = v.state_shape.clone();
            let numel: usize = shape.iter().product();
            let padded = numel.div_ceil(n) * n;
            let flat = |b: &mut Builder, x: ValueId, hint: &str| -> Result<ValueId, AutodiffError> {
                let f = b.reshape(x, &[numel], &format!("{hint}_flat")).map_err(fail)?;
                if padded == numel {
                    return Ok(f);
                }
                let pad = shardc_ir::Attrs::new()
                    .with("dim", shardc_ir::Attr::Int(0))
                    .with("before", shardc_ir::Attr::Int(0))
                    .with("after", shardc_ir::Attr::Int((padded - numel) as i64));
                b.op(Op::Pad, &[f], pad, &format!("{hint}_padded")).map_err(fail)
            };
            let gf = flat(&mut b, v.grad, &format!("{name}.grad"))?;
            let gs = b.op(Op::ReduceScatter, &[gf], dim0.clone(), &format!("{name}.grad_shard_sum")).map_err(fail)?;
            v.grad = b.binary(Op::Mul, gs, inv, &format!("{name}.grad_shard")).map_err(fail)?;
            let pf = flat(&mut b, v.param, &name)?;
            v.param = b.op(Op::TakeShard, &[pf], dim0.clone(), &format!("{name}.shard")).map_err(fail)?;
            v.state_shape = vec![padded / n];
            v.shard = Some((numel, padded, shape));
        }
        if dp.zero_stage > 0 {
            sharded_norm_axis = Some(on_axis);
        }
    }
    let lr = b.input("lr", DType::F32, &[]);
    let step = b.input("step", DType::F32, &[]);

    // Global gradient norm (each rank sums its shards; the shards' sums are then added up).
    // Tensor-parallel chunks are summed over their axis; replicated parameters count once.
    let mut sumsq: Option<ValueId> = None;
    let mut split_sumsq: Option<ValueId> = None;
    for v in &views {
        let split = tp_split.is_some_and(|(_, p)| p.contains_key(&v.name));
        let sq = b.binary(Op::Mul, v.grad, v.grad, &format!("{}.grad_sq", v.name)).map_err(fail)?;
        let rank = b.ty(v.grad).rank() as i64;
        let s = if rank == 0 {
            sq
        } else {
            b.reduce(Op::ReduceSum, sq, &(0..rank).collect::<Vec<_>>(), &format!("{}.grad_sumsq", v.name))
                .map_err(fail)?
        };
        let acc = if split { &mut split_sumsq } else { &mut sumsq };
        let hint = if split { "grad_sumsq_split" } else { "grad_sumsq" };
        *acc = Some(match *acc {
            Some(a) => b.binary(Op::Add, a, s, hint).map_err(fail)?,
            None => s,
        });
    }
    let mut sumsq = match sumsq {
        Some(s) => s,
        None => f32s(&mut b, 0.0, "grad_sumsq")?,
    };
    if let (Some(split), Some((axis, _))) = (split_sumsq, tp_split) {
        let attrs = shardc_ir::Attrs::new().with("axis", shardc_ir::Attr::Str(axis.to_string()));
        let all = b.op(Op::AllReduce, &[split], attrs, "grad_sumsq_tp").map_err(fail)?;
        sumsq = b.binary(Op::Add, sumsq, all, "grad_sumsq_total").map_err(fail)?;
    }
    if let Some(attrs) = sharded_norm_axis {
        sumsq = b.op(Op::AllReduce, &[sumsq], attrs, "grad_sumsq_all").map_err(fail)?;
    }
    let grad_norm = b.unary(Op::Sqrt, sumsq, "grad_norm").map_err(fail)?;
    let clip_coef = if opt.grad_clip > 0.0 {
        // min(1, clip / (norm + 1e-6)) = -max(-clip / (norm + 1e-6), -1)
        let tiny = f32s(&mut b, 1e-6, "clip_tiny")?;
        let denom = b.binary(Op::Add, grad_norm, tiny, "clip_denom").map_err(fail)?;
        let clip = f32s(&mut b, opt.grad_clip, "clip_max_norm")?;
        let ratio = b.binary(Op::Div, clip, denom, "clip_ratio").map_err(fail)?;
        let neg = b.unary(Op::Neg, ratio, "clip_ratio_neg").map_err(fail)?;
        let minus_one = f32s(&mut b, -1.0, "clip_minus_one")?;
        let m = b.binary(Op::Maximum, neg, minus_one, "clip_neg_coef").map_err(fail)?;
        Some(b.unary(Op::Neg, m, "clip_coef").map_err(fail)?)
    } else {
        None
    };

    // Bias corrections from the step count: 1 - beta^t = 1 - exp(t ln beta).
    let bias_correction = |b: &mut Builder, beta: f64, hint: &str| -> Result<ValueId, AutodiffError> {
        let ln = f32s(b, beta.ln(), &format!("{hint}_ln_beta"))?;
        let t = b.binary(Op::Mul, step, ln, &format!("{hint}_t_ln_beta")).map_err(fail)?;
        let pow = b.unary(Op::Exp, t, &format!("{hint}_beta_pow")).map_err(fail)?;
        let one = f32s(b, 1.0, &format!("{hint}_one"))?;
        b.binary(Op::Sub, one, pow, hint).map_err(fail)
    };
    let bc1 = bias_correction(&mut b, opt.beta1, "bias_correction1")?;
    let bc2 = bias_correction(&mut b, opt.beta2, "bias_correction2")?;
    let step_size = b.binary(Op::Div, lr, bc1, "adam_step_size").map_err(fail)?;
    let bc2_sqrt = b.unary(Op::Sqrt, bc2, "bias_correction2_sqrt").map_err(fail)?;
    let (b1, one_minus_b1) =
        (f32s(&mut b, opt.beta1, "adam_beta1")?, f32s(&mut b, 1.0 - opt.beta1, "adam_one_minus_beta1")?);
    let (b2, one_minus_b2) =
        (f32s(&mut b, opt.beta2, "adam_beta2")?, f32s(&mut b, 1.0 - opt.beta2, "adam_one_minus_beta2")?);
    let eps = f32s(&mut b, opt.eps, "adam_eps")?;
    let decay = if opt.weight_decay > 0.0 {
        let wd = f32s(&mut b, opt.weight_decay, "weight_decay")?;
        let lr_wd = b.binary(Op::Mul, lr, wd, "lr_wd").map_err(fail)?;
        let one = f32s(&mut b, 1.0, "decay_one")?;
        Some(b.binary(Op::Sub, one, lr_wd, "decay_factor").map_err(fail)?)
    } else {
        None
    };

    let mut outputs = vec![loss, grad_norm];
    let mut names = Vec::new();
    for view in &views {
        let name = view.name.clone();
        let ty = b.ty(view.param).clone();
        if ty.dtype != DType::F32 {
            return Err(fail(format!(
                "parameter `%{name}` is {ty}; master weights must be f32 (compute copies are cast inside the graph)"
            )));
        }
        let (p, g0) = (view.param, view.grad);
        let m = b.arg(ArgKind::State, &format!("{name}.adam_m"), DType::F32, &view.state_shape);
        let v = b.arg(ArgKind::State, &format!("{name}.adam_v"), DType::F32, &view.state_shape);
        let g = match clip_coef {
            Some(c) => b.binary(Op::Mul, g0, c, &format!("{name}.grad_clipped")).map_err(fail)?,
            None => g0,
        };
        let p_decayed = match decay {
            Some(f) if view.param_rank >= 2 => b.binary(Op::Mul, p, f, &format!("{name}.decayed")).map_err(fail)?,
            _ => p,
        };
        let m1 = b.binary(Op::Mul, m, b1, &format!("{name}.adam_m_decay")).map_err(fail)?;
        let m2 = b.binary(Op::Mul, g, one_minus_b1, &format!("{name}.adam_m_in")).map_err(fail)?;
        let m_new = b.binary(Op::Add, m1, m2, &format!("{name}.adam_m.new")).map_err(fail)?;
        let gg = b.binary(Op::Mul, g, g, &format!("{name}.grad_sq_update")).map_err(fail)?;
        let v1 = b.binary(Op::Mul, v, b2, &format!("{name}.adam_v_decay")).map_err(fail)?;
        let v2 = b.binary(Op::Mul, gg, one_minus_b2, &format!("{name}.adam_v_in")).map_err(fail)?;
        let v_new = b.binary(Op::Add, v1, v2, &format!("{name}.adam_v.new")).map_err(fail)?;
        let root = b.unary(Op::Sqrt, v_new, &format!("{name}.adam_v_sqrt")).map_err(fail)?;
        let scaled = b.binary(Op::Div, root, bc2_sqrt, &format!("{name}.adam_v_hat_sqrt")).map_err(fail)?;
        let denom = b.binary(Op::Add, scaled, eps, &format!("{name}.adam_denom")).map_err(fail)?;
        let ratio = b.binary(Op::Div, m_new, denom, &format!("{name}.adam_ratio")).map_err(fail)?;
        let delta = b.binary(Op::Mul, ratio, step_size, &format!("{name}.adam_delta")).map_err(fail)?;
        let p_new = match (&view.shard, dp) {
            (Some((numel, padded, shape)), Some(dp)) => {
                let shard_new = b.binary(Op::Sub, p_decayed, delta, &format!("{name}.shard_new")).map_err(fail)?;
                let attrs = shardc_ir::Attrs::new()
                    .with("axis", shardc_ir::Attr::Str(dp.axis.clone()))
                    .with("dim", shardc_ir::Attr::Int(0));
                let mut full = b.op(Op::AllGather, &[shard_new], attrs, &format!("{name}.gathered")).map_err(fail)?;
                if padded != numel {
                    let cut = shardc_ir::Attrs::new()
                        .with("dim", shardc_ir::Attr::Int(0))
                        .with("start", shardc_ir::Attr::Int(0))
                        .with("end", shardc_ir::Attr::Int(*numel as i64));
                    full = b.op(Op::Slice, &[full], cut, &format!("{name}.unpadded")).map_err(fail)?;
                }
                b.reshape(full, shape, &format!("{name}.new")).map_err(fail)?
            }
            _ => b.binary(Op::Sub, p_decayed, delta, &format!("{name}.new")).map_err(fail)?,
        };
        outputs.extend([p_new, m_new, v_new]);
        names.push(name);
    }
    // Names survive the renumbering in finish(); ids do not.
    let optimizer_grads = views.iter().map(|v| b.graph.name_of(v.grad).to_string()).collect();
    let graph = b.finish(&outputs);
    let tensor_parallel = tp_split.map(|(axis, p)| (axis.to_string(), p.clone()));
    Ok(TrainStep {
        graph,
        params: names,
        forward_nodes,
        backward_end,
        optimizer_grads,
        rules: HashMap::new(),
        adjoint_of,
        tensor_parallel,
    })
}

/// Rank `r`'s ZeRO-3 shard of `t`: elements `r*P/n .. (r+1)*P/n` of the flattened tensor,
/// zero-padded to a multiple of `n` (the layout of [`shard_parameters`]). Keeps f64 storage.
pub fn flat_shard(t: &shardc_ir::Tensor, n: usize, r: usize) -> shardc_ir::Tensor {
    let mut flat = t.to_f64();
    let per = flat.len().div_ceil(n);
    flat.resize(per * n, 0.0);
    let part = flat[r * per..(r + 1) * per].to_vec();
    match t.data {
        shardc_ir::tensor::Data::F64(_) => shardc_ir::Tensor::f64(t.dtype, vec![per], part),
        _ => shardc_ir::Tensor::f32(vec![per], part.into_iter().map(|x| x as f32).collect()),
    }
}

/// The tensor of `shape` from every rank's [`flat_shard`], in rank order.
pub fn unflatten_shards(shards: &[&shardc_ir::Tensor], shape: &[usize]) -> shardc_ir::Tensor {
    let mut flat: Vec<f64> = shards.iter().flat_map(|t| t.to_f64()).collect();
    flat.truncate(shape.iter().product());
    match shards[0].data {
        shardc_ir::tensor::Data::F64(_) => shardc_ir::Tensor::f64(shards[0].dtype, shape.to_vec(), flat),
        _ => shardc_ir::Tensor::f32(shape.to_vec(), flat.into_iter().map(|x| x as f32).collect()),
    }
}

impl TrainStep {
    /// Every rank's parameters from the full ones: tensor-parallel parameters cut to the rank's
    /// chunk, then (ZeRO-3) to its flat shard over `dp`.
    pub fn rank_params(
        &self,
        full: &HashMap<String, shardc_ir::Tensor>,
        dp: Option<&DataParallel>,
    ) -> Vec<HashMap<String, shardc_ir::Tensor>> {
        let mesh = &self.graph.mesh;
        (0..mesh.world_size())
            .map(|r| {
                self.params
                    .iter()
                    .filter_map(|p| full.get(p).map(|t| (p, t)))
                    .map(|(p, t)| {
                        let mut t = t.clone();
                        if let Some((axis, splits)) = &self.tensor_parallel {
                            if let Some(&d) = splits.get(p) {
                                let n = mesh.axis_size(axis).unwrap_or(1);
                                t = t.chunk(d, n, mesh.coord(r, axis).unwrap_or(0));
                            }
                        }
                        if let Some(dp) = dp.filter(|dp| dp.zero_stage == 3) {
                            let n = mesh.axis_size(&dp.axis).unwrap_or(1);
                            t = flat_shard(&t, n, mesh.coord(r, &dp.axis).unwrap_or(0));
                        }
                        (p.clone(), t)
                    })
                    .collect()
            })
            .collect()
    }

    /// The full value of parameter `p` (of full shape `shape`) from the ranks' values
    /// (`rank(r)` is rank r's tensor of it): the inverse of [`TrainStep::rank_params`].
    pub fn full_param<'a>(
        &self,
        p: &str,
        shape: &[usize],
        dp: Option<&DataParallel>,
        rank: impl Fn(usize) -> &'a shardc_ir::Tensor,
    ) -> shardc_ir::Tensor {
        let mesh = &self.graph.mesh;
        let split = self.tensor_parallel.as_ref().and_then(|(axis, s)| s.get(p).map(|&d| (axis.as_str(), d)));
        let mut chunk_shape = shape.to_vec();
        let tp_n = split.map_or(1, |(axis, _)| mesh.axis_size(axis).unwrap_or(1));
        if let Some((_, d)) = split {
            chunk_shape[d] /= tp_n;
        }
        // The ranks at coordinate 0 of every axis but `keep` (and `k` on the tp axis).
        let ranks_along = |keep: &str, k: usize| -> Vec<usize> {
            (0..mesh.world_size())
                .filter(|&r| {
                    mesh.axes.iter().zip(mesh.coords(r)).all(|(a, c)| {
                        if a.name == keep {
                            true
                        } else if split.is_some_and(|(axis, _)| a.name == axis) {
                            c == k
                        } else {
                            c == 0
                        }
                    })
                })
                .collect()
        };
        let chunk = |k: usize| -> shardc_ir::Tensor {
            match dp.filter(|dp| dp.zero_stage == 3) {
                Some(dp) => {
                    let shards: Vec<&shardc_ir::Tensor> = ranks_along(&dp.axis, k).into_iter().map(&rank).collect();
                    unflatten_shards(&shards, &chunk_shape)
                }
                None => rank(ranks_along("", k)[0]).clone(),
            }
        };
        match split {
            Some((_, d)) => shardc_ir::Tensor::concat(&(0..tp_n).map(chunk).collect::<Vec<_>>(), d),
            None => chunk(0),
        }
    }
}
