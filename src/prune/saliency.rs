//! Hessian-aware saliency (METHOD.md section 3) and the baseline criteria.
//!
//! A scalar gate `g_S` multiplies each unit's weights ([`gate`] with gates of ones: the model
//! computes the same function). Backpropagating the minibatch loss gives `dL/dg_S`, which is
//! `sum over w in S of w * dL/dw`: the signed products summed over the whole unit first. The
//! Fisher approximation of the curvature along the gate makes the loss change of removing `S`
//! `I_S = (dL/dg_S / c_S)^2`.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::structures::{gate, Masks, ParamSet, Structure, UnitTensors};
use crate::model::Model;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Criterion {
    /// `(sum w*g / c)^2`: the group-Fisher saliency of the paper.
    Hessian,
    /// `|sum w*g / c|`: first-order Taylor.
    Taylor,
    /// `sum w^2` over the unit.
    Magnitude,
    /// `sum (w*g)^2`, per element: Fisher without the grouping.
    WeightFisher,
    Random,
}

/// Normalizers `c` per structure, keyed as in pipeline files.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Normalizers {
    /// Default: the number of blocks L (a Swin stage's EMB: the blocks of that stage).
    pub emb: Option<f64>,
    pub head: f64,
    pub qk: f64,
    pub v: f64,
    pub mlp: f64,
}

impl Default for Normalizers {
    fn default() -> Self {
        Self { emb: None, head: 12.0, qk: 2.0, v: 2.0, mlp: 1.0 }
    }
}

impl Normalizers {
    pub fn get(&self, s: Structure, depth: usize) -> f64 {
        match s {
            Structure::Emb => self.emb.unwrap_or_else(|| s.default_normalizer(depth)),
            Structure::Head => self.head,
            Structure::Qk => self.qk,
            Structure::V => self.v,
            Structure::Mlp => self.mlp,
        }
    }
}

fn ones_requiring_grad<B: AutodiffBackend>(model: &Model<B>) -> UnitTensors<B> {
    Masks::ones(&model.config()).to_tensors::<B>(&model.device()).map(|t| t.require_grad())
}

fn gate_grads<B: AutodiffBackend>(gates: &UnitTensors<B>, grads: &B::Gradients) -> Masks {
    let grad = |t: &Tensor<B, 1>| {
        let n = t.dims()[0];
        t.grad(grads).map(Tensor::<B, 1>::from_inner).unwrap_or_else(|| Tensor::zeros([n], &t.device()))
    };
    Masks::from_tensors(&UnitTensors {
        emb: gates.emb.iter().map(grad).collect(),
        blocks: gates.blocks.iter().map(|b| b.each_ref().map(grad)).collect(),
        stages: gates.stages.clone(),
    })
}

/// One minibatch through gated `model`: the loss, the gradients of every parameter (for an
/// optimizer step), and `dL/dg_S` of every unit.
pub fn gate_gradients<B: AutodiffBackend>(
    model: &Model<B>,
    loss: impl FnOnce(&Model<B>) -> Tensor<B, 1>,
) -> (Tensor<B, 1>, B::Gradients, Masks) {
    let gates = ones_requiring_grad(model);
    let gated = gate(model.clone(), &gates, ParamSet::Saliency);
    let loss = loss(&gated);
    let grads = loss.backward();
    let sums = gate_grads(&gates, &grads);
    (loss, grads, sums)
}

/// The loss `hessian_scores` differentiates: cross-entropy of the evaluation logits (both heads
/// averaged) against hard labels, mean over the batch.
pub fn scored_loss<B: Backend>(model: &Model<B>, images: Tensor<B, 4>, labels: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    let logits = model.forward(images).logits();
    burn::nn::loss::CrossEntropyLossConfig::new().init(&logits.device()).forward(logits, labels)
}

/// Sum of squares of every float parameter, differentiable.
struct SumOfSquares<B: Backend> {
    total: Option<Tensor<B, 1>>,
}

impl<B: Backend> ModuleVisitor<B> for SumOfSquares<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let s = param.val().powi_scalar(2).sum();
        self.total = Some(match self.total.take() {
            Some(t) => t + s,
            None => s,
        });
    }
}

/// Replaces every parameter `w` by `w * dL/dw`, detached.
struct TimesGrad<'a> {
    grads: &'a GradientsParams,
}

impl<B: AutodiffBackend> ModuleMapper<B> for TimesGrad<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let g = self.grads.get::<B::InnerBackend, D>(param.id);
        param.map(|w| {
            let inner = w.inner();
            let product = match g {
                Some(g) => inner * g,
                None => inner.zeros_like(),
            };
            Tensor::from_inner(product)
        })
    }
}

/// `d/dg_S` of `0.5 * sum ||gated params||^2` at gates of one: `sum over S of w^2`.
fn squared_sums<B: AutodiffBackend>(model: &Model<B>) -> Masks {
    let gates = ones_requiring_grad(model);
    let gated = gate(model.clone(), &gates, ParamSet::Saliency);
    let mut visitor = SumOfSquares { total: None };
    gated.visit(&mut visitor);
    let grads = visitor.total.expect("a model has parameters").mul_scalar(0.5).backward();
    gate_grads(&gates, &grads)
}

/// The per-unit score of one minibatch under `criterion`, from the gate gradients `sums` and
/// the parameter gradients `grads` of that minibatch (summed over data-parallel shards).
/// Larger means more important.
pub fn score<B: AutodiffBackend>(
    criterion: Criterion,
    model: &Model<B>,
    sums: &Masks,
    grads: &GradientsParams,
    normalizers: &Normalizers,
    rng: &mut impl Rng,
) -> Masks {
    let mut out = sums.clone();
    match criterion {
        Criterion::Hessian | Criterion::Taylor => {
            for (s, b) in out.slots() {
                // EMB's default normalizer is the number of blocks on its stream.
                let c = normalizers.get(s, if s == Structure::Emb { sums.blocks_in(b) } else { 0 }) as f32;
                for x in out.get_mut(s, b).iter_mut() {
                    let v = *x / c;
                    *x = if criterion == Criterion::Hessian { v * v } else { v.abs() };
                }
            }
        }
        Criterion::Magnitude => out = squared_sums(model),
        Criterion::WeightFisher => {
            let products = model.clone().map(&mut TimesGrad { grads });
            out = squared_sums(&products);
        }
        Criterion::Random => {
            for (s, b) in out.slots() {
                for x in out.get_mut(s, b).iter_mut() {
                    *x = rng.random::<f32>();
                }
            }
        }
    }
    out
}

/// A seeded RNG for the `random` criterion.
pub fn rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BlockDims, SwinConfig, Vit, VitConfig};
    use burn::backend::{Autodiff, NdArray};
    use burn::nn::loss::CrossEntropyLossConfig;
    use burn::tensor::{Distribution, Int, TensorData};

    type B = Autodiff<NdArray<f64>>;

    fn setup() -> (Model<B>, Tensor<B, 4>, Tensor<B, 1, Int>) {
        let mut c = VitConfig::uniform(16, 4, 3, 16, 2, 2, 2.0, 5, true);
        c.blocks[1] = BlockDims { heads: 3, qk: 4, v: 6, mlp: 12 };
        setup_with(c.into())
    }

    fn setup_with(c: crate::model::ModelConfig) -> (Model<B>, Tensor<B, 4>, Tensor<B, 1, Int>) {
        let device = Default::default();
        <B as Backend>::seed(&device, 7);
        let model = c.init::<B>(&device);
        let x = Tensor::<B, 4>::random([6, 3, 16, 16], Distribution::Normal(0.0, 1.0), &device);
        let y = Tensor::<B, 1, Int>::from_data(TensorData::new(vec![0i64, 1, 2, 3, 4, 0], [6]), &device);
        (model, x, y)
    }

    fn deit(model: &Model<B>) -> &Vit<B> {
        match model {
            Model::Deit(m) => m,
            Model::Swin(_) => unreachable!("the test model is a DeiT"),
        }
    }

    fn loss(model: &Model<B>, x: &Tensor<B, 4>, y: &Tensor<B, 1, Int>) -> Tensor<B, 1> {
        let ce = CrossEntropyLossConfig::new().init(&x.device());
        ce.forward(model.forward(x.clone()).logits(), y.clone())
    }

    /// `sum(w * dL/dw)` over a unit is the derivative of the loss along a gate on the unit: it
    /// matches a central finite difference of the loss with the unit's weights scaled by
    /// 1 ± eps. Burn's `erf` (inside GELU) is a polynomial accurate to about 1e-7, so the loss
    /// is not smooth below that: eps is 1e-2 and the tolerance allows for it.
    #[test]
    fn saliency_sum_matches_finite_difference_of_a_gate() {
        let (model, x, y) = setup();
        let units = [
            (Structure::Emb, 0, 3),
            (Structure::Emb, 0, 11),
            (Structure::Head, 0, 1),
            (Structure::Head, 1, 2),
            (Structure::Qk, 1, 0),
            (Structure::Qk, 0, 5),
            (Structure::V, 1, 5),
            (Structure::V, 0, 2),
            (Structure::Mlp, 0, 7),
            (Structure::Mlp, 1, 11),
        ];
        matches_finite_differences(&model, &x, &y, &units);
    }

    /// As for DeiT, on a Swin: EMB of each stage (the second's written by the merging), and
    /// a head with its relative position bias, in a shifted block of the second stage.
    #[test]
    fn swin_saliency_sum_matches_finite_difference_of_a_gate() {
        let mut c = SwinConfig::uniform(16, 2, 3, 2, 8, &[2, 2], &[2, 4], 2.0, 5);
        c.stages[1].blocks[1] = BlockDims { heads: 3, qk: 4, v: 5, mlp: 12 };
        let (model, x, y) = setup_with(c.into());
        let units = [
            (Structure::Emb, 0, 3),
            (Structure::Emb, 1, 9),
            (Structure::Head, 3, 2),
            (Structure::Qk, 3, 1),
            (Structure::V, 1, 3),
            (Structure::Mlp, 2, 5),
        ];
        matches_finite_differences(&model, &x, &y, &units);
    }

    fn matches_finite_differences(model: &Model<B>, x: &Tensor<B, 4>, y: &Tensor<B, 1, Int>, units: &[(Structure, usize, usize)]) {
        let (_, _, sums) = gate_gradients(model, |m| loss(m, x, y));
        let largest = units.iter().map(|(s, b, u)| sums.get(*s, *b)[*u].abs() as f64).fold(0.0, f64::max);
        assert!(largest > 1e-5, "the check needs gradients to compare: {largest}");
        for &(s, block, unit) in units {
            let at = |factor: f32| {
                let mut m = Masks::ones(&model.config());
                m.get_mut(s, block)[unit] = factor;
                let scaled = m.apply(model.clone(), ParamSet::Saliency);
                crate::train::scalar(loss(&scaled, x, y))
            };
            let (up, down) = (1.01f32, 0.99f32);
            let fd = (at(up) - at(down)) / (up as f64 - down as f64);
            let analytic = sums.get(s, block)[unit] as f64;
            assert!(
                (fd - analytic).abs() <= 0.05 * analytic.abs() + 0.02 * largest,
                "{s:?} block {block} unit {unit}: finite difference {fd} vs sum(w*g) {analytic}"
            );
        }
    }

    /// The gate gradient is exactly the signed sum of `w * dL/dw` over the unit's weights.
    #[test]
    fn gate_gradient_is_the_sum_of_weight_times_gradient() {
        let (model, x, y) = setup();
        let (_, grads, sums) = gate_gradients(&model, |m| loss(m, &x, &y));
        let vit = deit(&model);
        let wg = |p: &Param<Tensor<B, 2>>| p.val().inner() * p.grad(&grads).unwrap();
        let wg1 = |p: &Param<Tensor<B, 1>>| p.val().inner() * p.grad(&grads).unwrap();
        // MLP unit 4 of block 1: fc1 column 4 (Burn layout) and its bias.
        let fc1 = &vit.blocks[1].mlp.fc1;
        let mlp = wg(&fc1.weight).slice([0..16, 4..5]).sum().into_scalar() + wg1(fc1.bias.as_ref().unwrap()).slice([4..5]).sum().into_scalar();
        // V dim 2 of block 1 (3 heads of 6): V columns 2, 8, 14 and their biases.
        let v = &vit.blocks[1].attn.v;
        let (vw, vb) = (wg(&v.weight), wg1(v.bias.as_ref().unwrap()));
        let vdim: f64 = [2, 8, 14].iter().map(|&c| vw.clone().slice([0..16, c..c + 1]).sum().into_scalar() + vb.clone().slice([c..c + 1]).sum().into_scalar()).sum();
        for (got, want) in [(sums.get(Structure::Mlp, 1)[4] as f64, mlp), (sums.get(Structure::V, 1)[2] as f64, vdim)] {
            assert!((got - want).abs() <= 1e-6 * want.abs() + 1e-12, "gate {got} vs sum(w*g) {want}");
        }
    }

    #[test]
    fn gates_of_one_leave_the_function_unchanged() {
        let (model, x, y) = setup();
        let (gated_loss, _, _) = gate_gradients(&model, |m| loss(m, &x, &y));
        assert_eq!(crate::train::scalar(gated_loss), crate::train::scalar(loss(&model, &x, &y)));
    }

    #[test]
    fn magnitude_is_the_sum_of_squared_weights_of_the_unit() {
        let (model, x, y) = setup();
        let (_, grads, sums) = gate_gradients(&model, |m| loss(m, &x, &y));
        let grads = GradientsParams::from_grads(grads, &model);
        let mag = score(Criterion::Magnitude, &model, &sums, &grads, &Normalizers::default(), &mut rng(0));
        // MLP unit m: fc1 column m (Burn layout) and its bias.
        let fc1 = &deit(&model).blocks[1].mlp.fc1;
        let w = fc1.weight.val().inner().slice([0..16, 4..5]).powi_scalar(2).sum().into_scalar();
        let b = fc1.bias.as_ref().unwrap().val().inner().slice([4..5]).powi_scalar(2).sum().into_scalar();
        assert!((mag.get(Structure::Mlp, 1)[4] as f64 - (w + b)).abs() < 1e-5);

        let hessian = score(Criterion::Hessian, &model, &sums, &grads, &Normalizers::default(), &mut rng(0));
        let s = sums.get(Structure::Head, 1)[2] / 12.0;
        assert_eq!(hessian.get(Structure::Head, 1)[2], s * s);
    }
}
