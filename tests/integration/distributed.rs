//! Several runner processes as one job (`--ranks`, `src/world.rs`), over loopback: they train
//! and prune to what one process computes on the full batch, refuse ranks that run another
//! job, and stop when one of them dies.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::common::{output, runner};
use crate::resume::prune_pipeline;

/// `resume::prune_pipeline` with a `distill` stage after `prune` (teacher: `train`). Its
/// distillation weight is the quickstart's, 10 at T = 4: the default, 1e5 at T = 20, makes the
/// loss 1e5 times a KL divergence of about 5e-5 whose f32 cancellation alone moves it by 1e-3,
/// whatever order the shards are summed in.
fn prune_and_distill_pipeline(dir: &Path) -> std::path::PathBuf {
    let path = prune_pipeline(dir, 1000);
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("\n[stages.distill]\nkind = \"distill\"\ninput = \"prune\"\nteacher = \"train\"\nepochs = 2\nbatch_size = 16\nrandaugment_ops = 0\nrandom_erasing = 0.0\nkd_weight = 10.0\ntemperature = 4.0\n");
    std::fs::write(&path, text).unwrap();
    path
}

/// `ranks` runner processes on `pipeline` meeting at `port`, with `extra` arguments per rank;
/// their exit codes and stderr, in rank order.
/// Ranks that have not all finished after ten minutes are killed and the test fails with their
/// logs: a hang in an all-reduce must not hold CI until its own limit.
fn run_ranks(dir: &Path, pipeline: &Path, ranks: usize, port: u16, extra: &[&[&str]]) -> Vec<(i32, String)> {
    let mut children: Vec<Child> = (0..ranks).map(|r| spawn_rank(dir, pipeline, ranks, r, port, extra.get(r).copied().unwrap_or(&[]))).collect();
    let logs: Vec<std::thread::JoinHandle<String>> = children
        .iter_mut()
        .map(|c| {
            let mut stderr = c.stderr.take().unwrap();
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
                text
            })
        })
        .collect();
    let start = Instant::now();
    while !children.iter_mut().all(|c| c.try_wait().unwrap().is_some()) {
        if start.elapsed() > Duration::from_secs(600) {
            children.iter_mut().for_each(|c| drop(c.kill()));
            let logs: Vec<String> = logs.into_iter().map(|l| l.join().unwrap()).collect();
            panic!("{ranks} ranks did not finish in 600 s (hung?); their logs:\n{}", logs.join("\n-----\n"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    children.iter_mut().zip(logs).map(|(c, log)| (c.wait().unwrap().code().unwrap_or(-1), log.join().unwrap())).collect()
}

fn spawn_rank(dir: &Path, pipeline: &Path, ranks: usize, rank: usize, port: u16, extra: &[&str]) -> Child {
    runner(dir)
        .args(["run", pipeline.to_str().unwrap(), "--ranks", &ranks.to_string(), "--rank", &rank.to_string()])
        .args(["--coordinator", &format!("127.0.0.1:{port}")])
        .args(extra)
        // Every step begins with the ranks comparing their replicas' digests.
        .env("RUNNER_CHECK_REPLICAS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The metrics of the stage of `kind` and the bytes of `file` in its entry.
fn entry(dir: &Path, kind: &str, file: &str) -> (serde_json::Value, Vec<u8>) {
    let cache = dir.join("cache");
    let entry = std::fs::read_dir(&cache).unwrap().filter_map(|e| e.ok()).map(|e| e.path()).find(|p| {
        std::fs::read_to_string(p.join("key.json")).is_ok_and(|k| k.contains(&format!("\"kind\": \"{kind}\"")))
    });
    let entry = entry.unwrap_or_else(|| panic!("no {kind} entry in {}", cache.display()));
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(entry.join("manifest.json")).unwrap()).unwrap();
    (manifest["metrics"].clone(), std::fs::read(entry.join(file)).unwrap_or_default())
}

/// One test of these at a time: they share loopback, whose counters one of them reads.
static LOOPBACK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn loopback_turn() -> std::sync::MutexGuard<'static, ()> {
    LOOPBACK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Bytes sent on loopback so far (every process's), if the kernel shows them.
fn loopback_sent() -> Option<u64> {
    std::fs::read_to_string("/sys/class/net/lo/statistics/tx_bytes").ok()?.trim().parse().ok()
}

/// The bytes a rank's log says it all-reduced.
fn all_reduced_bytes(err: &str) -> u64 {
    let line = err.lines().find(|l| l.contains("all-reduces of")).unwrap_or_else(|| panic!("no all-reduce count in:\n{err}"));
    line.split(" all-reduces of ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap()
}

/// N ranks against one process with N shards of each batch (`devices = [0, ..., 0]`): the same
/// global batches, and the same drop-path seeds (distill's stochastic depth), shard k's on rank k.
#[test]
fn two_and_three_ranks_train_prune_and_distill_as_one_process_does() {
    let _turn = loopback_turn();
    for (ranks, port) in [(2, 29810), (3, 29830)] {
        let one = tempfile::tempdir().unwrap();
        let path = prune_and_distill_pipeline(one.path());
        let devices = vec!["0"; ranks].join(",");
        let (code, _, err) = output(runner(one.path()).args(["run", path.to_str().unwrap(), "--devices", &devices]));
        assert_eq!(code, 0, "{err}");
        let (train1, _) = entry(one.path(), "train", "");
        let (_, masks1) = entry(one.path(), "prune", "masks.json");
        let (distill1, _) = entry(one.path(), "distill", "");
        let dir = tempfile::tempdir().unwrap();
        let path = prune_and_distill_pipeline(dir.path());
        let before = loopback_sent();
        let results = run_ranks(dir.path(), &path, ranks, port, &[&["--devices", "0"][..]; 3]);
        let sent = loopback_sent().zip(before).map(|(after, before)| after - before);
        for (r, (code, err)) in results.iter().enumerate() {
            assert_eq!(*code, 0, "rank {r} of {ranks}: {err}");
        }
        // What crossed loopback is what a ring sends, 2(N-1)/N of every buffer from each rank,
        // plus the messages' framing: a model copied each step would add half of it again.
        let buffers = all_reduced_bytes(&results[0].1);
        if let Some(sent) = sent {
            let ring = 2 * (ranks as u64 - 1) * buffers;
            let ratio = sent as f64 / ring as f64;
            eprintln!("{ranks} ranks: {sent} bytes on loopback, a ring of {buffers} bytes of buffers sends {ring}: {ratio:.3}");
            assert!((1.0..1.3).contains(&ratio), "{ranks} ranks: {sent} bytes on loopback for a ring of {ring}: {ratio:.3} of it");
        }
        let losses = |m: &serde_json::Value| m["epoch_losses"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect::<Vec<_>>();
        let (_, masks) = entry(dir.path(), "prune", "masks.json");
        assert!(!masks.is_empty() && masks == masks1, "{ranks} ranks prune other units than one process");
        for (kind, one_process) in [("train", &train1), ("distill", &distill1)] {
            let (l1, ln) = (losses(one_process), losses(&entry(dir.path(), kind, "").0));
            assert_eq!(l1.len(), ln.len());
            for (a, b) in l1.iter().zip(&ln) {
                assert!((a - b).abs() < 1e-4 * a.abs(), "{kind} with {ranks} ranks: epoch losses {ln:?}, one process {l1:?}");
            }
        }
        // Only rank 0 wrote: one run directory.
        let runs = std::fs::read_dir(dir.path().join("runs/tiny")).unwrap().count();
        assert_eq!(runs, 1, "one run directory, rank 0's");
    }
}

#[test]
fn ranks_that_run_another_pipeline_are_refused_at_the_join() {
    let _turn = loopback_turn();
    let dir = tempfile::tempdir().unwrap();
    let path = crate::common::tiny_pipeline(dir.path(), "");
    let results = run_ranks(dir.path(), &path, 2, 29850, &[&[], &["--set", "stages.train.lr=1e-3"]]);
    for (r, (code, err)) in results.iter().enumerate() {
        assert_ne!(*code, 0, "rank {r} ran");
        assert!(err.contains("rank 1's pipeline") && err.contains("is not rank 0's"), "rank {r}: {err}");
    }
    assert!(!dir.path().join("cache").exists() || std::fs::read_dir(dir.path().join("cache")).unwrap().all(|e| !e.unwrap().path().join("manifest.json").exists()));
}

/// What no number of ranks can run is refused before any rank joins, naming the key; so is an
/// sbatch script for such a job, or for no ranks at all.
#[test]
fn settings_the_ranks_cannot_share_are_refused_before_the_join() {
    let dir = tempfile::tempdir().unwrap();
    let path = prune_pipeline(dir.path(), 1000);
    let run = |extra: &[&str]| {
        let (code, _, err) = output(runner(dir.path()).args(["run", path.to_str().unwrap()]).args(extra));
        assert_ne!(code, 0, "{extra:?} ran: {err}");
        err
    };
    // Port 9: nothing listens there, so a rank that tried to join would wait on it.
    let ranks = ["--ranks", "3", "--rank", "1", "--coordinator", "127.0.0.1:9"];
    let err = run(&[&ranks[..], &["--set", "stages.train.batch_size=2"]].concat());
    assert!(err.contains("stages.train.batch_size = 2: 3 ranks share every batch"), "{err}");
    let err = run(&[&ranks[..], &["--set", "stages.prune.stop_on=\"measured\""]].concat());
    assert!(err.contains("stages.prune.stop_on = \"measured\" with 3 ranks"), "{err}");
    let err = run(&["--emit-slurm", "--nodes", "2", "--gpus-per-node", "2", "--set", "stages.prune.batch_size=3"]);
    assert!(err.contains("stages.prune.batch_size = 3: 4 ranks"), "{err}");
    for (nodes, gpus) in [("0", "1"), ("1025", "1"), ("2", "0")] {
        let err = run(&["--emit-slurm", "--nodes", nodes, "--gpus-per-node", gpus]);
        assert!(err.contains(&format!("--nodes {nodes} --gpus-per-node {gpus}: each must be at least 1 and their product at most 1024")), "{err}");
    }
    assert!(!dir.path().join("cache").exists(), "nothing ran");
}

#[test]
fn a_killed_rank_ends_the_others_with_an_error_naming_it() {
    let _turn = loopback_turn();
    let dir = tempfile::tempdir().unwrap();
    let path = crate::common::tiny_pipeline(dir.path(), "");
    let long = ["--set", "stages.train.epochs=100000"];
    let mut rank0 = spawn_rank(dir.path(), &path, 2, 0, 29870, &long);
    let mut rank1 = spawn_rank(dir.path(), &path, 2, 1, 29870, &long);
    // Training has begun once rank 0 has its entry.
    let start = Instant::now();
    while std::fs::read_dir(dir.path().join("cache")).map_or(true, |d| d.count() == 0) {
        assert!(start.elapsed() < Duration::from_secs(60), "training never began");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    rank1.kill().unwrap();
    rank1.wait().unwrap();
    let killed = Instant::now();
    loop {
        if let Some(status) = rank0.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(rank0.stderr.as_mut().unwrap(), &mut err).unwrap();
            assert!(!status.success());
            assert!(err.contains("rank 1") && err.contains("is gone"), "{err}");
            break;
        }
        if killed.elapsed() > Duration::from_secs(30) {
            rank0.kill().unwrap();
            panic!("rank 0 still runs 30 s after rank 1 was killed");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The script of `--emit-slurm`, run with a stand-in `srun` that starts its tasks on this
/// machine with the variables Slurm gives them: the two ranks train the pipeline together
/// (job 13: the coordinator on port 29708, the ranks on 29709 and 29710).
#[test]
fn the_emitted_sbatch_script_runs_its_ranks() {
    let _turn = loopback_turn();
    let dir = tempfile::tempdir().unwrap();
    let path = crate::common::tiny_pipeline(dir.path(), "");
    // A layer whose name would end the quoting of a careless script.
    let layer = dir.path().join("one epoch'; touch pwned; '.toml");
    std::fs::write(&layer, "[stages.train]\nepochs = 1\n").unwrap();
    let (code, script, err) = output(runner(dir.path()).args(["run", path.to_str().unwrap(), "--with", layer.to_str().unwrap()]).args(["--emit-slurm", "--nodes", "2", "--gpus-per-node", "1"]));
    assert_eq!(code, 0, "{err}");
    for line in ["#SBATCH --nodes=2\n", "#SBATCH --ntasks-per-node=1\n", "srun --kill-on-bad-exit=1", "--slurm --devices 0'"] {
        assert!(script.contains(line), "{line:?} in:\n{script}");
    }
    let file = dir.path().join("job.sbatch");
    std::fs::write(&file, &script).unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let srun = bin.join("srun");
    std::fs::write(
        &srun,
        "#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nfor t in 0 1; do SLURM_PROCID=$t SLURM_LOCALID=0 SLURM_NTASKS=2 SLURM_JOB_NODELIST=localhost SLURMD_NODENAME=localhost SLURM_JOB_ID=13 \"$@\" & done\nwait -n && wait -n\n",
    )
    .unwrap();
    std::fs::set_permissions(&srun, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path_var = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let (code, _, err) = output(std::process::Command::new("bash").arg(&file).env("PATH", path_var).env("RUNNER_CACHE", dir.path().join("cache")).current_dir(dir.path()));
    assert_eq!(code, 0, "{err}");
    assert!(!dir.path().join("pwned").exists(), "an argument reached the shell");
    let (train, _) = entry(dir.path(), "train", "");
    assert_eq!(train["epoch_losses"].as_array().unwrap().len(), 1, "{train}");
}
