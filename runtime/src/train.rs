//! Running a training-step graph step after step on the host.
//!
//! The step graph is the one `shardc_passes::train_step` builds. [`Trainer`] reads its
//! signature, never names or positions: the parameter arguments and their AdamW moments (roles
//! `param`, `adam-m %p`, `adam-v %p`), the inputs with roles `tokens`, `targets`,
//! `learning-rate` and `step-number`, and the outputs `loss`, `grad-norm` and `update %a` (the
//! next value of argument `%a`). It keeps parameters and moments between steps (by argument name,
//! the checkpoint key) and feeds each `update` back as the next step's argument.

use crate::exec::{Arena, ExecError, ExecStats, HostProgram};
use shardc_ir::interp::{run_spmd, InterpError, Precision};
use shardc_ir::{ArgRole, DType, Graph, Mesh, OutputRole, Tensor, TensorType};
use std::collections::HashMap;

/// What one step reports.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    pub loss: f64,
    pub grad_norm: f64,
}

/// Why the trainer could not start or step.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("parameter `%{0}` has no initial value")]
    MissingParam(String),
    #[error("the step graph has no {0}; build it with shardc_passes::train_step")]
    NotAStepGraph(String),
    #[error("`%{name}` is {expected} in the step graph but the given tensor is {found}")]
    Mismatch { name: String, expected: TensorType, found: TensorType },
    #[error("the step graph's mesh has {expected} ranks but {found} initial states were given")]
    Ranks { expected: usize, found: usize },
    #[error("{0}")]
    Memory(String),
    #[error(transparent)]
    Interp(#[from] InterpError),
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error("step {step}: the loss is {loss}; training diverged (try a lower --lr or --grad-clip 1.0)")]
    NonFinite { step: usize, loss: f64 },
}

/// Each rank's rows of a global batch (`tokens`, `targets` row-major `[B, T]`): rank r gets
/// block d of `dp` equal row blocks, d its coordinate on the `dp` axis, so the tensor-parallel
/// ranks of one data-parallel group see the same rows.
pub fn dp_shards(mesh: &Mesh, tokens: &[i64], targets: &[i64]) -> Vec<(Vec<i64>, Vec<i64>)> {
    let dp = mesh.axis_size("dp").unwrap_or(1);
    let per = tokens.len() / dp;
    (0..mesh.world_size())
        .map(|r| {
            let d = mesh.coord(r, "dp").unwrap_or(0);
            (tokens[d * per..(d + 1) * per].to_vec(), targets[d * per..(d + 1) * per].to_vec())
        })
        .collect()
}

/// What runs the step.
enum Engine {
    /// The reference interpreter, in f32 or f64 storage.
    Interp(Precision),
    /// The compiled program on the host executor; parameters and moments live in each rank's
    /// arena (`values` is refreshed from it after every step).
    Host {
        program: Box<HostProgram>,
        arenas: Vec<Arena>,
        threads: usize,
        stats: Vec<ExecStats>,
        /// Record every node's time relative to this (`--trace`).
        trace: Option<std::time::Instant>,
        /// Parameters and moments read back from the arenas, made when first asked for after a
        /// step (checkpoints, evaluation), not on every step.
        read_back: std::cell::OnceCell<Vec<HashMap<String, Tensor>>>,
    },
}

/// Parameters and optimizer state, stepped by a training-step graph. An SPMD step graph (one
/// with a mesh) keeps one state per rank and runs every rank on the reference interpreter, or
/// (made with [`Trainer::new_host`]) on the host executor.
pub struct Trainer {
    graph: Graph,
    params: Vec<String>,
    /// Per rank: parameters and moments by argument name (on the host engine, their names and
    /// initial values: the arenas hold the current ones, read back on demand).
    values: Vec<HashMap<String, Tensor>>,
    engine: Engine,
    /// Argument names of the step's inputs: tokens, targets, learning rate, step number.
    inputs: [String; 4],
    loss: usize,
    grad_norm: usize,
    /// (argument name, index of the output that updates it).
    carried: Vec<(String, usize)>,
}

impl Trainer {
    /// A single-device trainer over `graph`. `initial` must hold every parameter; moments missing
    /// from it start at zero (a fresh run), moments present continue (a resumed run).
    pub fn new(graph: Graph, initial: HashMap<String, Tensor>, precision: Precision) -> Result<Self, TrainError> {
        Self::new_spmd(graph, vec![initial], precision)
    }

    /// A trainer for an SPMD step graph: `initial[r]` is rank r's state, one per rank of the
    /// graph's mesh.
    pub fn new_spmd(
        graph: Graph,
        initial: Vec<HashMap<String, Tensor>>,
        precision: Precision,
    ) -> Result<Self, TrainError> {
        if initial.len() != graph.mesh.world_size() {
            return Err(TrainError::Ranks { expected: graph.mesh.world_size(), found: initial.len() });
        }
        let sig = graph.signature();
        let params: Vec<String> = sig.params().map(|(v, _)| graph.name_of(v).to_string()).collect();
        let mut carried = Vec::new();
        for (arg, out) in sig.carried() {
            carried.push((graph.name_of(arg).to_string(), out));
        }
        let mut values = Vec::new();
        for init in &initial {
            let mut rank = HashMap::new();
            for (p, _) in sig.params() {
                let name = graph.name_of(p);
                let t = init.get(name).ok_or_else(|| TrainError::MissingParam(name.to_string()))?;
                check(name, graph.ty(p), t)?;
                rank.insert(name.to_string(), t.clone());
                if sig.update_of(p).is_none() {
                    return Err(TrainError::NotAStepGraph(format!("output updating parameter `%{name}`")));
                }
                for (_, m) in sig.moments_of(p) {
                    let (mname, mty) = (graph.name_of(m), graph.ty(m));
                    let t = match init.get(mname) {
                        Some(t) => {
                            check(mname, mty, t)?;
                            t.clone()
                        }
                        None => Tensor::zeros(mty),
                    };
                    rank.insert(mname.to_string(), t);
                }
            }
            values.push(rank);
        }
        let input = |role: ArgRole, what: &str| {
            sig.arg(&role).map(|v| graph.name_of(v).to_string()).ok_or_else(|| TrainError::NotAStepGraph(what.into()))
        };
        let inputs = [
            input(ArgRole::Tokens, "`tokens` input")?,
            input(ArgRole::Targets, "`targets` input")?,
            input(ArgRole::LearningRate, "`learning-rate` input")?,
            input(ArgRole::StepNumber, "`step-number` input")?,
        ];
        let loss = sig.output(&OutputRole::Loss).ok_or_else(|| TrainError::NotAStepGraph("`loss` output".into()))?;
        let grad_norm =
            sig.output(&OutputRole::GradNorm).ok_or_else(|| TrainError::NotAStepGraph("`grad-norm` output".into()))?;
        Ok(Trainer { graph, params, values, engine: Engine::Interp(precision), inputs, loss, grad_norm, carried })
    }

    /// A trainer running a compiled program on the host executor with `threads` threads in
    /// all; `initial` as for [`Trainer::new_spmd`].
    pub fn new_host(
        program: HostProgram,
        initial: Vec<HashMap<String, Tensor>>,
        threads: usize,
    ) -> Result<Self, TrainError> {
        let world = program.program().mesh.world_size() as u64;
        crate::machine::ensure_available(
            &format!("the step's arenas ({world} ranks x {} bytes)", program.arena_bytes()),
            world.saturating_mul(program.arena_bytes() as u64),
        )
        .map_err(TrainError::Memory)?;
        let mut t = Self::new_spmd(program.program().clone(), initial, Precision::F32)?;
        let mut arenas: Vec<Arena> = (0..t.values.len()).map(|_| program.arena()).collect();
        for (arena, values) in arenas.iter_mut().zip(&t.values) {
            for (name, tensor) in values {
                let v = t.graph.find(name).expect("values are arguments of the graph");
                program.write(arena, v, tensor)?;
            }
        }
        t.engine = Engine::Host {
            program: Box::new(program),
            arenas,
            threads: threads.max(1),
            stats: Vec::new(),
            trace: None,
            read_back: std::cell::OnceCell::new(),
        };
        Ok(t)
    }

    /// Records every node's time (relative to `epoch`) in the statistics of later steps.
    pub fn trace_from(&mut self, epoch: std::time::Instant) {
        if let Engine::Host { trace, .. } = &mut self.engine {
            *trace = Some(epoch);
        }
    }

    /// The host executor's statistics of the last step, per rank (empty on the interpreter).
    pub fn exec_stats(&self) -> &[ExecStats] {
        match &self.engine {
            Engine::Host { stats, .. } => stats,
            Engine::Interp(_) => &[],
        }
    }

    /// The arena size per rank, on the host executor.
    pub fn arena_bytes(&self) -> Option<usize> {
        match &self.engine {
            Engine::Host { program, .. } => Some(program.arena_bytes()),
            Engine::Interp(_) => None,
        }
    }

    fn step_host(&mut self, batches: Vec<(Vec<i64>, Vec<i64>)>, lr: f64, step: usize) -> Result<StepStats, TrainError> {
        let Engine::Host { program, arenas, threads, stats, trace, read_back } = &mut self.engine else {
            unreachable!("host engine")
        };
        let g = &self.graph;
        let [tok, tgt, lr_name, step_name] = &self.inputs;
        let id = |name: &String| g.find(name).expect("checked in new");
        let tok_ty = g.ty(id(tok)).clone();
        for (arena, (tokens, targets)) in arenas.iter_mut().zip(batches) {
            program.write(arena, id(tok), &Tensor::int(DType::I64, tok_ty.shape.clone(), tokens))?;
            program.write(arena, id(tgt), &Tensor::int(DType::I64, tok_ty.shape.clone(), targets))?;
            program.write(arena, id(lr_name), &Tensor::f64(DType::F32, vec![], vec![lr]))?;
            program.write(arena, id(step_name), &Tensor::f64(DType::F32, vec![], vec![step as f64]))?;
        }
        *stats = program.run_traced(arenas, *threads, *trace)?;
        let out = |k: usize| program.read(&arenas[0], g.outputs[k].value).scalar().unwrap_or(f64::NAN);
        let (loss, grad_norm) = (out(self.loss), out(self.grad_norm));
        // Parameters and moments: their storage holds the updated values now.
        *read_back = std::cell::OnceCell::new();
        if !loss.is_finite() {
            return Err(TrainError::NonFinite { step, loss });
        }
        Ok(StepStats { loss, grad_norm })
    }

    /// A trainer for the step a bundle holds (see [`Trainer::new_spmd`]).
    pub fn from_bundle(
        bundle: &shardc_bundle::Bundle,
        initial: Vec<HashMap<String, Tensor>>,
        precision: Precision,
    ) -> Result<Self, TrainError> {
        Self::new_spmd(bundle.header.program.clone(), initial, precision)
    }

    /// One single-device step on `tokens`/`targets` (row-major `[B, T]`) at learning rate `lr`;
    /// `step` is 1-based.
    pub fn step(&mut self, tokens: Vec<i64>, targets: Vec<i64>, lr: f64, step: usize) -> Result<StepStats, TrainError> {
        self.step_spmd(vec![(tokens, targets)], lr, step)
    }

    /// One step of every rank; `batches[r]` is rank r's (tokens, targets). The reported loss and
    /// gradient norm are rank 0's (the step graph makes them agree across ranks).
    pub fn step_spmd(
        &mut self,
        batches: Vec<(Vec<i64>, Vec<i64>)>,
        lr: f64,
        step: usize,
    ) -> Result<StepStats, TrainError> {
        let precision = match self.engine {
            Engine::Interp(p) => p,
            Engine::Host { .. } => return self.step_host(batches, lr, step),
        };
        let [tok, tgt, lr_name, step_name] = &self.inputs;
        let tok_ty = self.graph.ty(self.graph.find(tok).expect("checked in new")).clone();
        let mut inputs = std::mem::take(&mut self.values);
        for (rank, (tokens, targets)) in inputs.iter_mut().zip(batches) {
            rank.insert(tok.clone(), Tensor::int(DType::I64, tok_ty.shape.clone(), tokens));
            rank.insert(tgt.clone(), Tensor::int(DType::I64, tok_ty.shape.clone(), targets));
            rank.insert(lr_name.clone(), Tensor::f64(DType::F32, vec![], vec![lr]));
            rank.insert(step_name.clone(), Tensor::f64(DType::F32, vec![], vec![step as f64]));
        }
        let result = run_spmd(&self.graph, &inputs, precision);
        let restore = |mut inputs: Vec<HashMap<String, Tensor>>| {
            for rank in &mut inputs {
                self.inputs.iter().for_each(|k| {
                    rank.remove(k);
                });
            }
            inputs
        };
        // Keep the old state when the step failed, so that a caller can still save it.
        let outs = match result {
            Ok(outs) => outs,
            Err(e) => {
                self.values = restore(inputs);
                return Err(e.into());
            }
        };
        let loss = outs[0][self.loss].scalar().unwrap_or(f64::NAN);
        let grad_norm = outs[0][self.grad_norm].scalar().unwrap_or(f64::NAN);
        if !loss.is_finite() {
            self.values = restore(inputs);
            return Err(TrainError::NonFinite { step, loss });
        }
        self.values = outs
            .into_iter()
            .map(|out| {
                let mut out: Vec<Option<Tensor>> = out.into_iter().map(Some).collect();
                // Each output has one role, so no index is taken twice.
                self.carried
                    .iter()
                    .map(|(name, i)| (name.clone(), out[*i].take().expect("one role per output")))
                    .collect()
            })
            .collect();
        Ok(StepStats { loss, grad_norm })
    }

    /// Parameters and moments by name (rank 0's; for checkpoints and evaluation).
    pub fn values(&self) -> &HashMap<String, Tensor> {
        self.rank_values(0)
    }

    /// Rank `r`'s parameters and moments.
    pub fn rank_values(&self, r: usize) -> &HashMap<String, Tensor> {
        match &self.engine {
            Engine::Interp(_) => &self.values[r],
            // `values` holds the names (and the initial state); the arenas hold the current one.
            Engine::Host { program, arenas, read_back, .. } => &read_back.get_or_init(|| {
                self.values
                    .iter()
                    .zip(arenas)
                    .map(|(names, arena)| {
                        names
                            .keys()
                            .map(|name| {
                                let v = self.graph.find(name).expect("values are arguments");
                                (name.clone(), program.read(arena, v))
                            })
                            .collect()
                    })
                    .collect()
            })[r],
        }
    }

    /// Number of ranks the step runs on.
    pub fn ranks(&self) -> usize {
        self.values.len()
    }

    /// The parameter names, in argument order.
    pub fn params(&self) -> &[String] {
        &self.params
    }

    /// The step graph.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }
}

fn check(name: &str, ty: &TensorType, t: &Tensor) -> Result<(), TrainError> {
    if t.shape != ty.shape || t.dtype.is_float() != ty.dtype.is_float() {
        return Err(TrainError::Mismatch { name: name.to_string(), expected: ty.clone(), found: t.ty() });
    }
    Ok(())
}

/// nanoGPT's schedule: linear warmup over `warmup` steps, then cosine decay from `lr` to
/// `min_lr` at step `total`. `it` is 0-based.
pub fn lr_at(it: usize, lr: f64, min_lr: f64, warmup: usize, total: usize) -> f64 {
    if it < warmup {
        return lr * (it + 1) as f64 / (warmup + 1) as f64;
    }
    if it >= total || total <= warmup {
        return min_lr;
    }
    let ratio = (it - warmup) as f64 / (total - warmup) as f64;
    let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
    min_lr + coeff * (lr - min_lr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays() {
        assert_eq!(lr_at(0, 1.0, 0.1, 4, 20), 0.2);
        assert_eq!(lr_at(4, 1.0, 0.1, 4, 20), 1.0);
        assert!((lr_at(12, 1.0, 0.1, 4, 20) - 0.55).abs() < 1e-12);
        assert_eq!(lr_at(20, 1.0, 0.1, 4, 20), 0.1);
        // --min-lr equal to --lr and no warmup: constant.
        assert!((0..10).all(|i| lr_at(i, 3e-4, 3e-4, 0, 10) == 3e-4));
    }
}
