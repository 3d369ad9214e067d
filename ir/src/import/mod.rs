//! Import of Hugging Face models: `config.json` (+ `model.safetensors`) to a [`Graph`].
//!
//! Supported: `model_type` `gpt2` (learned positions, LayerNorm, GELU MLP, tied LM head) and
//! `llama` (RMSNorm, SwiGLU, RoPE, grouped-query attention). [`config`] says which fields are
//! read and which values are rejected; [`build`] how the graph is laid out; [`weights`] how
//! checkpoint tensors map to graph parameters. Every failure is an [`ImportError`] naming the
//! file and the field or tensor.

pub mod build;
pub mod config;
pub mod weights;

pub use build::{build_graph, BuildOptions, ParamSource};
pub use config::{parse_config, Family, ModelConfig};

use crate::graph::Graph;
use crate::tensor::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// An import failure: the file and what is wrong with it.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct ImportError {
    pub path: PathBuf,
    pub message: String,
}

/// An imported model.
#[derive(Clone, Debug)]
pub struct Imported {
    pub config: ModelConfig,
    pub graph: Graph,
    /// The parameters by graph name, when the directory holds a checkpoint.
    pub weights: Option<HashMap<String, Tensor>>,
    /// Where each parameter lives in a Hugging Face checkpoint (also the layout of anything saved
    /// under the checkpoint's names, such as gradients).
    pub sources: Vec<ParamSource>,
    /// Things the user may want to know (ignored config fields, unused checkpoint tensors).
    pub warnings: Vec<String>,
}

/// Reads `dir/config.json` and, when present, the safetensors checkpoint beside it.
pub fn import_dir(dir: &Path, options: BuildOptions) -> Result<Imported, ImportError> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| ImportError {
        path: config_path.clone(),
        message: format!("cannot read ({e}); a model directory holds a Hugging Face config.json"),
    })?;
    let (config, mut warnings) =
        parse_config(&text).map_err(|e| ImportError { path: config_path.clone(), message: e.message })?;
    let built = build_graph(&config, options).map_err(|message| ImportError { path: config_path.clone(), message })?;
    let weights = if weights::has_weights(dir) {
        let (w, warn) = weights::load_weights(dir, &built.sources)?;
        warnings.extend(warn);
        Some(w)
    } else {
        None
    };
    Ok(Imported { config, graph: built.graph, weights, sources: built.sources, warnings })
}
