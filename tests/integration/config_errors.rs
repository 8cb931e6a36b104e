//! Every configuration error names the file, the key and what is wrong, before any work.

use nvit::config::{load, Overrides};

fn errors(toml: &str, set: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("base.toml"), "[stages.train]\nkind = \"train\"\n[dataset]\nkind = \"synthetic\"\n").unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(&path, toml).unwrap();
    let overrides = Overrides { set: set.iter().map(|s| s.to_string()).collect(), env: false, with: vec![] };
    let err = load(&path, &overrides).err().expect("the pipeline should be rejected").to_string();
    err.replace(&format!("{}/", dir.path().display()), "")
}

const OK: &str = "extends = \"base.toml\"\n";

#[test]
fn misspelled_keys_name_file_path_and_nearest_key() {
    let e = errors(&format!("{OK}[pipeline]\nseeed = 1\n[stages.train]\nlearning_rate = 1.0\nbatchsize = 3\n"), &[]);
    assert!(e.contains("p.toml: unknown key `pipeline.seeed`; did you mean `seed`?"), "{e}");
    assert!(e.contains("p.toml: unknown key `stages.train.batchsize`; did you mean `batch_size`?"), "{e}");
    assert!(e.contains("p.toml: unknown key `stages.train.learning_rate`"), "{e}");
    assert!(e.contains("p.toml: unknown key `stages.train.learning_rate`\n") || e.ends_with("learning_rate`"), "no suggestion for a far name: {e}");
}

#[test]
fn unknown_top_level_table_and_dataset_key() {
    let e = errors(&format!("{OK}[modle]\ndepth = 2\n[dataset]\nroots = \"x\"\n"), &[]);
    assert!(e.contains("p.toml: unknown key `modle`; did you mean `model`?"), "{e}");
    assert!(e.contains("p.toml: unknown key `dataset.roots`; did you mean `root`?"), "{e}");
}

#[test]
fn wrong_types_are_reported_with_the_key() {
    let e = errors(&format!("{OK}[stages.train]\nepochs = \"many\"\n"), &[]);
    assert!(e.contains("p.toml: stages.train.epochs: invalid type: found string \"many\", expected usize"), "{e}");
    // A stage's own seed, as every stage may set it.
    let e = errors(&format!("{OK}[stages.train]\nseed = \"x\"\n[stages.evaluate]\nkind = \"evaluate\"\nseeds = 3\n"), &[]);
    assert!(e.contains("stages.train.seed: invalid type: found string \"x\""), "{e}");
    assert!(e.contains("p.toml: unknown key `stages.evaluate.seeds`; did you mean `seed`?"), "{e}");
}

#[test]
fn impossible_values_are_errors_before_any_work() {
    let e = errors(&format!("{OK}[stages.train]\nlr = -0.1\nlabel_smoothing = 1.5\nepochs = 0\n"), &[]);
    assert!(e.contains("p.toml: stages.train.lr: must be positive, got -0.1"), "{e}");
    assert!(e.contains("p.toml: stages.train.label_smoothing: must be in [0, 1), got 1.5"), "{e}");
    assert!(e.contains("p.toml: stages.train.epochs: must be from 1 to 16777216, got 0"), "{e}");
}

#[test]
fn every_error_is_reported_at_once() {
    let e = errors(&format!("{OK}[pipeline]\nseeed = 1\n[stages.train]\nlr = -1.0\n[model]\npreset = \"deit-bse\"\n"), &[]);
    // min_lr is checked against the (bad) lr: four errors, all named in the file.
    assert_eq!(e.lines().filter(|l| l.starts_with("p.toml:")).count(), 4, "{e}");
    assert!(e.contains("model.preset: unknown preset `deit-bse`; did you mean `deit-base`?"), "{e}");
}

#[test]
fn missing_files_are_named() {
    let e = errors("[dataset]\nkind = \"idx\"\nroot = \"/no/such/dir\"\n[stages.t]\nkind = \"train\"\n", &[]);
    assert!(e.contains("p.toml: dataset.root: `/no/such/dir` does not exist"), "{e}");
    let e = errors("extends = \"nothere.toml\"\n", &[]);
    assert!(e.contains("p.toml: extends `") && e.contains("nothere.toml`, which does not exist"), "{e}");
    let e = errors(&format!("{OK}[stages.load]\nkind = \"load_pretrained\"\npath = \"/no/deit.safetensors\"\n"), &[]);
    assert!(e.contains("p.toml: stages.load.path: `/no/deit.safetensors` does not exist"), "{e}");
    let missing = load(std::path::Path::new("/no/pipeline.toml"), &Overrides::default()).err().unwrap().to_string();
    assert!(missing.starts_with("/no/pipeline.toml: cannot read pipeline file"), "{missing}");
}

#[test]
fn stage_kinds_and_inputs_are_checked() {
    let e = errors(&format!("{OK}[stages.x]\nkind = \"trian\"\n[stages.e]\nkind = \"evaluate\"\ninput = \"trainn\"\n"), &[]);
    assert!(e.contains("p.toml: stages.x.kind: unknown stage kind `trian`; did you mean `train`?"), "{e}");
    assert!(e.contains("p.toml: stages.e.input: names no stage `trainn`; did you mean `train`?"), "{e}");
    let e = errors(&format!("{OK}[stages.r]\nkind = \"report\"\n[stages.r2]\nkind = \"report\"\nmodels = [\"train\", \"evalute\"]\n"), &[]);
    assert!(e.contains("p.toml: stages.r.models: is required"), "{e}");
    assert!(e.contains("p.toml: stages.r2.models: names no stage `evalute`"), "{e}");
    let e = errors(&format!("{OK}[stages.p]\nkind = \"prune\"\nlatency = \"train\"\n[stages.r]\nkind = \"report\"\nmodels = [\"p\"]\nprunes = [\"p\"]\n"), &[]);
    assert!(e.contains("p.toml: stages.p.latency: names `train`, a train stage; it takes profile_latency stages"), "{e}");
    assert!(e.contains("p.toml: stages.r.models: names `p`, a prune stage; it takes evaluate stages"), "{e}");
    assert!(!e.contains("stages.r.prunes"), "{e}");
    let e = errors(&format!("{OK}[stages.d]\nkind = \"distill\"\nmixup = -1\n[stages.d2]\nkind = \"distill\"\nteacher = \"later\"\naugment = false\nrandom_erasing = 0.25\n[stages.later]\nkind = \"train\"\n"), &[]);
    assert!(e.contains("p.toml: stages.d.teacher: is required"), "{e}");
    assert!(e.contains("stages.d.mixup: must be a finite number, not negative, got -1"), "{e}");
    assert!(e.contains("stages.d2.teacher: names `later`, which does not come before it"), "{e}");
    assert!(e.contains("stages.d2.random_erasing: is an image augmentation but augment = false"), "{e}");
    let e = errors(&format!("{OK}[stages.e]\nkind = \"evaluate\"\n[stages.late]\nkind = \"train\"\n[stages.e2]\nkind = \"evaluate\"\ninput = \"e3\"\n[stages.e3]\nkind = \"evaluate\"\n"), &[]);
    assert!(e.contains("stages.e2.input: names `e3`, which does not come before it"), "{e}");
}

#[test]
fn set_overrides_are_checked_and_named() {
    let e = errors(OK, &["stages.train.lr=-3"]);
    assert!(e.contains("--set stages.train.lr=-3: stages.train.lr: must be positive, got -3"), "{e}");
    let e = errors(OK, &["stages.train.lr"]);
    assert!(e.contains("--set stages.train.lr: expected key.path=value"), "{e}");
    let e = errors(OK, &["stages.train.lrr=1"]);
    assert!(e.contains("--set stages.train.lrr=1: unknown key `stages.train.lrr`; did you mean `lr`?"), "{e}");
    // The audit's case: the second line was read as another key and dropped with the value.
    let e = errors(OK, &["stages.train.lr=1e-3\nstages.train.epochs=5"]);
    assert!(e.contains("holds a line break") && e.contains("one key.path=value per --set"), "{e}");
}

#[test]
fn layers_override_in_order_and_say_where_values_came_from() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("base.toml"), "[dataset]\nkind = \"synthetic\"\n[stages.train]\nkind = \"train\"\nlr = 0.1\nepochs = 3\n").unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(&path, "extends = \"base.toml\"\n[stages.train]\nlr = 0.2\n[stages.eval]\nkind = \"evaluate\"\n").unwrap();
    let overrides = Overrides { set: vec!["stages.train.epochs=5".into()], env: false, with: vec![] };
    let p = load(&path, &overrides).unwrap();
    let rows = p.provenance();
    let find = |k: &str| rows.iter().find(|r| r.0 == k).unwrap_or_else(|| panic!("{k}")).clone();
    assert_eq!(find("stages.train.lr").1, "0.2");
    assert!(find("stages.train.lr").2.ends_with("p.toml"));
    assert_eq!(find("stages.train.epochs").1, "5");
    assert_eq!(find("stages.train.epochs").2, "--set stages.train.epochs=5");
    assert_eq!(find("stages.train.batch_size").2, "default");
    assert_eq!(find("pipeline.name").1, "\"p\"");
    assert_eq!(p.stages.iter().map(|s| (s.name.as_str(), s.input.as_deref())).collect::<Vec<_>>(), [("train", None), ("eval", Some("train"))]);
}

#[test]
fn prune_settings_and_stage_references_are_checked() {
    let e = errors(
        &format!("{OK}[stages.latency]\nkind = \"profile_latency\"\n[stages.p]\nkind = \"prune\"\nlatency = \"latncy\"\nlatency_target = 1.5\n"),
        &[],
    );
    assert!(e.contains("p.toml: stages.p.latency: names no stage `latncy`; did you mean `latency`?"), "{e}");
    assert!(e.contains("p.toml: stages.p.latency_target: must be in (0, 1], got 1.5"), "{e}");
    let e = errors(&format!("{OK}[stages.p]\nkind = \"prune\"\n"), &[]);
    assert!(e.contains("p.toml: stages.p.latency: is required: the name of a profile_latency stage"), "{e}");
    // Issue 15's keys: an unknown ranking, and a step fraction outside (0, 1).
    let e = errors(&format!("{OK}[stages.latency]\nkind = \"profile_latency\"\n[stages.p]\nkind = \"prune\"\nlatency = \"latency\"\nranking = \"isomorphc\"\n"), &[]);
    assert!(e.contains("p.toml: stages.p.ranking: unknown variant: found `isomorphc`"), "{e}");
    let e = errors(&format!("{OK}[stages.latency]\nkind = \"profile_latency\"\n[stages.p]\nkind = \"prune\"\nlatency = \"latency\"\nisomorphic_step = 1.5\n"), &[]);
    assert!(e.contains("p.toml: stages.p.isomorphic_step: must be in (0, 1), got 1.5"), "{e}");
}

#[test]
fn hessian_scores_settings_are_checked() {
    let e = errors(&format!("{OK}[stages.s]\nkind = \"hessian_scores\"\nbatches = 0\nnormalizer_head = -1.0\ncriterion = \"fisher\"\n"), &[]);
    assert!(e.contains("p.toml: stages.s.criterion: unknown variant: found `fisher`"), "{e}");
    let e = errors(&format!("{OK}[stages.s]\nkind = \"hessian_scores\"\nbatches = 0\nnormalizer_head = -1.0\n"), &[]);
    assert!(e.contains("p.toml: stages.s.batches: must be from 1 to 16777216, got 0"), "{e}");
    assert!(e.contains("p.toml: stages.s.normalizer_head: must be positive, got -1"), "{e}");
}

#[test]
fn with_files_layer_over_the_pipeline_and_their_errors_name_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(&path, "[dataset]\nkind = \"synthetic\"\n[stages.train]\nkind = \"train\"\nepochs = 3\n").unwrap();
    let overlay = dir.path().join("smoke.toml");
    std::fs::write(&overlay, "[stages.train]\nepochs = 1\n").unwrap();
    let with = |files: Vec<std::path::PathBuf>, set: &[&str]| load(&path, &Overrides { with: files, set: set.iter().map(|s| s.to_string()).collect(), env: false });
    let p = with(vec![overlay.clone()], &[]).unwrap();
    assert_eq!(p.stages[0].settings, nvit::stages::StageSettings::Train(nvit::stages::TrainSettings { epochs: 1, ..Default::default() }));
    let p = with(vec![overlay.clone()], &["stages.train.epochs=2"]).unwrap();
    assert!(matches!(&p.stages[0].settings, nvit::stages::StageSettings::Train(t) if t.epochs == 2), "--set comes last");

    std::fs::write(&overlay, "[stages.train]\nepohcs = 1\n").unwrap();
    let e = with(vec![overlay.clone(), dir.path().join("nothere.toml")], &[]).err().unwrap().to_string();
    assert!(e.contains("smoke.toml: unknown key `stages.train.epohcs`; did you mean `epochs`?"), "{e}");
    assert!(e.contains("nothere.toml: cannot read (--with)"), "{e}");
}

#[test]
fn random_init_needs_no_checkpoint_file() {
    let toml = format!("{OK}[stages.load]\nkind = \"load_pretrained\"\npath = \"/no/deit.pth\"\n");
    let e = errors(&toml, &[]);
    assert!(e.contains("stages.load.path: `/no/deit.pth` does not exist"), "{e}");
    let e = errors(&format!("{toml}[model]\ninit = \"random\"\n[stages.t2]\nkind = \"trian\"\n"), &[]);
    assert!(!e.contains("stages.load.path"), "{e}");
}

#[test]
fn new_training_and_pruning_options_are_checked() {
    let e = errors(
        &format!("{OK}[stages.train]\ndrop_path = 1.5\nrandaugment_magnitude = 12\ntemperature = 0\n[stages.p]\nkind = \"prune\"\nlatency = \"train\"\nuniform_step = 1.0\n"),
        &[],
    );
    assert!(e.contains("p.toml: stages.train.drop_path: must be in [0, 1), got 1.5"), "{e}");
    assert!(e.contains("p.toml: stages.train.randaugment_magnitude: must be in [0, 10], got 12"), "{e}");
    assert!(e.contains("p.toml: stages.train.temperature: must be positive, got 0"), "{e}");
    assert!(e.contains("p.toml: stages.p.uniform_step: must be in (0, 1), got 1"), "{e}");
    let e = errors(&format!("{OK}[stages.p]\nkind = \"prune\"\nlatency = \"train\"\nallocation = \"uniformm\"\n[model]\ninit = \"randm\"\n"), &[]);
    assert!(e.contains("p.toml: stages.p.allocation: unknown variant: found `uniformm`"), "{e}");
    // A section's path comes first, as the user wrote it (figment appends it).
    assert!(e.contains("p.toml: model.init: unknown variant: found `randm`"), "{e}");
}

#[test]
fn devices_must_name_at_least_one_and_the_old_key_is_pointed_to_the_new() {
    let toml = "extends = \"base.toml\"\n[pipeline]\ndevices = []\n";
    assert!(errors(toml, &[]).contains("pipeline.devices: is empty: give at least one device index, e.g. [0]"), "{}", errors(toml, &[]));
    let err = errors("extends = \"base.toml\"\n[pipeline]\ndevice = 1\n", &[]);
    assert!(err.contains("unknown key `pipeline.device`; did you mean `devices`?"), "{err}");
}

#[test]
fn model_geometry_is_checked_before_any_work() {
    let e = errors(&format!("{OK}[model]\nimage_size = 30\npatch_size = 4\nembed_dim = 32\nheads = 3\n"), &[]);
    assert!(e.contains("p.toml: model.patch_size: 4 does not divide image_size = 30"), "{e}");
    assert!(e.contains("p.toml: model.heads: 3 does not divide embed_dim = 32"), "{e}");
    // A default named as such.
    let e = errors(&format!("{OK}[model]\nembed_dim = 32\n"), &[]);
    assert!(e.contains("model.heads: 3 (default) does not divide embed_dim = 32"), "{e}");
}

#[test]
fn teachers_and_inputs_must_name_stages_with_a_model() {
    let text = format!(
        "{OK}[stages.latency]\nkind = \"profile_latency\"\ninput = \"train\"\n[stages.student]\nkind = \"train\"\ninput = \"train\"\nteacher = \"latency\"\n[stages.eval]\nkind = \"evaluate\"\ninput = \"latency\"\n"
    );
    let e = errors(&text, &[]);
    assert!(e.contains("p.toml: stages.student.teacher: names `latency`, a profile_latency stage, which writes no model"), "{e}");
    assert!(e.contains("hint: name a load_pretrained, train, prune, distill stage"), "{e}");
    assert!(e.contains("stages.eval.input: names `latency`, a profile_latency stage, which writes no model"), "{e}");
}

#[test]
fn a_bad_value_in_one_stage_adds_no_error_to_the_stages_that_name_it() {
    let e = errors(&format!("{OK}[stages.train]\nepochs = \"many\"\n[stages.eval]\nkind = \"evaluate\"\ninput = \"train\"\n"), &[]);
    assert!(e.contains("stages.train.epochs: invalid type"), "{e}");
    assert!(!e.contains("names no stage"), "{e}");
}

#[test]
fn a_misspelled_stage_in_set_gets_a_suggestion_and_toml_errors_a_line_and_column() {
    let e = errors(OK, &["stages.trian.lr=0.1"]);
    assert!(e.contains("--set stages.trian.lr=0.1: stages.trian: names no stage of the pipeline; did you mean `train`?"), "{e}");
    let e = errors(&format!("{OK}[stages.train]\nlr = \n"), &[]);
    assert!(e.contains("p.toml:3:6: invalid TOML"), "{e}");
}

#[test]
fn devices_the_backend_cannot_have_are_refused_at_load() {
    let e = errors(&format!("{OK}[pipeline]\ndevices = [0, 1]\n"), &[]);
    assert!(e.contains("pipeline.devices") && e.contains("names 1: the flex backend has one device, 0"), "{e}");
}
