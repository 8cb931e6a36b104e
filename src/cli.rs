//! The command line: `runner`'s subcommands and flags, parsed by clap. `main.rs` dispatches
//! them; the documentation test parses every command the README and docs/ quote.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::backend::BackendKind;
use crate::commands;
use crate::train::Precision;

/// Global structural pruning of Vision Transformers (NViT), driven by TOML pipelines.
#[derive(Parser)]
#[command(name = "runner", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run a pipeline: stages in order, each skipped when cached.
    Run {
        pipeline: PathBuf,
        /// Layer a TOML file over the pipeline, e.g. `--with pipelines/smoke.toml` (repeatable).
        #[arg(long = "with", value_name = "FILE")]
        with: Vec<PathBuf>,
        /// Override a value: `--set stages.train.lr=1e-3` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Backend: flex (the default), ndarray, tch, wgpu or cuda (same as --set pipeline.backend=...).
        #[arg(long, value_enum)]
        backend: Option<BackendKind>,
        /// Device indices, e.g. `--devices 0,1` to train data-parallel on two GPUs (same as
        /// --set pipeline.devices=[0,1]).
        #[arg(long, value_delimiter = ',')]
        devices: Option<Vec<usize>>,
        /// Re-run this stage even if cached (repeatable; `all` for every stage).
        #[arg(long, value_name = "STAGE|all")]
        force: Vec<String>,
        /// Print, per stage, whether it is cached or will run and why; run nothing.
        #[arg(long)]
        dry_run: bool,
        /// Train with this many processes (ranks), one per device, on one or many machines:
        /// every rank runs the same command with its own --rank (docs/distributed.md).
        #[arg(long, value_name = "N")]
        ranks: Option<usize>,
        /// This process's rank, from 0 to --ranks - 1; rank 0 writes the cache and the results.
        #[arg(long, value_name = "R")]
        rank: Option<usize>,
        /// Where the ranks meet: host:port of rank 0's machine (rank R also listens on port + 1 + R).
        #[arg(long, value_name = "HOST:PORT")]
        coordinator: Option<String>,
        /// Take the ranks from Slurm's variables (as a task of `srun`).
        #[arg(long, conflicts_with_all = ["ranks", "rank"])]
        slurm: bool,
        /// Print an sbatch script that runs this pipeline on --nodes machines, --gpus-per-node
        /// ranks on each; run nothing.
        #[arg(long, requires = "nodes", conflicts_with_all = ["ranks", "rank", "slurm", "dry_run", "devices"])]
        emit_slurm: bool,
        /// Machines of the --emit-slurm job.
        #[arg(long, value_name = "N", requires = "emit_slurm")]
        nodes: Option<usize>,
        /// Ranks (GPUs) per machine of the --emit-slurm job.
        #[arg(long, value_name = "G", default_value_t = 1, requires = "emit_slurm")]
        gpus_per_node: usize,
    },
    /// Run a sweep: a base pipeline over a grid of `--set` values, one worker per device, the
    /// stage cache shared; writes one combined table (see pipelines/sweeps/).
    Sweep {
        sweep: PathBuf,
        /// Layer a TOML file over every point's pipeline, after the sweep file's `with`.
        #[arg(long = "with", value_name = "FILE")]
        with: Vec<PathBuf>,
        /// Run only the I-th of N shares of the points (1-based), e.g. a Slurm array task's.
        #[arg(long, value_name = "I/N")]
        shard: Option<String>,
        /// Device indices for the local workers, overriding the sweep file's `devices`.
        #[arg(long, value_delimiter = ',')]
        devices: Option<Vec<usize>>,
        /// Print the points, what each would run, and the workers; run nothing.
        #[arg(long)]
        dry_run: bool,
        /// Re-run this stage of every point even if cached (repeatable), e.g. to re-measure.
        #[arg(long, value_name = "STAGE|all")]
        force: Vec<String>,
        /// Print an sbatch array script that runs the sweep's shards on a Slurm cluster.
        #[arg(long, conflicts_with_all = ["shard", "dry_run", "force"])]
        emit_slurm: bool,
    },
    /// Print the resolved configuration and where each value came from.
    Show {
        pipeline: PathBuf,
        #[arg(long = "with", value_name = "FILE")]
        with: Vec<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Copy a stage's model out of the cache (the stage must have run as the pipeline says):
    /// `runner export pipelines/quickstart.toml --stage distill --out model/`, or as ONNX with
    /// `--format onnx --out model.onnx`.
    Export {
        pipeline: PathBuf,
        /// The stage whose model to export (train, prune, distill, load_pretrained).
        #[arg(long)]
        stage: String,
        #[arg(long, value_enum, default_value = "safetensors")]
        format: crate::export::Format,
        /// The folder to write into (safetensors, created if missing) or the file (onnx; `-`
        /// for standard output). Only a new or regular file is written over.
        #[arg(long)]
        out: PathBuf,
        #[arg(long = "with", value_name = "FILE")]
        with: Vec<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// A stage's model on images: top classes and probabilities per image as CSV, with the
    /// evaluation transform of the pipeline's dataset and on its backend:
    /// `runner predict pipelines/quickstart.toml --stage distill photos/`.
    Predict {
        pipeline: PathBuf,
        /// The stage whose model to run (train, prune, distill, load_pretrained).
        #[arg(long)]
        stage: String,
        /// Image files (.jpeg, .jpg, .png) and folders of them (searched recursively).
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// Classes per image, most probable first.
        #[arg(long, default_value_t = 5, value_parser = at_least_one())]
        top: usize,
        #[arg(long, default_value_t = 64, value_parser = at_least_one())]
        batch: usize,
        /// Write the CSV here instead of to standard output (`-`). Only a new or regular file
        /// that is not one of the images is written over.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Backend to run on (default: the pipeline's, on its first device); the model is the
        /// one the pipeline's own backend trained.
        #[arg(long, value_enum)]
        backend: Option<BackendKind>,
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

/// `AxBxC...`, `N` sizes, each at least 1.
pub fn dims<const N: usize>(text: &str, flag: &str) -> anyhow::Result<[usize; N]> {
    let sizes: Vec<usize> = text.split('x').map(|d| d.parse::<usize>().ok().filter(|&d| d > 0)).collect::<Option<_>>().unwrap_or_default();
    sizes.try_into().map_err(|_| anyhow::anyhow!("{flag}: `{text}` is not {N} sizes of at least 1 joined by x (e.g. {})", ["16"; N].join("x")))
}

/// A count that must be at least 1, refused by the parser with the flag's name.
fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Training and inference images/s of a model on synthetic images (DeiT-B by default).
    Model {
        /// A model preset (deit-base-distilled, deit-small-distilled, deit-tiny-distilled, ...)
        /// or a pipeline file whose [model] to take (pipelines/quickstart.toml).
        #[arg(long, alias = "preset", default_value = "deit-base-distilled")]
        model: String,
        #[arg(long, default_value_t = 64, value_parser = at_least_one())]
        batch: usize,
        /// Timed steps, after one untimed.
        #[arg(long, default_value_t = 10, value_parser = at_least_one())]
        steps: usize,
        #[arg(long, value_enum, default_value = "flex")]
        backend: BackendKind,
        /// Devices to train on, data-parallel: `--devices 0,1`.
        #[arg(long, value_delimiter = ',', default_value = "0")]
        devices: Vec<usize>,
        /// f16 or bf16 compute on f32 weights (GPU backends only).
        #[arg(long, value_enum)]
        precision: Option<Precision>,
        /// Default: results/bench/model-<backend>.csv.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The same models on the runner and on PyTorch + timm (benches/torch_reference.py), one
    /// after the other in one run: images/s and their ratio, into
    /// results/bench/vs-pytorch-<device>.csv.
    VsPytorch {
        /// `MODEL:BATCH` pairs; a model is a preset or a pipeline file.
        #[arg(long, value_delimiter = ',', default_value = "deit-tiny-distilled:16,deit-small-distilled:16,deit-base-distilled:8,pipelines/quickstart.toml:128")]
        models: Vec<String>,
        /// The runner's backends to measure, each against the same PyTorch run (ndarray and
        /// flex are in every build; add tch in a build with it).
        #[arg(long, value_delimiter = ',', default_value = "ndarray,flex")]
        backends: Vec<BackendKind>,
        /// The device index (a GPU's; PyTorch then runs on cuda:N).
        #[arg(long, default_value_t = 0)]
        device: usize,
        #[arg(long, value_enum)]
        precision: Option<Precision>,
        /// Timed steps, after one untimed.
        #[arg(long, default_value_t = 5, value_parser = at_least_one())]
        steps: usize,
        /// Threads for both sides. Default: every core.
        #[arg(long)]
        threads: Option<usize>,
        /// A Python with torch and timm installed.
        #[arg(long, default_value = "python3")]
        python: PathBuf,
        #[arg(long, default_value = "benches/torch_reference.py")]
        script: PathBuf,
        /// Default: results/bench/vs-pytorch-<device>.csv (`cpu`, or the GPU's model).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Dense and pruned models exported as ONNX and run in ONNX Runtime
    /// (benches/onnxruntime_bench.py) beside the runner's own inference, at each batch size:
    /// images/s and the pruned model's speedup in each, into
    /// results/bench/onnxruntime-<device>.csv.
    Onnxruntime {
        /// `--pair DENSE PRUNED` (repeatable): each a preset, a pipeline file or a dims.json
        /// (or a `runner export` folder). Randomly initialized: speed does not depend on values.
        #[arg(long, num_args = 2, value_names = ["DENSE", "PRUNED"], default_values = ["pipelines/quickstart.toml", "benches/quickstart-nvit50.json", "deit-base-distilled", "benches/nvit-base-like.json"])]
        pair: Vec<String>,
        #[arg(long, value_delimiter = ',', default_value = "1,8,32", value_parser = at_least_one())]
        batches: Vec<usize>,
        /// The runner's backend (ONNX Runtime runs on the CPU, or CUDA for a GPU backend).
        #[arg(long, value_enum, default_value = "flex")]
        backend: BackendKind,
        #[arg(long, default_value_t = 0)]
        device: usize,
        /// Timed runs per batch size, after one untimed.
        #[arg(long, default_value_t = 10, value_parser = at_least_one())]
        steps: usize,
        /// Threads for both runtimes. Default: every core.
        #[arg(long)]
        threads: Option<usize>,
        /// A Python with onnxruntime and numpy installed.
        #[arg(long, default_value = "python3")]
        python: PathBuf,
        #[arg(long, default_value = "benches/onnxruntime_bench.py")]
        script: PathBuf,
        /// Default: results/bench/onnxruntime-<device>.csv (`cpu`, or the GPU's model).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The model's fused training operations (attention, LayerNorm) against the composites
    /// they replace, forward and backward, at each shape: into
    /// results/bench/kernels-<backend>-<device>.csv.
    Kernels {
        #[arg(long, value_enum, default_value = "tch")]
        backend: BackendKind,
        /// `BATCHxHEADSxTOKENSxWIDTH` shapes of Q, K and V: the quickstart's, DeiT-S's at 50 to
        /// 198 tokens, DeiT-B's.
        #[arg(long, value_delimiter = ',', default_value = "64x4x18x16,16x6x50x64,16x6x98x64,16x6x128x64,16x6x198x64,8x12x198x64")]
        attention: Vec<String>,
        /// `BATCHxTOKENSxEMBED` shapes: the quickstart's, DeiT-S's, DeiT-B's.
        #[arg(long, value_delimiter = ',', default_value = "64x18x64,16x198x384,8x198x768")]
        layer_norm: Vec<String>,
        /// Timed passes, after one untimed.
        #[arg(long, default_value_t = 20, value_parser = at_least_one())]
        steps: usize,
        /// Default: every core.
        #[arg(long)]
        threads: Option<usize>,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// How far the latency table's estimate can be trusted on this device: for a dense DeiT
    /// and pruned width sets, the estimated latency ratio beside the blocks timed alone and the
    /// whole model measured against the dense one in pairs, into
    /// results/bench/latency-<backend>-<device>.csv (the table profiled beside it, .table.json).
    Latency {
        /// A preset, a pipeline file or a dims.json.
        #[arg(long, default_value = "deit-base-distilled")]
        dense: String,
        /// Pruned width sets of the dense model (dims.json files or `runner export` folders).
        #[arg(long, value_delimiter = ',', default_value = "benches/nvit-base-like.json")]
        pruned: Vec<String>,
        /// Width sets added evenly between the dense model and the first pruned one.
        #[arg(long, default_value_t = 2)]
        between: usize,
        /// Import this latency table (reference JSON layout) instead of profiling one.
        #[arg(long)]
        table: Option<PathBuf>,
        /// The grid to profile the table on, as profile_latency's `grid`.
        #[arg(long, value_enum, default_value = "spanning")]
        grid: crate::stages::profile_latency::GridChoice,
        #[arg(long, default_value_t = 16, value_parser = at_least_one())]
        batch: usize,
        /// Timed passes per block and per model, after one untimed.
        #[arg(long, default_value_t = 3, value_parser = at_least_one())]
        repeats: usize,
        /// Times the whole grid is profiled; each point's median is kept.
        #[arg(long, default_value_t = 1, value_parser = at_least_one())]
        rounds: usize,
        /// Alternated pairs of each pruned set against the dense model.
        #[arg(long, default_value_t = 10, value_parser = at_least_one())]
        pairs: usize,
        #[arg(long, value_enum, default_value = "flex")]
        backend: BackendKind,
        /// Where blocks and models are timed: the backend, or ONNX Runtime (each exported to
        /// ONNX as `runner export` writes it; `pip install onnxruntime`).
        #[arg(long, value_enum, default_value = "backend")]
        runtime: crate::onnxruntime::Runtime,
        /// With --runtime onnxruntime: its execution provider.
        #[arg(long, value_enum, default_value = "cpu")]
        onnxruntime_provider: crate::onnxruntime::Provider,
        /// Default: every core.
        #[arg(long)]
        threads: Option<usize>,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Whether a backend computes what another does: one forward and backward pass of a small
    /// DeiT (widths as after pruning) with the same weights and batch on both, f32; the loss,
    /// logits and gradients compared relative to each tensor's scale, into a CSV. Exits with an
    /// error when any is beyond the tolerance (after writing the CSV).
    Parity {
        /// The backend to check, e.g. cuda.
        #[arg(long, value_enum)]
        backend: BackendKind,
        /// The reference backend (a CPU one).
        #[arg(long, value_enum, default_value = "flex")]
        against: BackendKind,
        /// The checked backend's device index.
        #[arg(long, default_value_t = 0)]
        device: usize,
        /// The largest relative difference allowed per tensor.
        #[arg(long, default_value_t = 1e-4)]
        tolerance: f32,
        #[arg(long, default_value = "results/bench/parity.csv")]
        out: PathBuf,
    },
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
pub enum CacheCommand {
    /// List cached artifacts: key, stage, size, last use.
    Ls,
    /// Remove entries that no pipeline or sweep point under `--pipelines` references and that
    /// were not used recently.
    Gc {
        /// Where the pipeline and sweep files are.
        #[arg(long, default_value = "pipelines")]
        pipelines: PathBuf,
        /// Keep entries used within this many days, referenced or not (0: keep only referenced).
        #[arg(long, default_value_t = 7.0, value_parser = commands::parse_keep_days)]
        keep_days: f64,
        /// Print what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
}
