//! Running a training-step graph step after step on the host.
//!
//! The step graph is the one `shardc_passes::train_step` builds: arguments are the parameters,
//! their AdamW moments (`<p>.adam_m`, `<p>.adam_v`), the token batch and the scalars `lr` and
//! `step`; outputs are the loss, the gradient norm and, per parameter, the new value and moments.
//! [`Trainer`] keeps parameters and moments between steps and feeds each step's outputs back as
//! the next step's arguments.

use shardc_ir::interp::{run_spmd, InterpError, Precision};
use shardc_ir::{DType, Graph, Mesh, Tensor, TensorType};
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
    #[error("the step graph has no argument `%{0}`; build it with shardc_passes::train_step")]
    NotAStepGraph(String),
    #[error("`%{name}` is {expected} in the step graph but the given tensor is {found}")]
    Mismatch { name: String, expected: TensorType, found: TensorType },
    #[error("the step graph's mesh has {expected} ranks but {found} initial states were given")]
    Ranks { expected: usize, found: usize },
    #[error(transparent)]
    Interp(#[from] InterpError),
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

/// Parameters and optimizer state, stepped by a training-step graph. An SPMD step graph (one
/// with a mesh) keeps one state per rank and runs every rank on the reference interpreter.
pub struct Trainer {
    graph: Graph,
    params: Vec<String>,
    /// Per rank: parameters and moments by argument name.
    values: Vec<HashMap<String, Tensor>>,
    precision: Precision,
}

/// The names of a parameter's AdamW moments.
pub fn moment_names(param: &str) -> [String; 2] {
    [format!("{param}.adam_m"), format!("{param}.adam_v")]
}

const STEP_INPUTS: [&str; 4] = ["tokens", "targets", "lr", "step"];

impl Trainer {
    /// A single-device trainer over `graph` for `params` (in the graph's output order).
    /// `initial` must hold every parameter; moments missing from it start at zero (a fresh run),
    /// moments present continue (a resumed run).
    pub fn new(
        graph: Graph,
        params: Vec<String>,
        initial: HashMap<String, Tensor>,
        precision: Precision,
    ) -> Result<Self, TrainError> {
        Self::new_spmd(graph, params, vec![initial], precision)
    }

    /// A trainer for an SPMD step graph: `initial[r]` is rank r's state, one per rank of the
    /// graph's mesh.
    pub fn new_spmd(
        graph: Graph,
        params: Vec<String>,
        initial: Vec<HashMap<String, Tensor>>,
        precision: Precision,
    ) -> Result<Self, TrainError> {
        if initial.len() != graph.mesh.world_size() {
            return Err(TrainError::Ranks { expected: graph.mesh.world_size(), found: initial.len() });
        }
        let mut values = Vec::new();
        for init in initial {
            let mut rank = HashMap::new();
            for p in &params {
                let v = graph.find(p).ok_or_else(|| TrainError::NotAStepGraph(p.clone()))?;
                let ty = graph.ty(v).clone();
                let t = init.get(p).ok_or_else(|| TrainError::MissingParam(p.clone()))?;
                check(p, &ty, t)?;
                rank.insert(p.clone(), t.clone());
                for m in moment_names(p) {
                    let mv = graph.find(&m).ok_or_else(|| TrainError::NotAStepGraph(m.clone()))?;
                    let mty = graph.ty(mv).clone();
                    let t = match init.get(&m) {
                        Some(t) => {
                            check(&m, &mty, t)?;
                            t.clone()
                        }
                        None => Tensor::zeros(&mty),
                    };
                    rank.insert(m, t);
                }
            }
            values.push(rank);
        }
        for name in STEP_INPUTS {
            graph.find(name).ok_or_else(|| TrainError::NotAStepGraph(name.to_string()))?;
        }
        Ok(Trainer { graph, params, values, precision })
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
        let tok_ty = self.graph.ty(self.graph.find("tokens").expect("checked in new")).clone();
        let mut inputs = std::mem::take(&mut self.values);
        for (rank, (tokens, targets)) in inputs.iter_mut().zip(batches) {
            rank.insert("tokens".into(), Tensor::int(DType::I64, tok_ty.shape.clone(), tokens));
            rank.insert("targets".into(), Tensor::int(DType::I64, tok_ty.shape.clone(), targets));
            rank.insert("lr".into(), Tensor::f64(DType::F32, vec![], vec![lr]));
            rank.insert("step".into(), Tensor::f64(DType::F32, vec![], vec![step as f64]));
        }
        let result = run_spmd(&self.graph, &inputs, self.precision);
        let restore = |mut inputs: Vec<HashMap<String, Tensor>>| {
            for rank in &mut inputs {
                STEP_INPUTS.iter().for_each(|k| {
                    rank.remove(*k);
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
        let loss = outs[0][0].scalar().unwrap_or(f64::NAN);
        let grad_norm = outs[0][1].scalar().unwrap_or(f64::NAN);
        if !loss.is_finite() {
            self.values = restore(inputs);
            return Err(TrainError::NonFinite { step, loss });
        }
        self.values = outs
            .into_iter()
            .map(|out| {
                let mut out = out.into_iter().skip(2);
                let mut rank = HashMap::new();
                for p in &self.params {
                    let [m, v] = moment_names(p);
                    for name in [p.clone(), m, v] {
                        rank.insert(name, out.next().expect("three outputs per parameter"));
                    }
                }
                rank
            })
            .collect();
        Ok(StepStats { loss, grad_norm })
    }

    /// Parameters and moments by name (rank 0's; for checkpoints and evaluation).
    pub fn values(&self) -> &HashMap<String, Tensor> {
        &self.values[0]
    }

    /// Rank `r`'s parameters and moments.
    pub fn rank_values(&self, r: usize) -> &HashMap<String, Tensor> {
        &self.values[r]
    }

    /// Number of ranks the step runs on.
    pub fn ranks(&self) -> usize {
        self.values.len()
    }

    /// The parameter names, in order.
    pub fn params(&self) -> &[String] {
        &self.params
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
