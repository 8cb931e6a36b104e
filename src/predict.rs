//! `runner predict`: a stage's model on image files, top-k classes and probabilities per image.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::tensor::activation::softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};

use crate::backend::BackendJob;
use crate::data::imagefolder::{decode, is_image};
use crate::data::{DataError, Transform};
use crate::model::checkpoint;

/// The image files named by `inputs`, in order: a file as given (it must be an image), a
/// folder's images (by extension, recursively, sorted). Errors name every input that is
/// missing or not an image before any image is decoded.
pub fn image_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut problems = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let found: Vec<PathBuf> = walkdir::WalkDir::new(input)
                .sort_by_file_name()
                .into_iter()
                .filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_file() && is_image(e.path()))
                .map(|e| e.into_path())
                .collect();
            if found.is_empty() {
                problems.push(format!("{}: a folder with no .jpeg, .jpg or .png file under it", input.display()));
            }
            files.extend(found);
        } else if !input.exists() {
            problems.push(format!("{}: no such file or folder", input.display()));
        } else if !is_image(input) {
            problems.push(format!("{}: not an image (predict reads .jpeg, .jpg and .png files)", input.display()));
        } else {
            files.push(input.clone());
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok(files)
}

/// One image's top classes, most probable first.
pub struct Prediction {
    pub path: PathBuf,
    /// `(label, probability)`.
    pub top: Vec<(usize, f32)>,
}

/// What to predict with: the model saved in `model_dir`, on `files`, `batch` images at a time.
pub struct Predict<'a> {
    pub model_dir: &'a Path,
    pub files: &'a [PathBuf],
    pub transform: Transform,
    pub batch: usize,
    pub top: usize,
}

impl BackendJob for Predict<'_> {
    type Output = Vec<Prediction>;
    fn run<B: AutodiffBackend>(self, devices: Vec<B::Device>) -> Result<Self::Output> {
        predict::<B::InnerBackend>(&self, &devices[0])
    }
}

fn predict<B: Backend>(job: &Predict, device: &B::Device) -> Result<Vec<Prediction>> {
    let model = checkpoint::load::<B>(job.model_dir, device)?;
    let config = model.config();
    let (size, chans, classes) = (config.image_size(), config.in_chans(), config.num_classes());
    let t = &job.transform;
    if (t.size as usize, t.channels) != (size, chans) {
        bail!("the transform makes {}x{} images of {} channels; the model takes {size}x{size} of {chans}", t.size, t.size, t.channels);
    }
    let mut out = Vec::with_capacity(job.files.len());
    let mut rng = rand::rng(); // the evaluation transform draws nothing
    for chunk in job.files.chunks(job.batch.max(1)) {
        let mut pixels = Vec::with_capacity(chunk.len() * chans * size * size);
        for path in chunk {
            let image = decode(path).map_err(|e| match e {
                DataError::BadImage { path, source } => anyhow::anyhow!("{}: cannot decode image: {source}", path.display()),
                other => other.into(),
            })?;
            t.apply(&image, &mut rng, &mut pixels);
        }
        let x = crate::model::float_tensor::<B, 4>(pixels, [chunk.len(), chans, size, size], device);
        let probs = softmax(model.forward(x).logits(), 1).into_data().convert::<f32>().to_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        for (path, row) in chunk.iter().zip(probs.chunks(classes)) {
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            let top = order.into_iter().take(job.top).map(|l| (l, row[l])).collect();
            out.push(Prediction { path: path.clone(), top });
        }
    }
    Ok(out)
}

/// The predictions as CSV: `image,class1,prob1,...` with class names where `names` has them
/// and label numbers otherwise.
pub fn to_csv(predictions: &[Prediction], top: usize, names: Option<&[String]>) -> Result<String> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let mut header = vec!["image".to_string()];
    for k in 1..=top {
        header.extend([format!("class{k}"), format!("prob{k}")]);
    }
    w.write_record(&header)?;
    for p in predictions {
        let mut row = vec![p.path.display().to_string()];
        for &(label, prob) in &p.top {
            let name = names.and_then(|n| n.get(label)).cloned().unwrap_or_else(|| label.to_string());
            row.extend([name, format!("{prob:.6}")]);
        }
        row.resize(header.len(), String::new());
        w.write_record(&row)?;
    }
    String::from_utf8(w.into_inner().context("writing CSV")?).context("CSV is UTF-8")
}
