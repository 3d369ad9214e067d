//! Identical transformer layers: found once, searched once, stamped on every layer.
//!
//! Layers are the node ranges whose values the importer put in layer `i` (their `[layer i]`
//! annotation, [`shardc_ir::Value::layer`]). Layer `i` must repeat layer 0 node for node:
//! same op, attributes and types, inputs inside the layer at the same offsets, its own
//! parameters in place of layer 0's, the previous layer's output where layer 0 reads the layer
//! input, and otherwise the same shared values (positions). Anything else means no template,
//! and the whole graph is searched.

use shardc_ir::{ArgKind, Graph, ValueId};
use std::collections::{HashMap, HashSet};

/// Layer 0 of `layers` identical layers.
#[derive(Clone, Debug)]
pub struct Template {
    pub layers: usize,
    /// Layer `i` is nodes `start + i * len .. start + (i + 1) * len`.
    pub start: usize,
    pub len: usize,
    /// What layer 0 reads from before it, and what the last layer's output is.
    pub input: ValueId,
    pub output0: ValueId,
    pub last_output: ValueId,
    /// Per layer: layer 0's parameters to that layer's.
    pub params: Vec<HashMap<ValueId, ValueId>>,
    /// Values that belong to layer 0 (its nodes' outputs and its parameters).
    pub layer0: HashSet<ValueId>,
}

impl Template {
    /// The node of layer `layer` at the position of layer-0 node `node`.
    pub fn node_in(&self, node: usize, layer: usize) -> usize {
        node + layer * self.len
    }

    pub fn in_layer0(&self, node: usize) -> bool {
        (self.start..self.start + self.len).contains(&node)
    }

    pub fn after_layers(&self, node: usize) -> bool {
        node >= self.start + self.layers * self.len
    }

    /// The layer-0 value at the place of `v` in its layer (a node's result at the same offset,
    /// or the parameter layer 0 uses where `v`'s layer uses `v`); `v` itself outside the layers.
    pub fn layer_zero_twin(&self, g: &Graph, v: ValueId) -> ValueId {
        if let Some(i) = g.nodes.iter().position(|n| n.output() == v) {
            if i >= self.start && !self.after_layers(i) {
                return g.nodes[self.start + (i - self.start) % self.len].output();
            }
        }
        for layer in &self.params {
            if let Some((&p0, _)) = layer.iter().find(|(_, &p)| p == v) {
                return p0;
            }
        }
        v
    }
}

/// Finds the layer template of `g`, if its layers are identical.
pub fn find(g: &Graph) -> Option<Template> {
    let layer_of_node: Vec<Option<usize>> = g.nodes.iter().map(|n| g.layer(n.output()).map(|l| l as usize)).collect();
    let start = layer_of_node.iter().position(|l| *l == Some(0))?;
    let len = layer_of_node[start..].iter().take_while(|l| **l == Some(0)).count();
    let mut layers = 0;
    while layer_of_node.get(start + layers * len..start + (layers + 1) * len)?.iter().all(|l| *l == Some(layers)) {
        layers += 1;
        if start + (layers + 1) * len > g.nodes.len() {
            break;
        }
    }
    // No other node may claim a layer.
    let end = start + layers * len;
    if layer_of_node[..start].iter().chain(&layer_of_node[end..]).any(Option::is_some) {
        return None;
    }
    let pos_of: HashMap<ValueId, usize> = g.nodes.iter().enumerate().map(|(i, n)| (n.output(), i)).collect();
    let is_param = |v: ValueId| g.args.iter().any(|a| a.value == v && a.kind == ArgKind::Param);
    let mut input = None;
    let mut params = vec![HashMap::new(); layers];
    let mut users: HashMap<ValueId, Vec<usize>> = HashMap::new();
    for (i, n) in g.nodes.iter().enumerate() {
        for &v in &n.inputs {
            users.entry(v).or_default().push(i);
        }
    }
    for (i, layer_params) in params.iter_mut().enumerate() {
        let base = start + i * len;
        let prev_out = (i > 0).then(|| g.nodes[base - 1].output());
        for k in 0..len {
            let (n0, ni) = (&g.nodes[start + k], &g.nodes[base + k]);
            if n0.op != ni.op || n0.attrs != ni.attrs || g.ty(n0.output()) != g.ty(ni.output()) {
                return None;
            }
            if n0.inputs.len() != ni.inputs.len() {
                return None;
            }
            for (&a0, &ai) in n0.inputs.iter().zip(&ni.inputs) {
                let inside0 = pos_of.get(&a0).filter(|&&p| (start..start + len).contains(&p));
                let insidei = pos_of.get(&ai).filter(|&&p| (base..base + len).contains(&p));
                match (inside0, insidei) {
                    (Some(&p0), Some(&pi)) if p0 - start == pi - base => {}
                    (None, None) if is_param(a0) && is_param(ai) && g.ty(a0) == g.ty(ai) => {
                        if *layer_params.entry(a0).or_insert(ai) != ai {
                            return None;
                        }
                    }
                    // Later layers read their predecessor's output where layer 0 reads the
                    // layer input.
                    (None, None) if i > 0 && Some(ai) == prev_out => {
                        if *input.get_or_insert(a0) != a0 {
                            return None;
                        }
                    }
                    // Shared values (positions, constants) are read by every layer alike.
                    (None, None) if a0 == ai => {}
                    _ => return None,
                }
            }
        }
        // Inside values stay inside, except the output, which only the next layer (or what
        // follows the last layer) reads.
        for k in 0..len - 1 {
            let v = g.nodes[base + k].output();
            if users.get(&v).is_some_and(|u| u.iter().any(|&p| !(base..base + len).contains(&p))) {
                return None;
            }
            if g.output_values().any(|o| o == v) {
                return None;
            }
        }
    }
    let output0 = g.nodes[start + len - 1].output();
    let last_output = g.nodes[end - 1].output();
    // Layer 0's input is the value later layers replace with their predecessor's output; with
    // a single layer, it is the one outside, non-parameter value layer 0 reads first.
    let input = match input {
        Some(v) => v,
        None => g.nodes[start..end]
            .iter()
            .flat_map(|n| n.inputs.iter().copied())
            .find(|v| !is_param(*v) && !pos_of.get(v).is_some_and(|p| (start..end).contains(p)))?,
    };
    // No later layer may read the layer input itself (stamping replaces it).
    if g.nodes[start + len..end].iter().any(|n| n.inputs.contains(&input)) {
        return None;
    }
    let mut layer0: HashSet<ValueId> = g.nodes[start..start + len].iter().map(|n| n.output()).collect();
    for n in &g.nodes[start..start + len] {
        layer0.extend(n.inputs.iter().copied().filter(|&v| is_param(v)));
    }
    // Layer 0's parameters belong to layer 0 only.
    for &p in layer0.iter().filter(|&&v| is_param(v)) {
        if users.get(&p).is_some_and(|u| u.iter().any(|&n| !(start..start + len).contains(&n))) {
            return None;
        }
    }
    Some(Template { layers, start, len, input, output0, last_output, params, layer0 })
}
