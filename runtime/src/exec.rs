//! The host executor: runs a compiled per-rank program on every rank of its mesh, one thread
//! per rank, every value in the memory plan's arena (one allocation per rank, made once).
//!
//! What runs where: `fused` nodes call codegen's host kernels ([`HostKernels`]); `matmul` is a
//! GEMM (the `gemm` crate, on the rank's threads); collectives go through the in-process
//! communicator ([`InProcess`]); `reshape` and `identity` are views (the planner gives them
//! their operand's bytes); `transpose`, `take_shard`, `concat` and `split` are copies;
//! embedding lookups and their gradients, norm weight gradients and reductions that are not
//! row statistics run as host code ([`crate::native`], f32); what remains (integer masks,
//! constants, other dtypes: a few nodes per step) runs through the reference interpreter's
//! kernel for that op ([`shardc_ir::interp::eval_node`]), reading and writing the arena, and
//! is counted as such in [`ExecStats`].
//!
//! Safety: operands and results are byte ranges of one arena. Rust code only touches them
//! through safe slices split at disjoint ranges (a plan that overlaps a node's operand and
//! result where that is not allowed is refused when the executor is made); generated kernels
//! get raw pointers, as their ABI says.

use crate::comm::{CommError, InProcess};
use crate::host_kernels::{HostKernelError, HostKernels};
use crate::matmul::MatMul;
use shardc_ir::{DType, Data, Graph, Node, Op, Tensor, TensorType, ValueId};
use std::collections::HashMap;
use std::ops::Range;
use std::time::{Duration, Instant};

/// Why the executor could not be made or a step could not run.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("the bundle's memory plan is unusable: {0}")]
    Plan(String),
    #[error("rank {rank}, node {node} (`{op}`): {message}")]
    Node { rank: usize, node: usize, op: String, message: String },
    #[error("rank {rank}: {source}")]
    Comm { rank: usize, source: CommError },
    #[error(transparent)]
    Kernel(#[from] HostKernelError),
    #[error("`%{name}`: {message}")]
    Value { name: String, message: String },
}

/// Where the time of a step went, per rank (for `shardc run --report` and `--trace`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExecStats {
    /// (what, calls, time): `kernel NAME-family`, `gemm`, `collective KIND`, `copy`, `interpreter OP`.
    pub entries: Vec<(String, usize, Duration)>,
    /// The highest arena byte a node of the step wrote (measured, against the plan's size).
    pub arena_high_water_bytes: usize,
    /// With tracing: every node's (name, what, start since the trace's epoch, duration).
    pub events: Vec<(String, String, Duration, Duration)>,
}

impl ExecStats {
    fn add(&mut self, what: &str, t: Duration) {
        match self.entries.iter_mut().find(|e| e.0 == what) {
            Some(e) => {
                e.1 += 1;
                e.2 += t;
            }
            None => self.entries.push((what.to_string(), 1, t)),
        }
    }
}

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// One rank's memory: the planned arena, 64-byte aligned.
pub struct Arena {
    lines: Vec<Line>,
}

impl Arena {
    fn new(bytes: usize) -> Self {
        Arena { lines: vec![Line([0; 64]); bytes.div_ceil(64)] }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `Line` is 64 plain bytes with no padding; the slice covers exactly the Vec.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const u8, self.lines.len() * 64) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `bytes`, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut u8, self.lines.len() * 64) }
    }
}

/// A read-only range and a disjoint writable range of one buffer.
fn split(buf: &mut [u8], src: Range<usize>, dst: Range<usize>) -> Option<(&[u8], &mut [u8])> {
    if src.start >= dst.end {
        let (lo, hi) = buf.split_at_mut(src.start);
        Some((&hi[..src.len()], &mut lo[dst]))
    } else if dst.start >= src.end {
        let (lo, hi) = buf.split_at_mut(dst.start);
        Some((&lo[src], &mut hi[..dst.len()]))
    } else {
        None
    }
}

fn elem(d: DType) -> usize {
    d.size_bytes()
}

/// A value's bytes as a host tensor (bf16/f16 widened to f32, integers to i64).
pub fn decode(ty: &TensorType, b: &[u8]) -> Tensor {
    let data = match ty.dtype {
        DType::F32 => Data::F32(b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()),
        DType::Bf16 => Data::F32(
            b.chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes(c.try_into().unwrap())).to_f32())
                .collect(),
        ),
        DType::F16 => Data::F32(
            b.chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes(c.try_into().unwrap())).to_f32())
                .collect(),
        ),
        DType::I32 => Data::I64(b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64).collect()),
        DType::I64 => Data::I64(b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()),
    };
    Tensor { dtype: ty.dtype, shape: ty.shape.clone(), data }
}

/// Writes a host tensor into a value's bytes, in the value's dtype.
pub fn encode(ty: &TensorType, t: &Tensor, out: &mut [u8]) -> Result<(), String> {
    if t.shape != ty.shape || t.data.len() != ty.numel() {
        return Err(format!("expected {ty}, got {}", t.ty()));
    }
    let floats = |f: &mut dyn FnMut(usize, f64)| match &t.data {
        Data::F32(v) => v.iter().enumerate().for_each(|(i, &x)| f(i, x as f64)),
        Data::F64(v) => v.iter().enumerate().for_each(|(i, &x)| f(i, x)),
        Data::I64(v) => v.iter().enumerate().for_each(|(i, &x)| f(i, x as f64)),
    };
    match ty.dtype {
        DType::F32 => floats(&mut |i, x| out[4 * i..4 * i + 4].copy_from_slice(&(x as f32).to_le_bytes())),
        DType::Bf16 => floats(&mut |i, x| {
            out[2 * i..2 * i + 2].copy_from_slice(&half::bf16::from_f32(x as f32).to_bits().to_le_bytes())
        }),
        DType::F16 => floats(&mut |i, x| {
            out[2 * i..2 * i + 2].copy_from_slice(&half::f16::from_f32(x as f32).to_bits().to_le_bytes())
        }),
        DType::I32 | DType::I64 => {
            let Data::I64(v) = &t.data else { return Err(format!("expected integers for {ty}")) };
            for (i, &x) in v.iter().enumerate() {
                if ty.dtype == DType::I32 {
                    out[4 * i..4 * i + 4].copy_from_slice(&(x as i32).to_le_bytes());
                } else {
                    out[8 * i..8 * i + 8].copy_from_slice(&x.to_le_bytes());
                }
            }
        }
    }
    Ok(())
}

/// Values of a floating or integer buffer as f64 (for reductions across ranks).
fn to_f64(d: DType, b: &[u8]) -> Vec<f64> {
    match decode(&TensorType { dtype: d, shape: vec![b.len() / elem(d)] }, b).data {
        Data::F32(v) => v.into_iter().map(|x| x as f64).collect(),
        Data::F64(v) => v,
        Data::I64(v) => v.into_iter().map(|x| x as f64).collect(),
    }
}

/// f64 sums back into a buffer of dtype `d`, rounded as the interpreter rounds (to f32, then
/// to the dtype).
fn from_f64(d: DType, v: &[f64], out: &mut [u8]) {
    let ty = TensorType { dtype: d, shape: vec![v.len()] };
    let t = if d.is_float() {
        Tensor { dtype: d, shape: ty.shape.clone(), data: Data::F32(v.iter().map(|&x| x as f32).collect()) }
    } else {
        Tensor { dtype: d, shape: ty.shape.clone(), data: Data::I64(v.iter().map(|&x| x as i64).collect()) }
    };
    encode(&ty, &t, out).expect("sizes match by construction");
}

/// Chunk `k` of `n` along `dim` of a row-major buffer of `shape`, elements of `es` bytes.
fn chunk(b: &[u8], shape: &[usize], es: usize, dim: usize, n: usize, k: usize, out: &mut [u8]) {
    let outer: usize = shape[..dim].iter().product();
    let row = shape[dim..].iter().product::<usize>() * es;
    let piece = row / n;
    for o in 0..outer {
        out[o * piece..(o + 1) * piece].copy_from_slice(&b[o * row + k * piece..o * row + (k + 1) * piece]);
    }
}

/// Concatenation along `dim` of equal parts of `shape` (the gathered result).
fn concat(parts: &[&[u8]], shape: &[usize], es: usize, dim: usize, out: &mut [u8]) {
    let outer: usize = shape[..dim].iter().product();
    let row = shape[dim..].iter().product::<usize>() * es;
    let n = parts.len();
    for o in 0..outer {
        for (p, part) in parts.iter().enumerate() {
            out[(o * n + p) * row..(o * n + p + 1) * row].copy_from_slice(&part[o * row..(o + 1) * row]);
        }
    }
}

/// A per-rank program ready to run: the program, its arena layout and its kernels.
pub struct HostProgram {
    program: Graph,
    offset: Vec<Option<usize>>,
    arena_bytes: usize,
    copy_back: Vec<(ValueId, ValueId)>,
    kernels: HostKernels,
    /// Work items of each kernel.
    work_items: HashMap<String, usize>,
    /// Per node: what `--report` counts its time as, and its name in a trace (made once).
    labels: Vec<(String, String)>,
    /// Per node: run by [`crate::native`] (else, for ops without a case here, the interpreter).
    native: Vec<bool>,
    /// Per `matmul` node: its product's geometry (made once, not every step).
    products: Vec<Option<MatMul>>,
}

impl HostProgram {
    /// `memory` must place every argument and every top-level result of `program`;
    /// `kernels` holds each `fused` node's host function with its work item count in
    /// `work_items`.
    pub fn new(
        program: Graph,
        memory: &shardc_bundle::MemoryPlan,
        kernels: HostKernels,
        work_items: HashMap<String, usize>,
    ) -> Result<Self, ExecError> {
        let arena_bytes = memory.arena_bytes as usize;
        let mut offset = vec![None; program.values.len()];
        for s in &memory.slots {
            let i = s.value.index();
            if i >= offset.len() {
                return Err(ExecError::Plan(format!("a slot names value {i}, which the program does not have")));
            }
            offset[i] = Some(s.offset as usize);
        }
        let need =
            program.args.iter().map(|a| a.value).chain(program.nodes.iter().flat_map(|n| n.outputs.iter().copied()));
        for v in need {
            let off = offset[v.index()]
                .ok_or_else(|| ExecError::Plan(format!("`%{}` has no place in the arena", program.name_of(v))))?;
            if off + program.ty(v).size_bytes() > arena_bytes {
                return Err(ExecError::Plan(format!("`%{}` ends past the arena", program.name_of(v))));
            }
        }
        for n in &program.nodes {
            if n.op == Op::Fused {
                let name = n.attrs.str("kernel").unwrap_or_default();
                if !work_items.contains_key(name) {
                    return Err(ExecError::Plan(format!("kernel `{name}` has no host code in the bundle")));
                }
            }
        }
        // SHARDC_REPORT_KERNELS=1 reports each kernel by name instead of by family.
        let by_name = std::env::var_os("SHARDC_REPORT_KERNELS").is_some();
        let native: Vec<bool> = program.nodes.iter().map(|n| crate::native::handles(&program, n)).collect();
        let labels = program.nodes.iter().zip(&native).map(|(n, &nat)| label(&program, n, by_name, nat)).collect();
        let products = program.nodes.iter().map(|n| (n.op == Op::MatMul).then(|| MatMul::of(&program, n))).collect();
        Ok(HostProgram {
            native,
            products,
            program,
            offset,
            arena_bytes,
            copy_back: memory.copy_back.clone(),
            kernels,
            work_items,
            labels,
        })
    }

    /// The host form of a bundle: its program, memory plan and host library. Refuses a
    /// bundle without them, or whose host code needs CPU features this machine lacks.
    pub fn from_bundle(bundle: &shardc_bundle::Bundle) -> Result<Self, ExecError> {
        let h = &bundle.header;
        let plan = h.memory_plan.as_ref().ok_or_else(|| {
            ExecError::Plan("the bundle has no memory plan (written by an older shardc? recompile it)".into())
        })?;
        let here = shardc_bundle::HostTarget::current();
        match &h.host_target {
            None => {
                return Err(ExecError::Plan(
                    "the bundle has no host code; recompile it with `shardc compile -o`".into(),
                ))
            }
            Some(t) => {
                if let Some(why) = t.missing_on(&here) {
                    return Err(ExecError::Plan(format!(
                        "the bundle's host code cannot run here: {why}; recompile it on this machine"
                    )));
                }
            }
        }
        let mut table = Vec::new();
        let mut work_items = HashMap::new();
        let mut library = None;
        for k in &h.kernels {
            let so = k.blobs.iter().find_map(|(kind, s)| match kind {
                shardc_bundle::BlobKind::HostObject { .. } => Some(*s as usize),
                _ => None,
            });
            let so =
                so.ok_or_else(|| ExecError::Plan(format!("kernel `{}` has no host code in the bundle", k.name)))?;
            if library.is_some_and(|l| l != so) {
                return Err(ExecError::Plan("the bundle's kernels are in several host libraries".into()));
            }
            library = Some(so);
            let node = k.nodes.first().and_then(|&i| h.program.nodes.get(i as usize));
            let buffers = node
                .map(|n| n.inputs.len() + n.outputs.len())
                .ok_or_else(|| ExecError::Plan(format!("kernel `{}` names no node of the program", k.name)))?;
            table.push((k.name.as_str(), buffers));
            work_items.insert(k.name.clone(), k.work_items as usize);
        }
        let kernels = match library {
            Some(s) => HostKernels::load(&bundle.sections[s], &table)?,
            None => HostKernels::empty(),
        };
        HostProgram::new(h.program.clone(), plan, kernels, work_items)
    }

    pub fn program(&self) -> &Graph {
        &self.program
    }

    pub fn arena_bytes(&self) -> usize {
        self.arena_bytes
    }

    fn range(&self, v: ValueId) -> Range<usize> {
        let off = self.offset[v.index()].expect("checked in new");
        off..off + self.program.ty(v).size_bytes()
    }

    /// A fresh arena for one rank.
    pub fn arena(&self) -> Arena {
        Arena::new(self.arena_bytes)
    }

    /// Writes `t` into value `v` of a rank's arena.
    pub fn write(&self, arena: &mut Arena, v: ValueId, t: &Tensor) -> Result<(), ExecError> {
        let r = self.range(v);
        encode(self.program.ty(v), t, &mut arena.bytes_mut()[r])
            .map_err(|message| ExecError::Value { name: self.program.name_of(v).to_string(), message })
    }

    /// Reads value `v` of a rank's arena.
    pub fn read(&self, arena: &Arena, v: ValueId) -> Tensor {
        decode(self.program.ty(v), &arena.bytes()[self.range(v)])
    }

    /// Runs the program once on every rank (`arenas[r]` is rank r's), with `threads` threads
    /// in all; returns each rank's statistics.
    pub fn run(&self, arenas: &mut [Arena], threads: usize) -> Result<Vec<ExecStats>, ExecError> {
        self.run_traced(arenas, threads, None)
    }

    /// [`HostProgram::run`], recording every node's time relative to `epoch` when given.
    pub fn run_traced(
        &self,
        arenas: &mut [Arena],
        threads: usize,
        epoch: Option<Instant>,
    ) -> Result<Vec<ExecStats>, ExecError> {
        let world = self.program.mesh.world_size();
        if arenas.len() != world {
            return Err(ExecError::Plan(format!("{} arenas for {world} ranks", arenas.len())));
        }
        let comm = InProcess::new(world);
        let per_rank = (threads / world).max(1);
        let results: Vec<Result<ExecStats, ExecError>> = std::thread::scope(|s| {
            let handles: Vec<_> = arenas
                .iter_mut()
                .enumerate()
                .map(|(rank, arena)| {
                    let comm = &comm;
                    s.spawn(move || {
                        let r = self.run_rank(rank, arena, comm, per_rank, epoch);
                        if r.is_err() {
                            comm.abort(rank);
                        }
                        r
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("a rank thread panicked")).collect()
        });
        // Report the failure that started it, not the peers that stopped because of it.
        let mut out = Vec::with_capacity(world);
        let mut first_err = None;
        for r in results {
            match r {
                Ok(s) => out.push(s),
                Err(ExecError::Comm { .. }) if first_err.is_some() => {}
                Err(e @ ExecError::Comm { .. }) => first_err = first_err.or(Some(e)),
                Err(e) => {
                    if matches!(first_err, None | Some(ExecError::Comm { .. })) {
                        first_err = Some(e);
                    }
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    fn run_rank(
        &self,
        rank: usize,
        arena: &mut Arena,
        comm: &InProcess,
        threads: usize,
        epoch: Option<Instant>,
    ) -> Result<ExecStats, ExecError> {
        let g = &self.program;
        let mut stats = ExecStats::default();
        for (i, n) in g.nodes.iter().enumerate() {
            let t = Instant::now();
            let fail = |message: String| ExecError::Node { rank, node: i, op: n.op.name().to_string(), message };
            match n.op {
                Op::Fused => {
                    let name = n.attrs.str("kernel").unwrap_or_default();
                    let base = arena.bytes_mut().as_mut_ptr();
                    let ptrs: Vec<*mut u8> = n
                        .inputs
                        .iter()
                        .chain(&n.outputs)
                        // SAFETY: every range was checked to lie inside the arena in `new`.
                        .map(|&v| unsafe { base.add(self.range(v).start) })
                        .collect();
                    // SAFETY: the buffers are the kernel's operands and results, of the sizes
                    // and dtypes it was compiled for (the program's types).
                    unsafe { self.kernels.run(name, self.work_items[name], &ptrs, threads) }?;
                }
                Op::Reshape | Op::Identity => {
                    let (src, dst) = (self.range(n.inputs[0]), self.range(n.output()));
                    if src != dst {
                        let (a, b) =
                            split(arena.bytes_mut(), src, dst).ok_or_else(|| fail("overlapping view".into()))?;
                        b.copy_from_slice(a);
                    }
                }
                Op::MatMul => self.gemm(i, arena, threads).map_err(fail)?,
                Op::Transpose => self.transpose(n, arena).map_err(fail)?,
                Op::Concat | Op::Split => self.concat_or_split(n, arena).map_err(fail)?,
                Op::TakeShard => {
                    let x = g.ty(n.inputs[0]);
                    let dim = shardc_ir::ops::normalize_dim(n.attrs.int("dim").unwrap_or(0), x.rank()).map_err(fail)?;
                    let axis = n.attrs.str("axis").unwrap_or_default();
                    let (k, size) = (g.mesh.coord(rank, axis), g.mesh.axis_size(axis));
                    let (Some(k), Some(size)) = (k, size) else { return Err(fail(format!("no mesh axis `{axis}`"))) };
                    let (src, dst) = (self.range(n.inputs[0]), self.range(n.output()));
                    let (a, b) = split(arena.bytes_mut(), src, dst).ok_or_else(|| fail("overlapping shard".into()))?;
                    chunk(a, &x.shape, elem(x.dtype), dim, size, k, b);
                }
                Op::AllReduce | Op::AllGather | Op::ReduceScatter | Op::AllToAll => {
                    self.collective(rank, n, arena, comm).map_err(|e| match e {
                        Ok(message) => fail(message),
                        Err(source) => ExecError::Comm { rank, source },
                    })?;
                }
                _ if self.native[i] => {
                    let bufs = self.buffers(arena, n).map_err(fail)?;
                    crate::native::run(g, n, bufs, threads).map_err(fail)?;
                }
                _ => {
                    let ins: Vec<Tensor> = n.inputs.iter().map(|&v| self.read(arena, v)).collect();
                    let refs: Vec<&Tensor> = ins.iter().collect();
                    let outs =
                        shardc_ir::interp::eval_node(g, n, &refs, |axis| g.mesh.coord(rank, axis)).map_err(fail)?;
                    for (&o, t) in n.outputs.iter().zip(&outs) {
                        self.write(arena, o, t)?;
                    }
                }
            }
            let took = t.elapsed();
            let (what, name) = &self.labels[i];
            stats.add(what, took);
            for &o in &n.outputs {
                stats.arena_high_water_bytes = stats.arena_high_water_bytes.max(self.range(o).end);
            }
            if let Some(e) = epoch {
                stats.events.push((name.clone(), what.clone(), t.duration_since(e), took));
            }
        }
        for &(result, arg) in &self.copy_back {
            let (src, dst) = (self.range(result), self.range(arg));
            let (a, b) = split(arena.bytes_mut(), src, dst)
                .ok_or_else(|| ExecError::Plan("an update overlaps the argument it is copied to".into()))?;
            b.copy_from_slice(a);
        }
        Ok(stats)
    }

    /// Node `n`'s operands and its one result as bytes of the arena; the result must not
    /// overlap an operand.
    fn buffers<'a>(&self, arena: &'a mut Arena, n: &Node) -> Result<crate::native::Buffers<'a>, String> {
        let out = self.range(n.output());
        let ins: Vec<Range<usize>> = n.inputs.iter().map(|&v| self.range(v)).collect();
        if ins.iter().any(|r| r.start < out.end && out.start < r.end) {
            return Err("the result overlaps an operand in the memory plan".into());
        }
        let base = arena.bytes_mut().as_mut_ptr();
        // SAFETY: every range lies inside the arena (checked in `new`); the result's range is
        // disjoint from the operands' (checked above), which are only read.
        unsafe {
            Ok(crate::native::Buffers {
                ins: ins.iter().map(|r| std::slice::from_raw_parts(base.add(r.start) as *const u8, r.len())).collect(),
                out: std::slice::from_raw_parts_mut(base.add(out.start), out.len()),
            })
        }
    }

    /// A matrix product ([`crate::matmul`]): f32 operands are read in place in the arena;
    /// bf16 ones are widened to f32 first and the result rounded back, as the interpreter
    /// computes them.
    fn gemm(&self, i: usize, arena: &mut Arena, threads: usize) -> Result<(), String> {
        let g = &self.program;
        let n = &g.nodes[i];
        let (ta, tb, out) = (g.ty(n.inputs[0]), g.ty(n.inputs[1]), g.ty(n.output()));
        if !(ta.dtype.is_float() && tb.dtype.is_float() && out.dtype.is_float()) {
            return Err(format!("matmul of {ta} and {tb} is not a floating product"));
        }
        let product = self.products[i].as_ref().ok_or("not a matmul")?;
        let (ra_, rb_, rc_) = (self.range(n.inputs[0]), self.range(n.inputs[1]), self.range(n.output()));
        let overlaps = |x: &Range<usize>| x.start < rc_.end && rc_.start < x.end;
        if overlaps(&ra_) || overlaps(&rb_) {
            return Err("the product's result overlaps an operand in the memory plan".into());
        }
        // f32 operands in place; others widened into temporaries.
        let widen = |v: ValueId| -> Option<Vec<f32>> {
            match g.ty(v).dtype {
                DType::F32 => None,
                _ => match self.read(arena, v).data {
                    Data::F32(x) => Some(x),
                    _ => None,
                },
            }
        };
        let (wa, wb) = (widen(n.inputs[0]), widen(n.inputs[1]));
        let mut wc = (out.dtype != DType::F32).then(|| vec![0f32; out.numel()]);
        let base = arena.bytes_mut().as_mut_ptr();
        // SAFETY: the ranges lie inside the arena (checked in `new`) and the result's range is
        // disjoint from both operands' (checked above); f32 offsets are 64-byte aligned.
        let a_ptr = wa.as_ref().map_or(unsafe { base.add(ra_.start) } as *const f32, |w| w.as_ptr());
        let b_ptr = wb.as_ref().map_or(unsafe { base.add(rb_.start) } as *const f32, |w| w.as_ptr());
        let c_ptr = wc.as_mut().map_or(unsafe { base.add(rc_.start) } as *mut f32, |w| w.as_mut_ptr());
        // SAFETY: the buffers hold the operands' and the result's elements (their types), and
        // the result does not overlap an operand.
        unsafe { product.run(a_ptr, b_ptr, c_ptr, threads) };
        if let Some(c) = wc {
            let t = Tensor { dtype: out.dtype, shape: out.shape.clone(), data: Data::F32(c) };
            encode(out, &t, &mut arena.bytes_mut()[rc_])?;
        }
        Ok(())
    }

    /// `concat` (several operands into one result) and `split` (one operand into several
    /// results) along a dim: row-major copies of each part's rows.
    fn concat_or_split(&self, n: &Node, arena: &mut Arena) -> Result<(), String> {
        let g = &self.program;
        let whole = if n.op == Op::Concat { n.output() } else { n.inputs[0] };
        let parts: &[ValueId] = if n.op == Op::Concat { &n.inputs } else { &n.outputs };
        let t = g.ty(whole);
        let dim = shardc_ir::ops::normalize_dim(n.attrs.int("dim").unwrap_or(0), t.rank())?;
        let es = elem(t.dtype);
        let outer: usize = t.shape[..dim].iter().product();
        let inner = t.shape[dim + 1..].iter().product::<usize>() * es;
        let row = t.shape[dim] * inner;
        let mut at = 0;
        for &p in parts {
            let piece = g.ty(p).shape[dim] * inner;
            let (wr, pr) = (self.range(whole), self.range(p));
            if n.op == Op::Concat {
                let (src, dst) = split(arena.bytes_mut(), pr, wr).ok_or("overlapping concat")?;
                for o in 0..outer {
                    dst[o * row + at..o * row + at + piece].copy_from_slice(&src[o * piece..(o + 1) * piece]);
                }
            } else {
                let (src, dst) = split(arena.bytes_mut(), wr, pr).ok_or("overlapping split")?;
                for o in 0..outer {
                    dst[o * piece..(o + 1) * piece].copy_from_slice(&src[o * row + at..o * row + at + piece]);
                }
            }
            at += piece;
        }
        Ok(())
    }

    fn transpose(&self, n: &Node, arena: &mut Arena) -> Result<(), String> {
        let g = &self.program;
        let (x, out) = (g.ty(n.inputs[0]), g.ty(n.output()));
        let perm: Vec<usize> = n
            .attrs
            .ints("perm")
            .ok_or("no perm")?
            .iter()
            .map(|&p| shardc_ir::ops::normalize_dim(p, x.rank()))
            .collect::<Result<_, _>>()?;
        let r = out.rank();
        let mut in_strides = vec![1usize; r];
        for d in (0..r.saturating_sub(1)).rev() {
            in_strides[d] = in_strides[d + 1] * x.shape[d + 1];
        }
        // The trailing dims the permutation keeps in place move as contiguous runs.
        let mut keep = r;
        while keep > 0 && perm[keep - 1] == keep - 1 {
            keep -= 1;
        }
        let run = out.shape[keep..].iter().product::<usize>() * elem(x.dtype);
        let step: Vec<usize> = perm[..keep].iter().map(|&p| in_strides[p] * elem(x.dtype)).collect();
        let (src, dst) = (self.range(n.inputs[0]), self.range(n.output()));
        let (a, b) = split(arena.bytes_mut(), src, dst).ok_or("overlapping transpose")?;
        let outer: usize = out.shape[..keep].iter().product();
        let mut idx = vec![0usize; keep];
        let mut off = 0usize;
        for o in 0..outer {
            b[o * run..(o + 1) * run].copy_from_slice(&a[off..off + run]);
            for d in (0..keep).rev() {
                idx[d] += 1;
                off += step[d];
                if idx[d] < out.shape[d] {
                    break;
                }
                off -= step[d] * idx[d];
                idx[d] = 0;
            }
        }
        Ok(())
    }

    /// A collective: `Err(Ok(message))` for a malformed node, `Err(Err(_))` when a peer failed.
    fn collective(
        &self,
        rank: usize,
        n: &Node,
        arena: &mut Arena,
        comm: &InProcess,
    ) -> Result<(), Result<String, CommError>> {
        let g = &self.program;
        let (x, out) = (g.ty(n.inputs[0]), g.ty(n.output()));
        let axis = n.attrs.str("axis").unwrap_or_default();
        let group = g.mesh.group(rank, axis).ok_or_else(|| Ok(format!("no mesh axis `{axis}`")))?;
        let me = group.iter().position(|&r| r == rank).expect("a rank is in its own group");
        let dim = |name: &str| shardc_ir::ops::normalize_dim(n.attrs.int(name).unwrap_or(0), x.rank()).map_err(Ok);
        let (src, dst) = (self.range(n.inputs[0]), self.range(n.output()));
        let es = elem(x.dtype);
        // The part of the operand this rank's result sums: all of it for an all-reduce, the
        // rank's contiguous block for a reduce-scatter over a leading dim.
        let part = match n.op {
            Op::AllReduce => Some(0..x.size_bytes()),
            Op::ReduceScatter => {
                let d = dim("dim")?;
                x.shape[..d].iter().all(|&s| s == 1).then(|| me * out.size_bytes()..(me + 1) * out.size_bytes())
            }
            _ => None,
        };
        if let (Some(part), DType::F32) = (part, x.dtype) {
            // The common cases in place: every rank sums the group's posts straight into its
            // result, in f32, in group order (so every rank gets the same bits).
            let max = n.attrs.str("reduce") == Some("max");
            comm.post(rank, &arena.bytes()[src]);
            return comm
                .exchange_posted(|all| {
                    let out = crate::native::f32s_mut(&mut arena.bytes_mut()[dst]);
                    out.copy_from_slice(crate::native::f32s(&all[group[0]][part.clone()]));
                    for &r in &group[1..] {
                        let other = crate::native::f32s(&all[r][part.clone()]);
                        if max {
                            out.iter_mut().zip(other).for_each(|(a, &b)| *a = a.max(b));
                        } else {
                            out.iter_mut().zip(other).for_each(|(a, &b)| *a += b);
                        }
                    }
                })
                .map_err(Err);
        }
        if n.op == Op::AllGather {
            // Posted straight from the arena, concatenated straight into it.
            let d = dim("dim")?;
            comm.post(rank, &arena.bytes()[src]);
            return comm
                .exchange_posted(|all| {
                    let parts: Vec<&[u8]> = group.iter().map(|&r| all[r]).collect();
                    concat(&parts, &x.shape, es, d, &mut arena.bytes_mut()[dst]);
                })
                .map_err(Err);
        }
        let mine = arena.bytes()[src].to_vec();
        let result: Vec<u8> = match n.op {
            Op::AllReduce | Op::ReduceScatter => {
                let max = n.op == Op::AllReduce && n.attrs.str("reduce") == Some("max");
                let d = if n.op == Op::ReduceScatter { Some(dim("dim")?) } else { None };
                comm.exchange(rank, &mine, |all| {
                    let mut acc = to_f64(x.dtype, all[group[0]]);
                    for &r in &group[1..] {
                        for (a, b) in acc.iter_mut().zip(to_f64(x.dtype, all[r])) {
                            *a = if max { a.max(b) } else { *a + b };
                        }
                    }
                    let mut full = vec![0u8; x.size_bytes()];
                    from_f64(x.dtype, &acc, &mut full);
                    match d {
                        None => full,
                        Some(d) => {
                            let mut part = vec![0u8; out.size_bytes()];
                            chunk(&full, &x.shape, es, d, group.len(), me, &mut part);
                            part
                        }
                    }
                })
                .map_err(Err)?
            }
            Op::AllToAll => {
                let (s, c) = (dim("split_dim")?, dim("concat_dim")?);
                comm.exchange(rank, &mine, |all| {
                    let mut piece_shape = x.shape.to_vec();
                    piece_shape[s] /= group.len();
                    let piece_bytes = x.size_bytes() / group.len();
                    let pieces: Vec<Vec<u8>> = group
                        .iter()
                        .map(|&r| {
                            let mut p = vec![0u8; piece_bytes];
                            chunk(all[r], &x.shape, es, s, group.len(), me, &mut p);
                            p
                        })
                        .collect();
                    let refs: Vec<&[u8]> = pieces.iter().map(|p| p.as_slice()).collect();
                    let mut full = vec![0u8; out.size_bytes()];
                    concat(&refs, &piece_shape, es, c, &mut full);
                    full
                })
                .map_err(Err)?
            }
            _ => return Err(Ok("not a collective".into())),
        };
        arena.bytes_mut()[dst].copy_from_slice(&result);
        Ok(())
    }
}

/// What `--report` counts node `n`'s time as (`kernel FAMILY`, or `kernel NAME` with
/// `by_name`; `gemm`, `copy`, `collective KIND`, `host OP` for [`crate::native`]'s ops,
/// `interpreter OP`), and its name in a trace.
fn label(g: &Graph, n: &Node, by_name: bool, native: bool) -> (String, String) {
    let kernel = n.attrs.str("kernel").unwrap_or_default().to_string();
    let what = match n.op {
        Op::Fused if by_name => format!("kernel {kernel}"),
        Op::Fused => format!("kernel {}", kernel_family(n)),
        Op::MatMul => "gemm".into(),
        Op::Reshape | Op::Identity | Op::Transpose | Op::Concat | Op::Split | Op::TakeShard => "copy".into(),
        op if op.is_collective() => format!("collective {}", op.name()),
        op if native => format!("host {}", op.name()),
        op => format!("interpreter {}", op.name()),
    };
    let name = match n.op {
        Op::Fused => kernel,
        Op::MatMul => {
            // The product's shape, for reading a trace: batch x m x k x n.
            let (a, out) = (g.ty(n.inputs[0]), g.ty(n.output()));
            let ro = out.rank();
            let k = if n.attrs.bool_or("transpose_a", false) { a.shape[a.rank() - 2] } else { a.shape[a.rank() - 1] };
            let batch: usize = out.shape[..ro - 2].iter().product();
            let (m, nn) = (out.shape[ro - 2], out.shape[ro - 1]);
            let t = |b: bool| if b { "T" } else { "" };
            format!(
                "matmul %{} [{batch} x {m} x {k} x {nn}{}{}]",
                g.name_of(n.output()),
                if n.attrs.bool_or("transpose_a", false) { format!(", A{}", t(true)) } else { String::new() },
                if n.attrs.bool_or("transpose_b", false) { format!(", B{}", t(true)) } else { String::new() }
            )
        }
        op => format!("{} %{}", op.name(), g.name_of(n.output())),
    };
    (what, name)
}

/// The family a kernel's time is reported under: its first row/column op, or `elementwise`.
fn kernel_family(n: &Node) -> String {
    let Some(body) = n.body.as_deref() else { return "?".into() };
    let main = body.nodes.iter().find(|m| {
        !matches!(
            m.op,
            Op::Add
                | Op::Sub
                | Op::Mul
                | Op::Div
                | Op::Maximum
                | Op::Neg
                | Op::Exp
                | Op::Log
                | Op::Sqrt
                | Op::Rsqrt
                | Op::Tanh
                | Op::Cast
                | Op::Full
        )
    });
    main.map_or("elementwise", |m| m.op.name()).to_string()
}
