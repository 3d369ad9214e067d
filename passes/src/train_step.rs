//! The whole training step as one graph: forward, loss, backward ([`crate::autodiff`]),
//! optional gradient clipping by global norm, and the AdamW update.
//!
//! After this pass the graph's arguments are the forward graph's (parameters as fp32 master
//! weights, data inputs), plus `state %<p>.adam_m [adam-m %<p>]` and `state %<p>.adam_v
//! [adam-v %<p>]` per parameter and the scalar inputs `%lr [learning-rate]` (this step's learning
//! rate, so that any schedule is the caller's) and `%step [step-number]` (1-based, for bias
//! correction). Its outputs are `%loss [loss]`, `%grad_norm [grad-norm]` (global L2 norm of the
//! gradients before clipping), then per parameter `%<p>.new [update %<p>]`, `%<p>.adam_m.new
//! [update %<p>.adam_m]`, `%<p>.adam_v.new [update %<p>.adam_v]`. Callers match arguments and
//! results by these roles ([`shardc_ir::Signature`]), never by name or position. Every node
//! says its phase (forward, backward: gradients and their synchronisation, optimizer) and its
//! origin (`[step all-reduce-gradients]`, `[step gather-parameters, zero 3]`, ...), and
//! per-parameter nodes belong to the parameter's layer.
//!
//! AdamW as PyTorch's `torch.optim.AdamW` computes it (Loshchilov & Hutter 2019), step t:
//! ```text
//! p <- p * (1 - lr * wd)                      decoupled decay: parameters of rank >= 2 only
//! m <- b1 m + (1 - b1) g                      (nanoGPT/Megatron: no decay on biases, norms)
//! v <- b2 v + (1 - b2) g^2
//! p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//! ```
//! Clipping as `torch.nn.utils.clip_grad_norm_`: g <- g * min(1, clip / (norm + 1e-6)).

use crate::autodiff::{differentiate, loss_of, AutodiffError};
use crate::sharding::ShardError;
use shardc_ir::ops::Op;
use shardc_ir::{
    ArgKind, ArgRole, Attr, Attrs, Builder, DType, FlatShard, Graph, Moment, Origin, Output, OutputRole, Phase,
    Renumbering, StepRule, TensorType, ValueId, ZeroStage,
};
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

/// Why the training step could not be built.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Autodiff(#[from] AutodiffError),
    #[error(transparent)]
    Sharding(#[from] ShardError),
    #[error("train-step: the forward graph's mesh `{mesh}` has no axis `{axis}`")]
    NoAxis { mesh: String, axis: String },
    #[error("train-step: parameters are split over two mesh axes (`{0}` and `{1}`)")]
    TwoSplitAxes(String, String),
    #[error("train-step: parameter `%{param}` is {ty}; master weights must be f32 (compute copies are cast inside the graph)")]
    MasterWeights { param: String, ty: String },
    /// A compiler bug: the step's IR could not be built.
    #[error("train-step: internal: {0}")]
    Internal(String),
}

/// The training-step graph.
pub struct TrainStep {
    pub graph: Graph,
    /// Parameter names (the checkpoint keys), in argument order.
    pub params: Vec<String>,
}

/// Builds the training step of a forward graph with an output marked `[loss]`.
pub fn build_train_step(forward: &Graph, opt: &AdamW) -> Result<TrainStep, StepError> {
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
    /// Replicated: optimizer replicated, gradients all-reduced. Stages 1, 2: optimizer state
    /// partitioned over the axis, gradients reduce-scattered, updated parameters all-gathered.
    pub zero_stage: ZeroStage,
}

fn step_origin(rule: StepRule, zero: ZeroStage) -> Origin {
    Origin::Step { rule, zero, param: None }
}

/// The origin of the training-step pass's work on parameter argument `param`.
fn param_origin(rule: StepRule, zero: ZeroStage, param: ValueId) -> Origin {
    Origin::Step { rule, zero, param: Some(param) }
}

/// ZeRO-3's forward: every parameter becomes a flat, zero-padded shard argument of `1/n` of its
/// elements (same name; its layout records the `flat-shard` and the shape it was cut from),
/// all-gathered over `axis`, unpadded and reshaped where the original parameter was (nodes
/// `[step gather-parameters, zero 3]` in the parameter's layer).
pub fn shard_parameters(g: &Graph, axis: &str, n: usize) -> Result<Graph, String> {
    let mut b = Builder::new(g.name.clone());
    b.graph.mesh = g.mesh.clone();
    let mut map = HashMap::new();
    let mut pending = Vec::new();
    for a in &g.args {
        let v = g.value(a.value);
        b.in_layer(v.layer);
        let mut role = a.role.clone();
        if let ArgRole::Param(layout) = &mut role {
            let padded = v.ty.numel().div_ceil(n) * n;
            layout.flat_shard = Some(FlatShard { axis: axis.to_string(), shape: v.ty.shape.clone() });
            let shard = b.arg_with_role(a.kind, role, &v.name, &TensorType::new(v.ty.dtype, vec![padded / n]));
            pending.push((a.value, shard, padded));
        } else {
            map.insert(a.value, b.arg_with_role(a.kind, role, &v.name, &v.ty));
        }
    }
    for (orig, shard, padded) in pending {
        let v = g.value(orig);
        b.at(Phase::Forward, param_origin(StepRule::GatherParameters, ZeroStage::Parameters, shard), v.layer);
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
        let outs = b.copy_node(g, node, &inputs, |v| map.get(&v).copied())?;
        map.extend(node.outputs.iter().copied().zip(outs));
    }
    let outputs = g
        .outputs
        .iter()
        .map(|o| {
            let role = match o.role {
                OutputRole::Gradient(p) => OutputRole::Gradient(map[&p]),
                OutputRole::Update(p) => OutputRole::Update(map[&p]),
                ref r => r.clone(),
            };
            Output::new(map[&o.value], role)
        })
        .collect();
    Ok(b.finish_with(outputs).0)
}

/// ZeRO-3's backward gathers the parameters again instead of keeping the forward's copies alive
/// (Rajbhandari et al. 2020, section 5.3: 3 Psi of traffic per step, not 2 Psi): every chain
/// `all_gather -> [slice] -> reshape [-> cast]` of the forward that starts at a
/// `[step gather-parameters]` node and whose result the backward uses (a weight in an input's
/// gradient; not a bias) is repeated at the start of the backward
/// (`[backward, step gather-parameters-for-backward, zero 3]`), and backward nodes use the copy.
fn regather_for_backward(g: Graph) -> Result<(Graph, Renumbering), String> {
    let mut g = g;
    let forward_nodes = g.nodes.iter().take_while(|n| n.phase == Phase::Forward).count();
    let gathers_parameters =
        |n: &shardc_ir::Node| matches!(n.origin, Origin::Step { rule: StepRule::GatherParameters, .. });
    // Forward values that are parameter rebuilds: results of the gather chains.
    let mut chains: Vec<Vec<usize>> = Vec::new();
    for (i, n) in g.nodes[..forward_nodes].iter().enumerate() {
        if n.op == Op::AllGather && gathers_parameters(n) {
            let mut chain = vec![i];
            let mut last = n.output();
            // Follow the slice/reshape (and, under mixed precision, the cast to the compute
            // dtype) that complete the rebuild.
            while let Some(j) = g.nodes[..forward_nodes]
                .iter()
                .position(|m| matches!(m.op, Op::Slice | Op::Reshape | Op::Cast) && m.inputs == [last])
            {
                chain.push(j);
                last = g.nodes[j].output();
            }
            chains.push(chain);
        }
    }
    let mut copies = Vec::new();
    let mut replace = HashMap::new();
    let used_in_backward = |v: ValueId| g.nodes[forward_nodes..].iter().any(|n| n.inputs.contains(&v));
    chains.retain(|chain| used_in_backward(g.nodes[*chain.last().expect("chains are non-empty")].output()));
    for chain in &chains {
        let param = match g.nodes[chain[0]].origin {
            Origin::Step { param, .. } => param,
            _ => None,
        };
        let origin = Origin::Step { rule: StepRule::RegatherParameters, zero: ZeroStage::Parameters, param };
        let mut prev: Option<ValueId> = None;
        for &i in chain {
            let n = g.nodes[i].clone();
            let name = format!("{}.regathered", g.name_of(n.output()));
            let id = g.fresh_value(name, g.ty(n.output()).clone());
            g.values[id.index()].layer = g.layer(n.output());
            let inputs = match prev {
                Some(p) => vec![p],
                None => n.inputs.clone(),
            };
            copies.push(shardc_ir::Node {
                op: n.op,
                inputs,
                attrs: n.attrs.clone(),
                outputs: vec![id],
                phase: Phase::Backward,
                origin: origin.clone(),
                body: None,
            });
            prev = Some(id);
        }
        let last = g.nodes[*chain.last().expect("chains are non-empty")].output();
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
    let map = g.finish();
    Ok((g, map))
}

/// One parameter as the optimizer sees it: whole, or this rank's flat shard.
struct UpdateView {
    name: String,
    /// The parameter argument.
    arg: ValueId,
    layer: Option<u32>,
    /// The parameter (or its shard) and its gradient (or the shard's), both f32.
    param: ValueId,
    grad: ValueId,
    /// Rank of the parameter itself (weight decay applies to rank >= 2).
    param_rank: usize,
    /// The tensor-parallel axis the parameter is split over, if it is.
    split_axis: Option<String>,
    /// Shape of the AdamW moments.
    state_shape: Vec<usize>,
    /// For a shard: (elements, padded elements, parameter shape) to gather it back.
    shard: Option<(usize, usize, Vec<usize>)>,
}

/// [`build_train_step`] with data parallelism over `dp.axis`: each rank's `forward` sees its
/// own slice of the global batch; the reported loss and the gradients are averaged over the axis
/// (so the update equals the update of the global batch on one device). With ZeRO stage 0
/// every rank applies the same AdamW step to its full replica (gradients: `all_reduce`); with 1
/// or 2 each rank keeps the moments of its 1/n of every (flattened, zero-padded) parameter, gets
/// that shard's averaged gradient by `reduce_scatter`, updates it, and the new parameters are
/// reassembled with `all_gather`. `dp: None` is the single-device step.
pub fn build_data_parallel_step(
    forward: &Graph,
    opt: &AdamW,
    dp: Option<&DataParallel>,
) -> Result<TrainStep, StepError> {
    build_step(forward, opt, dp)
}

/// The training step of a forward graph on a mesh with tensor parallelism (`tp`: the sharding
/// pass runs on the forward first, see [`crate::sharding`]) and data parallelism (`dp`). The
/// global gradient norm sums the squares of split parameters' chunks (their layouts say
/// `split`) over the tensor-parallel axis and counts replicated parameters once, as Megatron
/// does. Returns the step and the sharded forward (for `shardc plan` and `explain`).
pub fn build_parallel_step(
    forward: &Graph,
    opt: &AdamW,
    dp: Option<&DataParallel>,
    tp: Option<&crate::sharding::ShardOptions>,
    device: &crate::cost::DeviceModel,
) -> Result<(TrainStep, Option<crate::sharding::Sharded>), StepError> {
    let Some(tp) = tp else { return Ok((build_step(forward, opt, dp)?, None)) };
    let sharded = crate::sharding::shard_forward(forward, tp, device)?;
    let step = build_step(&sharded.graph, opt, dp)?;
    Ok((step, Some(sharded)))
}

fn build_step(forward: &Graph, opt: &AdamW, dp: Option<&DataParallel>) -> Result<TrainStep, StepError> {
    let zero = dp.map_or(ZeroStage::Replicated, |dp| dp.zero_stage);
    // ZeRO-3: the parameters themselves become flat shards, gathered where the forward uses them.
    let stage3 = match dp {
        Some(dp) if zero.shards_parameters() => {
            Some(shard_parameters(forward, &dp.axis, axis_size(forward, &dp.axis)?).map_err(StepError::Internal)?)
        }
        _ => None,
    };
    let forward = stage3.as_ref().unwrap_or(forward);
    let Gradients { mut b, mut loss, mut views, tp_axis } = gradients(forward, stage3.is_some())?;
    let mut sharded_norm_axis = None;
    if let Some(dp) = dp {
        let n = axis_size(forward, &dp.axis)?;
        loss = synchronise(&mut b, &mut views, loss, &dp.axis, n, zero)?;
        if zero.shards_optimizer() {
            sharded_norm_axis = Some(dp.axis.as_str());
        }
    }
    b.at(Phase::Optimizer, step_origin(StepRule::Update, zero), None);
    let scalar = TensorType::new(DType::F32, vec![]);
    let lr = b.arg_with_role(ArgKind::Input, ArgRole::LearningRate, "lr", &scalar);
    let step = b.arg_with_role(ArgKind::Input, ArgRole::StepNumber, "step", &scalar);
    let grad_norm = global_norm(&mut b, &views, tp_axis.as_deref(), sharded_norm_axis, zero)?;
    let clip = clip_coefficient(&mut b, opt, grad_norm)?;
    let adam = Adam::constants(&mut b, opt, lr, step)?;
    let mut outputs = vec![Output::new(loss, OutputRole::Loss), Output::new(grad_norm, OutputRole::GradNorm)];
    for view in &views {
        outputs.extend(adam.update(&mut b, view, clip, dp, zero)?);
    }
    let (graph, _) = b.finish_with(outputs);
    Ok(TrainStep { graph, params: views.into_iter().map(|v| v.name).collect() })
}

fn axis_size(g: &Graph, axis: &str) -> Result<usize, StepError> {
    g.mesh.axis_size(axis).ok_or_else(|| StepError::NoAxis { mesh: g.mesh.to_string(), axis: axis.to_string() })
}

fn f32s(b: &mut Builder, x: f64, hint: &str) -> Result<ValueId, StepError> {
    b.scalar(x, DType::F32, hint).map_err(StepError::Internal)
}

/// The differentiated forward, ready for the rest of the step.
struct Gradients {
    b: Builder,
    loss: ValueId,
    views: Vec<UpdateView>,
    /// The mesh axis split parameters are split over (one at most).
    tp_axis: Option<String>,
}

/// The forward and its backward (ZeRO-3: with the parameter gathers repeated for the
/// backward), and each parameter's view for the optimizer.
fn gradients(forward: &Graph, regather: bool) -> Result<Gradients, StepError> {
    let fail = StepError::Internal;
    let params: Vec<ValueId> = forward.args_of(ArgKind::Param).collect();
    let mut loss = loss_of(forward)?;
    let mut d = differentiate(forward, loss, &params)?;
    if regather {
        let (g, map) = regather_for_backward(d.graph).map_err(fail)?;
        d.graph = g;
        d.grads = d.grads.iter().map(|&v| map.get(v)).collect();
        loss = map.get(loss);
    }
    let mut views = Vec::new();
    let mut tp_axis: Option<String> = None;
    for (&p, &g) in params.iter().zip(&d.grads) {
        let ty = forward.ty(p);
        let name = forward.name_of(p).to_string();
        let layout = forward.arg_of(p).and_then(|a| a.role.param_layout()).cloned().unwrap_or_default();
        // Under ZeRO-3 the parameter is already this rank's flat shard; decay follows the
        // original parameter's rank.
        let param_rank = layout.flat_shard.as_ref().map_or(ty.rank(), |f| f.shape.len());
        let split_axis = layout.split.as_ref().map(|s| s.axis.clone());
        if let Some(axis) = &split_axis {
            if tp_axis.get_or_insert_with(|| axis.clone()) != axis {
                return Err(StepError::TwoSplitAxes(tp_axis.unwrap_or_default(), axis.clone()));
            }
        }
        views.push(UpdateView {
            name,
            arg: p,
            layer: forward.layer(p),
            param: p,
            grad: g,
            param_rank,
            split_axis,
            state_shape: ty.shape.clone(),
            shard: None,
        });
    }
    Ok(Gradients { b: Builder::from_graph(d.graph), loss, views, tp_axis })
}

/// Data parallelism over `axis` (`n` ranks): the gradients reduced as the ZeRO stage says (the
/// backward phase), the loss averaged, and under ZeRO-1/2 each view narrowed to this rank's
/// flat shard of its parameter. Returns the averaged loss.
fn synchronise(
    b: &mut Builder,
    views: &mut [UpdateView],
    loss: ValueId,
    axis: &str,
    n: usize,
    zero: ZeroStage,
) -> Result<ValueId, StepError> {
    let fail = StepError::Internal;
    let grad_rule =
        if zero == ZeroStage::Replicated { StepRule::AllReduceGradients } else { StepRule::ReduceScatterGradients };
    b.at(Phase::Backward, step_origin(grad_rule, zero), None);
    let inv = f32s(b, 1.0 / n as f64, "dp_inv_ranks")?;
    let on_axis = Attrs::new().with("axis", Attr::Str(axis.to_string()));
    let dim0 = on_axis.clone().with("dim", Attr::Int(0));
    // Flatten, pad to a multiple of n: the layout of ZeRO's flat shards.
    let flat = |b: &mut Builder, x: ValueId, numel: usize, padded: usize, hint: &str| -> Result<ValueId, StepError> {
        let f = b.reshape(x, &[numel], &format!("{hint}_flat")).map_err(fail)?;
        if padded == numel {
            return Ok(f);
        }
        let pad = Attrs::new()
            .with("dim", Attr::Int(0))
            .with("before", Attr::Int(0))
            .with("after", Attr::Int((padded - numel) as i64));
        b.op(Op::Pad, &[f], pad, &format!("{hint}_padded")).map_err(fail)
    };
    // Gradient synchronisation (the backward phase).
    for v in views.iter_mut() {
        let name = v.name.clone();
        b.at(Phase::Backward, param_origin(grad_rule, zero, v.arg), v.layer);
        if zero.shards_parameters() {
            // The adjoint of the forward all_gather already reduce-scattered (summed) the
            // gradient into this rank's shard.
            v.grad = b.binary(Op::Mul, v.grad, inv, &format!("{name}.grad_shard")).map_err(fail)?;
        } else if zero == ZeroStage::Replicated {
            let sum = b.op(Op::AllReduce, &[v.grad], on_axis.clone(), &format!("{name}.grad_sum")).map_err(fail)?;
            v.grad = b.binary(Op::Mul, sum, inv, &format!("{name}.grad_mean")).map_err(fail)?;
        } else {
            let numel: usize = v.state_shape.iter().product();
            let padded = numel.div_ceil(n) * n;
            let gf = flat(b, v.grad, numel, padded, &format!("{name}.grad"))?;
            let gs = b.op(Op::ReduceScatter, &[gf], dim0.clone(), &format!("{name}.grad_shard_sum")).map_err(fail)?;
            v.grad = b.binary(Op::Mul, gs, inv, &format!("{name}.grad_shard")).map_err(fail)?;
        }
    }
    b.at(Phase::Optimizer, step_origin(StepRule::AverageLoss, zero), None);
    let sum = b.op(Op::AllReduce, &[loss], on_axis.clone(), "loss_sum").map_err(fail)?;
    let loss = b.binary(Op::Mul, sum, inv, "loss_mean").map_err(fail)?;
    // ZeRO-1/2: the optimizer updates this rank's flat shard of each parameter.
    if zero.shards_optimizer() && !zero.shards_parameters() {
        for v in views.iter_mut() {
            let name = v.name.clone();
            b.at(Phase::Optimizer, param_origin(StepRule::Update, zero, v.arg), v.layer);
            let shape = v.state_shape.clone();
            let numel: usize = shape.iter().product();
            let padded = numel.div_ceil(n) * n;
            let pf = flat(b, v.param, numel, padded, &name)?;
            v.param = b.op(Op::TakeShard, &[pf], dim0.clone(), &format!("{name}.shard")).map_err(fail)?;
            v.state_shape = vec![padded / n];
            v.shard = Some((numel, padded, shape));
        }
    }
    Ok(loss)
}

/// The global gradient norm (each rank sums its shards' squares; the sums are then added up):
/// tensor-parallel chunks summed over their axis, replicated parameters counted once, ZeRO
/// shards summed over the data-parallel axis.
fn global_norm(
    b: &mut Builder,
    views: &[UpdateView],
    tp_axis: Option<&str>,
    sharded_over: Option<&str>,
    zero: ZeroStage,
) -> Result<ValueId, StepError> {
    let fail = StepError::Internal;
    let mut sumsq: Option<ValueId> = None;
    let mut split_sumsq: Option<ValueId> = None;
    for v in views {
        b.at(Phase::Optimizer, param_origin(StepRule::Update, zero, v.arg), v.layer);
        let split = v.split_axis.is_some();
        let sq = b.binary(Op::Mul, v.grad, v.grad, &format!("{}.grad_sq", v.name)).map_err(fail)?;
        let rank = b.ty(v.grad).rank() as i64;
        let s = if rank == 0 {
            sq
        } else {
            b.reduce(Op::ReduceSum, sq, &(0..rank).collect::<Vec<_>>(), &format!("{}.grad_sumsq", v.name))
                .map_err(fail)?
        };
        b.at(Phase::Optimizer, step_origin(StepRule::Update, zero), None);
        let acc = if split { &mut split_sumsq } else { &mut sumsq };
        let hint = if split { "grad_sumsq_split" } else { "grad_sumsq" };
        *acc = Some(match *acc {
            Some(a) => b.binary(Op::Add, a, s, hint).map_err(fail)?,
            None => s,
        });
    }
    let mut sumsq = match sumsq {
        Some(s) => s,
        None => f32s(b, 0.0, "grad_sumsq")?,
    };
    if let (Some(split), Some(axis)) = (split_sumsq, tp_axis) {
        b.with_origin(step_origin(StepRule::TensorParallelGradientNorm, zero));
        let attrs = Attrs::new().with("axis", Attr::Str(axis.to_string()));
        let all = b.op(Op::AllReduce, &[split], attrs, "grad_sumsq_tp").map_err(fail)?;
        sumsq = b.binary(Op::Add, sumsq, all, "grad_sumsq_total").map_err(fail)?;
    }
    if let Some(axis) = sharded_over {
        b.with_origin(step_origin(StepRule::ShardedGradientNorm, zero));
        let attrs = Attrs::new().with("axis", Attr::Str(axis.to_string()));
        sumsq = b.op(Op::AllReduce, &[sumsq], attrs, "grad_sumsq_all").map_err(fail)?;
    }
    b.with_origin(step_origin(StepRule::Update, zero));
    b.unary(Op::Sqrt, sumsq, "grad_norm").map_err(fail)
}

/// Clipping as `torch.nn.utils.clip_grad_norm_`: the factor min(1, clip / (norm + 1e-6)).
fn clip_coefficient(b: &mut Builder, opt: &AdamW, grad_norm: ValueId) -> Result<Option<ValueId>, StepError> {
    let fail = StepError::Internal;
    if opt.grad_clip <= 0.0 {
        return Ok(None);
    }
    // min(1, clip / (norm + 1e-6)) = -max(-clip / (norm + 1e-6), -1)
    let tiny = f32s(b, 1e-6, "clip_tiny")?;
    let denom = b.binary(Op::Add, grad_norm, tiny, "clip_denom").map_err(fail)?;
    let clip = f32s(b, opt.grad_clip, "clip_max_norm")?;
    let ratio = b.binary(Op::Div, clip, denom, "clip_ratio").map_err(fail)?;
    let neg = b.unary(Op::Neg, ratio, "clip_ratio_neg").map_err(fail)?;
    let minus_one = f32s(b, -1.0, "clip_minus_one")?;
    let m = b.binary(Op::Maximum, neg, minus_one, "clip_neg_coef").map_err(fail)?;
    Ok(Some(b.unary(Op::Neg, m, "clip_coef").map_err(fail)?))
}

/// AdamW's per-step scalars, shared by every parameter's update.
struct Adam {
    step_size: ValueId,
    bc2_sqrt: ValueId,
    b1: ValueId,
    one_minus_b1: ValueId,
    b2: ValueId,
    one_minus_b2: ValueId,
    eps: ValueId,
    decay: Option<ValueId>,
}

impl Adam {
    fn constants(b: &mut Builder, opt: &AdamW, lr: ValueId, step: ValueId) -> Result<Adam, StepError> {
        let fail = StepError::Internal;
        // Bias corrections from the step count: 1 - beta^t = 1 - exp(t ln beta).
        let bias_correction = |b: &mut Builder, beta: f64, hint: &str| -> Result<ValueId, StepError> {
            let ln = f32s(b, beta.ln(), &format!("{hint}_ln_beta"))?;
            let t = b.binary(Op::Mul, step, ln, &format!("{hint}_t_ln_beta")).map_err(fail)?;
            let pow = b.unary(Op::Exp, t, &format!("{hint}_beta_pow")).map_err(fail)?;
            let one = f32s(b, 1.0, &format!("{hint}_one"))?;
            b.binary(Op::Sub, one, pow, hint).map_err(fail)
        };
        let bc1 = bias_correction(b, opt.beta1, "bias_correction1")?;
        let bc2 = bias_correction(b, opt.beta2, "bias_correction2")?;
        let step_size = b.binary(Op::Div, lr, bc1, "adam_step_size").map_err(fail)?;
        let bc2_sqrt = b.unary(Op::Sqrt, bc2, "bias_correction2_sqrt").map_err(fail)?;
        let (b1, one_minus_b1) = (f32s(b, opt.beta1, "adam_beta1")?, f32s(b, 1.0 - opt.beta1, "adam_one_minus_beta1")?);
        let (b2, one_minus_b2) = (f32s(b, opt.beta2, "adam_beta2")?, f32s(b, 1.0 - opt.beta2, "adam_one_minus_beta2")?);
        let eps = f32s(b, opt.eps, "adam_eps")?;
        let decay = if opt.weight_decay > 0.0 {
            let wd = f32s(b, opt.weight_decay, "weight_decay")?;
            let lr_wd = b.binary(Op::Mul, lr, wd, "lr_wd").map_err(fail)?;
            let one = f32s(b, 1.0, "decay_one")?;
            Some(b.binary(Op::Sub, one, lr_wd, "decay_factor").map_err(fail)?)
        } else {
            None
        };
        Ok(Adam { step_size, bc2_sqrt, b1, one_minus_b1, b2, one_minus_b2, eps, decay })
    }

    /// One parameter's AdamW update (its moments become `state` arguments); returns the three
    /// `update` outputs (parameter, m, v).
    fn update(
        &self,
        b: &mut Builder,
        view: &UpdateView,
        clip_coef: Option<ValueId>,
        dp: Option<&DataParallel>,
        zero: ZeroStage,
    ) -> Result<[Output; 3], StepError> {
        let fail = StepError::Internal;
        let Adam { step_size, bc2_sqrt, b1, one_minus_b1, b2, one_minus_b2, eps, decay } = *self;
        let name = view.name.clone();
        b.at(Phase::Optimizer, param_origin(StepRule::Update, zero, view.arg), view.layer);
        let ty = b.ty(view.param).clone();
        if ty.dtype != DType::F32 {
            return Err(StepError::MasterWeights { param: name, ty: ty.to_string() });
        }
        let (p, g0) = (view.param, view.grad);
        let state = TensorType::new(DType::F32, view.state_shape.clone());
        let moment = |b: &mut Builder, m: Moment| {
            let role = ArgRole::Moment { param: view.arg, moment: m };
            b.arg_with_role(ArgKind::State, role, &format!("{name}.{}", m.suffix()), &state)
        };
        let m = moment(b, Moment::AdamM);
        let v = moment(b, Moment::AdamV);
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
                b.with_origin(param_origin(StepRule::GatherUpdatedParameters, zero, view.arg));
                let attrs = Attrs::new().with("axis", Attr::Str(dp.axis.clone())).with("dim", Attr::Int(0));
                let mut full = b.op(Op::AllGather, &[shard_new], attrs, &format!("{name}.gathered")).map_err(fail)?;
                if padded != numel {
                    let cut = Attrs::new()
                        .with("dim", Attr::Int(0))
                        .with("start", Attr::Int(0))
                        .with("end", Attr::Int(*numel as i64));
                    full = b.op(Op::Slice, &[full], cut, &format!("{name}.unpadded")).map_err(fail)?;
                }
                b.reshape(full, shape, &format!("{name}.new")).map_err(fail)?
            }
            _ => b.binary(Op::Sub, p_decayed, delta, &format!("{name}.new")).map_err(fail)?,
        };
        Ok([
            Output::new(p_new, OutputRole::Update(view.arg)),
            Output::new(m_new, OutputRole::Update(m)),
            Output::new(v_new, OutputRole::Update(v)),
        ])
    }
}
