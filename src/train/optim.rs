//! AdamW as DeiT and NViT train with it (timm's optimizer factory): decoupled weight decay on
//! the weight matrices and the patch-embedding kernel only, none on biases, LayerNorm
//! parameters and the position, class and distillation tokens; gradient clipping by the global
//! norm of all gradients together, as `torch.nn.utils.clip_grad_norm_`.
//!
//! burn 0.21 has neither parameter groups nor global-norm clipping (its `GradientClipping::Norm`
//! clips each tensor by its own norm), so both happen here, around burn's AdamW with its own
//! decay off. Decay then update is PyTorch's order; the update does not read the weights, so the
//! step is PyTorch's `w <- w (1 - lr wd) - lr adam(g)`.

use std::collections::HashSet;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};

use crate::model::Model;

type Adam<B> = OptimizerAdaptor<burn::optim::AdamW, Model<B>, B>;

/// What survives a resume: burn's AdamW moments per parameter.
pub type AdamWRecord<B> = <Adam<B> as Optimizer<Model<B>, B>>::Record;

#[derive(Clone)]
pub struct AdamW<B: AutodiffBackend> {
    adam: Adam<B>,
    weight_decay: f64,
    grad_clip: Option<f64>,
}

impl<B: AutodiffBackend> AdamW<B> {
    /// `weight_decay` as timm applies it; `grad_clip` the largest global gradient norm (none
    /// when unset).
    pub fn new(weight_decay: f64, grad_clip: Option<f64>) -> Self {
        Self { adam: AdamWConfig::new().with_weight_decay(0.0).init(), weight_decay, grad_clip }
    }

    pub fn step(&mut self, lr: f64, model: Model<B>, mut grads: GradientsParams) -> Model<B> {
        if let Some(max_norm) = self.grad_clip {
            clip_global_norm(&model, &mut grads, max_norm);
        }
        let model = if self.weight_decay > 0.0 {
            let exempt = model.no_weight_decay().into_iter().collect();
            model.map(&mut Decay { factor: 1.0 - lr * self.weight_decay, exempt })
        } else {
            model
        };
        self.adam.step(lr, model, grads)
    }

    pub fn to_record(&self) -> AdamWRecord<B> {
        self.adam.to_record()
    }

    pub fn load_record(mut self, record: AdamWRecord<B>) -> Self {
        self.adam = self.adam.load_record(record);
        self
    }
}

/// timm's rule: no decay for a parameter of one dimension (biases, LayerNorm's scale and
/// shift) or one the model exempts by name (`Vit::no_weight_decay`).
struct Decay {
    factor: f64,
    exempt: HashSet<ParamId>,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Decay {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if D < 2 || self.exempt.contains(&param.id) {
            return param;
        }
        let factor = self.factor;
        // On the inner tensor: the decay is not part of any graph.
        param.map(|w| Tensor::from_inner(w.inner().mul_scalar(factor)).require_grad())
    }
}

/// Scales every gradient by `max_norm / (norm + 1e-6)` when the norm of all of them together
/// exceeds `max_norm`, as `torch.nn.utils.clip_grad_norm_` does.
fn clip_global_norm<B: AutodiffBackend>(model: &Model<B>, grads: &mut GradientsParams, max_norm: f64) {
    struct SumOfSquares<'a, B: AutodiffBackend> {
        grads: &'a GradientsParams,
        total: Option<Tensor<B::InnerBackend, 1>>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for SumOfSquares<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                let s = g.powi_scalar(2).sum();
                self.total = Some(match self.total.take() {
                    Some(t) => t + s,
                    None => s,
                });
            }
        }
    }
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f64,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
                self.grads.register(param.id, g.mul_scalar(self.factor));
            }
        }
    }
    let mut squares = SumOfSquares::<B> { grads, total: None };
    model.visit(&mut squares);
    let Some(total) = squares.total else { return };
    let norm = total.into_scalar().elem::<f64>().sqrt();
    let factor = max_norm / (norm + 1e-6);
    if factor < 1.0 {
        model.visit(&mut Scale { grads, factor });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::VitConfig;
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::TensorData;

    // f32 as the lib's other tests: burn 0.21 keys a device's default float dtype by device
    // type, so `NdArray<f32>` and `NdArray<f32>` in one process make each other's zeros and
    // random tensors in the wrong dtype.
    type B = Autodiff<NdArray<f32>>;

    fn model() -> Model<B> {
        let device = Default::default();
        <B as burn::tensor::backend::Backend>::seed(&device, 3);
        let model = VitConfig::uniform(16, 4, 3, 16, 2, 2, 2.0, 5, true).init::<B>(&device);
        // Non-zero biases and LayerNorm shifts, so that a decay of them would show.
        struct Fill;
        impl ModuleMapper<B> for Fill {
            fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
                param.map(|w| Tensor::from_inner(w.inner().add_scalar(0.5)).require_grad())
            }
        }
        Model::Deit(model.map(&mut Fill))
    }

    /// Every parameter's values, in the model's order.
    fn all_values(model: &Model<B>) -> Vec<Vec<f32>> {
        struct Collect(Vec<Vec<f32>>);
        impl ModuleVisitor<B> for Collect {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                self.0.push(values(param));
            }
        }
        let mut c = Collect(Vec::new());
        model.visit(&mut c);
        c.0
    }

    /// Zero gradients for every parameter: Adam's update is then exactly zero.
    fn zero_grads(model: &Model<B>) -> GradientsParams {
        struct Zeros(GradientsParams);
        impl ModuleVisitor<B> for Zeros {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                self.0.register(param.id, param.val().inner().zeros_like());
            }
        }
        let mut z = Zeros(GradientsParams::new());
        model.visit(&mut z);
        z.0
    }

    fn values<const D: usize>(p: &Param<Tensor<B, D>>) -> Vec<f32> {
        p.val().into_data().to_vec::<f32>().unwrap()
    }

    #[test]
    fn with_zero_gradient_only_weight_matrices_shrink_by_lr_times_wd() {
        let before = model();
        let (lr, wd) = (0.1, 0.05);
        let after = AdamW::new(wd, None).step(lr, before.clone(), zero_grads(&before));

        let (before_model, after_model) = (&before, &after);
        let (before, after) = (before.as_deit().unwrap(), after.as_deit().unwrap());
        let b0 = &before.blocks[0];
        let a0 = &after.blocks[0];
        let unchanged = [
            (values(b0.mlp.fc1.bias.as_ref().unwrap()), values(a0.mlp.fc1.bias.as_ref().unwrap()), "fc1 bias"),
            (values(&b0.norm1.gamma), values(&a0.norm1.gamma), "LayerNorm weight"),
            (values(b0.norm1.beta.as_ref().unwrap()), values(a0.norm1.beta.as_ref().unwrap()), "LayerNorm bias"),
            (values(before.cls_token.as_ref().unwrap()), values(after.cls_token.as_ref().unwrap()), "cls token"),
            (values(before.dist_token.as_ref().unwrap()), values(after.dist_token.as_ref().unwrap()), "dist token"),
            (values(&before.pos_embed), values(&after.pos_embed), "position embedding"),
            (values(before.patch_embed.bias.as_ref().unwrap()), values(after.patch_embed.bias.as_ref().unwrap()), "patch embedding bias"),
        ];
        for (b, a, what) in unchanged {
            assert!(b.iter().any(|v| *v != 0.0), "{what}: the check needs non-zero values");
            assert_eq!(a, b, "{what} must not be decayed");
        }
        let shrunk = [
            (values(&b0.mlp.fc1.weight), values(&a0.mlp.fc1.weight), "fc1 weight"),
            (values(&b0.attn.q.weight), values(&a0.attn.q.weight), "q weight"),
            (values(&before.head.weight), values(&after.head.weight), "head weight"),
            (values(&before.patch_embed.weight), values(&after.patch_embed.weight), "patch embedding kernel"),
        ];
        // One multiplication by `1 - lr * wd` in f32, as PyTorch's `mul_`: exact, not approximate.
        let factor = (1.0 - lr * wd) as f32;
        for (b, a, what) in shrunk {
            for (x, y) in b.iter().zip(&a) {
                assert_eq!(*y, x * factor, "{what}: {x} became {y}");
            }
        }
        let changed = all_values(before_model).iter().zip(all_values(after_model)).filter(|(b, a)| *b != a).count();
        assert_eq!(changed, 1 + 2 * 6 + 2, "decayed: the patch kernel, q/k/v/proj/fc1/fc2 of two blocks, two heads");
    }

    #[test]
    fn clipping_scales_all_gradients_by_their_global_norm() {
        let model = model();
        let device = Default::default();
        let one_hot = |value: f32| {
            let mut v = vec![0.0; 16];
            v[0] = value;
            v
        };
        // Gradients 3 and 4 in two tensors: a global norm of 5.
        let vit = model.as_deit().unwrap();
        let (p, q) = (vit.cls_token.as_ref().unwrap().id, vit.norm.as_ref().unwrap().gamma.id);
        let mut grads = GradientsParams::new();
        grads.register(p, Tensor::<NdArray<f32>, 3>::from_data(TensorData::new(one_hot(3.0), [1, 1, 16]), &device));
        grads.register(q, Tensor::<NdArray<f32>, 1>::from_data(TensorData::new(one_hot(4.0), [16]), &device));
        clip_global_norm(&model, &mut grads, 1.0);
        let g = |v: Vec<f32>| v.iter().copied().fold(0.0, f32::max);
        let p = g(grads.get::<NdArray<f32>, 3>(p).unwrap().into_data().to_vec().unwrap());
        let q = g(grads.get::<NdArray<f32>, 1>(q).unwrap().into_data().to_vec().unwrap());
        assert!((p - 3.0 / 5.0).abs() < 1e-6 && (q - 4.0 / 5.0).abs() < 1e-6, "{p} {q}");

        // Under the limit: untouched.
        let mut small = GradientsParams::new();
        small.register(vit.norm.as_ref().unwrap().gamma.id, Tensor::<NdArray<f32>, 1>::full([16], 0.1, &device));
        clip_global_norm(&model, &mut small, 1.0);
        assert_eq!(g(small.get::<NdArray<f32>, 1>(vit.norm.as_ref().unwrap().gamma.id).unwrap().into_data().to_vec().unwrap()), 0.1);
    }
}
