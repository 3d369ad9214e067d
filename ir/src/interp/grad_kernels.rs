//! Kernels of the ops that autodiff emits: derivatives of the nonlinear ops, the norm
//! backward passes, the embedding scatter-add and the cross-entropy gradient. Like the forward
//! kernels, they accumulate in f64 and round once.

use super::real::Real;
use crate::types::DType;

/// d gelu(x) / dx; `tanh` selects the tanh approximation.
pub fn gelu_derivative(x: f64, tanh: bool) -> f64 {
    if tanh {
        let c = (2.0 / std::f64::consts::PI).sqrt();
        let t = (c * (x + 0.044715 * x * x * x)).tanh();
        0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x)
    } else {
        let cdf = 0.5 * (1.0 + libm::erf(x / std::f64::consts::SQRT_2));
        let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
        cdf + x * pdf
    }
}

/// d silu(x) / dx = s (1 + x (1 - s)) with s = sigmoid(x).
pub fn silu_derivative(x: f64) -> f64 {
    let s = 1.0 / (1.0 + (-x).exp());
    s * (1.0 + x * (1.0 - s))
}

/// Per row of width `d`: (mean, 1/sqrt(var + eps)) for layer_norm, (0, 1/sqrt(mean(x^2) + eps))
/// for rms_norm.
fn row_stats<T: Real>(xs: &[T], eps: f64, centered: bool) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = if centered { xs.iter().map(|v| v.to_f64()).sum::<f64>() / n } else { 0.0 };
    let var = xs.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// dx of layer_norm (`centered`) or rms_norm, given x, gamma and dy.
///
/// With xhat = (x - mean) r and g = dy * gamma: layer_norm's dx = r (g - mean(g) - xhat
/// mean(g xhat)); rms_norm's dx = r (g - xhat mean(g xhat)).
pub(crate) fn norm_grad<T: Real>(x: &[T], gamma: &[T], dy: &[T], eps: f64, centered: bool, dt: DType) -> Vec<T> {
    let d = gamma.len().max(1);
    super::threads::par_fill(x.len(), d, |start, part| {
        for (k, out) in part.chunks_mut(d).enumerate() {
            let row = start + k * d;
            let (xs, dys) = (&x[row..row + d], &dy[row..row + d]);
            let (mean, r) = row_stats(xs, eps, centered);
            let n = d as f64;
            let (mut mean_g, mut mean_gx) = (0.0, 0.0);
            for j in 0..d {
                let g = dys[j].to_f64() * gamma[j].to_f64();
                mean_g += g / n;
                mean_gx += g * (xs[j].to_f64() - mean) * r / n;
            }
            for j in 0..d {
                let g = dys[j].to_f64() * gamma[j].to_f64();
                let xhat = (xs[j].to_f64() - mean) * r;
                let centered_g = if centered { g - mean_g } else { g };
                out[j] = T::from_f64(r * (centered_g - xhat * mean_gx)).round_to(dt);
            }
        }
    })
}

/// Sum over rows of dy * xhat: the gradient of the norm's gain.
pub(crate) fn norm_gamma_grad<T: Real>(x: &[T], dy: &[T], d: usize, eps: f64, centered: bool, dt: DType) -> Vec<T> {
    let mut acc = vec![0.0f64; d];
    for (xs, dys) in x.chunks(d.max(1)).zip(dy.chunks(d.max(1))) {
        let (mean, r) = row_stats(xs, eps, centered);
        for j in 0..d {
            acc[j] += dys[j].to_f64() * (xs[j].to_f64() - mean) * r;
        }
    }
    acc.into_iter().map(|a| T::from_f64(a).round_to(dt)).collect()
}

/// Scatter-add of the rows of dy into a [rows, d] table at `ids`.
pub(crate) fn embedding_grad<T: Real>(
    ids: &[i64],
    dy: &[T],
    rows: usize,
    d: usize,
    dt: DType,
) -> Result<Vec<T>, String> {
    let mut acc = vec![0.0f64; rows * d];
    for (&id, row) in ids.iter().zip(dy.chunks(d.max(1))) {
        if id < 0 || id as usize >= rows {
            return Err(format!("id {id} is outside the table's {rows} rows"));
        }
        let base = id as usize * d;
        for (a, v) in acc[base..base + d].iter_mut().zip(row) {
            *a += v.to_f64();
        }
    }
    Ok(acc.into_iter().map(|a| T::from_f64(a).round_to(dt)).collect())
}

/// (softmax(logits) - onehot(target)) * dy per row of width `v`.
pub(crate) fn cross_entropy_grad<T: Real>(
    logits: &[T],
    targets: &[i64],
    dy: &[T],
    v: usize,
    dt: DType,
) -> Result<Vec<T>, String> {
    let mut out = Vec::with_capacity(logits.len());
    for ((row, &t), g) in logits.chunks(v.max(1)).zip(targets).zip(dy) {
        if t < 0 || t as usize >= v {
            return Err(format!("target {t} is outside the {v} classes"));
        }
        let m = row.iter().fold(f64::NEG_INFINITY, |m, x| m.max(x.to_f64()));
        let sum: f64 = row.iter().map(|x| (x.to_f64() - m).exp()).sum();
        let g = g.to_f64();
        for (j, x) in row.iter().enumerate() {
            let p = (x.to_f64() - m).exp() / sum;
            let onehot = if j == t as usize { 1.0 } else { 0.0 };
            out.push(T::from_f64((p - onehot) * g).round_to(dt));
        }
    }
    Ok(out)
}
