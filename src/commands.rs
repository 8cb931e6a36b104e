//! What each `runner` subcommand does; `main.rs` only parses arguments and prints errors.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use burn::tensor::backend::AutodiffBackend;

use crate::backend::{self, BackendJob};
use crate::config::{self, Overrides, Pipeline};
use crate::pipeline::{self, Cache, Plan, RunDir, RunLog};
use crate::stages::StageKind;

pub struct RunArgs {
    pub pipeline: PathBuf,
    pub overrides: Overrides,
    pub force: Vec<String>,
    pub dry_run: bool,
}

pub fn load(path: &Path, overrides: &Overrides) -> Result<Pipeline> {
    Ok(config::load(path, overrides)?)
}

/// `runner run`: plans, then executes (or, with `--dry-run`, prints the plan).
pub fn run(args: &RunArgs, cache: &Cache) -> Result<()> {
    let pipeline = load(&args.pipeline, &args.overrides)?;
    let p = &pipeline.pipeline;
    check_memory(&pipeline)?;
    let device_name = pipeline.device_name();
    let mut plan = pipeline::plan(&pipeline, cache, &args.force, &device_name)?;
    if args.dry_run {
        print!("{}", pipeline::describe(&plan));
        if !backend::compiled(p.backend) {
            println!("note: backend `{0}` is not compiled into this runner: `runner run` would stop here\n  hint: build it with `cargo build --release --features {0}`", p.backend);
        }
        return Ok(());
    }
    let run_dir = RunDir::create(&pipeline)?;
    run_dir.log.info(&format!(
        "pipeline {} ({}) on {} [{device_name}], run directory {}",
        p.name,
        args.pipeline.display(),
        p.backend,
        run_dir.path.display()
    ));
    for line in pipeline::describe(&plan).lines() {
        run_dir.log.info(line);
    }
    let job = Execute { pipeline: &pipeline, plan: &mut plan, cache, device_name: &device_name, run_dir: &run_dir.path, log: &run_dir.log };
    backend::dispatch(p.backend, &p.devices, job)?;
    run_dir.log.info(&format!("finished; results in {}", p.results_dir.join(&p.name).display()));
    Ok(())
}

/// Refuses a batch whose lower-bound memory exceeds what the machine has available (CPU
/// backends, where that is known), naming the key, before any stage runs.
fn check_memory(pipeline: &Pipeline) -> Result<()> {
    if pipeline.pipeline.backend != backend::BackendKind::Ndarray {
        return Ok(());
    }
    let Some(available) = available_memory() else { return Ok(()) };
    let Ok(model) = pipeline.model.resolve(pipeline.model.num_classes.unwrap_or(1000)) else { return Ok(()) };
    let mut problems = Vec::new();
    for spec in &pipeline.stages {
        if let Some((key, batch, bytes)) = crate::stages::memory_needed(spec, &model) {
            if bytes > available as f64 {
                problems.push(format!(
                    "{}: {key} = {batch} needs at least {:.1} GB for one step of a {}-block model of width {}; this machine has {:.1} GB available\n  hint: lower {key}",
                    pipeline.path.display(),
                    bytes / 1e9,
                    model.depth(),
                    model.embed_dim,
                    available as f64 / 1e9
                ));
            }
        }
    }
    if !problems.is_empty() {
        return Err(config::ConfigErrors(problems).into());
    }
    Ok(())
}

/// `MemAvailable` of /proc/meminfo, in bytes.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

struct Execute<'a> {
    pipeline: &'a Pipeline,
    plan: &'a mut Plan,
    cache: &'a Cache,
    device_name: &'a str,
    run_dir: &'a Path,
    log: &'a RunLog,
}

impl BackendJob for Execute<'_> {
    type Output = Vec<pipeline::StageRecord>;
    fn run<B: AutodiffBackend>(self, devices: Vec<B::Device>) -> Result<Self::Output> {
        pipeline::execute::<B>(self.pipeline, self.plan, self.cache, &devices, self.device_name, Some(self.run_dir), self.log)
    }
}

/// `runner show`: every resolved value and the layer it came from, as TOML that would resolve
/// to the same pipeline: sections, then stages in the order they run, each with its input
/// (implied ones marked), unset keys as comments.
pub fn show(path: &Path, overrides: &Overrides) -> Result<String> {
    let pipeline = load(path, overrides)?;
    let rows = pipeline.provenance();
    let mut tables: Vec<(String, Vec<(String, String, String)>)> = ["", "pipeline", "dataset", "model"]
        .iter()
        .map(|section| (section.to_string(), Vec::new()))
        .collect();
    for stage in &pipeline.stages {
        let implied = stage.input.as_ref().filter(|_| !rows.iter().any(|(k, _, _)| *k == format!("stages.{}.input", stage.name)));
        let mut own = Vec::new();
        if let Some(input) = implied {
            own.push(("input".to_string(), format!("{input:?}"), "implied: the previous stage".to_string()));
        }
        tables.push((format!("stages.{}", stage.name), own));
    }
    for (key, value, origin) in rows {
        // The longest table name that prefixes the key: `stages.train` for `stages.train.lr`.
        if let Some((_, table)) = tables.iter_mut().filter(|(t, _)| key.starts_with(&format!("{t}."))).max_by_key(|(t, _)| t.len()) {
            table.push((key.clone(), value, origin));
        } else {
            tables[0].1.push((key, value, origin)); // top-level keys such as `extends`, before any table
        }
    }
    let mut out = String::new();
    for (table, entries) in tables.iter().filter(|(t, e)| !t.is_empty() || !e.is_empty()) {
        if !table.is_empty() {
            out.push_str(&format!("[{table}]\n"));
        }
        let width = entries.iter().map(|(k, v, _)| relative(table, k).len() + v.len() + 3).max().unwrap_or(0);
        for (key, value, origin) in entries {
            let key = relative(table, key);
            let line = if value == "unset" { format!("# {key} = (unset)") } else { format!("{key} = {value}") };
            out.push_str(&format!("{line:<width$}  # {origin}\n"));
        }
        out.push('\n');
    }
    Ok(out)
}

/// `key` without its table's prefix.
fn relative<'a>(table: &str, key: &'a str) -> &'a str {
    key.strip_prefix(table).and_then(|k| k.strip_prefix('.')).unwrap_or(key)
}

/// `runner stages`: every stage kind, its keys, types, defaults and docs.
pub fn stages() -> String {
    let mut out = String::from("Every stage table takes `kind` and `input` (the stage whose model it consumes; default: the previous stage).\n");
    for kind in StageKind::ALL {
        out.push_str(&format!("\n{}: {}\n", kind.name(), kind.doc()));
        let defaults = serde_json::to_value(kind.default_settings()).unwrap_or_default();
        for (key, ty, doc) in kind.keys() {
            let default = match &defaults[*key] {
                serde_json::Value::Null => "unset".to_string(),
                v => v.to_string(),
            };
            out.push_str(&format!("  {key:<20} {ty:<8} default {default:<10} {doc}\n"));
        }
    }
    out
}

/// `runner cache ls`: columns as wide as their longest value.
pub fn cache_ls(cache: &Cache) -> Result<String> {
    let mut rows = vec![["key", "stage", "kind", "pipeline", "size", "last used"].map(String::from)];
    for e in cache.entries()? {
        let (stage, kind, pipeline) = match &e.manifest {
            Some(m) => (m.stage.clone(), m.kind.clone(), m.pipeline.clone()),
            None => ("(incomplete)".into(), String::new(), String::new()),
        };
        let used = e
            .last_used
            .map(|t| chrono::DateTime::<chrono::Local>::from(t).format("%Y-%m-%d %H:%M").to_string())
            .unwrap_or_else(|| "-".into());
        rows.push([e.key, stage, kind, pipeline, human_bytes(e.bytes), used]);
    }
    let widths: Vec<usize> = (0..6).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in &rows {
        let cells: Vec<String> = r.iter().zip(&widths).enumerate().map(|(c, (v, w))| if c == 4 { format!("{v:>w$}") } else { format!("{v:<w$}") }).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    Ok(out)
}

/// `runner cache gc`: removes entries that no pipeline or sweep point under `dir` references
/// and that were not used within `keep_days`. Entries of a pipeline that cannot be resolved now
/// (its dataset is missing, say) are kept; a sweep that cannot be expanded stops it.
pub fn cache_gc(cache: &Cache, dir: &Path, keep_days: f64, dry_run: bool) -> Result<String> {
    let mut keep = HashSet::new();
    let mut kept_pipelines = HashSet::new();
    let mut notes = String::new();
    let mut found = 0;
    let files = walkdir::WalkDir::new(dir).sort_by_file_name().into_iter().filter_map(|e| e.ok());
    for entry in files.filter(|e| e.path().extension().is_some_and(|x| x == "toml")) {
        let path = entry.path();
        // Unreadable files go to `load`, whose error keeps their entries below.
        let doc = std::fs::read_to_string(path).ok().and_then(|t| t.parse::<toml::Table>().ok());
        let pipelines = if doc.as_ref().is_some_and(|d| d.contains_key("grid")) {
            // The points are `--set` variants no pipeline file names: expand them.
            let (_, points) = crate::sweep::Sweep::read(path)
                .and_then(|s| s.check())
                .with_context(|| format!("{}: cannot expand this sweep, so cannot tell which entries its points use; nothing removed\n  hint: fix or move the file, then run gc again", path.display()))?;
            points.into_iter().map(Ok).collect()
        } else if doc.is_some_and(|d| !d.contains_key("stages") && !d.contains_key("pipeline")) {
            continue; // a layer for `--with` (smoke.toml), not a pipeline
        } else {
            vec![load(path, &Overrides::default())]
        };
        found += 1;
        for p in pipelines {
            match p.and_then(|p| pipeline::plan(&p, cache, &[], &p.device_name())) {
                Ok(plan) => keep.extend(plan.stages.into_iter().map(|s| s.key)),
                Err(e) => {
                    let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
                    notes.push_str(&format!("kept entries of {}: it does not resolve now ({})\n", path.display(), e.to_string().lines().next().unwrap_or("")));
                    kept_pipelines.insert(stem);
                }
            }
        }
    }
    if found == 0 {
        anyhow::bail!(
            "found no pipeline under `{}`: gc removes only entries it can prove no pipeline uses, so it removed nothing\n  hint: run it from the repository root, or pass --pipelines DIR",
            dir.display()
        );
    }
    for e in cache.entries()? {
        if e.manifest.as_ref().is_some_and(|m| kept_pipelines.contains(&m.pipeline)) {
            keep.insert(e.key);
        }
    }
    let recent = std::time::Duration::from_secs_f64(keep_days.max(0.0) * 86400.0);
    let removed = cache.gc(&keep, recent, dry_run).context("collecting the cache")?;
    let bytes: u64 = removed.iter().map(|e| e.bytes).sum();
    let verb = if dry_run { "would remove" } else { "removed" };
    let mut out = notes;
    for e in &removed {
        let what = e.manifest.as_ref().map_or("(incomplete)".to_string(), |m| format!("{} {} of {}", m.stage, m.kind, m.pipeline));
        out.push_str(&format!("{verb} {} {what} ({})\n", e.key, human_bytes(e.bytes)));
    }
    out.push_str(&format!(
        "{verb} {} entries ({}); kept {} referenced by {found} pipeline or sweep files, and any used in the last {keep_days} days\n",
        removed.len(),
        human_bytes(bytes),
        keep.len()
    ));
    Ok(out)
}

fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

/// `runner bench loader`: images/s of the loader on an ImageFolder of JPEGs, with the training
/// transform (decode, random-resized crop to `size`, flip, normalize) on every core.
pub fn bench_loader(root: Option<&Path>, images: usize, size: u32, batch: usize, out: &Path) -> Result<String> {
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
    w.write_record(["loader train transform", &source, &seen.to_string(), &size.to_string(), &batch.to_string(), &workers.to_string(), &format!("{rate:.1}"), &cpu])?;
    crate::files::atomic_write(out, &w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?)?;
    Ok(format!("{seen} images in {:.2} s: {rate:.1} images/s ({workers} workers, {cpu}) -> {}\n", start.elapsed().as_secs_f64(), out.display()))
}

/// `runner bench model`: training and inference images/s of a model of `preset`'s widths on
/// synthetic images, on whichever backend and devices (data-parallel training over several).
pub struct BenchModel {
    pub preset: String,
    pub batch: usize,
    pub steps: usize,
    pub backend: crate::backend::BackendKind,
    pub devices: Vec<usize>,
    pub precision: Option<crate::train::Precision>,
    pub out: PathBuf,
}

impl BackendJob for &BenchModel {
    type Output = Vec<[String; 2]>;
    fn run<B: AutodiffBackend>(self, devices: Vec<B::Device>) -> Result<Self::Output> {
        use burn::module::AutodiffModule;
        use std::time::Instant;
        let config = crate::model::VitConfig::preset(&self.preset)
            .with_context(|| format!("--preset {}: not a known model preset", self.preset))?;
        let device = &devices[0];
        let half = self.precision.map(|p| p.compute_dtype::<B>(&devices)).transpose()?.flatten();
        let mut model = config.init::<B>(device);
        let size = config.image_size;
        let pixels: Vec<f32> = (0..self.batch * 3 * size * size).map(|i| ((i * 7919) % 255) as f32 / 127.5 - 1.0).collect();
        let labels: Vec<i64> = (0..self.batch).map(|i| (i % config.num_classes) as i64).collect();
        let batch = crate::data::Batch { images: pixels, labels, shape: [self.batch, 3, size, size] };
        let targets = crate::data::mix::soft_targets(&batch.labels, config.num_classes, 0.1, 1.0);
        let mut optim = crate::train::optim::AdamW::<B>::new(0.05, None);

        let mut train_step = |model: crate::model::Vit<B>| -> crate::model::Vit<B> {
            let step = crate::train::parallel::data_parallel(&model, &devices, self.batch, vec![(); devices.len()], |replica, range, (), weight| {
                let (images, _, t) = crate::train::shard_tensors::<B>(&batch, &targets, range, &replica.cls_token.device());
                let output = crate::train::forward_in(replica, images, half);
                let loss = crate::train::classification_loss(&output, t).mul_scalar(weight);
                (crate::train::scalar(loss.clone()), loss.backward(), ())
            });
            optim.step(1e-4, model, step.grads)
        };
        // One untimed step each: kernels compile and memory pools grow on the first.
        model = train_step(model);
        let start = Instant::now();
        for _ in 0..self.steps {
            model = train_step(model); // reading the loss synchronizes the device
        }
        let train = (self.batch * self.steps) as f64 / start.elapsed().as_secs_f64();

        let eval = crate::train::in_precision(model.valid(), half);
        let x = crate::train::to_tensors::<B::InnerBackend>(batch.slice(0..self.batch), device).0;
        // The cast of the parameters is done once, as an inference deployment would.
        let infer = || eval.forward(half.map_or(x.clone(), |d| x.clone().cast(d))).cls.slice([0..1, 0..1]).into_data();
        infer();
        let start = Instant::now();
        for _ in 0..self.steps {
            infer();
        }
        let inference = (self.batch * self.steps) as f64 / start.elapsed().as_secs_f64();
        Ok(vec![["train (forward, backward, AdamW)".into(), format!("{train:.1}")], ["inference".into(), format!("{inference:.1}")]])
    }
}

pub fn bench_model(args: &BenchModel) -> Result<String> {
    let rows = backend::dispatch(args.backend, &args.devices, args)?;
    let device = backend::device_name(args.backend, args.devices[0]);
    let precision = args.precision.map_or("f32".to_string(), |p| p.to_string());
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(["what", "model", "batch", "devices", "precision", "steps", "images_per_s", "backend", "device"])?;
    let mut out = String::new();
    for [what, rate] in &rows {
        let devices = args.devices.len().to_string();
        w.write_record([what.as_str(), &args.preset, &args.batch.to_string(), &devices, &precision, &args.steps.to_string(), rate, &args.backend.to_string(), &device])?;
        out.push_str(&format!("{what}: {rate} images/s ({}, batch {}, {} device(s), {precision}, {} on {device})\n", args.preset, args.batch, devices, args.backend));
    }
    crate::files::atomic_write(&args.out, &w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?)?;
    out.push_str(&format!("-> {}\n", args.out.display()));
    Ok(out)
}
