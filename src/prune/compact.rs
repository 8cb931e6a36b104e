//! Compaction (METHOD.md section 5, step 5): drop every slice that [`Masks`] zero and build a
//! dense model with the surviving per-block widths and embedding width. Its output equals the
//! masked model's: the softmax scale stays the original head width's.
//!
//! It works on the exported state dict (PyTorch layout, split `q`/`k`/`v`), selecting the kept
//! indices along each axis, and imports the result, so the compact model is checked like any
//! checkpoint.

use anyhow::Result;
use burn::tensor::backend::Backend;

use super::structures::Masks;
use crate::model::checkpoint::{export_split, import, StateDict};
use crate::model::{BlockDims, Vit, VitConfig};

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
pub fn compact<B: Backend>(model: &Vit<B>, masks: &Masks, device: &B::Device) -> Result<Vit<B>> {
    let c = &model.config;
    let mut sd = export_split(model);
    let emb = kept(&masks.emb);
    if emb.is_empty() {
        anyhow::bail!("compaction would remove every embedding channel");
    }
    let mut take = |name: &str, picks: &[(usize, &[usize])]| {
        let (mut shape, mut data) = sd.tensors.remove(name).unwrap_or_else(|| panic!("exported tensor `{name}`"));
        for (axis, idx) in picks {
            (shape, data) = select(&shape, &data, *axis, idx);
        }
        sd.tensors.insert(name.to_string(), (shape, data));
    };
    take("patch_embed.proj.weight", &[(0, &emb)]);
    take("patch_embed.proj.bias", &[(0, &emb)]);
    take("cls_token", &[(2, &emb)]);
    take("pos_embed", &[(2, &emb)]);
    take("norm.weight", &[(0, &emb)]);
    take("norm.bias", &[(0, &emb)]);
    take("head.weight", &[(1, &emb)]);
    if c.distilled {
        take("dist_token", &[(2, &emb)]);
        take("head_dist.weight", &[(1, &emb)]);
    }
    let mut blocks = Vec::new();
    for (b, (units, d)) in masks.blocks.iter().zip(&c.blocks).enumerate() {
        let p = format!("blocks.{b}");
        let (heads, qk, v, mlp) = (kept(&units.head), kept(&units.qk), kept(&units.v), kept(&units.mlp));
        if heads.is_empty() || qk.is_empty() || v.is_empty() || mlp.is_empty() {
            anyhow::bail!("compaction would remove a whole structure of block {b}");
        }
        let q_rows: Vec<usize> = heads.iter().flat_map(|h| qk.iter().map(move |j| h * d.qk + j)).collect();
        let v_rows: Vec<usize> = heads.iter().flat_map(|h| v.iter().map(move |j| h * d.v + j)).collect();
        for n in ["norm1", "norm2"] {
            take(&format!("{p}.{n}.weight"), &[(0, &emb)]);
            take(&format!("{p}.{n}.bias"), &[(0, &emb)]);
        }
        for (n, rows) in [("q", &q_rows), ("k", &q_rows), ("v", &v_rows)] {
            take(&format!("{p}.attn.{n}.weight"), &[(0, rows), (1, &emb)]);
            take(&format!("{p}.attn.{n}.bias"), &[(0, rows)]);
        }
        take(&format!("{p}.attn.proj.weight"), &[(0, &emb), (1, &v_rows)]);
        take(&format!("{p}.attn.proj.bias"), &[(0, &emb)]);
        take(&format!("{p}.mlp.fc1.weight"), &[(0, &mlp), (1, &emb)]);
        take(&format!("{p}.mlp.fc1.bias"), &[(0, &mlp)]);
        take(&format!("{p}.mlp.fc2.weight"), &[(0, &emb), (1, &mlp)]);
        take(&format!("{p}.mlp.fc2.bias"), &[(0, &emb)]);
        blocks.push(BlockDims { heads: heads.len(), qk: qk.len(), v: v.len(), mlp: mlp.len() });
    }
    let config = VitConfig { embed_dim: emb.len(), blocks, ..c.clone() };
    import(&StateDict { tensors: sd.tensors }, &config, device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prune::structures::{ParamSet, Structure};
    use burn::backend::NdArray;
    use burn::tensor::{Distribution, Tensor};

    #[test]
    fn compact_model_computes_what_the_masked_model_computes() {
        let device = Default::default();
        let mut c = VitConfig::uniform(16, 4, 3, 24, 3, 3, 2.0, 5, true);
        c.blocks[2] = BlockDims { heads: 2, qk: 6, v: 10, mlp: 20 };
        let model = c.init::<NdArray>(&device);
        let mut masks = Masks::ones(&c);
        for (s, b, units) in [
            (Structure::Emb, 0, vec![0, 5, 6, 23]),
            (Structure::Head, 0, vec![1]),
            (Structure::Qk, 0, vec![0, 3]),
            (Structure::V, 1, vec![7]),
            (Structure::Mlp, 1, vec![2, 3, 40]),
            (Structure::Head, 2, vec![0]),
            (Structure::Qk, 2, vec![5]),
            (Structure::V, 2, vec![1, 2, 9]),
            (Structure::Mlp, 2, vec![19]),
        ] {
            for u in units {
                masks.get_mut(s, b)[u] = 0.0;
            }
        }
        let masked = masks.apply(model.clone(), ParamSet::Pruned);
        let small = compact(&masked, &masks, &device).unwrap();
        assert_eq!(small.config.embed_dim, 20);
        assert_eq!(small.config.blocks[0], BlockDims { heads: 2, qk: 6, v: 8, mlp: 48 });
        assert_eq!(small.config.blocks[1], BlockDims { heads: 3, qk: 8, v: 7, mlp: 45 });
        assert_eq!(small.config.blocks[2], BlockDims { heads: 1, qk: 5, v: 7, mlp: 19 });
        assert_eq!(masks.surviving_dims(), (20, small.config.blocks.clone()));
        assert_eq!(small.config.head_dim, c.head_dim, "the softmax scale stays the original's");

        let x = Tensor::<NdArray, 4>::random([3, 3, 16, 16], Distribution::Normal(0.0, 1.0), &device);
        let a = masked.forward(x.clone()).logits().into_data().to_vec::<f32>().unwrap();
        let b = small.forward(x).logits().into_data().to_vec::<f32>().unwrap();
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "compact vs masked: {worst}");
        assert!(small.config.params() < c.params());
    }
}
