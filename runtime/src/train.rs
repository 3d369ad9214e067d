//! Running a training-step graph step after step on the host.
//!
//! The step graph is the one `shardc_passes::train_step` builds: arguments are the parameters,
//! their AdamW moments (`<p>.adam_m`, `<p>.adam_v`), the token batch and the scalars `lr` and
//! `step`; outputs are the loss, the gradient norm and, per parameter, the new value and moments.
//! [`Trainer`] keeps parameters and moments between steps and feeds each step's outputs back as
//! the next step's arguments.

use shardc_ir::interp::{run, InterpError, Precision};
use shardc_ir::{ArgKind, DType, Graph, Tensor, TensorType};
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
    #[error(transparent)]
    Interp(#[from] InterpError),
    #[error("step {step}: the loss is {loss}; training diverged (try a lower --lr or --grad-clip 1.0)")]
    NonFinite { step: usize, loss: f64 },
}

/// Parameters and optimizer state, stepped by a training-step graph.
pub struct Trainer {
    graph: Graph,
    params: Vec<String>,
    /// Parameters and moments by argument name.
    values: HashMap<String, Tensor>,
    precision: Precision,
}

/// The names of a parameter's AdamW moments.
pub fn moment_names(param: &str) -> [String; 2] {
    [format!("{param}.adam_m"), format!("{param}.adam_v")]
}

impl Trainer {
    /// A trainer over `graph` for `params` (in the graph's output order). `initial` must hold
    /// every parameter; moments missing from it start at zero (a fresh run), moments present
    /// continue (a resumed run).
    pub fn new(
        graph: Graph,
        params: Vec<String>,
        initial: HashMap<String, Tensor>,
        precision: Precision,
    ) -> Result<Self, TrainError> {
        let mut values = HashMap::new();
        for p in &params {
            let v = graph.find(p).ok_or_else(|| TrainError::NotAStepGraph(p.clone()))?;
            let ty = graph.ty(v).clone();
            let t = initial.get(p).ok_or_else(|| TrainError::MissingParam(p.clone()))?;
            check(p, &ty, t)?;
            values.insert(p.clone(), t.clone());
            for m in moment_names(p) {
                let mv = graph.find(&m).ok_or_else(|| TrainError::NotAStepGraph(m.clone()))?;
                let mty = graph.ty(mv).clone();
                let t = match initial.get(&m) {
                    Some(t) => {
                        check(&m, &mty, t)?;
                        t.clone()
                    }
                    None => Tensor::zeros(&mty),
                };
                values.insert(m, t);
            }
        }
        for name in ["lr", "step", "tokens", "targets"] {
            graph.find(name).ok_or_else(|| TrainError::NotAStepGraph(name.to_string()))?;
        }
        Ok(Trainer { graph, params, values, precision })
    }

    /// One step on `tokens`/`targets` (row-major `[B, T]`) at learning rate `lr`; `step` is
    /// 1-based.
    pub fn step(&mut self, tokens: Vec<i64>, targets: Vec<i64>, lr: f64, step: usize) -> Result<StepStats, TrainError> {
        let tok_ty = self.graph.ty(self.graph.find("tokens").expect("checked in new")).clone();
        let mut inputs = std::mem::take(&mut self.values);
        inputs.insert("tokens".into(), Tensor::int(DType::I64, tok_ty.shape.clone(), tokens));
        inputs.insert("targets".into(), Tensor::int(DType::I64, tok_ty.shape.clone(), targets));
        inputs.insert("lr".into(), Tensor::f64(DType::F32, vec![], vec![lr]));
        inputs.insert("step".into(), Tensor::f64(DType::F32, vec![], vec![step as f64]));
        let result = run(&self.graph, &inputs, self.precision);
        // Keep the old state when the step failed, so that a caller can still save it.
        let out = match result {
            Ok(out) => out,
            Err(e) => {
                for k in ["tokens", "targets", "lr", "step"] {
                    inputs.remove(k);
                }
                self.values = inputs;
                return Err(e.into());
            }
        };
        let loss = out[0].scalar().unwrap_or(f64::NAN);
        let grad_norm = out[1].scalar().unwrap_or(f64::NAN);
        if !loss.is_finite() {
            for k in ["tokens", "targets", "lr", "step"] {
                inputs.remove(k);
            }
            self.values = inputs;
            return Err(TrainError::NonFinite { step, loss });
        }
        let mut out = out.into_iter().skip(2);
        for p in &self.params {
            let [m, v] = moment_names(p);
            for name in [p.clone(), m, v] {
                self.values.insert(name, out.next().expect("three outputs per parameter"));
            }
        }
        Ok(StepStats { loss, grad_norm })
    }

    /// Parameters and moments by name (for checkpoints and evaluation).
    pub fn values(&self) -> &HashMap<String, Tensor> {
        &self.values
    }

    /// The parameter names, in order.
    pub fn params(&self) -> &[String] {
        &self.params
    }

    /// Number of trainable scalars.
    pub fn param_count(&self) -> usize {
        self.graph.args_of(ArgKind::Param).map(|v| self.graph.ty(v).numel()).sum()
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
