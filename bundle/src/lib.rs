//! The compiled step's file format (`step.shardc`): what `shardc-codegen` writes and
//! `shardc-runtime` reads.
//!
//! A bundle holds the per-rank program (one SPMD step graph; its signature says what every
//! argument and result is), the kernels (their target-independent MLIR description, PTX per GPU
//! architecture, host object code), the buffer plan, the plan JSON, the model (name and config)
//! and the compiler's version. Running it needs no compiler and no source model.
//!
//! On disk (all integers little-endian):
//! ```text
//! magic        8 bytes   "SHARDCB\0"
//! version      u32       FORMAT_VERSION
//! header_len   u64
//! header       JSON      Header: metadata, program, section table (name, length, SHA-256)
//! sections     bytes     each section's bytes, in table order (kernel blobs)
//! checksum     32 bytes  SHA-256 of everything before it
//! ```
//! Reading checks the magic, the version, every length against the file, the whole-file
//! checksum, every section's checksum and the program's invariants (`shardc_ir::verify`):
//! a truncated, corrupted (any flipped byte), wrong-version or malformed file is an error that
//! says which, never a panic and never a program run on bad data. Writing is atomic (a temporary
//! file in the same directory, synced, then renamed).
//!
//! Architecture Invariant: this crate depends only on `shardc-ir`; it knows nothing of MLIR,
//! CUDA or how a bundle is executed.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shardc_ir::Graph;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The on-disk format's version; readers refuse other versions.
pub const FORMAT_VERSION: u32 = 2;
/// The file's first bytes.
pub const MAGIC: &[u8; 8] = b"SHARDCB\0";

/// The model a bundle was compiled from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The graph's name (`gpt2_4l_128d`).
    pub name: String,
    /// The Hugging Face `config.json` text, for models imported from one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_json: Option<String>,
}

/// One buffer of the static arena: which value lives where, and when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BufferSlot {
    pub value: shardc_ir::ValueId,
    pub offset: u64,
    pub bytes: u64,
    /// Node indices of its definition and last use.
    pub first: u32,
    pub last: u32,
}

/// The memory planner's result for one rank: a slot per value that has storage (values
/// sharing storage, such as views and in-place results, have slots at the same offset).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryPlan {
    pub arena_bytes: u64,
    pub slots: Vec<BufferSlot>,
    /// `update` results not written in place: (result, argument) pairs the runtime copies into
    /// the argument's storage at the end of the step.
    #[serde(default)]
    pub copy_back: Vec<(shardc_ir::ValueId, shardc_ir::ValueId)>,
}

/// What a kernel's code is, for the runtime that loads it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlobKind {
    /// The target-independent MLIR description (text).
    Mlir,
    /// PTX for one GPU architecture (`sm_80`, `sm_90`).
    Ptx { arch: String },
    /// Host machine code (a shared object) and the symbol to call.
    HostObject { symbol: String },
}

/// One kernel and where its code is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Kernel {
    pub name: String,
    /// Node indices of the program this kernel computes.
    pub nodes: Vec<u32>,
    /// Section indices holding its code.
    pub blobs: Vec<(BlobKind, u32)>,
    /// The fused ops, in order (what `shardc inspect` lists).
    #[serde(default)]
    pub ops: Vec<String>,
    /// Work items of its parallel loop (the host splits them over threads; the GPU launches
    /// `ceil(work_items / block)` blocks).
    #[serde(default)]
    pub work_items: u64,
}

/// The machine the host code was compiled for: a runtime refuses host code that needs CPU
/// features its machine lacks (the code would stop with an illegal instruction).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostTarget {
    /// `std::env::consts::ARCH` of the compiling machine.
    pub arch: String,
    /// The vector and matrix features (`avx2`, `fma`, `avx512f`, ...) of the compiling CPU
    /// that generated code may use.
    pub features: Vec<String>,
}

/// CPU features generated host code may use, as `/proc/cpuinfo` names them.
const VECTOR_FEATURES: &[&str] = &[
    "sse4_1",
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512dq",
    "avx512bw",
    "avx512vl",
    "avx512cd",
    "avx512_bf16",
    "avx512_fp16",
    "avx512vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
];

impl HostTarget {
    /// This machine: its architecture and the vector features its CPU reports.
    pub fn current() -> HostTarget {
        let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let have: std::collections::BTreeSet<&str> =
            flags.lines().find(|l| l.starts_with("flags")).map(|l| l.split_whitespace().collect()).unwrap_or_default();
        HostTarget {
            arch: std::env::consts::ARCH.to_string(),
            features: VECTOR_FEATURES.iter().filter(|f| have.contains(*f)).map(|f| f.to_string()).collect(),
        }
    }

    /// What `self` (where the code was compiled) needs that `here` lacks, or `None` when code
    /// compiled for `self` runs `here`.
    pub fn missing_on(&self, here: &HostTarget) -> Option<String> {
        if self.arch != here.arch {
            return Some(format!("it was compiled for {}, this machine is {}", self.arch, here.arch));
        }
        let missing: Vec<&str> =
            self.features.iter().filter(|f| !here.features.contains(f)).map(String::as_str).collect();
        (!missing.is_empty()).then(|| format!("it may use CPU features this machine lacks: {}", missing.join(", ")))
    }
}

/// Everything in a bundle but the section bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// `shardc` version that wrote it.
    pub compiler_version: String,
    pub model: ModelInfo,
    /// The per-rank step (one SPMD program over its mesh).
    pub program: Graph,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_plan: Option<MemoryPlan>,
    #[serde(default)]
    pub kernels: Vec<Kernel>,
    /// What the host code (when there is some) was compiled for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_target: Option<HostTarget>,
    /// `shardc plan --format json` of this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_json: Option<serde_json::Value>,
    /// The section table.
    #[serde(default)]
    pub sections: Vec<SectionInfo>,
}

/// One section's table entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SectionInfo {
    pub name: String,
    pub len: u64,
    /// Lower-case hex SHA-256 of the section's bytes.
    pub sha256: String,
}

/// A bundle in memory: the header and the sections' bytes (in table order).
#[derive(Clone, Debug, PartialEq)]
pub struct Bundle {
    pub header: Header,
    pub sections: Vec<Vec<u8>>,
}

/// Why bytes are not a bundle this reader can use.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("not a shardc bundle (it does not start with the bundle magic)")]
    NotABundle,
    #[error("bundle format version {found}; this shardc reads version {FORMAT_VERSION} (recompile with this shardc)")]
    Version { found: u32 },
    #[error("the bundle is truncated: {what} needs {need} bytes but {have} remain")]
    Truncated { what: &'static str, need: u64, have: u64 },
    #[error("the bundle is corrupted: its checksum does not match its contents")]
    Checksum,
    #[error("the bundle is corrupted: section `{0}` does not match its checksum")]
    SectionChecksum(String),
    #[error("the bundle's header is malformed: {0}")]
    Header(String),
    #[error("the bundle's program does not verify:\n{0}")]
    Program(String),
    #[error("{}: {source}", .path.display())]
    Io { path: PathBuf, source: std::io::Error },
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Bundle {
    /// A bundle of `program` with no kernels or sections yet.
    pub fn new(compiler_version: &str, model: ModelInfo, program: Graph) -> Bundle {
        Bundle {
            header: Header {
                compiler_version: compiler_version.to_string(),
                model,
                program,
                memory_plan: None,
                kernels: Vec::new(),
                host_target: None,
                plan_json: None,
                sections: Vec::new(),
            },
            sections: Vec::new(),
        }
    }

    /// Adds a section; returns its index (what [`Kernel::blobs`] refers to).
    pub fn add_section(&mut self, name: &str, bytes: Vec<u8>) -> u32 {
        self.header.sections.push(SectionInfo {
            name: name.to_string(),
            len: bytes.len() as u64,
            sha256: hex(&Sha256::digest(&bytes)),
        });
        self.sections.push(bytes);
        (self.sections.len() - 1) as u32
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let header = serde_json::to_vec(&self.header).expect("the header serializes");
        let mut out = Vec::with_capacity(header.len() + self.sections.iter().map(Vec::len).sum::<usize>() + 64);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(header.len() as u64).to_le_bytes());
        out.extend_from_slice(&header);
        for s in &self.sections {
            out.extend_from_slice(s);
        }
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        out
    }

    /// Reads and checks a bundle's bytes (see the crate doc).
    pub fn from_bytes(bytes: &[u8]) -> Result<Bundle, BundleError> {
        if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            return Err(BundleError::NotABundle);
        }
        let mut at = MAGIC.len();
        let take = |at: &mut usize, n: u64, what: &'static str| -> Result<&[u8], BundleError> {
            let have = (bytes.len() - *at) as u64;
            if n > have {
                return Err(BundleError::Truncated { what, need: n, have });
            }
            let s = &bytes[*at..*at + n as usize];
            *at += n as usize;
            Ok(s)
        };
        let version = u32::from_le_bytes(take(&mut at, 4, "the format version")?.try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            return Err(BundleError::Version { found: version });
        }
        if bytes.len() < at + 8 + 32 {
            return Err(BundleError::Truncated {
                what: "the header length and checksum",
                need: 40,
                have: (bytes.len() - at) as u64,
            });
        }
        // The whole-file checksum first: any flipped byte anywhere is caught here.
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        if Sha256::digest(body).as_slice() != sum {
            return Err(BundleError::Checksum);
        }
        let header_len = u64::from_le_bytes(take(&mut at, 8, "the header length")?.try_into().expect("8 bytes"));
        let header_bytes = take(&mut at, header_len, "the header")?;
        let header: Header = serde_json::from_slice(header_bytes).map_err(|e| BundleError::Header(e.to_string()))?;
        let mut sections = Vec::new();
        for s in &header.sections {
            let data = take(&mut at, s.len, "a section")?;
            if hex(&Sha256::digest(data)) != s.sha256 {
                return Err(BundleError::SectionChecksum(s.name.clone()));
            }
            sections.push(data.to_vec());
        }
        if at != body.len() {
            return Err(BundleError::Header(format!("{} bytes follow the last section", body.len() - at)));
        }
        for k in &header.kernels {
            if let Some((_, i)) = k.blobs.iter().find(|(_, i)| *i as usize >= sections.len()) {
                return Err(BundleError::Header(format!(
                    "kernel `{}` refers to section {i}, which does not exist",
                    k.name
                )));
            }
        }
        shardc_ir::verify::verify(&header.program).map_err(|e| BundleError::Program(e.to_string()))?;
        Ok(Bundle { header, sections })
    }

    /// Writes the bundle to `path` atomically: a temporary file beside it, synced, then renamed.
    pub fn write(&self, path: &Path) -> Result<(), BundleError> {
        let io = |source| BundleError::Io { path: path.to_path_buf(), source };
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&self.to_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(io)
    }

    /// Reads and checks the bundle at `path`.
    pub fn read(path: &Path) -> Result<Bundle, BundleError> {
        let bytes = std::fs::read(path).map_err(|source| BundleError::Io { path: path.to_path_buf(), source })?;
        Bundle::from_bytes(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Bundle {
        let g = shardc_ir::text::parse(
            "graph g\nparam %w: f32[2]\ninput %x: f32[2]\n%y: f32[2] = mul(%w, %x)\n%l: f32[] = reduce_sum(%y) {dims = [0]}\noutput %l [loss]\n",
        )
        .unwrap();
        let mut b = Bundle::new("0.1.0", ModelInfo { name: "g".into(), config_json: None }, g);
        let s = b.add_section("mul.mlir", b"func.func @mul() { return }".to_vec());
        b.header.kernels.push(Kernel {
            name: "mul".into(),
            nodes: vec![0],
            blobs: vec![(BlobKind::Mlir, s)],
            ops: vec!["mul".into()],
            work_items: 1,
        });
        b
    }

    #[test]
    fn round_trips() {
        let b = sample();
        assert_eq!(Bundle::from_bytes(&b.to_bytes()).unwrap(), b);
    }

    #[test]
    fn every_flipped_byte_and_every_truncation_is_an_error() {
        let bytes = sample().to_bytes();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(Bundle::from_bytes(&bad).is_err(), "byte {i} flipped was not noticed");
        }
        for n in 0..bytes.len() {
            assert!(Bundle::from_bytes(&bytes[..n]).is_err(), "truncated to {n} bytes was not noticed");
        }
    }

    #[test]
    fn errors_say_which() {
        let mut bytes = sample().to_bytes();
        bytes[8] = 9;
        assert!(Bundle::from_bytes(&bytes).unwrap_err().to_string().contains("version 9"));
        assert!(matches!(Bundle::from_bytes(b"PK\x03\x04"), Err(BundleError::NotABundle)));
        let mut bytes = sample().to_bytes();
        let n = bytes.len();
        bytes[n - 40] ^= 1;
        assert!(matches!(Bundle::from_bytes(&bytes), Err(BundleError::Checksum)));
    }

    #[test]
    fn writes_atomically() {
        let dir = std::env::temp_dir().join(format!("shardc-bundle-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("step.shardc");
        sample().write(&path).unwrap();
        assert_eq!(Bundle::read(&path).unwrap(), sample());
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 1, "no temporary file is left behind: {left:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
