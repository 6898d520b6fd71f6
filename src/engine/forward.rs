//! The decoder forward pass over a batch of *segments*: runs of new tokens, each appended to
//! its own cache slot and attending to its own earlier positions (and, for samples, to a
//! shared prompt prefix in another cache). Sequences are never padded: prefill, decode steps
//! and scoring are the same function with different segments, and every row's arithmetic is
//! independent of the other rows in the batch.
use super::kernels::{matmul_nt_serial, parallel_for, OutPtr, MIN_WORK_PER_THREAD};
use super::kv::KvCache;
use super::math::exp;
use super::weights::{with_f32, LinearView, ModelView};
use crate::model::{Llama, ModelConfig};
use anyhow::{bail, Result};
use rayon::prelude::*;
use std::sync::Mutex;

/// New tokens for one sequence.
#[derive(Debug, Clone)]
pub struct Segment<'a> {
    pub tokens: &'a [u32],
    /// Its slot in the cache being written.
    pub slot: usize,
    /// Cache index of `tokens[0]` within the slot (positions before it are already cached).
    pub start: usize,
    /// Rotary position of `tokens[0]` (start plus the shared prefix's length).
    pub pos0: usize,
    /// A shared prefix (slot, length) in the `shared` cache, attended before the slot's own
    /// positions: the prompt that the K samples of one request share.
    pub prefix: Option<(usize, usize)>,
}

/// The frozen-weight inference engine for one model.
pub struct Engine {
    pub cfg: ModelConfig,
    view: ModelView,
    inv_freq: Vec<f32>,
    /// Activation buffers kept between forwards: a fresh [rows, FFN] buffer per call costs
    /// the kernel's page faults and zeroing (7% of a judging run, on one thread).
    buffers: Mutex<Vec<Vec<f32>>>,
}

/// Element-wise work (floats) worth splitting across threads.
const ELEMENTWISE_PER_THREAD: usize = 1 << 16;

/// `f(row of a, row of b)` for every row, in parallel when the rows are many: element-wise,
/// so the result does not depend on the split.
fn rows_zip(a: &mut [f32], b: &[f32], width: usize, f: impl Fn(&mut [f32], &[f32]) + Sync) {
    if a.len() >= 2 * ELEMENTWISE_PER_THREAD && rayon::current_num_threads() > 1 {
        let rows_per = (ELEMENTWISE_PER_THREAD / width.max(1)).max(1) * width.max(1);
        a.par_chunks_mut(rows_per)
            .zip(b.par_chunks(rows_per))
            .for_each(|(a, b)| f(a, b));
    } else {
        f(a, b);
    }
}

impl Engine {
    /// Whether `model` can run here (f32 on the CPU).
    pub fn supports(model: &Llama) -> bool {
        ModelView::supports(model)
    }

    /// A view of `model`'s weights (packed base weights cached with the model; see `weights`).
    /// Build one per use: under full fine-tuning it holds the weights packed at that moment.
    pub fn new(model: &Llama) -> Result<Self> {
        let cfg = model.cfg.clone();
        let hd = cfg.head_dim;
        // transformers' f32 inverse frequencies, as `rope_tables` computes them.
        let inv_freq = (0..hd / 2)
            .map(|i| 1.0 / (cfg.rope_theta as f32).powf((2 * i) as f32 / hd as f32))
            .collect();
        Ok(Self {
            view: ModelView::of(model)?,
            cfg,
            inv_freq,
            buffers: Mutex::new(vec![]),
        })
    }

    /// A cache for `slots` sequences of up to `cap` positions in every layer.
    pub fn cache(&self, slots: usize, cap: usize) -> KvCache {
        let c = &self.cfg;
        KvCache::new(
            c.num_hidden_layers,
            slots,
            c.num_key_value_heads,
            c.head_dim,
            cap,
        )
    }

    /// A one-layer scratch cache (scoring keeps nothing between layers).
    pub fn scratch(&self, slots: usize, cap: usize) -> KvCache {
        let c = &self.cfg;
        KvCache::new(1, slots, c.num_key_value_heads, c.head_dim, cap)
    }

    /// Final (normed) hidden states [rows, d] of every new token, in segment order; writes
    /// the segments' keys and values into `cache`.
    pub fn hidden(
        &self,
        segs: &[Segment],
        cache: &mut KvCache,
        shared: Option<&KvCache>,
    ) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let (d, vocab) = (c.hidden_size, c.vocab_size);
        let rows: usize = segs.iter().map(|s| s.tokens.len()).sum();
        for s in segs {
            if s.slot >= cache.slots() || s.start + s.tokens.len() > cache.cap() {
                bail!(
                    "engine: segment (slot {}, {} tokens from {}) does not fit the cache",
                    s.slot,
                    s.tokens.len(),
                    s.start
                );
            }
            if s.prefix.is_some() && shared.is_none() {
                bail!("engine: a segment has a shared prefix but no shared cache was given");
            }
            if let Some(&t) = s.tokens.iter().find(|&&t| t as usize >= vocab) {
                bail!("token id {t} is out of the embedding's range ({vocab})");
            }
            if s.pos0 + s.tokens.len() > c.max_position_embeddings {
                bail!(
                    "engine: {} positions exceed the model's {}",
                    s.pos0 + s.tokens.len(),
                    c.max_position_embeddings
                );
            }
        }
        // Row bookkeeping: (segment, index within it).
        let row_of: Vec<(usize, usize)> = segs
            .iter()
            .enumerate()
            .flat_map(|(si, s)| (0..s.tokens.len()).map(move |i| (si, i)))
            .collect();
        // Buffers from the pool (returned below); every one is overwritten before it is read.
        let mut pool = std::mem::take(&mut *self.buffers.lock().unwrap_or_else(|e| e.into_inner()));
        let mut take = || pool.pop().unwrap_or_default();
        let (mut x, mut h, mut q, mut k, mut v, mut a) =
            (take(), take(), take(), take(), take(), take());
        let (mut g, mut u, mut y) = (take(), take(), take());
        x.resize(rows * d, 0.0);
        with_f32(&self.view.embed, |e| {
            for (r, &(si, i)) in row_of.iter().enumerate() {
                let t = segs[si].tokens[i] as usize;
                x[r * d..(r + 1) * d].copy_from_slice(&e[t * d..(t + 1) * d]);
            }
        })?;
        let eps = c.rms_norm_eps as f32;
        let table = self.rope_table(segs, &row_of);
        for (li, layer) in self.view.layers.iter().enumerate() {
            rms_norm(&x, &layer.input_norm, eps, &mut h)?;
            layer.q.forward(&h, rows, &mut q)?;
            layer.k.forward(&h, rows, &mut k)?;
            layer.v.forward(&h, rows, &mut v)?;
            self.rope(&mut q, c.num_attention_heads, &table);
            self.rope(&mut k, c.num_key_value_heads, &table);
            let kvw = c.num_key_value_heads * c.head_dim;
            for (r, &(si, i)) in row_of.iter().enumerate() {
                let s = &segs[si];
                let kr = &k[r * kvw..(r + 1) * kvw];
                let vr = &v[r * kvw..(r + 1) * kvw];
                cache.write(li, s.slot, s.start + i, kr, vr);
            }
            self.attention(li, &q, segs, &row_of, cache, shared, &mut a);
            layer.o.forward(&a, rows, &mut y)?;
            rows_zip(&mut x, &y, d, add);
            rms_norm(&x, &layer.post_norm, eps, &mut h)?;
            layer.gate.forward(&h, rows, &mut g)?;
            layer.up.forward(&h, rows, &mut u)?;
            // SwiGLU in place: g ← silu(g) · u.
            rows_zip(&mut g, &u, c.intermediate_size, super::math::silu_mul);
            layer.down.forward(&g, rows, &mut y)?;
            rows_zip(&mut x, &y, d, add);
        }
        let mut out = vec![];
        rms_norm(&x, &self.view.norm, eps, &mut out)?;
        let mut pool = self.buffers.lock().unwrap_or_else(|e| e.into_inner());
        pool.extend([x, h, q, k, v, a, g, u, y]);
        Ok(out)
    }

    /// LM-head logits [rows, vocab] for hidden states [rows, d].
    pub fn logits(&self, hidden: &[f32], rows: usize) -> Result<Vec<f32>> {
        let mut y = vec![];
        self.view.head.forward(hidden, rows, &mut y)?;
        Ok(y)
    }

    /// `logits` into a buffer reused across calls: [rows, vocab] is megabytes, and a fresh
    /// allocation per decode step or scoring chunk costs the kernel's page zeroing each time.
    pub fn logits_into(&self, hidden: &[f32], rows: usize, y: &mut Vec<f32>) -> Result<()> {
        self.view.head.forward(hidden, rows, y)
    }

    /// Logits of a few vocabulary entries for one hidden state (the judge's two answers):
    /// the head's other rows are never computed.
    pub fn logits_of(&self, hidden: &[f32], ids: &[u32]) -> Result<Vec<f32>> {
        let head: &LinearView = &self.view.head;
        let d = self.cfg.hidden_size;
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids {
            let id = id as usize;
            if id >= head.weight.out {
                bail!(
                    "token id {id} is out of the head's range ({})",
                    head.weight.out
                );
            }
            let mut y = [head.weight.dot(&hidden[..d], id)];
            if let Some(b) = &head.bias {
                y[0] += with_f32(b, |b| b[id])?;
            }
            if let Some((a, b, scale)) = &head.lora {
                let r = a.dim(0)?;
                let mut xa = vec![0f32; r];
                with_f32(a, |a| {
                    super::kernels::matmul_nt(hidden, 1, d, a, r, &mut xa)
                })?;
                // The head's row of B is a column of Bᵀ: `lora_delta`'s arithmetic exactly.
                let row = with_f32(b, |b| b[id * r..(id + 1) * r].to_vec())?;
                super::weights::lora_delta(&xa, &row, *scale, &mut y);
            }
            out.push(y[0]);
        }
        Ok(out)
    }

    /// (cos, sin) of every row's rotary angles, [rows, head_dim / 2]: computed once per
    /// forward, not once per layer and projection.
    fn rope_table(&self, segs: &[Segment], row_of: &[(usize, usize)]) -> Vec<(f32, f32)> {
        row_of
            .iter()
            .flat_map(|&(si, i)| {
                let pos = (segs[si].pos0 + i) as f32;
                self.inv_freq.iter().map(move |f| {
                    let ang = pos * f;
                    (ang.cos(), ang.sin())
                })
            })
            .collect()
    }

    /// Rotates each row's heads by its position ("rotate half" layout).
    fn rope(&self, x: &mut [f32], heads: usize, table: &[(f32, f32)]) {
        let hd = self.cfg.head_dim;
        let half = hd / 2;
        for (r, cs) in table.chunks_exact(half).enumerate() {
            for hh in 0..heads {
                let v = &mut x[(r * heads + hh) * hd..(r * heads + hh + 1) * hd];
                for (j, &(c, s)) in cs.iter().enumerate() {
                    let (x1, x2) = (v[j], v[j + half]);
                    v[j] = x1 * c - x2 * s;
                    v[j + half] = x2 * c + x1 * s;
                }
            }
        }
    }

    /// Causal attention of every new row over its prefix and its own cached positions; GQA
    /// reads each kv head for its group of query heads. Scores live one row at a time.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: usize,
        q: &[f32],
        segs: &[Segment],
        row_of: &[(usize, usize)],
        cache: &KvCache,
        shared: Option<&KvCache>,
        out: &mut Vec<f32>,
    ) {
        let c = &self.cfg;
        let (h, kvh, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let n_rep = h / kvh;
        let rows = row_of.len();
        out.clear();
        out.resize(rows * h * hd, 0.0);
        let scale = 1.0 / (hd as f32).sqrt();
        let ctx_of = |r: usize| {
            let (si, i) = row_of[r];
            let s = &segs[si];
            s.prefix.map_or(0, |p| p.1) + s.start + i + 1
        };
        let work: usize = (0..rows).map(ctx_of).sum::<usize>() * h * hd * 2;
        // Units of up to ATTENTION_ROWS consecutive rows of one segment and one head: their
        // scores are one product with the keys (rows of a prefill share them).
        let mut blocks = vec![];
        let mut r = 0;
        for s in segs {
            for i0 in (0..s.tokens.len()).step_by(ATTENTION_ROWS) {
                let n = (s.tokens.len() - i0).min(ATTENTION_ROWS);
                blocks.push((r + i0, n));
            }
            r += s.tokens.len();
        }
        let op = OutPtr(out.as_mut_ptr());
        let unit = |u: usize| {
            let ((r0, n), head) = (blocks[u / h], u % h);
            let (si, i0) = row_of[r0];
            let s = &segs[si];
            let g = head / n_rep;
            let (pk, pv) = match (s.prefix, shared) {
                (Some((ps, pl)), Some(sh)) => sh.head(layer, ps, g, pl),
                _ => (&[][..], &[][..]),
            };
            let own0 = s.start + i0 + 1;
            let (ok, ov) = cache.head(layer, s.slot, g, own0 + n - 1);
            let qs = |j: usize| &q[((r0 + j) * h + head) * hd..((r0 + j) * h + head + 1) * hd];
            // Safety: each unit owns the (row, head) slices it writes.
            let o = |j: usize| unsafe {
                std::slice::from_raw_parts_mut(op.at(((r0 + j) * h + head) * hd), hd)
            };
            attend(n, qs, [(pk, pv), (ok, ov)], own0, scale, o);
        };
        // Parallel over (block, head) units only when the work pays for the threads.
        let units = blocks.len() * h;
        if work < MIN_WORK_PER_THREAD {
            (0..units).for_each(unit);
        } else {
            parallel_for(units, work, unit);
        }
    }
}

/// Query rows of one segment whose attention scores are computed as one product.
const ATTENTION_ROWS: usize = 16;

/// For rows j < n of one segment and one query head: o(j) = softmax(q(j)·kᵀ · scale) · v over
/// the shared prefix `parts[0]` and the first `own0 + j` positions of the segment's own
/// `parts[1]` (causal). The scores of all n rows are one product of the product kernel (each
/// score's arithmetic is the same whatever the block, so a row's result is too); the rest is
/// compiled for the CPU's vector width, element-wise in a fixed order (no fused
/// multiply-add), so every width gives the same bits.
fn attend<'o>(
    n: usize,
    qs: impl Fn(usize) -> &'o [f32],
    parts: Parts,
    own0: usize,
    scale: f32,
    o: impl Fn(usize) -> &'o mut [f32],
) {
    thread_local! {
        // Scores and gathered queries, reused: fresh buffers per unit cost their zeroing.
        static BUF: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
            const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    }
    let hd = qs(0).len();
    let (pl, ol) = (parts[0].0.len() / hd, parts[1].0.len() / hd);
    BUF.with_borrow_mut(|(scores, qb)| {
        qb.clear();
        (0..n).for_each(|j| qb.extend_from_slice(qs(j)));
        scores.resize(n * (pl + ol), 0.0);
        let (sp, so) = scores.split_at_mut(n * pl);
        matmul_nt_serial(qb, n, hd, parts[0].0, pl, sp);
        matmul_nt_serial(qb, n, hd, parts[1].0, ol, so);
        for j in 0..n {
            let own = own0 + j;
            let row = [&mut sp[j * pl..(j + 1) * pl], &mut so[j * ol..j * ol + own]];
            let values = [parts[0].1, &parts[1].1[..own * hd]];
            softmax_sum(row, values, scale, o(j));
        }
    })
}

type Parts<'a> = [(&'a [f32], &'a [f32]); 2];

vectorised! {
    /// o += softmax(scores · scale) · values, the scores and values in two parts, in order.
    fn softmax_sum(p: [&mut [f32]; 2], v: [&[f32]; 2], scale: f32, o: &mut [f32]) = softmax_sum_body
}

#[inline(always)]
fn softmax_sum_body(p: [&mut [f32]; 2], v: [&[f32]; 2], scale: f32, o: &mut [f32]) {
    let hd = o.len();
    let [p0, p1] = p;
    p0.iter_mut().chain(p1.iter_mut()).for_each(|s| *s *= scale);
    let max = p0
        .iter()
        .chain(p1.iter())
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    p0.iter_mut()
        .chain(p1.iter_mut())
        .for_each(|x| *x = exp(*x - max));
    p0.iter().chain(p1.iter()).for_each(|x| sum += x);
    let inv = 1.0 / sum;
    p0.iter_mut().chain(p1.iter_mut()).for_each(|w| *w *= inv);
    // o += Σ_k w_k · v_k, each element summed over k in order. Blocks of 64 elements are
    // accumulated in registers across all keys (a loop over keys per element block, instead
    // of a read and write of o per key).
    let mut e0 = 0;
    while e0 < hd {
        let width = (hd - e0).min(64);
        let mut acc = [0f32; 64];
        acc[..width].copy_from_slice(&o[e0..e0 + width]);
        for (part, vals) in [(&*p0, v[0]), (&*p1, v[1])] {
            for (w, vv) in part.iter().zip(vals.chunks_exact(hd)) {
                if width == 64 {
                    let vv: &[f32; 64] = vv[e0..e0 + 64].try_into().expect("64 lanes");
                    for l in 0..64 {
                        acc[l] += w * vv[l];
                    }
                } else {
                    for l in 0..width {
                        acc[l] += w * vv[e0 + l];
                    }
                }
            }
        }
        o[e0..e0 + width].copy_from_slice(&acc[..width]);
        e0 += width;
    }
}

/// x += y, element-wise.
fn add(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
}

/// y = x / rms(x) · w per row of width w.len().
fn rms_norm(x: &[f32], w: &candle_core::Tensor, eps: f32, y: &mut Vec<f32>) -> Result<()> {
    // Every element is overwritten: only a growing buffer is zeroed.
    y.resize(x.len(), 0.0);
    with_f32(w, |w| {
        let n = w.len();
        rows_zip(y, x, n, |y, x| {
            for (xr, yr) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
                let ms = xr.iter().map(|v| v * v).sum::<f32>() / n as f32;
                let inv = 1.0 / (ms + eps).sqrt();
                for ((o, &x), &w) in yr.iter_mut().zip(xr).zip(w) {
                    *o = x * inv * w;
                }
            }
        })
    })
}
