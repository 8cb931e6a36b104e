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
use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use safetensors::{Dtype, SafeTensors};

use super::{BlockDims, Vit, VitConfig};
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

    /// burn-store's reader interprets only the pickle opcodes and the `torch._utils` tensor
    /// rebuilders: a `.pth` never runs code here, and anything else in it is an error.
    fn read_pytorch(path: &Path) -> Result<Self> {
        use burn_store::pytorch::PytorchReader;
        if !path.exists() {
            bail!("{}: checkpoint does not exist", path.display());
        }
        let reader = ["model", "state_dict"]
            .iter()
            .find_map(|key| PytorchReader::with_top_level_key(path, key).ok().filter(|r| !r.is_empty()))
            .map(Ok)
            .unwrap_or_else(|| PytorchReader::new(path))
            .map_err(|e| anyhow::anyhow!("{}: cannot read PyTorch checkpoint (truncated, corrupt, or holding objects other than tensors): {e}", path.display()))?;
        let mut tensors = BTreeMap::new();
        for (name, snapshot) in reader.into_tensors() {
            let data = snapshot
                .to_data()
                .map_err(|e| anyhow::anyhow!("{}: tensor `{name}`: {e:?}", path.display()))?;
            let shape = data.shape.to_vec();
            let values = data
                .convert::<f32>()
                .to_vec::<f32>()
                .map_err(|e| anyhow::anyhow!("{}: tensor `{name}`: {e:?}", path.display()))?;
            tensors.insert(name, (shape, values));
        }
        Ok(Self { tensors })
    }

    fn read_safetensors(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read checkpoint", path.display()))?;
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
        Ok(Self { tensors })
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

fn export_with<B: Backend>(model: &Vit<B>, fuse: bool) -> StateDict {
    let mut sd = StateDict::default();
    let mut put = |name: String, shape: Vec<usize>, data: Vec<f32>| {
        sd.tensors.insert(name, (shape, data));
    };
    let linear = |l: &burn::nn::Linear<B>| {
        let [i, o] = l.weight.dims();
        let w = transpose(&to_vec(&l.weight.val()), i, o);
        let b = l.bias.as_ref().map(|b| to_vec(&b.val())).unwrap_or_else(|| vec![0.0; o]);
        (vec![o, i], w, b)
    };
    let c = &model.config;
    put("patch_embed.proj.weight".into(), model.patch_embed.weight.dims().to_vec(), to_vec(&model.patch_embed.weight.val()));
    let e = c.embed_dim;
    let pe_bias = model.patch_embed.bias.as_ref().map(|b| to_vec(&b.val())).unwrap_or_else(|| vec![0.0; e]);
    put("patch_embed.proj.bias".into(), vec![e], pe_bias);
    put("cls_token".into(), vec![1, 1, e], to_vec(&model.cls_token.val()));
    if let Some(d) = &model.dist_token {
        put("dist_token".into(), vec![1, 1, e], to_vec(&d.val()));
    }
    put("pos_embed".into(), model.pos_embed.dims().to_vec(), to_vec(&model.pos_embed.val()));
    let norm = |n: &burn::nn::LayerNorm<B>| {
        (to_vec(&n.gamma.val()), n.beta.as_ref().map(|b| to_vec(&b.val())).unwrap_or_else(|| vec![0.0; e]))
    };
    for (i, block) in model.blocks.iter().enumerate() {
        let p = format!("blocks.{i}");
        for (name, n) in [("norm1", &block.norm1), ("norm2", &block.norm2)] {
            let (w, b) = norm(n);
            put(format!("{p}.{name}.weight"), vec![e], w);
            put(format!("{p}.{name}.bias"), vec![e], b);
        }
        let a = &block.attn;
        let (q, k, v) = (linear(&a.q), linear(&a.k), linear(&a.v));
        if fuse && a.qk == a.v_dim {
            let rows = q.0[0] + k.0[0] + v.0[0];
            put(format!("{p}.attn.qkv.weight"), vec![rows, e], [q.1, k.1, v.1].concat());
            put(format!("{p}.attn.qkv.bias"), vec![rows], [q.2, k.2, v.2].concat());
        } else {
            for (name, (shape, w, b)) in [("q", q), ("k", k), ("v", v)] {
                put(format!("{p}.attn.{name}.bias"), vec![shape[0]], b);
                put(format!("{p}.attn.{name}.weight"), shape, w);
            }
        }
        for (name, l) in [("attn.proj", &a.proj), ("mlp.fc1", &block.mlp.fc1), ("mlp.fc2", &block.mlp.fc2)] {
            let (shape, w, b) = linear(l);
            put(format!("{p}.{name}.bias"), vec![shape[0]], b);
            put(format!("{p}.{name}.weight"), shape, w);
        }
    }
    let (w, b) = norm(&model.norm);
    put("norm.weight".into(), vec![e], w);
    put("norm.bias".into(), vec![e], b);
    for (name, head) in [("head", Some(&model.head)), ("head_dist", model.head_dist.as_ref())] {
        if let Some(h) = head {
            let (shape, w, b) = linear(h);
            put(format!("{name}.bias"), vec![shape[0]], b);
            put(format!("{name}.weight"), shape, w);
        }
    }
    sd
}

/// Writes `model.safetensors` and `dims.json` into `dir`.
pub fn save<B: Backend>(model: &Vit<B>, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    export(model).write(&dir.join(WEIGHTS))?;
    let dims = serde_json::to_vec_pretty(&model.config)?;
    atomic_write(&dir.join(DIMS), &dims)
}

/// Reads what [`save`] wrote.
pub fn load<B: Backend>(dir: &Path, device: &B::Device) -> Result<Vit<B>> {
    let config = VitConfig::read_json(&dir.join(DIMS))?;
    let sd = StateDict::read(&dir.join(WEIGHTS))?;
    import(&sd, &config, device).with_context(|| format!("{}", dir.join(WEIGHTS).display()))
}

/// Reads the geometry a state dict implies; `heads` (per block) and `head_dim` come from
/// `hint` since a fused `qkv` cannot tell them, everything else from the shapes.
pub fn infer_config(sd: &StateDict, hint: &VitConfig) -> Result<VitConfig> {
    let shape = |k: &str| sd.tensors.get(k).map(|(s, _)| s.clone());
    let pe = shape("patch_embed.proj.weight").context("missing tensor `patch_embed.proj.weight`")?;
    if pe.len() != 4 {
        bail!("tensor `patch_embed.proj.weight` has shape {pe:?}, expected [embed, channels, patch, patch]");
    }
    let (e, in_chans, patch) = (pe[0], pe[1], pe[2]);
    let head = shape("head.weight").context("missing tensor `head.weight`")?;
    let distilled = sd.tensors.contains_key("dist_token");
    let pos = shape("pos_embed").context("missing tensor `pos_embed`")?;
    let patches = pos[1].saturating_sub(1 + distilled as usize);
    let grid = (patches as f64).sqrt().round() as usize;
    if grid * grid != patches {
        bail!("tensor `pos_embed` has {} tokens, which is not a square grid plus {} prefix tokens", pos[1], 1 + distilled as usize);
    }
    let depth = (0..).take_while(|i| sd.tensors.keys().any(|k| k.starts_with(&format!("blocks.{i}.")))).count();
    let mut blocks = Vec::with_capacity(depth);
    for i in 0..depth {
        let p = format!("blocks.{i}");
        let heads = hint.blocks.get(i).or(hint.blocks.last()).map_or(1, |d| d.heads);
        let mlp = shape(&format!("{p}.mlp.fc1.weight")).with_context(|| format!("missing tensor `{p}.mlp.fc1.weight`"))?[0];
        let (qk_rows, v_rows) = if let Some(s) = shape(&format!("{p}.attn.qkv.weight")) {
            (s[0] / 3, s[0] / 3)
        } else {
            let q = shape(&format!("{p}.attn.q.weight")).with_context(|| format!("missing tensor `{p}.attn.qkv.weight` (or split `{p}.attn.q.weight`)"))?;
            let v = shape(&format!("{p}.attn.v.weight")).with_context(|| format!("missing tensor `{p}.attn.v.weight`"))?;
            (q[0], v[0])
        };
        if qk_rows % heads != 0 || v_rows % heads != 0 {
            bail!("block {i}: {qk_rows} query rows and {v_rows} value rows do not split into {heads} heads\n  hint: give the per-block widths with model.dims");
        }
        blocks.push(BlockDims { heads, qk: qk_rows / heads, v: v_rows / heads, mlp });
    }
    Ok(VitConfig {
        image_size: grid * patch,
        patch_size: patch,
        in_chans,
        embed_dim: e,
        num_classes: head[0],
        distilled,
        // The softmax scale: timm's `E / heads`, from the checkpoint's E where `[model]` said
        // another (or left it to the default).
        head_dim: if hint.embed_dim == e { hint.head_dim } else { e / hint.blocks[0].heads.max(1) },
        drop_path: hint.drop_path,
        blocks,
    })
}

/// Builds a model of shape `config` from `sd`, checking every tensor.
pub fn import<B: Backend>(sd: &StateDict, config: &VitConfig, device: &B::Device) -> Result<Vit<B>> {
    let mut expected: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let e = config.embed_dim;
    let k = config.num_classes;
    let mut want = |name: String, shape: Vec<usize>| {
        expected.insert(name, shape);
    };
    want("patch_embed.proj.weight".into(), vec![e, config.in_chans, config.patch_size, config.patch_size]);
    want("patch_embed.proj.bias".into(), vec![e]);
    want("cls_token".into(), vec![1, 1, e]);
    if config.distilled {
        want("dist_token".into(), vec![1, 1, e]);
        want("head_dist.weight".into(), vec![k, e]);
        want("head_dist.bias".into(), vec![k]);
    }
    want("pos_embed".into(), vec![1, config.num_tokens(), e]);
    for (i, d) in config.blocks.iter().enumerate() {
        let p = format!("blocks.{i}");
        for n in ["norm1", "norm2"] {
            want(format!("{p}.{n}.weight"), vec![e]);
            want(format!("{p}.{n}.bias"), vec![e]);
        }
        let (qk, v) = (d.heads * d.qk, d.heads * d.v);
        if sd.tensors.contains_key(&format!("{p}.attn.qkv.weight")) {
            want(format!("{p}.attn.qkv.weight"), vec![2 * qk + v, e]);
            want(format!("{p}.attn.qkv.bias"), vec![2 * qk + v]);
        } else {
            for (n, rows) in [("q", qk), ("k", qk), ("v", v)] {
                want(format!("{p}.attn.{n}.weight"), vec![rows, e]);
                want(format!("{p}.attn.{n}.bias"), vec![rows]);
            }
        }
        for (n, o, i) in [("attn.proj", e, v), ("mlp.fc1", d.mlp, e), ("mlp.fc2", e, d.mlp)] {
            want(format!("{p}.{n}.weight"), vec![o, i]);
            want(format!("{p}.{n}.bias"), vec![o]);
        }
    }
    want("norm.weight".into(), vec![e]);
    want("norm.bias".into(), vec![e]);
    want("head.weight".into(), vec![k, e]);
    want("head.bias".into(), vec![k]);

    let mut problems = Vec::new();
    for (name, shape) in &expected {
        match sd.tensors.get(name) {
            None => problems.push(format!("missing tensor `{name}` (expected shape {shape:?})")),
            Some((got, _)) if got != shape => problems.push(format!("tensor `{name}` has shape {got:?}, expected {shape:?}")),
            _ => {}
        }
    }
    for name in sd.tensors.keys().filter(|n| !expected.contains_key(*n)) {
        problems.push(format!("unexpected tensor `{name}`"));
    }
    if !problems.is_empty() {
        bail!("the checkpoint does not fit the model:\n  {}", problems.join("\n  "));
    }

    let get = |name: &str| &sd.tensors[name].1;
    let tensor = |data: Vec<f32>, shape: Vec<usize>| super::float_tensor::<B, 1>(data, [shape.iter().product::<usize>()], device);
    let param1 = |name: &str| Param::from_tensor(tensor(get(name).clone(), vec![get(name).len()]));
    let param3 = |name: &str, shape: [usize; 3]| Param::from_tensor(super::float_tensor::<B, 3>(get(name).clone(), shape, device));
    // PyTorch `[out, in]` rows `rows` of a weight -> Burn `[in, out]`.
    let linear_rows = |w: &str, b: &str, rows: std::ops::Range<usize>, d_in: usize| {
        let n = rows.len();
        let wdata = &get(w)[rows.start * d_in..rows.end * d_in];
        let weight = super::float_tensor::<B, 2>(transpose(wdata, n, d_in), [d_in, n], device);
        let bias = tensor(get(b)[rows].to_vec(), vec![n]);
        burn::nn::Linear { weight: Param::from_tensor(weight), bias: Some(Param::from_tensor(bias)) }
    };
    let linear = |p: &str, d_out: usize, d_in: usize| linear_rows(&format!("{p}.weight"), &format!("{p}.bias"), 0..d_out, d_in);

    let mut model = config.init::<B>(device);
    model.patch_embed.weight = Param::from_tensor(super::float_tensor::<B, 4>(
        get("patch_embed.proj.weight").clone(),
        [e, config.in_chans, config.patch_size, config.patch_size],
        device,
    ));
    model.patch_embed.bias = Some(param1("patch_embed.proj.bias"));
    model.cls_token = param3("cls_token", [1, 1, e]);
    if config.distilled {
        model.dist_token = Some(param3("dist_token", [1, 1, e]));
        model.head_dist = Some(linear("head_dist", k, e));
    }
    model.pos_embed = param3("pos_embed", [1, config.num_tokens(), e]);
    let set_norm = |n: &mut burn::nn::LayerNorm<B>, p: &str| {
        n.gamma = param1(&format!("{p}.weight"));
        n.beta = Some(param1(&format!("{p}.bias")));
    };
    for (i, (block, d)) in model.blocks.iter_mut().zip(&config.blocks).enumerate() {
        let p = format!("blocks.{i}");
        set_norm(&mut block.norm1, &format!("{p}.norm1"));
        set_norm(&mut block.norm2, &format!("{p}.norm2"));
        let (qk, v) = (d.heads * d.qk, d.heads * d.v);
        let a = &mut block.attn;
        if sd.tensors.contains_key(&format!("{p}.attn.qkv.weight")) {
            let (w, b) = (format!("{p}.attn.qkv.weight"), format!("{p}.attn.qkv.bias"));
            a.q = linear_rows(&w, &b, 0..qk, e);
            a.k = linear_rows(&w, &b, qk..2 * qk, e);
            a.v = linear_rows(&w, &b, 2 * qk..2 * qk + v, e);
        } else {
            a.q = linear(&format!("{p}.attn.q"), qk, e);
            a.k = linear(&format!("{p}.attn.k"), qk, e);
            a.v = linear(&format!("{p}.attn.v"), v, e);
        }
        a.proj = linear(&format!("{p}.attn.proj"), e, v);
        block.mlp.fc1 = linear(&format!("{p}.mlp.fc1"), d.mlp, e);
        block.mlp.fc2 = linear(&format!("{p}.mlp.fc2"), e, d.mlp);
    }
    set_norm(&mut model.norm, "norm");
    model.head = linear("head", k, e);
    Ok(model)
}

/// Reads a user's checkpoint file, taking the widths it does not state from `hint`.
pub fn load_pretrained<B: Backend>(path: &Path, hint: &VitConfig, device: &B::Device) -> Result<Vit<B>> {
    let sd = StateDict::read(path)?;
    let config = infer_config(&sd, hint).with_context(|| format!("{}", path.display()))?;
    import(&sd, &config, device).with_context(|| format!("{}", path.display()))
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
        save(&model, dir.path()).unwrap();
        let sd = StateDict::read(&dir.path().join(WEIGHTS)).unwrap();
        assert!(sd.tensors.contains_key("blocks.0.attn.qkv.weight"));
        assert!(sd.tensors.contains_key("blocks.1.attn.q.weight"));
        let back = load::<NdArray>(dir.path(), &device).unwrap();
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
