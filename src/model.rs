//! Loading a MODEL argument: a Hugging Face directory or a .tir/.json graph file.

use crate::render;
use anyhow::{anyhow, bail, Context, Result};
use shardc_ir::import::{import_dir, weights, BuildOptions, ModelConfig};
use shardc_ir::text::parse_with_source_map;
use shardc_ir::verify::verify;
use shardc_ir::{ArgKind, ArgRole, DType, Graph, OutputRole, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// A graph with values for its parameters.
pub struct LoadedModel {
    pub graph: Graph,
    pub params: HashMap<String, Tensor>,
    pub config: Option<ModelConfig>,
    /// Where the parameter values came from, for the user.
    pub weights_from: String,
}

/// Reads, parses and verifies a graph file (.tir, or .json in the serde form), rendering any
/// error at its source line.
pub fn read_graph(path: &Path) -> Result<Graph> {
    let src = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "json") {
        let g: Graph = serde_json::from_str(&src).map_err(|e| {
            anyhow!("{}:{}:{}: not a shardc graph in JSON form: {e}", path.display(), e.line(), e.column())
        })?;
        // The JSON form carries no source lines; report the verifier's messages as they are.
        verify(&g).map_err(|e| anyhow!("{} does not verify:\n{e}", path.display()))?;
        return Ok(g);
    }
    let (g, map) = parse_with_source_map(&src).map_err(|d| anyhow!(render::parse_error(path, &src, &d)))?;
    verify(&g).map_err(|e| anyhow!(render::verify_errors(path, &src, &g, &map, &e)))?;
    Ok(g)
}

/// The sequence length a command uses when none is given: the model's maximum positions, at
/// most 1024 (1024 when the config cannot be read; the import then reports why).
pub fn default_seq(model_dir: &Path) -> usize {
    std::fs::read_to_string(model_dir.join("config.json"))
        .ok()
        .and_then(|t| shardc_ir::import::parse_config(&t).ok())
        .map_or(1024, |(c, _)| c.max_positions.min(1024))
}

/// The graph of MODEL for `batch` x `seq` tokens, without reading or making weights (for
/// planning: a 175B model's parameters are never materialised).
pub fn load_graph(path: &Path, batch: usize, seq: usize, compute: DType) -> Result<Graph> {
    load_graph_padded(path, batch, seq, compute, None)
}

/// [`load_graph`] with the vocabulary padded to a multiple of `pad_vocab` (Megatron's
/// --make-vocab-size-divisible-by times tp): the embedding and output tables get extra rows,
/// which no token uses.
pub fn load_graph_padded(
    path: &Path,
    batch: usize,
    seq: usize,
    compute: DType,
    pad_vocab: Option<usize>,
) -> Result<Graph> {
    if !path.is_dir() {
        if pad_vocab.is_some() {
            bail!(
                "{}: --pad-vocab-to-multiple-of applies to model directories (config.json), not .tir graphs",
                path.display()
            );
        }
        return read_graph(path);
    }
    let config_path = path.join("config.json");
    let text =
        std::fs::read_to_string(&config_path).with_context(|| format!("cannot read {}", config_path.display()))?;
    let (mut config, warnings) =
        shardc_ir::import::parse_config(&text).map_err(|e| anyhow!("{}: {e}", config_path.display()))?;
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    if let Some(m) = pad_vocab.filter(|&m| m > 0) {
        config.vocab_size = config.vocab_size.div_ceil(m) * m;
    }
    check_sizes(&config, batch, seq).map_err(|e| anyhow!("{}: {e}", config_path.display()))?;
    let built = shardc_ir::import::build_graph(&config, BuildOptions { batch, seq, emit_logits: false, compute })
        .map_err(|e| anyhow!("{}: {e}", config_path.display()))?;
    Ok(built.graph)
}

/// Refuses a batch and sequence length whose activations could not be tensors: every size
/// product is checked (a wrapped product once planned less memory at batch 2^53 than at 8), and
/// the widest activations ([batch, seq, max(hidden, MLP, vocabulary)] and the attention scores
/// [batch, heads, seq, seq]) must fit the IR's largest tensor.
fn check_sizes(c: &shardc_ir::import::ModelConfig, batch: usize, seq: usize) -> Result<()> {
    let widest = c.hidden.max(c.ffn_hidden).max(c.vocab_size);
    let rows = batch.checked_mul(seq);
    let products = [
        ("[batch, seq, width]", rows.and_then(|r| r.checked_mul(widest))),
        ("attention scores [batch, heads, seq, seq]", rows.and_then(|r| r.checked_mul(c.heads)?.checked_mul(seq))),
    ];
    for (what, elements) in products {
        let bytes = elements.and_then(|n| n.checked_mul(4));
        if bytes.is_none_or(|b| b > shardc_ir::MAX_TENSOR_BYTES) {
            bail!(
                "--batch and --seq are too large: a batch of {batch} sequences (per data-parallel rank) of {seq} tokens makes the {what} activations {}, over the {} bytes one tensor may hold; use a smaller --batch or --seq",
                match elements {
                    Some(n) => format!("{n} elements"),
                    None => "more elements than a 64-bit count holds".to_string(),
                },
                shardc_ir::MAX_TENSOR_BYTES
            );
        }
    }
    Ok(())
}

/// Loads MODEL for `batch` x `seq` tokens with `tokens`/`targets` inputs and a `loss` output.
pub fn load_model(
    path: &Path,
    batch: usize,
    seq: usize,
    compute: DType,
    weights_file: Option<&Path>,
    seed: u64,
) -> Result<LoadedModel> {
    let (graph, mut params, config, mut weights_from) = if path.is_dir() {
        let config_path = path.join("config.json");
        if let Ok(text) = std::fs::read_to_string(&config_path) {
            if let Ok((config, _)) = shardc_ir::import::parse_config(&text) {
                check_sizes(&config, batch, seq).map_err(|e| anyhow!("{}: {e}", config_path.display()))?;
            }
        }
        let m = import_dir(path, BuildOptions { batch, seq, emit_logits: false, compute })?;
        for w in &m.warnings {
            eprintln!("warning: {w}");
        }
        let from =
            if m.weights.is_some() { format!("{}", path.join("model.safetensors").display()) } else { String::new() };
        (m.graph, m.weights.unwrap_or_default(), Some(m.config), from)
    } else {
        let g = read_graph(path)?;
        if compute != DType::F32 {
            bail!("{}: a .tir graph fixes its own dtypes; mixed precision applies to model directories (import with --precision bf16-mixed)", path.display());
        }
        for (role, name) in [(ArgRole::Tokens, "tokens"), (ArgRole::Targets, "targets")] {
            let Some(v) = g.signature().arg(&role) else {
                bail!(
                    "{}: a model graph needs an argument `input %{name}: i64[{batch}, {seq}] [{name}]` (the `[{name}]` marks its role)",
                    path.display()
                );
            };
            let name = g.name_of(v);
            let ty = g.ty(v);
            if ty.dtype.is_float() || ty.shape != [batch, seq] {
                bail!(
                    "{}: `%{name}` is {ty} but --batch {batch} --seq {seq} asks for i64[{batch}, {seq}]; re-import with those sizes or change the flags",
                    path.display()
                );
            }
        }
        if g.signature().output(&OutputRole::Loss).is_none() {
            bail!("{}: a model graph needs an output marked as its loss, e.g. `output %loss [loss]`", path.display());
        }
        (g, HashMap::new(), None, String::new())
    };
    if let Some(file) = weights_file {
        let loaded = weights::read_tensors(file)?;
        params.clear();
        for p in graph.args_of(ArgKind::Param) {
            let v = graph.value(p);
            let t = loaded.get(&v.name).ok_or_else(|| {
                anyhow!("{}: has no tensor `{}` for parameter `%{}: {}`", file.display(), v.name, v.name, v.ty)
            })?;
            if t.shape != v.ty.shape {
                bail!(
                    "{}: tensor `{}` has shape {:?} but parameter `%{}` is {}",
                    file.display(),
                    v.name,
                    t.shape,
                    v.name,
                    v.ty
                );
            }
            params.insert(v.name.clone(), t.clone());
        }
        weights_from = file.display().to_string();
    }
    // Weights must be numbers: a NaN or infinity in a tensor is named before any work.
    let from = if weights_from.is_empty() { path.display().to_string() } else { weights_from.clone() };
    for (name, t) in &params {
        if let Some((i, x)) = t.first_non_finite() {
            bail!("{from}: tensor `{name}` holds a non-finite value ({x}) at element {i}");
        }
    }
    if params.is_empty() && graph.args_of(ArgKind::Param).next().is_some() {
        // The first large allocation: a model too large for this machine is refused here,
        // with both figures, not killed mid-way.
        let bytes = graph.args_of(ArgKind::Param).map(|p| graph.ty(p).numel() as u64 * 4).sum::<u64>();
        shardc_runtime::machine::ensure_available(
            &format!("{} ({} parameters in f32)", path.display(), crate::render::thousands(graph.param_count())),
            bytes,
        )
        .map_err(|e| anyhow!(e))?;
        params = shardc_runtime::init::init_params(&graph, seed);
        weights_from = format!("GPT-2-style random initialisation (seed {seed}; no weights given)");
    }
    Ok(LoadedModel { graph, params, config, weights_from })
}

/// Pads a loaded model's vocabulary to a multiple of `multiple` (see [`load_graph_padded`]):
/// the graph is rebuilt with the padded vocabulary; loaded embedding and output tables get zero
/// rows, which no token id reaches; a randomly initialised model is drawn afresh.
pub fn pad_vocab(
    model: &mut LoadedModel,
    path: &Path,
    batch: usize,
    seq: usize,
    compute: DType,
    multiple: Option<usize>,
    seed: u64,
) -> Result<()> {
    let Some(m) = multiple.filter(|&m| m > 0) else { return Ok(()) };
    let g = load_graph_padded(path, batch, seq, compute, Some(m))?;
    if model.weights_from.starts_with("GPT-2-style random") {
        model.params = shardc_runtime::init::init_params(&g, seed);
    } else {
        for p in g.args_of(ArgKind::Param) {
            let v = g.value(p);
            let Some(t) = model.params.get_mut(&v.name) else { continue };
            if t.shape != v.ty.shape && t.shape[1..] == v.ty.shape[1..] {
                let mut data = t.to_f32();
                data.resize(v.ty.numel(), 0.0);
                *t = Tensor::f32(v.ty.shape.clone(), data);
            }
        }
    }
    model.graph = g;
    Ok(())
}
