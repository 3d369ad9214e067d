//! The subcommands.

use crate::cli::{CheckArgs, DataCommand, EvalArgs, EvalPrecision, GraphFormat, ImportArgs};
use crate::model::{load_model, read_graph};
use anyhow::{anyhow, bail, Context, Result};
use shardc_ir::import::{import_dir, weights, BuildOptions, Family};
use shardc_ir::interp::{run, Precision};
use shardc_ir::ops::Op;
use shardc_ir::text::print;
use shardc_ir::{ArgKind, ArgRole, DType, OutputRole, Tensor};
use shardc_runtime::data::{byte_tokens, write_llmc, TokenFile};
use std::collections::BTreeMap;
use std::io::Write;

pub use crate::render::thousands;

fn write_output(path: Option<&std::path::Path>, text: &str) -> Result<()> {
    match path {
        Some(p) => std::fs::write(p, text).with_context(|| format!("cannot write {}", p.display())),
        None => {
            std::io::stdout().write_all(text.as_bytes())?;
            Ok(())
        }
    }
}

/// `80GiB`, `40GB`, `512MiB`, `1.5TiB` or a plain number of bytes.
pub fn parse_bytes(text: &str) -> Result<f64> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 =
        num.parse().map_err(|_| anyhow!("`{text}` is not a size; write e.g. 80GiB, 40GB or 1000000000"))?;
    let scale = match unit.trim() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KiB" => 1024.0,
        "MiB" => 1024f64.powi(2),
        "GiB" => 1024f64.powi(3),
        "TiB" => 1024f64.powi(4),
        other => bail!("`{text}`: unknown unit `{other}`; use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB"),
    };
    Ok(value * scale)
}

/// Rows of the embedding table that the `[tokens]` input indexes, when the graph has one.
pub fn vocab_size(g: &shardc_ir::Graph) -> Option<usize> {
    let tokens = g.signature().arg(&ArgRole::Tokens)?;
    g.nodes.iter().find(|n| n.op == Op::Embedding && n.inputs[1] == tokens).map(|n| g.ty(n.inputs[0]).shape[0])
}

pub fn import(a: &ImportArgs) -> Result<()> {
    let seq = a.seq.unwrap_or_else(|| crate::model::default_seq(&a.model_dir));
    let m = import_dir(
        &a.model_dir,
        BuildOptions { batch: a.batch, seq, emit_logits: a.logits, compute: a.precision.compute_dtype() },
    )?;
    for w in &m.warnings {
        eprintln!("warning: {w}");
    }
    let text = match a.format {
        GraphFormat::Tir => print(&m.graph),
        GraphFormat::Json => serde_json::to_string_pretty(&m.graph)? + "\n",
    };
    write_output(a.output.as_deref(), &text)?;
    let c = &m.config;
    let kind = match c.family {
        Family::Gpt2 { .. } => "gpt2".to_string(),
        Family::Llama { .. } => format!("llama ({} query heads, {} key/value heads)", c.heads, c.kv_heads),
    };
    eprintln!(
        "imported {kind}: {} layers, hidden {}, vocabulary {}, {} parameters; graph for batch {} x seq {}: {} nodes",
        c.layers,
        c.hidden,
        c.vocab_size,
        thousands(m.graph.param_count()),
        a.batch,
        seq,
        m.graph.nodes.len()
    );
    match (&m.weights, &a.weights_out) {
        (Some(w), Some(out)) => {
            let sorted: BTreeMap<String, Tensor> = w.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            weights::write_tensors(out, &sorted)?;
            eprintln!("wrote {} parameter tensors to {}", sorted.len(), out.display());
        }
        (None, Some(_)) => {
            bail!("{} has no model.safetensors, so there are no weights to write", a.model_dir.display())
        }
        _ => {}
    }
    if let Some(out) = &a.output {
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

pub fn check(a: &CheckArgs) -> Result<()> {
    let mut failed = 0;
    for path in &a.files {
        match read_graph(path) {
            Ok(g) => println!(
                "{}: ok: graph {}, {} nodes, {} parameters ({} elements){}",
                path.display(),
                g.name,
                g.nodes.len(),
                g.args_of(ArgKind::Param).count(),
                thousands(g.param_count()),
                if g.mesh.axes.is_empty() { String::new() } else { format!(", mesh {}", g.mesh) }
            ),
            Err(e) => {
                eprintln!("{e}\n");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} files failed to check", a.files.len());
    }
    Ok(())
}

pub fn eval(a: &EvalArgs) -> Result<()> {
    if a.batches == 0 {
        bail!("--batches must be at least 1");
    }
    // A checkpoint directory (train's --checkpoint DIR) means its latest checkpoint file.
    let weights = a.weights.as_ref().map(|p| shardc_runtime::checkpoint::resolve(p).unwrap_or_else(|_| p.clone()));
    let model = load_model(&a.run.model, a.run.batch, a.run.seq, DType::F32, weights.as_deref(), a.seed)?;
    let data = TokenFile::open(&a.run.data)?;
    let vocab = vocab_size(&model.graph);
    if let (Some(v), Some(max)) = (vocab, data.max_token()) {
        if max as usize >= v {
            bail!("{}: holds token id {max} but the model's vocabulary has {v} entries", a.run.data.display());
        }
    }
    let available = data.num_batches(a.run.batch, a.run.seq);
    if available < a.batches {
        bail!(
            "{}: {} tokens hold {available} batches of {} x {} (each batch needs B*T tokens plus one), but --batches {} was asked for",
            a.run.data.display(),
            thousands(data.len()),
            a.run.batch,
            a.run.seq,
            a.batches
        );
    }
    let precision = match a.precision {
        EvalPrecision::F32 => Precision::F32,
        EvalPrecision::F64 => Precision::F64,
    };
    let loss_index = model
        .graph
        .signature()
        .output(&OutputRole::Loss)
        .ok_or_else(|| anyhow::anyhow!("the model graph has no output marked `[loss]`"))?;
    let sig = model.graph.signature();
    let input_name = |role: ArgRole| sig.arg(&role).map(|v| model.graph.name_of(v).to_string());
    let (Some(tok), Some(tgt)) = (input_name(ArgRole::Tokens), input_name(ArgRole::Targets)) else {
        bail!("the model graph has no inputs marked `[tokens]` and `[targets]`");
    };
    let mut inputs = model.params.clone();
    let mut losses = Vec::new();
    let start = std::time::Instant::now();
    for k in 0..a.batches {
        let (x, y) = data.batch(k, a.run.batch, a.run.seq)?;
        inputs.insert(tok.clone(), Tensor::int(DType::I64, vec![a.run.batch, a.run.seq], x));
        inputs.insert(tgt.clone(), Tensor::int(DType::I64, vec![a.run.batch, a.run.seq], y));
        let out = run(&model.graph, &inputs, precision)?;
        let loss = out[loss_index].scalar().ok_or_else(|| anyhow!("the `%loss` output is not a scalar"))?;
        if !loss.is_finite() {
            bail!(
                "batch {k}: the loss is {loss} (from {}); the weights or the model's config give a non-finite result, so there is no loss to report",
                model.weights_from
            );
        }
        if !a.json {
            println!("batch {k}: loss {loss:.6}");
        }
        losses.push(loss);
    }
    let seconds = start.elapsed().as_secs_f64();
    let mean = losses.iter().sum::<f64>() / losses.len() as f64;
    let tokens = a.batches * a.run.batch * a.run.seq;
    if a.json {
        let obj = serde_json::json!({
            "loss": mean,
            "batch_losses": losses,
            "batches": a.batches,
            "batch": a.run.batch,
            "seq": a.run.seq,
            "tokens": tokens,
            "precision": format!("{:?}", a.precision).to_lowercase(),
            "params": model.graph.param_count(),
            "tokens_per_s": tokens as f64 / seconds.max(1e-9),
        });
        println!("{obj}");
    } else {
        let what = match &model.config {
            Some(c) => format!("{} ({} layers, hidden {})", c.model_type(), c.layers, c.hidden),
            None => format!("graph {}", model.graph.name),
        };
        println!(
            "mean cross-entropy over {} batch{} of {} x {} tokens: {mean:.6}",
            a.batches,
            if a.batches == 1 { "" } else { "es" },
            a.run.batch,
            a.run.seq
        );
        eprintln!(
            "model: {what}, {} parameters from {}; data: {} ({}, {} tokens); {:.0} tokens/s",
            thousands(model.graph.param_count()),
            model.weights_from,
            a.run.data.display(),
            data.format,
            thousands(data.len()),
            tokens as f64 / seconds.max(1e-9)
        );
    }
    Ok(())
}

pub fn data(c: &DataCommand) -> Result<()> {
    match c {
        DataCommand::Prepare(a) => {
            let text = std::fs::read(&a.text).with_context(|| format!("cannot read {}", a.text.display()))?;
            if text.is_empty() {
                bail!("{} is empty; there is nothing to tokenize", a.text.display());
            }
            let tokens = byte_tokens(&text);
            write_llmc(&a.output, &tokens).with_context(|| format!("cannot write {}", a.output.display()))?;
            println!("wrote {} tokens (byte-level, vocabulary 256) to {}", thousands(tokens.len()), a.output.display());
            Ok(())
        }
    }
}

pub fn opt(a: &crate::cli::OptArgs) -> Result<()> {
    use shardc_passes::pipeline::{parse_pipeline, run_pipeline};
    let g = read_graph(&a.file)?;
    let specs = parse_pipeline(&a.passes).map_err(|e| anyhow!("--passes {}: {e}", a.passes))?;
    let out = run_pipeline(&specs, &g).map_err(|e| anyhow!("{}: {e}", a.file.display()))?;
    write_output(a.output.as_deref(), &print(&out))
}

pub fn ops() -> Result<()> {
    for op in Op::ALL {
        let info = op.info();
        let arity = match info.arity {
            shardc_ir::ops::Arity::Exact(n) => n.to_string(),
            shardc_ir::ops::Arity::AtLeast(n) => format!("{n}+"),
        };
        let attrs: Vec<String> = info
            .attrs
            .iter()
            .map(|s| format!("{}{}: {}", s.name, if s.required { "" } else { "?" }, s.kind.name()))
            .collect();
        println!("{:<15} {:<3} {:<55} {}", info.name, arity, attrs.join(", "), info.summary);
    }
    Ok(())
}
