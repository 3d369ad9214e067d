//! Kernel descriptions: a fused node's body (a graph of local ops, `passes::fusion`) as one
//! target-independent MLIR function, `scf.parallel` over work items of static-shape memrefs.
//!
//! Every buffer is a flat `memref<N x T>` (the body's operands, then its results); indices are
//! computed here, so broadcasting is explicit arithmetic and the bare-pointer ABI
//! ([`crate::mlir`]) holds on both targets. Four forms, chosen from the body:
//! - **flat**: elementwise only, every operand either whole (the kernel's shape) or a scalar:
//!   a work item is a chunk of [`FLAT_CHUNK`] consecutive elements (vectorizable on the host).
//! - **rows**: the kernel's shape `[..., C]` as rows of `C`; a work item is one row, walked by
//!   serial loops: each row-wise op (softmax, norms, cross-entropy, reductions over the last dim)
//!   adds its loops (a max, a sum, ...) and leaves per-row statistics; elementwise values are
//!   recomputed inline wherever a loop reads them (never stored unless they are results).
//! - **columns**: a reduction over every leading dim (bias gradients); a work item is one column,
//!   walking the rows.
//! - **multi-tensor**: independent flat pieces of different sizes (fusion's buckets of AdamW
//!   updates or parameter casts), laid end to end: piece k owns `ceil(elements_k / chunk)`
//!   consecutive work items, so one launch covers the bucket (Apex's multi-tensor apply, with
//!   the tensor table resolved at compile time).
//!
//! Numerics: loads widen to f32, every op computes in f32 and rounds to its result's dtype
//! (bf16 values are rounded where the interpreter rounds them), stores narrow.

use shardc_ir::attrs::GeluApproximation;
use shardc_ir::{DType, Graph, Node, Op, TensorType, ValueId};
use std::collections::HashMap;
use std::fmt::Write;

/// Elements per work item of a flat kernel.
pub const FLAT_CHUNK: usize = 64;

/// How a kernel's work items are laid out.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "form", rename_all = "snake_case")]
pub enum Form {
    Flat {
        elements: usize,
        chunk: usize,
    },
    /// Independent flat pieces (a bucket of parameters' AdamW updates), one after another in
    /// the work items: piece k covers `ceil(elements[k] / chunk)` of them.
    MultiTensor {
        elements: Vec<usize>,
        chunk: usize,
    },
    Rows {
        rows: usize,
        cols: usize,
    },
    /// A work item sums `chunk` adjacent columns (1 on the GPU, where adjacent threads read
    /// adjacent columns; [`HOST_COLUMN_CHUNK`] on the host, where one thread reading a run of
    /// contiguous columns per row beats one strided column per thread).
    Columns {
        rows: usize,
        cols: usize,
        chunk: usize,
    },
}

/// Columns per work item of the host's column kernels.
pub const HOST_COLUMN_CHUNK: usize = 64;

/// One kernel, described once.
#[derive(Clone, Debug)]
pub struct KernelDesc {
    pub name: String,
    pub form: Form,
    /// Work items: the kernel is called (host) or launched (GPU) over `0..work_items`.
    pub work_items: usize,
    /// The ops fused into it, in order.
    pub ops: Vec<String>,
    pub inputs: Vec<TensorType>,
    pub outputs: Vec<TensorType>,
    /// The one `func.func` (the description), without its module.
    pub function: String,
}

impl KernelDesc {
    /// The description as an MLIR module of its own (what `--emit-kernels` writes).
    pub fn module(&self) -> String {
        format!("module {{\n{}}}\n", self.function)
    }
}

/// Why a body has no description.
#[derive(Debug, thiserror::Error)]
#[error("kernel `{kernel}` ({ops}): {message}")]
pub struct KernelError {
    pub kernel: String,
    pub ops: String,
    pub message: String,
}

/// The description of a `fused` node's kernel.
pub fn describe(node: &Node) -> Result<KernelDesc, KernelError> {
    describe_in_place(node, &[], 1)
}

/// [`describe`] for a node some of whose results the memory plan writes over an operand:
/// `in_place` holds (result index, operand index) pairs. Such a result is stored through the
/// operand's buffer (the runtime passes the same pointer for both), so the kernel reads and
/// writes one memref at one index, which LLVM's vectorizer can prove safe; two distinct
/// pointers to the same bytes would make it fall back to scalar code.
/// `column_chunk` sets the columns per work item of a column kernel (see [`Form::Columns`]).
pub fn describe_in_place(
    node: &Node,
    in_place: &[(usize, usize)],
    column_chunk: usize,
) -> Result<KernelDesc, KernelError> {
    let name = node.attrs.str("kernel").unwrap_or("kernel").to_string();
    let body = node.body.as_deref();
    let ops: Vec<String> = body.map(|b| b.nodes.iter().map(|n| n.op.name().to_string()).collect()).unwrap_or_default();
    let fail = |message: String| KernelError { kernel: name.clone(), ops: ops.join(", "), message };
    let Some(body) = body else { return Err(fail("the node has no body (not a fused node)".into())) };
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') || name.is_empty() {
        return Err(fail("kernel names are C identifiers ([A-Za-z0-9_])".into()));
    }
    let mut form = choose_form(body).map_err(&fail)?;
    if let Form::Columns { chunk, cols, .. } = &mut form {
        *chunk = column_chunk.clamp(1, (*cols).max(1));
    }
    let mut e = Emitter::new(body, form.clone());
    for &(r, k) in in_place {
        let (Some(o), Some(a)) = (body.output_values().nth(r), body.args.get(k)) else {
            return Err(fail(format!("in-place pair (result {r}, operand {k}) names no such value")));
        };
        if body.ty(o) != body.ty(a.value) {
            return Err(fail(format!("in-place result {r} and operand {k} differ in type")));
        }
        e.buffers.insert(o, format!("%in{k}"));
    }
    let text = e.function(&name).map_err(&fail)?;
    let work_items = match form {
        Form::Flat { elements, chunk } => elements.div_ceil(chunk),
        Form::MultiTensor { ref elements, chunk } => elements.iter().map(|n| n.div_ceil(chunk)).sum(),
        Form::Rows { rows, .. } => rows,
        Form::Columns { cols, chunk, .. } => cols.div_ceil(chunk),
    };
    Ok(KernelDesc {
        name,
        form,
        work_items,
        ops,
        inputs: body.args.iter().map(|a| body.ty(a.value).clone()).collect(),
        outputs: body.output_values().map(|v| body.ty(v).clone()).collect(),
        function: text,
    })
}

/// The kernel's shape and form (module doc).
fn choose_form(body: &Graph) -> Result<Form, String> {
    let column = body.nodes.iter().find(|n| is_column_op(body, n));
    if let Some(n) = column {
        let s = &body.ty(n.inputs[0]).shape;
        let cols = *s.last().unwrap_or(&1);
        return Ok(Form::Columns { rows: s.iter().product::<usize>() / cols.max(1), cols, chunk: 1 });
    }
    // The space: the input of a row op, else the largest result.
    let row = body.nodes.iter().find(|n| is_row_op(body, n));
    let shape: Vec<usize> = match row {
        Some(n) => body.ty(n.inputs[0]).shape.to_vec(),
        None => body
            .nodes
            .iter()
            .map(|n| body.ty(n.output()).shape.to_vec())
            .max_by_key(|s| s.iter().product::<usize>())
            .ok_or("an empty body")?,
    };
    let numel: usize = shape.iter().product();
    let all_flat = row.is_none()
        && body.args.iter().all(|a| {
            let t = body.ty(a.value);
            t.shape.as_slice() == shape.as_slice() || t.numel() == 1
        });
    if all_flat {
        return Ok(Form::Flat { elements: numel, chunk: FLAT_CHUNK });
    }
    // Flat pieces of several sizes (a multi-tensor bucket): one after another.
    if row.is_none() {
        if let Some(pieces) = pieces(body).filter(|p| p.len() > 1) {
            return Ok(Form::MultiTensor { elements: pieces.iter().map(|p| p.0).collect(), chunk: FLAT_CHUNK });
        }
    }
    let cols = *shape.last().unwrap_or(&1);
    Ok(Form::Rows { rows: numel / cols.max(1), cols })
}

/// The independent pieces of a body, each as (elements, its results in output order), in
/// order of first result, or `None` when a piece is not flat (a value of another size than
/// its piece's results, other than a scalar). Values are connected through the tensors nodes
/// read, never through scalars: a work item computes every scalar it reads itself (constants,
/// AdamW's bias corrections, the clipping coefficient), so they tie no pieces together and
/// the updates of a bucket of parameters come apart. Scalar results form one piece.
fn pieces(body: &Graph) -> Option<Vec<(usize, Vec<ValueId>)>> {
    let mut parent: Vec<usize> = (0..body.values.len()).collect();
    fn find(p: &mut [usize], x: usize) -> usize {
        let mut r = x;
        while p[r] != r {
            r = p[r];
        }
        let mut y = x;
        while p[y] != r {
            let next = p[y];
            p[y] = r;
            y = next;
        }
        r
    }
    let tensor = |v: &ValueId| body.ty(*v).numel() > 1;
    for n in &body.nodes {
        let first = n.output().index();
        for &v in n.outputs.iter().chain(n.inputs.iter().filter(|v| tensor(v))) {
            let (a, b) = (find(&mut parent, first), find(&mut parent, v.index()));
            parent[a] = b;
        }
    }
    // (root, elements, results); every scalar result goes to the piece keyed `usize::MAX`.
    let mut out: Vec<(usize, usize, Vec<ValueId>)> = Vec::new();
    for o in body.output_values() {
        let n = body.ty(o).numel();
        let root = if n == 1 { usize::MAX } else { find(&mut parent, o.index()) };
        match out.iter_mut().find(|p| p.0 == root) {
            Some(p) => {
                p.1 = p.1.max(n);
                p.2.push(o);
            }
            None => out.push((root, n, vec![o])),
        }
    }
    let elements: HashMap<usize, usize> = out.iter().map(|p| (p.0, p.1)).collect();
    for v in (0..body.values.len()).filter(|&v| body.values[v].ty.numel() > 1) {
        let root = find(&mut parent, v);
        if elements.get(&root).is_some_and(|&e| e != body.values[v].ty.numel()) {
            return None;
        }
    }
    Some(out.into_iter().map(|(_, n, os)| (n, os)).collect())
}

fn is_row_op(g: &Graph, n: &Node) -> bool {
    match n.op {
        Op::Softmax
        | Op::LayerNorm
        | Op::RmsNorm
        | Op::Rope
        | Op::LayerNormGrad
        | Op::RmsNormGrad
        | Op::CrossEntropy
        | Op::CrossEntropyGrad => true,
        Op::ReduceSum | Op::ReduceMax | Op::ReduceMean => !is_column_op(g, n),
        _ => false,
    }
}

fn is_column_op(g: &Graph, n: &Node) -> bool {
    let r = g.ty(n.inputs.first().copied().unwrap_or(ValueId(0))).rank();
    match n.op {
        Op::LayerNormGammaGrad | Op::RmsNormGammaGrad => true,
        Op::ReduceSum => {
            let mut dims: Vec<usize> = n
                .attrs
                .ints("dims")
                .unwrap_or_default()
                .iter()
                .filter_map(|&d| shardc_ir::ops::normalize_dim(d, r).ok())
                .collect();
            dims.sort_unstable();
            dims.dedup();
            r >= 2 && dims == (0..r - 1).collect::<Vec<_>>()
        }
        _ => false,
    }
}

fn elem(dt: DType) -> &'static str {
    match dt {
        DType::F32 => "f32",
        DType::Bf16 => "bf16",
        DType::F16 => "f16",
        DType::I32 => "i32",
        DType::I64 => "i64",
    }
}

fn memref(t: &TensorType) -> String {
    format!("memref<{}x{}>", t.numel().max(1), elem(t.dtype))
}

fn f32_hex(x: f64) -> String {
    format!("0x{:08X}", (x as f32).to_bits())
}

/// Writes one kernel's MLIR text. Values computed per element are emitted lazily, where a loop
/// reads them, at a column given as an SSA index; per-row values once per work item.
struct Emitter<'g> {
    g: &'g Graph,
    form: Form,
    out: String,
    indent: usize,
    next: usize,
    /// Buffers: body argument or output value -> function argument name.
    buffers: HashMap<ValueId, String>,
    /// Per-row values (reductions, statistics), valid in the current work item: key -> SSA.
    row_vals: Vec<HashMap<String, String>>,
    /// Per-element values at a column: (value, column SSA) -> SSA, scoped by loop.
    elem_vals: Vec<HashMap<(ValueId, String), String>>,
    /// The current work item's row (rows form) or column (columns form) and the row being
    /// walked (columns form).
    row: String,
    consts: HashMap<String, String>,
    producer: HashMap<ValueId, usize>,
}

type R<T> = Result<T, String>;

impl<'g> Emitter<'g> {
    fn new(g: &'g Graph, form: Form) -> Self {
        let producer = g.nodes.iter().enumerate().flat_map(|(i, n)| n.outputs.iter().map(move |&o| (o, i))).collect();
        Emitter {
            g,
            form,
            out: String::new(),
            indent: 2,
            next: 0,
            buffers: HashMap::new(),
            row_vals: vec![HashMap::new()],
            elem_vals: vec![HashMap::new()],
            row: String::new(),
            consts: HashMap::new(),
            producer,
        }
    }

    fn line(&mut self, s: &str) {
        let _ = writeln!(self.out, "{:w$}{s}", "", w = self.indent);
    }

    fn fresh(&mut self) -> String {
        self.next += 1;
        format!("%v{}", self.next)
    }

    /// `%x = <rhs>`, returning `%x`.
    fn emit(&mut self, rhs: &str) -> String {
        let v = self.fresh();
        self.line(&format!("{v} = {rhs}"));
        v
    }

    fn index(&mut self, k: usize) -> String {
        let key = format!("i{k}");
        if let Some(v) = self.consts.get(&key) {
            return v.clone();
        }
        let v = format!("%c{k}");
        self.consts.insert(key, v.clone());
        v
    }

    fn fconst(&mut self, x: f64) -> String {
        self.emit(&format!("arith.constant {} : f32", f32_hex(x)))
    }

    fn bin(&mut self, op: &str, a: &str, b: &str) -> String {
        self.emit(&format!("arith.{op} {a}, {b} : f32"))
    }

    /// An accumulation of a row loop: `fastmath<reassoc>` lets LLVM keep several partial
    /// sums (a vectorized reduction) instead of one serial chain of adds.
    fn acc(&mut self, op: &str, a: &str, b: &str) -> String {
        self.emit(&format!("arith.{op} {a}, {b} fastmath<reassoc> : f32"))
    }

    fn un(&mut self, op: &str, a: &str) -> String {
        self.emit(&format!("{op} {a} : f32"))
    }

    fn iop(&mut self, op: &str, a: &str, b: &str) -> String {
        self.emit(&format!("arith.{op} {a}, {b} : index"))
    }

    /// Rounds an f32 to `dt` (and back) where the interpreter rounds.
    fn round(&mut self, x: String, dt: DType) -> String {
        match dt {
            DType::Bf16 | DType::F16 => {
                let t = self.emit(&format!("arith.truncf {x} : f32 to {}", elem(dt)));
                self.emit(&format!("arith.extf {t} : {} to f32", elem(dt)))
            }
            _ => x,
        }
    }

    fn function(&mut self, name: &str) -> R<String> {
        let g = self.g;
        let mut params = vec!["%lo: index".to_string(), "%hi: index".to_string()];
        for (k, a) in g.args.iter().enumerate() {
            let n = format!("%in{k}");
            params.push(format!("{n}: {}", memref(g.ty(a.value))));
            self.buffers.insert(a.value, n);
        }
        let outs: Vec<ValueId> = g.output_values().collect();
        for (k, &o) in outs.iter().enumerate() {
            let n = format!("%out{k}");
            params.push(format!("{n}: {}", memref(g.ty(o))));
            // An output that is also an argument (a pass-through) is still written.
            self.buffers.entry(o).or_insert(n);
        }
        // The body, into `self.out`, then the constants it used in front of it.
        self.indent = 6;
        self.hoist_uniform()?;
        self.indent = 4;
        match self.form.clone() {
            Form::Flat { elements, chunk } => self.flat(elements, chunk, &outs)?,
            Form::MultiTensor { chunk, .. } => self.multi_tensor(chunk)?,
            Form::Rows { rows: _, cols } => self.rows(cols, &outs)?,
            Form::Columns { rows, .. } => self.columns(rows, &outs)?,
        }
        let body = std::mem::take(&mut self.out);
        let mut text = String::new();
        let _ = writeln!(text, "  func.func @{name}({}) {{", params.join(", "));
        let mut consts: Vec<(&String, &String)> = self.consts.iter().collect();
        consts.sort();
        for (k, v) in consts {
            let n: usize = k[1..].parse().expect("index constants are keyed i<k>");
            let _ = writeln!(text, "    {v} = arith.constant {n} : index");
        }
        let c1 = "%c1";
        if !self.consts.contains_key("i1") {
            let _ = writeln!(text, "    {c1} = arith.constant 1 : index");
        }
        let _ = writeln!(text, "    scf.parallel (%w) = (%lo) to (%hi) step ({c1}) {{");
        text.push_str(&body);
        let _ = writeln!(text, "      scf.reduce");
        let _ = writeln!(text, "    }}");
        let _ = writeln!(text, "    return");
        let _ = writeln!(text, "  }}");
        Ok(text)
    }

    /// Values that are one number for the whole kernel (scalars computed from scalar operands:
    /// a gradient norm from per-parameter sums, a clipping coefficient, a bias correction),
    /// once per work item, before any loop. Emitted lazily inside a loop they would be
    /// recomputed per element: LLVM cannot hoist their loads past the loop's stores (the
    /// buffers may alias), and a multi-tensor AdamW bucket summing 100 per-parameter norms
    /// per element ran at 3 GB/s instead of 40.
    fn hoist_uniform(&mut self) -> R<()> {
        let g = self.g;
        let scalar = |v: ValueId| g.ty(v).numel() == 1 && g.ty(v).dtype.is_float();
        let mut uniform: std::collections::HashSet<ValueId> =
            g.args.iter().map(|a| a.value).filter(|&v| scalar(v)).collect();
        let c0 = self.index(0);
        for a in &g.args {
            if uniform.contains(&a.value) {
                let x = self.load_at(a.value, &c0)?;
                self.set_row(&format!("v{}", a.value.0), x);
            }
        }
        for n in &g.nodes {
            let elementwise = !matches!(
                n.op,
                Op::ReduceSum
                    | Op::ReduceMean
                    | Op::ReduceMax
                    | Op::Softmax
                    | Op::CrossEntropy
                    | Op::CrossEntropyGrad
                    | Op::LayerNorm
                    | Op::RmsNorm
                    | Op::LayerNormGrad
                    | Op::RmsNormGrad
                    | Op::Rope
                    | Op::Full
            );
            if !(elementwise
                && !n.inputs.is_empty()
                && n.inputs.iter().all(|v| uniform.contains(v))
                && n.outputs.iter().all(|&o| scalar(o)))
            {
                continue;
            }
            for &o in &n.outputs {
                let x = self.elem(o, &c0)?;
                self.set_row(&format!("v{}", o.0), x);
                uniform.insert(o);
            }
        }
        Ok(())
    }

    fn flat(&mut self, elements: usize, chunk: usize, outs: &[ValueId]) -> R<()> {
        self.indent = 6;
        let ch = self.index(chunk);
        let n = self.index(elements);
        let start = self.iop("muli", "%w", &ch);
        let end0 = self.iop("addi", &start, &ch);
        let end = self.iop("minsi", &end0, &n);
        self.row = "%w".into();
        let c1 = self.index(1);
        self.line(&format!("scf.for %i = {start} to {end} step {c1} {{"));
        self.indent += 2;
        self.elem_vals.push(HashMap::new());
        for &o in outs {
            let v = self.elem(o, "%i")?;
            self.store(o, &v, "%i");
        }
        self.elem_vals.pop();
        self.indent -= 2;
        self.line("}");
        Ok(())
    }

    /// Piece after piece: the work items of piece k start at the sum of the earlier pieces'
    /// chunk counts; each work item runs only its piece's code.
    fn multi_tensor(&mut self, chunk: usize) -> R<()> {
        self.indent = 6;
        let mut first = 0usize;
        for (elements, outs) in pieces(self.g).ok_or("a multi-tensor kernel's pieces are not flat")? {
            let chunks = elements.div_ceil(chunk);
            let (lo, hi) = (self.index(first), self.index(first + chunks));
            let ge = self.emit(&format!("arith.cmpi uge, %w, {lo} : index"));
            let lt = self.emit(&format!("arith.cmpi ult, %w, {hi} : index"));
            let inside = self.emit(&format!("arith.andi {ge}, {lt} : i1"));
            self.line(&format!("scf.if {inside} {{"));
            self.indent += 2;
            let (ch, n) = (self.index(chunk), self.index(elements));
            let local = self.iop("subi", "%w", &lo);
            let start = self.iop("muli", &local, &ch);
            let end0 = self.iop("addi", &start, &ch);
            let end = self.iop("minsi", &end0, &n);
            let c1 = self.index(1);
            self.line(&format!("scf.for %i{first} = {start} to {end} step {c1} {{"));
            self.indent += 2;
            self.elem_vals.push(HashMap::new());
            let i = format!("%i{first}");
            for &o in &outs {
                let v = self.elem(o, &i)?;
                self.store(o, &v, &i);
            }
            self.elem_vals.pop();
            self.indent -= 2;
            self.line("}");
            self.indent -= 2;
            self.line("}");
            first += chunks;
        }
        Ok(())
    }

    fn rows(&mut self, cols: usize, outs: &[ValueId]) -> R<()> {
        self.indent = 6;
        self.row = "%w".into();
        let g = self.g;
        // Each operand's offset of this row, once, before any loop reads it.
        // (Per-row operands, `[rows]`-shaped, are read by the row instead: `row_or_load`.)
        let rows = match self.form {
            Form::Rows { rows, .. } => rows,
            _ => 0,
        };
        let space = self.space_shape(rows, cols)?;
        for a in &g.args {
            let t = g.ty(a.value);
            let broadcasts = t.rank() <= space.len()
                && t.shape.iter().rev().zip(space.iter().rev()).all(|(&d, &s)| d == s || d == 1);
            if t.dtype.is_float() && broadcasts {
                let c0 = self.index(0);
                self.offset(a.value, &c0)?;
            }
        }
        // Row-wise ops in order: their statistics, and row-shaped values.
        for i in 0..g.nodes.len() {
            self.row_stats(i, cols)?;
        }
        let (full, per_row): (Vec<ValueId>, Vec<ValueId>) =
            outs.iter().partition(|&&o| g.ty(o).numel() == self.space_numel(cols));
        for o in per_row {
            let v = self.row_value(o)?;
            let at = "%w".to_string();
            self.store_at(o, &v, &at);
        }
        if !full.is_empty() {
            let (c0, cn, c1) = (self.index(0), self.index(cols), self.index(1));
            let base = self.iop("muli", "%w", &cn);
            self.line(&format!("scf.for %c = {c0} to {cn} step {c1} {{"));
            self.indent += 2;
            self.elem_vals.push(HashMap::new());
            let at = self.iop("addi", &base, "%c");
            for o in full {
                let v = self.elem(o, "%c")?;
                self.store_at(o, &v, &at);
            }
            self.elem_vals.pop();
            self.indent -= 2;
            self.line("}");
        }
        Ok(())
    }

    fn space_numel(&self, cols: usize) -> usize {
        match self.form {
            Form::Rows { rows, .. } => rows * cols,
            Form::Flat { elements, .. } => elements,
            Form::MultiTensor { .. } => 0,
            Form::Columns { rows, cols, .. } => rows * cols,
        }
    }

    /// One walk down column `%w`: every column reduction accumulates, every whole-shaped
    /// result is stored at (row, column) (adjacent work items write adjacent columns).
    fn columns(&mut self, rows: usize, outs: &[ValueId]) -> R<()> {
        self.indent = 6;
        let g = self.g;
        let (mut sums, mut full) = (Vec::new(), Vec::new());
        for &o in outs {
            let i = self.producer.get(&o).copied().ok_or("a column kernel's result is an argument")?;
            match g.nodes[i].op {
                Op::ReduceSum if is_column_op(g, &g.nodes[i]) => sums.push((o, g.nodes[i].inputs[0])),
                _ if g.ty(o).numel() == rows * g.ty(o).shape.last().copied().unwrap_or(1) && g.ty(o).rank() >= 2 => {
                    full.push(o)
                }
                other => return Err(format!("`{}` gives a result a column walk cannot write", other.name())),
            }
        }
        let Form::Columns { cols, chunk, .. } = self.form else { unreachable!("columns form") };
        if chunk > 1 {
            return self.column_chunks(rows, cols, chunk, &sums, &full);
        }
        let (c0, rn, c1, cn) = (self.index(0), self.index(rows), self.index(1), self.index(cols));
        // One column per work item (several: `column_chunks`).
        let columns: Vec<String> = vec!["%w".to_string()];
        let n_acc = sums.len() * columns.len();
        let zeros: Vec<String> = (0..n_acc).map(|_| self.fconst(0.0)).collect();
        let res = self.fresh();
        let accs: Vec<String> = (0..n_acc).map(|k| format!("{res}_a{k}")).collect();
        let iters: Vec<String> = accs.iter().zip(&zeros).map(|(a, z)| format!("{a} = {z}")).collect();
        let tys = vec!["f32"; n_acc].join(", ");
        let head = match n_acc {
            0 => String::new(),
            1 => format!("{res} = "),
            n => format!("{res}:{n} = "),
        };
        let iter_part = if n_acc == 0 { String::new() } else { format!(" iter_args({}) -> ({tys})", iters.join(", ")) };
        self.line(&format!("{head}scf.for %r = {c0} to {rn} step {c1}{iter_part} {{"));
        self.indent += 2;
        self.elem_vals.push(HashMap::new());
        self.row_vals.push(HashMap::new());
        self.row = "%r".into();
        let base = self.iop("muli", "%r", &cn);
        let mut next = vec![String::new(); n_acc];
        for (j, col) in columns.iter().enumerate() {
            let at = self.iop("addi", &base, col);
            for &o in &full {
                let v = self.elem(o, col)?;
                self.store_at(o, &v, &at);
            }
            for (k, &(_, x)) in sums.iter().enumerate() {
                let v = self.elem(x, col)?;
                let a = k * columns.len() + j;
                next[a] = self.bin("addf", &accs[a], &v);
            }
        }
        if n_acc > 0 {
            self.line(&format!("scf.yield {} : {tys}", next.join(", ")));
        }
        self.row_vals.pop();
        self.elem_vals.pop();
        self.indent -= 2;
        self.line("}");
        for (k, &(o, _)) in sums.iter().enumerate() {
            for (j, col) in columns.iter().enumerate() {
                let a = k * columns.len() + j;
                let acc = if n_acc == 1 { res.clone() } else { format!("{res}#{a}") };
                let r = self.round(acc, g.ty(o).dtype);
                self.store_at(o, &r, col);
            }
        }
        Ok(())
    }

    /// A column kernel whose work item sums `chunk` adjacent columns (the host's form): the
    /// partial sums live in a small stack array, and each row is an inner loop over the
    /// item's columns, contiguous in memory, which LLVM vectorizes.
    fn column_chunks(
        &mut self,
        rows: usize,
        cols: usize,
        chunk: usize,
        sums: &[(ValueId, ValueId)],
        full: &[ValueId],
    ) -> R<()> {
        let g = self.g;
        let (c0, c1, rn, cn, ck) =
            (self.index(0), self.index(1), self.index(rows), self.index(cols), self.index(chunk));
        let first = self.iop("muli", "%w", &ck);
        let left = self.iop("subi", &cn, &first);
        let n = self.iop("minui", &left, &ck);
        let accs: Vec<String> =
            sums.iter().map(|_| self.emit(&format!("memref.alloca() : memref<{chunk}xf32>"))).collect();
        let zero = self.fconst(0.0);
        self.line(&format!("scf.for %j = {c0} to {n} step {c1} {{"));
        for a in &accs {
            self.line(&format!("  memref.store {zero}, {a}[%j] : memref<{chunk}xf32>"));
        }
        self.line("}");
        self.line(&format!("scf.for %r = {c0} to {rn} step {c1} {{"));
        self.indent += 2;
        self.row_vals.push(HashMap::new());
        self.row = "%r".into();
        let base = self.iop("muli", "%r", &cn);
        self.line(&format!("scf.for %j = {c0} to {n} step {c1} {{"));
        self.indent += 2;
        self.elem_vals.push(HashMap::new());
        let col = self.iop("addi", &first, "%j");
        let at = self.iop("addi", &base, &col);
        for &o in full {
            let v = self.elem(o, &col)?;
            self.store_at(o, &v, &at);
        }
        for (k, &(_, x)) in sums.iter().enumerate() {
            let v = self.elem(x, &col)?;
            let a = self.emit(&format!("memref.load {}[%j] : memref<{chunk}xf32>", accs[k]));
            let s = self.bin("addf", &a, &v);
            self.line(&format!("memref.store {s}, {}[%j] : memref<{chunk}xf32>", accs[k]));
        }
        self.elem_vals.pop();
        self.indent -= 2;
        self.line("}");
        self.row_vals.pop();
        self.indent -= 2;
        self.line("}");
        if !sums.is_empty() {
            self.line(&format!("scf.for %j = {c0} to {n} step {c1} {{"));
            self.indent += 2;
            let col = self.iop("addi", &first, "%j");
            for (k, &(o, _)) in sums.iter().enumerate() {
                let a = self.emit(&format!("memref.load {}[%j] : memref<{chunk}xf32>", accs[k]));
                let r = self.round(a, g.ty(o).dtype);
                self.store_at(o, &r, &col);
            }
            self.indent -= 2;
            self.line("}");
        }
        Ok(())
    }

    /// The offset of element (row, col) of buffer value `v` broadcast onto the kernel's space.
    fn offset(&mut self, v: ValueId, col: &str) -> R<String> {
        let t = self.g.ty(v).clone();
        if t.numel() == 1 {
            return Ok(self.index(0));
        }
        match self.form.clone() {
            Form::Flat { .. } | Form::MultiTensor { .. } => Ok(col.to_string()),
            Form::Rows { rows, cols } | Form::Columns { rows, cols, .. } => {
                let space = self.space_shape(rows, cols)?;
                let key = format!("rowbase:{}:{}", v.0, self.row);
                let base = match self.lookup_row(&key) {
                    Some(b) => b,
                    None => {
                        let row = self.row.clone();
                        let b = self.row_base(&t.shape, &space, &row)?;
                        self.row_vals.last_mut().expect("scopes").insert(key, b.clone());
                        b
                    }
                };
                let last_aligned = t.rank() >= 1 && space.last() == t.shape.last() && cols > 1;
                if last_aligned {
                    Ok(self.iop("addi", &base, col))
                } else {
                    Ok(base)
                }
            }
        }
    }

    /// The shape the rows/columns walk: a row op's input shape.
    fn space_shape(&self, rows: usize, cols: usize) -> R<Vec<usize>> {
        let g = self.g;
        let n = g
            .nodes
            .iter()
            .find(|n| is_row_op(g, n) || is_column_op(g, n))
            .map(|n| g.ty(n.inputs[0]).shape.to_vec())
            .or_else(|| {
                g.nodes
                    .iter()
                    .map(|n| g.ty(n.output()).shape.to_vec())
                    .find(|s| s.iter().product::<usize>() == rows * cols)
            })
            .ok_or("no value spans the kernel's space")?;
        Ok(n)
    }

    /// Offset of row `row` (index over the space's leading dims) in a buffer of `shape`
    /// broadcast onto `space` (right-aligned; size-1 or missing dims repeat).
    fn row_base(&mut self, shape: &[usize], space: &[usize], row: &str) -> R<String> {
        // An operand of the space's own shape starts where the results' row starts: the same
        // `row * cols` (so LLVM sees a load and a store of one element at one address, and an
        // in-place result does not stop the loop from vectorizing).
        if shape == space && row == "%w" {
            let cols = self.index(*space.last().unwrap_or(&1));
            return Ok(self.iop("muli", row, &cols));
        }
        let (rs, ss) = (shape.len(), space.len());
        if rs > ss {
            return Err(format!("a [{shape:?}] operand does not broadcast onto the kernel's space {space:?}"));
        }
        let mut strides = vec![0usize; rs];
        let mut acc = 1;
        for d in (0..rs).rev() {
            strides[d] = acc;
            acc *= shape[d];
        }
        let mut total = self.index(0);
        let mut rem = row.to_string();
        // Walk the leading dims of the space from the innermost.
        for d in (0..ss.saturating_sub(1)).rev() {
            let extent = space[d];
            let e = self.index(extent);
            let od = d as isize - (ss as isize - rs as isize);
            let used = od >= 0 && shape[od as usize] == extent && extent > 1;
            if extent == 1 || (!used && space[..d].iter().all(|&x| x == 1)) {
                continue;
            }
            let idx = if d == 0 { rem.clone() } else { self.iop("remui", &rem, &e) };
            if d > 0 {
                rem = self.iop("divui", &rem, &e);
            }
            if od >= 0 && shape[od as usize] == extent && extent > 1 {
                let s = self.index(strides[od as usize]);
                let p = self.iop("muli", &idx, &s);
                total = self.iop("addi", &total, &p);
            } else if od >= 0 && shape[od as usize] != extent && shape[od as usize] != 1 {
                return Err(format!("a [{shape:?}] operand does not broadcast onto the kernel's space {space:?}"));
            }
        }
        Ok(total)
    }

    fn lookup_row(&self, key: &str) -> Option<String> {
        self.row_vals.iter().rev().find_map(|m| m.get(key).cloned())
    }

    fn load(&mut self, v: ValueId, col: &str) -> R<String> {
        let at = self.offset(v, col)?;
        self.load_at(v, &at)
    }

    /// Buffer `v`'s element at offset `at`, widened to f32.
    fn load_at(&mut self, v: ValueId, at: &str) -> R<String> {
        let buf = self.buffers.get(&v).cloned().ok_or("internal: value is not a buffer")?;
        let t = self.g.ty(v).clone();
        let x = self.emit(&format!("memref.load {buf}[{at}] : {}", memref(&t)));
        Ok(match t.dtype {
            DType::F32 => x,
            DType::Bf16 | DType::F16 => self.emit(&format!("arith.extf {x} : {} to f32", elem(t.dtype))),
            DType::I32 | DType::I64 => return Err("integer operands are read by the op that needs them".into()),
        })
    }

    /// An integer operand's element as an index (targets, positions), at `col` of its row.
    fn load_int(&mut self, v: ValueId, at: &str) -> R<String> {
        let buf = self.buffers.get(&v).cloned().ok_or("integer operands must be kernel arguments")?;
        let t = self.g.ty(v).clone();
        let x = self.emit(&format!("memref.load {buf}[{at}] : {}", memref(&t)));
        Ok(self.emit(&format!("arith.index_cast {x} : {} to index", elem(t.dtype))))
    }

    fn store(&mut self, o: ValueId, x: &str, col: &str) {
        let at = col.to_string();
        self.store_at(o, x, &at);
    }

    fn store_at(&mut self, o: ValueId, x: &str, at: &str) {
        let buf = self.buffers[&o].clone();
        let t = self.g.ty(o).clone();
        let v = match t.dtype {
            DType::Bf16 | DType::F16 => self.emit(&format!("arith.truncf {x} : f32 to {}", elem(t.dtype))),
            _ => x.to_string(),
        };
        self.line(&format!("memref.store {v}, {buf}[{at}] : {}", memref(&t)));
    }

    /// Is `v` per-row (a reduction's result, or elementwise of per-row values) in a rows kernel?
    fn is_row_valued(&self, v: ValueId, cols: usize) -> bool {
        let t = self.g.ty(v);
        matches!(self.form, Form::Rows { .. }) && self.producer.contains_key(&v) && t.numel() != self.space_numel(cols)
    }

    /// Emits, at row scope, the loops and statistics of node `i` if it is row-wise, and the
    /// values of per-row elementwise nodes.
    fn row_stats(&mut self, i: usize, cols: usize) -> R<()> {
        let g = self.g;
        let n = &g.nodes[i];
        let x = n.inputs.first().copied();
        let key = |s: &str| format!("n{i}:{s}");
        match n.op {
            Op::ReduceSum | Op::ReduceMean | Op::ReduceMax => {
                let x = x.expect("reductions have an operand");
                let max = n.op == Op::ReduceMax;
                let init = if max { self.fconst(f64::NEG_INFINITY) } else { self.fconst(0.0) };
                let [s] = self.row_loop(cols, &[init], |e, c, acc| {
                    let v = e.elem(x, c)?;
                    Ok(vec![if max { e.acc("maximumf", &acc[0], &v) } else { e.acc("addf", &acc[0], &v) }])
                })?;
                let s = if n.op == Op::ReduceMean {
                    let k = self.fconst(cols as f64);
                    self.bin("divf", &s, &k)
                } else {
                    s
                };
                let r = self.round(s, g.ty(n.output()).dtype);
                self.set_row(&format!("v{}", n.output().0), r);
            }
            Op::Softmax | Op::CrossEntropy | Op::CrossEntropyGrad => {
                let x = x.expect("an operand");
                let visible = if n.op == Op::Softmax && n.attrs.bool_or("causal", false) {
                    // Query i sees keys 0..=i + (keys - queries).
                    let s = &g.ty(x).shape;
                    let queries = s[s.len() - 2];
                    let q = self.index(queries);
                    let qi = self.iop("remui", "%w", &q);
                    let extra = self.index(cols - queries + 1);
                    self.iop("addi", &qi, &extra)
                } else {
                    self.index(cols)
                };
                self.set_row(&key("visible"), visible.clone());
                let init = self.fconst(f64::NEG_INFINITY);
                let [m] = self.row_loop_to(&visible, &[init], |e, c, acc| {
                    let v = e.elem(x, c)?;
                    Ok(vec![e.acc("maximumf", &acc[0], &v)])
                })?;
                let zero = self.fconst(0.0);
                let [s] = self.row_loop_to(&visible, &[zero], |e, c, acc| {
                    let v = e.elem(x, c)?;
                    let d = e.bin("subf", &v, &m);
                    let ex = e.un("math.exp", &d);
                    Ok(vec![e.acc("addf", &acc[0], &ex)])
                })?;
                self.set_row(&key("max"), m.clone());
                self.set_row(&key("sum"), s.clone());
                if n.op != Op::Softmax {
                    let t = self.load_int(n.inputs[1], "%w")?;
                    self.set_row(&key("target"), t.clone());
                }
                if n.op == Op::CrossEntropy {
                    let t = self.lookup_row(&key("target")).expect("just set");
                    let xt = self.elem(x, &t)?;
                    let ls = self.un("math.log", &s);
                    let lse = self.bin("addf", &m, &ls);
                    let loss = self.bin("subf", &lse, &xt);
                    let loss = self.round(loss, g.ty(n.output()).dtype);
                    self.set_row(&format!("v{}", n.output().0), loss);
                }
                if n.op == Op::CrossEntropyGrad {
                    let dy = self.row_or_load(n.inputs[2], cols)?;
                    self.set_row(&key("dy"), dy);
                }
            }
            Op::LayerNorm | Op::RmsNorm | Op::LayerNormGrad | Op::RmsNormGrad => {
                let x = x.expect("an operand");
                let centered = matches!(n.op, Op::LayerNorm | Op::LayerNormGrad);
                let eps = n.attrs.float("eps").unwrap_or(1e-5);
                let cn = self.fconst(cols as f64);
                let mean = if centered {
                    let zero = self.fconst(0.0);
                    let [s] = self.row_loop(cols, &[zero], |e, c, acc| {
                        let v = e.elem(x, c)?;
                        Ok(vec![e.acc("addf", &acc[0], &v)])
                    })?;
                    self.bin("divf", &s, &cn)
                } else {
                    self.fconst(0.0)
                };
                let zero = self.fconst(0.0);
                let [ss] = self.row_loop(cols, &[zero], |e, c, acc| {
                    let v = e.elem(x, c)?;
                    let d = e.bin("subf", &v, &mean);
                    let d2 = e.bin("mulf", &d, &d);
                    Ok(vec![e.acc("addf", &acc[0], &d2)])
                })?;
                let var = self.bin("divf", &ss, &cn);
                let ep = self.fconst(eps);
                let ve = self.bin("addf", &var, &ep);
                let sq = self.un("math.sqrt", &ve);
                let one = self.fconst(1.0);
                let rstd = self.bin("divf", &one, &sq);
                self.set_row(&key("mean"), mean.clone());
                self.set_row(&key("rstd"), rstd.clone());
                if matches!(n.op, Op::LayerNormGrad | Op::RmsNormGrad) {
                    let (gamma, dy) = (n.inputs[1], n.inputs[2]);
                    let (z1, z2) = (self.fconst(0.0), self.fconst(0.0));
                    let [sg, sgx] = self.row_loop(cols, &[z1, z2], |e, c, acc| {
                        let gd = e.elem(dy, c)?;
                        let gm = e.elem(gamma, c)?;
                        let gg = e.bin("mulf", &gd, &gm);
                        let v = e.elem(x, c)?;
                        let d = e.bin("subf", &v, &mean);
                        let xh = e.bin("mulf", &d, &rstd);
                        let gx = e.bin("mulf", &gg, &xh);
                        Ok(vec![e.acc("addf", &acc[0], &gg), e.acc("addf", &acc[1], &gx)])
                    })?;
                    let mg = self.bin("divf", &sg, &cn);
                    let mgx = self.bin("divf", &sgx, &cn);
                    self.set_row(&key("mean_g"), mg);
                    self.set_row(&key("mean_gx"), mgx);
                }
            }
            Op::Rope => {
                let s = &g.ty(n.inputs[0]).shape;
                let (t, h) = (s[s.len() - 3], s[s.len() - 2]);
                let (hi, ti) = (self.index(h), self.index(t));
                let q = self.iop("divui", "%w", &hi);
                let p = self.iop("remui", &q, &ti);
                let pos = self.load_int(n.inputs[1], &p)?;
                let pi = self.emit(&format!("arith.index_cast {pos} : index to i64"));
                let pf = self.emit(&format!("arith.sitofp {pi} : i64 to f64"));
                let pf =
                    if n.attrs.bool_or("inverse", false) { self.emit(&format!("arith.negf {pf} : f64")) } else { pf };
                self.set_row(&key("pos"), pf);
            }
            Op::Full => {}
            _ if n.outputs.iter().all(|o| self.lookup_row(&format!("v{}", o.0)).is_some()) => {}
            _ if n.outputs.iter().any(|&o| self.is_row_valued(o, cols)) => {
                // Elementwise on per-row values (e.g. log(sum) + max): computed once per row.
                let ins: Vec<String> =
                    n.inputs.iter().map(|&v| self.row_or_load(v, cols)).collect::<R<Vec<String>>>()?;
                let v = self.elementwise(n, &ins)?;
                let v = self.round(v, g.ty(n.output()).dtype);
                self.set_row(&format!("v{}", n.output().0), v);
            }
            _ => {}
        }
        Ok(())
    }

    fn set_row(&mut self, key: &str, v: String) {
        self.row_vals.last_mut().expect("scopes").insert(key.to_string(), v);
    }

    /// A per-row value: computed in the row, or loaded from a per-row operand.
    fn row_or_load(&mut self, v: ValueId, _cols: usize) -> R<String> {
        if let Some(x) = self.lookup_row(&format!("v{}", v.0)) {
            return Ok(x);
        }
        if self.buffers.contains_key(&v) && !self.producer.contains_key(&v) {
            // A per-row operand ([rows] or [rows, 1]) is indexed by the row, not broadcast.
            let rows = match self.form {
                Form::Rows { rows, .. } => rows,
                _ => 0,
            };
            let numel = self.g.ty(v).numel();
            let at = if numel == 1 {
                self.index(0)
            } else if numel == rows {
                "%w".to_string()
            } else {
                return Err(format!("%{} is not per-row here", self.g.name_of(v)));
            };
            return self.load_at(v, &at);
        }
        if let Some(&p) = self.producer.get(&v) {
            if self.g.nodes[p].op == Op::Full {
                let c0 = self.index(0);
                return self.elem(v, &c0);
            }
        }
        Err(format!("internal: %{} is not a per-row value here", self.g.name_of(v)))
    }

    fn row_value(&mut self, v: ValueId) -> R<String> {
        self.row_or_load(v, 0)
    }

    /// `scf.for c in 0..cols` with f32 accumulators; returns their final values.
    fn row_loop<const N: usize>(
        &mut self,
        cols: usize,
        init: &[String; N],
        body: impl FnOnce(&mut Self, &str, &[String]) -> R<Vec<String>>,
    ) -> R<[String; N]> {
        let end = self.index(cols);
        self.row_loop_to(&end, init, body)
    }

    fn row_loop_to<const N: usize>(
        &mut self,
        end: &str,
        init: &[String; N],
        body: impl FnOnce(&mut Self, &str, &[String]) -> R<Vec<String>>,
    ) -> R<[String; N]> {
        let (c0, c1) = (self.index(0), self.index(1));
        let res = self.fresh();
        let col = self.fresh().replace("%v", "%col");
        let accs: Vec<String> = (0..N).map(|k| format!("{res}_a{k}")).collect();
        let iters: Vec<String> = accs.iter().zip(init).map(|(a, i)| format!("{a} = {i}")).collect();
        let tys = vec!["f32"; N].join(", ");
        let name = if N == 1 { res.clone() } else { format!("{res}:{N}") };
        self.line(&format!(
            "{name} = scf.for {col} = {c0} to {end} step {c1} iter_args({}) -> ({tys}) {{",
            iters.join(", ")
        ));
        self.indent += 2;
        self.elem_vals.push(HashMap::new());
        self.row_vals.push(HashMap::new());
        let ys = body(self, &col, &accs)?;
        self.line(&format!("scf.yield {} : {tys}", ys.join(", ")));
        self.row_vals.pop();
        self.elem_vals.pop();
        self.indent -= 2;
        self.line("}");
        let outs: Vec<String> = if N == 1 { vec![res] } else { (0..N).map(|k| format!("{res}#{k}")).collect() };
        Ok(outs.try_into().expect("N results"))
    }

    /// Element `col` (of the current row) of value `v`, as an f32 SSA value.
    fn elem(&mut self, v: ValueId, col: &str) -> R<String> {
        let key = (v, col.to_string());
        if let Some(x) = self.elem_vals.iter().rev().find_map(|m| m.get(&key).cloned()) {
            return Ok(x);
        }
        if let Some(x) = self.lookup_row(&format!("v{}", v.0)) {
            return Ok(x);
        }
        let x = match self.producer.get(&v).copied() {
            None => self.load(v, col)?,
            Some(i) => self.node_elem(i, col)?,
        };
        self.elem_vals.last_mut().expect("scopes").insert(key, x.clone());
        Ok(x)
    }

    fn node_elem(&mut self, i: usize, col: &str) -> R<String> {
        let g = self.g;
        let n = &g.nodes[i];
        let dt = g.ty(n.output()).dtype;
        let key = |s: &str| format!("n{i}:{s}");
        let row = |e: &Self, s: &str| e.lookup_row(&key(s)).ok_or_else(|| format!("internal: no {s} for node {i}"));
        let v = match n.op {
            Op::Full => {
                let x = n.attrs.float("value").unwrap_or(0.0);
                self.fconst(x)
            }
            Op::Softmax => {
                let (m, s, vis) = (row(self, "max")?, row(self, "sum")?, row(self, "visible")?);
                let x = self.elem(n.inputs[0], col)?;
                let d = self.bin("subf", &x, &m);
                let ex = self.un("math.exp", &d);
                let p = self.bin("divf", &ex, &s);
                let inside = self.emit(&format!("arith.cmpi ult, {col}, {vis} : index"));
                let zero = self.fconst(0.0);
                self.emit(&format!("arith.select {inside}, {p}, {zero} : f32"))
            }
            Op::CrossEntropyGrad => {
                let (m, s, t, dy) = (row(self, "max")?, row(self, "sum")?, row(self, "target")?, row(self, "dy")?);
                let x = self.elem(n.inputs[0], col)?;
                let d = self.bin("subf", &x, &m);
                let ex = self.un("math.exp", &d);
                let p = self.bin("divf", &ex, &s);
                let hit = self.emit(&format!("arith.cmpi eq, {col}, {t} : index"));
                let (one, zero) = (self.fconst(1.0), self.fconst(0.0));
                let oh = self.emit(&format!("arith.select {hit}, {one}, {zero} : f32"));
                let q = self.bin("subf", &p, &oh);
                self.bin("mulf", &q, &dy)
            }
            Op::LayerNorm | Op::RmsNorm => {
                let (mean, rstd) = (row(self, "mean")?, row(self, "rstd")?);
                let x = self.elem(n.inputs[0], col)?;
                let gm = self.elem(n.inputs[1], col)?;
                let d = self.bin("subf", &x, &mean);
                let xh = self.bin("mulf", &d, &rstd);
                let y = self.bin("mulf", &xh, &gm);
                if n.op == Op::LayerNorm {
                    let b = self.elem(n.inputs[2], col)?;
                    self.bin("addf", &y, &b)
                } else {
                    y
                }
            }
            Op::LayerNormGrad | Op::RmsNormGrad => {
                let (mean, rstd, mg, mgx) =
                    (row(self, "mean")?, row(self, "rstd")?, row(self, "mean_g")?, row(self, "mean_gx")?);
                let x = self.elem(n.inputs[0], col)?;
                let gm = self.elem(n.inputs[1], col)?;
                let dy = self.elem(n.inputs[2], col)?;
                let gg = self.bin("mulf", &dy, &gm);
                let d = self.bin("subf", &x, &mean);
                let xh = self.bin("mulf", &d, &rstd);
                let cg = if n.op == Op::LayerNormGrad { self.bin("subf", &gg, &mg) } else { gg };
                let t = self.bin("mulf", &xh, &mgx);
                let u = self.bin("subf", &cg, &t);
                self.bin("mulf", &rstd, &u)
            }
            Op::Rope => {
                let Form::Rows { cols, .. } = self.form else { return Err("rope runs in a rows kernel".into()) };
                let half = cols / 2;
                let theta = n.attrs.float("theta").unwrap_or(10000.0);
                let pos = row(self, "pos")?;
                let hc = self.index(half);
                let first = self.emit(&format!("arith.cmpi ult, {col}, {hc} : index"));
                let i = self.iop("remui", col, &hc);
                let partner_hi = self.iop("addi", col, &hc);
                let partner_lo = self.iop("subi", col, &hc);
                let partner = self.emit(&format!("arith.select {first}, {partner_hi}, {partner_lo} : index"));
                // inv_freq(i) = theta^(-2i/D) = exp(i * (-2 ln theta / D)); the angle and its
                // sine and cosine in f64: positions run to many thousands of radians, where
                // f32 angles are off by 1e-4.
                let ii = self.emit(&format!("arith.index_cast {i} : index to i64"));
                let fi = self.emit(&format!("arith.sitofp {ii} : i64 to f64"));
                let k =
                    self.emit(&format!("arith.constant 0x{:016X} : f64", (-2.0 * theta.ln() / cols as f64).to_bits()));
                let e = self.emit(&format!("arith.mulf {fi}, {k} : f64"));
                let inv = self.emit(&format!("math.exp {e} : f64"));
                let ang = self.emit(&format!("arith.mulf {pos}, {inv} : f64"));
                let c64 = self.emit(&format!("math.cos {ang} : f64"));
                let s64 = self.emit(&format!("math.sin {ang} : f64"));
                let c = self.emit(&format!("arith.truncf {c64} : f64 to f32"));
                let s = self.emit(&format!("arith.truncf {s64} : f64 to f32"));
                let x = self.elem(n.inputs[0], col)?;
                let xp = self.elem(n.inputs[0], &partner)?;
                let xc = self.bin("mulf", &x, &c);
                let ps = self.bin("mulf", &xp, &s);
                let minus = self.bin("subf", &xc, &ps);
                let plus = self.bin("addf", &xc, &ps);
                self.emit(&format!("arith.select {first}, {minus}, {plus} : f32"))
            }
            Op::ReduceSum | Op::ReduceMean | Op::ReduceMax | Op::CrossEntropy => {
                return self.lookup_row(&format!("v{}", n.output().0)).ok_or_else(|| {
                    format!(
                        "internal: `{}` is read before its loop (at {col}; row scopes {:?})",
                        n.op.name(),
                        self.row_vals
                    )
                });
            }
            _ => {
                let ins: Vec<String> = n.inputs.iter().map(|&v| self.elem(v, col)).collect::<R<Vec<String>>>()?;
                self.elementwise(n, &ins)?
            }
        };
        Ok(self.round(v, dt))
    }

    /// An elementwise op on f32 operands.
    fn elementwise(&mut self, n: &Node, ins: &[String]) -> R<String> {
        let a = ins.first().cloned().unwrap_or_default();
        let b = ins.get(1).cloned().unwrap_or_default();
        Ok(match n.op {
            Op::Add => self.bin("addf", &a, &b),
            Op::Sub => self.bin("subf", &a, &b),
            Op::Mul => self.bin("mulf", &a, &b),
            Op::Div => self.bin("divf", &a, &b),
            Op::Maximum => self.bin("maximumf", &a, &b),
            Op::Neg => self.un("arith.negf", &a),
            Op::Exp => self.un("math.exp", &a),
            Op::Log => self.un("math.log", &a),
            Op::Sqrt => self.un("math.sqrt", &a),
            Op::Rsqrt => {
                let s = self.un("math.sqrt", &a);
                let one = self.fconst(1.0);
                self.bin("divf", &one, &s)
            }
            Op::Tanh => self.un("math.tanh", &a),
            Op::Cast => a,
            Op::Silu => {
                let s = self.sigmoid(&a);
                self.bin("mulf", &a, &s)
            }
            Op::SiluGrad => {
                // s (1 + x (1 - s)) * dy
                let s = self.sigmoid(&a);
                let one = self.fconst(1.0);
                let oms = self.bin("subf", &one, &s);
                let xo = self.bin("mulf", &a, &oms);
                let t = self.bin("addf", &one, &xo);
                let d = self.bin("mulf", &s, &t);
                self.bin("mulf", &d, &b)
            }
            Op::Gelu | Op::GeluGrad => {
                let tanh = n.attrs.choice_or_default::<GeluApproximation>("approximate") == GeluApproximation::Tanh;
                let d = self.gelu(&a, tanh, n.op == Op::GeluGrad);
                if n.op == Op::GeluGrad {
                    self.bin("mulf", &d, &b)
                } else {
                    d
                }
            }
            other => return Err(format!("`{}` has no kernel lowering", other.name())),
        })
    }

    fn sigmoid(&mut self, x: &str) -> String {
        let nx = self.un("arith.negf", x);
        let e = self.un("math.exp", &nx);
        let one = self.fconst(1.0);
        let d = self.bin("addf", &one, &e);
        self.bin("divf", &one, &d)
    }

    /// gelu(x), or its derivative.
    fn gelu(&mut self, x: &str, tanh: bool, derivative: bool) -> String {
        let half = self.fconst(0.5);
        let one = self.fconst(1.0);
        if tanh {
            let c = self.fconst((2.0 / std::f64::consts::PI).sqrt());
            let k = self.fconst(0.044715);
            let x2 = self.bin("mulf", x, x);
            let x3 = self.bin("mulf", &x2, x);
            let kx3 = self.bin("mulf", &k, &x3);
            let inner = self.bin("addf", x, &kx3);
            let u = self.bin("mulf", &c, &inner);
            let t = self.un("math.tanh", &u);
            let opt = self.bin("addf", &one, &t);
            if !derivative {
                let hx = self.bin("mulf", &half, x);
                return self.bin("mulf", &hx, &opt);
            }
            // 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3k x^2)
            let a = self.bin("mulf", &half, &opt);
            let t2 = self.bin("mulf", &t, &t);
            let omt2 = self.bin("subf", &one, &t2);
            let k3 = self.fconst(3.0 * 0.044715);
            let k3x2 = self.bin("mulf", &k3, &x2);
            let p = self.bin("addf", &one, &k3x2);
            let hx = self.bin("mulf", &half, x);
            let q = self.bin("mulf", &hx, &omt2);
            let q = self.bin("mulf", &q, &c);
            let q = self.bin("mulf", &q, &p);
            self.bin("addf", &a, &q)
        } else {
            let r2 = self.fconst(std::f64::consts::FRAC_1_SQRT_2);
            let xs = self.bin("mulf", x, &r2);
            let erf = self.un("math.erf", &xs);
            let ope = self.bin("addf", &one, &erf);
            let cdf = self.bin("mulf", &half, &ope);
            if !derivative {
                return self.bin("mulf", x, &cdf);
            }
            // cdf + x pdf, pdf = exp(-x^2 / 2) / sqrt(2 pi)
            let x2 = self.bin("mulf", x, x);
            let nh = self.fconst(-0.5);
            let e = self.bin("mulf", &x2, &nh);
            let ex = self.un("math.exp", &e);
            let k = self.fconst(1.0 / (2.0 * std::f64::consts::PI).sqrt());
            let pdf = self.bin("mulf", &ex, &k);
            let xp = self.bin("mulf", x, &pdf);
            self.bin("addf", &cdf, &xp)
        }
    }
}
