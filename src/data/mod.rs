//! Datasets, transforms and the batch loader.
//!
//! Three readers share one [`Dataset`] trait: `idx` (MNIST / Fashion-MNIST files, the embedded
//! default from Debian's `dataset-fashion-mnist`), `imagefolder` (ImageNet's
//! `train/<class>/*.JPEG` layout) and `synthetic` (generated images for smoke tests at any
//! size). A reader only decodes; [`transforms`] resize, crop and normalize; [`loader`] batches
//! on worker threads.

mod idx;
pub mod imagefolder;
pub mod loader;
pub mod mix;
pub mod randaugment;
mod synthetic;
pub mod transforms;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::DynamicImage;
use serde::{Deserialize, Serialize};

pub use idx::{write_idx, IdxDataset};
pub use imagefolder::ImageFolder;
pub use loader::{shards, Batch, Loader};
pub use synthetic::Synthetic;
pub use transforms::{Mode, TrainAugment, Transform};

/// Bounds on the `[dataset]` sizes, checked before anything is allocated from them.
const MAX_WORKERS: usize = 256;
const MAX_PREFETCH: usize = 64;
const MAX_SYNTHETIC_CLASSES: usize = 100_000;
const MAX_SYNTHETIC_IMAGES: usize = 10_000_000;

/// Where Debian's `dataset-fashion-mnist` installs its IDX files.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path}: cannot decode image: {source}\n  hint: set dataset.on_bad_image = \"skip\" to skip unreadable images")]
    BadImage { path: PathBuf, source: image::ImageError },
    #[error("{0}")]
    Other(String),
}

impl DataError {
    pub fn file(path: &Path, message: impl Into<String>) -> Self {
        DataError::File { path: path.to_path_buf(), message: message.into() }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DatasetKind {
    Idx,
    Imagefolder,
    Synthetic,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnBadImage {
    Error,
    Skip,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
}

/// `[dataset]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// `idx`, `imagefolder` or `synthetic`. Default `idx`.
    pub kind: DatasetKind,
    /// Directory of the data (idx: the four IDX files; imagefolder: holds `train/` and `val/`).
    /// Default: Fashion-MNIST as Debian installs it. `RUNNER_IMAGENET` fills it for imagefolder.
    pub root: PathBuf,
    /// Keep at most this many images of each class (both splits). Default: all.
    pub limit_per_class: Option<usize>,
    /// Keep at most this many images of each split, evenly strided. Default: all.
    pub subset: Option<usize>,
    /// Per-channel mean for normalization. Default: ImageNet's (its average for 1 channel).
    pub mean: Option<Vec<f32>>,
    /// Per-channel std for normalization. Default: ImageNet's (its average for 1 channel).
    pub std: Option<Vec<f32>>,
    /// Random-resized-crop area range for training. Default [0.08, 1.0].
    pub crop_scale: [f32; 2],
    /// Random horizontal flips for training. Default true.
    pub hflip: bool,
    /// Evaluation: resize the short side to image_size / crop_pct, then center-crop. Default 0.875.
    pub eval_crop_pct: f32,
    /// `error` stops on an unreadable image and names it; `skip` skips and counts. Default `error`.
    pub on_bad_image: OnBadImage,
    /// Decoding threads; 0 uses every core. Default 0.
    pub workers: usize,
    /// Batches decoded ahead of the consumer. Default 4.
    pub prefetch: usize,
    /// synthetic: number of classes. Default 10.
    pub classes: usize,
    /// synthetic: images in the train split. Default 512.
    pub train_size: usize,
    /// synthetic: images in the val split. Default 128.
    pub val_size: usize,
    /// synthetic: side of the generated images, in pixels. Default 32.
    pub synthetic_size: u32,
}

impl Default for DatasetConfig {
    fn default() -> Self {
        Self {
            kind: DatasetKind::Idx,
            root: FASHION_MNIST_DIR.into(),
            limit_per_class: None,
            subset: None,
            mean: None,
            std: None,
            crop_scale: [0.08, 1.0],
            hflip: true,
            eval_crop_pct: 0.875,
            on_bad_image: OnBadImage::Error,
            workers: 0,
            prefetch: 4,
            classes: 10,
            train_size: 512,
            val_size: 128,
            synthetic_size: 32,
        }
    }
}

impl DatasetConfig {
    /// Problems as `(key, message)`, relative to `[dataset]`.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut bad = |key: &str, message: String| problems.push((key.to_string(), message));
        if self.kind != DatasetKind::Synthetic && !self.root.exists() {
            let hint = match self.kind {
                DatasetKind::Idx if self.root == Path::new(FASHION_MNIST_DIR) => {
                    "\n  hint: `sudo apt-get install dataset-fashion-mnist` installs it"
                }
                DatasetKind::Imagefolder => {
                    "\n  hint: set dataset.root or RUNNER_IMAGENET to a folder holding train/ and val/"
                }
                _ => "",
            };
            bad("root", format!("`{}` does not exist{hint}", self.root.display()));
        }
        if !(0.0 < self.crop_scale[0] && self.crop_scale[0] <= self.crop_scale[1] && self.crop_scale[1] <= 1.0) {
            bad("crop_scale", format!("must satisfy 0 < min <= max <= 1, got {:?}", self.crop_scale));
        }
        // Evaluation resizes to image_size / eval_crop_pct first: 0.25 is a 4x larger image.
        if !(self.eval_crop_pct >= 0.25 && self.eval_crop_pct <= 1.0) {
            bad("eval_crop_pct", format!("must be in [0.25, 1], got {}", self.eval_crop_pct));
        }
        if self.workers > MAX_WORKERS {
            bad("workers", format!("must be at most {MAX_WORKERS} (0 uses every core), got {}", self.workers));
        }
        if self.limit_per_class == Some(0) {
            bad("limit_per_class", "must be at least 1".into());
        }
        if self.subset == Some(0) {
            bad("subset", "must be at least 1".into());
        }
        if self.prefetch == 0 || self.prefetch > MAX_PREFETCH {
            bad("prefetch", format!("must be from 1 to {MAX_PREFETCH}, got {}", self.prefetch));
        }
        if let (Some(m), Some(s)) = (&self.mean, &self.std) {
            if m.len() != s.len() {
                bad("std", format!("has {} values but mean has {}", s.len(), m.len()));
            }
        }
        if let Some(m) = self.mean.as_ref().filter(|m| m.is_empty() || m.iter().any(|v| !v.is_finite())) {
            bad("mean", format!("must be finite numbers, one per channel, got {m:?}"));
        }
        if let Some(s) = self.std.as_ref().filter(|s| s.is_empty() || s.iter().any(|v| !(*v > 0.0 && v.is_finite()))) {
            bad("std", format!("must be positive finite numbers, one per channel, got {s:?}"));
        }
        // Synthetic sizes: always checked, since a `--set dataset.kind` may come later.
        if self.classes < 2 || self.classes > MAX_SYNTHETIC_CLASSES {
            bad("classes", format!("must be from 2 to {MAX_SYNTHETIC_CLASSES}, got {}", self.classes));
        }
        for (key, n) in [("train_size", self.train_size), ("val_size", self.val_size)] {
            if n == 0 || n > MAX_SYNTHETIC_IMAGES {
                bad(key, format!("must be from 1 to {MAX_SYNTHETIC_IMAGES}, got {n}"));
            }
        }
        if self.synthetic_size == 0 || self.synthetic_size as usize > crate::model::MAX_IMAGE_SIZE {
            bad("synthetic_size", format!("must be from 1 to {}, got {}", crate::model::MAX_IMAGE_SIZE, self.synthetic_size));
        }
        problems
    }

    /// Problems of `mean` and `std` for a model of `channels` input channels: one value, or one
    /// per channel.
    pub fn check_channels(&self, channels: usize) -> Option<(String, String)> {
        [("mean", &self.mean), ("std", &self.std)].into_iter().find_map(|(key, values)| {
            let n = values.as_ref()?.len();
            (n != 1 && n != channels).then(|| (key.to_string(), format!("has {n} values, and the model takes {channels}-channel images: give one value or {channels}")))
        })
    }

    /// Opens one split, applying `limit_per_class` and `subset`.
    pub fn open(&self, split: Split, seed: u64) -> Result<Arc<dyn Dataset>, DataError> {
        let dataset: Arc<dyn Dataset> = match self.kind {
            DatasetKind::Idx => Arc::new(IdxDataset::open(&self.root, split)?),
            DatasetKind::Imagefolder => Arc::new(ImageFolder::open(&self.root, split)?),
            DatasetKind::Synthetic => Arc::new(Synthetic::new(
                self.classes,
                match split {
                    Split::Train => self.train_size,
                    Split::Val => self.val_size,
                },
                self.synthetic_size,
                seed ^ (split as u64 + 1),
            )),
        };
        if self.limit_per_class.is_none() && self.subset.is_none() {
            return Ok(dataset);
        }
        let mut per_class = vec![0usize; dataset.num_classes()];
        let mut indices: Vec<usize> = (0..dataset.len())
            .filter(|&i| {
                let c = dataset.label(i);
                per_class[c] += 1;
                self.limit_per_class.is_none_or(|limit| per_class[c] <= limit)
            })
            .collect();
        if let Some(n) = self.subset {
            if n < indices.len() {
                let stride = indices.len() as f64 / n as f64;
                indices = (0..n).map(|k| indices[(k as f64 * stride) as usize]).collect();
            }
        }
        Ok(Arc::new(Subset { inner: dataset, indices }))
    }

    /// What identifies the data for the cache: file names, sizes and mtimes, not pixels.
    pub fn identity(&self) -> Result<String, DataError> {
        let files = match self.kind {
            DatasetKind::Synthetic => return Ok("synthetic".into()),
            DatasetKind::Idx => IdxDataset::files(&self.root)?,
            DatasetKind::Imagefolder => ImageFolder::index_files(&self.root, self.on_bad_image == OnBadImage::Skip)?,
        };
        let mut hasher = sha2::Sha256::default();
        use sha2::Digest;
        let mut total = 0u64;
        for f in &files {
            let meta = std::fs::metadata(f).map_err(|e| DataError::file(f, e.to_string()))?;
            let mtime = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs())
                .unwrap_or(0);
            total += meta.len();
            hasher.update(format!("{}\t{}\t{}\n", f.display(), meta.len(), mtime));
        }
        Ok(format!(
            "{} files, {} bytes, {}",
            files.len(),
            total,
            hex::encode(&hasher.finalize()[..8])
        ))
    }

    /// Class names in label order, where the dataset has them (an ImageFolder's folders).
    pub fn class_names(&self) -> Option<Vec<String>> {
        match self.kind {
            DatasetKind::Imagefolder => ImageFolder::class_names_at(&self.root).ok(),
            DatasetKind::Idx | DatasetKind::Synthetic => None,
        }
    }

    /// The evaluation transform (resize, center crop, normalize) for a model that takes
    /// `channels` x `size` x `size` images.
    pub fn eval_transform(&self, size: usize, channels: usize) -> Result<Transform, DataError> {
        let (mean, std) = self.normalization(channels)?;
        Ok(Transform { size: size as u32, channels, mean, std, mode: Mode::Eval { crop_pct: self.eval_crop_pct } })
    }

    /// Per-channel normalization for `channels` output channels; given values of another
    /// length than 1 or `channels` are an error, never replaced by ImageNet's.
    pub fn normalization(&self, channels: usize) -> Result<(Vec<f32>, Vec<f32>), DataError> {
        const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
        const STD: [f32; 3] = [0.229, 0.224, 0.225];
        if let Some((key, message)) = self.check_channels(channels) {
            return Err(DataError::Other(format!("dataset.{key} {message}")));
        }
        let pick = |given: &Option<Vec<f32>>, imagenet: [f32; 3]| match given {
            Some(v) if v.len() == channels => v.clone(),
            Some(v) => vec![v[0]; channels],
            None if channels == 3 => imagenet.to_vec(),
            None => vec![imagenet.iter().sum::<f32>() / 3.0; channels],
        };
        Ok((pick(&self.mean, MEAN), pick(&self.std, STD)))
    }
}

/// A split of a dataset: decoded images and their labels.
pub trait Dataset: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn num_classes(&self) -> usize;
    fn label(&self, index: usize) -> usize;
    /// Decodes image `index`; the error names the file.
    fn image(&self, index: usize) -> Result<DynamicImage, DataError>;
}

struct Subset {
    inner: Arc<dyn Dataset>,
    indices: Vec<usize>,
}

impl Dataset for Subset {
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }
    fn label(&self, index: usize) -> usize {
        self.inner.label(self.indices[index])
    }
    fn image(&self, index: usize) -> Result<DynamicImage, DataError> {
        self.inner.image(self.indices[index])
    }
}
