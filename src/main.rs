use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nvit::commands::{self, RunArgs};
use nvit::config::{BackendKind, ConfigErrors, Overrides};
use nvit::pipeline::Cache;

/// Global structural pruning of Vision Transformers (NViT), driven by TOML pipelines.
#[derive(Parser)]
#[command(name = "runner", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline: stages in order, each skipped when cached.
    Run {
        pipeline: PathBuf,
        /// Layer a TOML file over the pipeline, e.g. `--with pipelines/smoke.toml` (repeatable).
        #[arg(long = "with", value_name = "FILE")]
        with: Vec<PathBuf>,
        /// Override a value: `--set stages.train.lr=1e-3` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Backend: ndarray, wgpu or cuda (same as --set pipeline.backend=...).
        #[arg(long, value_enum)]
        backend: Option<Backend>,
        /// Device index (same as --set pipeline.device=N).
        #[arg(long)]
        device: Option<usize>,
        /// Re-run this stage even if cached (repeatable; `all` for every stage).
        #[arg(long, value_name = "STAGE|all")]
        force: Vec<String>,
        /// Print, per stage, whether it is cached or will run and why; run nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the resolved configuration and where each value came from.
    Show {
        pipeline: PathBuf,
        #[arg(long = "with", value_name = "FILE")]
        with: Vec<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// List every stage kind with its keys, types, defaults and docs.
    Stages,
    /// Inspect or clean the stage cache (`RUNNER_CACHE`, default `.runner-cache/`).
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Benchmarks whose output is committed under results/bench/.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Loader throughput (decode + train transform) on an ImageFolder of JPEGs.
    Loader {
        /// An ImageFolder root (with train/); default: generate JPEGs in a temporary folder.
        #[arg(long)]
        root: Option<PathBuf>,
        #[arg(long, default_value_t = 2000)]
        images: usize,
        #[arg(long, default_value_t = 224)]
        size: u32,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        #[arg(long, default_value = "results/bench/loader.csv")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum CacheCommand {
    /// List cached artifacts: key, stage, size, last use.
    Ls,
    /// Remove artifacts that no pipeline file references.
    Gc {
        /// Where the pipeline files are.
        #[arg(long, default_value = "pipelines")]
        pipelines: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Backend {
    Ndarray,
    Wgpu,
    Cuda,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<ConfigErrors>() => {
            eprintln!("error: the pipeline is invalid:\n{e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let cache = Cache::from_env();
    match cli.command {
        Command::Run { pipeline, with, mut set, backend, device, force, dry_run } => {
            if let Some(b) = backend {
                let kind = match b {
                    Backend::Ndarray => BackendKind::Ndarray,
                    Backend::Wgpu => BackendKind::Wgpu,
                    Backend::Cuda => BackendKind::Cuda,
                };
                set.push(format!("pipeline.backend={kind}"));
            }
            if let Some(d) = device {
                set.push(format!("pipeline.device={d}"));
            }
            let overrides = Overrides { with, set, env: true };
            commands::run(&RunArgs { pipeline, overrides, force, dry_run }, &cache)
        }
        Command::Show { pipeline, with, set } => {
            print!("{}", commands::show(&pipeline, &Overrides { with, set, env: true })?);
            Ok(())
        }
        Command::Stages => {
            print!("{}", commands::stages());
            Ok(())
        }
        Command::Cache { command: CacheCommand::Ls } => {
            print!("{}", commands::cache_ls(&cache)?);
            Ok(())
        }
        Command::Bench { command: BenchCommand::Loader { root, images, size, batch, out } } => {
            print!("{}", commands::bench_loader(root.as_deref(), images, size, batch, &out)?);
            Ok(())
        }
        Command::Cache { command: CacheCommand::Gc { pipelines } } => {
            print!("{}", commands::cache_gc(&cache, &pipelines)?);
            Ok(())
        }
    }
}
