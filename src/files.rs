//! Writing and identifying files: the bottom layer every other module may use.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so a
/// reader never sees half a file and a crash leaves the old one. Only a regular file is
/// replaced ([`check_output`]); temporaries of `path` that a killed runner left are removed.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    check_output(path)?;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    remove_abandoned_temporaries(dir, &name);
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

/// Refuses an output path that holds anything but a regular file: a device (`/dev/null`), a
/// FIFO, a socket, a folder, or a link (`/dev/stdout`), which a rename would replace rather
/// than write through. A missing path is fine.
pub fn check_output(path: &Path) -> Result<()> {
    // Nothing there (or a parent that is no folder, which the write itself then names).
    let Ok(meta) = std::fs::symlink_metadata(path) else { return Ok(()) };
    if meta.is_file() {
        return Ok(());
    }
    let what = kind(meta.file_type());
    anyhow::bail!(
        "{}: is {what}; the runner writes its outputs only as regular files, and never replaces anything else\n  hint: name a new or regular file (`--out -` writes to standard output where a command offers it)",
        path.display()
    )
}

/// What a path that is not a regular file is, in words for an error.
fn kind(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_symlink() {
        "a symbolic link"
    } else if t.is_dir() {
        "a folder"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "a device"
    }
}

/// Refuses `out` when it is one of `inputs` (the same file, by device and inode): the output
/// would replace what is being read.
pub fn check_not_input(out: &Path, inputs: &[std::path::PathBuf]) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(target) = std::fs::metadata(out) else { return Ok(()) };
    for input in inputs {
        if std::fs::metadata(input).is_ok_and(|m| (m.dev(), m.ino()) == (target.dev(), target.ino())) {
            anyhow::bail!("{}: is also an input ({}); writing the output there would replace it\n  hint: choose another --out", out.display(), input.display());
        }
    }
    Ok(())
}

/// Removes the temporaries of `name` in `dir` that a killed runner left: those of a process
/// that no longer runs on this machine, untouched for a minute (on a shared folder, another
/// machine's runner with the same process id is still writing within seconds of its start).
fn remove_abandoned_temporaries(dir: &Path, name: &str) {
    let prefix = format!(".{name}{TEMPORARY}");
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = file.strip_prefix(&prefix).and_then(|rest| rest.split('-').next()).and_then(|p| p.parse::<u32>().ok()) else { continue };
        let idle = entry.metadata().ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok()).is_some_and(|age| age.as_secs() >= 60);
        let gone = pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists();
        if idle && gone && entry.file_type().is_ok_and(|t| t.is_file()) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Whether `path` is one of [`atomic_write`]'s temporaries, which a killed process leaves.
pub fn is_temporary(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.') && n.to_string_lossy().contains(TEMPORARY))
}

/// The most the runner reads whole of a text file a user names: a pipeline, a sweep, a
/// `--with` layer, `dims.json`, a latency table.
pub const MAX_TEXT: u64 = 16 << 20;

/// The most it reads of a checkpoint (timm's largest ViTs are a few GB).
pub const MAX_CHECKPOINT: u64 = 64 << 30;

/// `path` read whole, when it is a regular file (links followed) of at most `limit` bytes. A
/// FIFO, a device (`/dev/zero`), a socket or a folder is refused before it is opened, so that
/// nothing blocks or reads without end. The error says what the path is, without the path:
/// callers name the file and what it was for.
pub fn read_limited(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind, Read};
    let size = regular_file_size(path, limit)?;
    let mut bytes = Vec::with_capacity(size as usize);
    // A file that grows while it is read stops at the bound too.
    File::open(path)?.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(Error::new(ErrorKind::InvalidData, format!("grew past the {limit} bytes read of such a file")));
    }
    Ok(bytes)
}

/// The size of `path` when it is a regular file (links followed) of at most `limit` bytes;
/// what it is otherwise, as [`read_limited`] says it. For readers that open the file themselves.
pub fn regular_file_size(path: &Path, limit: u64) -> std::io::Result<u64> {
    use std::io::{Error, ErrorKind};
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(Error::new(ErrorKind::InvalidInput, format!("is {}, not a regular file", kind(meta.file_type()))));
    }
    if meta.len() > limit {
        return Err(Error::new(ErrorKind::InvalidData, format!("is {} bytes, more than the {limit} read of such a file", meta.len())));
    }
    Ok(meta.len())
}

/// What is wrong with `path` as a file the runner will read whole (at most `limit` bytes), for
/// a key's message before any work starts: "`P` does not exist", "`P` is a FIFO, not a regular
/// file", "`P` is ... bytes, more than ...". `None` when it can be read.
pub fn input_problem(path: &Path, limit: u64) -> Option<String> {
    match regular_file_size(path, limit) {
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(format!("`{}` does not exist", path.display())),
        Err(e) => Some(format!("`{}` {}", path.display(), in_words(e.to_string()))),
    }
}

/// [`read_limited`] as UTF-8 text of at most [`MAX_TEXT`] bytes.
pub fn read_text(path: &Path) -> std::io::Result<String> {
    String::from_utf8(read_limited(path, MAX_TEXT)?).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "is not UTF-8 text"))
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

/// An error's text, with the full-disk error that some libraries pass on only as a debug dump
/// (burn's recorder: `Unknown("Io { code: 28, kind: StorageFull, ... }")`) said in words.
pub fn in_words(text: String) -> String {
    if text.contains("code: 28,") || text.contains("code: 28 ") {
        "no space left on device (os error 28)".into()
    } else {
        text
    }
}

/// Checks that `dir` can be created and written, before hours of stages would end on it.
pub fn check_writable(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create this folder", dir.display()))?;
    let probe = dir.join(".runner-write-check");
    atomic_write(&probe, b"").with_context(|| format!("{}: cannot write into this folder", dir.display()))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_dumped_by_a_library_is_said_in_words() {
        let dump = r#"Unknown("Io { code: 28, kind: StorageFull, message: \"No space left on device\" }")"#.to_string();
        assert_eq!(in_words(dump), "no space left on device (os error 28)");
        assert_eq!(in_words("a.csv: cannot write: No space left on device (os error 28)".into()), "a.csv: cannot write: No space left on device (os error 28)");
        assert_eq!(in_words("other".into()), "other");
    }
}
