//! How a whole model is timed, the same way wherever a speedup is reported (`evaluate`'s
//! throughput and paired speedup, `prune`'s `stop_on = "measured"`, `runner bench latency`):
//! forward passes of one batch of random images, each waited for, with the machine's
//! measuring lock held. The data pipeline is not what is being measured.

use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};

use super::{Model, ModelConfig};
use crate::machine::Ratio;

pub struct Timing<B: Backend> {
    images: Tensor<B, 4>,
    device: B::Device,
}

impl<B: Backend> Timing<B> {
    /// `batch` random images of the size and channels `config` takes.
    pub fn new(config: &ModelConfig, batch: usize, device: &B::Device) -> Self {
        let shape = [batch, config.in_chans(), config.image_size(), config.image_size()];
        Self { images: Tensor::random(shape, Distribution::Default, device), device: device.clone() }
    }

    fn pass(&self, model: &Model<B>) {
        let _ = model.forward(self.images.clone()).logits().into_data();
        let _ = B::sync(&self.device);
    }

    /// The median seconds of a forward pass of `model` over `repeats`, after `warmup`.
    pub fn median(&self, model: &Model<B>, warmup: usize, repeats: usize) -> f64 {
        let _alone = crate::machine::measuring();
        crate::machine::median_time(warmup, repeats, || self.pass(model))
    }

    /// `a`'s latency as a fraction of `b`'s, timed alternately in `pairs` pairs after `warmup`
    /// of each ([`crate::machine::paired_ratio`]).
    pub fn paired(&self, a: &Model<B>, b: &Model<B>, warmup: usize, pairs: usize) -> Ratio {
        let _alone = crate::machine::measuring();
        crate::machine::paired_ratio(warmup, pairs, || self.pass(a), || self.pass(b))
    }
}
