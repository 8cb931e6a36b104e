//! A Swin through every stage kind, as a pipeline: trained from scratch, evaluated, its
//! latency profiled stage by stage, scored, pruned (every stage's EMB, heads, QK, V and MLP
//! ranked together by the greedy selection, and chosen stage by stage by the exact one), fine-tuned against the dense model, evaluated and reported; and the
//! settings a Swin cannot run refused before anything runs.

use crate::common;

use crate::common::*;
use nvit::model::{checkpoint, ModelConfig};
use nvit::pipeline::Cache;
use nvit::prune::{Grid, LatencyTable, Masks, ModelLatency};

const STAGES: &str = r#"
[stages.latency]
kind = "profile_latency"
input = "train"
grid = "coarse"
batch_size = 2
warmup = 0
repeats = 1

[stages.scores]
kind = "hessian_scores"
input = "train"
batches = 2
batch_size = 8

[stages.known]
kind = "profile_latency"
input = "train"

[stages.prune]
kind = "prune"
input = "train"
latency = "known"
latency_target = 0.6
interval = 2
groups_per_step = 2
group_emb = 2
group_qk = 1
group_v = 1
group_mlp = 4
batch_size = 16
kd_weight = 1.0

[stages.distill]
kind = "distill"
teacher = "train"
epochs = 1
batch_size = 16
warmup_epochs = 0
lr = 1e-3
kd_weight = 10.0

[stages.eval_pruned]
kind = "evaluate"
batch_size = 32
throughput_batch = 8
throughput_repeats = 2

[stages.report]
kind = "report"
models = ["evaluate", "eval_pruned"]
prunes = ["prune"]

[stages.exact]
kind = "prune"
input = "train"
latency = "known"
latency_target = 0.6
selection = "exact"
prune_steps = 2
interval = 2
group_emb = 2
group_mlp = 4
batch_size = 16
kd_weight = 1.0
"#;

/// One table per stage, each a known function of the widths (a stage's blocks costing more
/// per channel the more tokens it has): measured latencies of so small a model are noise.
fn known_tables(dir: &std::path::Path) -> std::path::PathBuf {
    let table = |scale: f64, e: usize| {
        let grid = Grid { emb: vec![e / 2, e], heads: vec![1, 2], qk: vec![1, 8], v: vec![1, 8], mlp: vec![1, 32] };
        let values = grid.points().iter().map(|(e, d)| scale * 1e-6 * (*e * (d.heads * (d.qk + d.v) + d.mlp)) as f64).collect();
        LatencyTable::new(grid, values).unwrap()
    };
    let latency = ModelLatency { stages: vec![table(4.0, 8), table(1.0, 16)] };
    let path = dir.join("tables.json");
    std::fs::write(&path, serde_json::to_vec(&latency.to_json()).unwrap()).unwrap();
    path
}

#[test]
fn a_swin_runs_through_every_stage() {
    let _rng = common::rng_turn();
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache { root: dir.path().join("cache") };
    let path = swin_pipeline(dir.path(), STAGES);
    let tables = known_tables(dir.path());
    let p = load(&path, &["stages.train.epochs=1", &format!("stages.known.table=\"{}\"", tables.display())]);
    let mut pl = plan(&p, &cache);
    execute(&p, &mut pl, &cache);
    let dir_of = |name: &str| cache.entry_dir(&pl.stages.iter().find(|s| s.spec.name == name).unwrap().key);

    let dense = ModelConfig::read_json(&checkpoint::model_dir(&dir_of("train")).join("dims.json")).unwrap();
    let ModelConfig::Swin(swin) = &dense else { panic!("a Swin was trained: {dense:?}") };
    assert_eq!(swin.stages.iter().map(|s| (s.embed_dim, s.blocks.len(), s.blocks[0].heads)).collect::<Vec<_>>(), [(8, 2, 1), (16, 2, 2)]);

    // The measured table: one per stage, on grids of half and all of that stage's widths.
    let measured = ModelLatency::from_json(&dir_of("latency").join("latency.json")).unwrap();
    assert_eq!(measured.stages.iter().map(|t| t.grid.emb.clone()).collect::<Vec<_>>(), [vec![4, 8], vec![8, 16]]);
    assert!(measured.model_latency(&dense) > 0.0);
    let csv = std::fs::read_to_string(dir_of("latency").join("latency.csv")).unwrap();
    assert!(csv.starts_with("stage,emb,heads,qk,v,mlp,seconds,runtime\n0,4,1,"), "{csv}");

    // Scores for every unit, EMB per stage.
    let scores: Masks = serde_json::from_slice(&std::fs::read(dir_of("scores").join("scores.json")).unwrap()).unwrap();
    assert_eq!(scores.emb.iter().map(Vec::len).collect::<Vec<_>>(), [8, 16]);
    assert_eq!(scores.blocks.iter().map(|b| b.stage).collect::<Vec<_>>(), [0, 0, 1, 1]);
    assert!(scores.emb.iter().flatten().any(|v| *v > 0.0));

    // Pruned to the target against the known tables, compacted to the masks.
    let table = ModelLatency::from_json(&tables).unwrap();
    let masks: Masks = serde_json::from_slice(&std::fs::read(dir_of("prune").join("masks.json")).unwrap()).unwrap();
    let small = ModelConfig::read_json(&checkpoint::model_dir(&dir_of("prune")).join("dims.json")).unwrap();
    assert_eq!(small, masks.surviving(&dense), "dims.json matches the masks");
    let ratio = table.model_latency(&small) / table.model_latency(&dense);
    assert!(ratio <= 0.6 + 1e-9, "stopped at the target: {ratio}");
    assert!(small.params() < dense.params());
    let log = std::fs::read_to_string(dir_of("prune").join("pruning_log.csv")).unwrap();
    let last = log.lines().last().unwrap();
    assert!(last.contains(" | "), "a Swin's widths, stage by stage: {last}");

    // The exact selection chooses every stage's E and lands within latency_tolerance (2%).
    let exact: Masks = serde_json::from_slice(&std::fs::read(dir_of("exact").join("masks.json")).unwrap()).unwrap();
    let chosen = ModelConfig::read_json(&checkpoint::model_dir(&dir_of("exact")).join("dims.json")).unwrap();
    assert_eq!(chosen, exact.surviving(&dense), "dims.json matches the masks");
    let ratio = table.model_latency(&chosen) / table.model_latency(&dense);
    assert!((0.6 * 0.98..=0.6 + 1e-9).contains(&ratio), "exact landed at {ratio}");

    // Fine-tuned, evaluated, reported with per-stage widths.
    let tuned = ModelConfig::read_json(&checkpoint::model_dir(&dir_of("distill")).join("dims.json")).unwrap();
    assert_eq!(tuned, small);
    let metrics = cache.complete(&pl.stages.iter().find(|s| s.spec.name == "eval_pruned").unwrap().key).unwrap().metrics;
    assert_eq!(metrics["family"], "swin");
    assert!(metrics["top1"].as_f64().unwrap() >= 0.0);
    let dims = std::fs::read_to_string(dir.path().join("results/tiny/dims.csv")).unwrap();
    let rows: Vec<&str> = dims.lines().filter(|l| l.starts_with("distill,")).collect();
    assert_eq!(rows.len(), 4, "{dims}");
    let stage_widths = small.stages();
    assert!(rows[0].starts_with(&format!("distill,0,{},", stage_widths[0].0)), "{dims}");
    assert!(rows[3].starts_with(&format!("distill,3,{},", stage_widths[1].0)), "{dims}");

    // Exported as timm's files, which load back as the same Swin, and as ONNX.
    use nvit::export::{write, Format, InputSpec};
    let spec = InputSpec { mean: vec![0.5; 3], std: vec![0.5; 3], classes: None };
    let out = dir.path().join("export");
    write(&checkpoint::model_dir(&dir_of("distill")), Format::Safetensors, &spec, &out).unwrap();
    let back = checkpoint::load::<burn::backend::NdArray>(&out, &Default::default()).unwrap();
    assert_eq!(back.config(), small);
    let said = write(&checkpoint::model_dir(&dir_of("distill")), Format::Onnx, &spec, &dir.path().join("m.onnx")).unwrap();
    assert!(said.starts_with("ONNX opset 17") && dir.path().join("m.onnx").exists(), "{said}");
}

#[test]
fn settings_a_swin_cannot_run_are_refused_before_anything_runs() {
    let _rng = common::rng_turn();
    let dir = tempfile::tempdir().unwrap();
    let path = swin_pipeline(dir.path(), STAGES);
    let set = ["stages.latency.grid=\"reference\"", "model.depth=3", "model.distilled=true"];
    let overrides = nvit::config::Overrides { set: set.iter().map(|s| s.to_string()).collect(), env: false, with: vec![] };
    let e = nvit::config::load(&path, &overrides).err().unwrap().to_string();
    assert!(e.contains("stages.latency.grid: `reference` is DeiT-B's grid"), "{e}");
    assert!(e.contains("model.depth: is not a key of a Swin model"), "{e}");
    assert!(e.contains("model.distilled: a Swin has no distillation token"), "{e}");
}
