//! timm / DeiT state dicts in and out.
//!
//! Import reads `.safetensors` (F32, F16 or BF16), splits timm's fused `attn.qkv` (rows: all q,
//! then all k, then all v; inside each, `head * head_dim + j`) into Q, K and V, and checks every
//! key and shape, listing all that are missing, unexpected or mis-shaped at once. Export writes
//! timm's naming back: fused `qkv` for a block whose `qk == v`, split `q`/`k`/`v` otherwise,
//! plus `dims.json`, so a pruned model re-imports bit-exactly.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use safetensors::{Dtype, SafeTensors};

use super::vit::{Attention, Materialize};
use super::{BlockDims, Model, ModelConfig, Pool, Swin, SwinConfig, SwinStage, Vit, VitConfig};
use crate::files::atomic_write;

/// File names of an exported model inside a directory.
pub const WEIGHTS: &str = "model.safetensors";
pub const DIMS: &str = "dims.json";

/// Named tensors in PyTorch layout, as f32.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct StateDict {
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

impl StateDict {
    /// Reads `.safetensors`, or a PyTorch `.pth`/`.pt` (its state dict under `model` or
    /// `state_dict`, as DeiT's release files and training checkpoints hold it, or at the top).
    pub fn read(path: &Path) -> Result<Self> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        match ext {
            "safetensors" => Self::read_safetensors(path),
            "pth" | "pt" | "bin" => Self::read_pytorch(path),
            _ => bail!("{}: unknown checkpoint format `.{ext}`\n  hint: give a .safetensors or a PyTorch .pth file", path.display()),
        }
    }

    /// [`super::pth`] reads the tensors exactly as `torch.load` would, and never runs code.
    fn read_pytorch(path: &Path) -> Result<Self> {
        let tensors = super::pth::read(path).map_err(|e| match e.downcast_ref::<std::io::Error>() {
            Some(io) if io.kind() == std::io::ErrorKind::NotFound => anyhow::anyhow!("{}: checkpoint does not exist", path.display()),
            _ => anyhow::anyhow!("{}: cannot read PyTorch checkpoint: {e:#}", path.display()),
        })?;
        Self { tensors }.checked(path)
    }

    /// Refuses a tensor with an empty dimension (a model would divide by it), one whose values
    /// do not fill its shape, and non-finite values: a checkpoint of NaN would otherwise
    /// evaluate to chance without a word.
    fn checked(self, path: &Path) -> Result<Self> {
        for (name, (shape, values)) in &self.tensors {
            if shape.contains(&0) || shape.iter().product::<usize>() != values.len() {
                bail!("{}: tensor `{name}` has shape {shape:?} and {} values: not a tensor of a model", path.display(), values.len());
            }
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                bail!(
                    "{}: tensor `{name}` holds a non-finite value ({} at flat index {i}): a diverged or damaged checkpoint\n  hint: use a checkpoint saved before the loss became NaN",
                    path.display(),
                    values[i]
                );
            }
        }
        Ok(self)
    }

    fn read_safetensors(path: &Path) -> Result<Self> {
        let bytes = crate::files::read_limited(path, crate::files::MAX_CHECKPOINT).with_context(|| format!("{}: cannot read checkpoint", path.display()))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file (truncated or corrupt?): {e}", path.display()))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let data = view.data();
            let values: Vec<f32> = match view.dtype() {
                Dtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
                Dtype::F16 => data
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes(b.try_into().unwrap()).to_f32())
                    .collect(),
                Dtype::BF16 => data
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes(b.try_into().unwrap()).to_f32())
                    .collect(),
                other => bail!("{}: tensor `{name}` has dtype {other:?}; only F32, F16 and BF16 are read", path.display()),
            };
            tensors.insert(name, (view.shape().to_vec(), values));
        }
        Self { tensors }.checked(path)
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = self
            .tensors
            .iter()
            .map(|(k, (shape, v))| (k.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect(), shape.clone()))
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
            .iter()
            .map(|(k, b, s)| (k.clone(), safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b).expect("sizes match")))
            .collect();
        let out = safetensors::serialize(views, &None).context("serializing safetensors")?;
        atomic_write(path, &out)
    }
}

fn to_vec<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Vec<f32> {
    t.to_data().convert::<f32>().to_vec::<f32>().expect("f32 data")
}

/// `[rows, cols]` row-major -> `[cols, rows]`.
fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

/// Exports a model in timm naming: fused `qkv` where a block's `qk == v`.
pub fn export<B: Backend>(model: &Vit<B>) -> StateDict {
    export_with(model, true)
}

/// Exports with split `q`/`k`/`v` in every block, for code that slices them.
pub fn export_split<B: Backend>(model: &Vit<B>) -> StateDict {
    export_with(model, false)
}

/// A model of any family in timm naming; `fuse`: `qkv` fused where a block's `qk == v`
/// (timm's own layout), split `q`/`k`/`v` everywhere otherwise (for code that slices them).
pub fn export_model<B: Backend>(model: &Model<B>, fuse: bool) -> StateDict {
    match model {
        Model::Deit(m) => export_with(m, fuse),
        Model::Swin(m) => export_swin_with(m, fuse),
    }
}

fn export_with<B: Backend>(model: &Vit<B>, fuse: bool) -> StateDict {
    let mut w = Writer::default();
    let e = model.config.embed_dim;
    w.conv("patch_embed.proj", &model.patch_embed);
    for (name, token) in [("cls_token", &model.cls_token), ("dist_token", &model.dist_token), ("reg_token", &model.reg_token)] {
        if let Some(t) = token {
            w.put(name, t.dims().to_vec(), to_vec(&t.val()));
        }
    }
    w.put("pos_embed", model.pos_embed.dims().to_vec(), to_vec(&model.pos_embed.val()));
    for (i, block) in model.blocks.iter().enumerate() {
        w.block(&format!("blocks.{i}"), block, e, fuse);
    }
    if let Some(n) = &model.norm {
        w.norm("norm", n);
    }
    if let Some(n) = &model.fc_norm {
        w.norm("fc_norm", n);
    }
    w.linear("head", &model.head);
    if let Some(h) = &model.head_dist {
        w.linear("head_dist", h);
    }
    w.sd
}

/// One ViT block of width `e` alone, as block 0 (`blocks.0.*`, split `q`/`k`/`v`): what a latency
/// table times in ONNX Runtime.
pub fn export_block<B: Backend>(block: &super::Block<B>, e: usize) -> StateDict {
    let mut w = Writer::default();
    w.block("blocks.0", block, e, false);
    w.sd
}

/// One Swin block alone, as `layers.0.blocks.0.*` (split `q`/`k`/`v`).
pub fn export_swin_block<B: Backend>(block: &super::SwinBlock<B>) -> StateDict {
    let mut w = Writer::default();
    w.swin_block("layers.0.blocks.0", block, false);
    w.sd
}

/// Burn modules into a state dict in PyTorch layout.
#[derive(Default)]
struct Writer {
    sd: StateDict,
}

impl Writer {
    fn block<B: Backend>(&mut self, p: &str, block: &super::Block<B>, e: usize, fuse: bool) {
        self.norm(&format!("{p}.norm1"), &block.norm1);
        self.attention(&format!("{p}.attn"), &block.attn, fuse);
        self.norm(&format!("{p}.norm2"), &block.norm2);
        self.linear(&format!("{p}.mlp.fc1"), &block.mlp.fc1);
        self.linear(&format!("{p}.mlp.fc2"), &block.mlp.fc2);
        for (n, ls) in [("ls1", &block.ls1), ("ls2", &block.ls2)] {
            if let Some(ls) = ls {
                self.put(&format!("{p}.{n}.gamma"), vec![e], to_vec(&ls.gamma.val()));
            }
        }
    }

    fn swin_block<B: Backend>(&mut self, p: &str, block: &super::SwinBlock<B>, fuse: bool) {
        self.norm(&format!("{p}.norm1"), &block.norm1);
        self.attention(&format!("{p}.attn"), &block.attn, fuse);
        let table = &block.relative_position_bias_table;
        self.put(&format!("{p}.attn.relative_position_bias_table"), table.dims().to_vec(), to_vec(&table.val()));
        self.norm(&format!("{p}.norm2"), &block.norm2);
        self.linear(&format!("{p}.mlp.fc1"), &block.mlp.fc1);
        self.linear(&format!("{p}.mlp.fc2"), &block.mlp.fc2);
    }

    fn put(&mut self, name: &str, shape: Vec<usize>, data: Vec<f32>) {
        self.sd.tensors.insert(name.to_string(), (shape, data));
    }

    /// Burn `[in, out]` -> PyTorch `[out, in]`; no bias tensor for a layer without one.
    fn linear<B: Backend>(&mut self, name: &str, l: &burn::nn::Linear<B>) {
        let [i, o] = l.weight.dims();
        self.put(&format!("{name}.weight"), vec![o, i], transpose(&to_vec(&l.weight.val()), i, o));
        if let Some(b) = &l.bias {
            self.put(&format!("{name}.bias"), vec![o], to_vec(&b.val()));
        }
    }

    fn norm<B: Backend>(&mut self, name: &str, n: &burn::nn::LayerNorm<B>) {
        let e = n.gamma.dims()[0];
        self.put(&format!("{name}.weight"), vec![e], to_vec(&n.gamma.val()));
        self.put(&format!("{name}.bias"), vec![e], n.beta.as_ref().map(|b| to_vec(&b.val())).unwrap_or_else(|| vec![0.0; e]));
    }

    fn conv<B: Backend>(&mut self, name: &str, c: &burn::nn::conv::Conv2d<B>) {
        let shape = c.weight.dims().to_vec();
        let bias = c.bias.as_ref().map(|b| to_vec(&b.val())).unwrap_or_else(|| vec![0.0; shape[0]]);
        self.put(&format!("{name}.weight"), shape.clone(), to_vec(&c.weight.val()));
        self.put(&format!("{name}.bias"), vec![shape[0]], bias);
    }

    /// timm's fused `qkv` where `fuse` and the block's `qk == v`, split `q`/`k`/`v` otherwise.
    fn attention<B: Backend>(&mut self, p: &str, a: &Attention<B>, fuse: bool) {
        if fuse && a.qk == a.v_dim {
            let [e, _] = a.q.weight.dims();
            let parts: Vec<_> = [&a.q, &a.k, &a.v].iter().map(|l| {
                let [i, o] = l.weight.dims();
                (transpose(&to_vec(&l.weight.val()), i, o), l.bias.as_ref().map(|b| to_vec(&b.val())))
            }).collect();
            let rows: usize = [&a.q, &a.k, &a.v].iter().map(|l| l.weight.dims()[1]).sum();
            self.put(&format!("{p}.qkv.weight"), vec![rows, e], parts.iter().flat_map(|(w, _)| w.clone()).collect());
            if parts.iter().all(|(_, b)| b.is_some()) {
                self.put(&format!("{p}.qkv.bias"), vec![rows], parts.iter().flat_map(|(_, b)| b.clone().unwrap_or_default()).collect());
            }
        } else {
            for (n, l) in [("q", &a.q), ("k", &a.k), ("v", &a.v)] {
                self.linear(&format!("{p}.{n}"), l);
            }
        }
        self.linear(&format!("{p}.proj"), &a.proj);
    }
}

/// Writes `model.safetensors` and `dims.json` into `dir`.
pub fn save<B: Backend>(model: &Model<B>, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    export_model(model, true).write(&dir.join(WEIGHTS))?;
    let dims = serde_json::to_vec_pretty(&model.config())?;
    atomic_write(&dir.join(DIMS), &dims)
}

/// Reads what [`save`] wrote.
pub fn load<B: Backend>(dir: &Path, device: &B::Device) -> Result<Model<B>> {
    let config = ModelConfig::read_json(&dir.join(DIMS))?;
    let sd = StateDict::read(&dir.join(WEIGHTS))?;
    import_model(&sd, &config, device).with_context(|| format!("{}", dir.join(WEIGHTS).display()))
}

/// Builds a model of shape `config` from `sd` (timm naming).
pub fn import_model<B: Backend>(sd: &StateDict, config: &ModelConfig, device: &B::Device) -> Result<Model<B>> {
    Ok(match config {
        ModelConfig::Deit(c) => Model::Deit(import(sd, c, device)?),
        ModelConfig::Swin(c) => Model::Swin(import_swin(sd, c, device)?),
    })
}

/// Reads the geometry a state dict implies; `heads` (per block) and `head_dim` come from
/// `hint` since a fused `qkv` cannot tell them, everything else from the shapes.
/// The dimensions a timm ViT or Swin tensor named `name` has.
fn rank_of(name: &str) -> usize {
    match name.rsplit('.').next() {
        Some("weight") if name.contains("patch_embed") => 4,
        Some("weight") if name.contains("norm") => 1,
        Some("weight") | Some("relative_position_bias_table") => 2,
        _ if matches!(name, "pos_embed" | "cls_token" | "dist_token" | "reg_token") => 3,
        _ => 1,
    }
}

/// The shape of tensor `name` in `sd`, which must have [`rank_of`] dimensions.
fn shape_of(sd: &StateDict, name: &str) -> Result<Option<Vec<usize>>> {
    let rank = rank_of(name);
    match sd.tensors.get(name) {
        Some((shape, _)) if shape.len() != rank => bail!("tensor `{name}` has shape {shape:?}: expected {rank} dimensions"),
        found => Ok(found.map(|(shape, _)| shape.clone())),
    }
}

pub fn infer_config(sd: &StateDict, hint: &VitConfig) -> Result<VitConfig> {
    let shape = |k: &str| shape_of(sd, k);
    let has = |k: &str| sd.tensors.contains_key(k);
    let pe = shape("patch_embed.proj.weight")?.context("missing tensor `patch_embed.proj.weight`")?;
    let (e, in_chans, patch) = (pe[0], pe[1], pe[2]);
    if pe[2] != pe[3] {
        bail!("tensor `patch_embed.proj.weight` has shape {pe:?}: expected square patches");
    }
    // A backbone (DINOv2's, timm's `num_classes=0`) has no head: it gets a new one.
    let num_classes = match shape("head.weight")? {
        Some(head) => head[0],
        None if !has("head.bias") => hint.num_classes,
        None => bail!("missing tensor `head.weight` beside `head.bias`"),
    };
    let (class_token, distilled) = (has("cls_token"), has("dist_token"));
    let reg_tokens = shape("reg_token")?.map_or(0, |s| s[1]);
    let prefix = class_token as usize + distilled as usize + reg_tokens;
    let pos = shape("pos_embed")?.context("missing tensor `pos_embed`")?;
    let square = |n: usize| {
        let g = (n as f64).sqrt().round() as usize;
        (g > 0 && g * g == n).then_some(g)
    };
    // Whether the position embedding covers the prefix tokens: where both readings give a
    // square grid (a few tiny grids), `[model]`'s.
    let (grid, no_embed_class) = match (pos[1].checked_sub(prefix).and_then(square), square(pos[1])) {
        (Some(g), Some(h)) if prefix > 0 => if hint.no_embed_class { (h, true) } else { (g, false) },
        (Some(g), _) => (g, false),
        (None, Some(h)) => (h, true),
        (None, None) => bail!("tensor `pos_embed` has {} positions: neither a square grid nor one plus {prefix} prefix tokens", pos[1]),
    };
    let fc_norm = has("fc_norm.weight");
    let depth = (0..).take_while(|i| sd.tensors.keys().any(|k| k.starts_with(&format!("blocks.{i}.")))).count();
    let mut blocks = Vec::with_capacity(depth);
    for i in 0..depth {
        let p = format!("blocks.{i}");
        let heads = hint.blocks.get(i).or(hint.blocks.last()).map_or(1, |d| d.heads);
        let mlp = shape(&format!("{p}.mlp.fc1.weight"))?.with_context(|| format!("missing tensor `{p}.mlp.fc1.weight`"))?[0];
        let (qk_rows, v_rows) = if let Some(s) = shape(&format!("{p}.attn.qkv.weight"))? {
            (s[0] / 3, s[0] / 3)
        } else {
            let q = shape(&format!("{p}.attn.q.weight"))?.with_context(|| format!("missing tensor `{p}.attn.qkv.weight` (or split `{p}.attn.q.weight`)"))?;
            let v = shape(&format!("{p}.attn.v.weight"))?.with_context(|| format!("missing tensor `{p}.attn.v.weight`"))?;
            (q[0], v[0])
        };
        if heads == 0 || qk_rows == 0 || v_rows == 0 || qk_rows % heads != 0 || v_rows % heads != 0 {
            bail!("block {i}: {qk_rows} query rows and {v_rows} value rows do not split into {heads} heads\n  hint: give the per-block widths with model.dims");
        }
        blocks.push(BlockDims { heads, qk: qk_rows / heads, v: v_rows / heads, mlp });
    }
    let layer_scale = has("blocks.0.ls1.gamma");
    let config = VitConfig {
        image_size: grid * patch,
        patch_size: patch,
        in_chans,
        embed_dim: e,
        num_classes,
        distilled,
        // The softmax scale: timm's `E / heads`, from the checkpoint's E where `[model]` said
        // another (or left it to the default).
        head_dim: if hint.embed_dim == e { hint.head_dim } else { e / hint.blocks[0].heads.max(1) },
        drop_path: hint.drop_path,
        blocks,
        class_token,
        reg_tokens,
        // Only a new model's gains start from it; a checkpoint's are read.
        init_values: layer_scale.then(|| hint.init_values.unwrap_or(1e-5)),
        qkv_bias: has("blocks.0.attn.qkv.bias") || has("blocks.0.attn.q.bias"),
        // No tensor tells token from average pooling: a model without a class token, or with
        // timm's `fc_norm` (which average pooling implies), pools; otherwise `[model]` says.
        global_pool: if !class_token || fc_norm { Pool::Avg } else { hint.global_pool },
        fc_norm,
        no_embed_class,
    };
    let problems = config.check();
    if !problems.is_empty() {
        bail!("the checkpoint's shapes give no buildable model: {}", problems.join("; "));
    }
    Ok(config)
}

/// Builds a model of shape `config` from `sd`, checking every tensor; a state dict without a
/// head (a backbone's) gets a new one.
pub fn import<B: Backend>(sd: &StateDict, config: &VitConfig, device: &B::Device) -> Result<Vit<B>> {
    let e = config.embed_dim;
    let k = config.num_classes;
    let head = sd.tensors.contains_key("head.weight") || sd.tensors.contains_key("head.bias");
    let mut want = Expected::default();
    want.conv("patch_embed.proj", e, config.in_chans, config.patch_size);
    if config.class_token {
        want.add("cls_token", vec![1, 1, e]);
    }
    if config.distilled {
        want.add("dist_token", vec![1, 1, e]);
        want.linear("head_dist", k, e, true);
    }
    if config.reg_tokens > 0 {
        want.add("reg_token", vec![1, config.reg_tokens, e]);
    }
    want.add("pos_embed", vec![1, config.num_positions(), e]);
    for (i, d) in config.blocks.iter().enumerate() {
        let p = format!("blocks.{i}");
        want.block(sd, &p, e, d, config.qkv_bias, config.init_values.is_some());
    }
    want.norm(if config.fc_norm { "fc_norm" } else { "norm" }, e);
    if head {
        want.linear("head", k, e, true);
    }
    want.check(sd)?;

    let r = Reader { sd, device };
    let mut model = config.build::<B>(device);
    model.patch_embed = r.conv("patch_embed.proj", model.patch_embed);
    if config.class_token {
        model.cls_token = Some(r.param("cls_token", [1, 1, e]));
    }
    if config.distilled {
        model.dist_token = Some(r.param("dist_token", [1, 1, e]));
        model.head_dist = Some(r.linear("head_dist", k, e));
    }
    if config.reg_tokens > 0 {
        model.reg_token = Some(r.param("reg_token", [1, config.reg_tokens, e]));
    }
    model.pos_embed = r.param("pos_embed", [1, config.num_positions(), e]);
    for (i, (block, d)) in model.blocks.iter_mut().zip(&config.blocks).enumerate() {
        let p = format!("blocks.{i}");
        r.norm(&mut block.norm1, &format!("{p}.norm1"));
        r.attention(&mut block.attn, &format!("{p}.attn"), e, d);
        r.norm(&mut block.norm2, &format!("{p}.norm2"));
        block.mlp.fc1 = r.linear(&format!("{p}.mlp.fc1"), d.mlp, e);
        block.mlp.fc2 = r.linear(&format!("{p}.mlp.fc2"), e, d.mlp);
        for (n, ls) in [("ls1", &mut block.ls1), ("ls2", &mut block.ls2)] {
            if let Some(ls) = ls {
                ls.gamma = r.param(&format!("{p}.{n}.gamma"), [e]);
            }
        }
    }
    if let Some(n) = &mut model.norm {
        r.norm(n, "norm");
    }
    if let Some(n) = &mut model.fc_norm {
        r.norm(n, "fc_norm");
    }
    if head {
        model.head = r.linear("head", k, e);
    }
    model.visit(&mut Materialize);
    Ok(model)
}

/// Every tensor a model of some shape needs, with its PyTorch shape.
#[derive(Default)]
struct Expected(BTreeMap<String, Vec<usize>>);

impl Expected {
    fn add(&mut self, name: &str, shape: Vec<usize>) {
        self.0.insert(name.to_string(), shape);
    }

    fn linear(&mut self, name: &str, d_out: usize, d_in: usize, bias: bool) {
        self.add(&format!("{name}.weight"), vec![d_out, d_in]);
        if bias {
            self.add(&format!("{name}.bias"), vec![d_out]);
        }
    }

    fn norm(&mut self, name: &str, e: usize) {
        self.add(&format!("{name}.weight"), vec![e]);
        self.add(&format!("{name}.bias"), vec![e]);
    }

    fn conv(&mut self, name: &str, e: usize, in_chans: usize, patch: usize) {
        self.add(&format!("{name}.weight"), vec![e, in_chans, patch, patch]);
        self.add(&format!("{name}.bias"), vec![e]);
    }

    /// A transformer block `p` of width `e`: norms, attention (fused `qkv` if `sd` has it,
    /// split otherwise, biased if `qkv_bias`), MLP and, if `layer_scale`, LayerScale gains.
    fn block(&mut self, sd: &StateDict, p: &str, e: usize, d: &BlockDims, qkv_bias: bool, layer_scale: bool) {
        let (qk, v) = (d.heads * d.qk, d.heads * d.v);
        self.norm(&format!("{p}.norm1"), e);
        if sd.tensors.contains_key(&format!("{p}.attn.qkv.weight")) {
            self.linear(&format!("{p}.attn.qkv"), 2 * qk + v, e, qkv_bias);
        } else {
            for (n, rows) in [("q", qk), ("k", qk), ("v", v)] {
                self.linear(&format!("{p}.attn.{n}"), rows, e, qkv_bias);
            }
        }
        if layer_scale {
            self.add(&format!("{p}.ls1.gamma"), vec![e]);
            self.add(&format!("{p}.ls2.gamma"), vec![e]);
        }
        self.linear(&format!("{p}.attn.proj"), e, v, true);
        self.norm(&format!("{p}.norm2"), e);
        self.linear(&format!("{p}.mlp.fc1"), d.mlp, e, true);
        self.linear(&format!("{p}.mlp.fc2"), e, d.mlp, true);
    }

    /// Every missing, mis-shaped and unexpected tensor at once.
    fn check(&self, sd: &StateDict) -> Result<()> {
        let mut problems = Vec::new();
        for (name, shape) in &self.0 {
            match sd.tensors.get(name) {
                None => problems.push(format!("missing tensor `{name}` (expected shape {shape:?})")),
                Some((got, _)) if got != shape => problems.push(format!("tensor `{name}` has shape {got:?}, expected {shape:?}")),
                _ => {}
            }
        }
        for name in sd.tensors.keys().filter(|n| !self.0.contains_key(*n)) {
            problems.push(format!("unexpected tensor `{name}`"));
        }
        if !problems.is_empty() {
            bail!("the checkpoint does not fit the model:\n  {}", problems.join("\n  "));
        }
        Ok(())
    }
}

/// Burn modules from the tensors of a state dict that [`Expected::check`] passed.
struct Reader<'a, B: Backend> {
    sd: &'a StateDict,
    device: &'a B::Device,
}

impl<B: Backend> Reader<'_, B> {
    fn values(&self, name: &str) -> &[f32] {
        &self.sd.tensors[name].1
    }

    fn param<const D: usize>(&self, name: &str, shape: [usize; D]) -> Param<Tensor<B, D>> {
        Param::from_tensor(super::float_tensor::<B, D>(self.values(name).to_vec(), shape, self.device))
    }

    /// Rows `rows` of PyTorch's `[out, in]` weight (and bias, if `bias`) as Burn's `[in, out]`.
    fn linear_rows(&self, w: &str, b: Option<&str>, rows: std::ops::Range<usize>, d_in: usize) -> burn::nn::Linear<B> {
        let n = rows.len();
        let wdata = &self.values(w)[rows.start * d_in..rows.end * d_in];
        let weight = super::float_tensor::<B, 2>(transpose(wdata, n, d_in), [d_in, n], self.device);
        let bias = b.map(|b| Param::from_tensor(super::float_tensor::<B, 1>(self.values(b)[rows].to_vec(), [n], self.device)));
        burn::nn::Linear { weight: Param::from_tensor(weight), bias }
    }

    /// A linear layer, with a bias where the state dict has one.
    fn linear(&self, p: &str, d_out: usize, d_in: usize) -> burn::nn::Linear<B> {
        let b = Some(format!("{p}.bias")).filter(|b| self.sd.tensors.contains_key(b));
        self.linear_rows(&format!("{p}.weight"), b.as_deref(), 0..d_out, d_in)
    }

    fn norm(&self, n: &mut burn::nn::LayerNorm<B>, p: &str) {
        let e = n.gamma.dims()[0];
        n.gamma = self.param(&format!("{p}.weight"), [e]);
        n.beta = Some(self.param(&format!("{p}.bias"), [e]));
    }

    fn conv(&self, p: &str, mut c: burn::nn::conv::Conv2d<B>) -> burn::nn::conv::Conv2d<B> {
        let shape = c.weight.dims();
        c.weight = self.param(&format!("{p}.weight"), shape);
        c.bias = Some(self.param(&format!("{p}.bias"), [shape[0]]));
        c
    }

    /// Q, K and V from timm's fused `qkv` (rows: all q, then all k, then all v) or split
    /// `q`/`k`/`v`, and the projection.
    fn attention(&self, a: &mut Attention<B>, p: &str, e: usize, d: &BlockDims) {
        let (qk, v) = (d.heads * d.qk, d.heads * d.v);
        if self.sd.tensors.contains_key(&format!("{p}.qkv.weight")) {
            let w = format!("{p}.qkv.weight");
            let b = Some(format!("{p}.qkv.bias")).filter(|b| self.sd.tensors.contains_key(b));
            a.q = self.linear_rows(&w, b.as_deref(), 0..qk, e);
            a.k = self.linear_rows(&w, b.as_deref(), qk..2 * qk, e);
            a.v = self.linear_rows(&w, b.as_deref(), 2 * qk..2 * qk + v, e);
        } else {
            a.q = self.linear(&format!("{p}.q"), qk, e);
            a.k = self.linear(&format!("{p}.k"), qk, e);
            a.v = self.linear(&format!("{p}.v"), v, e);
        }
        a.proj = self.linear(&format!("{p}.proj"), e, v);
    }
}

/// Position embeddings of a `old` grid resampled to a `new` one, as timm's
/// `resample_abs_pos_embed` does on load (and on every pass with `dynamic_img_size`): the
/// first `prefix` positions kept, the grid's by PyTorch's antialiased bicubic interpolation
/// (`F.interpolate(mode="bicubic", antialias=True)`: Keys' kernel with a = -0.5, widened by
/// the scale when shrinking, weights normalized; width first, then height).
pub fn resample_pos_embed(values: &[f32], e: usize, prefix: usize, old: [usize; 2], new: [usize; 2]) -> Vec<f32> {
    let filter = |x: f64| {
        let (x, a) = (x.abs(), -0.5);
        if x < 1.0 {
            ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
        } else {
            0.0
        }
    };
    // For each output index along an axis of `n_in` -> `n_out`: its first input and weights.
    let weights = |n_in: usize, n_out: usize| -> Vec<(usize, Vec<f64>)> {
        let scale = n_in as f64 / n_out as f64;
        let (support, invscale) = if scale >= 1.0 { (2.0 * scale, 1.0 / scale) } else { (2.0, 1.0) };
        (0..n_out)
            .map(|i| {
                let center = scale * (i as f64 + 0.5);
                let min = ((center - support + 0.5) as i64).max(0) as usize;
                let max = ((center + support + 0.5) as i64).min(n_in as i64).max(min as i64) as usize;
                let mut w: Vec<f64> = (min..max).map(|j| filter((j as f64 - center + 0.5) * invscale)).collect();
                let total: f64 = w.iter().sum();
                if total != 0.0 {
                    w.iter_mut().for_each(|v| *v /= total);
                }
                (min, w)
            })
            .collect()
    };
    let ([oh, ow], [nh, nw]) = (old, new);
    let grid = &values[prefix * e..];
    // Width first: [oh, ow, e] -> [oh, nw, e].
    let mut wide = vec![0.0f64; oh * nw * e];
    for (x, (min, w)) in weights(ow, nw).iter().enumerate() {
        for y in 0..oh {
            for (k, wk) in w.iter().enumerate() {
                let src = &grid[(y * ow + min + k) * e..][..e];
                let dst = &mut wide[(y * nw + x) * e..][..e];
                dst.iter_mut().zip(src).for_each(|(d, s)| *d += wk * *s as f64);
            }
        }
    }
    let mut out: Vec<f32> = values[..prefix * e].to_vec();
    let mut tall = vec![0.0f64; nh * nw * e];
    for (y, (min, w)) in weights(oh, nh).iter().enumerate() {
        for x in 0..nw {
            for (k, wk) in w.iter().enumerate() {
                let src = &wide[((min + k) * nw + x) * e..][..e];
                let dst = &mut tall[(y * nw + x) * e..][..e];
                dst.iter_mut().zip(src).for_each(|(d, s)| *d += wk * s);
            }
        }
    }
    out.extend(tall.into_iter().map(|v| v as f32));
    out
}

/// A ViT state dict made for `config`'s patch grid taken to `image_size`: its position
/// embedding resampled ([`resample_pos_embed`]) and the config's image size changed.
fn at_image_size(sd: &mut StateDict, config: &mut VitConfig, image_size: usize) -> Result<()> {
    if image_size == config.image_size {
        return Ok(());
    }
    if let Some(m) = super::out_of_range(image_size, super::MAX_IMAGE_SIZE) {
        bail!("image_size {m}");
    }
    if image_size % config.patch_size != 0 {
        bail!("image_size {image_size} is not a multiple of the checkpoint's patch size {}", config.patch_size);
    }
    let (old, new) = (config.image_size / config.patch_size, image_size / config.patch_size);
    let prefix = config.num_positions() - config.num_patches();
    let e = config.embed_dim;
    let (_, values) = &sd.tensors["pos_embed"];
    let resampled = resample_pos_embed(values, e, prefix, [old, old], [new, new]);
    sd.tensors.insert("pos_embed".into(), (vec![1, prefix + new * new, e], resampled));
    config.image_size = image_size;
    Ok(())
}

/// A checkpoint as [`load_pretrained_at`] read it.
pub struct Loaded<B: Backend> {
    pub model: Model<B>,
    /// The geometry the checkpoint has, before any resampling: what `[model]` is checked against.
    pub checkpoint: ModelConfig,
    /// What was changed on the way in, for the log: a position embedding resampled, a head
    /// added to a backbone.
    pub notes: Vec<String>,
}

/// Reads a user's checkpoint file, taking the widths it does not state from `hint`.
pub fn load_pretrained<B: Backend>(path: &Path, hint: &ModelConfig, device: &B::Device) -> Result<Model<B>> {
    Ok(load_pretrained_at(path, hint, None, device)?.model)
}

/// [`load_pretrained`], a ViT's position embedding resampled to `image_size` where the
/// checkpoint was made for another (a DINOv2 at 518 px run at 224).
pub fn load_pretrained_at<B: Backend>(path: &Path, hint: &ModelConfig, image_size: Option<usize>, device: &B::Device) -> Result<Loaded<B>> {
    let mut sd = StateDict::read(path)?;
    let swin_keys = sd.tensors.keys().any(|k| k.starts_with("layers.0.blocks."));
    let (mut notes, mut native) = (Vec::new(), None);
    let config = match hint {
        ModelConfig::Deit(_) if swin_keys => bail!("{}: a Swin Transformer checkpoint, and [model] describes a DeiT\n  hint: set family = \"swin\" or a swin preset in [model]", path.display()),
        ModelConfig::Swin(_) if sd.tensors.contains_key("pos_embed") => bail!("{}: a ViT (DeiT) checkpoint, and [model] describes a Swin\n  hint: set family = \"deit\" or a deit or vit preset in [model]", path.display()),
        ModelConfig::Deit(h) => {
            let mut c = infer_config(&sd, h).with_context(|| format!("{}", path.display()))?;
            native = Some(ModelConfig::Deit(c.clone()));
            if let Some(size) = image_size.filter(|s| *s != c.image_size) {
                let (was, p) = (c.image_size, c.patch_size);
                at_image_size(&mut sd, &mut c, size).with_context(|| format!("{}: model.image_size", path.display()))?;
                notes.push(format!("position embedding resampled from {was} px ({0}x{0} patches) to {size} px ({1}x{1})", was / p, size / p));
            }
            if !sd.tensors.contains_key("head.weight") {
                notes.push(format!("no classifier head in the checkpoint (a backbone's): a new one for {} classes, randomly initialized", c.num_classes));
            }
            ModelConfig::Deit(c)
        }
        ModelConfig::Swin(h) => ModelConfig::Swin(infer_swin_config(&sd, h).with_context(|| format!("{}", path.display()))?),
    };
    let model = import_model(&sd, &config, device).with_context(|| format!("{}", path.display()))?;
    Ok(Loaded { model, checkpoint: native.unwrap_or(config), notes })
}

/// Exports a Swin in timm naming (`layers.N.blocks.M...`, `head.fc`): fused `qkv` where a
/// block's `qk == v`, split `q`/`k`/`v` otherwise.
pub fn export_swin<B: Backend>(model: &Swin<B>) -> StateDict {
    export_swin_with(model, true)
}

/// A Swin with split `q`/`k`/`v` in every block, for code that slices them.
pub fn export_swin_split<B: Backend>(model: &Swin<B>) -> StateDict {
    export_swin_with(model, false)
}

fn export_swin_with<B: Backend>(model: &Swin<B>, fuse: bool) -> StateDict {
    let mut w = Writer::default();
    w.conv("patch_embed.proj", &model.patch_embed);
    w.norm("patch_embed.norm", &model.patch_norm);
    for (i, layer) in model.layers.iter().enumerate() {
        if let Some(merge) = &layer.downsample {
            w.norm(&format!("layers.{i}.downsample.norm"), &merge.norm);
            w.linear(&format!("layers.{i}.downsample.reduction"), &merge.reduction);
        }
        for (j, block) in layer.blocks.iter().enumerate() {
            w.swin_block(&format!("layers.{i}.blocks.{j}"), block, fuse);
        }
    }
    w.norm("norm", &model.norm);
    w.linear("head.fc", &model.head);
    w.sd
}

/// Builds a Swin of shape `config` from `sd` (timm naming), checking every tensor.
pub fn import_swin<B: Backend>(sd: &StateDict, config: &SwinConfig, device: &B::Device) -> Result<Swin<B>> {
    let problems = config.problems();
    if !problems.is_empty() {
        bail!("the Swin model cannot be built:\n  {}", problems.join("\n  "));
    }
    let e0 = config.stages[0].embed_dim;
    let mut want = Expected::default();
    want.conv("patch_embed.proj", e0, config.in_chans, config.patch_size);
    want.norm("patch_embed.norm", e0);
    let mut prev = e0;
    for (i, stage) in config.stages.iter().enumerate() {
        let e = stage.embed_dim;
        if i > 0 {
            want.norm(&format!("layers.{i}.downsample.norm"), 4 * prev);
            want.linear(&format!("layers.{i}.downsample.reduction"), e, 4 * prev, false);
        }
        prev = e;
        let (window, _) = config.window_shift(i);
        for (j, d) in stage.blocks.iter().enumerate() {
            let p = format!("layers.{i}.blocks.{j}");
            want.block(sd, &p, e, d, true, false);
            want.add(&format!("{p}.attn.relative_position_bias_table"), vec![(2 * window - 1).pow(2), d.heads]);
        }
    }
    want.norm("norm", config.num_features());
    want.linear("head.fc", config.num_classes, config.num_features(), true);
    want.check(sd)?;

    let r = Reader { sd, device };
    let mut model = config.build::<B>(device);
    model.patch_embed = r.conv("patch_embed.proj", model.patch_embed);
    r.norm(&mut model.patch_norm, "patch_embed.norm");
    for (i, (layer, stage)) in model.layers.iter_mut().zip(&config.stages).enumerate() {
        let e = stage.embed_dim;
        if let Some(merge) = &mut layer.downsample {
            r.norm(&mut merge.norm, &format!("layers.{i}.downsample.norm"));
            let d_in = merge.reduction.weight.dims()[0];
            merge.reduction = r.linear_rows(&format!("layers.{i}.downsample.reduction.weight"), None, 0..e, d_in);
        }
        for (j, (block, d)) in layer.blocks.iter_mut().zip(&stage.blocks).enumerate() {
            let p = format!("layers.{i}.blocks.{j}");
            r.norm(&mut block.norm1, &format!("{p}.norm1"));
            r.attention(&mut block.attn, &format!("{p}.attn"), e, d);
            block.relative_position_bias_table = r.param(&format!("{p}.attn.relative_position_bias_table"), block.relative_position_bias_table.dims());
            r.norm(&mut block.norm2, &format!("{p}.norm2"));
            block.mlp.fc1 = r.linear(&format!("{p}.mlp.fc1"), d.mlp, e);
            block.mlp.fc2 = r.linear(&format!("{p}.mlp.fc2"), e, d.mlp);
        }
    }
    r.norm(&mut model.norm, "norm");
    model.head = r.linear("head.fc", config.num_classes, config.num_features());
    model.visit(&mut Materialize);
    Ok(model)
}

/// The Swin geometry a timm state dict implies: stages, widths and heads (from each block's
/// relative position table) come from the shapes; the image size, which no tensor states, and
/// the window and softmax scale of an unpruned model from `hint`.
pub fn infer_swin_config(sd: &StateDict, hint: &SwinConfig) -> Result<SwinConfig> {
    let shape = |k: &str| shape_of(sd, k)?.with_context(|| format!("missing tensor `{k}`"));
    let pe = shape("patch_embed.proj.weight")?;
    let has = |prefix: String| sd.tensors.keys().any(|k| k.starts_with(&prefix));
    let depth = (0..).take_while(|i| has(format!("layers.{i}."))).count();
    let mut stages = Vec::with_capacity(depth);
    for i in 0..depth {
        let blocks = (0..).take_while(|j| has(format!("layers.{i}.blocks.{j}."))).count();
        let e = shape(&format!("layers.{i}.blocks.0.norm1.weight"))?[0];
        let mut dims = Vec::with_capacity(blocks);
        for j in 0..blocks {
            let p = format!("layers.{i}.blocks.{j}");
            let heads = shape(&format!("{p}.attn.relative_position_bias_table"))?[1];
            let (qk_rows, v_rows) = match shape(&format!("{p}.attn.qkv.weight")) {
                Ok(s) => (s[0] / 3, s[0] / 3),
                Err(_) => (shape(&format!("{p}.attn.q.weight"))?[0], shape(&format!("{p}.attn.v.weight"))?[0]),
            };
            if heads == 0 || qk_rows % heads != 0 || v_rows % heads != 0 {
                bail!("block {p}: {qk_rows} query rows and {v_rows} value rows do not split into the {heads} heads of its relative position table");
            }
            dims.push(BlockDims { heads, qk: qk_rows / heads, v: v_rows / heads, mlp: shape(&format!("{p}.mlp.fc1.weight"))?[0] });
        }
        stages.push(SwinStage { embed_dim: e, blocks: dims });
    }
    if stages.is_empty() {
        bail!("no tensor `layers.0.blocks.0.*`: not a timm Swin Transformer checkpoint");
    }
    let e0 = pe[0];
    let heads0 = stages[0].blocks.first().map_or(1, |d| d.heads);
    let config = SwinConfig {
        image_size: hint.image_size,
        patch_size: pe[2],
        in_chans: pe[1],
        num_classes: shape("head.fc.weight")?[0],
        window: hint.window,
        head_dim: if hint.stages.first().is_some_and(|s| s.embed_dim == e0) { hint.head_dim } else { e0 / heads0.max(1) },
        drop_path: hint.drop_path,
        stages,
    };
    let problems = config.problems();
    if !problems.is_empty() {
        bail!("the checkpoint's shapes give no buildable model: {}", problems.join("; "));
    }
    Ok(config)
}

/// The directory an exported model lives in, for stages that hand models on.
pub fn model_dir(stage_dir: &Path) -> PathBuf {
    stage_dir.join("model")
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::Distribution;

    #[test]
    fn export_import_round_trip_is_bit_exact_fused_and_split() {
        let device = Default::default();
        let mut c = VitConfig::uniform(16, 8, 3, 24, 2, 3, 2.0, 4, true);
        c.blocks[1] = BlockDims { heads: 2, qk: 3, v: 5, mlp: 7 };
        let model = c.init::<NdArray>(&device);
        let dir = tempfile::tempdir().unwrap();
        save(&Model::Deit(model.clone()), dir.path()).unwrap();
        let sd = StateDict::read(&dir.path().join(WEIGHTS)).unwrap();
        assert!(sd.tensors.contains_key("blocks.0.attn.qkv.weight"));
        assert!(sd.tensors.contains_key("blocks.1.attn.q.weight"));
        let back = load::<NdArray>(dir.path(), &device).unwrap().into_deit("the test").unwrap();
        assert_eq!(export(&back), export(&model));
        let x = Tensor::<NdArray, 4>::random([2, 3, 16, 16], Distribution::Default, &device);
        let (a, b) = (model.forward(x.clone()).logits(), back.forward(x).logits());
        assert_eq!(to_vec(&a), to_vec(&b));
    }

    #[test]
    fn mismatched_checkpoint_lists_every_problem() {
        let device = Default::default();
        let c = VitConfig::uniform(16, 8, 3, 24, 1, 3, 2.0, 4, false);
        let mut sd = export(&c.init::<NdArray>(&device));
        sd.tensors.remove("norm.bias");
        sd.tensors.get_mut("head.weight").unwrap().0 = vec![5, 24];
        sd.tensors.insert("fc_norm.weight".into(), (vec![24], vec![0.0; 24]));
        let err = import::<NdArray>(&sd, &c, &device).err().unwrap().to_string();
        assert!(err.contains("missing tensor `norm.bias` (expected shape [24])"), "{err}");
        assert!(err.contains("tensor `head.weight` has shape [5, 24], expected [4, 24]"), "{err}");
        assert!(err.contains("unexpected tensor `fc_norm.weight`"), "{err}");
    }

    #[test]
    fn truncated_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broken.safetensors");
        std::fs::write(&path, b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":").unwrap();
        let err = StateDict::read(&path).err().unwrap().to_string();
        assert!(err.contains("broken.safetensors: not a valid safetensors file"), "{err}");
    }
}
