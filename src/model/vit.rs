//! DeiT (Touvron et al., "Training data-efficient image transformers", 2021) with the per-block
//! widths of NViT (Yang et al., CVPR 2023): Q, K and V are separate projections so each block
//! can keep its own number of heads and its own query/key and value widths.
//!
//! Field names follow timm's checkpoint keys (`patch_embed`, `blocks.N.attn.q`, `mlp.fc1`, ...)
//! so the struct tree is the weight-name tree. Burn's `Linear` stores `[d_in, d_out]`, the
//! transpose of PyTorch's `[d_out, d_in]`.

use burn::module::{Initializer, Module, Param, ParamId};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::softmax;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};

use super::{fused, BlockDims, Pool, VitConfig};

/// timm's LayerNorm epsilon for ViTs.
pub const LN_EPS: f64 = 1e-6;

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q: Linear<B>,
    pub k: Linear<B>,
    pub v: Linear<B>,
    pub proj: Linear<B>,
    pub heads: usize,
    pub qk: usize,
    pub v_dim: usize,
    pub scale: f64,
}

impl<B: Backend> Attention<B> {
    /// Randomly initialized projections for a block of width `e` with `d`'s heads, qk and v;
    /// `qkv_bias`: whether Q, K and V have biases (the output projection always has one).
    pub(super) fn new(e: usize, d: BlockDims, scale: f64, qkv_bias: bool, device: &B::Device) -> Self {
        let qkv = |d_out: usize| linear_biased(e, d_out, qkv_bias, device);
        Self {
            q: qkv(d.heads * d.qk),
            k: qkv(d.heads * d.qk),
            v: qkv(d.heads * d.v),
            proj: linear(d.heads * d.v, e, device),
            heads: d.heads,
            qk: d.qk,
            v_dim: d.v,
            scale,
        }
    }

    /// `[batch, tokens, embed] -> [batch, tokens, embed]`; `bias`, `[batch, heads, tokens,
    /// tokens]`, is added to the attention logits (Swin's relative positions and window masks).
    pub(super) fn forward(&self, x: Tensor<B, 3>, bias: Option<Tensor<B, 4>>) -> Tensor<B, 3> {
        let [b, n, _] = x.dims();
        let h = self.heads;
        let split = |t: Tensor<B, 3>, d: usize| fused::swap_heads(t.reshape([b, n, h, d])); // [b, h, n, d]
        let q = split(per_token(&self.q, x.clone()), self.qk);
        let k = split(per_token(&self.k, x.clone()), self.qk);
        let v = split(per_token(&self.v, x), self.v_dim);
        let out = if B::ad_enabled(&q.device()) {
            // Under autodiff burn 0.21 computes `attention` as its own composite, with more
            // operations to differentiate than this one: a fused kernel that differentiates
            // where the backend has one, else this composite.
            let fused = match bias {
                None => fused::attention(q, k, v, self.scale),
                Some(_) => Err([q, k, v]),
            };
            match fused {
                Ok(out) => out,
                Err([q, k, v]) => composite_attention(q, k, v, self.scale, bias),
            }
        } else {
            // The backend's fused kernel where it has one (LibTorch's scaled_dot_product_attention,
            // cubecl's flash attention); it takes a value width other than the query/key width.
            let options = AttentionModuleOptions { scale: Some(self.scale), softcap: None, is_causal: false };
            attention(q, k, v, None, bias, options)
        };
        let out = fused::swap_heads(out).reshape([b, n, h * self.v_dim]);
        per_token(&self.proj, out)
    }
}

/// `softmax(q k^T * scale + bias) v`, `[batch, heads, tokens, v]`, as separate operations.
pub(super) fn composite_attention<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, scale: f64, bias: Option<Tensor<B, 4>>) -> Tensor<B, 4> {
    let logits = q.matmul(k.transpose()).mul_scalar(scale);
    let logits = match bias {
        Some(bias) => logits + bias,
        None => logits,
    };
    softmax(logits, 3).matmul(v)
}

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
}

/// LayerScale: a learned gain per embedding channel on a residual branch (CaiT, DeiT III,
/// DINOv2); timm's `ls1`/`ls2`.
#[derive(Module, Debug)]
pub struct LayerScale<B: Backend> {
    pub gamma: Param<Tensor<B, 1>>,
}

impl<B: Backend> LayerScale<B> {
    fn new(e: usize, init: f64, device: &B::Device) -> Self {
        Self { gamma: Param::from_tensor(Tensor::full([e], init, device)) }
    }

    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let e = self.gamma.dims()[0];
        x * self.gamma.val().reshape([1, 1, e])
    }
}

#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub norm1: LayerNorm<B>,
    pub attn: Attention<B>,
    pub ls1: Option<LayerScale<B>>,
    pub norm2: LayerNorm<B>,
    pub mlp: Mlp<B>,
    pub ls2: Option<LayerScale<B>>,
    pub drop_path: f64,
}

fn layer_scaled<B: Backend>(ls: &Option<LayerScale<B>>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    match ls {
        Some(ls) => ls.forward(x),
        None => x,
    }
}

impl<B: Backend> Block<B> {
    /// `[batch, tokens, embed] -> [batch, tokens, embed]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_with(x, None)
    }

    fn forward_with(&self, x: Tensor<B, 3>, alive: Option<&Tensor<B, 1>>) -> Tensor<B, 3> {
        let a = layer_scaled(&self.ls1, self.attn.forward(norm(&self.norm1, x.clone(), alive, LN_EPS), None));
        let x = x + drop_path(a, self.drop_path);
        let m = layer_scaled(&self.ls2, self.mlp.forward(norm(&self.norm2, x.clone(), alive, LN_EPS)));
        x + drop_path(m, self.drop_path)
    }
}

impl<B: Backend> Mlp<B> {
    pub(super) fn new(e: usize, hidden: usize, device: &B::Device) -> Self {
        Self { fc1: linear(e, hidden, device), fc2: linear(hidden, e, device) }
    }

    pub(super) fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        per_token(&self.fc2, gelu(per_token(&self.fc1, x)))
    }
}

/// Stochastic depth: drops the whole residual branch per sample at `rate`, only under autodiff.
pub(super) fn drop_path<B: Backend>(branch: Tensor<B, 3>, rate: f64) -> Tensor<B, 3> {
    if rate == 0.0 || !B::ad_enabled(&branch.device()) {
        return branch;
    }
    let keep = 1.0 - rate;
    let [b, _, _] = branch.dims();
    let device = branch.device();
    let mask = SHARD_RNG.with_borrow_mut(|rng| match rng {
        Some(rng) => {
            use rand::Rng;
            let kept: Vec<f32> = (0..b).map(|_| if rng.random::<f64>() < keep { 1.0 } else { 0.0 }).collect();
            super::float_tensor::<B, 3>(kept, [b, 1, 1], &device)
        }
        None => Tensor::<B, 3>::random([b, 1, 1], Distribution::Bernoulli(keep), &device),
    });
    branch * mask.div_scalar(keep)
}

thread_local! {
    /// Where a data-parallel shard's drop-path masks come from. Shards that run in threads at
    /// once would otherwise draw from the backend's one generator in whatever order the threads
    /// reach it, and no two runs would train alike.
    static SHARD_RNG: std::cell::RefCell<Option<rand::rngs::StdRng>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` with this thread's drop-path masks drawn from a generator seeded with `seed`, so
/// that a shard's masks depend on its seed only, not on other threads.
pub fn with_drop_path_seed<R>(seed: u64, f: impl FnOnce() -> R) -> R {
    use rand::SeedableRng;
    let previous = SHARD_RNG.replace(Some(rand::rngs::StdRng::seed_from_u64(seed)));
    let out = f();
    SHARD_RNG.set(previous);
    out
}

/// GELU in its erf form, `x * Phi(x)`, written out so that autodiff differentiates it exactly
/// (`erf`'s backward is `2/sqrt(pi) exp(-x^2)`): burn 0.21's `gelu` computes the erf form but
/// backpropagates the derivative of the tanh approximation on most backends, which put the
/// saliency off PyTorch's by up to 264 times the 1e-4 tolerance of
/// `tests/integration/gradient_parity.rs`. burn-flex's and LibTorch's own `gelu` and backward are
/// exact, one pass each instead of five operations: they take it (held to the same fixture).
pub(super) fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let x = match fused::gelu(x) {
        Ok(out) => return out,
        Err(x) => x,
    };
    if fused::exact_gelu::<B>() {
        return burn::tensor::activation::gelu(x);
    }
    let phi = x.clone().div_scalar(std::f64::consts::SQRT_2).erf().add_scalar(1.0).mul_scalar(0.5);
    x * phi
}

/// LayerNorm (epsilon `eps`, which Burn's keeps private) over the embedding channels in
/// `alive` only (all when `None`). A model whose pruned embedding channels are zeroed must
/// not count them in the statistics, or it would not compute what its compact version computes.
pub(super) fn norm<B: Backend>(ln: &LayerNorm<B>, x: Tensor<B, 3>, alive: Option<&Tensor<B, 1>>, eps: f64) -> Tensor<B, 3> {
    let Some(alive) = alive else {
        return fused::layer_norm(ln, x, eps).unwrap_or_else(|x| ln.forward(x));
    };
    let [b, n, e] = x.dims();
    let m = alive.clone().reshape([1, 1, e]).expand([b, n, e]);
    let count = alive.clone().sum().reshape([1, 1, 1]);
    let mean = (x.clone() * m.clone()).sum_dim(2) / count.clone(); // [b, n, 1]
    let centered = (x - mean) * m;
    let var = centered.clone().powi_scalar(2).sum_dim(2) / count;
    let y = centered / var.add_scalar(eps).sqrt();
    let gamma = ln.gamma.val().reshape([1, 1, e]);
    match &ln.beta {
        Some(beta) => y * gamma + beta.val().reshape([1, 1, e]),
        None => y * gamma,
    }
}

/// Both heads' logits: `cls` from the class token (or the pooled patch tokens), `dist` from
/// the distillation token.
pub struct VitOutput<B: Backend> {
    pub cls: Tensor<B, 2>,
    pub dist: Option<Tensor<B, 2>>,
}

impl<B: Backend> VitOutput<B> {
    /// Both heads in f32, whatever precision computed them: losses are taken in f32.
    pub fn to_f32(self) -> Self {
        let f32 = |t: Tensor<B, 2>| if t.dtype() == burn::tensor::DType::F32 { t } else { t.cast(burn::tensor::FloatDType::F32) };
        Self { cls: f32(self.cls), dist: self.dist.map(f32) }
    }

    /// The prediction: the two heads averaged when distilled, as DeiT evaluates.
    pub fn logits(&self) -> Tensor<B, 2> {
        match &self.dist {
            Some(dist) => (self.cls.clone() + dist.clone()).div_scalar(2.0),
            None => self.cls.clone(),
        }
    }
}

/// timm's `VisionTransformer` as far as the ViTs pruned here use it: DeiT (a distillation
/// token), AugReg ViT, DeiT III and DINOv2 (LayerScale, register tokens, a position embedding
/// over the patches only), average pooling with `fc_norm` ([`VitConfig`]).
#[derive(Module, Debug)]
pub struct Vit<B: Backend> {
    pub patch_embed: Conv2d<B>,
    pub cls_token: Option<Param<Tensor<B, 3>>>,
    pub dist_token: Option<Param<Tensor<B, 3>>>,
    pub reg_token: Option<Param<Tensor<B, 3>>>,
    pub pos_embed: Param<Tensor<B, 3>>,
    pub blocks: Vec<Block<B>>,
    /// Before pooling; an average-pooled model's is `fc_norm`, after it (one of the two).
    pub norm: Option<LayerNorm<B>>,
    pub fc_norm: Option<LayerNorm<B>>,
    pub head: Linear<B>,
    pub head_dist: Option<Linear<B>>,
    #[module(skip)]
    pub config: VitConfig,
    /// 1 for each embedding channel that survives pruning, 0 for a pruned one; `None` when
    /// nothing is pruned.
    #[module(skip)]
    pub emb_alive: Option<Vec<f32>>,
}

pub(super) fn linear<B: Backend>(d_in: usize, d_out: usize, device: &B::Device) -> Linear<B> {
    linear_biased(d_in, d_out, true, device)
}

/// A linear layer as timm initializes it (normal std 0.02 weights, zero bias), with a bias
/// or without.
fn linear_biased<B: Backend>(d_in: usize, d_out: usize, bias: bool, device: &B::Device) -> Linear<B> {
    LinearConfig::new(d_in, d_out)
        .with_bias(bias)
        .with_initializer(Initializer::Normal { mean: 0.0, std: 0.02 })
        .init(device)
        .zero_bias()
}

/// `layer` applied to each token, `[batch, tokens, d_in] -> [batch, tokens, d_out]`, as one
/// matrix product over all the batch's tokens, as PyTorch's `F.linear` computes it. burn 0.21's
/// `Linear` on a 3-d input multiplies each sample by the weight in turn, and takes the weight's
/// gradient as one product per sample summed afterwards.
pub(super) fn per_token<B: Backend>(layer: &Linear<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [b, n, d] = x.dims();
    let y = layer.forward(x.reshape([b * n, d]));
    let out = y.dims()[1];
    y.reshape([b, n, out])
}

trait ZeroBias {
    fn zero_bias(self) -> Self;
}

impl<B: Backend> ZeroBias for Linear<B> {
    fn zero_bias(mut self) -> Self {
        // `zeros_like` is a new tensor: it must be marked trainable again.
        self.bias = self.bias.map(|b| b.map(|t| t.zeros_like().require_grad()));
        self
    }
}

pub(super) fn layer_norm<B: Backend>(e: usize, device: &B::Device) -> LayerNorm<B> {
    LayerNormConfig::new(e).with_epsilon(LN_EPS).init(device)
}

fn token<B: Backend>(shape: [usize; 3], device: &B::Device) -> Param<Tensor<B, 3>> {
    Param::from_tensor(Tensor::random(shape, Distribution::Normal(0.0, 0.02), device))
}

impl VitConfig {
    /// One block of this model's kind at width `e` with `d`'s widths, randomly initialized:
    /// what the latency table times.
    pub fn block<B: Backend>(&self, e: usize, d: BlockDims, device: &B::Device) -> Block<B> {
        let scale = (self.head_dim as f64).powf(-0.5);
        let ls = || self.init_values.map(|v| LayerScale::new(e, v, device));
        Block {
            norm1: layer_norm(e, device),
            attn: Attention::new(e, d, scale, self.qkv_bias, device),
            ls1: ls(),
            norm2: layer_norm(e, device),
            mlp: Mlp::new(e, d.mlp, device),
            ls2: ls(),
            drop_path: 0.0,
        }
    }

    /// A randomly initialized model (timm's init: truncated-normal-like std 0.02, zero biases).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Vit<B> {
        let model = self.build(device);
        // Burn initializes parameters lazily, and a clone of an uninitialized parameter samples
        // its own values: materialize them so every clone is the same model.
        model.visit(&mut Materialize);
        model
    }

    /// The model with its parameters not drawn yet: for a reader that replaces them (drawing
    /// DeiT-B's 86 M values only to drop them took seconds per load), then materializes the rest.
    pub(super) fn build<B: Backend>(&self, device: &B::Device) -> Vit<B> {
        let e = self.embed_dim;
        let blocks = self.blocks.iter().map(|d| self.block(e, *d, device)).collect();
        let model = Vit {
            patch_embed: Conv2dConfig::new([self.in_chans, e], [self.patch_size, self.patch_size])
                .with_stride([self.patch_size, self.patch_size])
                .init(device),
            cls_token: self.class_token.then(|| token([1, 1, e], device)),
            dist_token: self.distilled.then(|| token([1, 1, e], device)),
            reg_token: (self.reg_tokens > 0).then(|| token([1, self.reg_tokens, e], device)),
            pos_embed: token([1, self.num_positions(), e], device),
            blocks,
            norm: (!self.fc_norm).then(|| layer_norm(e, device)),
            fc_norm: self.fc_norm.then(|| layer_norm(e, device)),
            head: linear(e, self.num_classes, device),
            head_dist: self.distilled.then(|| linear(e, self.num_classes, device)),
            config: self.clone(),
            emb_alive: None,
        };
        model.with_drop_path(self.drop_path)
    }
}

pub(super) struct Materialize;

impl<B: Backend> burn::module::ModuleVisitor<B> for Materialize {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let _ = param.val();
    }
}

impl<B: Backend> Vit<B> {
    /// The model in evaluation mode: stochastic depth off even under autodiff.
    pub fn without_drop_path(self) -> Self {
        self.with_drop_path(0.0)
    }

    /// Stochastic depth at `rate` in the last block, rising linearly from 0 in the first (as
    /// `VitConfig::init` sets it).
    pub fn with_drop_path(mut self, rate: f64) -> Self {
        let depth = self.blocks.len();
        for (i, b) in self.blocks.iter_mut().enumerate() {
            b.drop_path = if depth > 1 { rate * i as f64 / (depth - 1) as f64 } else { rate };
        }
        self.config.drop_path = rate;
        self
    }

    /// Parameters of more than one dimension that training does not decay, as timm's
    /// `no_weight_decay()`: the position embedding and the class, distillation and register
    /// tokens.
    pub fn no_weight_decay(&self) -> Vec<ParamId> {
        let mut ids = vec![self.pos_embed.id];
        ids.extend([&self.cls_token, &self.dist_token, &self.reg_token].into_iter().flatten().map(|t| t.id));
        ids
    }

    /// The prefix tokens of a batch of `b`, in timm's order: class, distillation, registers.
    fn prefix(&self, b: usize, e: usize) -> Vec<Tensor<B, 3>> {
        let tokens = [&self.cls_token, &self.dist_token, &self.reg_token];
        tokens.into_iter().flatten().map(|t| {
            let n = t.dims()[1];
            t.val().expand([b, n, e])
        }).collect()
    }

    /// `[batch, channels, height, width]` -> logits of both heads, `[batch, classes]` each.
    pub fn forward(&self, images: Tensor<B, 4>) -> VitOutput<B> {
        let (x, _) = embed_patches(&self.patch_embed, images); // [b, patches, e]
        let [b, patches, e] = x.dims();
        let mut tokens = self.prefix(b, e);
        let mut x = if self.config.no_embed_class {
            tokens.push(x + self.pos_embed.val());
            Tensor::cat(tokens, 1)
        } else {
            tokens.push(x);
            Tensor::cat(tokens, 1) + self.pos_embed.val()
        }; // [b, tokens, e]
        let alive = self.emb_alive.as_ref().map(|a| super::float_tensor::<B, 1>(a.clone(), [a.len()], &x.device()));
        for block in &self.blocks {
            x = block.forward_with(x, alive.as_ref());
        }
        if let Some(n) = &self.norm {
            x = norm(n, x, alive.as_ref(), LN_EPS);
        }
        let token = |i: usize| x.clone().slice([0..b, i..i + 1, 0..e]).reshape([b, e]);
        let pooled = match self.config.global_pool {
            Pool::Token => token(0),
            Pool::Avg => {
                let first = self.config.num_prefix_tokens();
                x.clone().slice([0..b, first..first + patches, 0..e]).mean_dim(1).reshape([b, e])
            }
        };
        let pooled = match &self.fc_norm {
            Some(n) => norm(n, pooled.unsqueeze_dim(1), alive.as_ref(), LN_EPS).reshape([b, e]),
            None => pooled,
        };
        VitOutput {
            cls: self.head.forward(pooled),
            dist: self.head_dist.as_ref().map(|h| h.forward(token(1))),
        }
    }
}

/// `[batch, channels, height, width] -> [batch, patches, embed]` and the patch grid: the patch embedding, a
/// convolution whose stride is its kernel, computed as what it is, one product of the
/// image's patches with the kernel (timm's row-major patch order). burn-ndarray's direct
/// `conv2d` and its backward took a fifth of a DeiT-T training step.
pub(super) fn embed_patches<B: Backend>(patch_embed: &Conv2d<B>, images: Tensor<B, 4>) -> (Tensor<B, 3>, [usize; 2]) {
    let [e, c, p, _] = patch_embed.weight.dims();
    let [b, _, h, w] = images.dims();
    let (gh, gw) = (h / p, w / p);
    // As the convolution, pixels past the last whole patch are left out.
    let images = if h % p != 0 || w % p != 0 { images.slice([0..b, 0..c, 0..gh * p, 0..gw * p]) } else { images };
    let patches = images.reshape([b, c, gh, p, gw, p]).permute([0, 2, 4, 1, 3, 5]).reshape([b * gh * gw, c * p * p]);
    let kernel = patch_embed.weight.val().reshape([e, c * p * p]).transpose();
    let x = patches.matmul(kernel);
    let x = match &patch_embed.bias {
        Some(bias) => x + bias.val().reshape([1, e]),
        None => x,
    };
    (x.reshape([b, gh * gw, e]), [gh, gw])
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    #[test]
    fn drop_path_rises_linearly_to_the_last_block_and_only_under_autodiff() {
        use burn::backend::Autodiff;
        let config = VitConfig { drop_path: 0.3, ..VitConfig::uniform(16, 4, 3, 24, 4, 2, 2.0, 5, false) };
        let model = config.init::<Autodiff<NdArray>>(&Default::default());
        let rates: Vec<f64> = model.blocks.iter().map(|b| b.drop_path).collect();
        assert!(rates.iter().zip([0.0, 0.1, 0.2, 0.3]).all(|(r, e)| (r - e).abs() < 1e-12), "{rates:?}");
        let model = model.with_drop_path(0.6);
        assert!((model.blocks[3].drop_path - 0.6).abs() < 1e-12 && model.config.drop_path == 0.6);
        let x = Tensor::<Autodiff<NdArray>, 4>::random([8, 3, 16, 16], Distribution::Default, &Default::default());
        let a = model.forward(x.clone()).logits().into_data();
        let b = model.forward(x.clone()).logits().into_data();
        assert_ne!(a, b, "stochastic under autodiff");
        let eval = burn::module::AutodiffModule::valid(&model);
        assert_eq!(eval.forward(x.clone().inner()).logits().into_data(), eval.forward(x.inner()).logits().into_data());
    }

    /// What data-parallel shards in threads rely on: a seeded thread's masks do not depend on
    /// what other threads draw meanwhile.
    #[test]
    fn a_seeded_thread_draws_its_own_drop_path_masks_whatever_runs_beside_it() {
        use burn::backend::Autodiff;
        type A = Autodiff<NdArray>;
        let device = Default::default();
        let model = VitConfig::uniform(16, 4, 3, 24, 4, 2, 2.0, 5, false).init::<A>(&device).with_drop_path(0.5);
        let x = crate::model::float_tensor::<A, 4>((0..8 * 3 * 16 * 16).map(|i| (i % 13) as f32 / 6.0 - 1.0).collect(), [8, 3, 16, 16], &device);
        let run = |seed| with_drop_path_seed(seed, || model.forward(x.clone()).logits().into_data().to_vec::<f32>().unwrap());
        let alone = run(1);
        let (again, other) = std::thread::scope(|s| {
            let noise = s.spawn(|| (0..50).for_each(|_| drop(Tensor::<A, 1>::random([64], Distribution::Default, &device))));
            let (a, b) = (s.spawn(|| run(1)), s.spawn(|| run(2)));
            noise.join().unwrap();
            (a.join().unwrap(), b.join().unwrap())
        });
        assert_eq!(again, alone, "same seed, same masks");
        assert_ne!(other, alone, "another seed drops other branches");
    }

    #[test]
    fn every_parameter_of_a_new_model_is_trainable() {
        use burn::backend::Autodiff;
        let model = VitConfig::uniform(16, 4, 3, 24, 2, 2, 2.0, 5, true).init::<Autodiff<NdArray>>(&Default::default());
        let x = Tensor::random([2, 3, 16, 16], Distribution::Default, &Default::default());
        let grads = model.forward(x).logits().sum().backward();
        let bias = model.blocks[1].mlp.fc1.bias.as_ref().unwrap();
        assert!(bias.val().grad(&grads).is_some(), "biases get gradients");
        let grads = burn::optim::GradientsParams::from_grads(grads, &model);
        struct Count(usize);
        impl<B: Backend> burn::module::ModuleVisitor<B> for Count {
            fn visit_float<const D: usize>(&mut self, _: &Param<Tensor<B, D>>) {
                self.0 += 1;
            }
        }
        let mut count = Count(0);
        model.visit(&mut count);
        assert_eq!(grads.len(), count.0, "a gradient for every parameter tensor");
    }

    #[test]
    fn per_block_widths_shape_the_forward_pass() {
        let device = Default::default();
        let mut config = VitConfig::uniform(16, 4, 3, 24, 3, 2, 2.0, 5, true);
        config.blocks[1] = BlockDims { heads: 1, qk: 5, v: 7, mlp: 9 };
        let model = config.init::<NdArray>(&device);
        let copy = model.clone();
        assert_eq!(copy.blocks[0].attn.q.weight.val().into_data(), model.blocks[0].attn.q.weight.val().into_data(), "a clone is the same model");
        assert_eq!(model.blocks[1].attn.q.weight.dims(), [24, 5]);
        assert_eq!(model.blocks[1].attn.v.weight.dims(), [24, 7]);
        assert_eq!(model.blocks[1].attn.proj.weight.dims(), [7, 24]);
        assert_eq!(model.blocks[1].mlp.fc2.weight.dims(), [9, 24]);
        let out = model.forward(Tensor::random([2, 3, 16, 16], Distribution::Default, &device));
        assert_eq!(out.cls.dims(), [2, 5]);
        assert_eq!(out.logits().dims(), [2, 5]);
    }
}
