//! What a user sees from the `runner` binary.

use crate::common;

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::{output, runner};

#[test]
fn stages_lists_kinds_with_keys_types_and_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, _) = output(runner(dir.path()).arg("stages"));
    assert_eq!(code, 0);
    assert!(out.contains("train: trains the model"), "{out}");
    assert!(out.lines().any(|l| l.trim_start().starts_with("lr") && l.contains("float") && l.contains("default 0.0005")), "{out}");
    assert!(out.contains("evaluate: measures top-1/top-5"), "{out}");
    assert!(out.contains("load_pretrained: reads a timm/DeiT checkpoint (.safetensors or .pth)"), "{out}");
}

#[test]
fn invalid_pipeline_exits_2_with_every_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::tiny_pipeline(dir.path(), "[stages.extra]\nkind = \"evaluate\"\nbatchsize = 2\n");
    let (code, _, err) = output(runner(dir.path()).args(["run", path.to_str().unwrap(), "--set", "stages.train.lr=-1"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.starts_with("error: the pipeline is invalid:\n"), "{err}");
    assert!(err.contains("unknown key `stages.extra.batchsize`; did you mean `batch_size`?"), "{err}");
    assert!(err.contains("--set stages.train.lr=-1: stages.train.lr: must be positive, got -1"), "{err}");
}

#[test]
fn missing_backend_feature_says_how_to_build_it() {
    if cfg!(feature = "cuda") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = common::tiny_pipeline(dir.path(), "");
    let (code, _, err) = output(runner(dir.path()).args(["run", path.to_str().unwrap(), "--backend", "cuda"]));
    assert_eq!(code, 1);
    assert!(err.contains("error: backend `cuda` is not compiled into this runner\n  hint: build it with `cargo build --release --features cuda`"), "{err}");
    // `--dry-run` plans (for a cluster's build, say) and says so.
    let (code, out, err) = output(runner(dir.path()).args(["run", path.to_str().unwrap(), "--backend", "cuda", "--dry-run"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("note: backend `cuda` is not compiled into this runner: `runner run` would stop here"), "{out}");
}

/// A runner built with cuda on a machine without an NVIDIA driver (CI's) names what is missing
/// before any work, where cubecl panicked deep in its loader; a plan for another machine still
/// passes `--dry-run`.
#[test]
fn cuda_without_a_driver_is_an_error_not_a_panic() {
    if !cfg!(feature = "cuda") || std::path::Path::new("/proc/driver/nvidia").exists() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = common::tiny_pipeline(dir.path(), "");
    let (code, _, err) = output(runner(dir.path()).args(["run", path.to_str().unwrap(), "--backend", "cuda"]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("backend `cuda`: no NVIDIA driver on this machine (libcuda.so could not be loaded)") && err.contains("hint: run it where an NVIDIA GPU"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let (code, _, err) = output(runner(dir.path()).args(["run", path.to_str().unwrap(), "--backend", "cuda", "--dry-run"]));
    assert_eq!(code, 0, "{err}");
    let out = dir.path().join("parity.csv");
    let (code, _, err) = output(runner(dir.path()).args(["bench", "parity", "--backend", "cuda", "--out", out.to_str().unwrap()]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no NVIDIA driver on this machine") && !err.contains("panicked"), "{err}");
    assert!(!out.exists(), "nothing written");
}

#[test]
fn bench_model_writes_training_and_inference_rates() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model.csv");
    let args = ["bench", "model", "--preset", "deit-tiny-distilled", "--batch", "2", "--steps", "1", "--devices", "0,0", "--out", out.to_str().unwrap()];
    let (code, stdout, err) = output(runner(dir.path()).args(args));
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("train (forward, backward, AdamW): "), "{stdout}");
    let mut reader = csv::Reader::from_path(&out).unwrap();
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 2);
    for row in &rows {
        assert_eq!((&row[1], &row[2], &row[3], &row[4]), ("deit-tiny-distilled", "2", "2", "f32"));
        assert!(row[6].parse::<f64>().unwrap() > 0.0, "{row:?}");
    }
}

/// `bench kernels` times each fused operation and its composite where the backend has both, says
/// which one the model takes, and names a malformed shape before measuring anything.
#[test]
fn bench_kernels_times_fused_and_composite_and_names_a_bad_shape() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("kernels.csv");
    let args = ["bench", "kernels", "--backend", "flex", "--attention", "2x2x5x4", "--layer-norm", "2x5x8", "--steps", "1", "--out", out.to_str().unwrap()];
    let (code, _, err) = output(runner(dir.path()).args(args));
    assert_eq!(code, 0, "{err}");
    let rows: Vec<csv::StringRecord> = csv::Reader::from_path(&out).unwrap().records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 2);
    // Under autodiff on flex the model takes both one-operation forms, attention at any length.
    assert_eq!((&rows[0][0], &rows[0][1], &rows[0][5]), ("attention", "2x2x5x4", "fused"), "{:?}", rows[0]);
    assert_eq!((&rows[1][0], &rows[1][1], &rows[1][5]), ("layer_norm", "2x5x8", "fused"), "{:?}", rows[1]);
    for row in &rows {
        assert!(row[2].parse::<f64>().unwrap() > 0.0 && row[3].parse::<f64>().unwrap() > 0.0, "{row:?}");
    }
    let (code, _, err) = output(runner(dir.path()).args(["bench", "kernels", "--backend", "flex", "--attention", "2x2x5", "--out", out.to_str().unwrap()]));
    assert_eq!(code, 1);
    assert!(err.contains("--attention: `2x2x5` is not 4 sizes of at least 1 joined by x"), "{err}");
}

/// `bench latency` puts the table's estimate beside the blocks timed alone and the paired
/// measurement for each width set; a width set between two is estimated between them; the table
/// it profiled, imported with `--table`, gives the same estimates; a width set of another model
/// is refused before any timing.
#[test]
fn bench_latency_estimates_each_width_set_beside_its_measurement() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("latency.csv");
    let quickstart = concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/quickstart.toml");
    let widths = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/quickstart-nvit50.json");
    let run = |extra: &[&str]| {
        let mut args = vec!["bench", "latency", "--dense", quickstart, "--pruned", widths, "--between", "1", "--batch", "2", "--repeats", "1", "--pairs", "1"];
        args.extend_from_slice(&["--grid", "coarse", "--backend", "flex", "--out", out.to_str().unwrap()]);
        args.extend_from_slice(extra);
        output(runner(dir.path()).args(args))
    };
    let (code, stdout, err) = run(&[]);
    assert_eq!(code, 0, "{err}");
    let read = || -> Vec<csv::StringRecord> { csv::Reader::from_path(&out).unwrap().records().map(Result::unwrap).collect() };
    let rows = read();
    assert_eq!(rows.len(), 3, "dense, one between, pruned: {stdout}");
    let col = |r: &csv::StringRecord, i: usize| r[i].parse::<f64>().unwrap();
    assert!(rows[1][0].starts_with("50% of the way to "), "{:?}", rows[1]);
    assert_eq!((col(&rows[0], 7), col(&rows[0], 8)), (1.0, 1.0), "the dense model is the unit: {:?}", rows[0]);
    let (mid, pruned) = (col(&rows[1], 7), col(&rows[2], 7));
    assert!(pruned < mid && mid < 1.0, "estimated ratios {mid} and {pruned}");
    for r in &rows {
        assert!(col(r, 10) <= col(r, 9) && col(r, 9) <= col(r, 11) && &r[12] == "1" && col(r, 6) > 0.0, "{r:?}");
    }
    let table = out.with_extension("table.json");
    assert!(rows[0][18].contains("coarse grid, 32 points"), "{:?}", rows[0]);

    let (code, _, err) = run(&["--table", table.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let again = read();
    for (a, b) in rows.iter().zip(&again) {
        assert_eq!(&a[4], &b[4], "the imported table estimates what it estimated when profiled");
    }
    let (code, _, err) = run(&["--pruned", "deit-tiny-distilled"]);
    assert_ne!(code, 0);
    assert!(err.contains("--pruned deit-tiny-distilled: not a pruned"), "{err}");
    let (code, _, err) = run(&["--table", "/nonexistent/table.json"]);
    assert_ne!(code, 0);
    assert!(err.contains("--table /nonexistent/table.json: no such file"), "{err}");
}

/// `bench vs-pytorch` refuses what it cannot run before measuring anything: a malformed model
/// list, an unknown model, a Python without torch.
#[test]
fn bench_vs_pytorch_names_bad_input_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("vs.csv");
    let run = |extra: &[&str]| {
        let mut args = vec!["bench", "vs-pytorch", "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        output(runner(dir.path()).args(args))
    };
    let (code, _, err) = run(&["--models", "deit-tiny-distilled"]);
    assert_ne!(code, 0);
    assert!(err.contains("--models: `deit-tiny-distilled` is not MODEL:BATCH"), "{err}");
    let (code, _, err) = run(&["--models", "deit-tiny-distiled:4"]);
    assert_ne!(code, 0);
    assert!(err.contains("`deit-tiny-distiled` is neither a model preset") && err.contains("deit-tiny-distilled"), "{err}");
    let (code, _, err) = run(&["--models", "deit-tiny-distilled:4"]);
    assert_ne!(code, 0);
    assert!(err.contains("benches/torch_reference.py: the PyTorch reference script is missing"), "{err}");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/torch_reference.py");
    let (code, _, err) = run(&["--models", "deit-tiny-distilled:4", "--script", script, "--python", "/nonexistent/python"]);
    assert_ne!(code, 0);
    assert!(err.contains("cannot run `/nonexistent/python`"), "{err}");
    assert!(!out.exists(), "nothing written");
}

/// `runner bench onnxruntime` checks its pairs, script and Python before measuring anything.
#[test]
fn bench_onnxruntime_names_bad_input_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ort.csv");
    let run = |extra: &[&str]| {
        let mut args = vec!["bench", "onnxruntime", "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        output(runner(dir.path()).args(args))
    };
    let widths = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/quickstart-nvit50.json");
    let (code, _, err) = run(&["--pair", "deit-tiny", "missing-dims.json"]);
    assert_ne!(code, 0);
    assert!(err.contains("--pair missing-dims.json") && err.contains("missing-dims.json"), "{err}");
    let (code, _, err) = run(&["--pair", "deit-tiny"]);
    assert_eq!(code, 2, "a pair needs two models: {err}");
    let (code, _, err) = run(&["--pair", "deit-tiny", widths]);
    assert_ne!(code, 0);
    assert!(err.contains("the two models differ in family, image size, patch size, channels or classes ((Deit, 224, 16, 3, 1000) vs (Deit, 28, 7, 1, 10))"), "{err}");
    // A Swin pair is taken (a pruned Swin-T's widths; no ONNX Runtime script here).
    let swin = dir.path().join("swin-pruned.json");
    let mut pruned = nvit::model::SwinConfig::preset("swin-tiny").unwrap();
    pruned.stages[2].blocks[0] = nvit::model::BlockDims { heads: 6, qk: 16, v: 32, mlp: 600 };
    std::fs::write(&swin, serde_json::to_vec(&pruned).unwrap()).unwrap();
    let (code, _, err) = run(&["--pair", "swin-tiny", swin.to_str().unwrap(), "--script", "/nonexistent/ort.py"]);
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent/ort.py: the ONNX Runtime script is missing"), "a Swin pair passes its checks: {err}");
    let (code, _, err) = run(&["--pair", "swin-tiny", "deit-tiny"]);
    assert_ne!(code, 0);
    assert!(err.contains("differ in family"), "{err}");
    let quickstart = concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/quickstart.toml");
    let (code, _, err) = run(&["--pair", quickstart, widths]);
    assert_ne!(code, 0);
    assert!(err.contains("benches/onnxruntime_bench.py: the ONNX Runtime script is missing"), "{err}");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/onnxruntime_bench.py");
    let (code, _, err) = run(&["--pair", quickstart, widths, "--script", script, "--python", "/nonexistent/python"]);
    assert_ne!(code, 0);
    assert!(err.contains("cannot run `/nonexistent/python`"), "{err}");
    assert!(!out.exists(), "nothing written");
}

/// `bench parity` (the GPU check's first measurement) writes a row per compared tensor and
/// passes flex against ndarray; a tolerance nothing meets fails after writing its rows, and a
/// tolerance that is no tolerance is refused before any work.
#[test]
fn bench_parity_compares_two_backends_tensor_by_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("parity.csv");
    let parity = |tolerance: &str| output(runner(dir.path()).args(["bench", "parity", "--backend", "flex", "--against", "ndarray", "--tolerance", tolerance, "--out", out.to_str().unwrap()]));
    let (code, stdout, err) = parity("1e-4");
    assert_eq!(code, 0, "{err}");
    let rows = || -> Vec<csv::StringRecord> { csv::Reader::from_path(&out).unwrap().records().map(Result::unwrap).collect() };
    let tensors: Vec<String> = rows().iter().map(|r| r[0].to_string()).collect();
    assert_eq!(tensors.len(), 10, "{stdout}");
    assert_eq!(&tensors[..3], ["loss", "logits", "patch_embed.weight"]);
    for row in rows() {
        let e: f64 = row[1].parse().unwrap();
        assert!(e < 1e-4 && &row[3] == "true" && &row[4] == "flex" && &row[6] == "ndarray", "{row:?}");
    }
    let (code, _, err) = parity("1e-30");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("flex on cpu") && err.contains("differs from ndarray beyond 1e-30"), "{err}");
    assert!(rows().iter().any(|r| &r[3] == "false"), "the rows are written before the error");
    std::fs::remove_file(&out).unwrap();
    for bad in ["0", "NaN", "inf"] {
        let (code, _, err) = parity(bad);
        assert_ne!(code, 0, "{bad}: {err}");
        assert!(err.contains("--tolerance"), "{bad}: {err}");
    }
    assert!(!out.exists(), "nothing written for a bad tolerance");
}

/// A benchmark of no steps or an empty batch measures nothing: refused by name, nothing written.
#[test]
fn bench_counts_of_zero_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model.csv");
    for flag in ["--steps", "--batch"] {
        let (code, _, err) = output(runner(dir.path()).args(["bench", "model", "--model", "deit-tiny-distilled", flag, "0", "--out", out.to_str().unwrap()]));
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(&format!("'{flag} <{}>'", flag[2..].to_uppercase())) && err.contains("0 is not in 1.."), "{err}");
    }
    let (code, _, err) = output(runner(dir.path()).args(["bench", "vs-pytorch", "--steps", "0", "--out", out.to_str().unwrap()]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--steps <STEPS>") && err.contains("0 is not in 1.."), "{err}");
    assert!(!out.exists(), "nothing written");
}

#[test]
fn a_second_cpu_device_is_refused_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::tiny_pipeline(dir.path(), "");
    let (code, _, err) = output(runner(dir.path()).args(["run", path.to_str().unwrap(), "--devices", "0,1", "--dry-run"]));
    assert_eq!(code, 2);
    assert!(err.contains("pipeline.devices") && err.contains("names 1: the flex backend has one device, 0") && err.contains("hint: repeat it (devices = [0, 0])"), "{err}");
}

#[test]
fn mixed_precision_on_ndarray_is_refused_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::tiny_pipeline(dir.path(), "");
    let (code, _, err) = output(runner(dir.path()).args(["run", path.to_str().unwrap(), "--backend", "ndarray", "--set", "stages.train.precision=\"bf16\""]));
    assert_eq!(code, 1);
    assert!(err.contains("stage `train` (train) failed"), "{err}");
    assert!(err.contains("precision = \"bf16\": device Cpu cannot compute in it") && err.contains("leave precision unset on the CPU"), "{err}");
}

#[test]
fn show_and_dry_run_explain_the_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::tiny_pipeline(dir.path(), "");
    let (code, out, err) = output(runner(dir.path()).args(["show", path.to_str().unwrap(), "--set", "stages.train.epochs=3"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().any(|l| l.starts_with("epochs = 3") && l.ends_with("# --set stages.train.epochs=3")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("min_lr = 0.00001") && l.ends_with("# default")), "{out}");
    assert!(out.contains("[stages.evaluate]\ninput = \"train\""), "{out}");

    let (code, out, err) = output(runner(dir.path()).args(["run", path.to_str().unwrap(), "--dry-run"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().next().unwrap().contains("will run"), "{out}");
    assert!(out.contains("- never run"), "{out}");
    assert!(!dir.path().join("runs").exists(), "a dry run creates no run directory");
}

/// Two runners on one cache at once (as a sweep would start them): each stage is built once,
/// the other runner waits for it and uses it, and each run gets its own run directory.
#[test]
fn two_runners_sharing_a_cache_build_each_stage_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::tiny_pipeline(dir.path(), "");
    let args = ["run", path.to_str().unwrap(), "--set", "stages.train.epochs=6"];
    let children: Vec<_> = (0..2).map(|_| runner(dir.path()).args(args).stderr(std::process::Stdio::piped()).spawn().unwrap()).collect();
    let logs: Vec<String> = children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            let log = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(out.status.success(), "{log}");
            log
        })
        .collect();
    for stage in ["train", "evaluate"] {
        let built = logs.iter().filter(|l| l.contains(&format!("{stage}: running"))).count();
        assert_eq!(built, 1, "{stage} built once: {logs:?}");
        let reused = logs.iter().filter(|l| l.contains(&format!("{stage}: cached")) || l.contains(&format!("{stage}: completed by another runner"))).count();
        assert_eq!(reused, 1, "{stage} reused by the other: {logs:?}");
    }
    assert_eq!(std::fs::read_dir(dir.path().join("runs/tiny")).unwrap().count(), 2, "a run directory each");
}

/// Kill the runner once the first epoch's checkpoint exists; the next run resumes from it and
/// the one after finishes from the cache.
#[test]
fn a_killed_run_resumes_from_its_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let report = "[stages.report]\nkind = \"report\"\nmodels = [\"evaluate\"]\ncurves = [\"train\"]\npaper = false\n";
    let path = common::tiny_pipeline(dir.path(), report);
    let args = ["run", path.to_str().unwrap(), "--set", "stages.train.epochs=40", "--set", "stages.train.eval_every=20"];
    let mut child = runner(dir.path()).args(args).stderr(std::process::Stdio::null()).spawn().unwrap();
    let start = Instant::now();
    let state = loop {
        let found = std::fs::read_dir(dir.path().join("cache"))
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("checkpoint/state.json"))
            .find(|p| p.exists());
        if let Some(p) = found {
            break p;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(5));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!state.parent().unwrap().parent().unwrap().join("manifest.json").exists(), "killed before finishing");

    let (code, _, err) = output(runner(dir.path()).args(args));
    assert_eq!(code, 0, "{err}");
    let resumed = err.lines().find(|l| l.contains("train: resuming after epoch")).unwrap_or_else(|| panic!("{err}"));
    let epoch: usize = resumed.split("after epoch ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!((1..40).contains(&epoch), "{resumed}");

    let (code, _, err) = output(runner(dir.path()).args(args));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("train: cached") && err.contains("evaluate: cached"), "{err}");
    let mut runs: Vec<_> = std::fs::read_dir(dir.path().join("runs/tiny")).unwrap().map(|e| e.unwrap().path()).collect();
    runs.sort();
    assert_eq!(runs.len(), 3);
    assert!(runs.iter().all(|run| run.join("config.toml").exists() && run.join("runner.log").exists()));

    // The resumed run's curves hold every epoch, the killed run's included, and validation
    // top-1 on epochs 20 and 40; TensorBoard has an event file; the report plots them.
    let curves = std::fs::read_to_string(runs[1].join("train/curves.csv")).unwrap();
    let rows: Vec<Vec<&str>> = curves.lines().skip(1).map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 40, "{curves}");
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row[0], (i + 1).to_string(), "{curves}");
        assert_eq!(row[5].is_empty(), (i + 1) % 20 != 0, "{curves}");
    }
    let events = std::fs::read_dir(runs[1].join("train")).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("events.out.tfevents."));
    assert_eq!(events.count(), 1);
    assert!(std::fs::read_to_string(dir.path().join("results/tiny/curves.svg")).unwrap().contains("train val"));
}

#[test]
fn cache_ls_and_gc_keep_what_pipelines_reference() {
    let dir = tempfile::tempdir().unwrap();
    let pipelines = dir.path().join("pipelines");
    std::fs::create_dir_all(&pipelines).unwrap();
    let path = common::tiny_pipeline(dir.path(), "");
    let path = {
        let p = pipelines.join("tiny.toml");
        std::fs::rename(&path, &p).unwrap();
        p
    };
    for lr in ["0.002", "0.001"] {
        let (code, _, err) = output(runner(dir.path()).args(["run", path.to_str().unwrap(), "--set", &format!("stages.train.lr={lr}")]));
        assert_eq!(code, 0, "{err}");
    }
    let (_, ls, _) = output(runner(dir.path()).args(["cache", "ls"]));
    assert_eq!(ls.lines().count(), 1 + 4, "{ls}");
    assert_eq!(ls.lines().filter(|l| l.contains(" train ")).count(), 2, "{ls}");

    // The file says lr = 0.002: the entries of the lr = 0.001 run are garbage, but recently
    // used ones are kept unless told.
    let gc = |extra: &[&str]| output(runner(dir.path()).args(["cache", "gc", "--pipelines", pipelines.to_str().unwrap()]).args(extra));
    let (code, out, err) = gc(&[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("removed 0 entries"), "{out}");
    let (code, out, err) = gc(&["--keep-days", "0", "--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().filter(|l| l.starts_with("would remove ")).count(), 2 + 1, "{out}");
    assert!(out.contains("train train of tiny"), "{out}");
    let (_, ls_after, _) = output(runner(dir.path()).args(["cache", "ls"]));
    assert_eq!(ls_after, ls, "a dry run removes nothing");
    let (code, out, err) = gc(&["--keep-days", "0"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().last().unwrap().starts_with("removed 2 entries"), "{out}");
    let (_, out, _) = output(runner(dir.path()).args(["run", path.to_str().unwrap(), "--dry-run"]));
    assert_eq!(out.lines().filter(|l| l.contains(" cached ")).count(), 2, "{out}");
}

/// The shipped quickstart resolves and plans (it reads Fashion-MNIST from Debian's
/// `dataset-fashion-mnist`, which the README's set-up command and `.ci/run` install).
#[test]
fn quickstart_shows_and_plans() {
    let dir = tempfile::tempdir().unwrap();
    let quickstart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/quickstart.toml");
    let (code, out, err) = output(runner(dir.path()).args(["show", quickstart.to_str().unwrap()]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("[dataset]\n") && out.contains("\nroot = \"/usr/share/datasets/fashion-mnist\""), "{out}");
    let (code, out, err) = output(runner(dir.path()).args(["run", quickstart.to_str().unwrap(), "--dry-run"]));
    assert_eq!(code, 0, "{err}");
    let stages: Vec<&str> = out.lines().filter(|l| !l.trim_start().starts_with('-')).map(|l| l.split_whitespace().next().unwrap()).collect();
    assert_eq!(stages, ["train", "evaluate", "latency", "prune", "distill", "evaluate_pruned", "report"], "{out}");
}

/// gc removes only what it can prove no pipeline uses: without pipelines it refuses, and the
/// entries of a sweep's points (`--set` variants no file names) are kept.
#[test]
fn cache_gc_refuses_without_pipelines_and_keeps_sweep_points() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::tiny_pipeline(dir.path(), "");
    let (code, _, err) = output(runner(dir.path()).args(["run", path.to_str().unwrap(), "--set", "stages.train.epochs=1"]));
    assert_eq!(code, 0, "{err}");
    let (_, before, _) = output(runner(dir.path()).args(["cache", "ls"]));
    let empty = dir.path().join("elsewhere");
    std::fs::create_dir_all(&empty).unwrap();
    let (code, out, err) = output(runner(&empty).env("RUNNER_CACHE", dir.path().join("cache")).args(["cache", "gc", "--keep-days", "0"]));
    assert_eq!(code, 1, "{out}");
    assert!(err.contains("found no pipeline under `pipelines`") && err.contains("removed nothing") && err.contains("--pipelines DIR"), "{err}");
    let (_, after, _) = output(runner(dir.path()).args(["cache", "ls"]));
    assert_eq!(before, after);

    // A sweep over the evaluate stage whose base file sets epochs = 2: its points' entries
    // (epochs = 1 from the sweep's [set]) are referenced by no pipeline file, only the sweep.
    let sweeps = dir.path().join("pipelines");
    std::fs::create_dir_all(&sweeps).unwrap();
    std::fs::rename(&path, sweeps.join("tiny.toml")).unwrap();
    std::fs::write(
        sweeps.join("tiny-sweep.toml"),
        "pipeline = \"tiny.toml\"\n[set]\n\"stages.train.epochs\" = 1\n[grid]\n\"stages.evaluate.throughput_batch\" = [8]\n",
    )
    .unwrap();
    let (code, out, err) = output(runner(dir.path()).args(["sweep", "pipelines/tiny-sweep.toml"]));
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = output(runner(dir.path()).args(["cache", "gc", "--keep-days", "0"]));
    assert_eq!(code, 0, "{err}");
    // The point shares train and evaluate (throughput_batch 8 is the file's) with the first run.
    assert!(out.lines().last().unwrap().starts_with("removed 0 entries"), "{out}");
    let (_, after, _) = output(runner(dir.path()).args(["cache", "ls"]));
    assert_eq!(after.lines().count(), 1 + 2, "{after}");
}

/// `runner show` prints TOML that parses, stages in the order they run, implied inputs marked.
#[test]
fn show_prints_valid_toml_in_run_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::tiny_pipeline(dir.path(), "[stages.a_report]\nkind = \"report\"\nmodels = [\"evaluate\"]\n");
    let (code, out, err) = output(runner(dir.path()).args(["show", path.to_str().unwrap()]));
    assert_eq!(code, 0, "{err}");
    let parsed: toml::Table = out.parse().unwrap_or_else(|e| panic!("{e}\n{out}"));
    let stages: Vec<&String> = parsed["stages"].as_table().unwrap().keys().collect();
    assert_eq!(stages, ["train", "evaluate", "a_report"], "{out}");
    assert_eq!(parsed["stages"]["evaluate"]["input"].as_str(), Some("train"));
    assert!(out.lines().any(|l| l.starts_with("input = \"train\"") && l.ends_with("# implied: the previous stage")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("# grad_clip = (unset)")), "{out}");
}

/// Batches that cannot fit in memory are refused before anything runs, naming the key.
#[test]
fn an_impossible_batch_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::tiny_pipeline(dir.path(), "");
    let (code, _, err) = output(runner(dir.path()).args(["run", path.to_str().unwrap(), "--set", "stages.evaluate.throughput_batch=10000000"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("stages.evaluate.throughput_batch = 10000000 needs at least") && err.contains("hint: lower stages.evaluate.throughput_batch"), "{err}");
    assert!(!dir.path().join("cache").exists(), "nothing ran");
}

/// A runner waiting on another's lock says so, and a stage another runner built is recorded
/// as such in `artifacts.json`.
#[test]
fn a_waiting_runner_says_who_holds_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::tiny_pipeline(dir.path(), "");
    let args = ["run", path.to_str().unwrap(), "--set", "stages.train.epochs=40"];
    let first = runner(dir.path()).args(args).stderr(std::process::Stdio::null()).spawn().unwrap();
    // The first runner holds train's lock once its entry has an owner.
    let start = Instant::now();
    while !std::fs::read_dir(dir.path().join("cache")).into_iter().flatten().filter_map(|e| e.ok()).any(|e| e.path().join(".owner").exists()) {
        assert!(start.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(5));
    }
    let (code, _, err) = output(runner(dir.path()).args(args));
    assert_eq!(code, 0, "{err}");
    let pid = first.id();
    first.wait_with_output().unwrap();
    assert!(err.contains(&format!("train: waiting for runner pid {pid} on")), "{err}");
    let runs: Vec<std::path::PathBuf> = std::fs::read_dir(dir.path().join("runs/tiny")).unwrap().map(|e| e.unwrap().path()).collect();
    let statuses: Vec<String> = runs
        .iter()
        .map(|r| std::fs::read_to_string(r.join("artifacts.json")).unwrap())
        .collect();
    assert!(statuses.iter().any(|s| s.contains("\"built by another runner\"")), "{statuses:?}");
}

#[test]
fn cache_ls_columns_fit_long_pipeline_names() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::tiny_pipeline(dir.path(), "");
    let long = "a_pipeline_name_much_longer_than_sixteen_characters";
    let (code, _, err) = output(runner(dir.path()).args(["run", path.to_str().unwrap(), "--set", &format!("pipeline.name=\"{long}\"")]));
    assert_eq!(code, 0, "{err}");
    let (_, ls, _) = output(runner(dir.path()).args(["cache", "ls"]));
    let header = ls.lines().next().unwrap();
    let column = header.find("size").unwrap();
    for line in ls.lines().skip(1) {
        assert!(line.contains(long), "{ls}");
        // Sizes are right-aligned under their header.
        assert!(line[..column + 4].ends_with("KiB") || line[..column + 4].ends_with(" B"), "{ls}");
    }
}

/// Every image unreadable with `on_bad_image = "skip"`: a clear error, not a panic.
#[test]
fn a_training_split_of_unreadable_images_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    for split in ["train", "val"] {
        for class in ["a", "b"] {
            let folder = dir.path().join("data").join(split).join(class);
            std::fs::create_dir_all(&folder).unwrap();
            for i in 0..8 {
                std::fs::write(folder.join(format!("{i}.JPEG")), b"\xff\xd8\xff not a jpeg").unwrap();
            }
        }
    }
    let path = common::tiny_pipeline(dir.path(), "");
    let text = std::fs::read_to_string(&path).unwrap();
    let dataset = format!("[dataset]\nkind = \"imagefolder\"\nroot = \"{}\"\non_bad_image = \"skip\"\nworkers = 2\n", dir.path().join("data").display());
    let start = text.find("[dataset]").unwrap();
    let end = text.find("[model]").unwrap();
    std::fs::write(&path, format!("{}{dataset}\n{}", &text[..start], &text[end..])).unwrap();
    let (code, _, err) = output(runner(dir.path()).args(["run", path.to_str().unwrap()]));
    assert_eq!(code, 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("epoch 1 gave no batch: all 16 images it read were unreadable and skipped"), "{err}");
}

/// `runner export` copies a stage's model out of the cache once the stage has run as the
/// pipeline says, and names what is wrong otherwise, writing nothing.
#[test]
fn export_copies_a_run_stages_model_and_names_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::tiny_pipeline(dir.path(), "");
    let path = path.to_str().unwrap();
    let out = dir.path().join("exported");
    let export = |extra: &[&str]| {
        let mut args = vec!["export", path, "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        output(runner(dir.path()).args(args))
    };
    let (code, _, err) = export(&["--stage", "train"]);
    assert_ne!(code, 0);
    assert!(err.contains("stage `train` has not run as the pipeline now says (never run)") && err.contains("hint: run it first: runner run"), "{err}");
    assert!(!out.exists(), "nothing written");

    let (code, _, err) = output(runner(dir.path()).args(["run", path]));
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = export(&["--stage", "trian"]);
    assert_ne!(code, 0);
    assert!(err.contains("no stage `trian`; did you mean `train`?") && err.contains("its stages are train, evaluate"), "{err}");
    let (code, _, err) = export(&["--stage", "evaluate"]);
    assert_ne!(code, 0);
    assert!(err.contains("stage `evaluate` (evaluate) produces no model"), "{err}");
    let (code, _, err) = export(&["--stage", "train", "--set", "stages.train.lr=1e-3"]);
    assert_ne!(code, 0);
    assert!(err.contains("changed: settings.lr"), "{err}");
    let (code, _, err) = export(&["--stage", "train", "--format", "tflite"]);
    assert_eq!(code, 2);
    assert!(err.contains("invalid value 'tflite' for '--format <FORMAT>'") && err.contains("[possible values: safetensors, onnx]"), "{err}");
    assert!(!out.exists(), "nothing written");

    let (code, stdout, err) = export(&["--stage", "train"]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("train: model.safetensors and dims.json ->"), "{stdout}");
    let model = nvit::model::checkpoint::load::<burn::backend::NdArray>(&out, &Default::default()).unwrap().into_deit("the export test").unwrap();
    assert_eq!(model.config.embed_dim, 16);
    assert_eq!(model.config.blocks.len(), 2);

    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, "").unwrap();
    let (code, _, err) = output(runner(dir.path()).args(["export", path, "--stage", "train", "--out", blocker.join("sub").to_str().unwrap()]));
    assert_ne!(code, 0);
    assert!(err.contains("a-file/sub: cannot create the output folder"), "{err}");

    let onnx = dir.path().join("model.onnx");
    let (code, stdout, err) = output(runner(dir.path()).args(["export", path, "--stage", "train", "--format", "onnx", "--out", onnx.to_str().unwrap()]));
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("train: ONNX opset 17") && onnx.is_file(), "{stdout}");
    let (code, _, err) = output(runner(dir.path()).args(["export", path, "--stage", "train", "--format", "onnx", "--out", out.to_str().unwrap()]));
    assert_ne!(code, 0);
    assert!(err.contains("exported: is a folder; --format onnx writes one file"), "{err}");
    let (code, _, err) = output(runner(dir.path()).args(["export", path, "--stage", "train", "--format", "onnx", "--out", blocker.join("m.onnx").to_str().unwrap()]));
    assert_ne!(code, 0);
    assert!(err.contains("a-file/m.onnx: cannot write the export"), "{err}");

    // Only a new or regular file is written over: not a link (`/dev/stdout` is one), a FIFO or
    // a device, each named; `-` is standard output.
    let onnx_export = |out: &Path| output(runner(dir.path()).args(["export", path, "--stage", "train", "--format", "onnx", "--out", out.to_str().unwrap()]));
    let link = dir.path().join("link.onnx");
    std::os::unix::fs::symlink(&blocker, &link).unwrap();
    let fifo = dir.path().join("fifo.onnx");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    for (out, what) in [(&link, "a symbolic link"), (&fifo, "a FIFO")] {
        let (code, _, err) = onnx_export(out);
        assert_ne!(code, 0, "{what}");
        assert!(err.contains(&format!("{}: is {what}; the runner writes its outputs only as regular files", out.display())), "{err}");
    }
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink() && std::fs::read(&blocker).unwrap().is_empty());
    let o = runner(dir.path()).args(["export", path, "--stage", "train", "--format", "onnx", "--out", "-"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(o.stdout == std::fs::read(&onnx).unwrap(), "the model on standard output: {} bytes", o.stdout.len());
    assert!(err.contains("-> standard output"), "{err}");
    // A killed export's temporary is removed by the next export to the same file.
    let pid = (900_000..).find(|p| !Path::new(&format!("/proc/{p}")).exists()).unwrap();
    let left = dir.path().join(format!(".model.onnx.tmp-{pid}-7"));
    std::fs::write(&left, "half a model").unwrap();
    std::fs::File::options().write(true).open(&left).unwrap().set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(120)).unwrap();
    let (code, _, err) = onnx_export(&onnx);
    assert_eq!(code, 0, "{err}");
    assert!(!left.exists(), "the killed export's temporary is gone");
}

/// An ImageFolder whose classes a tiny model tells apart only in part: each image is a class's
/// colour under heavy noise.
fn noisy_image_folder(root: &Path) {
    let mut state = 12345u64;
    let mut noise = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) as f32 / (1u64 << 31) as f32
    };
    for (split, n) in [("train", 16), ("val", 12)] {
        for (c, class) in ["ember", "moss", "sky"].iter().enumerate() {
            let folder = root.join(split).join(class);
            std::fs::create_dir_all(&folder).unwrap();
            for i in 0..n {
                let img = image::RgbImage::from_fn(16, 16, |_, _| {
                    image::Rgb(std::array::from_fn(|ch| ((if ch == c { 0.06 } else { 0.0 } + 0.9 * noise()) * 255.0) as u8))
                });
                img.save(folder.join(format!("{i}.png"))).unwrap();
            }
        }
    }
}

/// `runner predict` on the validation images gives, image for image, the top-1 labels that
/// `evaluate` counts as correct, with the ImageFolder's class names; bad inputs are named.
#[test]
fn predict_gives_the_labels_evaluate_counts_and_names_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    noisy_image_folder(&data);
    let path = common::tiny_pipeline(dir.path(), "");
    let text = std::fs::read_to_string(&path).unwrap();
    let dataset = format!("[dataset]\nkind = \"imagefolder\"\nroot = \"{}\"\neval_crop_pct = 1.0\nworkers = 2\n", data.display());
    let (start, end) = (text.find("[dataset]").unwrap(), text.find("[model]").unwrap());
    std::fs::write(&path, format!("{}{dataset}\n{}", &text[..start], &text[end..])).unwrap();
    let path = path.to_str().unwrap();
    let (code, _, err) = output(runner(dir.path()).args(["run", path]));
    assert_eq!(code, 0, "{err}");

    let metrics = std::fs::read_to_string(dir.path().join("results/tiny/metrics.csv")).unwrap();
    let mut rows = csv::Reader::from_reader(metrics.as_bytes());
    let header = rows.headers().unwrap().clone();
    let row = rows.records().next().unwrap().unwrap();
    let field = |name: &str| row[header.iter().position(|h| h == name).unwrap()].parse::<f64>().unwrap();
    let (top1, images) = (field("top1"), field("images"));
    assert_eq!(images, 36.0);

    let val = data.join("val");
    let (code, stdout, err) = output(runner(dir.path()).args(["predict", path, "--stage", "train", "--batch", "5", val.to_str().unwrap()]));
    assert_eq!(code, 0, "{err}");
    let mut rows = csv::Reader::from_reader(stdout.as_bytes());
    assert_eq!(rows.headers().unwrap().iter().collect::<Vec<_>>(), ["image", "class1", "prob1", "class2", "prob2", "class3", "prob3"]);
    let mut correct = 0;
    let mut seen = 0;
    for row in rows.records() {
        let row = row.unwrap();
        let truth = Path::new(&row[0]).parent().unwrap().file_name().unwrap().to_str().unwrap().to_string();
        correct += usize::from(row[1] == truth);
        seen += 1;
        let probs: Vec<f64> = [2, 4, 6].iter().map(|&i| row[i].parse().unwrap()).collect();
        assert!(probs[0] >= probs[1] && probs[1] >= probs[2] && (probs.iter().sum::<f64>() - 1.0).abs() < 1e-4, "{probs:?}");
        let mut names = vec![&row[1], &row[3], &row[5]];
        names.sort();
        assert_eq!(names, ["ember", "moss", "sky"]);
    }
    assert_eq!(seen, 36);
    assert!((100.0 * correct as f64 / 36.0 - top1).abs() < 0.006, "predict's top-1 agrees with evaluate's: {correct} of 36 vs {top1}%");

    let notes = dir.path().join("notes.txt");
    std::fs::write(&notes, "not an image").unwrap();
    let broken = dir.path().join("broken.png");
    std::fs::write(&broken, "not a png either").unwrap();
    let predict = |extra: &[&str]| {
        let mut args = vec!["predict", path, "--stage", "train"];
        args.extend_from_slice(extra);
        output(runner(dir.path()).args(args))
    };
    let (code, _, err) = predict(&[val.to_str().unwrap(), notes.to_str().unwrap(), "missing.jpg"]);
    assert_ne!(code, 0);
    assert!(err.contains("notes.txt: not an image") && err.contains("missing.jpg: no such file or folder"), "{err}");
    let (code, _, err) = predict(&[broken.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("broken.png: cannot decode image") && !err.contains("panicked"), "{err}");
    let (code, _, err) = output(runner(dir.path()).args(["predict", path, "--stage", "evaluate", val.to_str().unwrap()]));
    assert_ne!(code, 0);
    assert!(err.contains("stage `evaluate` (evaluate) produces no model"), "{err}");
    let (code, _, err) = predict(&["--out", dir.path().to_str().unwrap(), val.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("is a folder") && err.contains("predictions.csv"), "{err}");

    let csv_out = dir.path().join("out/predictions.csv");
    let (code, stdout, err) = predict(&["--top", "1", "--out", csv_out.to_str().unwrap(), val.join("moss").to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("train: top 1 of 12 images ->"), "{stdout}");
    assert_eq!(std::fs::read_to_string(&csv_out).unwrap().lines().next(), Some("image,class1,prob1"));

    // The audit's `predict --out a.png a.png`: the output would replace the input.
    let image = val.join("moss/0.png");
    let before = std::fs::read(&image).unwrap();
    let (code, _, err) = predict(&["--out", image.to_str().unwrap(), image.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("0.png: is also an input"), "{err}");
    assert_eq!(std::fs::read(&image).unwrap(), before);
    // The audit's own command: as root the rename replaced `/dev/full` with a regular file.
    let is_device = || std::os::unix::fs::FileTypeExt::is_char_device(&std::fs::symlink_metadata("/dev/full").unwrap().file_type());
    if Path::new("/dev/full").exists() && is_device() {
        let (code, _, err) = predict(&["--out", "/dev/full", image.to_str().unwrap()]);
        if !is_device() {
            // Put the device back before failing (root only could replace it).
            let _ = std::fs::remove_file("/dev/full");
            let _ = std::process::Command::new("mknod").args(["-m", "666", "/dev/full", "c", "1", "7"]).status();
            panic!("/dev/full was replaced: {err}");
        }
        assert_ne!(code, 0);
        assert!(err.contains("/dev/full: is a device; the runner writes its outputs only as regular files"), "{err}");
    }
    let (code, stdout, err) = predict(&["--top", "1", "--out", "-", image.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.starts_with("image,class1,prob1\n"), "{stdout}");
}

/// The audit's `RUNNER_CACHE=""` (entries went into the current folder, `cache ls` showed none)
/// and `RUNNER_CACHE` naming a file (`cache ls` empty, `gc` "0 entries", exit 0).
#[test]
fn a_cache_variable_that_names_no_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::tiny_pipeline(dir.path(), "");
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    for (value, message) in [("", "RUNNER_CACHE is set but empty"), (file.to_str().unwrap(), "a-file: is not a folder")] {
        for args in [vec!["cache", "ls"], vec!["cache", "gc", "--dry-run"], vec!["run", path.to_str().unwrap()]] {
            let (code, _, err) = output(runner(dir.path()).env("RUNNER_CACHE", value).args(&args));
            assert_ne!(code, 0, "{args:?} with RUNNER_CACHE={value:?}");
            assert!(err.contains(message), "{args:?}: {err}");
        }
    }
    assert!(!dir.path().join("runs").exists() && std::fs::read_dir(dir.path()).unwrap().count() == 2, "nothing written");
}
