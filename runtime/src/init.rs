//! Parameter initialisation for models that come without weights.
//!
//! GPT-2's scheme (Radford et al. 2019, as in nanoGPT): matrices and embeddings drawn from
//! N(0, 0.02), the residual projections from N(0, 0.02 / sqrt(2 * layers)), biases zero,
//! normalisation gains one. Deterministic for a seed: the stream of
//! each parameter is derived from the seed and the parameter's name, so adding a parameter does
//! not change the others.

use shardc_ir::graph::{ArgKind, Graph};
use shardc_ir::tensor::Tensor;
use shardc_ir::Init;
use std::collections::HashMap;

/// splitmix64: a small, well-mixed 64-bit generator (Steele, Lea, Flood 2014).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

fn name_hash(name: &str) -> u64 {
    // FNV-1a: stable across runs and platforms.
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Number of transformer layers: the distinct layers the importer put parameters in.
pub fn count_layers(g: &Graph) -> usize {
    g.args_of(ArgKind::Param).filter_map(|p| g.layer(p)).collect::<std::collections::BTreeSet<_>>().len()
}

/// GPT-2-style initial values of every parameter of `g` as whole parameters, by name, from
/// each parameter's `init` role; deterministic in `seed` and the parameter's name. `g` may be
/// the model's graph or a per-rank step compiled from it (each parameter's full shape comes
/// from its layout): both give the same values.
pub fn init_params(g: &Graph, seed: u64) -> HashMap<String, Tensor> {
    let layers = count_layers(g);
    g.signature()
        .params()
        .map(|(p, layout)| {
            let v = g.value(p);
            let shape = layout.full_shape(&v.ty.shape, &g.mesh);
            (v.name.clone(), init_one(&v.name, &shape, v.ty.dtype, layout.init, layers, seed))
        })
        .collect()
}

fn init_one(name: &str, shape: &[usize], dtype: shardc_ir::DType, init: Init, layers: usize, seed: u64) -> Tensor {
    let residual_std = 0.02 / (2.0 * layers.max(1) as f64).sqrt();
    let n: usize = shape.iter().product();
    let init = match init {
        Init::Auto if shape.len() >= 2 => Init::Normal,
        Init::Auto => Init::Ones,
        other => other,
    };
    let normal = |std: f64| {
        let mut rng = Rng::new(seed ^ name_hash(name));
        (0..n).map(|_| (std * rng.normal()) as f32).collect::<Vec<f32>>()
    };
    let data = match init {
        Init::Normal | Init::Auto => normal(0.02),
        Init::ResidualProjection => normal(residual_std),
        Init::Zeros => vec![0.0; n],
        Init::Ones => vec![1.0; n],
    };
    let mut t = Tensor::f32(shape.to_vec(), data);
    t.dtype = dtype;
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_has_unit_variance() {
        let mut r = Rng::new(7);
        let xs: Vec<f64> = (0..20000).map(|_| r.normal()).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.03 && (var - 1.0).abs() < 0.05, "mean {mean}, var {var}");
    }
}
