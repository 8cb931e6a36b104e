//! The model families the runner prunes, as one model type the stages hold: DeiT ([`Vit`]) and
//! Swin ([`Swin`]). A stage trains, scores, prunes or evaluates a [`Model`] without naming its
//! family; what differs between families (the structures, their masks, the latency table's
//! shapes) dispatches on it in `prune`.

use std::path::Path;

use anyhow::{Context, Result};
use burn::module::{Module, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::{BlockDims, Family, Swin, SwinConfig, SwinStage, Vit, VitConfig, VitOutput};

/// A model's shapes, whatever its family; `dims.json` holds one. A DeiT's is written as before
/// families existed (no tag): a Swin's is told apart by its `stages`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum ModelConfig {
    Deit(VitConfig),
    Swin(SwinConfig),
}

impl ModelConfig {
    pub fn family(&self) -> Family {
        match self {
            ModelConfig::Deit(_) => Family::Deit,
            ModelConfig::Swin(_) => Family::Swin,
        }
    }

    /// A randomly initialized model of these shapes.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Model<B> {
        match self {
            ModelConfig::Deit(c) => Model::Deit(c.init(device)),
            ModelConfig::Swin(c) => Model::Swin(c.init(device)),
        }
    }

    pub fn params(&self) -> usize {
        match self {
            ModelConfig::Deit(c) => c.params(),
            ModelConfig::Swin(c) => c.params(),
        }
    }

    /// Multiply-accumulates of one forward pass of one image.
    pub fn flops(&self) -> usize {
        match self {
            ModelConfig::Deit(c) => c.flops(),
            ModelConfig::Swin(c) => c.flops(),
        }
    }

    pub fn num_classes(&self) -> usize {
        match self {
            ModelConfig::Deit(c) => c.num_classes,
            ModelConfig::Swin(c) => c.num_classes,
        }
    }

    pub fn image_size(&self) -> usize {
        match self {
            ModelConfig::Deit(c) => c.image_size,
            ModelConfig::Swin(c) => c.image_size,
        }
    }

    pub fn in_chans(&self) -> usize {
        match self {
            ModelConfig::Deit(c) => c.in_chans,
            ModelConfig::Swin(c) => c.in_chans,
        }
    }

    pub fn patch_size(&self) -> usize {
        match self {
            ModelConfig::Deit(c) => c.patch_size,
            ModelConfig::Swin(c) => c.patch_size,
        }
    }

    pub fn drop_path(&self) -> f64 {
        match self {
            ModelConfig::Deit(c) => c.drop_path,
            ModelConfig::Swin(c) => c.drop_path,
        }
    }

    /// The embedding widths, stage after stage, `/`-separated (a DeiT's one).
    pub fn embed_dims(&self) -> String {
        self.stages().iter().map(|(e, _)| e.to_string()).collect::<Vec<_>>().join("/")
    }

    /// Every block's `heads/qk/v/mlp`, space-separated, stages separated by ` | `.
    pub fn block_widths(&self) -> String {
        let blocks = |b: &[BlockDims]| b.iter().map(|d| format!("{}/{}/{}/{}", d.heads, d.qk, d.v, d.mlp)).collect::<Vec<_>>().join(" ");
        self.stages().iter().map(|(_, b)| blocks(b)).collect::<Vec<_>>().join(" | ")
    }

    /// The widths as a short line: `E <e>: <blocks>`.
    pub fn widths(&self) -> String {
        format!("E {}: {}", self.embed_dims(), self.block_widths())
    }

    /// Shape problems as messages; empty when the model can be built.
    pub fn problems(&self) -> Vec<String> {
        match self {
            ModelConfig::Deit(c) => c.check(),
            ModelConfig::Swin(c) => c.problems(),
        }
    }

    /// The residual streams and the blocks on each: every stage's embedding width and its
    /// blocks' widths (a DeiT has one stream). What pruning changes.
    pub fn stages(&self) -> Vec<(usize, Vec<BlockDims>)> {
        match self {
            ModelConfig::Deit(c) => vec![(c.embed_dim, c.blocks.clone())],
            ModelConfig::Swin(c) => c.stages.iter().map(|s| (s.embed_dim, s.blocks.clone())).collect(),
        }
    }

    /// These shapes with other widths, as [`Self::stages`] gives them.
    pub fn with_stages(&self, stages: Vec<(usize, Vec<BlockDims>)>) -> Self {
        match self {
            ModelConfig::Deit(c) => {
                let (embed_dim, blocks) = stages.into_iter().next().expect("a DeiT has one stream");
                ModelConfig::Deit(VitConfig { embed_dim, blocks, ..c.clone() })
            }
            ModelConfig::Swin(c) => {
                ModelConfig::Swin(SwinConfig { stages: stages.into_iter().map(|(embed_dim, blocks)| SwinStage { embed_dim, blocks }).collect(), ..c.clone() })
            }
        }
    }

    /// The number of tokens each block of stream `stage` attends over and how many such
    /// groups an image has: DeiT's all tokens once, a Swin stage's windows.
    pub fn attention_shape(&self, stage: usize) -> (usize, usize) {
        match self {
            ModelConfig::Deit(c) => (c.num_tokens(), 1),
            ModelConfig::Swin(c) => {
                let (window, _) = c.window_shift(stage);
                let side = c.side(stage);
                (window * window, (side / window).pow(2))
            }
        }
    }

    pub fn as_deit(&self) -> Option<&VitConfig> {
        match self {
            ModelConfig::Deit(c) => Some(c),
            ModelConfig::Swin(_) => None,
        }
    }

    /// Reads a `dims.json`, naming the family's own parse error (an untagged enum's would only
    /// say that no family matched).
    pub fn read_json(path: &Path) -> Result<Self> {
        let text = crate::files::read_text(path).with_context(|| format!("{}: cannot read dims file", path.display()))?;
        let value: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
        let parsed = if value.get("stages").is_some() {
            serde_json::from_value(value).map(ModelConfig::Swin)
        } else {
            serde_json::from_value(value).map(ModelConfig::Deit)
        };
        let config = parsed.with_context(|| format!("{}: not a valid dims.json", path.display()))?;
        let problems = config.problems();
        if !problems.is_empty() {
            anyhow::bail!("{}: no buildable model: {}", path.display(), problems.join("; "));
        }
        Ok(config)
    }
}

impl From<VitConfig> for ModelConfig {
    fn from(c: VitConfig) -> Self {
        ModelConfig::Deit(c)
    }
}

impl From<SwinConfig> for ModelConfig {
    fn from(c: SwinConfig) -> Self {
        ModelConfig::Swin(c)
    }
}

/// A model of any family.
#[derive(Module, Debug)]
pub enum Model<B: Backend> {
    Deit(Vit<B>),
    Swin(Swin<B>),
}

impl<B: Backend> Model<B> {
    pub fn config(&self) -> ModelConfig {
        match self {
            Model::Deit(m) => ModelConfig::Deit(m.config.clone()),
            Model::Swin(m) => ModelConfig::Swin(m.config.clone()),
        }
    }

    /// `[batch, channels, height, width]` -> logits; a Swin has no distillation head.
    pub fn forward(&self, images: Tensor<B, 4>) -> VitOutput<B> {
        match self {
            Model::Deit(m) => m.forward(images),
            Model::Swin(m) => VitOutput { cls: m.forward(images), dist: None },
        }
    }

    /// Stochastic depth at `rate` in the last block, rising linearly from 0 in the first.
    pub fn with_drop_path(self, rate: f64) -> Self {
        match self {
            Model::Deit(m) => Model::Deit(m.with_drop_path(rate)),
            Model::Swin(m) => Model::Swin(m.with_drop_path(rate)),
        }
    }

    /// The stochastic depth rate of the last block.
    pub fn drop_path(&self) -> f64 {
        match self {
            Model::Deit(m) => m.config.drop_path,
            Model::Swin(m) => m.config.drop_path,
        }
    }

    /// The model in evaluation mode: stochastic depth off even under autodiff.
    pub fn without_drop_path(self) -> Self {
        self.with_drop_path(0.0)
    }

    /// Parameters of more than one dimension that training does not decay, as timm's
    /// `no_weight_decay()` (DeiT: position embedding and tokens; Swin: the relative position
    /// bias tables).
    pub fn no_weight_decay(&self) -> Vec<ParamId> {
        match self {
            Model::Deit(m) => m.no_weight_decay(),
            Model::Swin(m) => m.layers.iter().flat_map(|l| l.blocks.iter().map(|b| b.relative_position_bias_table.id)).collect(),
        }
    }

    pub fn as_deit(&self) -> Option<&Vit<B>> {
        match self {
            Model::Deit(m) => Some(m),
            Model::Swin(_) => None,
        }
    }

    /// The DeiT this is, or an error saying that `what` supports DeiT models only.
    pub fn into_deit(self, what: &str) -> Result<Vit<B>> {
        match self {
            Model::Deit(m) => Ok(m),
            Model::Swin(_) => anyhow::bail!("{what} supports DeiT models only, and this model is a Swin Transformer"),
        }
    }

    /// The device the model's parameters are on.
    pub fn device(&self) -> B::Device {
        match self {
            Model::Deit(m) => m.pos_embed.device(),
            Model::Swin(m) => m.head.weight.device(),
        }
    }
}
