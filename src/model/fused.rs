//! A backend's own fused kernels, where the model can use them: each computes the function of
//! the composite it replaces, forward and backward, and is picked by the backend's type, so the
//! generic model carries no extra bound and every other backend runs the composite.

use std::any::{Any, TypeId};

use burn::backend::{Autodiff, Flex};
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
#[cfg_attr(not(feature = "tch"), allow(dead_code))]
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
    #[cfg(feature = "tch")]
    let [q, k, v] = match cast::<_, [Tensor<libtorch::Train, 4>; 3]>([q, k, v]) {
        Ok([q, k, v]) if libtorch::flash_runs(&q) && q.dims()[2] >= FLASH_MIN_TOKENS => return Ok(same(libtorch::flash_attention(q, k, v, scale))),
        Ok(qkv) => qkv.map(same),
        Err(qkv) => qkv,
    };
    let _ = scale;
    Err([q, k, v])
}

/// The fewest tokens at which LibTorch's CPU flash attention, forward and backward, beats the
/// composite (measured on 2 cores, one block's attention forward and backward: DeiT-B's
/// 198 tokens of width 64, batch 8, 31.6 ms fused against 51.7 ms composite; the quickstart's
/// 18 tokens of width 16, batch 64, 2.1 ms against 0.79: the kernel's fixed cost per block of
/// queries dominates short sequences).
#[cfg(feature = "tch")]
const FLASH_MIN_TOKENS: usize = 128;

/// `value` as a `T`, for an `A` known to be `T`.
#[cfg_attr(not(feature = "tch"), allow(dead_code))]
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
    use burn::backend::NdArray;
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
