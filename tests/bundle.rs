//! A compiled step through its bundle: `shardc-codegen` writes it, the file is read back (every
//! check passes), and the runtime trains from it exactly as from the step itself.

use shardc_bundle::{Bundle, ModelInfo};
use shardc_ir::import::{import_dir, BuildOptions};
use shardc_ir::interp::Precision;
use shardc_ir::{Mesh, ZeroStage};
use shardc_passes::cost::DeviceModel;
use shardc_passes::sharding::ShardOptions;
use shardc_passes::train_step::{build_parallel_step, AdamW, DataParallel};
use shardc_runtime::checkpoint::rank_states;
use shardc_runtime::data::TokenFile;
use shardc_runtime::train::{dp_shards, Trainer};
use std::path::PathBuf;

#[test]
fn a_bundled_step_trains_like_the_step() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/gpt2-tiny");
    let full = import_dir(&dir, BuildOptions::f32(4, 16, false)).unwrap();
    let mut forward = import_dir(&dir, BuildOptions::f32(2, 16, false)).unwrap().graph;
    forward.mesh = Mesh::parse("dp=2,tp=2").unwrap();
    let dp = DataParallel { axis: "dp".into(), zero_stage: ZeroStage::OptimizerStates };
    let (step, _) = build_parallel_step(
        &forward,
        &AdamW::default(),
        Some(&dp),
        Some(&ShardOptions::tp(2, true)),
        &DeviceModel::h100(),
    )
    .unwrap();
    let model =
        ModelInfo { name: forward.name.clone(), config_json: std::fs::read_to_string(dir.join("config.json")).ok() };
    let bundle = shardc_codegen::bundle_step(&step.graph, model, None).unwrap();
    let path = std::env::temp_dir().join(format!("shardc-bundle-{}.shardc", std::process::id()));
    bundle.write(&path).unwrap();
    let read = Bundle::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    // Compared as text first (a readable diff), then exactly.
    assert_eq!(shardc_ir::text::print(&read.header.program), shardc_ir::text::print(&step.graph));
    assert!(read.header.program == step.graph, "the program comes back as written");

    let weights = full.weights.unwrap();
    let data = TokenFile::open(&dir.join("train_tokens.bin")).unwrap();
    let mut direct = Trainer::new_spmd(step.graph.clone(), rank_states(&step.graph, &weights), Precision::F32).unwrap();
    let mut bundled = Trainer::from_bundle(&read, rank_states(&read.header.program, &weights), Precision::F32).unwrap();
    for k in 0..2 {
        let (x, y) = data.batch(k, 4, 16).unwrap();
        let shards = dp_shards(&step.graph.mesh, &x, &y);
        let (a, b) =
            (direct.step_spmd(shards.clone(), 1e-3, k + 1).unwrap(), bundled.step_spmd(shards, 1e-3, k + 1).unwrap());
        assert_eq!(
            (a.loss.to_bits(), a.grad_norm.to_bits()),
            (b.loss.to_bits(), b.grad_norm.to_bits()),
            "step {}",
            k + 1
        );
    }
}
