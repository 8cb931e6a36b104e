//! `profile_latency`: times one transformer block on the pipeline's backend and device over a
//! grid of `(E, heads, qk, v, mlp)` (warm-up, then the median of repeats) and writes the
//! latency table (METHOD.md section 4) as `latency.json` in the reference layout and as
//! `latency.csv`. `table = "path.json"` imports a measured table instead.

use std::path::PathBuf;

use anyhow::Result;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Tensor};
use serde::{Deserialize, Serialize};

use super::{at_least_one, KeyDoc, StageContext};
use crate::files::atomic_write;
use crate::prune::{Grid, LatencyTable};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum GridChoice {
    /// 1, a quarter, a half and all of each of the model's widths.
    Spanning,
    /// METHOD.md's grid for DeiT-B.
    Reference,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProfileLatencySettings {
    pub grid: GridChoice,
    pub grid_emb: Option<Vec<usize>>,
    pub grid_heads: Option<Vec<usize>>,
    pub grid_qk: Option<Vec<usize>>,
    pub grid_v: Option<Vec<usize>>,
    pub grid_mlp: Option<Vec<usize>>,
    pub batch_size: usize,
    pub tokens: Option<usize>,
    pub warmup: usize,
    pub repeats: usize,
    pub table: Option<PathBuf>,
}

pub const KEYS: &[KeyDoc] = &[
    ("grid", "string", "`spanning` (from the model's widths) or `reference` (DeiT-B's)"),
    ("grid_emb", "integers", "embedding widths to time (overrides the grid's)"),
    ("grid_heads", "integers", "head counts to time (overrides the grid's)"),
    ("grid_qk", "integers", "query/key widths to time (overrides the grid's)"),
    ("grid_v", "integers", "value widths to time (overrides the grid's)"),
    ("grid_mlp", "integers", "MLP widths to time (overrides the grid's)"),
    ("batch_size", "integer", "images per timed forward pass"),
    ("tokens", "integer", "tokens per image (unset: the model's)"),
    ("warmup", "integer", "untimed passes per grid point"),
    ("repeats", "integer", "timed passes per grid point; the median is kept"),
    ("table", "path", "import this table (reference JSON layout) instead of measuring"),
];

impl Default for ProfileLatencySettings {
    fn default() -> Self {
        Self {
            grid: GridChoice::Spanning,
            grid_emb: None,
            grid_heads: None,
            grid_qk: None,
            grid_v: None,
            grid_mlp: None,
            batch_size: 64,
            tokens: None,
            warmup: 2,
            repeats: 5,
            table: None,
        }
    }
}

impl ProfileLatencySettings {
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        at_least_one(&mut p, &[("batch_size", self.batch_size), ("repeats", self.repeats)]);
        if let Some(t) = &self.table {
            if !t.exists() {
                p.push(("table".into(), format!("`{}` does not exist", t.display())));
            }
        }
        let axes = [("grid_emb", &self.grid_emb), ("grid_heads", &self.grid_heads), ("grid_qk", &self.grid_qk), ("grid_v", &self.grid_v), ("grid_mlp", &self.grid_mlp)];
        for (key, axis) in axes {
            if let Some(a) = axis {
                if a.is_empty() || a[0] == 0 || a.windows(2).any(|w| w[0] >= w[1]) {
                    p.push((key.into(), format!("must be positive and strictly increasing, got {a:?}")));
                }
            }
        }
        p
    }
}

pub fn run<B: AutodiffBackend>(ctx: &StageContext<B>, s: &ProfileLatencySettings) -> Result<serde_json::Value> {
    let device = ctx.device();
    let Some(model) = ctx.input_model::<B::InnerBackend>(device)? else {
        anyhow::bail!("profile_latency needs a model (for its widths and token count): give it an `input` stage");
    };
    let config = model.config.clone();
    let table = match &s.table {
        Some(path) => LatencyTable::from_json(path)?,
        None => {
            let mut grid = match s.grid {
                GridChoice::Spanning => Grid::spanning(&config),
                GridChoice::Reference => Grid::reference(),
            };
            let pick = |given: &Option<Vec<usize>>, axis: &mut Vec<usize>| {
                if let Some(g) = given {
                    *axis = g.clone();
                }
            };
            pick(&s.grid_emb, &mut grid.emb);
            pick(&s.grid_heads, &mut grid.heads);
            pick(&s.grid_qk, &mut grid.qk);
            pick(&s.grid_v, &mut grid.v);
            pick(&s.grid_mlp, &mut grid.mlp);
            measure(ctx, s, grid, s.tokens.unwrap_or(config.num_tokens()), config.head_dim)?
        }
    };
    atomic_write(&ctx.dir.join("latency.json"), &serde_json::to_vec_pretty(&table.to_json())?)?;
    atomic_write(&ctx.dir.join("latency.csv"), table.to_csv().as_bytes())?;
    let dense = table.model_latency(&config);
    ctx.log.info(&format!("{}: the input model's estimated latency is {:.3} ms per batch of {}", ctx.spec.name, dense * 1e3, s.batch_size));
    Ok(serde_json::json!({
        "points": table.grid.points().len(),
        "model_latency_s": dense,
        "batch_size": s.batch_size,
        "device": ctx.device_name,
    }))
}

/// The grid points measured so far, in `checkpoint/measured.json`.
#[derive(Serialize, Deserialize)]
struct Partial {
    grid: Grid,
    values: Vec<f64>,
}

fn measure<B: AutodiffBackend>(
    ctx: &StageContext<B>,
    s: &ProfileLatencySettings,
    grid: Grid,
    tokens: usize,
    head_dim: usize,
) -> Result<LatencyTable> {
    let problems = grid.check();
    if !problems.is_empty() {
        anyhow::bail!("{}", problems.join("; "));
    }
    let device = ctx.device();
    let points = grid.points();
    let mut progress = ctx.log.progress(&ctx.spec.name, points.len() as u64);
    // Points measured before a kill are kept: a job preempted more often than the whole
    // profile lasts still finishes.
    let partial = ctx.dir.join("checkpoint").join("measured.json");
    let mut values: Vec<f64> = std::fs::read(&partial)
        .ok()
        .and_then(|b| serde_json::from_slice::<Partial>(&b).ok())
        .filter(|p| p.grid == grid && p.values.len() <= points.len())
        .map(|p| p.values)
        .unwrap_or_default();
    if !values.is_empty() {
        ctx.log.info(&format!("{}: resuming after {} of {} grid points", ctx.spec.name, values.len(), points.len()));
        progress.set_position(values.len() as u64);
    }
    let scale = (head_dim as f64).powf(-0.5);
    for (e, dims) in &points[values.len()..] {
        crate::interrupt::check()?;
        let block = crate::model::Block::<B::InnerBackend>::new(*e, *dims, scale, 0.0, device);
        let x = Tensor::<B::InnerBackend, 3>::random([s.batch_size, tokens, *e], Distribution::Default, device);
        let alone = crate::machine::measuring();
        let median = crate::machine::median_time(s.warmup, s.repeats, || {
            let _ = block.forward(x.clone()).into_data();
            let _ = B::InnerBackend::sync(device);
        });
        drop(alone);
        values.push(median);
        atomic_write(&partial, &serde_json::to_vec(&Partial { grid: grid.clone(), values: values.clone() })?)?;
        progress.step(&format!("E {e} {dims:?}"));
    }
    progress.finish();
    LatencyTable::new(grid, values)
}
