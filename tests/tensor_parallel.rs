//! Differential tests of tensor and sequence parallelism (with data parallelism and ZeRO): on
//! the tiny GPT-2 and Llama fixtures, 3 AdamW steps on simulated ranks give the losses, gradient
//! norms and updated parameters of the single-device step on the whole batch. f64 storage:
//! relative error below 1e-11 (the only differences are summation orders; measured 5e-14).
//! Every mesh also runs the per-rank program as codegen lowers it (collectives bucketed by
//! `bucket::bucket`, kernels fused by `fusion::fuse`): it must give the plain program's results
//! bit for bit.

mod common;
use shardc_ir::import::{import_dir, BuildOptions};
use shardc_ir::interp::Precision;
use shardc_ir::{Mesh, Op, Phase};
use shardc_passes::cost::DeviceModel;
use shardc_passes::sharding::ShardOptions;
use shardc_passes::train_step::{build_parallel_step, build_train_step, AdamW, DataParallel};
use shardc_runtime::data::TokenFile;
use shardc_runtime::train::{dp_shards, Trainer};
use std::path::PathBuf;

const ROWS: usize = 2;
const SEQ: usize = 16;
const TOL: f64 = 1e-11;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf").join(name)
}

fn mesh_of(dp: usize, tp: usize) -> Mesh {
    let axes: Vec<String> =
        [("dp", dp), ("tp", tp)].iter().filter(|(_, n)| *n > 1).map(|(a, n)| format!("{a}={n}")).collect();
    Mesh::parse(&axes.join(",")).unwrap()
}

/// Trains `name` 3 steps on dp x tp ranks and on one device; returns the worst relative error.
fn differential(name: &str, dp: usize, tp: usize, zero: u8, sp: bool) -> f64 {
    let dir = fixture(name);
    let opt = AdamW::default();
    let data = TokenFile::open(&dir.join("train_tokens.bin")).unwrap();
    let full = import_dir(&dir, BuildOptions::f32(ROWS, SEQ, false)).unwrap();
    let weights = full.weights.clone().unwrap();
    let step = build_train_step(&full.graph, &opt).unwrap();
    let mut reference = Trainer::new(step.graph, weights.clone(), Precision::F64).unwrap();

    let local = import_dir(&dir, BuildOptions::f32(ROWS / dp, SEQ, false)).unwrap();
    let mut forward = local.graph.clone();
    forward.mesh = mesh_of(dp, tp);
    let dpc = (dp > 1)
        .then(|| DataParallel { axis: "dp".into(), zero_stage: shardc_ir::ZeroStage::from_number(zero).unwrap() });
    let tpc = (tp > 1).then(|| ShardOptions::tp(tp, sp));
    let (step, _) = build_parallel_step(&forward, &opt, dpc.as_ref(), tpc.as_ref(), &DeviceModel::h100()).unwrap();
    shardc_ir::verify::verify(&step.graph).unwrap();
    let what = format!("{name} dp={dp} tp={tp} zero={zero} sp={sp}");
    let initial = step.graph.signature().rank_params(&weights);
    let mesh = step.graph.mesh.clone();
    let mut parallel = Trainer::new_spmd(step.graph.clone(), initial.clone(), Precision::F64).unwrap();
    // The lowering codegen runs: collectives bucketed, then kernels fused.
    let lowered = shardc_passes::lowering::lower(&step.graph);
    let (fused_graph, summary) = (lowered.program, lowered.fusion);
    assert!(summary.kernels > 0, "{name}: nothing fused");
    let mut fused = Trainer::new_spmd(fused_graph, initial, Precision::F64).unwrap();
    let mut worst = 0.0f64;
    for k in 0..3 {
        let (x, y) = data.batch(k, ROWS, SEQ).unwrap();
        let want = reference.step(x.clone(), y.clone(), 1e-3, k + 1).unwrap();
        let batches = dp_shards(&mesh, &x, &y);
        let got = parallel.step_spmd(batches.clone(), 1e-3, k + 1).unwrap();
        let got_fused = fused.step_spmd(batches, 1e-3, k + 1).unwrap();
        assert!(
            got_fused.loss == got.loss && got_fused.grad_norm == got.grad_norm,
            "{what} step {}: the fused program gives loss {} norm {}, the unfused {} {}",
            k + 1,
            got_fused.loss,
            got_fused.grad_norm,
            got.loss,
            got.grad_norm
        );
        let le = ((got.loss - want.loss) / want.loss).abs();
        let ne = ((got.grad_norm - want.grad_norm) / want.grad_norm).abs();
        assert!(
            le < TOL && ne < TOL,
            "{what} step {}: loss {} norm {} vs {} {}",
            k + 1,
            got.loss,
            got.grad_norm,
            want.loss,
            want.grad_norm
        );
        worst = worst.max(le).max(ne);
    }
    for p in reference.params() {
        for r in 0..mesh.world_size() {
            assert!(fused.rank_values(r)[p] == parallel.rank_values(r)[p], "{what}: fused rank {r} %{p} differs");
        }
        let got = step.graph.signature().whole_param(step.graph.find(p).unwrap(), |r| &parallel.rank_values(r)[p]);
        let e = common::check_param(&what, p, &got.to_f64(), &reference.values()[p].to_f64(), TOL, 3, 1e-3);
        worst = worst.max(e);
    }
    worst
}

fn sweep(name: &str) {
    let mut runs = 0;
    let mut worst = 0.0f64;
    for tp in [1, 2, 4] {
        for dp in [1, 2] {
            let zeros: &[u8] = if dp > 1 { &[0, 1, 2, 3] } else { &[0] };
            for &zero in zeros {
                for sp in if tp > 1 { vec![false, true] } else { vec![false] } {
                    if dp * tp == 1 {
                        continue;
                    }
                    let e = differential(name, dp, tp, zero, sp);
                    eprintln!("{name} dp={dp} tp={tp} zero={zero} sp={sp}: worst relative error {e:.1e}");
                    worst = worst.max(e);
                    runs += 1;
                }
            }
        }
    }
    eprintln!("{name}: {runs} meshes, worst relative error {worst:.1e} (tolerance {TOL:.0e})");
}

#[test]
fn gpt2_tensor_sequence_data_parallel_equal_single_device() {
    sweep("gpt2-tiny");
}

#[test]
fn llama_tensor_sequence_data_parallel_equal_single_device() {
    sweep("llama-tiny");
}

/// Megatron's collective counts per transformer layer come out of the rules.
#[test]
fn megatron_collectives_per_layer() {
    for name in ["gpt2-tiny", "llama-tiny"] {
        for sp in [false, true] {
            let m = import_dir(&fixture(name), BuildOptions::f32(2, 16, false)).unwrap();
            let mut fwd = m.graph.clone();
            fwd.mesh = Mesh::parse("tp=2").unwrap();
            let (step, _) = build_parallel_step(
                &fwd,
                &AdamW::default(),
                None,
                Some(&ShardOptions::tp(2, sp)),
                &DeviceModel::h100(),
            )
            .unwrap();
            let g = &step.graph;
            let count = |op: Op, phase: Phase, layer: u32| {
                g.nodes
                    .iter()
                    .filter(|n| n.op == op && n.phase == phase && g.layer(n.output()) == Some(layer))
                    .filter(|n| g.ty(n.inputs[0]).rank() >= 3)
                    .count()
            };
            for layer in 0..2 {
                let (f, b) = (Phase::Forward, Phase::Backward);
                let got = [
                    count(Op::AllReduce, f, layer),
                    count(Op::AllGather, f, layer),
                    count(Op::ReduceScatter, f, layer),
                    count(Op::AllReduce, b, layer),
                    count(Op::AllGather, b, layer),
                    count(Op::ReduceScatter, b, layer),
                ];
                let want = if sp { [0, 2, 2, 0, 2, 2] } else { [2, 0, 0, 2, 0, 0] };
                assert_eq!(got, want, "{name} sp={sp} layer {layer}: [AR AG RS] forward, backward");
            }
        }
    }
}

/// Identical layers are searched once: the e-graph of a 12-layer model is the 2-layer one's.
#[test]
fn search_does_not_grow_with_depth() {
    let size = |layers: usize| {
        let json = format!(
            r#"{{"model_type": "gpt2", "n_embd": 64, "n_layer": {layers}, "n_head": 4, "vocab_size": 256, "n_positions": 64}}"#
        );
        let (config, _) = shardc_ir::import::parse_config(&json).unwrap();
        let mut g = shardc_ir::import::build_graph(&config, BuildOptions::f32(2, 16, false)).unwrap().graph;
        g.mesh = Mesh::parse("tp=2").unwrap();
        let s = shardc_passes::sharding::search_stats(&g, &ShardOptions::tp(2, true)).unwrap();
        assert_eq!(s.layers_stamped, layers);
        (s.enodes, s.eclasses, s.searched_nodes)
    };
    assert_eq!(size(2), size(12));
}

/// bf16 mixed precision (f32 masters cast to bf16 compute copies of the parameters' chunks):
/// dp=2 x tp=2 with sequence parallelism against one device in the same precision. bf16 rounds
/// after every op, so summation order shows: tolerance 2e-3 on the losses of 3 steps.
#[test]
fn bf16_mixed_tensor_parallel_matches_one_device() {
    let dir = fixture("gpt2-tiny");
    let opt = AdamW::default();
    let data = TokenFile::open(&dir.join("train_tokens.bin")).unwrap();
    let bf16 = |rows| BuildOptions { compute: shardc_ir::DType::Bf16, ..BuildOptions::f32(rows, SEQ, false) };
    let full = import_dir(&dir, bf16(ROWS)).unwrap();
    let weights = full.weights.clone().unwrap();
    let step = build_train_step(&full.graph, &opt).unwrap();
    let mut reference = Trainer::new(step.graph, weights.clone(), Precision::F32).unwrap();
    let mut forward = import_dir(&dir, bf16(ROWS / 2)).unwrap().graph;
    forward.mesh = mesh_of(2, 2);
    let dp = DataParallel { axis: "dp".into(), zero_stage: shardc_ir::ZeroStage::OptimizerStates };
    let (step, _) =
        build_parallel_step(&forward, &opt, Some(&dp), Some(&ShardOptions::tp(2, true)), &DeviceModel::h100()).unwrap();
    let mesh = step.graph.mesh.clone();
    let initial = step.graph.signature().rank_params(&weights);
    let mut parallel = Trainer::new_spmd(step.graph.clone(), initial, Precision::F32).unwrap();
    for k in 0..3 {
        let (x, y) = data.batch(k, ROWS, SEQ).unwrap();
        let want = reference.step(x.clone(), y.clone(), 1e-3, k + 1).unwrap();
        let batches = dp_shards(&mesh, &x, &y);
        let got = parallel.step_spmd(batches, 1e-3, k + 1).unwrap();
        let rel = ((got.loss - want.loss) / want.loss).abs();
        eprintln!("bf16 step {}: loss {:.6} vs {:.6} (rel {rel:.1e})", k + 1, got.loss, want.loss);
        assert!(rel < 2e-3, "step {}: {} vs {}", k + 1, got.loss, want.loss);
    }
}
