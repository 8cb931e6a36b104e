//! Fingerprints of the source code, so that a cache key follows the code a stage runs, not the
//! crate's version. The build script hashes every file under `src/` and `Cargo.lock` with
//! [`hash_tree`] (it includes this file) and the binary carries the table; each stage kind
//! declares the paths its output depends on (`StageKind::code`), and its key holds their hashes.
//!
//! This file is included by `build.rs`: it uses `std` and `sha2` only.

use std::path::Path;

use sha2::{Digest, Sha256};

/// Every file's hash under `root/src` and of `root/Cargo.lock`, as `(path relative to root, hex
/// SHA-256)`, sorted by path.
pub fn hash_tree(root: &Path) -> std::io::Result<Vec<(String, String)>> {
    let mut files = Vec::new();
    let mut pending = vec![root.join("src")];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.push(root.join("Cargo.lock"));
    let mut out = Vec::new();
    for path in files {
        let rel = path.strip_prefix(root).unwrap_or(&path).to_string_lossy().replace('\\', "/");
        let hash = Sha256::digest(std::fs::read(&path)?);
        out.push((rel, hash.iter().map(|b| format!("{b:02x}")).collect::<String>()));
    }
    out.sort();
    Ok(out)
}

/// The hash of each of `paths` (a file, or a directory: every file under it) in `tree`, 16 hex
/// digits each. A path that matches no file hashes as `missing`, so a typo shows up in a test.
pub fn modules(tree: &[(String, String)], paths: &[&str]) -> Vec<(String, String)> {
    paths
        .iter()
        .map(|p| {
            let mut h = Sha256::new();
            let mut any = false;
            for (file, hash) in tree {
                if file == p || file.starts_with(&format!("{p}/")) {
                    h.update(file.as_bytes());
                    h.update(hash.as_bytes());
                    any = true;
                }
            }
            let hex: String = h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
            (p.to_string(), if any { hex } else { "missing".into() })
        })
        .collect()
}
