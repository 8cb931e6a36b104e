//! Every backend against ndarray: the same weights and batch give the same loss, logits and
//! gradients, and every stage runs end to end. flex is always built; wgpu and tch with their
//! features. CI runs wgpu on Mesa's lavapipe (a software Vulkan driver), so the kernels burn
//! compiles for GPUs are exercised without one, and tch on LibTorch's CPU kernels.

use crate::common;

use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::AutodiffBackend;
use nvit::parity::{self, Inputs};

/// `B`'s forward and backward pass against ndarray's, within `tol` of each tensor's scale.
fn forward_and_backward_match_ndarray<B: AutodiffBackend>(device: &B::Device, tol: f32) {
    let _rng = common::rng_turn();
    let inputs = Inputs::new(parity::tiny_model(), 0);
    let reference = parity::pass::<Autodiff<NdArray>>(&inputs, &Default::default()).unwrap();
    let ours = parity::pass::<B>(&inputs, device).unwrap();
    eprintln!("loss {} vs {}", ours.loss, reference.loss);
    for (name, grad) in &reference.grads {
        assert!(grad.iter().any(|v| *v != 0.0), "{name}: the reference gradient is zero");
    }
    for (name, e) in parity::compare(&ours, &reference) {
        eprintln!("{name}: rel. err {e:.2e}");
        assert!(e < tol, "{name}: differs by {e} of its scale");
    }
}

/// Every stage kind that trains or measures, end to end on `backend`: a tiny dense model
/// trained, its latency profiled on the device, scored, pruned, distilled and evaluated.
fn every_stage_runs(backend: &str) {
    let _rng = common::rng_turn();
    let dir = tempfile::tempdir().unwrap();
    let cache = nvit::pipeline::Cache { root: dir.path().join("cache") };
    let stages = "
[stages.latency]
kind = \"profile_latency\"
input = \"train\"
batch_size = 4
warmup = 1
repeats = 1

[stages.scores]
kind = \"hessian_scores\"
input = \"train\"
batches = 2
batch_size = 8

[stages.prune]
kind = \"prune\"
input = \"train\"
latency = \"latency\"
latency_target = 0.7
interval = 2
groups_per_step = 4
batch_size = 16

[stages.distill]
kind = \"distill\"
teacher = \"train\"
epochs = 1
batch_size = 16

[stages.eval_pruned]
kind = \"evaluate\"
batch_size = 32
throughput_batch = 8
throughput_repeats = 1
";
    let path = common::tiny_pipeline(dir.path(), stages);
    let p = common::load(&path, &["stages.train.epochs=1", &format!("pipeline.backend=\"{backend}\"")]);
    let mut plan = common::plan(&p, &cache);
    let records = common::execute(&p, &mut plan, &cache);
    assert_eq!(records.len(), 7);
    let metrics = |name: &str| cache.complete(&plan.stages.iter().find(|s| s.spec.name == name).unwrap().key).unwrap().metrics;
    // Latencies are noise at this size (on lavapipe above all): that the model shrank is what holds.
    let prune = metrics("prune");
    assert!(prune["prune_steps"].as_u64().unwrap() >= 1 && prune["latency_ratio"].as_f64().unwrap().is_finite(), "{prune}");
    let params = |stage: &str| metrics(stage)["params_m"].as_f64().unwrap();
    assert!(params("eval_pruned") < params("evaluate"), "{prune}");
    assert!(metrics("distill")["epoch_losses"][0].as_f64().unwrap().is_finite());
    let top1 = metrics("eval_pruned")["top1"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&top1) && metrics("eval_pruned")["backend"] == backend);
}

mod flex {
    use burn::backend::{Autodiff, Flex};

    #[test]
    fn flex_forward_and_backward_match_ndarray() {
        super::forward_and_backward_match_ndarray::<Autodiff<Flex>>(&Default::default(), 1e-5);
    }

    #[test]
    fn every_stage_runs_on_flex() {
        super::every_stage_runs("flex");
    }
}

#[cfg(feature = "tch")]
mod tch {
    use burn::backend::{libtorch::LibTorchDevice, Autodiff, LibTorch};

    #[test]
    fn tch_forward_and_backward_match_ndarray() {
        super::forward_and_backward_match_ndarray::<Autodiff<LibTorch>>(&LibTorchDevice::Cpu, 1e-5);
    }

    #[test]
    fn every_stage_runs_on_tch() {
        super::every_stage_runs("tch");
    }
}

#[cfg(feature = "wgpu")]
mod wgpu {
    use super::*;
    use nvit::model::VitConfig;
    use nvit::parity::rel_err;
    use burn::backend::Wgpu;

    #[test]
    fn wgpu_forward_and_backward_match_ndarray() {
        // f32 throughout; reductions run in a different order on the GPU. Measured: at most
        // 7.3e-7 on lavapipe.
        forward_and_backward_match_ndarray::<Autodiff<Wgpu>>(&Default::default(), 1e-5);
    }

    #[test]
    fn every_stage_runs_on_wgpu() {
        every_stage_runs("wgpu");
    }


/// Runs the tiny pipeline's `train` on wgpu with `precision` set (or not); its epoch losses.
fn train_on_wgpu(precision: Option<&str>, shards: usize) -> anyhow::Result<Vec<f64>> {
    let dir = tempfile::tempdir().unwrap();
    let cache = nvit::pipeline::Cache { root: dir.path().join("cache") };
    let path = common::tiny_pipeline(dir.path(), "");
    let mut set = vec!["pipeline.backend=\"wgpu\"".to_string(), "stages.train.epochs=3".into(), format!("pipeline.devices={:?}", vec![0; shards])];
    set.extend(precision.map(|p| format!("stages.train.precision=\"{p}\"")));
    let p = common::load(&path, &set.iter().map(String::as_str).collect::<Vec<_>>());
    let mut plan = common::plan(&p, &cache);
    plan.stages.truncate(1);
    common::try_execute(&p, &mut plan, &cache)?;
    let m = cache.complete(&plan.stages[0].key).unwrap().metrics;
    Ok(m["epoch_losses"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect())
}

/// f16 compute on f32 master weights follows the f32 run closely; bf16, which lavapipe cannot
/// compute in, is refused with the device named.
#[test]
fn mixed_precision_trains_like_f32_and_an_unsupported_dtype_is_an_error() {
    let _rng = common::rng_turn();
    // The forward pass really is f16: its logits are f16 and differ from f32's at f16's resolution.
    let config = VitConfig::uniform(32, 8, 3, 48, 2, 3, 4.0, 10, true);
    let device = Default::default();
    let model = config.init::<Autodiff<Wgpu>>(&device);
    let x = nvit::model::float_tensor::<Autodiff<Wgpu>, 4>((0..2 * 3 * 32 * 32).map(|i| ((i * 31) % 97) as f32 / 48.0 - 1.0).collect(), [2, 3, 32, 32], &device);
    let reference = model.forward(x.clone()).cls.into_data().to_vec::<f32>().unwrap();
    let half = nvit::train::in_precision(model, Some(burn::tensor::FloatDType::F16)).forward(x.cast(burn::tensor::FloatDType::F16));
    assert_eq!(half.cls.dtype(), burn::tensor::DType::F16);
    let half = half.to_f32().cls.into_data().to_vec::<f32>().unwrap();
    let e = rel_err(&half, &reference);
    eprintln!("f16 logits: rel. err {e:.2e}");
    assert!(e > 1e-6 && e < 1e-2, "f16 logits differ from f32 by {e} of their scale");

    let full = train_on_wgpu(None, 1).unwrap();
    let half = train_on_wgpu(Some("f16"), 1).unwrap();
    eprintln!("epoch losses f32 {full:?}, f16 {half:?}");
    assert!(full[2] < full[0], "f32 learns: {full:?}");
    for (a, b) in full.iter().zip(&half) {
        assert!((a - b).abs() < 0.02 * a, "f32 {full:?} vs f16 {half:?}");
    }
    assert_ne!(full, half, "f16 computed something different");
    // Data parallel on a GPU backend (one lavapipe device, twice: replicas, threads, gradients
    // moved and summed through wgpu), in f16 too.
    for precision in [None, Some("f16")] {
        let sharded = train_on_wgpu(precision, 2).unwrap();
        let reference = if precision.is_some() { &half } else { &full };
        eprintln!("{precision:?}: one device {reference:?}, two shards {sharded:?}");
        for (a, b) in reference.iter().zip(&sharded) {
            assert!((a - b).abs() < 1e-3 * a, "{precision:?}: one device {reference:?} vs two shards {sharded:?}");
        }
    }
    let err = format!("{:#}", train_on_wgpu(Some("bf16"), 1).unwrap_err());
    assert!(err.contains("precision = \"bf16\": device") && err.contains("cannot compute in it"), "{err}");
}

/// burn 0.21's wgpu runtime cannot copy between devices, so data parallel over two of them is
/// refused up front (on lavapipe's two adapters it panicked in cubecl and trained on garbage).
#[test]
fn several_distinct_wgpu_devices_are_refused_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::tiny_pipeline(dir.path(), "");
    let (code, _, err) = common::output(common::runner(dir.path()).args(["run", path.to_str().unwrap(), "--backend", "wgpu", "--devices", "0,1"]));
    // Refused when the pipeline is loaded, before anything runs.
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("pipeline.devices: names several wgpu devices [0, 1]: data parallel over several wgpu devices") && err.contains("hint: use the cuda backend"), "{err}");
}
}
