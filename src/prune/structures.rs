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

use crate::model::{BlockDims, Vit, VitConfig};

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
    pub head: Vec<f32>,
    pub qk: Vec<f32>,
    pub v: Vec<f32>,
    pub mlp: Vec<f32>,
}

/// A value per unit of every structure: multipliers here, saliencies in [`super::saliency`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Masks {
    pub emb: Vec<f32>,
    pub blocks: Vec<BlockUnits>,
}

impl Masks {
    pub fn filled(config: &VitConfig, value: f32) -> Self {
        Self {
            emb: vec![value; config.embed_dim],
            blocks: config
                .blocks
                .iter()
                .map(|d| BlockUnits { head: vec![value; d.heads], qk: vec![value; d.qk], v: vec![value; d.v], mlp: vec![value; d.mlp] })
                .collect(),
        }
    }

    pub fn ones(config: &VitConfig) -> Self {
        Self::filled(config, 1.0)
    }

    /// Every `(structure, block)` holding units, structure by structure; EMB once, as block 0.
    pub fn slots(&self) -> Vec<(Structure, usize)> {
        let depth = self.blocks.len();
        Structure::ALL
            .into_iter()
            .flat_map(|s| (0..if s == Structure::Emb { 1 } else { depth }).map(move |b| (s, b)))
            .collect()
    }

    /// The values of `structure` in `block` (EMB: `block` is ignored).
    pub fn get_mut(&mut self, structure: Structure, block: usize) -> &mut Vec<f32> {
        match structure {
            Structure::Emb => &mut self.emb,
            Structure::Head => &mut self.blocks[block].head,
            Structure::Qk => &mut self.blocks[block].qk,
            Structure::V => &mut self.blocks[block].v,
            Structure::Mlp => &mut self.blocks[block].mlp,
        }
    }

    pub fn get(&self, structure: Structure, block: usize) -> &[f32] {
        match structure {
            Structure::Emb => &self.emb,
            Structure::Head => &self.blocks[block].head,
            Structure::Qk => &self.blocks[block].qk,
            Structure::V => &self.blocks[block].v,
            Structure::Mlp => &self.blocks[block].mlp,
        }
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

    /// The widths that survive when zero means pruned.
    pub fn surviving_dims(&self) -> (usize, Vec<BlockDims>) {
        let alive = |v: &[f32]| v.iter().filter(|x| **x != 0.0).count();
        let blocks = self
            .blocks
            .iter()
            .map(|b| BlockDims { heads: alive(&b.head), qk: alive(&b.qk), v: alive(&b.v), mlp: alive(&b.mlp) })
            .collect();
        (alive(&self.emb), blocks)
    }

    /// `config` at the widths that survive: the model the masks leave.
    pub fn surviving(&self, config: &VitConfig) -> VitConfig {
        let (embed_dim, blocks) = self.surviving_dims();
        VitConfig { embed_dim, blocks, ..config.clone() }
    }

    /// Multiplies every unit's parameters in `set` by its value.
    pub fn apply<B: Backend>(&self, model: Vit<B>, set: ParamSet) -> Vit<B> {
        let units = self.to_tensors(&model.cls_token.device());
        gate(model, &units, set)
    }

    /// Zeroes the pruned units of a model being trained. The product is taken outside the
    /// autodiff graph and the weights come back as leaves that require gradients: a product
    /// inside the graph would make every weight an intermediate node, for which backward keeps
    /// no gradient, and the optimizer would silently stop updating the model.
    pub fn apply_trainable<B: AutodiffBackend>(&self, model: Vit<B>) -> Vit<B> {
        struct Trainable;
        impl<B: AutodiffBackend> ModuleMapper<B> for Trainable {
            fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
                param.map(|w| Tensor::from_inner(w.inner()).require_grad())
            }
        }
        Vit::from_inner(self.apply(model.valid(), ParamSet::Pruned)).map(&mut Trainable)
    }

    pub fn to_tensors<B: Backend>(&self, device: &B::Device) -> UnitTensors<B> {
        let vec = |v: &[f32]| crate::model::float_tensor::<B, 1>(v.to_vec(), [v.len()], device);
        UnitTensors {
            emb: vec(&self.emb),
            blocks: self.blocks.iter().map(|b| [vec(&b.head), vec(&b.qk), vec(&b.v), vec(&b.mlp)]).collect(),
        }
    }

    /// Reads per-unit values back from tensors (for instance, gate gradients).
    pub fn from_tensors<B: Backend>(t: &UnitTensors<B>) -> Self {
        let read = |x: &Tensor<B, 1>| x.to_data().convert::<f32>().to_vec::<f32>().expect("f32");
        Self {
            emb: read(&t.emb),
            blocks: t.blocks.iter().map(|[h, q, v, m]| BlockUnits { head: read(h), qk: read(q), v: read(v), mlp: read(m) }).collect(),
        }
    }
}

/// Per-unit values as tensors: `emb`, and per block `[head, qk, v, mlp]`.
#[derive(Clone)]
pub struct UnitTensors<B: Backend> {
    pub emb: Tensor<B, 1>,
    pub blocks: Vec<[Tensor<B, 1>; 4]>,
}

impl<B: Backend> UnitTensors<B> {
    pub fn map(self, f: impl Fn(Tensor<B, 1>) -> Tensor<B, 1>) -> Self {
        Self { emb: f(self.emb), blocks: self.blocks.into_iter().map(|b| b.map(&f)).collect() }
    }
}

/// Multiplies every unit's parameters in `set` by its value in `units`. With gates of ones
/// that require gradients, the model computes the same function and `dL/dgate` is the
/// saliency's inner sum, `sum over the unit of w * dL/dw` (METHOD.md section 3).
pub fn gate<B: Backend>(mut model: Vit<B>, units: &UnitTensors<B>, set: ParamSet) -> Vit<B> {
    let pruned = set == ParamSet::Pruned;
    let e = units.emb.clone();
    let n = e.dims()[0];
    let emb_row = e.clone().reshape([n, 1]); // over a Burn weight's input rows

    model.patch_embed.weight = scale(model.patch_embed.weight, e.clone().reshape([n, 1, 1, 1]));
    model.patch_embed.bias = model.patch_embed.bias.map(|b| scale(b, e.clone()));
    if pruned {
        let values = e.to_data().convert::<f32>().to_vec::<f32>().expect("f32");
        model.emb_alive = values.iter().any(|v| *v == 0.0).then(|| values.iter().map(|v| (*v != 0.0) as u8 as f32).collect());
        let tokens = e.clone().reshape([1, 1, n]);
        model.cls_token = scale(model.cls_token, tokens.clone());
        model.dist_token = model.dist_token.map(|t| scale(t, tokens.clone()));
        model.pos_embed = scale(model.pos_embed, tokens);
        model.norm = scale_norm(model.norm, &e);
        model.head.weight = scale(model.head.weight, emb_row.clone());
        model.head_dist = model.head_dist.map(|mut h| {
            h.weight = scale(h.weight, emb_row.clone());
            h
        });
    }
    for (block, [head, qk, v, mlp]) in model.blocks.iter_mut().zip(&units.blocks) {
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

        let a = &mut block.attn;
        a.q = scale_linear(a.q.clone(), Some(emb_row.clone()), q_cols);
        a.k = scale_linear(a.k.clone(), Some(emb_row.clone()), k_cols);
        a.v = scale_linear(a.v.clone(), Some(emb_row.clone()), v_cols.clone());
        a.proj = scale_linear(a.proj.clone(), pruned.then(|| v_cols.reshape([h * nv, 1])), e.clone());
        block.mlp.fc1 = scale_linear(block.mlp.fc1.clone(), Some(emb_row.clone()), mlp.clone());
        block.mlp.fc2 = scale_linear(block.mlp.fc2.clone(), pruned.then(|| mlp.clone().reshape([nmlp, 1])), e.clone());
        if pruned {
            block.norm1 = scale_norm(block.norm1.clone(), &e);
            block.norm2 = scale_norm(block.norm2.clone(), &e);
        }
    }
    model
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
