//! `profile_latency`: times one transformer block on the pipeline's backend and device over a
//! grid of `(E, heads, qk, v, mlp)` (warm-up, then the median of repeats, the whole grid
//! `rounds` times and the median of the rounds kept, so that a slow spell of the machine
//! moves one round's points and not a region of the grid), makes it monotone
//! ([`LatencyTable::monotone`]) and writes the latency table (METHOD.md section 4) as
//! `latency.json` in the reference layout and as `latency.csv` (the medians before they were
//! put in order: `latency_measured.csv`); a Swin's, one table per stage, since each stage's
//! blocks attend over their own windows. `table = "path.json"` imports a measured table instead.

use std::path::PathBuf;

use anyhow::Result;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Tensor};
use serde::{Deserialize, Serialize};

use super::{at_least_one, KeyDoc, StageContext};
use crate::files::atomic_write;
use crate::model::{BlockDims, ModelConfig};
use crate::onnxruntime::{Clock, Provider, Runtime};
use crate::prune::{Grid, LatencyTable, ModelLatency};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum GridChoice {
    /// 1, a quarter, a half and all of each of the model's widths.
    Spanning,
    /// Half and all of each of the model's widths: 32 points per table, for smoke runs.
    Coarse,
    /// METHOD.md's grid for DeiT-B.
    Reference,
}

impl GridChoice {
    /// The grid for a stream of width `e` with `blocks`.
    pub fn grid(self, e: usize, blocks: &[BlockDims]) -> Grid {
        match self {
            GridChoice::Spanning => Grid::spanning(e, blocks),
            GridChoice::Coarse => Grid::coarse(e, blocks),
            GridChoice::Reference => Grid::reference(),
        }
    }
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
    pub rounds: usize,
    pub table: Option<PathBuf>,
    pub runtime: Runtime,
    pub onnxruntime_provider: Provider,
}

pub const KEYS: &[KeyDoc] = &[
    ("grid", "string", "`spanning` (1, 1/4, 1/2 and all of the model's widths), `coarse` (1/2 and all) or `reference` (DeiT-B's)"),
    ("grid_emb", "integers", "embedding widths to time (overrides the grid's)"),
    ("grid_heads", "integers", "head counts to time (overrides the grid's)"),
    ("grid_qk", "integers", "query/key widths to time (overrides the grid's)"),
    ("grid_v", "integers", "value widths to time (overrides the grid's)"),
    ("grid_mlp", "integers", "MLP widths to time (overrides the grid's)"),
    ("batch_size", "integer", "images per timed forward pass"),
    ("tokens", "integer", "tokens per image (unset: the model's)"),
    ("warmup", "integer", "untimed passes per grid point"),
    ("repeats", "integer", "timed passes per grid point; the median is kept"),
    ("rounds", "integer", "times the whole grid is timed; each point's median over the rounds is kept"),
    ("table", "path", "import this table (reference JSON layout) instead of measuring"),
    RUNTIME_KEY,
    PROVIDER_KEY,
];

/// The `runtime` key of the stages that time (profile_latency, prune, evaluate).
pub const RUNTIME_KEY: KeyDoc = ("runtime", "string", "where latency is timed: `backend` (the pipeline's backend) or `onnxruntime` (exported to ONNX as `runner export` writes it, timed in ONNX Runtime at the runner's threads: `pip install onnxruntime`)");
pub const PROVIDER_KEY: KeyDoc = ("onnxruntime_provider", "string", "with runtime = \"onnxruntime\": `cpu` or `cuda` (onnxruntime-gpu's CUDA provider)");

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
            rounds: 3,
            table: None,
            runtime: Runtime::Backend,
            onnxruntime_provider: Provider::Cpu,
        }
    }
}

/// The most tokens per image `tokens` takes (a 1024-px image in patches of 4).
const MAX_TOKENS: usize = 1 << 16;

impl ProfileLatencySettings {
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        at_least_one(&mut p, &[("batch_size", self.batch_size)]);
        super::repetitions(&mut p, &[("repeats", self.repeats, 1), ("warmup", self.warmup, 0), ("rounds", self.rounds, 1)]);
        if let Some(problem) = self.table.as_deref().and_then(|t| crate::files::input_problem(t, crate::files::MAX_TEXT)) {
            p.push(("table".into(), problem));
        }
        if self.table.is_some() && self.runtime != Runtime::Backend {
            p.push(("runtime".into(), "times the profile, and `table` imports one instead: leave one of them unset".into()));
        }
        if let Some(t) = self.tokens.filter(|t| *t == 0 || *t > MAX_TOKENS) {
            p.push(("tokens".into(), format!("must be from 1 to {MAX_TOKENS}, got {t}")));
        }
        let axes = [("grid_emb", &self.grid_emb), ("grid_heads", &self.grid_heads), ("grid_qk", &self.grid_qk), ("grid_v", &self.grid_v), ("grid_mlp", &self.grid_mlp)];
        for (key, axis) in axes {
            if let Some(a) = axis {
                if a.is_empty() || a[0] == 0 || a.windows(2).any(|w| w[0] >= w[1]) || a.iter().any(|w| *w > crate::model::MAX_WIDTH) {
                    p.push((key.into(), format!("must be positive, strictly increasing and at most {}, got {a:?}", crate::model::MAX_WIDTH)));
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
    let config = model.config();
    let clock = Clock::new(s.runtime, s.onnxruntime_provider, format!("{} on {}", ctx.backend, ctx.device_name))?;
    let runtime = match &s.table {
        Some(path) => format!("imported from {}", path.display()),
        None => clock.describe(),
    };
    let latency = match &s.table {
        Some(path) => ModelLatency::from_json(path)?,
        None => {
            let stages = config.stages();
            let mut tables = Vec::with_capacity(stages.len());
            for (stage, (e, blocks)) in stages.iter().enumerate() {
                let mut grid = s.grid.grid(*e, blocks);
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
                tables.push(measure(ctx, s, &clock, grid, &config, stage)?);
            }
            let measured = ModelLatency { stages: tables };
            atomic_write(&ctx.dir.join("latency_measured.csv"), measured.to_csv(&runtime).as_bytes())?;
            ModelLatency { stages: measured.stages.into_iter().map(LatencyTable::monotone).collect() }
        }
    };
    latency.check(&config)?;
    if s.table.is_some() {
        for line in latency.beyond(&config) {
            ctx.warn(&format!("the imported table does not reach the model's widths ({line}): the estimate there is the widest point's latency\n  hint: profile the table from this model (leave `table` unset)"));
        }
    }
    atomic_write(&ctx.dir.join("latency.json"), &serde_json::to_vec_pretty(&latency.to_json())?)?;
    atomic_write(&ctx.dir.join("latency.csv"), latency.to_csv(&runtime).as_bytes())?;
    let dense = latency.model_latency(&config);
    ctx.log.info(&format!("{}: the input model's estimated latency is {:.3} ms per batch of {} ({runtime})", ctx.spec.name, dense * 1e3, s.batch_size));
    Ok(serde_json::json!({
        "points": latency.stages.iter().map(|t| t.grid.points().len()).sum::<usize>(),
        "model_latency_s": dense,
        "batch_size": s.batch_size,
        "device": ctx.device_name,
        "runtime": runtime,
    }))
}

/// The grid points measured so far, in `checkpoint/measured.json`.
#[derive(Serialize, Deserialize)]
struct Partial {
    grid: Grid,
    values: Vec<f64>,
}

/// Times one block of `config`'s stream `stage` at every point of `grid`, `rounds` times; each
/// point's median over the rounds.
fn measure<B: AutodiffBackend>(ctx: &StageContext<B>, s: &ProfileLatencySettings, clock: &Clock, grid: Grid, config: &ModelConfig, stage: usize) -> Result<LatencyTable> {
    let device = ctx.device();
    let points = grid.points();
    let name = if config.stages().len() > 1 { format!("{} stage {stage}", ctx.spec.name) } else { ctx.spec.name.clone() };
    let mut progress = ctx.log.progress(&name, (points.len() * s.rounds) as u64);
    // Points measured before a kill are kept: a job preempted more often than the whole
    // profile lasts still finishes.
    let partial = ctx.dir.join("checkpoint").join(if stage == 0 { "measured.json".to_string() } else { format!("measured_stage_{stage}.json") });
    let values: Vec<f64> = std::fs::read(&partial)
        .ok()
        .and_then(|b| serde_json::from_slice::<Partial>(&b).ok())
        .filter(|p| p.grid == grid && p.values.len() <= points.len() * s.rounds)
        .map(|p| p.values)
        .unwrap_or_default();
    if !values.is_empty() {
        ctx.log.info(&format!("{name}: resuming after {} of {} timed points ({} grid points, {} rounds)", values.len(), points.len() * s.rounds, points.len(), s.rounds));
        progress.set_position(values.len() as u64);
    }
    let workload = Workload { batch: s.batch_size, tokens: s.tokens, warmup: s.warmup, repeats: s.repeats };
    let table = profile::<B::InnerBackend>(clock, config, stage, grid.clone(), &workload, s.rounds, values, device, |values| {
        let n = values.len() - 1;
        atomic_write(&partial, &serde_json::to_vec(&Partial { grid: grid.clone(), values: values.to_vec() })?)?;
        let (e, dims) = &points[n % points.len()];
        progress.step(&format!("round {} of {}: E {e} {dims:?}", n / points.len() + 1, s.rounds));
        Ok(())
    })?;
    progress.finish();
    Ok(table)
}

/// Times one block of `config`'s stream `stage` at every point of `grid` on `clock`, the whole
/// grid `rounds` times over, on from `values` (the timings a killed run kept, in that order);
/// `after` sees the timings so far after each. Each point's median over the rounds.
#[allow(clippy::too_many_arguments)]
pub fn profile<B: Backend>(
    clock: &Clock,
    config: &ModelConfig,
    stage: usize,
    grid: Grid,
    workload: &Workload,
    rounds: usize,
    mut values: Vec<f64>,
    device: &B::Device,
    mut after: impl FnMut(&[f64]) -> Result<()>,
) -> Result<LatencyTable> {
    let problems = grid.check();
    if !problems.is_empty() {
        anyhow::bail!("{}", problems.join("; "));
    }
    let points = grid.points();
    values.truncate(points.len() * rounds);
    for n in values.len()..points.len() * rounds {
        crate::interrupt::check()?;
        let (e, dims) = &points[n % points.len()];
        values.push(clock.time_block::<B>(config, stage, *e, dims, workload, device)?);
        after(&values)?;
    }
    let medians = (0..points.len()).map(|p| crate::machine::median(values.iter().skip(p).step_by(points.len()).copied().collect())).collect();
    LatencyTable::new(grid, medians)
}

/// How a block is timed: `batch` images of `tokens` tokens each (unset: the model's), after
/// `warmup` untimed passes, the median of `repeats`.
pub struct Workload {
    pub batch: usize,
    pub tokens: Option<usize>,
    pub warmup: usize,
    pub repeats: usize,
}

/// The median seconds of one block of `config`'s stream `stage` at width `e` and `dims`, on
/// random input, with the machine's measuring lock held: DeiT's at the model's token count, a
/// Swin stage's as that stage runs it (its windows, shifted where the stage shifts).
pub fn time_block<B: Backend>(config: &ModelConfig, stage: usize, e: usize, dims: &BlockDims, w: &Workload, device: &B::Device) -> f64 {
    let time = |run: &dyn Fn()| {
        let _alone = crate::machine::measuring();
        crate::machine::median_time(w.warmup, w.repeats, || {
            run();
            let _ = B::sync(device);
        })
    };
    match config {
        ModelConfig::Deit(c) => {
            let block = c.block::<B>(e, *dims, device);
            let x = Tensor::<B, 3>::random([w.batch, w.tokens.unwrap_or(c.num_tokens()), e], Distribution::Default, device);
            time(&|| drop(block.forward(x.clone()).into_data()))
        }
        ModelConfig::Swin(c) => {
            let scale = (c.head_dim as f64).powf(-0.5);
            let (window, shift) = c.window_shift(stage);
            let side = c.side(stage);
            let block = crate::model::SwinBlock::<B>::new(e, *dims, window, shift, side, scale, device);
            let x = Tensor::<B, 3>::random([w.batch, side * side, e], Distribution::Default, device);
            time(&|| drop(block.forward(x.clone(), None).into_data()))
        }
    }
}
