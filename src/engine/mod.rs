//! The frozen-weight inference engine: everything that needs no gradient (sampling, judging,
//! πref and evaluation log-probabilities) runs here on the CPU, beside the autograd model in
//! `model::llama`, which stays the readable reference that tests hold this engine equal to.
//!
//! - `weights`: a no-copy view of a `Llama`'s tensors, LoRA applied unmerged;
//! - `packed`: the x·Wᵀ product on weights repacked once per model into 32-output panels;
//! - `kernels`: dot-product x·Wᵀ on unpacked matrices (attention scores, LoRA's A), threads
//!   picked by work size;
//! - `kv`: the preallocated KV cache written in place;
//! - `math`: a vectorisable exp (softmax, SwiGLU);
//! - `forward`: the decoder over unpadded segments;
//! - `decode`: batched generation with shared prompt prefixes;
//! - `score`: judge answer logits and response log-probabilities.
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
