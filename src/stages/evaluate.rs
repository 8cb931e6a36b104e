//! `evaluate`: top-1 and top-5 (the two heads averaged for distilled models), loss, params,
//! FLOPs, and measured inference throughput on the chosen backend, or in ONNX Runtime with
//! `runtime = "onnxruntime"`: images/s and per-batch latency at a stated batch size, after
//! warm-up, the median of repeats. With a `baseline`
//! (the dense model's stage), also the speedup over it measured in pairs: the two models timed
//! alternately in this process, on the same input, so that what slows the machine slows both.


use anyhow::Result;
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use super::{at_least_one, KeyDoc, StageContext};
use crate::data::{DatasetKind, Split};
use crate::model::{Model, ModelConfig};
use crate::onnxruntime::{Clock, Provider, Runtime};
use crate::train::{accuracy, Accuracy};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvaluateSettings {
    pub split: Split,
    pub batch_size: usize,
    pub throughput_batch: usize,
    pub throughput_repeats: usize,
    pub warmup: usize,
    pub model_id: Option<String>,
    pub baseline: Option<String>,
    pub speedup_pairs: usize,
    pub runtime: Runtime,
    pub onnxruntime_provider: Provider,
}

pub const KEYS: &[KeyDoc] = &[
    ("split", "string", "`val` or `train`"),
    ("batch_size", "integer", "images per batch for accuracy"),
    ("throughput_batch", "integer", "batch size at which throughput and latency are measured"),
    ("throughput_repeats", "integer", "timed forward passes; the median is reported"),
    ("warmup", "integer", "untimed forward passes before timing"),
    ("model_id", "string", "the model's name in metrics.csv (unset: the input stage's name)"),
    ("baseline", "string", "a stage whose model (the dense one) this one's speedup is measured against, in pairs (unset: none)"),
    ("speedup_pairs", "integer", "with a baseline: timed passes of each model, alternated; the speedup is the median of the pairs' ratios"),
    crate::stages::profile_latency::RUNTIME_KEY,
    crate::stages::profile_latency::PROVIDER_KEY,
];

impl Default for EvaluateSettings {
    fn default() -> Self {
        Self {
            split: Split::Val,
            batch_size: 256,
            throughput_batch: 64,
            throughput_repeats: 10,
            warmup: 2,
            model_id: None,
            baseline: None,
            speedup_pairs: 20,
            runtime: Runtime::Backend,
            onnxruntime_provider: Provider::Cpu,
        }
    }
}

impl EvaluateSettings {
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        at_least_one(&mut p, &[("batch_size", self.batch_size), ("throughput_batch", self.throughput_batch)]);
        super::repetitions(&mut p, &[("throughput_repeats", self.throughput_repeats, 1), ("warmup", self.warmup, 0), ("speedup_pairs", self.speedup_pairs, 1)]);
        if let Some(id) = self.model_id.as_ref().filter(|id| id.is_empty() || id.len() > crate::files::MAX_NAME || id.chars().any(char::is_control)) {
            p.push(("model_id".into(), format!("{id:?}: expected a name of 1 to {} characters on one line", crate::files::MAX_NAME)));
        }
        p
    }
}

pub fn run<B: AutodiffBackend>(ctx: &StageContext<B>, s: &EvaluateSettings) -> Result<serde_json::Value> {
    let device = ctx.device();
    let Some(model) = ctx.input_model::<B::InnerBackend>(device)? else {
        anyhow::bail!("evaluate needs a model: give it an `input` stage (load_pretrained, train, ...)");
    };
    let config = model.config();
    let loader = ctx.loader(s.split, &config, s.batch_size, false, None)?;
    let mut progress = ctx.log.progress(&ctx.spec.name, loader.batches_per_epoch() as u64);
    let Accuracy { top1, top5, seen, loss_sum } = accuracy(&model, &loader, device, |a| progress.step(&format!("top1 {:.4}", a.top1 as f64 / a.seen as f64)))?;
    progress.finish();
    if seen == 0 {
        anyhow::bail!("the {:?} split is empty", s.split);
    }

    let baseline = s.baseline.as_deref().map(|name| baseline_model(ctx, name, &config)).transpose()?;
    let clock = Clock::new(s.runtime, s.onnxruntime_provider, format!("{} on {}", ctx.backend, ctx.device_name))?;
    let median = clock.median(&model, s.throughput_batch, s.warmup, s.throughput_repeats, device)?;
    let paired = baseline.map(|base| clock.paired(&base, &model, s.throughput_batch, s.warmup, s.speedup_pairs, device)).transpose()?;

    let data = ctx.dataset;
    let dataset = match data.kind {
        DatasetKind::Synthetic => format!("synthetic-{}c-{}px", data.classes, data.synthetic_size),
        _ => data.root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| data.root.display().to_string()),
    };
    let model_id = s.model_id.clone().or_else(|| ctx.input.as_ref().map(|(n, _)| n.clone())).unwrap_or_default();
    let mut metrics = serde_json::json!({
        "model": model_id,
        "dataset": dataset,
        "split": format!("{:?}", s.split).to_lowercase(),
        "images": seen,
        "top1": round(100.0 * top1 as f64 / seen as f64, 2),
        "top5": round(100.0 * top5 as f64 / seen as f64, 2),
        "loss": round(loss_sum / seen as f64, 4),
        "params_m": round(config.params() as f64 / 1e6, 3),
        "gflops": round(config.flops() as f64 / 1e9, 4),
        "images_per_s": round(s.throughput_batch as f64 / median, 1),
        "latency_ms": round(median * 1e3, 3),
        "batch": s.throughput_batch,
        "throughput_measured": crate::machine::MEASURED_ALONE,
        "backend": ctx.backend.to_string(),
        "device": ctx.device_name,
        "runtime": clock.describe(),
        "pipeline": ctx.pipeline_name,
        "image_size": config.image_size(),
        "family": config.family().to_string(),
    });
    if let (Some(ratio), Some(name)) = (paired, &s.baseline) {
        metrics["baseline"] = serde_json::json!(name);
        metrics["speedup"] = serde_json::json!(round(ratio.median, 2));
        metrics["speedup_min"] = serde_json::json!(round(ratio.min, 2));
        metrics["speedup_max"] = serde_json::json!(round(ratio.max, 2));
        metrics["speedup_pairs"] = serde_json::json!(ratio.pairs);
    }
    match &config {
        ModelConfig::Deit(c) => {
            metrics["embed_dim"] = serde_json::json!(c.embed_dim);
            metrics["blocks"] = serde_json::json!(c.blocks);
        }
        ModelConfig::Swin(c) => metrics["stages"] = serde_json::json!(c.stages),
    }
    Ok(metrics)
}

/// The model of stage `name`, checked to take the same input as `config`'s.
fn baseline_model<B: AutodiffBackend>(ctx: &StageContext<B>, name: &str, config: &ModelConfig) -> Result<Model<B::InnerBackend>> {
    let base = ctx.stage_model::<B::InnerBackend>(name, ctx.device())?;
    let (a, b) = (base.config(), config);
    if (a.in_chans(), a.image_size()) != (b.in_chans(), b.image_size()) {
        anyhow::bail!(
            "stages.{}.baseline: `{name}`'s model takes {}x{}x{} images and this one {}x{}x{}; the speedup compares models on one input",
            ctx.spec.name,
            a.in_chans(),
            a.image_size(),
            a.image_size(),
            b.in_chans(),
            b.image_size(),
            b.image_size()
        );
    }
    Ok(base)
}

fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

/// One line for the log.
pub fn summary(m: &serde_json::Value) -> String {
    format!(
        "{} on {} {}: top-1 {}%, top-5 {}%, {} M params, {} GFLOPs, {} img/s at batch {}{}",
        m["model"], m["dataset"], m["split"], m["top1"], m["top5"], m["params_m"], m["gflops"], m["images_per_s"], m["batch"],
        match m["speedup"].as_f64() {
            Some(x) => format!(", {x}x {} ({}-{} over {} pairs)", m["baseline"], m["speedup_min"], m["speedup_max"], m["speedup_pairs"]),
            None => String::new(),
        }
    )
    .replace('"', "")
}
