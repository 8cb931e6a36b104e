//! A training run you can watch: after every epoch, its row (train loss, top-1, learning rate,
//! images/s, and validation top-1 on the epochs it is measured) goes to `curves.csv` and to a
//! TensorBoard event file, both in `runs/<pipeline>/<stamp>/<stage>/`, so that
//! `tensorboard --logdir runs/` shows every run of every pipeline.
//!
//! The rows live in the stage's resume state, so a resumed run's files hold the epochs before
//! the kill too. They are written to the run directory, not the cache entry: images/s is a
//! measurement of the moment, and an entry holds the same bytes however often it is rebuilt.
//!
//! An event file is TensorFlow's record format (a length, its masked CRC-32C, the bytes, their
//! masked CRC-32C) around `Event` messages: a file version, then one scalar `Summary` per value,
//! byte for byte what `torch.utils.tensorboard.SummaryWriter.add_scalar` writes (tested against
//! its output). It grows by appending, as TensorBoard expects; a run killed mid-record leaves a
//! truncated last record, which TensorBoard skips.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::files::atomic_write;
use crate::protobuf::Message;

/// One epoch of a training stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRow {
    /// 1-based, as the log counts.
    pub epoch: usize,
    pub train_loss: f64,
    pub train_top1: f64,
    /// The learning rate of the epoch's last step.
    pub lr: f64,
    pub images_per_s: f64,
    /// Top-1 on the validation split, on the epochs `eval_every` measures.
    pub val_top1: Option<f64>,
}

const COLUMNS: &str = "epoch,train_loss,train_top1,lr,images_per_s,val_top1";

impl EpochRow {
    /// The row's values as TensorBoard tags.
    fn scalars(&self) -> Vec<(&'static str, f64)> {
        let mut s = vec![("train/loss", self.train_loss), ("train/top1", self.train_top1), ("train/lr", self.lr), ("train/images_per_s", self.images_per_s)];
        s.extend(self.val_top1.map(|v| ("val/top1", v)));
        s
    }
}

/// The rows of one stage so far, and where they go.
pub struct Curves {
    rows: Vec<EpochRow>,
    /// `runs/<pipeline>/<stamp>/<stage>/`; `None` writes nothing (a rank other than 0, a test).
    dir: Option<PathBuf>,
    events: Option<EventFile>,
}

impl Curves {
    /// Curves under `dir`, starting from the `rows` a resumed run had written.
    pub fn new(dir: Option<PathBuf>, rows: Vec<EpochRow>) -> Result<Self> {
        let mut curves = Self { rows: Vec::new(), dir, events: None };
        if let Some(dir) = &curves.dir {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            curves.events = Some(EventFile::create(dir)?);
        }
        for row in rows {
            curves.push(row)?;
        }
        Ok(curves)
    }

    pub fn rows(&self) -> &[EpochRow] {
        &self.rows
    }

    /// Adds an epoch and writes it out.
    pub fn push(&mut self, row: EpochRow) -> Result<()> {
        if let Some(events) = &mut self.events {
            for (tag, value) in row.scalars() {
                events.scalar(tag, value as f32, row.epoch as i64)?;
            }
            events.flush()?;
        }
        self.rows.push(row);
        if let Some(dir) = &self.dir {
            atomic_write(&dir.join("curves.csv"), csv(&self.rows).as_bytes())?;
        }
        Ok(())
    }
}

pub fn csv(rows: &[EpochRow]) -> String {
    let mut s = format!("{COLUMNS}\n");
    for r in rows {
        let val = r.val_top1.map(|v| v.to_string()).unwrap_or_default();
        s.push_str(&format!("{},{},{},{},{:.1},{val}\n", r.epoch, r.train_loss, r.train_top1, r.lr, r.images_per_s));
    }
    s
}

/// An event file being appended to.
pub struct EventFile {
    file: File,
    path: PathBuf,
}

impl EventFile {
    /// `events.out.tfevents.<seconds>.<host>.<pid>` in `dir`, opened with its file-version record.
    pub fn create(dir: &Path) -> Result<Self> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().replace(['/', '\0'], "_")).unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!("events.out.tfevents.{now:010}.{host}.{}", std::process::id()));
        crate::files::check_output(&path)?;
        let file = File::options().create_new(true).append(true).open(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut events = Self { file, path };
        events.record(&file_version_event(wall_time()))?;
        Ok(events)
    }

    pub fn scalar(&mut self, tag: &str, value: f32, step: i64) -> Result<()> {
        self.record(&scalar_event(tag, value, step, wall_time()))
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        self.file.write_all(&record(data)).with_context(|| format!("writing {}", self.path.display()))
    }

    fn flush(&mut self) -> Result<()> {
        self.file.flush().with_context(|| format!("writing {}", self.path.display()))
    }
}

fn wall_time() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

/// `Event { wall_time = 1, file_version = 3 }`.
fn file_version_event(wall_time: f64) -> Vec<u8> {
    Message::new().double(1, wall_time).string(3, "brain.Event:2").into_bytes()
}

/// `Event { wall_time = 1, step = 2, summary = 5 { value = 1 { tag = 1, simple_value = 2 } } }`;
/// proto3 leaves out a zero step, and so does this.
fn scalar_event(tag: &str, value: f32, step: i64, wall_time: f64) -> Vec<u8> {
    let value = Message::new().string(1, tag).float(2, value);
    let mut event = Message::new().double(1, wall_time);
    if step != 0 {
        event = event.int(2, step);
    }
    event.message(5, &Message::new().message(1, &value)).into_bytes()
}

/// One TFRecord: length, masked CRC of the length, data, masked CRC of the data.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// CRC-32C (Castagnoli), bit by bit: event records are a few dozen bytes.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_of_the_standard_check_string() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    /// `tests/fixtures/tensorboard/make.py` wrote these with `torch.utils.tensorboard`'s
    /// `SummaryWriter`, wall times fixed.
    #[test]
    fn events_are_the_bytes_summary_writer_writes() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tensorboard");
        let theirs = std::fs::read(dir.join("scalars.tfevents")).unwrap();
        let mut ours = record(&file_version_event(1.5e9));
        ours.extend(record(&scalar_event("train/loss", 2.25, 1, 1.5e9 + 1.0)));
        ours.extend(record(&scalar_event("val/top1", 0.375, 2, 1.5e9 + 2.0)));
        ours.extend(record(&scalar_event("train/lr", 1e-4, 0, 1.5e9 + 3.0)));
        assert_eq!(ours, theirs);
    }

    #[test]
    fn a_resumed_run_writes_the_epochs_before_it_and_csv_rows_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let row = |epoch, val_top1| EpochRow { epoch, train_loss: 1.0 / epoch as f64, train_top1: 0.5, lr: 1e-3, images_per_s: 100.0, val_top1 };
        let stage = dir.path().join("finetune");
        let mut curves = Curves::new(Some(stage.clone()), vec![row(1, None)]).unwrap();
        curves.push(row(2, Some(0.25))).unwrap();
        let text = std::fs::read_to_string(stage.join("curves.csv")).unwrap();
        assert_eq!(text, "epoch,train_loss,train_top1,lr,images_per_s,val_top1\n1,1,0.5,0.001,100.0,\n2,0.5,0.5,0.001,100.0,0.25\n");
        let events: Vec<_> = std::fs::read_dir(&stage).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with("events.out.tfevents.")).collect();
        assert_eq!(events.len(), 1);
        // A file version, four scalars for epoch 1, five for epoch 2.
        let bytes = std::fs::read(events[0].path()).unwrap();
        let (mut at, mut records) = (0, 0);
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            assert_eq!(u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap()), masked_crc(&bytes[at + 12..at + 12 + len]));
            at += 16 + len;
            records += 1;
        }
        assert_eq!(records, 1 + 4 + 5);
    }
}
