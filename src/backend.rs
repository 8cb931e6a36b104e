//! The one place where a concrete Burn backend is chosen. Everything else is generic over
//! `B: AutodiffBackend` and receives its devices from here.

use anyhow::{bail, Result};
use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;

use serde::{Deserialize, Serialize};

/// Where work that only reads a model's weights runs (`runner export`).
pub type Cpu = burn::backend::NdArray<f32>;

/// Also the values of `--backend`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// burn-ndarray, deprecated upstream in favour of flex: the default before flex.
    Ndarray,
    /// burn-flex, the pure-Rust CPU backend that replaces burn-ndarray upstream: SIMD kernels,
    /// gemm's matmul (AVX-512 where the CPU has it) and every core. The default.
    Flex,
    /// PyTorch's own kernels through LibTorch (tch), on the CPU or, where LibTorch sees one, a
    /// CUDA GPU: see docs/backends.md for building it against a PyTorch wheel.
    Tch,
    Wgpu,
    Cuda,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Ndarray => "ndarray",
            BackendKind::Flex => "flex",
            BackendKind::Tch => "tch",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Cuda => "cuda",
        })
    }
}

impl BackendKind {
    /// The backends that compute on the CPU only, with the one device 0.
    pub fn cpu_only(self) -> bool {
        matches!(self, BackendKind::Ndarray | BackendKind::Flex)
    }
}

/// Work to run on whichever backend the pipeline names, on `devices` (at least one; the first
/// holds the model).
pub trait BackendJob {
    type Output;
    fn run<B: AutodiffBackend>(self, devices: Vec<B::Device>) -> Result<Self::Output>;
}

/// Whether this runner was built with backend `kind`.
pub fn compiled(kind: BackendKind) -> bool {
    match kind {
        BackendKind::Ndarray | BackendKind::Flex => true,
        BackendKind::Tch => cfg!(feature = "tch"),
        BackendKind::Wgpu => cfg!(feature = "wgpu"),
        BackendKind::Cuda => cfg!(feature = "cuda"),
    }
}

/// The most entries `pipeline.devices` takes.
pub const MAX_DEVICES: usize = 64;

/// Whether `indices` can be run on backend `kind` in this build and on this machine: what
/// `check_devices` checks, and that what the backend loads at run time is here.
pub fn check(kind: BackendKind, indices: &[usize]) -> Result<()> {
    check_indices(kind, indices)?;
    #[cfg(feature = "cuda")]
    if kind == BackendKind::Cuda {
        cuda_available()?;
    }
    Ok(())
}

fn check_indices(kind: BackendKind, indices: &[usize]) -> Result<()> {
    if indices.is_empty() {
        bail!("pipeline.devices is empty");
    }
    // A shard per entry: each is a model replica and a thread.
    if indices.len() > MAX_DEVICES {
        bail!("pipeline.devices lists {} devices (or CPU shards): at most {MAX_DEVICES}", indices.len());
    }
    let cpu_only = |kind: BackendKind| -> Result<()> {
        if let Some(i) = indices.iter().find(|&&i| i != 0) {
            bail!(
                "pipeline.devices names {i}: the {kind} backend has one device, 0\n  hint: repeat it (devices = [0, 0]) to split each batch into shards on the CPU"
            );
        }
        Ok(())
    };
    match kind {
        BackendKind::Ndarray | BackendKind::Flex => cpu_only(kind)?,
        #[cfg(feature = "tch")]
        BackendKind::Tch => {
            if !tch_has_cuda() {
                cpu_only(kind)?;
            }
        }
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => {
            if indices.iter().any(|&i| i != indices[0]) {
                bail!(
                    "pipeline.devices names several wgpu devices {indices:?}: data parallel over several wgpu devices needs copies between them, which burn 0.21's wgpu runtime does not implement (cubecl's send/recv panic)\n  hint: use the cuda backend for several GPUs, or one wgpu device"
                );
            }
        }
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => {}
        #[allow(unreachable_patterns)]
        other => bail!(
            "backend `{other}` is not compiled into this runner\n  hint: build it with `cargo build --release --features {other}`"
        ),
    }
    Ok(())
}

/// The device problems `check` finds in the indices alone, for a pipeline being loaded
/// (`--dry-run`, a sweep's plan): a backend this build lacks, or whose GPU or libraries this
/// machine lacks, passes here, since a plan may be for another machine (a Slurm script), and
/// `runner run` reports it.
pub fn check_devices(kind: BackendKind, indices: &[usize]) -> Result<()> {
    if compiled(kind) {
        check_indices(kind, indices)?;
    }
    Ok(())
}

pub fn dispatch<J: BackendJob>(kind: BackendKind, indices: &[usize], job: J) -> Result<J::Output> {
    check(kind, indices)?;
    match kind {
        BackendKind::Ndarray => {
            let devices = vec![burn::backend::ndarray::NdArrayDevice::Cpu; indices.len()];
            job.run::<Autodiff<burn::backend::NdArray<f32>>>(devices)
        }
        BackendKind::Flex => {
            let devices = vec![burn::backend::flex::FlexDevice; indices.len()];
            job.run::<Autodiff<burn::backend::Flex>>(devices)
        }
        #[cfg(feature = "tch")]
        BackendKind::Tch => {
            use burn::backend::libtorch::LibTorchDevice;
            let device = |i: usize| if tch_has_cuda() { LibTorchDevice::Cuda(i) } else { LibTorchDevice::Cpu };
            job.run::<Autodiff<burn::backend::LibTorch<f32>>>(indices.iter().map(|&i| device(i)).collect())
        }
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => {
            use burn::backend::wgpu::WgpuDevice;
            // Device 0 is wgpu's pick of the best adapter: a discrete GPU where there is one,
            // else an integrated, virtual or CPU one (lavapipe, in CI).
            let device = |i: usize| if i == 0 { WgpuDevice::DefaultDevice } else { WgpuDevice::DiscreteGpu(i) };
            job.run::<Autodiff<burn::backend::Wgpu>>(indices.iter().map(|&i| device(i)).collect())
        }
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => {
            job.run::<Autodiff<burn::backend::Cuda>>(indices.iter().map(|&i| burn::backend::cuda::CudaDevice::new(i)).collect())
        }
        #[allow(unreachable_patterns)]
        other => bail!("backend `{other}` is not compiled into this runner"),
    }
}

/// Whether shards of a batch that share `device` run in threads of their own rather than in
/// turn: on ndarray, most of whose operations run on one thread (measured, 2 cores: DeiT-T
/// training 3.5 images/s with one shard, 6.8 with two concurrent ones, CPU use 99% and 152%),
/// and on flex, whose matrix products use every core but whose element-wise operations below
/// its thresholds do not (2-core AMD EPYC, `runner bench model --backend flex`: DeiT-T batch
/// 16 4.56 images/s with one shard, 5.37 with two; the quickstart's model 785 and 1,140).
/// GPUs and LibTorch (already multi-threaded) run them in turn.
pub fn concurrent_shards<B: burn::tensor::backend::Backend>(device: &B::Device) -> bool {
    let name = B::name(device);
    name.contains("ndarray") || name.contains("flex")
}

/// A name for the device, for cache keys and results tables: throughput measured on one kind
/// of device is never taken for another's, and is shared by identical ones (a latency table
/// profiled on GPU 0 serves a sweep point on GPU 3 of the same model).
pub fn device_name(kind: BackendKind, index: usize) -> String {
    if is_gpu(kind, index) && kind != BackendKind::Wgpu {
        return nvidia_gpu_name(index).map_or_else(|| format!("cuda:{index}"), |name| format!("cuda {name}"));
    }
    match kind {
        BackendKind::Ndarray | BackendKind::Flex | BackendKind::Tch => {
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

/// What cubecl loads or reads when the cuda backend first runs, each a panic deep inside it
/// where missing: the NVIDIA driver, NVRTC (it compiles every kernel at run time, through
/// cudarc's loader, asked here with the same names) and CUDA's headers, which every kernel
/// includes from `$CUDA_PATH/include` (cubecl-cuda 0.10's `install::cuda_path`: `CUDA_PATH`,
/// else `/usr/local/cuda`, `/opt/cuda`, or `/usr` where `/usr/bin/nvcc` is).
#[cfg(feature = "cuda")]
fn cuda_available() -> Result<()> {
    // SAFETY: each only tries to load the library by its names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        bail!("backend `cuda`: no NVIDIA driver on this machine (libcuda.so could not be loaded)\n  hint: run it where an NVIDIA GPU and its driver are, or use a CPU backend (--backend flex)");
    }
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        bail!("backend `cuda`: NVRTC (libnvrtc.so), which compiles its kernels at run time, could not be loaded\n  hint: install the CUDA toolkit, or put the lib/ folder of PyTorch's nvidia-cuda-nvrtc wheel on LD_LIBRARY_PATH (results/gpu/README.md)");
    }
    let root = match std::env::var_os("CUDA_PATH") {
        Some(path) => Some(std::path::PathBuf::from(path)),
        None => ["/usr/local/cuda", "/opt/cuda"].iter().map(std::path::PathBuf::from).find(|p| p.exists()).or_else(|| std::path::Path::new("/usr/bin/nvcc").exists().then(|| "/usr".into())),
    };
    let header = root.as_ref().map(|r| r.join("include").join("cuda_runtime.h"));
    if !header.as_ref().is_some_and(|h| h.is_file()) {
        let looked = header.map_or_else(|| "CUDA_PATH is unset and none of /usr/local/cuda, /opt/cuda, /usr/bin/nvcc exists".to_string(), |h| format!("{} is missing", h.display()));
        bail!("backend `cuda`: no CUDA headers ({looked}): its kernels are compiled at run time against $CUDA_PATH/include\n  hint: install the CUDA toolkit, or set CUDA_PATH to a folder whose include/ has CUDA's headers, crt/ and cccl/ among them (results/gpu/README.md)");
    }
    Ok(())
}

/// Whether `kind` computes on a GPU in this build and on this machine.
pub fn is_gpu(kind: BackendKind, _index: usize) -> bool {
    match kind {
        BackendKind::Tch => tch_has_cuda(),
        other => !other.cpu_only(),
    }
}

/// Whether the LibTorch this runner links sees a CUDA device (a CUDA build of PyTorch on a
/// machine with a GPU); the `tch` backend then computes there, else on the CPU.
fn tch_has_cuda() -> bool {
    #[cfg(feature = "tch")]
    return tch::Cuda::is_available();
    #[cfg(not(feature = "tch"))]
    false
}

/// The model name of visible CUDA device `index` (`NVIDIA H100 80GB HBM3`), from nvidia-smi,
/// which numbers all GPUs whatever `CUDA_VISIBLE_DEVICES` hides.
fn nvidia_gpu_name(index: usize) -> Option<String> {
    let physical = match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(v) if !v.trim().is_empty() => v.split(',').nth(index)?.trim().parse::<usize>().ok()?,
        _ => index,
    };
    let out = std::process::Command::new("nvidia-smi").args(["--query-gpu=name", "--format=csv,noheader"]).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    text.lines().nth(physical).map(|l| l.trim().to_string()).filter(|l| !l.is_empty())
}
