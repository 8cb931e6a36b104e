//! `runner sweep`: one base pipeline, a grid of `--set` values, every point run as its own
//! `runner run` process. Points share the stage cache, so the stages they have in common (load,
//! latency profile, the dense model's scores) run once; the cache's per-entry lock makes that
//! safe for workers on one machine and for Slurm array tasks on a shared filesystem alike.
//!
//! ```toml
//! pipeline = "../nvit-base.toml"       # relative to this file
//! with = ["../smoke.toml"]             # optional, as `runner run --with`
//! devices = [0, 1, 2, 3]               # local workers: one per `devices_per_point` devices
//!
//! [set]                                # fixed overrides for every point
//! "stages.distill.epochs" = 100
//!
//! [grid]                               # one point per combination, first key slowest
//! "stages.prune.latency_target" = [0.54, 0.50, 0.39, 0.19]
//!
//! [slurm]                              # for `--emit-slurm`
//! time = "72:00:00"
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::{self, Overrides, Pipeline};
use crate::files::atomic_write;
use crate::pipeline::{self, Cache};
use crate::runlog::RunLog;
use crate::report::{plots, table};
use crate::stages::StageKind;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepFile {
    /// The base pipeline, relative to the sweep file.
    pub pipeline: PathBuf,
    /// Files layered over the base pipeline (`--with`), relative to the sweep file.
    #[serde(default)]
    pub with: Vec<PathBuf>,
    /// Name of the sweep: names `results/<name>/` and `runs/sweeps/<name>/`. Default: file stem.
    pub name: Option<String>,
    /// Device indices for local workers. Default `[0]`.
    #[serde(default = "default_devices")]
    pub devices: Vec<usize>,
    /// Devices each point trains on (data parallel). Default 1.
    #[serde(default = "one")]
    pub devices_per_point: usize,
    /// Overrides applied to every point.
    #[serde(default)]
    pub set: toml::Table,
    /// Key path -> list of values.
    pub grid: toml::Table,
    #[serde(default)]
    pub slurm: SlurmSection,
}

fn default_devices() -> Vec<usize> {
    vec![0]
}

fn one() -> usize {
    1
}

/// `#SBATCH` settings of `--emit-slurm`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SlurmSection {
    /// Array tasks; each runs every `shards`-th point. Default: one per point.
    pub shards: Option<usize>,
    pub time: String,
    pub cpus_per_task: usize,
    pub mem: String,
    pub partition: Option<String>,
    /// Further `#SBATCH` options, verbatim (`--account=...`, `--constraint=...`).
    pub extra: Vec<String>,
}

impl SlurmSection {
    /// Problems as `(key, message)`: every value goes into an `#SBATCH` line of the script, so
    /// none may hold a line break (which would make the rest a command) or be empty.
    fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let token = |key: &str, value: &str, problems: &mut Vec<(String, String)>| {
            if value.is_empty() || value.chars().any(|c| c.is_control() || c.is_whitespace()) {
                problems.push((key.to_string(), format!("{value:?}: expected one word without spaces or line breaks")));
            }
        };
        token("time", &self.time, &mut problems);
        token("mem", &self.mem, &mut problems);
        if let Some(p) = &self.partition {
            token("partition", p, &mut problems);
        }
        for (i, e) in self.extra.iter().enumerate() {
            if !e.starts_with("--") || e.chars().any(char::is_control) {
                problems.push((format!("extra[{i}]"), format!("{e:?}: expected one sbatch option on one line, such as \"--account=lab\"")));
            }
        }
        if self.cpus_per_task == 0 {
            problems.push(("cpus_per_task".into(), "must be at least 1".into()));
        }
        if self.shards == Some(0) {
            problems.push(("shards".into(), "must be at least 1".into()));
        }
        problems
    }
}

impl Default for SlurmSection {
    fn default() -> Self {
        Self { shards: None, time: "24:00:00".into(), cpus_per_task: 16, mem: "64G".into(), partition: None, extra: Vec::new() }
    }
}

/// One combination of grid values.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Point {
    /// Names `results/<sweep>/<point>/` and the point's pipeline: `latency_target-0.54`.
    pub name: String,
    pub values: Vec<(String, toml::Value)>,
}

/// A parsed sweep file with its points.
#[derive(Debug, Clone)]
pub struct Sweep {
    pub path: PathBuf,
    pub name: String,
    pub file: SweepFile,
    pub points: Vec<Point>,
}

impl Sweep {
    pub fn read(path: &Path) -> Result<Self> {
        let text = crate::files::read_text(path).with_context(|| format!("{}: cannot read the sweep file", path.display()))?;
        let mut file: SweepFile = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new(""));
        file.pipeline = dir.join(&file.pipeline);
        file.with = file.with.iter().map(|w| dir.join(w)).collect();
        let name = file.name.clone().unwrap_or_else(|| path.file_stem().map_or("sweep".into(), |s| s.to_string_lossy().into_owned()));
        let mut problems: Vec<String> = crate::files::check_name(&name).err().map(|e| format!("name: {e}")).into_iter().collect();
        problems.extend(file.slurm.validate().into_iter().map(|(key, message)| format!("slurm.{key}: {message}")));
        if !problems.is_empty() {
            bail!("{}: {}", path.display(), problems.join(&format!("\n{}: ", path.display())));
        }
        let points = expand(&file.grid).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let devices = file.devices.clone();
        Self { path: path.to_path_buf(), name, file, points }.set_devices(devices)
    }

    /// The sweep on `devices` (the file's, or `--devices`): whole workers of
    /// `devices_per_point` each.
    pub fn set_devices(mut self, devices: Vec<usize>) -> Result<Self> {
        let per = self.file.devices_per_point;
        if devices.len() > crate::backend::MAX_DEVICES {
            bail!("{}: devices lists {} devices: at most {} (one worker process per devices_per_point of them)", self.path.display(), devices.len(), crate::backend::MAX_DEVICES);
        }
        if devices.is_empty() || per == 0 || devices.len() % per != 0 {
            bail!("{}: devices {devices:?} cannot be split into workers of devices_per_point = {per}", self.path.display());
        }
        self.file.devices = devices;
        Ok(self)
    }

    /// Where every point's results go: `<results_dir>/<sweep>/`, beside the combined table.
    fn results_root(&self, base: &Pipeline) -> PathBuf {
        base.pipeline.results_dir.join(&self.name)
    }

    /// The sweep file's `[set]`, as `--set` items.
    fn fixed_set(&self) -> Vec<String> {
        self.file.set.iter().map(|(k, v)| format!("{k}={v}")).collect()
    }

    /// `runner run` overrides for one point on `devices`.
    pub fn overrides(&self, point: &Point, devices: &[usize], results_root: &Path) -> Overrides {
        let mut set = self.fixed_set();
        set.extend(point.values.iter().map(|(k, v)| format!("{k}={v}")));
        set.push(format!("pipeline.name={}", toml::Value::from(point.name.clone())));
        set.push(format!("pipeline.results_dir={}", toml::Value::from(results_root.display().to_string())));
        set.push(format!("pipeline.devices={devices:?}"));
        Overrides { with: self.file.with.clone(), set, env: true }
    }

    /// The base pipeline as the sweep file layers it, without any point's values.
    fn base(&self) -> Result<Pipeline> {
        Ok(config::load(&self.file.pipeline, &Overrides { with: self.file.with.clone(), set: self.fixed_set(), env: true })?)
    }

    /// The base pipeline and every point's; all errors, of all points, before anything runs.
    pub fn check(&self) -> Result<(Pipeline, Vec<Pipeline>)> {
        let base = self.base()?;
        let root = self.results_root(&base);
        let mut pipelines = Vec::new();
        let mut errors = Vec::new();
        for point in &self.points {
            match config::load(&self.file.pipeline, &self.overrides(point, &self.file.devices[..self.file.devices_per_point], &root)) {
                Ok(p) => {
                    // A point runs on whichever worker is free: every worker's devices must do.
                    for devices in self.file.devices.chunks(self.file.devices_per_point) {
                        if let Err(e) = crate::backend::check_devices(p.pipeline.backend, devices) {
                            errors.push(format!("point `{}` on the worker of devices {devices:?}: {e}", point.name));
                        }
                    }
                    pipelines.push(p)
                }
                Err(e) => errors.push(format!("point `{}`:\n{e}", point.name)),
            }
        }
        if !errors.is_empty() {
            bail!("{}: {}", self.path.display(), errors.join("\n"));
        }
        Ok((base, pipelines))
    }
}

/// The most points a sweep expands to.
const MAX_POINTS: usize = 10_000;

/// The cartesian product of the grid, first key varying slowest.
pub fn expand(grid: &toml::Table) -> Result<Vec<Point>, String> {
    if grid.is_empty() {
        return Err("[grid] is empty: give at least one key with a list of values".into());
    }
    let mut axes: Vec<(&String, &Vec<toml::Value>)> = Vec::new();
    for (key, values) in grid {
        match values {
            toml::Value::Array(v) if !v.is_empty() => axes.push((key, v)),
            _ => return Err(format!("grid.\"{key}\": expected a non-empty list of values, e.g. [0.5, 0.3]")),
        }
    }
    // Bounded before expanding: a few long lists multiply.
    let count = axes.iter().try_fold(1usize, |n, (_, v)| n.checked_mul(v.len())).filter(|n| *n <= MAX_POINTS);
    if count.is_none() {
        return Err(format!("[grid] has more than {MAX_POINTS} points (the product of its lists' lengths)\n  hint: split the sweep into several files"));
    }
    // The last component names a point unless two keys share it.
    let leaf = |key: &str| key.rsplit('.').next().unwrap_or(key).to_string();
    let ambiguous = axes.iter().any(|(a, _)| axes.iter().filter(|(b, _)| leaf(a) == leaf(b)).count() > 1);
    let label = |key: &str| if ambiguous { key.replace('.', "-") } else { leaf(key) };
    let mut points = vec![Vec::new()];
    for (key, values) in &axes {
        points = points
            .into_iter()
            .flat_map(|prefix: Vec<(String, toml::Value)>| {
                values.iter().map(move |v| {
                    let mut p = prefix.clone();
                    p.push(((*key).clone(), v.clone()));
                    p
                })
            })
            .collect();
    }
    Ok(points
        .into_iter()
        .map(|values| {
            let name = values
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        toml::Value::String(s) => s.clone(),
                        v => v.to_string(),
                    };
                    let v: String = v.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
                    format!("{}-{v}", label(k))
                })
                .collect::<Vec<_>>()
                .join("_");
            Point { name, values }
        })
        .collect())
}

/// `--shard I/N`: the I-th (1-based) of N interleaved shares of the points.
pub fn parse_shard(text: &str) -> Result<(usize, usize)> {
    let parsed = text.split_once('/').and_then(|(i, n)| Some((i.trim().parse::<usize>().ok()?, n.trim().parse::<usize>().ok()?)));
    match parsed {
        Some((i, n)) if i >= 1 && i <= n => Ok((i, n)),
        _ => bail!("--shard {text}: expected I/N with 1 <= I <= N, e.g. --shard 2/4 (Slurm: --shard $SLURM_ARRAY_TASK_ID/N)"),
    }
}

pub struct SweepArgs {
    pub sweep: PathBuf,
    /// Files layered after the sweep file's `with` (a smoke-test profile).
    pub with: Vec<PathBuf>,
    pub shard: Option<(usize, usize)>,
    /// Overrides the sweep file's `devices` (an array task sees its GPUs as 0..n).
    pub devices: Option<Vec<usize>>,
    pub dry_run: bool,
    /// `--force` for every point (re-measure: `--force evaluate`).
    pub force: Vec<String>,
    /// The `runner` executable each point runs in.
    pub runner: PathBuf,
    /// When the sweep started: what `--force` rebuilds is older than this.
    pub started: chrono::DateTime<chrono::Utc>,
}

/// Runs the sweep's points (or one shard of them) on local workers, then rewrites the
/// combined table from every point that has finished, whoever ran it.
pub fn run(args: &SweepArgs, cache: &Cache) -> Result<String> {
    let mut sweep = Sweep::read(&args.sweep)?;
    if let Some(devices) = &args.devices {
        sweep = sweep.set_devices(devices.clone())?;
    }
    sweep.file.with.extend(args.with.iter().cloned());
    let (base, pipelines) = sweep.check()?;
    let root = sweep.results_root(&base);
    let mine: Vec<usize> = (0..sweep.points.len()).filter(|i| args.shard.is_none_or(|(s, n)| i % n == s - 1)).collect();
    let workers: Vec<Vec<usize>> = sweep.file.devices.chunks(sweep.file.devices_per_point).map(<[usize]>::to_vec).collect();
    if args.dry_run {
        let mut out = format!("sweep {} over {} ({} points):\n", sweep.name, sweep.file.pipeline.display(), sweep.points.len());
        for (i, point) in sweep.points.iter().enumerate() {
            let mark = if mine.contains(&i) { "run " } else { "skip" };
            let p = &pipelines[i];
            let plan = pipeline::plan(p, cache, &args.force, &p.device_name())?;
            let to_run: Vec<&str> = plan.stages.iter().filter(|s| s.status != pipeline::Status::Cached).map(|s| s.spec.name.as_str()).collect();
            out.push_str(&format!("  {mark} {:<32} stages to run: {}\n", point.name, if to_run.is_empty() { "none".into() } else { to_run.join(" ") }));
        }
        out.push_str(&format!("workers: {workers:?}\n"));
        return Ok(out);
    }

    let log_dir = base.pipeline.runs_dir.join("sweeps").join(&sweep.name);
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let log = RunLog::open(&log_dir.join("sweep.log"))?;
    log.info(&format!(
        "sweep {}: {} of {} points on {} worker(s) {workers:?}; per-point output in {}",
        sweep.name,
        mine.len(),
        sweep.points.len(),
        workers.len(),
        log_dir.display()
    ));
    let next = AtomicUsize::new(0);
    let failed = Mutex::new(Vec::new());
    let progress = Mutex::new(log.progress("sweep", mine.len() as u64));
    std::thread::scope(|s| {
        for devices in &workers {
            let (sweep, mine, next, failed, progress, log_dir, root) = (&sweep, &mine, &next, &failed, &progress, &log_dir, &root);
            s.spawn(move || loop {
                let Some(&i) = mine.get(next.fetch_add(1, Ordering::SeqCst)) else { break };
                let point = &sweep.points[i];
                let out = log_dir.join(format!("{}.log", point.name));
                progress.lock().unwrap().println(&format!("{}: started on devices {devices:?}", point.name));
                let start = Instant::now();
                let news = |line: &str| progress.lock().unwrap().set_message(&format!("{}: {line}", point.name));
                let result = run_point(args, sweep, point, devices, root, &out, news);
                let mut bar = progress.lock().unwrap();
                match result {
                    Ok(()) => bar.println(&format!("{}: done in {:.0} s", point.name, start.elapsed().as_secs_f64())),
                    Err(e) => {
                        bar.println(&format!("{}: FAILED: {e:#}; see {}", point.name, out.display()));
                        failed.lock().unwrap().push(point.name.clone());
                    }
                }
                bar.step(&point.name);
            });
        }
    });
    progress.into_inner().unwrap().finish();
    let failed = failed.into_inner().unwrap();
    let summary = write_combined(&sweep, &pipelines, &root, cache, &failed)?;
    log.info(&summary);
    if !failed.is_empty() {
        bail!("{} of {} points failed: {}; their output is in {}", failed.len(), mine.len(), failed.join(", "), log_dir.display());
    }
    Ok(summary + "\n")
}

/// Runs one point to completion, passing the newest line of its output to `news` every few
/// seconds (its stage, step and ETA: the child logs them every 30 s).
fn run_point(args: &SweepArgs, sweep: &Sweep, point: &Point, devices: &[usize], root: &Path, out: &Path, news: impl Fn(&str)) -> Result<()> {
    let runner = &args.runner;
    let overrides = sweep.overrides(point, devices, root);
    let log = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut cmd = Command::new(runner);
    cmd.arg("run").arg(&sweep.file.pipeline);
    for f in &args.force {
        cmd.arg("--force").arg(f);
    }
    for w in &overrides.with {
        cmd.arg("--with").arg(w);
    }
    for s in &overrides.set {
        cmd.arg("--set").arg(s);
    }
    // A stage every point forces (`--force evaluate` of the shared dense model) is rebuilt
    // once: by whichever point gets it first after the sweep started.
    cmd.env("RUNNER_FORCE_SINCE", args.started.to_rfc3339());
    // SAFETY: the closure runs in the forked child before exec and only calls prctl.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, crate::interrupt::die_with_parent);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", runner.display()))?;
    let mut last_news = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        if last_news.elapsed().as_secs() < 3 {
            continue;
        }
        last_news = Instant::now();
        if let Some(line) = std::fs::read_to_string(out).ok().and_then(|t| t.lines().rev().find(|l| !l.trim().is_empty()).map(String::from)) {
            news(&line);
        }
    };
    if !status.success() {
        bail!("`runner run` exited with {status}");
    }
    Ok(())
}

/// `results/<sweep>/sweep.csv` (every finished point's evaluated models, the grid values as
/// columns), `accuracy.svg` and a README; read from the cache, so a shard that finishes last
/// writes the table of all shards. Returns a one-line summary.
fn write_combined(sweep: &Sweep, pipelines: &[Pipeline], root: &Path, cache: &Cache, failed: &[String]) -> Result<String> {
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let lock = std::fs::File::create(root.join(".sweep.lock"))?;
    fs2::FileExt::lock_exclusive(&lock).with_context(|| format!("locking {}", root.display()))?;
    let mut lines: Vec<(&Point, table::Row)> = Vec::new();
    // The latency each row's prune stage reached: short of the target where it stopped early.
    let mut reached: Vec<Option<f64>> = Vec::new();
    let mut finished = 0;
    for (point, p) in sweep.points.iter().zip(pipelines) {
        let plan = pipeline::plan(p, cache, &[], &p.device_name())?;
        let evaluates: Vec<_> = plan.stages.iter().filter(|s| s.spec.kind == StageKind::Evaluate).collect();
        let mut evaluated = Vec::new();
        for s in &evaluates {
            if let Some(manifest) = cache.complete(&s.key) {
                let prune = crate::stages::report::upstream_prune(&p.stages, &s.spec.name);
                let prune_metrics = prune.and_then(|(name, _)| plan.stages.iter().find(|st| st.spec.name == name)).and_then(|st| cache.complete(&st.key));
                reached.push(prune_metrics.and_then(|m| m.metrics["latency_ratio"].as_f64()));
                evaluated.push((manifest.metrics, prune.map(|(_, target)| target)));
            }
        }
        // A point that failed now is not finished, whatever an earlier run left in the cache.
        if !evaluated.is_empty() && evaluated.len() == evaluates.len() && !failed.contains(&point.name) {
            finished += 1;
        }
        lines.extend(table::measured_rows(&evaluated)?.into_iter().map(|r| (point, r)));
    }
    let keys: Vec<&String> = sweep.file.grid.keys().collect();
    let mut w = csv::Writer::from_writer(Vec::new());
    let mut header = vec!["point".to_string()];
    header.extend(keys.iter().map(|k| k.to_string()));
    header.extend(table_columns());
    header.push("latency_reached".into());
    header.push("latency_measured".into());
    w.write_record(&header)?;
    for ((point, row), reached) in lines.iter().zip(&reached) {
        let mut record = vec![point.name.clone()];
        record.extend(point.values.iter().map(|(_, v)| v.to_string()));
        let json = serde_json::to_value(row)?;
        record.extend(table_columns().iter().map(|c| crate::report::csv_cell(&json[c])));
        record.push(reached.map_or(String::new(), |r| format!("{r:.4}")));
        // The paired measurement's median, as a latency ratio beside the estimate's.
        record.push(row.speedup_pairs.and(row.speedup).map_or(String::new(), |x| format!("{:.4}", 1.0 / x)));
        w.write_record(&record)?;
    }
    atomic_write(&root.join("sweep.csv"), &w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?)?;
    let spread = keys.iter().any(|k| k.as_str() == SEED_KEY).then(|| {
        let rows: Vec<(String, table::Row, Option<f64>)> = lines
            .iter()
            .zip(&reached)
            .map(|((point, row), reached)| {
                let setting = point.values.iter().filter(|(k, _)| k.as_str() != SEED_KEY).map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ");
                (setting, row.clone(), *reached)
            })
            .collect();
        table::over_seeds(&rows)
    })
    .filter(|s| !s.is_empty());
    if let Some(spread) = &spread {
        table::write_csv(&root.join("seeds.csv"), spread)?;
        plots::accuracy_spread(&root.join("seeds.svg"), spread)?;
    }
    // Each point's models labelled by the point, but a model that several points share (the
    // dense baseline, from one cached stage) once, under its own name.
    let mut plotted: Vec<table::Row> = Vec::new();
    for (point, row) in &lines {
        let shared = lines.iter().filter(|(_, r)| r == row).count() > 1;
        if shared && plotted.contains(row) {
            continue;
        }
        plotted.push(if shared { row.clone() } else { table::Row { model: point.name.clone(), ..row.clone() } });
    }
    if !plotted.is_empty() {
        plots::accuracy(&root.join("accuracy.svg"), &plotted)?;
    }
    let readme = format!(
        "# sweep {}\n\nWritten by `runner sweep {}`: {} points over `{}`, {finished} finished. Every row was measured by this \
         repository's `evaluate` stage (backend, device and the runtime it was timed on in each row); `speedup` is over the point's first \
         evaluated model: the median of paired measurements (`speedup_min`, `speedup_max`, `speedup_pairs`) where the \
         model's `evaluate` stage names it as its `baseline`, else the ratio of throughputs; {}. `latency_reached` is the estimated latency the point's prune stage reached, \
         as a fraction of dense, beside its `latency_target`, and `latency_measured` the paired measurement's (1 / `speedup`).\n\n{}\n![top-1 against measured speedup](accuracy.svg)\n",
        sweep.name,
        sweep.path.display(),
        sweep.points.len(),
        sweep.file.pipeline.display(),
        format!("throughput is measured {}", crate::machine::MEASURED_ALONE),
        table::markdown(&lines.iter().map(|(p, r)| table::Row { model: format!("{} {}", p.name, r.model), ..r.clone() }).collect::<Vec<_>>()),
    );
    let readme = match spread {
        Some(spread) => format!(
            "{readme}\n## Over seeds\n\n`seeds.csv`: each model of each setting over the points that differ only in `{SEED_KEY}`, its top-1 \
             mean and sample standard deviation, and its speedup's.\n\n{}\n![mean top-1 with one standard deviation against measured speedup](seeds.svg)\n",
            table::spread_markdown(&spread)
        ),
        None => readme,
    };
    atomic_write(&root.join("README.md"), readme.as_bytes())?;
    Ok(format!(
        "sweep {}: {finished} of {} points finished; table in {}",
        sweep.name,
        sweep.points.len(),
        root.join("sweep.csv").display()
    ))
}

/// The grid key whose values repeat one experiment rather than change it: a sweep over it
/// also writes each row's mean and spread (`seeds.csv`, `seeds.svg`).
const SEED_KEY: &str = "pipeline.seed";

fn table_columns() -> Vec<String> {
    ["model", "dataset", "top1", "top5", "params_m", "gflops", "images_per_s", "speedup", "speedup_min", "speedup_max", "speedup_pairs", "resolution", "latency_target", "backend", "device", "runtime"]
        .map(String::from)
        .to_vec()
}

/// `--emit-slurm`: an sbatch array script, one task per shard, each running its shard of the
/// points with `runner sweep --shard`. Paths are absolute so the script runs from anywhere.
pub fn slurm_script(sweep_path: &Path, with: &[PathBuf], runner: &Path, cache: &Cache) -> Result<String> {
    let mut sweep = Sweep::read(sweep_path)?;
    sweep.file.with.extend(with.iter().cloned());
    let (base, _) = sweep.check()?;
    let s = &sweep.file.slurm;
    let shards = s.shards.unwrap_or(sweep.points.len()).clamp(1, sweep.points.len());
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let logs = base.pipeline.runs_dir.join("sweeps").join(&sweep.name);
    let gpus = sweep.file.devices_per_point;
    // A GPU task sees its GPUs as 0..n; the CPU backend has the one device 0, split in shards.
    let cpu = base.pipeline.backend.cpu_only();
    let devices = (0..gpus).map(|d| if cpu { "0".into() } else { d.to_string() }).collect::<Vec<_>>().join(",");
    let mut resources = vec![format!("--array=1-{shards}"), "--ntasks=1".to_string()];
    if !cpu {
        resources.push(format!("--gpus-per-task={gpus}"));
    }
    let written_by = format!("`runner sweep {} --emit-slurm`: {} points in {shards} array tasks", sweep_path.display(), sweep.points.len());
    let mut out = slurm_preamble(&written_by, &sweep.name, &resources, s, &logs, "slurm-%A_%a.out", cache)?;
    out.push_str("# Slurm makes the task's GPUs visible as 0..n-1.\n");
    let with: String = with.iter().map(|w| format!(" --with {}", shell_quote(&abs(w)))).collect();
    out.push_str(&format!(
        "exec {} sweep {}{with} --shard \"$SLURM_ARRAY_TASK_ID/{shards}\" --devices {devices}\n",
        shell_quote(&abs(runner)),
        shell_quote(&abs(sweep_path))
    ));
    Ok(out)
}

/// What both `--emit-slurm` scripts begin with: the `#SBATCH` lines (the job's own
/// `resources`, then `s`'s), the log file under `logs` (created), strict mode, the submitting
/// directory and the cache.
fn slurm_preamble(written_by: &str, job: &str, resources: &[String], s: &SlurmSection, logs: &Path, log_file: &str, cache: &Cache) -> Result<String> {
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let logs = abs(logs);
    let logs_text = logs.display().to_string();
    if logs_text.chars().any(|c| c.is_control() || c.is_whitespace()) {
        bail!("{logs_text:?}: the log folder goes into `#SBATCH --output=`, which takes no spaces or line breaks\n  hint: set pipeline.runs_dir to a path without them");
    }
    let mut out = String::from("#!/bin/bash\n");
    out.push_str(&format!("# Written by {written_by}.\n"));
    out.push_str("# Submit with `sbatch` from any directory; the cache must be on a filesystem every node sees.\n");
    out.push_str(&format!("#SBATCH --job-name=nvit-{job}\n"));
    for line in resources {
        out.push_str(&format!("#SBATCH {line}\n"));
    }
    out.push_str(&format!("#SBATCH --cpus-per-task={}\n#SBATCH --mem={}\n#SBATCH --time={}\n", s.cpus_per_task, s.mem, s.time));
    if let Some(p) = &s.partition {
        out.push_str(&format!("#SBATCH --partition={p}\n"));
    }
    for e in &s.extra {
        out.push_str(&format!("#SBATCH {e}\n"));
    }
    out.push_str(&format!("#SBATCH --output={logs_text}/{log_file}\n\n"));
    out.push_str("set -euo pipefail\n");
    out.push_str(&format!("cd {}\n", shell_quote(&std::env::current_dir()?)));
    out.push_str(&format!("[ -n \"${{RUNNER_CACHE:-}}\" ] || export RUNNER_CACHE={}\n", shell_quote(&abs(&cache.root))));
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    Ok(out)
}

fn shell_quote(p: &Path) -> String {
    quote(&p.display().to_string())
}

fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// `runner run --emit-slurm`: an sbatch script for one pipeline over `nodes` machines with
/// `ranks_per_node` ranks each (one per GPU; `srun` starts them, `--slurm` tells each its rank).
/// `args` are the run's own arguments after the pipeline (`--with`, `--set`, `--backend`,
/// `--force`), passed through as words, never through the shell.
pub fn run_slurm_script(pipeline: &crate::config::Pipeline, args: &[String], nodes: usize, ranks_per_node: usize, runner: &Path, cache: &Cache) -> Result<String> {
    let ranks = nodes.checked_mul(ranks_per_node).filter(|r| (1..=crate::world::MAX_RANKS).contains(r) && nodes > 0 && ranks_per_node > 0);
    let Some(ranks) = ranks else {
        bail!("--nodes {nodes} --gpus-per-node {ranks_per_node}: each must be at least 1 and their product at most {}", crate::world::MAX_RANKS);
    };
    if args.iter().any(|a| a.chars().any(|c| c.is_control())) {
        bail!("an argument holds a control character (a line break?): the script passes arguments as words and refuses those");
    }
    crate::pipeline::check_ranks(pipeline, ranks)?;
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let p = &pipeline.pipeline;
    let name: String = p.name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    let gpu = !p.backend.cpu_only();
    let mut resources = vec![format!("--nodes={nodes}"), format!("--ntasks-per-node={ranks_per_node}")];
    if gpu {
        resources.push(format!("--gpus-per-node={ranks_per_node}"));
    }
    let written_by = format!("`runner run {} --emit-slurm`: {ranks} ranks, {ranks_per_node} on each of {nodes} nodes", pipeline.path.display());
    let mut out = slurm_preamble(&written_by, &name, &resources, &SlurmSection::default(), &p.runs_dir.join("slurm"), &format!("{name}-%j.out"), cache)?;
    out.push_str("# One task per rank; SLURM_LOCALID picks the task's GPU on its node. A rank that fails ends the job.\n");
    let device = if gpu { "\"$SLURM_LOCALID\"" } else { "0" };
    let words: String = args.iter().map(|a| format!(" {}", quote(a))).collect();
    out.push_str(&format!(
        "exec srun --kill-on-bad-exit=1 bash -c 'exec \"$0\" run \"$@\" --slurm --devices {device}' {} {}{words}\n",
        shell_quote(&abs(runner)),
        shell_quote(&abs(&pipeline.path))
    ));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_expands_first_key_slowest_with_readable_names() {
        let grid: toml::Table = toml::from_str("\"stages.prune.latency_target\" = [0.5, 0.25]\n\"stages.distill.epochs\" = [1, 2, 3]\n").unwrap();
        let points = expand(&grid).unwrap();
        assert_eq!(points.len(), 6);
        assert_eq!(points[0].name, "latency_target-0.5_epochs-1");
        assert_eq!(points[5].name, "latency_target-0.25_epochs-3");
        assert_eq!(points[1].values[1], ("stages.distill.epochs".into(), toml::Value::Integer(2)));
    }

    #[test]
    fn keys_with_the_same_last_component_are_named_in_full() {
        let grid: toml::Table = toml::from_str("\"stages.a.lr\" = [1.0]\n\"stages.b.lr\" = [\"x y\"]\n").unwrap();
        assert_eq!(expand(&grid).unwrap()[0].name, "stages-a-lr-1.0_stages-b-lr-x_y");
    }

    #[test]
    fn grids_of_more_points_than_a_sweep_runs_are_refused_before_expanding() {
        let axis = toml::Value::Array((0..100).map(toml::Value::from).collect());
        let grid: toml::Table = (0..5).map(|i| (format!("stages.s{i}.lr"), axis.clone())).collect();
        assert!(expand(&grid).unwrap_err().contains("more than 10000 points"));
    }

    #[test]
    fn bad_grids_and_shards_are_errors_that_say_what_to_write() {
        let grid: toml::Table = toml::from_str("\"stages.a.lr\" = 0.1\n").unwrap();
        assert!(expand(&grid).unwrap_err().contains("grid.\"stages.a.lr\": expected a non-empty list"));
        assert!(expand(&toml::Table::new()).unwrap_err().contains("[grid] is empty"));
        assert_eq!(parse_shard("2/4").unwrap(), (2, 4));
        for bad in ["0/4", "5/4", "2", "a/b"] {
            assert!(parse_shard(bad).unwrap_err().to_string().contains("expected I/N"), "{bad}");
        }
    }
}
