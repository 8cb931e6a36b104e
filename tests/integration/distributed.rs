//! Several runner processes as one job (`--ranks`, `src/world.rs`), over loopback: they train
//! and prune to what one process computes on the full batch, refuse ranks that run another
//! job, and stop when one of them dies.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::common::{output, runner};
use crate::resume::prune_pipeline;

/// `ranks` runner processes on `pipeline` meeting at `port`, with `extra` arguments per rank;
/// their exit codes and stderr, in rank order.
fn run_ranks(dir: &Path, pipeline: &Path, ranks: usize, port: u16, extra: &[&[&str]]) -> Vec<(i32, String)> {
    let children: Vec<Child> = (0..ranks).map(|r| spawn_rank(dir, pipeline, ranks, r, port, extra.get(r).copied().unwrap_or(&[]))).collect();
    children
        .into_iter()
        .map(|c| {
            let o = c.wait_with_output().unwrap();
            (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stderr).into())
        })
        .collect()
}

fn spawn_rank(dir: &Path, pipeline: &Path, ranks: usize, rank: usize, port: u16, extra: &[&str]) -> Child {
    runner(dir)
        .args(["run", pipeline.to_str().unwrap(), "--ranks", &ranks.to_string(), "--rank", &rank.to_string()])
        .args(["--coordinator", &format!("127.0.0.1:{port}")])
        .args(extra)
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

#[test]
fn two_and_three_ranks_train_and_prune_as_one_process_does() {
    let one = tempfile::tempdir().unwrap();
    let path = prune_pipeline(one.path(), 1000);
    let (code, _, err) = output(runner(one.path()).args(["run", path.to_str().unwrap()]));
    assert_eq!(code, 0, "{err}");
    let (train1, _) = entry(one.path(), "train", "");
    let (_, masks1) = entry(one.path(), "prune", "masks.json");
    for (ranks, port) in [(2, 29710), (3, 29720)] {
        let dir = tempfile::tempdir().unwrap();
        let path = prune_pipeline(dir.path(), 1000);
        for (r, (code, err)) in run_ranks(dir.path(), &path, ranks, port, &[]).iter().enumerate() {
            assert_eq!(*code, 0, "rank {r} of {ranks}: {err}");
        }
        let (train, _) = entry(dir.path(), "train", "");
        let losses = |m: &serde_json::Value| m["epoch_losses"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect::<Vec<_>>();
        let (l1, ln) = (losses(&train1), losses(&train));
        assert_eq!(l1.len(), ln.len());
        for (a, b) in l1.iter().zip(&ln) {
            assert!((a - b).abs() < 1e-4 * a.abs(), "{ranks} ranks: epoch losses {ln:?}, one process {l1:?}");
        }
        let (_, masks) = entry(dir.path(), "prune", "masks.json");
        assert!(!masks.is_empty() && masks == masks1, "{ranks} ranks prune other units than one process");
        // Only rank 0 wrote: one run directory.
        let runs = std::fs::read_dir(dir.path().join("runs/tiny")).unwrap().count();
        assert_eq!(runs, 1, "one run directory, rank 0's");
    }
}

#[test]
fn ranks_that_run_another_pipeline_are_refused_at_the_join() {
    let dir = tempfile::tempdir().unwrap();
    let path = crate::common::tiny_pipeline(dir.path(), "");
    let results = run_ranks(dir.path(), &path, 2, 29740, &[&[], &["--set", "stages.train.lr=1e-3"]]);
    for (r, (code, err)) in results.iter().enumerate() {
        assert_ne!(*code, 0, "rank {r} ran");
        assert!(err.contains("rank 1's pipeline") && err.contains("is not rank 0's"), "rank {r}: {err}");
    }
    assert!(!dir.path().join("cache").exists() || std::fs::read_dir(dir.path().join("cache")).unwrap().all(|e| !e.unwrap().path().join("manifest.json").exists()));
}

#[test]
fn a_killed_rank_ends_the_others_with_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = crate::common::tiny_pipeline(dir.path(), "");
    let long = ["--set", "stages.train.epochs=100000"];
    let mut rank0 = spawn_rank(dir.path(), &path, 2, 0, 29750, &long);
    let mut rank1 = spawn_rank(dir.path(), &path, 2, 1, 29750, &long);
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
