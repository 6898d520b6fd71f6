//! The frozen-weight inference engine: everything that needs no gradient (sampling, judging,
//! πref and evaluation log-probabilities) runs here on the CPU, beside the autograd model in
//! `model::llama`, which stays the readable reference that tests hold this engine equal to.
//!
//! - `weights`: a view of a `Llama`'s tensors (base weights packed once), LoRA applied
//!   unmerged;
//! - `packed`: the x·Wᵀ product on weights repacked once per model into 32-output panels;
//! - `kernels`: dot-product x·Wᵀ on unpacked matrices (attention scores, LoRA's A), threads
//!   picked by work size;
//! - `kv`: the preallocated KV cache written in place;
//! - `math`: a vectorisable exp (softmax, SwiGLU);
//! - `forward`: the decoder over unpadded segments;
//! - `decode`: batched generation with shared prompt prefixes;
//! - `score`: judge answer logits and response log-probabilities.
/// `fn name(args) -> R` that runs the element-wise `body(args)` compiled for AVX-512F or
/// AVX2 when the CPU has it (detected at run time), else as built. The body must be
/// `#[inline(always)]` and free of fused multiply-adds, so every width gives the same bits;
/// only the vector width changes.
macro_rules! vectorised {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? = $body:ident) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                if is_x86_feature_detected!("avx512f") {
                    // Safety: the CPU has AVX-512F (checked above).
                    return unsafe { avx512($($arg),*) };
                }
                if is_x86_feature_detected!("avx2") {
                    // Safety: the CPU has AVX2 (checked above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

pub mod decode;
pub mod forward;
pub mod kernels;
pub mod kv;
pub mod math;
pub mod packed;
pub mod score;
pub mod weights;

pub use forward::{Engine, Segment};

use crate::model::Llama;
use std::borrow::Cow;

/// The model to sample, judge and score with: `model` itself where the engine runs it (each
/// engine built on it reads the adapters live and the base from the model's packed copy),
/// a frozen snapshot elsewhere
/// (the reference path on other devices wants merged, graph-free weights).
pub fn inference_model(model: &Llama) -> anyhow::Result<Cow<'_, Llama>> {
    Ok(if Engine::supports(model) {
        Cow::Borrowed(model)
    } else {
        Cow::Owned(model.snapshot()?)
    })
}
