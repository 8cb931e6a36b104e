//! The model families: the DeiT-style ViT with per-block widths (METHOD.md section 1) and Swin,
//! their presets, parameter and FLOP counts, timm checkpoint import/export, and `[model]`.

pub mod checkpoint;
mod family;
pub mod flops;
mod fused;
mod pth;
mod swin;
mod timing;
mod vit;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use family::{Model, ModelConfig};
pub use fused::bench as kernels;
pub use timing::Timing;
pub use swin::{PatchMerging, Swin, SwinBlock, SwinConfig, SwinLayer, SwinStage};
pub use vit::{with_drop_path_seed, Attention, Block, Mlp, Vit, VitOutput, LN_EPS};

/// Bounds on every size a key, a `dims.json` or a checkpoint gives, checked before anything is
/// allocated: far above any ViT trained, far below what would exhaust memory when multiplied.
pub const MAX_IMAGE_SIZE: usize = 4096;
pub const MAX_CHANNELS: usize = 64;
pub const MAX_WIDTH: usize = 65_536;
pub const MAX_BLOCKS: usize = 1024;
pub const MAX_CLASSES: usize = 1_000_000;
pub const MAX_MLP_RATIO: f64 = 64.0;

/// `value` outside `1..=max`, as a message; `None` when within.
pub(crate) fn out_of_range(value: usize, max: usize) -> Option<String> {
    (value == 0 || value > max).then(|| format!("must be from 1 to {max}, got {value}"))
}

/// A float tensor from f32 values, stored in the backend's own float type: `from_data` would
/// keep f32, and an f64 model would silently compute part of its graph in f32.
pub fn float_tensor<B: burn::tensor::backend::Backend, const D: usize>(
    values: Vec<f32>,
    shape: [usize; D],
    device: &B::Device,
) -> burn::tensor::Tensor<B, D> {
    let data = burn::tensor::TensorData::new(values, shape).convert::<B::FloatElem>();
    burn::tensor::Tensor::from_data(data, device)
}

/// The widths of one transformer block: what NViT prunes. `E` is shared, so it lives in
/// [`VitConfig`], not here.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct BlockDims {
    pub heads: usize,
    /// Per-head query/key width.
    pub qk: usize,
    /// Per-head value width.
    pub v: usize,
    /// MLP hidden width.
    pub mlp: usize,
}

impl BlockDims {
    /// Whether a width, or the attention's heads x width, exceeds [`MAX_WIDTH`].
    pub(crate) fn too_wide(&self) -> bool {
        [self.heads, self.qk, self.v, self.mlp].iter().any(|w| *w > MAX_WIDTH) || self.heads * self.qk.max(self.v) > MAX_WIDTH
    }
}

/// Everything that fixes a model's shapes; written as `dims.json` beside exported weights.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VitConfig {
    pub image_size: usize,
    pub patch_size: usize,
    pub in_chans: usize,
    pub embed_dim: usize,
    pub num_classes: usize,
    /// A `dist` token and `head_dist`, as DeiT-B distilled.
    pub distilled: bool,
    /// The per-head width of the model before pruning: the softmax scale is `head_dim^-0.5`
    /// and stays so when `qk` shrinks, so a pruned model computes what it was pruned from.
    pub head_dim: usize,
    /// Stochastic depth at the last block (linearly less before it); training only.
    #[serde(default)]
    pub drop_path: f64,
    pub blocks: Vec<BlockDims>,
    // timm's `VisionTransformer` options beyond DeiT's, each left out of `dims.json` at DeiT's
    // value so that a DeiT's file, and its cache key, read as before they existed.
    /// A class token (timm's `class_token`); without one the head pools the patch tokens.
    #[serde(default = "yes", skip_serializing_if = "is_yes")]
    pub class_token: bool,
    /// Register tokens after the class token (DINOv2's `reg_tokens`), dropped by the head.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reg_tokens: usize,
    /// LayerScale (`ls1`, `ls2`: a learned per-channel gain on each residual branch), with
    /// this initial gain (timm's `init_values`: DeiT III, DINOv2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_values: Option<f64>,
    /// Biases on the query, key and value projections (timm's `qkv_bias`).
    #[serde(default = "yes", skip_serializing_if = "is_yes")]
    pub qkv_bias: bool,
    /// What the head reads: the class token, or the mean of the patch tokens.
    #[serde(default, skip_serializing_if = "is_token")]
    pub global_pool: Pool,
    /// The final LayerNorm after pooling (`fc_norm`) instead of before it (`norm`), as timm's
    /// average-pooled models.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fc_norm: bool,
    /// The position embedding covers the patches only, added before the prefix tokens are
    /// prepended (timm's `no_embed_class`: DeiT III, DINOv2 with registers).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_embed_class: bool,
}

/// How a ViT's head reads its tokens (timm's `global_pool`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    /// The class token (and the distillation token for the second head).
    #[default]
    Token,
    /// The mean of the patch tokens (prefix tokens left out).
    Avg,
}

fn yes() -> bool {
    true
}

fn is_yes(b: &bool) -> bool {
    *b
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn is_token(p: &Pool) -> bool {
    *p == Pool::Token
}

/// The most register tokens a ViT takes (DINOv2 has 4).
pub const MAX_REG_TOKENS: usize = 256;

impl VitConfig {
    /// A uniform ViT, as DeiT's presets.
    pub fn uniform(
        image_size: usize,
        patch_size: usize,
        in_chans: usize,
        embed_dim: usize,
        depth: usize,
        heads: usize,
        mlp_ratio: f64,
        num_classes: usize,
        distilled: bool,
    ) -> Self {
        let head_dim = embed_dim / heads.max(1);
        let mlp = (embed_dim as f64 * mlp_ratio).round() as usize;
        Self {
            image_size,
            patch_size,
            in_chans,
            embed_dim,
            num_classes,
            distilled,
            head_dim,
            drop_path: 0.0,
            blocks: vec![BlockDims { heads, qk: head_dim, v: head_dim, mlp }; depth],
            class_token: true,
            reg_tokens: 0,
            init_values: None,
            qkv_bias: true,
            global_pool: Pool::Token,
            fc_norm: false,
            no_embed_class: false,
        }
    }

    /// timm's `VisionTransformer` presets, by timm's names with `-` for `_`: DeiT
    /// (`deit-tiny`, `deit-small`, `deit-base`, each optionally `-distilled`), AugReg ViT
    /// (`vit-tiny-patch16-224`, `vit-small-patch16-224`, `vit-base-patch16-224`: DeiT's shapes
    /// without distillation), DeiT III (`deit3-small`, `deit3-base`: LayerScale, a position
    /// embedding over the patches only) and DINOv2 (`vit-small-patch14-dinov2`,
    /// `vit-base-patch14-dinov2`, 518 px, LayerScale; `-reg4-`: four register tokens). 224 px,
    /// patch 16 and 1000 classes where not said.
    pub fn preset(name: &str) -> Option<Self> {
        let (base, distilled) = match name.strip_suffix("-distilled") {
            Some(base) if base.starts_with("deit-") => (base, true),
            _ => (name, false),
        };
        let (embed, heads) = match base {
            "deit-tiny" | "vit-tiny-patch16-224" => (192, 3),
            "deit-small" | "vit-small-patch16-224" | "deit3-small" | "vit-small-patch14-dinov2" | "vit-small-patch14-reg4-dinov2" => (384, 6),
            "deit-base" | "vit-base-patch16-224" | "deit3-base" | "vit-base-patch14-dinov2" | "vit-base-patch14-reg4-dinov2" => (768, 12),
            _ => return None,
        };
        let mut c = Self::uniform(224, 16, 3, embed, 12, heads, 4.0, 1000, distilled);
        if base.starts_with("deit3-") {
            (c.init_values, c.no_embed_class) = (Some(1e-6), true);
        }
        if base.ends_with("-dinov2") {
            (c.image_size, c.patch_size, c.init_values) = (518, 14, Some(1e-5));
            if base.contains("-reg4-") {
                (c.reg_tokens, c.no_embed_class) = (4, true);
            }
        }
        Some(c)
    }

    pub const PRESETS: [&'static str; 15] = [
        "deit-tiny",
        "deit-small",
        "deit-base",
        "deit-tiny-distilled",
        "deit-small-distilled",
        "deit-base-distilled",
        "vit-tiny-patch16-224",
        "vit-small-patch16-224",
        "vit-base-patch16-224",
        "deit3-small",
        "deit3-base",
        "vit-small-patch14-dinov2",
        "vit-base-patch14-dinov2",
        "vit-small-patch14-reg4-dinov2",
        "vit-base-patch14-reg4-dinov2",
    ];

    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    /// Prepended tokens: `cls`, `dist` when distilled, then the registers.
    pub fn num_prefix_tokens(&self) -> usize {
        self.class_token as usize + self.distilled as usize + self.reg_tokens
    }

    pub fn num_tokens(&self) -> usize {
        self.num_patches() + self.num_prefix_tokens()
    }

    /// Positions the position embedding holds: every token's, or the patches' only.
    pub fn num_positions(&self) -> usize {
        if self.no_embed_class {
            self.num_patches()
        } else {
            self.num_tokens()
        }
    }

    pub fn depth(&self) -> usize {
        self.blocks.len()
    }

    /// Shape problems as messages; empty when the model can be built.
    pub fn check(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let bounds = [
            ("image_size", self.image_size, MAX_IMAGE_SIZE),
            ("in_chans", self.in_chans, MAX_CHANNELS),
            ("embed_dim", self.embed_dim, MAX_WIDTH),
            ("head_dim", self.head_dim, MAX_WIDTH),
            ("num_classes", self.num_classes, MAX_CLASSES),
            ("depth", self.blocks.len(), MAX_BLOCKS),
        ];
        for (key, value, max) in bounds {
            if let Some(m) = out_of_range(value, max) {
                problems.push(format!("{key} {m}"));
            }
        }
        for (b, d) in self.blocks.iter().enumerate() {
            if d.too_wide() {
                problems.push(format!("block {b} is wider than {MAX_WIDTH}: {d:?}"));
            }
        }
        if !problems.is_empty() {
            return problems;
        }
        if self.patch_size == 0 || self.image_size % self.patch_size != 0 {
            problems.push(format!(
                "image_size {} is not a multiple of patch_size {}",
                self.image_size, self.patch_size
            ));
        }
        for (key, value) in [("embed_dim", self.embed_dim), ("in_chans", self.in_chans), ("num_classes", self.num_classes), ("head_dim", self.head_dim)] {
            if value == 0 {
                problems.push(format!("{key} must be at least 1"));
            }
        }
        if self.blocks.is_empty() {
            problems.push("the model has no blocks (depth 0)".into());
        }
        if self.reg_tokens > MAX_REG_TOKENS {
            problems.push(format!("reg_tokens must be at most {MAX_REG_TOKENS}, got {}", self.reg_tokens));
        }
        if self.init_values.is_some_and(|v| !v.is_finite()) {
            problems.push(format!("init_values must be a finite number, got {:?}", self.init_values));
        }
        if !self.class_token && self.global_pool == Pool::Token {
            problems.push("global_pool = \"token\" needs a class token (class_token = false)\n  hint: global_pool = \"avg\"".into());
        }
        if self.distilled && (!self.class_token || self.global_pool != Pool::Token) {
            problems.push("a distilled model reads its class and distillation tokens: it needs class_token and global_pool = \"token\"".into());
        }
        for (b, d) in self.blocks.iter().enumerate() {
            if d.heads == 0 || d.qk == 0 || d.v == 0 || d.mlp == 0 {
                problems.push(format!("block {b} has a zero width: {d:?}"));
            }
        }
        problems
    }
}

/// Every preset name, ViT's then Swin's.
pub fn presets() -> Vec<&'static str> {
    VitConfig::PRESETS.iter().chain(&SwinConfig::PRESETS).copied().collect()
}

/// Which architecture `[model]` describes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// timm's `VisionTransformer`: DeiT, AugReg ViT, DeiT III, DINOv2 (`vit` reads as this).
    #[serde(alias = "vit")]
    Deit,
    Swin,
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::Deit => "deit",
            Family::Swin => "swin",
        })
    }
}

/// `[model]`: a preset, keys that override it, or per-block widths from a `dims.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// `deit` or `swin`. Default: the preset's family, else `deit`. Left out of cache keys
    /// when unset, so that models trained before it existed stay cached.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub family: Option<Family>,
    /// `deit-tiny`, `deit-small`, `deit-base`, each optionally `-distilled`, or `swin-tiny`,
    /// `swin-small`, `swin-base`. Default: none (the keys below, falling back to deit-tiny's
    /// values, or swin-tiny's for `family = "swin"`).
    pub preset: Option<String>,
    /// Input side in pixels. Default 224.
    pub image_size: Option<usize>,
    /// Patch side in pixels. Default 16.
    pub patch_size: Option<usize>,
    /// Input channels. Default 3.
    pub in_chans: Option<usize>,
    /// Embedding width E (Swin: of the first stage, doubling each stage). Default 192.
    pub embed_dim: Option<usize>,
    /// Number of blocks. Default 12. DeiT only.
    pub depth: Option<usize>,
    /// Heads per block. Default 3. Swin: the first stage's, doubling each stage as timm's
    /// presets do.
    pub heads: Option<usize>,
    /// Swin: blocks per stage, for instance `[2, 2, 6, 2]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub depths: Option<Vec<usize>>,
    /// Swin: the attention window's side in tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<usize>,
    /// MLP width as a multiple of E. Default 4.0.
    pub mlp_ratio: Option<f64>,
    /// Output classes. Default: the dataset's class count.
    pub num_classes: Option<usize>,
    /// A distillation token and head. Default false.
    pub distilled: Option<bool>,
    // timm `VisionTransformer` options (DeiT's values by default, or the preset's): left out
    // of cache keys when unset.
    /// A class token. Default true.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class_token: Option<bool>,
    /// Register tokens (DINOv2's). Default 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reg_tokens: Option<usize>,
    /// LayerScale with this initial gain (DeiT III 1e-6, DINOv2 1e-5). Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_values: Option<f64>,
    /// Biases on the query, key and value projections. Default true.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qkv_bias: Option<bool>,
    /// `token` (the class token) or `avg` (the mean of the patch tokens). Default `token`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub global_pool: Option<Pool>,
    /// The final LayerNorm after pooling instead of before. Default: true when
    /// `global_pool = "avg"`, as timm's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fc_norm: Option<bool>,
    /// The position embedding covers the patches only (DeiT III, DINOv2 with registers).
    /// Default false.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_embed_class: Option<bool>,
    /// Stochastic depth rate at the last block, for training. Default 0.
    pub drop_path: Option<f64>,
    /// A `dims.json` giving every block's widths (as the prune stage writes). Default: none.
    pub dims: Option<PathBuf>,
    /// `pretrained` (default): `load_pretrained` reads its checkpoint; `random`: it builds the
    /// model from these keys with random weights instead, so a pipeline runs without the
    /// checkpoint (smoke tests of the full-size graph). Left out of cache keys when unset, so
    /// that models trained before it existed stay cached.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init: Option<Init>,
    /// The paper's ReViT rule for per-block widths (see [`redistributed`]), for training from
    /// scratch. Default false.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redistribute: Option<bool>,
}

/// ReViT (the paper's parameter-redistribution rule): with `ε = 2` in the middle third of the
/// blocks and 1 elsewhere, `heads = εE/100`, per-head `qk = εE/20`, per-head `v = 64` (here the
/// base model's head width, 64 for DeiT), `mlp = 3εE`, rounded to whole units (at least one).
pub fn redistributed(embed_dim: usize, depth: usize, head_width: usize) -> Vec<BlockDims> {
    (0..depth)
        .map(|b| {
            let eps = if b >= depth / 3 && b < depth - depth / 3 { 2.0 } else { 1.0 };
            let e = eps * embed_dim as f64;
            let units = |x: f64| (x.round() as usize).max(1);
            BlockDims { heads: units(e / 100.0), qk: units(e / 20.0), v: head_width, mlp: units(3.0 * e) }
        })
        .collect()
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    Pretrained,
    Random,
}

impl ModelSection {
    /// The family this section describes: `family`, else its preset's, else DeiT.
    pub fn family(&self) -> Family {
        self.family.unwrap_or(match self.preset.as_deref() {
            Some(p) if SwinConfig::preset(p).is_some() => Family::Swin,
            _ => Family::Deit,
        })
    }

    /// Problems as `(key, message)`, relative to `[model]`.
    pub fn validate(&self) -> Vec<(String, String)> {
        self.validate_for(false)
    }

    /// [`Self::validate`], for a pipeline whose model comes from a checkpoint (`loads`) or not.
    pub fn validate_for(&self, loads: bool) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let family = self.family();
        let presets = presets();
        if let Some(p) = &self.preset {
            if VitConfig::preset(p).is_none() && SwinConfig::preset(p).is_none() {
                problems.push((
                    "preset".into(),
                    format!("unknown preset `{p}`{}\n  hint: one of {}", crate::suggest::did_you_mean(p, &presets), presets.join(", ")),
                ));
                return problems;
            }
            let preset_family = if SwinConfig::preset(p).is_some() { Family::Swin } else { Family::Deit };
            if preset_family != family {
                problems.push(("family".into(), format!("is {family:?} but preset `{p}` is a {preset_family:?} model\n  hint: leave family unset, the preset decides it")));
                return problems;
            }
        }
        if let Some(problem) = self.dims.as_deref().and_then(|d| crate::files::input_problem(d, crate::files::MAX_TEXT)) {
            problems.push(("dims".into(), problem));
        }
        if self.drop_path.is_some_and(|p| !(0.0..1.0).contains(&p)) {
            problems.push(("drop_path".into(), format!("must be in [0, 1), got {}", self.drop_path.unwrap())));
        }
        if let Some(n) = self.reg_tokens.filter(|n| *n > MAX_REG_TOKENS) {
            problems.push(("reg_tokens".into(), format!("must be from 0 to {MAX_REG_TOKENS}, got {n}")));
        }
        if let Some(v) = self.init_values.filter(|v| !(v.is_finite() && *v > 0.0)) {
            problems.push(("init_values".into(), format!("must be a positive number (LayerScale's first gain), got {v}")));
        }
        if self.class_token == Some(false) && self.global_pool == Some(Pool::Token) {
            problems.push(("global_pool".into(), "is \"token\" and class_token = false: there is no token to read\n  hint: global_pool = \"avg\"".into()));
        }
        if let Some(r) = self.mlp_ratio.filter(|r| !(*r > 0.0 && *r <= MAX_MLP_RATIO)) {
            problems.push(("mlp_ratio".into(), format!("must be in (0, {MAX_MLP_RATIO}], got {r}")));
        }
        let image = self.image_size.unwrap_or(MAX_IMAGE_SIZE);
        let sizes = [
            ("image_size", self.image_size, MAX_IMAGE_SIZE),
            ("patch_size", self.patch_size, image),
            ("in_chans", self.in_chans, MAX_CHANNELS),
            ("embed_dim", self.embed_dim, MAX_WIDTH),
            ("depth", self.depth, MAX_BLOCKS),
            ("heads", self.heads, self.embed_dim.unwrap_or(MAX_WIDTH)),
            ("window", self.window, image),
            ("num_classes", self.num_classes, MAX_CLASSES),
        ];
        for (key, value, max) in sizes {
            if let Some(m) = value.and_then(|v| out_of_range(v, max)) {
                problems.push((key.into(), m));
            }
        }
        // The MLP width the keys give, which the widest block's check would name otherwise.
        let base_ratio = 4.0;
        let mlp = self.embed_dim.unwrap_or(192) as f64 * self.mlp_ratio.unwrap_or(base_ratio);
        if problems.is_empty() && self.embed_dim.is_some() && mlp > MAX_WIDTH as f64 {
            let key = if self.mlp_ratio.is_some() { "mlp_ratio" } else { "embed_dim" };
            problems.push((key.into(), format!("gives MLPs of {mlp} units (embed_dim x mlp_ratio): at most {MAX_WIDTH}")));
        }
        if let Some(d) = &self.depths {
            if d.is_empty() || d.len() > 16 || d.iter().any(|b| out_of_range(*b, MAX_BLOCKS).is_some()) {
                problems.push(("depths".into(), format!("needs 1 to 16 stages of 1 to {MAX_BLOCKS} blocks each, got {d:?}")));
            }
        }
        // Keys the other family has and this one does not.
        let foreign: &[(&str, bool)] = match family {
            Family::Deit => &[("depths", self.depths.is_some()), ("window", self.window.is_some())],
            Family::Swin => &[
                ("depth", self.depth.is_some()),
                ("redistribute", self.redistribute.is_some()),
                ("class_token", self.class_token.is_some()),
                ("reg_tokens", self.reg_tokens.is_some()),
                ("init_values", self.init_values.is_some()),
                ("qkv_bias", self.qkv_bias.is_some()),
                ("global_pool", self.global_pool.is_some()),
                ("fc_norm", self.fc_norm.is_some()),
                ("no_embed_class", self.no_embed_class.is_some()),
            ],
        };
        if family == Family::Swin && self.distilled == Some(true) {
            problems.push(("distilled".into(), "a Swin has no distillation token\n  hint: distill from a teacher stage instead (`teacher` in train or distill)".into()));
        }
        for (key, _) in foreign.iter().filter(|(_, set)| *set) {
            let (own, other) = if family == Family::Deit { ("DeiT", "swin") } else { ("Swin", "deit") };
            problems.push((key.to_string(), format!("is not a key of a {own} model\n  hint: set family = \"{other}\" (or a {other} preset) if that is the model you mean")));
        }
        if !problems.is_empty() {
            return problems;
        }
        match family {
            Family::Deit => {
                let section = if loads { self.as_checkpoint_hint() } else { self.clone() };
                section.validate_deit(&mut problems);
                if problems.is_empty() && self.dims.is_none() {
                    if let Err(e) = section.resolve(self.num_classes.unwrap_or(2)) {
                        problems.push(("preset".into(), format!("{e:#}")));
                    }
                }
            }
            Family::Swin => {
                if self.dims.is_none() {
                    // Geometry problems name their key first: `window: 3 does not divide ...`.
                    for p in self.swin(1).problems() {
                        let (key, message) = p.split_once(": ").unwrap_or(("preset", &p));
                        problems.push((key.to_string(), message.to_string()));
                    }
                }
            }
        }
        problems
    }

    /// This section as a hint for reading a ViT checkpoint: with no patch size given (by key or
    /// preset), the checkpoint's own (DINOv2's 14) is the one `image_size` must be a multiple
    /// of, checked when it is read; the default 16 would refuse DINOv2's 518 px.
    pub fn as_checkpoint_hint(&self) -> Self {
        match (self.family(), self.patch_size, &self.preset) {
            (Family::Deit, None, None) => Self { image_size: None, ..self.clone() },
            _ => self.clone(),
        }
    }

    fn validate_deit(&self, problems: &mut Vec<(String, String)>) {
        // Geometry, with the preset's (or deit-tiny's) values for the keys left unset.
        let base = self.preset.as_deref().and_then(VitConfig::preset).unwrap_or_else(|| VitConfig::preset("deit-tiny").expect("built-in preset"));
        let named = |own: Option<usize>, v: usize| if own.is_some() { format!("{v}") } else { format!("{v} (default)") };
        let (image, patch) = (self.image_size.unwrap_or(base.image_size), self.patch_size.unwrap_or(base.patch_size));
        if patch == 0 || image % patch != 0 {
            problems.push((
                "patch_size".into(),
                format!("{} does not divide image_size = {}: patches must tile the image", named(self.patch_size, patch), named(self.image_size, image)),
            ));
        }
        let (embed, heads) = (self.embed_dim.unwrap_or(base.embed_dim), self.heads.unwrap_or(base.blocks[0].heads));
        if self.dims.is_none() && self.redistribute != Some(true) && (heads == 0 || embed % heads != 0) {
            problems.push((
                "heads".into(),
                format!("{} does not divide embed_dim = {}: every head must be equally wide", named(self.heads, heads), named(self.embed_dim, embed)),
            ));
        }
    }

    /// Where a checkpoint's geometry disagrees with what this section says explicitly (its
    /// keys, or its preset's values), as `key: section vs checkpoint` lines.
    pub fn disagreements(&self, checkpoint: &ModelConfig) -> Vec<String> {
        let mut out = Vec::new();
        let mut check = |key: &str, said: Option<usize>, found: usize| {
            if let Some(v) = said.filter(|v| *v != found) {
                out.push(format!("model.{key} = {v}, the checkpoint's is {found}"));
            }
        };
        match checkpoint {
            ModelConfig::Deit(c) => {
                let preset = self.preset.as_deref().and_then(VitConfig::preset);
                let said = |own: Option<usize>, from_preset: fn(&VitConfig) -> usize| own.or(preset.as_ref().map(from_preset));
                check("image_size", said(self.image_size, |p| p.image_size), c.image_size);
                check("patch_size", said(self.patch_size, |p| p.patch_size), c.patch_size);
                check("in_chans", said(self.in_chans, |p| p.in_chans), c.in_chans);
                check("embed_dim", said(self.embed_dim, |p| p.embed_dim), c.embed_dim);
                check("depth", said(self.depth, |p| p.depth()), c.depth());
                check("num_classes", self.num_classes, c.num_classes);
                if self.dims.is_none() && self.redistribute != Some(true) {
                    if let Some(r) = self.mlp_ratio {
                        check("mlp_ratio x embed_dim", Some((r * c.embed_dim as f64).round() as usize), c.blocks[0].mlp);
                    }
                }
                if let Some(d) = self.distilled.or(preset.as_ref().map(|p| p.distilled)) {
                    if d != c.distilled {
                        out.push(format!("model.distilled = {d}, the checkpoint {} a distillation token", if c.distilled { "has" } else { "has no" }));
                    }
                }
            }
            ModelConfig::Swin(c) => {
                let preset = self.preset.as_deref().and_then(SwinConfig::preset);
                let said = |own: Option<usize>, from_preset: fn(&SwinConfig) -> usize| own.or(preset.as_ref().map(from_preset));
                check("patch_size", said(self.patch_size, |p| p.patch_size), c.patch_size);
                check("in_chans", said(self.in_chans, |p| p.in_chans), c.in_chans);
                check("embed_dim", said(self.embed_dim, |p| p.stages[0].embed_dim), c.stages[0].embed_dim);
                check("num_classes", self.num_classes, c.num_classes);
                let depths: Vec<usize> = c.stages.iter().map(|s| s.blocks.len()).collect();
                if let Some(said) = self.depths.clone().or(preset.map(|p| p.stages.iter().map(|s| s.blocks.len()).collect())) {
                    if said != depths {
                        out.push(format!("model.depths = {said:?}, the checkpoint's are {depths:?}"));
                    }
                }
            }
        }
        out
    }

    /// The model this section describes; `dataset_classes` fills `num_classes` when unset.
    pub fn resolve(&self, dataset_classes: usize) -> anyhow::Result<ModelConfig> {
        let config = match self.family() {
            Family::Deit => ModelConfig::Deit(self.resolve_deit(dataset_classes)?),
            Family::Swin => {
                let mut c = self.swin(dataset_classes);
                if let Some(path) = &self.dims {
                    match ModelConfig::read_json(path)? {
                        ModelConfig::Swin(dims) => {
                            c.head_dim = dims.head_dim;
                            c.stages = dims.stages;
                        }
                        ModelConfig::Deit(_) => anyhow::bail!("model.dims: `{}` holds a DeiT's widths, and [model] is a Swin", path.display()),
                    }
                }
                ModelConfig::Swin(c)
            }
        };
        let problems = config.problems();
        if !problems.is_empty() {
            anyhow::bail!("model: {}", problems.join("; "));
        }
        Ok(config)
    }

    /// The Swin these keys describe, with swin-tiny's values (or the preset's) for those unset;
    /// heads and width double each stage, as timm's presets.
    fn swin(&self, dataset_classes: usize) -> SwinConfig {
        let base = self.preset.as_deref().and_then(SwinConfig::preset).unwrap_or_else(|| SwinConfig::preset("swin-tiny").expect("built-in preset"));
        let first = &base.stages[0];
        let depths = self.depths.clone().unwrap_or_else(|| base.stages.iter().map(|s| s.blocks.len()).collect());
        let heads0 = self.heads.unwrap_or(first.blocks[0].heads);
        let embed = self.embed_dim.unwrap_or(first.embed_dim);
        let heads: Vec<usize> = (0..depths.len()).map(|i| heads0 << i).collect();
        let mut c = SwinConfig::uniform(
            self.image_size.unwrap_or(base.image_size),
            self.patch_size.unwrap_or(base.patch_size),
            self.in_chans.unwrap_or(base.in_chans),
            self.window.unwrap_or(base.window),
            embed,
            &depths,
            &heads,
            self.mlp_ratio.unwrap_or(first.blocks[0].mlp as f64 / first.embed_dim as f64),
            self.num_classes.unwrap_or(dataset_classes),
        );
        c.drop_path = self.drop_path.unwrap_or(0.0);
        c
    }

    fn resolve_deit(&self, dataset_classes: usize) -> anyhow::Result<VitConfig> {
        let base = match &self.preset {
            Some(p) => VitConfig::preset(p).ok_or_else(|| anyhow::anyhow!("model.preset: unknown preset `{p}`"))?,
            None => VitConfig::preset("deit-tiny").expect("built-in preset"),
        };
        let mut c = base.clone();
        let depth = self.depth.unwrap_or(c.depth());
        let heads = self.heads.unwrap_or(c.blocks[0].heads);
        let embed = self.embed_dim.unwrap_or(c.embed_dim);
        let mlp_ratio = self.mlp_ratio.unwrap_or(c.blocks[0].mlp as f64 / c.embed_dim as f64);
        c = VitConfig::uniform(
            self.image_size.unwrap_or(c.image_size),
            self.patch_size.unwrap_or(c.patch_size),
            self.in_chans.unwrap_or(c.in_chans),
            embed,
            depth,
            heads,
            mlp_ratio,
            self.num_classes.unwrap_or(dataset_classes),
            self.distilled.unwrap_or(c.distilled),
        );
        c.class_token = self.class_token.unwrap_or(base.class_token);
        c.reg_tokens = self.reg_tokens.unwrap_or(base.reg_tokens);
        c.init_values = self.init_values.or(base.init_values);
        c.qkv_bias = self.qkv_bias.unwrap_or(base.qkv_bias);
        c.global_pool = self.global_pool.unwrap_or(if c.class_token { base.global_pool } else { Pool::Avg });
        c.fc_norm = self.fc_norm.unwrap_or(if self.global_pool.is_some() { c.global_pool == Pool::Avg } else { base.fc_norm });
        c.no_embed_class = self.no_embed_class.unwrap_or(base.no_embed_class);
        if let Some(path) = &self.dims {
            match ModelConfig::read_json(path)? {
                ModelConfig::Deit(dims) => {
                    c.embed_dim = dims.embed_dim;
                    c.head_dim = dims.head_dim;
                    c.blocks = dims.blocks;
                }
                ModelConfig::Swin(_) => anyhow::bail!("model.dims: `{}` holds a Swin's widths\n  hint: set family = \"swin\" in [model]", path.display()),
            }
        }
        if self.redistribute == Some(true) {
            c.blocks = redistributed(c.embed_dim, c.depth(), c.head_dim);
        }
        c.drop_path = self.drop_path.unwrap_or(0.0);
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revit_widens_the_middle_third() {
        let blocks = redistributed(768, 12, 64);
        let edge = BlockDims { heads: 8, qk: 38, v: 64, mlp: 2304 };
        let middle = BlockDims { heads: 15, qk: 77, v: 64, mlp: 4608 };
        assert_eq!(blocks[..4], [edge; 4]);
        assert_eq!(blocks[4..8], [middle; 4]);
        assert_eq!(blocks[8..], [edge; 4]);
        let section = ModelSection { redistribute: Some(true), embed_dim: Some(64), depth: Some(4), heads: Some(4), ..Default::default() };
        let c = section.resolve(10).unwrap();
        let c = c.as_deit().unwrap();
        assert_eq!(c.blocks.iter().map(|d| d.heads).collect::<Vec<_>>(), [1, 1, 1, 1]);
        assert_eq!(c.blocks.iter().map(|d| (d.qk, d.v, d.mlp)).collect::<Vec<_>>(), [(3, 16, 192), (6, 16, 384), (6, 16, 384), (3, 16, 192)]);
    }
}
