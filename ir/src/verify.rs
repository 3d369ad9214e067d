//! The verifier: the invariants every pass may assume on entry and must restore on exit.
//!
//! [`verify`] checks, in this order, and reports every violation it finds:
//!
//! 1. **Names.** The graph name and every value name match `[A-Za-z0-9_.]+`; value names are
//!    unique.
//! 2. **Mesh.** Mesh axis names are identifiers, unique, with sizes >= 1.
//! 3. **Numbering.** Values are numbered densely in definition order: arguments first, then one
//!    value per node in node order. Every value has exactly one definition.
//! 4. **Dominance.** Every operand of a node is an argument or the result of an earlier node
//!    (the node list is a topological order; there are no cycles).
//! 5. **Arity.** Each node has the number of operands its op's table row allows.
//! 6. **Attributes.** Each required attribute is present with its kind; no unknown attribute.
//! 7. **Types.** The declared result type equals the op table's shape/dtype rule applied to the
//!    operand types and attributes; the rule's own conditions hold (broadcastable shapes,
//!    matching contraction dims, integer ids, dims in range, ...).
//! 8. **Collectives.** Every `axis` attribute names an axis of the graph's mesh, and shapes
//!    that a collective splits divide by that axis's size (part of 7).
//! 9. **Sizes.** Every value's byte size is at most [`MAX_TENSOR_BYTES`] (so no size or
//!    offset computation overflows).
//! 10. **Shardings.** A value's sharding, when present, has one entry per dimension, names
//!     only axes of the mesh, uses no axis twice, and splits only dimensions its axes divide.
//! 11. **Outputs.** There is at least one output; each is a defined value, named once.
//!
//! Each [`VerifyError`] names the node and carries its printed `.tir` line.

use crate::graph::{Graph, ValueId};
use crate::ops::InferCtx;
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
        let value = node.and_then(|i| g.nodes.get(i)).map(|n| n.output);
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
    let expected = g.args.iter().map(|a| a.value).chain(g.nodes.iter().map(|n| n.output));
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
        if n.output.index() >= n_values || n.inputs.iter().any(|v| v.index() >= n_values) {
            err(Some(i), format!("{:?}", n), "refers to a value that does not exist".into());
            continue;
        }
        let line = print_node(g, n);
        for &v in &n.inputs {
            if v >= n.output {
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
        match (info.infer)(&InferCtx { inputs: &tys, attrs: &n.attrs, mesh: &g.mesh }) {
            Err(m) => err(Some(i), line, m),
            Ok(ty) if &ty != g.ty(n.output) => err(
                Some(i),
                line,
                format!("declared type {} but `{}` of these operands gives {ty}", g.ty(n.output), info.name),
            ),
            Ok(_) => {}
        }
    }

    if g.outputs.is_empty() {
        err(None, String::new(), "the graph has no outputs".into());
    }
    let mut seen_out = HashSet::new();
    for &o in &g.outputs {
        if o.index() >= n_values {
            err(None, "output".into(), format!("output {} does not exist", defined_name(o)));
        } else if !seen_out.insert(o) {
            err(None, "output".into(), format!("output {} is listed twice", defined_name(o)));
        }
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
    fn collective_needs_a_declared_axis() {
        let e =
            errors("graph g\nmesh dp=2\ninput %x: f32[4]\n%y: f32[4] = all_reduce(%x) {axis = \"tp\"}\noutput %y\n");
        assert!(e[0].message.contains("mesh axis `tp` is not declared"), "{}", e[0]);
    }
}
