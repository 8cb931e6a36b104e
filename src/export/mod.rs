//! A stage's model out of the runner, in the forms other tools load: timm-named safetensors
//! with `dims.json` (what `python/nvit.py` builds a model from) and ONNX.

pub mod onnx;

use std::path::Path;

use anyhow::{Context, Result};

use crate::files::atomic_write;
use crate::model::checkpoint::{self, DIMS, WEIGHTS};

pub use onnx::InputSpec;

/// What `runner export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `model.safetensors` (timm's names) and `dims.json`, into a folder: what python/nvit.py loads.
    Safetensors,
    /// One `.onnx` file (opset 17, dynamic batch, input `images`, output `logits`).
    Onnx,
}

/// Writes the model saved in `model_dir` (`model.safetensors` + `dims.json`) to `out` as
/// `format` (ONNX to standard output when `out` is `-`); returns a line saying what went where.
pub fn write(model_dir: &Path, format: Format, spec: &InputSpec, out: &Path) -> Result<String> {
    let stdout = out == Path::new("-");
    match format {
        Format::Safetensors if stdout => anyhow::bail!("--out -: safetensors are two files (weights and dims.json), written into a folder\n  hint: name the folder, or --format onnx for one file on standard output"),
        Format::Safetensors => {
            std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create the output folder", out.display()))?;
            for name in [WEIGHTS, DIMS] {
                let bytes = std::fs::read(model_dir.join(name)).with_context(|| format!("reading {}", model_dir.join(name).display()))?;
                atomic_write(&out.join(name), &bytes).with_context(|| format!("{}: cannot write the export", out.display()))?;
            }
            Ok(format!("{WEIGHTS} and {DIMS} -> {}", out.display()))
        }
        Format::Onnx => {
            if out.is_dir() {
                anyhow::bail!("{}: is a folder; --format onnx writes one file\n  hint: name the file, e.g. --out {}", out.display(), out.join("model.onnx").display());
            }
            if !stdout {
                crate::files::check_output(out)?;
            }
            let model = checkpoint::load::<crate::backend::Cpu>(model_dir, &Default::default())?;
            let bytes = onnx::model_to_onnx(&model, spec);
            if stdout {
                std::io::Write::write_all(&mut std::io::stdout().lock(), &bytes).context("writing the export to standard output")?;
                return Ok(format!("ONNX opset {} ({:.1} MB) -> standard output", onnx::OPSET, bytes.len() as f64 / 1e6));
            }
            atomic_write(out, &bytes).with_context(|| format!("{}: cannot write the export", out.display()))?;
            Ok(format!("ONNX opset {} ({:.1} MB) -> {}", onnx::OPSET, bytes.len() as f64 / 1e6, out.display()))
        }
    }
}
