//! `runner sweep`: grid expansion, local workers, Slurm shards sharing one cache, the
//! combined table.

use crate::common;

use std::path::Path;
use std::process::Command;

use crate::common::{output, runner};

/// The tiny pipeline and a sweep over its evaluate stage: `train` is common to every point.
fn sweep_file(dir: &Path, extra: &str) -> std::path::PathBuf {
    common::tiny_pipeline(dir, "");
    let path = dir.join("sweeps/tiny-sweep.toml");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, format!("pipeline = \"../tiny.toml\"\n{extra}\n[set]\n\"stages.train.epochs\" = 1\n\n[grid]\n\"stages.evaluate.throughput_batch\" = [4, 8]\n")).unwrap();
    path
}

/// Lines of the points' output that say a stage ran (not cached, not built by another runner).
fn ran(dir: &Path, stage: &str) -> usize {
    let logs = dir.join("runs/sweeps/tiny-sweep");
    std::fs::read_dir(&logs)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("throughput_batch"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .map(|text| text.lines().filter(|l| l.contains(&format!(" {stage}: running "))).count())
        .sum()
}

fn table(dir: &Path) -> Vec<Vec<String>> {
    let mut reader = csv::Reader::from_path(dir.join("results/tiny-sweep/sweep.csv")).unwrap();
    let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
    let mut rows = vec![header];
    rows.extend(reader.records().map(|r| r.unwrap().iter().map(String::from).collect()));
    rows
}

#[test]
fn two_slurm_shards_at_once_share_the_cache_and_the_last_writes_the_whole_table() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = sweep_file(dir.path(), "");
    let spawn = |shard: &str| runner(dir.path()).args(["sweep", sweep.to_str().unwrap(), "--shard", shard]).output().unwrap();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| spawn("1/2"));
        let b = s.spawn(|| spawn("2/2"));
        (a.join().unwrap(), b.join().unwrap())
    });
    for o in [&a, &b] {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(ran(dir.path(), "train"), 1, "the common stage ran once across both shards");
    assert_eq!(ran(dir.path(), "evaluate"), 2, "each point evaluated its own model");

    let rows = table(dir.path());
    assert_eq!(rows[0][..4], ["point", "stages.evaluate.throughput_batch", "model", "dataset"]);
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!((rows[1][0].as_str(), rows[1][1].as_str(), rows[1][2].as_str()), ("throughput_batch-4", "4", "train"), "the evaluated model is the trained one");
    assert_eq!((rows[2][0].as_str(), rows[2][1].as_str()), ("throughput_batch-8", "8"));
    assert_eq!(rows[1][4], rows[2][4], "both points evaluated the one trained model: same top-1");
    for point in ["throughput_batch-4", "throughput_batch-8"] {
        assert!(dir.path().join(format!("results/tiny-sweep/{point}/metrics.csv")).exists(), "{point}'s own results");
    }

    // Nothing left to do: a dry run says so, and a full run reruns nothing.
    let (code, out, err) = output(runner(dir.path()).args(["sweep", sweep.to_str().unwrap(), "--dry-run"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("sweep tiny-sweep over") && out.contains("(2 points)"), "{out}");
    assert_eq!(out.matches("stages to run: none").count(), 2, "{out}");
}

#[test]
fn local_workers_run_the_points_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = sweep_file(dir.path(), "devices = [0, 0]");
    let (code, out, err) = output(runner(dir.path()).args(["sweep", sweep.to_str().unwrap(), "--dry-run"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("workers: [[0], [0]]"), "{out}");
    assert!(out.contains("run  throughput_batch-4") && out.contains("stages to run: train evaluate"), "{out}");

    let (code, out, err) = output(runner(dir.path()).args(["sweep", sweep.to_str().unwrap()]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("sweep tiny-sweep: 2 of 2 points finished"), "{out}");
    assert!(err.contains("throughput_batch-8: done in"), "{err}");
    assert_eq!(ran(dir.path(), "train"), 1);
    assert_eq!(table(dir.path()).len(), 3);
    let readme = std::fs::read_to_string(dir.path().join("results/tiny-sweep/README.md")).unwrap();
    assert!(readme.contains("2 points over") && readme.contains("throughput is measured alone"), "{readme}");
    assert_eq!(table(dir.path())[0][table(dir.path())[0].len() - 2..], ["latency_reached", "latency_measured"]);
}

#[test]
fn emit_slurm_writes_an_array_script_of_shards() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = sweep_file(dir.path(), "devices_per_point = 2\ndevices = [0, 0]\n\n[slurm]\nshards = 2\ntime = \"2:00:00\"\ncpus_per_task = 8\nmem = \"32G\"\nextra = [\"--account=vision\"]\n");
    let (code, script, err) = output(runner(dir.path()).args(["sweep", sweep.to_str().unwrap(), "--emit-slurm"]));
    assert_eq!(code, 0, "{err}");
    for line in ["#SBATCH --array=1-2", "#SBATCH --time=2:00:00", "#SBATCH --account=vision", "#SBATCH --cpus-per-task=8"] {
        assert!(script.lines().any(|l| l == line), "{line} in:\n{script}");
    }
    assert!(!script.contains("--gpus-per-task"), "a CPU pipeline asks for no GPU:\n{script}");
    // The CPU backend has one device, split into shards.
    assert!(script.contains("--shard \"$SLURM_ARRAY_TASK_ID/2\" --devices 0,0"), "{script}");
    assert!(script.contains("export RUNNER_CACHE="), "{script}");
    let file = dir.path().join("sweep.sbatch");
    std::fs::write(&file, &script).unwrap();
    assert!(Command::new("bash").arg("-n").arg(&file).status().unwrap().success(), "valid bash:\n{script}");
}

#[test]
fn bad_sweeps_fail_before_anything_runs_naming_the_file_point_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = sweep_file(dir.path(), "device = [0]");
    let (code, _, err) = output(runner(dir.path()).args(["sweep", sweep.to_str().unwrap()]));
    assert_eq!(code, 1);
    assert!(err.contains("tiny-sweep.toml") && err.contains("unknown field `device`"), "{err}");

    let sweep = sweep_file(dir.path(), "devices_per_point = 2\ndevices = [0, 0]");
    let (code, _, err) = output(runner(dir.path()).args(["sweep", sweep.to_str().unwrap(), "--devices", "0"]));
    assert_eq!(code, 1);
    assert!(err.contains("devices [0] cannot be split into workers of devices_per_point = 2"), "{err}");

    let sweep = sweep_file(dir.path(), "");
    let text = std::fs::read_to_string(&sweep).unwrap().replace("throughput_batch\" = [4, 8]", "throughput_bach\" = [4, 8]");
    std::fs::write(&sweep, text).unwrap();
    let (code, _, err) = output(runner(dir.path()).args(["sweep", sweep.to_str().unwrap()]));
    assert_eq!(code, 1);
    assert!(err.contains("point `throughput_bach-4`"), "{err}");
    assert!(err.contains("stages.evaluate.throughput_bach`; did you mean `throughput_batch`?"), "{err}");
    assert!(!dir.path().join("runs").exists(), "nothing ran");
}

#[test]
fn the_paper_sweep_expands_to_its_four_targets() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let sweep = repo.join("pipelines/sweeps/nvit-targets.toml");
    let smoke = repo.join("pipelines/smoke.toml");
    let (code, out, err) = output(runner(dir.path()).args(["sweep", sweep.to_str().unwrap(), "--with", smoke.to_str().unwrap(), "--dry-run"]));
    assert_eq!(code, 0, "{err}");
    for target in ["0.54", "0.5", "0.39", "0.19"] {
        let line = out.lines().find(|l| l.contains(&format!("latency_target-{target} "))).unwrap_or_else(|| panic!("{target}: {out}"));
        assert!(line.contains("stages to run: dense evaluate_dense latency prune distill evaluate report"), "{line}");
    }
    assert!(out.contains("workers: [[0], [1], [2], [3]]"), "{out}");

    let (code, script, err) = output(runner(dir.path()).args(["sweep", sweep.to_str().unwrap(), "--with", smoke.to_str().unwrap(), "--emit-slurm"]));
    assert_eq!(code, 0, "{err}");
    for line in ["#SBATCH --array=1-4", "#SBATCH --gpus-per-task=1", "#SBATCH --time=72:00:00"] {
        assert!(script.lines().any(|l| l == line), "{line} in:\n{script}");
    }
    assert!(script.contains(&format!("--with '{}' --shard", smoke.display())), "{script}");
}

/// `--force train` with two workers: train, shared by both points, is rebuilt once (under its
/// lock, by whichever point gets it first); nothing fails.
#[test]
fn a_forced_stage_shared_by_the_points_is_rebuilt_once() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = sweep_file(dir.path(), "devices = [0, 0]");
    let (code, out, err) = output(runner(dir.path()).args(["sweep", sweep.to_str().unwrap()]));
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(ran(dir.path(), "train"), 1);
    for _ in 0..2 {
        let (code, out, err) = output(runner(dir.path()).args(["sweep", sweep.to_str().unwrap(), "--force", "train"]));
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("2 of 2 points finished") && !err.contains("failed"), "{out}{err}");
        // The points' logs are this sweep's: one point rebuilt train, the other took it.
        assert_eq!(ran(dir.path(), "train"), 1, "rebuilt once per forced sweep, not once per point");
    }
}

/// Killing the sweep (SIGKILL, no chance to clean up) stops its `runner run` workers too.
#[test]
fn workers_die_with_their_sweep() {
    let dir = tempfile::tempdir().unwrap();
    common::tiny_pipeline(dir.path(), "");
    let sweep = dir.path().join("long-sweep.toml");
    // Two points that train for long, each its own model.
    std::fs::write(&sweep, "pipeline = \"tiny.toml\"\ndevices = [0, 0]\n[set]\n\"stages.train.epochs\" = 400\n[grid]\n\"stages.train.lr\" = [0.001, 0.002]\n").unwrap();
    let mut child = runner(dir.path()).args(["sweep", sweep.to_str().unwrap()]).stderr(std::process::Stdio::null()).spawn().unwrap();
    let children = |pid: u32| -> Vec<u32> {
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    let start = std::time::Instant::now();
    let mut workers = Vec::new();
    while workers.len() < 2 {
        workers = std::fs::read_dir(format!("/proc/{}/task", child.id()))
            .unwrap()
            .filter_map(|t| t.ok())
            .flat_map(|t| children(t.file_name().to_string_lossy().parse().unwrap()))
            .collect();
        assert!(start.elapsed().as_secs() < 60, "no workers started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    for pid in workers {
        let start = std::time::Instant::now();
        // A zombie (state Z) has exited; only its parent, gone, could reap it.
        let alive = || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.split_whitespace().nth(2).is_some_and(|st| st == "Z"));
        while alive() {
            assert!(start.elapsed().as_secs() < 20, "worker {pid} outlived its sweep");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// A point whose devices the backend cannot have fails the sweep's check, before anything runs.
#[test]
fn a_point_on_devices_the_backend_lacks_is_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = sweep_file(dir.path(), "devices = [0, 1]");
    let (code, out, err) = output(runner(dir.path()).args(["sweep", sweep.to_str().unwrap(), "--dry-run"]));
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("point `throughput_batch-") && err.contains("names 1: the flex backend has one device, 0"), "{err}");
    assert!(!dir.path().join("cache").exists());
}

/// A grid over `pipeline.seed` repeats the points: stages that pin their own seed (the dense
/// model) run once, the others once per seed, and `seeds.csv` gives each model's mean and
/// spread over the seeds, `seeds.svg` plots them.
#[test]
fn a_seed_grid_shares_the_pinned_stages_and_writes_mean_and_spread() {
    let dir = tempfile::tempdir().unwrap();
    common::tiny_pipeline(
        dir.path(),
        "seed = 5\n\n[stages.tune]\nkind = \"train\"\ninput = \"train\"\nepochs = 1\nbatch_size = 16\nwarmup_epochs = 0\n\n[stages.evaluate_tune]\nkind = \"evaluate\"\nbatch_size = 32\nthroughput_batch = 8\nthroughput_repeats = 2\nwarmup = 1\n",
    );
    let sweep = dir.path().join("sweeps/seeds.toml");
    std::fs::create_dir_all(sweep.parent().unwrap()).unwrap();
    std::fs::write(&sweep, "pipeline = \"../tiny.toml\"\n[set]\n\"stages.train.seed\" = 5\n\"stages.train.epochs\" = 1\n[grid]\n\"pipeline.seed\" = [1, 2]\n").unwrap();
    let (code, out, err) = output(runner(dir.path()).args(["sweep", sweep.to_str().unwrap()]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("2 of 2 points finished"), "{out}");
    let logs: String = std::fs::read_dir(dir.path().join("runs/sweeps/seeds")).unwrap().map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap_or_default()).collect();
    assert_eq!(logs.matches(" train: running ").count(), 1, "the pinned dense model is shared: {logs}");
    assert_eq!(logs.matches(" tune: running ").count(), 2, "one fine-tuning per seed: {logs}");

    let results = dir.path().join("results/seeds");
    let mut reader = csv::Reader::from_path(results.join("seeds.csv")).unwrap();
    let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
    assert_eq!(header[..5], ["setting", "model", "seeds", "top1_mean", "top1_std"]);
    let rows: Vec<Vec<String>> = reader.records().map(|r| r.unwrap().iter().map(String::from).collect()).collect();
    assert_eq!(rows.iter().map(|r| (r[1].as_str(), r[2].as_str())).collect::<Vec<_>>(), [("train", "2"), ("tune", "2")], "{rows:?}");
    assert_eq!(rows[0][4].parse::<f64>().unwrap(), 0.0, "one dense model: no spread");
    let sweep_csv = std::fs::read_to_string(results.join("sweep.csv")).unwrap();
    let tune: Vec<f64> = sweep_csv.lines().filter(|l| l.contains(",tune,")).map(|l| l.split(',').nth(4).unwrap().parse().unwrap()).collect();
    assert_eq!(tune.len(), 2, "{sweep_csv}");
    assert!((rows[1][3].parse::<f64>().unwrap() - (tune[0] + tune[1]) / 2.0).abs() < 1e-9, "the mean of the seeds' top-1: {rows:?} {tune:?}");
    assert!(results.join("seeds.svg").exists());
    assert!(std::fs::read_to_string(results.join("README.md")).unwrap().contains("## Over seeds"));
}
