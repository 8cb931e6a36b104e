//! The one place where a concrete Burn backend is chosen. Everything else is generic over
//! `B: AutodiffBackend` and receives its device from here.

use anyhow::{bail, Result};
use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;

use crate::config::BackendKind;

/// Work to run on whichever backend the pipeline names.
pub trait BackendJob {
    type Output;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<Self::Output>;
}

pub fn dispatch<J: BackendJob>(kind: BackendKind, index: usize, job: J) -> Result<J::Output> {
    match kind {
        BackendKind::Ndarray => {
            if index != 0 {
                bail!("pipeline.device = {index}: the ndarray backend has one device, 0");
            }
            job.run::<Autodiff<burn::backend::NdArray<f32>>>(burn::backend::ndarray::NdArrayDevice::Cpu)
        }
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => job.run::<Autodiff<burn::backend::Wgpu>>(burn::backend::wgpu::WgpuDevice::DiscreteGpu(index)),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => job.run::<Autodiff<burn::backend::Cuda>>(burn::backend::cuda::CudaDevice::new(index)),
        #[allow(unreachable_patterns)]
        other => bail!(
            "backend `{other}` is not compiled into this runner\n  hint: build it with `cargo build --release --features {other}`"
        ),
    }
}

/// A name for the device, for cache keys and results tables: throughput measured on one
/// device is never taken for another's.
pub fn device_name(kind: BackendKind, index: usize) -> String {
    match kind {
        BackendKind::Ndarray => {
            let model = std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|s| s.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|m| m.trim().to_string()))
                .unwrap_or_else(|| std::env::consts::ARCH.to_string());
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            format!("cpu {model} x{cores}")
        }
        other => format!("{other}:{index}"),
    }
}
