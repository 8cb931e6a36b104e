//! Gradients held to PyTorch, in f32 as the runner computes: see `parity/mod.rs`.

use crate::common;
use crate::parity;

use burn::backend::{Autodiff, NdArray};

type B = Autodiff<NdArray<f32>>;

#[test]
fn hessian_saliency_of_every_unit_matches_pytorch() {
    let _rng = common::rng_turn();
    parity::saliency_matches::<B>(1e-4);
}

/// 1e-3: f32 rounding alone exceeds 1e-4 on raw gradients, for PyTorch too (its own f32
/// gradients of this loss are up to 6.1e-4 off its f64 ones by this measure; ours 6.8e-4).
#[test]
fn training_loss_and_every_parameter_gradient_match_pytorch() {
    let _rng = common::rng_turn();
    parity::gradients_match::<B>(1e-3);
}
