//! Latency where the model is deployed: a block or a whole model exported to ONNX, as `runner
//! export` writes it, and timed in ONNX Runtime (`runtime = "onnxruntime"` on `profile_latency`,
//! `prune`'s `stop_on = "measured"` and `evaluate`), with the same warm-up, medians and pairs as
//! the backend's own timing.
//!
//! The library is loaded when a pipeline asks for it (the `ort` crate's `load-dynamic`), from
//! `ORT_DYLIB_PATH` or else from the `onnxruntime` Python package of the `python3` on `PATH`:
//! building the runner downloads nothing, a runner without ONNX Runtime runs every other
//! stage, and the timing runs in this process, with no interpreter between the clock and the
//! session.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use crate::export::onnx;
use crate::machine::Ratio;
use crate::model::{BlockDims, Model, ModelConfig};

/// Where a latency stage times: the pipeline's backend, or ONNX Runtime.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    #[default]
    Backend,
    Onnxruntime,
}

/// ONNX Runtime's execution provider.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    #[default]
    Cpu,
    /// onnxruntime-gpu's CUDA provider, on GPU 0.
    Cuda,
}

impl Provider {
    fn name(self) -> &'static str {
        match self {
            Provider::Cpu => "CPUExecutionProvider",
            Provider::Cuda => "CUDAExecutionProvider",
        }
    }
}

/// The oldest ONNX Runtime `ort` loads: its C API version 17.
const OLDEST_MINOR: u32 = ort::MINOR_VERSION;
/// A shared library larger than this is not ONNX Runtime's (the CPU one is 35 MB).
const MAX_LIBRARY: u64 = 4 << 30;
const INSTALL: &str = "hint: `pip install onnxruntime` (onnxruntime-gpu for onnxruntime_provider = \"cuda\") into the `python3` on PATH, or set ORT_DYLIB_PATH to a libonnxruntime.so (1.17 or newer) from https://github.com/microsoft/onnxruntime/releases";

struct Loaded {
    library: PathBuf,
    version: String,
    environment: ort::environment::Environment,
    /// The intra-op threads of the one pool every session shares.
    threads: usize,
}

static LOADED: OnceLock<std::result::Result<Loaded, String>> = OnceLock::new();

fn loaded() -> Result<&'static Loaded> {
    LOADED.get_or_init(|| load().map_err(|e| format!("{e:#}"))).as_ref().map_err(|e| anyhow!("{e}"))
}

/// The version of the ONNX Runtime this process loads (loading it once): what a latency
/// stage's cache key holds, so that another ONNX Runtime measures again.
pub fn version() -> Result<String> {
    Ok(loaded()?.version.clone())
}

fn load() -> Result<Loaded> {
    let library = locate()?;
    if let Some(problem) = crate::files::input_problem(&library, MAX_LIBRARY) {
        bail!("ONNX Runtime's library {}: {problem}\n  {INSTALL}", library.display());
    }
    let version = library_version(&library)?;
    let minor = version.split('.').nth(1).and_then(|m| m.parse::<u32>().ok()).unwrap_or(0);
    if !version.starts_with("1.") || minor < OLDEST_MINOR {
        bail!("ONNX Runtime {version} ({}) is older than 1.{OLDEST_MINOR}, the oldest the runner loads\n  {INSTALL}", library.display());
    }
    // One thread pool for every session, as many threads as the runner's CPU backends use: with
    // a pool each, two sessions timed in pairs keep twice as many threads as there are cores.
    let threads = rayon::current_num_threads();
    let fail = |e: &dyn std::fmt::Display| anyhow!("ONNX Runtime {version} ({}): {e}", library.display());
    // First: any other call into `ort` would load a library of its own choosing, or panic.
    let environment = ort::init_from(&library).map_err(|e| anyhow!("{e}"))?;
    let pool = ort::environment::GlobalThreadPoolOptions::default()
        .with_intra_threads(threads)
        .and_then(|p| p.with_inter_threads(1))
        .map_err(|e| fail(&e))?;
    let environment = environment.with_name("nvit").with_global_thread_pool(pool).build().map_err(|e| fail(&e))?;
    Ok(Loaded { library, version, environment, threads })
}

/// `ORT_DYLIB_PATH`, or the library inside the `onnxruntime` package of `python3`.
fn locate() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("ORT_DYLIB_PATH = {}: no such file\n  {INSTALL}", path.display());
        }
        return Ok(path);
    }
    // Where the package is, without importing it (an import takes a second).
    let script = "import importlib.util as u; s = u.find_spec('onnxruntime'); print(s.submodule_search_locations[0] if s and s.submodule_search_locations else '')";
    let package = std::process::Command::new("python3")
        .args(["-c", script])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|p| !p.is_empty());
    let Some(package) = package else {
        bail!("ONNX Runtime was not found: ORT_DYLIB_PATH is unset and `python3` on PATH has no `onnxruntime` package\n  {INSTALL}");
    };
    let capi = Path::new(&package).join("capi");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&capi)
        .map(|dir| dir.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    names.retain(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(is_library));
    // The versioned name (libonnxruntime.so.1.32.0) where there are several.
    names.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    names.into_iter().next().ok_or_else(|| anyhow!("the `onnxruntime` package at {package} has no ONNX Runtime library in capi/\n  {INSTALL}"))
}

fn is_library(name: &str) -> bool {
    name.starts_with("libonnxruntime.so") || (name.starts_with("libonnxruntime.") && name.ends_with(".dylib")) || name == "onnxruntime.dll"
}

/// What the library says its version is (`OrtGetApiBase()->GetVersionString()`).
fn library_version(path: &Path) -> Result<String> {
    // SAFETY: ONNX Runtime's library runs no code of concern on load; the symbol has the C
    // API's signature and returns a pointer to a static struct whose version function returns a
    // static string.
    unsafe {
        let lib = libloading::Library::new(path).with_context(|| format!("loading ONNX Runtime from {}\n  {INSTALL}", path.display()))?;
        let base: libloading::Symbol<unsafe extern "C" fn() -> *const ort::sys::OrtApiBase> =
            lib.get(b"OrtGetApiBase").map_err(|_| anyhow!("{} is not ONNX Runtime's library: it has no OrtGetApiBase\n  {INSTALL}", path.display()))?;
        let base = base();
        if base.is_null() {
            bail!("{}: OrtGetApiBase returned nothing", path.display());
        }
        let version = std::ffi::CStr::from_ptr(((*base).GetVersionString)()).to_string_lossy().into_owned();
        // Kept loaded: `ort` opens the same library next and the process keeps it.
        std::mem::forget(lib);
        Ok(version)
    }
}

/// ONNX Runtime on one execution provider with the runner's CPU threads: sessions for blocks and
/// models, all graph optimizations on, as a deployment creates them.
pub struct Onnxruntime {
    provider: Provider,
    loaded: &'static Loaded,
}

impl Onnxruntime {
    /// Loads the library (once per process) and checks that it has `provider`.
    pub fn new(provider: Provider) -> Result<Self> {
        let loaded = loaded()?;
        if provider == Provider::Cuda {
            use ort::ep::ExecutionProvider;
            if !ort::ep::CUDA::is_available().unwrap_or(false) {
                bail!(
                    "onnxruntime_provider = \"cuda\": ONNX Runtime {} ({}) has no CUDA provider\n  hint: `pip install onnxruntime-gpu` in place of onnxruntime, or set ORT_DYLIB_PATH to its libonnxruntime.so",
                    loaded.version,
                    loaded.library.display()
                );
            }
        }
        Ok(Self { provider, loaded })
    }

    /// What every latency figure timed here says of where it was timed.
    pub fn describe(&self) -> String {
        format!("onnxruntime {} {} {} threads", self.loaded.version, self.provider.name(), self.loaded.threads)
    }

    /// A session of `model` (an ONNX file's bytes) whose one input is random values of `shape`.
    pub fn session(&self, model: &[u8], shape: &[usize]) -> Result<Session> {
        let fail = |e: &dyn std::fmt::Display| anyhow!("ONNX Runtime {} ({}): {e}", self.loaded.version, self.provider.name());
        let mut builder = ort::session::Session::builder(&self.loaded.environment)
            .map_err(|e| fail(&e))?
            .with_optimization_level(ort::session::builder::GraphOptimizationLevel::All)
            .map_err(|e| fail(&e))?;
        if self.provider == Provider::Cuda {
            builder = builder.with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()]).map_err(|e| fail(&e))?;
        }
        let session = builder.commit_from_memory(model).map_err(|e| fail(&e))?;
        let name = session.inputs().first().map(|i| i.name().to_string()).ok_or_else(|| fail(&"the model has no input"))?;
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let values: Vec<f32> = (0..shape.iter().product::<usize>()).map(|_| rng.random::<f32>()).collect();
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let input = ort::value::Tensor::from_array((dims, values)).map_err(|e| fail(&e))?;
        Ok(Session { session, name, input })
    }

    /// One block of `config`'s stream `stage` at width `e` and `dims`, randomly initialized on
    /// `device`, as an ONNX session over the workload's `batch` images: what `profile_latency`
    /// times here.
    pub fn block_session<B: Backend>(&self, config: &ModelConfig, stage: usize, e: usize, dims: &BlockDims, batch: usize, tokens: Option<usize>, device: &B::Device) -> Result<Session> {
        match config {
            ModelConfig::Deit(c) => {
                let block = c.block::<B>(e, *dims, device);
                let tokens = tokens.unwrap_or(c.num_tokens());
                self.session(&onnx::vit_block_to_onnx(&block, dims, e, tokens, c.head_dim), &[batch, tokens, e])
            }
            ModelConfig::Swin(c) => {
                let scale = (c.head_dim as f64).powf(-0.5);
                let (window, shift) = c.window_shift(stage);
                let side = c.side(stage);
                let block = crate::model::SwinBlock::<B>::new(e, *dims, window, shift, side, scale, device);
                self.session(&onnx::swin_block_to_onnx(&block, dims, e, side, c.head_dim), &[batch, side * side, e])
            }
        }
    }

    /// A whole model as `runner export` writes it, over `batch` random images.
    pub fn model_session<B: Backend>(&self, model: &Model<B>, batch: usize) -> Result<Session> {
        let c = model.config();
        let spec = onnx::InputSpec { mean: vec![0.0; c.in_chans()], std: vec![1.0; c.in_chans()], classes: None };
        self.session(&onnx::model_to_onnx(model, &spec), &[batch, c.in_chans(), c.image_size(), c.image_size()])
    }
}

/// An ONNX Runtime session and its input.
pub struct Session {
    session: ort::session::Session,
    name: String,
    input: ort::value::Tensor<f32>,
}

impl Session {
    /// One run, its outputs dropped: on the CPU provider they are ready when `run` returns,
    /// on CUDA's copied back to the host.
    pub fn pass(&mut self) -> Result<()> {
        let outputs = self.session.run(ort::inputs![self.name.as_str() => &self.input]).map_err(|e| anyhow!("ONNX Runtime: {e}"))?;
        drop(outputs);
        Ok(())
    }

    /// The median seconds of a run over `repeats` after `warmup` (and one checked run), with
    /// the machine's measuring lock held.
    pub fn median(&mut self, warmup: usize, repeats: usize) -> Result<f64> {
        self.pass()?;
        let failed = RefCell::new(None);
        let _alone = crate::machine::measuring();
        let t = crate::machine::median_time(warmup, repeats, || keep_first(&failed, self.pass()));
        failed.into_inner().map_or(Ok(t), Err)
    }
}

/// `a`'s latency as a fraction of `b`'s, the two timed alternately in `pairs` pairs after
/// `warmup` of each ([`crate::machine::paired_ratio`]).
pub fn paired(a: &mut Session, b: &mut Session, warmup: usize, pairs: usize) -> Result<Ratio> {
    a.pass()?;
    b.pass()?;
    let failed = RefCell::new(None);
    let _alone = crate::machine::measuring();
    let ratio = crate::machine::paired_ratio(warmup, pairs, || keep_first(&failed, a.pass()), || keep_first(&failed, b.pass()));
    failed.into_inner().map_or(Ok(ratio), Err)
}

fn keep_first(failed: &RefCell<Option<anyhow::Error>>, result: Result<()>) {
    if let Err(e) = result {
        failed.borrow_mut().get_or_insert(e);
    }
}

/// Where a stage's latencies are timed, ready to time: the pipeline's backend, or a loaded ONNX
/// Runtime.
pub enum Clock {
    Backend { name: String },
    Onnxruntime(Onnxruntime),
}

impl Clock {
    /// `runtime` as settings give it; `backend` names the pipeline's backend and device.
    pub fn new(runtime: Runtime, provider: Provider, backend: String) -> Result<Self> {
        Ok(match runtime {
            Runtime::Backend => Clock::Backend { name: backend },
            Runtime::Onnxruntime => Clock::Onnxruntime(Onnxruntime::new(provider)?),
        })
    }

    /// The `runtime` column of the rows it times.
    pub fn describe(&self) -> String {
        match self {
            Clock::Backend { name } => name.clone(),
            Clock::Onnxruntime(o) => o.describe(),
        }
    }

    /// The median seconds of one block (see [`crate::stages::profile_latency::time_block`]).
    #[allow(clippy::too_many_arguments)]
    pub fn time_block<B: Backend>(&self, config: &ModelConfig, stage: usize, e: usize, dims: &BlockDims, w: &crate::stages::profile_latency::Workload, device: &B::Device) -> Result<f64> {
        match self {
            Clock::Backend { .. } => Ok(crate::stages::profile_latency::time_block::<B>(config, stage, e, dims, w, device)),
            Clock::Onnxruntime(o) => o.block_session::<B>(config, stage, e, dims, w.batch, w.tokens, device)?.median(w.warmup, w.repeats),
        }
    }

    /// The median seconds of a forward pass of `model` over `batch` random images.
    pub fn median<B: Backend>(&self, model: &Model<B>, batch: usize, warmup: usize, repeats: usize, device: &B::Device) -> Result<f64> {
        match self {
            Clock::Backend { .. } => Ok(crate::model::Timing::new(&model.config(), batch, device).median(model, warmup, repeats)),
            Clock::Onnxruntime(o) => o.model_session(model, batch)?.median(warmup, repeats),
        }
    }

    /// `a`'s latency as a fraction of `b`'s, timed in pairs over `batch` random images.
    pub fn paired<B: Backend>(&self, a: &Model<B>, b: &Model<B>, batch: usize, warmup: usize, pairs: usize, device: &B::Device) -> Result<Ratio> {
        match self {
            Clock::Backend { .. } => Ok(crate::model::Timing::new(&b.config(), batch, device).paired(a, b, warmup, pairs)),
            Clock::Onnxruntime(o) => paired(&mut o.model_session(a, batch)?, &mut o.model_session(b, batch)?, warmup, pairs),
        }
    }
}
