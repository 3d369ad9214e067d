//! Causal attention's zeros, as facts on the matmuls: a lowering pass that marks
//!
//! - `causal_a = true` on a matmul whose operand A is zero above its causal diagonal (in A's
//!   stored layout: row i, column j > i + (columns - rows)), such as the attention
//!   probabilities of a causal softmax in `probs @ v`, `probs^T @ dcontext`, and their
//!   gradient in `dscores @ k`, `dscores^T @ q`; a GEMM may skip those terms;
//! - `causal_out = true` on a matmul whose result's entries above the causal diagonal do not
//!   change any result of the program (the scores `q @ k^T` read by a causal softmax, the
//!   probabilities' gradient `dcontext @ v^T` multiplied by the probabilities): a GEMM may
//!   leave those entries zero instead of computing them.
//!
//! Together these skip almost half of the attention GEMMs' work, which hand-written layers
//! get from a fused causal attention kernel (FlashAttention skips the masked blocks) and
//! PyTorch's plain `q @ k^T` / `softmax` / `@ v` does not. The interpreter ignores both
//! attributes (it computes the whole product), so it stays the oracle: the host engine's
//! blocked GEMMs must give the same losses (tests/host_runtime.rs), and the fused-versus-
//! unfused differential matrix runs programs carrying the marks.
//!
//! What "zero" rests on ([`zero_above`]): a causal softmax writes exact zeros there; a product
//! of such a value with a same-shaped finite value is zero there (a step whose activations
//! are already infinite or NaN may differ from the unmarked step in how the NaN spreads); so are its negation, a
//! quotient of it, a cast of it, and a sum or difference of two such values. What "does not
//! matter" rests on ([`unread_above`]): every use of the value is a causal softmax, a product
//! with a same-shaped value that is zero there, or an elementwise op of the same shape whose
//! own result does not matter there. Only same-shaped operands count: a broadcast operand
//! would spread one entry over a whole row.

use shardc_ir::{Attr, Graph, Node, Op, ValueId};
use std::collections::HashMap;

/// How many matmuls each mark went on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CausalSummary {
    pub causal_a: usize,
    pub causal_out: usize,
}

/// Marks the matmuls of `step` (module doc); every other node is unchanged.
pub fn mark_causal(step: &Graph) -> (Graph, CausalSummary) {
    let mut g = step.clone();
    let zero = zero_above(&g);
    let unread = unread_above(&g, &zero);
    let mut summary = CausalSummary::default();
    for n in g.nodes.iter_mut() {
        if n.op != Op::MatMul {
            continue;
        }
        if zero.get(&n.inputs[0]).copied().unwrap_or(false) {
            n.attrs = n.attrs.clone().with("causal_a", Attr::Bool(true));
            summary.causal_a += 1;
        }
        if unread.get(&n.output()).copied().unwrap_or(false) {
            n.attrs = n.attrs.clone().with("causal_out", Attr::Bool(true));
            summary.causal_out += 1;
        }
    }
    (g, summary)
}

fn same_shape(g: &Graph, a: ValueId, b: ValueId) -> bool {
    g.ty(a).shape == g.ty(b).shape
}

/// Values (of rank >= 2) that are exactly zero above the causal diagonal of their last two dims.
pub fn zero_above(g: &Graph) -> HashMap<ValueId, bool> {
    let mut zero: HashMap<ValueId, bool> = HashMap::new();
    for n in &g.nodes {
        if n.outputs.len() != 1 || g.ty(n.output()).rank() < 2 {
            continue;
        }
        let o = n.output();
        let z = |v: &ValueId| zero.get(v).copied().unwrap_or(false) && same_shape(g, *v, o);
        let is_zero = match n.op {
            Op::Softmax => n.attrs.bool_or("causal", false),
            Op::Mul => n.inputs.iter().any(z),
            Op::Div | Op::Neg | Op::Cast => z(&n.inputs[0]),
            Op::Add | Op::Sub => n.inputs.iter().all(z),
            _ => false,
        };
        if is_zero {
            zero.insert(o, true);
        }
    }
    zero
}

/// Values whose entries above the causal diagonal could be replaced by any finite values
/// (zeros, or the true product) without changing any result of the program.
pub fn unread_above(g: &Graph, zero: &HashMap<ValueId, bool>) -> HashMap<ValueId, bool> {
    let mut uses: HashMap<ValueId, Vec<&Node>> = HashMap::new();
    for n in &g.nodes {
        for &v in &n.inputs {
            uses.entry(v).or_default().push(n);
        }
    }
    let returned: std::collections::HashSet<ValueId> = g.output_values().collect();
    let is_zero = |v: ValueId| zero.get(&v).copied().unwrap_or(false);
    let mut unread: HashMap<ValueId, bool> = HashMap::new();
    // Uses come after definitions: walk backwards so a use's result is decided first.
    for n in g.nodes.iter().rev() {
        for &v in &n.outputs {
            if returned.contains(&v) || g.ty(v).rank() < 2 {
                continue;
            }
            let Some(us) = uses.get(&v) else { continue };
            let fine = us.iter().all(|u| {
                if u.outputs.len() != 1 || !same_shape(g, u.output(), v) {
                    return false;
                }
                let r = u.output();
                match u.op {
                    Op::Softmax => u.attrs.bool_or("causal", false),
                    Op::Mul if u.inputs.iter().any(|&w| w != v && is_zero(w) && same_shape(g, w, v)) => true,
                    // A divisor's entries could become zeros (infinities downstream): only a
                    // dividend's do not matter.
                    Op::Div if u.inputs[1] == v => false,
                    Op::Mul | Op::Div | Op::Add | Op::Sub | Op::Neg | Op::Cast => {
                        unread.get(&r).copied().unwrap_or(false)
                    }
                    _ => false,
                }
            });
            if fine {
                unread.insert(v, true);
            }
        }
    }
    unread
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One causal attention head, forward and backward, as autodiff writes it.
    const ATTENTION: &str = "graph attn
input %q: f32[4, 8]
input %k: f32[4, 8]
input %v: f32[4, 8]
input %dctx: f32[4, 8]
%scale: f32[] = full() {dtype = f32, shape = [], value = 0.35}
%scores: f32[4, 4] = matmul(%q, %k) {transpose_b = true}
%scaled: f32[4, 4] = mul(%scores, %scale)
%probs: f32[4, 4] = softmax(%scaled) {causal = true}
%ctx: f32[4, 8] = matmul(%probs, %v)
%dprobs: f32[4, 4] = matmul(%dctx, %v) {transpose_b = true}
%dv: f32[4, 8] = matmul(%probs, %dctx) {transpose_a = true}
%dyy: f32[4, 4] = mul(%dprobs, %probs)
%sum: f32[4, 1] = reduce_sum(%dyy) {dims = [1], keepdim = true}
%centered: f32[4, 4] = sub(%dprobs, %sum)
%dscaled: f32[4, 4] = mul(%probs, %centered)
%dscores: f32[4, 4] = mul(%dscaled, %scale)
%dq: f32[4, 8] = matmul(%dscores, %k)
%dk: f32[4, 8] = matmul(%dscores, %q) {transpose_a = true}
output %ctx, %dv, %dq, %dk
";

    fn marks(src: &str) -> Vec<(String, bool, bool)> {
        let g = shardc_ir::text::parse(src).expect("parses");
        let (m, _) = mark_causal(&g);
        m.nodes
            .iter()
            .filter(|n| n.op == Op::MatMul)
            .map(|n| {
                (
                    m.name_of(n.output()).to_string(),
                    n.attrs.bool_or("causal_a", false),
                    n.attrs.bool_or("causal_out", false),
                )
            })
            .collect()
    }

    #[test]
    fn attention_products_are_marked() {
        let got = marks(ATTENTION);
        let want = [
            ("scores", false, true),
            ("ctx", true, false),
            ("dprobs", false, true),
            ("dv", true, false),
            ("dq", true, false),
            ("dk", true, false),
        ];
        let want: Vec<(String, bool, bool)> = want.iter().map(|&(n, a, o)| (n.to_string(), a, o)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn values_that_are_read_whole_are_not_marked() {
        // A plain softmax, scores also returned, and probabilities added to a dense value:
        // nothing may be skipped.
        let src = ATTENTION
            .replace("{causal = true}", "{causal = false}")
            .replace("output %ctx, %dv, %dq, %dk", "output %ctx, %dv, %dq, %dk, %scores");
        assert!(marks(&src).iter().all(|(_, a, o)| !a && !o), "{:?}", marks(&src));
        let src = ATTENTION.replace("output %ctx, %dv, %dq, %dk", "output %ctx, %dv, %dq, %dk, %scores");
        let scores = marks(&src).into_iter().find(|m| m.0 == "scores").expect("scores");
        assert!(!scores.2, "a returned value is read whole");
        let src = ATTENTION.replace(
            "%ctx: f32[4, 8] = matmul(%probs, %v)",
            "%mixed: f32[4, 4] = add(%probs, %scores)\n%ctx: f32[4, 8] = matmul(%mixed, %v)",
        );
        let ctx = marks(&src).into_iter().find(|m| m.0 == "ctx").expect("ctx");
        assert!(!ctx.1, "probabilities plus scores are not zero above the diagonal");
        let scores = marks(&src).into_iter().find(|m| m.0 == "scores").expect("scores");
        assert!(!scores.2, "scores added to probabilities are read above the diagonal");
    }
}
