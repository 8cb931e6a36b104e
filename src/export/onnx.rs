//! A model as an ONNX graph (opset 17): what ONNX Runtime, TensorRT and OpenVINO load; a ViT
//! ([`to_onnx`]) or a Swin ([`to_onnx_swin`]).
//!
//! The graph computes what `Vit::forward(..).logits()` computes: the patch embedding as a
//! strided convolution, per-block attention with the block's own head count and query/key and
//! value widths, erf GELU, `LayerNormalization` (new in opset 17), and the two heads averaged
//! when the model is distilled; timm's other ViTs' LayerScale, register tokens, position
//! embedding over the patches only, and average pooling with `fc_norm`. The batch dimension is symbolic (`batch`); the image size is
//! the model's, since the position embedding is.

use std::collections::BTreeMap;

use burn::tensor::backend::Backend;

use crate::protobuf::Message;
use crate::model::checkpoint::{export_block, export_split, export_swin_block, export_swin_split};
use crate::model::{Block, BlockDims, Model, Swin, SwinBlock, Vit};

/// The operator set the graph is written against (`LayerNormalization` needs 17).
pub const OPSET: i64 = 17;
/// The ONNX IR version that goes with opset 17.
const IR_VERSION: i64 = 8;
const FLOAT: i64 = 1;
const INT64: i64 = 7;
/// Names of the scalar constants GELU and the heads' average share.
const SQRT_2: &str = "sqrt2";
const ONE: &str = "one";
const HALF: &str = "half";

/// What the input expects, written into the file for whoever deploys it.
#[derive(Debug, Clone)]
pub struct InputSpec {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// Class names in label order, where the dataset has them.
    pub classes: Option<Vec<String>>,
}

/// The ONNX file's bytes: input `images` `[batch, in_chans, image_size, image_size]` f32,
/// normalized per channel with `spec`'s mean and std; output `logits` `[batch, num_classes]`.
pub fn to_onnx<B: Backend>(model: &Vit<B>, spec: &InputSpec) -> Vec<u8> {
    let c = &model.config;
    let sd = export_split(model).tensors;
    let w = |name: &str| -> &(Vec<usize>, Vec<f32>) { &sd[name] };
    let mut g = Graph::new();
    let e = c.embed_dim as i64;
    let patches = g.patch_embed(&sd, c.patch_size, c.embed_dim);

    // The class, distillation and register tokens, repeated over the batch, and the position
    // embedding: added after them, or to the patches only before them (`no_embed_class`).
    let shape = g.node("Shape", &["images"], &[]);
    let (start, end) = (g.ints("batch_start", &[0]), g.ints("batch_end", &[1]));
    let batch = g.node("Slice", &[&shape, &start, &end], &[]);
    let mut tokens = Vec::new();
    for name in ["cls_token", "dist_token", "reg_token"].into_iter().filter(|n| sd.contains_key(*n)) {
        let (dims, _) = w(name);
        let tail = g.ints(&format!("{name}_shape_tail"), &[dims[1] as i64, e]);
        let token_shape = g.node("Concat", &[&batch, &tail], &[Attr::Int("axis", 0)]);
        let t = g.weight(name, w(name));
        tokens.push(g.node("Expand", &[&t, &token_shape], &[]));
    }
    let pos = g.weight("pos_embed", w("pos_embed"));
    let mut x = if c.no_embed_class {
        tokens.push(g.node("Add", &[&patches, &pos], &[]));
        let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        g.node("Concat", &refs, &[Attr::Int("axis", 1)])
    } else {
        tokens.push(patches);
        let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let x = g.node("Concat", &refs, &[Attr::Int("axis", 1)]);
        g.node("Add", &[&x, &pos], &[])
    };

    let scale = (c.head_dim as f32).powf(-0.5);
    for (i, d) in c.blocks.iter().enumerate() {
        x = g.vit_block(&x, &format!("blocks.{i}"), d, scale, &sd, None);
    }

    if !c.fc_norm {
        x = g.layer_norm(&x, "norm", &sd);
    }
    let mut heads = Vec::new();
    for (index, head) in [(0, "head"), (1, "head_dist")].into_iter().filter(|(_, h)| sd.contains_key(&format!("{h}.weight"))) {
        let pooled = match (index, c.global_pool) {
            (0, crate::model::Pool::Avg) => {
                // The mean of the patch tokens, the prefix tokens left out.
                let (from, to) = (g.ints("patches_start", &[c.num_prefix_tokens() as i64]), g.ints("patches_end", &[i64::MAX]));
                let axis = g.ints("token_axis", &[1]);
                let patches = g.node("Slice", &[&x, &from, &to, &axis], &[]);
                g.node("ReduceMean", &[&patches], &[Attr::Ints("axes", vec![1]), Attr::Int("keepdims", 0)])
            }
            _ => {
                let at = g.scalar_int(&format!("{head}_token"), index);
                g.node("Gather", &[&x, &at], &[Attr::Int("axis", 1)]) // [b, E]
            }
        };
        let pooled = if c.fc_norm { g.layer_norm(&pooled, "fc_norm", &sd) } else { pooled };
        heads.push(g.linear(&pooled, head, &sd));
    }
    match heads.as_slice() {
        [cls] => g.node_named("Identity", &[cls], &[], "logits"),
        [cls, dist] => {
            // The two heads averaged, as DeiT evaluates a distilled model.
            let sum = g.node("Add", &[cls, dist], &[]);
            g.node_named("Mul", &[&sum, HALF], &[], "logits")
        }
        _ => unreachable!("a model has one or two heads"),
    };

    g.finish(ModelShape { image_size: c.image_size, in_chans: c.in_chans, num_classes: c.num_classes, dims: serde_json::to_string(c).expect("a config serializes") }, spec)
}

/// What the file says of the model around its graph.
struct ModelShape {
    image_size: usize,
    in_chans: usize,
    num_classes: usize,
    /// `dims.json`, in the file's metadata.
    dims: String,
}

/// A Swin as an ONNX graph (timm's `SwinTransformer`): the patch embedding and its norm, each
/// stage's patch merging (2x2 neighbours concatenated in timm's order, normalized, projected),
/// blocks attending within windows (the cyclic shift as two slices concatenated, each head's
/// relative position bias and the shifted windows' mask one constant per block), the final
/// norm, the mean over tokens and the head.
pub fn to_onnx_swin<B: Backend>(model: &Swin<B>, spec: &InputSpec) -> Vec<u8> {
    let c = &model.config;
    let sd = export_swin_split(model).tensors;
    let mut g = Graph::new();
    let e0 = c.stages[0].embed_dim as i64;
    let x = g.patch_embed(&sd, c.patch_size, c.stages[0].embed_dim);
    let mut x = g.layer_norm(&x, "patch_embed.norm", &sd);
    let scale = (c.head_dim as f32).powf(-0.5);
    let mut prev = e0;
    for (i, (stage, layer)) in c.stages.iter().zip(&model.layers).enumerate() {
        let (e, side) = (stage.embed_dim as i64, c.side(i) as i64);
        if i > 0 {
            let half = side;
            let merged = g.reshape(&x, &[-1, half, 2, half, 2, prev]);
            let merged = g.node("Transpose", &[&merged], &[Attr::Ints("perm", vec![0, 1, 3, 4, 2, 5])]);
            let merged = g.reshape(&merged, &[-1, half * half, 4 * prev]);
            let merged = g.layer_norm(&merged, &format!("layers.{i}.downsample.norm"), &sd);
            x = g.linear(&merged, &format!("layers.{i}.downsample.reduction"), &sd);
        }
        prev = e;
        for (j, (d, block)) in stage.blocks.iter().zip(&layer.blocks).enumerate() {
            x = g.swin_block(&x, &format!("layers.{i}.blocks.{j}"), block, d, side, scale, &sd, None);
        }
    }
    let x = g.layer_norm(&x, "norm", &sd);
    let pooled = g.node("ReduceMean", &[&x], &[Attr::Ints("axes", vec![1]), Attr::Int("keepdims", 0)]);
    let logits = g.linear(&pooled, "head.fc", &sd);
    g.node_named("Identity", &[&logits], &[], "logits");
    g.finish(ModelShape { image_size: c.image_size, in_chans: c.in_chans, num_classes: c.num_classes, dims: serde_json::to_string(c).expect("a config serializes") }, spec)
}

/// One ViT block of width `e` alone over `tokens` tokens, as [`to_onnx`] writes each block: input
/// `x` `[batch, tokens, e]`, output `y` of the same shape. What `profile_latency` times in ONNX
/// Runtime.
pub fn vit_block_to_onnx<B: Backend>(block: &Block<B>, d: &BlockDims, e: usize, tokens: usize, head_dim: usize) -> Vec<u8> {
    let sd = export_block(block, e).tensors;
    let mut g = Graph::new();
    g.vit_block("x", "blocks.0", d, (head_dim as f32).powf(-0.5), &sd, Some("y"));
    g.block_file(tokens, e)
}

/// One Swin block alone, of a stage `side` tokens on a side, as [`to_onnx_swin`] writes each
/// block: input `x` `[batch, side * side, e]`, output `y` of the same shape.
pub fn swin_block_to_onnx<B: Backend>(block: &SwinBlock<B>, d: &BlockDims, e: usize, side: usize, head_dim: usize) -> Vec<u8> {
    let sd = export_swin_block(block).tensors;
    let mut g = Graph::new();
    g.swin_block("x", "layers.0.blocks.0", block, d, side as i64, (head_dim as f32).powf(-0.5), &sd, Some("y"));
    g.block_file(side * side, e)
}

/// A model of either family as ONNX.
pub fn model_to_onnx<B: Backend>(model: &Model<B>, spec: &InputSpec) -> Vec<u8> {
    match model {
        Model::Deit(m) => to_onnx(m, spec),
        Model::Swin(m) => to_onnx_swin(m, spec),
    }
}

enum Dim {
    Batch,
    Fixed(usize),
}

fn value_info(name: &str, dims: &[Dim], doc: &str) -> Message {
    let mut shape = Message::new();
    for d in dims {
        let dim = match d {
            Dim::Batch => Message::new().string(2, "batch"),
            Dim::Fixed(n) => Message::new().int(1, *n as i64),
        };
        shape = shape.message(1, &dim);
    }
    let tensor = Message::new().int(1, FLOAT).message(2, &shape);
    Message::new().string(1, name).message(2, &Message::new().message(1, &tensor)).string(3, doc)
}

enum Attr {
    Int(&'static str, i64),
    Float(&'static str, f32),
    Ints(&'static str, Vec<i64>),
}

impl Attr {
    fn encode(&self) -> Message {
        const FLOAT_ATTR: i64 = 1;
        const INT_ATTR: i64 = 2;
        const INTS_ATTR: i64 = 7;
        match self {
            Attr::Int(name, v) => Message::new().string(1, name).int(3, *v).int(20, INT_ATTR),
            Attr::Float(name, v) => Message::new().string(1, name).float(2, *v).int(20, FLOAT_ATTR),
            Attr::Ints(name, v) => Message::new().string(1, name).ints(8, v.iter().copied()).int(20, INTS_ATTR),
        }
    }
}

/// Nodes and initializers, each node's one output named after its operator and position.
#[derive(Default)]
struct Graph {
    nodes: Vec<Message>,
    initializers: Vec<Message>,
}

impl Graph {
    fn node(&mut self, op: &str, inputs: &[&str], attrs: &[Attr]) -> String {
        let out = format!("{op}_{}", self.nodes.len());
        self.node_named(op, inputs, attrs, &out)
    }

    fn node_named(&mut self, op: &str, inputs: &[&str], attrs: &[Attr], out: &str) -> String {
        let mut n = Message::new();
        for i in inputs {
            n = n.string(1, i);
        }
        n = n.string(2, out).string(3, out).string(4, op);
        for a in attrs {
            n = n.message(5, &a.encode());
        }
        self.nodes.push(n);
        out.to_string()
    }

    fn tensor(&mut self, name: &str, dims: &[usize], data_type: i64, raw: &[u8]) -> String {
        let t = Message::new().ints(1, dims.iter().map(|&d| d as i64)).int(2, data_type).string(8, name).bytes(9, raw);
        self.initializers.push(t);
        name.to_string()
    }

    fn floats(&mut self, name: &str, dims: &[usize], data: &[f32]) -> String {
        let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor(name, dims, FLOAT, &raw)
    }

    fn weight(&mut self, name: &str, (dims, data): &(Vec<usize>, Vec<f32>)) -> String {
        self.floats(name, dims, data)
    }

    fn scalar(&mut self, name: &str, v: f32) -> String {
        self.floats(name, &[], &[v])
    }

    fn ints(&mut self, name: &str, data: &[i64]) -> String {
        let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor(name, &[data.len()], INT64, &raw)
    }

    fn scalar_int(&mut self, name: &str, v: i64) -> String {
        self.tensor(name, &[], INT64, &v.to_le_bytes())
    }

    /// `Reshape` to `shape`, where 0 keeps the input's size and -1 takes what is left.
    fn reshape(&mut self, x: &str, shape: &[i64]) -> String {
        let name = format!("shape_{}", self.initializers.len());
        let s = self.ints(&name, shape);
        self.node("Reshape", &[x, &s], &[])
    }

    /// `x W^T + b` for a PyTorch-layout `[out, in]` weight, as `MatMul` with its `[in, out]`
    /// transpose: `Gemm` takes two-dimensional inputs only.
    fn linear(&mut self, x: &str, prefix: &str, sd: &BTreeMap<String, (Vec<usize>, Vec<f32>)>) -> String {
        self.linear_scaled(x, prefix, sd, 1.0)
    }

    fn linear_scaled(&mut self, x: &str, prefix: &str, sd: &BTreeMap<String, (Vec<usize>, Vec<f32>)>, scale: f32) -> String {
        let (dims, w) = &sd[&format!("{prefix}.weight")];
        let (o, i) = (dims[0], dims[1]);
        let mut t = vec![0.0; o * i];
        for r in 0..o {
            for c in 0..i {
                t[c * o + r] = w[r * i + c] * scale;
            }
        }
        let w = self.floats(&format!("{prefix}.weight_t"), &[i, o], &t);
        let y = self.node("MatMul", &[x, &w], &[]);
        let Some((_, bias)) = sd.get(&format!("{prefix}.bias")) else { return y };
        let b: Vec<f32> = bias.iter().map(|v| v * scale).collect();
        let b = self.floats(&format!("{prefix}.bias"), &[o], &b);
        self.node("Add", &[&y, &b], &[])
    }

    fn layer_norm(&mut self, x: &str, prefix: &str, sd: &BTreeMap<String, (Vec<usize>, Vec<f32>)>) -> String {
        let gamma = self.weight(&format!("{prefix}.weight"), &sd[&format!("{prefix}.weight")]);
        let beta = self.weight(&format!("{prefix}.bias"), &sd[&format!("{prefix}.bias")]);
        self.node("LayerNormalization", &[x, &gamma, &beta], &[Attr::Int("axis", -1), Attr::Float("epsilon", crate::model::LN_EPS as f32)])
    }

    /// A graph with the scalar constants GELU and the heads' average share.
    fn new() -> Self {
        let mut g = Graph::default();
        g.scalar(SQRT_2, std::f32::consts::SQRT_2);
        g.scalar(ONE, 1.0);
        g.scalar(HALF, 0.5);
        g
    }

    /// The patch embedding of `images`: `[batch, C, H, W] -> [batch, E, H/p, W/p] ->
    /// [batch, patches, E]`, a strided convolution.
    fn patch_embed(&mut self, sd: &BTreeMap<String, (Vec<usize>, Vec<f32>)>, patch: usize, e: usize) -> String {
        let p = patch as i64;
        let kernel = self.weight("patch_embed.proj.weight", &sd["patch_embed.proj.weight"]);
        let bias = self.weight("patch_embed.proj.bias", &sd["patch_embed.proj.bias"]);
        let conv = self.node("Conv", &["images", &kernel, &bias], &[Attr::Ints("kernel_shape", vec![p, p]), Attr::Ints("strides", vec![p, p])]);
        let flat = self.reshape(&conv, &[0, e as i64, -1]);
        self.node("Transpose", &[&flat], &[Attr::Ints("perm", vec![0, 2, 1])])
    }

    /// A block's file: this graph between input `x` and output `y`, `[batch, tokens, e]` both.
    fn block_file(self, tokens: usize, e: usize) -> Vec<u8> {
        let dims = [Dim::Batch, Dim::Fixed(tokens), Dim::Fixed(e)];
        let input = value_info("x", &dims, "a block's input tokens");
        let output = value_info("y", &dims, "the block's output tokens");
        self.encode(input, output, BTreeMap::new(), "One transformer block of a Vision Transformer with per-block widths (NViT), as the runner times it")
    }

    /// The model file: this graph between input `images` and output `logits`, with the
    /// input's expectations and the model's shapes in its metadata.
    fn finish(self, shape: ModelShape, spec: &InputSpec) -> Vec<u8> {
        let input_doc = format!(
            "RGB-order images of {size}x{size} pixels, {ch} channel(s), f32 in [0, 1] minus mean {mean:?}, divided by std {std:?} per channel; the evaluation transform resizes the shorter side and center-crops",
            size = shape.image_size,
            ch = shape.in_chans,
            mean = spec.mean,
            std = spec.std,
        );
        let input = value_info("images", &[Dim::Batch, Dim::Fixed(shape.in_chans), Dim::Fixed(shape.image_size), Dim::Fixed(shape.image_size)], &input_doc);
        let output = value_info("logits", &[Dim::Batch, Dim::Fixed(shape.num_classes)], "class scores before the softmax");
        let mut meta = BTreeMap::new();
        meta.insert("image_size", shape.image_size.to_string());
        meta.insert("mean", format!("{:?}", spec.mean));
        meta.insert("std", format!("{:?}", spec.std));
        meta.insert("dims", shape.dims);
        if let Some(classes) = &spec.classes {
            meta.insert("classes", serde_json::to_string(classes).expect("strings serialize"));
        }
        self.encode(input, output, meta, "A Vision Transformer with per-block widths (NViT); input `images`, output `logits`")
    }

    fn encode(self, input: Message, output: Message, meta: BTreeMap<&str, String>, doc: &str) -> Vec<u8> {
        let mut graph = Message::new();
        for node in &self.nodes {
            graph = graph.message(1, node);
        }
        graph = graph.string(2, "nvit");
        for t in &self.initializers {
            graph = graph.message(5, t);
        }
        graph = graph.message(11, &input).message(12, &output);
        let mut model = Message::new()
            .int(1, IR_VERSION)
            .string(2, "nvit runner")
            .string(3, env!("CARGO_PKG_VERSION"))
            .string(6, doc)
            .message(7, &graph)
            .message(8, &Message::new().string(1, "").int(2, OPSET));
        for (k, v) in meta {
            model = model.message(14, &Message::new().string(1, k).string(2, &v));
        }
        model.into_bytes()
    }

    /// ViT block `prefix` over `x`: attention, then the MLP, each a residual branch with
    /// LayerScale's gain where the block has one. `out` names the block's output (a graph's).
    fn vit_block(&mut self, x: &str, prefix: &str, d: &BlockDims, scale: f32, sd: &BTreeMap<String, (Vec<usize>, Vec<f32>)>, out: Option<&str>) -> String {
        let y = self.layer_norm(x, &format!("{prefix}.norm1"), sd);
        let attn = self.attention(&y, &format!("{prefix}.attn"), sd, d, scale, None);
        let attn = self.layer_scale(&attn, &format!("{prefix}.ls1"), sd);
        let x = self.node("Add", &[x, &attn], &[]);
        self.mlp_branch(&x, prefix, sd, out)
    }

    /// Swin block `prefix` over `x` `[batch, side * side, E]`: attention within windows (the
    /// cyclic shift as two slices concatenated, each head's relative position bias and the
    /// shifted windows' mask one constant), then the MLP.
    #[allow(clippy::too_many_arguments)]
    fn swin_block<B: Backend>(&mut self, x: &str, prefix: &str, block: &SwinBlock<B>, d: &BlockDims, side: i64, scale: f32, sd: &BTreeMap<String, (Vec<usize>, Vec<f32>)>, out: Option<&str>) -> String {
        let e = sd[&format!("{prefix}.norm1.weight")].0[0] as i64;
        let (win, shift) = (block.window as i64, block.shift as i64);
        let (per_side, n) = (side / win, win * win);
        let y = self.layer_norm(x, &format!("{prefix}.norm1"), sd);
        let y = self.reshape(&y, &[-1, side, side, e]);
        let y = if shift > 0 { self.roll(&y, shift, side) } else { y };
        let windows = self.reshape(&y, &[-1, per_side, win, per_side, win, e]);
        let windows = self.node("Transpose", &[&windows], &[Attr::Ints("perm", vec![0, 1, 3, 2, 4, 5])]);
        let windows = self.reshape(&windows, &[-1, n, e]);
        // `[1, windows, heads, n, n]`, added to the scores viewed per image.
        let bias = block.attention_bias(1, &block.norm1.gamma.device());
        let [nw, h, _, _] = bias.dims();
        let values = bias.into_data().convert::<f32>().to_vec::<f32>().expect("f32");
        let bias = self.floats(&format!("{prefix}.attn.bias"), &[1, nw, h, n as usize, n as usize], &values);
        let attn = self.attention(&windows, &format!("{prefix}.attn"), sd, d, scale, Some((&bias, nw as i64, n)));
        let attn = self.reshape(&attn, &[-1, per_side, per_side, win, win, e]);
        let attn = self.node("Transpose", &[&attn], &[Attr::Ints("perm", vec![0, 1, 3, 2, 4, 5])]);
        let attn = self.reshape(&attn, &[-1, side, side, e]);
        let attn = if shift > 0 { self.roll(&attn, side - shift, side) } else { attn };
        let attn = self.reshape(&attn, &[-1, side * side, e]);
        let x = self.node("Add", &[x, &attn], &[]);
        self.mlp_branch(&x, prefix, sd, out)
    }

    /// The residual MLP branch of block `prefix`: `x + fc2(gelu(fc1(norm2(x))))`, LayerScale's
    /// gain on the branch where the block has one; the sum named `out` where given.
    fn mlp_branch(&mut self, x: &str, prefix: &str, sd: &BTreeMap<String, (Vec<usize>, Vec<f32>)>, out: Option<&str>) -> String {
        let y = self.layer_norm(x, &format!("{prefix}.norm2"), sd);
        let hidden = self.linear(&y, &format!("{prefix}.mlp.fc1"), sd);
        let hidden = self.gelu(&hidden);
        let branch = self.linear(&hidden, &format!("{prefix}.mlp.fc2"), sd);
        let branch = self.layer_scale(&branch, &format!("{prefix}.ls2"), sd);
        match out {
            Some(name) => self.node_named("Add", &[x, &branch], &[], name),
            None => self.node("Add", &[x, &branch], &[]),
        }
    }

    /// Multi-head attention `prefix` over `x` `[batch, tokens, E]` with block `d`'s widths;
    /// `bias`: a constant `[1, windows, heads, n, n]` added to the scores viewed as
    /// `[batch, windows, heads, n, n]` (Swin's), with its window count and window size `n`.
    fn attention(&mut self, x: &str, prefix: &str, sd: &BTreeMap<String, (Vec<usize>, Vec<f32>)>, d: &BlockDims, scale: f32, bias: Option<(&str, i64, i64)>) -> String {
        let (h, qk, v) = (d.heads as i64, d.qk as i64, d.v as i64);
        // The softmax scale folded into the query projection: one product fewer per block,
        // on `[batch, heads, tokens, tokens]`, the largest tensor of the graph.
        let q = self.linear_scaled(x, &format!("{prefix}.q"), sd, scale);
        let k = self.linear(x, &format!("{prefix}.k"), sd);
        let vv = self.linear(x, &format!("{prefix}.v"), sd);
        let mut heads = |t: &str, width: i64, perm: Vec<i64>| {
            let split = self.reshape(t, &[0, 0, h, width]);
            self.node("Transpose", &[&split], &[Attr::Ints("perm", perm)])
        };
        let q = heads(&q, qk, vec![0, 2, 1, 3]); // [b, h, n, qk]
        let k = heads(&k, qk, vec![0, 2, 3, 1]); // [b, h, qk, n]
        let vv = heads(&vv, v, vec![0, 2, 1, 3]); // [b, h, n, v]
        let mut scores = self.node("MatMul", &[&q, &k], &[]);
        if let Some((bias, windows, n)) = bias {
            let per_image = self.reshape(&scores, &[-1, windows, h, n, n]);
            let biased = self.node("Add", &[&per_image, bias], &[]);
            scores = self.reshape(&biased, &[-1, h, n, n]);
        }
        let attn = self.node("Softmax", &[&scores], &[Attr::Int("axis", -1)]);
        let out = self.node("MatMul", &[&attn, &vv], &[]);
        let out = self.node("Transpose", &[&out], &[Attr::Ints("perm", vec![0, 2, 1, 3])]);
        let out = self.reshape(&out, &[0, 0, h * v]);
        self.linear(&out, &format!("{prefix}.proj"), sd)
    }

    /// `x` `[batch, side, side, E]` rolled by `k` along both spatial axes as Burn's `roll`
    /// does (element `i + k` to `i`): the slices from `k` on, then those before.
    fn roll(&mut self, x: &str, k: i64, side: i64) -> String {
        let id = self.initializers.len();
        let (zero, at_k, end) = (self.ints(&format!("roll{id}_start"), &[0]), self.ints(&format!("roll{id}_k"), &[k]), self.ints(&format!("roll{id}_end"), &[side]));
        let mut y = x.to_string();
        for axis in [1, 2] {
            let along = self.ints(&format!("roll{id}_axis{axis}"), &[axis]);
            let tail = self.node("Slice", &[&y, &at_k, &end, &along], &[]);
            let head = self.node("Slice", &[&y, &zero, &at_k, &along], &[]);
            y = self.node("Concat", &[&tail, &head], &[Attr::Int("axis", axis)]);
        }
        y
    }

    /// `x` times LayerScale's gains `{prefix}.gamma`, where the model has them.
    fn layer_scale(&mut self, x: &str, prefix: &str, sd: &BTreeMap<String, (Vec<usize>, Vec<f32>)>) -> String {
        let name = format!("{prefix}.gamma");
        match sd.get(&name) {
            Some(gamma) => {
                let gamma = self.weight(&name, gamma);
                self.node("Mul", &[x, &gamma], &[])
            }
            None => x.to_string(),
        }
    }

    /// GELU in its erf form, `x * (1 + erf(x / sqrt 2)) / 2` (the `Gelu` operator is opset 20).
    fn gelu(&mut self, x: &str) -> String {
        let scaled = self.node("Div", &[x, SQRT_2], &[]);
        let erf = self.node("Erf", &[&scaled], &[]);
        let phi = self.node("Add", &[&erf, ONE], &[]);
        let phi = self.node("Mul", &[&phi, HALF], &[]);
        self.node("Mul", &[x, &phi], &[])
    }
}
