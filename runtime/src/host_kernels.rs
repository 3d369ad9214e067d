//! Host kernels: the shared library codegen's host lowering makes (`shardc_codegen::lower_host`),
//! loaded with dlopen and called over ranges of work items on this process's threads.
//!
//! ABI (`shardc_codegen::mlir`): each kernel `NAME(lo, hi, buffers...)` also has MLIR's packed
//! entry point `_mlir_NAME(void **args)`, where `args[0]` and `args[1]` point to the i64 bounds
//! and `args[2 + k]` to the k-th buffer pointer (operands, then results, flat row-major arrays
//! in each value's dtype). The runtime calls the packed form, so one call path serves kernels
//! of any arity.

use std::collections::HashMap;
use std::ffi::c_void;

/// Why a host kernel library could not be used.
#[derive(Debug, thiserror::Error)]
pub enum HostKernelError {
    #[error("cannot write the host kernel library to {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("cannot load the host kernel library: {0}")]
    Load(String),
    #[error("the host kernel library has no kernel `{0}` (was it built from this program?)")]
    Missing(String),
    #[error("kernel `{name}` takes {expected} buffers, {found} given")]
    Arity { name: String, expected: usize, found: usize },
}

type Packed = unsafe extern "C" fn(*mut *mut c_void);

/// A loaded host kernel library.
pub struct HostKernels {
    _lib: libloading::Library,
    kernels: HashMap<String, (Packed, usize)>,
}

impl HostKernels {
    /// Loads a library's bytes; `kernels` lists each kernel's name and number of buffers.
    pub fn load(so: &[u8], kernels: &[(&str, usize)]) -> Result<Self, HostKernelError> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "shardc-host-kernels-{}-{}.so",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, so)
            .map_err(|source| HostKernelError::Write { path: path.display().to_string(), source })?;
        // SAFETY: the library is codegen's output: no initialisers beyond the C runtime's.
        let lib = unsafe { libloading::Library::new(&path) };
        let _ = std::fs::remove_file(&path);
        let lib = lib.map_err(|e| HostKernelError::Load(e.to_string()))?;
        let mut table = HashMap::new();
        for &(name, buffers) in kernels {
            let symbol = format!("_mlir_{name}");
            // SAFETY: every `_mlir_` entry point has the packed signature.
            let f: Packed = unsafe {
                *lib.get::<Packed>(symbol.as_bytes()).map_err(|_| HostKernelError::Missing(name.to_string()))?
            };
            table.insert(name.to_string(), (f, buffers));
        }
        Ok(HostKernels { _lib: lib, kernels: table })
    }

    /// No kernels (a program without `fused` nodes).
    pub fn empty() -> Self {
        let lib = libloading::os::unix::Library::this().into();
        HostKernels { _lib: lib, kernels: HashMap::new() }
    }

    /// Runs work items `lo..hi` of kernel `name` on the calling thread.
    ///
    /// # Safety
    /// Each buffer must point to a live array of the size and dtype the kernel was compiled for;
    /// result buffers must not alias operands that other work items read.
    pub unsafe fn call(&self, name: &str, lo: usize, hi: usize, buffers: &[*mut u8]) -> Result<(), HostKernelError> {
        let &(f, n) = self.kernels.get(name).ok_or_else(|| HostKernelError::Missing(name.to_string()))?;
        if buffers.len() != n {
            return Err(HostKernelError::Arity { name: name.to_string(), expected: n, found: buffers.len() });
        }
        let (mut lo, mut hi) = (lo as i64, hi as i64);
        let mut ptrs: Vec<*mut u8> = buffers.to_vec();
        let mut args: Vec<*mut c_void> = Vec::with_capacity(2 + n);
        args.push(&mut lo as *mut i64 as *mut c_void);
        args.push(&mut hi as *mut i64 as *mut c_void);
        for p in ptrs.iter_mut() {
            args.push(p as *mut *mut u8 as *mut c_void);
        }
        // SAFETY: the packed entry point reads exactly 2 + n argument pointers.
        unsafe { f(args.as_mut_ptr()) };
        Ok(())
    }

    /// Runs work items `0..work_items` split evenly over `threads` threads.
    ///
    /// # Safety
    /// As for [`HostKernels::call`].
    pub unsafe fn run(
        &self,
        name: &str,
        work_items: usize,
        buffers: &[*mut u8],
        threads: usize,
    ) -> Result<(), HostKernelError> {
        let threads = threads.clamp(1, work_items.max(1));
        if threads == 1 {
            return unsafe { self.call(name, 0, work_items, buffers) };
        }
        struct Ptrs(Vec<*mut u8>);
        // SAFETY: work items write disjoint elements (the kernel ABI), so sharing is sound.
        unsafe impl Sync for Ptrs {}
        let ptrs = Ptrs(buffers.to_vec());
        let per = work_items.div_ceil(threads);
        // On rayon's persistent pool: a thread spawned per launch costs tens of microseconds,
        // as much as a small kernel.
        use rayon::prelude::*;
        (0..threads).into_par_iter().try_for_each(|t| {
            let ptrs = &ptrs;
            let (lo, hi) = (t * per, ((t + 1) * per).min(work_items));
            unsafe { self.call(name, lo, hi, &ptrs.0) }
        })
    }
}
