//! Hugging Face `config.json`: the fields that define the computation, validated.
//!
//! Policy: a field that changes the math is either implemented or rejected with a sentence
//! naming it; a field we do not know is reported as a warning (configs carry many fields that
//! only matter to generation or to other frameworks); known-irrelevant fields are ignored.

use serde_json::{Map, Value as Json};

/// Architecture-level description shared by the supported families.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn_hidden: usize,
    pub max_positions: usize,
    pub norm_eps: f64,
    pub tie_word_embeddings: bool,
    /// Bias on the q/k/v and output projections.
    pub attention_bias: bool,
    /// Bias on the MLP projections.
    pub mlp_bias: bool,
}

/// What differs between the supported model families.
#[derive(Clone, Debug, PartialEq)]
pub enum Family {
    /// Learned positions, LayerNorm, GELU MLP, fused Conv1D QKV stored [in, out].
    Gpt2 { gelu_tanh: bool },
    /// RoPE, RMSNorm, SwiGLU MLP, nn.Linear weights stored [out, in].
    Llama { rope_theta: f64 },
}

impl ModelConfig {
    /// `gpt2` or `llama`.
    pub fn model_type(&self) -> &'static str {
        match self.family {
            Family::Gpt2 { .. } => "gpt2",
            Family::Llama { .. } => "llama",
        }
    }
}

/// A config problem: which field and what to do.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ConfigError {
    pub message: String,
}

fn err<T>(message: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError { message: message.into() })
}

struct Fields<'a> {
    map: &'a Map<String, Json>,
    used: Vec<&'static str>,
}

impl<'a> Fields<'a> {
    fn get(&mut self, key: &'static str) -> Option<&'a Json> {
        self.used.push(key);
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn usize(&mut self, key: &'static str) -> Result<Option<usize>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 && n <= u32::MAX as u64 => Ok(Some(n as usize)),
                _ => err(format!("`{key}` must be a positive integer, found {v}")),
            },
        }
    }

    fn req_usize(&mut self, key: &'static str) -> Result<usize, ConfigError> {
        self.usize(key)?.map_or_else(|| err(format!("`{key}` is missing; it is required for this model type")), Ok)
    }

    fn f64(&mut self, key: &'static str) -> Result<Option<f64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => err(format!("`{key}` must be a number, found {v}")),
            },
        }
    }

    fn bool(&mut self, key: &'static str) -> Result<Option<bool>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Json::Bool(b)) => Ok(Some(*b)),
            Some(v) => err(format!("`{key}` must be true or false, found {v}")),
        }
    }

    fn str(&mut self, key: &'static str) -> Result<Option<&'a str>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Json::String(s)) => Ok(Some(s)),
            Some(v) => err(format!("`{key}` must be a string, found {v}")),
        }
    }

    /// Requires `key` to be absent, null, or `ok`; says why otherwise.
    fn expect_bool(&mut self, key: &'static str, ok: bool, why: &str) -> Result<(), ConfigError> {
        match self.bool(key)? {
            Some(b) if b != ok => err(format!("`{key}: {b}` is not supported: {why}")),
            _ => Ok(()),
        }
    }

    fn unknown(&self, ignored: &[&str]) -> Vec<String> {
        self.map
            .keys()
            .filter(|k| !self.used.contains(&k.as_str()) && !ignored.contains(&k.as_str()))
            .map(|k| format!("config.json field `{k}` is not used by shardc's {} import and was ignored", "model"))
            .collect()
    }
}

/// Fields that never change the training computation.
const IGNORED: &[&str] = &[
    "architectures",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "initializer_range",
    "attn_pdrop",
    "embd_pdrop",
    "resid_pdrop",
    "attention_dropout",
    "summary_activation",
    "summary_first_dropout",
    "summary_proj_to_labels",
    "summary_type",
    "summary_use_proj",
    "task_specific_params",
    "pretraining_tp",
    "_name_or_path",
    "n_ctx",
    "id2label",
    "label2id",
    "tokenizer_class",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "is_decoder",
    "is_encoder_decoder",
    "reorder_and_upcast_attn",
    "max_length",
    "min_length",
    "do_sample",
    "prefix",
    "problem_type",
];

/// Parses and validates a `config.json` text. Returns the config and warnings (unknown fields).
pub fn parse_config(text: &str) -> Result<(ModelConfig, Vec<String>), ConfigError> {
    let json: Json = serde_json::from_str(text).map_err(|e| ConfigError {
        message: format!("not valid JSON at line {}, column {}: {e}", e.line(), e.column()),
    })?;
    let map = json.as_object().ok_or_else(|| ConfigError { message: "the top level must be a JSON object".into() })?;
    let mut f = Fields { map, used: Vec::new() };
    let model_type = match f.str("model_type")? {
        Some(t) => t,
        None => return err("`model_type` is missing; shardc imports `gpt2` and `llama` configs"),
    };
    let config = match model_type {
        "gpt2" => gpt2(&mut f)?,
        "llama" => llama(&mut f)?,
        other => return err(format!("model_type `{other}` is not supported; shardc imports `gpt2` and `llama`")),
    };
    if config.hidden == 0 || config.heads == 0 {
        return err("hidden size and head count must be positive");
    }
    let eps_key = if model_type == "gpt2" { "layer_norm_epsilon" } else { "rms_norm_eps" };
    if !(config.norm_eps.is_finite() && config.norm_eps > 0.0) {
        return err(format!(
            "`{eps_key}` must be a positive number (it keeps the norm's denominator away from zero), found {}",
            config.norm_eps
        ));
    }
    if let Family::Llama { rope_theta } = config.family {
        if !(rope_theta.is_finite() && rope_theta > 1.0) {
            return err(format!("`rope_theta` must be a number above 1 (the rotary base), found {rope_theta}"));
        }
    }
    let warnings = f.unknown(IGNORED).into_iter().map(|w| w.replace("model", model_type)).collect();
    Ok((config, warnings))
}

fn gpt2(f: &mut Fields) -> Result<ModelConfig, ConfigError> {
    let hidden = f.req_usize("n_embd")?;
    let heads = f.req_usize("n_head")?;
    if hidden % heads != 0 {
        return err(format!("`n_embd` ({hidden}) must be a multiple of `n_head` ({heads})"));
    }
    let gelu_tanh = match f.str("activation_function")?.unwrap_or("gelu_new") {
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => true,
        "gelu" => false,
        other => {
            return err(format!(
                "`activation_function: \"{other}\"` is not supported; use gelu_new, gelu_pytorch_tanh or gelu"
            ))
        }
    };
    f.expect_bool("scale_attn_weights", true, "GPT-2 scales attention scores by 1/sqrt(head_dim)")?;
    f.expect_bool("scale_attn_by_inverse_layer_idx", false, "per-layer score scaling is not implemented")?;
    f.expect_bool("add_cross_attention", false, "shardc imports decoder-only models")?;
    let max_positions = match f.usize("n_positions")? {
        Some(n) => n,
        None => f.req_usize("n_ctx")?,
    };
    Ok(ModelConfig {
        family: Family::Gpt2 { gelu_tanh },
        vocab_size: f.req_usize("vocab_size")?,
        hidden,
        layers: f.req_usize("n_layer")?,
        heads,
        kv_heads: heads,
        head_dim: hidden / heads,
        ffn_hidden: f.usize("n_inner")?.unwrap_or(4 * hidden),
        max_positions,
        norm_eps: f.f64("layer_norm_epsilon")?.unwrap_or(1e-5),
        tie_word_embeddings: f.bool("tie_word_embeddings")?.unwrap_or(true),
        attention_bias: true,
        mlp_bias: true,
    })
}

fn llama(f: &mut Fields) -> Result<ModelConfig, ConfigError> {
    let hidden = f.req_usize("hidden_size")?;
    let heads = f.req_usize("num_attention_heads")?;
    let kv_heads = f.usize("num_key_value_heads")?.unwrap_or(heads);
    if heads % kv_heads != 0 {
        return err(format!(
            "`num_attention_heads` ({heads}) must be a multiple of `num_key_value_heads` ({kv_heads})"
        ));
    }
    let head_dim = match f.usize("head_dim")? {
        Some(d) => d,
        None if hidden % heads == 0 => hidden / heads,
        None => {
            return err(format!(
                "`hidden_size` ({hidden}) must be a multiple of `num_attention_heads` ({heads}), or give `head_dim`"
            ))
        }
    };
    if head_dim % 2 != 0 {
        return err(format!("head_dim {head_dim} must be even for rotary embeddings"));
    }
    match f.str("hidden_act")?.unwrap_or("silu") {
        "silu" | "swish" => {}
        other => return err(format!("`hidden_act: \"{other}\"` is not supported; Llama's MLP uses silu")),
    }
    // Newer transformers nest rope settings in `rope_parameters`; older ones use `rope_theta`
    // and `rope_scaling`.
    let mut rope_theta = f.f64("rope_theta")?.unwrap_or(10000.0);
    for key in ["rope_parameters", "rope_scaling"] {
        if let Some(v) = f.get(key) {
            let obj = v
                .as_object()
                .ok_or_else(|| ConfigError { message: format!("`{key}` must be an object, found {v}") })?;
            let kind = obj.get("rope_type").or_else(|| obj.get("type")).and_then(Json::as_str).unwrap_or("default");
            if kind != "default" {
                return err(format!(
                    "`{key}` with rope_type \"{kind}\" is not supported; only default RoPE is implemented"
                ));
            }
            if let Some(t) = obj.get("rope_theta") {
                rope_theta = t.as_f64().ok_or_else(|| ConfigError {
                    message: format!("`{key}.rope_theta` must be a number, found {t}"),
                })?;
            }
            if let Some(p) = obj.get("partial_rotary_factor").and_then(Json::as_f64).filter(|&p| p != 1.0) {
                return err(format!(
                    "`{key}.partial_rotary_factor: {p}` is not supported; rotary covers the whole head"
                ));
            }
        }
    }
    Ok(ModelConfig {
        family: Family::Llama { rope_theta },
        vocab_size: f.req_usize("vocab_size")?,
        hidden,
        layers: f.req_usize("num_hidden_layers")?,
        heads,
        kv_heads,
        head_dim,
        ffn_hidden: f.req_usize("intermediate_size")?,
        max_positions: f.usize("max_position_embeddings")?.unwrap_or(2048),
        norm_eps: f.f64("rms_norm_eps")?.unwrap_or(1e-6),
        tie_word_embeddings: f.bool("tie_word_embeddings")?.unwrap_or(false),
        attention_bias: f.bool("attention_bias")?.unwrap_or(false),
        mlp_bias: f.bool("mlp_bias")?.unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_things_are_named() {
        let e = parse_config(r#"{"model_type": "bert"}"#).unwrap_err();
        assert!(e.message.contains("model_type `bert` is not supported"));
        let e = parse_config(r#"{"model_type": "gpt2", "n_embd": 64, "n_head": 4}"#).unwrap_err();
        assert!(e.message.contains("`n_positions`") || e.message.contains("`n_ctx`"), "{e}");
        let e = parse_config(
            r#"{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 3}"#,
        )
        .unwrap_err();
        assert!(e.message.contains("multiple of `num_key_value_heads`"), "{e}");
        let e = parse_config(r#"{"model_type": "llama", "rope_scaling": {"rope_type": "yarn"}, "hidden_size": 64, "num_attention_heads": 4}"#).unwrap_err();
        assert!(e.message.contains("yarn"), "{e}");
        let e = parse_config("{\"model_type\": \"gpt2\",\n \"n_embd\": }").unwrap_err();
        assert!(e.message.contains("line 2"), "{e}");
    }

    /// Values outside their domain are refused when the config is read, not found later as a
    /// NaN loss.
    #[test]
    fn out_of_domain_values_are_refused() {
        let gpt2 = r#"{"model_type": "gpt2", "n_embd": 8, "n_head": 2, "n_layer": 1, "n_positions": 4, "vocab_size": 10, "layer_norm_epsilon": EPS}"#;
        for eps in ["-1.0", "0", "0.0"] {
            let e = parse_config(&gpt2.replace("EPS", eps)).unwrap_err();
            assert!(e.message.contains("`layer_norm_epsilon` must be a positive number"), "{e}");
        }
        assert!(parse_config(&gpt2.replace("EPS", "1e-5")).is_ok());
        let llama = r#"{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 10, "num_hidden_layers": 1, "intermediate_size": 8, "max_position_embeddings": 8, "rms_norm_eps": -1e-6}"#;
        let e = parse_config(llama).unwrap_err();
        assert!(e.message.contains("`rms_norm_eps`"), "{e}");
        let llama = r#"{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 10, "num_hidden_layers": 1, "intermediate_size": 8, "max_position_embeddings": 8, "rope_theta": -5}"#;
        let e = parse_config(llama).unwrap_err();
        assert!(e.message.contains("`rope_theta` must be a number above 1"), "{e}");
    }

    #[test]
    fn unknown_fields_are_warnings() {
        let (c, w) = parse_config(
            r#"{"model_type": "gpt2", "n_embd": 8, "n_head": 2, "n_layer": 1, "n_positions": 4, "vocab_size": 10, "frobnicate": 1}"#,
        )
        .unwrap();
        assert_eq!(c.head_dim, 4);
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("`frobnicate`") && w[0].contains("gpt2"), "{w:?}");
    }
}
