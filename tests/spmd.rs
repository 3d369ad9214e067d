//! Differential test of the SPMD interpreter: the hand-sharded Megatron MLP in
//! examples/tp-mlp.tir, run on 2 simulated ranks with column/row shards of the weights, gives
//! the loss of the unsharded examples/mlp.tir.

use shardc_ir::interp::{run, run_spmd, Precision};
use shardc_ir::text::parse;
use shardc_ir::{DType, Tensor};
use shardc_runtime::init::Rng;
use std::collections::HashMap;

fn load(name: &str) -> shardc_ir::Graph {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(name);
    parse(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn random(rng: &mut Rng, shape: &[usize]) -> Vec<f64> {
    (0..shape.iter().product::<usize>()).map(|_| rng.normal()).collect()
}

/// Columns `cols` of a row-major [rows, n] matrix.
fn columns(m: &[f64], n: usize, cols: std::ops::Range<usize>) -> Vec<f64> {
    m.chunks(n).flat_map(|r| r[cols.clone()].to_vec()).collect()
}

#[test]
fn tensor_parallel_mlp_equals_the_unsharded_mlp() {
    let (full, tp) = (load("mlp.tir"), load("tp-mlp.tir"));
    let mut rng = Rng::new(42);
    let (w1, b1, w2) = (random(&mut rng, &[16, 64]), random(&mut rng, &[64]), random(&mut rng, &[64, 16]));
    let (x, y) = (random(&mut rng, &[8, 16]), random(&mut rng, &[8, 16]));
    let t = |shape: &[usize], v: Vec<f64>| Tensor::f64(DType::F32, shape.to_vec(), v);
    let data: HashMap<String, Tensor> = [("x".to_string(), t(&[8, 16], x)), ("y".to_string(), t(&[8, 16], y))].into();
    let mut unsharded = data.clone();
    unsharded.insert("w1".into(), t(&[16, 64], w1.clone()));
    unsharded.insert("b1".into(), t(&[64], b1.clone()));
    unsharded.insert("w2".into(), t(&[64, 16], w2.clone()));
    let want = run(&full, &unsharded, Precision::F64).unwrap()[0].scalar().unwrap();
    let ranks: Vec<HashMap<String, Tensor>> = (0..2)
        .map(|r| {
            let cols = r * 32..(r + 1) * 32;
            let mut m = data.clone();
            m.insert("w1".into(), t(&[16, 32], columns(&w1, 64, cols.clone())));
            m.insert("b1".into(), t(&[32], b1[cols.clone()].to_vec()));
            m.insert("w2".into(), t(&[32, 16], w2[cols.start * 16..cols.end * 16].to_vec()));
            m
        })
        .collect();
    let got = run_spmd(&tp, &ranks, Precision::F64).unwrap();
    for (r, out) in got.iter().enumerate() {
        let loss = out[0].scalar().unwrap();
        assert!(((loss - want) / want).abs() < 1e-12, "rank {r}: loss {loss} vs unsharded {want}");
    }
}
