//! Device meshes: named axes with sizes, ranks in row-major order (the last axis varies fastest).

use serde::{Deserialize, Serialize};
use std::fmt;

/// One named mesh axis.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MeshAxis {
    pub name: String,
    pub size: usize,
}

/// A device mesh such as `dp=2, tp=4`. The empty mesh is a single device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Mesh {
    pub axes: Vec<MeshAxis>,
}

impl Mesh {
    /// Parses `dp=2,tp=4` (spaces allowed). Axis names are identifiers; sizes are positive.
    pub fn parse(s: &str) -> Result<Mesh, String> {
        let mut axes: Vec<MeshAxis> = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, size) = part
                .split_once('=')
                .ok_or_else(|| format!("mesh axis `{part}` must be written NAME=SIZE, e.g. tp=4"))?;
            let name = name.trim();
            if !is_identifier(name) {
                return Err(format!("mesh axis name `{name}` is not an identifier"));
            }
            let size: usize = size
                .trim()
                .parse()
                .map_err(|_| format!("mesh axis `{name}` has size `{}`, not a positive integer", size.trim()))?;
            if size == 0 {
                return Err(format!("mesh axis `{name}` has size 0; sizes must be at least 1"));
            }
            if axes.iter().any(|a| a.name == name) {
                return Err(format!("mesh axis `{name}` is named twice"));
            }
            axes.push(MeshAxis { name: name.to_string(), size });
        }
        Ok(Mesh { axes })
    }

    /// Number of ranks: the product of the axis sizes.
    pub fn world_size(&self) -> usize {
        self.axes.iter().map(|a| a.size).product()
    }

    /// Size of the named axis.
    pub fn axis_size(&self, name: &str) -> Option<usize> {
        self.axes.iter().find(|a| a.name == name).map(|a| a.size)
    }

    fn axis_position(&self, name: &str) -> Option<usize> {
        self.axes.iter().position(|a| a.name == name)
    }

    /// The coordinate of `rank` along every axis.
    pub fn coords(&self, rank: usize) -> Vec<usize> {
        let mut c = vec![0; self.axes.len()];
        let mut r = rank;
        for (i, a) in self.axes.iter().enumerate().rev() {
            c[i] = r % a.size;
            r /= a.size;
        }
        c
    }

    fn rank_of(&self, coords: &[usize]) -> usize {
        coords.iter().zip(&self.axes).fold(0, |acc, (c, a)| acc * a.size + c)
    }

    /// The coordinate of `rank` along the named axis.
    pub fn coord(&self, rank: usize, axis: &str) -> Option<usize> {
        self.axis_position(axis).map(|i| self.coords(rank)[i])
    }

    /// The ranks that share every coordinate with `rank` except along `axis`, ordered by their
    /// coordinate on `axis`: the group a collective over `axis` runs in.
    pub fn group(&self, rank: usize, axis: &str) -> Option<Vec<usize>> {
        let i = self.axis_position(axis)?;
        let mut c = self.coords(rank);
        Some(
            (0..self.axes[i].size)
                .map(|k| {
                    c[i] = k;
                    self.rank_of(&c)
                })
                .collect(),
        )
    }
}

impl fmt::Display for Mesh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, a) in self.axes.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}={}", a.name, a.size)?;
        }
        Ok(())
    }
}

/// `[A-Za-z_][A-Za-z0-9_]*`
pub fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_are_row_major_with_last_axis_fastest() {
        let m = Mesh::parse("dp=2, tp=3").unwrap();
        assert_eq!(m.world_size(), 6);
        assert_eq!(m.coords(4), vec![1, 1]);
        assert_eq!(m.group(4, "tp").unwrap(), vec![3, 4, 5]);
        assert_eq!(m.group(4, "dp").unwrap(), vec![1, 4]);
    }

    #[test]
    fn bad_meshes_are_explained() {
        assert!(Mesh::parse("dp=0").unwrap_err().contains("size 0"));
        assert!(Mesh::parse("dp").unwrap_err().contains("NAME=SIZE"));
        assert!(Mesh::parse("dp=2,dp=2").unwrap_err().contains("twice"));
        assert!(Mesh::parse("tp=x").unwrap_err().contains("not a positive integer"));
    }
}
