//! The frozen-weight view of a `Llama`: its base weights repacked once into the product
//! kernel's panel layout (`PackCache`, kept with the model and shared by its clones), every
//! other tensor read in place. An adapter is applied unmerged (x·Aᵀ·Bᵀ·scale at rank r) from
//! the `Var`s the optimiser updates in place, so a LoRA run never copies or repacks the model
//! to sample or judge with it; under full fine-tuning the trained weights are repacked for
//! each engine.
use super::kernels::{matmul_nt, parallel_for, OutPtr};
use super::packed::{matmul_packed, Packed};
use crate::model::Llama;
use anyhow::{anyhow, bail, Result};
use candle_core::{CpuStorage, DType, Storage, Tensor, TensorId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Borrows a contiguous f32 CPU tensor's values for the duration of `f`.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let data = match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => v.as_slice(),
        Storage::Cpu(_) => bail!("engine: tensor of dtype {:?}, needs f32", t.dtype()),
        _ => bail!("engine: tensor on {:?}, needs the CPU", t.device()),
    };
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or_else(|| anyhow!("engine: tensor {:?} is not contiguous", t.dims()))?;
    Ok(f(&data[a..b]))
}

/// Panel-packed copies of a model's frozen weights (`packed::Packed`), made the first time an
/// engine is built on the model and shared by its clones (πref is the policy without its
/// adapter: the same base tensors, the same packs). A weight that is a trainable `Var` (full
/// fine-tuning) changes in place between engines, so it is repacked for each engine instead.
#[derive(Default)]
pub struct PackCache(Mutex<HashMap<(TensorId, bool), Arc<Packed>>>);

impl PackCache {
    /// W [out, in] packed for products x · Wᵀ.
    pub fn get(&self, w: &Tensor) -> Result<Arc<Packed>> {
        self.packed(w, false)
    }

    /// Wᵀ packed for products g · W (a frozen layer's input gradient in training).
    pub fn get_t(&self, w: &Tensor) -> Result<Arc<Packed>> {
        self.packed(w, true)
    }

    fn packed(&self, w: &Tensor, transposed: bool) -> Result<Arc<Packed>> {
        let pack = || -> Result<Arc<Packed>> {
            let (out, inp) = w.dims2()?;
            with_f32(&w.contiguous()?, |v| {
                Arc::new(if transposed {
                    Packed::transposed(v, out, inp)
                } else {
                    Packed::new(v, out, inp)
                })
            })
        };
        // Only a tensor whose id names fixed values is cached: a `Var` changes in place, and a
        // non-contiguous view would be a fresh copy (a fresh id) at every call.
        if w.is_variable() || !w.is_contiguous() {
            return pack();
        }
        let key = (w.id(), transposed);
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = map.get(&key) {
            return Ok(p.clone());
        }
        let p = pack()?;
        map.insert(key, p.clone());
        Ok(p)
    }
}

/// A projection y = x Wᵀ + b (+ scale · x Aᵀ Bᵀ); W's shape is `weight.out` × `weight.inp`.
pub struct LinearView {
    pub weight: Arc<Packed>,
    pub bias: Option<Tensor>,
    /// A [r, in], B [out, r], scale.
    pub lora: Option<(Tensor, Tensor, f32)>,
}

impl LinearView {
    fn of(l: &crate::model::llama::Linear, packs: &PackCache) -> Result<Self> {
        Ok(Self {
            weight: packs.get(&contiguous(&l.weight)?)?,
            bias: l.bias.as_ref().map(contiguous).transpose()?,
            lora: l
                .lora
                .as_ref()
                .map(|a| -> Result<_> {
                    Ok((contiguous(&a.a)?, contiguous(&a.b)?, a.scale as f32))
                })
                .transpose()?,
        })
    }

    /// y [rows, out] for x [rows, in].
    pub fn forward(&self, x: &[f32], rows: usize, y: &mut Vec<f32>) -> Result<()> {
        let (out, inp) = (self.weight.out, self.weight.inp);
        // The product overwrites every element: only a growing buffer is zeroed.
        y.resize(rows * out, 0.0);
        matmul_packed(x, rows, &self.weight, y);
        if let Some(b) = &self.bias {
            with_f32(b, |b| {
                for row in y.chunks_mut(out) {
                    row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
                }
            })?;
        }
        if let Some((a, b, scale)) = &self.lora {
            let r = a.dim(0)?;
            let mut xa = vec![0f32; rows * r];
            with_f32(a, |a| matmul_nt(x, rows, inp, a, r, &mut xa))?;
            // Bᵀ [r, out], read from the live B at each call (the optimiser updates it in
            // place): out × r copies against rows × r × out multiply-adds.
            let mut bt = vec![0f32; r * out];
            with_f32(b, |b| {
                for (o, row) in b.chunks_exact(r).enumerate() {
                    for (j, &v) in row.iter().enumerate() {
                        bt[j * out + o] = v;
                    }
                }
            })?;
            let yp = OutPtr(y.as_mut_ptr());
            parallel_for(rows, rows * r * out, |i| {
                // Safety: each task writes row i of y only.
                let yr = unsafe { std::slice::from_raw_parts_mut(yp.at(i * out), out) };
                lora_delta(&xa[i * r..(i + 1) * r], &bt, *scale, yr);
            });
        }
        Ok(())
    }
}

vectorised! {
    /// y += scale · Σ_j xa[j] · bt[j] for one row, bt = Bᵀ [r, out].
    ///
    /// An outer product along the outputs instead of r-long dot products: a rank-16 dot is one
    /// vector FMA and a horizontal sum, which cost ten times the FMA. Every output sums its r
    /// terms in order with a separate multiply and add, so vector width never changes a bit and
    /// `Engine::logits_of` reproduces it exactly.
    pub fn lora_delta(xa: &[f32], bt: &[f32], scale: f32, y: &mut [f32]) = lora_delta_body
}

/// The element-wise arithmetic of `lora_delta`, vectorised by the compiler for each caller's
/// instruction set (no fused multiply-add is formed without it being asked for).
#[inline(always)]
fn lora_delta_body(xa: &[f32], bt: &[f32], scale: f32, y: &mut [f32]) {
    let out = y.len();
    let mut d = vec![0f32; out];
    for (j, &a) in xa.iter().enumerate() {
        let col = &bt[j * out..(j + 1) * out];
        d.iter_mut().zip(col).for_each(|(d, b)| *d += a * b);
    }
    y.iter_mut().zip(&d).for_each(|(v, d)| *v += d * scale);
}

/// Handles that share storage with `t` (a no-op for the contiguous tensors a model holds).
fn contiguous(t: &Tensor) -> Result<Tensor> {
    if t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous() {
        Ok(t.clone())
    } else {
        bail!(
            "engine: needs contiguous f32 CPU tensors, got {:?} {:?} on {:?}",
            t.dims(),
            t.dtype(),
            t.device()
        )
    }
}

pub struct LayerView {
    pub input_norm: Tensor,
    pub q: LinearView,
    pub k: LinearView,
    pub v: LinearView,
    pub o: LinearView,
    pub post_norm: Tensor,
    pub gate: LinearView,
    pub up: LinearView,
    pub down: LinearView,
}

/// Every tensor the forward pass reads.
pub struct ModelView {
    pub embed: Tensor,
    pub layers: Vec<LayerView>,
    pub norm: Tensor,
    /// The LM head; a tied head is the embedding itself ([vocab, d] is already [out, in]).
    pub head: LinearView,
}

impl ModelView {
    /// Whether the engine can run `model` (f32 on the CPU); other models take the reference
    /// path.
    pub fn supports(model: &Llama) -> bool {
        model.device().is_cpu() && model.embed_tokens.dtype() == DType::F32
    }

    pub fn of(model: &Llama) -> Result<Self> {
        let packs = &model.packs;
        let mut layers = Vec::with_capacity(model.layers.len());
        for b in &model.layers {
            let a = &b.self_attn;
            layers.push(LayerView {
                input_norm: contiguous(&b.input_layernorm)?,
                q: LinearView::of(&a.q_proj, packs)?,
                k: LinearView::of(&a.k_proj, packs)?,
                v: LinearView::of(&a.v_proj, packs)?,
                o: LinearView::of(&a.o_proj, packs)?,
                post_norm: contiguous(&b.post_attention_layernorm)?,
                gate: LinearView::of(&b.mlp.gate_proj, packs)?,
                up: LinearView::of(&b.mlp.up_proj, packs)?,
                down: LinearView::of(&b.mlp.down_proj, packs)?,
            });
        }
        let embed = contiguous(&model.embed_tokens)?;
        let head = match &model.lm_head {
            Some(h) => LinearView::of(h, packs)?,
            None => LinearView {
                weight: packs.get(&embed)?,
                bias: None,
                lora: None,
            },
        };
        Ok(Self {
            embed,
            layers,
            norm: contiguous(&model.norm)?,
            head,
        })
    }
}
