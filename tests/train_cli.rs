//! `shardc train` end to end: JSON lines, exact resume, Ctrl-C saving a checkpoint.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("shardc-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tokens() -> PathBuf {
    root().join("tests/fixtures/hf/gpt2-tiny/train_tokens.bin")
}

/// Runs `shardc train` with `args`; returns (exit code, the JSON objects on stdout, stderr).
fn train<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (i32, Vec<serde_json::Value>, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_shardc")).arg("train").args(args).output().unwrap();
    let stdout = String::from_utf8(o.stdout).unwrap();
    let lines = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("stdout line `{l}` is not JSON: {e}")))
        .collect();
    (o.status.code().unwrap_or(-1), lines, String::from_utf8_lossy(&o.stderr).into_owned())
}

/// The bundled Shakespeare as a token file in `dir`.
fn shakespeare_tokens(dir: &std::path::Path) -> PathBuf {
    let bin = dir.join("shakespeare.bin");
    let text = root().join("examples/data/shakespeare.txt");
    let o =
        Command::new(env!("CARGO_BIN_EXE_shardc")).args(["data", "prepare"]).arg(&text).arg("-o").arg(&bin).output();
    assert!(o.unwrap().status.success());
    bin
}

/// `train` arguments for the bundled model on `data`, 2 x 32 tokens, JSON lines.
fn bundled_args(data: &std::path::Path, steps: &str) -> Vec<String> {
    let model = root().join("examples/shakespeare-char");
    let args = [model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--batch", "2", "--seq", "32"];
    args.iter().map(|s| s.to_string()).chain(["--steps", steps, "--json"].map(String::from)).collect()
}

/// Starts `shardc train` with `args` in the background, its stdout and stderr made by `stdio`.
fn spawn_train(args: &[String], stdio: fn() -> Stdio) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_shardc")).arg("train").args(args).stdout(stdio()).stderr(stdio()).spawn().unwrap()
}

/// `train` arguments for the tiny GPT-2 fixture on its token file, 2 x 16 tokens, JSON lines.
fn tiny_args(steps: &str, extra: &[&str]) -> Vec<String> {
    let model = root().join("tests/fixtures/hf/gpt2-tiny");
    let mut v: Vec<String> = [
        model.to_str().unwrap(),
        "--data",
        tokens().to_str().unwrap(),
        "--batch",
        "2",
        "--seq",
        "16",
        "--steps",
        steps,
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn losses(lines: &[serde_json::Value]) -> Vec<(u64, f64)> {
    lines.iter().map(|l| (l["step"].as_u64().unwrap(), l["loss"].as_f64().unwrap())).collect()
}

#[test]
fn json_mode_prints_one_object_per_step_and_nothing_else() {
    let (code, lines, err) = train(&tiny_args("4", &[]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(lines.len(), 4);
    for (k, l) in lines.iter().enumerate() {
        assert_eq!(l["step"].as_u64(), Some(k as u64 + 1));
        for key in ["loss", "lr", "grad_norm", "tokens_per_s"] {
            assert!(l[key].as_f64().is_some_and(f64::is_finite), "missing {key} in {l}");
        }
    }
}

#[test]
fn checkpointing_leaves_the_run_unchanged_and_mismatched_resumes_are_refused() {
    let common = |steps: &str| tiny_args(steps, &["--warmup", "2", "--data-order", "random", "--seed", "3"]);
    let (_, full, err) = train(&common("6"));
    assert_eq!(full.len(), 6, "{err}");
    // The same run, checkpointed every 2 steps (exact resume is tested with Ctrl-C below).
    let dir = tmp("resume");
    let ckpt = dir.to_str().unwrap().to_string();
    let mut first = common("6");
    first.extend(["--checkpoint".into(), ckpt.clone(), "--save-every".into(), "2".into()]);
    let (code, part, err) = train(&first);
    assert_eq!(code, 0, "{err}");
    assert_eq!(losses(&part), losses(&full), "checkpointing must not change the run");
    // The final checkpoint is at step 6; resuming needs more steps than that.
    let mut more = common("6");
    more.extend(["--resume".into(), ckpt.clone()]);
    let (code, _, err) = train(&more);
    assert_ne!(code, 0);
    assert!(err.contains("at step 6 already"), "{err}");
    // A mismatching run is refused with the reason.
    let mut other = common("8");
    let seed_at = other.iter().position(|s| s == "3").unwrap();
    other[seed_at] = "4".into();
    other.extend(["--resume".into(), ckpt]);
    let (code, _, err) = train(&other);
    assert_ne!(code, 0);
    assert!(err.contains("seed = 3") && err.contains("seed = 4"), "{err}");
}

#[test]
fn ctrl_c_saves_and_resume_matches_the_uninterrupted_run() {
    let bin = shakespeare_tokens(&tmp("ctrlc-data"));
    let mut base = bundled_args(&bin, "30");
    base.extend(["--warmup", "3"].map(String::from));
    let (_, full, err) = train(&base);
    assert_eq!(full.len(), 30, "{err}");

    let dir = tmp("ctrlc");
    let mut run = base.clone();
    run.extend(["--checkpoint".into(), dir.to_str().unwrap().into()]);
    let mut child = spawn_train(&run, Stdio::piped);
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut seen = Vec::new();
    let mut line = String::new();
    while seen.len() < 3 && reader.read_line(&mut line).unwrap() > 0 {
        seen.push(serde_json::from_str::<serde_json::Value>(&line).unwrap());
        line.clear();
    }
    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    for l in reader.lines() {
        seen.push(serde_json::from_str(&l.unwrap()).unwrap());
    }
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    let stopped = seen.len();
    assert!(stopped < 30, "the run was not interrupted ({stopped} steps)");
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains(&format!("interrupted after step {stopped}")) && err.contains("--resume"), "{err}");
    assert_eq!(losses(&seen), losses(&full[..stopped]));

    let mut resume = base.clone();
    resume.extend(["--resume".into(), dir.to_str().unwrap().into()]);
    let (code, rest, err) = train(&resume);
    assert_eq!(code, 0, "{err}");
    assert_eq!(losses(&rest), losses(&full[stopped..]), "the resumed run must continue the same loss curve");
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let model = root().join("examples/shakespeare-char");
    let data_dir = tmp("threads");
    let bin = data_dir.join("s.bin");
    let text = std::fs::read(root().join("examples/data/shakespeare.txt")).unwrap();
    std::fs::write(data_dir.join("s.txt"), &text[..20000]).unwrap();
    let prep = Command::new(env!("CARGO_BIN_EXE_shardc"))
        .args(["data", "prepare", data_dir.join("s.txt").to_str().unwrap(), "-o", bin.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(prep.status.success());
    let run = |threads: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_shardc"))
            .env("SHARDC_THREADS", threads)
            .args([
                "train",
                model.to_str().unwrap(),
                "--data",
                bin.to_str().unwrap(),
                "--batch",
                "4",
                "--seq",
                "128",
                "--steps",
                "3",
                "--json",
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let lines: Vec<serde_json::Value> =
            String::from_utf8(o.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        lines
            .iter()
            .map(|l| (l["loss"].as_f64().unwrap().to_bits(), l["grad_norm"].as_f64().unwrap().to_bits()))
            .collect::<Vec<_>>()
    };
    assert_eq!(run("1"), run("2"), "losses and gradient norms must be bit-identical");
}

#[test]
fn data_parallel_training_matches_one_device_and_resumes_exactly() {
    let model = root().join("tests/fixtures/hf/gpt2-tiny");
    let base = |steps: &str, extra: &[&str]| {
        let mut v = tiny_args(steps, &["--lr", "1e-3", "--min-lr", "1e-3"]);
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let (code, single, err) = train(&base("4", &[]));
    assert_eq!(code, 0, "{err}");
    for zero in ["0", "1", "2", "3"] {
        let (code, parallel, err) = train(&base("4", &["--mesh", "dp=2", "--zero", zero]));
        assert_eq!(code, 0, "{err}");
        assert!(err.is_empty() || !err.contains("error"), "{err}");
        for ((s, a), (_, b)) in losses(&single).iter().zip(losses(&parallel)) {
            assert!(((a - b) / a).abs() < 1e-5, "zero {zero} step {s}: dp=2 loss {b} vs one device {a}");
        }
    }
    // ZeRO-1 checkpoints hold every rank's moment shards, ZeRO-3 ones the gathered parameters
    // too (which `shardc eval --weights` reads below); a run resumed from either continues the
    // uninterrupted run's losses exactly.
    let resumes_exactly = |zero: &str| {
        let dir = tmp(&format!("zero{zero}"));
        let ckpt = dir.to_str().unwrap();
        let mesh = ["--mesh", "dp=2", "--zero", zero];
        let (_, full, _) = train(&base("4", &mesh));
        let (code, _, err) = train(&base("2", &[&mesh[..], &["--checkpoint", ckpt]].concat()));
        assert_eq!(code, 0, "{err}");
        let (code, rest, err) = train(&base("4", &[&mesh[..], &["--resume", ckpt]].concat()));
        assert_eq!(code, 0, "{err}");
        assert_eq!(losses(&rest), losses(&full[2..]), "zero {zero}");
        dir
    };
    resumes_exactly("1");
    let dir3 = resumes_exactly("3");
    // A checkpoint directory means its latest step.
    let o = Command::new(env!("CARGO_BIN_EXE_shardc"))
        .args([
            "eval",
            model.to_str().unwrap(),
            "--weights",
            dir3.to_str().unwrap(),
            "--data",
            tokens().to_str().unwrap(),
            "--batch",
            "2",
            "--seq",
            "16",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Mistakes are explained.
    let (code, _, err) = train(&base("2", &["--mesh", "dp=3"]));
    assert!(code != 0 && err.contains("--batch 2 does not divide over dp=3"), "{err}");
    let (code, _, err) = train(&base("2", &["--mesh", "dp=2,pp=2"]));
    assert!(code != 0 && err.contains("axis `pp` is not known"), "{err}");
    let (code, _, err) = train(&base("2", &["--zero", "1"]));
    assert!(code != 0 && err.contains("needs a data-parallel mesh"), "{err}");
}

/// Tensor and sequence parallelism with data parallelism and ZeRO on simulated ranks: the same
/// losses as one device (f32: 1e-5), checkpoints that gather the parameters' chunks and keep
/// every rank's moments, exact resume; meshes that do not divide the model are explained.
#[test]
fn tensor_parallel_training_matches_one_device_and_resumes_exactly() {
    let base = |steps: &str, extra: &[&str]| {
        let mut v = tiny_args(steps, &["--lr", "1e-3", "--min-lr", "1e-3"]);
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let (code, single, err) = train(&base("3", &[]));
    assert_eq!(code, 0, "{err}");
    let mesh = ["--mesh", "dp=2,tp=2", "--zero", "1", "--sequence-parallel"];
    let (code, parallel, err) = train(&base("3", &mesh));
    assert_eq!(code, 0, "{err}");
    for ((s, a), (_, b)) in losses(&single).iter().zip(losses(&parallel)) {
        assert!(((a - b) / a).abs() < 1e-5, "step {s}: dp=2,tp=2 loss {b} vs one device {a}");
    }
    let dir = tmp("tp");
    let ckpt = dir.to_str().unwrap();
    let (code, _, err) = train(&base("1", &[&mesh[..], &["--checkpoint", ckpt]].concat()));
    assert_eq!(code, 0, "{err}");
    let (code, rest, err) = train(&base("3", &[&mesh[..], &["--resume", ckpt]].concat()));
    assert_eq!(code, 0, "{err}");
    assert_eq!(losses(&rest), losses(&parallel[1..]), "resumed tensor-parallel run");
    // The checkpoint holds full parameters: a single-device run resumes its weights.
    let t = shardc_ir::import::weights::read_tensors(&shardc_runtime::checkpoint::resolve(&dir).unwrap()).unwrap();
    assert_eq!(t["wte.weight"].shape, vec![256, 64], "parameters are saved whole");
    assert_eq!(t["wte.weight.adam_m"].shape, vec![256, 64], "moments are saved whole too (any mesh resumes)");
    let (code, _, err) = train(&base("2", &["--mesh", "tp=3"]));
    assert!(code != 0 && err.contains("tp=3 does not divide 4 attention heads; use tp in {1,2,4}"), "{err}");
    let (code, _, err) = train(&base("2", &["--mesh", "tp=2,dp=2"]));
    assert!(code != 0 && err.contains("put `dp` first"), "{err}");
}

/// Checkpoint integrity (what kill -9, byte flips and hand edits once got through): a second
/// writer fails at once naming the first; a killed save's temporary file is gone once the next
/// run starts; a flipped byte, a missing moment, a NaN and a resume with another precision are
/// errors naming the file and the tensor or setting.
#[test]
fn damaged_checkpoints_and_concurrent_writers_are_refused() {
    use shardc_ir::import::weights::{read_metadata, read_tensors, write_tensors_with_metadata};
    let dir = tmp("integrity");
    let ckpt = dir.to_str().unwrap().to_string();
    let with = |steps: &str, extra: &[&str]| {
        let mut v = tiny_args(steps, extra);
        v.extend(["--checkpoint".to_string(), ckpt.clone()]);
        v
    };
    // A stale temporary of a killed save (a dead process id), and a run that writes checkpoints.
    let stale = dir.join("checkpoint.safetensors.tmp.4000000000.1");
    std::fs::write(&stale, b"half a checkpoint").unwrap();
    let (code, _, err) = train(&with("2", &[]));
    assert_eq!(code, 0, "{err}");
    assert!(!stale.exists(), "the killed save's temporary file is removed");
    let file = shardc_runtime::checkpoint::resolve(&dir).unwrap();
    let good = std::fs::read(&file).unwrap();

    // A live process holds the directory: the second writer fails before training.
    std::fs::write(dir.join("checkpoint.lock"), std::process::id().to_string()).unwrap();
    let (code, lines, err) = train(&with("2", &[]));
    assert!(code != 0 && lines.is_empty(), "{err}");
    assert!(err.contains(&format!("another run (process {})", std::process::id())), "{err}");
    std::fs::remove_file(dir.join("checkpoint.lock")).unwrap();

    let resume = |extra: &[&str]| {
        let mut v = tiny_args("4", extra);
        v.extend(["--resume".to_string(), ckpt.clone()]);
        train(&v)
    };
    let (code, _, err) = resume(&[]);
    assert_eq!(code, 0, "an intact checkpoint resumes: {err}");

    // One flipped byte in the last tensor's data.
    let mut flipped = good.clone();
    let last = flipped.len() - 3;
    flipped[last] ^= 0x40;
    std::fs::write(&file, &flipped).unwrap();
    let (code, _, err) = resume(&[]);
    assert!(
        code != 0 && err.contains("does not match its checksum") && err.contains("checkpoint.safetensors"),
        "{err}"
    );

    // A moment removed (its checksum entry stays in the header).
    std::fs::write(&file, &good).unwrap();
    let meta = read_metadata(&file).unwrap();
    let mut tensors: std::collections::BTreeMap<String, shardc_ir::Tensor> =
        read_tensors(&file).unwrap().into_iter().collect();
    let moment = tensors.keys().find(|k| k.ends_with("adam_v")).cloned().expect("a moment");
    let kept = tensors.remove(&moment).unwrap();
    write_tensors_with_metadata(&file, &tensors, Some(meta.clone())).unwrap();
    let (code, _, err) = resume(&[]);
    assert!(code != 0 && err.contains(&format!("`{moment}`")) && err.contains("missing"), "{err}");
    // The same without the checksum table: still missing.
    let mut bare = meta.clone();
    bare.remove("tensor_sha256");
    write_tensors_with_metadata(&file, &tensors, Some(bare.clone())).unwrap();
    let (code, _, err) = resume(&[]);
    assert!(code != 0 && err.contains(&format!("`{moment}`")) && err.contains("is missing"), "{err}");

    // A NaN in a weight (no checksum table to catch it first).
    tensors.insert(moment, kept);
    let weight = tensors.keys().find(|k| !k.contains("adam")).cloned().unwrap();
    if let shardc_ir::Data::F32(v) = &mut tensors.get_mut(&weight).unwrap().data {
        v[0] = f32::NAN;
    }
    write_tensors_with_metadata(&file, &tensors, Some(bare)).unwrap();
    let (code, _, err) = resume(&[]);
    assert!(code != 0 && err.contains(&format!("`{weight}`")) && err.contains("non-finite"), "{err}");

    // Another precision than the checkpoint's.
    std::fs::write(&file, &good).unwrap();
    let (code, _, err) = resume(&["--precision", "bf16-mixed"]);
    assert!(code != 0 && err.contains("precision = f32") && err.contains("precision = bf16-mixed"), "{err}");
}

/// Token files are memory-mapped and read in place: training on a 256 MB file (128M uint16
/// tokens) keeps the process's peak resident memory within 64 MB of the same run on the small
/// fixture file (reading it whole and widening to u32 took 512 MB more).
#[test]
fn a_large_token_file_is_not_read_into_memory() {
    use std::io::Write;
    let dir = tmp("large-data");
    let big = dir.join("big.bin");
    let n: usize = 128 << 20;
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&big).unwrap());
        let mut header = [0i32; 256];
        header[..3].copy_from_slice(&[20240520, 1, n as i32]);
        header.iter().for_each(|h| f.write_all(&h.to_le_bytes()).unwrap());
        let chunk: Vec<u8> = (0..1 << 20).flat_map(|i: u32| ((i % 200) as u16).to_le_bytes()).collect();
        for _ in 0..n / (1 << 20) {
            f.write_all(&chunk).unwrap();
        }
    }
    let peak = |data: &std::path::Path| {
        let mut args = tiny_args("2", &["--data-order", "sequential"]);
        args[2] = data.to_str().unwrap().to_string();
        let (code, lines, err) = train(&args);
        assert_eq!(code, 0, "{err}");
        lines.last().unwrap()["peak_rss_bytes"].as_f64().unwrap()
    };
    let (large, small) = (peak(&big), peak(&tokens()));
    eprintln!("peak resident: {:.1} MB with the 256 MB file, {:.1} MB with the fixture", large / 1e6, small / 1e6);
    assert!(large - small < 64e6, "{large} vs {small} bytes");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Checkpoints hold every tensor whole, so `--resume` reshards: 3 steps on dp=2,tp=2 ZeRO-1,
/// then steps 4-6 on dp=4 ZeRO-3, on tp=2 with sequence parallelism and on one device give the
/// losses of the uninterrupted dp=2,tp=2 run (1e-5 relative; the meshes sum in other orders).
#[test]
fn resume_on_another_mesh_continues_the_run() {
    let dir = tmp("reshard");
    let ckpt = dir.join("ckpt").to_str().unwrap().to_string();
    let common = |steps: &str, mesh: &[&str]| {
        let mut v = tiny_args(steps, &["--lr", "3e-3", "--min-lr", "3e-3", "--data-order", "sequential"]);
        // 4 sequences of 8 tokens (tiny_args has 2 x 16), so that dp=4 has a row per rank.
        let at = |v: &Vec<String>, flag: &str| v.iter().position(|a| a == flag).unwrap() + 1;
        let (b, t) = (at(&v, "--batch"), at(&v, "--seq"));
        v[b] = "4".into();
        v[t] = "8".into();
        v.extend(mesh.iter().map(|s| s.to_string()));
        v
    };
    let first = ["--mesh", "dp=2,tp=2", "--zero", "1"];
    let (code, whole, err) = train(&common("6", &first));
    assert_eq!(code, 0, "{err}");
    let mut part = common("3", &first);
    part.extend(["--checkpoint".to_string(), ckpt.clone()]);
    let (code, _, err) = train(&part);
    assert_eq!(code, 0, "{err}");
    for mesh in [&["--mesh", "dp=4", "--zero", "3"][..], &["--mesh", "tp=2", "--sequence-parallel"], &[]] {
        let mut resumed = common("6", mesh);
        resumed.extend(["--resume".to_string(), ckpt.clone()]);
        let (code, lines, err) = train(&resumed);
        assert_eq!(code, 0, "{mesh:?}: {err}");
        let (got, want) = (losses(&lines), losses(&whole[3..]));
        assert_eq!(got.len(), 3, "{mesh:?}");
        for ((s, a), (_, b)) in got.iter().zip(&want) {
            assert!(((a - b) / b).abs() < 1e-5, "{mesh:?} step {s}: {a} vs the uninterrupted {b}");
        }
    }
}

/// `train --init-from` starts a new run from a checkpoint's weights on another mesh: its first
/// loss is `eval`'s loss of those weights on the same batch; with `--resume` it is refused.
#[test]
fn init_from_starts_from_given_weights_on_any_mesh() {
    let dir = tmp("init-from");
    let ckpt = dir.join("ckpt").to_str().unwrap().to_string();
    let args = |steps: &str, extra: &[&str]| {
        let mut v = tiny_args(steps, &["--data-order", "sequential"]);
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let (code, _, err) = train(&args("3", &["--mesh", "dp=2", "--zero", "1", "--checkpoint", &ckpt]));
    assert_eq!(code, 0, "{err}");
    let (code, lines, err) = train(&args("1", &["--mesh", "tp=2", "--init-from", &ckpt]));
    assert_eq!(code, 0, "{err}");
    let first = lines[0]["loss"].as_f64().unwrap();
    let model = root().join("tests/fixtures/hf/gpt2-tiny");
    let o = Command::new(env!("CARGO_BIN_EXE_shardc"))
        .args(["eval", model.to_str().unwrap(), "--weights", &ckpt, "--data", tokens().to_str().unwrap()])
        .args(["--batch", "2", "--seq", "16", "--batches", "1", "--json"])
        .output()
        .unwrap();
    let eval: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let want = eval["loss"].as_f64().unwrap();
    assert!(((first - want) / want).abs() < 1e-5, "first loss {first}, eval of the weights {want}");
    let (code, _, err) = train(&args("4", &["--init-from", &ckpt, "--resume", &ckpt]));
    assert!(code != 0 && err.contains("give one"), "{err}");
}

/// Checkpoints go to step directories with a `latest` marker: `--keep-last` prunes older ones,
/// and `kill -9` at any moment (here during runs that save every step) leaves `latest` naming a
/// checkpoint that resumes.
#[test]
fn step_directories_latest_keep_last_and_kill_during_saves() {
    let dir = tmp("latest");
    let ckpt = dir.join("ckpt");
    let c = ckpt.to_str().unwrap();
    let (code, _, err) = train(&tiny_args("5", &["--checkpoint", c, "--save-every", "1", "--keep-last", "2"]));
    assert_eq!(code, 0, "{err}");
    let mut steps: Vec<String> = std::fs::read_dir(&ckpt)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    steps.sort();
    assert_eq!(steps, vec!["step-00000004", "step-00000005"]);
    assert_eq!(std::fs::read_to_string(ckpt.join("latest")).unwrap(), "step-00000005");

    // kill -9 a run of the bundled model that saves every step, at several moments.
    let data = shakespeare_tokens(&dir);
    let killed = dir.join("killed");
    let base = |steps: &str| bundled_args(&data, steps);
    let saving = ["--checkpoint", killed.to_str().unwrap(), "--save-every", "1", "--keep-last", "3"].map(String::from);
    // A first run to its end (compiles and caches the kernels, writes checkpoints), then runs
    // that resume from it and are killed while they train and save.
    let (code, _, err) = train(&[base("3"), saving.to_vec()].concat());
    assert_eq!(code, 0, "{err}");
    for ms in [300u64, 600, 900] {
        let mut args = [base("100000"), saving.to_vec()].concat();
        args.extend(["--resume".to_string(), killed.to_str().unwrap().to_string()]);
        let mut child = spawn_train(&args, Stdio::null);
        std::thread::sleep(std::time::Duration::from_millis(ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
    // Whatever the kills interrupted, `latest` names a checkpoint that resumes.
    let latest = std::fs::read_to_string(killed.join("latest")).expect("a save completed before the kills");
    let at: usize = latest.trim().trim_start_matches("step-").parse().unwrap();
    let mut args = base(&(at + 1).to_string());
    args.extend(["--resume".to_string(), killed.to_str().unwrap().to_string()]);
    let (code, lines, err) = train(&args);
    assert_eq!(code, 0, "resuming after kill -9: {err}");
    assert_eq!(lines.len(), 1, "{err}");
}

/// `--val-data` reports the held-out loss every `--eval-every` steps and after the last, in the
/// step's JSON line; the last equals `eval` of the saved weights on that file.
#[test]
fn validation_loss_every_k_steps_equals_eval_of_the_weights() {
    let dir = tmp("val");
    let ckpt = dir.join("ckpt").to_str().unwrap().to_string();
    let val = root().join("tests/fixtures/hf/gpt2-tiny/tokens.bin").to_str().unwrap().to_string();
    let extra =
        ["--val-data", &val, "--val-batches", "1", "--eval-every", "2", "--mesh", "dp=2", "--checkpoint", &ckpt];
    let (code, lines, err) = train(&tiny_args("5", &extra));
    assert_eq!(code, 0, "{err}");
    let with: Vec<u64> = lines.iter().filter(|l| l["val_loss"].is_f64()).map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(with, vec![2, 4, 5], "every 2 steps and after the last");
    let last = lines[4]["val_loss"].as_f64().unwrap();
    let model = root().join("tests/fixtures/hf/gpt2-tiny");
    let o = Command::new(env!("CARGO_BIN_EXE_shardc"))
        .args(["eval", model.to_str().unwrap(), "--weights", &ckpt, "--data", &val, "--batch", "2", "--seq", "16"])
        .args(["--batches", "1", "--json"])
        .output()
        .unwrap();
    let want = serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["loss"].as_f64().unwrap();
    assert!(((last - want) / want).abs() < 1e-5, "val_loss {last}, eval {want}");
    let (code, _, err) = train(&tiny_args("2", &["--eval-every", "1"]));
    assert!(code != 0 && err.contains("--eval-every needs --val-data"), "{err}");
}
