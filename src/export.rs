//! `shardc export`: a checkpoint's weights in Hugging Face's layout. The importer records where
//! every graph parameter came from (`ParamSource`: the checkpoint key, and for GPT-2's fused
//! `c_attn` the range of the last dimension a parameter was cut from); export inverts that
//! map, so import -> train -> export -> import is exact, and rows a padded vocabulary added are
//! dropped.

use crate::cli::ExportArgs;
use anyhow::{anyhow, bail, Context, Result};
use shardc_ir::import::{build_graph, parse_config, BuildOptions, Family};
use shardc_ir::Tensor;
use std::collections::{BTreeMap, HashMap};

pub fn export(a: &ExportArgs) -> Result<()> {
    if a.format != "hf" {
        bail!("--format {}: the one export format is `hf` (Hugging Face's config.json + model.safetensors)", a.format);
    }
    let file = shardc_runtime::checkpoint::resolve(&a.checkpoint)?;
    let tensors: HashMap<String, Tensor> = shardc_ir::import::weights::read_tensors(&file)?.into_iter().collect();
    let config_path = a.model.join("config.json");
    let text =
        std::fs::read_to_string(&config_path).with_context(|| format!("cannot read {}", config_path.display()))?;
    let (config, _) = parse_config(&text).map_err(|e| anyhow!("{}: {e}", config_path.display()))?;
    let built = build_graph(&config, BuildOptions::f32(1, 1, false)).map_err(|e| anyhow!("{e}"))?;
    // Each checkpoint key: its shape and the parameters that fill it (with the columns of a
    // fused tensor they were cut from).
    type Parts = Vec<(String, Option<(usize, usize)>)>;
    let mut keys: BTreeMap<String, (Vec<usize>, Parts)> = BTreeMap::new();
    for s in &built.sources {
        let e = keys.entry(s.key.clone()).or_insert_with(|| (s.key_shape.clone(), Vec::new()));
        e.1.push((s.param.clone(), s.last_dim_range));
    }
    let mut out: BTreeMap<String, Tensor> = BTreeMap::new();
    for (key, (shape, parts)) in &keys {
        let numel: usize = shape.iter().product();
        let last = *shape.last().unwrap_or(&1);
        let mut data = vec![0f32; numel];
        for (param, range) in parts {
            let t = tensors.get(param).ok_or_else(|| {
                anyhow!("{}: has no tensor `{param}` (the model's parameter for `{key}`)", file.display())
            })?;
            let values = t.to_f32();
            let (lo, hi) = range.unwrap_or((0, last));
            let width = *t.shape.last().unwrap_or(&1);
            let rows = numel / last;
            // A padded vocabulary adds rows past the model's own: they are dropped.
            if width != hi - lo || values.len() < rows * width {
                bail!(
                    "{}: tensor `{param}` has shape {:?}, which does not fill `{key}` {shape:?}{}",
                    file.display(),
                    t.shape,
                    range.map_or(String::new(), |(l, h)| format!(" columns {l}..{h}"))
                );
            }
            for r in 0..rows {
                data[r * last + lo..r * last + hi].copy_from_slice(&values[r * width..(r + 1) * width]);
            }
        }
        let name = match config.family {
            Family::Gpt2 { .. } => format!("transformer.{key}"),
            Family::Llama { .. } if key.starts_with("lm_head") => key.clone(),
            Family::Llama { .. } => format!("model.{key}"),
        };
        out.insert(name, Tensor::f32(shape.clone(), data));
    }
    std::fs::create_dir_all(&a.output).with_context(|| format!("cannot create {}", a.output.display()))?;
    std::fs::write(a.output.join("config.json"), &text)
        .with_context(|| format!("cannot write {}", a.output.join("config.json").display()))?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    shardc_ir::import::weights::write_tensors_with_metadata(&a.output.join("model.safetensors"), &out, Some(meta))?;
    eprintln!(
        "wrote {}: config.json and model.safetensors ({} tensors, {} parameters) from {}",
        a.output.display(),
        out.len(),
        crate::render::thousands(out.values().map(|t| t.shape.iter().product::<usize>()).sum()),
        file.display()
    );
    Ok(())
}
