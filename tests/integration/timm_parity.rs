//! Parity with timm: `tests/fixtures/make_timm_fixture.py` wrote a random distilled DeiT
//! (32 px, patch 8, width 48, depth 2, 3 heads), an input batch and timm's eval logits.

use crate::common;

use std::path::{Path, PathBuf};

use burn::backend::NdArray;
use burn::tensor::{Tensor, TensorData};
use nvit::model::checkpoint::{self, StateDict};
use nvit::model::VitConfig;
use nvit::pipeline::Cache;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/timm_deit_tiny_distilled_32px")
}

#[test]
fn logits_match_timm_to_1e4() {
    let _rng = common::rng_turn();
    let device = Default::default();
    let hint = VitConfig::uniform(32, 8, 3, 48, 2, 3, 4.0, 10, true);
    let model = checkpoint::load_pretrained::<NdArray>(&fixture().join("model.safetensors"), &hint.clone().into(), &device).unwrap();
    assert_eq!(model.config(), hint.into(), "widths read from the checkpoint's shapes");

    let io = StateDict::read(&fixture().join("io.safetensors")).unwrap();
    let (shape, input) = &io.tensors["input"];
    assert_eq!(shape, &[4, 3, 32, 32]);
    let x = Tensor::<NdArray, 4>::from_data(TensorData::new(input.clone(), [4, 3, 32, 32]), &device);
    let ours = model.forward(x).logits().into_data().to_vec::<f32>().unwrap();
    let (_, timm) = &io.tensors["logits"];
    assert_eq!(ours.len(), timm.len());
    let worst = ours.iter().zip(timm).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    let scale = timm.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "max |ours - timm| = {worst} (logits up to {scale})");
    assert!(scale > 0.1, "the fixture's logits are not trivially small");
}

/// Where `[model]` leaves the geometry open the checkpoint decides, the softmax scale
/// included: loaded against deit-tiny's defaults (E 192), the model still computes timm's.
#[test]
fn the_checkpoint_decides_what_model_leaves_open_scale_included() {
    let _rng = common::rng_turn();
    let device = Default::default();
    let hint = nvit::model::ModelSection { heads: Some(3), ..Default::default() }.resolve(10).unwrap();
    assert_eq!(hint.as_deit().unwrap().embed_dim, 192);
    let model = checkpoint::load_pretrained::<NdArray>(&fixture().join("model.safetensors"), &hint, &device).unwrap();
    let config = model.config();
    let config = config.as_deit().unwrap();
    assert_eq!((config.embed_dim, config.head_dim), (48, 16));
    let io = StateDict::read(&fixture().join("io.safetensors")).unwrap();
    let x = Tensor::<NdArray, 4>::from_data(TensorData::new(io.tensors["input"].1.clone(), [4, 3, 32, 32]), &device);
    let ours = model.forward(x).logits().into_data().to_vec::<f32>().unwrap();
    let worst = ours.iter().zip(&io.tensors["logits"].1).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "max |ours - timm| = {worst}");
}

/// A checkpoint whose geometry disagrees with explicit `[model]` keys is an error listing them.
#[test]
fn a_checkpoint_that_disagrees_with_model_is_an_error_listing_each_key() {
    let _rng = common::rng_turn();
    let dir = tempfile::tempdir().unwrap();
    let path = common::tiny_pipeline(dir.path(), "");
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "[stages.train]\nkind = \"train\"\nepochs = 2\nbatch_size = 16\nlr = 2e-3\nwarmup_epochs = 0\n",
        &format!("[stages.load]\nkind = \"load_pretrained\"\npath = \"{}\"\n", fixture().join("model.safetensors").display()),
    );
    std::fs::write(&path, text.replace("heads = 2", "heads = 2\nin_chans = 1")).unwrap();
    let (code, _, err) = common::output(common::runner(dir.path()).args(["run", path.to_str().unwrap()]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("model.safetensors: the checkpoint disagrees with [model]"), "{err}");
    for line in ["model.image_size = 16, the checkpoint's is 32", "model.patch_size = 4, the checkpoint's is 8", "model.in_chans = 1, the checkpoint's is 3", "model.embed_dim = 16, the checkpoint's is 48"] {
        assert!(err.contains(line), "{line}: {err}");
    }
}

#[test]
fn load_pretrained_stage_reads_the_checkpoint_and_evaluate_runs_on_it() {
    let _rng = common::rng_turn();
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache { root: dir.path().join("cache") };
    let stages = format!(
        "[stages.load]\nkind = \"load_pretrained\"\npath = \"{}\"\n",
        fixture().join("model.safetensors").display()
    );
    let path = common::tiny_pipeline(dir.path(), "");
    let text = std::fs::read_to_string(&path).unwrap();
    // The same data at the fixture's geometry; load replaces train as evaluate's input.
    let text = text
        .replace("synthetic_size = 16", "synthetic_size = 32\nclasses = 10")
        .replace("classes = 4\n", "")
        .replace("[stages.train]\nkind = \"train\"\nepochs = 2\nbatch_size = 16\nlr = 2e-3\nwarmup_epochs = 0\n", &stages)
        .replace("image_size = 16\npatch_size = 4\nembed_dim = 16\ndepth = 2\nheads = 2\nmlp_ratio = 2.0\n", "heads = 3\n");
    std::fs::write(&path, text).unwrap();
    let p = common::load(&path, &[]);
    let mut plan = common::plan(&p, &cache);
    assert_eq!(common::statuses(&plan), [("load".into(), "run"), ("evaluate".into(), "run")]);
    common::execute(&p, &mut plan, &cache);
    let csv = std::fs::read_to_string(dir.path().join("results/tiny/metrics.csv")).unwrap();
    let row: Vec<&str> = csv.lines().nth(1).unwrap().split(',').collect();
    assert_eq!(&row[..4], ["load", "synthetic-10c-32px", "val", "32"]);
    let params_m: f64 = row[7].parse().unwrap();
    let expected = VitConfig::uniform(32, 8, 3, 48, 2, 3, 4.0, 10, true).params() as f64 / 1e6;
    assert!((params_m - expected).abs() < 1e-3, "{params_m} vs {expected}");
}

#[test]
fn pth_with_state_dict_under_model_reads_the_same_tensors() {
    let _rng = common::rng_turn();
    let pth = StateDict::read(&fixture().join("model.pth")).unwrap();
    let st = StateDict::read(&fixture().join("model.safetensors")).unwrap();
    assert_eq!(pth.tensors.len(), 35);
    assert_eq!(pth, st);
}

#[test]
fn pth_never_executes_code_and_broken_files_are_named() {
    let _rng = common::rng_turn();
    let marker = Path::new("/tmp/nvit-pth-executed-code");
    let _ = std::fs::remove_file(marker);
    let err = StateDict::read(&fixture().join("evil.pth")).err().expect("evil.pth must be rejected").to_string();
    assert!(!marker.exists(), "reading evil.pth ran its payload");
    assert!(err.contains("evil.pth: cannot read PyTorch checkpoint"), "{err}");
    assert!(err.contains("posix.system"), "the error names the object it refused: {err}");

    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture().join("model.pth")).unwrap();
    let truncated = dir.path().join("truncated.pth");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = StateDict::read(&truncated).err().unwrap().to_string();
    assert!(err.starts_with(&format!("{}: cannot read PyTorch checkpoint", truncated.display())), "{err}");
}
