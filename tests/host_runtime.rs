//! The host executor (the compiled program: collectives bucketed, fused kernels lowered through
//! MLIR to host code, GEMMs, in-process collectives, one arena per rank from the memory planner)
//! against the reference interpreter, trained side by side on dp=2 x tp=2, ZeRO 0-3, sequence
//! parallelism off and on, f32: the bundled model (random initialisation, the bundled
//! Shakespeare) and the tiny Llama fixture for 50 steps, the tiny GPT-2 fixture for 8. Losses
//! agree at every step within 1e-4 relative, gradient norms within 1e-3 (kernels compute in f32
//! where the interpreter accumulates reductions in f64).

use shardc_ir::import::{import_dir, BuildOptions};
use shardc_ir::interp::Precision;
use shardc_ir::Mesh;
use shardc_passes::cost::DeviceModel;
use shardc_passes::sharding::ShardOptions;
use shardc_passes::train_step::{build_parallel_step, AdamW, DataParallel};
use shardc_runtime::data::TokenFile;
use shardc_runtime::train::{dp_shards, Trainer};
use std::path::PathBuf;

const ROWS: usize = 4;
const SEQ: usize = 16;
const TOL: f64 = 1e-4;
/// The gradient norm is the more sensitive figure: f32 kernels against f64 accumulations,
/// amplified by Adam's normalised steps over 50 steps (measured up to 3e-4).
const NORM_TOL: f64 = 1e-3;

/// Batch `k` of a token stream: rows of SEQ tokens and their next tokens.
fn batch(tokens: &[i64], k: usize) -> (Vec<i64>, Vec<i64>) {
    let span = ROWS * SEQ;
    let start = (k * span) % (tokens.len() - span - 1);
    (tokens[start..start + span].to_vec(), tokens[start + 1..start + span + 1].to_vec())
}

fn side_by_side(model: &str, zero: u8, sp: bool, steps: usize, lr: f64) -> f64 {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join(model);
    let (dp, tp) = (2, 2);
    let local = import_dir(&dir, BuildOptions::f32(ROWS / dp, SEQ, false)).unwrap();
    // Fixtures carry weights and a token file; the bundled model starts from GPT-2-style
    // initialisation and reads the bundled Shakespeare as bytes.
    let weights = local.weights.clone().unwrap_or_else(|| shardc_runtime::init::init_params(&local.graph, 0));
    let tokens: Vec<i64> = match TokenFile::open(&dir.join("train_tokens.bin")) {
        Ok(t) => t.window(0, t.len()).collect(),
        Err(_) => std::fs::read(root.join("examples/data/shakespeare.txt")).unwrap()[..20_000]
            .iter()
            .map(|&b| b as i64)
            .collect(),
    };
    let name = model.rsplit('/').next().unwrap();
    let mut forward = local.graph.clone();
    forward.mesh = Mesh::parse("dp=2,tp=2").unwrap();
    let dpc = DataParallel { axis: "dp".into(), zero_stage: shardc_ir::ZeroStage::from_number(zero).unwrap() };
    let tpc = ShardOptions::tp(tp, sp);
    let (step, _) =
        build_parallel_step(&forward, &AdamW::default(), Some(&dpc), Some(&tpc), &DeviceModel::h100()).unwrap();
    let initial = step.graph.signature().rank_params(&weights);
    let mesh = step.graph.mesh.clone();
    let mut reference = Trainer::new_spmd(step.graph.clone(), initial.clone(), Precision::F32).unwrap();

    let program = shardc::host::load(&step.graph).unwrap().program;
    let mut compiled = Trainer::new_host(program, initial, 2).unwrap();
    let (mut worst, mut worst_norm) = (0.0f64, 0.0f64);
    for k in 0..steps {
        let (x, y) = batch(&tokens, k);
        let want = reference.step_spmd(dp_shards(&mesh, &x, &y), lr, k + 1).unwrap();
        let got = compiled.step_spmd(dp_shards(&mesh, &x, &y), lr, k + 1).unwrap();
        let le = ((got.loss - want.loss) / want.loss).abs();
        let ne = ((got.grad_norm - want.grad_norm) / want.grad_norm).abs();
        assert!(
            le < TOL && ne < NORM_TOL,
            "{name} zero={zero} sp={sp} step {}: host loss {} norm {}, interpreter {} {}",
            k + 1,
            got.loss,
            got.grad_norm,
            want.loss,
            want.grad_norm
        );
        worst = worst.max(le);
        worst_norm = worst_norm.max(ne);
    }
    eprintln!(
        "{name} dp=2 tp=2 zero={zero} sp={sp}: {steps} steps, worst relative difference: loss {worst:.1e}, gradient norm {worst_norm:.1e}"
    );
    worst
}

#[test]
fn host_executor_equals_the_interpreter_bundled_model() {
    for zero in 0..=3 {
        for sp in [false, true] {
            // At 1e-3 from random initialisation the loss spikes near step 40, where any
            // rounding difference is amplified; 3e-4 trains smoothly.
            side_by_side("examples/shakespeare-char", zero, sp, 50, 3e-4);
        }
    }
}

#[test]
fn host_executor_equals_the_interpreter_gpt2() {
    for zero in 0..=3 {
        for sp in [false, true] {
            side_by_side("tests/fixtures/hf/gpt2-tiny", zero, sp, 8, 1e-3);
        }
    }
}

#[test]
fn host_executor_equals_the_interpreter_llama() {
    for zero in 0..=3 {
        for sp in [false, true] {
            side_by_side("tests/fixtures/hf/llama-tiny", zero, sp, 50, 1e-3);
        }
    }
}
