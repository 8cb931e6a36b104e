//! `runner bench`: throughput measurements whose outputs are committed under `results/bench/`,
//! and the same model side by side with PyTorch + timm (`benches/torch_reference.py`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::AutodiffBackend;

use crate::backend::{self, BackendJob, BackendKind};
use crate::model::VitConfig;
use crate::train::Precision;

/// `runner bench loader`: images/s of the loader on an ImageFolder of JPEGs, with the training
/// transform (decode, random-resized crop to `size`, flip, normalize) on every core.
pub fn loader(root: Option<&Path>, images: usize, size: u32, batch: usize, out: &Path) -> Result<String> {
    use crate::data::transforms::{Mode, TrainAugment, Transform};
    use crate::data::{loader::LoaderOptions, Dataset, ImageFolder, Loader, OnBadImage, Split};
    let tmp;
    let (root, source) = match root {
        Some(r) => (r.to_path_buf(), r.display().to_string()),
        None => {
            // ImageNet's average image is about 400x350; q90 JPEGs of smooth noise are close in size.
            tmp = tempfile::tempdir()?;
            for i in 0..images {
                let dir = tmp.path().join("train").join(format!("class{}", i % 10));
                std::fs::create_dir_all(&dir)?;
                let img = image::RgbImage::from_fn(500, 375, |x, y| {
                    let v = ((x * 7 + y * 13 + i as u32 * 31) % 255) as u8;
                    image::Rgb([v, v.wrapping_mul(3), 255 - v])
                });
                img.save(dir.join(format!("{i}.JPEG")))?;
            }
            (tmp.path().to_path_buf(), format!("{images} generated 500x375 JPEGs"))
        }
    };
    let dataset = std::sync::Arc::new(ImageFolder::open(&root, Split::Train)?);
    let n = dataset.len().min(images);
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let transform = Transform {
        size,
        channels: 3,
        mean: vec![0.485, 0.456, 0.406],
        std: vec![0.229, 0.224, 0.225],
        mode: Mode::Train(TrainAugment::basic([0.08, 1.0], true)),
    };
    let options = LoaderOptions { batch_size: batch, shuffle: true, drop_last: false, seed: 0, workers, prefetch: 4, on_bad_image: OnBadImage::Error };
    let loader = Loader::new(dataset, transform, options);
    let start = std::time::Instant::now();
    let mut seen = 0;
    for b in loader.epoch(0) {
        seen += b?.labels.len();
        if seen >= n {
            break;
        }
    }
    let rate = seen as f64 / start.elapsed().as_secs_f64();
    let cpu = backend::device_name(backend::BackendKind::Ndarray, 0);
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(["what", "source", "images", "size", "batch", "workers", "images_per_s", "device"])?;
    w.write_record(["loader train transform", &source, &seen.to_string(), &size.to_string(), &batch.to_string(), &workers.to_string(), &format!("{rate:.2}"), &cpu])?;
    crate::files::atomic_write(out, &w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?)?;
    Ok(format!("{seen} images in {:.2} s: {rate:.1} images/s ({workers} workers, {cpu}) -> {}\n", start.elapsed().as_secs_f64(), out.display()))
}

/// A model to measure: a preset (`deit-tiny-distilled`), a pipeline file whose `[model]` is
/// taken (`pipelines/quickstart.toml`, with its dataset's class count where it leaves it open),
/// or a pruned model's widths (its `dims.json`, or a `runner export` folder).
pub fn resolve_model(spec: &str) -> Result<VitConfig> {
    deit_only(resolve_any_model(spec)?, spec)
}

/// A model of either family: a ViT or Swin preset, a pipeline file (its `[model]`), or a
/// model's `dims.json` (or the folder that holds it).
pub fn resolve_any_model(spec: &str) -> Result<crate::model::ModelConfig> {
    use crate::model::{ModelConfig, SwinConfig};
    if let Some(c) = VitConfig::preset(spec) {
        return Ok(ModelConfig::Deit(c));
    }
    if let Some(c) = SwinConfig::preset(spec) {
        return Ok(ModelConfig::Swin(c));
    }
    let path = Path::new(spec);
    if path.is_dir() || spec.ends_with(".json") {
        // A model's widths as the runner writes them (`dims.json`, or the folder that holds it).
        let file = if path.is_dir() { path.join(crate::model::checkpoint::DIMS) } else { path.to_path_buf() };
        return ModelConfig::read_json(&file);
    }
    if !spec.ends_with(".toml") {
        let presets = crate::model::presets();
        bail!(
            "`{spec}` is neither a model preset{}, a pipeline file (.toml) nor a model's dims.json\n  hint: a preset is one of {}",
            crate::suggest::did_you_mean(spec, &presets),
            presets.join(", ")
        );
    }
    let overrides = crate::config::Overrides { env: false, ..Default::default() };
    let pipeline = crate::config::load(Path::new(spec), &overrides)?;
    let classes = match pipeline.model.num_classes {
        Some(n) => n,
        None => pipeline.dataset.open(crate::data::Split::Train, pipeline.pipeline.seed)?.num_classes(),
    };
    pipeline.model.resolve(classes).with_context(|| format!("{spec}: [model]"))
}

fn deit_only(config: crate::model::ModelConfig, spec: &str) -> Result<VitConfig> {
    match config {
        crate::model::ModelConfig::Deit(c) => Ok(c),
        other => bail!("{spec}: a {} model; `runner bench` measures DeiT models only, against timm's", other.family()),
    }
}

/// One model on one backend: `steps` timed training steps (forward, backward, AdamW) and
/// inference passes on a synthetic batch, after one untimed each; the rate is the batch over
/// the median step.
pub struct BenchModel {
    pub config: VitConfig,
    pub batch: usize,
    pub steps: usize,
    pub backend: BackendKind,
    pub devices: Vec<usize>,
    pub precision: Option<Precision>,
}

/// Images per second, at the median step.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    pub train: f64,
    pub inference: f64,
}

impl BackendJob for &BenchModel {
    type Output = Throughput;
    fn run<B: AutodiffBackend>(self, devices: Vec<B::Device>) -> Result<Throughput> {
        use burn::module::AutodiffModule;
        if self.steps == 0 || self.batch == 0 {
            bail!("--steps and --batch must be at least 1");
        }
        let config = &self.config;
        let device = &devices[0];
        let half = self.precision.map(|p| p.compute_dtype::<B>(&devices)).transpose()?.flatten();
        let mut model = crate::model::Model::Deit(config.init::<B>(device));
        let (size, chans) = (config.image_size, config.in_chans);
        let pixels = synthetic_pixels(self.batch * chans * size * size);
        let labels: Vec<i64> = (0..self.batch).map(|i| (i % config.num_classes) as i64).collect();
        let batch = crate::data::Batch { images: pixels, labels, shape: [self.batch, chans, size, size] };
        let targets = crate::data::mix::soft_targets(&batch.labels, config.num_classes, 0.1, 1.0);
        let mut optim = crate::train::optim::AdamW::<B>::new(0.05, None);

        let mut train_step = |model: crate::model::Model<B>| -> crate::model::Model<B> {
            let step = crate::train::parallel::data_parallel(&model, &crate::train::parallel::Team::local(&devices), self.batch, vec![(); devices.len()], |replica, range, (), weight| {
                let (images, _, t) = crate::train::shard_tensors::<B>(&batch, &targets, range, &replica.device());
                let output = crate::train::forward_in(replica, images, half);
                let loss = crate::train::classification_loss(&output, t).mul_scalar(weight);
                (crate::train::scalar(loss.clone()), loss.backward(), ())
            })
            .expect("one rank");
            optim.step(1e-4, model, step.grads)
        };
        // One untimed step each: kernels compile and memory pools grow on the first.
        model = train_step(model);
        let mut times = Vec::new();
        for _ in 0..self.steps {
            let start = Instant::now();
            model = train_step(model); // reading the loss synchronizes the device
            times.push(start.elapsed().as_secs_f64());
        }
        let train = self.batch as f64 / crate::machine::median(times);

        let eval = crate::train::in_precision(model.valid(), half);
        let x = crate::train::to_tensors::<B::InnerBackend>(batch.slice(0..self.batch), device).0;
        // The cast of the parameters is done once, as an inference deployment would.
        let infer = || drop(eval.forward(half.map_or(x.clone(), |d| x.clone().cast(d))).cls.slice([0..1, 0..1]).into_data());
        let inference = self.batch as f64 / crate::machine::median_time(1, self.steps, infer);
        Ok(Throughput { train, inference })
    }
}

const TRAIN: &str = "train (forward, backward, AdamW)";

/// `n` fixed pixel values in [-1, 1): the synthetic images of the benchmarks and of
/// `runner bench parity` (benches/torch_reference.py makes the same for PyTorch).
pub fn synthetic_pixels(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919) % 255) as f32 / 127.5 - 1.0).collect()
}

/// `runner bench model`: one model on one backend, into a CSV.
pub fn model(spec: &str, args: &BenchModel, out: &Path) -> Result<String> {
    let rate = backend::dispatch(args.backend, &args.devices, args)?;
    let device = backend::device_name(args.backend, args.devices[0]);
    let precision = args.precision.map_or("f32".to_string(), |p| p.to_string());
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(["what", "model", "batch", "devices", "precision", "steps", "images_per_s", "backend", "device"])?;
    let mut text = String::new();
    for (what, rate) in [(TRAIN, rate.train), ("inference", rate.inference)] {
        let (devices, rate) = (args.devices.len().to_string(), format!("{rate:.2}"));
        w.write_record([what, spec, &args.batch.to_string(), &devices, &precision, &args.steps.to_string(), &rate, &args.backend.to_string(), &device])?;
        text.push_str(&format!("{what}: {rate} images/s ({spec}, batch {}, {devices} device(s), {precision}, {} on {device})\n", args.batch, args.backend));
    }
    crate::files::atomic_write(out, &w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?)?;
    text.push_str(&format!("-> {}\n", out.display()));
    Ok(text)
}

/// `runner bench vs-pytorch`: each model on each backend, then on PyTorch + timm with the same
/// geometry, batch, precision and thread count, row after row in one run.
pub struct VsPytorch {
    /// `(model spec, batch)`.
    pub models: Vec<(String, usize)>,
    pub backends: Vec<BackendKind>,
    /// The runner's device index (a GPU's; 0 on the CPU).
    pub device: usize,
    pub precision: Option<Precision>,
    pub steps: usize,
    pub threads: usize,
    /// A Python with torch and timm.
    pub python: PathBuf,
    pub script: PathBuf,
    pub out: Option<PathBuf>,
}

/// What the reference printed for one measurement.
#[derive(serde::Deserialize)]
struct TorchRow {
    what: String,
    images_per_s: f64,
    torch: String,
    timm: String,
    threads: usize,
}

pub fn vs_pytorch(args: &VsPytorch) -> Result<String> {
    // Everything that can be known before the first measurement is checked first.
    for &b in &args.backends {
        backend::check(b, &[args.device])?;
    }
    let models = args.models.iter().map(|(spec, batch)| Ok((spec.as_str(), resolve_model(spec)?, *batch))).collect::<Result<Vec<_>>>()?;
    if !args.script.is_file() {
        bail!("{}: the PyTorch reference script is missing (run from the repository root, or pass --script)", args.script.display());
    }
    check_python(&args.python, &["torch", "timm"], ".venv-bench")?;
    use_threads(args.threads);

    let gpu = args.backends.iter().any(|b| backend::is_gpu(*b, args.device));
    let torch_device = if gpu { format!("cuda:{}", args.device) } else { "cpu".to_string() };
    let device = backend::device_name(args.backends[0], args.device);
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from(format!("results/bench/vs-pytorch-{}.csv", file_part(&device, gpu))));
    let precision = args.precision.unwrap_or(Precision::F32);

    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(["what", "model", "batch", "precision", "threads", "backend", "runner_images_per_s", "pytorch_images_per_s", "ratio", "device", "pytorch"])?;
    for (spec, config, batch) in &models {
        let mut ours = Vec::new();
        for &kind in &args.backends {
            // ndarray trains on every thread as a pipeline does, with one shard per thread
            // (`devices = [0, 0, ...]`, see `backend::concurrent_shards`).
            let devices = if kind.cpu_only() { vec![0; args.threads.min(*batch)] } else { vec![args.device] };
            let job = BenchModel { config: config.clone(), batch: *batch, steps: args.steps, backend: kind, devices: devices.clone(), precision: args.precision };
            ours.push((kind, backend::dispatch(kind, &devices, &job).with_context(|| format!("{spec} on {kind}"))?));
        }
        let theirs = torch_reference(args, config, *batch, &torch_device, precision).with_context(|| format!("{spec}: the PyTorch reference"))?;
        let torch = theirs.first().map_or(String::new(), |r| format!("torch {} + timm {} ({} threads)", r.torch, r.timm, r.threads));
        for row in &theirs {
            for (kind, rate) in &ours {
                let (what, mine) = if row.what == "train" { (TRAIN, rate.train) } else { ("inference", rate.inference) };
                let ratio = mine / row.images_per_s;
                w.write_record([
                    what,
                    spec,
                    &batch.to_string(),
                    &precision.to_string(),
                    &args.threads.to_string(),
                    &kind.to_string(),
                    &format!("{mine:.2}"),
                    &format!("{:.2}", row.images_per_s),
                    &format!("{ratio:.2}"),
                    &device,
                    &torch,
                ])?;
                eprintln!("{spec} (batch {batch}) {what}: {kind} {mine:.1} / PyTorch {:.1} images/s = {ratio:.2}x", row.images_per_s);
            }
        }
    }
    crate::files::atomic_write(&out, &w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?)?;
    Ok(format!("-> {} ({device}, {} threads)\n", out.display(), args.threads))
}

fn torch_reference(args: &VsPytorch, c: &VitConfig, batch: usize, device: &str, precision: Precision) -> Result<Vec<TorchRow>> {
    if c.blocks.iter().any(|b| b != &c.blocks[0]) || c.head_dim * c.blocks[0].heads != c.embed_dim {
        bail!("timm's DeiT has the same widths in every block: a pruned model has no PyTorch reference here");
    }
    let block = &c.blocks[0];
    let mut cmd = std::process::Command::new(&args.python);
    cmd.arg(&args.script);
    for (key, value) in [
        ("--image-size", c.image_size.to_string()),
        ("--patch-size", c.patch_size.to_string()),
        ("--in-chans", c.in_chans.to_string()),
        ("--num-classes", c.num_classes.to_string()),
        ("--embed-dim", c.embed_dim.to_string()),
        ("--depth", c.depth().to_string()),
        ("--heads", block.heads.to_string()),
        ("--mlp-ratio", (block.mlp as f64 / c.embed_dim as f64).to_string()),
        ("--batch", batch.to_string()),
        ("--steps", args.steps.to_string()),
        ("--threads", args.threads.to_string()),
        ("--device", device.to_string()),
        ("--precision", precision.to_string()),
    ] {
        cmd.arg(key).arg(value);
    }
    if c.distilled {
        cmd.arg("--distilled");
    }
    json_lines(cmd, &args.python, &args.script)
}

/// `runner bench kernels`: each of the model's fused training operations against the composite
/// it replaces, forward and backward, on one backend at each shape; the rule the model follows
/// (flash attention from so many tokens) is read off such a run.
pub struct BenchKernels {
    pub backend: BackendKind,
    /// `[batch, heads, tokens, width]` of Q, K and V.
    pub attention: Vec<[usize; 4]>,
    /// `[batch, tokens, embed]`.
    pub layer_norm: Vec<[usize; 3]>,
    pub steps: usize,
    pub threads: usize,
    pub out: Option<PathBuf>,
}

pub struct KernelRow {
    kernel: &'static str,
    shape: String,
    /// `None` where the backend has no fused kernel.
    fused: Option<f64>,
    composite: f64,
    model_takes: &'static str,
}

impl BackendJob for &BenchKernels {
    type Output = Vec<KernelRow>;
    fn run<B: AutodiffBackend>(self, devices: Vec<B::Device>) -> Result<Vec<KernelRow>> {
        use burn::tensor::{Distribution, Tensor};
        use crate::model::kernels;
        let device = &devices[0];
        let shape = |dims: &[usize]| dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x");
        // Forward and backward, synchronized by reading one input's gradient; the fused pass
        // first, to know whether the backend has one.
        let row = |kernel, dims: &[usize], pass: &dyn Fn(bool) -> Option<()>, model_fuses: bool| {
            let time = |fused| pass(fused).map(|_| crate::machine::median_time(1, self.steps, || {
                let _ = pass(fused);
            }));
            let fused = time(true);
            let model_takes = if fused.is_some() && model_fuses { "fused" } else { "composite" };
            KernelRow { kernel, shape: shape(dims), fused, composite: time(false).expect("the composite always runs"), model_takes }
        };
        let mut rows = Vec::new();
        for &[b, h, n, d] in &self.attention {
            let input = || Tensor::<B, 4>::random([b, h, n, d], Distribution::Normal(0.0, 1.0), device).require_grad();
            let (q, k, v) = (input(), input(), input());
            let scale = 1.0 / (d as f64).sqrt();
            let pass = |fused: bool| {
                let out = kernels::attention(q.clone(), k.clone(), v.clone(), scale, fused)?;
                let grads = out.sum().backward();
                q.grad(&grads).expect("q requires grad").sum().into_data();
                Some(())
            };
            rows.push(row("attention", &[b, h, n, d], &pass, kernels::attention_fused_from::<B>(n)));
        }
        for &[b, n, e] in &self.layer_norm {
            let ln = burn::nn::LayerNormConfig::new(e).with_epsilon(crate::model::LN_EPS).init::<B>(device);
            let x = Tensor::<B, 3>::random([b, n, e], Distribution::Normal(0.0, 1.0), device).require_grad();
            let pass = |fused: bool| {
                let out = kernels::layer_norm(&ln, x.clone(), crate::model::LN_EPS, fused)?;
                let grads = out.sum().backward();
                x.grad(&grads).expect("x requires grad").sum().into_data();
                Some(())
            };
            rows.push(row("layer_norm", &[b, n, e], &pass, true));
        }
        Ok(rows)
    }
}

/// The largest tensor `bench kernels` allocates (1 GiB of f32), several of which it holds.
const MAX_KERNEL_ELEMENTS: usize = 1 << 28;

pub fn kernels(args: &BenchKernels) -> Result<String> {
    let shapes = args.attention.iter().map(|s| &s[..]).chain(args.layer_norm.iter().map(|s| &s[..]));
    for shape in shapes {
        let elements = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d).filter(|&n| n <= MAX_KERNEL_ELEMENTS));
        if elements.is_none() || shape.contains(&0) {
            bail!("--attention / --layer-norm: {shape:?} is not a shape of 1 to {MAX_KERNEL_ELEMENTS} elements");
        }
    }
    backend::check(args.backend, &[0])?;
    use_threads(args.threads);
    let device = backend::device_name(args.backend, 0);
    let gpu = backend::is_gpu(args.backend, 0);
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from(format!("results/bench/kernels-{}-{}.csv", args.backend, file_part(&device, gpu))));
    let rows = backend::dispatch(args.backend, &[0], args)?;
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(["kernel", "shape", "fused_ms", "composite_ms", "composite_over_fused", "model_takes", "backend", "device", "threads", "steps"])?;
    let mut text = String::new();
    for r in &rows {
        let ms = |t: f64| format!("{:.3}", t * 1e3);
        let (fused, ratio) = match r.fused {
            Some(f) => (ms(f), format!("{:.2}", r.composite / f)),
            None => (String::new(), String::new()),
        };
        let (threads, steps) = (args.threads.to_string(), args.steps.to_string());
        w.write_record([r.kernel, &r.shape, &fused, &ms(r.composite), &ratio, r.model_takes, &args.backend.to_string(), &device, &threads, &steps])?;
        let fused = if fused.is_empty() { "no fused kernel".to_string() } else { format!("fused {fused} ms ({ratio}x)") };
        text.push_str(&format!("{} {}: composite {} ms, {fused}; the model takes the {}\n", r.kernel, r.shape, ms(r.composite), r.model_takes));
    }
    crate::files::atomic_write(&out, &w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?)?;
    text.push_str(&format!("-> {} ({} on {device}, {} threads, median of {} forward+backward passes)\n", out.display(), args.backend, args.threads, args.steps));
    Ok(text)
}

/// [`slug`], and `-avx512` on a CPU that has AVX-512: CPUs of one model name differ in it
/// (two AMD EPYC VMs of this project, one with and one without), and the CPU backends' speed
/// against MKL's with it.
fn file_part(device: &str, gpu: bool) -> String {
    #[cfg(target_arch = "x86_64")]
    if !gpu && std::arch::is_x86_feature_detected!("avx512f") {
        return format!("{}-avx512", slug(device, gpu));
    }
    slug(device, gpu)
}

/// A file-name part for the device: `cpu-` and the CPU's model on the CPU (`cpu-amd-epyc`: each
/// CPU keeps its own file), the GPU's model otherwise (`nvidia-h100-80gb-hbm3`).
fn slug(device: &str, gpu: bool) -> String {
    let name = if gpu {
        device.strip_prefix("cuda ").unwrap_or(device)
    } else {
        // `cpu AMD EPYC x2`: the thread count is a column of its own.
        device.rsplit_once(" x").filter(|(_, n)| n.parse::<usize>().is_ok()).map_or(device, |(m, _)| m)
    };
    let s: String = name.to_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    s.split('-').filter(|p| !p.is_empty()).collect::<Vec<_>>().join("-")
}

/// That `python` imports `packages`, else an error with the commands that install them.
fn check_python(python: &Path, packages: &[&str], venv: &str) -> Result<()> {
    let imports = packages.join(", ");
    let check = std::process::Command::new(python)
        .args(["-c", &format!("import {imports}")])
        .output()
        .with_context(|| format!("cannot run `{}`", python.display()))?;
    if !check.status.success() {
        bail!(
            "`{} -c 'import {imports}'` failed:\n{}\n  hint: python3 -m venv {venv} && {venv}/bin/pip install {}, then --python {venv}/bin/python",
            python.display(),
            String::from_utf8_lossy(&check.stderr).trim(),
            packages.join(" ")
        );
    }
    Ok(())
}

/// Runs a benchmark script and reads the JSON object on each line it prints that starts with `{`.
fn json_lines<T: serde::de::DeserializeOwned>(mut script: std::process::Command, python: &Path, name: &Path) -> Result<Vec<T>> {
    let output = script.stderr(std::process::Stdio::inherit()).output().with_context(|| format!("cannot run `{}`", python.display()))?;
    if !output.status.success() {
        bail!("{} exited with {}", name.display(), output.status);
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).with_context(|| format!("unexpected output line: {l}")))
        .collect()
}

/// The CPU backends' thread pools (rayon's, matrixmultiply's) get `threads`, as the other
/// runtime of a comparison does.
fn use_threads(threads: usize) {
    let _ = rayon::ThreadPoolBuilder::new().num_threads(threads).build_global();
    std::env::set_var("MATMUL_NUM_THREADS", threads.to_string());
}

/// `runner bench onnxruntime`: dense and pruned models of each pair, exported as ONNX and run
/// in ONNX Runtime (`benches/onnxruntime_bench.py`), beside the runner's own inference on the
/// same models, at each batch size; the speedup of the pruned model in each runtime.
pub struct VsOnnxruntime {
    /// `(dense, pruned)` model specs (see [`resolve_any_model`]): ViTs or Swins.
    pub pairs: Vec<(String, String)>,
    pub batches: Vec<usize>,
    pub backend: BackendKind,
    pub device: usize,
    pub steps: usize,
    pub threads: usize,
    /// A Python with onnxruntime and numpy.
    pub python: PathBuf,
    pub script: PathBuf,
    pub out: Option<PathBuf>,
}

/// The runner's inference images/s of a randomly initialized `config` at each batch size, the
/// model also written to `onnx` (speed does not depend on the weights' values).
struct Inference<'a> {
    config: &'a crate::model::ModelConfig,
    batches: &'a [usize],
    steps: usize,
    onnx: &'a Path,
}

impl BackendJob for Inference<'_> {
    type Output = Vec<f64>;
    fn run<B: AutodiffBackend>(self, devices: Vec<B::Device>) -> Result<Vec<f64>> {
        let device = &devices[0];
        let c = self.config;
        let model = c.init::<B::InnerBackend>(device);
        let spec = crate::export::InputSpec { mean: vec![0.5; c.in_chans()], std: vec![0.5; c.in_chans()], classes: None };
        crate::files::atomic_write(self.onnx, &crate::export::onnx::model_to_onnx(&model, &spec))?;
        let mut rates = Vec::new();
        for &batch in self.batches {
            let shape = [batch, c.in_chans(), c.image_size(), c.image_size()];
            let pixels = synthetic_pixels(shape.iter().product());
            let x = crate::model::float_tensor::<B::InnerBackend, 4>(pixels, shape, device);
            let infer = || drop(model.forward(x.clone()).logits().slice([0..1, 0..1]).into_data());
            rates.push(batch as f64 / crate::machine::median_time(1, self.steps, infer));
        }
        Ok(rates)
    }
}

#[derive(serde::Deserialize)]
struct OrtRow {
    model: String,
    batch: usize,
    images_per_s: f64,
    onnxruntime: String,
    provider: String,
}

pub fn vs_onnxruntime(args: &VsOnnxruntime) -> Result<String> {
    backend::check(args.backend, &[args.device])?;
    let mut models = Vec::new();
    for (dense, pruned) in &args.pairs {
        let (d, p) = (resolve_any_model(dense).with_context(|| format!("--pair {dense}"))?, resolve_any_model(pruned).with_context(|| format!("--pair {pruned}"))?);
        let input = |c: &crate::model::ModelConfig| (c.family(), c.image_size(), c.patch_size(), c.in_chans(), c.num_classes());
        if input(&d) != input(&p) {
            bail!(
                "--pair {dense} {pruned}: the two models differ in family, image size, patch size, channels or classes ({:?} vs {:?}): a speedup between them would not be pruning's",
                input(&d),
                input(&p)
            );
        }
        models.push((d, p));
    }
    if !args.script.is_file() {
        bail!("{}: the ONNX Runtime script is missing (run from the repository root, or pass --script)", args.script.display());
    }
    check_python(&args.python, &["onnxruntime", "numpy"], ".venv-ort")?;
    use_threads(args.threads);
    let gpu = backend::is_gpu(args.backend, args.device);
    let device = backend::device_name(args.backend, args.device);
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from(format!("results/bench/onnxruntime-{}.csv", file_part(&device, gpu))));

    let tmp = tempfile::tempdir()?;
    /// One model of a pair, measured by the runner and exported for ONNX Runtime as `name`.
    struct Measured<'a> {
        pair: usize,
        which: &'static str,
        spec: &'a str,
        config: &'a crate::model::ModelConfig,
        name: String,
        rates: Vec<f64>,
    }
    let mut ours = Vec::new();
    let mut script = std::process::Command::new(&args.python);
    script.arg(&args.script);
    for (i, ((dense, pruned), (dense_config, pruned_config))) in args.pairs.iter().zip(&models).enumerate() {
        for (which, spec, config) in [("dense", dense, dense_config), ("pruned", pruned, pruned_config)] {
            let name = format!("{i}-{which}");
            let onnx = tmp.path().join(format!("{name}.onnx"));
            let job = Inference { config, batches: &args.batches, steps: args.steps, onnx: &onnx };
            let rates = backend::dispatch(args.backend, &[args.device], job).with_context(|| format!("{spec} on {}", args.backend))?;
            script.arg("--model").arg(format!("{name}={}", onnx.display()));
            ours.push(Measured { pair: i, which, spec, config, name, rates });
        }
    }
    let batches: Vec<String> = args.batches.iter().map(|b| b.to_string()).collect();
    script.args(["--batches", &batches.join(","), "--steps", &args.steps.to_string(), "--threads", &args.threads.to_string()]);
    script.args(["--device", if gpu { "cuda" } else { "cpu" }]);
    let theirs: Vec<OrtRow> = json_lines(script, &args.python, &args.script)?;
    let ort = |name: &str, batch: usize| {
        theirs.iter().find(|r| r.model == name && r.batch == batch).ok_or_else(|| anyhow::anyhow!("{} printed no rate for {name} at batch {batch}", args.script.display()))
    };

    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "pair", "model", "spec", "params_m", "gflops", "batch", "threads", "runner_backend", "runner_images_per_s", "runner_speedup",
        "onnxruntime_images_per_s", "onnxruntime_speedup", "device", "onnxruntime",
    ])?;
    let mut text = String::new();
    for m in &ours {
        let dense = ours.iter().find(|o| o.pair == m.pair && o.which == "dense").expect("every pair has a dense model");
        let pair = format!("{} / {}", args.pairs[m.pair].0, args.pairs[m.pair].1);
        let (spec, config, rates) = (m.spec, m.config, &m.rates);
        for (b, &batch) in args.batches.iter().enumerate() {
            let (row, dense_row) = (ort(&m.name, batch)?, ort(&dense.name, batch)?);
            let (runner_speedup, ort_speedup) = (rates[b] / dense.rates[b], row.images_per_s / dense_row.images_per_s);
            w.write_record([
                pair.as_str(),
                m.which,
                spec,
                &format!("{:.3}", config.params() as f64 / 1e6),
                &format!("{:.4}", config.flops() as f64 / 1e9),
                &batch.to_string(),
                &args.threads.to_string(),
                &args.backend.to_string(),
                &format!("{:.2}", rates[b]),
                &format!("{runner_speedup:.2}"),
                &format!("{:.2}", row.images_per_s),
                &format!("{ort_speedup:.2}"),
                &device,
                &format!("onnxruntime {} ({})", row.onnxruntime, row.provider),
            ])?;
            text.push_str(&format!(
                "{spec} batch {batch}: runner {:.1} images/s ({runner_speedup:.2}x), ONNX Runtime {:.1} images/s ({ort_speedup:.2}x)\n",
                rates[b], row.images_per_s
            ));
        }
    }
    crate::files::atomic_write(&out, &w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?)?;
    text.push_str(&format!("-> {} ({device}, {} threads)\n", out.display(), args.threads));
    Ok(text)
}

/// `runner bench latency`: how far the latency table's estimate can be trusted on this device.
/// For a dense DeiT and pruned width sets, the table's estimated latency ratio beside the sum
/// of the model's blocks timed alone at their exact widths (what the table would say without
/// interpolation) and beside the whole model measured against the dense one in pairs.
pub struct BenchLatency {
    pub dense: String,
    pub pruned: Vec<String>,
    /// Width sets added evenly between the dense model and the first pruned one.
    pub between: usize,
    /// A table to import (reference JSON layout); unset: profile one on `grid`.
    pub table: Option<PathBuf>,
    pub grid: crate::stages::profile_latency::GridChoice,
    pub batch: usize,
    pub repeats: usize,
    pub rounds: usize,
    pub pairs: usize,
    pub backend: BackendKind,
    pub runtime: crate::onnxruntime::Runtime,
    pub onnxruntime_provider: crate::onnxruntime::Provider,
    pub threads: usize,
    pub out: Option<PathBuf>,
}

/// One width set as `bench latency` measured it; times in seconds per batch.
struct LatencyRow {
    name: String,
    config: VitConfig,
    estimate: f64,
    blocks_alone: f64,
    model: f64,
    measured: crate::machine::Ratio,
}

/// Widths `t` of the way from `dense` to `pruned`, rounded, each at least 1.
fn between_widths(dense: &VitConfig, pruned: &VitConfig, t: f64) -> VitConfig {
    let lerp = |a: usize, b: usize| ((a as f64 + t * (b as f64 - a as f64)).round() as usize).max(1);
    let mut c = pruned.clone();
    c.embed_dim = lerp(dense.embed_dim, pruned.embed_dim);
    c.blocks = dense
        .blocks
        .iter()
        .zip(&pruned.blocks)
        .map(|(d, p)| crate::model::BlockDims { heads: lerp(d.heads, p.heads), qk: lerp(d.qk, p.qk), v: lerp(d.v, p.v), mlp: lerp(d.mlp, p.mlp) })
        .collect();
    c
}

struct LatencyJob<'a> {
    args: &'a BenchLatency,
    clock: &'a crate::onnxruntime::Clock,
    /// `(name, config)`, the dense model first.
    sets: &'a [(String, VitConfig)],
    table_out: &'a Path,
}

impl BackendJob for LatencyJob<'_> {
    type Output = (Vec<LatencyRow>, crate::prune::ModelLatency);
    fn run<B: AutodiffBackend>(self, devices: Vec<B::Device>) -> Result<Self::Output> {
        use crate::model::ModelConfig;
        use crate::prune::ModelLatency;
        use crate::stages::profile_latency::{profile, Workload};
        type I<B> = <B as AutodiffBackend>::InnerBackend;
        let (device, args, clock) = (&devices[0], self.args, self.clock);
        let dense = ModelConfig::Deit(self.sets[0].1.clone());
        let workload = Workload { batch: args.batch, tokens: None, warmup: 1, repeats: args.repeats };
        let table = match &args.table {
            Some(path) => ModelLatency::from_json(path)?,
            None => {
                let (e, blocks) = &dense.stages()[0];
                let grid = args.grid.grid(*e, blocks);
                let points = grid.points().len();
                let table = profile::<I<B>>(clock, &dense, 0, grid, &workload, args.rounds, Vec::new(), device, |values| {
                    let n = values.len();
                    if n % 64 == 0 || n % points == 0 {
                        eprintln!("profiling the latency table: round {} of {}, {} of {points} points", n.div_ceil(points), args.rounds, (n - 1) % points + 1);
                    }
                    Ok(())
                })?
                .monotone();
                let table = ModelLatency { stages: vec![table] };
                crate::files::atomic_write(self.table_out, &serde_json::to_vec_pretty(&table.to_json())?)?;
                table
            }
        };
        table.check(&dense)?;
        let dense_model = dense.init::<I<B>>(device);
        let mut rows = Vec::new();
        for (name, config) in self.sets {
            crate::interrupt::check()?;
            eprintln!("timing {name}");
            let model_config = ModelConfig::Deit(config.clone());
            let estimate = table.model_latency(&model_config);
            let blocks_alone = config.blocks.iter().map(|d| clock.time_block::<I<B>>(&model_config, 0, config.embed_dim, d, &workload, device)).sum::<Result<f64>>()?;
            let model = model_config.init::<I<B>>(device);
            let time = clock.median(&model, args.batch, 1, args.repeats, device)?;
            let measured = clock.paired(&model, &dense_model, args.batch, 1, args.pairs, device)?;
            rows.push(LatencyRow { name: name.clone(), config: config.clone(), estimate, blocks_alone, model: time, measured });
        }
        Ok((rows, table))
    }
}

pub fn latency(args: &BenchLatency) -> Result<String> {
    if args.batch == 0 || args.repeats == 0 || args.rounds == 0 || args.pairs == 0 {
        bail!("--batch, --repeats, --rounds and --pairs must be at least 1");
    }
    let dense = resolve_model(&args.dense).with_context(|| format!("--dense {}", args.dense))?;
    let mut sets = vec![(args.dense.clone(), dense.clone())];
    for spec in &args.pruned {
        let p = resolve_model(spec).with_context(|| format!("--pruned {spec}"))?;
        let geometry = |c: &VitConfig| (c.image_size, c.patch_size, c.in_chans, c.num_classes, c.distilled, c.blocks.len());
        if geometry(&p) != geometry(&dense) {
            bail!(
                "--pruned {spec}: not a pruned {}: image size, patch size, channels, classes, distillation or depth differ ({:?} vs {:?})",
                args.dense,
                geometry(&p),
                geometry(&dense)
            );
        }
        sets.push((spec.clone(), p));
    }
    if args.between > 0 {
        let Some((first, pruned)) = sets.get(1).cloned() else { bail!("--between needs a --pruned width set to go towards") };
        for k in 1..=args.between {
            let t = k as f64 / (args.between + 1) as f64;
            sets.insert(k, (format!("{:.0}% of the way to {first}", t * 100.0), between_widths(&dense, &pruned, t)));
        }
    }
    if let Some(t) = &args.table {
        if !t.is_file() {
            bail!("--table {}: no such file", t.display());
        }
    }
    backend::check(args.backend, &[0])?;
    use_threads(args.threads);
    let device = backend::device_name(args.backend, 0);
    let gpu = backend::is_gpu(args.backend, 0);
    let clock = crate::onnxruntime::Clock::new(args.runtime, args.onnxruntime_provider, format!("{} on {device} {} threads", args.backend, args.threads))?;
    let runtime = clock.describe();
    let timed_on = match args.runtime {
        crate::onnxruntime::Runtime::Backend => args.backend.to_string(),
        crate::onnxruntime::Runtime::Onnxruntime => "onnxruntime".to_string(),
    };
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from(format!("results/bench/latency-{timed_on}-{}.csv", file_part(&device, gpu))));
    let table_out = out.with_extension("table.json");
    let (rows, table) = backend::dispatch(args.backend, &[0], LatencyJob { args, clock: &clock, sets: &sets, table_out: &table_out })?;
    let table_source = match &args.table {
        Some(t) => t.display().to_string(),
        None => format!("{} ({} grid, {} points, median of {} rounds, monotone)", table_out.display(), format!("{:?}", args.grid).to_lowercase(), table.stages[0].grid.points().len(), args.rounds),
    };

    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "set", "embed_dim", "params_m", "gflops", "estimated_ms", "blocks_alone_ms", "model_ms", "estimated_ratio", "blocks_alone_ratio", "measured_ratio",
        "measured_min", "measured_max", "pairs", "estimate_error", "batch", "backend", "device", "threads", "table", "runtime",
    ])?;
    let d = &rows[0];
    let mut text = String::new();
    for r in &rows {
        let (est, alone) = (r.estimate / d.estimate, r.blocks_alone / d.blocks_alone);
        let error = est / r.measured.median - 1.0;
        let ms = |t: f64| format!("{:.2}", t * 1e3);
        let ratio = |x: f64| format!("{x:.4}");
        w.write_record([
            r.name.as_str(),
            &r.config.embed_dim.to_string(),
            &format!("{:.3}", r.config.params() as f64 / 1e6),
            &format!("{:.4}", r.config.flops() as f64 / 1e9),
            &ms(r.estimate),
            &ms(r.blocks_alone),
            &ms(r.model),
            &ratio(est),
            &ratio(alone),
            &ratio(r.measured.median),
            &ratio(r.measured.min),
            &ratio(r.measured.max),
            &r.measured.pairs.to_string(),
            &format!("{error:+.4}"),
            &args.batch.to_string(),
            &args.backend.to_string(),
            &device,
            &args.threads.to_string(),
            &table_source,
            &runtime,
        ])?;
        text.push_str(&format!(
            "{}: estimated {est:.3}, blocks alone {alone:.3}, measured {:.3} ({:.3}-{:.3} over {} pairs): the estimate is {:+.1}% off; the blocks are {:.0}% of the model's {} ms\n",
            r.name,
            r.measured.median,
            r.measured.min,
            r.measured.max,
            r.measured.pairs,
            error * 100.0,
            r.blocks_alone / r.model * 100.0,
            ms(r.model)
        ));
    }
    crate::files::atomic_write(&out, &w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?)?;
    text.push_str(&format!("-> {} ({runtime}, batch {}; table: {table_source})\n", out.display(), args.batch));
    Ok(text)
}

#[cfg(test)]
mod tests {
    #[test]
    fn width_sets_between_run_from_the_dense_widths_to_the_pruned() {
        let dense = crate::model::VitConfig::uniform(32, 8, 3, 64, 4, 4, 4.0, 10, false);
        let mut pruned = dense.clone();
        pruned.embed_dim = 32;
        pruned.blocks[0] = crate::model::BlockDims { heads: 1, qk: 4, v: 16, mlp: 100 };
        assert_eq!(super::between_widths(&dense, &pruned, 0.0), dense);
        assert_eq!(super::between_widths(&dense, &pruned, 1.0), pruned);
        let mid = super::between_widths(&dense, &pruned, 0.5);
        assert_eq!(mid.embed_dim, 48);
        assert_eq!(mid.blocks[0], crate::model::BlockDims { heads: 3, qk: 10, v: 16, mlp: 178 });
        assert_eq!(mid.blocks[1], dense.blocks[1]);
    }

    #[test]
    fn width_sets_between_need_a_pruned_one_to_go_towards() {
        let args = super::BenchLatency {
            dense: "deit-tiny-distilled".into(),
            pruned: Vec::new(),
            between: 1,
            table: None,
            grid: crate::stages::profile_latency::GridChoice::Coarse,
            batch: 1,
            repeats: 1,
            rounds: 1,
            runtime: crate::onnxruntime::Runtime::Backend,
            onnxruntime_provider: crate::onnxruntime::Provider::Cpu,
            pairs: 1,
            backend: crate::backend::BackendKind::Flex,
            threads: 1,
            out: None,
        };
        let err = super::latency(&args).unwrap_err().to_string();
        assert!(err.contains("--between needs a --pruned width set"), "{err}");
        let none = super::BenchLatency { between: 0, batch: 0, ..args };
        assert!(super::latency(&none).unwrap_err().to_string().contains("must be at least 1"));
    }

    #[test]
    fn each_cpu_and_gpu_model_gets_its_own_file_name() {
        assert_eq!(super::slug("cpu AMD EPYC x2", false), "cpu-amd-epyc");
        assert_eq!(super::slug("cpu Intel(R) Xeon(R) Platinum 8488C x16", false), "cpu-intel-r-xeon-r-platinum-8488c");
        assert_eq!(super::slug("cuda NVIDIA H100 80GB HBM3", true), "nvidia-h100-80gb-hbm3");
    }
}
