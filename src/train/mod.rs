//! The pieces of a training loop that stages share: batches as tensors, the classification
//! loss on one or both heads, the learning-rate schedule, and checks that stop a diverging run.

use anyhow::{bail, Result};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};

use crate::data::Batch;
use crate::model::VitOutput;

/// A loader batch on `device`: images `[batch, channels, size, size]` and labels `[batch]`.
pub fn to_tensors<B: Backend>(batch: Batch, device: &B::Device) -> (Tensor<B, 4>, Tensor<B, 1, Int>) {
    let n = batch.labels.len();
    let images = crate::model::float_tensor(batch.images, batch.shape, device);
    let labels = Tensor::from_data(TensorData::new(batch.labels, [n]), device);
    (images, labels)
}

/// Cross-entropy with label smoothing; for a distilled model without a teacher both heads
/// learn the labels and their losses are averaged.
pub fn classification_loss<B: Backend>(output: VitOutput<B>, labels: Tensor<B, 1, Int>, smoothing: f64) -> Tensor<B, 1> {
    let device = labels.device();
    let smoothing = (smoothing > 0.0).then_some(smoothing as f32);
    let ce = CrossEntropyLossConfig::new().with_smoothing(smoothing).init(&device);
    match output.dist {
        Some(dist) => (ce.forward(output.cls, labels.clone()) + ce.forward(dist, labels)).div_scalar(2.0),
        None => ce.forward(output.cls, labels),
    }
}

/// Stops the stage on a NaN or infinite loss, naming where it happened.
pub fn check_finite(loss: f64, epoch: usize, step: usize) -> Result<()> {
    if !loss.is_finite() {
        bail!("the loss became {loss} at epoch {epoch}, step {step}\n  hint: lower the learning rate or set grad_clip");
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

    #[test]
    fn nan_loss_names_the_step() {
        let err = check_finite(f64::NAN, 2, 17).unwrap_err().to_string();
        assert!(err.contains("NaN at epoch 2, step 17"), "{err}");
    }
}
