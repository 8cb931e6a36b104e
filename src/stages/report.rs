//! `report`: the paper's Table 1 for this pipeline. It reads the metrics of the `evaluate`
//! stages it names (the first one is the dense baseline of the speedup column) and the
//! trajectories of the `prune` stages it names, and writes `table.csv` (with the paper's rows
//! beside the measured ones, marked `source = paper`), `dims.csv`, `widths.svg`,
//! `trajectory.svg`, `curves.svg` (the per-epoch curves of the training stages it names) and a
//! `README.md` that shows them; `results/<pipeline>/` gets a copy.

use anyhow::{Context, Result};
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use super::{KeyDoc, StageContext, StageSettings, StageSpec};
use crate::files::atomic_write;
use crate::manifest::Manifest;
use crate::report::{plots, table};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReportSettings {
    pub models: Vec<String>,
    pub prunes: Vec<String>,
    /// Training stages (train, distill) whose per-epoch curves are plotted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub curves: Vec<String>,
    pub paper: bool,
}

pub const KEYS: &[KeyDoc] = &[
    ("models", "list of strings", "evaluate stages to tabulate; the first is the dense baseline of `speedup`"),
    ("prunes", "list of strings", "prune stages whose trajectories are plotted"),
    ("curves", "list of strings", "train and distill stages whose per-epoch loss and top-1 are plotted"),
    ("paper", "bool", "add the paper's Table 1 rows (ImageNet-1K, V100), marked source = paper"),
];

impl Default for ReportSettings {
    fn default() -> Self {
        Self { models: Vec::new(), prunes: Vec::new(), curves: Vec::new(), paper: true }
    }
}

impl ReportSettings {
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if self.models.is_empty() {
            p.push(("models".into(), "is required: the evaluate stages to tabulate, dense model first".into()));
        }
        p
    }

    pub fn refs(&self) -> Vec<(&'static str, &str)> {
        let models = self.models.iter().map(|m| ("models", m.as_str()));
        let prunes = self.prunes.iter().map(|p| ("prunes", p.as_str()));
        models.chain(prunes).chain(self.curves.iter().map(|c| ("curves", c.as_str()))).collect()
    }
}

/// Files the report writes, all copied to `results/<pipeline>/`.
pub const OUTPUTS: [&str; 7] = ["table.csv", "dims.csv", "accuracy.svg", "widths.svg", "trajectory.svg", "curves.svg", "README.md"];

pub fn run<B: AutodiffBackend>(ctx: &StageContext<B>, s: &ReportSettings) -> Result<serde_json::Value> {
    let mut evaluated = Vec::new();
    let mut widths = Vec::new();
    for name in &s.models {
        let metrics = Manifest::read(&ctx.stage_dir(name)?)?.metrics;
        widths.push(table::Widths::from_metrics(&metrics).with_context(|| format!("stage `{name}`: re-run it with --force {name}"))?);
        evaluated.push((metrics, latency_target(ctx.specs, name)));
    }
    let mut rows = table::measured_rows(&evaluated)?;
    if s.paper {
        rows.extend(table::paper_rows());
    }
    let mut trajectories = Vec::new();
    for name in &s.prunes {
        trajectories.push((name.clone(), table::read_pruning_log(&ctx.stage_dir(name)?.join("pruning_log.csv"))?));
    }

    let mut curves = Vec::new();
    for name in &s.curves {
        let metrics = Manifest::read(&ctx.stage_dir(name)?)?.metrics;
        curves.push(plots::Curve::from_metrics(name, &metrics).with_context(|| format!("report.curves: stage `{name}`"))?);
    }

    table::write_csv(&ctx.dir.join("table.csv"), &rows)?;
    table::write_dims(&ctx.dir.join("dims.csv"), &widths)?;
    plots::accuracy(&ctx.dir.join("accuracy.svg"), &rows)?;
    plots::widths(&ctx.dir.join("widths.svg"), &widths)?;
    if !trajectories.is_empty() {
        plots::trajectory(&ctx.dir.join("trajectory.svg"), &trajectories)?;
    }
    if !curves.is_empty() {
        plots::curves(&ctx.dir.join("curves.svg"), &curves)?;
    }
    let mut readme = readme(ctx, &rows, &trajectories);
    if !curves.is_empty() {
        readme.push_str("## Training curves\n\n![training loss and top-1 against epoch](curves.svg)\n\nPer epoch, with images/s, in each run's `runs/<pipeline>/<stamp>/<stage>/curves.csv` and TensorBoard events (`tensorboard --logdir runs/`).\n");
    }
    atomic_write(&ctx.dir.join("README.md"), readme.as_bytes())?;
    Ok(serde_json::json!({ "rows": rows.len(), "models": s.models, "prunes": s.prunes, "curves": s.curves }))
}

/// The target of the first prune stage upstream of `stage` (its input, its input's, ...).
pub fn latency_target(specs: &[StageSpec], stage: &str) -> Option<f64> {
    upstream_prune(specs, stage).map(|(_, target)| target)
}

/// The first prune stage upstream of `stage` and its latency target.
pub fn upstream_prune<'a>(specs: &'a [StageSpec], stage: &str) -> Option<(&'a str, f64)> {
    let mut name = stage;
    while let Some(spec) = specs.iter().find(|st| st.name == name) {
        if let StageSettings::Prune(p) = &spec.settings {
            return Some((spec.name.as_str(), p.latency_target));
        }
        name = spec.input.as_deref()?;
    }
    None
}

fn readme<B: AutodiffBackend>(ctx: &StageContext<B>, rows: &[table::Row], trajectories: &[(String, Vec<table::PruneStep>)]) -> String {
    let paper = if rows.iter().any(|r| r.source == "paper") {
        "; `paper` rows are the paper's Table 1 (ImageNet-1K, V100 at batch 256), for comparison"
    } else {
        ""
    };
    let mut s = format!(
        "# {name}\n\nWritten by the `{stage}` stage of `runner run` on the pipeline `{name}` ({backend}, {device}); \
         every `measured` row was measured by this repository's `evaluate` stage{paper}. `speedup` is \
         over the first measured row's model, on the same device: the median of paired measurements (slowest and \
         fastest pair, and their count, beside it) where the row's `evaluate` stage names that model as its \
         `baseline`, else the ratio of the two throughputs.\n\n{table}\n",
        name = ctx.pipeline_name,
        stage = ctx.spec.name,
        backend = ctx.backend,
        device = ctx.device_name,
        table = table::markdown(rows),
    );
    s.push_str("Files: [table.csv](table.csv), [dims.csv](dims.csv) (per-block widths; `qk` and `v` per head).\n\n");
    s.push_str("![top-1 against measured speedup](accuracy.svg)\n\n");
    s.push_str("## Where the widths went\n\n![per-block widths](widths.svg)\n\n");
    if !trajectories.is_empty() {
        s.push_str("## Pruning trajectory\n\n![estimated latency and loss against step](trajectory.svg)\n\n");
        for (name, steps) in trajectories {
            if let Some(last) = steps.last() {
                let short = match upstream_prune(ctx.specs, name) {
                    Some((_, target)) if last.latency_ratio > target => {
                        format!(" **Warning: short of its latency target {target}**: it stopped at max_prune_steps or with nothing left to prune.")
                    }
                    _ => String::new(),
                };
                s.push_str(&format!(
                    "- `{name}`: {} pruning steps over {} optimizer steps, estimated latency {:.3} of dense, final widths (heads/qk/v/mlp per block) `{}`, EMB {}.{short}\n",
                    last.prune_step, last.step, last.latency_ratio, last.widths, last.embed_dim
                ));
            }
        }
    }
    s
}
