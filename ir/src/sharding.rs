//! Shardings: how a value with a global shape is laid out over the mesh.
//!
//! The vocabulary is PyTorch DTensor's and Shardy's: each tensor dimension is split over zero
//! or more mesh axes (major to minor), and a value may be a *partial sum* over some axes (every
//! rank holds an addend; the value is their sum). An axis appears at most once per value. A value
//! with no sharding annotation is replicated over the whole mesh.
//!
//! Text form, after the type: `@[dp, _, tp]` shards dim 0 over `dp` and dim 2 over `tp`;
//! `@[dp*tp, _]` splits dim 0 over both (dp major); `@[_, _] partial(tp)` is a partial sum.
//!
//! ```text
//! %h: f32[8, 128, 256] @[dp, _, tp] = matmul(%x, %w1)
//! %o: f32[8, 128, 64] @[dp, _, _] partial(tp) = matmul(%a, %w2)
//! ```

use crate::mesh::Mesh;
use crate::types::TensorType;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The layout of one value over the mesh.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Sharding {
    /// For each tensor dimension, the mesh axes it is split over, major first.
    pub dims: Vec<Vec<String>>,
    /// Mesh axes over which the value is a partial sum.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partial: Vec<String>,
}

impl Sharding {
    /// Fully replicated, for a tensor of `rank` dimensions.
    pub fn replicated(rank: usize) -> Self {
        Sharding { dims: vec![Vec::new(); rank], partial: Vec::new() }
    }

    /// Replicated and not partial.
    pub fn is_replicated(&self) -> bool {
        self.dims.iter().all(Vec::is_empty) && self.partial.is_empty()
    }

    /// Every mesh axis this sharding mentions, in order of appearance.
    pub fn axes(&self) -> impl Iterator<Item = &String> {
        self.dims.iter().flatten().chain(&self.partial)
    }

    /// The per-rank shape of a value of global type `ty`.
    pub fn local_shape(&self, ty: &TensorType, mesh: &Mesh) -> Result<Vec<usize>, String> {
        ty.shape
            .iter()
            .zip(&self.dims)
            .enumerate()
            .map(|(d, (&extent, axes))| {
                let parts: usize = axes.iter().map(|a| mesh.axis_size(a).unwrap_or(1)).product();
                if extent % parts != 0 {
                    let names = axes.join("*");
                    Err(format!("dimension {d} ({extent}) does not divide over {names} ({parts} ranks)"))
                } else {
                    Ok(extent / parts)
                }
            })
            .collect()
    }

    /// Checks the sharding against a value's type and the mesh: one entry per dimension, axes
    /// declared, no axis used twice, sharded dimensions divisible.
    pub fn check(&self, ty: &TensorType, mesh: &Mesh) -> Result<(), String> {
        if self.dims.len() != ty.rank() {
            return Err(format!(
                "sharding {self} has {} entries but the type {ty} has rank {}",
                self.dims.len(),
                ty.rank()
            ));
        }
        let mut seen: Vec<&String> = Vec::new();
        for a in self.axes() {
            if mesh.axis_size(a).is_none() {
                return Err(format!("sharding {self} names mesh axis `{a}`, which the mesh `{mesh}` does not have"));
            }
            if seen.contains(&a) {
                return Err(format!("sharding {self} uses mesh axis `{a}` twice"));
            }
            seen.push(a);
        }
        self.local_shape(ty, mesh).map(|_| ()).map_err(|e| format!("sharding {self} of {ty}: {e}"))
    }
}

impl fmt::Display for Sharding {
    /// `@[dp, _, tp] partial(tp)`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("@[")?;
        for (i, axes) in self.dims.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            if axes.is_empty() {
                f.write_str("_")?;
            } else {
                f.write_str(&axes.join("*"))?;
            }
        }
        f.write_str("]")?;
        if !self.partial.is_empty() {
            write!(f, " partial({})", self.partial.join(", "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::DType;

    #[test]
    fn local_shapes_and_checks() {
        let mesh = Mesh::parse("dp=2, tp=4").unwrap();
        let ty = TensorType::new(DType::F32, vec![8, 128, 256]);
        let s = Sharding { dims: vec![vec!["dp".into()], vec![], vec!["tp".into()]], partial: vec![] };
        assert_eq!(s.local_shape(&ty, &mesh).unwrap(), vec![4, 128, 64]);
        assert_eq!(s.to_string(), "@[dp, _, tp]");
        let both = Sharding { dims: vec![vec!["dp".into(), "tp".into()], vec![], vec![]], partial: vec![] };
        assert_eq!(both.local_shape(&ty, &mesh).unwrap(), vec![1, 128, 256]);
        let twice = Sharding { dims: vec![vec!["tp".into()], vec![], vec![]], partial: vec!["tp".into()] };
        assert!(twice.check(&ty, &mesh).unwrap_err().contains("twice"));
        let odd = TensorType::new(DType::F32, vec![6, 1, 1]);
        assert!(both.check(&odd, &mesh).unwrap_err().contains("does not divide"));
    }
}
