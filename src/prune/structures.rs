//! The prunable structures of METHOD.md section 2 and per-unit multipliers over them.
//!
//! A [`Masks`] holds one multiplier per unit of every structure. [`Masks::apply`] multiplies
//! each unit's parameters by it, over one of two parameter sets: [`ParamSet::Saliency`] (the
//! weights the saliency sums `w * g` over, so scaling a unit by `1 + eps` moves exactly the
//! gate the saliency differentiates) or [`ParamSet::Pruned`] (every slice zeroed together when
//! the unit is pruned). Burn's `Linear` stores `[d_in, d_out]`, the transpose of PyTorch, so a
//! PyTorch "row" (output) is a Burn column here.

use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::nn::{LayerNorm, Linear};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::model::{Attention, BlockDims, Mlp, Model, ModelConfig, Swin, Vit};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Structure {
    Emb,
    Head,
    Qk,
    V,
    Mlp,
}

impl Structure {
    pub const ALL: [Structure; 5] = [Structure::Emb, Structure::Head, Structure::Qk, Structure::V, Structure::Mlp];

    pub fn name(self) -> &'static str {
        match self {
            Structure::Emb => "emb",
            Structure::Head => "head",
            Structure::Qk => "qk",
            Structure::V => "v",
            Structure::Mlp => "mlp",
        }
    }

    /// The reference implementation's normalizer `c` (METHOD.md section 2); EMB's is the depth.
    pub fn default_normalizer(self, depth: usize) -> f64 {
        match self {
            Structure::Emb => depth as f64,
            Structure::Head => 12.0,
            Structure::Qk | Structure::V => 2.0,
            Structure::Mlp => 1.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamSet {
    /// What the saliency's sum runs over (METHOD.md section 2, fourth column).
    Saliency,
    /// Everything zeroed together when a unit is pruned (third column).
    Pruned,
}

/// One block's per-unit values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockUnits {
    /// The residual stream (stage) the block reads and writes: its EMB units are
    /// `Masks::emb[stage]`. Always 0 for DeiT.
    #[serde(default)]
    pub stage: usize,
    pub head: Vec<f32>,
    pub qk: Vec<f32>,
    pub v: Vec<f32>,
    pub mlp: Vec<f32>,
}

/// A value per unit of every structure: multipliers here, saliencies in [`super::saliency`].
/// EMB has one set of units per residual stream: DeiT's one, one per stage of a Swin (the
/// stage's channels, from the patch embedding or merging that writes them to the merging or
/// head that reads them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Masks {
    pub emb: Vec<Vec<f32>>,
    pub blocks: Vec<BlockUnits>,
}

impl Masks {
    pub fn filled(config: &ModelConfig, value: f32) -> Self {
        let stages = config.stages();
        Self {
            emb: stages.iter().map(|(e, _)| vec![value; *e]).collect(),
            blocks: stages
                .iter()
                .enumerate()
                .flat_map(|(stage, (_, blocks))| {
                    blocks.iter().map(move |d| BlockUnits { stage, head: vec![value; d.heads], qk: vec![value; d.qk], v: vec![value; d.v], mlp: vec![value; d.mlp] })
                })
                .collect(),
        }
    }

    pub fn ones(config: &ModelConfig) -> Self {
        Self::filled(config, 1.0)
    }

    /// Every `(structure, index)` holding units, structure by structure: EMB's index is the
    /// stream (stage), the others' the block.
    pub fn slots(&self) -> Vec<(Structure, usize)> {
        let (streams, depth) = (self.emb.len(), self.blocks.len());
        Structure::ALL
            .into_iter()
            .flat_map(|s| (0..if s == Structure::Emb { streams } else { depth }).map(move |b| (s, b)))
            .collect()
    }

    /// The values of `structure` in `block` (EMB: in stream `block`).
    pub fn get_mut(&mut self, structure: Structure, block: usize) -> &mut Vec<f32> {
        match structure {
            Structure::Emb => &mut self.emb[block],
            Structure::Head => &mut self.blocks[block].head,
            Structure::Qk => &mut self.blocks[block].qk,
            Structure::V => &mut self.blocks[block].v,
            Structure::Mlp => &mut self.blocks[block].mlp,
        }
    }

    pub fn get(&self, structure: Structure, block: usize) -> &[f32] {
        match structure {
            Structure::Emb => &self.emb[block],
            Structure::Head => &self.blocks[block].head,
            Structure::Qk => &self.blocks[block].qk,
            Structure::V => &self.blocks[block].v,
            Structure::Mlp => &self.blocks[block].mlp,
        }
    }

    /// The number of blocks reading and writing stream `stage`.
    pub fn blocks_in(&self, stage: usize) -> usize {
        self.blocks.iter().filter(|b| b.stage == stage).count()
    }

    /// Adds `other` unit by unit.
    pub fn add(&mut self, other: &Masks) {
        for (s, b) in self.slots() {
            self.get_mut(s, b).iter_mut().zip(other.get(s, b)).for_each(|(x, y)| *x += y);
        }
    }

    pub fn scale(&mut self, factor: f32) {
        for (s, b) in self.slots() {
            self.get_mut(s, b).iter_mut().for_each(|x| *x *= factor);
        }
    }

    /// The widths that survive when zero means pruned: per stream, its width and its blocks'.
    pub fn surviving_dims(&self) -> Vec<(usize, Vec<BlockDims>)> {
        let alive = |v: &[f32]| v.iter().filter(|x| **x != 0.0).count();
        let mut stages: Vec<(usize, Vec<BlockDims>)> = self.emb.iter().map(|e| (alive(e), Vec::new())).collect();
        for b in &self.blocks {
            stages[b.stage].1.push(BlockDims { heads: alive(&b.head), qk: alive(&b.qk), v: alive(&b.v), mlp: alive(&b.mlp) });
        }
        stages
    }

    /// `config` at the widths that survive: the model the masks leave.
    pub fn surviving(&self, config: &ModelConfig) -> ModelConfig {
        config.with_stages(self.surviving_dims())
    }

    /// Multiplies every unit's parameters in `set` by its value.
    pub fn apply<B: Backend>(&self, model: Model<B>, set: ParamSet) -> Model<B> {
        let units = self.to_tensors(&model.device());
        gate(model, &units, set)
    }

    /// Zeroes the pruned units of a model being trained. The product is taken outside the
    /// autodiff graph and the weights come back as leaves that require gradients: a product
    /// inside the graph would make every weight an intermediate node, for which backward keeps
    /// no gradient, and the optimizer would silently stop updating the model.
    pub fn apply_trainable<B: AutodiffBackend>(&self, model: Model<B>) -> Model<B> {
        struct Trainable;
        impl<B: AutodiffBackend> ModuleMapper<B> for Trainable {
            fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
                param.map(|w| Tensor::from_inner(w.inner()).require_grad())
            }
        }
        Model::from_inner(self.apply(model.valid(), ParamSet::Pruned)).map(&mut Trainable)
    }

    pub fn to_tensors<B: Backend>(&self, device: &B::Device) -> UnitTensors<B> {
        let vec = |v: &[f32]| crate::model::float_tensor::<B, 1>(v.to_vec(), [v.len()], device);
        UnitTensors {
            emb: self.emb.iter().map(|e| vec(e)).collect(),
            blocks: self.blocks.iter().map(|b| [vec(&b.head), vec(&b.qk), vec(&b.v), vec(&b.mlp)]).collect(),
            stages: self.blocks.iter().map(|b| b.stage).collect(),
        }
    }

    /// Reads per-unit values back from tensors (for instance, gate gradients).
    pub fn from_tensors<B: Backend>(t: &UnitTensors<B>) -> Self {
        let read = |x: &Tensor<B, 1>| x.to_data().convert::<f32>().to_vec::<f32>().expect("f32");
        Self {
            emb: t.emb.iter().map(read).collect(),
            blocks: t
                .blocks
                .iter()
                .zip(&t.stages)
                .map(|([h, q, v, m], &stage)| BlockUnits { stage, head: read(h), qk: read(q), v: read(v), mlp: read(m) })
                .collect(),
        }
    }
}

/// Per-unit values as tensors: `emb` per stream, and per block `[head, qk, v, mlp]` and the
/// stream it is in.
#[derive(Clone)]
pub struct UnitTensors<B: Backend> {
    pub emb: Vec<Tensor<B, 1>>,
    pub blocks: Vec<[Tensor<B, 1>; 4]>,
    pub stages: Vec<usize>,
}

impl<B: Backend> UnitTensors<B> {
    pub fn map(self, f: impl Fn(Tensor<B, 1>) -> Tensor<B, 1>) -> Self {
        Self { emb: self.emb.into_iter().map(&f).collect(), blocks: self.blocks.into_iter().map(|b| b.map(&f)).collect(), stages: self.stages }
    }
}

/// Multiplies every unit's parameters in `set` by its value in `units`. With gates of ones
/// that require gradients, the model computes the same function and `dL/dgate` is the
/// saliency's inner sum, `sum over the unit of w * dL/dw` (METHOD.md section 3).
pub fn gate<B: Backend>(model: Model<B>, units: &UnitTensors<B>, set: ParamSet) -> Model<B> {
    match model {
        Model::Deit(m) => Model::Deit(gate_deit(m, units, set)),
        Model::Swin(m) => Model::Swin(gate_swin(m, units, set)),
    }
}

/// 1 for each surviving channel of a pruned stream, `None` when none of it is pruned: what
/// the masked LayerNorms take their statistics over.
fn alive<B: Backend>(e: &Tensor<B, 1>) -> Option<Vec<f32>> {
    let values = e.to_data().convert::<f32>().to_vec::<f32>().expect("f32");
    values.iter().any(|v| *v == 0.0).then(|| values.iter().map(|v| (*v != 0.0) as u8 as f32).collect())
}

fn gate_deit<B: Backend>(mut model: Vit<B>, units: &UnitTensors<B>, set: ParamSet) -> Vit<B> {
    let pruned = set == ParamSet::Pruned;
    let e = units.emb[0].clone();
    let n = e.dims()[0];
    let emb_row = e.clone().reshape([n, 1]); // over a Burn weight's input rows

    model.patch_embed.weight = scale(model.patch_embed.weight, e.clone().reshape([n, 1, 1, 1]));
    model.patch_embed.bias = model.patch_embed.bias.map(|b| scale(b, e.clone()));
    if pruned {
        model.emb_alive = alive(&e);
        let tokens = e.clone().reshape([1, 1, n]);
        model.cls_token = model.cls_token.map(|t| scale(t, tokens.clone()));
        model.dist_token = model.dist_token.map(|t| scale(t, tokens.clone()));
        model.reg_token = model.reg_token.map(|t| scale(t, tokens.clone()));
        model.pos_embed = scale(model.pos_embed, tokens);
        model.norm = model.norm.map(|norm| scale_norm(norm, &e));
        model.fc_norm = model.fc_norm.map(|norm| scale_norm(norm, &e));
        model.head.weight = scale(model.head.weight, emb_row.clone());
        model.head_dist = model.head_dist.map(|mut h| {
            h.weight = scale(h.weight, emb_row.clone());
            h
        });
    }
    for (block, b) in model.blocks.iter_mut().zip(&units.blocks) {
        gate_block(&mut block.attn, &mut block.mlp, b, &e, pruned);
        if pruned {
            block.norm1 = scale_norm(block.norm1.clone(), &e);
            block.norm2 = scale_norm(block.norm2.clone(), &e);
            for ls in [&mut block.ls1, &mut block.ls2].into_iter().flatten() {
                ls.gamma = scale(ls.gamma.clone(), e.clone());
            }
        }
    }
    model
}

fn gate_swin<B: Backend>(mut model: Swin<B>, units: &UnitTensors<B>, set: ParamSet) -> Swin<B> {
    let pruned = set == ParamSet::Pruned;
    let e0 = units.emb[0].clone();
    let n0 = e0.dims()[0];
    model.patch_embed.weight = scale(model.patch_embed.weight, e0.clone().reshape([n0, 1, 1, 1]));
    model.patch_embed.bias = model.patch_embed.bias.map(|b| scale(b, e0.clone()));
    if pruned {
        model.patch_norm = scale_norm(model.patch_norm, &e0);
        let streams: Vec<Option<Vec<f32>>> = units.emb.iter().map(alive).collect();
        model.emb_alive = streams.iter().any(Option::is_some).then(|| {
            streams.into_iter().zip(&units.emb).map(|(a, e)| a.unwrap_or_else(|| vec![1.0; e.dims()[0]])).collect()
        });
    }
    let mut blocks = units.blocks.iter();
    for (g, layer) in model.layers.iter_mut().enumerate() {
        let e = units.emb[g].clone();
        if let Some(merge) = &mut layer.downsample {
            // The merging writes stream g from four neighbours' channels of stream g - 1,
            // concatenated as four copies of that stream's channels.
            let before = units.emb[g - 1].clone().repeat_dim(0, 4);
            merge.reduction = scale_linear(merge.reduction.clone(), pruned.then(|| before.clone().reshape([before.dims()[0], 1])), e.clone());
            if pruned {
                merge.norm = scale_norm(merge.norm.clone(), &before);
            }
        }
        for block in layer.blocks.iter_mut() {
            let b = blocks.next().expect("a unit set per block");
            gate_block(&mut block.attn, &mut block.mlp, b, &e, pruned);
            // The relative position bias is part of its head.
            let h = b[0].dims()[0];
            block.relative_position_bias_table = scale(block.relative_position_bias_table.clone(), b[0].clone().reshape([1, h]));
            if pruned {
                block.norm1 = scale_norm(block.norm1.clone(), &e);
                block.norm2 = scale_norm(block.norm2.clone(), &e);
            }
        }
    }
    if pruned {
        let last = units.emb.last().expect("a Swin has a stage").clone();
        let n = last.dims()[0];
        model.norm = scale_norm(model.norm, &last);
        model.head.weight = scale(model.head.weight, last.reshape([n, 1]));
    }
    model
}

/// A block's attention and MLP over stream `e`, with its `[head, qk, v, mlp]` units.
fn gate_block<B: Backend>(attn: &mut Attention<B>, mlp_layer: &mut Mlp<B>, units: &[Tensor<B, 1>; 4], e: &Tensor<B, 1>, pruned: bool) {
    let [head, qk, v, mlp] = units;
    let n = e.dims()[0];
    let emb_row = e.clone().reshape([n, 1]);
    let (h, nqk, nv, nmlp) = (head.dims()[0], qk.dims()[0], v.dims()[0], mlp.dims()[0]);
    // Per output column of Q/K/V: the head's multiplier times the dimension's.
    let head_qk = head.clone().reshape([h, 1]).expand([h, nqk]).reshape([h * nqk]);
    let head_v = head.clone().reshape([h, 1]).expand([h, nv]).reshape([h * nv]);
    let qk_dim = qk.clone().reshape([1, nqk]).expand([h, nqk]).reshape([h * nqk]);
    let v_dim = v.clone().reshape([1, nv]).expand([h, nv]).reshape([h * nv]);
    let q_cols = head_qk.clone() * qk_dim.clone();
    // The QK saliency sums over Q only; pruning a QK dim zeroes K's too.
    let k_cols = if pruned { head_qk * qk_dim } else { head_qk };
    let v_cols = head_v * v_dim;

    attn.q = scale_linear(attn.q.clone(), Some(emb_row.clone()), q_cols);
    attn.k = scale_linear(attn.k.clone(), Some(emb_row.clone()), k_cols);
    attn.v = scale_linear(attn.v.clone(), Some(emb_row.clone()), v_cols.clone());
    attn.proj = scale_linear(attn.proj.clone(), pruned.then(|| v_cols.reshape([h * nv, 1])), e.clone());
    mlp_layer.fc1 = scale_linear(mlp_layer.fc1.clone(), Some(emb_row), mlp.clone());
    mlp_layer.fc2 = scale_linear(mlp_layer.fc2.clone(), pruned.then(|| mlp.clone().reshape([nmlp, 1])), e.clone());
}

fn scale<B: Backend, const D: usize, const K: usize>(p: Param<Tensor<B, D>>, m: Tensor<B, K>) -> Param<Tensor<B, D>> {
    let shape = p.dims();
    p.map(|w| w * m.reshape_to::<D>().expand(shape))
}

trait ReshapeTo<B: Backend> {
    fn reshape_to<const D: usize>(self) -> Tensor<B, D>;
}

impl<B: Backend, const K: usize> ReshapeTo<B> for Tensor<B, K> {
    /// Left-pads the shape with ones to rank `D`, for broadcasting.
    fn reshape_to<const D: usize>(self) -> Tensor<B, D> {
        let dims = self.dims();
        let mut shape = [1usize; D];
        shape[D - K..].copy_from_slice(&dims);
        self.reshape(shape)
    }
}

/// `rows` multiplies the weight's input rows (shape `[d_in, 1]`), `cols` its outputs (and the bias).
fn scale_linear<B: Backend>(mut l: Linear<B>, rows: Option<Tensor<B, 2>>, cols: Tensor<B, 1>) -> Linear<B> {
    let [d_in, d_out] = l.weight.dims();
    let mut m = cols.clone().reshape([1, d_out]).expand([d_in, d_out]);
    if let Some(r) = rows {
        m = m * r.expand([d_in, d_out]);
    }
    l.weight = l.weight.map(|w| w * m);
    l.bias = l.bias.map(|b| b.map(|b| b * cols));
    l
}

fn scale_norm<B: Backend>(mut n: LayerNorm<B>, e: &Tensor<B, 1>) -> LayerNorm<B> {
    n.gamma = n.gamma.map(|g| g * e.clone());
    n.beta = n.beta.map(|b| b.map(|b| b * e.clone()));
    n
}
