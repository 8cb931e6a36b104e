//! The run log and progress bars: a stage reports through them and never prints itself.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The run log: every line goes to `runner.log` in the run directory and to stderr.
pub struct RunLog {
    file: Option<Mutex<File>>,
    pub path: Option<PathBuf>,
    quiet: bool,
}

impl RunLog {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::options().create(true).append(true).open(path).with_context(|| format!("opening log {}", path.display()))?;
        Ok(Self { file: Some(Mutex::new(file)), path: Some(path.to_path_buf()), quiet: false })
    }

    /// A log to stderr only: a rank other than 0, which writes no file.
    pub fn stderr() -> Self {
        Self { file: None, path: None, quiet: false }
    }

    /// A log that writes nowhere, for tests and dry runs.
    pub fn silent() -> Self {
        Self { file: None, path: None, quiet: true }
    }

    /// The run directory (`runs/<pipeline>/<stamp>/`) the log is in, where a run's curves go;
    /// `None` for a log without a file.
    pub fn run_dir(&self) -> Option<&Path> {
        self.path.as_deref().and_then(Path::parent)
    }

    pub fn info(&self, message: &str) {
        let line = format!("{} {message}", chrono::Local::now().format("%H:%M:%S"));
        if let Some(f) = &self.file {
            let _ = writeln!(f.lock().unwrap(), "{line}");
        }
        if !self.quiet {
            eprintln!("{line}");
        }
    }

    /// A progress bar for `steps` steps of `stage`; it also logs a line every 30 s, so a run
    /// without a terminal (CI, nohup) shows progress in the log too.
    pub fn progress(&self, stage: &str, steps: u64) -> Progress<'_> {
        let bar = ProgressBar::with_draw_target(Some(steps), if self.quiet { ProgressDrawTarget::hidden() } else { ProgressDrawTarget::stderr() });
        bar.set_style(
            ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg} (eta {eta})")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(stage.to_string());
        Progress { bar, log: self, stage: stage.to_string(), start: Instant::now(), last_log: Instant::now() }
    }
}

pub struct Progress<'a> {
    bar: ProgressBar,
    log: &'a RunLog,
    stage: String,
    start: Instant,
    last_log: Instant,
}

impl Progress<'_> {
    pub fn set_position(&mut self, pos: u64) {
        self.bar.set_position(pos);
    }

    /// Shows `message` beside the bar without advancing it.
    pub fn set_message(&self, message: &str) {
        self.bar.set_message(message.to_string());
    }

    /// Advances one step and shows `message` (loss, accuracy, throughput).
    pub fn step(&mut self, message: &str) {
        let pos = self.bar.position() + 1;
        self.update(pos, message);
    }

    /// Moves to `pos` and shows `message`; logs a line every 30 s.
    pub fn update(&mut self, pos: u64, message: &str) {
        self.bar.set_position(pos);
        self.bar.set_message(message.to_string());
        if self.last_log.elapsed() > Duration::from_secs(30) {
            self.last_log = Instant::now();
            let (pos, len) = (self.bar.position(), self.bar.length().unwrap_or(0));
            let eta = if pos > 0 { self.start.elapsed().as_secs_f64() / pos as f64 * len.saturating_sub(pos) as f64 } else { 0.0 };
            self.bar.suspend(|| self.log.info(&format!("{}: step {pos}/{len} {message} (eta {:.0} s)", self.stage, eta)));
        }
    }

    /// Logs a line without tearing the bar.
    pub fn println(&self, message: &str) {
        self.bar.suspend(|| self.log.info(message));
    }

    pub fn finish(self) {
        self.bar.finish_and_clear();
    }
}
