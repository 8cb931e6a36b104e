//! `train`: trains the model from scratch (for when no checkpoint exists) or continues its
//! input's, with AdamW, linear warm-up + cosine decay, label smoothing, optional gradient
//! clipping, DeiT's augmentation (RandAugment, random erasing, Mixup/CutMix) as configured,
//! and distillation from a `teacher` stage's model when one is named (the `distill` stage is
//! this loop with the teacher required). It checkpoints after every epoch and resumes from
//! there when re-run.

use std::time::Instant;

use anyhow::Result;
use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use rand::SeedableRng;

use super::{at_least_one, non_negative, positive, Extras, KeyDoc, StageContext};
use crate::data::mix::Mixer;
use crate::data::randaugment::RandAugment;
use crate::data::Split;
use crate::model::{checkpoint, Model};
use crate::train::curves::{Curves, EpochRow};
use crate::train::optim::AdamW;
use crate::train::resume;
use crate::train::parallel::data_parallel;
use crate::train::{
    check_finite, classification_loss, correct, distillation_loss, forward_in, in_precision, scalar, shard_tensors, teacher_output, Precision,
    Schedule,
};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSettings {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_epochs: f64,
    pub weight_decay: f64,
    pub label_smoothing: f64,
    pub grad_clip: Option<f64>,
    pub steps_per_epoch: Option<usize>,
    /// Validation top-1 every this many epochs and after the last (unset: never).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_every: Option<usize>,
    pub augment: bool,
    pub randaugment_ops: usize,
    pub randaugment_magnitude: f64,
    pub random_erasing: f64,
    pub mixup: f64,
    pub cutmix: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drop_path: Option<f64>,
    /// Forward and backward in `f16`/`bf16` on f32 master weights (unset: f32 throughout).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
    pub teacher: Option<String>,
    pub kd_weight: f64,
    pub temperature: f64,
}

pub const KEYS: &[KeyDoc] = &[
    ("epochs", "integer", "passes over the training split"),
    ("batch_size", "integer", "images per optimizer step"),
    ("lr", "float", "peak learning rate, reached after warm-up"),
    ("min_lr", "float", "learning rate at the end of the cosine decay"),
    ("warmup_epochs", "float", "linear warm-up length, in epochs"),
    ("weight_decay", "float", "AdamW's decoupled weight decay, as timm: none on biases, LayerNorms and the position/class/distillation tokens"),
    ("label_smoothing", "float", "label smoothing of the cross-entropy, in [0, 1)"),
    ("grad_clip", "float", "clip the global norm of all gradients to this, as timm (unset: no clipping)"),
    ("steps_per_epoch", "integer", "cap on optimizer steps per epoch, for quick runs (unset: the whole split)"),
    ("eval_every", "integer", "top-1 on the validation split every this many epochs and after the last, into the curves (unset: never)"),
    ("augment", "bool", "random-resized crop and flips (else the evaluation transform)"),
    ("randaugment_ops", "integer", "RandAugment operations per image (0: off); needs augment"),
    ("randaugment_magnitude", "float", "RandAugment magnitude in [0, 10] (DeiT: 9)"),
    ("random_erasing", "float", "probability of erasing a random rectangle of an image; needs augment"),
    ("mixup", "float", "Mixup's Beta parameter (0: off)"),
    ("cutmix", "float", "CutMix's Beta parameter (0: off); with mixup too, each batch picks one"),
    ("drop_path", "float", "stochastic depth rate of the last block while training (unset: the model's own)"),
    ("precision", "string", "mixed precision on GPUs: `bf16` or `f16` compute on f32 master weights (unset: f32)"),
    ("teacher", "string", "a stage whose model the student distills from (unset: labels only)"),
    ("kd_weight", "float", "weight of the distillation loss against the teacher"),
    ("temperature", "float", "distillation temperature T"),
];

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            epochs: 10,
            batch_size: 128,
            lr: 5e-4,
            min_lr: 1e-5,
            warmup_epochs: 1.0,
            weight_decay: 0.05,
            label_smoothing: 0.1,
            grad_clip: None,
            steps_per_epoch: None,
            eval_every: None,
            augment: true,
            randaugment_ops: 0,
            randaugment_magnitude: 9.0,
            random_erasing: 0.0,
            mixup: 0.0,
            cutmix: 0.0,
            drop_path: None,
            precision: None,
            teacher: None,
            kd_weight: 1e5,
            temperature: 3.0,
        }
    }
}

impl TrainSettings {
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        at_least_one(&mut p, &[("epochs", self.epochs), ("batch_size", self.batch_size)]);
        positive(&mut p, "lr", self.lr);
        if !(self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            p.push(("min_lr".into(), format!("must be in [0, lr = {}], got {}", self.lr, self.min_lr)));
        }
        non_negative(&mut p, "warmup_epochs", self.warmup_epochs);
        non_negative(&mut p, "weight_decay", self.weight_decay);
        if !(0.0..1.0).contains(&self.label_smoothing) {
            p.push(("label_smoothing".into(), format!("must be in [0, 1), got {}", self.label_smoothing)));
        }
        if let Some(c) = self.grad_clip {
            positive(&mut p, "grad_clip", c);
        }
        for (key, n) in [("steps_per_epoch", self.steps_per_epoch), ("eval_every", self.eval_every)] {
            if let Some(n) = n {
                at_least_one(&mut p, &[(key, n)]);
            }
        }
        if self.randaugment_ops > 16 {
            p.push(("randaugment_ops".into(), format!("must be from 0 to 16 (timm's recipe: 2), got {}", self.randaugment_ops)));
        }
        if !(0.0..=10.0).contains(&self.randaugment_magnitude) {
            p.push(("randaugment_magnitude".into(), format!("must be in [0, 10], got {}", self.randaugment_magnitude)));
        }
        if !(0.0..=1.0).contains(&self.random_erasing) {
            p.push(("random_erasing".into(), format!("must be a probability in [0, 1], got {}", self.random_erasing)));
        }
        if !self.augment {
            for (key, on) in [("randaugment_ops", self.randaugment_ops > 0), ("random_erasing", self.random_erasing > 0.0)] {
                if on {
                    p.push((key.into(), "is an image augmentation but augment = false\n  hint: set augment = true or turn it off".into()));
                }
            }
        }
        if let Some(d) = self.drop_path {
            if !(0.0..1.0).contains(&d) {
                p.push(("drop_path".into(), format!("must be in [0, 1), got {d}")));
            }
        }
        non_negative(&mut p, "mixup", self.mixup);
        non_negative(&mut p, "cutmix", self.cutmix);
        non_negative(&mut p, "kd_weight", self.kd_weight);
        positive(&mut p, "temperature", self.temperature);
        p
    }

    fn extras(&self) -> Option<Extras> {
        let randaugment = (self.randaugment_ops > 0)
            .then_some(RandAugment { ops: self.randaugment_ops, magnitude: self.randaugment_magnitude as f32 });
        self.augment.then_some(Extras { randaugment, erasing: self.random_erasing as f32 })
    }
}

/// What survives a killed run: written after each epoch, `state.json` last.
#[derive(Serialize, Deserialize)]
struct CheckpointState {
    epochs_done: usize,
    /// Mean training loss of each epoch so far.
    epoch_losses: Vec<f64>,
    last_accuracy: f64,
    /// Every epoch's row of the curves, so that a resumed run's hold the epochs before.
    #[serde(default)]
    curves: Vec<EpochRow>,
}

pub fn run<B: AutodiffBackend>(ctx: &StageContext<B>, s: &TrainSettings) -> Result<serde_json::Value> {
    let device = ctx.device();
    let seed = ctx.seed;
    B::seed(device, seed);
    let mut model: Model<B> = match ctx.input_model::<B>(device)? {
        Some(model) => model,
        None => {
            let classes = ctx.open(Split::Train)?.num_classes();
            ctx.model.resolve(classes)?.init(device)
        }
    };
    if let Some(rate) = s.drop_path {
        model = model.with_drop_path(rate);
    }
    let config = model.config();
    let teacher: Option<Model<B::InnerBackend>> = s.teacher.as_deref().map(|name| ctx.stage_model(name, device)).transpose()?;
    if let Some(t) = &teacher {
        if t.config().num_classes() != config.num_classes() {
            anyhow::bail!(
                "teacher `{}` predicts {} classes but the model {}",
                s.teacher.as_deref().unwrap_or_default(),
                t.config().num_classes(),
                config.num_classes()
            );
        }
    }
    let half = s.precision.map(|p| p.compute_dtype::<B>(&ctx.devices)).transpose()?.flatten();
    // One replica of the teacher per device, made once (in the compute precision): the
    // student's are made every step.
    let teachers: Vec<Option<Model<B::InnerBackend>>> =
        ctx.devices.iter().map(|d| teacher.clone().map(|t| in_precision(t.to_device(d), half))).collect();
    let mixer = Mixer { mixup: s.mixup, cutmix: s.cutmix, label_smoothing: s.label_smoothing, classes: config.num_classes() };
    let loader = ctx.loader(Split::Train, &config, s.batch_size, true, s.extras())?;
    let steps_per_epoch = s.steps_per_epoch.map_or(loader.batches_per_epoch(), |c| c.min(loader.batches_per_epoch()));
    if steps_per_epoch == 0 {
        anyhow::bail!(
            "the training split has {} images, fewer than one batch of {}\n  hint: lower batch_size",
            loader.dataset().len(),
            s.batch_size
        );
    }
    let schedule = Schedule {
        lr: s.lr,
        min_lr: s.min_lr,
        warmup_steps: (s.warmup_epochs * steps_per_epoch as f64).round() as usize,
        total_steps: s.epochs * steps_per_epoch,
    };
    let mut optim = AdamW::<B>::new(s.weight_decay, s.grad_clip);
    // Opened before the first epoch, so that a missing validation split stops the stage now.
    let val_loader = match s.eval_every {
        Some(_) if ctx.writes() => Some(ctx.loader(Split::Val, &config, s.batch_size, false, None)?),
        _ => None,
    };

    let ckpt = ctx.dir.join("checkpoint");
    let mut start_epoch = 0;
    let (mut epoch_losses, mut last_accuracy, mut rows) = (Vec::new(), f64::NAN, Vec::new());
    let (restored, restored_optim) = resume::load::<B, CheckpointState>(&ckpt, &model, optim, device, |w| ctx.warn(&w));
    optim = restored_optim;
    if let Some((m, state)) = restored {
        model = m;
        start_epoch = state.epochs_done;
        (epoch_losses, last_accuracy, rows) = (state.epoch_losses, state.last_accuracy, state.curves);
        ctx.log.info(&format!("{}: resuming after epoch {start_epoch} of {}", ctx.spec.name, s.epochs));
    }

    let curves_dir = ctx.writes().then(|| ctx.log.run_dir().map(|d| d.join(&ctx.spec.name))).flatten();
    let mut curves = Curves::new(curves_dir, rows)?;
    let mut progress = ctx.log.progress(&ctx.spec.name, (s.epochs * steps_per_epoch) as u64);
    progress.set_position((start_epoch * steps_per_epoch) as u64);
    let started = Instant::now();
    let mut images_seen = 0usize;
    for epoch in start_epoch..s.epochs {
        let (mut loss_sum, mut hits, mut seen) = (0.0, 0usize, 0usize);
        let epoch_started = Instant::now();
        for (i, batch) in loader.epoch(epoch as u64).into_iter().take(steps_per_epoch).enumerate() {
            let step = epoch * steps_per_epoch + i;
            let mut batch = batch?;
            crate::interrupt::check()?;
            // Seeded by the step, so a resumed run mixes as an uninterrupted one would.
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let targets = mixer.apply(&mut batch, &mut rng);
            let n = batch.labels.len();
            let step_result = data_parallel(&model, &ctx.team(), n, teachers.clone(), |replica, range, teacher, weight| {
                let (images, labels, targets) = shard_tensors::<B>(&batch, &targets, range, &replica.device());
                // Casting the f32 parameters is part of the graph: their gradients come back in f32.
                let output = forward_in(replica, images.clone(), half);
                let mut loss = classification_loss(&output, targets);
                if let Some(teacher) = &teacher {
                    let taught = teacher_output::<B>(teacher, &images, half);
                    loss = loss + distillation_loss(&output, &taught, s.temperature).mul_scalar(s.kd_weight);
                }
                let weighted = loss.mul_scalar(weight);
                let (top1, _) = correct(output.logits().inner(), labels.inner(), 1);
                (scalar(weighted.clone()), weighted.backward(), top1)
            })?;
            let loss_value = step_result.loss;
            check_finite(
                loss_value,
                &format!("epoch {}, step {}", epoch + 1, i + 1),
                &format!("lower stages.{0}.lr or set stages.{0}.grad_clip", ctx.spec.name),
            )?;
            model = optim.step(schedule.at(step), model, step_result.grads);
            let top1 = step_result.total;
            loss_sum += loss_value * n as f64;
            hits += top1;
            seen += n;
            images_seen += n;
            let rate = images_seen as f64 / started.elapsed().as_secs_f64();
            progress.step(&format!("epoch {} loss {loss_value:.4} acc {:.3} {rate:.0} img/s", epoch + 1, hits as f64 / seen as f64));
        }
        if seen == 0 {
            anyhow::bail!(
                "epoch {} gave no batch: all {} images it read were unreadable and skipped (on_bad_image = \"skip\"; the training split has {}, and a short last batch is not read)",
                epoch + 1,
                loader.skipped(),
                loader.dataset().len()
            );
        }
        let last_loss = loss_sum / seen as f64;
        last_accuracy = hits as f64 / seen as f64;
        epoch_losses.push(last_loss);
        let images_per_s = seen as f64 / epoch_started.elapsed().as_secs_f64();
        let val_top1 = match (&val_loader, s.eval_every) {
            (Some(loader), Some(k)) if (epoch + 1) % k == 0 || epoch + 1 == s.epochs => {
                let a = crate::train::accuracy(&model.valid(), loader, device, |_| {})?;
                Some(a.top1 as f64 / a.seen.max(1) as f64)
            }
            _ => None,
        };
        let val = val_top1.map(|v| format!(" val top1 {v:.4}")).unwrap_or_default();
        progress.println(&format!(
            "{}: epoch {}/{} loss {last_loss:.4} train acc {last_accuracy:.4}{val}",
            ctx.spec.name,
            epoch + 1,
            s.epochs
        ));
        let lr = schedule.at((epoch + 1) * steps_per_epoch - 1);
        curves.push(EpochRow { epoch: epoch + 1, train_loss: last_loss, train_top1: last_accuracy, lr, images_per_s, val_top1 })?;
        if ctx.writes() {
            let state = CheckpointState { epochs_done: epoch + 1, epoch_losses: epoch_losses.clone(), last_accuracy, curves: curves.rows().to_vec() };
            resume::save(&ckpt, &model, &optim, &state)?;
        }
    }
    progress.finish();
    if loader.skipped() > 0 {
        ctx.log.info(&format!("{}: skipped {} unreadable images", ctx.spec.name, loader.skipped()));
    }
    // The checkpoint stays until the runner has committed the entry: a kill before then
    // resumes from it.
    if ctx.writes() {
        checkpoint::save(&model.valid(), &checkpoint::model_dir(&ctx.dir))?;
    }
    Ok(serde_json::json!({
        "epochs": s.epochs,
        "steps": s.epochs * steps_per_epoch,
        "epoch_losses": epoch_losses,
        "final_train_accuracy": last_accuracy,
        // The curves without images/s, a measurement of the moment: an entry's metrics are
        // the same however often it is rebuilt.
        "epoch_top1": curves.rows().iter().map(|r| r.train_top1).collect::<Vec<_>>(),
        "epoch_lr": curves.rows().iter().map(|r| r.lr).collect::<Vec<_>>(),
        "val_top1": curves.rows().iter().filter_map(|r| r.val_top1.map(|v| (r.epoch, v))).collect::<Vec<_>>(),
        "skipped_images": loader.skipped(),
    }))
}
