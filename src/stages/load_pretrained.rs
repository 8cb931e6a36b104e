//! `load_pretrained`: reads a timm / DeiT checkpoint the user already has. Widths a fused
//! `qkv` cannot tell (heads per block) come from `[model]`; everything else from the shapes.
//! A ViT made for another image size than `model.image_size` has its position embedding
//! resampled, as timm does; a backbone without a head gets a new one.

use std::path::PathBuf;

use anyhow::Result;
use burn::tensor::backend::{AutodiffBackend, Backend};
use serde::{Deserialize, Serialize};

use super::{KeyDoc, StageContext};
use crate::data::Split;
use crate::model::{checkpoint, Init};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct LoadPretrainedSettings {
    pub path: PathBuf,
}

pub const KEYS: &[KeyDoc] = &[("path", "path", "the checkpoint: a timm/DeiT state dict, .safetensors or .pth")];

impl LoadPretrainedSettings {
    pub fn validate(&self) -> Vec<(String, String)> {
        if self.path.as_os_str().is_empty() {
            vec![("path".into(), "is required: the checkpoint file to load".into())]
        } else {
            crate::files::input_problem(&self.path, crate::files::MAX_CHECKPOINT).map(|problem| ("path".into(), problem)).into_iter().collect()
        }
    }
}

pub fn run<B: AutodiffBackend>(ctx: &StageContext<B>, s: &LoadPretrainedSettings) -> Result<serde_json::Value> {
    let classes = ctx.open(Split::Val)?.num_classes();
    let model = if ctx.model.init == Some(Init::Random) {
        let hint = ctx.model.resolve(classes)?;
        ctx.log.info(&format!("{}: model.init = random: random weights, `{}` is not read", ctx.spec.name, s.path.display()));
        B::InnerBackend::seed(ctx.device(), ctx.seed);
        hint.init::<B::InnerBackend>(ctx.device())
    } else {
        let hint = ctx.model.as_checkpoint_hint().resolve(classes)?;
        let loaded = checkpoint::load_pretrained_at::<B::InnerBackend>(&s.path, &hint, ctx.model.image_size, ctx.device())?;
        let model = loaded.model;
        // Another image size is what resampling is for, unless the rest disagrees too.
        let disagree = ctx.model.disagreements(&loaded.checkpoint);
        let resized = loaded.checkpoint.image_size() != model.config().image_size();
        if !disagree.is_empty() && !(resized && disagree.iter().all(|d| d.starts_with("model.image_size "))) {
            anyhow::bail!(
                "{}: the checkpoint disagrees with [model]:\n  {}\n  hint: correct [model], or leave those keys unset so that the checkpoint decides",
                s.path.display(),
                disagree.join("\n  ")
            );
        }
        for note in &loaded.notes {
            ctx.log.info(&format!("{}: {}: {note}", ctx.spec.name, s.path.display()));
        }
        model
    };
    let c = model.config();
    ctx.log.info(&format!(
        "{}: {} ({}), {} classes, {:.1} M params, {:.2} GFLOPs",
        ctx.spec.name,
        c.family(),
        c.widths(),
        c.num_classes(),
        c.params() as f64 / 1e6,
        c.flops() as f64 / 1e9
    ));
    checkpoint::save(&model, &checkpoint::model_dir(&ctx.dir))?;
    Ok(serde_json::json!({ "params": c.params(), "flops": c.flops() }))
}
