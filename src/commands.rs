//! What each `runner` subcommand does; `main.rs` only parses arguments and prints errors.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::backend;
use crate::config::{self, Overrides, Pipeline};
use crate::pipeline::{self, Cache, RunDir};
use crate::stages::StageKind;

pub struct RunArgs {
    pub pipeline: PathBuf,
    pub overrides: Overrides,
    pub force: Vec<String>,
    pub dry_run: bool,
    /// The ranks this process trains with (`World::single()` alone).
    pub world: crate::world::World,
}

pub fn load(path: &Path, overrides: &Overrides) -> Result<Pipeline> {
    Ok(config::load(path, overrides)?)
}

/// `runner run`: plans, then executes (or, with `--dry-run`, prints the plan).
pub fn run(args: &RunArgs, cache: &Cache) -> Result<()> {
    let pipeline = load(&args.pipeline, &args.overrides)?;
    let p = &pipeline.pipeline;
    check_memory(&pipeline)?;
    pipeline::check_ranks(&pipeline, args.world.ranks)?;
    let device_name = pipeline.device_name();
    let mut plan = pipeline::plan(&pipeline, cache, &args.force, &device_name)?;
    if args.dry_run {
        print!("{}", pipeline::describe(&plan));
        if !backend::compiled(p.backend) {
            println!("note: backend `{0}` is not compiled into this runner: `runner run` would stop here\n  hint: build it with `cargo build --release --features {0}`", p.backend);
        }
        return Ok(());
    }
    if !args.world.writes() {
        // Rank 0 writes the run directory and the results; this rank logs to its stderr only.
        let log = crate::runlog::RunLog::stderr();
        log.info(&format!("rank {} of {}: pipeline {} on {} [{device_name}]", args.world.rank, args.world.ranks, p.name, p.backend));
        pipeline::run(&pipeline, &mut plan, cache, &device_name, None, &log, &args.world)?;
        log.info(&format!("rank {}: finished", args.world.rank));
        return Ok(());
    }
    crate::files::check_writable(&pipeline.results()).context("pipeline.results_dir")?;
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
    pipeline::run(&pipeline, &mut plan, cache, &device_name, Some(&run_dir.path), &run_dir.log, &args.world)?;
    run_dir.log.info(&format!("finished; results in {}", pipeline.results().display()));
    Ok(())
}

/// Refuses a batch whose lower-bound memory exceeds what the machine has available (CPU
/// backends, where that is known), naming the key, before any stage runs.
fn check_memory(pipeline: &Pipeline) -> Result<()> {
    if backend::is_gpu(pipeline.pipeline.backend, pipeline.pipeline.devices.first().copied().unwrap_or(0)) {
        return Ok(());
    }
    let Some(available) = available_memory() else { return Ok(()) };
    let Ok(model) = pipeline.model.resolve(pipeline.model.num_classes.unwrap_or(1000)) else { return Ok(()) };
    let mut problems = Vec::new();
    for spec in &pipeline.stages {
        if let Some((key, batch, bytes)) = crate::stages::memory_needed(spec, &model) {
            if bytes > available as f64 {
                problems.push(format!(
                    "{}: {key} = {batch} needs at least {:.1} GB for one step of a {}-block {} model of width {}; this machine has {:.1} GB available\n  hint: lower {key}",
                    pipeline.path.display(),
                    bytes / 1e9,
                    model.stages().iter().map(|(_, b)| b.len()).sum::<usize>(),
                    model.family(),
                    model.stages().iter().map(|(e, _)| e.to_string()).collect::<Vec<_>>().join("/"),
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

/// The most `--keep-days` takes: a century, past which every entry is kept anyway.
const MAX_KEEP_DAYS: f64 = 36_500.0;

/// `--keep-days`: a number of days from 0 to [`MAX_KEEP_DAYS`].
pub fn parse_keep_days(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(days) if (0.0..=MAX_KEEP_DAYS).contains(&days) => Ok(days),
        _ => Err(format!("expected a number of days from 0 to {MAX_KEEP_DAYS}, got `{text}`")),
    }
}

/// How deep and how far `cache gc` looks for pipeline files under `--pipelines`.
const GC_MAX_DEPTH: usize = 8;
const GC_MAX_ENTRIES: usize = 100_000;

/// `runner cache gc`: removes entries that no pipeline or sweep point under `dir` references
/// and that were not used within `keep_days`. Entries of a pipeline that cannot be resolved now
/// (its dataset is missing, say) are kept; a sweep that cannot be expanded stops it.
pub fn cache_gc(cache: &Cache, dir: &Path, keep_days: f64, dry_run: bool) -> Result<String> {
    let keep_days = parse_keep_days(&keep_days.to_string()).map_err(|e| anyhow::anyhow!("--keep-days: {e}"))?;
    let mut keep = HashSet::new();
    let mut kept_pipelines = HashSet::new();
    let mut notes = String::new();
    let mut found = 0;
    // Bounded: `--pipelines /` would otherwise walk the whole machine.
    let mut walked = 0usize;
    let files = walkdir::WalkDir::new(dir).max_depth(GC_MAX_DEPTH).sort_by_file_name().into_iter().filter_map(|e| e.ok());
    for entry in files {
        walked += 1;
        if walked > GC_MAX_ENTRIES {
            anyhow::bail!("--pipelines {}: more than {GC_MAX_ENTRIES} files and folders under it; nothing removed\n  hint: name the folder that holds your pipeline and sweep files", dir.display());
        }
        if !entry.path().extension().is_some_and(|x| x == "toml") {
            continue;
        }
        let path = entry.path();
        // Unreadable files go to `load`, whose error keeps their entries below.
        let doc = crate::files::read_text(path).ok().and_then(|t| t.parse::<toml::Table>().ok());
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
    let recent = std::time::Duration::from_secs_f64(keep_days * 86400.0);
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

/// Where a stage's model is in the cache: the stage must be cached as the pipeline says it
/// (same settings, same inputs), else an error that says how to build it.
pub fn stage_model_dir(pipeline: &Pipeline, stage: &str, cache: &Cache) -> Result<PathBuf> {
    let path = &pipeline.path;
    let Some(spec) = pipeline.stage(stage) else {
        let names: Vec<&str> = pipeline.stages.iter().map(|s| s.name.as_str()).collect();
        anyhow::bail!(
            "{}: no stage `{stage}`{}\n  hint: its stages are {}",
            path.display(),
            crate::suggest::did_you_mean(stage, &names),
            names.join(", ")
        );
    };
    let kind = spec.kind.name();
    let plan = pipeline::plan(pipeline, cache, &[], &pipeline.device_name())?;
    let planned = plan.stages.iter().find(|s| s.spec.name == stage).expect("every stage is planned");
    if let pipeline::Status::Run(why) = &planned.status {
        anyhow::bail!(
            "{}: stage `{stage}` has not run as the pipeline now says ({})\n  hint: run it first: runner run {}",
            path.display(),
            why.join("; "),
            path.display()
        );
    }
    let dir = cache.entry_dir(&planned.key).join("model");
    if !dir.join(crate::model::checkpoint::DIMS).is_file() {
        anyhow::bail!("{}: stage `{stage}` ({kind}) produces no model\n  hint: name a stage that trains or prunes one (train, prune, distill, load_pretrained)", path.display());
    }
    Ok(dir)
}

/// `runner export`: a stage's model out of the cache, in `format`, to `out`.
pub fn export(path: &Path, overrides: &Overrides, stage: &str, format: crate::export::Format, out: &Path, cache: &Cache) -> Result<String> {
    let pipeline = load(path, overrides)?;
    let dir = stage_model_dir(&pipeline, stage, cache)?;
    let config = crate::model::ModelConfig::read_json(&dir.join(crate::model::checkpoint::DIMS))?;
    let (mean, std) = pipeline.dataset.normalization(config.in_chans())?;
    let classes = pipeline.dataset.class_names();
    let spec = crate::export::InputSpec { mean, std, classes };
    Ok(format!("{stage}: {}\n", crate::export::write(&dir, format, &spec, out)?))
}

pub struct PredictArgs<'a> {
    pub pipeline: &'a Path,
    pub overrides: &'a Overrides,
    pub stage: &'a str,
    pub images: &'a [PathBuf],
    pub batch: usize,
    pub top: usize,
    pub out: Option<&'a Path>,
    /// Where to run, if not on the pipeline's backend and first device.
    pub backend: Option<backend::BackendKind>,
}

/// `runner predict`: the CSV of a stage's top classes for each image, written to `out` (then
/// a line saying so is returned) or returned whole.
pub fn predict(args: &PredictArgs, cache: &Cache) -> Result<String> {
    let pipeline = load(args.pipeline, args.overrides)?;
    let dir = stage_model_dir(&pipeline, args.stage, cache)?;
    let files = crate::predict::image_files(args.images)?;
    let out = args.out.filter(|out| *out != Path::new("-"));
    if let Some(out) = out {
        if out.is_dir() {
            anyhow::bail!("{}: is a folder\n  hint: name the CSV file to write, e.g. --out {}", out.display(), out.join("predictions.csv").display());
        }
        crate::files::check_output(out)?;
        crate::files::check_not_input(out, &files)?;
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).with_context(|| format!("{}: cannot create the folder of the output file", out.display()))?;
        }
    }
    let config = crate::model::ModelConfig::read_json(&dir.join(crate::model::checkpoint::DIMS))?;
    let names = pipeline.dataset.class_names().filter(|n| n.len() <= config.num_classes());
    let top = args.top.min(config.num_classes());
    let job = crate::predict::Predict {
        model_dir: &dir,
        files: &files,
        transform: pipeline.dataset.eval_transform(config.image_size(), config.in_chans())?,
        batch: args.batch,
        top,
    };
    let p = &pipeline.pipeline;
    let predictions = match args.backend {
        Some(kind) if kind != p.backend => backend::dispatch(kind, &[0], job)?,
        _ => backend::dispatch(p.backend, &p.devices[..1], job)?,
    };
    let csv = crate::predict::to_csv(&predictions, top, names.as_deref())?;
    match out {
        Some(out) => {
            crate::files::atomic_write(out, csv.as_bytes())?;
            Ok(format!("{}: top {top} of {} images -> {}\n", args.stage, files.len(), out.display()))
        }
        None => Ok(csv),
    }
}
