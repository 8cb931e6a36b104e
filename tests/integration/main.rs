//! Every integration test in one binary (`cargo test --release --test integration`; one file a
//! topic, filtered by module: `-- prune::`). One binary links once and instantiates the
//! library's generic code for the CPU backend once: as one binary per file, they took 13 of CI's
//! minutes to build on 2 cores (docs/contributing.md). The f64 gradient parity is a binary of its own
//! (`tests/gradient_parity_f64.rs`): one float type per process.
//!
//! The tests share one process, and so burn-ndarray's one random generator: a test that seeds it
//! or draws from it in this process (initializes a model, runs a pipeline with
//! `common::execute`) holds `common::rng_turn()` for its whole body, so another test's draws
//! never land between its seed and its use. Tests that run the `runner` binary need not.

mod common;
#[path = "../parity/mod.rs"]
mod parity;

mod backends;
mod bad_inputs;
mod cache;
mod cli;
mod code_keys;
mod config_errors;
mod data_parallel;
#[cfg(feature = "collective")]
mod distributed;
mod docs;
mod gradient_parity;
mod nvit_pipelines;
mod onnx_export;
mod onnxruntime;
mod prune;
mod pytorch_loader;
mod resume;
mod swin_parity;
mod swin_pipeline;
mod sweep;
mod timm_parity;
mod vit_variants;
