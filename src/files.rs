//! Writing and identifying files: the bottom layer every other module may use.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so a
/// reader never sees half a file and a crash leaves the old one.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}{TEMPORARY}{}-{}", std::process::id(), rand::random::<u32>()));
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::anyhow!("{}: cannot write: {e}", path.display())
    })
}

const TEMPORARY: &str = ".tmp-";

/// Whether `path` is one of [`atomic_write`]'s temporaries, which a killed process leaves.
pub fn is_temporary(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.') && n.to_string_lossy().contains(TEMPORARY))
}

/// Size and modification time of a file, for keys that depend on a user's file.
pub fn file_identity(path: &Path) -> String {
    match std::fs::metadata(path) {
        Ok(m) => {
            let mtime = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            format!("{} bytes, mtime {mtime}", m.len())
        }
        Err(_) => "missing".into(),
    }
}

/// The longest name [`check_name`] accepts: a path component, with room for what is added to it.
pub const MAX_NAME: usize = 100;

/// Checks a name that becomes a path component (a pipeline's, a sweep's, a stage's): ASCII
/// letters, digits, `.`, `_` and `-`, not starting with `.`, at most [`MAX_NAME`] characters.
/// So `../x`, `/abs` and a newline cannot take results, runs or the cache index outside their
/// folders or into a script.
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
    if name.is_empty() {
        Err("is empty".into())
    } else if name.len() > MAX_NAME {
        Err(format!("is {} characters long; at most {MAX_NAME}", name.len()))
    } else if let Some(c) = name.chars().find(|c| !allowed(*c)) {
        Err(format!("{name:?} contains {c:?}: a name becomes a folder name, so it may hold only letters, digits, `.`, `_` and `-`"))
    } else if name.starts_with('.') {
        Err(format!("{name:?} starts with `.`: a name becomes a folder name, and may not be hidden or `..`"))
    } else {
        Ok(())
    }
}

/// Whether an error's text is the operating system's "no space left on device" (ENOSPC, which
/// some libraries pass on only as `code: 28`).
pub fn is_disk_full(message: &str) -> bool {
    message.contains("No space left on device") || message.contains("code: 28,") || message.contains("code: 28 ")
}

/// Checks that `dir` can be created and written, before hours of stages would end on it.
pub fn check_writable(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create this folder", dir.display()))?;
    let probe = dir.join(".runner-write-check");
    atomic_write(&probe, b"").with_context(|| format!("{}: cannot write into this folder", dir.display()))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}
