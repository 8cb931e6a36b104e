//! The paper's Table 1 as CSV: measured rows from `evaluate` stages beside the paper's own
//! (METHOD.md section 7), and the per-block widths behind the parameter-redistribution figure.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::model::BlockDims;
use crate::files::atomic_write;

/// One row of `table.csv`. `source` is `measured` (this repo's code, on `backend`/`device`) or
/// `paper` (copied from the paper, V100 at batch 256; it gives no top-5 or throughput).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub source: String,
    pub model: String,
    pub dataset: String,
    pub top1: f64,
    pub top5: Option<f64>,
    pub params_m: f64,
    pub gflops: f64,
    pub images_per_s: Option<f64>,
    /// Over the first (dense) model, on the same device: the median of paired measurements
    /// where the row's `evaluate` stage names that model as its `baseline`, else the ratio of
    /// the two stages' throughputs.
    pub speedup: Option<f64>,
    /// The slowest and fastest of the pairs' ratios, and how many pairs; empty when the
    /// speedup is a ratio of throughputs.
    #[serde(default)]
    pub speedup_min: Option<f64>,
    #[serde(default)]
    pub speedup_max: Option<f64>,
    #[serde(default)]
    pub speedup_pairs: Option<u64>,
    pub resolution: usize,
    pub latency_target: Option<f64>,
    pub backend: String,
    pub device: String,
    /// Where images/s and the speedup were timed: the backend, or ONNX Runtime with its version,
    /// provider and threads.
    #[serde(default)]
    pub runtime: String,
}

/// The paper's Table 1 (NViT, ImageNet-1K, 224 px, from DeiT-B distilled): model, top-1,
/// params (M), GFLOPs, speedup on a V100 at batch 256, latency target.
const PAPER: [(&str, f64, f64, f64, f64, Option<f64>); 7] = [
    ("DeiT-B", 83.36, 86.0, 17.6, 1.00, None),
    ("NViT-B", 83.29, 34.0, 6.8, 1.86, Some(0.54)),
    ("NViT-H", 82.95, 30.0, 6.2, 2.01, Some(0.50)),
    ("NViT-S", 82.19, 21.0, 4.2, 2.52, Some(0.39)),
    ("NViT-T", 76.21, 6.9, 1.3, 4.97, Some(0.19)),
    ("DeiT-S", 81.20, 22.0, 4.6, 2.44, None),
    ("DeiT-T", 74.50, 5.6, 1.2, 5.18, None),
];

pub fn paper_rows() -> Vec<Row> {
    PAPER
        .iter()
        .map(|&(model, top1, params_m, gflops, speedup, latency_target)| Row {
            source: "paper".into(),
            model: model.into(),
            dataset: "imagenet-1k".into(),
            top1,
            top5: None,
            params_m,
            gflops,
            images_per_s: None,
            speedup: Some(speedup),
            speedup_min: None,
            speedup_max: None,
            speedup_pairs: None,
            resolution: 224,
            latency_target,
            backend: String::new(),
            device: "V100, batch 256".into(),
            runtime: "PyTorch".into(),
        })
        .collect()
}

/// Measured rows from `evaluate` metrics, the first being the dense baseline of `speedup`;
/// each with the latency target its model was pruned to, if any. A row whose metrics carry a
/// paired `speedup` (its stage named a `baseline`) keeps it, with its spread.
pub fn measured_rows(models: &[(serde_json::Value, Option<f64>)]) -> Result<Vec<Row>> {
    let base = models.first().and_then(|(m, _)| m["images_per_s"].as_f64());
    let round = |x: f64| (x * 100.0).round() / 100.0;
    models
        .iter()
        .map(|(m, latency_target)| {
            let num = |key: &str| m[key].as_f64().with_context(|| format!("the evaluate metrics have no number `{key}`"));
            let text = |key: &str| m[key].as_str().unwrap_or_default().to_string();
            let images_per_s = num("images_per_s")?;
            Ok(Row {
                source: "measured".into(),
                model: text("model"),
                dataset: text("dataset"),
                top1: num("top1")?,
                top5: m["top5"].as_f64(),
                params_m: num("params_m")?,
                gflops: num("gflops")?,
                images_per_s: Some(images_per_s),
                speedup: m["speedup"].as_f64().or(base.map(|b| round(images_per_s / b))),
                speedup_min: m["speedup_min"].as_f64(),
                speedup_max: m["speedup_max"].as_f64(),
                speedup_pairs: m["speedup_pairs"].as_u64(),
                resolution: m["image_size"].as_u64().unwrap_or_default() as usize,
                latency_target: *latency_target,
                backend: text("backend"),
                device: text("device"),
                runtime: text("runtime"),
            })
        })
        .collect()
}

/// One row of a seed sweep's `seeds.csv`: a model of one setting, measured once per seed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Spread {
    /// The point's grid values other than the seed (empty when the seed is the only axis).
    pub setting: String,
    pub model: String,
    pub seeds: usize,
    pub top1_mean: f64,
    /// Sample standard deviation (n - 1); 0 for one seed.
    pub top1_std: f64,
    pub top1_min: f64,
    pub top1_max: f64,
    pub speedup_mean: Option<f64>,
    pub speedup_std: Option<f64>,
    pub params_m_mean: f64,
    pub latency_target: Option<f64>,
    pub latency_reached_mean: Option<f64>,
}

fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 { xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

/// Rows of a sweep whose points differ only in their seed gathered per (setting, model), in
/// the order each first appears: `(setting, row, latency reached)` in, mean and spread out.
pub fn over_seeds(rows: &[(String, Row, Option<f64>)]) -> Vec<Spread> {
    let mut keys: Vec<(&str, &str)> = Vec::new();
    for (setting, row, _) in rows {
        if !keys.contains(&(setting.as_str(), row.model.as_str())) {
            keys.push((setting, &row.model));
        }
    }
    keys.into_iter()
        .map(|(setting, model)| {
            let same: Vec<&(String, Row, Option<f64>)> = rows.iter().filter(|(s, r, _)| s == setting && r.model == model).collect();
            let all = |f: &dyn Fn(&(String, Row, Option<f64>)) -> Option<f64>| -> Option<Vec<f64>> { same.iter().map(|r| f(r)).collect() };
            let top1: Vec<f64> = same.iter().map(|(_, r, _)| r.top1).collect();
            let (top1_mean, top1_std) = mean_std(&top1);
            let speedup = all(&|(_, r, _)| r.speedup).map(|v| mean_std(&v));
            Spread {
                setting: setting.to_string(),
                model: model.to_string(),
                seeds: same.len(),
                top1_mean,
                top1_std,
                top1_min: top1.iter().copied().fold(f64::INFINITY, f64::min),
                top1_max: top1.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                speedup_mean: speedup.map(|s| s.0),
                speedup_std: speedup.map(|s| s.1),
                params_m_mean: mean_std(&same.iter().map(|(_, r, _)| r.params_m).collect::<Vec<_>>()).0,
                latency_target: same[0].1.latency_target,
                latency_reached_mean: all(&|(_, _, reached)| *reached).map(|v| mean_std(&v).0),
            }
        })
        .collect()
}

/// A Markdown rendering of a seed summary for the generated README.
pub fn spread_markdown(rows: &[Spread]) -> String {
    let mut s = String::from("| setting | model | seeds | top-1 mean ± std | min – max | params (M) | est. latency reached | measured speedup |\n|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let speedup = match (r.speedup_mean, r.speedup_std) {
            (Some(m), Some(sd)) => format!("{m:.2} ± {sd:.2}"),
            _ => "—".into(),
        };
        s.push_str(&format!(
            "| {} | {} | {} | {:.2} ± {:.2} | {:.2} – {:.2} | {:.3} | {} | {} |\n",
            r.setting,
            r.model,
            r.seeds,
            r.top1_mean,
            r.top1_std,
            r.top1_min,
            r.top1_max,
            r.params_m_mean,
            r.latency_reached_mean.map_or("—".into(), |v| format!("{v:.3}")),
            speedup
        ));
    }
    s
}

/// Per-block widths of one model, as `dims.csv` lists them: per stream (a Swin's stages;
/// DeiT's one), its embedding width and its blocks'.
#[derive(Debug, Clone, PartialEq)]
pub struct Widths {
    pub model: String,
    pub stages: Vec<(usize, Vec<BlockDims>)>,
}

impl Widths {
    /// From `evaluate` metrics: a DeiT's `embed_dim` and `blocks`, a Swin's `stages`.
    pub fn from_metrics(m: &serde_json::Value) -> Result<Self> {
        let model = m["model"].as_str().unwrap_or_default().to_string();
        if let Some(stages) = m.get("stages") {
            let stages: Vec<crate::model::SwinStage> = serde_json::from_value(stages.clone()).with_context(|| format!("the evaluate metrics of `{model}` have malformed `stages`"))?;
            return Ok(Self { model, stages: stages.into_iter().map(|s| (s.embed_dim, s.blocks)).collect() });
        }
        let embed_dim = m["embed_dim"].as_u64().with_context(|| format!("the evaluate metrics of `{model}` have no `embed_dim`"))?;
        let blocks = serde_json::from_value(m["blocks"].clone()).with_context(|| format!("the evaluate metrics of `{model}` have no `blocks`"))?;
        Ok(Self { model, stages: vec![(embed_dim as usize, blocks)] })
    }

    /// Every block with its stream's width, in order.
    pub fn blocks(&self) -> Vec<(usize, BlockDims)> {
        self.stages.iter().flat_map(|(e, blocks)| blocks.iter().map(move |d| (*e, *d))).collect()
    }

    /// The embedding widths, `/`-separated when there are several.
    pub fn embed_dims(&self) -> String {
        self.stages.iter().map(|(e, _)| e.to_string()).collect::<Vec<_>>().join("/")
    }
}

pub fn write_csv<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    for row in rows {
        writer.serialize(row)?;
    }
    atomic_write(path, &writer.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?)
}

/// `dims.csv`: one row per model and block; `qk` and `v` are per head.
pub fn write_dims(path: &Path, models: &[Widths]) -> Result<()> {
    #[derive(Serialize)]
    struct DimsRow<'a> {
        model: &'a str,
        block: usize,
        embed_dim: usize,
        heads: usize,
        qk: usize,
        v: usize,
        mlp: usize,
    }
    let rows: Vec<DimsRow> = models
        .iter()
        .flat_map(|w| {
            w.blocks().into_iter().enumerate().map(|(block, (embed_dim, d))| DimsRow {
                model: &w.model,
                block,
                embed_dim,
                heads: d.heads,
                qk: d.qk,
                v: d.v,
                mlp: d.mlp,
            })
        })
        .collect();
    write_csv(path, &rows)
}

/// One line of a prune stage's `pruning_log.csv`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PruneStep {
    pub step: usize,
    pub prune_step: usize,
    pub est_latency_s: f64,
    pub latency_ratio: f64,
    pub params: u64,
    pub flops: u64,
    pub loss: f64,
    /// The embedding width; a Swin's stages' `/`-separated.
    pub embed_dim: String,
    pub widths: String,
}

pub fn read_pruning_log(path: &Path) -> Result<Vec<PruneStep>> {
    let mut reader = csv::Reader::from_path(path).with_context(|| format!("{}: cannot read", path.display()))?;
    reader
        .deserialize()
        .enumerate()
        .map(|(i, r)| r.with_context(|| format!("{}: malformed row {}", path.display(), i + 2)))
        .collect()
}

/// A Markdown rendering of the table for the generated README.
pub fn markdown(rows: &[Row]) -> String {
    let opt = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_else(|| "—".into());
    let mut s = String::from(
        "| source | model | dataset | top-1 | top-5 | params (M) | GFLOPs | img/s | speedup | res | latency target | device |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.source,
            r.model,
            r.dataset,
            r.top1,
            opt(r.top5),
            r.params_m,
            r.gflops,
            opt(r.images_per_s),
            match (r.speedup, r.speedup_min, r.speedup_max, r.speedup_pairs) {
                (Some(x), Some(lo), Some(hi), Some(n)) => format!("{x} ({lo}–{hi}, {n} pairs)"),
                (x, ..) => opt(x),
            },
            r.resolution,
            opt(r.latency_target),
            match (r.backend.is_empty(), r.runtime.starts_with("onnxruntime")) {
                (true, _) => r.device.clone(),
                (false, false) => format!("{} {}", r.backend, r.device),
                (false, true) => format!("{} {}, timed in {}", r.backend, r.device, r.runtime),
            }
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_gathered_per_setting_and_model_with_the_sample_spread() {
        let row = |model: &str, top1: f64, speedup: f64| Row {
            source: "measured".into(),
            model: model.into(),
            dataset: "d".into(),
            top1,
            top5: None,
            params_m: 1.0,
            gflops: 1.0,
            images_per_s: Some(100.0),
            speedup: Some(speedup),
            speedup_min: None,
            speedup_max: None,
            speedup_pairs: None,
            resolution: 28,
            latency_target: Some(0.5),
            backend: String::new(),
            device: String::new(),
            runtime: String::new(),
        };
        let rows = vec![
            (String::new(), row("a", 80.0, 2.0), Some(0.49)),
            (String::new(), row("b", 70.0, 1.0), None),
            (String::new(), row("a", 82.0, 2.2), Some(0.47)),
            (String::new(), row("a", 84.0, 2.4), Some(0.48)),
            ("x=1".into(), row("a", 50.0, 1.0), None),
        ];
        let s = over_seeds(&rows);
        assert_eq!(s.iter().map(|r| (r.setting.as_str(), r.model.as_str(), r.seeds)).collect::<Vec<_>>(), [("", "a", 3), ("", "b", 1), ("x=1", "a", 1)]);
        assert!((s[0].top1_mean - 82.0).abs() < 1e-12 && (s[0].top1_std - 2.0).abs() < 1e-12, "{:?}", s[0]);
        assert_eq!((s[0].top1_min, s[0].top1_max), (80.0, 84.0));
        assert!((s[0].speedup_std.unwrap() - 0.2).abs() < 1e-9);
        assert!((s[0].latency_reached_mean.unwrap() - 0.48).abs() < 1e-12);
        assert_eq!((s[1].top1_std, s[1].latency_reached_mean), (0.0, None), "one seed: no spread; no prune: no latency");
        assert!(spread_markdown(&s).contains("| 82.00 ± 2.00 | 80.00 – 84.00 |"));
    }

    #[test]
    fn speedup_is_over_the_first_model_and_paper_rows_are_marked() {
        let m = |model: &str, ips: f64| {
            serde_json::json!({"model": model, "dataset": "d", "top1": 80.0, "top5": 95.0, "params_m": 1.0, "gflops": 0.5,
                "images_per_s": ips, "image_size": 28, "backend": "ndarray", "device": "cpu"})
        };
        let mut paired = m("paired", 150.0);
        for (key, value) in [("speedup", 1.71), ("speedup_min", 1.52), ("speedup_max", 1.80)] {
            paired[key] = value.into();
        }
        paired["speedup_pairs"] = 20.into();
        let rows = measured_rows(&[(m("dense", 100.0), None), (m("pruned", 166.0), Some(0.5)), (paired, Some(0.5))]).unwrap();
        assert_eq!(rows[0].speedup, Some(1.0));
        assert_eq!((rows[1].speedup, rows[1].speedup_pairs), (Some(1.66), None), "no baseline: the throughputs' ratio");
        assert_eq!(rows[1].latency_target, Some(0.5));
        assert_eq!((rows[2].speedup, rows[2].speedup_min, rows[2].speedup_max, rows[2].speedup_pairs), (Some(1.71), Some(1.52), Some(1.80), Some(20)));
        assert!(markdown(&rows).contains("| 1.71 (1.52–1.8, 20 pairs) |"), "{}", markdown(&rows));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("table.csv");
        let mut all = rows;
        all.extend(paper_rows());
        write_csv(&path, &all).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("source,model,dataset,top1,top5,params_m,gflops,images_per_s,speedup,speedup_min,speedup_max,speedup_pairs,resolution,latency_target,backend,device,runtime\n"));
        assert!(text.contains("\npaper,NViT-B,imagenet-1k,83.29,,34.0,6.8,,1.86,,,,224,0.54,,\"V100, batch 256\",PyTorch\n"), "{text}");
        assert!(measured_rows(&[(serde_json::json!({"model": "x"}), None)]).unwrap_err().to_string().contains("`images_per_s`"));
    }
}
