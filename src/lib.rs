//! NViT: global structural pruning of Vision Transformers with a Hessian-aware saliency and
//! latency-aware regularization (Yang et al., CVPR 2023), driven by TOML pipelines.
//!
//! The `runner` binary is a thin layer over [`cli`] and [`commands`]; a pipeline file is read by
//! [`config`], planned and executed by [`pipeline`] with its stages from [`stages`], on the
//! model of [`model`] and the data of [`data`].

pub mod backend;
pub mod bench;
pub mod cli;
pub mod commands;
pub mod config;
pub mod data;
pub mod export;
pub mod files;
pub mod fingerprint;
pub mod interrupt;
pub mod machine;
pub mod manifest;
pub mod model;
pub mod onnxruntime;
pub mod parity;
pub mod pipeline;
pub mod predict;
pub mod protobuf;
pub mod prune;
pub mod report;
pub mod runlog;
pub mod stages;
pub mod suggest;
pub mod sweep;
pub mod train;
pub mod world;

/// The source tree this binary was built from, hashed by `build.rs` (see [`fingerprint`]).
pub mod sources {
    include!(concat!(env!("OUT_DIR"), "/sources.rs"));
}
