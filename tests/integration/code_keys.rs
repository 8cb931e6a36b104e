//! A cache that follows the code: every stage's key holds the hashes of the source its kind
//! runs, so editing a module re-runs exactly the stages that depend on it.

use crate::common;

use std::collections::BTreeSet;
use std::path::Path;

use nvit::fingerprint::{hash_tree, modules};
use nvit::stages::StageKind;

/// Copies `src/` and `Cargo.lock` of this repository into `to`.
fn copy_sources(to: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    common::copy_dir(&root.join("src"), &to.join("src"));
    std::fs::copy(root.join("Cargo.lock"), to.join("Cargo.lock")).unwrap();
}

fn fingerprints(root: &Path) -> Vec<(StageKind, Vec<(String, String)>)> {
    let tree = hash_tree(root).unwrap();
    StageKind::ALL.iter().map(|k| (*k, modules(&tree, &k.code()))).collect()
}

/// The stage kinds whose fingerprint changes when `file` (in a copy of the repository) gets a
/// new line.
fn changed_by_editing(file: &str) -> BTreeSet<&'static str> {
    let dir = tempfile::tempdir().unwrap();
    copy_sources(dir.path());
    let before = fingerprints(dir.path());
    let path = dir.path().join(file);
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("\n// an edit\n");
    std::fs::write(&path, text).unwrap();
    let after = fingerprints(dir.path());
    before.iter().zip(&after).filter(|(a, b)| a.1 != b.1).map(|(a, _)| a.0.name()).collect()
}

#[test]
fn editing_one_module_changes_exactly_the_keys_of_the_stages_that_run_it() {
    let set = |names: &[&'static str]| names.iter().copied().collect::<BTreeSet<_>>();
    assert_eq!(changed_by_editing("src/train/optim.rs"), set(&["train", "hessian_scores", "prune", "distill", "evaluate"]));
    assert_eq!(changed_by_editing("src/report/plots.rs"), set(&["report"]));
    assert_eq!(changed_by_editing("src/prune/latency_table.rs"), set(&["profile_latency", "hessian_scores", "prune"]));
    assert_eq!(changed_by_editing("src/stages/evaluate.rs"), set(&["evaluate"]));
    assert_eq!(changed_by_editing("src/sweep.rs"), set(&[]), "the sweep driver computes nothing a stage writes");
    let all: BTreeSet<&str> = StageKind::names().into_iter().collect();
    assert_eq!(changed_by_editing("src/model/vit.rs"), all);
    assert_eq!(changed_by_editing("Cargo.lock"), all, "a library's version changes every stage");
}

#[test]
fn every_declared_path_exists_and_the_binary_carries_the_tree_it_was_built_from() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (kind, prints) in fingerprints(root) {
        for (path, hash) in prints {
            assert_ne!(hash, "missing", "{}: {path} matches no file", kind.name());
        }
    }
    let built: Vec<(String, String)> = nvit::sources::SOURCES.iter().map(|(p, h)| (p.to_string(), h.to_string())).collect();
    assert_eq!(built, hash_tree(root).unwrap(), "build.rs hashes the same files as the test sees");
}

/// `--dry-run` says which code changed: the cached entry's key was made with another hash of
/// `src/train`.
#[test]
fn a_dry_run_names_the_code_that_changed() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::tiny_pipeline(dir.path(), "");
    let (code, _, err) = common::output(common::runner(dir.path()).args(["run", path.to_str().unwrap()]));
    assert_eq!(code, 0, "{err}");
    let cache = nvit::pipeline::Cache { root: dir.path().join("cache") };
    let p = common::load(&path, &[]);
    let train = common::plan(&p, &cache).stages[0].clone();
    // Pretend the entry was built by a binary whose src/train differed.
    let mut old = train.key_input.clone();
    old.code.iter_mut().filter(|(p, _)| p == "src/train").for_each(|(_, h)| *h = "0123456789abcdef".into());
    let old_key = old.key();
    std::fs::rename(cache.entry_dir(&train.key), cache.entry_dir(&old_key)).unwrap();
    std::fs::write(cache.entry_dir(&old_key).join("key.json"), serde_json::to_vec(&old).unwrap()).unwrap();
    let index = dir.path().join("cache/.index/tiny.json");
    let text = std::fs::read_to_string(&index).unwrap().replace(&train.key, &old_key);
    std::fs::write(&index, text).unwrap();
    let (code, out, err) = common::output(common::runner(dir.path()).args(["run", path.to_str().unwrap(), "--dry-run"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("- changed: code changed: src/train"), "{out}");
}
