//! Pipeline files: what the user wrote, layered and checked.
//!
//! A pipeline is read in layers, each overriding the one before:
//! built-in defaults < the `extends` chain < the file < `RUNNER_SECTION__KEY` environment
//! variables < `--set key.path=value`. [`load`] resolves the layers with figment (which keeps,
//! for every value, the layer it came from, for `runner show`), then checks the result as a
//! whole: every unknown key, wrong type and impossible value is reported at once, each naming
//! the file and key path at fault.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};
use serde::{Deserialize, Serialize};

use crate::backend::BackendKind;
use crate::data::DatasetConfig;
use crate::model::ModelSection;
use crate::stages::{StageKind, StageSettings, StageSpec};
use crate::suggest::{did_you_mean, struct_fields};

/// Every error found in a pipeline, one per line.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct ConfigErrors(pub Vec<String>);

/// `[pipeline]`: what runs where.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PipelineSection {
    /// Name of the pipeline: names `runs/<name>/` and `results/<name>/`. Default: the file stem.
    pub name: String,
    /// Burn backend: `flex` or `ndarray` (CPU), `tch` (LibTorch), `wgpu` or `cuda`. Default `flex`.
    pub backend: BackendKind,
    /// Device indices on the backend. Default `[0]`. More than one trains data-parallel: each
    /// device takes a shard of every batch and the gradients are averaged before the step. The
    /// first device holds the model and takes the measurements (latency, throughput).
    pub devices: Vec<usize>,
    /// Seed for initialization, shuffling and augmentation. Default 42.
    pub seed: u64,
    /// Where CSV results go. Default `results`.
    pub results_dir: PathBuf,
    /// Where run directories go. Default `runs`.
    pub runs_dir: PathBuf,
}

impl Default for PipelineSection {
    fn default() -> Self {
        Self {
            name: String::new(),
            backend: BackendKind::Flex,
            devices: vec![0],
            seed: 42,
            results_dir: "results".into(),
            runs_dir: "runs".into(),
        }
    }
}

impl Pipeline {
    /// The name of the device that takes the measurements (the first), for cache keys and tables.
    pub fn device_name(&self) -> String {
        crate::backend::device_name(self.pipeline.backend, self.pipeline.devices[0])
    }

    /// Where the pipeline's tables and figures go: `results/<name>/`.
    pub fn results(&self) -> PathBuf {
        self.pipeline.results_dir.join(&self.pipeline.name)
    }
}

/// A pipeline after layering and validation: everything a run needs to know.
#[derive(Debug, Clone, Serialize)]
pub struct Pipeline {
    /// The file it was read from.
    pub path: PathBuf,
    pub pipeline: PipelineSection,
    pub dataset: DatasetConfig,
    pub model: ModelSection,
    /// Stages in file order (bases first), which is also the order they run in.
    pub stages: Vec<StageSpec>,
    /// The layered figment, kept to say where each value came from.
    #[serde(skip)]
    pub figment: Figment,
}

/// What the layers above the file contribute.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--with FILE`: TOML files layered over the pipeline file, in order (a smoke-test
    /// profile, a site's paths).
    pub with: Vec<PathBuf>,
    /// `--set key.path=value`, in order.
    pub set: Vec<String>,
    /// Whether to read `RUNNER_SECTION__KEY` variables (tests turn it off).
    pub env: bool,
}

/// Reads, layers and validates a pipeline file.
pub fn load(path: &Path, overrides: &Overrides) -> Result<Pipeline, ConfigErrors> {
    let mut errors = Vec::new();
    let chain = read_extends_chain(path).map_err(|e| ConfigErrors(vec![e]))?;

    let default_name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "pipeline".into());
    let defaults = SectionDefaults {
        pipeline: PipelineSection { name: default_name, ..Default::default() },
        ..Default::default()
    };
    let mut figment = Figment::new().merge(Serialized::defaults(defaults).profile(Profile::Default));
    let mut stage_order: Vec<String> = Vec::new();
    for (file, doc) in &chain {
        figment = figment.merge(Toml::file_exact(file));
        if let Some(toml::Value::Table(stages)) = doc.get("stages") {
            for name in stages.keys() {
                if !stage_order.contains(name) {
                    stage_order.push(name.clone());
                }
            }
        }
    }
    for file in &overrides.with {
        let doc = crate::files::read_text(file)
            .map_err(|e| format!("{}: cannot read (--with): {e}", file.display()))
            .and_then(|text| text.parse::<toml::Table>().map_err(|e| format!("{}: {e}", file.display())));
        match doc {
            Ok(doc) => {
                figment = figment.merge(Toml::file_exact(file));
                if let Some(toml::Value::Table(stages)) = doc.get("stages") {
                    stage_order.extend(stages.keys().filter(|n| !stage_order.contains(n)).cloned().collect::<Vec<_>>());
                }
            }
            Err(e) => errors.push(e),
        }
    }
    if overrides.env {
        figment = figment.merge(
            Env::prefixed("RUNNER_")
                .filter(|k| k.as_str().contains("__"))
                .split("__"),
        );
    }
    for item in &overrides.set {
        match SetOverride::parse(item) {
            Ok(provider) => {
                if let Some(stage) = provider.stage_name() {
                    if !stage_order.contains(&stage) {
                        stage_order.push(stage);
                    }
                }
                figment = figment.merge(provider);
            }
            Err(e) => errors.push(e),
        }
    }


    // Stage defaults depend on each stage's kind, so they join once the kinds are known.
    let root = match figment.data() {
        Ok(mut data) => data.remove(&Profile::Default).unwrap_or_default(),
        Err(e) => return Err(ConfigErrors(vec![format_figment_error(&e)])),
    };
    let mut kinds = BTreeMap::new();
    check_unknown_keys(&figment, &root, &mut errors, &mut kinds);
    for (name, kind) in &kinds {
        figment = figment.join(Serialized::default(
            &format!("stages.{name}"),
            kind.default_settings(),
        ));
    }

    let section_defaults = serde_json::to_value(SectionDefaults::default()).ok();
    let defaults_of = |section: &str| {
        section_defaults.as_ref().and_then(|d| d.get(section)).and_then(|d| Figment::from(Serialized::defaults(d)).data().ok()).and_then(|mut d| d.remove(&Profile::Default)).unwrap_or_default()
    };
    let pipeline = extract_section::<PipelineSection>(&figment, "pipeline", &defaults_of("pipeline"), &mut errors);
    let dataset = extract_section::<DatasetConfig>(&figment, "dataset", &defaults_of("dataset"), &mut errors);
    let model = extract_section::<ModelSection>(&figment, "model", &defaults_of("model"), &mut errors);
    let mut dataset = dataset;
    if let Some(d) = dataset.as_mut() {
        let root_is_default = figment.find_metadata("dataset.root").is_none_or(|m| describe_source(m) == "default");
        if d.kind == crate::data::DatasetKind::Imagefolder && root_is_default && overrides.env {
            if let Some(root) = std::env::var_os("RUNNER_IMAGENET") {
                d.root = root.into();
            }
        }
    }

    let mut stages = Vec::new();
    let mut previous: Option<String> = None;
    for name in stage_order.iter().filter(|n| kinds.contains_key(*n)) {
        let kind = kinds[name];
        let key = format!("stages.{name}");
        let input_key = format!("{key}.input");
        let input = match optional::<String>(&figment, &input_key) {
            Ok(Some(input)) if input.is_empty() || input == "none" => None,
            Ok(Some(input)) => Some(input),
            Ok(None) if kind.starts_from_nothing() => None,
            Ok(None) => previous.clone(),
            Err(e) => {
                errors.push(located(&figment, &input_key, &e.kind.to_string()));
                None
            }
        };
        let seed_key = format!("{key}.seed");
        let seed = optional::<u64>(&figment, &seed_key).unwrap_or_else(|e| {
            errors.push(located(&figment, &seed_key, &e.kind.to_string()));
            None
        });
        let settings = {
            let mut table = match figment.find_value(&key) {
                Ok(Value::Dict(_, dict)) => dict,
                _ => Dict::new(),
            };
            table.remove("kind");
            table.remove("input");
            table.remove("seed");
            let defaults = Figment::from(Serialized::defaults(kind.default_settings())).data().ok().and_then(|mut d| d.remove(&Profile::Default)).unwrap_or_default();
            extract_every_error(&figment, &key, table, &defaults, |focused| kind.parse_settings(focused), &mut errors)
        };
        if let Some(settings) = settings {
            stages.push(StageSpec { name: name.clone(), kind, input, seed, settings });
        }
        previous = Some(name.clone());
    }

    // Every declared stage, parsed or not: a stage with a bad value is still a stage that
    // others may name.
    let names: Vec<&str> = stage_order.iter().filter(|n| kinds.contains_key(*n)).map(String::as_str).collect();
    // A randomly initialized model reads no checkpoint, so its path may be absent.
    let random_init = model.as_ref().is_some_and(|m| m.init == Some(crate::model::Init::Random));
    for stage in &stages {
        let own = names.iter().position(|n| *n == stage.name);
        for (key, name) in stage.upstream() {
            let expected = StageSettings::referenced_kind(key);
            let message = match names.iter().position(|n| *n == name) {
                None => format!("names no stage `{name}`{}", did_you_mean(name, &names)),
                Some(p) if Some(p) >= own => format!("names `{name}`, which does not come before it; stages run in file order"),
                Some(_) if expected.is_some_and(|k| k != kinds[name]) => format!(
                    "names `{name}`, a {} stage; it takes {} stages",
                    kinds[name].name(),
                    expected.map_or("", |k| k.name())
                ),
                Some(_) if matches!(key, "teacher" | "input" | "baseline") && !kinds[name].writes_model() => format!(
                    "names `{name}`, a {} stage, which writes no model{}\n  hint: name a {} stage",
                    kinds[name].name(),
                    if key == "input" && figment.find_value(&format!("stages.{}.input", stage.name)).is_err() {
                        " (the input defaults to the previous stage)"
                    } else {
                        ""
                    },
                    StageKind::ALL.iter().filter(|k| k.writes_model()).map(|k| k.name()).collect::<Vec<_>>().join(", ")
                ),
                Some(_) => continue,
            };
            errors.push(located(&figment, &format!("stages.{}.{key}", stage.name), &message));
        }
        for problem in stage.settings.validate() {
            let (key, message) = problem;
            if random_init && stage.kind == StageKind::LoadPretrained && key == "path" {
                continue;
            }
            errors.push(located(&figment, &format!("stages.{}.{key}", stage.name), &message));
        }
    }
    if let Some(p) = &pipeline {
        if let Err(e) = crate::files::check_name(&p.name) {
            let hint = if figment.find_metadata("pipeline.name").is_none_or(|m| describe_source(m) == "default") {
                "\n  hint: it defaults to the file's stem; set pipeline.name"
            } else {
                ""
            };
            errors.push(located(&figment, "pipeline.name", &format!("{e}{hint}")));
        }
        for (key, dir) in [("results_dir", &p.results_dir), ("runs_dir", &p.runs_dir)] {
            if dir.exists() && !dir.is_dir() {
                errors.push(located(&figment, &format!("pipeline.{key}"), &format!("`{}` is a file, not a folder", dir.display())));
            }
        }
        if p.devices.is_empty() {
            errors.push(located(&figment, "pipeline.devices", "is empty: give at least one device index, e.g. [0]"));
        } else if let Err(e) = crate::backend::check_devices(p.backend, &p.devices) {
            errors.push(located(&figment, "pipeline.devices", &e.to_string().replace("pipeline.devices ", "")));
        }
    }
    if let Some(dataset) = &dataset {
        for (key, message) in dataset.validate() {
            errors.push(located(&figment, &format!("dataset.{key}"), &message));
        }
    }
    // Whether the model comes from a checkpoint, which then decides what [model] leaves open.
    let loads = model.as_ref().is_some_and(|m| stages.iter().any(|s| s.kind == StageKind::LoadPretrained) && m.init != Some(crate::model::Init::Random));
    if let (Some(dataset), Some(model)) = (&dataset, &model) {
        // The model's channels are known here unless a checkpoint will say them.
        let resolved = (!loads).then(|| model.resolve(2).ok()).flatten();
        let channels = model.in_chans.or_else(|| resolved.as_ref().map(|c| c.in_chans()));
        if let Some((key, message)) = channels.and_then(|c| dataset.check_channels(c)) {
            errors.push(located(&figment, &format!("dataset.{key}"), &message));
        }
        // So are its widths: an EMB group wider than every stream could never be pruned.
        let narrowest = resolved.and_then(|c| c.stages().iter().map(|(e, _)| *e).min());
        for stage in &stages {
            if let (StageSettings::Prune(s), Some(narrowest)) = (&stage.settings, narrowest) {
                if s.group_emb > narrowest {
                    let message = format!("is {}, more than the {narrowest} channels of the model's narrowest embedding stream: no EMB group could ever be pruned\n  hint: lower it", s.group_emb);
                    errors.push(located(&figment, &format!("stages.{}.group_emb", stage.name), &message));
                }
            }
        }
    }
    if let Some(model) = &model {
        for (key, message) in model.validate_for(loads) {
            errors.push(located(&figment, &format!("model.{key}"), &message));
        }
        for stage in &stages {
            for (key, message) in stage.settings.unsupported(model.family()) {
                errors.push(located(&figment, &format!("stages.{}.{key}", stage.name), &message));
            }
        }
    }
    if stages.is_empty() && errors.is_empty() {
        errors.push(format!("{}: the pipeline has no stages\n  hint: add a [stages.NAME] table with a `kind`", path.display()));
    }

    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    Ok(Pipeline {
        path: path.to_path_buf(),
        pipeline: pipeline.expect("checked above"),
        dataset: dataset.expect("checked above"),
        model: model.expect("checked above"),
        stages,
        figment,
    })
}

impl Pipeline {
    pub fn stage(&self, name: &str) -> Option<&StageSpec> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// Every resolved value as `(key.path, value, where it came from)`, for `runner show`.
    pub fn provenance(&self) -> Vec<(String, String, String)> {
        let mut rows = Vec::new();
        let root = self
            .figment
            .data()
            .ok()
            .and_then(|mut d| d.remove(&Profile::Default))
            .unwrap_or_default();
        flatten(&root, String::new(), &mut |path, value| {
            let origin = self
                .figment
                .find_metadata(&path)
                .map(describe_source)
                .unwrap_or_else(|| "default".into());
            rows.push((path, value_to_toml(value), origin));
        });
        rows
    }

    /// The resolved configuration as TOML, written into every run directory.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        let mut push = |header: &str, value: toml::Value| {
            out.push_str(&format!("[{header}]\n"));
            out.push_str(&toml::to_string(&value).unwrap_or_default());
            out.push('\n');
        };
        push("pipeline", toml::Value::try_from(&self.pipeline).expect("serializable"));
        push("dataset", toml::Value::try_from(&self.dataset).expect("serializable"));
        push("model", toml::Value::try_from(&self.model).expect("serializable"));
        for stage in &self.stages {
            let mut table = match toml::Value::try_from(&stage.settings).expect("serializable") {
                toml::Value::Table(t) => t,
                _ => toml::map::Map::new(),
            };
            table.insert("kind".into(), toml::Value::String(stage.kind.name().into()));
            if let Some(input) = &stage.input {
                table.insert("input".into(), toml::Value::String(input.clone()));
            }
            if let Some(seed) = stage.seed {
                table.insert("seed".into(), toml::Value::Integer(seed as i64));
            }
            push(&format!("stages.{}", stage.name), toml::Value::Table(table));
        }
        out
    }
}

/// The defaults of the fixed sections, as the lowest layer.
#[derive(Serialize, Default)]
struct SectionDefaults {
    pipeline: PipelineSection,
    dataset: DatasetConfig,
    model: ModelSection,
}

/// The longest `extends` chain read.
const MAX_EXTENDS: usize = 32;

/// Reads `path` and the files it `extends`, base first.
fn read_extends_chain(path: &Path) -> Result<Vec<(PathBuf, toml::Table)>, String> {
    let mut chain = Vec::new();
    let mut next = Some(path.to_path_buf());
    // Compared as canonical paths: `sub/../a.toml` is `a.toml`.
    let mut seen: Vec<PathBuf> = Vec::new();
    while let Some(file) = next.take() {
        let canonical = std::fs::canonicalize(&file).unwrap_or_else(|_| file.clone());
        if seen.contains(&canonical) {
            return Err(format!("{}: `extends` forms a cycle: {} extends it again", canonical.display(), chain.last().map_or(file.clone(), |(p, _): &(PathBuf, _)| p.clone()).display()));
        }
        if seen.len() >= MAX_EXTENDS {
            return Err(format!("{}: more than {MAX_EXTENDS} files in its `extends` chain", path.display()));
        }
        seen.push(canonical);
        let text = crate::files::read_text(&file).map_err(|e| {
            format!("{}: cannot read pipeline file: {e}", file.display())
        })?;
        let doc: toml::Table = toml::from_str(&text)
            .map_err(|e| {
                let (line, column) = e.span().map_or((1, 1), |span| {
                    let before = &text[..span.start.min(text.len())];
                    (before.matches('\n').count() + 1, before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1)
                });
                format!("{}:{line}:{column}: invalid TOML: {}", file.display(), e.message().trim_end())
            })?;
        if let Some(base) = doc.get("extends") {
            let base = base
                .as_str()
                .ok_or_else(|| format!("{}: `extends` must be a file name string", file.display()))?;
            let base = file.parent().unwrap_or(Path::new(".")).join(base);
            match std::fs::metadata(&base) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(format!("{}: extends `{}`, which does not exist", file.display(), base.display()));
                }
                // A loop of links, say: the system's words name it.
                Err(e) => return Err(format!("{}: extends `{}`, which cannot be opened: {e}", file.display(), base.display())),
            }
            next = Some(base);
        }
        chain.push((file, doc));
    }
    chain.reverse();
    Ok(chain)
}

/// `--set key.path=value`: the value is read as TOML (`0.5`, `true`, `[1, 2]`, `"x"`),
/// falling back to a plain string (`--set dataset.kind=synthetic`).
struct SetOverride {
    key: String,
    value: Value,
    text: String,
}

impl SetOverride {
    fn parse(item: &str) -> Result<Self, String> {
        // TOML would read a second line as another key and drop it with the value.
        if item.chars().any(char::is_control) {
            return Err(format!("--set {item:?}: holds a line break or another control character\n  hint: give one key.path=value per --set"));
        }
        let (key, raw) = item
            .split_once('=')
            .ok_or_else(|| format!("--set {item}: expected key.path=value"))?;
        let key = key.trim();
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(format!("--set {item}: `{key}` is not a key path like stages.train.lr"));
        }
        let raw = raw.trim();
        let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .map(|v| Value::serialize(v).expect("toml values serialize"))
            .unwrap_or_else(|| Value::from(raw.to_string()));
        Ok(Self { key: key.to_string(), value, text: item.to_string() })
    }

    fn stage_name(&self) -> Option<String> {
        let mut parts = self.key.split('.');
        (parts.next() == Some("stages")).then(|| parts.next().map(String::from)).flatten()
    }
}

impl Provider for SetOverride {
    fn metadata(&self) -> Metadata {
        Metadata::from("--set", Source::Custom(self.text.clone()))
    }

    fn data(&self) -> figment::Result<Map<Profile, Dict>> {
        Serialized::default(&self.key, &self.value).data()
    }
}

/// The most stages a pipeline holds (the paper's runs have 8; planning is quadratic in them).
pub const MAX_STAGES: usize = 256;

fn check_unknown_keys(
    figment: &Figment,
    root: &Dict,
    errors: &mut Vec<String>,
    kinds: &mut BTreeMap<String, StageKind>,
) {
    const TOP: &[&str] = &["extends", "pipeline", "dataset", "model", "stages"];
    let sections: [(&str, &[&str]); 3] = [
        ("pipeline", struct_fields::<PipelineSection>()),
        ("dataset", struct_fields::<DatasetConfig>()),
        ("model", struct_fields::<ModelSection>()),
    ];
    for key in root.keys() {
        if !TOP.contains(&key.as_str()) {
            errors.push(unknown_key(figment, key, key, TOP));
        }
    }
    for (section, fields) in sections {
        if let Some(Value::Dict(_, dict)) = root.get(section) {
            for key in dict.keys() {
                if !fields.contains(&key.as_str()) {
                    errors.push(unknown_key(figment, &format!("{section}.{key}"), key, fields));
                }
            }
        }
    }
    let Some(stages) = root.get("stages") else { return };
    let Value::Dict(_, stages) = stages else {
        errors.push(located(figment, "stages", "must be a table of [stages.NAME] tables"));
        return;
    };
    if stages.len() > MAX_STAGES {
        errors.push(located(figment, "stages", &format!("has {} stages: at most {MAX_STAGES}", stages.len())));
        return;
    }
    for (name, table) in stages {
        let path = format!("stages.{name}");
        if let Err(e) = crate::files::check_name(name) {
            errors.push(located(figment, "stages", &format!("stage name {e}\n  hint: rename the [stages.NAME] table")));
            continue;
        }
        if name.contains('.') {
            // Key paths (`--set stages.NAME.key`, the checks' own) split at dots.
            errors.push(located(figment, "stages", &format!("stage name {name:?} contains `.`, which separates the parts of a key path\n  hint: rename the [stages.NAME] table with `_` or `-`")));
            continue;
        }
        let Value::Dict(_, table) = table else {
            errors.push(located(figment, &path, "must be a table"));
            continue;
        };
        let kind = match table.get("kind") {
            None => {
                // Most often a misspelled stage name in `--set stages.NAME.key=...`.
                let named: Vec<&str> = stages.iter().filter(|(_, t)| matches!(t, Value::Dict(_, d) if d.contains_key("kind"))).map(|(n, _)| n.as_str()).collect();
                let hint = match did_you_mean(name, &named) {
                    d if !d.is_empty() => format!("names no stage of the pipeline{d}"),
                    _ => format!("has no `kind`\n  hint: one of {}", StageKind::names().join(", ")),
                };
                errors.push(located(figment, &path, &hint));
                continue;
            }
            Some(Value::String(_, kind)) => kind,
            Some(_) => {
                errors.push(located(figment, &format!("{path}.kind"), "must be a string"));
                continue;
            }
        };
        let kind = match StageKind::from_name(kind) {
            Ok(kind) => kind,
            Err(message) => {
                errors.push(located(figment, &format!("{path}.kind"), &message));
                continue;
            }
        };
        let mut valid: Vec<&str> = vec!["kind", "input", "seed"];
        valid.extend_from_slice(kind.fields());
        for key in table.keys() {
            if !valid.contains(&key.as_str()) {
                errors.push(unknown_key(figment, &format!("{path}.{key}"), key, &valid));
            }
        }
        kinds.insert(name.clone(), kind);
    }
}

fn unknown_key(figment: &Figment, path: &str, key: &str, valid: &[&str]) -> String {
    located(figment, path, &format!("unknown key{}", did_you_mean(key, valid)))
        .replacen(&format!("{path}: unknown key"), &format!("unknown key `{path}`"), 1)
}

/// `file: key.path: message`, naming the layer that supplied `path` (or its nearest parent).
fn located(figment: &Figment, path: &str, message: &str) -> String {
    let mut probe = path.to_string();
    // A key left at its default (a required one, say) is named in the file of its table.
    let mut fallback = None;
    let origin = loop {
        if let Some(meta) = figment.find_metadata(&probe) {
            let origin = describe_source(meta);
            if origin != "default" {
                break origin;
            }
            fallback.get_or_insert(origin);
        }
        match probe.rsplit_once('.') {
            Some((parent, _)) => probe = parent.to_string(),
            None => break fallback.unwrap_or_else(|| "pipeline".into()),
        }
    };
    format!("{origin}: {path}: {message}")
}

fn describe_source(meta: &Metadata) -> String {
    match &meta.source {
        Some(Source::File(p)) => display_path(p),
        Some(Source::Custom(c)) if meta.name == "--set" => format!("--set {c}"),
        Some(Source::Custom(c)) => c.clone(),
        _ if meta.name.contains("environment") => "environment (RUNNER_*)".into(),
        _ => "default".into(),
    }
}

/// Paths under the working directory are shown relative to it, as the user typed them.
fn display_path(p: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| p.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| p.to_path_buf())
        .display()
        .to_string()
}

/// Extracts section `section` of `figment`, reporting every key of the wrong type.
fn extract_section<T: serde::de::DeserializeOwned>(figment: &Figment, section: &str, defaults: &Dict, errors: &mut Vec<String>) -> Option<T> {
    match figment.find_value(section) {
        Ok(Value::Dict(_, table)) => extract_every_error(figment, section, table, defaults, |f| f.extract::<T>(), errors),
        Ok(_) => {
            errors.push(located(figment, section, "must be a table"));
            None
        }
        Err(_) => extract_every_error(figment, section, defaults.clone(), defaults, |f| f.extract::<T>(), errors),
    }
}

/// Extracts `table` (the resolved table at `prefix`) with `parse`, reporting every key of the
/// wrong type, not only the first serde meets: each failing key is reported, set back to its
/// default (or dropped, for an unknown key, which [`check_unknown_keys`] reports), and the rest
/// extracted again.
fn extract_every_error<T>(figment: &Figment, prefix: &str, mut table: Dict, defaults: &Dict, parse: impl Fn(&Figment) -> Result<T, figment::Error>, errors: &mut Vec<String>) -> Option<T> {
    use figment::error::Kind;
    let mut failed = false;
    for _ in 0..=table.len() + 1 {
        let e = match parse(&Figment::from(Serialized::defaults(&table))) {
            Ok(value) => return (!failed).then_some(value),
            Err(e) => e,
        };
        let mut retry = false;
        for e in e {
            let key = match &e.kind {
                Kind::UnknownField(name, _) => Some(name.to_string()),
                Kind::DuplicateField(name) => Some(name.to_string()),
                Kind::MissingField(name) => Some(name.to_string()),
                _ => e.path.first().cloned(),
            };
            if !matches!(e.kind, Kind::UnknownField(..)) {
                let path = if e.path.is_empty() { prefix.to_string() } else { format!("{prefix}.{}", e.path.join(".")) };
                errors.push(located(figment, &path, &e.kind.to_string()));
                failed = true;
            }
            if let Some(key) = key {
                let before = table.get(&key).cloned();
                match defaults.get(&key) {
                    Some(d) => table.insert(key.clone(), d.clone()),
                    None => table.remove(&key),
                };
                retry |= before.as_ref() != table.get(&key);
            }
        }
        if !retry {
            return None;
        }
    }
    None
}

/// A key that may be unset: `None` then, else its value or why it has the wrong type.
fn optional<T: serde::de::DeserializeOwned>(figment: &Figment, key: &str) -> Result<Option<T>, figment::Error> {
    match figment.find_value(key) {
        Err(_) => Ok(None),
        Ok(_) => figment.extract_inner::<T>(key).map(Some),
    }
}

fn format_figment_error(e: &figment::Error) -> String {
    format_errors(e.clone().into_iter())
}

fn format_errors(errors: impl Iterator<Item = figment::Error>) -> String {
    errors
        .filter(|e| !matches!(e.kind, figment::error::Kind::UnknownField(..)))
        .map(|e| {
            let origin = e.metadata.as_ref().map(describe_source).unwrap_or_else(|| "pipeline".into());
            let path = e.path.join(".");
            if path.is_empty() {
                format!("{origin}: {}", e.kind)
            } else {
                format!("{origin}: {path}: {}", e.kind)
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn flatten(dict: &Dict, prefix: String, out: &mut impl FnMut(String, &Value)) {
    for (key, value) in dict {
        let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        match value {
            Value::Dict(_, inner) if !inner.is_empty() => flatten(inner, path, out),
            _ => out(path, value),
        }
    }
}

fn value_to_toml(value: &Value) -> String {
    match value {
        Value::Empty(..) => "unset".into(),
        _ => toml::Value::try_from(value).map_or_else(|_| format!("{value:?}"), |v| v.to_string()),
    }
}
