//! A tiny pipeline on synthetic data, fast enough for 2 cores in a release test build.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, NdArray};
use nvit::config::{Overrides, Pipeline};
use nvit::pipeline::{self, Cache, Plan, StageRecord, Status};
use nvit::runlog::RunLog;

pub type B = Autodiff<NdArray<f32>>;

/// burn-ndarray's seeded random generator is one per process, shared by every test in this
/// binary (and a backend's by every test on it): a test that seeds or draws from one holds this
/// for its whole body, so that a model initialized while another test draws random numbers
/// never gets other weights (see `main.rs`).
pub fn rng_turn() -> std::sync::MutexGuard<'static, ()> {
    static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    RNG.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The `runner` binary, in `dir` with its cache there.
pub fn runner(dir: &Path) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_runner"));
    c.env("RUNNER_CACHE", dir.join("cache")).current_dir(dir);
    c
}

/// Exit code, stdout and stderr.
pub fn output(c: &mut std::process::Command) -> (i32, String, String) {
    let o = c.output().unwrap();
    (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stdout).into(), String::from_utf8_lossy(&o.stderr).into())
}

/// Copies the tree under `from` to `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    for entry in walkdir::WalkDir::new(from).into_iter().filter_map(|e| e.ok()) {
        let target = to.join(entry.path().strip_prefix(from).unwrap());
        if entry.file_type().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

pub fn tiny_pipeline(dir: &Path, extra: &str) -> PathBuf {
    let text = format!(
        r#"
[pipeline]
name = "tiny"
results_dir = "{d}/results"
runs_dir = "{d}/runs"

[dataset]
kind = "synthetic"
classes = 4
train_size = 64
val_size = 32
synthetic_size = 16
crop_scale = [0.5, 1.0]
eval_crop_pct = 1.0
workers = 2

[model]
image_size = 16
patch_size = 4
embed_dim = 16
depth = 2
heads = 2
mlp_ratio = 2.0
distilled = true

[stages.train]
kind = "train"
epochs = 2
batch_size = 16
lr = 2e-3
warmup_epochs = 0

[stages.evaluate]
kind = "evaluate"
batch_size = 32
throughput_batch = 8
throughput_repeats = 2
warmup = 1
{extra}
"#,
        d = dir.display()
    );
    let path = dir.join("tiny.toml");
    std::fs::write(&path, text).unwrap();
    path
}

pub fn load(path: &Path, set: &[&str]) -> Pipeline {
    let overrides = Overrides { set: set.iter().map(|s| s.to_string()).collect(), env: false, with: vec![] };
    nvit::config::load(path, &overrides).unwrap_or_else(|e| panic!("{e}"))
}

pub fn plan(p: &Pipeline, cache: &Cache) -> Plan {
    pipeline::plan(p, cache, &[], "test-cpu").unwrap()
}

pub fn execute(p: &Pipeline, plan: &mut Plan, cache: &Cache) -> Vec<StageRecord> {
    try_execute(p, plan, cache).unwrap()
}

/// `plan` on the pipeline's backend and devices (`devices = [0, 0]`: data-parallel over two CPU
/// shards), silently, as the runner would: through the library's `pipeline::run`, whose
/// stages are compiled once, there.
pub fn try_execute(p: &Pipeline, plan: &mut Plan, cache: &Cache) -> anyhow::Result<Vec<StageRecord>> {
    pipeline::run(p, plan, cache, "test-cpu", None, &RunLog::silent(), &nvit::world::World::single())
}

/// `(stage, "cached" | "run")` for each planned stage.
pub fn statuses(plan: &Plan) -> Vec<(String, &'static str)> {
    plan.stages
        .iter()
        .map(|s| (s.spec.name.clone(), if s.status == Status::Cached { "cached" } else { "run" }))
        .collect()
}

pub fn reasons(plan: &Plan, stage: &str) -> Vec<String> {
    match &plan.stages.iter().find(|s| s.spec.name == stage).unwrap().status {
        Status::Run(why) => why.clone(),
        Status::Cached => vec![],
    }
}

/// `tiny_pipeline` with its DeiT replaced by a two-stage Swin: 16 px, patch 2 (an 8 x 8 map,
/// then 4 x 4 after the merging), windows of 2 shifted by 1, E 8 then 16, heads 1 then 2.
pub fn swin_pipeline(dir: &std::path::Path, stages: &str) -> std::path::PathBuf {
    let path = tiny_pipeline(dir, stages);
    let text = std::fs::read_to_string(&path).unwrap();
    let deit = "[model]\nimage_size = 16\npatch_size = 4\nembed_dim = 16\ndepth = 2\nheads = 2\nmlp_ratio = 2.0\ndistilled = true\n";
    let swin = "[model]\nfamily = \"swin\"\nimage_size = 16\npatch_size = 2\nwindow = 2\nembed_dim = 8\ndepths = [2, 2]\nheads = 1\nmlp_ratio = 2.0\n";
    assert!(text.contains(deit), "tiny_pipeline's [model] changed: update this test");
    std::fs::write(&path, text.replace(deit, swin)).unwrap();
    path
}
