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
    #[cfg(feature = "tch")]
    if is::<B, burn::backend::LibTorch<f32>>() {
        return true;
    }
    is::<B, Flex>()
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
/// `softmax(q k^T * scale) v`, by a fused kernel whose backward is fused too, where `B` has one
/// for these tensors and it is the faster: LibTorch's flash attention on the CPU under autodiff,
/// from `FLASH_MIN_TOKENS` tokens. Else the inputs come back, for the composite.
pub(super) fn attention<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, scale: f64) -> Result<Tensor<B, 4>, [Tensor<B, 4>; 3]> {
    if q.dims()[2] < FLASH_MIN_TOKENS {
        return Err([q, k, v]);
    }
    flash_attention(q, k, v, scale)
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

/// Both ways of computing what the model's fused operations compute, for `runner bench
/// kernels` to time side by side on a backend.
pub mod bench {
    use super::*;

    /// Attention under autodiff: the fused kernel at any length (`None` where `B` has none), or
    /// the composite; [`attention_fused_from`] says which of the two the model takes.
    pub fn attention<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, scale: f64, fused: bool) -> Option<Tensor<B, 4>> {
        if fused {
            flash_attention(q, k, v, scale).ok()
        } else {
            Some(super::super::vit::composite_attention(q, k, v, scale, None))
        }
    }

    /// Whether the model takes `attention(.., true)` at `tokens`, where it exists.
    pub fn attention_fused_from(tokens: usize) -> bool {
        tokens >= FLASH_MIN_TOKENS
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
    fn on<B: Backend, X: Backend>(ln: &LayerNorm<B>, x: Tensor<B, 3>, eps: f64) -> Result<Tensor<B, 3>, Tensor<B, 3>> {
        let Some(beta) = &ln.beta else { return Err(x) };
        let x = cast::<_, Tensor<Autodiff<X>, 3>>(x)?;
        let (gamma, beta) = (same(ln.gamma.val()), same(beta.val()));
        Ok(same(norm::layer_norm::<X>(x, gamma, beta, eps)))
    }
    let x = on::<B, Flex>(ln, x, eps).or_else(|x| on::<B, NdArray>(ln, x, eps));
    #[cfg(feature = "tch")]
    let x = x.or_else(|x| on::<B, burn::backend::LibTorch<f32>>(ln, x, eps));
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

    #[derive(Debug)]
    struct LayerNormBackward;

    fn tensor<X: Backend, const D: usize>(p: FloatTensor<X>) -> Tensor<X, D> {
        Tensor::from_primitive(TensorPrimitive::Float(p))
    }

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
        let forward = |x: &FloatTensor<X>, gamma: &FloatTensor<X>| X::layer_norm(x.clone(), gamma.clone(), Some(beta.primitive.clone()), eps);
        let out = match LayerNormBackward.prepare::<NoCheckpointing>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = forward(&x.primitive, &gamma.primitive);
                prep.finish((x.primitive, gamma.primitive, eps), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward(&x.primitive, &gamma.primitive)),
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
    fn backends_without_a_fused_kernel_get_their_tensors_back() {
        let [q, k, v] = qkv::<Autodiff<NdArray>>(4, 4, &Default::default());
        let back = attention(q.clone(), k, v, 0.5).expect_err("ndarray has no fused attention");
        assert_eq!(back[0].to_data(), q.to_data());
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

    /// The fused forward and its gradients against the composite's, on the same backend, with
    /// qk equal to, narrower and wider than v (pruned blocks have any of the three).
    #[cfg(feature = "tch")]
    #[test]
    fn libtorch_flash_attention_and_its_gradients_equal_the_composite_for_any_widths() {
        use burn::backend::libtorch::LibTorchDevice;
        use burn::backend::LibTorch;
        use burn::tensor::activation::softmax;
        type T = libtorch::Train;
        let device = LibTorchDevice::Cpu;
        let [q, k, v] = qkv::<LibTorch>(4, 4, &device);
        assert!(attention(q, k, v, 0.5).is_err(), "inference runs burn's attention, which is LibTorch's SDPA");
        let long = |d| Tensor::<T, 4>::random([1, 2, FLASH_MIN_TOKENS, d], Distribution::Normal(0.0, 1.0), &device);
        assert!(attention(long(4), long(4), long(4), 0.5).is_ok(), "training from FLASH_MIN_TOKENS tokens takes flash attention");
        let [q, k, v] = qkv::<T>(4, 4, &device);
        assert!(attention(q, k, v, 0.5).is_err(), "and the composite below");
        for (qk, v) in [(8, 8), (5, 8), (8, 3)] {
            let inputs = qkv::<T>(qk, v, &device).map(|t| t.require_grad());
            let weights = Tensor::<T, 4>::random([2, 3, 7, v], Distribution::Normal(0.0, 1.0), &device);
            let run = |fused: bool| {
                let [q, k, v] = inputs.clone();
                let out = if fused {
                    libtorch::flash_attention(q, k, v, 0.3)
                } else {
                    softmax(q.matmul(k.transpose()).mul_scalar(0.3), 3).matmul(v)
                };
                let grads = (out.clone() * weights.clone()).sum().backward();
                let g = inputs.clone().map(|t| t.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap());
                (out.into_data().to_vec::<f32>().unwrap(), g)
            };
            let (fused, fused_grads) = run(true);
            let (composite, composite_grads) = run(false);
            let max_diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            assert!(max_diff(&fused, &composite) < 1e-5, "qk {qk}, v {v}: outputs differ by {}", max_diff(&fused, &composite));
            for (name, (a, b)) in ["q", "k", "v"].iter().zip(fused_grads.iter().zip(&composite_grads)) {
                assert!(max_diff(a, b) < 1e-5, "qk {qk}, v {v}: d{name} differs by {}", max_diff(a, b));
            }
        }
    }
}
