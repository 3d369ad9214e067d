//! `shardc plan`: the plan of a training step, for people (text) or programs (JSON).

use crate::cli::{PlanArgs, PlanFormat, StepArgs};
use crate::commands::thousands;
use crate::parallel::{self, Candidate, Strategy};
use anyhow::Result;
use shardc_passes::cost::DeviceModel;
use shardc_passes::plan::{
    plan as plan_step, Plan, PlanCandidate, PlanPrecision, PlanReport, PlanSetup, PLAN_SCHEMA_VERSION,
};
use shardc_passes::sharding::Sharded;
use std::collections::BTreeMap;

pub fn gib(bytes: usize) -> String {
    format!("{:.3} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// `shardc plan` printed a plan that does not fit its memory budget (exit status
/// [`DOES_NOT_FIT_EXIT`]).
#[derive(Debug)]
pub struct DoesNotFit {
    pub need: usize,
    pub budget: u64,
}

/// The exit status of `shardc plan` for a plan over its budget (1 is any other error).
pub const DOES_NOT_FIT_EXIT: i32 = 3;

impl std::fmt::Display for DoesNotFit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the plan needs {} per device, over the budget of {} (exit status {DOES_NOT_FIT_EXIT}); try more devices, a higher ZeRO stage, --sequence-parallel, or --auto",
            gib(self.need),
            gib(self.budget as usize)
        )
    }
}

impl std::error::Error for DoesNotFit {}

pub fn plan(args: &PlanArgs) -> Result<()> {
    let a = &args.step;
    let device = parallel::device_model(&a.par)?;
    let budget = parallel::budget(&a.par, &device)?;
    let seq = a.seq.unwrap_or_else(|| crate::model::default_seq(&a.model));
    let compute = a.precision.compute_dtype();
    let job = parallel::Job { model: &a.model, batch: a.batch, seq, compute };
    let (setup, ranked) = parallel::resolve(&a.par, job, &device)?;
    let forward = parallel::forward_graph(&a.model, a.batch, seq, compute, &setup, &a.par)?;
    let params_total = forward.param_count();
    let (step, sharded) = shardc_passes::strategy::build(&forward, &setup, &device)?;
    let p = plan_step(
        &step,
        &shardc_passes::strategy::plan_input(&forward, params_total, &setup, sharded.as_ref(), compute),
        &device,
    );
    // The program codegen lowers and `shardc run` allocates.
    let lowered = shardc_passes::lowering::lower(&step.graph);
    let arena = shardc_passes::plan::ArenaSummary::of_program(&lowered.program);
    // A plan fits when both the model-state accounting and the arena the runtime will
    // allocate do (the arena is above the accounting where buckets or ZeRO-3's gathered
    // parameters add buffers).
    let need = p.memory_per_device.total.max(arena.arena_bytes);
    let fits = need as u64 <= budget;
    let buckets = shardc_passes::plan::BucketReport::of(&lowered.buckets);
    match args.format {
        PlanFormat::Json => {
            let mut report = Report { forward: &forward, batch: a.batch, seq, compute, setup: &setup, budget }.json(
                p,
                sharded.as_ref(),
                ranked.as_deref(),
            );
            report.fits_memory_budget = fits;
            report.memory_plan = Some(arena);
            report.buckets = Some(buckets);
            report.causal_products = Some(lowered.causal);
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        PlanFormat::Text => {
            if let Some(r) = &ranked {
                print_auto(r, budget);
            }
            print_text(&p, a, seq, &device, &forward.name, &setup);
            print_arena(&arena, p.memory_per_device.total);
            if buckets.buckets > 0 {
                println!(
                    "runtime buckets: the backward's and optimizer's {} collectives above run as {} buckets of up to {} MiB (as DDP and ZeRO coalesce them)",
                    buckets.collectives_bucketed,
                    buckets.buckets,
                    buckets.bucket_bytes >> 20
                );
            }
            let c = lowered.causal;
            if c.causal_a + c.causal_out > 0 {
                println!(
                    "causal attention: {} products skip the probabilities' zeros above the diagonal and {} skip results the causal softmax does not read (about half of the attention GEMMs' work)",
                    c.causal_a, c.causal_out
                );
            }
            if let Some(s) = &sharded {
                print_layer(s, &p);
            }
            let verdict = if fits { "fits" } else { "does NOT fit" };
            println!(
                "memory: {} per device ({}) {verdict} the budget of {} ({})",
                gib(need),
                if need == p.memory_per_device.total { "the accounting" } else { "the planner's arena" },
                gib(budget as usize),
                if a.par.memory_budget.is_some() { "--memory-budget" } else { "the device model's memory" }
            );
        }
    }
    if !fits {
        return Err(DoesNotFit { need, budget }.into());
    }
    Ok(())
}

/// What a plan report says besides the plan itself.
pub struct Report<'a> {
    pub forward: &'a shardc_ir::Graph,
    pub batch: usize,
    pub seq: usize,
    pub compute: shardc_ir::DType,
    pub setup: &'a Strategy,
    pub budget: u64,
}

impl Report<'_> {
    /// The versioned JSON form (`shardc plan --format json`, and the bundle's copy).
    pub fn json(
        &self,
        p: shardc_passes::plan::Plan,
        sharded: Option<&shardc_passes::sharding::Sharded>,
        ranked: Option<&[Candidate]>,
    ) -> PlanReport {
        let fits = p.memory_per_device.total as u64 <= self.budget;
        PlanReport {
            schema_version: PLAN_SCHEMA_VERSION,
            model: self.forward.name.clone(),
            batch: self.batch,
            seq: self.seq,
            precision: if self.compute == shardc_ir::DType::F32 {
                PlanPrecision::F32
            } else {
                PlanPrecision::Bf16Mixed
            },
            setup: plan_setup(self.setup),
            plan: p,
            memory_budget: self.budget,
            fits_memory_budget: fits,
            search: sharded.map(|s| s.stats.clone()),
            auto: ranked.map(|r| r.iter().take(AUTO_SHOWN).map(candidate).collect()),
            memory_plan: None,
            buckets: None,
            causal_products: None,
        }
    }
}

/// How many `--auto` candidates the plan shows.
const AUTO_SHOWN: usize = 8;

fn plan_setup(s: &Strategy) -> PlanSetup {
    PlanSetup { dp: s.dp, tp: s.tp, zero: s.zero, sequence_parallel: s.sp }
}

fn candidate(c: &Candidate) -> PlanCandidate {
    PlanCandidate {
        setup: plan_setup(&c.strategy),
        predicted_step_seconds: c.plan.predicted_step_seconds,
        memory_per_device: c.plan.memory_per_device.total,
        fits_memory_budget: c.fits,
    }
}

/// The `--auto` ranking: the chosen setup and the runners-up.
fn print_auto(ranked: &[Candidate], budget: u64) {
    let fitting = ranked.iter().filter(|c| c.fits).count();
    println!(
        "--auto: {} candidates planned, {fitting} fit {}; ranked by {}",
        ranked.len(),
        gib(budget as usize),
        if fitting > 0 { "predicted step time" } else { "memory per device (none fits)" }
    );
    println!(
        "  {:<4} {:>5} {:>4} {:>5} {:>4}  {:>12}  {:>12}  fits",
        "", "dp", "tp", "ZeRO", "SP", "step (ms)", "memory"
    );
    for (i, c) in ranked.iter().take(AUTO_SHOWN).enumerate() {
        println!(
            "  {:<4} {:>5} {:>4} {:>5} {:>4}  {:>12.3}  {:>12}  {}",
            if i == 0 { "->" } else { "" },
            c.strategy.dp,
            c.strategy.tp,
            c.strategy.zero,
            if c.strategy.sp { "on" } else { "off" },
            c.plan.predicted_step_seconds * 1e3,
            gib(c.plan.memory_per_device.total),
            if c.fits { "yes" } else { "no" }
        );
    }
    let chosen = &ranked[0];
    if !chosen.fits {
        println!(
            "  no candidate fits: the smallest needs {} per device; use a smaller --batch (activations grow with the rows per rank) or more devices",
            gib(chosen.plan.memory_per_device.total)
        );
    }
    println!("  chosen: {}", chosen.strategy.describe());
    println!();
}

/// The sharding of one transformer layer (every layer is planned alike) and its collectives.
fn print_layer(s: &Sharded, p: &Plan) {
    // Compute copies (`.bf16`) share their parameter's layout; not repeated.
    let layer0: Vec<_> = s.values.iter().filter(|v| v.layer == Some(0) && !v.weight_copy).collect();
    if layer0.is_empty() {
        return;
    }
    println!(
        "layer 0 ({} e-nodes, {} e-classes searched over {} forward ops; the choice is stamped on all {} layers)",
        s.stats.enodes, s.stats.eclasses, s.stats.searched_nodes, s.stats.layers_stamped
    );
    println!("  {:<44} {:<18} rule", "value (per rank)", "layout over tp");
    for v in layer0 {
        println!("  {:<44} {:<18} {}", v.name, v.layout, v.rule.as_deref().unwrap_or("-"));
    }
    let mut per: BTreeMap<(&str, &str, &str), usize> = BTreeMap::new();
    for c in p.collectives.iter().filter(|c| c.layer == Some(0)) {
        *per.entry((c.phase.name(), c.kind.name(), c.rule.as_str())).or_insert(0) += 1;
    }
    println!("  collectives of layer 0:");
    for ((phase, kind, rule), n) in per {
        println!("    {phase:<9} {n:>2} x {kind:<15} {rule}");
    }
    println!();
}

fn print_text(p: &Plan, a: &StepArgs, seq: usize, device: &DeviceModel, name: &str, setup: &Strategy) {
    let mesh = if p.mesh.is_empty() {
        "single device".to_string()
    } else {
        p.mesh.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
    };
    let precision = match a.precision {
        crate::cli::TrainPrecision::F32 => "f32",
        crate::cli::TrainPrecision::Bf16Mixed => "bf16 mixed precision",
    };
    println!(
        "plan: {name}, {} parameters, batch {} x {seq} tokens, {mesh}, ZeRO stage {}, sequence parallelism {}, {precision}",
        thousands(p.params_total),
        a.batch,
        setup.zero,
        if setup.sp { "on" } else { "off" }
    );
    println!("device model: {}", device.name);
    println!();
    let m = &p.memory_per_device;
    println!("memory per device");
    for (k, v) in [
        ("parameters", m.params),
        ("gradients", m.grads),
        ("optimizer state", m.optimizer),
        ("activations", m.activations),
        ("total", m.total),
    ] {
        println!("  {k:<16} {:>14} bytes  {:>12}", thousands(v), gib(v));
    }
    println!();
    println!("communication per step (ring volume, ZeRO's count)");
    if p.comm_bytes_per_step.is_empty() {
        println!("  none");
    }
    for (axis, bytes) in &p.comm_bytes_per_step {
        println!(
            "  {axis:<4} {:>16} bytes  ({:.3} x the parameters' f32 bytes)",
            thousands(*bytes as usize),
            *bytes as f64 / (p.params_total as f64 * 4.0).max(1.0)
        );
    }
    println!();
    // Collectives grouped by (phase, kind, axis, rule).
    let mut groups: BTreeMap<(&str, &str, &str, &str), (usize, usize)> = BTreeMap::new();
    for c in &p.collectives {
        let e = groups.entry((c.phase.name(), c.kind.name(), c.axis.as_str(), c.rule.as_str())).or_insert((0, 0));
        e.0 += 1;
        e.1 += c.bytes;
    }
    println!("collectives ({})", p.collectives.len());
    for ((phase, kind, axis, rule), (count, bytes)) in groups {
        println!("  {phase:<9} {count:>4} x {kind:<15} over {axis:<3} {:>14} bytes  {rule}", thousands(bytes));
    }
    println!();
    println!("FLOPs per step per device: {:.3e}", p.flops_per_step);
    println!(
        "predicted step time: {:.3} ms (roofline compute + alpha-beta collectives, no overlap)",
        p.predicted_step_seconds * 1e3
    );
}

/// The memory planner's arena beside the accounting above it.
fn print_arena(m: &shardc_passes::plan::ArenaSummary, accounted: usize) {
    let diff = 100.0 * (m.arena_bytes as f64 - accounted as f64) / accounted.max(1) as f64;
    println!();
    println!("memory planner (the fused per-rank program's arena, in its schedule; what `shardc run` allocates)");
    println!(
        "  arena              {:>16} bytes {:>12}  ({diff:+.1}% against the total above)",
        thousands(m.arena_bytes),
        gib(m.arena_bytes)
    );
    println!(
        "  persistent         {:>16} bytes {:>12}  (parameters, optimizer state, inputs)",
        thousands(m.persistent_bytes),
        gib(m.persistent_bytes)
    );
    let parts: Vec<String> =
        m.at_peak.iter().map(|(c, b)| format!("{} {}", c.replace('_', " "), thousands(*b))).collect();
    println!(
        "  live at the peak   {:>16} bytes {:>12}  ({})",
        thousands(m.live_peak_bytes),
        gib(m.live_peak_bytes),
        parts.join(", ")
    );
}
