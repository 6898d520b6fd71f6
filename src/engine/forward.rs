//! The decoder forward pass over a batch of *segments*: runs of new tokens, each appended to
//! its own cache slot and attending to its own earlier positions (and, for samples, to a
//! shared prompt prefix in another cache). Sequences are never padded: prefill, decode steps
//! and scoring are the same function with different segments, and every row's arithmetic is
//! independent of the other rows in the batch.
use super::kernels::{matmul_nt, parallel_for, MIN_WORK_PER_THREAD};
use super::kv::KvCache;
use super::weights::{with_f32, LinearView, ModelView};
use crate::model::{Llama, ModelConfig};
use anyhow::{bail, Result};

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
}

/// A raw pointer for tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// A method, so closures capture the Send/Sync wrapper rather than its raw field.
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
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
        let mut x = vec![0f32; rows * d];
        with_f32(&self.view.embed, |e| {
            for (r, &(si, i)) in row_of.iter().enumerate() {
                let t = segs[si].tokens[i] as usize;
                x[r * d..(r + 1) * d].copy_from_slice(&e[t * d..(t + 1) * d]);
            }
        })?;
        let eps = c.rms_norm_eps as f32;
        let table = self.rope_table(segs, &row_of);
        let (mut h, mut q, mut k, mut v, mut a) = (vec![], vec![], vec![], vec![], vec![]);
        let (mut g, mut u, mut y) = (vec![], vec![], vec![]);
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
            x.iter_mut().zip(&y).for_each(|(x, y)| *x += y);
            rms_norm(&x, &layer.post_norm, eps, &mut h)?;
            layer.gate.forward(&h, rows, &mut g)?;
            layer.up.forward(&h, rows, &mut u)?;
            // SwiGLU in place: g ← silu(g) · u.
            g.iter_mut()
                .zip(&u)
                .for_each(|(g, u)| *g = *g / (1.0 + (-*g).exp()) * u);
            layer.down.forward(&g, rows, &mut y)?;
            x.iter_mut().zip(&y).for_each(|(x, y)| *x += y);
        }
        let mut out = vec![];
        rms_norm(&x, &self.view.norm, eps, &mut out)?;
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
            if id >= head.out {
                bail!("token id {id} is out of the head's range ({})", head.out);
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
        let op = OutPtr(out.as_mut_ptr());
        let unit = |u: usize| {
            let (r, head) = (u / h, u % h);
            let (si, i) = row_of[r];
            let s = &segs[si];
            let g = head / n_rep;
            let qv = &q[(r * h + head) * hd..(r * h + head + 1) * hd];
            let own = s.start + i + 1;
            let (pk, pv) = match (s.prefix, shared) {
                (Some((ps, pl)), Some(sh)) => sh.head(layer, ps, g, pl),
                _ => (&[][..], &[][..]),
            };
            let (ok, ov) = cache.head(layer, s.slot, g, own);
            // Safety: each unit owns the (row, head) slice it writes.
            let o = unsafe { std::slice::from_raw_parts_mut(op.at((r * h + head) * hd), hd) };
            attend(qv, [(pk, pv), (ok, ov)], scale, o);
        };
        // Parallel over (row, head) units only when the work pays for the threads.
        if work < MIN_WORK_PER_THREAD {
            (0..rows * h).for_each(unit);
        } else {
            parallel_for(rows * h, work, unit);
        }
    }
}

/// o = softmax(q·kᵀ · scale) · v over the keys and values of `parts` in order, for one query
/// head. The scores come from the product kernel; the rest is compiled for the CPU's vector
/// width, element-wise in a fixed order (no fused multiply-add), so every width gives the
/// same bits.
fn attend(q: &[f32], parts: [(&[f32], &[f32]); 2], scale: f32, o: &mut [f32]) {
    thread_local! {
        // One head's scores, reused: a fresh buffer per (row, head) costs its zeroing.
        static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let n: usize = parts.iter().map(|(k, _)| k.len() / q.len()).sum();
    SCORES.with_borrow_mut(|buf| {
        if buf.len() < n {
            buf.resize(n, 0.0);
        }
        let p = &mut buf[..n];
        // The vector code lives in functions compiled for the CPU's features (a closure
        // would not inherit them).
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                // Safety: the CPU has AVX-512F (checked above).
                return unsafe { attend_avx512(q, parts, scale, p, o) };
            }
            if is_x86_feature_detected!("avx2") {
                // Safety: the CPU has AVX2 (checked above).
                return unsafe { attend_avx2(q, parts, scale, p, o) };
            }
        }
        scores_and_sum(q, parts, scale, p, o)
    })
}

type Parts<'a> = [(&'a [f32], &'a [f32]); 2];

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_avx512(q: &[f32], parts: Parts, scale: f32, p: &mut [f32], o: &mut [f32]) {
    scores_and_sum(q, parts, scale, p, o)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attend_avx2(q: &[f32], parts: Parts, scale: f32, p: &mut [f32], o: &mut [f32]) {
    scores_and_sum(q, parts, scale, p, o)
}

#[inline(always)]
fn scores_and_sum(q: &[f32], parts: Parts, scale: f32, p: &mut [f32], o: &mut [f32]) {
    let hd = q.len();
    // The scores are a one-row product with the keys: the product kernel's blocked dot
    // products, in its fixed summation order.
    let mut at = 0;
    for (k, _) in parts {
        let m = k.len() / hd;
        matmul_nt(q, 1, hd, k, m, &mut p[at..at + m]);
        at += m;
    }
    p.iter_mut().for_each(|s| *s *= scale);
    let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    p.iter_mut().for_each(|v| {
        *v = (*v - max).exp();
        sum += *v;
    });
    let inv = 1.0 / sum;
    let values = parts.iter().flat_map(|(_, v)| v.chunks_exact(hd));
    for (w, vv) in p.iter().zip(values) {
        let w = w * inv;
        o.iter_mut().zip(vv).for_each(|(o, v)| *o += w * v);
    }
}

/// y = x / rms(x) · w per row of width w.len().
fn rms_norm(x: &[f32], w: &candle_core::Tensor, eps: f32, y: &mut Vec<f32>) -> Result<()> {
    // Every element is overwritten: only a growing buffer is zeroed.
    y.resize(x.len(), 0.0);
    with_f32(w, |w| {
        let n = w.len();
        for (xr, yr) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / n as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            for ((o, &x), &w) in yr.iter_mut().zip(xr).zip(w) {
                *o = x * inv * w;
            }
        }
    })
}
