//! Every key the runner reads, given a bad value, is refused when the pipeline is read (before
//! anything runs) with an error naming the key. The table below has a row for each key of each
//! section and stage kind: a key added without a row, or without validation, fails
//! `every_key_has_a_bad_value_that_is_refused_by_name`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use nvit::config::{load, Overrides, PipelineSection};
use nvit::data::DatasetConfig;
use nvit::model::ModelSection;
use nvit::stages::StageKind;
use nvit::suggest::struct_fields;

/// A pipeline with one stage of every kind; `FILE` is an existing file (not a folder).
fn base(dir: &Path) -> PathBuf {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/timm_deit_tiny_distilled_32px/model.safetensors");
    let text = format!(
        r#"
[pipeline]
name = "bad-inputs"
results_dir = "{d}/results"
runs_dir = "{d}/runs"

[dataset]
kind = "synthetic"
classes = 4
train_size = 8
val_size = 8
synthetic_size = 16

[model]
image_size = 16
patch_size = 4
embed_dim = 16
heads = 2
mlp_ratio = 2.0

[stages.load]
kind = "load_pretrained"
path = "{fixture}"

[stages.train]
kind = "train"
input = "load"
epochs = 1
batch_size = 4

[stages.latency]
kind = "profile_latency"
input = "train"

[stages.scores]
kind = "hessian_scores"
input = "train"

[stages.prune]
kind = "prune"
input = "train"
latency = "latency"

[stages.distill]
kind = "distill"
input = "prune"
teacher = "train"

[stages.evaluate]
kind = "evaluate"
input = "distill"

[stages.report]
kind = "report"
models = ["evaluate"]
prunes = ["prune"]
"#,
        d = dir.display(),
        fixture = fixture.display()
    );
    let path = dir.join("bad-inputs.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `(key, --set items separated by "; ", words the error on that key must hold)`. `FILE` stands
/// for an existing file. Rows of `stages.train` are also run for `stages.distill`, which takes
/// the same keys.
const ROWS: &[(&str, &str, &str)] = &[
    ("pipeline.name", r#"pipeline.name="../../escaped""#, "folder name"),
    ("pipeline.backend", r#"pipeline.backend="tpu""#, "tpu"),
    ("pipeline.devices", "pipeline.devices=[]", "is empty"),
    ("pipeline.seed", "pipeline.seed=-1", "-1"),
    ("pipeline.results_dir", r#"pipeline.results_dir="FILE""#, "is a file"),
    ("pipeline.runs_dir", r#"pipeline.runs_dir="FILE""#, "is a file"),
    ("dataset.kind", r#"dataset.kind="tfrecord""#, "tfrecord"),
    ("dataset.root", r#"dataset.kind="idx"; dataset.root="/nonexistent/data""#, "does not exist"),
    ("dataset.limit_per_class", "dataset.limit_per_class=0", "at least 1"),
    ("dataset.subset", "dataset.subset=0", "at least 1"),
    ("dataset.mean", "dataset.mean=[nan]", "finite"),
    ("dataset.std", "dataset.std=[0.0]", "positive"),
    ("dataset.crop_scale", "dataset.crop_scale=[0.5, 0.2]", "min <= max"),
    ("dataset.hflip", r#"dataset.hflip="yes""#, "invalid type"),
    ("dataset.eval_crop_pct", "dataset.eval_crop_pct=1e-4", "[0.25, 1]"),
    ("dataset.on_bad_image", r#"dataset.on_bad_image="ignore""#, "ignore"),
    ("dataset.workers", "dataset.workers=100000", "at most 256"),
    ("dataset.prefetch", "dataset.prefetch=1000000000000", "from 1 to 64"),
    ("dataset.classes", "dataset.classes=1000000000", "from 2 to"),
    ("dataset.train_size", "dataset.train_size=0", "from 1 to"),
    ("dataset.val_size", "dataset.val_size=100000000000", "from 1 to"),
    ("dataset.synthetic_size", "dataset.synthetic_size=0", "from 1 to"),
    ("model.family", r#"model.family="resnet""#, "resnet"),
    ("model.preset", r#"model.preset="deit-huge""#, "unknown preset"),
    ("model.image_size", "model.image_size=0", "from 1 to"),
    ("model.patch_size", "model.patch_size=0", "from 1 to"),
    ("model.in_chans", "model.in_chans=0", "from 1 to"),
    ("model.embed_dim", "model.embed_dim=10000000", "from 1 to"),
    ("model.depth", "model.depth=0", "from 1 to"),
    ("model.heads", "model.heads=0", "from 1 to"),
    ("model.depths", r#"model.family="swin"; model.depths=[]"#, "stages of 1 to"),
    ("model.window", r#"model.family="swin"; model.window=0"#, "from 1 to"),
    ("model.mlp_ratio", "model.mlp_ratio=nan", "(0, 64]"),
    ("model.num_classes", "model.num_classes=0", "from 1 to"),
    ("model.distilled", r#"model.distilled="yes""#, "invalid type"),
    ("model.drop_path", "model.drop_path=1.5", "[0, 1)"),
    ("model.dims", r#"model.dims="/nonexistent/dims.json""#, "does not exist"),
    // The audit's reads without end and without a writer: refused before they are opened.
    ("model.dims", r#"model.dims="/dev/zero""#, "is a device, not a regular file"),
    ("model.dims", r#"model.dims="FIFO""#, "is a FIFO, not a regular file"),
    ("model.init", r#"model.init="zeros""#, "zeros"),
    ("model.redistribute", r#"model.redistribute="yes""#, "invalid type"),
    ("model.class_token", r#"model.class_token="no""#, "invalid type"),
    ("model.reg_tokens", "model.reg_tokens=100000", "from 0 to 256"),
    ("model.init_values", "model.init_values=-1.0", "positive number"),
    ("model.qkv_bias", "model.qkv_bias=2", "invalid type"),
    ("model.global_pool", r#"model.global_pool="max""#, "max"),
    ("model.fc_norm", r#"model.fc_norm="on""#, "invalid type"),
    ("model.no_embed_class", "model.no_embed_class=1", "invalid type"),
    ("stages.*.kind", r#"stages.evaluate.kind="nope""#, "nope"),
    ("stages.*.input", r#"stages.evaluate.input="nope""#, "names no stage"),
    ("stages.*.seed", "stages.train.seed=-1", "-1"),
    ("stages.load.path", r#"stages.load.path="/nonexistent/model.pth""#, "does not exist"),
    ("stages.load.path", r#"stages.load.path="FIFO""#, "is a FIFO, not a regular file"),
    ("stages.load.path", r#"stages.load.path="ZERO_LINK""#, "is a device, not a regular file"),
    ("stages.train.epochs", "stages.train.epochs=0", "from 1 to"),
    ("stages.train.batch_size", "stages.train.batch_size=100000000", "from 1 to"),
    ("stages.train.lr", "stages.train.lr=-1.0", "positive"),
    ("stages.train.min_lr", "stages.train.min_lr=-1.0", "must be in [0, lr"),
    ("stages.train.warmup_epochs", "stages.train.warmup_epochs=inf", "finite"),
    ("stages.train.weight_decay", "stages.train.weight_decay=inf", "finite"),
    ("stages.train.label_smoothing", "stages.train.label_smoothing=1.0", "[0, 1)"),
    ("stages.train.grad_clip", "stages.train.grad_clip=0.0", "positive"),
    ("stages.train.steps_per_epoch", "stages.train.steps_per_epoch=0", "from 1 to"),
    ("stages.train.eval_every", "stages.train.eval_every=0", "from 1 to"),
    ("stages.train.augment", r#"stages.train.augment="yes""#, "invalid type"),
    ("stages.train.randaugment_ops", "stages.train.randaugment_ops=1000000", "from 0 to 16"),
    ("stages.train.randaugment_magnitude", "stages.train.randaugment_magnitude=nan", "[0, 10]"),
    ("stages.train.random_erasing", "stages.train.random_erasing=2.0", "[0, 1]"),
    ("stages.train.mixup", "stages.train.mixup=-1.0", "not negative"),
    ("stages.train.cutmix", "stages.train.cutmix=nan", "finite"),
    ("stages.train.drop_path", "stages.train.drop_path=1.0", "[0, 1)"),
    ("stages.train.precision", r#"stages.train.precision="fp8""#, "fp8"),
    ("stages.train.teacher", r#"stages.train.teacher="nope""#, "names no stage"),
    ("stages.train.kd_weight", "stages.train.kd_weight=-1.0", "not negative"),
    ("stages.train.temperature", "stages.train.temperature=0.0", "positive"),
    ("stages.latency.grid", r#"stages.latency.grid="fine""#, "fine"),
    ("stages.latency.grid_emb", "stages.latency.grid_emb=[0]", "strictly increasing"),
    ("stages.latency.grid_heads", "stages.latency.grid_heads=[2, 1]", "strictly increasing"),
    ("stages.latency.grid_qk", "stages.latency.grid_qk=[100000]", "at most 65536"),
    ("stages.latency.grid_v", "stages.latency.grid_v=[]", "strictly increasing"),
    ("stages.latency.grid_mlp", "stages.latency.grid_mlp=[0]", "strictly increasing"),
    ("stages.latency.batch_size", "stages.latency.batch_size=0", "from 1 to"),
    ("stages.latency.tokens", "stages.latency.tokens=0", "from 1 to"),
    ("stages.latency.warmup", "stages.latency.warmup=1000000000", "from 0 to 10000"),
    ("stages.latency.repeats", "stages.latency.repeats=0", "from 1 to 10000"),
    ("stages.latency.rounds", "stages.latency.rounds=0", "from 1 to 10000"),
    ("stages.latency.table", r#"stages.latency.table="/nonexistent/table.json""#, "does not exist"),
    ("stages.latency.table", r#"stages.latency.table="/dev/zero""#, "is a device, not a regular file"),
    ("stages.latency.runtime", r#"stages.latency.runtime="tensorrt""#, "unknown variant"),
    ("stages.latency.onnxruntime_provider", r#"stages.latency.onnxruntime_provider="rocm""#, "unknown variant"),
    ("stages.scores.criterion", r#"stages.scores.criterion="magic""#, "magic"),
    ("stages.scores.batches", "stages.scores.batches=0", "from 1 to"),
    ("stages.scores.batch_size", "stages.scores.batch_size=0", "from 1 to"),
    ("stages.scores.split", r#"stages.scores.split="test""#, "test"),
    ("stages.scores.shuffle", r#"stages.scores.shuffle="yes""#, "invalid type"),
    ("stages.scores.augment", r#"stages.scores.augment="yes""#, "invalid type"),
    ("stages.scores.normalizer_emb", "stages.scores.normalizer_emb=0.0", "positive"),
    ("stages.scores.normalizer_head", "stages.scores.normalizer_head=-1.0", "positive"),
    ("stages.scores.normalizer_qk", "stages.scores.normalizer_qk=nan", "positive"),
    ("stages.scores.normalizer_v", "stages.scores.normalizer_v=inf", "positive"),
    ("stages.scores.normalizer_mlp", "stages.scores.normalizer_mlp=0.0", "positive"),
    ("stages.prune.latency", r#"stages.prune.latency="nope""#, "names no stage"),
    ("stages.prune.latency_target", "stages.prune.latency_target=0.0", "(0, 1]"),
    ("stages.prune.criterion", r#"stages.prune.criterion="x""#, "unknown variant"),
    ("stages.prune.allocation", r#"stages.prune.allocation="x""#, "unknown variant"),
    ("stages.prune.selection", r#"stages.prune.selection="x""#, "unknown variant"),
    ("stages.prune.ranking", r#"stages.prune.ranking="x""#, "unknown variant"),
    ("stages.prune.prune_steps", "stages.prune.prune_steps=0", "from 1 to"),
    ("stages.prune.uniform_step", "stages.prune.uniform_step=1.0", "(0, 1)"),
    ("stages.prune.isomorphic_step", "stages.prune.isomorphic_step=0.0", "(0, 1)"),
    ("stages.prune.interval", "stages.prune.interval=0", "from 1 to"),
    ("stages.prune.latency_tolerance", "stages.prune.latency_tolerance=0.5", "[0, 0.5)"),
    ("stages.prune.stop_on", r#"stages.prune.stop_on="x""#, "unknown variant"),
    ("stages.prune.measure_batch", "stages.prune.measure_batch=0", "from 1 to"),
    ("stages.prune.measure_pairs", "stages.prune.measure_pairs=0", "from 1 to 10000"),
    ("stages.prune.runtime", r#"stages.prune.runtime="onnxruntime""#, "times the measured stop"),
    ("stages.prune.onnxruntime_provider", r#"stages.prune.onnxruntime_provider="gpu""#, "unknown variant"),
    ("stages.prune.ema", "stages.prune.ema=1.0", "[0, 1)"),
    ("stages.prune.eta", "stages.prune.eta=-1.0", "not negative"),
    ("stages.prune.groups_per_step", "stages.prune.groups_per_step=0", "from 1 to"),
    ("stages.prune.group_emb", "stages.prune.group_emb=0", "from 1 to"),
    ("stages.prune.group_head", "stages.prune.group_head=0", "from 1 to"),
    ("stages.prune.group_qk", "stages.prune.group_qk=0", "from 1 to"),
    ("stages.prune.group_v", "stages.prune.group_v=0", "from 1 to"),
    ("stages.prune.group_mlp", "stages.prune.group_mlp=0", "from 1 to"),
    ("stages.prune.max_prune_steps", "stages.prune.max_prune_steps=0", "from 1 to"),
    ("stages.prune.checkpoint_every", "stages.prune.checkpoint_every=0", "from 1 to"),
    ("stages.prune.batch_size", "stages.prune.batch_size=0", "from 1 to"),
    ("stages.prune.lr", "stages.prune.lr=0.0", "positive"),
    ("stages.prune.weight_decay", "stages.prune.weight_decay=inf", "finite"),
    ("stages.prune.kd_weight", "stages.prune.kd_weight=-1.0", "not negative"),
    ("stages.prune.temperature", "stages.prune.temperature=0.0", "positive"),
    ("stages.prune.augment", r#"stages.prune.augment="yes""#, "invalid type"),
    ("stages.evaluate.split", r#"stages.evaluate.split="test""#, "test"),
    ("stages.evaluate.batch_size", "stages.evaluate.batch_size=0", "from 1 to"),
    ("stages.evaluate.throughput_batch", "stages.evaluate.throughput_batch=0", "from 1 to"),
    ("stages.evaluate.throughput_repeats", "stages.evaluate.throughput_repeats=0", "from 1 to 10000"),
    ("stages.evaluate.warmup", "stages.evaluate.warmup=1000000000", "from 0 to 10000"),
    ("stages.evaluate.runtime", r#"stages.evaluate.runtime="torch""#, "unknown variant"),
    ("stages.evaluate.onnxruntime_provider", r#"stages.evaluate.onnxruntime_provider="cpu0""#, "unknown variant"),
    ("stages.evaluate.model_id", r#"stages.evaluate.model_id="a\nb""#, "one line"),
    ("stages.evaluate.baseline", r#"stages.evaluate.baseline="nope""#, "names no stage"),
    ("stages.evaluate.speedup_pairs", "stages.evaluate.speedup_pairs=0", "from 1 to 10000"),
    ("stages.report.models", "stages.report.models=[]", "is required"),
    ("stages.report.prunes", r#"stages.report.prunes=["nope"]"#, "names no stage"),
    ("stages.report.curves", r#"stages.report.curves=["nope"]"#, "names no stage"),
    ("stages.report.paper", r#"stages.report.paper="yes""#, "invalid type"),
];

/// The stage of the base pipeline of each kind.
const STAGES: &[(&str, StageKind)] = &[
    ("load", StageKind::LoadPretrained),
    ("train", StageKind::Train),
    ("latency", StageKind::ProfileLatency),
    ("scores", StageKind::HessianScores),
    ("prune", StageKind::Prune),
    ("distill", StageKind::Distill),
    ("evaluate", StageKind::Evaluate),
    ("report", StageKind::Report),
];

#[test]
fn every_key_has_a_bad_value_that_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = base(dir.path());
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let fifo = dir.path().join("a-fifo");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    // A `.safetensors` that links to /dev/zero.
    let zero_link = dir.path().join("model.safetensors");
    std::os::unix::fs::symlink("/dev/zero", &zero_link).unwrap();
    let read = |set: Vec<String>| load(&path, &Overrides { with: Vec::new(), set, env: false });
    read(Vec::new()).unwrap_or_else(|e| panic!("the base pipeline is valid: {e}"));

    let mut keys: BTreeSet<String> = BTreeSet::new();
    for (section, fields) in [("pipeline", struct_fields::<PipelineSection>()), ("dataset", struct_fields::<DatasetConfig>()), ("model", struct_fields::<ModelSection>())] {
        keys.extend(fields.iter().map(|f| format!("{section}.{f}")));
    }
    keys.extend(["stages.*.kind", "stages.*.input", "stages.*.seed"].map(String::from));
    for (name, kind) in STAGES.iter().filter(|(_, k)| *k != StageKind::Distill) {
        keys.extend(kind.fields().iter().map(|f| format!("stages.{name}.{f}")));
    }
    let covered: BTreeSet<String> = ROWS.iter().map(|(k, _, _)| k.to_string()).collect();
    let missing: Vec<&String> = keys.difference(&covered).collect();
    assert!(missing.is_empty(), "keys without a row in ROWS (give each a bad value and the words of its error): {missing:?}");
    assert_eq!(StageKind::Distill.fields(), StageKind::Train.fields(), "distill takes train's keys, and its rows");

    let mut failures = Vec::new();
    let distill_rows = ROWS.iter().filter(|(k, _, _)| k.starts_with("stages.train.")).map(|(k, s, w)| (k.replace("stages.train.", "stages.distill."), s.replace("stages.train.", "stages.distill."), *w));
    for (key, set, words) in ROWS.iter().map(|(k, s, w)| (k.to_string(), s.to_string(), *w)).chain(distill_rows) {
        let set: Vec<String> = set
            .split("; ")
            .map(|s| s.replace("FILE", &file.display().to_string()).replace("FIFO", &fifo.display().to_string()).replace("ZERO_LINK", &zero_link.display().to_string()))
            .collect();
        let named = set.last().unwrap().split('=').next().unwrap().to_string();
        match read(set.clone()) {
            Ok(_) => failures.push(format!("{key}: {set:?} was accepted")),
            Err(e) => {
                let text = e.to_string();
                if !text.lines().any(|l| l.contains(&named) && l.contains(words)) && !(text.contains(&named) && text.contains(words)) {
                    failures.push(format!("{key}: {set:?} gave an error without `{named}` and `{words}`:\n{text}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} of the bad values:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn every_type_error_is_reported_at_once_and_names_with_paths_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = base(dir.path());
    let set = ["stages.train.lr=\"fast\"", "stages.train.epochs=\"many\"", "dataset.hflip=3", "dataset.workers=\"all\""].map(String::from).to_vec();
    let err = load(&path, &Overrides { with: Vec::new(), set, env: false }).unwrap_err().to_string();
    for key in ["stages.train.lr", "stages.train.epochs", "dataset.hflip", "dataset.workers"] {
        assert!(err.contains(key), "{key} in:\n{err}");
    }

    let text = std::fs::read_to_string(&path).unwrap().replace("[stages.report]", "[stages.\"../report\"]");
    std::fs::write(&path, text).unwrap();
    let err = load(&path, &Overrides::default()).unwrap_err().to_string();
    assert!(err.contains("stage name") && err.contains("\"../report\""), "{err}");
    // The audit's `[stages."a..b"]` was "found map".
    let text = std::fs::read_to_string(&path).unwrap().replace("[stages.\"../report\"]", "[stages.\"a..b\"]");
    std::fs::write(&path, text).unwrap();
    let err = load(&path, &Overrides::default()).unwrap_err().to_string();
    assert!(err.contains("stage name \"a..b\" contains `.`") && !err.contains("found map"), "{err}");
}

#[test]
fn an_extends_cycle_through_another_folder_is_named_as_a_cycle() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("a.toml"), "extends = \"sub/b.toml\"\n").unwrap();
    std::fs::write(dir.path().join("sub/b.toml"), "extends = \"../sub/../a.toml\"\n").unwrap();
    let err = load(&dir.path().join("a.toml"), &Overrides::default()).unwrap_err().to_string();
    assert!(err.contains("forms a cycle") && err.len() < 1000, "{err}");
    // The audit's symbolic-link loop was said not to exist.
    std::os::unix::fs::symlink(dir.path().join("loop1.toml"), dir.path().join("loop2.toml")).unwrap();
    std::os::unix::fs::symlink(dir.path().join("loop2.toml"), dir.path().join("loop1.toml")).unwrap();
    std::fs::write(dir.path().join("c.toml"), "extends = \"loop1.toml\"\n").unwrap();
    let err = load(&dir.path().join("c.toml"), &Overrides::default()).unwrap_err().to_string();
    assert!(err.contains("extends") && err.contains("loop1.toml`, which cannot be opened") && err.contains("symbolic links"), "{err}");
}

#[test]
fn hostile_and_broken_checkpoints_are_refused_naming_the_tensor() {
    use nvit::model::checkpoint::{infer_config, StateDict};
    use nvit::model::VitConfig;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let err = StateDict::read(&repo.join("tests/fixtures/hostile/stride0.pth")).unwrap_err().to_string();
    assert!(err.contains("patch_embed.proj.weight") && err.contains("more than the whole file"), "{err}");

    let good = StateDict::read(&repo.join("tests/fixtures/timm_deit_tiny_distilled_32px/model.safetensors")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let hint = VitConfig::uniform(32, 8, 3, 192, 1, 3, 4.0, 10, true);
    let broken = |name: &str, f: &dyn Fn(&mut (Vec<usize>, Vec<f32>))| {
        let mut sd = good.clone();
        f(sd.tensors.get_mut(name).unwrap());
        let path = dir.path().join(format!("{}.safetensors", name.replace('.', "_")));
        sd.write(&path).unwrap();
        StateDict::read(&path).and_then(|sd| infer_config(&sd, &hint)).map(|_| ()).unwrap_err().to_string()
    };
    let err = broken("pos_embed", &|(shape, _)| *shape = vec![shape.iter().product()]);
    assert!(err.contains("pos_embed") && err.contains("3 dimensions"), "{err}");
    let err = broken("patch_embed.proj.weight", &|(shape, values)| {
        *shape = vec![16, 1, 0, 0];
        values.clear();
    });
    assert!(err.contains("patch_embed.proj.weight") && err.contains("[16, 1, 0, 0]"), "{err}");
    let err = broken("blocks.0.mlp.fc1.weight", &|(_, values)| values[7] = f32::NAN);
    assert!(err.contains("blocks.0.mlp.fc1.weight") && err.contains("non-finite"), "{err}");
}

#[test]
fn gc_refuses_keep_days_that_are_not_a_number_of_days() {
    let dir = tempfile::tempdir().unwrap();
    for days in ["nan", "-5", "inf", "1e300"] {
        let (code, _, err) = crate::common::output(crate::common::runner(dir.path()).args(["cache", "gc", &format!("--keep-days={days}")]));
        assert_eq!(code, 2, "--keep-days {days}: {err}");
        assert!(err.contains("--keep-days") && err.contains("from 0 to 36500"), "{err}");
    }
}

#[test]
fn sweep_names_and_slurm_values_cannot_leave_their_folders_or_add_commands() {
    let dir = tempfile::tempdir().unwrap();
    crate::common::tiny_pipeline(dir.path(), "");
    let sweep = |extra: &str| {
        let path = dir.path().join("s.toml");
        std::fs::write(&path, format!("pipeline = \"tiny.toml\"\n{extra}\n[grid]\n\"stages.evaluate.throughput_batch\" = [4]\n")).unwrap();
        crate::common::output(crate::common::runner(dir.path()).args(["sweep", path.to_str().unwrap(), "--emit-slurm"]))
    };
    let (code, _, err) = sweep("name = \"../../..\"\n");
    assert_eq!(code, 1);
    assert!(err.contains("name:") && err.contains("folder name"), "{err}");
    for (slurm, key) in [("partition = \"gpu\\necho INJECTED > file\"", "slurm.partition"), ("extra = [\"--account=x\\necho INJECTED\"]", "slurm.extra[0]"), ("time = \"1:00:00\\nrm -rf /\"", "slurm.time")] {
        let (code, script, err) = sweep(&format!("[slurm]\n{slurm}\n"));
        assert_eq!(code, 1, "{script}");
        assert!(err.contains(key) && !script.contains("INJECTED"), "{key}: {err}");
    }
    // The README's example: only the time given, the rest defaults.
    let (code, script, err) = sweep("[slurm]\ntime = \"72:00:00\"\n");
    assert_eq!(code, 0, "{err}");
    assert!(script.lines().any(|l| l == "#SBATCH --time=72:00:00"), "{script}");
    assert!(!dir.path().join("../escaped").exists());
}

#[test]
fn a_normalization_for_other_channels_and_an_emb_group_wider_than_the_model_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = base(dir.path());
    let read = |set: &[&str]| load(&path, &Overrides { with: Vec::new(), set: set.iter().map(|s| s.to_string()).collect(), env: false });
    // ImageNet's values were used in silence, and the ONNX metadata said so.
    let err = read(&["model.in_chans=1", "dataset.mean=[5.0, 5.0]", "dataset.std=[0.01, 0.01]"]).unwrap_err().to_string();
    assert!(err.contains("dataset.mean") && err.contains("has 2 values") && err.contains("1-channel"), "{err}");
    read(&["model.in_chans=1", "dataset.mean=[0.5]", "dataset.std=[0.25]"]).unwrap();
    let err = read(&[r#"model.init="random""#, "stages.prune.group_emb=1000"]).unwrap_err().to_string();
    assert!(err.contains("stages.prune.group_emb") && err.contains("16 channels"), "{err}");
}

#[test]
fn more_devices_than_any_machine_has_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = base(dir.path());
    let devices = format!("pipeline.devices=[{}]", vec!["0"; 65].join(", "));
    let err = load(&path, &Overrides { with: Vec::new(), set: vec![devices], env: false }).unwrap_err().to_string();
    assert!(err.contains("pipeline.devices") && err.contains("at most 64"), "{err}");
    // The audit's sweep with 1,000 workers.
    crate::common::tiny_pipeline(dir.path(), "");
    let sweep = dir.path().join("s.toml");
    std::fs::write(&sweep, format!("pipeline = \"tiny.toml\"\ndevices = [{}]\n[grid]\n\"stages.train.lr\" = [1e-3]\n", vec!["0"; 1000].join(", "))).unwrap();
    let (code, _, err) = crate::common::output(crate::common::runner(dir.path()).args(["sweep", sweep.to_str().unwrap(), "--dry-run"]));
    assert_ne!(code, 0);
    assert!(err.contains("s.toml: devices lists 1000 devices: at most 64"), "{err}");
}

#[test]
fn an_mlp_wider_than_the_bound_names_the_key_that_makes_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = base(dir.path());
    let read = |set: &[&str]| load(&path, &Overrides { with: Vec::new(), set: set.iter().map(|s| s.to_string()).collect(), env: false }).unwrap_err().to_string();
    let err = read(&["model.embed_dim=32768", "model.mlp_ratio=4.0"]);
    assert!(err.contains("model.mlp_ratio: gives MLPs of 131072 units"), "{err}");
}

/// The audit's `--set model.depths=[]` on a Swin panicked (`src/model/swin.rs:73`).
#[test]
fn a_swin_without_stages_is_refused_by_name() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/quickstart-swin.toml");
    for depths in ["[]", "[0]"] {
        let err = load(&path, &Overrides { with: Vec::new(), set: vec![format!("model.depths={depths}")], env: false }).unwrap_err().to_string();
        assert!(err.contains("model.depths") && err.contains("needs 1 to 16 stages"), "{depths}: {err}");
    }
}

/// The audit's unbounded and blocking reads: `/dev/zero` or a FIFO as the pipeline, a `--with`
/// layer, an `extends` base, `model.dims`, a stage's `table` or a checkpoint. Each is refused
/// by name, at once (a FIFO's open would block; `/dev/zero` read until killed for memory).
#[test]
fn devices_and_fifos_are_refused_as_inputs_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.toml");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let zero_st = dir.path().join("zero.safetensors");
    std::os::unix::fs::symlink("/dev/zero", &zero_st).unwrap();
    let tiny = crate::common::tiny_pipeline(dir.path(), "");
    let extends = dir.path().join("extends.toml");
    std::fs::write(&extends, format!("extends = \"{}\"\n", fifo.display())).unwrap();
    let layer = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let table = tiny.to_str().unwrap().to_string();
    let dims = layer("dims.toml", "[model]\ndims = \"/dev/zero\"\n".into());
    let latency = layer("table.toml", "[stages.latency]\nkind = \"profile_latency\"\ninput = \"train\"\ntable = \"/dev/zero\"\n".into());
    let checkpoint = layer("load.toml", format!("[stages.load]\nkind = \"load_pretrained\"\npath = \"{}\"\n", zero_st.display()));
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["/dev/zero".into()], "/dev/zero: cannot read pipeline file: is a device, not a regular file"),
        (vec![fifo.to_str().unwrap().into()], "fifo.toml: cannot read pipeline file: is a FIFO, not a regular file"),
        (vec![extends.to_str().unwrap().into()], "fifo.toml: cannot read pipeline file: is a FIFO"),
        (vec![table.clone(), "--with".into(), fifo.to_str().unwrap().into()], "fifo.toml: cannot read (--with): is a FIFO"),
        (vec![table.clone(), "--with".into(), dims], "/dev/zero"),
        (vec![table.clone(), "--with".into(), latency], "/dev/zero"),
        (vec![table, "--with".into(), checkpoint], "zero.safetensors"),
    ];
    for (args, message) in cases {
        let mut child = crate::common::runner(dir.path()).arg("run").args(&args).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap();
        let start = std::time::Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > std::time::Duration::from_secs(60) {
                child.kill().unwrap();
                panic!("{args:?}: still running after 60 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} ran");
        assert!(err.contains(message) && !err.contains("panicked"), "{args:?}: {err}");
    }
}

/// The audit's 10^4-stage pipeline planned for over 300 s: the count is bounded when read.
#[test]
fn a_pipeline_of_too_many_stages_is_refused_when_read() {
    let dir = tempfile::tempdir().unwrap();
    let stages: String = (0..=nvit::config::MAX_STAGES).map(|i| format!("[stages.e{i}]\nkind = \"evaluate\"\n")).collect();
    let path = crate::common::tiny_pipeline(dir.path(), &stages);
    let start = std::time::Instant::now();
    let err = load(&path, &Overrides::default()).unwrap_err().to_string();
    assert!(err.contains(&format!("has {} stages: at most {}", nvit::config::MAX_STAGES + 3, nvit::config::MAX_STAGES)), "{err}");
    assert!(start.elapsed().as_secs() < 30);
}
