//! python/nvit.py, the PyTorch module that builds the runner's exported models outside it:
//! `tests/fixtures/make_pytorch_loader_fixture.py` saved a pruned, distilled model with odd
//! widths through it, an input batch and its logits, and its logits on the timm parity
//! fixture. No Python runs here.

use crate::common;
use std::path::{Path, PathBuf};

use burn::backend::NdArray;
use burn::tensor::{Tensor, TensorData};
use nvit::model::checkpoint::{self, StateDict};
use nvit::model::BlockDims;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The runner reads what nvit.py writes and computes nvit.py's logits from it.
#[test]
fn the_runner_computes_nvit_py_logits_from_its_files() {
    let _rng = common::rng_turn();
    let dir = fixtures().join("nvit_py_pruned_16px");
    let device = Default::default();
    let model = checkpoint::load::<NdArray>(&dir, &device).unwrap().into_deit("the loader test").unwrap();
    let widths = |heads, qk, v, mlp| BlockDims { heads, qk, v, mlp };
    assert_eq!(model.config.blocks, [widths(3, 5, 7, 37), widths(1, 8, 8, 16), widths(2, 3, 9, 11)]);
    assert!(model.config.distilled && model.config.head_dim == 8);

    let io = StateDict::read(&dir.join("io.safetensors")).unwrap();
    let (shape, input) = &io.tensors["input"];
    let x = Tensor::<NdArray, 4>::from_data(TensorData::new(input.clone(), [shape[0], shape[1], shape[2], shape[3]]), &device);
    let ours = model.forward(x).logits().into_data().to_vec::<f32>().unwrap();
    let (_, torch) = &io.tensors["logits"];
    let worst = max_abs_diff(&ours, torch);
    let scale = torch.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "max |runner - nvit.py| = {worst} (logits up to {scale})");
    assert!(scale > 0.1, "the fixture's logits are not trivially small");
}

/// What the runner exports is, tensor for tensor, what nvit.py saves: same names (fused `qkv`
/// only where qk == v), shapes and values, so nvit.py reads the runner's exports.
#[test]
fn the_runner_exports_what_nvit_py_saves() {
    let _rng = common::rng_turn();
    let dir = fixtures().join("nvit_py_pruned_16px");
    let model = checkpoint::load::<NdArray>(&dir, &Default::default()).unwrap().into_deit("the loader test").unwrap();
    let theirs = StateDict::read(&dir.join(checkpoint::WEIGHTS)).unwrap();
    let ours = checkpoint::export(&model);
    let names = |sd: &StateDict| sd.tensors.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&ours), names(&theirs));
    assert!(theirs.tensors.contains_key("blocks.1.attn.qkv.weight") && theirs.tensors.contains_key("blocks.0.attn.q.weight"));
    for (name, (shape, values)) in &theirs.tensors {
        let (our_shape, our_values) = &ours.tensors[name];
        assert_eq!(our_shape, shape, "{name}");
        assert_eq!(max_abs_diff(our_values, values), 0.0, "{name}");
    }
    let dims: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join(checkpoint::DIMS)).unwrap()).unwrap();
    assert_eq!(dims, serde_json::to_value(&model.config).unwrap(), "dims.json as the runner writes it");
}

/// nvit.py built timm's dense DeiT from its checkpoint and computed timm's logits (the script
/// asserts it at 1e-5; this checks the record it left).
#[test]
fn nvit_py_computed_timm_logits_on_the_timm_fixture() {
    let _rng = common::rng_turn();
    let io = StateDict::read(&fixtures().join("nvit_py_pruned_16px/io.safetensors")).unwrap();
    let timm = StateDict::read(&fixtures().join("timm_deit_tiny_distilled_32px/io.safetensors")).unwrap();
    let (_, ours) = &io.tensors["timm_fixture_logits"];
    let (_, theirs) = &timm.tensors["logits"];
    assert!(max_abs_diff(ours, theirs) < 1e-5);
}

/// A Swin through nvit.py: the script built timm's Swin fixture from the runner's dims and
/// matched timm, and saved a Swin with per-block widths (a block of 3 heads of qk 5 and v 7,
/// a 40-wide last stage) that the runner reads and computes nvit.py's logits from.
#[test]
fn the_runner_computes_nvit_py_swin_logits_and_nvit_py_computes_timms() {
    let _rng = common::rng_turn();
    let dir = fixtures().join("nvit_py_swin_32px");
    let device = Default::default();
    let model = checkpoint::load::<NdArray>(&dir, &device).unwrap();
    let nvit::model::ModelConfig::Swin(c) = model.config() else { panic!("a Swin") };
    assert_eq!((c.stages[1].blocks[1], c.stages[2].embed_dim), (BlockDims { heads: 3, qk: 5, v: 7, mlp: 9 }, 40));
    let io = StateDict::read(&dir.join("io.safetensors")).unwrap();
    let x = Tensor::<NdArray, 4>::from_data(TensorData::new(io.tensors["input"].1.clone(), [4, 3, 32, 32]), &device);
    let ours = model.forward(x).logits().into_data().to_vec::<f32>().unwrap();
    let worst = max_abs_diff(&ours, &io.tensors["logits"].1);
    assert!(worst < 1e-4, "max |runner - nvit.py| = {worst}");
    let timm = StateDict::read(&fixtures().join("timm_swin_32px/io.safetensors")).unwrap();
    let worst = max_abs_diff(&io.tensors["timm_fixture_logits"].1, &timm.tensors["logits"].1);
    assert!(worst < 1e-4, "max |nvit.py - timm| = {worst}");
}
