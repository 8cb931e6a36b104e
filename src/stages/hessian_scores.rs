//! `hessian_scores`: the saliency of every unit of every structure (METHOD.md section 3),
//! averaged over `batches` minibatches, written as `scores.csv` (`structure,block,unit,score`).

use anyhow::Result;
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use super::{at_least_one, positive, Extras, KeyDoc, StageContext};
use crate::data::Split;
use crate::files::atomic_write;
use crate::prune::saliency::{gate_gradients, rng, score, scored_loss};
use crate::prune::{Criterion, Masks, Normalizers, Structure};
use crate::train::parallel::data_parallel;
use crate::train::{check_finite, scalar, to_tensors};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HessianScoresSettings {
    pub criterion: Criterion,
    pub batches: usize,
    pub batch_size: usize,
    pub split: Split,
    pub shuffle: bool,
    pub augment: bool,
    pub normalizer_emb: Option<f64>,
    pub normalizer_head: f64,
    pub normalizer_qk: f64,
    pub normalizer_v: f64,
    pub normalizer_mlp: f64,
}

pub const KEYS: &[KeyDoc] = &[
    ("criterion", "string", "`hessian`, `taylor`, `magnitude`, `weight-fisher` or `random`"),
    ("batches", "integer", "minibatches the scores are averaged over"),
    ("batch_size", "integer", "images per minibatch"),
    ("split", "string", "`train` or `val`"),
    ("shuffle", "bool", "read the split in a seeded random order (false: in file order; with augment false the scores are then deterministic)"),
    ("augment", "bool", "training transforms (else the evaluation transform)"),
    ("normalizer_emb", "float", "c for EMB units (unset: the number of blocks)"),
    ("normalizer_head", "float", "c for heads"),
    ("normalizer_qk", "float", "c for query/key dims"),
    ("normalizer_v", "float", "c for value dims"),
    ("normalizer_mlp", "float", "c for MLP hidden units"),
];

impl Default for HessianScoresSettings {
    fn default() -> Self {
        let n = Normalizers::default();
        Self {
            criterion: Criterion::Hessian,
            batches: 10,
            batch_size: 64,
            split: Split::Train,
            shuffle: true,
            augment: true,
            normalizer_emb: n.emb,
            normalizer_head: n.head,
            normalizer_qk: n.qk,
            normalizer_v: n.v,
            normalizer_mlp: n.mlp,
        }
    }
}

impl HessianScoresSettings {
    pub fn normalizers(&self) -> Normalizers {
        Normalizers { emb: self.normalizer_emb, head: self.normalizer_head, qk: self.normalizer_qk, v: self.normalizer_v, mlp: self.normalizer_mlp }
    }

    pub fn validate(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        at_least_one(&mut p, &[("batches", self.batches), ("batch_size", self.batch_size)]);
        if let Some(c) = self.normalizer_emb {
            positive(&mut p, "normalizer_emb", c);
        }
        for (key, c) in [("normalizer_head", self.normalizer_head), ("normalizer_qk", self.normalizer_qk), ("normalizer_v", self.normalizer_v), ("normalizer_mlp", self.normalizer_mlp)] {
            positive(&mut p, key, c);
        }
        p
    }
}

pub fn run<B: AutodiffBackend>(ctx: &StageContext<B>, s: &HessianScoresSettings) -> Result<serde_json::Value> {
    let device = ctx.device();
    let Some(model) = ctx.input_model::<B>(device)? else {
        anyhow::bail!("hessian_scores needs a model: give it an `input` stage");
    };
    // Scores are taken in evaluation mode: no stochastic depth.
    let model = model.without_drop_path();
    let loader = ctx.loader(s.split, &model.config(), s.batch_size, s.shuffle, s.augment.then(Extras::default))?;
    let normalizers = s.normalizers();
    let mut random = rng(ctx.seed);
    let mut total = Masks::filled(&model.config(), 0.0);
    let mut progress = ctx.log.progress(&ctx.spec.name, s.batches as u64);
    let (mut done, mut loss_sum, mut epoch) = (0usize, 0.0, 0u64);
    while done < s.batches {
        let before = done;
        for batch in loader.epoch(epoch) {
            let batch = batch?;
            let per_device = vec![(); ctx.devices.len()];
            let step = data_parallel(&model, &ctx.team(), batch.labels.len(), per_device, |replica, range, (), weight| {
                let (images, labels) = to_tensors::<B>(batch.slice(range), &replica.device());
                let (loss, grads, sums) = gate_gradients(replica, |m| scored_loss(m, images, labels).mul_scalar(weight));
                (scalar(loss), grads, sums)
            })?;
            let value = step.loss;
            check_finite(value, &format!("batch {}", done + 1), "the model's loss is not finite on this data: check the input stage's model")?;
            // Gate gradients of the shards' (and ranks') weighted losses add up to the full batch's.
            let (sums, grads) = (step.total, step.grads);
            let scores = score(s.criterion, &model, &sums, &grads, &normalizers, &mut random);
            total.add(&scores);
            loss_sum += value;
            done += 1;
            progress.step(&format!("loss {value:.4}"));
            if done == s.batches {
                break;
            }
        }
        if done == before {
            anyhow::bail!("the {:?} split gave no batch of {}", s.split, s.batch_size);
        }
        epoch += 1;
    }
    progress.finish();
    total.scale(1.0 / done as f32);
    if ctx.writes() {
        atomic_write(&ctx.dir.join("scores.csv"), scores_csv(&total).as_bytes())?;
        atomic_write(&ctx.dir.join("scores.json"), &serde_json::to_vec(&total)?)?;
    }
    Ok(serde_json::json!({ "criterion": s.criterion, "batches": done, "mean_loss": loss_sum / done as f64 }))
}

/// `structure,block,unit,score`; `block` is empty for EMB, shared by all blocks. A model of
/// several streams (a Swin's stages) leads with a `stage` column, EMB's rows naming theirs.
pub fn scores_csv(scores: &Masks) -> String {
    let staged = scores.emb.len() > 1;
    let mut out = String::from(if staged { "stage,structure,block,unit,score\n" } else { "structure,block,unit,score\n" });
    let stage = |g: usize| if staged { format!("{g},") } else { String::new() };
    for (g, emb) in scores.emb.iter().enumerate() {
        for (u, v) in emb.iter().enumerate() {
            out.push_str(&format!("{}emb,,{u},{v:e}\n", stage(g)));
        }
    }
    for (b, units) in scores.blocks.iter().enumerate() {
        for s in [Structure::Head, Structure::Qk, Structure::V, Structure::Mlp] {
            for (u, v) in scores.get(s, b).iter().enumerate() {
                out.push_str(&format!("{}{},{b},{u},{v:e}\n", stage(units.stage), s.name()));
            }
        }
    }
    out
}
