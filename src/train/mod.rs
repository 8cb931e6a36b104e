//! The pieces of a training loop that stages share: batches as tensors, the classification
//! and distillation losses on one or both heads, the learning-rate schedule, and checks that
//! stop a diverging run.

use anyhow::{bail, Result};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, ElementConversion, FloatDType, Int, Tensor, TensorData};

use crate::data::Batch;
use crate::model::{Model, VitOutput};

pub mod curves;
pub mod optim;
pub mod parallel;
pub mod resume;

/// A loader batch on `device`: images `[batch, channels, size, size]` and labels `[batch]`.
pub fn to_tensors<B: Backend>(batch: Batch, device: &B::Device) -> (Tensor<B, 4>, Tensor<B, 1, Int>) {
    let n = batch.labels.len();
    let images = crate::model::float_tensor(batch.images, batch.shape, device);
    let labels = Tensor::from_data(TensorData::new(batch.labels, [n]), device);
    (images, labels)
}

/// Soft targets (`data::mix::soft_targets`, or mixed by `data::mix::Mixer`) as a
/// `[batch, classes]` tensor.
pub fn targets_tensor<B: Backend>(targets: Vec<f32>, classes: usize, device: &B::Device) -> Tensor<B, 2> {
    let n = targets.len() / classes;
    crate::model::float_tensor(targets, [n, classes], device)
}

/// Examples `range` of a batch with their soft targets (`classes` per example, flat), as
/// tensors on `device`: one data-parallel shard's images, labels and targets.
pub fn shard_tensors<B: Backend>(
    batch: &Batch,
    targets: &[f32],
    range: std::ops::Range<usize>,
    device: &B::Device,
) -> (Tensor<B, 4>, Tensor<B, 1, Int>, Tensor<B, 2>) {
    let classes = targets.len() / batch.labels.len();
    let targets = targets_tensor(targets[range.start * classes..range.end * classes].to_vec(), classes, device);
    let (images, labels) = to_tensors(batch.slice(range), device);
    (images, labels, targets)
}

/// Cross-entropy against soft targets `[batch, classes]` (smoothed, mixed or one-hot labels),
/// mean over the batch; a distilled model's two heads both learn them, losses averaged.
pub fn classification_loss<B: Backend>(output: &VitOutput<B>, targets: Tensor<B, 2>) -> Tensor<B, 1> {
    let ce = |logits: Tensor<B, 2>| (log_softmax(logits, 1) * targets.clone()).sum_dim(1).mean().neg();
    match &output.dist {
        Some(dist) => (ce(output.cls.clone()) + ce(dist.clone())).div_scalar(2.0),
        None => ce(output.cls.clone()),
    }
}

/// Compute precision of training on GPUs; the weights, optimizer state and loss stay f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    F16,
    Bf16,
}

impl Precision {
    /// The dtype to compute in (`None` for f32), if every device supports it.
    pub fn compute_dtype<B: Backend>(self, devices: &[B::Device]) -> Result<Option<FloatDType>> {
        let dtype = match self {
            Precision::F32 => return Ok(None),
            Precision::F16 => FloatDType::F16,
            Precision::Bf16 => FloatDType::BF16,
        };
        if let Some(d) = devices.iter().find(|d| !B::supports_dtype(d, DType::from(dtype))) {
            bail!(
                "precision = \"{self}\": device {d:?} cannot compute in it\n  hint: mixed precision needs a GPU backend (cuda; wgpu for f16 where the adapter has shader-f16); leave precision unset on the CPU"
            );
        }
        Ok(Some(dtype))
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        })
    }
}

/// `model` with its parameters cast to `dtype` (unchanged for `None`). Under autodiff the cast
/// is an operation of the graph: gradients reach the original f32 parameters, in f32.
pub fn in_precision<B: Backend, M: burn::module::Module<B>>(model: M, dtype: Option<FloatDType>) -> M {
    struct Cast(FloatDType);
    impl<B: Backend> burn::module::ModuleMapper<B> for Cast {
        fn map_float<const D: usize>(&mut self, param: burn::module::Param<Tensor<B, D>>) -> burn::module::Param<Tensor<B, D>> {
            let dtype = self.0;
            param.map(|t| t.cast(dtype))
        }
    }
    match dtype {
        Some(d) => burn::module::Module::map(model, &mut Cast(d)),
        None => model,
    }
}

/// `model` on `images`, computing in `dtype` (`None`: f32); both heads come back in f32.
pub fn forward_in<B: Backend>(model: &Model<B>, images: Tensor<B, 4>, dtype: Option<FloatDType>) -> VitOutput<B> {
    match dtype {
        Some(d) => in_precision(model.clone(), dtype).forward(images.cast(d)).to_f32(),
        None => model.forward(images),
    }
}

/// The teacher's output on `images`, computed without a graph, as constants of the student's.
/// `dtype` is the precision the teacher's parameters were cast to (`in_precision`), if any.
pub fn teacher_output<B: AutodiffBackend>(teacher: &Model<B::InnerBackend>, images: &Tensor<B, 4>, dtype: Option<FloatDType>) -> VitOutput<B> {
    let images = images.clone().inner();
    let out = match dtype {
        Some(d) => teacher.forward(images.cast(d)).to_f32(),
        None => teacher.forward(images),
    };
    VitOutput { cls: Tensor::from_inner(out.cls), dist: out.dist.map(Tensor::from_inner) }
}

/// DeiT's soft distillation, head by head: `KL(teacher || student)` at temperature `t`, times
/// `t^2`, over the number of logits. A distilled student's heads learn the teacher's
/// counterparts (its class head where the teacher has only one); the two terms are averaged.
pub fn distillation_loss<B: Backend>(student: &VitOutput<B>, teacher: &VitOutput<B>, t: f64) -> Tensor<B, 1> {
    let kl = |s: Tensor<B, 2>, te: Tensor<B, 2>| {
        let numel = s.dims().iter().product::<usize>() as f64;
        let log_s = log_softmax(s.div_scalar(t), 1);
        let log_t = log_softmax(te.div_scalar(t), 1);
        (log_t.clone().exp() * (log_t - log_s)).sum().mul_scalar(t * t / numel)
    };
    match &student.dist {
        Some(dist) => {
            let teacher_dist = teacher.dist.clone().unwrap_or_else(|| teacher.cls.clone());
            (kl(student.cls.clone(), teacher.cls.clone()) + kl(dist.clone(), teacher_dist)).div_scalar(2.0)
        }
        None => kl(student.cls.clone(), teacher.logits()),
    }
}

/// Stops the stage on a NaN or infinite loss, naming where it happened.
/// An error for a NaN or infinite loss at `at` (1-based, as the log counts), with `hint`.
pub fn check_finite(loss: f64, at: &str, hint: &str) -> Result<()> {
    if !loss.is_finite() {
        bail!("the loss became {loss} at {at}\n  hint: {hint}");
    }
    Ok(())
}

pub fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_scalar().elem::<f64>()
}

/// Correct predictions among `logits` `[batch, classes]`: top-1 and top-`k`.
pub fn correct<B: Backend>(logits: Tensor<B, 2>, labels: Tensor<B, 1, Int>, k: usize) -> (usize, usize) {
    let [n, classes] = logits.dims();
    let k = k.min(classes);
    let top = logits.argsort_descending(1).slice([0..n, 0..k]); // [batch, k]
    let hits = top.equal(labels.reshape([n, 1]).expand([n, k])).int(); // [batch, k]
    let top1 = hits.clone().slice([0..n, 0..1]).sum().into_scalar().elem::<i64>() as usize;
    let topk = hits.sum().into_scalar().elem::<i64>() as usize;
    (top1, topk)
}

/// What one pass over a split gives: top-1 and top-5 hits, images, summed cross-entropy.
#[derive(Debug, Default, Clone, Copy)]
pub struct Accuracy {
    pub top1: usize,
    pub top5: usize,
    pub seen: usize,
    pub loss_sum: f64,
}

/// `model` over one pass of `loader` (epoch 0's order), `each` called after every batch. Like a
/// training step, a batch waits for and holds off other runners' measurements: three seeds'
/// evaluations at once measured the same shapes up to 1.8x apart.
pub fn accuracy<B: Backend>(model: &Model<B>, loader: &crate::data::Loader, device: &B::Device, mut each: impl FnMut(&Accuracy)) -> Result<Accuracy> {
    let mut acc = Accuracy::default();
    for batch in loader.epoch(0) {
        let _working = crate::machine::working();
        let (images, labels) = to_tensors::<B>(batch?, device);
        let n = labels.dims()[0];
        let logits = model.forward(images).logits();
        let loss = burn::nn::loss::CrossEntropyLossConfig::new().init(device).forward(logits.clone(), labels.clone());
        acc.loss_sum += scalar(loss) * n as f64;
        let (a, b) = correct(logits, labels, 5);
        (acc.top1, acc.top5, acc.seen) = (acc.top1 + a, acc.top5 + b, acc.seen + n);
        each(&acc);
    }
    Ok(acc)
}

/// Linear warm-up from `lr / warmup` to `lr`, then cosine decay to `min_lr`.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl Schedule {
    pub fn at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let t = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        let s = Schedule { lr: 1.0, min_lr: 0.1, warmup_steps: 4, total_steps: 14 };
        assert_eq!(s.at(0), 0.25);
        assert_eq!(s.at(3), 1.0);
        assert!((s.at(4) - 1.0).abs() < 1e-12);
        assert!((s.at(9) - 0.55).abs() < 1e-12);
        assert!((s.at(14) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn top1_and_top5_counts() {
        let device = Default::default();
        let logits = Tensor::<NdArray, 2>::from_data([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]], &device);
        let labels = Tensor::<NdArray, 1, Int>::from_data([1, 2, 0], &device);
        assert_eq!(correct(logits.clone(), labels.clone(), 1), (1, 1));
        assert_eq!(correct(logits, labels, 2), (1, 2));
    }

    fn output(cls: [[f32; 3]; 2], dist: Option<[[f32; 3]; 2]>) -> VitOutput<NdArray> {
        let device = Default::default();
        VitOutput { cls: Tensor::from_data(cls, &device), dist: dist.map(|d| Tensor::from_data(d, &device)) }
    }

    #[test]
    fn classification_loss_is_cross_entropy_averaged_over_heads() {
        let out = output([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], Some([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]));
        let targets = targets_tensor::<NdArray>(crate::data::mix::soft_targets(&[0, 1], 3, 0.0, 1.0), 3, &Default::default());
        let ce = |z: [f64; 3], y: usize| -(z[y] - z.iter().map(|v| v.exp()).sum::<f64>().ln());
        let cls = (ce([2.0, 0.0, 0.0], 0) + ce([0.0, 1.0, 0.0], 1)) / 2.0;
        let dist = (ce([0.0; 3], 0) + ce([0.0, 1.0, 0.0], 1)) / 2.0;
        assert!((scalar(classification_loss(&out, targets)) - (cls + dist) / 2.0).abs() < 1e-6);
    }

    #[test]
    fn distillation_is_zero_against_itself_and_matches_heads_to_heads() {
        let a = output([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], Some([[0.0, 3.0, 0.0], [1.0, 1.0, 0.0]]));
        assert!(scalar(distillation_loss(&a, &a, 3.0)).abs() < 1e-7);
        // Swapping the teacher's heads makes it a different teacher.
        let swapped = VitOutput { cls: a.dist.clone().unwrap(), dist: Some(a.cls.clone()) };
        assert!(scalar(distillation_loss(&a, &swapped, 3.0)) > 1e-3);
    }

    #[test]
    fn nan_loss_names_the_step() {
        let err = check_finite(f64::NAN, "epoch 2, step 17", "lower lr").unwrap_err().to_string();
        assert!(err.contains("NaN at epoch 2, step 17\n  hint: lower lr"), "{err}");
    }
}
