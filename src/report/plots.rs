//! SVG figures: per-block widths of each model (the paper's parameter-redistribution figure),
//! the pruning trajectory (estimated latency and loss against step) and the training curves
//! (loss and top-1 against epoch).

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

use super::table::{PruneStep, Row, Spread, Widths};
use crate::model::BlockDims;

/// Black for the first (dense) model, then matplotlib's tab10.
const COLORS: [RGBColor; 10] = [
    BLACK,
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(23, 190, 207),
];

fn color(i: usize) -> RGBColor {
    COLORS[i % COLORS.len()]
}

/// One panel: a line with markers per series, x = `xs`, a legend in the upper right.
fn panel(
    area: &DrawingArea<SVGBackend, Shift>,
    title: &str,
    x_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("plotting `{title}`: {e}");
    let (mut x_lo, mut x_hi, mut y_hi) = (f64::INFINITY, f64::NEG_INFINITY, 0f64);
    for (_, points) in series {
        for &(x, y) in points {
            (x_lo, x_hi, y_hi) = (x_lo.min(x), x_hi.max(x), y_hi.max(y));
        }
    }
    if !x_lo.is_finite() {
        return Ok(());
    }
    let pad = ((x_hi - x_lo) * 0.05).max(0.5);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(32)
        .y_label_area_size(48)
        // Headroom above the data for the legend.
        .build_cartesian_2d(x_lo - pad..x_hi + pad, 0f64..(y_hi * (1.0 + 0.12 * series.len() as f64 + 0.1)).max(1e-9))
        .map_err(|e| err(&e))?;
    let y_fmt = |y: &f64| if y_hi >= 10.0 { format!("{y:.0}") } else { format!("{y:.2}") };
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .x_labels(((x_hi - x_lo) as usize + 1).min(12))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&y_fmt)
        .light_line_style(WHITE)
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (name, points)) in series.iter().enumerate() {
        let c = color(i);
        // The first series (the dense model) is drawn widest, so the others never hide it.
        let width = if i == 0 && series.len() > 1 { 4 } else { 2 };
        chart
            .draw_series(LineSeries::new(points.iter().copied(), c.stroke_width(width)))
            .map_err(|e| err(&e))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2)));
        if points.len() <= 64 {
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, c.filled()))).map_err(|e| err(&e))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    Ok(())
}

/// Heads, total QK width, total V width and MLP width per block, one line per model.
pub fn widths(path: &Path, models: &[Widths]) -> Result<()> {
    let root = SVGBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let panels = root.split_evenly((2, 2));
    let per_block = |f: fn(&BlockDims) -> usize| -> Vec<(String, Vec<(f64, f64)>)> {
        models
            .iter()
            .map(|w| {
                let name = format!("{} (EMB {})", w.model, w.embed_dims());
                (name, w.blocks().iter().enumerate().map(|(b, (_, d))| (b as f64, f(d) as f64)).collect())
            })
            .collect()
    };
    panel(&panels[0], "heads", "block", &per_block(|d| d.heads))?;
    panel(&panels[1], "QK width (heads x qk)", "block", &per_block(|d| d.heads * d.qk))?;
    panel(&panels[2], "V width (heads x v)", "block", &per_block(|d| d.heads * d.v))?;
    panel(&panels[3], "MLP width", "block", &per_block(|d| d.mlp))?;
    root.present().map_err(|e| anyhow!("writing {}: {e}", path.display()))
}

/// Top-1 of each measured model against its measured speedup over the dense model, each point
/// labelled: the accuracy-for-speed trade-off at a glance.
pub fn accuracy(path: &Path, rows: &[Row]) -> Result<()> {
    let points: Vec<Point> = rows.iter().filter_map(|r| Some(Point { x: r.speedup?, y: r.top1, spread: 0.0, label: format!("{} {:.2}", r.model, r.top1) })).collect();
    scatter(path, "top-1 against measured speedup", &points)
}

/// [`accuracy`] over seeds: each row's mean top-1 against its mean speedup, with a bar of one
/// standard deviation either side.
pub fn accuracy_spread(path: &Path, rows: &[Spread]) -> Result<()> {
    let points: Vec<Point> = rows
        .iter()
        .filter_map(|r| {
            let name = if r.setting.is_empty() { r.model.clone() } else { format!("{} {}", r.setting, r.model) };
            Some(Point { x: r.speedup_mean?, y: r.top1_mean, spread: r.top1_std, label: format!("{name} {:.2}±{:.2}", r.top1_mean, r.top1_std) })
        })
        .collect();
    scatter(path, "top-1 (mean ± std over seeds) against measured speedup", &points)
}

struct Point {
    x: f64,
    y: f64,
    spread: f64,
    label: String,
}

fn scatter(path: &Path, title: &str, points: &[Point]) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("plotting {}: {e}", path.display());
    let (lo, hi) = points.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| (lo.min(p.y - p.spread), hi.max(p.y + p.spread)));
    let x_hi = points.iter().map(|p| p.x).fold(1.0, f64::max);
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let pad = ((hi - lo) * 0.15).max(0.5);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0.8f64..x_hi * 1.15, lo - pad..hi + pad)
        .map_err(|e| err(&e))?;
    chart.configure_mesh().x_desc("speedup over the dense model (measured)").y_desc("top-1 (%)").draw().map_err(|e| err(&e))?;
    for (i, p) in points.iter().enumerate() {
        let c = color(i);
        if p.spread > 0.0 {
            chart.draw_series([PathElement::new(vec![(p.x, p.y - p.spread), (p.x, p.y + p.spread)], c.stroke_width(2))]).map_err(|e| err(&e))?;
        }
        chart.draw_series([Circle::new((p.x, p.y), 4, c.filled())]).map_err(|e| err(&e))?;
        chart.draw_series([Text::new(p.label.clone(), (p.x, p.y), ("sans-serif", 12).into_font().color(&c))]).map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}

/// Estimated latency (fraction of dense) and training loss against optimizer step.
pub fn trajectory(path: &Path, logs: &[(String, Vec<PruneStep>)]) -> Result<()> {
    let root = SVGBackend::new(path, (1000, 400)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let panels = root.split_evenly((1, 2));
    let series = |f: fn(&PruneStep) -> f64| -> Vec<(String, Vec<(f64, f64)>)> {
        logs.iter().map(|(name, steps)| (name.clone(), steps.iter().map(|s| (s.step as f64, f(s))).collect())).collect()
    };
    panel(&panels[0], "estimated latency / dense", "step", &series(|s| s.latency_ratio))?;
    panel(&panels[1], "loss (CE + KD)", "step", &series(|s| s.loss))?;
    root.present().map_err(|e| anyhow!("writing {}: {e}", path.display()))
}

/// A training stage's curves, from its metrics (`stages::train`): loss and top-1 per epoch,
/// validation top-1 on the epochs it was measured.
pub struct Curve {
    pub stage: String,
    pub loss: Vec<f64>,
    pub top1: Vec<f64>,
    pub val_top1: Vec<(usize, f64)>,
}

impl Curve {
    pub fn from_metrics(stage: &str, metrics: &serde_json::Value) -> Result<Self> {
        let floats = |key: &str| -> Option<Vec<f64>> { metrics.get(key)?.as_array()?.iter().map(|v| v.as_f64()).collect() };
        let (Some(loss), Some(top1)) = (floats("epoch_losses"), floats("epoch_top1")) else {
            anyhow::bail!("has no per-epoch curves: it is not a train or distill stage");
        };
        let val_top1 = metrics
            .get("val_top1")
            .and_then(|v| v.as_array())
            .map(|pairs| pairs.iter().filter_map(|p| Some((p.get(0)?.as_u64()? as usize, p.get(1)?.as_f64()?))).collect())
            .unwrap_or_default();
        Ok(Self { stage: stage.to_string(), loss, top1, val_top1 })
    }
}

/// Training loss and top-1 (train, and validation where measured) against epoch.
pub fn curves(path: &Path, curves: &[Curve]) -> Result<()> {
    let root = SVGBackend::new(path, (1000, 400)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let panels = root.split_evenly((1, 2));
    let by_epoch = |v: &[f64]| v.iter().enumerate().map(|(i, &y)| ((i + 1) as f64, y)).collect::<Vec<_>>();
    let loss: Vec<_> = curves.iter().map(|c| (c.stage.clone(), by_epoch(&c.loss))).collect();
    let mut top1: Vec<_> = curves.iter().map(|c| (format!("{} train", c.stage), by_epoch(&c.top1))).collect();
    top1.extend(
        curves.iter().filter(|c| !c.val_top1.is_empty()).map(|c| (format!("{} val", c.stage), c.val_top1.iter().map(|&(e, v)| (e as f64, v)).collect())),
    );
    panel(&panels[0], "training loss", "epoch", &loss)?;
    panel(&panels[1], "top-1", "epoch", &top1)?;
    root.present().map_err(|e| anyhow!("writing {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_svg_with_every_model_named() {
        let dir = tempfile::tempdir().unwrap();
        let d = |heads, mlp| BlockDims { heads, qk: 8, v: 8, mlp };
        let models = [
            Widths { model: "dense".into(), stages: vec![(32, vec![d(4, 64), d(4, 64)])] },
            Widths { model: "pruned".into(), stages: vec![(24, vec![d(2, 16), d(3, 48)])] },
        ];
        let path = dir.path().join("widths.svg");
        widths(&path, &models).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("pruned (EMB 24)") && svg.contains("MLP width"), "{svg}");

        let step = |step, latency_ratio| PruneStep {
            step,
            prune_step: step / 10,
            est_latency_s: latency_ratio,
            latency_ratio,
            params: 1,
            flops: 1,
            loss: 0.5,
            embed_dim: "32".into(),
            widths: String::new(),
        };
        let path = dir.path().join("trajectory.svg");
        trajectory(&path, &[("prune".into(), vec![step(10, 0.9), step(20, 0.7)])]).unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().contains("estimated latency / dense"));

        let rows = crate::report::table::paper_rows();
        let path = dir.path().join("accuracy.svg");
        accuracy(&path, &rows).unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().contains("NViT-S 82.19"));

        let metrics = serde_json::json!({"epoch_losses": [2.0, 1.5, 1.2], "epoch_top1": [0.2, 0.4, 0.5], "val_top1": [[3, 0.45]]});
        let curve = Curve::from_metrics("distill", &metrics).unwrap();
        assert_eq!(curve.val_top1, [(3, 0.45)]);
        let path = dir.path().join("curves.svg");
        curves(&path, &[curve]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("training loss") && svg.contains("distill train") && svg.contains("distill val"), "{svg}");
        let err = Curve::from_metrics("evaluate", &serde_json::json!({"top1": 80.0})).err().unwrap().to_string();
        assert!(err.contains("not a train or distill stage"), "{err}");
    }
}
