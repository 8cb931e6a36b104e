//! Swin parity with timm: `tests/fixtures/make_swin_fixture.py` wrote a random timm Swin
//! (32 px, patch 2, window 4, widths 16 / 32 / 64, heads 2 / 4 / 8, two blocks a stage: the
//! first two stages shift their odd blocks' windows, the last is one window), an input batch
//! and timm's eval logits.

use crate::common;
use std::path::{Path, PathBuf};

use burn::backend::NdArray;
use burn::tensor::{Tensor, TensorData};
use nvit::model::checkpoint::{self, StateDict};
use nvit::model::{BlockDims, SwinConfig};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/timm_swin_32px")
}

fn hint() -> SwinConfig {
    SwinConfig::uniform(32, 2, 3, 4, 16, &[2, 2, 2], &[2, 4, 8], 4.0, 10)
}

fn logits(model: &nvit::model::Swin<NdArray>) -> (Vec<f32>, Vec<f32>) {
    let io = StateDict::read(&fixture().join("io.safetensors")).unwrap();
    let (shape, input) = &io.tensors["input"];
    assert_eq!(shape, &[4, 3, 32, 32]);
    let x = Tensor::<NdArray, 4>::from_data(TensorData::new(input.clone(), [4, 3, 32, 32]), &Default::default());
    (model.forward(x).into_data().to_vec::<f32>().unwrap(), io.tensors["logits"].1.clone())
}

#[test]
fn logits_match_timm_to_1e4() {
    let _rng = common::rng_turn();
    let device = Default::default();
    let sd = StateDict::read(&fixture().join("model.safetensors")).unwrap();
    let config = checkpoint::infer_swin_config(&sd, &hint()).unwrap();
    assert_eq!(config, hint(), "widths, heads and window read from the checkpoint's shapes");
    let model = checkpoint::import_swin::<NdArray>(&sd, &config, &device).unwrap();
    let (ours, timm) = logits(&model);
    assert_eq!(ours.len(), timm.len());
    let worst = ours.iter().zip(&timm).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    let scale = timm.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "max |ours - timm| = {worst} (logits up to {scale})");
    assert!(scale > 0.1, "the fixture's logits are not trivially small");

    // Out again in timm's naming, tensor for tensor what timm wrote.
    assert_eq!(checkpoint::export_swin(&model), sd);
    // The .pth holds the same tensors.
    assert_eq!(StateDict::read(&fixture().join("model.pth")).unwrap(), sd);
}

/// A block whose query/key and value widths differ is written with split `q`/`k`/`v` and read
/// back bit-exactly, its relative position table a column per remaining head.
#[test]
fn per_block_widths_round_trip_through_timm_naming() {
    let _rng = common::rng_turn();
    let device = Default::default();
    let mut config = hint();
    config.stages[1].blocks[1] = BlockDims { heads: 3, qk: 5, v: 7, mlp: 9 };
    config.stages[2].embed_dim = 40;
    let model = config.init::<NdArray>(&device);
    let sd = checkpoint::export_swin(&model);
    assert!(sd.tensors.contains_key("layers.1.blocks.1.attn.q.weight") && sd.tensors.contains_key("layers.1.blocks.0.attn.qkv.weight"));
    assert_eq!(sd.tensors["layers.1.blocks.1.attn.relative_position_bias_table"].0, [49, 3]);
    assert_eq!(checkpoint::infer_swin_config(&sd, &hint()).unwrap(), config);
    let back = checkpoint::import_swin::<NdArray>(&sd, &config, &device).unwrap();
    assert_eq!(checkpoint::export_swin(&back), sd);
}

#[test]
fn a_checkpoint_that_does_not_fit_names_every_tensor() {
    let _rng = common::rng_turn();
    let device = Default::default();
    let mut sd = StateDict::read(&fixture().join("model.safetensors")).unwrap();
    sd.tensors.remove("layers.1.downsample.reduction.weight");
    sd.tensors.get_mut("layers.0.blocks.1.attn.relative_position_bias_table").unwrap().0 = vec![25, 2];
    let err = checkpoint::import_swin::<NdArray>(&sd, &hint(), &device).err().unwrap().to_string();
    assert!(err.contains("missing tensor `layers.1.downsample.reduction.weight` (expected shape [32, 64])"), "{err}");
    assert!(err.contains("tensor `layers.0.blocks.1.attn.relative_position_bias_table` has shape [25, 2], expected [49, 2]"), "{err}");
    let odd = SwinConfig { window: 3, ..hint() };
    let err = checkpoint::import_swin::<NdArray>(&sd, &odd, &device).err().unwrap().to_string();
    assert!(err.contains("window: 3 does not divide stage 0's 16-token side"), "{err}");
}
