//! Backend parity: the same weights and batch through two backends' forward and backward
//! passes, compared tensor by tensor. The tests hold every CPU backend to ndarray's values;
//! `runner bench parity` holds a GPU backend to flex's on the machine that has the GPU.

use anyhow::{bail, Result};
use burn::backend::NdArray;
use burn::module::Param;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};

use crate::backend::{self, BackendJob, BackendKind};
use crate::data::mix::soft_targets;
use crate::model::checkpoint::{self, StateDict};
use crate::model::{Vit, VitConfig};
use crate::train::{classification_loss, targets_tensor};

/// A small distilled DeiT whose widths are neither powers of two nor multiples of a GPU's tile
/// sizes, as after pruning.
pub fn tiny_model() -> VitConfig {
    let mut config = VitConfig::uniform(32, 8, 3, 48, 2, 3, 4.0, 10, true);
    config.blocks[0].qk = 13;
    config.blocks[1].v = 11;
    config.blocks[1].mlp = 71;
    config
}

/// What is compared: the loss, both heads' logits, and the gradients of parameters spread over
/// the model (the patch embedding, the class token, each kind of projection, a norm, the head).
pub struct Pass {
    pub loss: f32,
    pub logits: Vec<f32>,
    pub grads: Vec<(&'static str, Vec<f32>)>,
}

/// The inputs of a pass: weights made once on the CPU, a fixed batch and its labels.
pub struct Inputs {
    pub weights: StateDict,
    pub config: VitConfig,
    pub images: Vec<f32>,
    pub labels: Vec<i64>,
}

impl Inputs {
    /// `config`'s model with weights drawn from `seed`, and a batch of 6 fixed images.
    pub fn new(config: VitConfig, seed: u64) -> Self {
        use burn::tensor::backend::Backend;
        let cpu = Default::default();
        NdArray::<f32>::seed(&cpu, seed);
        let weights = checkpoint::export(&config.init::<NdArray>(&cpu));
        let labels: Vec<i64> = (0..6).map(|i| (i % config.num_classes) as i64).collect();
        let size = config.in_chans * config.image_size * config.image_size;
        let images = crate::bench::synthetic_pixels(labels.len() * size);
        Self { weights, config, images, labels }
    }
}

/// One forward and backward pass of the label-smoothed training loss on `device`.
pub fn pass<B: AutodiffBackend>(inputs: &Inputs, device: &B::Device) -> Result<Pass> {
    let config = &inputs.config;
    let model: Vit<B> = checkpoint::import(&inputs.weights, config, device)?;
    let x = crate::model::float_tensor::<B, 4>(inputs.images.clone(), [inputs.labels.len(), config.in_chans, config.image_size, config.image_size], device);
    let output = model.forward(x);
    let targets = targets_tensor(soft_targets(&inputs.labels, config.num_classes, 0.1, 1.0), config.num_classes, device);
    let loss = classification_loss(&output, targets);
    let grads = loss.backward();
    fn grad<B: AutodiffBackend, const D: usize>(p: &Param<Tensor<B, D>>, g: &B::Gradients) -> Vec<f32> {
        p.val().grad(g).map_or_else(Vec::new, |t| t.into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default())
    }
    let (b0, b1) = (&model.blocks[0], &model.blocks[1]);
    let mut logits = vec![output.cls.clone()];
    logits.extend(output.dist.clone());
    Ok(Pass {
        loss: loss.into_scalar().elem(),
        logits: Tensor::cat(logits, 1).into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default(),
        grads: vec![
            ("patch_embed.weight", grad(&model.patch_embed.weight, &grads)),
            ("cls_token", model.cls_token.as_ref().map_or_else(Vec::new, |t| grad(t, &grads))),
            ("blocks.0.attn.q.weight", grad(&b0.attn.q.weight, &grads)),
            ("blocks.0.norm1.weight", grad(&b0.norm1.gamma, &grads)),
            ("blocks.1.attn.k.weight", grad(&b1.attn.k.weight, &grads)),
            ("blocks.1.attn.v.weight", grad(&b1.attn.v.weight, &grads)),
            ("blocks.1.mlp.fc1.weight", grad(&b1.mlp.fc1.weight, &grads)),
            ("head.weight", grad(&model.head.weight, &grads)),
        ],
    })
}

/// The largest difference, relative to the reference's largest magnitude: a tensor of another
/// length, or an all-zero reference, is infinitely far.
pub fn rel_err(ours: &[f32], reference: &[f32]) -> f32 {
    let scale = reference.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
    if ours.len() != reference.len() || scale == 0.0 {
        return f32::INFINITY;
    }
    // f32::max drops a NaN: one NaN makes the whole error NaN, which no tolerance passes.
    let diff = ours.iter().zip(reference).map(|(a, b)| (a - b).abs()).fold(0.0f32, |m, d| if m.is_nan() || d.is_nan() { f32::NAN } else { m.max(d) });
    diff / scale
}

/// `(tensor, relative error)` of `ours` against `reference`: the loss, the logits, each gradient.
pub fn compare(ours: &Pass, reference: &Pass) -> Vec<(&'static str, f32)> {
    let mut rows = vec![("loss", rel_err(&[ours.loss], &[reference.loss])), ("logits", rel_err(&ours.logits, &reference.logits))];
    rows.extend(ours.grads.iter().zip(&reference.grads).map(|((name, a), (_, b))| (*name, rel_err(a, b))));
    rows
}

impl BackendJob for &Inputs {
    type Output = Pass;
    fn run<B: AutodiffBackend>(self, devices: Vec<B::Device>) -> Result<Pass> {
        pass::<B>(self, &devices[0])
    }
}

/// `runner bench parity`: `backend` on `device` against `against` (f32 both), into a CSV.
pub struct BenchParity {
    pub backend: BackendKind,
    pub against: BackendKind,
    pub device: usize,
    pub tolerance: f32,
    pub out: std::path::PathBuf,
}

/// Writes one row per compared tensor and fails, after writing, when any is beyond the tolerance.
pub fn bench(args: &BenchParity) -> Result<String> {
    if !(args.tolerance > 0.0 && args.tolerance.is_finite()) {
        bail!("--tolerance must be a positive number, got {}", args.tolerance);
    }
    backend::check(args.backend, &[args.device])?;
    backend::check(args.against, &[0])?;
    let inputs = Inputs::new(tiny_model(), 0);
    let reference = backend::dispatch(args.against, &[0], &inputs)?;
    let ours = backend::dispatch(args.backend, &[args.device], &inputs)?;
    let device = backend::device_name(args.backend, args.device);
    let against = backend::device_name(args.against, 0);
    let rows = compare(&ours, &reference);
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(["tensor", "rel_err", "tolerance", "ok", "backend", "device", "against", "against_device"])?;
    let mut text = String::new();
    let mut bad = Vec::new();
    for (name, e) in &rows {
        let ok = *e <= args.tolerance; // NaN is not
        if !ok {
            bad.push(format!("{name} ({e:.2e})"));
        }
        let (e_text, tolerance) = (format!("{e:.3e}"), format!("{:.0e}", args.tolerance));
        let (ok_text, backend, reference) = (ok.to_string(), args.backend.to_string(), args.against.to_string());
        w.write_record([*name, &e_text, &tolerance, &ok_text, &backend, &device, &reference, &against])?;
        text.push_str(&format!("{name}: relative error {e:.2e}{}\n", if ok { "" } else { "  <- over the tolerance" }));
    }
    crate::files::atomic_write(&args.out, &w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?)?;
    text.push_str(&format!("-> {} ({} on {device} against {} on {against}, f32, loss {} vs {})\n", args.out.display(), args.backend, args.against, ours.loss, reference.loss));
    if !bad.is_empty() {
        eprint!("{text}");
        bail!("{} on {device} differs from {} beyond {:.0e} of each tensor's scale: {}", args.backend, args.against, args.tolerance, bad.join(", "));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::rel_err;

    #[test]
    fn a_nan_a_length_or_an_all_zero_reference_is_never_within_tolerance() {
        assert_eq!(rel_err(&[1.0, 2.5], &[1.0, 2.0]), 0.25);
        assert!(rel_err(&[f32::NAN, 2.0, 2.0], &[1.0, 2.0, 2.0]).is_nan());
        assert!(rel_err(&[1.0, f32::NAN], &[1.0, 2.0]).is_nan());
        assert_eq!(rel_err(&[1.0], &[1.0, 2.0]), f32::INFINITY);
        assert_eq!(rel_err(&[0.0], &[0.0]), f32::INFINITY);
        assert!(!(rel_err(&[f32::NAN], &[1.0]) <= 1e-4));
    }
}
