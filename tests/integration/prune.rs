//! The NViT stages that exist so far: latency profiling and unit scores, run as a pipeline.

use crate::common;

use crate::common::*;
use nvit::model::checkpoint;
use nvit::pipeline::Cache;
use nvit::prune::{LatencyTable, ModelLatency};

const STAGES: &str = r#"
[stages.latency]
kind = "profile_latency"
input = "train"
batch_size = 4
warmup = 0
repeats = 1

[stages.scores]
kind = "hessian_scores"
input = "train"
batches = 3
batch_size = 8
shuffle = false
augment = false
"#;

#[test]
fn latency_table_and_scores_from_a_pipeline() {
    let _rng = common::rng_turn();
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache { root: dir.path().join("cache") };
    let path = tiny_pipeline(dir.path(), STAGES);
    let p = load(&path, &["stages.train.epochs=1"]);
    let mut pl = plan(&p, &cache);
    assert_eq!(statuses(&pl).iter().map(|s| s.0.as_str()).collect::<Vec<_>>(), ["train", "evaluate", "latency", "scores"]);
    execute(&p, &mut pl, &cache);

    let model_dir = checkpoint::model_dir(&cache.entry_dir(&pl.stages[0].key));
    let config = nvit::model::ModelConfig::read_json(&model_dir.join("dims.json")).unwrap().as_deit().unwrap().clone();

    // The spanning grid of a 16-wide, 2-head model; the dense estimate is the sum of its blocks.
    let latency_dir = cache.entry_dir(&pl.stages[2].key);
    let latency = ModelLatency::from_json(&latency_dir.join("latency.json")).unwrap();
    let table = &latency.stages[0];
    assert_eq!(table.grid.emb, [4, 8, 16]);
    assert_eq!(table.grid.heads, [1, 2]);
    let csv = std::fs::read_to_string(latency_dir.join("latency.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + table.grid.points().len());
    let dense = latency.model_latency(&config.into());
    assert!(dense > 0.0);
    let manifest = cache.complete(&pl.stages[2].key).unwrap();
    assert_eq!(manifest.metrics["model_latency_s"].as_f64().unwrap(), dense);

    // One row per unit; with shuffle and augmentation off, scoring is deterministic.
    let scores_dir = cache.entry_dir(&pl.stages[3].key);
    let scores = std::fs::read_to_string(scores_dir.join("scores.csv")).unwrap();
    let units = 16 + 2 * (2 + 8 + 8 + 32);
    assert_eq!(scores.lines().count(), 1 + units, "{scores}");
    assert_eq!(scores.lines().next().unwrap(), "structure,block,unit,score");
    assert!(scores.lines().nth(1).unwrap().starts_with("emb,,0,"));
    assert!(scores.contains("\nmlp,1,31,"));
    let values: Vec<f64> = scores.lines().skip(1).map(|l| l.rsplit(',').next().unwrap().parse().unwrap()).collect();
    assert!(values.iter().all(|v| *v >= 0.0) && values.iter().any(|v| *v > 0.0), "squared saliencies");

    let mut again = nvit::pipeline::plan(&p, &cache, &["scores".into()], "test-cpu").unwrap();
    execute(&p, &mut again, &cache);
    assert_eq!(std::fs::read_to_string(scores_dir.join("scores.csv")).unwrap(), scores);
}

#[test]
fn imported_table_is_keyed_by_its_file_and_bad_grids_are_rejected() {
    let _rng = common::rng_turn();
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_pipeline(dir.path(), STAGES);
    let e = nvit::config::load(
        &path,
        &nvit::config::Overrides { set: vec!["stages.latency.grid_qk=[8, 4]".into(), "stages.latency.table=\"/no/lat.json\"".into()], env: false, with: vec![] },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("stages.latency.grid_qk: must be positive, strictly increasing and at most 65536, got [8, 4]"), "{e}");
    assert!(e.contains("stages.latency.table: `/no/lat.json` does not exist"), "{e}");
}

/// A latency table that is a known function of the widths, written into `dir`: measured
/// latencies of so small a block are mostly overhead and noise.
fn known_table(dir: &std::path::Path) -> std::path::PathBuf {
    let grid = nvit::prune::Grid { emb: vec![4, 16], heads: vec![1, 2], qk: vec![1, 8], v: vec![1, 8], mlp: vec![1, 32] };
    let values = grid.points().iter().map(|(e, d)| 1e-6 * (*e * (d.heads * (d.qk + d.v) + d.mlp)) as f64).collect();
    let table = dir.join("table.json");
    std::fs::write(&table, serde_json::to_vec(&LatencyTable::new(grid, values).unwrap().to_json()).unwrap()).unwrap();
    table
}

/// The tiny pipeline's train, the known latency table and a prune stage with `settings` (lines
/// of its table) and small groups, run; the prune stage's `pruning_log.csv`.
fn prune_log(dir: &std::path::Path, settings: &str) -> String {
    std::fs::read_to_string(prune_entry(dir, settings).join("pruning_log.csv")).unwrap()
}

/// [`prune_log`]'s run; the prune stage's cache entry.
fn prune_entry(dir: &std::path::Path, settings: &str) -> std::path::PathBuf {
    let cache = Cache { root: dir.join("cache") };
    let stages = format!(
        "{STAGES}\n[stages.prune]\nkind = \"prune\"\ninput = \"train\"\nlatency = \"latency\"\n{settings}interval = 2\ngroup_emb = 4\ngroup_qk = 2\ngroup_v = 2\ngroup_mlp = 4\nbatch_size = 16\nkd_weight = 1.0\n"
    );
    let path = tiny_pipeline(dir, &stages);
    let table = known_table(dir);
    let p = load(&path, &["stages.train.epochs=1", &format!("stages.latency.table=\"{}\"", table.display())]);
    let mut pl = plan(&p, &cache);
    execute(&p, &mut pl, &cache);
    cache.entry_dir(&pl.stages.iter().find(|s| s.spec.name == "prune").unwrap().key)
}

/// The estimated latency, as a fraction of dense, after each pruning step of a log.
fn latency_ratios(log: &str) -> Vec<f64> {
    log.lines().skip(1).map(|l| l.split(',').nth(3).unwrap().parse().unwrap()).collect()
}

#[test]
fn prune_stops_at_the_latency_target_and_compacts_to_the_masks() {
    let _rng = common::rng_turn();
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache { root: dir.path().join("cache") };
    let stages = format!(
        "{STAGES}\n[stages.prune]\nkind = \"prune\"\ninput = \"train\"\nlatency = \"latency\"\nlatency_target = 0.6\ninterval = 2\ngroups_per_step = 2\ngroup_emb = 4\ngroup_qk = 2\ngroup_v = 2\ngroup_mlp = 4\nbatch_size = 16\nkd_weight = 1.0\n\n[stages.distill]\nkind = \"distill\"\nteacher = \"train\"\nepochs = 2\nbatch_size = 16\nwarmup_epochs = 0\nlr = 1e-3\nrandaugment_ops = 2\nkd_weight = 10.0\n\n[stages.eval_pruned]\nkind = \"evaluate\"\nbatch_size = 32\nthroughput_batch = 8\nthroughput_repeats = 2\n\n[stages.report]\nkind = \"report\"\nmodels = [\"evaluate\", \"eval_pruned\"]\nprunes = [\"prune\"]\n"
    );
    let path = tiny_pipeline(dir.path(), &stages);
    let table = known_table(dir.path());
    let p = load(&path, &["stages.train.epochs=1", &format!("stages.latency.table=\"{}\"", table.display())]);
    let mut pl = plan(&p, &cache);
    let prune = pl.stages.iter().find(|s| s.spec.name == "prune").unwrap();
    assert_eq!(prune.key_input.inputs.iter().map(|i| i.0.as_str()).collect::<Vec<_>>(), ["train", "latency"]);
    execute(&p, &mut pl, &cache);

    let dir_of = |name: &str| cache.entry_dir(&pl.stages.iter().find(|s| s.spec.name == name).unwrap().key);
    let log = std::fs::read_to_string(dir_of("prune").join("pruning_log.csv")).unwrap();
    assert_eq!(std::fs::read_to_string(dir.path().join("results/tiny/pruning_log_prune.csv")).unwrap(), log, "published");
    let ratios = latency_ratios(&log);
    assert!(ratios.len() >= 2, "{log}");
    assert!(*ratios.last().unwrap() <= 0.6, "stopped at the target: {log}");
    assert!(*ratios.last().unwrap() >= 0.6 * 0.98, "within latency_tolerance (2%) under it: {log}");
    assert!(ratios[..ratios.len() - 1].iter().all(|r| *r > 0.6), "and not later: {log}");
    assert!(ratios.windows(2).all(|w| w[1] <= w[0]), "latency only falls: {log}");

    let masks: nvit::prune::Masks = serde_json::from_slice(&std::fs::read(dir_of("prune").join("masks.json")).unwrap()).unwrap();
    let small = nvit::model::ModelConfig::read_json(&checkpoint::model_dir(&dir_of("prune")).join("dims.json")).unwrap().as_deit().unwrap().clone();
    assert_eq!(masks.surviving_dims(), [(small.embed_dim, small.blocks.clone())], "dims.json matches the masks");
    let dense = nvit::model::ModelConfig::read_json(&checkpoint::model_dir(&dir_of("train")).join("dims.json")).unwrap().as_deit().unwrap().clone();
    assert!(small.flops() < dense.flops());
    assert_eq!(small.head_dim, dense.head_dim);

    // distill fine-tunes the compact model (its input) against the dense one (its teacher),
    // with the whole DeiT recipe on: the widths stay, the weights move, the loss stays finite.
    let distill = pl.stages.iter().find(|s| s.spec.name == "distill").unwrap();
    assert_eq!(distill.key_input.inputs.iter().map(|i| i.0.as_str()).collect::<Vec<_>>(), ["prune", "train"]);
    let tuned = nvit::model::ModelConfig::read_json(&checkpoint::model_dir(&dir_of("distill")).join("dims.json")).unwrap().as_deit().unwrap().clone();
    assert_eq!((tuned.embed_dim, tuned.blocks.clone()), (small.embed_dim, small.blocks.clone()));
    let weights = |name: &str| std::fs::read(checkpoint::model_dir(&dir_of(name)).join("model.safetensors")).unwrap();
    assert_ne!(weights("distill"), weights("prune"));
    let manifest = cache.complete(&distill.key).unwrap();
    let losses = manifest.metrics["epoch_losses"].as_array().unwrap();
    assert!(losses.len() == 2 && losses.iter().all(|l| l.as_f64().unwrap().is_finite()), "{losses:?}");

    let csv = std::fs::read_to_string(dir.path().join("results/tiny/metrics.csv")).unwrap();
    assert!(csv.lines().any(|l| l.starts_with("distill,")), "the evaluated model is the distilled one: {csv}");
    assert!(csv.lines().skip(1).all(|l| l.ends_with(",tiny,flex on test-cpu")), "rows name the pipeline that published them and where they were timed: {csv}");

    // The report: both measured models (speedup over the first) above the paper's rows, the
    // widths of each, and the figures, all in results/tiny/.
    let results = dir.path().join("results/tiny");
    let mut reader = csv::Reader::from_path(results.join("table.csv")).unwrap();
    let rows: Vec<nvit::report::table::Row> = reader.deserialize().map(Result::unwrap).collect();
    assert_eq!(rows.iter().map(|r| (r.source.as_str(), r.model.as_str())).take(3).collect::<Vec<_>>(), [("measured", "train"), ("measured", "distill"), ("paper", "DeiT-B")]);
    assert_eq!(rows[0].speedup, Some(1.0));
    assert_eq!(rows[1].latency_target, Some(0.6));
    assert_eq!(rows[1].params_m, (tuned.params() as f64 / 1e6 * 1e3).round() / 1e3);
    assert_eq!(rows.iter().filter(|r| r.source == "paper").count(), 7);
    let dims = std::fs::read_to_string(results.join("dims.csv")).unwrap();
    assert_eq!(dims.lines().next().unwrap(), "model,block,embed_dim,heads,qk,v,mlp");
    let d = &tuned.blocks[1];
    assert!(dims.contains(&format!("\ndistill,1,{},{},{},{},{}\n", tuned.embed_dim, d.heads, d.qk, d.v, d.mlp)), "{dims}");
    for file in ["accuracy.svg", "widths.svg", "trajectory.svg", "README.md"] {
        assert!(results.join(file).exists(), "{file}");
    }
    assert!(std::fs::read_to_string(results.join("README.md")).unwrap().contains("![per-block widths](widths.svg)"));
}

/// `selection = "exact"`: the budget falls from the dense latency to the target in
/// `prune_steps` steps, every step's widths fit its budget, and the stage ends at the target.
#[test]
fn exact_selection_meets_each_steps_budget_and_ends_at_the_target() {
    let _rng = common::rng_turn();
    let dir = tempfile::tempdir().unwrap();
    let log = prune_log(dir.path(), "latency_target = 0.5\nselection = \"exact\"\nprune_steps = 3\n");
    let ratios = latency_ratios(&log);
    assert_eq!(ratios.len(), 3, "{log}");
    for (k, r) in ratios.iter().enumerate() {
        let budget = 1.0 - (k + 1) as f64 / 3.0 * 0.5;
        assert!(*r <= budget + 1e-5 && *r > budget - 0.1, "step {}: {r} against a budget of {budget}: {log}", k + 1);
    }
    assert!(ratios[2] >= 0.5 * 0.98, "the last step lands within latency_tolerance (2%) under the target: {log}");

    let bad = tiny_pipeline(dir.path(), &format!("{STAGES}\n[stages.prune]\nkind = \"prune\"\ninput = \"train\"\nlatency = \"latency\"\nselection = \"exact\"\nallocation = \"uniform\"\n"));
    let err = nvit::config::load(&bad, &Default::default()).err().unwrap().to_string();
    assert!(err.contains("stages.prune.selection") && err.contains("cannot be combined with allocation = \"uniform\""), "{err}");
}

/// Kept saliency: the scores of the units `masks` keeps, summed.
fn kept(scores: &nvit::prune::Masks, masks: &nvit::prune::Masks) -> f64 {
    masks.slots().into_iter().map(|(s, b)| scores.get(s, b).iter().zip(masks.get(s, b)).map(|(v, m)| (v * m) as f64).sum::<f64>()).sum()
}

/// The exact selection is the optimum the greedy one approximates: pruned by NViT's greedy
/// ranking down to half the latency, with or without the latency credit, a model keeps no more
/// saliency than the exact selection keeps at the latency greedy reached (plus the exact
/// selection's rounding slack, one budget step per block of 10,000).
#[test]
fn exact_keeps_at_least_the_saliency_greedy_keeps_at_the_same_latency() {
    let _rng = common::rng_turn();
    use nvit::prune::{exact, greedy, Masks, Structure};
    let dir = tempfile::tempdir().unwrap();
    let model_latency = ModelLatency::from_json(&known_table(dir.path())).unwrap();
    let vit = nvit::model::VitConfig::uniform(16, 4, 3, 16, 3, 2, 2.0, 5, false);
    let config: nvit::model::ModelConfig = vit.clone().into();
    let group = |s: Structure| match s {
        Structure::Emb => 4,
        Structure::Head => 1,
        Structure::Mlp => 8,
        _ => 2,
    };
    let latency = |m: &Masks| model_latency.model_latency(&m.surviving(&config));
    let dense = latency(&Masks::ones(&config));
    let bins = 10_000;
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    for seed in 0..6 {
        let mut scores = Masks::filled(&config, 0.0);
        for (s, b) in scores.slots() {
            for v in scores.get_mut(s, b) {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                *v = (state >> 40) as f32 / (1u64 << 24) as f32;
            }
        }
        let eta = if seed % 2 == 0 { 0.0 } else { 1e4 };
        let mut masks = Masks::ones(&config);
        while latency(&masks) > 0.5 * dense {
            let ranked = greedy::groups(&scores, &masks, &model_latency, eta, group);
            let unbounded = greedy::Landing { target: 0.0, tolerance: 0.0, ratio: &|_| 1.0 };
            assert!(greedy::prune_lowest(&ranked, &mut masks, 2, 4, &unbounded) > 0, "seed {seed}: greedy ran out of groups");
        }
        let reached = latency(&masks);
        let budget = reached / (1.0 - vit.blocks.len() as f64 / bins as f64);
        let best = exact::select(&scores, &Masks::ones(&config), &model_latency, budget, 0.0, group, bins).unwrap();
        assert!(latency(&best) <= budget * (1.0 + 1e-12), "seed {seed}: over the budget");
        assert!(kept(&scores, &best) >= kept(&scores, &masks) - 1e-9, "seed {seed}, eta {eta}: exact {} < greedy {}", kept(&scores, &best), kept(&scores, &masks));
    }
}

/// `ranking = "isomorphic"`: the stage prunes every structure type by the same fraction per
/// step, stops at the target, and refuses the settings it cannot be combined with.
#[test]
fn isomorphic_ranking_ends_at_the_target_and_is_refused_with_exact_or_uniform() {
    let _rng = common::rng_turn();
    let dir = tempfile::tempdir().unwrap();
    let log = prune_log(dir.path(), "latency_target = 0.5\nranking = \"isomorphic\"\nisomorphic_step = 0.1\n");
    let ratios = latency_ratios(&log);
    assert!(ratios.len() >= 2 && *ratios.last().unwrap() <= 0.5 && ratios[..ratios.len() - 1].iter().all(|r| *r > 0.5), "{log}");
    assert!(*ratios.last().unwrap() >= 0.5 * 0.98, "within latency_tolerance under the target: {log}");
    // Each type keeps 0.9^k of its units after k steps, to the nearest group: EMB (groups of 4
    // of 16 channels) keeps 16 at step 1 (target 14.4) and loses a group at step 2 (12.96).
    let emb: Vec<&str> = log.lines().skip(1).map(|l| l.split(',').nth(7).unwrap()).collect();
    assert_eq!(emb[..2], ["16", "12"], "{log}");

    for other in ["selection = \"exact\"", "allocation = \"uniform\""] {
        let bad = tiny_pipeline(dir.path(), &format!("{STAGES}\n[stages.prune]\nkind = \"prune\"\ninput = \"train\"\nlatency = \"latency\"\nranking = \"isomorphic\"\n{other}\n"));
        let err = nvit::config::load(&bad, &Default::default()).err().unwrap().to_string();
        assert!(err.contains("stages.prune.ranking") && err.contains(&format!("cannot be combined with {other}")), "{err}");
    }
}

/// `stop_on = "measured"`: prune times the compact model against the dense one in pairs on
/// the way down (halfway to the target first) and stops on the measured ratio, not the
/// estimate; each measurement is in `latency_measured.csv` and the last in the metrics.
#[test]
fn stop_on_measured_times_the_compact_model_and_stops_on_what_it_measured() {
    let _rng = common::rng_turn();
    let dir = tempfile::tempdir().unwrap();
    let entry = prune_entry(dir.path(), "latency_target = 0.5\nstop_on = \"measured\"\nmeasure_batch = 4\nmeasure_pairs = 3\nmax_prune_steps = 60\n");
    let log = std::fs::read_to_string(entry.join("latency_measured.csv")).unwrap();
    // Eight numbers, then the runtime they were timed on.
    let rows: Vec<Vec<f64>> = log.lines().skip(1).map(|l| l.split(',').take(8).map(|x| x.parse().unwrap()).collect()).collect();
    assert!(!rows.is_empty(), "{log}");
    assert!(log.lines().skip(1).all(|l| l.ends_with(" on test-cpu")), "{log}");
    // The first measurement comes once the estimate is halfway down: at most 0.75 of dense.
    assert!(rows[0][2] <= 0.75 + 1e-9 && rows[0][2] > 0.5, "{log}");
    for r in &rows {
        assert!(r[4] <= r[3] && r[3] <= r[5] && r[6] == 3.0, "median within min-max over 3 pairs: {log}");
        // Relative: the CSV rounds each ratio to 5 decimals, and a small estimate makes a large
        // correction.
        assert!((r[7] - r[3] / r[2]).abs() < 1e-3 * r[7], "the correction is measured over estimated: {log}");
    }
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(entry.join("manifest.json")).unwrap()).unwrap();
    let m = &manifest["metrics"];
    assert_eq!(m["stop_on"], "measured");
    assert!(m["latency_measured_runtime"].as_str().unwrap().ends_with(" on test-cpu"), "{m}");
    let last = m["latency_measured"].as_f64().unwrap();
    assert!((last - rows.last().unwrap()[3]).abs() < 1e-4, "{m}");
    assert_eq!(m["target_reached"].as_bool().unwrap(), last <= 0.5 * (1.0 + 1e-9), "reached means measured at or under the target: {m}");
}
