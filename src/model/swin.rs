//! Swin Transformer (Liu et al., "Swin Transformer: Hierarchical Vision Transformer using
//! Shifted Windows", ICCV 2021) as timm's `SwinTransformer`, with NViT's per-block widths:
//! every block its own heads, per-head query/key and value widths and MLP width, every stage
//! its own embedding width. The relative position bias table has a column per head, so it
//! follows the block's heads.
//!
//! A stage is an optional patch merging (2x2 neighbouring tokens concatenated, normalized and
//! projected to the stage's width) then blocks of window attention; odd blocks shift their
//! windows by half a window, and attention between tokens that the cyclic shift brought
//! together from opposite edges is masked. The attention itself is DeiT's
//! ([`super::vit::Attention`], separate Q, K, V), with the bias added to its logits.
//!
//! Field names follow timm's checkpoint keys (`layers.N.blocks.M.attn`, `downsample.reduction`).

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::vit::{drop_path, embed_patches, linear, norm, per_token, Attention, Materialize, Mlp};
use super::BlockDims;

/// PyTorch's LayerNorm epsilon, which timm's Swin keeps.
pub const LN_EPS: f64 = 1e-5;

/// The masked logit between tokens of different regions of a shifted window, as timm's.
const MASKED: f32 = -100.0;

/// One stage's residual width and its blocks' widths.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SwinStage {
    pub embed_dim: usize,
    pub blocks: Vec<BlockDims>,
}

/// Everything that fixes a Swin model's shapes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SwinConfig {
    pub image_size: usize,
    pub patch_size: usize,
    pub in_chans: usize,
    pub num_classes: usize,
    /// Window side in tokens; a stage whose side is at most this is one unshifted window.
    pub window: usize,
    /// The per-head width before pruning: the softmax scale is `head_dim^-0.5` and stays so
    /// when `qk` shrinks, as for DeiT.
    pub head_dim: usize,
    /// Stochastic depth at the last block (linearly less before it, across stages).
    #[serde(default)]
    pub drop_path: f64,
    pub stages: Vec<SwinStage>,
}

impl SwinConfig {
    /// A Swin with timm's layout: the width doubling each stage, `heads[i]` heads of
    /// `embed_dim / heads[0]` channels in stage `i`, MLP `mlp_ratio` times the width.
    #[allow(clippy::too_many_arguments)]
    pub fn uniform(
        image_size: usize,
        patch_size: usize,
        in_chans: usize,
        window: usize,
        embed_dim: usize,
        depths: &[usize],
        heads: &[usize],
        mlp_ratio: f64,
        num_classes: usize,
    ) -> Self {
        let head_dim = embed_dim / heads.first().copied().unwrap_or(1).max(1);
        let stages = depths
            .iter()
            .zip(heads)
            .enumerate()
            .map(|(i, (&depth, &h))| {
                let e = embed_dim << i;
                let dims = BlockDims { heads: h, qk: e / h.max(1), v: e / h.max(1), mlp: (e as f64 * mlp_ratio).round() as usize };
                SwinStage { embed_dim: e, blocks: vec![dims; depth] }
            })
            .collect();
        Self { image_size, patch_size, in_chans, num_classes, window, head_dim, drop_path: 0.0, stages }
    }

    /// `swin-tiny`, `swin-small`, `swin-base`: timm's `swin_*_patch4_window7_224`.
    pub fn preset(name: &str) -> Option<Self> {
        let (embed_dim, depths, heads): (usize, &[usize], &[usize]) = match name {
            "swin-tiny" => (96, &[2, 2, 6, 2], &[3, 6, 12, 24]),
            "swin-small" => (96, &[2, 2, 18, 2], &[3, 6, 12, 24]),
            "swin-base" => (128, &[2, 2, 18, 2], &[4, 8, 16, 32]),
            _ => return None,
        };
        Some(Self::uniform(224, 4, 3, 7, embed_dim, depths, heads, 4.0, 1000))
    }

    pub const PRESETS: [&'static str; 3] = ["swin-tiny", "swin-small", "swin-base"];

    /// Tokens per side in `stage`: the patch grid, halved by each merging before it.
    pub fn side(&self, stage: usize) -> usize {
        (self.image_size / self.patch_size) >> stage
    }

    /// The window side and shift of `stage`'s odd blocks: timm makes a stage no wider than its
    /// window one window, unshifted.
    pub fn window_shift(&self, stage: usize) -> (usize, usize) {
        let side = self.side(stage);
        if side <= self.window {
            (side, 0)
        } else {
            (self.window, self.window / 2)
        }
    }

    /// What this implementation cannot run, named by key; empty when it can.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.stages.is_empty() {
            p.push("stages: a Swin needs at least one stage".to_string());
            return p;
        }
        use super::{out_of_range, MAX_BLOCKS, MAX_CHANNELS, MAX_CLASSES, MAX_IMAGE_SIZE, MAX_WIDTH};
        let bounds = [
            ("image_size", self.image_size, MAX_IMAGE_SIZE),
            ("in_chans", self.in_chans, MAX_CHANNELS),
            ("window", self.window, MAX_IMAGE_SIZE),
            ("head_dim", self.head_dim, MAX_WIDTH),
            ("num_classes", self.num_classes, MAX_CLASSES),
            ("stages", self.stages.len(), 16),
        ];
        for (key, value, max) in bounds {
            if let Some(m) = out_of_range(value, max) {
                p.push(format!("{key}: {m}"));
            }
        }
        for (i, s) in self.stages.iter().enumerate() {
            let wide = s.embed_dim > MAX_WIDTH || s.blocks.iter().any(|d| d.too_wide());
            if s.embed_dim == 0 || wide || out_of_range(s.blocks.len(), MAX_BLOCKS).is_some() {
                p.push(format!("stages[{i}]: needs a width of 1 to {MAX_WIDTH} and 1 to {MAX_BLOCKS} blocks no wider, got E {} and {} blocks", s.embed_dim, s.blocks.len()));
            }
        }
        if !p.is_empty() {
            return p;
        }
        if self.patch_size == 0 || self.image_size % self.patch_size != 0 {
            p.push(format!("patch_size: {} does not divide image_size {}", self.patch_size, self.image_size));
            return p;
        }
        for (i, stage) in self.stages.iter().enumerate() {
            let side = self.side(i);
            let (window, _) = self.window_shift(i);
            if side == 0 || (i > 0 && self.side(i - 1) % 2 != 0) {
                p.push(format!("stages[{i}]: the {}-token side of stage {} cannot be halved", self.side(i.saturating_sub(1)), i.saturating_sub(1)));
            } else if side % window != 0 {
                p.push(format!("window: {window} does not divide stage {i}'s {side}-token side (padding is not implemented)"));
            }
            if stage.blocks.iter().any(|d| d.heads == 0 || d.qk == 0 || d.v == 0 || d.mlp == 0) {
                p.push(format!("stages[{i}]: every block needs at least one head, qk, v and mlp unit"));
            }
        }
        p
    }

    pub fn num_features(&self) -> usize {
        self.stages.last().map_or(0, |s| s.embed_dim)
    }

    /// A randomly initialized model (timm's init: normal std 0.02 weights, zero biases).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Swin<B> {
        let model = self.build(device);
        // Materialized, as DeiT's: a clone of a lazy parameter would sample its own values.
        model.visit(&mut Materialize);
        model
    }

    /// The model with its parameters not drawn yet, as `VitConfig::build`.
    pub(super) fn build<B: Backend>(&self, device: &B::Device) -> Swin<B> {
        let e0 = self.stages[0].embed_dim;
        let scale = (self.head_dim as f64).powf(-0.5);
        let mut prev = e0;
        let layers = self
            .stages
            .iter()
            .enumerate()
            .map(|(i, stage)| {
                let e = stage.embed_dim;
                let downsample = (i > 0).then(|| PatchMerging {
                    norm: layer_norm(4 * prev, device),
                    reduction: LinearConfig::new(4 * prev, e)
                        .with_bias(false)
                        .with_initializer(burn::module::Initializer::Normal { mean: 0.0, std: 0.02 })
                        .init(device),
                });
                prev = e;
                let (window, shift) = self.window_shift(i);
                let blocks = stage
                    .blocks
                    .iter()
                    .enumerate()
                    .map(|(j, d)| SwinBlock::new(e, *d, window, if j % 2 == 1 { shift } else { 0 }, self.side(i), scale, device))
                    .collect();
                SwinLayer { downsample, blocks }
            })
            .collect();
        let model = Swin {
            patch_embed: Conv2dConfig::new([self.in_chans, e0], [self.patch_size, self.patch_size])
                .with_stride([self.patch_size, self.patch_size])
                .init(device),
            patch_norm: layer_norm(e0, device),
            layers,
            norm: layer_norm(self.num_features(), device),
            head: linear(self.num_features(), self.num_classes, device),
            config: self.clone(),
            emb_alive: None,
        };
        model.with_drop_path(self.drop_path)
    }
}

fn layer_norm<B: Backend>(e: usize, device: &B::Device) -> LayerNorm<B> {
    LayerNormConfig::new(e).with_epsilon(LN_EPS).init(device)
}

#[derive(Module, Debug)]
pub struct SwinBlock<B: Backend> {
    pub norm1: LayerNorm<B>,
    pub attn: Attention<B>,
    /// `[(2 window - 1)^2, heads]`: a learned logit per relative offset and head.
    pub relative_position_bias_table: Param<Tensor<B, 2>>,
    pub norm2: LayerNorm<B>,
    pub mlp: Mlp<B>,
    pub window: usize,
    pub shift: usize,
    /// Tokens per side of the stage's map.
    pub side: usize,
    pub drop_path: f64,
    /// For every pair of a window's tokens, its row of the relative position table; built
    /// once, as it depends only on the window.
    #[module(skip)]
    relative_index: Vec<i64>,
    /// `[windows, n * n]`, the shifted windows' mask ([`shift_mask`]); `None` unshifted.
    #[module(skip)]
    shift_mask: Option<Vec<f32>>,
}

impl<B: Backend> SwinBlock<B> {
    /// One block of width `e` with `d`'s widths on a `side x side` map, randomly initialized.
    pub fn new(e: usize, d: BlockDims, window: usize, shift: usize, side: usize, scale: f64, device: &B::Device) -> Self {
        let offsets = (2 * window - 1) * (2 * window - 1);
        Self {
            norm1: layer_norm(e, device),
            attn: Attention::new(e, d, scale, true, device),
            relative_position_bias_table: Param::from_tensor(Tensor::random([offsets, d.heads], Distribution::Normal(0.0, 0.02), device)),
            norm2: layer_norm(e, device),
            mlp: Mlp::new(e, d.mlp, device),
            window,
            shift,
            side,
            drop_path: 0.0,
            relative_index: relative_position_index(window),
            shift_mask: (shift > 0).then(|| shift_mask(side, window, shift)),
        }
    }

    /// `[batch, side * side, e] -> [batch, side * side, e]`; `alive` as [`Swin::emb_alive`]'s
    /// entry for the block's stage.
    pub fn forward(&self, x: Tensor<B, 3>, alive: Option<&Tensor<B, 1>>) -> Tensor<B, 3> {
        let [b, l, e] = x.dims();
        let side = self.side;
        let (w, s) = (self.window, self.shift as i64);
        let per_side = side / w;
        let n = w * w;
        let y = norm(&self.norm1, x.clone(), alive, LN_EPS).reshape([b, side, side, e]);
        // Burn's `roll` by k moves element i + k to i, PyTorch's moves element i - k there:
        // timm's roll by -shift is Burn's by +shift.
        let y = if s > 0 { y.roll(&[s, s], &[1, 2]) } else { y };
        let windows = y.reshape([b, per_side, w, per_side, w, e]).permute([0, 1, 3, 2, 4, 5]).reshape([b * per_side * per_side, n, e]);
        let bias = self.attention_bias(b, &x.device());
        let out = self.attn.forward(windows, Some(bias));
        let y = out.reshape([b, per_side, per_side, w, w, e]).permute([0, 1, 3, 2, 4, 5]).reshape([b, side, side, e]);
        let y = if s > 0 { y.roll(&[-s, -s], &[1, 2]) } else { y };
        let x = x + drop_path(y.reshape([b, l, e]), self.drop_path);
        x.clone() + drop_path(self.mlp.forward(norm(&self.norm2, x, alive, LN_EPS)), self.drop_path)
    }

    /// `[batch * windows, heads, n, n]`: each head's relative position bias, plus the shifted
    /// windows' mask.
    pub(crate) fn attention_bias(&self, batch: usize, device: &B::Device) -> Tensor<B, 4> {
        let (w, n, h) = (self.window, self.window * self.window, self.attn.heads);
        let windows = (self.side / w) * (self.side / w);
        let index = Tensor::<B, 1, Int>::from_data(TensorData::new(self.relative_index.clone(), [n * n]), device);
        let relative = self.relative_position_bias_table.val().select(0, index).reshape([n, n, h]).permute([2, 0, 1]); // [h, n, n]
        let Some(mask) = &self.shift_mask else {
            return relative.unsqueeze::<4>().expand([batch * windows, h, n, n]);
        };
        let mask = super::float_tensor::<B, 4>(mask.clone(), [1, windows, 1, n * n], device).reshape([1, windows, 1, n, n]);
        let bias: Tensor<B, 5> = relative.reshape([1, 1, h, n, n]) + mask;
        bias.expand([batch, windows, h, n, n]).reshape([batch * windows, h, n, n])
    }
}

/// For every pair of tokens `(i, j)` of a `w x w` window, row-major, the row of their offset
/// in the relative position table.
fn relative_position_index(w: usize) -> Vec<i64> {
    let n = w * w;
    let mut index = Vec::with_capacity(n * n);
    for i in 0..n {
        for j in 0..n {
            let (dr, dc) = ((i / w) as i64 - (j / w) as i64, (i % w) as i64 - (j % w) as i64);
            index.push((dr + w as i64 - 1) * (2 * w as i64 - 1) + dc + w as i64 - 1);
        }
    }
    index
}

/// `[windows, n * n]`: 0 between tokens of one region of the shifted map, [`MASKED`] between
/// tokens that the cyclic shift brought together from opposite edges.
fn shift_mask(side: usize, w: usize, shift: usize) -> Vec<f32> {
    let region = |p: usize| if p < side - w { 0 } else if p < side - shift { 1 } else { 2 };
    let per_side = side / w;
    let mut out = Vec::with_capacity(per_side * per_side * w.pow(4));
    for wr in 0..per_side {
        for wc in 0..per_side {
            let ids: Vec<usize> = (0..w * w).map(|t| 3 * region(wr * w + t / w) + region(wc * w + t % w)).collect();
            for a in &ids {
                out.extend(ids.iter().map(|b| if a == b { 0.0 } else { MASKED }));
            }
        }
    }
    out
}

/// 2x2 neighbouring tokens concatenated (timm's order: (0,0), (1,0), (0,1), (1,1) as
/// (row, column)), normalized and projected to the next stage's width.
#[derive(Module, Debug)]
pub struct PatchMerging<B: Backend> {
    pub norm: LayerNorm<B>,
    pub reduction: Linear<B>,
}

impl<B: Backend> PatchMerging<B> {
    /// `[batch, side * side, e] -> [batch, side / 2 * side / 2, e']`; `alive` as the previous
    /// stage's [`Swin::emb_alive`] entry.
    pub fn forward(&self, x: Tensor<B, 3>, side: usize, alive: Option<&Tensor<B, 1>>) -> Tensor<B, 3> {
        let [b, _, e] = x.dims();
        let half = side / 2;
        let x = x.reshape([b, half, 2, half, 2, e]).permute([0, 1, 3, 4, 2, 5]).reshape([b, half * half, 4 * e]);
        let alive = alive.map(|a| a.clone().repeat_dim(0, 4));
        per_token(&self.reduction, norm(&self.norm, x, alive.as_ref(), LN_EPS))
    }
}

#[derive(Module, Debug)]
pub struct SwinLayer<B: Backend> {
    pub downsample: Option<PatchMerging<B>>,
    pub blocks: Vec<SwinBlock<B>>,
}

#[derive(Module, Debug)]
pub struct Swin<B: Backend> {
    pub patch_embed: Conv2d<B>,
    pub patch_norm: LayerNorm<B>,
    pub layers: Vec<SwinLayer<B>>,
    pub norm: LayerNorm<B>,
    pub head: Linear<B>,
    #[module(skip)]
    pub config: SwinConfig,
    /// Per stage, 1 for each embedding channel that survives pruning and 0 for a pruned one;
    /// `None` when nothing is pruned.
    #[module(skip)]
    pub emb_alive: Option<Vec<Vec<f32>>>,
}

impl<B: Backend> Swin<B> {
    /// Stochastic depth at `rate` in the last block, rising linearly from 0 in the first,
    /// counted across stages (timm's `calculate_drop_path_rates`).
    pub fn with_drop_path(mut self, rate: f64) -> Self {
        let depth: usize = self.layers.iter().map(|l| l.blocks.len()).sum();
        for (i, b) in self.layers.iter_mut().flat_map(|l| l.blocks.iter_mut()).enumerate() {
            b.drop_path = if depth > 1 { rate * i as f64 / (depth - 1) as f64 } else { rate };
        }
        self.config.drop_path = rate;
        self
    }

    /// `[batch, channels, height, width] -> [batch, classes]`.
    pub fn forward(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        let (x, [side, _]) = embed_patches(&self.patch_embed, images);
        let device = x.device();
        let alive: Vec<Option<Tensor<B, 1>>> = match &self.emb_alive {
            Some(stages) => stages.iter().map(|a| Some(super::float_tensor::<B, 1>(a.clone(), [a.len()], &device))).collect(),
            None => vec![None; self.layers.len()],
        };
        let mut x = norm(&self.patch_norm, x, alive[0].as_ref(), LN_EPS);
        let mut side = side;
        for (i, layer) in self.layers.iter().enumerate() {
            if let Some(merge) = &layer.downsample {
                x = merge.forward(x, side, alive[i - 1].as_ref());
                side /= 2;
            }
            for block in &layer.blocks {
                x = block.forward(x, alive[i].as_ref());
            }
        }
        let x = norm(&self.norm, x, alive[self.layers.len() - 1].as_ref(), LN_EPS);
        let [b, _, e] = x.dims();
        self.head.forward(x.mean_dim(1).reshape([b, e]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    #[test]
    fn relative_positions_index_timms_table_layout() {
        // timm's get_relative_position_index(2, 2): offsets (dr + 1) * 3 + (dc + 1).
        assert_eq!(relative_position_index(2), [4, 3, 1, 0, 5, 4, 2, 1, 7, 6, 4, 3, 8, 7, 5, 4]);
    }

    #[test]
    fn the_shift_mask_separates_regions_only_in_edge_windows() {
        // 4 x 4 tokens, windows of 2, shift 1: the top-left window holds one region; the
        // bottom-right one four (rows 2 | 3 x columns 2 | 3), so only its diagonal is open.
        let mask = shift_mask(4, 2, 1);
        assert_eq!(mask.len(), 4 * 16);
        assert!(mask[..16].iter().all(|&m| m == 0.0));
        let last = &mask[48..];
        for i in 0..4 {
            for j in 0..4 {
                assert_eq!(last[i * 4 + j], if i == j { 0.0 } else { MASKED }, "({i}, {j})");
            }
        }
    }

    /// Under autodiff the attention is written out, the bias added to the logits; without, the
    /// backend's fused kernel takes the bias. Both compute the same model.
    #[test]
    fn autodiff_and_fused_attention_agree() {
        use burn::backend::Autodiff;
        use burn::module::AutodiffModule;
        let device = Default::default();
        let model = SwinConfig::uniform(16, 2, 3, 2, 8, &[2, 2], &[2, 4], 2.0, 5).init::<Autodiff<NdArray>>(&device);
        let x = Tensor::<Autodiff<NdArray>, 4>::random([2, 3, 16, 16], Distribution::Default, &device);
        let written = model.forward(x.clone()).into_data().to_vec::<f32>().unwrap();
        let fused = model.valid().forward(x.inner()).into_data().to_vec::<f32>().unwrap();
        let worst = written.iter().zip(&fused).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "{worst}");
    }

    #[test]
    fn presets_shape_the_forward_pass_and_small_stages_are_one_window() {
        let config = SwinConfig::uniform(32, 2, 3, 4, 8, &[2, 2, 2], &[1, 2, 4], 2.0, 5);
        assert!(config.problems().is_empty(), "{:?}", config.problems());
        assert_eq!((0..3).map(|i| config.window_shift(i)).collect::<Vec<_>>(), [(4, 2), (4, 2), (4, 0)]);
        let model = config.init::<NdArray>(&Default::default());
        assert_eq!(model.layers[1].downsample.as_ref().unwrap().reduction.weight.dims(), [32, 16]);
        assert_eq!(model.layers[2].blocks[0].relative_position_bias_table.dims(), [49, 4]);
        let out = model.forward(Tensor::random([2, 3, 32, 32], Distribution::Default, &Default::default()));
        assert_eq!(out.dims(), [2, 5]);
        let bad = SwinConfig { window: 3, ..config };
        assert!(bad.problems().iter().any(|p| p.starts_with("window: 3 does not divide stage 0's 16-token side")), "{:?}", bad.problems());
        assert!(SwinConfig::PRESETS.iter().all(|p| SwinConfig::preset(p).unwrap().problems().is_empty()));
    }
}
