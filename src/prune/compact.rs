//! Compaction (METHOD.md section 5, step 5): drop every slice that [`Masks`] zero and build a
//! dense model with the surviving per-block widths and embedding widths. Its output equals the
//! masked model's: the softmax scale stays the original head width's.
//!
//! It works on the exported state dict (PyTorch layout, split `q`/`k`/`v`), selecting the kept
//! indices along each axis, and imports the result, so the compact model is checked like any
//! checkpoint.

use anyhow::Result;
use burn::tensor::backend::Backend;

use super::structures::Masks;
use crate::model::checkpoint::{export_model, import_model, StateDict};
use crate::model::{BlockDims, Model, ModelConfig};

fn kept(mask: &[f32]) -> Vec<usize> {
    mask.iter().enumerate().filter(|(_, m)| **m != 0.0).map(|(i, _)| i).collect()
}

/// Keeps `idx` along `axis` of a row-major tensor.
fn select(shape: &[usize], data: &[f32], axis: usize, idx: &[usize]) -> (Vec<usize>, Vec<f32>) {
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let n = shape[axis];
    let mut out = Vec::with_capacity(outer * idx.len() * inner);
    for o in 0..outer {
        for &i in idx {
            let start = (o * n + i) * inner;
            out.extend_from_slice(&data[start..start + inner]);
        }
    }
    let mut new_shape = shape.to_vec();
    new_shape[axis] = idx.len();
    (new_shape, out)
}

/// The compact model of `model` under `masks` (zero = pruned).
pub fn compact<B: Backend>(model: &Model<B>, masks: &Masks, device: &B::Device) -> Result<Model<B>> {
    let config = model.config();
    let stages = config.stages();
    let mut sd = export_model(model, false);
    let emb: Vec<Vec<usize>> = masks.emb.iter().map(|m| kept(m)).collect();
    if let Some(g) = emb.iter().position(|e| e.is_empty()) {
        anyhow::bail!("compaction would remove every embedding channel of stage {g}");
    }
    // A tensor this model does not have (a class token, a bias, LayerScale) is left out: the
    // import below checks every tensor the compact model needs against its shape.
    let mut take = |name: &str, picks: &[(usize, &[usize])]| {
        let Some((mut shape, mut data)) = sd.tensors.remove(name) else { return };
        for (axis, idx) in picks {
            (shape, data) = select(&shape, &data, *axis, idx);
        }
        sd.tensors.insert(name.to_string(), (shape, data));
    };
    let (first, last) = (&emb[0], emb.last().expect("a model has a stage"));
    take("patch_embed.proj.weight", &[(0, first)]);
    take("patch_embed.proj.bias", &[(0, first)]);
    for norm in ["norm", "fc_norm"] {
        take(&format!("{norm}.weight"), &[(0, last)]);
        take(&format!("{norm}.bias"), &[(0, last)]);
    }
    // Block `b`'s tensors: their prefix, and for a Swin the relative position table.
    let mut prefixes = Vec::new();
    match &config {
        ModelConfig::Deit(c) => {
            for token in ["cls_token", "dist_token", "reg_token", "pos_embed"] {
                take(token, &[(2, first)]);
            }
            take("head.weight", &[(1, first)]);
            take("head_dist.weight", &[(1, first)]);
            prefixes.extend((0..c.depth()).map(|b| format!("blocks.{b}")));
        }
        ModelConfig::Swin(c) => {
            take("patch_embed.norm.weight", &[(0, first)]);
            take("patch_embed.norm.bias", &[(0, first)]);
            take("head.fc.weight", &[(1, last)]);
            for (i, stage) in c.stages.iter().enumerate() {
                if i > 0 {
                    // The merging reads four neighbours' channels of the previous stage, concatenated.
                    let width = stages[i - 1].0;
                    let four: Vec<usize> = (0..4).flat_map(|k| emb[i - 1].iter().map(move |c| k * width + c)).collect();
                    let p = format!("layers.{i}.downsample");
                    take(&format!("{p}.norm.weight"), &[(0, &four)]);
                    take(&format!("{p}.norm.bias"), &[(0, &four)]);
                    take(&format!("{p}.reduction.weight"), &[(0, &emb[i]), (1, &four)]);
                }
                prefixes.extend((0..stage.blocks.len()).map(|j| format!("layers.{i}.blocks.{j}")));
            }
        }
    }
    let dims: Vec<BlockDims> = stages.iter().flat_map(|(_, blocks)| blocks.clone()).collect();
    for (b, ((units, d), p)) in masks.blocks.iter().zip(&dims).zip(&prefixes).enumerate() {
        let emb = &emb[units.stage];
        let (heads, qk, v, mlp) = (kept(&units.head), kept(&units.qk), kept(&units.v), kept(&units.mlp));
        if heads.is_empty() || qk.is_empty() || v.is_empty() || mlp.is_empty() {
            anyhow::bail!("compaction would remove a whole structure of block {b}");
        }
        let q_rows: Vec<usize> = heads.iter().flat_map(|h| qk.iter().map(move |j| h * d.qk + j)).collect();
        let v_rows: Vec<usize> = heads.iter().flat_map(|h| v.iter().map(move |j| h * d.v + j)).collect();
        for n in ["norm1", "norm2"] {
            take(&format!("{p}.{n}.weight"), &[(0, emb)]);
            take(&format!("{p}.{n}.bias"), &[(0, emb)]);
        }
        for (n, rows) in [("q", &q_rows), ("k", &q_rows), ("v", &v_rows)] {
            take(&format!("{p}.attn.{n}.weight"), &[(0, rows), (1, emb)]);
            take(&format!("{p}.attn.{n}.bias"), &[(0, rows)]);
        }
        take(&format!("{p}.attn.proj.weight"), &[(0, emb), (1, &v_rows)]);
        take(&format!("{p}.attn.proj.bias"), &[(0, emb)]);
        take(&format!("{p}.mlp.fc1.weight"), &[(0, &mlp), (1, emb)]);
        take(&format!("{p}.mlp.fc1.bias"), &[(0, &mlp)]);
        take(&format!("{p}.mlp.fc2.weight"), &[(0, emb), (1, &mlp)]);
        take(&format!("{p}.mlp.fc2.bias"), &[(0, emb)]);
        take(&format!("{p}.ls1.gamma"), &[(0, emb)]);
        take(&format!("{p}.ls2.gamma"), &[(0, emb)]);
        if matches!(config, ModelConfig::Swin(_)) {
            take(&format!("{p}.attn.relative_position_bias_table"), &[(1, &heads)]);
        }
    }
    import_model(&StateDict { tensors: sd.tensors }, &masks.surviving(&config), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{SwinConfig, VitConfig};
    use crate::prune::structures::{ParamSet, Structure};
    use burn::backend::NdArray;
    use burn::tensor::{Distribution, Tensor};

    /// Prunes `units` of `model`, compacts it, and checks that the compact model computes
    /// what the masked one computes; returns the compact model.
    fn masked_equals_compact(config: ModelConfig, units: &[(Structure, usize, Vec<usize>)]) -> (Masks, Model<NdArray>) {
        let device = Default::default();
        let model = config.init::<NdArray>(&device);
        let mut masks = Masks::ones(&config);
        for (s, b, units) in units {
            for &u in units {
                masks.get_mut(*s, *b)[u] = 0.0;
            }
        }
        let masked = masks.apply(model, ParamSet::Pruned);
        let small = compact(&masked, &masks, &device).unwrap();
        assert_eq!(small.config(), masks.surviving(&config));
        let side = config.image_size();
        let x = Tensor::<NdArray, 4>::random([3, 3, side, side], Distribution::Normal(0.0, 1.0), &device);
        let a = masked.forward(x.clone()).logits().into_data().to_vec::<f32>().unwrap();
        let b = small.forward(x).logits().into_data().to_vec::<f32>().unwrap();
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "compact vs masked: {worst}");
        assert!(small.config().params() < config.params());
        (masks, small)
    }

    #[test]
    fn compact_model_computes_what_the_masked_model_computes() {
        let mut c = VitConfig::uniform(16, 4, 3, 24, 3, 3, 2.0, 5, true);
        c.blocks[2] = BlockDims { heads: 2, qk: 6, v: 10, mlp: 20 };
        let (_, small) = masked_equals_compact(
            c.clone().into(),
            &[
                (Structure::Emb, 0, vec![0, 5, 6, 23]),
                (Structure::Head, 0, vec![1]),
                (Structure::Qk, 0, vec![0, 3]),
                (Structure::V, 1, vec![7]),
                (Structure::Mlp, 1, vec![2, 3, 40]),
                (Structure::Head, 2, vec![0]),
                (Structure::Qk, 2, vec![5]),
                (Structure::V, 2, vec![1, 2, 9]),
                (Structure::Mlp, 2, vec![19]),
            ],
        );
        let small = small.config();
        let small = small.as_deit().unwrap();
        assert_eq!(small.embed_dim, 20);
        assert_eq!(small.blocks[0], BlockDims { heads: 2, qk: 6, v: 8, mlp: 48 });
        assert_eq!(small.blocks[1], BlockDims { heads: 3, qk: 8, v: 7, mlp: 45 });
        assert_eq!(small.blocks[2], BlockDims { heads: 1, qk: 5, v: 7, mlp: 19 });
        assert_eq!(small.head_dim, c.head_dim, "the softmax scale stays the original's");
    }

    /// A Swin of three stages (shifted windows in the first two): every stage's EMB, which
    /// the mergings read on one side and write on the other, and a head with its relative
    /// position bias.
    #[test]
    fn compact_swin_computes_what_the_masked_swin_computes() {
        let mut c = SwinConfig::uniform(32, 2, 3, 4, 8, &[2, 2, 1], &[2, 4, 8], 2.0, 5);
        c.stages[1].blocks[1] = BlockDims { heads: 3, qk: 5, v: 6, mlp: 20 };
        let (masks, small) = masked_equals_compact(
            c.clone().into(),
            &[
                (Structure::Emb, 0, vec![1, 6]),
                (Structure::Emb, 1, vec![0, 7, 8, 15]),
                (Structure::Emb, 2, vec![31]),
                (Structure::Head, 1, vec![0]),
                (Structure::Head, 3, vec![2]),
                (Structure::Qk, 3, vec![4]),
                (Structure::V, 2, vec![1, 2]),
                (Structure::Mlp, 4, vec![3, 60]),
            ],
        );
        let widths: Vec<usize> = masks.surviving_dims().iter().map(|(e, _)| *e).collect();
        assert_eq!(widths, [6, 12, 31]);
        let ModelConfig::Swin(small) = small.config() else { panic!("a Swin stays a Swin") };
        assert_eq!(small.stages[1].blocks[1], BlockDims { heads: 2, qk: 4, v: 6, mlp: 20 });
        assert_eq!(small.stages[0].blocks[1].heads, 1);
        assert_eq!(small.head_dim, c.head_dim);
    }
}
