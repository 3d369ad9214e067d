//! The floating type the interpreter computes in (f32 or f64).

use crate::tensor::Data;
use crate::types::DType;
use std::fmt::Debug;

/// Which storage type the interpreter computes floating values in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Precision {
    /// Every floating value is an f32 (or rounded further to bf16/f16 when declared so).
    F32,
    /// Every floating value is an f64; bf16/f16 values are still rounded to their type.
    F64,
}

/// True when every element the strides reach lies inside the buffers (all strides are
/// non-negative here); false also for empty products, which add nothing.
#[allow(clippy::too_many_arguments)]
fn gemm_fits(
    m: usize,
    k: usize,
    n: usize,
    la: usize,
    rsa: isize,
    csa: isize,
    lb: usize,
    rsb: isize,
    csb: isize,
    lc: usize,
) -> bool {
    if m == 0 || n == 0 || k == 0 {
        return false;
    }
    let last = |r: usize, c: usize, rs: isize, cs: isize| (r - 1) * rs as usize + (c - 1) * cs as usize;
    assert!(
        rsa >= 0
            && csa >= 0
            && rsb >= 0
            && csb >= 0
            && last(m, k, rsa, csa) < la
            && last(k, n, rsb, csb) < lb
            && m * n <= lc,
        "gemm: strides reach outside the buffers"
    );
    true
}

/// A floating storage type: f32 or f64.
pub trait Real:
    Copy
    + Default
    + Debug
    + PartialOrd
    + Send
    + Sync
    + 'static
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
{
    const ZERO: Self;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    /// C += A B for row/column-strided matrices (A is m x k, B is k x n, C is m x n).
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        m: usize,
        k: usize,
        n: usize,
        a: &[Self],
        rsa: isize,
        csa: isize,
        b: &[Self],
        rsb: isize,
        csb: isize,
        c: &mut [Self],
    );
    fn wrap(v: Vec<Self>) -> Data;
    /// Storage of `data` converted to `Self` when it is floating.
    fn unwrap(data: &Data) -> Option<Vec<Self>>;

    /// Whether values of `dtype` must be rounded after an op in this storage (bf16/f16 only:
    /// f32 storage holds f32 values already, and f64 mode keeps "f32" values in f64).
    fn needs_rounding(dtype: DType) -> bool {
        matches!(dtype, DType::Bf16 | DType::F16)
    }

    /// Rounds to a value representable in `dtype` (identity for f32 at f32 storage).
    fn round_to(self, dtype: DType) -> Self {
        match dtype {
            DType::Bf16 => Self::from_f64(half::bf16::from_f64(self.to_f64()).to_f64()),
            DType::F16 => Self::from_f64(half::f16::from_f64(self.to_f64()).to_f64()),
            DType::F32 => Self::from_f64(self.to_f64() as f32 as f64),
            _ => self,
        }
    }
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn gemm(
        m: usize,
        k: usize,
        n: usize,
        a: &[Self],
        rsa: isize,
        csa: isize,
        b: &[Self],
        rsb: isize,
        csb: isize,
        c: &mut [Self],
    ) {
        if !gemm_fits(m, k, n, a.len(), rsa, csa, b.len(), rsb, csb, c.len()) {
            return;
        }
        // SAFETY: the callers pass slices that hold every element the strides reach
        // (checked against the static shapes in `matmul`), and C is a distinct, dense m x n
        // buffer.
        unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                n,
                1.0,
                a.as_ptr(),
                rsa,
                csa,
                b.as_ptr(),
                rsb,
                csb,
                1.0,
                c.as_mut_ptr(),
                n as isize,
                1,
            )
        }
    }
    fn wrap(v: Vec<Self>) -> Data {
        Data::F32(v)
    }
    fn unwrap(data: &Data) -> Option<Vec<Self>> {
        match data {
            Data::F32(v) => Some(v.clone()),
            Data::F64(v) => Some(v.iter().map(|&x| x as f32).collect()),
            Data::I64(_) => None,
        }
    }
    #[inline]
    fn round_to(self, dtype: DType) -> Self {
        match dtype {
            DType::Bf16 => half::bf16::from_f32(self).to_f32(),
            DType::F16 => half::f16::from_f32(self).to_f32(),
            _ => self,
        }
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    fn from_f64(x: f64) -> Self {
        x
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn gemm(
        m: usize,
        k: usize,
        n: usize,
        a: &[Self],
        rsa: isize,
        csa: isize,
        b: &[Self],
        rsb: isize,
        csb: isize,
        c: &mut [Self],
    ) {
        if !gemm_fits(m, k, n, a.len(), rsa, csa, b.len(), rsb, csb, c.len()) {
            return;
        }
        // SAFETY: as for f32 above.
        unsafe {
            matrixmultiply::dgemm(
                m,
                k,
                n,
                1.0,
                a.as_ptr(),
                rsa,
                csa,
                b.as_ptr(),
                rsb,
                csb,
                1.0,
                c.as_mut_ptr(),
                n as isize,
                1,
            )
        }
    }
    fn wrap(v: Vec<Self>) -> Data {
        Data::F64(v)
    }
    fn unwrap(data: &Data) -> Option<Vec<Self>> {
        match data {
            Data::F32(v) => Some(v.iter().map(|&x| x as f64).collect()),
            Data::F64(v) => Some(v.clone()),
            Data::I64(_) => None,
        }
    }
    #[inline]
    fn round_to(self, dtype: DType) -> Self {
        match dtype {
            DType::Bf16 => half::bf16::from_f64(self).to_f64(),
            DType::F16 => half::f16::from_f64(self).to_f64(),
            // In f64 mode "f32" values keep f64 precision: f64 mode is the tight oracle.
            _ => self,
        }
    }
}
