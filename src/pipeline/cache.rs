//! The content-addressed stage cache.
//!
//! A stage's key is the hash of a [`KeyInput`]: its kind and resolved settings, the digests of
//! what the stages it consumes produced, the dataset's settings and identity, the model
//! section, seed, backend, and the hashes of the source code its kind runs (see
//! [`crate::fingerprint`]). Its artifacts live in `<cache>/<key>/`; `manifest.json` is written
//! last, so an entry without one (a killed run) never counts as done, and a manifest whose files
//! are missing or of another size is a miss, not an error.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::files::atomic_write;

use crate::manifest::{Manifest, KEY_INPUT, MANIFEST};
const LAST_USED: &str = ".last_used";
/// Stands, in a key's inputs, for the digest of an input that will run before the stage.
pub const PENDING: &str = "pending:";
const LOCK: &str = ".lock";
/// Who holds the lock, for the message of a runner that waits on it.
const OWNER: &str = ".owner";

/// Everything a stage's output depends on. Its hash is the cache key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KeyInput {
    /// `(source path, hash)` of the code the stage kind runs, and of Cargo.lock.
    pub code: Vec<(String, String)>,
    pub kind: String,
    pub settings: serde_json::Value,
    /// `(stage name, digest of its output)` of the stages this one consumes.
    pub inputs: Vec<(String, String)>,
    pub dataset: serde_json::Value,
    pub dataset_identity: String,
    pub model: serde_json::Value,
    pub seed: u64,
    pub backend: String,
    /// Stage-specific facts, such as a checkpoint file's size and mtime.
    pub extra: BTreeMap<String, String>,
}

impl KeyInput {
    pub fn key(&self) -> String {
        let bytes = serde_json::to_vec(self).expect("serializable");
        hex::encode(&Sha256::digest(&bytes)[..10])
    }

    /// What differs from `old`, as `what: old -> new` lines.
    pub fn diff(&self, old: &KeyInput) -> Vec<String> {
        let mut changes = Vec::new();
        let j = |v: &dyn erased_serde_free::ToJson| v.to_json();
        for (name, a, b) in [
            ("settings", old.settings.clone(), self.settings.clone()),
            ("dataset", old.dataset.clone(), self.dataset.clone()),
            ("model", old.model.clone(), self.model.clone()),
            ("seed", j(&old.seed), j(&self.seed)),
            ("backend", j(&old.backend), j(&self.backend)),
            ("extra", j(&old.extra), j(&self.extra)),
        ] {
            diff_json(name, &a, &b, &mut changes);
        }
        let changed: Vec<&str> = self.code.iter().filter(|c| !old.code.contains(c)).map(|(path, _)| path.as_str()).collect();
        if !changed.is_empty() {
            changes.push(format!("code changed: {}", changed.join(", ")));
        }
        if old.dataset_identity != self.dataset_identity {
            changes.push("the dataset's files changed".into());
        }
        for ((name, new), (_, prev)) in self.inputs.iter().zip(&old.inputs) {
            // An input that will run is reported as such by the plan.
            if new != prev && !new.starts_with(PENDING) {
                changes.push(format!("input `{name}` changed"));
            }
        }
        if self.inputs.len() != old.inputs.len() {
            changes.push("its inputs changed".into());
        }
        changes
    }
}

mod erased_serde_free {
    /// Lets values of different types sit in one list of fields to compare.
    pub trait ToJson {
        fn to_json(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> ToJson for T {
        fn to_json(&self) -> serde_json::Value {
            serde_json::to_value(self).expect("serializable")
        }
    }
}

fn diff_json(path: &str, old: &serde_json::Value, new: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let null = Value::Null;
                diff_json(&format!("{path}.{k}"), a.get(k).unwrap_or(&null), b.get(k).unwrap_or(&null), out);
            }
        }
        (a, b) if a != b => out.push(format!("{path}: {a} -> {b}")),
        _ => {}
    }
}

pub struct Cache {
    pub root: PathBuf,
}

pub struct EntryInfo {
    pub key: String,
    pub manifest: Option<Manifest>,
    pub bytes: u64,
    pub last_used: Option<SystemTime>,
}

impl Cache {
    /// `RUNNER_CACHE` or `.runner-cache/`. An empty value, or one naming anything but a folder,
    /// is refused: an empty one put entries in the current folder, and a file's cache listed
    /// nothing without a word.
    pub fn from_env() -> Result<Self> {
        let root = match std::env::var_os("RUNNER_CACHE") {
            None => PathBuf::from(".runner-cache"),
            Some(v) if v.is_empty() => anyhow::bail!("RUNNER_CACHE is set but empty\n  hint: name the cache's folder, or unset it for ./.runner-cache"),
            Some(v) => PathBuf::from(v),
        };
        if root.exists() && !root.is_dir() {
            anyhow::bail!("RUNNER_CACHE={}: is not a folder\n  hint: name the cache's folder (created if missing)", root.display());
        }
        Ok(Self { root })
    }

    pub fn entry_dir(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// The manifest of a complete entry; `None` when absent, unreadable, or missing a file or
    /// holding one of another size than recorded (truncated, say).
    pub fn complete(&self, key: &str) -> Option<Manifest> {
        let dir = self.entry_dir(key);
        let manifest = Manifest::read(&dir).ok()?;
        let intact = manifest.files.iter().all(|(f, size)| std::fs::metadata(dir.join(f)).is_ok_and(|m| m.len() == *size));
        intact.then_some(manifest)
    }

    /// The entry's lock file, creating the entry directory. A runner building the entry holds
    /// it exclusively; a runner reading the entry holds it shared for the rest of its run, so a
    /// rebuild (`--force`) and `cache gc` (which need it exclusively) wait for, or skip, every
    /// entry another runner still reads.
    fn lock_file(&self, key: &str) -> Result<std::fs::File> {
        let dir = self.entry_dir(key);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating cache entry {}", dir.display()))?;
        let path = dir.join(LOCK);
        std::fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&path).with_context(|| format!("opening {}", path.display()))
    }

    fn holder(&self, key: &str) -> String {
        let holder = std::fs::read_to_string(self.entry_dir(key).join(OWNER)).unwrap_or_default();
        if holder.trim().is_empty() { "another runner".into() } else { holder.trim().to_string() }
    }

    /// Takes the entry's lock to build it: at once, or else (after calling `waiting` with who
    /// holds it) once the runner building it is done, when `usable` is asked whether the entry
    /// it left will do, and if so the lock is taken shared instead. Returns the lock and what
    /// `usable` found, if anything. Dropping the file releases the lock.
    pub fn lock<T>(&self, key: &str, waiting: impl FnOnce(&str), usable: impl Fn() -> Option<T>) -> Result<(std::fs::File, Option<T>)> {
        let file = self.lock_file(key)?;
        let path = self.entry_dir(key).join(LOCK);
        if fs2::FileExt::try_lock_exclusive(&file).is_err() {
            waiting(&self.holder(key));
            // Shared first: a runner that built the entry keeps reading it, and one that only
            // reads it may hold it for hours; neither stops this one from using what is there.
            fs2::FileExt::lock_shared(&file).with_context(|| format!("locking {}", path.display()))?;
            if let Some(found) = usable() {
                return Ok((file, Some(found)));
            }
            fs2::FileExt::unlock(&file).with_context(|| format!("unlocking {}", path.display()))?;
            fs2::FileExt::lock_exclusive(&file).with_context(|| format!("locking {}", path.display()))?;
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let _ = std::fs::write(self.entry_dir(key).join(OWNER), format!("runner pid {} on {}", std::process::id(), host.trim()));
        Ok((file, None))
    }

    /// Holds the entry for reading (a shared lock), waiting while a runner builds it.
    pub fn share(&self, key: &str, waiting: impl FnOnce(&str)) -> Result<std::fs::File> {
        let file = self.lock_file(key)?;
        if fs2::FileExt::try_lock_shared(&file).is_err() {
            waiting(&self.holder(key));
            fs2::FileExt::lock_shared(&file).with_context(|| format!("locking {}", self.entry_dir(key).join(LOCK).display()))?;
        }
        Ok(file)
    }

    /// Turns a build lock into a reader's: the runner that built the entry goes on reading it.
    pub fn downgrade(&self, key: &str, lock: &std::fs::File) -> Result<()> {
        fs2::FileExt::lock_shared(lock).with_context(|| format!("locking {}", self.entry_dir(key).join(LOCK).display()))
    }

    /// The manifest of a complete entry whose files hold what the stage wrote: `Ok(None)` when
    /// incomplete, an error naming the damaged file otherwise, and the bytes read to check.
    pub fn verified(&self, key: &str) -> Result<Option<(Manifest, u64)>> {
        let Some(manifest) = self.complete(key) else { return Ok(None) };
        let bytes = manifest.verify(&self.entry_dir(key))?;
        Ok(Some((manifest, bytes)))
    }

    /// Empties an entry for a forced rebuild, under its lock: keeps the lock itself.
    pub fn restart(&self, key: &str, input: &KeyInput) -> Result<PathBuf> {
        let dir = self.entry_dir(key);
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.file_name().is_some_and(|n| n == LOCK || n == OWNER) {
                continue;
            }
            let removed = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            removed.with_context(|| format!("removing {}", path.display()))?;
        }
        self.begin(key, input)
    }

    /// Removes a committed entry's resume state (`checkpoint/`, and `checkpoint.tmp/` if a kill
    /// left one).
    pub fn drop_checkpoints(&self, key: &str) {
        let dir = self.entry_dir(key);
        for name in ["checkpoint", "checkpoint.tmp"] {
            let _ = std::fs::remove_dir_all(dir.join(name));
        }
    }

    pub fn key_input(&self, key: &str) -> Option<KeyInput> {
        serde_json::from_slice(&std::fs::read(self.entry_dir(key).join(KEY_INPUT)).ok()?).ok()
    }

    /// Creates the entry directory and records what its key was made of. Half-written files a
    /// killed run left (`atomic_write`'s temporaries) go; its checkpoints stay, to resume from.
    pub fn begin(&self, key: &str, input: &KeyInput) -> Result<PathBuf> {
        let dir = self.entry_dir(key);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating cache entry {}", dir.display()))?;
        for entry in walkdir::WalkDir::new(&dir).into_iter().filter_map(|e| e.ok()) {
            if entry.file_type().is_file() && crate::files::is_temporary(entry.path()) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        atomic_write(&dir.join(KEY_INPUT), &serde_json::to_vec_pretty(input)?)?;
        Ok(dir)
    }

    /// Records the entry as complete: the manifest goes last.
    pub fn commit(&self, manifest: &Manifest) -> Result<()> {
        let dir = self.entry_dir(&manifest.key);
        atomic_write(&dir.join(MANIFEST), &serde_json::to_vec_pretty(manifest)?)?;
        self.touch(&manifest.key);
        Ok(())
    }

    /// Forgets that an entry completed (for `--force`), keeping nothing of its partial work.
    pub fn invalidate(&self, key: &str) -> Result<()> {
        let dir = self.entry_dir(key);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        Ok(())
    }

    /// Marks the entry used now, for `cache gc --keep-days`: the file's modification time, set
    /// in place (no temporary a kill could leave in a complete entry).
    pub fn touch(&self, key: &str) {
        let path = self.entry_dir(key).join(LAST_USED);
        if let Ok(f) = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path) {
            let _ = f.set_modified(SystemTime::now());
        }
    }

    /// Every entry, complete or not.
    pub fn entries(&self) -> Result<Vec<EntryInfo>> {
        let mut out = Vec::new();
        let Ok(read) = std::fs::read_dir(&self.root) else { return Ok(out) };
        for entry in read.filter_map(|e| e.ok()) {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let key = entry.file_name().to_string_lossy().into_owned();
            if key.starts_with('.') {
                continue; // the runner's own bookkeeping, such as `.index/`
            }
            let bytes = walkdir::WalkDir::new(entry.path())
                .into_iter()
                .filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum();
            let last_used = std::fs::metadata(entry.path().join(LAST_USED)).and_then(|m| m.modified()).ok();
            out.push(EntryInfo { manifest: self.complete(&key), key, bytes, last_used });
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Removes every entry whose key is not in `keep` and that was not used within `recent`,
    /// skipping entries a runner is building (their lock is held); with `dry_run` removes
    /// nothing. Returns the entries removed (or that would be).
    pub fn gc(&self, keep: &std::collections::HashSet<String>, recent: std::time::Duration, dry_run: bool) -> Result<Vec<EntryInfo>> {
        let mut removed = Vec::new();
        for entry in self.entries()? {
            let used = entry.last_used.or_else(|| std::fs::metadata(self.entry_dir(&entry.key)).and_then(|m| m.modified()).ok());
            let recently = used.is_some_and(|t| t.elapsed().is_ok_and(|age| age < recent));
            if keep.contains(&entry.key) || recently {
                continue;
            }
            let lock = std::fs::File::open(self.entry_dir(&entry.key).join(LOCK)).ok();
            if lock.as_ref().is_some_and(|f| fs2::FileExt::try_lock_exclusive(f).is_err()) {
                continue; // a runner is building or reading it
            }
            if !dry_run {
                self.invalidate(&entry.key)?;
            }
            removed.push(entry);
        }
        Ok(removed)
    }
}
