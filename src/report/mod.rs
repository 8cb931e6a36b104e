//! What lands under `results/<pipeline>/`: `metrics.csv` (one row per evaluated model), and
//! the report stage's Table 1, per-block widths and figures.

pub mod plots;
pub mod table;

use std::path::Path;

use anyhow::{Context, Result};

use crate::files::atomic_write;

/// Columns of `metrics.csv`, in order.
pub const METRICS_COLUMNS: [&str; 16] = [
    "model", "dataset", "split", "images", "top1", "top5", "loss", "params_m", "gflops", "images_per_s", "latency_ms",
    "batch", "backend", "device", "pipeline", "runtime",
];

/// A row is identified by these: re-evaluating the same model on the same data, device and
/// timing runtime replaces its row.
const METRICS_KEY: [&str; 6] = ["model", "dataset", "split", "backend", "device", "runtime"];

/// A JSON value as a CSV cell: strings unquoted, absent values empty.
pub fn csv_cell(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        v => v.to_string(),
    }
}

/// Inserts or replaces the row for `metrics` (an `evaluate` stage's output) in `path`.
pub fn upsert_metrics(path: &Path, metrics: &serde_json::Value) -> Result<()> {
    let row: Vec<String> = METRICS_COLUMNS.iter().map(|c| csv_cell(&metrics[c])).collect();
    // Runners sharing a results directory take turns: a read-modify-write must not lose a row.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let lock = std::fs::File::create(path.with_file_name(format!(".{name}.lock"))).with_context(|| format!("locking {}", path.display()))?;
    fs2::FileExt::lock_exclusive(&lock).with_context(|| format!("locking {}", path.display()))?;
    let key_idx: Vec<usize> = METRICS_KEY.iter().map(|k| METRICS_COLUMNS.iter().position(|c| c == k).unwrap()).collect();

    let mut rows: Vec<Vec<String>> = Vec::new();
    if path.exists() {
        let mut reader = csv::Reader::from_path(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let header: Vec<String> = reader.headers()?.iter().map(String::from).collect();
        if header != METRICS_COLUMNS {
            anyhow::bail!(
                "{}: has columns {header:?}, expected {METRICS_COLUMNS:?}\n  hint: move the old file aside; it was written by another version",
                path.display()
            );
        }
        for record in reader.records() {
            rows.push(record.with_context(|| format!("{}: malformed row", path.display()))?.iter().map(String::from).collect());
        }
    }
    match rows.iter_mut().find(|r| key_idx.iter().all(|&i| r[i] == row[i])) {
        Some(existing) => *existing = row,
        None => rows.push(row),
    }
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer.write_record(METRICS_COLUMNS)?;
    for r in &rows {
        writer.write_record(r)?;
    }
    atomic_write(path, &writer.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_upserts_lose_no_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.csv");
        std::thread::scope(|s| {
            for i in 0..8 {
                let path = &path;
                s.spawn(move || upsert_metrics(path, &serde_json::json!({"model": format!("m{i}"), "top1": i})).unwrap());
            }
        });
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1 + 8);
    }

    #[test]
    fn upsert_replaces_the_row_of_the_same_model_and_device() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.csv");
        let row = |model: &str, top1: f64| serde_json::json!({"model": model, "dataset": "d", "split": "val", "top1": top1, "backend": "ndarray", "device": "cpu"});
        upsert_metrics(&path, &row("dense", 80.0)).unwrap();
        upsert_metrics(&path, &row("pruned", 79.0)).unwrap();
        upsert_metrics(&path, &row("dense", 81.5)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[1].starts_with("dense,d,val,,81.5,"), "{text}");
        assert!(lines[2].starts_with("pruned,d,val,,79.0,"), "{text}");
    }
}
