//! The paper's pipelines run end to end at full DeiT-B width, DeiT III-S's and Swin-S's at
//! their full widths, with neither ImageNet nor a checkpoint, through `--with pipelines/smoke.toml`
//! (synthetic images, random weights, a few steps per stage): every stage of the full-size
//! graph runs and the report is written.

use std::path::Path;
use std::process::Command;

/// What a smoke run's report must show of its dense model.
struct Dense {
    params_m: f64,
    blocks: usize,
    paper: bool,
}

const DEIT_B: Dense = Dense { params_m: 86.0, blocks: 12, paper: true };

/// Runs `pipeline` with the smoke layer in `dir` (its cache there too), checks its report, and
/// returns the run's log.
fn smoke_run(dir: &Path, pipeline: &str, target: f64, model_id: &str, set: &[&str], dense: &Dense) -> String {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(env!("CARGO_BIN_EXE_runner"))
        .env("RUNNER_CACHE", dir.join("cache"))
        .env_remove("RUNNER_IMAGENET")
        .current_dir(dir)
        .arg("run")
        .arg(repo.join("pipelines").join(pipeline))
        .arg("--with")
        .arg(repo.join("pipelines/smoke.toml"))
        .args(set.iter().flat_map(|s| ["--set", s]))
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{pipeline}: {log}");

    let name = pipeline.trim_end_matches(".toml");
    let results = dir.join("target/smoke/results").join(name);
    let mut reader = csv::Reader::from_path(results.join("table.csv")).unwrap();
    let rows: Vec<nvit::report::table::Row> = reader.deserialize().map(Result::unwrap).collect();
    let measured: Vec<_> = rows.iter().filter(|r| r.source == "measured").collect();
    assert_eq!(measured.len(), 2, "{pipeline}");
    assert_eq!(measured[1].model, model_id);
    assert_eq!(measured[1].latency_target, Some(target));
    assert_eq!((measured[0].resolution, measured[0].params_m.round()), (224, dense.params_m), "{pipeline}: the dense model's full width, 10-class head");
    assert!(measured[1].params_m < measured[0].params_m, "pruned: {:?}", measured[1]);
    // The speedup over the dense model (the evaluate stage's `baseline`), timed in pairs.
    let m = measured[1];
    assert_eq!(m.speedup_pairs, Some(1), "{pipeline}: {m:?}");
    assert!(m.speedup_min <= m.speedup && m.speedup <= m.speedup_max && m.speedup.unwrap() > 0.0, "{pipeline}: {m:?}");
    assert_eq!(rows.iter().any(|r| r.source == "paper" && r.model == model_id), dense.paper);
    let dims = std::fs::read_to_string(results.join("dims.csv")).unwrap();
    assert_eq!(dims.lines().filter(|l| l.starts_with(&format!("{model_id},"))).count(), dense.blocks, "{dims}");
    assert!(results.join("widths.svg").exists() && results.join("trajectory.svg").exists());
    let log_csv = std::fs::read_to_string(results.join("pruning_log_prune.csv")).unwrap();
    assert_eq!(log_csv.lines().count(), 1 + 2, "two pruning steps, the smoke cap: {log_csv}");
    log.into_owned()
}

/// Removes the cache entries of `stages` (a full-width model is 330 MB; each pipeline's own
/// prune and distill entries are not read again).
fn remove_entries(cache: &Path, stages: &[&str]) {
    for entry in std::fs::read_dir(cache).unwrap().map(|e| e.unwrap().path()) {
        let manifest = std::fs::read_to_string(entry.join("manifest.json")).unwrap_or_default();
        let stage = serde_json::from_str::<serde_json::Value>(&manifest).ok().and_then(|m| m["stage"].as_str().map(String::from));
        if stage.is_some_and(|s| stages.contains(&s.as_str())) {
            std::fs::remove_dir_all(&entry).unwrap();
        }
    }
}

/// One after another in one cache, as a user runs them: the four share `nvit-common.toml`'s
/// dense model, its evaluation and its latency table, built by the first and cached for the
/// others. Two run with issue 15's selections in place of NViT's: isomorphic ranking, and
/// exact selection (its dynamic program at full DeiT-B width).
#[test]
fn nvit_pipelines_run_end_to_end_at_full_width() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (pipeline, target, model_id, set)) in [
        ("nvit-base.toml", 0.54, "NViT-B", &[][..]),
        ("nvit-hybrid.toml", 0.50, "NViT-H", &["stages.prune.ranking=\"isomorphic\""][..]),
        ("nvit-small.toml", 0.39, "NViT-S", &[][..]),
        ("nvit-tiny.toml", 0.19, "NViT-T", &["stages.prune.selection=\"exact\""][..]),
    ]
    .into_iter()
    .enumerate()
    {
        let log = smoke_run(dir.path(), pipeline, target, model_id, set, &DEIT_B);
        for shared in ["dense", "evaluate_dense", "latency"] {
            let cached = log.lines().any(|l| l.contains(&format!(" {shared}: cached (")));
            assert_eq!(cached, i > 0, "{pipeline}: `{shared}` {} cached\n{log}", if i > 0 { "not" } else { "already" });
        }
        remove_entries(&dir.path().join("cache"), &["prune", "distill"]);
    }
}

/// DeiT III-S (LayerScale, positions over the patches only), timm's preset at full width.
#[test]
fn nvit_deit3_pipeline_runs_end_to_end_at_full_width() {
    let dir = tempfile::tempdir().unwrap();
    smoke_run(dir.path(), "nvit-deit3-small.toml", 0.5, "NViT-DeiT3-S", &[], &Dense { params_m: 22.0, blocks: 12, paper: false });
}

/// Swin-S (24 blocks in four stages, 48.8 M parameters with a 10-class head), its latency
/// profiled per stage.
#[test]
fn nvit_swin_pipeline_runs_end_to_end_at_full_width() {
    let dir = tempfile::tempdir().unwrap();
    smoke_run(dir.path(), "nvit-swin-small.toml", 0.5, "NViT-Swin-S", &[], &Dense { params_m: 49.0, blocks: 24, paper: false });
}
