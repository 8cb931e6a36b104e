//! Data parallelism: `pipeline.devices = [0, 0]` splits every batch into two shards on two
//! (CPU) devices and sums their gradients; training, scores and pruning come out as they do on
//! one device with the full batch, up to floating-point order.

use crate::common;

use crate::common::*;
use nvit::pipeline::Cache;

const STAGES: &str = r#"
[stages.scores]
kind = "hessian_scores"
input = "train"
batches = 2
batch_size = 16
shuffle = false
augment = false
"#;

/// Runs the tiny pipeline (train, evaluate, scores) in its own cache; returns the metrics of
/// train and evaluate, and the scores.
fn run(devices: &str) -> (serde_json::Value, serde_json::Value, Vec<f32>) {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache { root: dir.path().join("cache") };
    let path = tiny_pipeline(dir.path(), STAGES);
    // Odd batches (15) leave shards of 8 and 7: the shard weights must not assume equal halves.
    let p = load(&path, &[&format!("pipeline.devices={devices}"), "stages.train.batch_size=15", "stages.scores.batch_size=15"]);
    assert_eq!(p.pipeline.devices.len(), devices.matches('0').count());
    let mut pl = plan(&p, &cache);
    execute(&p, &mut pl, &cache);
    let metrics = |name: &str| cache.complete(&pl.stages.iter().find(|s| s.spec.name == name).unwrap().key).unwrap().metrics;
    let scores_dir = cache.entry_dir(&pl.stages.iter().find(|s| s.spec.name == "scores").unwrap().key);
    let scores: nvit::prune::Masks = serde_json::from_slice(&std::fs::read(scores_dir.join("scores.json")).unwrap()).unwrap();
    let flat = scores.emb.iter().flatten().chain(scores.blocks.iter().flat_map(|b| b.head.iter().chain(&b.qk).chain(&b.v).chain(&b.mlp))).copied().collect();
    (metrics("train"), metrics("evaluate"), flat)
}

#[test]
fn two_devices_train_and_score_as_one_device_with_the_full_batch() {
    let _rng = common::rng_turn();
    let (train1, eval1, scores1) = run("[0]");
    let (train2, eval2, scores2) = run("[0, 0]");
    let losses = |m: &serde_json::Value| m["epoch_losses"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect::<Vec<_>>();
    let (l1, l2) = (losses(&train1), losses(&train2));
    assert_eq!(l1.len(), 2);
    for (a, b) in l1.iter().zip(&l2) {
        assert!((a - b).abs() < 1e-4 * a.abs(), "epoch losses {l1:?} vs {l2:?}");
    }
    assert_eq!(eval1["top1"], eval2["top1"], "the same model evaluates the same");
    let scale = scores1.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let worst = scores1.iter().zip(&scores2).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(scale > 0.0 && worst < 1e-3 * scale, "scores differ by {worst} (scale {scale})");
}
