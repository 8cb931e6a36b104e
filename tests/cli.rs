//! What a user sees from the `runner` binary.

mod common;

use std::time::{Duration, Instant};

use common::{output, runner};

#[test]
fn stages_lists_kinds_with_keys_types_and_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, _) = output(runner(dir.path()).arg("stages"));
    assert_eq!(code, 0);
    assert!(out.contains("train: trains the model"), "{out}");
    assert!(out.lines().any(|l| l.trim_start().starts_with("lr") && l.contains("float") && l.contains("default 0.0005")), "{out}");
    assert!(out.contains("evaluate: measures top-1/top-5"), "{out}");
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

#[test]
fn a_second_cpu_device_is_refused_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::tiny_pipeline(dir.path(), "");
    let (code, _, err) = output(runner(dir.path()).args(["run", path.to_str().unwrap(), "--devices", "0,1"]));
    assert_eq!(code, 1);
    assert!(err.contains("pipeline.devices names 1: the ndarray backend has one device, 0") && err.contains("hint: repeat it (devices = [0, 0])"), "{err}");
}

#[test]
fn mixed_precision_on_the_cpu_is_refused_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::tiny_pipeline(dir.path(), "");
    let (code, _, err) = output(runner(dir.path()).args(["run", path.to_str().unwrap(), "--set", "stages.train.precision=\"bf16\""]));
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
    assert!(out.lines().any(|l| l.starts_with("stages.train.epochs = 3") && l.ends_with("# --set stages.train.epochs=3")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("stages.train.min_lr = 0.00001") && l.ends_with("# default")), "{out}");
    assert!(out.contains("evaluate (evaluate) <- train"), "{out}");

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
    let path = common::tiny_pipeline(dir.path(), "");
    let args = ["run", path.to_str().unwrap(), "--set", "stages.train.epochs=40"];
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
    let runs: Vec<_> = std::fs::read_dir(dir.path().join("runs/tiny")).unwrap().collect();
    assert_eq!(runs.len(), 3);
    let run = runs[0].as_ref().unwrap().path();
    assert!(run.join("config.toml").exists() && run.join("runner.log").exists());
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

    // The file says lr = 0.002: the entries of the lr = 0.001 run are garbage.
    let (code, out, err) = output(runner(dir.path()).args(["cache", "gc", "--pipelines", pipelines.to_str().unwrap()]));
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("removed 2 entries"), "{out}");
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
    assert!(out.contains("dataset.root = \"/usr/share/datasets/fashion-mnist\""), "{out}");
    let (code, out, err) = output(runner(dir.path()).args(["run", quickstart.to_str().unwrap(), "--dry-run"]));
    assert_eq!(code, 0, "{err}");
    let stages: Vec<&str> = out.lines().filter(|l| !l.trim_start().starts_with('-')).map(|l| l.split_whitespace().next().unwrap()).collect();
    assert_eq!(stages, ["train", "evaluate", "latency", "prune", "distill", "evaluate_pruned", "report"], "{out}");
}
