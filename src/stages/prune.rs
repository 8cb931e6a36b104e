//! `prune`: NViT's iterative global pruning (METHOD.md section 5). The model keeps training
//! (AdamW, distillation from the dense input model) while saliencies accumulate over
//! `interval` steps; then a pruning step masks what the selection chooses (`prune::greedy`:
//! NViT's global ranking of latency-adjusted groups, isomorphic ranking, uniform allocation;
//! `prune::exact`: the most saliency under a latency budget), and pruned units are kept at zero
//! after every optimizer step. It stops at `latency_target` x the dense latency (or
//! `max_prune_steps`), the last step landing within `latency_tolerance` under it, writes
//! `pruning_log.csv`, and compacts the model to its surviving widths. With `stop_on =
//! "measured"` the latency is the compact model's timed against the dense one in pairs
//! (`latency_measured.csv`): on the way down, to correct the table's estimate, and at the target.

use anyhow::{Context, Result};
use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use super::{at_least_one, non_negative, positive, Extras, KeyDoc, StageContext};
use crate::data::Split;
use crate::model::{checkpoint, Model};
use crate::files::atomic_write;
use crate::onnxruntime::{Clock, Provider, Runtime};
use crate::prune::saliency::{gate_gradients, rng, score};
use crate::prune::{compact, greedy, Criterion, Masks, ModelLatency, Normalizers, Structure};
use crate::data::mix::soft_targets;
use crate::train::optim::AdamW;
use crate::train::parallel::data_parallel;
use crate::train::resume;
use crate::train::{check_finite, classification_loss, distillation_loss, scalar, shard_tensors, teacher_output};

/// How pruning is spread over the network: NViT's global ranking, or the ablation's baseline.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Allocation {
    Global,
    Uniform,
}

/// Which groups a greedy step ranks against each other: all of the network's (NViT), or only
/// those of the same structure type (Isomorphic Pruning, [`crate::prune::greedy::prune_isomorphic`]).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Ranking {
    Global,
    Isomorphic,
}

/// How each pruning step picks what goes: NViT's ranking of latency-adjusted groups, or every
/// width chosen at once to keep the most saliency under the step's latency budget
/// ([`crate::prune::exact`]).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Selection {
    Greedy,
    Exact,
}

/// What ends the stage: the latency table's estimate reaching the target, or the compact model
/// measured against the dense one, in pairs, at or under it ([`measure`]).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StopOn {
    Estimated,
    Measured,
}

/// Budget steps of the exact selection's dynamic program: a choice can lose at most one
/// step, a thousandth of the budget, of latency per block to the rounding.
const EXACT_BINS: usize = 1000;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PruneSettings {
    pub latency: String,
    pub latency_target: f64,
    pub latency_tolerance: f64,
    pub stop_on: StopOn,
    pub measure_batch: usize,
    pub measure_pairs: usize,
    pub criterion: Criterion,
    pub allocation: Allocation,
    pub selection: Selection,
    pub ranking: Ranking,
    pub prune_steps: usize,
    pub uniform_step: f64,
    pub isomorphic_step: f64,
    pub interval: usize,
    pub ema: f64,
    pub eta: f64,
    pub groups_per_step: usize,
    pub group_emb: usize,
    pub group_head: usize,
    pub group_qk: usize,
    pub group_v: usize,
    pub group_mlp: usize,
    pub max_prune_steps: usize,
    pub checkpoint_every: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub kd_weight: f64,
    pub temperature: f64,
    pub augment: bool,
    pub runtime: Runtime,
    pub onnxruntime_provider: Provider,
}

pub const KEYS: &[KeyDoc] = &[
    ("latency", "string", "the profile_latency stage whose table estimates latency"),
    ("latency_target", "float", "stop once the latency is at most this fraction of the dense model's, in (0, 1]"),
    ("latency_tolerance", "float", "how far under latency_target the last pruning step may land, as a fraction of the target: it takes part of a group, or another group, rather than overshoot (in [0, 0.5))"),
    ("stop_on", "string", "`estimated` (the latency table's estimate reaches the target) or `measured` (the compact model timed against the dense one in pairs, on the way down and at the target; the estimate's target is corrected by what was measured)"),
    ("measure_batch", "integer", "with stop_on = \"measured\": images per timed forward pass"),
    ("measure_pairs", "integer", "with stop_on = \"measured\": timed pairs of passes per measurement; the median ratio counts"),
    ("criterion", "string", "`hessian`, `taylor`, `magnitude`, `weight-fisher` or `random`"),
    ("allocation", "string", "`global` (one ranking of all groups of the network) or `uniform` (the same fraction of every structure in every block)"),
    ("selection", "string", "`greedy` (prune the lowest latency-adjusted groups, NViT) or `exact` (every width chosen to keep the most saliency under the step's latency budget)"),
    ("ranking", "string", "with greedy selection: `global` (every group of the network ranked together, NViT) or `isomorphic` (groups ranked only against their own structure type, each type losing the same fraction per step)"),
    ("prune_steps", "integer", "with exact selection: pruning steps over which the budget falls from the dense latency to latency_target"),
    ("uniform_step", "float", "with uniform allocation: the fraction of each original width removed per pruning step"),
    ("isomorphic_step", "float", "with isomorphic ranking: the fraction of each structure type's remaining units pruned per pruning step (after k steps a type keeps (1 - isomorphic_step)^k of its units, to the nearest group)"),
    ("interval", "integer", "optimizer steps between pruning steps (saliencies accumulate over them)"),
    ("ema", "float", "momentum of the moving average of saliencies across intervals (0: none)"),
    ("eta", "float", "weight of the latency saved, in seconds, subtracted from each saliency"),
    ("groups_per_step", "integer", "groups pruned at each pruning step"),
    ("group_emb", "integer", "EMB units per group"),
    ("group_head", "integer", "heads per group"),
    ("group_qk", "integer", "query/key dims per group"),
    ("group_v", "integer", "value dims per group"),
    ("group_mlp", "integer", "MLP units per group"),
    ("max_prune_steps", "integer", "cap on pruning steps; stopping there short of the target is a warning, and the tables show the latency reached"),
    ("checkpoint_every", "integer", "pruning steps between checkpoints a killed run resumes from (not part of the cache key)"),
    ("batch_size", "integer", "images per optimizer step"),
    ("lr", "float", "AdamW learning rate while pruning"),
    ("weight_decay", "float", "AdamW weight decay while pruning (as timm: none on biases, LayerNorms, tokens)"),
    ("kd_weight", "float", "weight of the distillation loss against the dense model"),
    ("temperature", "float", "distillation temperature T"),
    ("augment", "bool", "training transforms (else the evaluation transform)"),
    crate::stages::profile_latency::RUNTIME_KEY,
    crate::stages::profile_latency::PROVIDER_KEY,
];

impl Default for PruneSettings {
    fn default() -> Self {
        Self {
            latency: String::new(),
            latency_target: 0.5,
            latency_tolerance: 0.02,
            stop_on: StopOn::Estimated,
            measure_batch: 64,
            measure_pairs: 40,
            criterion: Criterion::Hessian,
            allocation: Allocation::Global,
            selection: Selection::Greedy,
            ranking: Ranking::Global,
            prune_steps: 10,
            uniform_step: 0.05,
            isomorphic_step: 0.05,
            interval: 100,
            ema: 0.9,
            eta: 5e-4,
            groups_per_step: 2,
            group_emb: 16,
            group_head: 2,
            group_qk: 8,
            group_v: 8,
            group_mlp: 16,
            max_prune_steps: 1000,
            checkpoint_every: 5,
            batch_size: 64,
            lr: 1e-4,
            weight_decay: 0.05,
            kd_weight: 1e5,
            temperature: 3.0,
            augment: true,
            runtime: Runtime::Backend,
            onnxruntime_provider: Provider::Cpu,
        }
    }
}

impl PruneSettings {
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if self.latency.is_empty() {
            p.push(("latency".into(), "is required: the name of a profile_latency stage".into()));
        }
        if !(self.latency_target > 0.0 && self.latency_target <= 1.0) {
            p.push(("latency_target".into(), format!("must be in (0, 1], got {}", self.latency_target)));
        }
        if !(0.0..1.0).contains(&self.ema) {
            p.push(("ema".into(), format!("must be in [0, 1), got {}", self.ema)));
        }
        if !(0.0..0.5).contains(&self.latency_tolerance) {
            p.push(("latency_tolerance".into(), format!("must be in [0, 0.5), got {}", self.latency_tolerance)));
        }
        non_negative(&mut p, "eta", self.eta);
        super::repetitions(&mut p, &[("measure_pairs", self.measure_pairs, 1)]);
        if self.runtime != Runtime::Backend && self.stop_on == StopOn::Estimated {
            p.push(("runtime".into(), "times the measured stop, and stop_on = \"estimated\" times nothing (the latency table's runtime decides the estimate)\n  hint: set stop_on = \"measured\", or leave runtime unset".into()));
        }
        if self.selection == Selection::Exact && self.allocation == Allocation::Uniform {
            p.push(("selection".into(), "`exact` chooses every width itself: it cannot be combined with allocation = \"uniform\"".into()));
        }
        if self.ranking == Ranking::Isomorphic && self.selection == Selection::Exact {
            p.push(("ranking".into(), "`isomorphic` ranks groups for a greedy step: it cannot be combined with selection = \"exact\"".into()));
        }
        if self.ranking == Ranking::Isomorphic && self.allocation == Allocation::Uniform {
            p.push(("ranking".into(), "`isomorphic` ranks groups across blocks: it cannot be combined with allocation = \"uniform\"".into()));
        }
        for (key, step) in [("uniform_step", self.uniform_step), ("isomorphic_step", self.isomorphic_step)] {
            if !(step > 0.0 && step < 1.0) {
                p.push((key.into(), format!("must be in (0, 1), got {step}")));
            }
        }
        at_least_one(
            &mut p,
            &[
                ("interval", self.interval),
                ("groups_per_step", self.groups_per_step),
                ("prune_steps", self.prune_steps),
                ("group_emb", self.group_emb),
                ("group_head", self.group_head),
                ("group_qk", self.group_qk),
                ("group_v", self.group_v),
                ("group_mlp", self.group_mlp),
                ("max_prune_steps", self.max_prune_steps),
                ("checkpoint_every", self.checkpoint_every),
                ("batch_size", self.batch_size),
                ("measure_batch", self.measure_batch),
            ],
        );
        positive(&mut p, "lr", self.lr);
        positive(&mut p, "temperature", self.temperature);
        non_negative(&mut p, "kd_weight", self.kd_weight);
        non_negative(&mut p, "weight_decay", self.weight_decay);
        p
    }

    fn group_size(&self, s: Structure) -> usize {
        match s {
            Structure::Emb => self.group_emb,
            Structure::Head => self.group_head,
            Structure::Qk => self.group_qk,
            Structure::V => self.group_v,
            Structure::Mlp => self.group_mlp,
        }
    }
}

/// Whether the latency is down to the target: a choice made to fit a budget of exactly the
/// target can land a rounding error above it.
fn reached(ratio: f64, target: f64) -> bool {
    ratio <= target * (1.0 + 1e-9)
}

/// The closed loop of `stop_on = "measured"`: what the measurements so far taught about the
/// latency table on this model.
#[derive(Serialize, Deserialize, Clone)]
struct Measured {
    /// Measured over estimated ratio, at the last measurement: the estimate's target is
    /// `latency_target / correction`.
    correction: f64,
    /// The corrected estimate at which to measure next: halfway from the last measurement to
    /// the target, so the correction is learned before the target, not after an overshoot.
    next_at: f64,
    /// The last measurement.
    last: Option<crate::machine::Ratio>,
    /// `latency_measured.csv` so far.
    log: String,
}

impl Measured {
    fn new(target: f64) -> Self {
        Self { correction: 1.0, next_at: (1.0 + target) / 2.0, last: None, log: String::from("step,prune_step,est_ratio,measured_ratio,measured_min,measured_max,pairs,correction,runtime\n") }
    }
}

/// The compact model of `student` under `masks` against `dense`, timed on `clock`
/// alternately in pairs of forward passes of `batch` random images: its latency as a fraction
/// of dense's.
fn measure<B: AutodiffBackend>(clock: &Clock, dense: &Model<B::InnerBackend>, student: &Model<B>, masks: &Masks, batch: usize, pairs: usize, device: &B::Device) -> Result<crate::machine::Ratio> {
    let small = compact(&student.valid(), masks, device)?;
    clock.paired(&small, dense, batch, 2, pairs, device)
}

/// Progress in per mille of the latency to remove, which is what ends the stage (not the
/// `max_prune_steps` cap, which a run rarely reaches): the bar's ETA then means something.
fn latency_removed(ratio: f64, target: f64) -> u64 {
    (((1.0 - ratio) / (1.0 - target).max(1e-9)).clamp(0.0, 1.0) * 1000.0).round() as u64
}

/// What a killed prune resumes from (with the student and AdamW's moments), written every
/// `checkpoint_every` pruning steps and when the run is stopped by a signal.
#[derive(Serialize, Deserialize)]
struct PruneState {
    step: usize,
    prune_step: usize,
    epoch: u64,
    /// Batches of `epoch` already trained on.
    batch: usize,
    masks: Masks,
    interval_sum: Masks,
    smoothed: Option<Masks>,
    /// `pruning_log.csv` so far.
    log: String,
    ratio: f64,
    last_loss: f64,
    /// With `stop_on = "measured"`.
    #[serde(default)]
    measured: Option<Measured>,
}

/// The saliency a pruning step ranks by: the interval's mean of the per-batch scores,
/// smoothed with the previous steps' by `ema` (resets `interval_sum`).
fn interval_saliency(state: &mut PruneState, s: &PruneSettings, config: &crate::model::ModelConfig) -> Masks {
    let mut avg = std::mem::replace(&mut state.interval_sum, Masks::filled(config, 0.0));
    avg.scale(1.0 / s.interval as f32);
    match state.smoothed.take() {
        Some(mut prev) if s.ema > 0.0 => {
            prev.scale(s.ema as f32);
            avg.scale(1.0 - s.ema as f32);
            prev.add(&avg);
            prev
        }
        _ => avg,
    }
}

/// One pruning step's selection by the saliency `current`, as the settings choose it (exact,
/// greedy global or isomorphic, uniform), toward the estimated latency `target` (a fraction of
/// dense): narrows `state.masks`. True when nothing is left to prune.
fn select(s: &PruneSettings, current: &Masks, state: &mut PruneState, table: &ModelLatency, config: &crate::model::ModelConfig, dense_latency: f64, target: f64) -> bool {
    let ratio_of = |m: &Masks| table.model_latency(&m.surviving(config)) / dense_latency;
    let landing = greedy::Landing { target, tolerance: s.latency_tolerance, ratio: &ratio_of };
    match (s.selection, s.allocation, s.ranking) {
        (Selection::Exact, ..) => {
            let done = ((state.prune_step + 1) as f64 / s.prune_steps as f64).min(1.0);
            let budget = dense_latency * (1.0 - done * (1.0 - target));
            // The last step lands within the tolerance (see `exact::select`'s floor).
            let floor = if done == 1.0 { budget * (1.0 - s.latency_tolerance) } else { 0.0 };
            match crate::prune::exact::select(&current, &state.masks, &table, budget, floor, |st| s.group_size(st), EXACT_BINS) {
                Some(kept) => {
                    state.masks = kept;
                    false
                }
                None => true, // the narrowest widths allowed are over the budget
            }
        }
        (Selection::Greedy, Allocation::Global, ranking) => {
            let ranked = greedy::groups(&current, &state.masks, &table, s.eta, |st| s.group_size(st));
            match ranking {
                Ranking::Global => greedy::prune_lowest(&ranked, &mut state.masks, s.groups_per_step, s.group_emb, &landing) == 0,
                Ranking::Isomorphic => {
                    let keep = (1.0 - s.isomorphic_step).powi(state.prune_step as i32 + 1);
                    let pruned = greedy::prune_isomorphic(&ranked, &mut state.masks, keep, s.group_emb, &landing);
                    // A step may round every type to nothing; the next one's target is lower.
                    pruned == 0 && !greedy::any_removable(&ranked, &state.masks, s.group_emb)
                }
            }
        }
        (Selection::Greedy, Allocation::Uniform, _) => {
            // Rounding may leave a step with nothing to prune; only an empty keep ends it.
            let keep = 1.0 - (state.prune_step + 1) as f64 * s.uniform_step;
            greedy::prune_uniform(&current, &mut state.masks, keep.max(0.0));
            keep <= 0.0
        }
    }
}

/// Why the pruning stopped, with a warning when it is short of the target or, measured, below
/// it by more than the tolerance.
fn warn_short_of_target<B: AutodiffBackend>(ctx: &StageContext<B>, s: &PruneSettings, reached: bool, exhausted: bool, ratio: f64, measured: Option<&Measured>) -> &'static str {
    let stopped_by = if reached {
        "reached the latency target"
    } else if exhausted {
        "nothing left to prune above the floors"
    } else {
        "max_prune_steps"
    };
    if !reached {
        let hint = if exhausted {
            "lower the group sizes (group_emb, group_head, group_qk, group_v, group_mlp): every group left would take a structure below its floor"
        } else {
            "raise max_prune_steps or groups_per_step"
        };
        let measured = measured.and_then(|m| m.last).map_or(String::new(), |r| format!(" (measured {:.3})", r.median));
        ctx.warn(&format!(
            "stopped by {stopped_by} at an estimated latency of {ratio:.3} of dense{measured}, short of latency_target = {}\n  hint: stages.{}: {hint}",
            s.latency_target, ctx.spec.name
        ));
    }
    let last = measured.and_then(|m| m.last);
    if let Some(r) = last.filter(|r| r.median < s.latency_target * (1.0 - s.latency_tolerance)) {
        ctx.warn(&format!(
            "measured {:.3} of dense, under latency_target = {} by more than latency_tolerance: the latency table overestimated this model's latency by more than the last steps could learn\n  hint: stages.{}: lower groups_per_step, or profile the table at measure_batch",
            r.median, s.latency_target, ctx.spec.name
        ));
    }
    stopped_by
}

pub fn run<B: AutodiffBackend>(ctx: &StageContext<B>, s: &PruneSettings) -> Result<serde_json::Value> {
    let device = ctx.device();
    let Some(dense) = ctx.input_model::<B>(device)? else {
        anyhow::bail!("prune needs a model: give it an `input` stage");
    };
    let table = ModelLatency::from_json(&ctx.stage_dir(&s.latency)?.join("latency.json"))
        .with_context(|| format!("reading the latency table of stage `{}`", s.latency))?;
    table.check(&dense.config()).with_context(|| format!("the latency table of stage `{}`", s.latency))?;
    // The student is in evaluation mode throughout: no stochastic depth.
    let mut student = dense.without_drop_path();
    let teacher: Model<B::InnerBackend> = student.valid();
    let teachers: Vec<Model<B::InnerBackend>> = ctx.devices.iter().map(|d| teacher.clone().to_device(d)).collect();
    let config = student.config();
    let narrowest = config.stages().iter().map(|(e, _)| *e).min().unwrap_or(0);
    if s.group_emb > narrowest {
        anyhow::bail!(
            "stages.{}.group_emb = {} is more than the {narrowest} channels of the model's narrowest embedding stream: no EMB group could ever be pruned\n  hint: lower group_emb (16 is the paper's for DeiT-B)",
            ctx.spec.name,
            s.group_emb
        );
    }
    let dense_latency = table.model_latency(&config);
    let loader = ctx.loader(Split::Train, &config, s.batch_size, true, s.augment.then(Extras::default))?;
    let normalizers = Normalizers::default();
    let seed = ctx.seed;

    let mut state = PruneState {
        step: 0,
        prune_step: 0,
        epoch: 0,
        batch: 0,
        masks: Masks::ones(&config),
        interval_sum: Masks::filled(&config, 0.0),
        smoothed: None,
        log: String::from("step,prune_step,est_latency_s,latency_ratio,params,flops,loss,embed_dim,widths\n"),
        ratio: 1.0,
        last_loss: f64::NAN,
        measured: (s.stop_on == StopOn::Measured).then(|| Measured::new(s.latency_target)),
    };
    // Loaded before the first step: a missing ONNX Runtime stops the stage at once.
    let clock = (s.stop_on == StopOn::Measured).then(|| Clock::new(s.runtime, s.onnxruntime_provider, format!("{} on {}", ctx.backend, ctx.device_name))).transpose()?;
    let runtime = crate::prune::latency_table::csv_field(&clock.as_ref().map(Clock::describe).unwrap_or_default());
    let ckpt = ctx.dir.join("checkpoint");
    let (restored, mut optim) = resume::load::<B, PruneState>(&ckpt, &student, AdamW::<B>::new(s.weight_decay, None), device, |w| ctx.warn(&w));
    if let Some((model, saved)) = restored {
        // The masks' LayerNorm statistics over surviving channels (`emb_alive`) are not
        // parameters, so the checkpoint does not hold them: they come from the masks again.
        (student, state) = (saved.masks.apply_trainable(model), saved);
        ctx.log.info(&format!("{}: resuming after pruning step {} (optimizer step {})", ctx.spec.name, state.prune_step, state.step));
    }
    let to_remove = |ratio: f64| latency_removed(ratio, s.latency_target);
    let mut progress = ctx.log.progress(&ctx.spec.name, 1000);
    progress.update(to_remove(state.ratio), "latency removed, per mille");
    let mut exhausted: bool;
    let target_met: bool;
    'outer: loop {
        let mut read = 0;
        // A run resumed after an epoch's last batch starts on an epoch with nothing left.
        let resumed_mid_epoch = state.batch > 0;
        for batch in loader.epoch_from(state.epoch, state.batch) {
            let batch = batch?;
            read += 1;
            let targets = soft_targets(&batch.labels, config.num_classes(), 0.0, 1.0);
            let result = data_parallel(&student, &ctx.team(), batch.labels.len(), teachers.clone(), |replica, range, teacher, weight| {
                let (images, _, targets) = shard_tensors::<B>(&batch, &targets, range, &replica.device());
                let taught = teacher_output::<B>(&teacher, &images, None);
                let (loss, grads, sums) = gate_gradients(replica, |m| {
                    let output = m.forward(images);
                    let soft = distillation_loss(&output, &taught, s.temperature).mul_scalar(s.kd_weight);
                    (classification_loss(&output, targets) + soft).mul_scalar(weight)
                });
                (scalar(loss), grads, sums)
            })?;
            state.last_loss = result.loss;
            check_finite(state.last_loss, &format!("step {}", state.step + 1), &format!("lower stages.{}.lr", ctx.spec.name))?;
            // Saliency from the full batch's gradients: the shards' and ranks' gate gradients
            // add up to them.
            let (sums, grads) = (result.total, result.grads);
            // Seeded by the step (the `random` criterion), so a resumed run draws as an
            // uninterrupted one would.
            let mut random = rng(seed ^ (state.step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            state.interval_sum.add(&score(s.criterion, &student, &sums, &grads, &normalizers, &mut random));
            student = optim.step(s.lr, student, grads);
            // Pruned slices stay exactly zero whatever AdamW's moments do.
            student = state.masks.apply_trainable(student);
            state.step += 1;
            state.batch += 1;

            if state.step % s.interval == 0 {
                let current = interval_saliency(&mut state, s, &config);
                // The estimate's target: the measurements' correction moves it where the
                // measured latency meets latency_target.
                let target = (s.latency_target / state.measured.as_ref().map_or(1.0, |m| m.correction)).min(1.0);
                exhausted = select(s, &current, &mut state, &table, &config, dense_latency, target);
                state.smoothed = Some(current);
                student = state.masks.apply_trainable(student);
                state.prune_step += 1;
                let now = state.masks.surviving(&config);
                let latency = table.model_latency(&now);
                state.ratio = latency / dense_latency;
                let (e, widths) = (now.embed_dims(), now.block_widths());
                let (step, prune_step, ratio, loss) = (state.step, state.prune_step, state.ratio, state.last_loss);
                state.log.push_str(&format!("{step},{prune_step},{latency:e},{ratio:.5},{},{},{loss:.5},{e},{widths}\n", now.params(), now.flops()));
                let mut done = reached(ratio, target);
                if let Some(m) = state.measured.as_mut() {
                    if done || ratio * m.correction <= m.next_at {
                        let r = measure(clock.as_ref().expect("a clock where stop_on is measured"), &teacher, &student, &state.masks, s.measure_batch, s.measure_pairs, device)?;
                        m.correction = r.median / ratio;
                        m.next_at = s.latency_target + (r.median - s.latency_target) / 2.0;
                        m.last = Some(r);
                        m.log.push_str(&format!("{step},{prune_step},{ratio:.5},{:.5},{:.5},{:.5},{},{:.5},{runtime}\n", r.median, r.min, r.max, r.pairs, m.correction));
                        ctx.log.info(&format!("{}: step {prune_step}: estimated {ratio:.3} of dense, measured {:.3} ({:.3}-{:.3} over {} pairs)", ctx.spec.name, r.median, r.min, r.max, r.pairs));
                        done = reached(r.median, s.latency_target);
                    } else {
                        done = false;
                    }
                }
                let shown = state.measured.as_ref().map_or(ratio, |m| ratio * m.correction);
                progress.update(to_remove(shown), &format!("step {prune_step}: latency {shown:.3} of dense, loss {loss:.4}"));
                if done || prune_step >= s.max_prune_steps || exhausted {
                    target_met = done;
                    break 'outer;
                }
                if prune_step % s.checkpoint_every == 0 && ctx.writes() {
                    resume::save(&ckpt, &student, &optim, &state)?;
                }
            }
            // Stopped by a signal: save where it is, then stop.
            if let Err(stop) = crate::interrupt::check() {
                if ctx.writes() {
                    resume::save(&ckpt, &student, &optim, &state)?;
                }
                return Err(stop);
            }
        }
        if read == 0 && !resumed_mid_epoch {
            anyhow::bail!(
                "the training split gave no batch of {} ({} unreadable images skipped)",
                s.batch_size,
                loader.skipped()
            );
        }
        state.epoch += 1;
        state.batch = 0;
    }
    progress.finish();
    let PruneState { step, prune_step, ratio, last_loss, masks, log, measured, .. } = state;
    let reached = target_met;
    let stopped_by = warn_short_of_target(ctx, s, reached, exhausted, ratio, measured.as_ref());
    let last = measured.as_ref().and_then(|m| m.last);
    let small = compact(&student.valid(), &masks, device)?;
    if ctx.writes() {
        if let Some(m) = &measured {
            atomic_write(&ctx.dir.join("latency_measured.csv"), m.log.as_bytes())?;
        }
        atomic_write(&ctx.dir.join("pruning_log.csv"), log.as_bytes())?;
        atomic_write(&ctx.dir.join("masks.json"), &serde_json::to_vec(&masks)?)?;
        checkpoint::save(&small, &checkpoint::model_dir(&ctx.dir))?;
    }
    ctx.log.info(&format!(
        "{}: {prune_step} pruning steps, estimated latency {:.3} of dense, {:.2} M params, {:.3} GFLOPs",
        ctx.spec.name,
        ratio,
        small.config().params() as f64 / 1e6,
        small.config().flops() as f64 / 1e9
    ));
    Ok(serde_json::json!({
        "steps": step,
        "prune_steps": prune_step,
        "latency_ratio": ratio,
        "latency_target": s.latency_target,
        "target_reached": reached,
        "stopped_by": stopped_by,
        "stop_on": s.stop_on,
        "latency_measured": last.map(|r| r.median),
        "latency_measured_min": last.map(|r| r.min),
        "latency_measured_max": last.map(|r| r.max),
        "measure_pairs": last.map(|r| r.pairs),
        "latency_measured_runtime": clock.as_ref().map(Clock::describe),
        "params": small.config().params(),
        "flops": small.config().flops(),
        "final_loss": last_loss,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::VitConfig;

    /// The student keeps training while it is pruned: zeroing the pruned units after every
    /// step leaves the other weights trainable (a product inside the autodiff graph froze the
    /// whole student after the first step).
    #[test]
    fn masked_weights_keep_training_step_after_step() {
        use burn::optim::GradientsParams;
        use burn::tensor::{Distribution, Tensor};
        type A = burn::backend::Autodiff<burn::backend::NdArray>;
        let device = Default::default();
        let c = VitConfig::uniform(8, 4, 3, 8, 1, 2, 2.0, 3, false);
        let mut model = Model::Deit(c.init::<A>(&device));
        let mut masks = Masks::ones(&c.clone().into());
        masks.get_mut(Structure::Mlp, 0)[0] = 0.0;
        let mut optim = AdamW::<A>::new(0.0, None);
        let x = Tensor::<A, 4>::random([2, 3, 8, 8], Distribution::Default, &device);
        let weights = |m: &Model<A>| m.as_deit().unwrap().head.weight.val().inner().into_data().to_vec::<f32>().unwrap();
        for step in 0..3 {
            let before = weights(&model);
            let loss = model.forward(x.clone()).logits().powi_scalar(2).mean();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = masks.apply_trainable(optim.step(1e-2, model, grads));
            assert_ne!(weights(&model), before, "step {step} left the weights unchanged");
        }
        let fc1 = model.as_deit().unwrap().blocks[0].mlp.fc1.weight.val().inner().into_data().to_vec::<f32>().unwrap();
        let rows = fc1.len() / c.blocks[0].mlp;
        assert!((0..rows).all(|r| fc1[r * c.blocks[0].mlp] == 0.0), "the pruned MLP unit stays zero");
    }

    #[test]
    fn progress_counts_the_latency_removed_towards_the_target() {
        assert_eq!(latency_removed(1.0, 0.5), 0);
        assert_eq!(latency_removed(0.75, 0.5), 500);
        assert_eq!(latency_removed(0.5, 0.5), 1000);
        assert_eq!(latency_removed(0.3, 0.5), 1000);
    }
}
