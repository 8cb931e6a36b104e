use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use nvit::cli::{dims, BenchCommand, CacheCommand, Cli, Command};
use nvit::commands::{self, RunArgs};
use nvit::config::{ConfigErrors, Overrides};
use nvit::pipeline::Cache;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<ConfigErrors>() => {
            eprintln!("error: the pipeline is invalid:\n{e}");
            ExitCode::from(2)
        }
        Err(e) => {
            use nvit::files::in_words;
            eprintln!("error: {}", in_words(e.to_string()));
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {}", in_words(cause.to_string()));
            }
            if e.chain().any(|c| nvit::files::is_disk_full(&c.to_string())) {
                eprintln!("  hint: the disk is full: free space (`runner cache gc`), or set RUNNER_CACHE to a disk with room; run the same command again to resume");
            }
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let cache = Cache::from_env()?;
    match cli.command {
        Command::Run { pipeline, with, mut set, backend, devices, force, dry_run, ranks, rank, coordinator, slurm, emit_slurm, nodes, gpus_per_node } => {
            if let Some(b) = backend {
                set.push(format!("pipeline.backend={b}"));
            }
            if let Some(d) = devices {
                set.push(format!("pipeline.devices={d:?}"));
            }
            if emit_slurm {
                let mut args: Vec<String> = with.iter().flat_map(|w| ["--with".to_string(), w.display().to_string()]).collect();
                args.extend(set.iter().flat_map(|s| ["--set".to_string(), s.clone()]));
                args.extend(force.iter().flat_map(|f| ["--force".to_string(), f.clone()]));
                let p = commands::load(&pipeline, &Overrides { with, set, env: true })?;
                let runner = std::env::current_exe()?;
                print!("{}", nvit::sweep::run_slurm_script(&p, &args, nodes.unwrap_or(1), gpus_per_node, &runner, &cache)?);
                return Ok(());
            }
            nvit::interrupt::install();
            let world = nvit::world::World::from_args(&nvit::world::WorldArgs { ranks, rank, coordinator, slurm })?;
            let overrides = Overrides { with, set, env: true };
            commands::run(&RunArgs { pipeline, overrides, force, dry_run, world }, &cache)
        }
        Command::Sweep { sweep, with, shard, devices, dry_run, force, emit_slurm } => {
            let runner = std::env::current_exe()?;
            if emit_slurm {
                print!("{}", nvit::sweep::slurm_script(&sweep, &with, &runner, &cache)?);
                return Ok(());
            }
            let shard = shard.as_deref().map(nvit::sweep::parse_shard).transpose()?;
            let args = nvit::sweep::SweepArgs { sweep, with, shard, devices, dry_run, force, runner, started: chrono::Utc::now() };
            print!("{}", nvit::sweep::run(&args, &cache)?);
            Ok(())
        }
        Command::Show { pipeline, with, set } => {
            print!("{}", commands::show(&pipeline, &Overrides { with, set, env: true })?);
            Ok(())
        }
        Command::Export { pipeline, stage, format, out, with, set } => {
            let line = commands::export(&pipeline, &Overrides { with, set, env: true }, &stage, format, &out, &cache)?;
            // With `--out -` the model itself is on standard output.
            if out == std::path::Path::new("-") {
                eprint!("{line}");
            } else {
                print!("{line}");
            }
            Ok(())
        }
        Command::Predict { pipeline, stage, images, top, batch, out, backend, with, set } => {
            let overrides = Overrides { with, set, env: true };
            let args = commands::PredictArgs { pipeline: &pipeline, overrides: &overrides, stage: &stage, images: &images, batch, top, out: out.as_deref(), backend };
            print!("{}", commands::predict(&args, &cache)?);
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
        Command::Bench { command: BenchCommand::Kernels { backend, attention, layer_norm, steps, threads, out } } => {
            let attention = attention.iter().map(|s| dims::<4>(s, "--attention")).collect::<anyhow::Result<_>>()?;
            let layer_norm = layer_norm.iter().map(|s| dims::<3>(s, "--layer-norm")).collect::<anyhow::Result<_>>()?;
            let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            print!("{}", nvit::bench::kernels(&nvit::bench::BenchKernels { backend, attention, layer_norm, steps, threads, out })?);
            Ok(())
        }
        Command::Bench { command: BenchCommand::Latency { dense, pruned, between, table, grid, batch, repeats, rounds, pairs, backend, runtime, onnxruntime_provider, threads, out } } => {
            let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let args = nvit::bench::BenchLatency { dense, pruned, between, table, grid, batch, repeats, rounds, pairs, backend, runtime, onnxruntime_provider, threads, out };
            print!("{}", nvit::bench::latency(&args)?);
            Ok(())
        }
        Command::Bench { command: BenchCommand::Parity { backend, against, device, tolerance, out } } => {
            print!("{}", nvit::parity::bench(&nvit::parity::BenchParity { backend, against, device, tolerance, out })?);
            Ok(())
        }
        Command::Bench { command: BenchCommand::Loader { root, images, size, batch, out } } => {
            print!("{}", nvit::bench::loader(root.as_deref(), images, size, batch, &out)?);
            Ok(())
        }
        Command::Bench { command: BenchCommand::Model { model, batch, steps, backend, devices, precision, out } } => {
            let out = out.unwrap_or_else(|| PathBuf::from(format!("results/bench/model-{backend}.csv")));
            let config = nvit::bench::resolve_model(&model)?;
            print!("{}", nvit::bench::model(&model, &nvit::bench::BenchModel { config, batch, steps, backend, devices, precision }, &out)?);
            Ok(())
        }
        Command::Bench { command: BenchCommand::VsPytorch { models, backends, device, precision, steps, threads, python, script, out } } => {
            let models = models
                .iter()
                .map(|m| match m.rsplit_once(':').map(|(spec, b)| (spec, b.parse::<usize>())) {
                    Some((spec, Ok(batch))) if batch > 0 => Ok((spec.to_string(), batch)),
                    _ => Err(anyhow::anyhow!("--models: `{m}` is not MODEL:BATCH (e.g. deit-tiny-distilled:16)")),
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let args = nvit::bench::VsPytorch { models, backends, device, precision, steps, threads, python, script, out };
            print!("{}", nvit::bench::vs_pytorch(&args)?);
            Ok(())
        }
        Command::Bench { command: BenchCommand::Onnxruntime { pair, batches, backend, device, steps, threads, python, script, out } } => {
            let pairs = pair.chunks(2).map(|p| (p[0].clone(), p[1].clone())).collect();
            let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let args = nvit::bench::VsOnnxruntime { pairs, batches, backend, device, steps, threads, python, script, out };
            print!("{}", nvit::bench::vs_onnxruntime(&args)?);
            Ok(())
        }
        Command::Cache { command: CacheCommand::Gc { pipelines, keep_days, dry_run } } => {
            print!("{}", commands::cache_gc(&cache, &pipelines, keep_days, dry_run)?);
            Ok(())
        }
    }
}
