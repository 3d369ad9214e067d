//! `shardc compile` (the per-rank program) and `shardc explain` (why a value has its layout).

use crate::cli::{CompileArgs, CompileStage, ExplainArgs, StepArgs};
use crate::parallel::{self, Strategy};
use anyhow::{bail, Result};
use shardc_ir::text::print;
use shardc_ir::{DType, Graph};
use shardc_passes::cost::DeviceModel;
use shardc_passes::plan::plan as plan_step;
use shardc_passes::sharding::{laws, Sharded};
use shardc_passes::train_step::TrainStep;

/// Everything a compiling command builds.
struct Compiled {
    setup: Strategy,
    seq: usize,
    forward: Graph,
    step: TrainStep,
    sharded: Option<Sharded>,
    device: DeviceModel,
    compute: DType,
}

fn compile_model(a: &StepArgs) -> Result<Compiled> {
    let (model, batch, par, compute) = (a.model.as_path(), a.batch, &a.par, a.precision.compute_dtype());
    let device = parallel::device_model(par)?;
    let seq = a.seq.unwrap_or_else(|| crate::model::default_seq(model));
    let (setup, _) = parallel::resolve(par, parallel::Job { model, batch, seq, compute }, &device)?;
    let forward = parallel::forward_graph(model, batch, seq, compute, &setup, par)?;
    let (step, sharded) = shardc_passes::strategy::build(&forward, &setup, &device)?;
    Ok(Compiled { setup, seq, forward, step, sharded, device, compute })
}

/// The most parameters `compile --check` runs on the CPU.
const CHECK_LIMIT: usize = 100_000_000;

/// `compile --check`: one training step of the compiled per-rank program on simulated ranks
/// against the unsharded step, with the same random parameters and tokens, in f64 storage.
fn check_numerics(c: &Compiled, a: &StepArgs) -> Result<()> {
    use shardc_ir::interp::Precision;
    use shardc_passes::train_step::{build_train_step, AdamW};
    use shardc_runtime::train::Trainer;
    let whole = Strategy { dp: 1, ..c.setup.clone() };
    let global = parallel::forward_graph(&a.model, a.batch, c.seq, c.compute, &whole, &a.par)?;
    let n = global.param_count();
    if n > CHECK_LIMIT {
        bail!(
            "--check runs the step on this CPU; {} has {} parameters (the limit is {}): check a smaller config of the same shape",
            global.name,
            crate::commands::thousands(n),
            crate::commands::thousands(CHECK_LIMIT)
        );
    }
    let Some(vocab) = crate::commands::vocab_size(&global) else {
        bail!("--check needs a model with token inputs (`tokens`, `targets`) and an embedding table");
    };
    let params = shardc_runtime::init::init_params(&global, 1);
    let opt = AdamW::default();
    let reference = build_train_step(&global, &opt)?;
    let mut reference = Trainer::new(reference.graph, params.clone(), Precision::F64)?;
    let initial = c.step.graph.signature().rank_params(&params);
    let mut parallel = Trainer::new_spmd(c.step.graph.clone(), initial, Precision::F64)?;
    let mut rng = shardc_runtime::init::Rng::new(7);
    let tokens: Vec<i64> = (0..a.batch * c.seq + 1).map(|_| (rng.next_u64() % vocab as u64) as i64).collect();
    let (x, y) = (tokens[..a.batch * c.seq].to_vec(), tokens[1..].to_vec());
    let want = reference.step(x.clone(), y.clone(), 1e-3, 1)?;
    let got = parallel.step_spmd(shardc_runtime::train::dp_shards(&c.step.graph.mesh, &x, &y), 1e-3, 1)?;
    let rel = |g: f64, w: f64| ((g - w) / w).abs();
    let mut worst_param = 0.0f64;
    for p in reference.params() {
        let arg = c.step.graph.find(p).expect("the compiled step has the model's parameters");
        let full = c.step.graph.signature().whole_param(arg, |r| &parallel.rank_values(r)[p]);
        let (got, want) = (full.to_f64(), reference.values()[p].to_f64());
        if p.ends_with("attn.k.bias") {
            // GPT-2's key bias has zero gradient in exact arithmetic (softmax ignores a shift of
            // a query's scores); Adam turns rounding noise into a step of up to lr either way.
            let diff = got.iter().zip(&want).fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
            if diff > 2.0 * 1e-3 {
                bail!("parameter `{p}` moved {diff:.1e} from the unsharded step's, more than two learning rates");
            }
            continue;
        }
        worst_param = worst_param.max(shardc_ir::tensor::max_rel_error(&got, &want));
    }
    // bf16 rounds after every op, so summation order shows; f32 compute agrees to rounding.
    // Under bf16, Adam's normalised step turns rounding noise in tiny gradients into steps of
    // up to lr either way, so updated parameters are compared in f32 compute only.
    let f32 = c.compute == DType::F32;
    let tol = if f32 { 1e-9 } else { 2e-2 };
    let (le, ne) = (rel(got.loss, want.loss), rel(got.grad_norm, want.grad_norm));
    let params_note = if f32 {
        format!("updated parameters {worst_param:.1e}")
    } else {
        "updated parameters not compared under bf16 (check with --precision f32)".to_string()
    };
    eprintln!(
        "checked against the unsharded step (1 AdamW step, random parameters and tokens, f64 storage): \
         loss rel err {le:.1e}, gradient norm {ne:.1e} (tolerance {tol:.0e}), {params_note}"
    );
    if le > tol || ne > tol || (f32 && worst_param > tol) {
        bail!("the compiled step does not reproduce the unsharded step (a compiler bug; please report it with this command line)");
    }
    Ok(())
}

pub fn compile(a: &CompileArgs) -> Result<()> {
    let mut c = compile_model(&a.step)?;
    let fused = !a.no_fusion;
    let mut summary = None;
    if fused {
        // The program `train`, `plan` and the runtime see: buckets, causal marks, kernels.
        let lowered = shardc_passes::lowering::lower(&c.step.graph);
        c.step.graph = lowered.program;
        summary = Some(lowered.fusion);
    }
    if a.check {
        check_numerics(&c, &a.step)?;
    }
    if let Some(dir) = &a.emit_kernels {
        if !fused {
            bail!("--emit-kernels lowers the fused step's kernels: drop --no-fusion");
        }
        crate::kernels::emit(&c.step.graph, dir)?;
    }
    if let Some(path) = a.output.as_ref().filter(|p| p.extension().is_some_and(|e| e == "shardc")) {
        return write_bundle(&c, a, path, fused);
    }
    let annotated;
    let g = match a.stage {
        CompileStage::Step => &c.step.graph,
        CompileStage::Forward => c.sharded.as_ref().map_or(&c.forward, |s| &s.graph),
        CompileStage::Sharded => {
            let mut forward = c.forward.clone();
            forward.mesh = c.setup.mesh();
            annotated = match &c.sharded {
                Some(s) => s.annotated_forward(&forward, "tp"),
                None => forward,
            };
            shardc_ir::verify::verify(&annotated)
                .map_err(|e| anyhow::anyhow!("internal: the annotated forward does not verify: {e}"))?;
            &annotated
        }
    };
    let text = print(g);
    let collectives = g.nodes.iter().filter(|n| n.op.is_collective()).count();
    match &a.output {
        Some(path) => {
            std::fs::write(path, &text).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
            let kernels = match (&summary, a.stage) {
                (Some(s), CompileStage::Step) => format!(", {} kernels fusing {} ops", s.kernels, s.fused_ops),
                _ => String::new(),
            };
            eprintln!(
                "wrote {}: the per-rank {} of {} on {} ({} ops, {} collectives{kernels}, {} parameter elements per rank)",
                path.display(),
                match a.stage {
                    CompileStage::Step => "training step",
                    CompileStage::Forward => "forward pass",
                    CompileStage::Sharded => "sharded forward pass (global shapes)",
                },
                c.forward.name,
                c.setup.describe(),
                g.nodes.len(),
                collectives,
                crate::commands::thousands(g.param_count()),
            );
        }
        None => print!("{text}"),
    }
    Ok(())
}

pub fn explain(a: &ExplainArgs) -> Result<()> {
    let c = compile_model(&a.step)?;
    let Some(sharded) = &c.sharded else {
        bail!(
            "{} is not tensor-parallel here ({}): every value is replicated over the mesh's data-parallel ranks; explain a tensor-parallel plan, e.g. --mesh tp=2",
            c.forward.name,
            c.setup.describe()
        );
    };
    let step = &c.step;
    let g = &step.graph;
    let laws = laws();
    let law = |rule: &str| laws.iter().find(|(n, _)| rule.starts_with(n)).map(|(_, l)| *l);
    let name = a.value.trim_start_matches('%');
    // The forward value this names: itself, the value a per-rank value holds, or a parameter.
    let forward_value = sharded
        .values
        .iter()
        .find(|v| v.name == name)
        .map(|v| v.forward_value.clone())
        .unwrap_or_else(|| name.to_string());
    let holders: Vec<_> = sharded.values.iter().filter(|v| v.forward_value == forward_value).collect();
    let is_param = c.forward.args.iter().any(|x| c.forward.name_of(x.value) == forward_value);
    if holders.is_empty() && g.find(name).is_none() && !is_param {
        let near: Vec<&str> = sharded
            .values
            .iter()
            .map(|v| v.forward_value.as_str())
            .filter(|v| v.contains(name) || name.contains(*v))
            .take(8)
            .collect();
        bail!(
            "no value `{name}` in the compiled step of {}{}",
            c.forward.name,
            if near.is_empty() { String::new() } else { format!("; similar: {}", near.join(", ")) }
        );
    }
    println!("{forward_value} on {} ({})", c.setup.describe(), c.device.name);
    if let Some(&d) = sharded.param_splits().get(&forward_value) {
        println!(
            "  parameter stored split on dim {d} over tp: every use of it in the chosen plan reads only this rank's chunk"
        );
    } else if is_param {
        println!("  parameter stored whole (replicated over tp): some use of it reads it whole");
    }
    if let Some(f) = c.step.graph.signature().layout_of(&forward_value).and_then(|l| l.flat_shard.clone()) {
        let n = g.mesh.axis_size(&f.axis).unwrap_or(1);
        let pad = f.padded(n) - f.numel();
        println!(
            "  ZeRO-{}: each rank stores a flat 1/{n} shard over {} ({} of {} elements{}), gathered before the forward and again before the backward; its gradient is reduce-scattered into the shards",
            c.setup.zero,
            f.axis,
            f.padded(n) / n,
            f.numel(),
            if pad > 0 { format!(", {pad} of padding") } else { String::new() }
        );
    } else if is_param && c.setup.zero.shards_optimizer() && c.setup.dp > 1 {
        println!(
            "  ZeRO-{}: stored whole; its AdamW moments{} are flat 1/{} shards over dp, updated shard by shard and gathered back",
            c.setup.zero,
            if c.setup.zero.shards_gradients() { " and gradient" } else { "" },
            c.setup.dp
        );
    }
    for h in &holders {
        let ty = g.find(&h.name).map(|v| g.ty(v).to_string()).unwrap_or_default();
        match &h.rule {
            Some(r) => println!("  held as %{} {ty}: {}, by rule {r}", h.name, h.layout),
            None => println!("  held as %{} {ty}: {} (the forward graph's own op)", h.name, h.layout),
        }
        if let Some(l) = h.rule.as_deref().and_then(law) {
            println!("      law: {l}");
        }
    }
    // Identical layers are searched once: layer 0's twin of the value holds the alternatives.
    let key = match (shardc_passes::sharding::template::find(&c.forward), c.forward.find(&forward_value)) {
        (Some(t), Some(v)) => c.forward.name_of(t.layer_zero_twin(&c.forward, v)).to_string(),
        _ => forward_value.clone(),
    };
    let alts: Vec<_> = sharded.alternatives.iter().filter(|x| x.forward_value == key).collect();
    if !alts.is_empty() {
        println!(
            "  why: the e-graph holds {} layout(s) of {key}; extraction compares (weight-state bytes, seconds, other bytes) per device{}:",
            alts.len(),
            if key != forward_value { " (searched as its layer-0 twin; every layer is alike)" } else { "" }
        );
        for x in alts {
            println!(
                "    {} {:<18} cheapest as {:<42} ({:.3e} B, {:.3e} s, {:.3e} B){}",
                if x.chosen { "*" } else { " " },
                x.layout,
                x.best,
                x.cost.weight_bytes,
                x.cost.seconds,
                x.cost.other_bytes,
                x.rule.as_deref().map(|r| format!("  [{r}]")).unwrap_or_default()
            );
        }
        println!("    (* = used by the per-rank program)");
    }
    // Collectives that produce or consume this value's per-rank forms, and their adjoints.
    let input =
        shardc_passes::strategy::plan_input(&c.forward, c.forward.param_count(), &c.setup, Some(sharded), c.compute);
    let plan = plan_step(step, &input, &c.device);
    let mut names: Vec<String> = holders.iter().map(|h| h.name.clone()).collect();
    if names.is_empty() {
        names.push(name.to_string());
    }
    // Adjacent: a collective holding, reading, or differentiating one of these values (or a
    // collective next to them), or the training step's work on this parameter (ZeRO's gathers,
    // gradient reductions), all from the program's data.
    let mut near: std::collections::HashSet<shardc_ir::ValueId> = names.iter().filter_map(|n| g.find(n)).collect();
    let param = g.find(&forward_value).filter(|&v| g.arg_of(v).is_some());
    let next: Vec<_> = g
        .nodes
        .iter()
        .filter(|n| n.op.is_collective() && n.inputs.iter().any(|i| near.contains(i)))
        .flat_map(|n| n.outputs.iter().copied())
        .collect();
    near.extend(next);
    let mut adjacent = Vec::new();
    for col in &plan.collectives {
        let Some(v) = g.find(&col.value) else { continue };
        let Some(node) = g.nodes.iter().find(|n| n.outputs.contains(&v)) else { continue };
        // (A collective reading one of them is in `near` already.)
        let touches = near.contains(&v)
            || matches!(node.origin, shardc_ir::Origin::Adjoint(f) if near.contains(&f))
            || matches!(node.origin, shardc_ir::Origin::Step { param: Some(p), .. } if Some(p) == param);
        if touches {
            adjacent.push(col);
        }
    }
    if adjacent.is_empty() {
        println!("  no collective next to it");
    } else {
        println!("  collectives next to it:");
        for col in adjacent {
            println!(
                "    {:<9} {:<15} over {} of {} bytes -> %{}  [{}]",
                col.phase, col.kind, col.axis, col.bytes, col.value, col.rule
            );
            if let Some(l) = law(&col.rule) {
                println!("        law: {l}");
            }
        }
    }
    Ok(())
}

/// `shardc compile ... -o step.shardc`: the compiled step as a bundle (program, memory plan,
/// kernels for the host and both GPU architectures, plan JSON, model config).
fn write_bundle(c: &Compiled, a: &CompileArgs, path: &std::path::Path, fused: bool) -> Result<()> {
    if a.stage != CompileStage::Step || !fused {
        bail!("a bundle holds the fused training step: drop --stage and --no-fusion, or write a .tir file");
    }
    let t = std::time::Instant::now();
    let budget = parallel::budget(&a.step.par, &c.device)?;
    let params_total = c.forward.param_count();
    let input = shardc_passes::strategy::plan_input(&c.forward, params_total, &c.setup, c.sharded.as_ref(), c.compute);
    let p = plan_step(&c.step, &input, &c.device);
    let report = crate::plan::Report {
        forward: &c.forward,
        batch: a.step.batch,
        seq: c.seq,
        compute: c.compute,
        setup: &c.setup,
        budget,
    }
    .json(p, c.sharded.as_ref(), None);
    let config = a.step.model.join("config.json");
    let model = shardc_bundle::ModelInfo {
        name: c.forward.name.clone(),
        config_json: std::fs::read_to_string(&config).ok().filter(|_| a.step.model.is_dir()),
    };
    let bundle = shardc_codegen::bundle_compiled(&c.step.graph, model, Some(serde_json::to_value(&report)?), false)?;
    bundle.write(path)?;
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let arena = bundle.header.memory_plan.as_ref().map_or(0, |m| m.arena_bytes);
    eprintln!(
        "wrote {}: the training step of {} on {} ({} kernels for the host, sm_80 and sm_90; arena {} bytes per rank; {} bytes) in {:.1} s",
        path.display(),
        c.forward.name,
        c.setup.describe(),
        bundle.header.kernels.len(),
        crate::commands::thousands(arena as usize),
        crate::commands::thousands(size as usize),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
