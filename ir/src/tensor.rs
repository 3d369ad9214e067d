//! Host tensors: the values that go into and come out of the reference interpreter.

use crate::types::{numel, DType, Shape, TensorType};

/// Element storage. Floating tensors of any logical dtype (f32, bf16, f16) are stored as f32 or
/// f64 holding values representable in that dtype; integer tensors are stored as i64.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
}

impl Data {
    pub fn len(&self) -> usize {
        match self {
            Data::F32(v) => v.len(),
            Data::F64(v) => v.len(),
            Data::I64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A dense row-major tensor on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// The logical element type.
    pub dtype: DType,
    pub shape: Shape,
    pub data: Data,
}

impl Tensor {
    /// A floating tensor from f32 values.
    pub fn f32(shape: impl Into<Shape>, data: Vec<f32>) -> Tensor {
        let shape = shape.into();
        assert_eq!(numel(&shape), data.len(), "Tensor::f32: data length does not match the shape");
        Tensor { dtype: DType::F32, shape, data: Data::F32(data) }
    }

    /// A floating tensor of logical type `dtype` from f64 values.
    pub fn f64(dtype: DType, shape: impl Into<Shape>, data: Vec<f64>) -> Tensor {
        let shape = shape.into();
        assert_eq!(numel(&shape), data.len(), "Tensor::f64: data length does not match the shape");
        Tensor { dtype, shape, data: Data::F64(data) }
    }

    /// An integer tensor of logical type `dtype` (i32 or i64).
    pub fn int(dtype: DType, shape: impl Into<Shape>, data: Vec<i64>) -> Tensor {
        let shape = shape.into();
        assert_eq!(numel(&shape), data.len(), "Tensor::int: data length does not match the shape");
        Tensor { dtype, shape, data: Data::I64(data) }
    }

    /// Chunk `k` of `n` equal chunks along `dim` (a tensor-parallel rank's shard). Panics if
    /// `n` does not divide the dim (callers check divisibility with their own error).
    pub fn chunk(&self, dim: usize, n: usize, k: usize) -> Tensor {
        assert!(
            self.shape[dim].is_multiple_of(n) && k < n,
            "Tensor::chunk: {n} chunks of dim {dim} of {:?}",
            self.shape
        );
        let outer: usize = self.shape[..dim].iter().product();
        let block: usize = self.shape[dim..].iter().product();
        let part = block / n;
        fn pick<T: Copy>(v: &[T], outer: usize, block: usize, part: usize, k: usize) -> Vec<T> {
            (0..outer).flat_map(|o| v[o * block + k * part..o * block + (k + 1) * part].iter().copied()).collect()
        }
        let data = match &self.data {
            Data::F32(v) => Data::F32(pick(v, outer, block, part, k)),
            Data::F64(v) => Data::F64(pick(v, outer, block, part, k)),
            Data::I64(v) => Data::I64(pick(v, outer, block, part, k)),
        };
        let mut shape = self.shape.clone();
        shape[dim] /= n;
        Tensor { dtype: self.dtype, shape, data }
    }

    /// The inverse of [`Tensor::chunk`]: concatenates equal parts (same storage) along `dim`.
    pub fn concat(parts: &[Tensor], dim: usize) -> Tensor {
        let first = &parts[0];
        let outer: usize = first.shape[..dim].iter().product();
        let part: usize = first.shape[dim..].iter().product();
        fn join<T: Copy>(vs: &[&[T]], outer: usize, part: usize) -> Vec<T> {
            (0..outer).flat_map(|o| vs.iter().flat_map(move |v| v[o * part..(o + 1) * part].iter().copied())).collect()
        }
        let data = match &first.data {
            Data::F32(_) => {
                let vs: Vec<&[f32]> =
                    parts.iter().filter_map(|p| if let Data::F32(v) = &p.data { Some(&v[..]) } else { None }).collect();
                Data::F32(join(&vs, outer, part))
            }
            Data::F64(_) => {
                let vs: Vec<&[f64]> =
                    parts.iter().filter_map(|p| if let Data::F64(v) = &p.data { Some(&v[..]) } else { None }).collect();
                Data::F64(join(&vs, outer, part))
            }
            Data::I64(_) => {
                let vs: Vec<&[i64]> =
                    parts.iter().filter_map(|p| if let Data::I64(v) = &p.data { Some(&v[..]) } else { None }).collect();
                Data::I64(join(&vs, outer, part))
            }
        };
        let mut shape = first.shape.clone();
        shape[dim] *= parts.len();
        Tensor { dtype: first.dtype, shape, data }
    }

    /// A zero-filled tensor of the given type (f32 storage for floats).
    pub fn zeros(ty: &TensorType) -> Tensor {
        let n = ty.numel();
        let data = if ty.dtype.is_float() { Data::F32(vec![0.0; n]) } else { Data::I64(vec![0; n]) };
        Tensor { dtype: ty.dtype, shape: ty.shape.clone(), data }
    }

    pub fn ty(&self) -> TensorType {
        TensorType::new(self.dtype, self.shape.clone())
    }

    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    /// The first element that is NaN or infinite, with its index (None for integer tensors).
    pub fn first_non_finite(&self) -> Option<(usize, f64)> {
        match &self.data {
            Data::F32(v) => v.iter().position(|x| !x.is_finite()).map(|i| (i, v[i] as f64)),
            Data::F64(v) => v.iter().position(|x| !x.is_finite()).map(|i| (i, v[i])),
            Data::I64(_) => None,
        }
    }

    /// Every element as f64 (integers converted).
    pub fn to_f64(&self) -> Vec<f64> {
        match &self.data {
            Data::F32(v) => v.iter().map(|&x| x as f64).collect(),
            Data::F64(v) => v.clone(),
            Data::I64(v) => v.iter().map(|&x| x as f64).collect(),
        }
    }

    /// Every element as f32 (integers converted).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            Data::F32(v) => v.clone(),
            Data::F64(v) => v.iter().map(|&x| x as f32).collect(),
            Data::I64(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    /// The single element of a one-element tensor, as f64.
    pub fn scalar(&self) -> Option<f64> {
        (self.numel() == 1).then(|| self.to_f64()[0])
    }
}

/// Largest absolute difference divided by the largest absolute value of `expected`
/// (the "relative error" every numeric test in this project quotes).
pub fn max_rel_error(actual: &[f64], expected: &[f64]) -> f64 {
    assert_eq!(actual.len(), expected.len(), "max_rel_error: lengths differ");
    let scale = expected.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let diff = actual.iter().zip(expected).fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}
