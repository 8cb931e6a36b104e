//! Running a pipeline: plan (a cache key per stage and whether it must run, and why), run
//! directories, the run log and progress, and the executor that skips cached stages.

pub mod cache;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use burn::tensor::backend::AutodiffBackend;
use serde::Serialize;

pub use cache::{Cache, KeyInput};
use crate::manifest::Manifest;
use cache::PENDING;

use crate::backend::BackendJob;
use crate::config::Pipeline;
use crate::runlog::RunLog;
use crate::files::atomic_write;
use crate::stages::{self, StageContext, StageSpec};
use crate::world::World;
use sha2::Digest;

/// Whether a stage runs, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Status {
    Cached,
    Run(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct PlannedStage {
    pub spec: StageSpec,
    pub key: String,
    pub key_input: KeyInput,
    pub status: Status,
    /// `--force` named it: its entry, partial work included, is discarded before it runs.
    pub forced: bool,
    /// `(stage name, key)` of the stages it reads, whose entries it opens.
    pub input_keys: Vec<(String, String)>,
}

impl PlannedStage {
    /// Whether the key waits on an input that has not run yet: it is final once that input's
    /// output exists, since a key holds the digest of what its inputs produced.
    pub fn pending(&self) -> bool {
        self.key_input.inputs.iter().any(|(_, d)| d.starts_with(PENDING))
    }
}

pub struct Plan {
    pub stages: Vec<PlannedStage>,
    /// `--force` rebuilds an entry unless its manifest is younger than this: the stage was
    /// rebuilt by another runner of the same sweep, which forced it too.
    pub force_since: chrono::DateTime<chrono::Utc>,
}

/// `RUNNER_FORCE_SINCE` (set by `runner sweep` for its points), or now.
fn force_since() -> Result<chrono::DateTime<chrono::Utc>> {
    match std::env::var("RUNNER_FORCE_SINCE") {
        Ok(text) => Ok(chrono::DateTime::parse_from_rfc3339(&text)
            .with_context(|| format!("RUNNER_FORCE_SINCE={text}: expected an RFC 3339 time"))?
            .with_timezone(&chrono::Utc)),
        Err(_) => Ok(chrono::Utc::now()),
    }
}

/// Which stages `--force` names: `all`, or stage names.
pub fn check_force(pipeline: &Pipeline, force: &[String]) -> Result<()> {
    for name in force {
        if name != "all" && pipeline.stage(name).is_none() {
            let names: Vec<&str> = pipeline.stages.iter().map(|s| s.name.as_str()).collect();
            anyhow::bail!(
                "--force {name}: the pipeline has no stage `{name}`{}\n  hint: stages are {}, or `all`",
                crate::suggest::did_you_mean(name, &names),
                names.join(", ")
            );
        }
    }
    Ok(())
}

/// Computes every stage's key and whether it must run.
pub fn plan(pipeline: &Pipeline, cache: &Cache, force: &[String], device_name: &str) -> Result<Plan> {
    check_force(pipeline, force)?;
    let dataset_identity = pipeline.dataset.identity().context("reading the dataset's index for the cache key")?;
    let mut dataset = serde_json::to_value(&pipeline.dataset)?;
    if let Some(d) = dataset.as_object_mut() {
        // How fast data is read does not change what a stage computes.
        d.remove("workers");
        d.remove("prefetch");
    }
    let index = read_index(cache, &pipeline.pipeline.name);
    // What each stage produced, for the keys of the stages that read it; `pending:` where it
    // has still to run.
    let mut digests: BTreeMap<String, String> = BTreeMap::new();
    let mut keys: BTreeMap<String, String> = BTreeMap::new();
    let mut stages = Vec::new();
    let mut upstream_runs: HashSet<String> = HashSet::new();
    for spec in &pipeline.stages {
        let inputs: Vec<(String, String)> = spec.upstream().into_iter().map(|(_, i)| (i.to_string(), digests[i].clone())).collect();
        let key_input = KeyInput {
            code: spec.kind.code_fingerprint(),
            kind: spec.kind.name().into(),
            settings: key_settings(&spec.settings)?,
            inputs,
            dataset: dataset.clone(),
            dataset_identity: dataset_identity.clone(),
            model: serde_json::to_value(&pipeline.model)?,
            seed: spec.seed(pipeline.pipeline.seed),
            backend: pipeline.pipeline.backend.to_string(),
            extra: stages::key_extra(spec, device_name)?,
        };
        let key = key_input.key();
        let forced = force.iter().any(|f| f == "all" || *f == spec.name);
        let done = cache.complete(&key);
        let status = if forced {
            Status::Run(vec!["forced with --force".into()])
        } else if done.is_some() {
            Status::Cached
        } else {
            let mut why = Vec::new();
            let waiting: Vec<&String> = key_input.inputs.iter().filter(|(i, _)| upstream_runs.contains(i)).map(|(i, _)| i).collect();
            if cache.entry_dir(&key).exists() {
                why.push("interrupted earlier (no manifest); resumes from its last checkpoint if it has one".into());
            } else if let Some(prev) = index.get(&spec.name).and_then(|k| cache.key_input(k)) {
                why.extend(key_input.diff(&prev).into_iter().map(|c| format!("changed: {c}")));
                if why.is_empty() && waiting.is_empty() {
                    why.push("its previous output was removed from the cache, or is damaged".into());
                }
            } else if waiting.is_empty() {
                why.push("never run".into());
            }
            for i in waiting {
                why.push(format!("its input `{i}` will run (cached instead if its output comes out the same)"));
            }
            Status::Run(why)
        };
        match (&status, &done) {
            (Status::Cached, Some(m)) => digests.insert(spec.name.clone(), m.digest.clone()),
            _ => {
                upstream_runs.insert(spec.name.clone());
                digests.insert(spec.name.clone(), format!("{PENDING}{key}"))
            }
        };
        keys.insert(spec.name.clone(), key.clone());
        let input_keys = key_input.inputs.iter().map(|(i, _)| (i.clone(), keys[i].clone())).collect();
        stages.push(PlannedStage { spec: spec.clone(), key, key_input, status, forced, input_keys });
    }
    Ok(Plan { stages, force_since: force_since()? })
}

/// A stage's settings as its key holds them: without those that only say how often to save
/// a checkpoint, which does not change what the stage computes.
fn key_settings(settings: &stages::StageSettings) -> Result<serde_json::Value> {
    let mut value = serde_json::to_value(settings)?;
    if let Some(v) = value.as_object_mut() {
        v.remove("checkpoint_every");
    }
    Ok(value)
}

/// Last completed key of each stage of a pipeline, to say what changed since.
fn index_path(cache: &Cache, pipeline: &str) -> PathBuf {
    cache.root.join(".index").join(format!("{pipeline}.json"))
}

fn read_index(cache: &Cache, pipeline: &str) -> BTreeMap<String, String> {
    std::fs::read(index_path(cache, pipeline))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn record_in_index(cache: &Cache, pipeline: &str, stage: &str, key: &str) -> Result<()> {
    let mut index = read_index(cache, pipeline);
    index.insert(stage.to_string(), key.to_string());
    atomic_write(&index_path(cache, pipeline), &serde_json::to_vec_pretty(&index)?)
}

/// One line per stage, for `--dry-run`.
pub fn describe(plan: &Plan) -> String {
    let width = plan.stages.iter().map(|s| s.spec.name.len()).max().unwrap_or(0).max(16);
    let mut out = String::new();
    for s in &plan.stages {
        let (name, kind) = (&s.spec.name, s.spec.kind.name());
        match &s.status {
            Status::Cached => out.push_str(&format!("{name:<width$} {kind:<16} cached ({})\n", s.key)),
            Status::Run(why) => {
                let key = if s.pending() { "key known once its inputs ran".to_string() } else { s.key.clone() };
                out.push_str(&format!("{name:<width$} {kind:<16} will run ({key})\n"));
                for w in why {
                    out.push_str(&format!("{:<indent$}- {w}\n", "", indent = width + 17));
                }
            }
        }
    }
    out
}

/// A run directory: `runs/<pipeline>/<timestamp>/` with the resolved config and the log.
pub struct RunDir {
    pub path: PathBuf,
    pub log: RunLog,
}

impl RunDir {
    pub fn create(pipeline: &Pipeline) -> Result<Self> {
        let stamp = chrono::Local::now().format("%Y%m%d-%H%M%S").to_string();
        let base = pipeline.pipeline.runs_dir.join(&pipeline.pipeline.name);
        std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
        // `create_dir` fails on an existing directory, so two runners started in the same second
        // get one directory each.
        let mut path = base.join(&stamp);
        let mut n = 1;
        loop {
            match std::fs::create_dir(&path) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    path = base.join(format!("{stamp}-{n}"));
                    n += 1;
                }
                Err(e) => return Err(e).with_context(|| format!("creating run directory {}", path.display())),
            }
        }
        atomic_write(&path.join("config.toml"), pipeline.to_toml().as_bytes())?;
        let log = RunLog::open(&path.join("runner.log"))?;
        Ok(Self { path, log })
    }
}

/// What a run used and produced, per stage; written as `artifacts.json` in the run directory.
#[derive(Debug, Serialize)]
pub struct StageRecord {
    pub stage: String,
    pub kind: String,
    pub key: String,
    /// `cached`, `ran`, or `built by another runner` (one sharing the cache finished it first).
    pub status: String,
    pub dir: PathBuf,
    pub files: Vec<(String, u64)>,
    pub seconds: f64,
}

/// `execute` on the pipeline's backend and devices (`pipeline.backend`, `pipeline.devices`),
/// chosen at run time: `runner run` and the tests share the library's one compilation of every
/// stage for each backend.
pub fn run(pipeline: &Pipeline, plan: &mut Plan, cache: &Cache, device_name: &str, run_dir: Option<&Path>, log: &RunLog, world: &World) -> Result<Vec<StageRecord>> {
    struct Execute<'a> {
        pipeline: &'a Pipeline,
        plan: &'a mut Plan,
        cache: &'a Cache,
        device_name: &'a str,
        run_dir: Option<&'a Path>,
        log: &'a RunLog,
        world: &'a World,
    }
    impl BackendJob for Execute<'_> {
        type Output = Vec<StageRecord>;
        fn run<B: AutodiffBackend>(self, devices: Vec<B::Device>) -> Result<Self::Output> {
            if self.world.is_single() {
                return execute::<B>(self.pipeline, self.plan, self.cache, &devices, self.device_name, self.run_dir, self.log, self.world);
            }
            let mut world = self.world.clone();
            crate::world::join::<B::InnerBackend>(&mut world, &devices[0], &identity(self.pipeline, self.plan)?)?;
            let records = if world.writes() {
                execute::<B>(self.pipeline, self.plan, self.cache, &devices, self.device_name, self.run_dir, self.log, &world)
            } else {
                follow::<B>(self.pipeline, self.plan, self.cache, &devices, self.device_name, self.log, &world).map(|()| Vec::new())
            };
            // After a failure the collective may be gone with the rank that failed: this
            // process ends with its error instead of waiting to leave.
            if records.is_ok() {
                crate::world::leave::<B::InnerBackend>(&world);
                let (count, bytes) = crate::world::all_reduced();
                self.log.info(&format!(
                    "rank {}: {count} all-reduces of {bytes} bytes in all; each rank sends 2(N-1)/N of them in the ring (N = {})",
                    world.rank, world.ranks
                ));
            }
            records
        }
    }
    let p = &pipeline.pipeline;
    crate::backend::dispatch(p.backend, &p.devices, Execute { pipeline, plan, cache, device_name, run_dir, log, world })
}

/// Refuses, naming each key, settings that `ranks` processes cannot run together: before the
/// ranks join (and before `--emit-slurm` writes a script that would fail).
pub fn check_ranks(pipeline: &Pipeline, ranks: usize) -> Result<()> {
    let problems: Vec<String> = pipeline
        .stages
        .iter()
        .flat_map(|spec| spec.settings.unsupported_with_ranks(spec.kind, ranks).into_iter().map(move |(key, message)| format!("stages.{}.{key} = {message}", spec.name)))
        .collect();
    if !problems.is_empty() {
        anyhow::bail!("{}: {}", pipeline.path.display(), problems.join("\n"));
    }
    Ok(())
}

/// What the ranks of one job must share, compared at the join: the runner's code, the resolved
/// pipeline, and the plan (every stage's cache key, as far as it is known before running).
fn identity(pipeline: &Pipeline, plan: &Plan) -> Result<crate::world::Identity> {
    let digest = |bytes: &[u8]| hex::encode(sha2::Sha256::digest(bytes));
    let code: String = crate::sources::SOURCES.iter().map(|(path, hash)| format!("{path} {hash}\n")).collect();
    let keys: String = plan.stages.iter().map(|s| format!("{} {}\n", s.spec.name, s.key)).collect();
    Ok(vec![("runner build", digest(code.as_bytes())), ("pipeline", digest(&serde_json::to_vec(pipeline)?)), ("stage keys", digest(keys.as_bytes()))])
}

/// A stage's key once its inputs are known (keys that waited on an input's digest), and
/// whether it is now complete in the cache.
fn settle_key(planned: &mut PlannedStage, digests: &BTreeMap<String, String>, keys: &BTreeMap<String, String>, cache: &Cache) {
    if planned.pending() {
        for (name, digest) in &mut planned.key_input.inputs {
            if digest.starts_with(PENDING) {
                digest.clone_from(&digests[name.as_str()]);
            }
        }
        for (name, key) in &mut planned.input_keys {
            key.clone_from(&keys[name.as_str()]);
        }
        planned.key = planned.key_input.key();
        if !planned.forced && cache.complete(&planned.key).is_some() {
            planned.status = Status::Cached;
        }
    }
}

/// A rank other than 0: the stages in order, training ones run together with rank 0 (its
/// decision, `world::agree`), each entry read from the shared cache once rank 0 has committed
/// it. Writes nothing.
fn follow<B: AutodiffBackend>(pipeline: &Pipeline, plan: &mut Plan, cache: &Cache, devices: &[B::Device], device_name: &str, log: &RunLog, world: &World) -> Result<()> {
    let (mut digests, mut keys) = (BTreeMap::<String, String>::new(), BTreeMap::<String, String>::new());
    for planned in &mut plan.stages {
        settle_key(planned, &digests, &keys, cache);
        let spec = &planned.spec;
        if spec.kind.trains() && crate::world::agree::<B::InnerBackend>(world, &devices[0], &spec.name, &planned.key, None)? {
            log.info(&format!("rank {}: {}: running {} with rank 0", world.rank, spec.name, spec.kind.name()));
            let ctx = stage_context::<B>(pipeline, planned, cache, cache.entry_dir(&planned.key), devices, device_name, log, world);
            stages::run(&ctx).with_context(|| format!("stage `{}` ({}) failed on rank {}", spec.name, spec.kind.name(), world.rank))?;
        }
        let manifest = wait_for_entry(cache, &planned.key, &spec.name, world)?;
        digests.insert(spec.name.clone(), manifest.digest.clone());
        keys.insert(spec.name.clone(), planned.key.clone());
    }
    Ok(())
}

/// The manifest of `key` once rank 0 has committed it, rank 0 probed while it is awaited.
fn wait_for_entry(cache: &Cache, key: &str, stage: &str, world: &World) -> Result<Manifest> {
    let mut last_probe = Instant::now();
    loop {
        if let Some(manifest) = cache.complete(key) {
            return Ok(manifest);
        }
        crate::interrupt::check()?;
        if last_probe.elapsed() > std::time::Duration::from_secs(2) {
            crate::world::probe(world, 0).with_context(|| format!("waiting for rank 0 to finish stage `{stage}`"))?;
            last_probe = Instant::now();
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Runs the planned stages in order on backend `B`, skipping cached ones. Keys that waited on
/// an input are completed as the input finishes (`plan` is updated), so a stage whose input
/// was rebuilt with the same output stays cached.
#[allow(clippy::too_many_arguments)]
pub fn execute<B: AutodiffBackend>(
    pipeline: &Pipeline,
    plan: &mut Plan,
    cache: &Cache,
    devices: &[B::Device],
    device_name: &str,
    run_dir: Option<&Path>,
    log: &RunLog,
    world: &World,
) -> Result<Vec<StageRecord>> {
    let mut records: Vec<StageRecord> = Vec::new();
    let (mut digests, mut keys) = (BTreeMap::<String, String>::new(), BTreeMap::<String, String>::new());
    // A shared lock on every entry this run has used, until it ends: no other runner's
    // `--force` or `cache gc` removes an entry a later stage of this run still reads.
    let mut held: BTreeMap<String, std::fs::File> = BTreeMap::new();
    let force_since = plan.force_since;
    for planned in &mut plan.stages {
        settle_key(planned, &digests, &keys, cache);
        let spec = &planned.spec;
        let dir = cache.entry_dir(&planned.key);
        let cached = match &planned.status {
            // Two stages of one run with the same key: the first built or checked it.
            Status::Cached if held.contains_key(&planned.key) => cache.complete(&planned.key).map(|m| (m, None)),
            Status::Cached => {
                let lock = cache.share(&planned.key, |holder| log.info(&format!("{}: waiting for {holder}, which is building it", spec.name)))?;
                let start = Instant::now();
                // None when removed since the plan was made, or damaged.
                verified_or_warn(cache, &planned.key, &spec.name, log).map(|(manifest, bytes)| {
                    let checked = format!("{:.1} MB checked in {:.2} s", bytes as f64 / 1e6, start.elapsed().as_secs_f64());
                    log.info(&format!("{}: cached ({}; {checked})", spec.name, dir.display()));
                    (manifest, Some(lock))
                })
            }
            Status::Run(_) => None,
        };
        let (manifest, how) = match cached {
            Some((manifest, lock)) => {
                if spec.kind.trains() {
                    crate::world::agree::<B::InnerBackend>(world, &devices[0], &spec.name, &planned.key, Some(false))?;
                }
                cache.touch(&planned.key);
                held.extend(lock.map(|l| (planned.key.clone(), l)));
                (manifest, "cached")
            }
            None => {
                let (manifest, how, lock) = run_stage::<B>(pipeline, planned, force_since, cache, devices, device_name, log, world)
                    .with_context(|| format!("stage `{}` ({}) failed", spec.name, spec.kind.name()))?;
                record_in_index(cache, &pipeline.pipeline.name, &spec.name, &planned.key)?;
                held.insert(planned.key.clone(), lock);
                (manifest, how)
            }
        };
        stages::publish(&pipeline.results(), &pipeline.pipeline.name, spec, &dir, &manifest, log)?;
        digests.insert(spec.name.clone(), manifest.digest.clone());
        keys.insert(spec.name.clone(), planned.key.clone());
        records.push(StageRecord {
            stage: spec.name.clone(),
            kind: spec.kind.name().into(),
            key: planned.key.clone(),
            status: how.into(),
            dir: dir.clone(),
            files: manifest.files.clone(),
            seconds: manifest.seconds,
        });
        if let Some(dir) = run_dir {
            atomic_write(&dir.join("artifacts.json"), &serde_json::to_vec_pretty(&records)?)?;
        }
    }
    Ok(records)
}

/// [`Cache::verified`], a damaged entry logged as a warning (its stage runs again) and `None`.
fn verified_or_warn(cache: &Cache, key: &str, stage: &str, log: &RunLog) -> Option<(Manifest, u64)> {
    cache.verified(key).unwrap_or_else(|e| {
        log.info(&format!("{stage}: warning: the cached entry is damaged, so it runs again: {e:#}"));
        None
    })
}

/// What stage `planned` sees when it runs, its entry at `dir`.
#[allow(clippy::too_many_arguments)]
fn stage_context<'a, B: AutodiffBackend>(
    pipeline: &'a Pipeline,
    planned: &'a PlannedStage,
    cache: &Cache,
    dir: PathBuf,
    devices: &[B::Device],
    device_name: &'a str,
    log: &'a RunLog,
    world: &'a World,
) -> StageContext<'a, B> {
    let spec = &planned.spec;
    let stages: Vec<(String, PathBuf)> = planned.input_keys.iter().map(|(name, key)| (name.clone(), cache.entry_dir(key))).collect();
    let input = spec.input.as_ref().map(|name| stages.iter().find(|(n, _)| n == name).cloned().expect("the input is planned"));
    StageContext::<B> {
        pipeline_name: &pipeline.pipeline.name,
        backend: pipeline.pipeline.backend,
        dataset: &pipeline.dataset,
        model: &pipeline.model,
        specs: &pipeline.stages,
        spec,
        seed: spec.seed(pipeline.pipeline.seed),
        dir,
        input,
        stages,
        devices: devices.to_vec(),
        world,
        device_name,
        log,
    }
}

/// Builds one entry under its lock; returns its manifest, who built it, and the lock, now
/// shared, which the run holds while it reads the entry.
#[allow(clippy::too_many_arguments)]
fn run_stage<B: AutodiffBackend>(
    pipeline: &Pipeline,
    planned: &PlannedStage,
    force_since: chrono::DateTime<chrono::Utc>,
    cache: &Cache,
    devices: &[B::Device],
    device_name: &str,
    log: &RunLog,
    world: &World,
) -> Result<(Manifest, &'static str, std::fs::File)> {
    let spec = &planned.spec;
    // What another runner left in the entry will do unless this run forces a rebuild it has not
    // had since `force_since` (a sweep's runners force each stage once), or it is damaged.
    let usable = || {
        let (done, _) = verified_or_warn(cache, &planned.key, &spec.name, log)?;
        let rebuilt_since_force = chrono::DateTime::parse_from_rfc3339(&done.created).is_ok_and(|t| t >= force_since);
        (!planned.forced || rebuilt_since_force).then_some(done)
    };
    // Two runners sharing a cache (a sweep) must not build the same entry at once, and a forced
    // rebuild must not pull an entry from under a runner building or reading it.
    let waiting = |holder: &str| {
        log.info(&format!("{}: waiting for {holder}, which is building or reading it (entry {})", spec.name, cache.entry_dir(&planned.key).display()))
    };
    let (lock, found) = cache.lock(&planned.key, waiting, &usable)?;
    let found = found.or_else(&usable);
    if spec.kind.trains() {
        crate::world::agree::<B::InnerBackend>(world, &devices[0], &spec.name, &planned.key, Some(found.is_none()))?;
    }
    if let Some(done) = found {
        cache.downgrade(&planned.key, &lock)?;
        log.info(&format!("{}: completed by another runner meanwhile", spec.name));
        return Ok((done, "built by another runner", lock));
    }
    // A complete entry here is forced or damaged: nothing of it is kept.
    let restart = planned.forced || cache.complete(&planned.key).is_some();
    let dir = if restart { cache.restart(&planned.key, &planned.key_input)? } else { cache.begin(&planned.key, &planned.key_input)? };
    log.info(&format!("{}: running {} -> {}", spec.name, spec.kind.name(), dir.display()));
    let start = Instant::now();
    let ctx = stage_context::<B>(pipeline, planned, cache, dir.clone(), devices, device_name, log, world);
    let metrics = stages::run(&ctx)?;
    let manifest = Manifest::describe(&dir, &planned.key, &pipeline.pipeline.name, &spec.name, spec.kind.name(), start.elapsed().as_secs_f64(), metrics)?;
    cache.commit(&manifest)?;
    // Only now, with the manifest standing for the stage, is its resume state of no use.
    cache.drop_checkpoints(&planned.key);
    log.info(&format!("{}: done in {:.1} s", spec.name, manifest.seconds));
    cache.downgrade(&planned.key, &lock)?;
    Ok((manifest, "ran", lock))
}
