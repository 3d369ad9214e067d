//! The reference interpreter: the oracle every other execution path is checked against.
//!
//! It is deliberately simple: one plain loop per op ([`kernels`]), matrix products through the
//! `matrixmultiply` crate, values freed after their last use. [`run`] executes a single-device
//! graph; [`run_spmd`] executes an SPMD graph on every rank of its mesh in lockstep, node by
//! node, so a collective sees every rank's operand at once. The ranks of a collective's group
//! are the ranks that differ only in the collective's mesh axis, in coordinate order.
//!
//! Precision: [`Precision::F32`] stores and computes every floating value as f32,
//! [`Precision::F64`] as f64. Values declared bf16/f16 are rounded to that type after every op
//! in both modes, so mixed-precision graphs see the rounding they would on a device.

pub mod grad_kernels;
pub mod kernels;
mod real;
mod threads;

pub use real::{Precision, Real};

use crate::attrs::ReduceKind;
use crate::graph::{Graph, ValueId};
use crate::ops::{normalize_dim, Op};
use crate::tensor::{Data, Tensor};
use crate::text::print_node;
use crate::types::{strides, TensorType};
use std::collections::HashMap;

/// A value while the interpreter runs: floating storage `T` or integers.
#[derive(Clone, Debug)]
pub(crate) enum Val<T> {
    F(Vec<T>),
    I(Vec<i64>),
}

impl<T: Real> Val<T> {
    fn gather(&self, offsets: &[usize]) -> Self {
        match self {
            Val::F(v) => Val::F(offsets.iter().map(|&o| v[o]).collect()),
            Val::I(v) => Val::I(offsets.iter().map(|&o| v[o]).collect()),
        }
    }

    fn floats(&self) -> &[T] {
        match self {
            Val::F(v) => v,
            Val::I(_) => &[],
        }
    }

    fn ints(&self) -> &[i64] {
        match self {
            Val::I(v) => v,
            Val::F(_) => &[],
        }
    }
}

/// Why the interpreter stopped.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum InterpError {
    #[error("no value given for argument `%{name}` ({ty}); pass one tensor per graph argument")]
    MissingInput { name: String, ty: TensorType },
    #[error("argument `%{name}` is declared {expected} but the given tensor is {found}")]
    InputMismatch { name: String, expected: TensorType, found: TensorType },
    #[error("the graph's mesh has {expected} ranks but inputs were given for {found}")]
    RankCount { expected: usize, found: usize },
    #[error("rank {rank}, node {node}: {message}\n    {line}")]
    Node { rank: usize, node: usize, line: String, message: String },
}

/// Runs a single-device graph (its mesh, if any, must have one rank). Returns the outputs in
/// order.
pub fn run(g: &Graph, inputs: &HashMap<String, Tensor>, precision: Precision) -> Result<Vec<Tensor>, InterpError> {
    Ok(run_spmd(g, std::slice::from_ref(inputs), precision)?.pop().unwrap_or_default())
}

/// Runs an SPMD graph on every rank of its mesh; `inputs[r]` are rank r's arguments. Returns
/// each rank's outputs.
pub fn run_spmd(
    g: &Graph,
    inputs: &[HashMap<String, Tensor>],
    precision: Precision,
) -> Result<Vec<Vec<Tensor>>, InterpError> {
    match precision {
        Precision::F32 => Machine::<f32>::new(g, inputs)?.run(),
        Precision::F64 => Machine::<f64>::new(g, inputs)?.run(),
    }
}

struct Machine<'g, T> {
    g: &'g Graph,
    /// `vals[rank][value]`
    vals: Vec<Vec<Option<Val<T>>>>,
}

impl<'g, T: Real> Machine<'g, T> {
    fn new(g: &'g Graph, inputs: &[HashMap<String, Tensor>]) -> Result<Self, InterpError> {
        let world = g.mesh.world_size();
        if inputs.len() != world {
            return Err(InterpError::RankCount { expected: world, found: inputs.len() });
        }
        let mut vals = vec![vec![None; g.values.len()]; world];
        for (rank, given) in inputs.iter().enumerate() {
            for a in &g.args {
                let v = g.value(a.value);
                let t = given
                    .get(&v.name)
                    .ok_or_else(|| InterpError::MissingInput { name: v.name.clone(), ty: v.ty.clone() })?;
                let mismatch =
                    || InterpError::InputMismatch { name: v.name.clone(), expected: v.ty.clone(), found: t.ty() };
                if t.shape != v.ty.shape || t.dtype.is_float() != v.ty.dtype.is_float() || t.data.len() != t.numel() {
                    return Err(mismatch());
                }
                let val = match (&t.data, v.ty.dtype.is_float()) {
                    (Data::I64(d), false) => Val::I(d.clone()),
                    (data, true) => Val::F(
                        T::unwrap(data).ok_or_else(mismatch)?.into_iter().map(|x| x.round_to(v.ty.dtype)).collect(),
                    ),
                    _ => return Err(mismatch()),
                };
                vals[rank][a.value.index()] = Some(val);
            }
        }
        Ok(Machine { g, vals })
    }

    fn run(self) -> Result<Vec<Vec<Tensor>>, InterpError> {
        let g = self.g;
        let vals = self.run_vals()?;
        Ok(vals.iter().map(|outs| g.output_values().zip(outs).map(|(o, v)| to_tensor(g.ty(o), v)).collect()).collect())
    }

    /// Every rank's outputs, as values.
    fn run_vals(mut self) -> Result<Vec<Vec<Val<T>>>, InterpError> {
        let g = self.g;
        let mut last_use = vec![usize::MAX; g.values.len()];
        for (i, n) in g.nodes.iter().enumerate() {
            for &v in &n.inputs {
                last_use[v.index()] = i;
            }
        }
        for o in g.output_values() {
            last_use[o.index()] = usize::MAX;
        }
        for (i, n) in g.nodes.iter().enumerate() {
            let results = if n.op.is_collective() { self.collective(i) } else { self.local(i) };
            for (rank, r) in results.into_iter().enumerate() {
                for (&o, v) in n.outputs.iter().zip(r?) {
                    self.vals[rank][o.index()] = Some(v);
                }
            }
            for &v in &n.inputs {
                if last_use[v.index()] == i {
                    self.vals.iter_mut().for_each(|vals| vals[v.index()] = None);
                }
            }
        }
        Ok(self
            .vals
            .iter_mut()
            .map(|vals| g.output_values().map(|o| vals[o.index()].take().expect("outputs are kept")).collect())
            .collect())
    }

    fn fail(&self, rank: usize, node: usize, message: String) -> InterpError {
        InterpError::Node { rank, node, line: print_node(self.g, &self.g.nodes[node]), message }
    }

    fn operand(&self, rank: usize, v: ValueId) -> &Val<T> {
        self.vals[rank][v.index()].as_ref().expect("the verifier guarantees operands dominate their uses")
    }

    fn local(&self, i: usize) -> Vec<Result<Vec<Val<T>>, InterpError>> {
        let n = &self.g.nodes[i];
        if let Some(body) = &n.body {
            // A kernel: its body is a single-device graph of local ops, run on each rank alone.
            return (0..self.vals.len())
                .map(|rank| {
                    let mut vals = vec![None; body.values.len()];
                    for (a, &v) in body.args.iter().zip(&n.inputs) {
                        vals[a.value.index()] = Some(self.operand(rank, v).clone());
                    }
                    let inner = Machine { g: body, vals: vec![vals] };
                    let mut outs = inner.run_vals().map_err(|e| self.fail(rank, i, format!("in its body: {e}")))?;
                    Ok(outs.pop().unwrap_or_default())
                })
                .collect();
        }
        let tys: Vec<&TensorType> = n.inputs.iter().map(|&v| self.g.ty(v)).collect();
        let outs: Vec<&TensorType> = n.outputs.iter().map(|&v| self.g.ty(v)).collect();
        (0..self.vals.len())
            .map(|rank| {
                let ins: Vec<&Val<T>> = n.inputs.iter().map(|&v| self.operand(rank, v)).collect();
                let coord = |axis: &str| self.g.mesh.coord(rank, axis);
                kernels::eval_results(n.op, &n.attrs, &ins, &tys, &outs, coord).map_err(|m| self.fail(rank, i, m))
            })
            .collect()
    }

    /// A collective's one result on every rank.
    fn collective(&self, i: usize) -> Vec<Result<Vec<Val<T>>, InterpError>> {
        let n = &self.g.nodes[i];
        let (x, out) = (n.inputs[0], self.g.ty(n.output()));
        let in_ty = self.g.ty(x);
        let axis = n.attrs.str("axis").unwrap_or_default();
        let dim = |name: &str| normalize_dim(n.attrs.int(name).unwrap_or(0), in_ty.rank());
        (0..self.vals.len())
            .map(|rank| {
                let group = self
                    .g
                    .mesh
                    .group(rank, axis)
                    .ok_or_else(|| self.fail(rank, i, format!("mesh axis `{axis}` is not declared")))?;
                let me = group.iter().position(|&r| r == rank).expect("a rank is in its own group");
                let parts: Vec<&Val<T>> = group.iter().map(|&r| self.operand(r, x)).collect();
                let size = group.len();
                let result = match n.op {
                    Op::AllReduce => {
                        reduce(&parts, n.attrs.choice_or_default::<ReduceKind>("reduce") == ReduceKind::Max, out)
                    }
                    Op::AllGather => {
                        let d = dim("dim").map_err(|m| self.fail(rank, i, m))?;
                        let tys = vec![in_ty; size];
                        kernels::concat(&parts, &tys, out, d)
                    }
                    Op::ReduceScatter => {
                        let d = dim("dim").map_err(|m| self.fail(rank, i, m))?;
                        let sum = reduce(&parts, false, in_ty);
                        chunk(&sum, in_ty, d, size, me)
                    }
                    Op::AllToAll => {
                        let (s, c) = (dim("split_dim"), dim("concat_dim"));
                        let (s, c) = (s.map_err(|m| self.fail(rank, i, m))?, c.map_err(|m| self.fail(rank, i, m))?);
                        // Rank `me` receives chunk `me` of every peer's split dim.
                        let pieces: Vec<Val<T>> = parts.iter().map(|p| chunk(p, in_ty, s, size, me)).collect();
                        let mut piece_ty = in_ty.clone();
                        piece_ty.shape[s] /= size;
                        let refs: Vec<&Val<T>> = pieces.iter().collect();
                        let tys = vec![&piece_ty; size];
                        kernels::concat(&refs, &tys, out, c)
                    }
                    _ => unreachable!("only collectives reach here"),
                };
                Ok(vec![result])
            })
            .collect()
    }
}

/// Elementwise sum (or max) of the parts, accumulated in f64.
fn reduce<T: Real>(parts: &[&Val<T>], max: bool, ty: &TensorType) -> Val<T> {
    match parts[0] {
        Val::F(first) => {
            let mut acc: Vec<f64> = first.iter().map(|x| x.to_f64()).collect();
            for p in &parts[1..] {
                for (a, x) in acc.iter_mut().zip(p.floats()) {
                    *a = if max { a.max(x.to_f64()) } else { *a + x.to_f64() };
                }
            }
            Val::F(acc.into_iter().map(|a| T::from_f64(a).round_to(ty.dtype)).collect())
        }
        Val::I(first) => {
            let mut acc = first.clone();
            for p in &parts[1..] {
                for (a, x) in acc.iter_mut().zip(p.ints()) {
                    *a = if max { (*a).max(*x) } else { a.wrapping_add(*x) };
                }
            }
            Val::I(acc)
        }
    }
}

/// Chunk `k` of `n` equal chunks of `v` (type `ty`) along `dim`.
fn chunk<T: Real>(v: &Val<T>, ty: &TensorType, dim: usize, n: usize, k: usize) -> Val<T> {
    let s = strides(&ty.shape);
    let mut shape = ty.shape.clone();
    shape[dim] /= n;
    let base = k * shape[dim] * s[dim];
    let offs: Vec<usize> = kernels::strided_offsets(&shape, &s).into_iter().map(|o| o + base).collect();
    v.gather(&offs)
}

fn to_tensor<T: Real>(ty: &TensorType, v: &Val<T>) -> Tensor {
    let data = match v {
        Val::F(x) => T::wrap(x.clone()),
        Val::I(x) => Data::I64(x.clone()),
    };
    Tensor { dtype: ty.dtype, shape: ty.shape.clone(), data }
}

/// Evaluates one local (non-collective) node of `g` on host tensors, in f32 storage: what a
/// runtime uses for the few ops it has no native kernel for. `coord(axis)` is the executing
/// rank's coordinate on a mesh axis. Returns the node's results in order.
pub fn eval_node(
    g: &Graph,
    node: &crate::Node,
    inputs: &[&Tensor],
    coord: impl Fn(&str) -> Option<usize>,
) -> Result<Vec<Tensor>, String> {
    if node.op.is_collective() {
        return Err(format!("`{}` is a collective: the runtime's communicator runs it", node.op.name()));
    }
    let vals: Vec<Val<f32>> = inputs
        .iter()
        .map(|t| match &t.data {
            Data::I64(v) => Some(Val::I(v.clone())),
            data => f32::unwrap(data).map(|v| Val::F(v.into_iter().map(|x| x.round_to(t.dtype)).collect())),
        })
        .collect::<Option<_>>()
        .ok_or("an operand's storage does not match its dtype")?;
    let tys: Vec<&TensorType> = node.inputs.iter().map(|&v| g.ty(v)).collect();
    let outs: Vec<&TensorType> = node.outputs.iter().map(|&v| g.ty(v)).collect();
    let results = match &node.body {
        Some(body) => {
            let mut slots = vec![None; body.values.len()];
            for (a, v) in body.args.iter().zip(vals) {
                slots[a.value.index()] = Some(v);
            }
            let inner = Machine::<f32> { g: body, vals: vec![slots] };
            inner.run_vals().map_err(|e| e.to_string())?.pop().unwrap_or_default()
        }
        None => {
            let refs: Vec<&Val<f32>> = vals.iter().collect();
            kernels::eval_results(node.op, &node.attrs, &refs, &tys, &outs, coord)?
        }
    };
    Ok(outs.iter().zip(&results).map(|(ty, v)| to_tensor(ty, v)).collect())
}
