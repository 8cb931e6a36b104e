//! Gradients held to PyTorch in f64, where rounding leaves only the method: see
//! `parity/mod.rs`. A test binary of its own: burn 0.21 keys a device's default float dtype by
//! the device's type, which `NdArray<f32>` and `NdArray<f64>` share, so the two precisions in
//! one process would make each other's zeros in the wrong dtype.

mod parity;

use burn::backend::{Autodiff, NdArray};

type B = Autodiff<NdArray<f64>>;

#[test]
fn hessian_saliency_of_every_unit_matches_pytorch() {
    parity::saliency_matches::<B>(1e-4);
}

#[test]
fn training_loss_and_every_parameter_gradient_match_pytorch() {
    parity::gradients_match::<B>(1e-4);
}
