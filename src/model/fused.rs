//! A backend's own fused kernels, where the model can use them: each computes the function of
//! the composite it replaces, forward and backward, and is picked by the backend's type, so the
//! generic model carries no extra bound and every other backend runs the composite.

use std::any::{Any, TypeId};

use burn::backend::{Autodiff, Flex, NdArray};
use burn::nn::LayerNorm;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// Whether `B` is `T`, or `T` under autodiff.
fn is<B: Backend, T: Backend>() -> bool {
    TypeId::of::<B>() == TypeId::of::<T>() || TypeId::of::<B>() == TypeId::of::<Autodiff<T>>()
}

/// Whether `B`'s own `gelu` is the exact (erf) GELU in both directions, one kernel each way:
/// burn-flex's, and LibTorch's (`gelu` and `gelu_backward` with `approximate = "none"`, as
/// PyTorch trains). burn 0.21's default backpropagates the tanh approximation's derivative.
pub(super) fn exact_gelu<B: Backend>() -> bool {
    is_libtorch::<B>() || is::<B, Flex>()
}

/// Whether `B` is LibTorch, with or without autodiff.
fn is_libtorch<B: Backend>() -> bool {
    #[cfg(feature = "tch")]
    if is::<B, burn::backend::LibTorch<f32>>() {
        return true;
    }
    false
}

/// `gelu(x)`, exact, where `B` is flex (with or without autodiff) and `x` is f32: flex's own
/// GELU, forward and backward, is one pass on one core, the only one of the block's elementwise
/// passes that calls `erf` per element; here the same arithmetic runs in chunks on every
/// thread, so the values are flex's to the bit. Else `x` comes back.
pub(super) fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Result<Tensor<B, D>, Tensor<B, D>> {
    if x.dtype() != burn::tensor::DType::F32 {
        return Err(x);
    }
    let x = match cast::<_, Tensor<Autodiff<Flex>, D>>(x) {
        Ok(x) => return Ok(same(flex::train(x))),
        Err(x) => x,
    };
    let x = cast::<_, Tensor<Flex, D>>(x)?;
    let out = flex::forward(&x.into_primitive().tensor());
    Ok(same(Tensor::<Flex, D>::from_primitive(burn::tensor::TensorPrimitive::Float(out))))
}

/// The parallel elementwise work of [`gelu`] and [`swap_heads`] on flex's f32 storage.
mod flex {
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{Tensor, TensorData, TensorPrimitive};
    use burn_flex::FlexTensor;
    use rayon::prelude::*;
    use std::f32::consts::{PI, SQRT_2};

    /// Elements per task: large enough that rayon's scheduling is noise, small enough that
    /// a block's MLP activations (millions) spread over every core.
    const CHUNK: usize = 1 << 14;

    /// `f` of `x` (and `g`, same shape) elementwise, in parallel chunks; f32, any layout.
    fn map(x: &FlexTensor, g: Option<&FlexTensor>, f: impl Fn(f32, f32) -> f32 + Sync) -> FlexTensor {
        let x = x.to_contiguous();
        let xs = x.as_slice::<f32>().expect("contiguous f32");
        let mut out = vec![0.0f32; xs.len()];
        match g {
            Some(g) => {
                let g = g.to_contiguous();
                let gs = g.as_slice::<f32>().expect("contiguous f32");
                out.par_chunks_mut(CHUNK).zip(xs.par_chunks(CHUNK).zip(gs.par_chunks(CHUNK))).for_each(|(o, (x, g))| {
                    o.iter_mut().zip(x.iter().zip(g)).for_each(|(o, (&x, &g))| *o = f(x, g));
                });
            }
            None => out.par_chunks_mut(CHUNK).zip(xs.par_chunks(CHUNK)).for_each(|(o, x)| {
                o.iter_mut().zip(x).for_each(|(o, &x)| *o = f(x, 0.0));
            }),
        }
        FlexTensor::from_data(TensorData::new(out, x.layout().shape().clone()))
    }

    /// burn-flex's `gelu`, term for term.
    pub fn forward(x: &FlexTensor) -> FlexTensor {
        map(x, None, |x, _| 0.5 * x * (1.0 + libm::erff(x / SQRT_2)))
    }

    /// burn-flex's `gelu_backward`, term for term.
    fn backward(x: &FlexTensor, grad: &FlexTensor) -> FlexTensor {
        let inv_sqrt_2pi = 1.0 / (2.0 * PI).sqrt();
        map(x, Some(grad), |x, g| {
            let cdf = 0.5 * (1.0 + libm::erff(x / SQRT_2));
            let pdf = inv_sqrt_2pi * (-0.5 * x * x).exp();
            g * (cdf + x * pdf)
        })
    }

    #[derive(Debug)]
    struct GeluBackward;

    impl Backward<Flex, 1> for GeluBackward {
        type State = FlexTensor;

        fn backward(self, ops: Ops<FlexTensor, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let grad = grads.consume::<Flex>(&ops.node);
            let [node] = ops.parents;
            if let Some(node) = node {
                grads.register::<Flex>(node.id, backward(&ops.state, &grad));
            }
        }
    }

    /// `[a, x, y, d] -> [a, y, x, d]`, contiguous.
    pub fn swap(t: &FlexTensor) -> FlexTensor {
        let t = t.to_contiguous();
        let src = t.as_slice::<f32>().expect("contiguous f32");
        let shape = t.layout().shape().clone();
        let [x, y, d] = [shape[1], shape[2], shape[3]];
        let mut out = vec![0.0f32; src.len()];
        if !out.is_empty() {
            out.par_chunks_mut(x * y * d).zip(src.par_chunks(x * y * d)).for_each(|(out, src)| {
                for yi in 0..y {
                    for xi in 0..x {
                        out[(yi * x + xi) * d..][..d].copy_from_slice(&src[(xi * y + yi) * d..][..d]);
                    }
                }
            });
        }
        FlexTensor::from_data(TensorData::new(out, [shape[0], y, x, d]))
    }

    #[derive(Debug)]
    struct SwapBackward;

    impl Backward<Flex, 1> for SwapBackward {
        type State = ();

        fn backward(self, ops: Ops<(), 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let grad = grads.consume::<Flex>(&ops.node);
            let [node] = ops.parents;
            if let Some(node) = node {
                grads.register::<Flex>(node.id, swap(&grad));
            }
        }
    }

    pub fn train_swap(t: Tensor<Autodiff<Flex>, 4>) -> Tensor<Autodiff<Flex>, 4> {
        let t = t.into_primitive().tensor();
        let out = swap(&t.primitive);
        let out = SwapBackward.prepare::<NoCheckpointing>([t.node.clone()]).compute_bound().stateless(out);
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }

    pub fn train<const D: usize>(x: Tensor<Autodiff<Flex>, D>) -> Tensor<Autodiff<Flex>, D> {
        let x = x.into_primitive().tensor();
        let out = forward(&x.primitive);
        let out = match GeluBackward.prepare::<NoCheckpointing>([x.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(x.primitive, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}

/// `t.swap_dims(1, 2)` (`[a, x, y, d] -> [a, y, x, d]`, the split into heads and the merge
/// back), contiguous, where `B` is flex with f32 (with or without autodiff): flex copies a
/// strided tensor one element at a time, at every reshape and matmul that needs it contiguous,
/// and this copies rows of `d` in parallel, forward and backward. Else the strided view.
pub(super) fn swap_heads<B: Backend>(t: Tensor<B, 4>) -> Tensor<B, 4> {
    if t.dtype() != burn::tensor::DType::F32 {
        return t.swap_dims(1, 2);
    }
    let t = match cast::<_, Tensor<Autodiff<Flex>, 4>>(t) {
        Ok(t) => return same(flex::train_swap(t)),
        Err(t) => t,
    };
    match cast::<_, Tensor<Flex, 4>>(t) {
        Ok(t) => same(Tensor::<Flex, 4>::from_primitive(burn::tensor::TensorPrimitive::Float(flex::swap(&t.into_primitive().tensor())))),
        Err(t) => t.swap_dims(1, 2),
    }
}

/// A float primitive as a tensor, and back: the custom autodiff operations below work on
/// primitives.
fn tensor<X: Backend, const D: usize>(p: burn::tensor::ops::FloatTensor<X>) -> Tensor<X, D> {
    Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(p))
}

fn primitive<X: Backend, const D: usize>(t: Tensor<X, D>) -> burn::tensor::ops::FloatTensor<X> {
    t.into_primitive().tensor()
}

/// `value` as a `T` when `A` is `T` under another name, else `value` back.
fn cast<A: 'static, T: 'static>(value: A) -> Result<T, A> {
    let mut slot = Some(value);
    match (&mut slot as &mut dyn Any).downcast_mut::<Option<T>>().and_then(Option::take) {
        Some(t) => Ok(t),
        None => Err(slot.expect("taken only when A is T")),
    }
}

/// Attention of `q`, `k` (`[batch, heads, tokens, qk]`) and `v` (`[batch, heads, tokens, v]`),
/// `softmax(q k^T * scale) v`, under autodiff as one operation, where `B` has one and it is the
/// faster: LibTorch's flash attention on the CPU from `FLASH_MIN_TOKENS` tokens, and on flex and
/// ndarray [`probs::attention`] at any length. Else the inputs come back, for the composite.
pub(super) fn attention<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, scale: f64) -> Result<Tensor<B, 4>, [Tensor<B, 4>; 3]> {
    let [q, k, v] = if q.dims()[2] >= FLASH_MIN_TOKENS {
        match flash_attention(q, k, v, scale) {
            Ok(out) => return Ok(out),
            Err(qkv) => qkv,
        }
    } else {
        [q, k, v]
    };
    probs_attention(q, k, v, scale)
}

/// Attention by `B`'s fused kernel at any length, where it has one.
fn flash_attention<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, scale: f64) -> Result<Tensor<B, 4>, [Tensor<B, 4>; 3]> {
    #[cfg(feature = "tch")]
    let [q, k, v] = match cast::<_, [Tensor<libtorch::Train, 4>; 3]>([q, k, v]) {
        Ok([q, k, v]) if libtorch::flash_runs(&q) => return Ok(same(libtorch::flash_attention(q, k, v, scale))),
        Ok(qkv) => qkv.map(same),
        Err(qkv) => qkv,
    };
    let _ = scale;
    Err([q, k, v])
}

/// [`probs::attention`] where `B` is flex or ndarray under autodiff.
fn probs_attention<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, scale: f64) -> Result<Tensor<B, 4>, [Tensor<B, 4>; 3]> {
    fn on<B: Backend, X: Backend>(qkv: [Tensor<B, 4>; 3], scale: f64) -> Result<Tensor<B, 4>, [Tensor<B, 4>; 3]> {
        let [q, k, v] = cast::<_, [Tensor<Autodiff<X>, 4>; 3]>(qkv)?;
        Ok(same(probs::attention::<X>(q, k, v, scale)))
    }
    on::<B, Flex>([q, k, v], scale).or_else(|qkv| on::<B, NdArray>(qkv, scale))
}

/// Attention whose backward is written out from the probabilities kept by the forward pass, as
/// flash attention's is from its log-sum-exp: burn 0.21 differentiates the composite
/// (matmul, scale, softmax's five operations, matmul) one operation at a time, each a pass over
/// the `[batch, heads, tokens, tokens]` logits on one core. Here the forward is two matmuls and
/// the backend's own softmax (one parallel pass on flex), and the backward four matmuls and two
/// passes over the probabilities: `dS = P * (dP - rowsum(dO * O))`, the row sum taken over the
/// output's width rather than the tokens.
mod probs {
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::Autodiff;
    use burn::tensor::activation::softmax;
    use burn::tensor::backend::Backend;
    use burn::tensor::ops::FloatTensor;
    use burn::tensor::{Tensor, TensorPrimitive};
    use super::{primitive, tensor};

    #[derive(Debug)]
    struct AttentionBackward;

    impl<X: Backend> Backward<X, 3> for AttentionBackward {
        /// q, k, v, the probabilities, the output and the scale.
        type State = ([FloatTensor<X>; 5], f64);

        fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
            let d_out = tensor::<X, 4>(grads.consume::<X>(&ops.node));
            let ([q, k, v, p, out], scale) = ops.state;
            let [q, k, v, p, out] = [q, k, v, p, out].map(tensor::<X, 4>);
            let [node_q, node_k, node_v] = ops.parents;
            if let Some(node) = node_v {
                grads.register::<X>(node.id, primitive(p.clone().transpose().matmul(d_out.clone())));
            }
            if node_q.is_none() && node_k.is_none() {
                return;
            }
            let rowsum = (d_out.clone() * out).sum_dim(3);
            let d_logits = p * (d_out.matmul(v.transpose()) - rowsum); // before the scale
            if let Some(node) = node_q {
                grads.register::<X>(node.id, primitive(d_logits.clone().matmul(k).mul_scalar(scale)));
            }
            if let Some(node) = node_k {
                grads.register::<X>(node.id, primitive(d_logits.transpose().matmul(q).mul_scalar(scale)));
            }
        }
    }

    pub fn attention<X: Backend>(q: Tensor<Autodiff<X>, 4>, k: Tensor<Autodiff<X>, 4>, v: Tensor<Autodiff<X>, 4>, scale: f64) -> Tensor<Autodiff<X>, 4> {
        let [q, k, v] = [q, k, v].map(|t| t.into_primitive().tensor());
        let nodes = [q.node.clone(), k.node.clone(), v.node.clone()];
        let [q, k, v] = [q.primitive, k.primitive, v.primitive].map(tensor::<X, 4>);
        // The scale on q, `[tokens, qk]`, not on the logits, `[tokens, tokens]`.
        let p = softmax(q.clone().mul_scalar(scale).matmul(k.clone().transpose()), 3);
        let out = p.clone().matmul(v.clone());
        let out = match AttentionBackward.prepare::<NoCheckpointing>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let state = [q, k, v, p, out.clone()].map(primitive);
                prep.finish((state, scale), primitive(out))
            }
            OpsKind::UnTracked(prep) => prep.finish(primitive(out)),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}

/// Both ways of computing what the model's fused operations compute, for `runner bench
/// kernels` to time side by side on a backend.
pub mod bench {
    use super::*;

    /// Attention under autodiff: the fused kernel at any length (`None` where `B` has none), or
    /// the composite; [`attention_fused_from`] says which of the two the model takes.
    pub fn attention<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, scale: f64, fused: bool) -> Option<Tensor<B, 4>> {
        if fused {
            flash_attention(q, k, v, scale).or_else(|[q, k, v]| probs_attention(q, k, v, scale)).ok()
        } else {
            Some(super::super::vit::composite_attention(q, k, v, scale, None))
        }
    }

    /// Whether the model takes `attention(.., true)` at `tokens`, where it exists.
    pub fn attention_fused_from<B: Backend>(tokens: usize) -> bool {
        tokens >= FLASH_MIN_TOKENS || !is_libtorch::<B>()
    }

    /// LayerNorm under autodiff: the one operation (`None` where `B` does not take it), or
    /// burn's composite.
    pub fn layer_norm<B: Backend>(ln: &LayerNorm<B>, x: Tensor<B, 3>, eps: f64, fused: bool) -> Option<Tensor<B, 3>> {
        if fused {
            super::layer_norm(ln, x, eps).ok()
        } else {
            Some(ln.forward(x))
        }
    }
}

/// The fewest tokens at which LibTorch's CPU flash attention, forward and backward, is taken
/// over the composite: `runner bench kernels --backend tch` (results/bench/kernels-tch-*.csv)
/// times both. On 2 cores (four runs) the kernel is 1.4x to 2.1x the composite from 128 tokens,
/// a wash at 50 to 98 (0.84x to 1.26x), and no faster at the quickstart's 18 (0.78x to 1.08x);
/// in a wash it wins on memory, keeping no `[batch, heads, tokens, tokens]` probabilities.
const FLASH_MIN_TOKENS: usize = 32;

/// `ln(x)` with epsilon `eps`, under autodiff as one operation whose backward is written out
/// (four reductions and the elementwise work around them), where `B` is one of the CPU
/// backends under autodiff: burn 0.21 differentiates LayerNorm as its nine-operation composite
/// there. Its forward is the backend's own `layer_norm`, one fused pass on flex and LibTorch.
/// Else `x` comes back, for `ln.forward`.
pub(super) fn layer_norm<B: Backend>(ln: &LayerNorm<B>, x: Tensor<B, 3>, eps: f64) -> Result<Tensor<B, 3>, Tensor<B, 3>> {
    fn on<B: Backend, X: Backend>(x: Tensor<B, 3>, gamma: &Tensor<B, 1>, beta: &Tensor<B, 1>, eps: f64) -> Result<Tensor<B, 3>, Tensor<B, 3>> {
        let x = cast::<_, Tensor<Autodiff<X>, 3>>(x)?;
        Ok(same(norm::layer_norm::<X>(x, same(gamma.clone()), same(beta.clone()), eps)))
    }
    let Some(beta) = &ln.beta else { return Err(x) };
    let (gamma, beta) = (ln.gamma.val(), beta.val());
    let x = on::<B, Flex>(x, &gamma, &beta, eps).or_else(|x| on::<B, NdArray>(x, &gamma, &beta, eps));
    #[cfg(feature = "tch")]
    let x = x.or_else(|x| on::<B, burn::backend::LibTorch<f32>>(x, &gamma, &beta, eps));
    x
}

mod norm {
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::Autodiff;
    use burn::tensor::backend::Backend;
    use burn::tensor::ops::FloatTensor;
    use burn::tensor::{Tensor, TensorPrimitive};
    use super::tensor;

    #[derive(Debug)]
    struct LayerNormBackward;

    impl<X: Backend> Backward<X, 3> for LayerNormBackward {
        /// The input, gamma and epsilon: the statistics are recomputed from the input, which
        /// costs less than keeping them would cost the forward pass.
        type State = (FloatTensor<X>, FloatTensor<X>, f64);

        fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
            let g = tensor::<X, 3>(grads.consume::<X>(&ops.node));
            let (x, gamma, eps) = ops.state;
            let x = tensor::<X, 3>(x);
            let [b, n, e] = x.dims();
            let centered = x.clone() - x.mean_dim(2);
            let rstd = centered.clone().square().mean_dim(2).add_scalar(eps).sqrt().recip(); // [b, n, 1]
            let xhat = centered * rstd.clone();
            let over_tokens = |t: Tensor<X, 3>| t.reshape([b * n, e]).sum_dim(0).reshape([e]).into_primitive().tensor();
            let [node_x, node_gamma, node_beta] = ops.parents;
            if let Some(node) = node_beta {
                grads.register::<X>(node.id, over_tokens(g.clone()));
            }
            if let Some(node) = node_gamma {
                grads.register::<X>(node.id, over_tokens(g.clone() * xhat.clone()));
            }
            if let Some(node) = node_x {
                // d xhat = g gamma; dx = rstd (d xhat - mean(d xhat) - xhat mean(d xhat xhat)).
                let dxhat = g * tensor::<X, 1>(gamma).reshape([1, 1, e]);
                let dx = (dxhat.clone() - dxhat.clone().mean_dim(2) - xhat.clone() * (dxhat * xhat).mean_dim(2)) * rstd;
                grads.register::<X>(node.id, dx.into_primitive().tensor());
            }
        }
    }

    pub fn layer_norm<X: Backend>(x: Tensor<Autodiff<X>, 3>, gamma: Tensor<Autodiff<X>, 1>, beta: Tensor<Autodiff<X>, 1>, eps: f64) -> Tensor<Autodiff<X>, 3> {
        let [x, gamma, beta] = [x.into_primitive().tensor(), gamma.into_primitive().tensor(), beta.into_primitive().tensor()];
        let nodes = [x.node.clone(), gamma.node.clone(), beta.node.clone()];
        let out = X::layer_norm(x.primitive.clone(), gamma.primitive.clone(), Some(beta.primitive), eps);
        let out = match LayerNormBackward.prepare::<NoCheckpointing>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((x.primitive, gamma.primitive, eps), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}

/// `value` as a `T`, for an `A` known to be `T`.
fn same<A: 'static, T: 'static>(value: A) -> T {
    cast(value).ok().expect("A is T")
}

#[cfg(feature = "tch")]
mod libtorch {
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::libtorch::{LibTorch, TchTensor};
    use burn::backend::Autodiff;
    use burn::tensor::{Tensor, TensorPrimitive};

    /// The training backend of `--backend tch`.
    pub type Train = Autodiff<LibTorch<f32>>;

    /// LibTorch's CPU flash kernel; on CUDA the composite runs (no GPU has tested a fused path).
    pub fn flash_runs(q: &Tensor<Train, 4>) -> bool {
        q.device() == burn::backend::libtorch::LibTorchDevice::Cpu
    }

    /// The saved tensors of one forward pass. The kernel takes one head width for Q, K and V,
    /// so the narrower of qk and v is padded with zeros to the wider: zero columns of Q and K
    /// add nothing to `q k^T`, zero columns of V give output columns that are cut off, and so
    /// the function, and each gradient cut to its input's width, is exact for any widths.
    #[derive(Debug, Clone)]
    struct Flash {
        q: TchTensor,
        k: TchTensor,
        v: TchTensor,
        /// `[batch, heads, tokens, width]`, before the cut to v.
        out: TchTensor,
        logsumexp: TchTensor,
        scale: f64,
    }

    fn pad(t: &tch::Tensor, width: i64) -> tch::Tensor {
        let extra = width - t.size()[3];
        if extra == 0 {
            t.shallow_clone()
        } else {
            t.constant_pad_nd([0, extra])
        }
    }

    fn cut(t: tch::Tensor, width: i64) -> tch::Tensor {
        if t.size()[3] == width {
            t
        } else {
            t.narrow(3, 0, width)
        }
    }

    /// The head width the kernel runs at: the wider of qk and v.
    fn width(q: &TchTensor, v: &TchTensor) -> i64 {
        q.tensor.size()[3].max(v.tensor.size()[3])
    }

    impl Flash {
        fn forward(q: TchTensor, k: TchTensor, v: TchTensor, scale: f64) -> Self {
            let width = width(&q, &v);
            let (out, logsumexp) = tch::Tensor::internal_scaled_dot_product_flash_attention_for_cpu(
                &pad(&q.tensor, width),
                &pad(&k.tensor, width),
                &pad(&v.tensor, width),
                0.0,
                false,
                None::<tch::Tensor>,
                scale,
            );
            Flash { q, k, v, out: TchTensor::new(out), logsumexp: TchTensor::new(logsumexp), scale }
        }

        /// The output, cut to v's width; it shares the saved output's storage, so burn does
        /// not write over it in place.
        fn output(&self) -> TchTensor {
            let v = self.v.tensor.size()[3];
            TchTensor::from_existing(cut(self.out.tensor.shallow_clone(), v), self.out.storage.clone())
        }
    }

    #[derive(Debug)]
    struct FlashBackward;

    impl Backward<LibTorch<f32>, 3> for FlashBackward {
        type State = Flash;

        fn backward(self, ops: Ops<Flash, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
            let grad = grads.consume::<LibTorch<f32>>(&ops.node);
            let s = ops.state;
            let width = width(&s.q, &s.v);
            let (gq, gk, gv) = tch::Tensor::internal_scaled_dot_product_flash_attention_for_cpu_backward(
                &pad(&grad.tensor, width),
                &pad(&s.q.tensor, width),
                &pad(&s.k.tensor, width),
                &pad(&s.v.tensor, width),
                &s.out.tensor,
                &s.logsumexp.tensor,
                0.0,
                false,
                None::<tch::Tensor>,
                s.scale,
            );
            let [node_q, node_k, node_v] = ops.parents;
            for (node, g, input) in [(node_q, gq, &s.q), (node_k, gk, &s.k), (node_v, gv, &s.v)] {
                if let Some(node) = node {
                    grads.register::<LibTorch<f32>>(node.id, TchTensor::new(cut(g, input.tensor.size()[3])));
                }
            }
        }
    }

    pub fn flash_attention(q: Tensor<Train, 4>, k: Tensor<Train, 4>, v: Tensor<Train, 4>, scale: f64) -> Tensor<Train, 4> {
        let [q, k, v] = [q, k, v].map(|t| t.into_primitive().tensor());
        let nodes = [q.node.clone(), k.node.clone(), v.node.clone()];
        let out = match FlashBackward.prepare::<NoCheckpointing>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let flash = Flash::forward(q.primitive, k.primitive, v.primitive, scale);
                let out = flash.output();
                prep.finish(flash, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flash::forward(q.primitive, k.primitive, v.primitive, scale).output()),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::AutodiffModule;
    use burn::tensor::backend::AutodiffBackend;
    use burn::tensor::Distribution;

    fn qkv<B: Backend>(qk: usize, v: usize, device: &B::Device) -> [Tensor<B, 4>; 3] {
        let t = |d| Tensor::<B, 4>::random([2, 3, 7, d], Distribution::Normal(0.0, 1.0), device);
        [t(qk), t(qk), t(v)]
    }

    #[test]
    fn the_exact_gelu_is_flexs_and_libtorchs_with_or_without_autodiff() {
        assert!(exact_gelu::<Flex>() && exact_gelu::<Autodiff<Flex>>());
        assert!(!exact_gelu::<NdArray>() && !exact_gelu::<Autodiff<NdArray>>());
        #[cfg(feature = "tch")]
        assert!(exact_gelu::<burn::backend::LibTorch<f32>>() && exact_gelu::<libtorch::Train>());
    }

    #[test]
    fn inference_gets_its_tensors_back() {
        let [q, k, v] = qkv::<NdArray>(4, 4, &Default::default());
        let back = attention(q.clone(), k, v, 0.5).expect_err("inference runs the backend's attention");
        assert_eq!(back[0].to_data(), q.to_data());
    }

    /// `fused` and its gradients against the composite's, on the same backend, with qk equal
    /// to, narrower and wider than v (pruned blocks have any of the three).
    fn attention_equals_the_composite<B: AutodiffBackend>(fused: impl Fn([Tensor<B, 4>; 3], f64) -> Tensor<B, 4>, device: &B::Device) {
        use burn::tensor::activation::softmax;
        for (qk, v) in [(8, 8), (5, 8), (8, 3)] {
            let inputs = qkv::<B>(qk, v, device).map(|t| t.require_grad());
            let weights = Tensor::<B, 4>::random([2, 3, 7, v], Distribution::Normal(0.0, 1.0), device);
            let run = |fused_op: bool| {
                let [q, k, v] = inputs.clone();
                let out = if fused_op { fused([q, k, v], 0.3) } else { softmax(q.matmul(k.transpose()).mul_scalar(0.3), 3).matmul(v) };
                let grads = (out.clone() * weights.clone()).sum().backward();
                let g = inputs.clone().map(|t| t.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap());
                (out.into_data().to_vec::<f32>().unwrap(), g)
            };
            let (fused, fused_grads) = run(true);
            let (composite, composite_grads) = run(false);
            let max_diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            let backend = std::any::type_name::<B>();
            assert!(max_diff(&fused, &composite) < 1e-5, "{backend}, qk {qk}, v {v}: outputs differ by {}", max_diff(&fused, &composite));
            for (name, (a, b)) in ["q", "k", "v"].iter().zip(fused_grads.iter().zip(&composite_grads)) {
                assert!(max_diff(a, b) < 1e-5, "{backend}, qk {qk}, v {v}: d{name} differs by {}", max_diff(a, b));
            }
        }
    }

    #[test]
    fn attention_from_its_probabilities_and_its_gradients_equal_the_composite_on_flex_and_ndarray() {
        fn taken<B: AutodiffBackend>([q, k, v]: [Tensor<B, 4>; 3], scale: f64) -> Tensor<B, 4> {
            attention(q, k, v, scale).ok().expect("flex and ndarray take it at any length")
        }
        attention_equals_the_composite::<Autodiff<Flex>>(taken, &Default::default());
        attention_equals_the_composite::<Autodiff<NdArray>>(taken, &Default::default());
    }

    #[test]
    fn flexs_parallel_gelu_and_head_swap_equal_flexs_own_to_the_bit_with_their_gradients() {
        type T = Autodiff<Flex>;
        let device = Default::default();
        // Large enough for several parallel chunks; transposed, so the input is strided.
        let x = Tensor::<T, 4>::random([3, 40, 50, 24], Distribution::Normal(0.0, 2.0), &device).swap_dims(1, 2).require_grad();
        let weights = Tensor::<T, 4>::random([3, 50, 40, 24], Distribution::Normal(0.0, 1.0), &device);
        let run = |ours: bool| {
            let out = if ours { gelu(x.clone()).ok().expect("flex takes it") } else { burn::tensor::activation::gelu(x.clone()) };
            let grads = (out.clone() * weights.clone()).sum().backward();
            (out.into_data(), x.grad(&grads).unwrap().into_data())
        };
        assert_eq!(run(true), run(false), "gelu and its gradient");
        let inference = gelu(x.clone().inner()).ok().expect("flex takes it without autodiff too");
        assert_eq!(inference.into_data(), burn::tensor::activation::gelu(x.clone().inner()).into_data());

        let weights = weights.swap_dims(1, 2);
        let run = |ours: bool| {
            let out = if ours { swap_heads(x.clone()) } else { x.clone().swap_dims(1, 2) };
            let grads = (out.clone() * weights.clone()).sum().backward();
            (out.into_data(), x.grad(&grads).unwrap().into_data())
        };
        assert_eq!(run(true), run(false), "the head swap and its gradient");
        assert_eq!(swap_heads(x.clone().inner()).into_data(), x.clone().inner().swap_dims(1, 2).into_data());
        assert!(gelu(Tensor::<NdArray, 2>::zeros([2, 2], &Default::default())).is_err(), "ndarray: its own");
    }

    /// The one-operation LayerNorm and its gradients against burn's composite, on each backend
    /// that takes it; inference and a model without beta are left to `LayerNorm::forward`.
    fn layer_norm_equals_the_composite<B: Backend>(device: &B::Device) {
        use burn::module::Param;
        use burn::nn::LayerNormConfig;
        type Ad<B> = Autodiff<B>;
        let mut ln = LayerNormConfig::new(6).with_epsilon(1e-6).init::<Ad<B>>(device);
        let normal = |shape: [usize; 1]| Tensor::<Ad<B>, 1>::random(shape, Distribution::Normal(1.0, 0.5), device).require_grad();
        ln.gamma = Param::from_tensor(normal([6]));
        ln.beta = Some(Param::from_tensor(normal([6])));
        let x = Tensor::<Ad<B>, 3>::random([2, 5, 6], Distribution::Normal(0.5, 2.0), device).require_grad();
        let weights = Tensor::<Ad<B>, 3>::random([2, 5, 6], Distribution::Normal(0.0, 1.0), device);
        let run = |fused: bool| {
            let out = if fused { layer_norm(&ln, x.clone(), 1e-6).ok().expect("takes the fused op") } else { ln.forward(x.clone()) };
            let grads = (out.clone() * weights.clone()).sum().backward();
            let v = |t: Tensor<B, 1>| t.into_data().to_vec::<f32>().unwrap();
            let gb = ln.beta.as_ref().unwrap().val().grad(&grads).unwrap();
            [v(out.inner().flatten(0, 2)), v(x.grad(&grads).unwrap().flatten(0, 2)), v(ln.gamma.val().grad(&grads).unwrap()), v(gb)]
        };
        let (fused, composite) = (run(true), run(false));
        for (name, (a, b)) in ["output", "dx", "dgamma", "dbeta"].iter().zip(fused.iter().zip(&composite)) {
            let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            assert!(diff < 1e-5, "{}: {name} differs by {diff}", std::any::type_name::<B>());
        }
        assert!(layer_norm(&ln.valid(), x.clone().inner(), 1e-6).is_err(), "inference runs the backend's own layer_norm");
        ln.beta = None;
        assert!(layer_norm(&ln, x, 1e-6).is_err(), "no beta: the composite");
    }

    #[test]
    fn the_one_operation_layer_norm_and_its_gradients_equal_burns_composite() {
        layer_norm_equals_the_composite::<NdArray>(&Default::default());
        layer_norm_equals_the_composite::<Flex>(&Default::default());
        #[cfg(feature = "tch")]
        layer_norm_equals_the_composite::<burn::backend::LibTorch>(&burn::backend::libtorch::LibTorchDevice::Cpu);
    }

    #[cfg(feature = "tch")]
    #[test]
    fn libtorch_flash_attention_and_its_gradients_equal_the_composite_for_any_widths_from_flash_min_tokens() {
        use burn::backend::libtorch::LibTorchDevice;
        use burn::backend::LibTorch;
        type T = libtorch::Train;
        let device = LibTorchDevice::Cpu;
        let [q, k, v] = qkv::<LibTorch>(4, 4, &device);
        assert!(attention(q, k, v, 0.5).is_err(), "inference runs burn's attention, which is LibTorch's SDPA");
        let long = |d| Tensor::<T, 4>::random([1, 2, FLASH_MIN_TOKENS, d], Distribution::Normal(0.0, 1.0), &device);
        assert!(attention(long(4), long(4), long(4), 0.5).is_ok(), "training from FLASH_MIN_TOKENS tokens takes flash attention");
        let [q, k, v] = qkv::<T>(4, 4, &device);
        assert!(attention(q, k, v, 0.5).is_err(), "and the composite below");
        attention_equals_the_composite::<T>(|[q, k, v], scale| libtorch::flash_attention(q, k, v, scale), &device);
    }
}
