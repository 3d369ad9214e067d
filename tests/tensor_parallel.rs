//! Tensor and sequence parallelism on the tiny fixtures.

use shardc_ir::import::{import_dir, BuildOptions};
use shardc_ir::interp::{run, run_spmd, Precision};
use shardc_ir::{Mesh, Op, Tensor};
use shardc_passes::cost::DeviceModel;
use shardc_passes::sharding::{rank_params, shard_forward, ShardOptions};
use std::collections::HashMap;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf").join(name)
}

#[test]
fn forward_loss_matches() {
    for name in ["gpt2-tiny", "llama-tiny"] {
        for tp in [2, 4] {
            for sp in [false, true] {
                let m = import_dir(&fixture(name), BuildOptions::f32(2, 16, false)).unwrap();
                let mut fwd = m.graph.clone();
                fwd.mesh = Mesh::parse(&format!("tp={tp}")).unwrap();
                let sh = shard_forward(&fwd, &ShardOptions::tp(tp, sp), &DeviceModel::h100()).unwrap();
                let count = |op: Op| sh.graph.nodes.iter().filter(|n| n.op == op).count();
                eprintln!(
                    "{name} tp={tp} sp={sp}: AR {} AG {} RS {} chunk {} f {} stats {:?}",
                    count(Op::AllReduce),
                    count(Op::AllGather),
                    count(Op::ReduceScatter),
                    count(Op::TakeShard),
                    count(Op::Identity),
                    sh.stats
                );
                if std::env::var("SHOW").is_ok() {
                    eprintln!("{}", shardc_ir::text::print(&sh.graph));
                }
                let mut w = m.weights.clone().unwrap();
                let toks: Vec<i64> = (0..32).map(|i| (i * 37 % 256) as i64).collect();
                let tgts: Vec<i64> = (0..32).map(|i| (i * 91 % 256) as i64).collect();
                w.insert("tokens".into(), Tensor::int(shardc_ir::DType::I64, vec![2, 16], toks));
                w.insert("targets".into(), Tensor::int(shardc_ir::DType::I64, vec![2, 16], tgts));
                let want = run(&m.graph, &w, Precision::F64).unwrap()[0].scalar().unwrap();
                let ranks = rank_params(&w, &sh.param_splits, &sh.graph.mesh, "tp");
                let got = run_spmd(&sh.graph, &ranks, Precision::F64).unwrap();
                for r in &got {
                    let l = r[0].scalar().unwrap();
                    assert!(((l - want) / want).abs() < 1e-12, "{name} tp={tp} sp={sp}: {l} vs {want}");
                }
                let _: HashMap<(), ()> = HashMap::new();
            }
        }
    }
}

#[test]
fn debug_costs() {
    if std::env::var("DEBUG_COSTS").is_err() {
        return;
    }
    let m = import_dir(&fixture("gpt2-tiny"), BuildOptions::f32(2, 16, false)).unwrap();
    let mut fwd = m.graph.clone();
    fwd.mesh = Mesh::parse("tp=2").unwrap();
    let s = shardc_passes::sharding::search(&fwd, &ShardOptions::tp(2, true)).unwrap();
    let ext = shardc_passes::sharding::extract::extract(&s, &DeviceModel::h100());
    for ((v, l), ids) in shardc_passes::sharding::classes_by_layout(&s) {
        let name = fwd.name_of(v);
        if name.starts_with("h0.") || name == "emb" || name.starts_with("tok") {
            for id in ids {
                eprintln!("{name} {l:?}: best {} cost {:?} nodes {:?}", ext.best[&id], ext.cost[&id], s.eg[id].nodes);
            }
        }
    }
}
