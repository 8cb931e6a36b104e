//! Nothing lost: stages killed with SIGKILL (or stopped with SIGTERM) resume where they were,
//! and end exactly as an uninterrupted run; damaged checkpoints and cached files are noticed.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::{output, runner};
use nvit::prune::{Grid, LatencyTable};

/// A latency table for the tiny model, written as a file `profile_latency` imports: both runs
/// then prune against the same table.
pub(crate) fn table_file(dir: &Path) -> PathBuf {
    let grid = Grid { emb: vec![1, 8, 16], heads: vec![1, 2], qk: vec![1, 4, 8], v: vec![1, 4, 8], mlp: vec![1, 16, 32] };
    let values = grid.points().iter().map(|(e, d)| 1e-4 * (*e * (d.heads * (d.qk + d.v) + d.mlp)) as f64 + 1e-6).collect();
    let path = dir.join("table.json");
    std::fs::write(&path, serde_json::to_vec(&LatencyTable::new(grid, values).unwrap().to_json()).unwrap()).unwrap();
    path
}

/// A prune stage that checkpoints every `checkpoint_every` pruning steps, a pruning step every
/// 3 batches, 4 batches an epoch.
pub(crate) fn prune_pipeline(dir: &Path, checkpoint_every: usize) -> PathBuf {
    let table = table_file(dir);
    common::tiny_pipeline(
        dir,
        &format!(
            r#"
[stages.latency]
kind = "profile_latency"
input = "train"
table = "{}"

[stages.prune]
kind = "prune"
input = "train"
latency = "latency"
latency_target = 0.15
interval = 3
eta = 0.0
groups_per_step = 1
group_emb = 2
group_head = 1
group_qk = 2
group_v = 2
group_mlp = 4
max_prune_steps = 200
checkpoint_every = {checkpoint_every}
batch_size = 16
"#,
            table.display()
        ),
    )
}

/// The entry directory of the stage of `kind` in `cache` (there is one).
fn entry_of(cache: &Path, kind: &str) -> Option<PathBuf> {
    std::fs::read_dir(cache).ok()?.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| {
        std::fs::read_to_string(p.join("key.json")).is_ok_and(|k| k.contains(&format!("\"kind\": \"{kind}\"")))
    })
}

/// Waits until `file` exists under the entry of `kind`, then returns the entry.
fn wait_for(cache: &Path, kind: &str, file: &str, child: &mut std::process::Child) -> PathBuf {
    let start = Instant::now();
    loop {
        if let Some(entry) = entry_of(cache, kind).filter(|e| e.join(file).exists()) {
            return entry;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the runner exited ({status}) before {kind} wrote {file}");
        }
        assert!(start.elapsed() < Duration::from_secs(120), "{kind} never wrote {file}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Whether a prune checkpoint's masks have removed part of an embedding stream: a resumed
/// run must then normalize over the surviving channels only, which the checkpoint does not
/// hold as a parameter.
fn emb_pruned(entry: &Path) -> bool {
    let Ok(bytes) = std::fs::read(entry.join("checkpoint/state.json")) else { return false };
    let Ok(state) = serde_json::from_slice::<serde_json::Value>(&bytes) else { return false };
    state["masks"]["emb"].as_array().is_some_and(|streams| {
        streams.iter().filter_map(|s| s.as_array()).flatten().any(|v| v.as_f64() == Some(0.0))
    })
}

/// Runs `path` to the end, then again in a copy of its cache without the prune entry, killed
/// (SIGKILL) once prune has checkpointed after an EMB group went, and run once more: the
/// resumed prune must write the uninterrupted one's bytes.
fn killed_prune_resumes_to_the_same_bytes(dir: &Path, path: &Path) {
    let args = ["run", path.to_str().unwrap()];
    let (code, _, err) = output(runner(dir).args(args));
    assert_eq!(code, 0, "{err}");
    let whole = entry_of(&dir.join("cache"), "prune").unwrap();
    assert!(!whole.join("checkpoint").exists(), "a committed entry keeps no checkpoint");

    let other = tempfile::tempdir().unwrap();
    let cache = other.path().join("cache");
    common::copy_dir(&dir.join("cache"), &cache);
    std::fs::remove_dir_all(cache.join(whole.file_name().unwrap())).unwrap();
    let again = || {
        let mut c = runner(dir);
        c.env("RUNNER_CACHE", &cache);
        c
    };
    let mut child = again().args(args).stderr(std::process::Stdio::null()).spawn().unwrap();
    let start = Instant::now();
    let entry = loop {
        if let Some(entry) = entry_of(&cache, "prune").filter(|e| emb_pruned(e)) {
            break entry;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the runner exited ({status}) before prune checkpointed with an EMB group gone");
        }
        assert!(start.elapsed() < Duration::from_secs(120), "prune never checkpointed with an EMB group gone");
        std::thread::sleep(Duration::from_millis(2));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!entry.join("manifest.json").exists(), "killed mid-stage");

    let (code, _, err) = output(again().args(args));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("prune: resuming after pruning step"), "{err}");
    assert!(err.contains("train: cached") && err.contains("latency: cached"), "{err}");
    for file in ["masks.json", "pruning_log.csv", "model/model.safetensors"] {
        let (a, b) = (std::fs::read(whole.join(file)).unwrap(), std::fs::read(entry.join(file)).unwrap());
        assert!(a == b, "{file} differs between the uninterrupted and the resumed run");
    }
}

#[test]
fn a_prune_killed_after_an_emb_group_went_resumes_to_the_uninterrupted_bytes() {
    let dir = tempfile::tempdir().unwrap();
    // Every 4 pruning steps is every 12 batches: each checkpoint falls after an epoch's last
    // batch, where a resumed run must go on to the next epoch.
    let path = prune_pipeline(dir.path(), 4);
    killed_prune_resumes_to_the_same_bytes(dir.path(), &path);
}

#[test]
fn a_swin_prune_killed_after_an_emb_group_went_resumes_to_the_uninterrupted_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::swin_pipeline(
        dir.path(),
        r#"
[stages.latency]
kind = "profile_latency"
input = "train"
grid = "coarse"
batch_size = 2
warmup = 0
repeats = 1

[stages.prune]
kind = "prune"
input = "train"
latency = "latency"
latency_target = 0.2
interval = 2
eta = 0.0
groups_per_step = 1
group_emb = 2
group_head = 1
group_qk = 2
group_v = 2
group_mlp = 4
max_prune_steps = 200
checkpoint_every = 1
batch_size = 16
"#,
    );
    killed_prune_resumes_to_the_same_bytes(dir.path(), &path);
}

#[test]
fn a_signal_stops_prune_at_a_clean_point_and_the_next_run_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let path = prune_pipeline(dir.path(), 2);
    let args = ["run", path.to_str().unwrap()];
    let cache = dir.path().join("cache");
    let mut child = runner(dir.path()).args(args).stderr(std::process::Stdio::piped()).spawn().unwrap();
    wait_for(&cache, "prune", "checkpoint/state.json", &mut child);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("stopped by a signal at a clean point") && err.contains("run the same command again to resume"), "{err}");
    let (code, _, err) = output(runner(dir.path()).args(args));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("prune: resuming after pruning step"), "{err}");
}

#[test]
fn a_killed_profile_keeps_the_grid_points_it_measured() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::tiny_pipeline(
        dir.path(),
        r#"
[stages.latency]
kind = "profile_latency"
input = "train"
grid_emb = [16, 32, 64, 128]
grid_heads = [1, 2, 4]
grid_qk = [8, 16, 32]
grid_v = [8, 16, 32]
grid_mlp = [64, 128, 256]
tokens = 64
batch_size = 16
warmup = 0
repeats = 3
rounds = 1
"#,
    );
    let args = ["run", path.to_str().unwrap()];
    let cache = dir.path().join("cache");
    let mut child = runner(dir.path()).args(args).stderr(std::process::Stdio::null()).spawn().unwrap();
    let entry = wait_for(&cache, "profile_latency", "checkpoint/measured.json", &mut child);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!entry.join("manifest.json").exists(), "killed mid-stage");
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(entry.join("checkpoint/measured.json")).unwrap()).unwrap();
    let saved: Vec<f64> = saved["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert!(!saved.is_empty() && saved.len() < 324, "{} points", saved.len());

    let (code, _, err) = output(runner(dir.path()).args(args));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&format!("latency: resuming after {} of 324 timed points", saved.len())), "{err}");
    // The medians as measured, before the table was made monotone.
    let measured = std::fs::read_to_string(entry.join("latency_measured.csv")).unwrap();
    let values: Vec<f64> = measured.lines().skip(1).map(|l| l.split(',').nth(5).unwrap().parse().unwrap()).collect();
    for (value, saved) in values.iter().zip(&saved) {
        assert!((value - saved).abs() <= 1e-12 * saved, "a measured point was measured again");
    }
    assert!(!entry.join("checkpoint").exists());
}

#[test]
fn train_keeps_its_checkpoint_until_the_entry_is_committed_and_a_damaged_one_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::tiny_pipeline(dir.path(), "");
    let p = common::load(&path, &[]);
    let cache = nvit::pipeline::Cache { root: dir.path().join("cache") };
    let plan = common::plan(&p, &cache);
    let train = &plan.stages[0];
    // The stage alone, as the runner calls it before writing the manifest.
    let entry = cache.begin(&train.key, &train.key_input).unwrap();
    let log = nvit::runlog::RunLog::silent();
    let ctx = nvit::stages::StageContext::<common::B> {
        pipeline_name: &p.pipeline.name,
        backend: p.pipeline.backend,
        dataset: &p.dataset,
        model: &p.model,
        specs: &p.stages,
        spec: &train.spec,
        seed: train.spec.seed(p.pipeline.seed),
        dir: entry.clone(),
        input: None,
        stages: vec![],
        devices: vec![Default::default()],
        world: &nvit::world::World::single(),
        device_name: "test-cpu",
        log: &log,
    };
    nvit::stages::run(&ctx).unwrap();
    assert!(entry.join("checkpoint/state.json").exists(), "a kill before the commit resumes from it");

    // A truncated checkpoint: the next run warns and trains from the start.
    let model = std::fs::read_dir(entry.join("checkpoint")).unwrap().filter_map(|e| e.ok()).find(|e| e.file_name().to_string_lossy().starts_with("model")).unwrap().path();
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    let (code, _, err) = output(runner(dir.path()).args(["run", path.to_str().unwrap()]));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("train: warning: the checkpoint in") && err.contains("is damaged") && err.contains("starting over"), "{err}");
    assert!(!err.contains("resuming after epoch"), "{err}");

    // A cached file truncated after the fact is not a cached entry.
    let weights = entry.join("model/model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..100]).unwrap();
    let (code, out, err) = output(runner(dir.path()).args(["run", path.to_str().unwrap(), "--dry-run"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().next().unwrap().contains("will run"), "{out}");
}

#[test]
fn stopping_short_of_the_latency_target_is_a_warning_with_the_latency_reached() {
    let dir = tempfile::tempdir().unwrap();
    let path = prune_pipeline(dir.path(), 2);
    let (code, _, err) = output(runner(dir.path()).args(["run", path.to_str().unwrap(), "--set", "stages.prune.max_prune_steps=2"]));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("prune: warning: stopped by max_prune_steps at an estimated latency of"), "{err}");
    assert!(err.contains("short of latency_target = 0.15"), "{err}");
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(entry_of(&dir.path().join("cache"), "prune").unwrap().join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["metrics"]["target_reached"], false);
    assert_eq!(manifest["metrics"]["stopped_by"], "max_prune_steps");
    assert!(manifest["metrics"]["latency_ratio"].as_f64().unwrap() > 0.15);
}

/// A latency table is measured, so it differs between two profiles: the stages that read it
/// are keyed on what it holds. A re-profiled table re-runs pruning; an imported table that
/// comes out byte-identical leaves it cached.
#[test]
fn pruning_follows_the_content_of_its_latency_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = prune_pipeline(dir.path(), 2);
    let run = |extra: &[&str]| output(runner(dir.path()).args(["run", path.to_str().unwrap(), "--set", "stages.prune.max_prune_steps=3"]).args(extra));
    let (code, _, err) = run(&[]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(&["--force", "latency"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("latency: running") && err.contains("prune: cached"), "the same table, the same prune: {err}");

    // Measured tables: every profile differs.
    {
        let text = std::fs::read_to_string(&path).unwrap();
        let start = text.find("table = ").unwrap();
        let end = start + text[start..].find('\n').unwrap();
        std::fs::write(&path, format!("{}grid_emb = [8, 16]\ngrid_heads = [1, 2]\ngrid_qk = [4, 8]\ngrid_v = [4, 8]\ngrid_mlp = [16, 32]\nbatch_size = 2\nwarmup = 0\nrepeats = 1{}", &text[..start], &text[end..])).unwrap();
    }
    let (code, _, err) = run(&[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("prune: running"), "{err}");
    let (code, out, err) = run(&["--force", "latency", "--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("its input `latency` will run"), "{out}");
    let (code, _, err) = run(&["--force", "latency"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("latency: running") && err.contains("prune: running"), "a re-profiled table re-runs pruning: {err}");
}
