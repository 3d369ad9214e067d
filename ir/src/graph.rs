//! The graph: SSA values, nodes in topological order, arguments and outputs.
//!
//! Values are numbered densely in definition order: the arguments first, then one value per node
//! in node order. [`Graph::finish`] restores that numbering after a builder interleaved the two, so
//! that two graphs that print the same compare equal (`parse(print(g)) == g`), and returns the
//! [`Renumbering`] so that a pass holding ids keeps holding the right values: passes hand values
//! to each other by id, never by name.
//!
//! What the program says about itself (argument and result roles, node phases and origins,
//! layers) is data on its arguments, outputs, nodes and values; see [`crate::program`].

use crate::attrs::{Attr, Attrs};
pub use crate::id::ValueId;
use crate::mesh::Mesh;
use crate::ops::{InferCtx, Op};
use crate::program::{ArgRole, Moment, Origin, Output, OutputRole, ParamLayout, Phase};
use crate::sharding::Sharding;
use crate::tensor::Tensor;
use crate::types::{DType, TensorType};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// A named, typed SSA value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Value {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: TensorType,
    /// How the value is laid out over the mesh; `None` is replicated (see [`crate::sharding`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sharding: Option<Sharding>,
    /// The transformer layer the value belongs to (set by the importer on a layer's parameters
    /// and nodes, and carried by every pass to what it derives from them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<u32>,
}

/// What a graph argument is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArgKind {
    /// A trainable parameter (weights).
    Param,
    /// Data fed each step (tokens, targets, learning rate, step count).
    Input,
    /// Optimizer state carried from step to step (AdamW's moments): what ZeRO stage 1 partitions.
    State,
}

impl ArgKind {
    pub fn keyword(self) -> &'static str {
        match self {
            ArgKind::Param => "param",
            ArgKind::Input => "input",
            ArgKind::State => "state",
        }
    }
}

/// A graph argument.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Arg {
    pub kind: ArgKind,
    pub value: ValueId,
    #[serde(default)]
    pub role: ArgRole,
}

impl ArgKind {
    /// The role an argument of this kind has when nothing more is said.
    pub fn default_role(self) -> ArgRole {
        match self {
            ArgKind::Param => ArgRole::Param(Default::default()),
            ArgKind::Input | ArgKind::State => ArgRole::Other,
        }
    }
}

/// One operation producing one or more values (most ops have one result; the op table says how
/// many: `split` has one per piece, fused kernels and norms that save statistics have several).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<ValueId>,
    #[serde(default, skip_serializing_if = "Attrs::is_empty")]
    pub attrs: Attrs,
    /// The results, in the op's order; at least one.
    pub outputs: Vec<ValueId>,
    #[serde(default)]
    pub phase: Phase,
    #[serde(default)]
    pub origin: Origin,
    /// A `fused` node's kernel: a graph of its own whose arguments are the node's inputs and
    /// whose outputs are the node's results, in order (see `passes::fusion`). `None` elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Box<Graph>>,
}

impl Node {
    /// The first (for single-result ops, the only) result.
    pub fn output(&self) -> ValueId {
        self.outputs[0]
    }
}

/// Old value id -> new value id, as [`Graph::finish`] renumbered them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Renumbering(Vec<u32>);

impl Renumbering {
    /// The new id of the value that had id `old`.
    pub fn get(&self, old: ValueId) -> ValueId {
        ValueId(self.0[old.index()])
    }
}

/// A whole program: one SPMD function over a mesh.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Graph {
    pub name: String,
    #[serde(default, skip_serializing_if = "mesh_is_empty")]
    pub mesh: Mesh,
    pub values: Vec<Value>,
    pub args: Vec<Arg>,
    pub nodes: Vec<Node>,
    pub outputs: Vec<Output>,
}

fn mesh_is_empty(m: &Mesh) -> bool {
    m.axes.is_empty()
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Self {
        Graph { name: name.into(), ..Default::default() }
    }

    pub fn value(&self, id: ValueId) -> &Value {
        &self.values[id.index()]
    }

    pub fn ty(&self, id: ValueId) -> &TensorType {
        &self.values[id.index()].ty
    }

    pub fn name_of(&self, id: ValueId) -> &str {
        &self.values[id.index()].name
    }

    /// The value called `name`, if any.
    pub fn find(&self, name: &str) -> Option<ValueId> {
        self.values.iter().position(|v| v.name == name).map(|i| ValueId(i as u32))
    }

    /// The arguments of one kind, in order.
    pub fn args_of(&self, kind: ArgKind) -> impl Iterator<Item = ValueId> + '_ {
        self.args.iter().filter(move |a| a.kind == kind).map(|a| a.value)
    }

    /// The argument defining `v`, if `v` is one.
    pub fn arg_of(&self, v: ValueId) -> Option<&Arg> {
        self.args.iter().find(|a| a.value == v)
    }

    /// The output values, in order.
    pub fn output_values(&self) -> impl Iterator<Item = ValueId> + '_ {
        self.outputs.iter().map(|o| o.value)
    }

    /// The arguments and results by role.
    pub fn signature(&self) -> Signature<'_> {
        Signature::new(self)
    }

    /// The transformer layer of value `v`.
    pub fn layer(&self, v: ValueId) -> Option<u32> {
        self.values[v.index()].layer
    }

    /// Adds a value that no argument or node defines yet; the caller defines it (pushes the
    /// node or argument whose result it is) before the graph is used.
    pub fn fresh_value(&mut self, name: String, ty: TensorType) -> ValueId {
        let id = ValueId(self.values.len() as u32);
        self.values.push(Value { name, ty, sharding: None, layer: None });
        id
    }

    /// Declares an argument with its kind's default role.
    pub fn add_arg(&mut self, kind: ArgKind, name: impl Into<String>, ty: TensorType) -> ValueId {
        let id = self.fresh_value(name.into(), ty);
        self.args.push(Arg { kind, value: id, role: kind.default_role() });
        id
    }

    /// Appends a node of a single-result op whose result type comes from the op's shape rule.
    ///
    /// Errors (with the rule's sentence) when the operands or attributes do not fit the op; the
    /// graph is unchanged then.
    pub fn add_node(
        &mut self,
        op: Op,
        inputs: &[ValueId],
        attrs: Attrs,
        name: impl Into<String>,
    ) -> Result<ValueId, String> {
        let name = name.into();
        let tys = self.infer_all(op, inputs, &attrs)?;
        if tys.len() != 1 {
            return Err(format!("`{}` has {} results here; name each of them", op.name(), tys.len()));
        }
        Ok(self.push_node(op, inputs, attrs, vec![name], tys)[0])
    }

    /// Appends a node with one result per name (as many as the op's shape rule gives).
    pub fn add_node_multi(
        &mut self,
        op: Op,
        inputs: &[ValueId],
        attrs: Attrs,
        names: Vec<String>,
    ) -> Result<Vec<ValueId>, String> {
        let tys = self.infer_all(op, inputs, &attrs)?;
        if tys.len() != names.len() {
            return Err(format!(
                "`{}` has {} results here, but {} names were given",
                op.name(),
                tys.len(),
                names.len()
            ));
        }
        Ok(self.push_node(op, inputs, attrs, names, tys))
    }

    fn push_node(
        &mut self,
        op: Op,
        inputs: &[ValueId],
        attrs: Attrs,
        names: Vec<String>,
        tys: Vec<TensorType>,
    ) -> Vec<ValueId> {
        let outputs: Vec<ValueId> = names.into_iter().zip(tys).map(|(n, t)| self.fresh_value(n, t)).collect();
        self.nodes.push(Node {
            op,
            inputs: inputs.to_vec(),
            attrs,
            outputs: outputs.clone(),
            phase: Phase::default(),
            origin: Origin::default(),
            body: None,
        });
        outputs
    }

    /// The result type of single-result `op` applied to `inputs` with `attrs`.
    pub fn infer(&self, op: Op, inputs: &[ValueId], attrs: &Attrs) -> Result<TensorType, String> {
        let mut tys = self.infer_all(op, inputs, attrs)?;
        if tys.len() != 1 {
            return Err(format!("`{}` has {} results here", op.name(), tys.len()));
        }
        Ok(tys.remove(0))
    }

    /// The result types the op table gives `op` applied to `inputs` with `attrs`.
    pub fn infer_all(&self, op: Op, inputs: &[ValueId], attrs: &Attrs) -> Result<Vec<TensorType>, String> {
        let info = op.info();
        if !info.arity.accepts(inputs.len()) {
            return Err(format!("`{}` takes {:?} operands, given {}", info.name, info.arity, inputs.len()));
        }
        crate::ops::check_attrs(op, attrs)?;
        let tys: Vec<&TensorType> = inputs.iter().map(|&v| self.ty(v)).collect();
        (info.infer)(&InferCtx { inputs: &tys, attrs, mesh: &self.mesh })
    }

    /// Renumbers values densely in definition order (arguments, then nodes), the references
    /// inside roles and origins included, and returns the map from old to new ids. Builders call
    /// this once at the end; the parser produces this numbering directly. Values that neither an
    /// argument nor a node defines are dropped (their old ids map to nothing valid).
    pub fn finish(&mut self) -> Renumbering {
        let mut map = vec![u32::MAX; self.values.len()];
        let mut values = Vec::with_capacity(self.values.len());
        let order = self.args.iter().map(|a| a.value).chain(self.nodes.iter().flat_map(|n| n.outputs.iter().copied()));
        for old in order {
            map[old.index()] = values.len() as u32;
            values.push(self.values[old.index()].clone());
        }
        let remap = |v: &mut ValueId| *v = ValueId(map[v.index()]);
        for a in &mut self.args {
            remap(&mut a.value);
            if let ArgRole::Moment { param, .. } = &mut a.role {
                remap(param);
            }
        }
        for n in &mut self.nodes {
            n.inputs.iter_mut().for_each(remap);
            n.outputs.iter_mut().for_each(remap);
            if let Origin::Adjoint(v) | Origin::Step { param: Some(v), .. } = &mut n.origin {
                remap(v);
            }
        }
        for o in &mut self.outputs {
            remap(&mut o.value);
            if let OutputRole::Gradient(v) | OutputRole::Update(v) = &mut o.role {
                remap(v);
            }
        }
        self.values = values;
        Renumbering(map)
    }

    /// Number of scalar elements over all parameters.
    pub fn param_count(&self) -> usize {
        self.args_of(ArgKind::Param).map(|v| self.ty(v).numel()).sum()
    }
}

/// A convenience layer over [`Graph`] for importers and tests: fresh names, common attribute
/// shapes, and errors that say which value could not be built.
///
/// Nodes it adds take the builder's current phase, origin and layer ([`Builder::at`]), so a pass
/// says once what the nodes it is about to emit are.
pub struct Builder {
    pub graph: Graph,
    names: std::collections::HashSet<String>,
    counter: usize,
    phase: Phase,
    origin: Origin,
    layer: Option<u32>,
}

impl Builder {
    pub fn new(name: impl Into<String>) -> Self {
        Self::from_graph(Graph::new(name))
    }

    /// Continues building on an existing graph (its nodes stay first).
    pub fn from_graph(graph: Graph) -> Self {
        let names = graph.values.iter().map(|v| v.name.clone()).collect();
        Builder { graph, names, counter: 0, phase: Phase::default(), origin: Origin::default(), layer: None }
    }

    /// The phase, origin and layer of the nodes added from now on.
    pub fn at(&mut self, phase: Phase, origin: Origin, layer: Option<u32>) -> &mut Self {
        self.phase = phase;
        self.origin = origin;
        self.layer = layer;
        self
    }

    /// The layer of the nodes (and arguments) added from now on.
    pub fn in_layer(&mut self, layer: Option<u32>) -> &mut Self {
        self.layer = layer;
        self
    }

    /// The origin of the nodes added from now on.
    pub fn with_origin(&mut self, origin: Origin) -> &mut Self {
        self.origin = origin;
        self
    }

    /// The current (phase, origin, layer).
    pub fn context(&self) -> (Phase, Origin, Option<u32>) {
        (self.phase, self.origin.clone(), self.layer)
    }

    /// `hint` if no value has that name yet, else `hint` with the next free numeric suffix.
    fn fresh_name(&mut self, hint: &str) -> String {
        let base = if hint.is_empty() { "v" } else { hint };
        let name = if !hint.is_empty() && !self.names.contains(hint) {
            hint.to_string()
        } else {
            loop {
                self.counter += 1;
                let candidate = format!("{base}{}", self.counter);
                if !self.names.contains(&candidate) {
                    break candidate;
                }
            }
        };
        self.names.insert(name.clone());
        name
    }

    pub fn param(&mut self, name: &str, dtype: DType, shape: &[usize]) -> ValueId {
        self.arg(ArgKind::Param, name, dtype, shape)
    }

    pub fn input(&mut self, name: &str, dtype: DType, shape: &[usize]) -> ValueId {
        self.arg(ArgKind::Input, name, dtype, shape)
    }

    /// Declares an argument named `name` (made unique when taken), in the current layer.
    pub fn arg(&mut self, kind: ArgKind, name: &str, dtype: DType, shape: &[usize]) -> ValueId {
        let name = self.fresh_name(name);
        let v = self.graph.add_arg(kind, name, TensorType::new(dtype, shape.to_vec()));
        self.graph.values[v.index()].layer = self.layer;
        v
    }

    /// [`Builder::arg`] with a role.
    pub fn arg_with_role(&mut self, kind: ArgKind, role: ArgRole, name: &str, ty: &TensorType) -> ValueId {
        let v = self.arg(kind, name, ty.dtype, &ty.shape);
        self.graph.args.last_mut().expect("just added").role = role;
        v
    }

    /// Adds a node named `hint` (made unique with a numeric suffix when taken).
    pub fn op(&mut self, op: Op, inputs: &[ValueId], attrs: Attrs, hint: &str) -> Result<ValueId, String> {
        let name = self.fresh_name(hint);
        let v = self
            .graph
            .add_node(op, inputs, attrs, name.clone())
            .map_err(|e| format!("building `%{name}` ({}): {e}", op.name()))?;
        self.stamp_last();
        Ok(v)
    }

    /// Adds a node of a multi-result op, one result per name hint (made unique when taken).
    pub fn op_multi(
        &mut self,
        op: Op,
        inputs: &[ValueId],
        attrs: Attrs,
        hints: &[String],
    ) -> Result<Vec<ValueId>, String> {
        let names: Vec<String> = hints.iter().map(|h| self.fresh_name(h)).collect();
        let first = names.first().cloned().unwrap_or_default();
        let vs = self
            .graph
            .add_node_multi(op, inputs, attrs, names)
            .map_err(|e| format!("building `%{first}` ({}): {e}", op.name()))?;
        self.stamp_last();
        Ok(vs)
    }

    /// The builder's phase, origin and layer on the node just added and its results.
    fn stamp_last(&mut self) {
        let n = self.graph.nodes.last_mut().expect("just added");
        n.phase = self.phase;
        n.origin = self.origin.clone();
        for &v in &n.outputs {
            self.graph.values[v.index()].layer = self.layer;
        }
    }

    /// Gives the value `v` the name `name` when no other value has it (returns whether it did).
    pub fn rename(&mut self, v: ValueId, name: &str) -> bool {
        if self.names.contains(name) {
            return false;
        }
        self.names.remove(&self.graph.values[v.index()].name);
        self.names.insert(name.to_string());
        self.graph.values[v.index()].name = name.to_string();
        true
    }

    /// Adds a copy of `node` of graph `src` reading `inputs` (values of this builder's graph):
    /// the same op, attributes, result names (made unique when taken), phase, origin and layer;
    /// returns the copies of its results. `map`
    /// translates the value an origin names into this graph.
    pub fn copy_node(
        &mut self,
        src: &Graph,
        node: &Node,
        inputs: &[ValueId],
        map: impl Fn(ValueId) -> Option<ValueId>,
    ) -> Result<Vec<ValueId>, String> {
        let mut origin = node.origin.clone();
        if let Origin::Adjoint(v) | Origin::Step { param: Some(v), .. } = &mut origin {
            *v = map(*v).ok_or_else(|| {
                format!("copying `%{}`: the value its origin names was not copied", src.name_of(node.output()))
            })?;
        }
        let saved = self.context();
        self.at(node.phase, origin, src.layer(node.output()));
        let names: Vec<String> = node.outputs.iter().map(|&o| src.name_of(o).to_string()).collect();
        let vs = self.op_multi(node.op, inputs, node.attrs.clone(), &names);
        self.at(saved.0, saved.1, saved.2);
        vs
    }

    pub fn unary(&mut self, op: Op, x: ValueId, hint: &str) -> Result<ValueId, String> {
        self.op(op, &[x], Attrs::new(), hint)
    }

    pub fn binary(&mut self, op: Op, a: ValueId, b: ValueId, hint: &str) -> Result<ValueId, String> {
        self.op(op, &[a, b], Attrs::new(), hint)
    }

    /// A scalar constant of `dtype`.
    pub fn scalar(&mut self, value: f64, dtype: DType, hint: &str) -> Result<ValueId, String> {
        let attrs = Attrs::new()
            .with("value", Attr::Float(value))
            .with("dtype", Attr::DType(dtype))
            .with("shape", Attr::Ints(vec![]));
        self.op(Op::Full, &[], attrs, hint)
    }

    pub fn reshape(&mut self, x: ValueId, shape: &[usize], hint: &str) -> Result<ValueId, String> {
        let shape = shape.iter().map(|&d| d as i64).collect();
        self.op(Op::Reshape, &[x], Attrs::new().with("shape", Attr::Ints(shape)), hint)
    }

    pub fn transpose(&mut self, x: ValueId, perm: &[i64], hint: &str) -> Result<ValueId, String> {
        self.op(Op::Transpose, &[x], Attrs::new().with("perm", Attr::Ints(perm.to_vec())), hint)
    }

    pub fn matmul(&mut self, a: ValueId, b: ValueId, transpose_b: bool, hint: &str) -> Result<ValueId, String> {
        let attrs = if transpose_b { Attrs::new().with("transpose_b", Attr::Bool(true)) } else { Attrs::new() };
        self.op(Op::MatMul, &[a, b], attrs, hint)
    }

    pub fn reduce(&mut self, op: Op, x: ValueId, dims: &[i64], hint: &str) -> Result<ValueId, String> {
        self.op(op, &[x], Attrs::new().with("dims", Attr::Ints(dims.to_vec())), hint)
    }

    pub fn ty(&self, v: ValueId) -> &TensorType {
        self.graph.ty(v)
    }

    /// Sets the outputs (without roles) and renumbers the graph canonically.
    pub fn finish(self, outputs: &[ValueId]) -> Graph {
        let outputs = outputs.iter().map(|&v| Output::plain(v)).collect();
        self.finish_with(outputs).0
    }

    /// Sets the outputs and renumbers the graph canonically; returns the renumbering too.
    pub fn finish_with(mut self, outputs: Vec<Output>) -> (Graph, Renumbering) {
        self.graph.outputs = outputs;
        let map = self.graph.finish();
        (self.graph, map)
    }
}

/// A view of a graph's signature: its arguments and results looked up by role.
#[derive(Clone, Copy)]
pub struct Signature<'a> {
    g: &'a Graph,
}

impl<'a> Signature<'a> {
    pub fn new(g: &'a Graph) -> Self {
        Signature { g }
    }

    /// The first argument with `role`.
    pub fn arg(&self, role: &ArgRole) -> Option<ValueId> {
        self.g.args.iter().find(|a| a.role == *role).map(|a| a.value)
    }

    /// The layout of the parameter argument called `name`.
    pub fn layout_of(&self, name: &str) -> Option<&'a ParamLayout> {
        self.g.find(name).and_then(|v| self.g.arg_of(v)).and_then(|a| a.role.param_layout())
    }

    /// The names of the optimizer-moment arguments.
    pub fn moment_names(&self) -> std::collections::HashSet<&'a str> {
        let g = self.g;
        g.args.iter().filter(|a| matches!(a.role, ArgRole::Moment { .. })).map(|a| g.name_of(a.value)).collect()
    }

    /// Every rank's parameters, cut from the whole ones in `full` as each parameter's layout says
    /// ([`ParamLayout::cut`]); parameters missing from `full` are left out.
    pub fn rank_params(&self, full: &HashMap<String, Tensor>) -> Vec<HashMap<String, Tensor>> {
        let mesh = &self.g.mesh;
        (0..mesh.world_size())
            .map(|r| {
                self.params()
                    .filter_map(|(p, l)| {
                        let name = self.g.name_of(p);
                        full.get(name).map(|t| (name.to_string(), l.cut(t, mesh, r)))
                    })
                    .collect()
            })
            .collect()
    }

    /// The whole parameter `p` from the ranks' tensors of it (`rank(r)` is rank r's):
    /// [`ParamLayout::assemble`] at the layout's full shape.
    pub fn whole_param<'t>(&self, p: ValueId, rank: impl Fn(usize) -> &'t Tensor) -> Tensor {
        let layout = self.g.arg_of(p).and_then(|a| a.role.param_layout()).cloned().unwrap_or_default();
        let shape = layout.full_shape(&self.g.ty(p).shape, &self.g.mesh);
        layout.assemble(&shape, &self.g.mesh, rank)
    }

    /// The parameter arguments and their layouts, in argument order.
    pub fn params(&self) -> impl Iterator<Item = (ValueId, &'a ParamLayout)> + 'a {
        self.g.args.iter().filter_map(|a| a.role.param_layout().map(|l| (a.value, l)))
    }

    /// The moment arguments of parameter argument `param`.
    pub fn moments_of(&self, param: ValueId) -> impl Iterator<Item = (Moment, ValueId)> + 'a {
        self.g.args.iter().filter_map(move |a| match a.role {
            ArgRole::Moment { param: p, moment } if p == param => Some((moment, a.value)),
            _ => None,
        })
    }

    /// The moment argument `moment` of parameter `param`.
    pub fn moment(&self, param: ValueId, moment: Moment) -> Option<ValueId> {
        self.moments_of(param).find(|(m, _)| *m == moment).map(|(_, v)| v)
    }

    /// The index of the first output with `role`.
    pub fn output(&self, role: &OutputRole) -> Option<usize> {
        self.g.outputs.iter().position(|o| o.role == *role)
    }

    /// The index of the output that updates argument `arg`.
    pub fn update_of(&self, arg: ValueId) -> Option<usize> {
        self.output(&OutputRole::Update(arg))
    }

    /// The arguments the program updates (each with its output index): the state a caller
    /// carries from one step to the next.
    pub fn carried(&self) -> impl Iterator<Item = (ValueId, usize)> + 'a {
        self.g.outputs.iter().enumerate().filter_map(|(i, o)| match o.role {
            OutputRole::Update(a) => Some((a, i)),
            _ => None,
        })
    }
}
