//! Fused CPU kernels for the training step, each a candle `CustomOp` with its own backward so
//! that autograd still runs through them:
//! - `attention`: causal grouped-query attention without repeated K/V and without keeping the
//!   [T, T] probabilities (recomputed row by row in backward, flash-style);
//! - `logprob`: log-probabilities of the target tokens, computed in row chunks over the whole
//!   vocabulary without materialising [tokens, vocab] logits, forward and backward;
//! - `swiglu`: silu(gate)·up in one pass, both gradients in one pass;
//! - `lora_linear`: a LoRA layer on a frozen base as one op (the base's products on the
//!   engine's packed weights, the adapter's by gemm);
//! - `linear`: a layer whose weight trains (full fine-tuning), x·Wᵀ with both gradients
//!   written in their own layouts;
//! - `block`: a whole decoder layer (norms, projections, rotary embeddings, attention, SwiGLU,
//!   residuals) as one op, its backward written out by hand from the same kernels.
//!
//! `model::llama` keeps the readable composed model; it routes here on CPU f32 when its fused
//! kernels are on (the default), and tests/fast_train.rs holds both paths equal.
pub mod attention;
pub mod block;
pub mod linear;
pub mod logprob;
pub mod swiglu;

pub use attention::attention;
pub(crate) use block::block;
pub use block::BlockContext;
pub use linear::{linear, lora_linear};
pub use logprob::target_logprobs;
pub use swiglu::swiglu;

use super::ops::f32_slice as slice;
use crate::engine::packed::Packed;
use crate::engine::weights::PackCache;
use candle_core::{DType, Device, Result, Tensor};
use gemm::Parallelism;
use std::sync::Arc;

/// The pack cache a fused op on a frozen weight uses: the model's (shared by its clones, so
/// the weight is packed once per run), or without one a fresh cache owned by the op.
fn pack_cache(packs: Option<&Arc<PackCache>>) -> Arc<PackCache> {
    packs.cloned().unwrap_or_default()
}

/// W (or Wᵀ, `transposed`) from `cache`, packed for the engine's product kernel; failures
/// name the op.
fn packed(cache: &PackCache, w: &Tensor, transposed: bool, op: &str) -> Result<Arc<Packed>> {
    let p = if transposed {
        cache.get_t(w)
    } else {
        cache.get(w)
    };
    p.map_err(|e| candle_core::Error::Msg(format!("{op}: {e:#}")))
}

/// Whether `t` can take the fused CPU kernels.
pub fn applies(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32
}

/// Runs `f` on the contiguous f32 elements of a CPU tensor, read in place.
fn with_cpu<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(s) => f(slice(s, layout, "fused op")?),
        _ => candle_core::bail!("fused op: a tensor is not on the CPU"),
    }
}

/// A tensor's elements in row-major order (a copy; used in backward passes).
fn values(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// A row-major matrix operand for `mm`: its elements and the strides between rows and
/// between columns (a transposed view swaps them).
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

/// `data` as a matrix of rows `width` wide.
fn rows(data: &[f32], width: usize) -> Mat<'_> {
    Mat {
        data,
        rs: width,
        cs: 1,
    }
}

/// The transpose of `data` read as rows `width` wide.
fn cols(data: &[f32], width: usize) -> Mat<'_> {
    Mat {
        data,
        rs: 1,
        cs: width,
    }
}

/// All of rayon's threads, for a gemm called outside a rayon task.
fn threads() -> Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// dst [m, n] (row-major) = beta·lhs [m, k]·rhs [k, n], added to dst when `accumulate`,
/// else overwriting it.
fn mm(
    dst: &mut [f32],
    [m, n, k]: [usize; 3],
    lhs: Mat,
    rhs: Mat,
    beta: f32,
    accumulate: bool,
    par: Parallelism,
) {
    let fits =
        |t: Mat, r: usize, c: usize| t.data.len() > (r.max(1) - 1) * t.rs + (c.max(1) - 1) * t.cs;
    assert!(
        dst.len() >= m * n && fits(lhs, m, k) && fits(rhs, k, n),
        "gemm operands too short"
    );
    // SAFETY: the assert keeps every element the strides address inside its slice; dst is
    // borrowed mutably, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            beta,
            false,
            false,
            false,
            par,
        );
    }
}
