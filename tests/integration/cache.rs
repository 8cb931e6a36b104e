//! The stage cache: a changed setting re-runs exactly the stages it affects, and an
//! interrupted stage (no manifest) is re-run.

use crate::common;

use crate::common::*;
use nvit::pipeline::Cache;

#[test]
fn changing_one_setting_reruns_exactly_the_affected_stages() {
    let _rng = common::rng_turn();
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache { root: dir.path().join("cache") };
    let path = tiny_pipeline(dir.path(), "");

    let p = load(&path, &[]);
    let mut first = plan(&p, &cache);
    assert_eq!(statuses(&first), [("train".into(), "run"), ("evaluate".into(), "run")]);
    assert_eq!(reasons(&first, "train"), ["never run"]);
    execute(&p, &mut first, &cache);
    assert_eq!(statuses(&plan(&p, &cache)), [("train".into(), "cached"), ("evaluate".into(), "cached")]);

    // An evaluation setting: only evaluate runs, and it says why.
    let p = load(&path, &["stages.evaluate.batch_size=16"]);
    let pl = plan(&p, &cache);
    assert_eq!(statuses(&pl), [("train".into(), "cached"), ("evaluate".into(), "run")]);
    assert_eq!(reasons(&pl, "evaluate"), ["changed: settings.batch_size: 32 -> 16"]);

    // A training setting: train and everything downstream.
    let p = load(&path, &["stages.train.lr=0.001"]);
    let pl = plan(&p, &cache);
    assert_eq!(statuses(&pl), [("train".into(), "run"), ("evaluate".into(), "run")]);
    assert_eq!(reasons(&pl, "train"), ["changed: settings.lr: 0.002 -> 0.001"]);
    assert_eq!(reasons(&pl, "evaluate"), ["its input `train` will run (cached instead if its output comes out the same)"]);

    // How fast data is read changes nothing.
    let p = load(&path, &["dataset.workers=1", "dataset.prefetch=1"]);
    assert_eq!(statuses(&plan(&p, &cache)), [("train".into(), "cached"), ("evaluate".into(), "cached")]);

    // What the data is changes everything.
    let p = load(&path, &["dataset.classes=5"]);
    assert_eq!(statuses(&plan(&p, &cache)), [("train".into(), "run"), ("evaluate".into(), "run")]);
}

#[test]
fn a_stage_without_manifest_is_rerun_and_forcing_reruns_one_stage() {
    let _rng = common::rng_turn();
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache { root: dir.path().join("cache") };
    let path = tiny_pipeline(dir.path(), "");
    let p = load(&path, &[]);
    let mut pl = plan(&p, &cache);
    execute(&p, &mut pl, &cache);

    let eval_key = pl.stages[1].key.clone();
    std::fs::remove_file(cache.entry_dir(&eval_key).join("manifest.json")).unwrap();
    // A half-written file that a kill left (as a killed `report` would).
    let leftover = cache.entry_dir(&eval_key).join(".table.csv.tmp-123-456");
    std::fs::write(&leftover, "half").unwrap();
    let mut pl = plan(&p, &cache);
    assert_eq!(statuses(&pl), [("train".into(), "cached"), ("evaluate".into(), "run")]);
    assert!(reasons(&pl, "evaluate")[0].starts_with("interrupted earlier (no manifest)"));
    execute(&p, &mut pl, &cache);
    assert!(cache.complete(&eval_key).is_some());
    assert!(!leftover.exists(), "temporaries of a killed run are removed when the entry is rebuilt");

    // A manifest whose files are gone is a miss, not an error.
    std::fs::remove_file(cache.entry_dir(&pl.stages[0].key).join("model/model.safetensors")).unwrap();
    assert_eq!(statuses(&plan(&p, &cache))[0], ("train".into(), "run"));

    let forced = nvit::pipeline::plan(&p, &cache, &["evaluate".into()], "test-cpu").unwrap();
    assert_eq!(reasons(&forced, "evaluate"), ["forced with --force"]);
    // Forcing a stage re-runs the stages that read it only if its output changes: their keys
    // hold the digest of what it produced, known once it has run.
    let path = tiny_pipeline(dir.path(), "[stages.again]\nkind = \"evaluate\"\ninput = \"train\"\n\n[stages.r]\nkind = \"report\"\nmodels = [\"evaluate\"]\n");
    let p = load(&path, &[]);
    let forced = nvit::pipeline::plan(&p, &cache, &["evaluate".into()], "test-cpu").unwrap();
    assert_eq!(reasons(&forced, "r"), ["its input `evaluate` will run (cached instead if its output comes out the same)"]);
    assert!(forced.stages.iter().find(|s| s.spec.name == "r").unwrap().pending());
    assert!(!forced.stages.iter().find(|s| s.spec.name == "r").unwrap().forced);
    assert!(!forced.stages.iter().find(|s| s.spec.name == "again").unwrap().forced);
    let err = nvit::pipeline::plan(&p, &cache, &["evaluat".into()], "test-cpu").err().unwrap().to_string();
    assert!(err.starts_with("--force evaluat: the pipeline has no stage `evaluat`; did you mean `evaluate`?"), "{err}");
}

#[test]
fn evaluate_writes_its_row_and_training_lowers_the_loss() {
    let _rng = common::rng_turn();
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache { root: dir.path().join("cache") };
    let path = tiny_pipeline(dir.path(), "");
    let p = load(&path, &["stages.train.epochs=6", "dataset.train_size=256"]);
    let mut pl = plan(&p, &cache);
    execute(&p, &mut pl, &cache);

    let manifest = cache.complete(&pl.stages[0].key).unwrap();
    let losses: Vec<f64> = serde_json::from_value(manifest.metrics["epoch_losses"].clone()).unwrap();
    assert_eq!(losses.len(), 6);
    assert!(losses[5] < losses[0] * 0.9, "training did not lower the loss: {losses:?}");

    let csv = std::fs::read_to_string(dir.path().join("results/tiny/metrics.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(lines.next().unwrap(), "model,dataset,split,images,top1,top5,loss,params_m,gflops,images_per_s,latency_ms,batch,backend,device,pipeline,runtime");
    let row: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(&row[..4], ["train", "synthetic-4c-16px", "val", "32"]);
    let top1: f64 = row[4].parse().unwrap();
    assert!(top1 > 25.0, "a trained model beats chance (25%) on its synthetic classes: {top1}");
    assert_eq!(row[11], "8");
    assert!(row[9].parse::<f64>().unwrap() > 0.0);
    assert_eq!(&row[12..], ["flex", "test-cpu", "tiny", "flex on test-cpu"]);
    assert!(lines.next().is_none());
}

#[test]
fn a_damaged_entry_runs_again_and_an_entry_in_use_is_neither_rebuilt_nor_collected() {
    let _rng = common::rng_turn();
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache { root: dir.path().join("cache") };
    let path = tiny_pipeline(dir.path(), "");
    let p = load(&path, &[]);
    let mut pl = plan(&p, &cache);
    execute(&p, &mut pl, &cache);
    let train = pl.stages[0].key.clone();

    // Four bytes flipped in place: the same size, so still "complete", but not what train wrote.
    let weights = cache.entry_dir(&train).join("model/model.safetensors");
    let original = std::fs::read(&weights).unwrap();
    let mut bytes = original.clone();
    let n = bytes.len();
    bytes[n - 4..].iter_mut().for_each(|b| *b ^= 0xff);
    std::fs::write(&weights, &bytes).unwrap();
    assert!(cache.complete(&train).is_some());
    let err = cache.verified(&train).unwrap_err().to_string();
    assert!(err.contains("model.safetensors") && err.contains("SHA-256"), "{err}");
    let mut pl = plan(&p, &cache);
    let records = execute(&p, &mut pl, &cache);
    assert_eq!((records[0].status.as_str(), records[1].status.as_str()), ("ran", "cached"), "train rebuilt to the same bytes, so evaluate stays");
    assert_eq!(std::fs::read(&weights).unwrap(), original);

    // A runner reading the entry holds it shared: `cache gc` skips it, and a rebuild waits.
    let hold = cache.share(&train, |_| {}).unwrap();
    let removed = cache.gc(&Default::default(), std::time::Duration::ZERO, false).unwrap();
    assert!(removed.iter().all(|e| e.key != train) && cache.verified(&train).unwrap().is_some(), "gc removed an entry in use");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| {
            let (_lock, found) = cache.lock(&train, |_| {}, || None::<()>).unwrap();
            tx.send(found.is_none()).unwrap();
        });
        assert!(rx.recv_timeout(std::time::Duration::from_millis(300)).is_err(), "the rebuild took the entry from its reader");
        drop(hold);
        assert!(rx.recv_timeout(std::time::Duration::from_secs(30)).unwrap(), "the rebuild goes on once the reader is done");
    });
    assert!(cache.gc(&Default::default(), std::time::Duration::ZERO, false).unwrap().iter().any(|e| e.key == train), "unused, it is collected");
}

/// The audit's race: a plain run, one forcing a stage and one forcing train, at once on one warm
/// cache (1 in 4 tries failed when `--force` removed an entry another runner was reading).
#[test]
fn three_runners_at_once_on_one_warm_cache_forcing_stages_all_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_pipeline(dir.path(), "");
    let run = |extra: &[&str]| runner(dir.path()).args(["run", path.to_str().unwrap()]).args(extra).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let out = run(&[]).wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for _ in 0..2 {
        let children = [run(&[]), run(&["--force", "evaluate"]), run(&["--force", "train"])];
        for child in children {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
    }
}
