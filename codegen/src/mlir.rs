//! The two lowerings of a kernel description (MLIR text of one `func.func` holding an
//! `scf.parallel` over static-shape memrefs): to PTX for an NVIDIA architecture and to host
//! object code. The pipelines are the ones `../shared/TOOLCHAIN.md` records as working with
//! LLVM/MLIR 22 and melior 0.27.8.
//!
//! Kernel ABI, the same on both targets: `NAME(lo: index, hi: index, buffers...)`, where the
//! kernel computes work items `lo..hi` of its parallel loop and each buffer is a bare pointer
//! (`use-bare-ptr-memref-call-conv`): no memref descriptors. On the GPU the outlined kernel takes
//! exactly the function's arguments in that order and is launched with `block = [TILE, 1, 1]`,
//! `grid = [ceil((hi - lo) / TILE), 1, 1]`. On the host the runtime splits `lo..hi` over its
//! threads and calls the function once per piece.

use melior::dialect::DialectRegistry;
use melior::ir::attribute::{ArrayAttribute, AttributeLike};
use melior::ir::operation::{OperationLike, OperationMutLike, WalkOrder, WalkResult};
use melior::ir::{BlockLike, Module};
use melior::pass::PassManager;
use melior::utility::{
    parse_pass_pipeline, register_all_dialects, register_all_llvm_translations, register_all_passes,
};
use melior::{Context, ExecutionEngine};
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// Threads per block of every generated GPU kernel (work items per block).
pub const GPU_TILE: usize = 128;

/// The GPU architectures every kernel is lowered for, with the PTX ISA they need.
pub const GPU_ARCHS: [(&str, &str); 2] = [("sm_80", "+ptx80"), ("sm_90", "+ptx80")];

/// Why a lowering failed; the caller adds the kernel's name and fused ops.
#[derive(Debug, thiserror::Error)]
pub enum LowerError {
    #[error("MLIR did not parse the kernel description:\n{0}")]
    Parse(String),
    #[error("the pass pipeline `{pipeline}` failed:\n{diagnostics}")]
    Pipeline { pipeline: String, diagnostics: String },
    #[error("the {target} lowering produced no {what}; expected kernel `{kernel}`")]
    Missing { target: String, what: String, kernel: String },
    #[error("libdevice.10.bc not found (looked in {0}); run scripts/setup.sh, or set SHARDC_LIBDEVICE to the file")]
    NoLibdevice(String),
    #[error("the PTX of `{kernel}` calls `{symbol}`, which nothing defines (is libdevice linked?)")]
    UnresolvedExtern { kernel: String, symbol: String },
    #[error("linking the host object into a shared library failed: {0}")]
    Link(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A context with every dialect, pass and LLVM translation registered (about 10 ms to make),
/// collecting the diagnostics MLIR emits so that errors can show them.
pub struct Mlir {
    context: Context,
    diagnostics: Rc<RefCell<Vec<String>>>,
}

impl Default for Mlir {
    fn default() -> Self {
        Self::new()
    }
}

impl Mlir {
    pub fn new() -> Self {
        let registry = DialectRegistry::new();
        register_all_dialects(&registry);
        register_all_passes();
        let context = Context::new_with_registry(&registry, false);
        context.load_all_available_dialects();
        register_all_llvm_translations(&context);
        let diagnostics: Rc<RefCell<Vec<String>>> = Rc::default();
        let sink = diagnostics.clone();
        context.attach_diagnostic_handler(move |d| {
            sink.borrow_mut().push(format!("{}: {}", d.location(), d));
            true
        });
        Mlir { context, diagnostics }
    }

    fn parse(&self, text: &str) -> Result<Module<'_>, LowerError> {
        self.diagnostics.borrow_mut().clear();
        Module::parse(&self.context, text).ok_or_else(|| LowerError::Parse(self.take_diagnostics()))
    }

    fn take_diagnostics(&self) -> String {
        let d = std::mem::take(&mut *self.diagnostics.borrow_mut());
        if d.is_empty() {
            "(MLIR reported nothing more)".into()
        } else {
            d.join("\n")
        }
    }

    fn run(&self, module: &mut Module, pipeline: &str) -> Result<(), LowerError> {
        let pm = PassManager::new(&self.context);
        let fail =
            |m: &Self| LowerError::Pipeline { pipeline: pipeline.to_string(), diagnostics: m.take_diagnostics() };
        parse_pass_pipeline(pm.as_operation_pass_manager(), pipeline)
            .map_err(|e| LowerError::Pipeline { pipeline: pipeline.to_string(), diagnostics: e.to_string() })?;
        pm.run(module).map_err(|_| fail(self))
    }

    /// PTX for `chip` (e.g. `sm_90`) of the description's kernel `name`, libdevice linked.
    pub fn lower_ptx(
        &self,
        description: &str,
        name: &str,
        chip: &str,
        features: &str,
        libdevice: &Path,
    ) -> Result<String, LowerError> {
        let mut module = self.parse(description)?;
        let outline = format!(
            "builtin.module(func.func(scf-parallel-loop-tiling{{parallel-loop-tile-sizes={GPU_TILE} \
             no-min-max-bounds=true}},gpu-map-parallel-loops,convert-parallel-loops-to-gpu,canonicalize,\
             gpu-launch-sink-index-computations),gpu-kernel-outlining)"
        );
        self.run(&mut module, &outline)?;
        // Outlining records the block size as `known_block_size`, which becomes `.maxntid 128`;
        // ptxas then aims at full occupancy (2048 threads per SM: 32 registers) and spills the
        // row kernels on sm_80. The runtime launches blocks of GPU_TILE anyway: drop the hint.
        module.as_operation_mut().walk_mut(WalkOrder::PreOrder, |mut op| {
            if op.name().as_string_ref().as_str().ok() == Some("gpu.func") {
                let _ = op.remove_attribute("known_block_size");
            }
            WalkResult::Advance
        });
        let pipeline = format!(
            "builtin.module(lower-affine,canonicalize,cse,\
             nvvm-attach-target{{chip={chip} features={features} O=3 l={}}},gpu.module(convert-scf-to-cf,\
             convert-gpu-to-nvvm{{use-bare-ptr-memref-call-conv=1}},canonicalize,cse),\
             reconcile-unrealized-casts,gpu-module-to-binary{{format=isa}})",
            libdevice.display()
        );
        self.run(&mut module, &pipeline)?;
        let missing = |what: &str| LowerError::Missing {
            target: chip.to_string(),
            what: what.to_string(),
            kernel: name.to_string(),
        };
        let mut ptx = None;
        let body = module.body();
        let mut op = body.first_operation();
        while let Some(o) = op {
            if o.name().as_string_ref().as_str().ok() == Some("gpu.binary") {
                let objects: ArrayAttribute =
                    o.attribute("objects").ok().and_then(|a| a.try_into().ok()).ok_or_else(|| missing("GPU object"))?;
                let object = objects.element(0).map_err(|_| missing("GPU object"))?;
                let text =
                    unsafe { melior::StringRef::from_raw(mlir_sys::mlirGPUObjectAttrGetObject(object.to_raw())) };
                ptx = Some(text.as_str().map_err(|_| missing("UTF-8 PTX"))?.to_string());
            }
            op = o.next_in_block();
        }
        let ptx = ptx.ok_or_else(|| missing("gpu.binary"))?;
        // The pass pipeline leaves a parallel loop it could not map on the host side, silently:
        // the kernel must be in the PTX under its name.
        if !ptx.contains(&format!(".entry {name}_kernel(")) {
            return Err(missing(&format!(".entry {name}_kernel")));
        }
        if let Some(symbol) = unresolved_extern(&ptx) {
            return Err(LowerError::UnresolvedExtern { kernel: name.to_string(), symbol });
        }
        Ok(ptx)
    }

    /// Relocatable host object code (x86_64 ELF, position-independent, for this machine's CPU)
    /// of every kernel in the description, with the C symbol `NAME` per kernel.
    pub fn lower_host_object(&self, description: &str, names: &[&str]) -> Result<Vec<u8>, LowerError> {
        let mut module = self.parse(description)?;
        let pipeline = "builtin.module(func.func(canonicalize),expand-strided-metadata,finalize-memref-to-llvm,\
             convert-scf-to-cf,convert-math-to-llvm,convert-math-to-libm,convert-arith-to-llvm,convert-cf-to-llvm,\
             convert-func-to-llvm{use-bare-ptr-memref-call-conv=1},reconcile-unrealized-casts)";
        self.run(&mut module, pipeline)?;
        let engine = ExecutionEngine::new(&module, 3, &[], true, true);
        for name in names {
            if engine.lookup(name).is_null() {
                return Err(LowerError::Missing {
                    target: "host".into(),
                    what: "symbol".into(),
                    kernel: name.to_string(),
                });
            }
        }
        let dir = tempdir()?;
        let path = dir.join("kernels.o");
        engine.dump_to_object_file(path.to_str().expect("temp paths are UTF-8"));
        let object = std::fs::read(&path)?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(object)
    }
}

/// A shared library from host object code (`cc -shared`), which the runtime loads with dlopen.
pub fn link_shared(object: &[u8]) -> Result<Vec<u8>, LowerError> {
    let dir = tempdir()?;
    let (o, so) = (dir.join("kernels.o"), dir.join("kernels.so"));
    std::fs::write(&o, object)?;
    let out = std::process::Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .arg("-shared")
        .arg("-o")
        .arg(&so)
        .arg(&o)
        .arg("-lm")
        .output()
        .map_err(|e| LowerError::Link(format!("could not run `cc` ({e}); install gcc (scripts/setup.sh does)")))?;
    if !out.status.success() {
        return Err(LowerError::Link(String::from_utf8_lossy(&out.stderr).into_owned()));
    }
    let bytes = std::fs::read(&so)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(bytes)
}

fn tempdir() -> std::io::Result<PathBuf> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "shardc-codegen-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The first `.extern .func` the PTX declares: a call nothing in the module defines.
fn unresolved_extern(ptx: &str) -> Option<String> {
    ptx.lines().find_map(|l| {
        let rest = l.trim_start().strip_prefix(".extern .func")?;
        let name =
            rest.split(|c: char| c == '(' || c.is_whitespace()).find(|s| !s.is_empty() && !s.starts_with('.'))?;
        Some(name.to_string())
    })
}

/// Where libdevice is: `SHARDC_LIBDEVICE`, the toolchain folder the setup script fills
/// (`SHARDC_TOOLCHAIN`, or `toolchain/` beside the executable's target folder), then CUDA's.
pub fn find_libdevice() -> Result<PathBuf, LowerError> {
    let mut tried = Vec::new();
    if let Ok(p) = std::env::var("SHARDC_LIBDEVICE") {
        return Ok(PathBuf::from(p));
    }
    let mut candidates: Vec<PathBuf> =
        toolchain_dirs().into_iter().map(|d| d.join("py/nvidia/cu13/nvvm/libdevice/libdevice.10.bc")).collect();
    candidates.push("/usr/local/cuda/nvvm/libdevice/libdevice.10.bc".into());
    for c in candidates {
        if c.is_file() {
            return Ok(c);
        }
        tried.push(c.display().to_string());
    }
    Err(LowerError::NoLibdevice(tried.join(", ")))
}

/// `ptxas` from the toolchain folder or CUDA, if any (PTX is only assembled to check it).
pub fn find_ptxas() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("SHARDC_PTXAS") {
        return Some(PathBuf::from(p));
    }
    let mut candidates: Vec<PathBuf> =
        toolchain_dirs().into_iter().map(|d| d.join("py/nvidia/cu13/bin/ptxas")).collect();
    candidates.push("/usr/local/cuda/bin/ptxas".into());
    candidates.into_iter().find(|c| c.is_file())
}

fn toolchain_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(d) = std::env::var("SHARDC_TOOLCHAIN") {
        dirs.push(PathBuf::from(d));
    }
    if let Ok(exe) = std::env::current_exe() {
        // target/<profile>/shardc, target/<profile>/deps/test-binary
        for up in exe.ancestors().skip(1).take(3) {
            dirs.push(up.join("toolchain"));
        }
    }
    dirs
}
