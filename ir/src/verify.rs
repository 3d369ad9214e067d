//! The verifier: the invariants every pass may assume on entry and must restore on exit.
//!
//! [`verify`] checks, in this order, and reports every violation it finds:
//!
//! 1. **Names.** The graph name and every value name match `[A-Za-z0-9_.]+`; value names are
//!    unique.
//! 2. **Mesh.** Mesh axis names are identifiers, unique, with sizes >= 1.
//! 3. **Numbering.** Values are numbered densely in definition order: arguments first, then each
//!    node's results in node order. Every value has exactly one definition; every node at least
//!    one result.
//! 4. **Dominance.** Every operand of a node is an argument or the result of an earlier node
//!    (the node list is a topological order; there are no cycles).
//! 5. **Arity.** Each node has the number of operands its op's table row allows.
//! 6. **Attributes.** Each required attribute is present with its kind; no unknown attribute.
//! 7. **Types.** The declared result types equal the op table's shape/dtype rule applied to the
//!    operand types and attributes; the rule's own conditions hold (broadcastable shapes,
//!    matching contraction dims, integer ids, dims in range, ...).
//! 8. **Collectives.** Every `axis` attribute names an axis of the graph's mesh, and shapes
//!    that a collective splits divide by that axis's size (part of 7).
//! 9. **Sizes.** Every value's byte size is at most [`MAX_TENSOR_BYTES`] (so no size or
//!    offset computation overflows).
//! 10. **Shardings.** A value's sharding, when present, has one entry per dimension, names
//!     only axes of the mesh, uses no axis twice, and splits only dimensions its axes divide.
//! 11. **Outputs.** There is at least one output; each is a defined value, named once.
//! 12. **Signature.** Each argument's role fits its kind (a parameter layout only on `param`, a
//!     moment only on `state`, tokens, targets, learning rate and step number only on `input`);
//!     a moment names a parameter argument, each (parameter, moment) once; the learning rate and
//!     the step number are f32 scalars, tokens and targets integer tensors of one shape; each of
//!     these roles and each of loss, logits and gradient norm appears at most once; a loss and a
//!     gradient norm are floating scalars; a `gradient` output names an argument and has its type; an `update` output names a parameter or state argument, has its type (so it can
//!     be written in place of it), and each argument is updated at most once. A tensor-parallel
//!     split names a mesh axis and a dim of the full parameter; a ZeRO flat shard names a mesh
//!     axis and holds `padded / n` elements of the tensor of its recorded shape.
//! 13. **Provenance.** An `adjoint` origin names a value defined before the node; a training-step
//!     origin's `of` names a parameter argument; phases never go back (forward, then backward,
//!     then optimizer, in node order).
//!
//! Each [`VerifyError`] names the node and carries its printed `.tir` line.

use crate::graph::{Graph, ValueId};
use crate::ops::{InferCtx, Op};
use crate::text::{is_value_name, print_node};
use crate::types::{checked_numel, TensorType, MAX_TENSOR_BYTES};
use std::collections::HashSet;
use std::fmt;

/// One violated invariant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyError {
    /// Index of the offending node, when the error belongs to one.
    pub node: Option<usize>,
    /// The offending value (a node's result or an argument), when there is one.
    pub value: Option<ValueId>,
    /// The offending node (or argument/output) printed as `.tir`.
    pub context: String,
    pub message: String,
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.node {
            Some(i) => write!(f, "node {i}: {}\n    {}", self.message, self.context),
            None if self.context.is_empty() => write!(f, "{}", self.message),
            None => write!(f, "{}\n    {}", self.message, self.context),
        }
    }
}

impl std::error::Error for VerifyError {}

/// All violations, in graph order. Displays one per line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
pub struct VerifyErrors(pub Vec<VerifyError>);

/// Checks every invariant in the module doc.
pub fn verify(g: &Graph) -> Result<(), VerifyErrors> {
    let mut errs = Vec::new();
    let mut errs_on_values: Vec<(ValueId, String)> = Vec::new();
    let mut err = |node: Option<usize>, context: String, message: String| {
        let value = node.and_then(|i| g.nodes.get(i)).and_then(|n| n.outputs.first().copied());
        errs.push(VerifyError { node, value, context, message })
    };

    if !is_value_name(&g.name) {
        err(None, String::new(), format!("graph name `{}` must match [A-Za-z0-9_.]+", g.name));
    }
    let mut seen_axes = HashSet::new();
    for a in &g.mesh.axes {
        if !crate::mesh::is_identifier(&a.name) || a.size == 0 || !seen_axes.insert(&a.name) {
            err(None, format!("mesh {}", g.mesh), format!("mesh axis `{}={}` is invalid or repeated", a.name, a.size));
        }
    }
    let mut seen_names = HashSet::new();
    for (i, v) in g.values.iter().enumerate() {
        if !is_value_name(&v.name) {
            err(None, String::new(), format!("value name `{}` must match [A-Za-z0-9_.]+", v.name));
        }
        let bytes = checked_numel(&v.ty.shape).and_then(|n| n.checked_mul(v.ty.dtype.size_bytes()));
        if bytes.is_none_or(|b| b > MAX_TENSOR_BYTES) {
            errs_on_values.push((
                ValueId(i as u32),
                format!("value `%{}` of type {} is larger than {MAX_TENSOR_BYTES} bytes", v.name, v.ty),
            ));
        }
        if let Some(sh) = &v.sharding {
            if let Err(m) = sh.check(&v.ty, &g.mesh) {
                errs_on_values.push((ValueId(i as u32), format!("value `%{}`: {m}", v.name)));
            }
        }
        if !seen_names.insert(v.name.as_str()) {
            err(None, String::new(), format!("value name `%{}` is used for two values", v.name));
        }
    }

    // Numbering: args then nodes, dense.
    let expected = g.args.iter().map(|a| a.value).chain(g.nodes.iter().flat_map(|n| n.outputs.iter().copied()));
    let mut count = 0usize;
    for (i, v) in expected.enumerate() {
        count += 1;
        if v.index() != i {
            err(
                None,
                String::new(),
                format!("value numbering is not canonical at definition {i} (found id {}); call Graph::finish()", v.0),
            );
            break;
        }
    }
    if count != g.values.len() {
        err(None, String::new(), format!("{} values are declared but {count} are defined", g.values.len()));
    }
    let n_values = g.values.len();
    let defined_name = |v: ValueId| {
        if v.index() < n_values {
            format!("%{}", g.name_of(v))
        } else {
            format!("value #{}", v.0)
        }
    };

    for (i, n) in g.nodes.iter().enumerate() {
        if n.outputs.is_empty() {
            err(Some(i), format!("{:?}", n), "a node must have at least one result".into());
            continue;
        }
        if n.outputs.iter().chain(&n.inputs).any(|v| v.index() >= n_values) {
            err(Some(i), format!("{:?}", n), "refers to a value that does not exist".into());
            continue;
        }
        let line = print_node(g, n);
        for &v in &n.inputs {
            if v >= n.output() {
                err(Some(i), line.clone(), format!("operand {} is used before it is defined", defined_name(v)));
            }
        }
        let tys: Vec<&TensorType> = n.inputs.iter().map(|&v| g.ty(v)).collect();
        let info = n.op.info();
        if !info.arity.accepts(n.inputs.len()) {
            err(Some(i), line, format!("`{}` takes {:?} operands, found {}", info.name, info.arity, n.inputs.len()));
            continue;
        }
        if let Err(m) = crate::ops::check_attrs(n.op, &n.attrs) {
            err(Some(i), line, m);
            continue;
        }
        let declared: Vec<&TensorType> = n.outputs.iter().map(|&o| g.ty(o)).collect();
        let show = |tys: &[&TensorType]| tys.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ");
        match (&n.body, n.op) {
            (None, Op::Fused) => {
                err(Some(i), line, "a `fused` node needs a body".into());
                continue;
            }
            (Some(_), op) if op != Op::Fused => {
                err(Some(i), line, format!("only a `fused` node has a body, not `{}`", op.name()));
                continue;
            }
            (Some(body), _) => {
                if let Err(m) = fused_body(body, &tys, &declared) {
                    err(Some(i), line, m);
                }
                continue;
            }
            (None, _) => {}
        }
        match (info.infer)(&InferCtx { inputs: &tys, attrs: &n.attrs, mesh: &g.mesh }) {
            Err(m) => err(Some(i), line, m),
            Ok(want) if want.iter().collect::<Vec<_>>() != declared => err(
                Some(i),
                line,
                format!(
                    "declared type {} but `{}` of these operands gives {}",
                    show(&declared),
                    info.name,
                    show(&want.iter().collect::<Vec<_>>())
                ),
            ),
            Ok(_) => {}
        }
    }

    if g.outputs.is_empty() {
        err(None, String::new(), "the graph has no outputs".into());
    }
    let mut seen_out = HashSet::new();
    for o in g.output_values() {
        if o.index() >= n_values {
            err(None, "output".into(), format!("output {} does not exist", defined_name(o)));
        } else if !seen_out.insert(o) {
            err(None, "output".into(), format!("output {} is listed twice", defined_name(o)));
        }
    }
    // The annotations refer to values: only checked once every value exists.
    if errs.is_empty() {
        let mut later = Vec::new();
        let mut note = |node: Option<usize>, context: String, message: String| {
            let value = node.and_then(|i| g.nodes.get(i)).and_then(|n| n.outputs.first().copied());
            later.push(VerifyError { node, value, context, message })
        };
        if references_exist(g, &mut note) {
            signature(g, &mut note);
            provenance(g, &mut note);
        }
        errs.extend(later);
    }
    errs.extend(errs_on_values.into_iter().map(|(v, message)| VerifyError {
        node: None,
        value: Some(v),
        context: String::new(),
        message,
    }));
    if errs.is_empty() {
        Ok(())
    } else {
        Err(VerifyErrors(errs))
    }
}

/// A fused node's body: a verified single-device graph of local ops whose arguments take the
/// node's operand types and whose outputs are its declared result types, in order.
fn fused_body(body: &Graph, inputs: &[&TensorType], declared: &[&TensorType]) -> Result<(), String> {
    if let Err(e) = verify(body) {
        return Err(format!("its body does not verify: {e}"));
    }
    if !body.mesh.axes.is_empty() {
        return Err("a fused body runs on one device: it declares no mesh".into());
    }
    if let Some(n) = body.nodes.iter().find(|n| n.op.is_collective() || n.body.is_some()) {
        return Err(format!("a fused body holds only local ops, not `{}`", print_node(body, n)));
    }
    let args: Vec<&TensorType> = body.args.iter().map(|a| body.ty(a.value)).collect();
    if args != inputs {
        return Err(format!("its body takes ({}) but the node's operands are ({})", join(&args), join(inputs)));
    }
    let outs: Vec<&TensorType> = body.output_values().map(|o| body.ty(o)).collect();
    if outs != declared {
        return Err(format!("its body gives ({}) but the node declares ({})", join(&outs), join(declared)));
    }
    Ok(())
}

fn join(tys: &[&TensorType]) -> String {
    tys.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ")
}

fn arg_line(g: &Graph, a: &crate::graph::Arg) -> String {
    format!("{} %{}: {}", a.kind.keyword(), g.name_of(a.value), g.ty(a.value))
}

/// Every value an annotation names exists.
fn references_exist(g: &Graph, err: &mut impl FnMut(Option<usize>, String, String)) -> bool {
    use crate::program::{ArgRole, Origin, OutputRole};
    let n = g.values.len();
    let refs = g
        .args
        .iter()
        .filter_map(|a| match a.role {
            ArgRole::Moment { param, .. } => Some(param),
            _ => None,
        })
        .chain(g.nodes.iter().filter_map(|nd| match nd.origin {
            Origin::Adjoint(v) | Origin::Step { param: Some(v), .. } => Some(v),
            _ => None,
        }))
        .chain(g.outputs.iter().filter_map(|o| match o.role {
            OutputRole::Gradient(v) | OutputRole::Update(v) => Some(v),
            _ => None,
        }));
    let bad: Vec<ValueId> = refs.filter(|v| v.index() >= n).collect();
    for v in &bad {
        err(None, String::new(), format!("an annotation refers to value #{}, which does not exist", v.0));
    }
    bad.is_empty()
}

/// Invariant 12.
fn signature(g: &Graph, err: &mut impl FnMut(Option<usize>, String, String)) {
    use crate::graph::ArgKind;
    use crate::program::{ArgRole, OutputRole};
    let is_arg = |v: ValueId, kinds: &[ArgKind]| g.arg_of(v).is_some_and(|a| kinds.contains(&a.kind));
    let mut seen_roles: Vec<&ArgRole> = Vec::new();
    let mut moments = HashSet::new();
    let mut data_shape: Option<&TensorType> = None;
    for a in &g.args {
        let line = arg_line(g, a);
        let ty = g.ty(a.value);
        let fits = match &a.role {
            ArgRole::Other => a.kind != ArgKind::Param,
            ArgRole::Param(_) => a.kind == ArgKind::Param,
            ArgRole::Moment { .. } => a.kind == ArgKind::State,
            _ => a.kind == ArgKind::Input,
        };
        if !fits {
            err(None, line.clone(), format!("role {:?} does not fit a `{}` argument", a.role, a.kind.keyword()));
            continue;
        }
        match &a.role {
            ArgRole::Other => {}
            ArgRole::Param(layout) => {
                if let Some(s) = &layout.split {
                    if g.mesh.axis_size(&s.axis).is_none() {
                        err(None, line.clone(), format!("split over mesh axis `{}`, which is not declared", s.axis));
                    }
                    if layout.flat_shard.is_none() && s.dim >= ty.rank() {
                        err(None, line.clone(), format!("split along dim {} of a rank-{} parameter", s.dim, ty.rank()));
                    }
                }
                if let Some(f) = &layout.flat_shard {
                    match g.mesh.axis_size(&f.axis) {
                        None => err(
                            None,
                            line.clone(),
                            format!("flat shard over mesh axis `{}`, which is not declared", f.axis),
                        ),
                        Some(n) if ty.shape != [f.padded(n) / n] => err(
                            None,
                            line.clone(),
                            format!(
                                "a flat shard over `{}` (size {n}) of a tensor of shape {:?} holds [{}] elements",
                                f.axis,
                                f.shape,
                                f.padded(n) / n
                            ),
                        ),
                        Some(_) => {}
                    }
                }
            }
            ArgRole::Moment { param, moment } => {
                if !is_arg(*param, &[ArgKind::Param]) {
                    err(None, line.clone(), format!("a moment of {}, which is not a parameter", g.name_of(*param)));
                } else if !moments.insert((*param, *moment)) {
                    err(None, line.clone(), format!("a second {:?} of `%{}`", moment, g.name_of(*param)));
                }
            }
            role => {
                if seen_roles.contains(&role) {
                    err(None, line.clone(), format!("a second argument with role {role:?}"));
                }
                seen_roles.push(role);
                let scalar = matches!(role, ArgRole::LearningRate | ArgRole::StepNumber);
                if scalar && (ty.rank() != 0 || ty.dtype != crate::types::DType::F32) {
                    err(None, line.clone(), format!("{role:?} must be an f32 scalar, found {ty}"));
                }
                if !scalar {
                    if ty.dtype.is_float() {
                        err(None, line.clone(), format!("{role:?} must be integer token ids, found {ty}"));
                    }
                    match data_shape {
                        Some(s) if s.shape != ty.shape => {
                            err(None, line.clone(), format!("tokens and targets differ in shape ({s} and {ty})"))
                        }
                        _ => data_shape = Some(ty),
                    }
                }
            }
        }
    }
    let mut seen_outputs: Vec<&OutputRole> = Vec::new();
    for o in &g.outputs {
        let name = g.name_of(o.value);
        let ty = g.ty(o.value);
        let line = format!("output %{name}");
        if o.role != OutputRole::Other && seen_outputs.contains(&&o.role) {
            err(None, line.clone(), format!("a second output with role {:?}", o.role));
        }
        seen_outputs.push(&o.role);
        match &o.role {
            OutputRole::Other | OutputRole::Logits => {}
            OutputRole::Loss | OutputRole::GradNorm => {
                if ty.rank() != 0 || !ty.dtype.is_float() {
                    err(None, line, format!("{:?} must be a floating scalar, found {ty}", o.role));
                }
            }
            OutputRole::Gradient(a) | OutputRole::Update(a) => {
                let (kinds, what): (&[ArgKind], _) = match o.role {
                    OutputRole::Gradient(_) => (&[ArgKind::Param, ArgKind::Input, ArgKind::State], "an argument"),
                    _ => (&[ArgKind::Param, ArgKind::State], "a parameter or state argument"),
                };
                if !is_arg(*a, kinds) {
                    err(None, line, format!("{:?} names `%{}`, which is not {what}", o.role, g.name_of(*a)));
                } else if g.ty(*a) != ty {
                    err(
                        None,
                        line,
                        format!("is {ty} but the argument `%{}` it belongs to is {}", g.name_of(*a), g.ty(*a)),
                    );
                }
            }
        }
    }
}

/// Invariant 13.
fn provenance(g: &Graph, err: &mut impl FnMut(Option<usize>, String, String)) {
    use crate::program::{Origin, Phase};
    let mut phase = Phase::Forward;
    for (i, n) in g.nodes.iter().enumerate() {
        if let Origin::Adjoint(v) = n.origin {
            if v >= n.output() {
                err(
                    Some(i),
                    print_node(g, n),
                    format!("an adjoint of `%{}`, which is not defined before it", g.name_of(v)),
                );
            }
        }
        if let Origin::Step { param: Some(p), .. } = n.origin {
            if !g.arg_of(p).is_some_and(|a| a.kind == crate::graph::ArgKind::Param) {
                err(
                    Some(i),
                    print_node(g, n),
                    format!("training-step work of `%{}`, which is not a parameter", g.name_of(p)),
                );
            }
        }
        if n.phase < phase {
            err(Some(i), print_node(g, n), format!("a {} node after a {phase} node", n.phase));
        }
        phase = phase.max(n.phase);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::parse;

    fn errors(src: &str) -> Vec<VerifyError> {
        verify(&parse(src).expect("parses")).unwrap_err().0
    }

    #[test]
    fn wrong_declared_type_names_the_node() {
        let e = errors("graph g\ninput %x: f32[2, 3]\n%y: f32[3, 2] = neg(%x)\noutput %y\n");
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].node, Some(0));
        assert!(e[0].message.contains("declared type f32[3, 2]"), "{}", e[0]);
        assert!(e[0].context.contains("neg(%x)"));
    }

    #[test]
    fn signature_roles_are_checked() {
        let cases = [
            // A moment of a non-parameter.
            ("input %x: f32[2]\nstate %m: f32[2] [adam-m %x]\n%y: f32[2] = neg(%x)\noutput %y", "not a parameter"),
            // An update of another type than its argument (it could not be written in place).
            (
                "param %w: f32[2]\n%y: f32[] = reduce_sum(%w) {dims = [0]}\noutput %y [update %w]",
                "is f32[] but the argument",
            ),
            // Two updates of one argument.
            (
                "param %w: f32[2]\n%y: f32[2] = neg(%w)\n%z: f32[2] = neg(%y)\noutput %y [update %w], %z [update %w]",
                "a second output",
            ),
            ("input %lr: f32[2] [learning-rate]\noutput %lr", "must be an f32 scalar"),
            ("input %t: f32[2] [tokens]\noutput %t", "integer token ids"),
            ("param %w: f32[2] [split tp 0]\noutput %w", "not declared"),
            ("param %w: f32[2]\noutput %w [loss]", "floating scalar"),
        ];
        for (body, want) in cases {
            let e = errors(&format!("graph g\n{body}\n"));
            assert!(e.iter().any(|e| e.message.contains(want)), "{body}: {e:?}");
        }
        let e = errors("graph g\nmesh dp=2\nparam %w: f32[3] [flat-shard dp [7]]\noutput %w\n");
        assert!(e[0].message.contains("holds [4] elements"), "{:?}", e);
    }

    /// A graph from JSON can name values that do not exist in its annotations: reported, no panic.
    #[test]
    fn annotations_naming_missing_values_are_errors() {
        let mut g = parse("graph g\ninput %x: f32[2]\n%y: f32[2] = neg(%x)\noutput %y\n").unwrap();
        g.nodes[0].origin = crate::program::Origin::Adjoint(ValueId(999));
        g.outputs[0].role = crate::program::OutputRole::Update(ValueId(7));
        let e = verify(&g).unwrap_err();
        assert!(e.0.iter().any(|e| e.message.contains("value #999, which does not exist")), "{e}");
        assert!(crate::text::print(&g).contains("adjoint #999"));
    }

    #[test]
    fn phases_do_not_go_back() {
        let e = errors("graph g\ninput %x: f32[2]\n%y: f32[2] = neg(%x) [backward]\n%z: f32[2] = neg(%y)\noutput %z\n");
        assert!(e[0].message.contains("a forward node after a backward node"), "{:?}", e);
        assert_eq!(e[0].node, Some(1));
    }

    #[test]
    fn collective_needs_a_declared_axis() {
        let e =
            errors("graph g\nmesh dp=2\ninput %x: f32[4]\n%y: f32[4] = all_reduce(%x) {axis = \"tp\"}\noutput %y\n");
        assert!(e[0].message.contains("mesh axis `tp` is not declared"), "{}", e[0]);
    }
}
