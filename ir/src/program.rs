//! What a program says about itself, as data: the typed signature (the role of every argument
//! and result), and for every node its phase, its origin (which pass or rule made it, and why),
//! and, on values, the transformer layer they belong to.
//!
//! A [`crate::Graph`] is the program; these tables live on its arguments, outputs, nodes and values, so
//! a pass that copies a node copies what is known about it, and renumbering
//! ([`crate::Graph::finish`]) keeps the value references inside them valid. Nothing downstream (the
//! plan, `explain`, checkpoints, the runtime) reads a layer, a rule, a phase or a role from a
//! value's name or a node's position: only the importer (which names values) and the passes
//! (which create nodes) write these tables, and everything else reads them.
//!
//! In `.tir` the annotations follow an item in square brackets (see [`crate::text`]):
//! ```text
//! param %h0.q: f32[64, 32] [split tp 1, layer 0]
//! state %h0.q.adam_m: f32[64, 32] [adam-m %h0.q, layer 0]
//! input %tokens: i64[2, 16] [tokens]
//! %x: f32[2, 16, 64] = all_reduce(%y) {axis = "tp"} [backward, adjoint %h0.attn_out, layer 0]
//! output %loss [loss], %grad_norm [grad-norm], %h0.q.new [update %h0.q]
//! ```
//! Defaults print as nothing: a node in the forward phase, made by the model, outside any layer.

use crate::id::ValueId;
use crate::mesh::Mesh;
use crate::tensor::{Data, Tensor};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Which part of a training step a node belongs to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// The model's forward computation, the loss included.
    #[default]
    Forward,
    /// Gradients, their synchronisation over data-parallel ranks included.
    Backward,
    /// Gradient clipping, the global norm and the parameter update.
    Optimizer,
}

impl Phase {
    pub const ALL: [Phase; 3] = [Phase::Forward, Phase::Backward, Phase::Optimizer];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Forward => "forward",
            Phase::Backward => "backward",
            Phase::Optimizer => "optimizer",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// ZeRO's stages (Rajbhandari et al. 2020): what data-parallel ranks partition.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "u8", try_from = "u8")]
pub enum ZeroStage {
    /// Plain data parallelism: every rank holds everything; gradients are all-reduced.
    #[default]
    Replicated,
    /// Stage 1: optimizer state partitioned.
    OptimizerStates,
    /// Stage 2: optimizer state and gradients partitioned.
    Gradients,
    /// Stage 3: optimizer state, gradients and parameters partitioned.
    Parameters,
}

impl ZeroStage {
    pub const ALL: [ZeroStage; 4] =
        [ZeroStage::Replicated, ZeroStage::OptimizerStates, ZeroStage::Gradients, ZeroStage::Parameters];

    /// The stage's number, as the paper and `--zero` write it.
    pub fn number(self) -> u8 {
        self as u8
    }

    pub fn from_number(n: u8) -> Option<ZeroStage> {
        ZeroStage::ALL.get(n as usize).copied()
    }

    /// Optimizer state is partitioned (stage 1 and up).
    pub fn shards_optimizer(self) -> bool {
        self >= ZeroStage::OptimizerStates
    }

    /// Gradients are partitioned (stage 2 and up).
    pub fn shards_gradients(self) -> bool {
        self >= ZeroStage::Gradients
    }

    /// Parameters are partitioned (stage 3).
    pub fn shards_parameters(self) -> bool {
        self == ZeroStage::Parameters
    }
}

impl From<ZeroStage> for u8 {
    fn from(s: ZeroStage) -> u8 {
        s.number()
    }
}

impl TryFrom<u8> for ZeroStage {
    type Error = String;
    fn try_from(n: u8) -> Result<Self, String> {
        ZeroStage::from_number(n).ok_or_else(|| format!("ZeRO stage {n} does not exist (0, 1, 2 or 3)"))
    }
}

impl fmt::Display for ZeroStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.number())
    }
}

/// What a node made by the training-step pass does (its rule, for `shardc plan`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepRule {
    /// The loss averaged over data-parallel ranks.
    AverageLoss,
    /// ZeRO-0 (plain data parallelism): each gradient all-reduced and averaged.
    AllReduceGradients,
    /// ZeRO-1/2: each gradient flattened, padded and reduce-scattered into this rank's shard.
    ReduceScatterGradients,
    /// ZeRO-3: a parameter gathered from its flat shards where the forward uses it.
    GatherParameters,
    /// ZeRO-3: the same gather repeated for the backward, instead of keeping the forward's copy.
    RegatherParameters,
    /// ZeRO-1/2: the updated parameter shards gathered into whole parameters.
    GatherUpdatedParameters,
    /// The global gradient norm: the sums of squares of tensor-parallel chunks added over `tp`.
    TensorParallelGradientNorm,
    /// The global gradient norm: the sums of squares of ZeRO shards added over `dp`.
    ShardedGradientNorm,
    /// The optimizer's own arithmetic: clipping and AdamW.
    Update,
}

impl StepRule {
    pub const ALL: [StepRule; 9] = [
        StepRule::AverageLoss,
        StepRule::AllReduceGradients,
        StepRule::ReduceScatterGradients,
        StepRule::GatherParameters,
        StepRule::RegatherParameters,
        StepRule::GatherUpdatedParameters,
        StepRule::TensorParallelGradientNorm,
        StepRule::ShardedGradientNorm,
        StepRule::Update,
    ];

    pub fn name(self) -> &'static str {
        match self {
            StepRule::AverageLoss => "average-loss",
            StepRule::AllReduceGradients => "all-reduce-gradients",
            StepRule::ReduceScatterGradients => "reduce-scatter-gradients",
            StepRule::GatherParameters => "gather-parameters",
            StepRule::RegatherParameters => "gather-parameters-for-backward",
            StepRule::GatherUpdatedParameters => "gather-updated-parameters",
            StepRule::TensorParallelGradientNorm => "tensor-parallel-gradient-norm",
            StepRule::ShardedGradientNorm => "global-gradient-norm",
            StepRule::Update => "adamw",
        }
    }

    pub fn from_name(s: &str) -> Option<StepRule> {
        StepRule::ALL.into_iter().find(|r| r.name() == s)
    }
}

/// Why a node of a training step exists, at the level of what made it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// The model definition (the importer, or the author of a `.tir` file).
    #[default]
    Model,
    /// A sharding rule, by its name (`tp/matmul-column`, `localize/replicated-into-parallel-region`).
    Rule(String),
    /// Autodiff: part of the adjoint of the node that defines this (forward) value.
    Adjoint(ValueId),
    /// The training-step pass: gradient synchronisation, ZeRO, the norm and the update, with the
    /// ZeRO stage of the step and, for per-parameter work, the parameter argument it is for.
    Step { rule: StepRule, zero: ZeroStage, param: Option<ValueId> },
}

impl Origin {
    /// The rule's name as `shardc plan` reports it, when the origin names one by itself
    /// (adjoints name their forward node's rule, which takes the graph to find).
    pub fn rule_name(&self) -> Option<String> {
        match self {
            Origin::Model | Origin::Adjoint(_) => None,
            Origin::Rule(r) => Some(r.clone()),
            Origin::Step { rule, zero, .. } => Some(match rule {
                StepRule::AverageLoss => "data-parallel/average-loss".to_string(),
                StepRule::TensorParallelGradientNorm => "tensor-parallel/global-gradient-norm".to_string(),
                StepRule::Update => "optimizer/adamw".to_string(),
                rule => format!("zero-{zero}/{}", rule.name()),
            }),
        }
    }
}

/// One of AdamW's two moments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Moment {
    /// The first moment (running mean of gradients), `exp_avg` in PyTorch.
    AdamM,
    /// The second moment (running mean of squared gradients), `exp_avg_sq` in PyTorch.
    AdamV,
}

impl Moment {
    pub fn keyword(self) -> &'static str {
        match self {
            Moment::AdamM => "adam-m",
            Moment::AdamV => "adam-v",
        }
    }

    /// The suffix checkpoints and the importer-facing names use (`<param>.adam_m`).
    pub fn suffix(self) -> &'static str {
        match self {
            Moment::AdamM => "adam_m",
            Moment::AdamV => "adam_v",
        }
    }
}

/// A tensor-parallel split of a parameter: this rank holds chunk `coord` of `parts` equal
/// contiguous chunks along `dim` of the full parameter, `coord` its coordinate on `axis`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Split {
    pub axis: String,
    pub dim: usize,
}

/// ZeRO-3's flat shard: the (tensor-parallel chunk of the) parameter of `shape` flattened,
/// zero-padded to a multiple of the size n of `axis`, and cut into n equal pieces; this rank holds
/// piece `coord`, its coordinate on `axis`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FlatShard {
    pub axis: String,
    pub shape: Vec<usize>,
}

impl FlatShard {
    /// Elements of the unpadded tensor.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Elements after padding to a multiple of `parts`.
    pub fn padded(&self, parts: usize) -> usize {
        self.numel().div_ceil(parts.max(1)) * parts.max(1)
    }
}

/// How a fresh run initialises a parameter (GPT-2's scheme, Radford et al. 2019, as nanoGPT
/// implements it). The importer says which parameter is which.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Init {
    /// By rank: matrices N(0, 0.02), vectors ones.
    #[default]
    Auto,
    /// N(0, 0.02).
    Normal,
    /// A projection writing into the residual stream: N(0, 0.02 / sqrt(2 * layers)).
    ResidualProjection,
    /// Zeros (biases).
    Zeros,
    /// Ones (norm scales).
    Ones,
}

impl Init {
    pub const ALL: [Init; 5] = [Init::Auto, Init::Normal, Init::ResidualProjection, Init::Zeros, Init::Ones];

    pub fn keyword(self) -> &'static str {
        match self {
            Init::Auto => "auto",
            Init::Normal => "normal",
            Init::ResidualProjection => "residual",
            Init::Zeros => "zeros",
            Init::Ones => "ones",
        }
    }
}

/// How a parameter argument relates to the model's whole parameter of the same name (its
/// layout over the mesh), and how a fresh run initialises it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ParamLayout {
    #[serde(default, skip_serializing_if = "is_default")]
    pub init: Init,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<Split>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flat_shard: Option<FlatShard>,
}

impl ParamLayout {
    pub fn is_whole(&self) -> bool {
        self.split.is_none() && self.flat_shard.is_none()
    }

    /// The whole parameter's shape from the `local` shape one rank holds.
    pub fn full_shape(&self, local: &[usize], mesh: &Mesh) -> Vec<usize> {
        let mut shape = match &self.flat_shard {
            Some(f) => f.shape.clone(),
            None => local.to_vec(),
        };
        if let Some(s) = &self.split {
            if let Some(d) = shape.get_mut(s.dim) {
                *d *= mesh.axis_size(&s.axis).unwrap_or(1);
            }
        }
        shape
    }

    /// What rank `rank` of `mesh` holds of the whole parameter `full`: its tensor-parallel
    /// chunk, then (ZeRO-3) its flat shard of that. Keeps f64 storage.
    pub fn cut(&self, full: &Tensor, mesh: &Mesh, rank: usize) -> Tensor {
        let mut t = full.clone();
        if let Some(s) = &self.split {
            let n = mesh.axis_size(&s.axis).unwrap_or(1);
            t = t.chunk(s.dim, n, mesh.coord(rank, &s.axis).unwrap_or(0));
        }
        if let Some(f) = &self.flat_shard {
            let n = mesh.axis_size(&f.axis).unwrap_or(1);
            t = flat_shard(&t, n, mesh.coord(rank, &f.axis).unwrap_or(0));
        }
        t
    }

    /// The whole parameter of `shape` from the ranks' tensors (`rank(r)` is rank r's): the
    /// inverse of [`ParamLayout::cut`], reading the ranks at coordinate 0 of every axis the
    /// layout does not split over (they hold the same).
    pub fn assemble<'a>(&self, shape: &[usize], mesh: &Mesh, rank: impl Fn(usize) -> &'a Tensor) -> Tensor {
        let split = self.split.as_ref().map(|s| (s.axis.as_str(), s.dim));
        let mut chunk_shape = shape.to_vec();
        let tp_n = split.map_or(1, |(axis, _)| mesh.axis_size(axis).unwrap_or(1));
        if let Some((_, d)) = split {
            chunk_shape[d] /= tp_n;
        }
        // The ranks at coordinate 0 of every axis but `keep` (and `k` on the split axis).
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
        let chunk = |k: usize| -> Tensor {
            match &self.flat_shard {
                Some(f) => {
                    let shards: Vec<&Tensor> = ranks_along(&f.axis, k).into_iter().map(&rank).collect();
                    unflatten_shards(&shards, &chunk_shape)
                }
                None => rank(ranks_along("", k)[0]).clone(),
            }
        };
        match split {
            Some((_, d)) => Tensor::concat(&(0..tp_n).map(chunk).collect::<Vec<_>>(), d),
            None => chunk(0),
        }
    }
}

/// Rank `r`'s ZeRO-3 shard of `t`: elements `r*P/n .. (r+1)*P/n` of the flattened tensor,
/// zero-padded to a multiple of `n` (the layout of [`FlatShard`]). Keeps f64 storage.
pub fn flat_shard(t: &Tensor, n: usize, r: usize) -> Tensor {
    let mut flat = t.to_f64();
    let per = flat.len().div_ceil(n);
    flat.resize(per * n, 0.0);
    let part = flat[r * per..(r + 1) * per].to_vec();
    match t.data {
        Data::F64(_) => Tensor::f64(t.dtype, vec![per], part),
        _ => Tensor::f32(vec![per], part.into_iter().map(|x| x as f32).collect()),
    }
}

/// The tensor of `shape` from every rank's [`flat_shard`], in rank order.
pub fn unflatten_shards(shards: &[&Tensor], shape: &[usize]) -> Tensor {
    let mut flat: Vec<f64> = shards.iter().flat_map(|t| t.to_f64()).collect();
    flat.truncate(shape.iter().product());
    match shards[0].data {
        Data::F64(_) => Tensor::f64(shards[0].dtype, shape.to_vec(), flat),
        _ => Tensor::f32(shape.to_vec(), flat.into_iter().map(|x| x as f32).collect()),
    }
}

/// What an argument is to whoever runs the program.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArgRole {
    /// Anything else the caller feeds (the default for `input` and `state` arguments).
    #[default]
    Other,
    /// A trainable parameter (only on `param` arguments; the default there), laid out as said.
    Param(ParamLayout),
    /// An AdamW moment of the parameter argument (only on `state` arguments).
    Moment { param: ValueId, moment: Moment },
    /// The token ids of the batch.
    Tokens,
    /// The next-token targets of the batch.
    Targets,
    /// This step's learning rate (f32 scalar).
    LearningRate,
    /// The 1-based step number (f32 scalar; AdamW's bias correction).
    StepNumber,
}

impl ArgRole {
    /// The parameter layout when this is a parameter.
    pub fn param_layout(&self) -> Option<&ParamLayout> {
        match self {
            ArgRole::Param(l) => Some(l),
            _ => None,
        }
    }
}

/// What an output is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputRole {
    #[default]
    Other,
    /// The scalar training loss.
    Loss,
    /// The logits.
    Logits,
    /// The global gradient norm before clipping.
    GradNorm,
    /// The gradient of the parameter argument.
    Gradient(ValueId),
    /// The next value of the parameter or state argument. The argument is dead once the step has
    /// run, so a runtime may write this result in place of it (donation: model state is never
    /// held twice).
    Update(ValueId),
}

/// One result of the program.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    pub value: ValueId,
    #[serde(default, skip_serializing_if = "is_default")]
    pub role: OutputRole,
}

fn is_default<T: Default + PartialEq>(x: &T) -> bool {
    *x == T::default()
}

impl Output {
    pub fn new(value: ValueId, role: OutputRole) -> Output {
        Output { value, role }
    }

    pub fn plain(value: ValueId) -> Output {
        Output { value, role: OutputRole::Other }
    }
}

/// Annotation keywords, for the text format's parser and printer.
impl FromStr for Phase {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Phase::ALL.into_iter().find(|p| p.name() == s).ok_or(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every rank's piece of a parameter split over tp and sharded over dp reassembles into it.
    #[test]
    fn layouts_cut_and_assemble() {
        let mesh = Mesh::parse("dp=2,tp=2").unwrap();
        let full = Tensor::f32(vec![3, 4], (0..12).map(|x| x as f32).collect());
        let layout = ParamLayout {
            init: Init::Normal,
            split: Some(Split { axis: "tp".into(), dim: 1 }),
            flat_shard: Some(FlatShard { axis: "dp".into(), shape: vec![3, 2] }),
        };
        let pieces: Vec<Tensor> = (0..4).map(|r| layout.cut(&full, &mesh, r)).collect();
        // Rank 1 (dp 0, tp 1): columns 2..4, flattened [2, 3, 6, 7, 10, 11], first half.
        assert_eq!(pieces[1].to_f64(), vec![2.0, 3.0, 6.0]);
        assert_eq!(layout.full_shape(&pieces[0].shape, &mesh), vec![3, 4]);
        assert_eq!(layout.assemble(&[3, 4], &mesh, |r| &pieces[r]), full);
        // A flat shard pads: 5 elements over 2 ranks hold 3 each.
        let odd = Tensor::f32(vec![5], vec![1.0; 5]);
        assert_eq!(flat_shard(&odd, 2, 1).to_f64(), vec![1.0, 1.0, 0.0]);
    }
}
