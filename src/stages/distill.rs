//! `distill`: fine-tunes the compact model against the dense one (METHOD.md section 6): the
//! `train` loop with a required `teacher`, KL at temperature T on both heads plus
//! cross-entropy, and DeiT's fine-tuning recipe as defaults (RandAugment m9, Mixup 0.8, CutMix
//! 1.0, label smoothing 0.1, random erasing 0.25, AdamW with warm-up and cosine decay).

use anyhow::Result;
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use super::train::{self, TrainSettings};
use super::StageContext;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(transparent)]
pub struct DistillSettings(pub TrainSettings);

impl Default for DistillSettings {
    /// The reference recipe, with the learning rate scaled as `2e-4 * batch / 512`.
    fn default() -> Self {
        Self(TrainSettings {
            epochs: 300,
            batch_size: 128,
            lr: 2e-4 * 128.0 / 512.0,
            min_lr: 1e-6,
            warmup_epochs: 5.0,
            randaugment_ops: 2,
            randaugment_magnitude: 9.0,
            random_erasing: 0.25,
            mixup: 0.8,
            cutmix: 1.0,
            label_smoothing: 0.1,
            kd_weight: 1e5,
            temperature: 20.0,
            ..TrainSettings::default()
        })
    }
}

impl DistillSettings {
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut p = self.0.validate();
        if self.0.teacher.is_none() {
            p.push(("teacher".into(), "is required: the stage whose (dense) model the compact one learns from".into()));
        }
        p
    }
}

pub fn run<B: AutodiffBackend>(ctx: &StageContext<B>, s: &DistillSettings) -> Result<serde_json::Value> {
    if ctx.input.is_none() {
        anyhow::bail!("distill needs a model to fine-tune: give it an `input` stage (the prune stage)");
    }
    train::run(ctx, &s.0)
}
