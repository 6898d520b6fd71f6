//! Fused CPU kernels for the training step, each a candle `CustomOp` with its own backward so
//! that autograd still runs through them:
//! - `attention`: causal grouped-query attention without repeated K/V and without keeping the
//!   [T, T] probabilities (recomputed row by row in backward, flash-style);
//! - `logprob`: log-probabilities of the target tokens, computed in row chunks over the whole
//!   vocabulary without materialising [tokens, vocab] logits, forward and backward;
//! - `swiglu`: silu(gate)·up in one pass, both gradients in one pass.
//!
//! `model::llama` keeps the readable composed model; it routes here on CPU f32 when its fused
//! kernels are on (the default), and tests/fast_train.rs holds both paths equal.
pub mod attention;
pub mod logprob;
pub mod swiglu;

pub use attention::attention;
pub use logprob::target_logprobs;
pub use swiglu::swiglu;

use super::ops::f32_slice as slice;
use candle_core::{DType, Device, Result, Tensor};

/// Whether `t` can take the fused CPU kernels.
pub fn applies(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32
}

/// A tensor's elements in row-major order (a copy; used in backward passes).
fn values(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// Σ a⊙b with eight independent partial sums, so that the compiler vectorises it.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let mut s: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((acc, &x), &y) in acc.iter_mut().zip(x).zip(y) {
            *acc += x * y;
        }
    }
    s += ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    s
}

/// y += alpha·x.
#[inline]
fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}
