//! The latency lookup table of METHOD.md section 4: the latency of one block as a function of
//! `(E, heads, qk, v, mlp)`, measured on a grid and interpolated multilinearly between grid
//! points. A model's estimated latency is the sum over its blocks.
//!
//! The JSON layout is the reference implementation's:
//! `{"EMB_768": {"QK_12_64": {"V_64": {"MLP_3072": seconds}}}}` (the QK key holds heads, then
//! qk). An embedding width of 0 is an implicit grid point of latency 0, as the reference pads.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::model::{BlockDims, ModelConfig};

/// The axes of the grid, each sorted ascending.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grid {
    pub emb: Vec<usize>,
    pub heads: Vec<usize>,
    pub qk: Vec<usize>,
    pub v: Vec<usize>,
    pub mlp: Vec<usize>,
}

impl Grid {
    /// The reference grid for DeiT-B (METHOD.md section 4).
    pub fn reference() -> Self {
        Self {
            emb: vec![256, 512, 768],
            heads: vec![1, 3, 6, 9, 12],
            qk: vec![1, 16, 32, 48, 64],
            v: vec![1, 16, 32, 48, 64],
            mlp: std::iter::once(1).chain((1..=24).map(|i| i * 128)).collect(),
        }
    }

    /// A small grid spanning the widths of a stream of width `embed_dim` and its blocks: the
    /// full width, halves and quarters, and 1 (not for E, where 0 is an implicit point).
    pub fn spanning(embed_dim: usize, blocks: &[BlockDims]) -> Self {
        let mut grid = Self::of_widths(embed_dim, blocks, |top| vec![1, top / 4, top / 2, top]);
        grid.emb.retain(|&e| e > 1);
        grid
    }

    /// Half and all of each width a stream of width `embed_dim` and its blocks have.
    pub fn coarse(embed_dim: usize, blocks: &[BlockDims]) -> Self {
        Self::of_widths(embed_dim, blocks, |top| vec![top / 2, top])
    }

    /// Each axis from `points(its widest value)`, kept positive, sorted and without repeats.
    fn of_widths(embed_dim: usize, blocks: &[BlockDims], points: impl Fn(usize) -> Vec<usize>) -> Self {
        let axis = |top: usize| {
            let mut a = points(top);
            a.retain(|&x| x >= 1);
            a.sort_unstable();
            a.dedup();
            a
        };
        let widest = |f: fn(&BlockDims) -> usize| axis(blocks.iter().map(f).max().unwrap_or(1));
        Self { emb: axis(embed_dim), heads: widest(|d| d.heads), qk: widest(|d| d.qk), v: widest(|d| d.v), mlp: widest(|d| d.mlp) }
    }

    pub fn points(&self) -> Vec<(usize, BlockDims)> {
        let mut out = Vec::new();
        for &e in &self.emb {
            for &heads in &self.heads {
                for &qk in &self.qk {
                    for &v in &self.v {
                        for &mlp in &self.mlp {
                            out.push((e, BlockDims { heads, qk, v, mlp }));
                        }
                    }
                }
            }
        }
        out
    }

    /// Problems as messages: empty, unsorted or zero axes.
    pub fn check(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (name, axis) in [("emb", &self.emb), ("heads", &self.heads), ("qk", &self.qk), ("v", &self.v), ("mlp", &self.mlp)] {
            if axis.is_empty() {
                problems.push(format!("grid.{name} is empty"));
            } else if axis.windows(2).any(|w| w[0] >= w[1]) || axis[0] == 0 {
                problems.push(format!("grid.{name} must be positive and strictly increasing, got {axis:?}"));
            }
        }
        problems
    }
}

/// Measured block latencies on a [`Grid`], in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyTable {
    pub grid: Grid,
    /// Row-major over (emb, heads, qk, v, mlp).
    values: Vec<f64>,
}

/// Where `x` falls on `axis`: the two bracketing indices and the weight of the upper one.
/// Outside the axis it clamps to the nearest end; `zero_below` adds an implicit point 0 -> 0.
fn bracket(axis: &[usize], x: usize) -> [(Option<usize>, f64); 2] {
    let x = x as f64;
    let first = axis[0] as f64;
    if x <= first {
        return [(Some(0), 1.0), (None, 0.0)];
    }
    for i in 1..axis.len() {
        let (lo, hi) = (axis[i - 1] as f64, axis[i] as f64);
        if x <= hi {
            let t = (x - lo) / (hi - lo);
            return [(Some(i - 1), 1.0 - t), (Some(i), t)];
        }
    }
    [(Some(axis.len() - 1), 1.0), (None, 0.0)]
}

impl LatencyTable {
    pub fn new(grid: Grid, values: Vec<f64>) -> Result<Self> {
        let n = grid.emb.len() * grid.heads.len() * grid.qk.len() * grid.v.len() * grid.mlp.len();
        if values.len() != n {
            bail!("a latency table on this grid needs {n} values, got {}", values.len());
        }
        Ok(Self { grid, values })
    }

    /// The table made monotone: no block is estimated slower than a wider one. Timings of
    /// small blocks are noisy (two quickstart tables of one machine an hour apart differ
    /// per point by 0.6x to 1.7x, and a sixth of neighbouring points are out of order), and a
    /// table where pruning a unit adds latency credits a negative saving and lets the estimate
    /// rise while pruning. Each value becomes the mean of the largest value at or below it and
    /// the smallest at or above it, componentwise over the grid; both are monotone, and a
    /// monotone table stays as it is.
    pub fn monotone(mut self) -> Self {
        let g = &self.grid;
        let lens = [g.emb.len(), g.heads.len(), g.qk.len(), g.v.len(), g.mlp.len()];
        let strides = [lens[1] * lens[2] * lens[3] * lens[4], lens[2] * lens[3] * lens[4], lens[3] * lens[4], lens[4], 1];
        let coord = |n: usize, a: usize| (n / strides[a]) % lens[a];
        let (mut below, mut above) = (self.values.clone(), self.values.clone());
        // Axis by axis: a running max up each axis keeps the axes already done monotone.
        for a in 0..5 {
            for n in 0..below.len() {
                if coord(n, a) > 0 {
                    below[n] = below[n].max(below[n - strides[a]]);
                }
            }
            for n in (0..above.len()).rev() {
                if coord(n, a) + 1 < lens[a] {
                    above[n] = above[n].min(above[n + strides[a]]);
                }
            }
        }
        self.values = below.iter().zip(&above).map(|(lo, hi)| (lo + hi) / 2.0).collect();
        self
    }

    fn index(&self, i: [usize; 5]) -> usize {
        let g = &self.grid;
        (((i[0] * g.heads.len() + i[1]) * g.qk.len() + i[2]) * g.v.len() + i[3]) * g.mlp.len() + i[4]
    }

    /// The latency of one block of width `e` with `dims`, interpolated multilinearly.
    pub fn lookup(&self, e: usize, dims: &BlockDims) -> f64 {
        if e == 0 {
            return 0.0;
        }
        let g = &self.grid;
        // Below the smallest embedding width the reference interpolates towards E = 0, latency 0.
        let emb: [(Option<usize>, f64); 2] = if e < g.emb[0] {
            [(Some(0), e as f64 / g.emb[0] as f64), (None, 0.0)]
        } else {
            bracket(&g.emb, e)
        };
        let axes = [emb, bracket(&g.heads, dims.heads), bracket(&g.qk, dims.qk), bracket(&g.v, dims.v), bracket(&g.mlp, dims.mlp)];
        let mut total = 0.0;
        for corner in 0..32 {
            let mut weight = 1.0;
            let mut idx = [0usize; 5];
            for (a, axis) in axes.iter().enumerate() {
                let (i, w) = axis[(corner >> a) & 1];
                match i {
                    Some(i) if w != 0.0 => {
                        idx[a] = i;
                        weight *= w;
                    }
                    _ => {
                        weight = 0.0;
                        break;
                    }
                }
            }
            if weight != 0.0 {
                total += weight * self.values[self.index(idx)];
            }
        }
        total
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut root = serde_json::Map::new();
        for (n, (e, d)) in self.grid.points().into_iter().enumerate() {
            let emb = root.entry(format!("EMB_{e}")).or_insert_with(|| serde_json::json!({}));
            let qk = emb.as_object_mut().unwrap().entry(format!("QK_{}_{}", d.heads, d.qk)).or_insert_with(|| serde_json::json!({}));
            let v = qk.as_object_mut().unwrap().entry(format!("V_{}", d.v)).or_insert_with(|| serde_json::json!({}));
            v.as_object_mut().unwrap().insert(format!("MLP_{}", d.mlp), serde_json::json!(self.values[n]));
        }
        serde_json::Value::Object(root)
    }

    /// The table in `value`, in the reference layout; `path` names it in errors. The grid is
    /// whatever keys it holds, and it must be complete (every combination measured).
    fn from_value(value: serde_json::Value, path: &Path) -> Result<Self> {
        type Nested = BTreeMap<String, BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>>>;
        let nested: Nested = serde_json::from_value(value)
            .with_context(|| format!("{}: not a latency table in the layout {{\"EMB_768\": {{\"QK_12_64\": {{\"V_64\": {{\"MLP_3072\": seconds}}}}}}}}", path.display()))?;
        let parse = |key: &str, prefix: &str| -> Result<Vec<usize>> {
            key.strip_prefix(prefix)
                .map(|r| r.split('_').map(|n| n.parse::<usize>()).collect::<std::result::Result<Vec<_>, _>>())
                .transpose()?
                .with_context(|| format!("{}: key `{key}` should look like {prefix}N", path.display()))
        };
        let mut points = BTreeMap::new();
        for (ek, qks) in &nested {
            let e = parse(ek, "EMB_")?[0];
            if e == 0 {
                continue; // the reference's explicit zero padding
            }
            for (qkk, vs) in qks {
                let hq = parse(qkk, "QK_")?;
                if hq.len() != 2 {
                    bail!("{}: key `{qkk}` should be QK_<heads>_<qk>", path.display());
                }
                for (vk, mlps) in vs {
                    let v = parse(vk, "V_")?[0];
                    for (mk, seconds) in mlps {
                        let mlp = parse(mk, "MLP_")?[0];
                        // Pruning would otherwise be steered by it, and blame the group sizes.
                        if !seconds.is_finite() || *seconds < 0.0 {
                            bail!("{}: {ek} / {qkk} / {vk} / {mk} is {seconds} seconds: a latency is a finite number, not negative", path.display());
                        }
                        points.insert((e, hq[0], hq[1], v, mlp), *seconds);
                    }
                }
            }
        }
        let axis = |f: fn(&(usize, usize, usize, usize, usize)) -> usize| {
            let mut a: Vec<usize> = points.keys().map(f).collect();
            a.sort_unstable();
            a.dedup();
            a
        };
        let grid = Grid { emb: axis(|k| k.0), heads: axis(|k| k.1), qk: axis(|k| k.2), v: axis(|k| k.3), mlp: axis(|k| k.4) };
        let mut values = Vec::new();
        for (e, d) in grid.points() {
            match points.get(&(e, d.heads, d.qk, d.v, d.mlp)) {
                Some(s) => values.push(*s),
                None => bail!(
                    "{}: the table has no entry EMB_{e} / QK_{}_{} / V_{} / MLP_{}; every grid combination must be measured",
                    path.display(),
                    d.heads,
                    d.qk,
                    d.v,
                    d.mlp
                ),
            }
        }
        Self::new(grid, values)
    }

    /// `emb,heads,qk,v,mlp,seconds,runtime` rows: one per grid point, each naming the runtime
    /// it was timed on.
    pub fn to_csv(&self, runtime: &str) -> String {
        let runtime = csv_field(runtime);
        let mut out = String::from("emb,heads,qk,v,mlp,seconds,runtime\n");
        for (n, (e, d)) in self.grid.points().into_iter().enumerate() {
            out.push_str(&format!("{e},{},{},{},{},{:e},{runtime}\n", d.heads, d.qk, d.v, d.mlp, self.values[n]));
        }
        out
    }
}

/// `text` as one CSV field: quoted where it holds a comma or a quote.
pub fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

/// What a model's latency estimate reads: a [`LatencyTable`] per residual stream, since each
/// Swin stage's blocks attend over their own number of tokens per window and windows per
/// image. A DeiT's has one, and its file is the reference layout; a Swin's file holds one
/// such table per stage, `{"stage_0": {"EMB_96": ...}, "stage_1": ...}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelLatency {
    pub stages: Vec<LatencyTable>,
}

impl ModelLatency {
    /// The estimated latency of a model of these widths (as `ModelConfig::stages` gives them):
    /// the sum of its blocks', each from its stage's table.
    pub fn estimate(&self, stages: &[(usize, Vec<BlockDims>)]) -> f64 {
        stages.iter().zip(&self.stages).map(|((e, blocks), t)| blocks.iter().map(|d| t.lookup(*e, d)).sum::<f64>()).sum()
    }

    pub fn model_latency(&self, model: &ModelConfig) -> f64 {
        self.estimate(&model.stages())
    }

    /// An error unless there is a table for each of `model`'s stages.
    pub fn check(&self, model: &ModelConfig) -> Result<()> {
        let n = model.stages().len();
        if self.stages.len() != n {
            bail!("the latency table has {} stage table(s), and the {} model has {n} stages\n  hint: profile the table from this model", self.stages.len(), model.family());
        }
        Ok(())
    }

    /// The model's widths past the ends of the table's grid, one line each: there the table
    /// gives its widest point's latency (a table profiled for a smaller model, say).
    pub fn beyond(&self, model: &ModelConfig) -> Vec<String> {
        let mut out = Vec::new();
        for (i, ((e, blocks), table)) in model.stages().iter().zip(&self.stages).enumerate() {
            let g = &table.grid;
            let widest = |axis: &[usize]| axis.last().copied().unwrap_or(0);
            let mut past = |name: &str, width: usize, axis: &[usize]| {
                if width > widest(axis) && !out.iter().any(|l: &String| l.starts_with(&format!("stage {i}: {name} "))) {
                    out.push(format!("stage {i}: {name} {width} is past the grid's widest, {}", widest(axis)));
                }
            };
            past("emb", *e, &g.emb);
            for d in blocks {
                past("heads", d.heads, &g.heads);
                past("qk", d.qk, &g.qk);
                past("v", d.v, &g.v);
                past("mlp", d.mlp, &g.mlp);
            }
        }
        out
    }

    pub fn to_json(&self) -> serde_json::Value {
        match self.stages.as_slice() {
            [one] => one.to_json(),
            many => serde_json::Value::Object(many.iter().enumerate().map(|(i, t)| (format!("stage_{i}"), t.to_json())).collect()),
        }
    }

    pub fn from_json(path: &Path) -> Result<Self> {
        let text = crate::files::read_text(path).with_context(|| format!("{}: cannot read latency table", path.display()))?;
        let value: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
        let staged = value.as_object().is_some_and(|o| !o.is_empty() && o.keys().all(|k| k.starts_with("stage_")));
        if !staged {
            return Ok(Self { stages: vec![LatencyTable::from_value(value, path)?] });
        }
        let mut stages = Vec::new();
        for i in 0.. {
            let Some(table) = value.get(format!("stage_{i}")) else { break };
            stages.push(LatencyTable::from_value(table.clone(), &path.join(format!("stage_{i}")))?);
        }
        if stages.len() != value.as_object().map_or(0, |o| o.len()) {
            bail!("{}: stage tables must be numbered stage_0, stage_1, ... without gaps", path.display());
        }
        Ok(Self { stages })
    }

    /// `emb,heads,qk,v,mlp,seconds,runtime` rows. led by a `stage` column when there are several.
    pub fn to_csv(&self, runtime: &str) -> String {
        match self.stages.as_slice() {
            [one] => one.to_csv(runtime),
            many => {
                let mut out = String::from("stage,emb,heads,qk,v,mlp,seconds,runtime\n");
                for (i, t) in many.iter().enumerate() {
                    out.extend(t.to_csv(runtime).lines().skip(1).map(|l| format!("{i},{l}\n")));
                }
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(heads: usize, qk: usize, v: usize, mlp: usize) -> BlockDims {
        BlockDims { heads, qk, v, mlp }
    }

    /// A table whose values are a known multilinear function, so interpolation must be exact.
    fn linear_table() -> LatencyTable {
        let grid = Grid { emb: vec![8, 16], heads: vec![1, 2, 4], qk: vec![1, 8], v: vec![1, 8], mlp: vec![1, 16, 32] };
        let f = |e: usize, d: &BlockDims| 1e-3 * e as f64 * (1.0 + d.heads as f64) + 1e-4 * (d.qk + 2 * d.v) as f64 + 1e-5 * d.mlp as f64;
        let values = grid.points().iter().map(|(e, d)| f(*e, d)).collect();
        LatencyTable::new(grid, values).unwrap()
    }

    #[test]
    fn a_monotone_table_stays_and_a_noisy_one_is_put_in_order() {
        let t = linear_table();
        assert_eq!(t.clone().monotone(), t);
        let mut noisy = t.clone();
        let points = noisy.grid.points();
        // Two points out of order: one timed slow, one fast.
        noisy.values[1] *= 3.0;
        let last = noisy.values.len() - 2;
        noisy.values[last] *= 0.2;
        let m = noisy.monotone();
        for (n, (e, d)) in points.iter().enumerate() {
            for (k, (e2, d2)) in points.iter().enumerate() {
                let wider = e2 >= e && d2.heads >= d.heads && d2.qk >= d.qk && d2.v >= d.v && d2.mlp >= d.mlp;
                assert!(!wider || m.values[k] >= m.values[n] - 1e-15, "{:?} is estimated faster than {:?}", (e2, d2), (e, d));
            }
        }
    }

    #[test]
    fn exact_at_grid_points_and_linear_between() {
        let t = linear_table();
        for (n, (e, d)) in t.grid.points().into_iter().enumerate() {
            assert_eq!(t.lookup(e, &d), t.values[n], "grid point {e} {d:?}");
        }
        let (a, b) = (t.lookup(8, &dims(2, 1, 8, 16)), t.lookup(8, &dims(2, 8, 8, 16)));
        let mid = t.lookup(8, &dims(2, 4, 8, 16)); // qk 4 is 3/7 of the way from 1 to 8
        assert!((mid - (a + (b - a) * 3.0 / 7.0)).abs() < 1e-15, "{mid} vs {a}..{b}");
        let (lo, hi) = (t.lookup(8, &dims(1, 8, 8, 32)), t.lookup(16, &dims(1, 8, 8, 32)));
        assert!((t.lookup(12, &dims(1, 8, 8, 32)) - (lo + hi) / 2.0).abs() < 1e-15);
        // Below the smallest E, towards the implicit E = 0 point of latency 0.
        assert!((t.lookup(4, &dims(1, 8, 8, 32)) - lo / 2.0).abs() < 1e-15);
    }

    #[test]
    fn model_latency_is_the_sum_of_its_blocks() {
        let t = linear_table();
        let mut m = crate::model::VitConfig::uniform(16, 4, 3, 16, 3, 4, 2.0, 10, false);
        m.blocks[1] = dims(2, 5, 3, 20);
        let latency = ModelLatency { stages: vec![t.clone()] };
        let by_hand = t.lookup(16, &m.blocks[0]) * 2.0 + t.lookup(16, &m.blocks[1]);
        assert!((latency.model_latency(&m.into()) - by_hand).abs() < 1e-15);
        // A Swin's stages each read their own table.
        let swin = crate::model::SwinConfig::uniform(16, 2, 3, 2, 8, &[2, 1], &[1, 2], 2.0, 5);
        let (a, b) = (t.clone(), LatencyTable::new(t.grid.clone(), t.values.iter().map(|v| 3.0 * v).collect()).unwrap());
        let latency = ModelLatency { stages: vec![a.clone(), b.clone()] };
        let (d0, d1) = (swin.stages[0].blocks[0], swin.stages[1].blocks[0]);
        let by_hand = 2.0 * a.lookup(8, &d0) + b.lookup(16, &d1);
        assert!((latency.model_latency(&swin.clone().into()) - by_hand).abs() < 1e-15);
        // Its file holds a table per stage and reads back the same.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lat.json");
        std::fs::write(&path, serde_json::to_vec(&latency.to_json()).unwrap()).unwrap();
        assert_eq!(ModelLatency::from_json(&path).unwrap(), latency);
        assert!(latency.to_csv("flex").starts_with("stage,emb,heads,qk,v,mlp,seconds,runtime\n0,8,1,1,1,1,"));
        let deit = ModelLatency { stages: vec![a] };
        assert!(deit.check(&swin.into()).unwrap_err().to_string().starts_with("the latency table has 1 stage table(s), and the swin model has 2 stages"));
    }

    #[test]
    fn json_round_trip_in_the_reference_layout() {
        let t = linear_table();
        let json = t.to_json();
        assert!(json["EMB_16"]["QK_4_8"]["V_1"]["MLP_32"].is_number());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lat.json");
        std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
        assert_eq!(ModelLatency::from_json(&path).unwrap().stages, [t]);

        let mut broken = json.clone();
        broken["EMB_16"]["QK_4_8"]["V_1"].as_object_mut().unwrap().remove("MLP_32");
        std::fs::write(&path, serde_json::to_vec(&broken).unwrap()).unwrap();
        let err = ModelLatency::from_json(&path).unwrap_err().to_string();
        assert!(err.ends_with("lat.json: the table has no entry EMB_16 / QK_4_8 / V_1 / MLP_32; every grid combination must be measured"), "{err}");

        // The audit's negative-seconds table was accepted, and prune then blamed the group sizes.
        let mut negative = json.clone();
        negative["EMB_16"]["QK_4_8"]["V_1"]["MLP_32"] = serde_json::json!(-0.5);
        std::fs::write(&path, serde_json::to_vec(&negative).unwrap()).unwrap();
        let err = ModelLatency::from_json(&path).unwrap_err().to_string();
        assert!(err.ends_with("lat.json: EMB_16 / QK_4_8 / V_1 / MLP_32 is -0.5 seconds: a latency is a finite number, not negative"), "{err}");
    }

    #[test]
    fn widths_past_the_grid_are_named() {
        let table = ModelLatency { stages: vec![linear_table()] };
        let fits = ModelConfig::Deit(crate::model::VitConfig::uniform(16, 4, 3, 16, 2, 2, 2.0, 10, false));
        assert!(table.beyond(&fits).is_empty(), "{:?}", table.beyond(&fits));
        // Twice the width: emb 32 past 16, qk and v 16 past 8, MLP 64 past 32.
        let wider = ModelConfig::Deit(crate::model::VitConfig::uniform(16, 4, 3, 32, 2, 2, 2.0, 10, false));
        assert_eq!(table.beyond(&wider), ["stage 0: emb 32 is past the grid's widest, 16", "stage 0: qk 16 is past the grid's widest, 8", "stage 0: v 16 is past the grid's widest, 8", "stage 0: mlp 64 is past the grid's widest, 32"]);
    }

    #[test]
    fn the_coarse_grid_is_half_and_all_of_each_width() {
        let g = Grid::coarse(768, &[BlockDims { heads: 12, qk: 64, v: 64, mlp: 3072 }]);
        assert_eq!((g.emb, g.heads, g.qk, g.v, g.mlp), (vec![384, 768], vec![6, 12], vec![32, 64], vec![32, 64], vec![1536, 3072]));
        assert_eq!(Grid::coarse(1, &[BlockDims { heads: 1, qk: 1, v: 1, mlp: 1 }]).points().len(), 1);
    }

    #[test]
    fn reference_grid_has_the_papers_axes() {
        let g = Grid::reference();
        assert_eq!(g.mlp.len(), 25);
        assert_eq!(*g.mlp.last().unwrap(), 3072);
        assert_eq!(g.points().len(), 3 * 5 * 5 * 5 * 25);
        assert!(g.check().is_empty());
    }
}
