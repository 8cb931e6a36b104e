//! `runtime = "onnxruntime"`: latency profiled, measured and evaluated in ONNX Runtime, through
//! the `runner` binary. The keys' bad values and a missing ONNX Runtime are refused everywhere;
//! the pipeline itself runs where ONNX Runtime is installed, and must run in CI
//! (`NVIT_REQUIRE_ONNXRUNTIME=1`, `.ci/run` installs pip's onnxruntime).

use crate::common::{output, runner, tiny_pipeline};

const STAGES: &str = r#"
[stages.profile]
kind = "profile_latency"
input = "train"
grid = "coarse"
batch_size = 4
warmup = 1
repeats = 3
rounds = 1
runtime = "onnxruntime"

[stages.prune]
kind = "prune"
input = "train"
latency = "profile"
latency_target = 0.6
stop_on = "measured"
runtime = "onnxruntime"
measure_batch = 4
measure_pairs = 3
interval = 2
group_emb = 4
group_qk = 2
group_v = 2
group_mlp = 4
batch_size = 16
kd_weight = 1.0

[stages.evaluate_pruned]
kind = "evaluate"
input = "prune"
baseline = "train"
batch_size = 32
throughput_batch = 8
throughput_repeats = 2
speedup_pairs = 3
warmup = 1
runtime = "onnxruntime"
"#;

fn run(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut c = runner(dir);
    c.args(args).envs(env.iter().copied());
    output(&mut c)
}

/// Before any stage runs, with `--dry-run` as without: where ONNX Runtime was looked for, and
/// what to install.
#[test]
fn a_missing_onnxruntime_is_an_error_naming_what_to_install_before_any_stage_runs() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_pipeline(dir.path(), STAGES);
    let missing = dir.path().join("libonnxruntime.so");
    for args in [vec!["run", path.to_str().unwrap(), "--dry-run"], vec!["run", path.to_str().unwrap()]] {
        let (code, _, err) = run(dir.path(), &args, &[("ORT_DYLIB_PATH", missing.to_str().unwrap())]);
        assert_ne!(code, 0, "{err}");
        assert!(err.contains("stages.profile.runtime = \"onnxruntime\""), "{err}");
        assert!(err.contains(&format!("ORT_DYLIB_PATH = {}: no such file", missing.display())) && err.contains("pip install onnxruntime"), "{err}");
    }
    assert!(!dir.path().join("results").exists(), "no stage ran");
    // A file that is not the library, and no library at all: no python3 to ask.
    let (code, _, err) = run(dir.path(), &["run", path.to_str().unwrap(), "--dry-run"], &[("ORT_DYLIB_PATH", path.to_str().unwrap())]);
    assert_ne!(code, 0);
    assert!(err.contains(&format!("loading ONNX Runtime from {}", path.display())), "{err}");
    let empty = dir.path().join("bin");
    std::fs::create_dir(&empty).unwrap();
    let (code, _, err) = run(dir.path(), &["run", path.to_str().unwrap(), "--dry-run"], &[("ORT_DYLIB_PATH", ""), ("PATH", empty.to_str().unwrap())]);
    assert_ne!(code, 0);
    assert!(err.contains("ONNX Runtime was not found: ORT_DYLIB_PATH is unset and `python3` on PATH has no `onnxruntime` package"), "{err}");
}

#[test]
fn bad_runtime_keys_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_pipeline(dir.path(), STAGES);
    let load = |set: &[&str]| {
        let overrides = nvit::config::Overrides { set: set.iter().map(|s| s.to_string()).collect(), env: false, with: vec![] };
        nvit::config::load(&path, &overrides).err().map(|e| e.to_string()).unwrap_or_default()
    };
    let err = load(&["stages.profile.runtime=\"tensorrt\""]);
    assert!(err.contains("stages.profile.runtime") && err.contains("tensorrt") && err.contains("onnxruntime"), "{err}");
    let err = load(&["stages.evaluate_pruned.onnxruntime_provider=\"rocm\""]);
    assert!(err.contains("stages.evaluate_pruned.onnxruntime_provider") && err.contains("cuda"), "{err}");
    let err = load(&["stages.prune.stop_on=\"estimated\""]);
    assert!(err.contains("stages.prune.runtime: times the measured stop"), "{err}");
    let err = load(&["stages.profile.table=\"tiny.toml\""]);
    assert!(err.contains("stages.profile.runtime: times the profile, and `table` imports one instead"), "{err}");
}

/// Whether this machine has ONNX Runtime; in CI it must.
fn onnxruntime_here() -> bool {
    match nvit::onnxruntime::version() {
        Ok(_) => true,
        Err(e) if std::env::var_os("NVIT_REQUIRE_ONNXRUNTIME").is_some() => panic!("NVIT_REQUIRE_ONNXRUNTIME is set and ONNX Runtime does not load: {e:#}"),
        Err(e) => {
            eprintln!("skipped: no ONNX Runtime here ({e:#})");
            false
        }
    }
}

/// The tiny pipeline profiles its table, stops its pruning on measurements and evaluates its
/// speedup in ONNX Runtime; every row says so, and the runtime is part of the stages' keys.
#[test]
fn a_pipeline_profiles_prunes_and_evaluates_in_onnxruntime() {
    if !onnxruntime_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_pipeline(dir.path(), STAGES);
    let path = path.to_str().unwrap();
    let (code, _, err) = run(dir.path(), &["run", path, "--set", "stages.train.epochs=1"], &[]);
    assert_eq!(code, 0, "{err}");
    let version = nvit::onnxruntime::version().unwrap();
    let runtime = format!("onnxruntime {version} CPUExecutionProvider");

    let entry = |stage: &str| {
        let cache = nvit::pipeline::Cache { root: dir.path().join("cache") };
        let p = crate::common::load(std::path::Path::new(path), &["stages.train.epochs=1"]);
        let pl = nvit::pipeline::plan(&p, &cache, &[], &p.device_name()).unwrap();
        let key = &pl.stages.iter().find(|s| s.spec.name == stage).unwrap().key;
        (cache.entry_dir(key), cache.complete(key).unwrap().metrics)
    };
    let (profile, metrics) = entry("profile");
    let csv = std::fs::read_to_string(profile.join("latency_measured.csv")).unwrap();
    assert_eq!(csv.lines().next().unwrap(), "emb,heads,qk,v,mlp,seconds,runtime");
    assert_eq!(csv.lines().count(), 1 + 32, "the coarse grid: {csv}");
    for line in csv.lines().skip(1) {
        assert!(line.contains(&runtime), "{line}");
        let seconds: f64 = line.split(',').nth(5).unwrap().parse().unwrap();
        assert!(seconds > 0.0 && seconds < 1.0, "{line}");
    }
    assert!(metrics["runtime"].as_str().unwrap().starts_with(&runtime), "{metrics}");

    let (prune, metrics) = entry("prune");
    let measured = std::fs::read_to_string(prune.join("latency_measured.csv")).unwrap();
    assert!(measured.lines().count() >= 2 && measured.lines().skip(1).all(|l| l.contains(&runtime)), "{measured}");
    assert!(metrics["latency_measured"].as_f64().unwrap() > 0.0, "{metrics}");
    assert!(metrics["latency_measured_runtime"].as_str().unwrap().starts_with(&runtime), "{metrics}");

    let (_, metrics) = entry("evaluate_pruned");
    assert!(metrics["runtime"].as_str().unwrap().starts_with(&runtime), "{metrics}");
    assert!(metrics["speedup"].as_f64().unwrap() > 0.0 && metrics["images_per_s"].as_f64().unwrap() > 0.0, "{metrics}");
    let table = std::fs::read_to_string(dir.path().join("results/tiny/metrics.csv")).unwrap();
    assert!(table.lines().next().unwrap().ends_with(",runtime") && table.contains(&runtime), "{table}");

    // The runtime is in the key: timed on the backend instead, the profile runs again.
    let (code, out, err) = run(dir.path(), &["run", path, "--set", "stages.train.epochs=1", "--set", "stages.profile.runtime=\"backend\"", "--dry-run"], &[]);
    assert_eq!(code, 0, "{err}");
    let line = out.lines().find(|l| l.contains("profile")).unwrap_or_default();
    assert!(out.contains("runtime") && !line.contains("cached"), "{out}");
}
