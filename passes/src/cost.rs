//! The cost model: pure functions of a [`DeviceModel`] (data, from a TOML file) and a mesh.
//!
//! - Communication: the alpha-beta model of ring collectives (Thakur, Rabenseifner, Gropp 2005;
//!   NCCL's ring algorithms). On a group of n ranks moving a tensor of B bytes:
//!   all_reduce 2(n-1) steps moving 2(n-1)/n B per rank; all_gather, reduce_scatter and
//!   all_to_all (n-1) steps moving (n-1)/n B per rank (B is the full, unsharded size).
//!   The link is the fastest one whose group holds the collective's ranks: with row-major ranks
//!   (last mesh axis fastest), a group of `size` ranks spaced `stride` apart spans
//!   `stride * size` consecutive ranks.
//! - Communication volume as the ZeRO paper counts it (Rajbhandari et al. 2020, section 7):
//!   an all_reduce of Psi elements moves 2 Psi, a reduce_scatter or all_gather moves Psi.
//! - Compute: the roofline, max(flops / peak, bytes / memory bandwidth).

use serde::Deserialize;

/// One level of the network.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Link {
    pub name: String,
    /// How many consecutive ranks share this link (a node); 0 means all ranks.
    pub ranks_per_group: usize,
    /// Bytes per second per rank per direction.
    pub bandwidth: f64,
    /// Seconds per ring step.
    pub latency: f64,
}

/// The compute, memory and network numbers of one kind of device and its cluster.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct DeviceModel {
    pub name: String,
    /// Achievable dense bf16 FLOP/s.
    pub flops_bf16: f64,
    /// Achievable f32 FLOP/s.
    pub flops_f32: f64,
    /// Achievable memory bandwidth, bytes/s.
    pub memory_bandwidth: f64,
    /// Device memory, bytes.
    pub memory_bytes: f64,
    /// Network levels from the fastest (innermost) to the slowest.
    pub links: Vec<Link>,
}

/// The bundled default: H100 SXM nodes with NVLink inside and InfiniBand between.
pub const H100_TOML: &str = include_str!("../devices/h100-nvlink-ib.toml");

impl DeviceModel {
    /// Parses a device file; errors name the field.
    pub fn from_toml(text: &str) -> Result<DeviceModel, String> {
        let m: DeviceModel = toml::from_str(text).map_err(|e| e.to_string())?;
        let positive = [
            ("flops_bf16", m.flops_bf16),
            ("flops_f32", m.flops_f32),
            ("memory_bandwidth", m.memory_bandwidth),
            ("memory_bytes", m.memory_bytes),
        ];
        for (k, v) in positive {
            if !(v > 0.0 && v.is_finite()) {
                return Err(format!("`{k}` must be a positive number, found {v}"));
            }
        }
        if m.links.is_empty() {
            return Err("at least one [[links]] entry is needed".into());
        }
        for l in &m.links {
            if !(l.bandwidth > 0.0 && l.latency >= 0.0) {
                return Err(format!("link `{}`: bandwidth must be positive and latency not negative", l.name));
            }
        }
        if m.links.last().is_some_and(|l| l.ranks_per_group != 0) {
            return Err("the last (slowest) link must have ranks_per_group = 0 (it reaches every rank)".into());
        }
        Ok(m)
    }

    /// The bundled H100 model.
    pub fn h100() -> DeviceModel {
        DeviceModel::from_toml(H100_TOML).expect("the bundled device file is valid")
    }

    /// The link a group of `size` ranks spaced `stride` apart communicates over.
    pub fn link_for(&self, size: usize, stride: usize) -> &Link {
        let span = size.saturating_mul(stride);
        self.links
            .iter()
            .find(|l| l.ranks_per_group == 0 || span <= l.ranks_per_group)
            .unwrap_or(self.links.last().expect("validated"))
    }
}

/// A collective's kind, for the cost model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CollectiveKind {
    AllReduce,
    AllGather,
    ReduceScatter,
    AllToAll,
}

impl std::fmt::Display for CollectiveKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

impl CollectiveKind {
    /// The op's name (`all_reduce`, ...).
    pub fn name(self) -> &'static str {
        match self {
            CollectiveKind::AllReduce => "all_reduce",
            CollectiveKind::AllGather => "all_gather",
            CollectiveKind::ReduceScatter => "reduce_scatter",
            CollectiveKind::AllToAll => "all_to_all",
        }
    }

    /// How many times the full tensor crosses a rank's link, per (n-1)/n: 2 for all_reduce.
    fn passes(self) -> f64 {
        match self {
            CollectiveKind::AllReduce => 2.0,
            _ => 1.0,
        }
    }

    /// Communication volume in elements as ZeRO counts it, for a tensor of `elements`.
    pub fn volume(self, elements: f64) -> f64 {
        self.passes() * elements
    }
}

/// Seconds for one ring collective over `size` ranks spaced `stride` apart, on a tensor whose
/// full (unsharded over this group) size is `bytes`.
pub fn collective_seconds(device: &DeviceModel, kind: CollectiveKind, bytes: f64, size: usize, stride: usize) -> f64 {
    if size <= 1 {
        return 0.0;
    }
    let link = device.link_for(size, stride);
    let n = size as f64;
    let steps = kind.passes() * (n - 1.0);
    steps * link.latency + kind.passes() * (n - 1.0) / n * bytes / link.bandwidth
}

/// Roofline seconds for `flops` of compute touching `bytes` of memory.
pub fn compute_seconds(device: &DeviceModel, flops: f64, bytes: f64, bf16: bool) -> f64 {
    let peak = if bf16 { device.flops_bf16 } else { device.flops_f32 };
    (flops / peak).max(bytes / device.memory_bandwidth)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_model_parses_and_picks_links() {
        let d = DeviceModel::h100();
        assert_eq!(d.link_for(8, 1).name, "nvlink"); // tp=8 inside a node
        assert_eq!(d.link_for(4, 2).name, "nvlink"); // dp=4 over tp=2: 8 consecutive ranks
        assert_eq!(d.link_for(64, 8).name, "infiniband"); // dp=64 over tp=8
    }

    #[test]
    fn ring_costs_follow_the_alpha_beta_model() {
        let d = DeviceModel::h100();
        // 1 GB all-reduce over 8 NVLink ranks: 2 * 7/8 * 1e9 / 450e9 s + 14 * 5 us.
        let t = collective_seconds(&d, CollectiveKind::AllReduce, 1e9, 8, 1);
        assert!((t - (2.0 * 7.0 / 8.0 * 1e9 / 450e9 + 14.0 * 5e-6)).abs() < 1e-12);
        let g = collective_seconds(&d, CollectiveKind::AllGather, 1e9, 8, 1);
        assert!((t - 2.0 * g).abs() < 1e-12, "an all-reduce costs a reduce-scatter plus an all-gather");
        assert_eq!(collective_seconds(&d, CollectiveKind::AllReduce, 1e9, 1, 1), 0.0);
        assert_eq!(CollectiveKind::AllReduce.volume(10.0), 20.0);
    }

    #[test]
    fn bad_device_files_are_explained() {
        assert!(DeviceModel::from_toml("name = \"x\"").unwrap_err().contains("flops_bf16"));
        let no_links = "name='x'\nflops_bf16=1.0\nflops_f32=1.0\nmemory_bandwidth=1.0\nmemory_bytes=1.0\nlinks=[]";
        assert!(DeviceModel::from_toml(no_links).unwrap_err().contains("links"));
    }
}
