//! Builds the forward graph (tokens -> logits -> loss) of a [`ModelConfig`].
//!
//! One attention builder serves both families: queries are grouped by the key/value head they
//! share (`[B, KVH, G, T, Dh]` against keys `[B, KVH, 1, T, Dh]`), so grouped-query attention
//! needs no copied keys and multi-head attention is the case G = 1. Query head `h` uses
//! key/value head `h / G`, as Hugging Face's `repeat_kv` does.
//!
//! Parameters keep the checkpoint's layout (GPT-2's Conv1D `[in, out]`, Llama's nn.Linear
//! `[out, in]` with `matmul {transpose_b = true}`), so weights load without copies, with one
//! exception: GPT-2's fused `c_attn` is split into separate q, k and v parameters, because a
//! column-parallel split of the fused matrix would hand each rank the wrong heads.

use super::config::{Family, ModelConfig};
use crate::attrs::{Attr, Attrs, Choice, GeluApproximation};
use crate::graph::{ArgKind, Builder, Graph, ValueId};
use crate::ops::Op;
use crate::program::{ArgRole, Init, Output, OutputRole, ParamLayout};
use crate::types::{DType, TensorType};

/// Shape choices that the config does not fix.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BuildOptions {
    pub batch: usize,
    pub seq: usize,
    /// Also output the logits (after the loss). Training graphs leave them out.
    pub emit_logits: bool,
    /// The dtype of the compute copies of the weights and of the activations: f32, or bf16 for
    /// mixed precision (parameters stay f32 master weights, each cast once to a bf16 copy;
    /// logits are cast back to f32 for the loss).
    pub compute: DType,
}

impl BuildOptions {
    /// f32 throughout.
    pub fn f32(batch: usize, seq: usize, emit_logits: bool) -> Self {
        BuildOptions { batch, seq, emit_logits, compute: DType::F32 }
    }
}

/// Where a graph parameter's values live in a Hugging Face checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSource {
    /// The graph parameter name.
    pub param: String,
    /// The checkpoint key, without the `transformer.` / `model.` prefix.
    pub key: String,
    /// For a parameter cut out of a fused tensor: the range of the tensor's last dimension.
    pub last_dim_range: Option<(usize, usize)>,
    /// The full shape of the checkpoint tensor.
    pub key_shape: Vec<usize>,
}

/// The graph and where each of its parameters comes from.
pub struct Built {
    pub graph: Graph,
    pub sources: Vec<ParamSource>,
}

struct Ctx<'a> {
    b: Builder,
    c: &'a ModelConfig,
    o: BuildOptions,
    sources: Vec<ParamSource>,
}

impl Ctx<'_> {
    fn param(&mut self, name: &str, shape: &[usize]) -> ValueId {
        self.param_init(name, shape, Init::Normal)
    }

    fn param_init(&mut self, name: &str, shape: &[usize], init: Init) -> ValueId {
        self.param_from(name, shape, name, None, shape, init)
    }

    /// A bias (zeros at initialisation).
    fn bias(&mut self, name: &str, shape: &[usize]) -> ValueId {
        self.param_init(name, shape, Init::Zeros)
    }

    /// A projection into the residual stream (GPT-2's scaled initialisation).
    fn residual(&mut self, name: &str, shape: &[usize]) -> ValueId {
        self.param_init(name, shape, Init::ResidualProjection)
    }

    fn param_from(
        &mut self,
        name: &str,
        shape: &[usize],
        key: &str,
        range: Option<(usize, usize)>,
        key_shape: &[usize],
        init: Init,
    ) -> ValueId {
        self.sources.push(ParamSource {
            param: name.to_string(),
            key: key.to_string(),
            last_dim_range: range,
            key_shape: key_shape.to_vec(),
        });
        let master = self.b.param(name, DType::F32, shape);
        let layout = ParamLayout { init, ..Default::default() };
        self.b.graph.args.last_mut().expect("just added").role = ArgRole::Param(layout);
        if self.o.compute == DType::F32 {
            return master;
        }
        let attrs = Attrs::new().with("dtype", Attr::DType(self.o.compute));
        self.b
            .op(Op::Cast, &[master], attrs, &format!("{name}.{}", self.o.compute))
            .expect("a cast of a fresh parameter is valid")
    }

    /// x @ w (+ bias); `transposed` for nn.Linear's [out, in] layout.
    fn linear(
        &mut self,
        x: ValueId,
        w: ValueId,
        bias: Option<ValueId>,
        transposed: bool,
        hint: &str,
    ) -> Result<ValueId, String> {
        match bias {
            Some(bias) => {
                let y = self.b.matmul(x, w, transposed, &format!("{hint}_nobias"))?;
                self.b.binary(Op::Add, y, bias, hint)
            }
            None => self.b.matmul(x, w, transposed, hint),
        }
    }

    fn eps_attrs(&self) -> Attrs {
        Attrs::new().with("eps", Attr::Float(self.c.norm_eps))
    }

    fn norm(&mut self, x: ValueId, prefix: &str, hint: &str) -> Result<ValueId, String> {
        let d = self.c.hidden;
        let gamma = self.param_init(&format!("{prefix}.weight"), &[d], Init::Ones);
        match self.c.family {
            Family::Gpt2 { .. } => {
                let beta = self.bias(&format!("{prefix}.bias"), &[d]);
                let attrs = self.eps_attrs();
                self.b.op(Op::LayerNorm, &[x, gamma, beta], attrs, hint)
            }
            Family::Llama { .. } => {
                let attrs = self.eps_attrs();
                self.b.op(Op::RmsNorm, &[x, gamma], attrs, hint)
            }
        }
    }

    /// Attention with queries grouped by their key/value head; see the module doc.
    fn attention(
        &mut self,
        q: ValueId,
        k: ValueId,
        v: ValueId,
        positions: ValueId,
        l: &str,
    ) -> Result<ValueId, String> {
        let (bsz, t) = (self.o.batch, self.o.seq);
        let (h, kvh, dh) = (self.c.heads, self.c.kv_heads, self.c.head_dim);
        let g = h / kvh;
        let mut q = self.b.reshape(q, &[bsz, t, h, dh], &format!("{l}.q_heads"))?;
        let mut k = self.b.reshape(k, &[bsz, t, kvh, dh], &format!("{l}.k_heads"))?;
        let v = self.b.reshape(v, &[bsz, t, kvh, dh], &format!("{l}.v_heads"))?;
        if let Family::Llama { rope_theta } = self.c.family {
            let attrs = Attrs::new().with("theta", Attr::Float(rope_theta));
            q = self.b.op(Op::Rope, &[q, positions], attrs.clone(), &format!("{l}.q_rope"))?;
            k = self.b.op(Op::Rope, &[k, positions], attrs, &format!("{l}.k_rope"))?;
        }
        let q = self.b.reshape(q, &[bsz, t, kvh, g, dh], &format!("{l}.q_groups"))?;
        let q = self.b.transpose(q, &[0, 2, 3, 1, 4], &format!("{l}.q_t"))?;
        let kv = |s: &mut Self, x: ValueId, name: &str| -> Result<ValueId, String> {
            let x = s.b.transpose(x, &[0, 2, 1, 3], &format!("{l}.{name}_t"))?;
            s.b.reshape(x, &[bsz, kvh, 1, t, dh], &format!("{l}.{name}_g"))
        };
        let k = kv(self, k, "k")?;
        let v = kv(self, v, "v")?;
        let scores = self.b.matmul(q, k, true, &format!("{l}.scores"))?;
        let scale = self.b.scalar(1.0 / (dh as f64).sqrt(), self.o.compute, &format!("{l}.scale"))?;
        let scores = self.b.binary(Op::Mul, scores, scale, &format!("{l}.scores_scaled"))?;
        let probs =
            self.b.op(Op::Softmax, &[scores], Attrs::new().with("causal", Attr::Bool(true)), &format!("{l}.probs"))?;
        let ctx = self.b.matmul(probs, v, false, &format!("{l}.context"))?;
        let ctx = self.b.transpose(ctx, &[0, 3, 1, 2, 4], &format!("{l}.context_t"))?;
        self.b.reshape(ctx, &[bsz, t, h * dh], &format!("{l}.context_merged"))
    }

    fn gpt2_layer(&mut self, x: ValueId, i: usize, positions: ValueId, gelu_tanh: bool) -> Result<ValueId, String> {
        let (d, f) = (self.c.hidden, self.c.ffn_hidden);
        let p = format!("h.{i}");
        let l = format!("h{i}");
        let a = self.norm(x, &format!("{p}.ln_1"), &format!("{l}.ln_1"))?;
        let fused = format!("{p}.attn.c_attn");
        let mut qkv = Vec::new();
        for (j, name) in ["q", "k", "v"].iter().enumerate() {
            let range = Some((j * d, (j + 1) * d));
            let w = self.param_from(
                &format!("{p}.attn.{name}.weight"),
                &[d, d],
                &format!("{fused}.weight"),
                range,
                &[d, 3 * d],
                Init::Normal,
            );
            let b = self.param_from(
                &format!("{p}.attn.{name}.bias"),
                &[d],
                &format!("{fused}.bias"),
                range,
                &[3 * d],
                Init::Zeros,
            );
            qkv.push(self.linear(a, w, Some(b), false, &format!("{l}.{name}"))?);
        }
        let ctx = self.attention(qkv[0], qkv[1], qkv[2], positions, &l)?;
        let wo = self.residual(&format!("{p}.attn.c_proj.weight"), &[d, d]);
        let bo = self.bias(&format!("{p}.attn.c_proj.bias"), &[d]);
        let o = self.linear(ctx, wo, Some(bo), false, &format!("{l}.attn_out"))?;
        let x = self.b.binary(Op::Add, x, o, &format!("{l}.resid_attn"))?;
        let m = self.norm(x, &format!("{p}.ln_2"), &format!("{l}.ln_2"))?;
        let w1 = self.param(&format!("{p}.mlp.c_fc.weight"), &[d, f]);
        let b1 = self.bias(&format!("{p}.mlp.c_fc.bias"), &[f]);
        let up = self.linear(m, w1, Some(b1), false, &format!("{l}.mlp_up"))?;
        let approximate = if gelu_tanh { GeluApproximation::Tanh } else { GeluApproximation::Erf };
        let act = self.b.op(
            Op::Gelu,
            &[up],
            Attrs::new().with("approximate", approximate.attr()),
            &format!("{l}.mlp_act"),
        )?;
        let w2 = self.residual(&format!("{p}.mlp.c_proj.weight"), &[f, d]);
        let b2 = self.bias(&format!("{p}.mlp.c_proj.bias"), &[d]);
        let down = self.linear(act, w2, Some(b2), false, &format!("{l}.mlp_down"))?;
        self.b.binary(Op::Add, x, down, &format!("{l}.resid_mlp"))
    }

    fn llama_layer(&mut self, x: ValueId, i: usize, positions: ValueId) -> Result<ValueId, String> {
        let (d, f, dh) = (self.c.hidden, self.c.ffn_hidden, self.c.head_dim);
        let (h, kvh) = (self.c.heads, self.c.kv_heads);
        let p = format!("layers.{i}");
        let l = format!("l{i}");
        let a = self.norm(x, &format!("{p}.input_layernorm"), &format!("{l}.attn_norm"))?;
        let mut qkv = Vec::new();
        for (name, out) in [("q", h * dh), ("k", kvh * dh), ("v", kvh * dh)] {
            let w = self.param(&format!("{p}.self_attn.{name}_proj.weight"), &[out, d]);
            let b = if self.c.attention_bias {
                Some(self.bias(&format!("{p}.self_attn.{name}_proj.bias"), &[out]))
            } else {
                None
            };
            qkv.push(self.linear(a, w, b, true, &format!("{l}.{name}"))?);
        }
        let ctx = self.attention(qkv[0], qkv[1], qkv[2], positions, &l)?;
        let wo = self.residual(&format!("{p}.self_attn.o_proj.weight"), &[d, h * dh]);
        let bo =
            if self.c.attention_bias { Some(self.bias(&format!("{p}.self_attn.o_proj.bias"), &[d])) } else { None };
        let o = self.linear(ctx, wo, bo, true, &format!("{l}.attn_out"))?;
        let x = self.b.binary(Op::Add, x, o, &format!("{l}.resid_attn"))?;
        let m = self.norm(x, &format!("{p}.post_attention_layernorm"), &format!("{l}.mlp_norm"))?;
        let proj = |s: &mut Self,
                    name: &str,
                    shape: [usize; 2],
                    bias: usize,
                    input: ValueId,
                    hint: &str|
         -> Result<ValueId, String> {
            // The down projection writes into the residual stream.
            let init = if name == "down_proj" { Init::ResidualProjection } else { Init::Normal };
            let w = s.param_init(&format!("{p}.mlp.{name}.weight"), &shape, init);
            let b = if s.c.mlp_bias { Some(s.bias(&format!("{p}.mlp.{name}.bias"), &[bias])) } else { None };
            s.linear(input, w, b, true, hint)
        };
        let gate = proj(self, "gate_proj", [f, d], f, m, &format!("{l}.mlp_gate"))?;
        let up = proj(self, "up_proj", [f, d], f, m, &format!("{l}.mlp_up"))?;
        let act = self.b.unary(Op::Silu, gate, &format!("{l}.mlp_act"))?;
        let prod = self.b.binary(Op::Mul, act, up, &format!("{l}.mlp_glu"))?;
        let down = proj(self, "down_proj", [d, f], d, prod, &format!("{l}.mlp_down"))?;
        self.b.binary(Op::Add, x, down, &format!("{l}.resid_mlp"))
    }
}

/// Builds the forward graph of `config` for `options.batch` x `options.seq` tokens.
///
/// Arguments: the parameters, then `tokens` and `targets` (i64 `[B, T]`). Outputs: `loss`
/// (mean cross-entropy, f32 scalar), then `logits` (`[B, T, V]`) when asked for.
pub fn build_graph(config: &ModelConfig, options: BuildOptions) -> Result<Built, String> {
    let (bsz, t, d, v) = (options.batch, options.seq, config.hidden, config.vocab_size);
    if bsz == 0 || t == 0 {
        return Err("batch and sequence length must be at least 1".into());
    }
    if !matches!(options.compute, DType::F32 | DType::Bf16 | DType::F16) {
        return Err(format!("compute dtype {} is not a floating type", options.compute));
    }
    if t > config.max_positions {
        return Err(format!("sequence length {t} exceeds the model's {} positions", config.max_positions));
    }
    let name = format!("{}_{}l_{}d", config.model_type(), config.layers, d);
    let mut cx = Ctx { b: Builder::new(name), c: config, o: options, sources: Vec::new() };
    let (embed_name, final_norm, head_name) = match config.family {
        Family::Gpt2 { .. } => ("wte.weight", "ln_f", "lm_head.weight"),
        Family::Llama { .. } => ("embed_tokens.weight", "norm", "lm_head.weight"),
    };
    let data = TensorType::new(DType::I64, vec![bsz, t]);
    let tokens = cx.b.arg_with_role(ArgKind::Input, ArgRole::Tokens, "tokens", &data);
    let targets = cx.b.arg_with_role(ArgKind::Input, ArgRole::Targets, "targets", &data);
    let wte = cx.param(embed_name, &[v, d]);
    let iota = Attrs::new()
        .with("dtype", Attr::DType(DType::I64))
        .with("shape", Attr::Ints(vec![t as i64]))
        .with("dim", Attr::Int(0));
    let positions = cx.b.op(Op::Iota, &[], iota, "positions")?;
    let mut x = cx.b.op(Op::Embedding, &[wte, tokens], Attrs::new(), "tok_emb")?;
    if let Family::Gpt2 { .. } = config.family {
        let wpe = cx.param("wpe.weight", &[config.max_positions, d]);
        let pos = cx.b.op(Op::Embedding, &[wpe, positions], Attrs::new(), "pos_emb")?;
        x = cx.b.binary(Op::Add, x, pos, "emb")?;
    }
    for i in 0..config.layers {
        // Layer membership is data on the values (parameters and nodes), not parsed from names.
        cx.b.in_layer(Some(u32::try_from(i).map_err(|_| format!("{} layers is too many", config.layers))?));
        x = match config.family {
            Family::Gpt2 { gelu_tanh } => cx.gpt2_layer(x, i, positions, gelu_tanh)?,
            Family::Llama { .. } => cx.llama_layer(x, i, positions)?,
        };
    }
    cx.b.in_layer(None);
    let x = cx.norm(x, final_norm, "final_norm")?;
    let head = if config.tie_word_embeddings { wte } else { cx.param(head_name, &[v, d]) };
    let mut logits = cx.b.matmul(x, head, true, "logits")?;
    if options.compute != DType::F32 {
        logits = cx.b.op(Op::Cast, &[logits], Attrs::new().with("dtype", Attr::DType(DType::F32)), "logits_f32")?;
    }
    let ce = cx.b.op(Op::CrossEntropy, &[logits, targets], Attrs::new(), "token_loss")?;
    let loss = cx.b.reduce(Op::ReduceMean, ce, &[0, 1], "loss")?;
    let mut outputs = vec![Output::new(loss, OutputRole::Loss)];
    if options.emit_logits {
        outputs.push(Output::new(logits, OutputRole::Logits));
    }
    let sources = cx.sources;
    Ok(Built { graph: cx.b.finish_with(outputs).0, sources })
}
