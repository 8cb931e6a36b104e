//! Stage kinds: one file each. A stage reads its settings, the model of its input stage (if
//! any) and the dataset, writes its artifacts into its cache entry directory, and returns the
//! metrics it measured. Stages are generic over the backend and never name one.

mod distill;
mod evaluate;
mod hessian_scores;
mod load_pretrained;
pub mod profile_latency;
mod prune;
pub mod report;
mod train;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use burn::tensor::backend::{AutodiffBackend, Backend};
use figment::Figment;
use serde::Serialize;

use crate::backend::BackendKind;
use crate::data::loader::LoaderOptions;
use crate::data::randaugment::RandAugment;
use crate::data::transforms::{Mode, TrainAugment};
use crate::data::{Dataset, DatasetConfig, Loader, Split};
use crate::model::{checkpoint, Family, Model, ModelConfig, ModelSection};
use crate::files::atomic_write;
use crate::manifest::Manifest;
use crate::onnxruntime::{Provider, Runtime};
use crate::runlog::RunLog;

pub use distill::DistillSettings;
pub use evaluate::EvaluateSettings;
pub use hessian_scores::HessianScoresSettings;
pub use profile_latency::ProfileLatencySettings;
pub use prune::PruneSettings;
pub use report::ReportSettings;
pub use load_pretrained::LoadPretrainedSettings;
pub use train::TrainSettings;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum StageKind {
    LoadPretrained,
    Train,
    ProfileLatency,
    HessianScores,
    Prune,
    Distill,
    Evaluate,
    Report,
}


/// A stage's own keys: `(name, type, doc)`. Defaults come from the settings' `Default`.
pub type KeyDoc = (&'static str, &'static str, &'static str);

impl StageKind {
    /// Whether the stage trains (backward passes over training batches): the stages the ranks
    /// of a job run together, each on its part of every batch.
    pub fn trains(self) -> bool {
        matches!(self, StageKind::Train | StageKind::Distill | StageKind::Prune | StageKind::HessianScores)
    }

    pub const ALL: [StageKind; 8] = [
        StageKind::LoadPretrained,
        StageKind::Train,
        StageKind::ProfileLatency,
        StageKind::HessianScores,
        StageKind::Prune,
        StageKind::Distill,
        StageKind::Evaluate,
        StageKind::Report,
    ];

    pub fn name(self) -> &'static str {
        match self {
            StageKind::LoadPretrained => "load_pretrained",
            StageKind::Train => "train",
            StageKind::ProfileLatency => "profile_latency",
            StageKind::HessianScores => "hessian_scores",
            StageKind::Prune => "prune",
            StageKind::Distill => "distill",
            StageKind::Evaluate => "evaluate",
            StageKind::Report => "report",
        }
    }

    pub fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|k| k.name()).collect()
    }

    pub fn from_name(name: &str) -> Result<Self, String> {
        if let Some(kind) = Self::ALL.iter().find(|k| k.name() == name) {
            return Ok(*kind);
        }
        Err(format!(
            "unknown stage kind `{name}`{}\n  hint: available kinds are {}",
            crate::suggest::did_you_mean(name, &Self::names()),
            Self::names().join(", ")
        ))
    }

    pub fn doc(self) -> &'static str {
        match self {
            StageKind::LoadPretrained => "reads a timm/DeiT checkpoint (.safetensors or .pth) into the model; [model] keys it gives must agree with it",
            StageKind::Train => "trains the model (from scratch, or its input's) with AdamW, warm-up + cosine, DeiT augmentation, optional teacher",
            StageKind::ProfileLatency => "times one block over a grid of widths on the device; writes the latency table",
            StageKind::HessianScores => "scores every unit of every structure (Hessian-aware saliency or a baseline); writes scores.csv",
            StageKind::Prune => "prunes globally to a latency target while distilling from the dense model, then compacts",
            StageKind::Distill => "fine-tunes the compact model against the dense one (KL at T on both heads + CE, DeiT recipe)",
            StageKind::Evaluate => "measures top-1/top-5, loss, params, FLOPs and throughput; writes results/<pipeline>/metrics.csv",
            StageKind::Report => "the paper's Table 1 (measured beside paper rows), per-block widths and figures in results/<pipeline>/",
        }
    }

    pub fn keys(self) -> &'static [KeyDoc] {
        match self {
            StageKind::LoadPretrained => load_pretrained::KEYS,
            StageKind::Train => train::KEYS,
            StageKind::ProfileLatency => profile_latency::KEYS,
            StageKind::HessianScores => hessian_scores::KEYS,
            StageKind::Prune => prune::KEYS,
            StageKind::Distill => train::KEYS,
            StageKind::Evaluate => evaluate::KEYS,
            StageKind::Report => report::KEYS,
        }
    }

    /// The source its output depends on, for its cache key: a change to any of these re-runs
    /// the stage (and, if its output changes, what reads it). Every kind also depends on the
    /// shared stage code, the model and Cargo.lock (the libraries, burn included).
    pub fn code(self) -> Vec<&'static str> {
        let own: &[&str] = match self {
            StageKind::LoadPretrained => &["src/stages/load_pretrained.rs", "src/data"],
            StageKind::Train => &["src/stages/train.rs", "src/train", "src/data"],
            StageKind::Distill => &["src/stages/distill.rs", "src/stages/train.rs", "src/train", "src/data"],
            StageKind::ProfileLatency => &["src/stages/profile_latency.rs", "src/prune", "src/onnxruntime.rs", "src/export/onnx.rs"],
            StageKind::HessianScores => &["src/stages/hessian_scores.rs", "src/prune", "src/train", "src/data"],
            StageKind::Prune => &["src/stages/prune.rs", "src/prune", "src/train", "src/data", "src/onnxruntime.rs", "src/export/onnx.rs"],
            StageKind::Evaluate => &["src/stages/evaluate.rs", "src/machine.rs", "src/train", "src/data", "src/onnxruntime.rs", "src/export/onnx.rs"],
            StageKind::Report => &["src/stages/report.rs", "src/report"],
        };
        let mut paths = vec!["Cargo.lock", "src/files.rs", "src/model", "src/stages/mod.rs"];
        paths.extend(own);
        paths
    }

    /// The hashes of [`StageKind::code`] in the source tree this binary was built from.
    pub fn code_fingerprint(self) -> Vec<(String, String)> {
        let tree: Vec<(String, String)> = crate::sources::SOURCES.iter().map(|(p, h)| (p.to_string(), h.to_string())).collect();
        crate::fingerprint::modules(&tree, &self.code())
    }

    /// Valid keys of the stage's table besides `kind` and `input`.
    pub fn fields(self) -> &'static [&'static str] {
        use crate::suggest::struct_fields;
        match self {
            StageKind::LoadPretrained => struct_fields::<LoadPretrainedSettings>(),
            StageKind::Train => struct_fields::<TrainSettings>(),
            StageKind::ProfileLatency => struct_fields::<ProfileLatencySettings>(),
            StageKind::HessianScores => struct_fields::<HessianScoresSettings>(),
            StageKind::Prune => struct_fields::<PruneSettings>(),
            StageKind::Distill => struct_fields::<DistillSettings>(),
            StageKind::Evaluate => struct_fields::<EvaluateSettings>(),
            StageKind::Report => struct_fields::<ReportSettings>(),
        }
    }

    /// Stages whose entry holds a model that others may take as input or teacher.
    pub fn writes_model(self) -> bool {
        matches!(self, StageKind::LoadPretrained | StageKind::Train | StageKind::Prune | StageKind::Distill)
    }

    /// Stages that never take an input model by default.
    pub fn starts_from_nothing(self) -> bool {
        matches!(self, StageKind::LoadPretrained | StageKind::Report)
    }

    pub fn default_settings(self) -> StageSettings {
        match self {
            StageKind::LoadPretrained => StageSettings::LoadPretrained(Default::default()),
            StageKind::Train => StageSettings::Train(Default::default()),
            StageKind::ProfileLatency => StageSettings::ProfileLatency(Default::default()),
            StageKind::HessianScores => StageSettings::HessianScores(Default::default()),
            StageKind::Prune => StageSettings::Prune(Default::default()),
            StageKind::Distill => StageSettings::Distill(Default::default()),
            StageKind::Evaluate => StageSettings::Evaluate(Default::default()),
            StageKind::Report => StageSettings::Report(Default::default()),
        }
    }

    pub fn parse_settings(self, table: &Figment) -> Result<StageSettings, figment::Error> {
        Ok(match self {
            StageKind::LoadPretrained => StageSettings::LoadPretrained(table.extract()?),
            StageKind::Train => StageSettings::Train(table.extract()?),
            StageKind::ProfileLatency => StageSettings::ProfileLatency(table.extract()?),
            StageKind::HessianScores => StageSettings::HessianScores(table.extract()?),
            StageKind::Prune => StageSettings::Prune(table.extract()?),
            StageKind::Distill => StageSettings::Distill(table.extract()?),
            StageKind::Evaluate => StageSettings::Evaluate(table.extract()?),
            StageKind::Report => StageSettings::Report(table.extract()?),
        })
    }
}

/// One `[stages.NAME]` table, resolved.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StageSpec {
    pub name: String,
    pub kind: StageKind,
    /// The stage whose model this one consumes; `None` for a stage that starts from nothing.
    pub input: Option<String>,
    /// This stage's own seed in place of `pipeline.seed`: pinned on the stages a seed sweep
    /// should leave alone (the dense model of an ablation), whose cache keys then stay put.
    pub seed: Option<u64>,
    pub settings: StageSettings,
}

impl StageSpec {
    /// The seed of this stage's data order and randomness: its own, or the pipeline's.
    pub fn seed(&self, pipeline_seed: u64) -> u64 {
        self.seed.unwrap_or(pipeline_seed)
    }

    /// Every stage this one reads, as `(key, stage name)`: its `input`, then the stages its
    /// settings reference. They must come before it, and their cache keys are part of its own.
    pub fn upstream(&self) -> Vec<(&'static str, &str)> {
        let input = self.input.as_deref().map(|i| ("input", i));
        input.into_iter().chain(self.settings.refs()).collect()
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(untagged)]
pub enum StageSettings {
    LoadPretrained(LoadPretrainedSettings),
    Train(TrainSettings),
    ProfileLatency(ProfileLatencySettings),
    HessianScores(HessianScoresSettings),
    Prune(PruneSettings),
    Distill(DistillSettings),
    Evaluate(EvaluateSettings),
    Report(ReportSettings),
}

impl StageSettings {
    /// Settings a model of `family` cannot run with, as `(key, message)`: known from the
    /// pipeline file, so they fail before any stage runs.
    pub fn unsupported(&self, family: Family) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if family != Family::Swin {
            return p;
        }
        match self {
            StageSettings::ProfileLatency(s) => {
                if s.grid == profile_latency::GridChoice::Reference {
                    p.push(("grid".into(), "`reference` is DeiT-B's grid; a Swin's table is profiled per stage on grids spanning its widths\n  hint: grid = \"spanning\"".into()));
                }
                if s.tokens.is_some() {
                    p.push(("tokens".into(), "a Swin stage's blocks attend over their windows, whose size the model fixes\n  hint: leave tokens unset".into()));
                }
            }
            _ => {}
        }
        p
    }

    /// The key of the images one step takes and its value (an evaluation's larger batch).
    pub fn batch(&self) -> Option<(&'static str, usize)> {
        match self {
            StageSettings::Train(s) | StageSettings::Distill(DistillSettings(s)) => Some(("batch_size", s.batch_size)),
            StageSettings::Prune(s) => Some(("batch_size", s.batch_size)),
            StageSettings::HessianScores(s) => Some(("batch_size", s.batch_size)),
            StageSettings::Evaluate(s) => Some(("throughput_batch", s.throughput_batch.max(s.batch_size))),
            StageSettings::ProfileLatency(s) => Some(("batch_size", s.batch_size)),
            StageSettings::LoadPretrained(_) | StageSettings::Report(_) => None,
        }
    }

    /// Settings `ranks` processes cannot run together, as `(key, message)`: known from the
    /// pipeline file, so they fail before the ranks join.
    pub fn unsupported_with_ranks(&self, kind: StageKind, ranks: usize) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if ranks < 2 || !kind.trains() {
            return p;
        }
        if let Some((key, batch)) = self.batch().filter(|&(_, batch)| batch < ranks) {
            p.push((key.into(), format!("{batch}: {ranks} ranks share every batch, one example at least each\n  hint: raise it to {ranks} or more (it stays the global batch)")));
        }
        if let StageSettings::Prune(s) = self {
            if s.stop_on == prune::StopOn::Measured {
                p.push(("stop_on".into(), format!("\"measured\" with {ranks} ranks: each rank would time the model on its own device and decide apart\n  hint: prune on one process (the ranks can fine-tune after it), or stop_on = \"estimated\"")));
            }
        }
        p
    }

    /// Impossible values as `(key, message)`.
    pub fn validate(&self) -> Vec<(String, String)> {
        match self {
            StageSettings::LoadPretrained(s) => s.validate(),
            StageSettings::Train(s) => s.validate(),
            StageSettings::ProfileLatency(s) => s.validate(),
            StageSettings::HessianScores(s) => s.validate(),
            StageSettings::Prune(s) => s.validate(),
            StageSettings::Distill(s) => s.validate(),
            StageSettings::Evaluate(s) => s.validate(),
            StageSettings::Report(s) => s.validate(),
        }
    }

    /// The one kind of stage a reference `key` may name, where only one makes sense.
    pub fn referenced_kind(key: &str) -> Option<StageKind> {
        match key {
            "latency" => Some(StageKind::ProfileLatency),
            "models" => Some(StageKind::Evaluate),
            "prunes" => Some(StageKind::Prune),
            _ => None,
        }
    }

    /// Stages whose artifacts this one reads besides its input, as `(key, stage name)`; see
    /// [`StageSpec::upstream`].
    pub fn refs(&self) -> Vec<(&'static str, &str)> {
        match self {
            StageSettings::Prune(s) if !s.latency.is_empty() => vec![("latency", s.latency.as_str())],
            StageSettings::Train(TrainSettings { teacher: Some(t), .. })
            | StageSettings::Distill(DistillSettings(TrainSettings { teacher: Some(t), .. })) => vec![("teacher", t.as_str())],
            StageSettings::Evaluate(EvaluateSettings { baseline: Some(b), .. }) => vec![("baseline", b.as_str())],
            StageSettings::Report(s) => s.refs(),
            _ => vec![],
        }
    }
}

/// The runtime a stage times on, where it times at all: `(runtime, provider)`.
pub fn timing_runtime(spec: &StageSpec) -> Option<(Runtime, Provider)> {
    match &spec.settings {
        StageSettings::ProfileLatency(s) if s.table.is_none() => Some((s.runtime, s.onnxruntime_provider)),
        StageSettings::Prune(s) if s.stop_on == prune::StopOn::Measured => Some((s.runtime, s.onnxruntime_provider)),
        StageSettings::Evaluate(s) => Some((s.runtime, s.onnxruntime_provider)),
        _ => None,
    }
}

/// Facts outside the settings that a stage's output depends on, for its cache key: the device
/// of a stage that times, and the ONNX Runtime version of one that times there (loading it: a
/// pipeline that asks for a missing ONNX Runtime stops before any stage runs).
pub fn key_extra(spec: &StageSpec, device_name: &str) -> Result<BTreeMap<String, String>> {
    let mut extra = BTreeMap::new();
    if let Some((Runtime::Onnxruntime, provider)) = timing_runtime(spec) {
        let version = crate::onnxruntime::Onnxruntime::new(provider).map(|o| o.describe()).with_context(|| format!("stages.{}.runtime = \"onnxruntime\"", spec.name))?;
        extra.insert("onnxruntime".into(), version);
    }
    match &spec.settings {
        StageSettings::LoadPretrained(s) => {
            extra.insert("checkpoint".into(), crate::files::file_identity(&s.path));
        }
        // Throughput and latency are properties of the device: a table measured on one device
        // is never used for another by accident.
        StageSettings::Evaluate(_) | StageSettings::ProfileLatency(_) => {
            extra.insert("device".into(), device_name.into());
            if let StageSettings::ProfileLatency(ProfileLatencySettings { table: Some(path), .. }) = &spec.settings {
                extra.insert("table".into(), crate::files::file_identity(path));
            }
        }
        StageSettings::Prune(p) if p.stop_on == prune::StopOn::Measured => {
            extra.insert("device".into(), device_name.into());
        }
        StageSettings::Train(_)
        | StageSettings::Distill(_)
        | StageSettings::HessianScores(_)
        | StageSettings::Prune(_)
        | StageSettings::Report(_) => {}
    }
    Ok(extra)
}

/// A lower bound on the memory one step of the stage needs with `model`, and the key whose
/// batch size sets it: a batch that cannot fit fails before anything runs, not after hours of
/// training on an allocation abort. Counts the input and the activations of a forward pass
/// (of every block, for training stages), in f32.
pub fn memory_needed(spec: &StageSpec, model: &ModelConfig) -> Option<(String, usize, f64)> {
    let (key, batch) = spec.settings.batch()?;
    let training = spec.kind.trains();
    let mut blocks: Vec<f64> = Vec::new();
    for (stage, (e, dims)) in model.stages().iter().enumerate() {
        let (n, windows) = model.attention_shape(stage);
        let (n, windows) = (n as f64, windows as f64);
        blocks.extend(dims.iter().map(|d| windows * n * (4.0 * *e as f64 + d.mlp as f64) + d.heads as f64 * windows * n * n));
    }
    let activations = if training { blocks.iter().sum() } else { blocks.iter().cloned().fold(0.0, f64::max) };
    let side = model.image_size() as f64;
    let per_image = model.in_chans() as f64 * side * side + activations;
    Some((format!("stages.{}.{key}", spec.name), batch, batch as f64 * per_image * 4.0))
}

/// Training augmentation beyond the dataset's crop and flip, from a stage's settings.
#[derive(Debug, Clone, Copy, Default)]
pub struct Extras {
    pub randaugment: Option<RandAugment>,
    pub erasing: f32,
}

/// What a running stage can see: its own spec and the parts of the pipeline it reads.
pub struct StageContext<'a, B: AutodiffBackend> {
    /// The pipeline's name, for the metrics and reports the stage writes.
    pub pipeline_name: &'a str,
    pub backend: BackendKind,
    pub dataset: &'a DatasetConfig,
    pub model: &'a ModelSection,
    /// Every stage of the pipeline, in order: a report looks upstream of what it tabulates.
    pub specs: &'a [StageSpec],
    pub spec: &'a StageSpec,
    /// The seed of the stage's data order and randomness: its own `seed`, or the pipeline's.
    pub seed: u64,
    /// The stage's cache entry: everything it writes goes here.
    pub dir: PathBuf,
    /// The input stage's name and entry directory.
    pub input: Option<(String, PathBuf)>,
    /// Every stage this one reads (input and references), with its entry directory.
    pub stages: Vec<(String, PathBuf)>,
    /// Every device of this process (at least one); training stages split each batch across them.
    pub devices: Vec<B::Device>,
    /// The ranks that train together (`world::World::single()` for one process): rank 0 writes
    /// the entry, the others only read it.
    pub world: &'a crate::world::World,
    pub device_name: &'a str,
    pub log: &'a RunLog,
}

impl<B: AutodiffBackend> StageContext<'_, B> {
    /// Where the model lives and measurements are taken: the first device.
    pub fn device(&self) -> &B::Device {
        &self.devices[0]
    }

    /// This process's devices and its ranks: where a training step runs.
    pub fn team(&self) -> crate::train::parallel::Team<'_, B::Device> {
        crate::train::parallel::Team { devices: &self.devices, world: self.world }
    }

    /// Whether this process writes the stage's entry (rank 0 does; the others read it).
    pub fn writes(&self) -> bool {
        self.world.writes()
    }

    /// A warning in the run log, named after the stage.
    pub fn warn(&self, message: &str) {
        self.log.info(&format!("{}: warning: {message}", self.spec.name));
    }

    /// The entry directory of a stage this one references.
    pub fn stage_dir(&self, name: &str) -> Result<PathBuf> {
        self.stages
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.clone())
            .ok_or_else(|| anyhow::anyhow!("stage `{name}` is not an input of `{}`", self.spec.name))
    }

    pub fn open(&self, split: Split) -> Result<Arc<dyn Dataset>> {
        Ok(self.dataset.open(split, self.seed)?)
    }

    /// The input stage's model, or `None` when the stage has no input.
    pub fn input_model<BB: Backend>(&self, device: &BB::Device) -> Result<Option<Model<BB>>> {
        let Some((name, _)) = &self.input else { return Ok(None) };
        self.stage_model(name, device).map(Some)
    }

    /// The model written by `name`, a stage this one reads.
    pub fn stage_model<BB: Backend>(&self, name: &str, device: &BB::Device) -> Result<Model<BB>> {
        checkpoint::load(&checkpoint::model_dir(&self.stage_dir(name)?), device)
            .with_context(|| format!("loading the model of stage `{name}`"))
    }

    /// A loader for `split` shaped for `model`: the dataset's random-resized crop and flip plus
    /// `augment`'s extras when `augment` is given, evaluation transforms otherwise. A `shuffle`d
    /// pass is a training pass, in the stage seed's order each epoch, without a short last batch;
    /// it does not depend on `augment` (a prune stage without augmentation still trains).
    pub fn loader(&self, split: Split, model: &ModelConfig, batch_size: usize, shuffle: bool, augment: Option<Extras>) -> Result<Loader> {
        let data = self.dataset;
        let dataset = self.open(split)?;
        if dataset.num_classes() > model.num_classes() {
            anyhow::bail!(
                "the dataset has {} classes but the model's head has {}\n  hint: set model.num_classes or leave it unset to take the dataset's",
                dataset.num_classes(),
                model.num_classes()
            );
        }
        let mut transform = data.eval_transform(model.image_size(), model.in_chans())?;
        if let Some(extras) = augment {
            transform.mode = Mode::Train(TrainAugment {
                randaugment: extras.randaugment,
                erasing: extras.erasing,
                ..TrainAugment::basic(data.crop_scale, data.hflip)
            });
        }
        let loader = Loader::new(
            dataset,
            transform,
            LoaderOptions {
                batch_size,
                shuffle,
                drop_last: shuffle,
                seed: self.seed,
                workers: data.workers,
                prefetch: data.prefetch,
                on_bad_image: data.on_bad_image,
            },
        );
        Ok(if self.spec.kind.trains() { loader.for_rank(self.world.ranks, self.world.rank, self.mixes()) } else { loader })
    }

    /// Whether the stage mixes each image with its batch mirror (Mixup or CutMix).
    fn mixes(&self) -> bool {
        match &self.spec.settings {
            StageSettings::Train(s) | StageSettings::Distill(DistillSettings(s)) => s.mixup > 0.0 || s.cutmix > 0.0,
            _ => false,
        }
    }
}

/// Runs a stage; returns its metrics for the manifest.
pub fn run<B: AutodiffBackend>(ctx: &StageContext<B>) -> Result<serde_json::Value> {
    match &ctx.spec.settings {
        StageSettings::LoadPretrained(s) => load_pretrained::run(ctx, s),
        StageSettings::Train(s) => train::run(ctx, s),
        StageSettings::ProfileLatency(s) => profile_latency::run(ctx, s),
        StageSettings::HessianScores(s) => hessian_scores::run(ctx, s),
        StageSettings::Prune(s) => prune::run(ctx, s),
        StageSettings::Distill(s) => distill::run(ctx, s),
        StageSettings::Evaluate(s) => evaluate::run(ctx, s),
        StageSettings::Report(s) => report::run(ctx, s),
    }
}

/// Writes what a completed stage (run now or cached) contributes to `results/`.
/// `results` is the pipeline's own folder (`results/<pipeline>/`).
pub fn publish(results: &Path, pipeline_name: &str, spec: &StageSpec, entry: &Path, manifest: &Manifest, log: &RunLog) -> Result<()> {
    match spec.settings {
        StageSettings::Evaluate(_) => {
            let path = results.join("metrics.csv");
            // The entry may be shared with another pipeline that evaluated the same model.
            let mut metrics = manifest.metrics.clone();
            metrics["pipeline"] = serde_json::json!(pipeline_name);
            crate::report::upsert_metrics(&path, &metrics)?;
            log.info(&format!("{}: {} -> {}", spec.name, evaluate::summary(&manifest.metrics), path.display()));
        }
        StageSettings::Prune(_) => {
            // Named after the stage: a pipeline may prune more than once.
            let path = results.join(format!("pruning_log_{}.csv", spec.name));
            let log_csv = entry.join("pruning_log.csv");
            let bytes = std::fs::read(&log_csv).with_context(|| format!("reading {}", log_csv.display()))?;
            atomic_write(&path, &bytes)?;
            log.info(&format!("{}: pruning trajectory -> {}", spec.name, path.display()));
        }
        StageSettings::Report(_) => {
            for file in report::OUTPUTS {
                if let Ok(bytes) = std::fs::read(entry.join(file)) {
                    atomic_write(&results.join(file), &bytes)?;
                }
            }
            log.info(&format!("{}: table, widths and figures -> {}", spec.name, results.display()));
        }
        _ => {}
    }
    Ok(())
}

/// Checks shared by stage settings: every count in `counts` is at least 1.
pub(crate) fn at_least_one(problems: &mut Vec<(String, String)>, counts: &[(&str, usize)]) {
    for (key, value) in counts {
        if *value == 0 || *value > MAX_COUNT {
            problems.push(((*key).into(), format!("must be from 1 to {MAX_COUNT}, got {value}")));
        }
    }
}

/// Checks counts of timed or untimed repetitions (warm-up and timed passes), which a run
/// spends a pass of the model on each.
pub(crate) fn repetitions(problems: &mut Vec<(String, String)>, counts: &[(&str, usize, usize)]) {
    for (key, value, min) in counts {
        if *value < *min || *value > MAX_REPETITIONS {
            problems.push(((*key).into(), format!("must be from {min} to {MAX_REPETITIONS}, got {value}")));
        }
    }
}

/// The most warm-up or timed passes a measurement takes.
pub const MAX_REPETITIONS: usize = 10_000;

/// The most any count key (epochs, batches, steps, group sizes) takes: bounded before
/// anything is allocated from it; a batch that fits the machine is then [`memory_needed`]'s.
pub const MAX_COUNT: usize = 1 << 24;

/// Checks shared by stage settings.
pub(crate) fn non_negative(problems: &mut Vec<(String, String)>, key: &str, value: f64) {
    if !(value >= 0.0) || !value.is_finite() {
        problems.push((key.into(), format!("must be a finite number, not negative, got {value}")));
    }
}

/// Checks shared by stage settings.
pub(crate) fn positive(problems: &mut Vec<(String, String)>, key: &str, value: f64) {
    if !(value > 0.0) || !value.is_finite() {
        problems.push((key.into(), format!("must be positive, got {value}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_keys_are_exactly_the_settings_fields() {
        for kind in StageKind::ALL {
            let documented: Vec<&str> = kind.keys().iter().map(|k| k.0).collect();
            assert_eq!(documented, kind.fields(), "{}", kind.name());
        }
    }
}
