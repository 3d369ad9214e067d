//! Mutation fuzzing of everything that reads user files: the `.tir` parser and verifier (and
//! the interpreter on small graphs that verify), `config.json`, safetensors checkpoints and token
//! files. The corpus is the repository's own files; mutations are byte flips, deletions,
//! duplications, truncations and insertions of syntax-relevant tokens, from a fixed seed, so a
//! failure reproduces. The property: no panic, ever; malformed input is an error value.
//!
//! Case counts are printed (run with `--nocapture`) and can be raised with FUZZ_CASES=N
//! (per target).

mod common;

use shardc_ir::import::{import_dir, parse_config, weights::read_tensors, BuildOptions};
use shardc_ir::interp::{run, Precision};
use shardc_ir::text::{parse, print};
use shardc_ir::verify::verify;
use shardc_ir::{ArgKind, Tensor};
use shardc_runtime::data::TokenFile;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const TOKENS: &[&str] = &[
    "%",
    "{",
    "}",
    "[",
    "]",
    "(",
    ")",
    ",",
    "=",
    ":",
    "\n",
    "#",
    "\"",
    "\\",
    "-1",
    "0",
    "1e999",
    "NaN",
    "-inf",
    "99999999999999999999",
    "4294967296",
    "f32",
    "i64",
    "bf16",
    "matmul",
    "all_gather",
    "reshape",
    "concat",
    "mesh tp=2",
    "output",
    "param",
    "input",
    "graph",
    "axis = \"tp\"",
    "dims = []",
    "null",
    "true",
    "\u{1F600}",
];

fn mutate(rng: &mut Rng, data: &[u8]) -> Vec<u8> {
    let mut d = data.to_vec();
    for _ in 0..1 + rng.below(4) {
        let n = d.len();
        match rng.below(6) {
            0 if n > 0 => {
                let i = rng.below(n);
                d[i] ^= 1 << rng.below(8);
            }
            1 if n > 0 => {
                let i = rng.below(n);
                let len = rng.below(16).min(n - i);
                d.drain(i..i + len);
            }
            2 if n > 0 => {
                let i = rng.below(n);
                let len = rng.below(64).min(n - i);
                let chunk = d[i..i + len].to_vec();
                let j = rng.below(n);
                d.splice(j..j, chunk);
            }
            3 => d.truncate(rng.below(n + 1)),
            _ => {
                let tok = TOKENS[rng.below(TOKENS.len())].as_bytes();
                let j = rng.below(n + 1);
                d.splice(j..j, tok.iter().copied());
            }
        }
    }
    d
}

fn cases() -> usize {
    std::env::var("FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(4000)
}

/// Runs `f` on `n` mutants of the corpus; fails with the offending input on a panic.
fn fuzz(name: &str, corpus: &[Vec<u8>], n: usize, seed: u64, f: impl Fn(&[u8])) {
    assert!(!corpus.is_empty(), "{name}: empty corpus");
    let mut rng = Rng(seed);
    // Expected panics are caught below and reported with their message; keep stderr quiet.
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    for i in 0..n {
        let base = &corpus[rng.below(corpus.len())];
        let input = mutate(&mut rng, base);
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| f(&input))) {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let path = std::env::temp_dir().join(format!("shardc-fuzz-{name}-{i}.bin"));
            std::fs::write(&path, &input).unwrap();
            panic!("{name}: case {i} panicked ({msg}); input saved to {}", path.display());
        }
    }
    eprintln!("fuzz {name}: {n} cases, no panic");
}

fn zero_inputs(g: &shardc_ir::Graph) -> HashMap<String, Tensor> {
    g.args.iter().map(|a| (g.name_of(a.value).to_string(), Tensor::zeros(g.ty(a.value)))).collect()
}

#[test]
fn tir_parser_verifier_and_interpreter_never_panic() {
    let mut files = Vec::new();
    files.extend(common::files_ending("tests/tir", ".tir").iter().map(|p| std::fs::read(p).unwrap()));
    files.extend(common::files_ending("examples", ".tir").iter().map(|p| std::fs::read(p).unwrap()));
    // Annotated programs (roles, phases, origins, layers, multi-result nodes): the passes' goldens.
    files.extend(common::files_ending("tests/passes", ".expected").iter().map(|p| std::fs::read(p).unwrap()));
    files.extend(common::files_ending("tests/golden", ".tir").iter().map(|p| std::fs::read(p).unwrap()));
    let counters = std::cell::RefCell::new((0usize, 0usize, 0usize));
    fuzz("tir", &files, cases() * 5, 0x5EED_0001, |bytes| {
        let src = String::from_utf8_lossy(bytes);
        let Ok(g) = parse(&src) else { return };
        counters.borrow_mut().0 += 1;
        if verify(&g).is_err() {
            return;
        }
        counters.borrow_mut().1 += 1;
        let printed = print(&g);
        assert_eq!(parse(&printed).expect("printed graphs parse"), g, "round trip");
        let small = g.values.iter().all(|v| v.ty.numel() <= 4096) && g.mesh.world_size() <= 8;
        if small && g.args.iter().all(|a| a.kind == ArgKind::Input || a.kind == ArgKind::Param) {
            let world = g.mesh.world_size();
            if world == 1 {
                let _ = run(&g, &zero_inputs(&g), Precision::F32);
            } else {
                let _ = shardc_ir::interp::run_spmd(&g, &vec![zero_inputs(&g); world], Precision::F64);
            }
            counters.borrow_mut().2 += 1;
        }
    });
    let (parsed, verified, executed) = *counters.borrow();
    eprintln!("  of which {parsed} parsed, {verified} verified, {executed} ran on the interpreter");
    assert!(
        parsed > 0 && verified > 0,
        "the mutations never produced a valid file: the fuzzer is not exercising the parser"
    );
}

#[test]
fn config_json_never_panics() {
    let mut files = Vec::new();
    files.extend(common::files_ending("tests/fixtures", "config.json").iter().map(|p| std::fs::read(p).unwrap()));
    files.extend(common::files_ending("examples", "config.json").iter().map(|p| std::fs::read(p).unwrap()));
    fuzz("config", &files, cases(), 0x5EED_0002, |bytes| {
        let _ = parse_config(&String::from_utf8_lossy(bytes));
    });
}

#[test]
fn safetensors_loading_never_panics() {
    let dir = std::env::temp_dir().join(format!("shardc-fuzz-st-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fixture = common::root().join("tests/fixtures/hf/gpt2-tiny");
    std::fs::copy(fixture.join("config.json"), dir.join("config.json")).unwrap();
    let mut files = Vec::new();
    files.extend(common::files_ending("tests/fixtures/hf", ".safetensors").iter().map(|p| std::fs::read(p).unwrap()));
    // Header-focused mutations matter most: keep the mutated file small by cutting the data.
    let files: Vec<Vec<u8>> = files
        .into_iter()
        .map(|f| f[..f.len().min(8192)].to_vec())
        .chain(std::iter::once(std::fs::read(fixture.join("model.safetensors")).unwrap()))
        .collect();
    let opts = BuildOptions::f32(1, 4, false);
    fuzz("safetensors", &files, cases() / 2, 0x5EED_0003, |bytes| {
        std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
        let _ = import_dir(&dir, opts);
        let _ = read_tensors(&dir.join("model.safetensors"));
    });
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn token_files_never_panic() {
    let mut files = Vec::new();
    files.extend(common::files_ending("tests/fixtures", "tokens.bin").iter().map(|p| std::fs::read(p).unwrap()));
    fuzz("tokens", &files, cases(), 0x5EED_0004, |bytes| {
        if let Ok(f) = TokenFile::from_bytes(Path::new("fuzz.bin"), bytes) {
            let _ = f.batch(0, 2, 4);
            let _ = f.batch(usize::MAX / 4, 2, 4);
        }
    });
}

/// The bundle reader and the host engine's loader on a real compiled bundle (the MLP example's
/// training step: kernels, memory plan, host library, PTX): truncation at every length of the
/// header and a stride through the sections, a flipped byte at every header offset and a
/// stride through the rest, and header JSON mutated and re-checksummed (so that it reaches the
/// parser and the loader's checks): never a panic, and no damaged file is accepted.
#[test]
fn bundle_reader_never_panics() {
    use shardc_bundle::{Bundle, ModelInfo};
    let src = std::fs::read_to_string(common::root().join("examples/mlp.tir")).unwrap();
    let g = shardc_ir::text::parse(&src).unwrap();
    let step = shardc_passes::train_step::build_train_step(&g, &shardc_passes::train_step::AdamW::default()).unwrap();
    let bundle =
        shardc_codegen::bundle_compiled(&step.graph, ModelInfo { name: "mlp".into(), config_json: None }, None, false)
            .unwrap();
    let bytes = bundle.to_bytes();
    let header_end = 20 + u64::from_le_bytes(bytes[12..20].try_into().unwrap()) as usize;
    let load = |b: &[u8]| {
        if let Ok(read) = Bundle::from_bytes(b) {
            let _ = shardc_runtime::exec::HostProgram::from_bundle(&read);
        }
    };
    let mut checked = 0;
    for n in (0..header_end).chain((header_end..bytes.len()).step_by(61)) {
        assert!(Bundle::from_bytes(&bytes[..n]).is_err(), "truncated to {n} bytes was accepted");
        checked += 1;
    }
    for i in (0..header_end).chain((header_end..bytes.len()).step_by(61)) {
        let mut bad = bytes.clone();
        bad[i] ^= 0x20;
        assert!(catch_unwind(AssertUnwindSafe(|| Bundle::from_bytes(&bad).is_err())).unwrap_or(false), "byte {i}");
        checked += 1;
    }
    eprintln!("bundle: {checked} truncations and flips refused, none panicked");
    // Header JSON mutants with valid checksums: they reach the JSON parser, the verifier and the
    // loader's own checks.
    let header = serde_json::to_vec(&bundle.header).unwrap();
    fuzz("bundle-header", &[header], cases() / 4, 11, |h| {
        let mut b = Bundle { header: bundle.header.clone(), sections: bundle.sections.clone() };
        match serde_json::from_slice(h) {
            Ok(parsed) => b.header = parsed,
            Err(_) => return,
        }
        load(&b.to_bytes());
    });
}
