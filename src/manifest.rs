//! A stage cache entry's manifest: what the stage wrote and measured, and the digest that
//! the stages reading it put in their keys. Written last, so an entry without one never counts
//! as done.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const MANIFEST: &str = "manifest.json";
/// What the entry's key was hashed from, beside the manifest.
pub const KEY_INPUT: &str = "key.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub key: String,
    pub pipeline: String,
    pub stage: String,
    pub kind: String,
    pub created: String,
    pub seconds: f64,
    /// Files relative to the entry directory, with their sizes.
    pub files: Vec<(String, u64)>,
    /// What the stage measured, for results tables.
    pub metrics: serde_json::Value,
    /// SHA-256 of the files and metrics: what the stages reading this one have in their keys.
    #[serde(default)]
    pub digest: String,
    /// SHA-256 of each file, checked when the entry is used ([`Manifest::verify`]): a file
    /// damaged in place, same size, is found before a stage reads it.
    #[serde(default)]
    pub sha256: BTreeMap<String, String>,
}

impl Manifest {
    /// The manifest of a stage that has just written its files into `dir`.
    pub fn describe(dir: &Path, key: &str, pipeline: &str, stage: &str, kind: &str, seconds: f64, metrics: serde_json::Value) -> Result<Self> {
        let mut files = Vec::new();
        let mut sha256 = BTreeMap::new();
        let mut digest = Sha256::new();
        for entry in walkdir::WalkDir::new(dir).sort_by_file_name().into_iter().filter_map(|e| e.ok()) {
            let rel = entry.path().strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            let internal = rel.starts_with('.') || rel == MANIFEST || rel == KEY_INPUT || rel.starts_with("checkpoint");
            if entry.file_type().is_file() && !internal {
                let bytes = std::fs::read(entry.path()).with_context(|| format!("reading {}", entry.path().display()))?;
                digest.update(rel.as_bytes());
                digest.update((bytes.len() as u64).to_le_bytes());
                digest.update(&bytes);
                sha256.insert(rel.clone(), hex::encode(Sha256::digest(&bytes)));
                files.push((rel, bytes.len() as u64));
            }
        }
        digest.update(serde_json::to_vec(&metrics)?);
        Ok(Manifest {
            key: key.into(),
            pipeline: pipeline.into(),
            stage: stage.into(),
            kind: kind.into(),
            created: chrono::Utc::now().to_rfc3339(),
            seconds,
            files,
            metrics,
            digest: hex::encode(&digest.finalize()[..16]),
            sha256,
        })
    }

    /// Checks every file in `dir` against its recorded SHA-256; returns the bytes read. A
    /// manifest written before digests were recorded checks sizes only (as
    /// [`crate::pipeline::Cache::complete`] does).
    pub fn verify(&self, dir: &Path) -> Result<u64> {
        let mut read = 0;
        let mut buffer = vec![0u8; 1 << 20];
        for (file, expected) in &self.sha256 {
            let path = dir.join(file);
            let mut f = std::fs::File::open(&path).with_context(|| format!("{}: cannot read", path.display()))?;
            let mut hash = Sha256::new();
            loop {
                let n = f.read(&mut buffer).with_context(|| format!("{}: cannot read", path.display()))?;
                if n == 0 {
                    break;
                }
                hash.update(&buffer[..n]);
                read += n as u64;
            }
            if hex::encode(hash.finalize()) != *expected {
                anyhow::bail!("{}: its content is not what the stage wrote (SHA-256 differs from the manifest's)", path.display());
            }
        }
        Ok(read)
    }

    /// The manifest in an entry directory.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("{}: not a stage manifest", path.display()))
    }
}
