//! The `.tir` text format: grammar, parser and canonical printer.
//!
//! ```text
//! file      := line*                      one item per line; blank lines allowed
//! line      := item? comment?
//! comment   := '#' any-text-to-end-of-line
//! item      := 'graph' NAME                 first item, exactly once
//!            | 'mesh' AXIS '=' INT (',' AXIS '=' INT)*      at most once, before arguments
//!            | ('param' | 'input' | 'state') VALUE ':' TYPE ANNOT?   arguments, before nodes
//!            | RESULT (',' RESULT)* '=' OP '(' VALUES? ')' ATTRS? ANNOT?   one node
//! RESULT    := VALUE ':' TYPE                    a node's results, in the op's order
//!            | 'output' VALUE ANNOT? (',' VALUE ANNOT?)*              last item, exactly once
//! VALUES    := VALUE (',' VALUE)*
//! ANNOT     := '[' NOTE (',' NOTE)* ']'         what the program says about the item (below)
//! VALUE     := '%' NAME
//! NAME      := [A-Za-z0-9_.]+
//! AXIS      := [A-Za-z_][A-Za-z0-9_]*
//! TYPE      := DTYPE '[' (INT (',' INT)*)? ']' SHARDING?  f32[2, 16, 64]; f32[] is a scalar
//! SHARDING  := '@' '[' (DIM (',' DIM)*)? ']' ('partial' '(' AXIS (',' AXIS)* ')')?
//! DIM       := '_' | AXIS ('*' AXIS)*               see crate::sharding
//! DTYPE     := 'f32' | 'bf16' | 'f16' | 'i32' | 'i64'
//! ATTRS     := '{' ATTR (',' ATTR)* '}'
//! ATTR      := IDENT '=' ATTRVALUE
//! ATTRVALUE := 'true' | 'false' | INT | FLOAT | STRING | '[' (INT (',' INT)*)? ']' | DTYPE
//! FLOAT     := a decimal with '.' or an exponent (1.0, 1e-5, -0.5), or inf, -inf, NaN
//! STRING    := '"' (char | '\"' | '\\')* '"'
//! ```
//!
//! Annotations ([`crate::program`]); absent ones are the defaults (a parameter whole, an input
//! or state of no particular role, a node of the forward phase made by the model, no layer):
//! ```text
//! argument NOTE := 'layer' INT
//!                | 'init' ('normal' | 'residual' | 'zeros' | 'ones')   how a fresh run starts it
//!                | 'split' AXIS INT                  tensor-parallel chunk along a dim
//!                | 'flat-shard' AXIS '[' INTS ']'    ZeRO-3 flat shard of a tensor of that shape
//!                | ('adam-m' | 'adam-v') VALUE       an AdamW moment of that parameter
//!                | 'tokens' | 'targets' | 'learning-rate' | 'step-number'
//! node NOTE     := 'layer' INT | 'backward' | 'optimizer'          phase ('forward' is the default)
//!                | 'rule' STRING                     made by this sharding rule
//!                | 'adjoint' VALUE                   part of the adjoint of that value's node
//!                | 'step' STEP_RULE                  made by the training-step pass...
//!                | 'zero' INT                        ... for a step of this ZeRO stage
//!                | 'of' VALUE                        ... working on this parameter
//! output NOTE   := 'loss' | 'logits' | 'grad-norm' | 'gradient' VALUE | 'update' VALUE
//! ```
//!
//! Every value is defined before it is used, and its declared type is the one the op table
//! gives it (checked by [`crate::verify`], not here). An example:
//!
//! ```text
//! graph mlp
//! param %w: f32[4, 8]
//! input %x: f32[2, 4]
//! %h: f32[2, 8] = matmul(%x, %w)
//! %y: f32[2, 8] = gelu(%h) {approximate = "tanh"}
//! output %y
//! ```
//!
//! The printer is canonical: the same graph always prints to the same bytes, attributes sorted
//! by name, floats in Rust's shortest round-trip form, so `parse(print(g)) == g`.
//!
//! The parser never panics. On malformed input it returns a [`Diagnostic`] with the 1-based line
//! and column of the offending token and a sentence saying what was expected.

use crate::attrs::{Attr, Attrs};
use crate::graph::{Arg, ArgKind, Graph, Node, Value, ValueId};
use crate::mesh::{is_identifier, Mesh, MeshAxis};
use crate::ops::Op;
use crate::program::{
    ArgRole, FlatShard, Init, Moment, Origin, Output, OutputRole, ParamLayout, Phase, Split, StepRule, ZeroStage,
};
use crate::sharding::Sharding;
use crate::types::{DType, TensorType};
use std::collections::HashMap;
use std::fmt::Write;

/// A parse error located in the source.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{line}:{col}: {message}")]
pub struct Diagnostic {
    /// 1-based line.
    pub line: usize,
    /// 1-based column (in characters).
    pub col: usize,
    /// Length of the offending token in characters (at least 1), for underlining.
    pub len: usize,
    pub message: String,
}

/// Prints a graph in the canonical text form.
pub fn print(g: &Graph) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "graph {}", g.name);
    print_items(&mut out, g, "");
    out
}

/// Everything after the `graph` line, each line indented by `indent` (a fused node's body is
/// printed with its kernel's graph one level in, between `{` and `}`).
fn print_items(out: &mut String, g: &Graph, indent: &str) {
    if !g.mesh.axes.is_empty() {
        let _ = writeln!(out, "{indent}mesh {}", g.mesh);
    }
    for a in &g.args {
        let v = g.value(a.value);
        let mut notes = arg_notes(g, &a.role);
        notes.extend(v.layer.map(|l| format!("layer {l}")));
        let _ =
            writeln!(out, "{indent}{} %{}: {}{}{}", a.kind.keyword(), v.name, v.ty, sharding_suffix(v), annot(&notes));
    }
    for n in &g.nodes {
        out.push_str(indent);
        out.push_str(&print_node(g, n));
        if let Some(body) = &n.body {
            out.push_str(" {\n");
            print_items(out, body, &format!("{indent}  "));
            out.push_str(indent);
            out.push('}');
        }
        out.push('\n');
    }
    let outs: Vec<String> =
        g.outputs.iter().map(|o| format!("%{}{}", g.name_of(o.value), annot(&output_notes(g, &o.role)))).collect();
    let _ = writeln!(out, "{indent}output {}", outs.join(", "));
}

/// `%name` of a value an annotation names, or `#id` when it does not exist (a broken JSON graph
/// being reported by the verifier).
fn vref(g: &Graph, v: ValueId) -> String {
    match g.values.get(v.index()) {
        Some(val) => format!("%{}", val.name),
        None => format!("#{}", v.0),
    }
}

fn annot(notes: &[String]) -> String {
    if notes.is_empty() {
        String::new()
    } else {
        format!(" [{}]", notes.join(", "))
    }
}

fn arg_notes(g: &Graph, role: &ArgRole) -> Vec<String> {
    match role {
        ArgRole::Other => vec![],
        ArgRole::Param(layout) => {
            let mut v = Vec::new();
            if layout.init != Init::Auto {
                v.push(format!("init {}", layout.init.keyword()));
            }
            if let Some(s) = &layout.split {
                v.push(format!("split {} {}", s.axis, s.dim));
            }
            if let Some(f) = &layout.flat_shard {
                let dims: Vec<String> = f.shape.iter().map(|d| d.to_string()).collect();
                v.push(format!("flat-shard {} [{}]", f.axis, dims.join(", ")));
            }
            v
        }
        ArgRole::Moment { param, moment } => vec![format!("{} {}", moment.keyword(), vref(g, *param))],
        ArgRole::Tokens => vec!["tokens".into()],
        ArgRole::Targets => vec!["targets".into()],
        ArgRole::LearningRate => vec!["learning-rate".into()],
        ArgRole::StepNumber => vec!["step-number".into()],
    }
}

fn output_notes(g: &Graph, role: &OutputRole) -> Vec<String> {
    match role {
        OutputRole::Other => vec![],
        OutputRole::Loss => vec!["loss".into()],
        OutputRole::Logits => vec!["logits".into()],
        OutputRole::GradNorm => vec!["grad-norm".into()],
        OutputRole::Gradient(p) => vec![format!("gradient {}", vref(g, *p))],
        OutputRole::Update(a) => vec![format!("update {}", vref(g, *a))],
    }
}

fn node_notes(g: &Graph, n: &Node) -> Vec<String> {
    let mut v = Vec::new();
    if n.phase != Phase::Forward {
        v.push(n.phase.name().to_string());
    }
    match &n.origin {
        Origin::Model => {}
        Origin::Rule(r) => v.push(format!("rule {}", Attr::Str(r.clone()))),
        Origin::Adjoint(x) => v.push(format!("adjoint {}", vref(g, *x))),
        Origin::Step { rule, zero, param } => {
            v.push(format!("step {}", rule.name()));
            if *zero != ZeroStage::Replicated {
                v.push(format!("zero {zero}"));
            }
            if let Some(p) = param {
                v.push(format!("of {}", vref(g, *p)));
            }
        }
    }
    v.extend(
        n.outputs.first().and_then(|&o| g.values.get(o.index())).and_then(|x| x.layer).map(|l| format!("layer {l}")),
    );
    v
}

/// One node as its line of `.tir` (used in verifier messages too).
pub fn print_node(g: &Graph, n: &Node) -> String {
    let results: Vec<String> = n
        .outputs
        .iter()
        .map(|&o| {
            let v = g.value(o);
            format!("%{}: {}{}", v.name, v.ty, sharding_suffix(v))
        })
        .collect();
    let args: Vec<String> = n.inputs.iter().map(|&i| format!("%{}", g.name_of(i))).collect();
    let mut s = format!("{} = {}({})", results.join(", "), n.op.name(), args.join(", "));
    if !n.attrs.is_empty() {
        let attrs: Vec<String> = n.attrs.iter().map(|(k, a)| format!("{k} = {a}")).collect();
        let _ = write!(s, " {{{}}}", attrs.join(", "));
    }
    s.push_str(&annot(&node_notes(g, n)));
    s
}

fn sharding_suffix(v: &Value) -> String {
    v.sharding.as_ref().map(|s| format!(" {s}")).unwrap_or_default()
}

/// Is `s` a valid value (or graph) name?
pub fn is_value_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

/// Parses a `.tir` source into a graph.
pub fn parse(src: &str) -> Result<Graph, Diagnostic> {
    parse_with_source_map(src).map(|(g, _)| g)
}

/// Where each value of a parsed graph was defined, for rendering verifier errors at their line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceMap {
    /// 1-based line of the definition of each value, indexed by [`ValueId`].
    pub value_lines: Vec<usize>,
}

/// Parses a `.tir` source and records the line of every definition.
pub fn parse_with_source_map(src: &str) -> Result<(Graph, SourceMap), Diagnostic> {
    let mut p = Parser::default();
    let g = p.run(src)?;
    Ok((g, SourceMap { value_lines: p.lines }))
}

#[derive(Default)]
struct Parser {
    graph: Option<Graph>,
    names: HashMap<String, ValueId>,
    lines: Vec<usize>,
    saw_output: bool,
    /// Parsing a fused node's body: the `graph` line is implied, `}` ends it.
    body: bool,
}

/// The index of the `}` line that closes the body opened just before `lines[from]`.
fn closing_brace(lines: &[(usize, &str)], from: usize) -> Option<usize> {
    let mut depth = 1usize;
    for (i, &(_, l)) in lines.iter().enumerate().skip(from) {
        let t = l.split('#').next().unwrap_or("").trim();
        if t == "}" {
            depth -= 1;
            if depth == 0 {
                return Some(i);
            }
        } else if t.starts_with('%') && t.ends_with('{') {
            depth += 1;
        }
    }
    None
}

/// A cursor over one line.
struct Cursor {
    line_no: usize,
    chars: Vec<char>,
    pos: usize,
}

type PResult<T> = Result<T, Diagnostic>;

impl Cursor {
    fn new(line_no: usize, line: &str) -> Self {
        // Strip the comment (no '#' can occur inside a valid token other than a string).
        let mut chars: Vec<char> = Vec::new();
        let mut in_string = false;
        let mut escaped = false;
        for c in line.chars() {
            if in_string {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '"' {
                    in_string = false;
                }
            } else if c == '"' {
                in_string = true;
            } else if c == '#' {
                break;
            }
            chars.push(c);
        }
        Cursor { line_no, chars, pos: 0 }
    }

    fn err_at(&self, col0: usize, len: usize, message: impl Into<String>) -> Diagnostic {
        Diagnostic { line: self.line_no, col: col0 + 1, len: len.max(1), message: message.into() }
    }

    fn err(&self, message: impl Into<String>) -> Diagnostic {
        let len = self.peek_token_len();
        self.err_at(self.pos, len, message)
    }

    fn peek_token_len(&self) -> usize {
        let rest = &self.chars[self.pos.min(self.chars.len())..];
        let n = rest.iter().take_while(|c| !c.is_whitespace() && !",(){}[]:=".contains(**c)).count();
        n.max(1)
    }

    fn skip_ws(&mut self) {
        while self.pos < self.chars.len() && self.chars[self.pos].is_whitespace() {
            self.pos += 1;
        }
    }

    fn at_end(&mut self) -> bool {
        self.skip_ws();
        self.pos >= self.chars.len()
    }

    fn peek(&mut self) -> Option<char> {
        self.skip_ws();
        self.chars.get(self.pos).copied()
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: char, what: &str) -> PResult<()> {
        if self.eat(c) {
            Ok(())
        } else if self.at_end() {
            Err(self.err_at(self.chars.len(), 1, format!("expected `{c}` {what}, found end of line")))
        } else {
            let found = self.describe_next();
            Err(self.err(format!("expected `{c}` {what}, found {found}")))
        }
    }

    fn describe_next(&mut self) -> String {
        if self.at_end() {
            return "end of line".into();
        }
        let len = self.peek_token_len();
        let tok: String = self.chars[self.pos..self.pos + len.min(self.chars.len() - self.pos)].iter().collect();
        format!("`{tok}`")
    }

    /// A run of characters accepted by `ok`; may be empty.
    fn word(&mut self, ok: impl Fn(char) -> bool) -> (usize, String) {
        self.skip_ws();
        let start = self.pos;
        while self.pos < self.chars.len() && ok(self.chars[self.pos]) {
            self.pos += 1;
        }
        (start, self.chars[start..self.pos].iter().collect())
    }

    fn ident(&mut self, what: &str) -> PResult<(usize, String)> {
        let (start, w) = self.word(|c| c.is_ascii_alphanumeric() || c == '_');
        if w.is_empty() {
            let found = self.describe_next();
            return Err(self.err(format!("expected {what}, found {found}")));
        }
        Ok((start, w))
    }

    fn value_ref(&mut self, what: &str) -> PResult<(usize, String)> {
        self.skip_ws();
        let start = self.pos;
        if !self.eat('%') {
            let found = self.describe_next();
            return Err(self.err(format!("expected {what} (a `%name`), found {found}")));
        }
        let (_, name) = self.word(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
        if name.is_empty() {
            return Err(self.err_at(start, 1, format!("`%` must be followed by a name ({what})")));
        }
        Ok((start, name))
    }

    fn int(&mut self, what: &str) -> PResult<i64> {
        let (start, w) = self.word(|c| c.is_ascii_digit() || c == '-');
        w.parse::<i64>().map_err(|_| {
            if w.is_empty() {
                let found = self.describe_next();
                self.err(format!("expected {what} (an integer), found {found}"))
            } else {
                self.err_at(start, w.chars().count(), format!("`{w}` is not an integer ({what})"))
            }
        })
    }

    /// An annotation keyword (letters, digits, `_`, `-`).
    fn keyword(&mut self, what: &str) -> PResult<(usize, String)> {
        let (start, w) = self.word(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if w.is_empty() {
            let found = self.describe_next();
            return Err(self.err(format!("expected {what}, found {found}")));
        }
        Ok((start, w))
    }

    fn usize(&mut self, what: &str) -> PResult<usize> {
        self.skip_ws();
        let start = self.pos;
        let v = self.int(what)?;
        usize::try_from(v)
            .map_err(|_| self.err_at(start, self.pos - start, format!("{what} must not be negative, found {v}")))
    }

    fn ty(&mut self) -> PResult<TensorType> {
        let (start, name) = self.ident("a type such as f32[2, 3]")?;
        let dtype = DType::from_name(&name).ok_or_else(|| {
            self.err_at(start, name.len(), format!("unknown dtype `{name}`; expected one of f32, bf16, f16, i32, i64"))
        })?;
        Ok(TensorType::new(dtype, self.shape("to open the shape")?))
    }

    /// `[d0, d1, ...]`: a shape's extents.
    fn shape(&mut self, what: &str) -> PResult<Vec<usize>> {
        self.expect('[', what)?;
        let mut shape = Vec::new();
        if !self.eat(']') {
            loop {
                shape.push(self.usize("a dimension extent")?);
                if self.eat(']') {
                    break;
                }
                self.expect(',', "or `]` in the shape")?;
            }
        }
        Ok(shape)
    }

    /// An optional `@[dims] partial(axes)` after a type.
    fn sharding(&mut self) -> PResult<Option<Sharding>> {
        if !self.eat('@') {
            return Ok(None);
        }
        self.expect('[', "to open the sharding (`@[dp, _, tp]`)")?;
        let mut dims = Vec::new();
        if !self.eat(']') {
            loop {
                let mut axes = Vec::new();
                loop {
                    let (_, w) = self.ident("a mesh axis or `_`")?;
                    if w == "_" && axes.is_empty() {
                        break;
                    }
                    axes.push(w);
                    if !self.eat('*') {
                        break;
                    }
                }
                dims.push(axes);
                if self.eat(']') {
                    break;
                }
                self.expect(',', "or `]` in the sharding")?;
            }
        }
        let mut partial = Vec::new();
        let save = self.pos;
        let (_, w) = self.word(|ch| ch.is_ascii_alphabetic());
        if w == "partial" {
            self.expect('(', "after `partial`")?;
            loop {
                partial.push(self.ident("a mesh axis")?.1);
                if self.eat(')') {
                    break;
                }
                self.expect(',', "or `)` in `partial(...)`")?;
            }
        } else {
            self.pos = save;
        }
        Ok(Some(Sharding { dims, partial }))
    }

    fn attr_value(&mut self) -> PResult<Attr> {
        match self.peek() {
            Some('"') => {
                let start = self.pos;
                self.pos += 1;
                let mut s = String::new();
                loop {
                    match self.chars.get(self.pos) {
                        None => return Err(self.err_at(start, 1, "unterminated string")),
                        Some('"') => {
                            self.pos += 1;
                            break;
                        }
                        Some('\\') => {
                            match self.chars.get(self.pos + 1) {
                                Some(c @ ('"' | '\\')) => s.push(*c),
                                _ => {
                                    return Err(self.err_at(
                                        self.pos,
                                        2,
                                        "unknown escape; only \\\" and \\\\ are allowed",
                                    ))
                                }
                            }
                            self.pos += 2;
                        }
                        Some(c) => {
                            s.push(*c);
                            self.pos += 1;
                        }
                    }
                }
                Ok(Attr::Str(s))
            }
            Some('[') => {
                self.pos += 1;
                let mut v = Vec::new();
                if !self.eat(']') {
                    loop {
                        v.push(self.int("a list element")?);
                        if self.eat(']') {
                            break;
                        }
                        self.expect(',', "or `]` in the list")?;
                    }
                }
                Ok(Attr::Ints(v))
            }
            Some(_) => {
                let (start, w) = self.word(|c| c.is_ascii_alphanumeric() || "-+._".contains(c));
                let len = w.chars().count();
                if w.is_empty() {
                    let found = self.describe_next();
                    return Err(self.err(format!("expected an attribute value, found {found}")));
                }
                if w == "true" || w == "false" {
                    return Ok(Attr::Bool(w == "true"));
                }
                if let Some(d) = DType::from_name(&w) {
                    return Ok(Attr::DType(d));
                }
                if let Ok(i) = w.parse::<i64>() {
                    return Ok(Attr::Int(i));
                }
                let looks_float = w.chars().any(|c| c.is_ascii_digit()) || matches!(w.as_str(), "inf" | "-inf" | "NaN");
                match w.parse::<f64>() {
                    Ok(x) if looks_float => Ok(Attr::Float(x)),
                    _ => Err(self.err_at(
                        start,
                        len,
                        format!("`{w}` is not a value: expected true, false, a number, a string, a list or a dtype"),
                    )),
                }
            }
            None => Err(self.err_at(self.chars.len(), 1, "expected an attribute value, found end of line")),
        }
    }
}

impl Parser {
    fn run(&mut self, src: &str) -> PResult<Graph> {
        let lines: Vec<(usize, &str)> = src.lines().enumerate().map(|(i, l)| (i + 1, l)).collect();
        self.run_lines(&lines)
    }

    /// Parses numbered lines (a whole file, or a fused node's body between its braces).
    fn run_lines(&mut self, lines: &[(usize, &str)]) -> PResult<Graph> {
        let mut last_line = lines.first().map_or(1, |l| l.0);
        let mut i = 0;
        while i < lines.len() {
            let (line_no, line) = lines[i];
            i += 1;
            let mut c = Cursor::new(line_no, line);
            if c.at_end() {
                continue;
            }
            last_line = line_no;
            let opens_body = self.item(&mut c)?;
            if !c.at_end() {
                let found = c.describe_next();
                return Err(c.err(format!("unexpected {found} after the end of the item")));
            }
            if opens_body {
                let end = closing_brace(lines, i)
                    .ok_or_else(|| c.err("this fused node's body is not closed: expected a line holding only `}`"))?;
                let node = self.graph.as_mut().and_then(|g| g.nodes.last_mut()).expect("item() pushed the node");
                let mut sub = Parser {
                    graph: Some(Graph::new(node.attrs.str("kernel").unwrap_or("kernel"))),
                    ..Parser::default()
                };
                sub.body = true;
                let body = sub.run_lines(&lines[i..end])?;
                node.body = Some(Box::new(body));
                i = end + 1;
            }
        }
        let eof = |message: &str| Diagnostic { line: last_line, col: 1, len: 1, message: message.into() };
        let graph = self.graph.take().ok_or_else(|| eof("empty file: a .tir file starts with `graph NAME`"))?;
        if !self.saw_output {
            return Err(eof("missing `output %value, ...` line at the end of the graph"));
        }
        Ok(graph)
    }

    fn define(
        &mut self,
        c: &Cursor,
        start: usize,
        name: String,
        ty: TensorType,
        sharding: Option<Sharding>,
    ) -> PResult<ValueId> {
        let g = self.graph.as_mut().expect("checked by item()");
        if self.names.contains_key(&name) {
            return Err(c.err_at(
                start,
                name.len() + 1,
                format!("value `%{name}` is defined twice; SSA values have one definition"),
            ));
        }
        let id = ValueId(g.values.len() as u32);
        g.values.push(Value { name: name.clone(), ty, sharding, layer: None });
        self.names.insert(name, id);
        self.lines.push(c.line_no);
        Ok(id)
    }

    fn lookup(&self, c: &Cursor, start: usize, name: &str) -> PResult<ValueId> {
        self.names.get(name).copied().ok_or_else(|| {
            c.err_at(
                start,
                name.len() + 1,
                format!("use of undefined value `%{name}`; values must be defined before use"),
            )
        })
    }

    /// One line; true when it is a node that opens a body (`... {`).
    fn item(&mut self, c: &mut Cursor) -> PResult<bool> {
        if self.saw_output {
            return Err(c.err("nothing may follow the `output` line"));
        }
        if c.peek() == Some('%') {
            return self.node(c);
        }
        self.keyword_item(c).map(|()| false)
    }

    fn keyword_item(&mut self, c: &mut Cursor) -> PResult<()> {
        let (start, kw) = c.ident("`graph`, `mesh`, `param`, `input`, `state`, `output` or a `%value` definition")?;
        if self.graph.is_none() && kw != "graph" {
            return Err(c.err_at(start, kw.len(), format!("expected `graph NAME` as the first line, found `{kw}`")));
        }
        match kw.as_str() {
            "graph" => {
                if self.body {
                    return Err(c.err_at(start, kw.len(), "a fused node's body has no `graph` line"));
                }
                if self.graph.is_some() {
                    return Err(c.err_at(start, kw.len(), "a file holds one graph: `graph` appears twice"));
                }
                let (s, name) = c.word(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '.');
                if name.is_empty() {
                    let found = c.describe_next();
                    return Err(c.err_at(s, 1, format!("expected the graph's name after `graph`, found {found}")));
                }
                self.graph = Some(Graph::new(name));
                Ok(())
            }
            "mesh" => {
                let g = self.graph.as_ref().expect("checked above");
                if !g.mesh.axes.is_empty() || !g.args.is_empty() || !g.nodes.is_empty() {
                    return Err(c.err_at(start, 4, "`mesh` comes once, right after `graph`"));
                }
                let mut axes: Vec<MeshAxis> = Vec::new();
                loop {
                    let (s, name) = c.ident("a mesh axis name")?;
                    if !is_identifier(&name) {
                        return Err(c.err_at(s, name.len(), format!("mesh axis `{name}` must start with a letter or `_`")));
                    }
                    if axes.iter().any(|a| a.name == name) {
                        return Err(c.err_at(s, name.len(), format!("mesh axis `{name}` is named twice")));
                    }
                    c.expect('=', "after the mesh axis name")?;
                    let size = c.usize("the axis size")?;
                    if size == 0 {
                        return Err(c.err_at(c.pos - 1, 1, format!("mesh axis `{name}` has size 0; sizes must be at least 1")));
                    }
                    axes.push(MeshAxis { name, size });
                    if c.at_end() {
                        break;
                    }
                    c.expect(',', "between mesh axes")?;
                }
                self.graph.as_mut().expect("checked above").mesh = Mesh { axes };
                Ok(())
            }
            "param" | "input" | "state" => {
                if !self.graph.as_ref().expect("checked above").nodes.is_empty() {
                    return Err(c.err_at(start, kw.len(), "arguments (`param`, `input`, `state`) come before the first node"));
                }
                let (s, name) = c.value_ref("the argument's name")?;
                c.expect(':', "between the argument's name and its type")?;
                let ty = c.ty()?;
                let sharding = c.sharding()?;
                let kind = match kw.as_str() {
                    "param" => ArgKind::Param,
                    "state" => ArgKind::State,
                    _ => ArgKind::Input,
                };
                let (role, layer) = self.arg_notes(c, kind)?;
                let value = self.define(c, s, name, ty, sharding)?;
                let g = self.graph.as_mut().expect("checked above");
                g.values[value.index()].layer = layer;
                g.args.push(Arg { kind, value, role });
                Ok(())
            }
            "output" => {
                let mut outs = Vec::new();
                loop {
                    let (s, name) = c.value_ref("an output value")?;
                    let value = self.lookup(c, s, &name)?;
                    let role = self.output_notes(c)?;
                    outs.push(Output { value, role });
                    if c.at_end() {
                        break;
                    }
                    c.expect(',', "between output values")?;
                }
                self.graph.as_mut().expect("checked above").outputs = outs;
                self.saw_output = true;
                Ok(())
            }
            other => Err(c.err_at(
                start,
                other.len(),
                format!("unknown keyword `{other}`; a line is `graph`, `mesh`, `param`, `input`, `state`, `output` or `%name: type = op(...)`"),
            )),
        }
    }

    fn node(&mut self, c: &mut Cursor) -> PResult<bool> {
        if self.graph.is_none() {
            return Err(c.err("expected `graph NAME` as the first line"));
        }
        // One or more results: `%a: f32[2], %b: f32[3] = split(...)`.
        let mut results = Vec::new();
        loop {
            let (s, name) = c.value_ref("the defined value")?;
            c.expect(':', "and the result type after the value name (`%x: f32[2] = ...`)")?;
            let ty = c.ty()?;
            let sharding = c.sharding()?;
            results.push((s, name, ty, sharding));
            if !c.eat(',') {
                break;
            }
        }
        c.expect('=', "after the result type (or `,` and another result)")?;
        let (os, opname) = c.ident("an op name")?;
        let op = Op::from_name(&opname).ok_or_else(|| c.err_at(os, opname.len(), format!("unknown op `{opname}`")))?;
        c.expect('(', "to open the operand list")?;
        let mut inputs = Vec::new();
        if !c.eat(')') {
            loop {
                let (vs, vname) = c.value_ref("an operand")?;
                inputs.push(self.lookup(c, vs, &vname)?);
                if c.eat(')') {
                    break;
                }
                c.expect(',', "or `)` in the operand list")?;
            }
        }
        let mut attrs = Attrs::new();
        if c.eat('{') {
            loop {
                let (as_, aname) = c.ident("an attribute name")?;
                if attrs.get(&aname).is_some() {
                    return Err(c.err_at(as_, aname.len(), format!("attribute `{aname}` is given twice")));
                }
                c.expect('=', "after the attribute name")?;
                let v = c.attr_value()?;
                attrs.0.insert(aname, v);
                if c.eat('}') {
                    break;
                }
                c.expect(',', "or `}` in the attribute list")?;
            }
        }
        let (phase, origin, layer) = self.node_notes(c)?;
        let opens_body = c.eat('{');
        if opens_body != (op == Op::Fused) {
            return Err(if opens_body {
                c.err_at(c.pos - 1, 1, format!("only a `fused` node has a body; `{opname}` takes none"))
            } else {
                c.err("a `fused` node's body follows on the next lines: end this line with `{`")
            });
        }
        let mut outputs = Vec::new();
        for (s, name, ty, sharding) in results {
            outputs.push(self.define(c, s, name, ty, sharding)?);
        }
        let g = self.graph.as_mut().expect("checked above");
        for &o in &outputs {
            g.values[o.index()].layer = layer;
        }
        g.nodes.push(Node { op, inputs, attrs, outputs, phase, origin, body: None });
        Ok(opens_body)
    }

    /// Runs `note` on each annotation of an optional `[note, ...]` list.
    fn notes(
        &mut self,
        c: &mut Cursor,
        what: &str,
        mut note: impl FnMut(&mut Self, &mut Cursor, usize, &str) -> PResult<()>,
    ) -> PResult<()> {
        if !c.eat('[') {
            return Ok(());
        }
        loop {
            let (start, kw) = c.keyword(what)?;
            note(self, c, start, &kw)?;
            if c.eat(']') {
                return Ok(());
            }
            c.expect(',', "or `]` in the annotations")?;
        }
    }

    fn layer(c: &mut Cursor) -> PResult<u32> {
        let start = c.pos;
        let l = c.usize("the layer number")?;
        u32::try_from(l).map_err(|_| c.err_at(start, c.pos - start, format!("layer {l} is out of range")))
    }

    fn arg_notes(&mut self, c: &mut Cursor, kind: ArgKind) -> PResult<(ArgRole, Option<u32>)> {
        let mut role = kind.default_role();
        let mut layer = None;
        let mut layout = ParamLayout::default();
        let mut named_role = false;
        let what = "an argument annotation (`layer`, `split`, `flat-shard`, `adam-m`, `adam-v`, `tokens`, `targets`, `learning-rate`, `step-number`)";
        self.notes(c, what, |p, c, start, kw| {
            let mut set = |c: &Cursor, r: ArgRole| {
                if named_role {
                    return Err(c.err_at(start, kw.len(), format!("`{kw}`: the argument already has a role")));
                }
                named_role = true;
                role = r;
                Ok(())
            };
            let param_only = |c: &Cursor| {
                if kind == ArgKind::Param {
                    Ok(())
                } else {
                    Err(c.err_at(start, kw.len(), format!("`{kw}` describes a parameter, not a `{}`", kind.keyword())))
                }
            };
            match kw {
                "layer" => layer = Some(Self::layer(c)?),
                "init" => {
                    param_only(c)?;
                    let (ks, k) = c.keyword("an initialisation (normal, residual, zeros, ones)")?;
                    layout.init = Init::ALL.into_iter().find(|i| i.keyword() == k).ok_or_else(|| {
                        c.err_at(
                            ks,
                            k.len(),
                            format!("unknown initialisation `{k}`; one of auto, normal, residual, zeros, ones"),
                        )
                    })?;
                }
                "split" => {
                    param_only(c)?;
                    let axis = c.ident("the mesh axis of the split")?.1;
                    let dim = c.usize("the split dimension")?;
                    layout.split = Some(Split { axis, dim });
                }
                "flat-shard" => {
                    param_only(c)?;
                    let axis = c.ident("the mesh axis of the shard")?.1;
                    let shape = c.shape("to open the shape of the sharded tensor")?;
                    layout.flat_shard = Some(FlatShard { axis, shape });
                }
                "adam-m" | "adam-v" => {
                    if kind != ArgKind::State {
                        return Err(c.err_at(start, kw.len(), format!("`{kw}` describes a `state` argument")));
                    }
                    let (vs, name) = c.value_ref("the parameter the moment belongs to")?;
                    let param = p.lookup(c, vs, &name)?;
                    let moment = if kw == "adam-m" { Moment::AdamM } else { Moment::AdamV };
                    set(c, ArgRole::Moment { param, moment })?;
                }
                "tokens" | "targets" | "learning-rate" | "step-number" => {
                    if kind != ArgKind::Input {
                        return Err(c.err_at(start, kw.len(), format!("`{kw}` describes an `input` argument")));
                    }
                    set(
                        c,
                        match kw {
                            "tokens" => ArgRole::Tokens,
                            "targets" => ArgRole::Targets,
                            "learning-rate" => ArgRole::LearningRate,
                            _ => ArgRole::StepNumber,
                        },
                    )?;
                }
                other => return Err(c.err_at(start, other.len(), format!("unknown argument annotation `{other}`"))),
            }
            Ok(())
        })?;
        if kind == ArgKind::Param {
            role = ArgRole::Param(layout);
        }
        Ok((role, layer))
    }

    fn node_notes(&mut self, c: &mut Cursor) -> PResult<(Phase, Origin, Option<u32>)> {
        let (mut phase, mut origin, mut layer) = (Phase::Forward, Origin::Model, None);
        let mut zero: Option<ZeroStage> = None;
        let what = "a node annotation (`backward`, `optimizer`, `layer`, `rule`, `adjoint`, `step`, `zero`, `of`)";
        let mut zero_at = None;
        let mut of = None;
        self.notes(c, what, |p, c, start, kw| {
            let mut set = |c: &Cursor, o: Origin| {
                if origin != Origin::Model {
                    return Err(c.err_at(start, kw.len(), format!("`{kw}`: the node already has an origin")));
                }
                origin = o;
                Ok(())
            };
            match kw {
                "forward" | "backward" | "optimizer" => phase = kw.parse().expect("a phase name"),
                "layer" => layer = Some(Self::layer(c)?),
                "rule" => {
                    let Attr::Str(r) = c.attr_value()? else {
                        return Err(c.err("`rule` takes the rule's name as a string"));
                    };
                    set(c, Origin::Rule(r))?;
                }
                "adjoint" => {
                    let (vs, name) = c.value_ref("the forward value")?;
                    let v = p.lookup(c, vs, &name)?;
                    set(c, Origin::Adjoint(v))?;
                }
                "step" => {
                    let (rs, r) = c.keyword("a training-step rule")?;
                    let rule = StepRule::from_name(&r).ok_or_else(|| {
                        let all: Vec<&str> = StepRule::ALL.iter().map(|r| r.name()).collect();
                        c.err_at(rs, r.len(), format!("unknown training-step rule `{r}`; one of {}", all.join(", ")))
                    })?;
                    set(c, Origin::Step { rule, zero: ZeroStage::Replicated, param: None })?;
                }
                "of" => {
                    let (vs, name) = c.value_ref("the parameter the step's work is for")?;
                    of = Some((start, p.lookup(c, vs, &name)?));
                }
                "zero" => {
                    let s = c.pos;
                    let n = c.usize("the ZeRO stage")?;
                    let stage = u8::try_from(n).ok().and_then(ZeroStage::from_number);
                    zero = Some(
                        stage.ok_or_else(|| c.err_at(s, c.pos - s, format!("ZeRO stage {n} does not exist (0-3)")))?,
                    );
                    zero_at = Some(start);
                }
                other => return Err(c.err_at(start, other.len(), format!("unknown node annotation `{other}`"))),
            }
            Ok(())
        })?;
        if let Some(z) = zero {
            match &mut origin {
                Origin::Step { zero, .. } => *zero = z,
                _ => return Err(c.err_at(zero_at.unwrap_or(0), 4, "`zero` qualifies a `step` origin")),
            }
        }
        if let Some((at, v)) = of {
            match &mut origin {
                Origin::Step { param, .. } => *param = Some(v),
                _ => return Err(c.err_at(at, 2, "`of %param` qualifies a `step` origin")),
            }
        }
        Ok((phase, origin, layer))
    }

    fn output_notes(&mut self, c: &mut Cursor) -> PResult<OutputRole> {
        let mut role = OutputRole::Other;
        let what = "an output annotation (`loss`, `logits`, `grad-norm`, `gradient`, `update`)";
        self.notes(c, what, |p, c, start, kw| {
            if role != OutputRole::Other {
                return Err(c.err_at(start, kw.len(), format!("`{kw}`: the output already has a role")));
            }
            role = match kw {
                "loss" => OutputRole::Loss,
                "logits" => OutputRole::Logits,
                "grad-norm" => OutputRole::GradNorm,
                "gradient" | "update" => {
                    let (vs, name) = c.value_ref("the argument")?;
                    let v = p.lookup(c, vs, &name)?;
                    if kw == "gradient" {
                        OutputRole::Gradient(v)
                    } else {
                        OutputRole::Update(v)
                    }
                }
                other => return Err(c.err_at(start, other.len(), format!("unknown output annotation `{other}`"))),
            };
            Ok(())
        })?;
        Ok(role)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = "graph mlp\nparam %w: f32[4, 8]\ninput %x: f32[2, 4]\n%h: f32[2, 8] = matmul(%x, %w)\n%y: f32[2, 8] = gelu(%h) {approximate = \"tanh\"}\noutput %y\n";

    #[test]
    fn round_trips() {
        let g = parse(SRC).unwrap();
        assert_eq!(print(&g), SRC);
        assert_eq!(parse(&print(&g)).unwrap(), g);
    }

    #[test]
    fn errors_point_at_the_token() {
        let e = parse("graph g\ninput %x: f32[2]\n%y: f32[2] = frob(%x)\noutput %y\n").unwrap_err();
        assert_eq!((e.line, e.col), (3, 14));
        assert!(e.message.contains("unknown op `frob`"));
        let e = parse("graph g\n%y: f32[2] = neg(%x)\noutput %y\n").unwrap_err();
        assert_eq!((e.line, e.col), (2, 18));
        assert!(e.message.contains("undefined value `%x`"));
    }

    /// Every annotation the program tables have, printed canonically and read back.
    const ANNOTATED: &str = "graph step\nmesh dp=2, tp=2\n\
param %w: f32[2, 4] [split tp 1, layer 3]\n\
param %z: f32[2] [split tp 0, flat-shard dp [2, 2]]\n\
input %tokens: i64[2, 4] [tokens]\n\
input %targets: i64[2, 4] [targets]\n\
input %lr: f32[] [learning-rate]\n\
input %step: f32[] [step-number]\n\
state %w.adam_m: f32[2, 4] [adam-m %w, layer 3]\n\
state %w.adam_v: f32[2, 4] [adam-v %w]\n\
%a: f32[2, 4] = all_reduce(%w) {axis = \"tp\"} [rule \"tp/matmul-row\", layer 3]\n\
%b: f32[2, 4] = all_reduce(%a) {axis = \"tp\"} [backward, adjoint %a, layer 3]\n\
%c: f32[2, 4] = mul(%b, %lr) [backward, step all-reduce-gradients, of %w]\n\
%d: f32[2, 4] = sub(%w, %c) [optimizer, step adamw, zero 3, of %w]\n\
%n: f32[] = reduce_sum(%c) {dims = [0, 1]} [optimizer, step global-gradient-norm, zero 1]\n\
output %n [grad-norm], %d [update %w], %c [gradient %w], %b\n";

    #[test]
    fn annotations_round_trip() {
        let g = parse(ANNOTATED).unwrap();
        assert_eq!(print(&g), ANNOTATED);
        assert_eq!(parse(&print(&g)).unwrap(), g);
        let w = g.find("w").unwrap();
        assert_eq!(g.layer(w), Some(3));
        let sig = g.signature();
        assert_eq!(sig.moment(w, Moment::AdamV), g.find("w.adam_v"));
        assert_eq!(sig.update_of(w), Some(1));
        assert_eq!(sig.arg(&ArgRole::LearningRate), g.find("lr"));
        let z = g.arg_of(g.find("z").unwrap()).unwrap().role.param_layout().unwrap().clone();
        assert_eq!(z.flat_shard, Some(FlatShard { axis: "dp".into(), shape: vec![2, 2] }));
        assert_eq!(
            g.nodes[3].origin,
            Origin::Step { rule: StepRule::Update, zero: ZeroStage::Parameters, param: Some(w) }
        );
        assert_eq!(g.nodes[1].origin, Origin::Adjoint(g.find("a").unwrap()));
        crate::verify::verify(&g).unwrap();
    }

    #[test]
    fn annotation_errors_say_what_is_wrong() {
        let cases = [
            ("input %x: f32[2] [split tp 0]", "describes a parameter"),
            ("param %x: f32[2] [tokens]", "describes an `input`"),
            ("input %x: f32[2] [frob]", "unknown argument annotation `frob`"),
            ("input %x: i64[2] [tokens, targets]", "already has a role"),
            ("input %x: f32[2] [layer -1]", "must not be negative"),
        ];
        for (line, want) in cases {
            let src = format!("graph g\n{line}\noutput %x\n");
            let e = parse(&src).unwrap_err();
            assert!(e.message.contains(want), "{line}: {e}");
            assert_eq!(e.line, 2);
        }
        let e = parse("graph g\ninput %x: f32[2]\n%y: f32[2] = neg(%x) [zero 1]\noutput %y\n").unwrap_err();
        assert!(e.message.contains("qualifies a `step` origin"), "{e}");
        let e = parse("graph g\ninput %x: f32[2]\n%y: f32[2] = neg(%x) [step frob]\noutput %y\n").unwrap_err();
        assert!(e.message.contains("unknown training-step rule `frob`"), "{e}");
        let e = parse("graph g\ninput %x: f32[2]\noutput %x [update %q]\n").unwrap_err();
        assert!(e.message.contains("undefined value `%q`"), "{e}");
    }

    #[test]
    fn floats_and_special_values_round_trip() {
        for x in [1e-5, 0.1, -2.5, 1e300, f64::INFINITY, f64::NEG_INFINITY, 3.0] {
            let a = Attr::Float(x);
            let src = format!("graph g\n%c: f32[] = full() {{dtype = f32, shape = [], value = {a}}}\noutput %c\n");
            let g = parse(&src).unwrap();
            assert_eq!(g.nodes[0].attrs.get("value"), Some(&a), "{src}");
        }
    }
}
