//! A whole decoder layer as one op: RMSNorm, the q/k/v projections (with their adapters),
//! rotary embeddings, causal attention, the output projection and its residual, RMSNorm, the
//! SwiGLU MLP and its residual; forward and a hand-written backward.
//!
//! Built from the per-kernel ops of this module the same layer is about twenty graph nodes, and
//! candle's backward pays for each edge it walks a zero-filled buffer and an addition, plus a
//! thread-pool hand-off per element-wise op; at d = 512 that was a third of a LoRA step that
//! the products themselves would finish in two thirds of the time. Here the layer's products
//! run on the engine's packed kernel (frozen weights packed once per run from the model's
//! cache, trained ones per call), input gradients summed in place over the products that read
//! the same input, and the element-wise passes fused into the loops around them.
//!
//! The layer's trained tensors (adapters under LoRA, everything under full fine-tuning) reach
//! the op as one flat input, their concatenation, so candle still hands each its gradient:
//! the op's backward returns the gradient of the concatenation and candle splits it.
//! `Llama::forward_hidden` routes here on CPU f32 without a cache; tests/fast_train.rs holds the
//! result and every gradient equal to the composed reference model's.
use super::attention::{Attention, Dims};
use super::linear::{adapter_backward, adapter_forward, weight_grad};
use super::{packed, slice, values, with_cpu};
use crate::engine::packed::{matmul_packed, matmul_packed_add, Packed};
use crate::engine::weights::PackCache;
use crate::model::llama::{Block, Linear};
use crate::model::ops::for_rows;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

const NAME: &str = "osp-block";

/// Rows per rayon task in the element-wise passes.
const ROWS: usize = 32;

/// What every layer of one forward shares: the batch shape, rotary tables and attention bias.
pub struct BlockContext {
    b: usize,
    t: usize,
    /// cos and sin [b, t, head_dim / 2].
    cos: Vec<f32>,
    sin: Vec<f32>,
    attention: Attention,
    eps: f32,
}

impl BlockContext {
    /// For `cos`/`sin` [b, t, hd/2] and an additive `bias` [b, 1, t, t] (no cached keys).
    pub fn new(cos: &Tensor, sin: &Tensor, bias: &Tensor, eps: f64) -> Result<Arc<Self>> {
        let (b, t, half) = cos.dims3()?;
        if sin.dims() != cos.dims() || bias.dims() != [b, 1, t, t] {
            candle_core::bail!(
                "{NAME}: rotary tables {:?}/{:?} and bias {:?} do not fit",
                cos.dims(),
                sin.dims(),
                bias.dims()
            );
        }
        Ok(Arc::new(Self {
            b,
            t,
            cos: values(cos)?,
            sin: values(sin)?,
            attention: Attention::new(Arc::new(values(bias)?), t, 1.0 / ((2 * half) as f32).sqrt()),
            eps: eps as f32,
        }))
    }
}

/// A tensor the op reads: a trained one is a slice of the flat parameter input (at this
/// offset), a constant one a copy of its values (norms, biases and frozen adapters: small;
/// frozen weights are read as packed panels instead).
enum Src {
    Const(Vec<f32>),
    Var(usize),
}

impl Src {
    fn get<'a>(&'a self, p: &'a [f32], len: usize) -> &'a [f32] {
        match self {
            Src::Const(v) => v,
            Src::Var(o) => &p[*o..*o + len],
        }
    }

    fn var(&self) -> Option<usize> {
        match self {
            Src::Var(o) => Some(*o),
            Src::Const(_) => None,
        }
    }
}

/// The trained tensors in the order they are concatenated.
#[derive(Default)]
struct Params {
    flat: Vec<Tensor>,
    len: usize,
}

impl Params {
    fn src(&mut self, t: &Tensor) -> Result<Src> {
        if !t.track_op() {
            return Ok(Src::Const(values(t)?));
        }
        let at = self.len;
        self.len += t.elem_count();
        self.flat.push(t.flatten_all()?);
        Ok(Src::Var(at))
    }
}

enum Weight {
    /// A constant weight's panels from the model's cache; the tensor, for Wᵀ's in backward.
    Frozen(Arc<Packed>, Tensor),
    /// A trained weight at this offset of the parameters.
    Trained(usize),
}

/// One projection y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ.
struct Lin {
    out: usize,
    inp: usize,
    w: Weight,
    bias: Option<Src>,
    /// A [r, inp], B [out, r], r, scale.
    lora: Option<(Src, Src, usize, f32)>,
}

impl Lin {
    fn new(l: &Linear, params: &mut Params, packs: &PackCache) -> Result<Self> {
        let (out, inp) = l.weight.dims2()?;
        let w = if l.weight.track_op() {
            let at = params.len;
            params.src(&l.weight)?;
            Weight::Trained(at)
        } else {
            Weight::Frozen(packed(packs, &l.weight, false, NAME)?, l.weight.clone())
        };
        let bias = l.bias.as_ref().map(|b| params.src(b)).transpose()?;
        let lora = match &l.lora {
            Some(a) => Some((
                params.src(&a.a)?,
                params.src(&a.b)?,
                a.a.dim(0)?,
                a.scale as f32,
            )),
            None => None,
        };
        Ok(Self {
            out,
            inp,
            w,
            bias,
            lora,
        })
    }

    /// y [m, out] for x [m, inp], and the adapter's x·Aᵀ [m, r] (backward reads it).
    fn forward(&self, x: &[f32], m: usize, p: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (out, inp) = (self.out, self.inp);
        let mut y = vec![0f32; m * out];
        match &self.w {
            Weight::Frozen(w, _) => matmul_packed(x, m, w, &mut y),
            Weight::Trained(o) => {
                let w = Packed::new(&p[*o..*o + out * inp], out, inp);
                matmul_packed(x, m, &w, &mut y)
            }
        }
        if let Some(b) = &self.bias {
            let b = b.get(p, out);
            for_rows(&mut y, out, |row, _| {
                row.iter_mut().zip(b).for_each(|(v, b)| *v += b)
            });
        }
        let t = match &self.lora {
            Some((a, bm, r, s)) => {
                let (a, bm) = (a.get(p, r * inp), bm.get(p, out * r));
                adapter_forward(x, a, bm, [m, inp, *r, out], *s, &mut y)
            }
            None => vec![],
        };
        (y, t)
    }

    /// dx = g·W (+ the adapter's term), added to `dx` with `add`; the trained tensors'
    /// gradients written to their places in `dp`. `x` and `t` are forward's input and x·Aᵀ.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        x: &[f32],
        t: &[f32],
        g: &[f32],
        m: usize,
        p: &[f32],
        dp: &mut [f32],
        dx: &mut [f32],
        add: bool,
        packs: &PackCache,
    ) -> Result<()> {
        let (out, inp) = (self.out, self.inp);
        let wt = match &self.w {
            Weight::Frozen(_, w) => packed(packs, w, true, NAME)?,
            Weight::Trained(o) => Arc::new(Packed::transposed(&p[*o..*o + out * inp], out, inp)),
        };
        if add {
            matmul_packed_add(g, m, &wt, dx);
        } else {
            matmul_packed(g, m, &wt, dx);
        }
        if let Weight::Trained(o) = self.w {
            weight_grad(g, x, [m, inp, out], &mut dp[o..o + out * inp]);
        }
        if let Some(o) = self.bias.as_ref().and_then(Src::var) {
            let db = &mut dp[o..o + out];
            for row in g.chunks(out) {
                db.iter_mut().zip(row).for_each(|(d, g)| *d += g);
            }
        }
        if let Some((a, bm, r, s)) = &self.lora {
            let (av, bv, r) = (a.get(p, r * inp), bm.get(p, out * r), *r);
            // dA and dB (small) computed apart, then placed in dp where they train.
            let mut da = a.var().map(|_| vec![0f32; r * inp]);
            let mut db = bm.var().map(|_| vec![0f32; out * r]);
            let grads = (da.as_deref_mut(), db.as_deref_mut());
            adapter_backward((x, t, g), (av, bv), [m, inp, r, out], *s, dx, grads);
            for (src, grad) in [(a, da), (bm, db)] {
                if let (Some(o), Some(grad)) = (src.var(), grad) {
                    dp[o..o + grad.len()].copy_from_slice(&grad);
                }
            }
        }
        Ok(())
    }
}

/// 1/rms of each row of x [m, n] and x·(1/rms)·w.
fn rms_forward(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let n = w.len();
    let mut y = vec![0f32; x.len()];
    let mut inv = vec![0f32; x.len() / n];
    y.par_chunks_mut(n * ROWS)
        .zip(inv.par_chunks_mut(ROWS))
        .zip(x.par_chunks(n * ROWS))
        .for_each(|((y, inv), x)| {
            for ((y, inv), x) in y.chunks_mut(n).zip(inv).zip(x.chunks(n)) {
                let ms = x.iter().map(|v| v * v).sum::<f32>() / n as f32;
                *inv = 1.0 / (ms + eps).sqrt();
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                    *y = x * *inv * w;
                }
            }
        });
    (inv, y)
}

/// RMSNorm's backward for output gradient g: dx += r·(g⊙w − x̂·mean(g⊙w⊙x̂)) with r = 1/rms
/// and x̂ = x·r; with `dw`, dw = Σ_rows g⊙x̂.
fn rms_backward(
    x: &[f32],
    inv: &[f32],
    w: &[f32],
    g: &[f32],
    dx: &mut [f32],
    dw: Option<&mut [f32]>,
) {
    let n = w.len();
    dx.par_chunks_mut(n * ROWS)
        .zip(x.par_chunks(n * ROWS).zip(g.par_chunks(n * ROWS)))
        .zip(inv.par_chunks(ROWS))
        .for_each(|((dx, (x, g)), inv)| {
            for (((dx, x), g), &r) in dx.chunks_mut(n).zip(x.chunks(n)).zip(g.chunks(n)).zip(inv) {
                let dot: f32 = (0..n).map(|i| g[i] * w[i] * x[i] * r).sum();
                let mean = dot / n as f32;
                for i in 0..n {
                    dx[i] += r * (g[i] * w[i] - x[i] * r * mean);
                }
            }
        });
    if let Some(dw) = dw {
        // Partial sums per fixed block of rows, added in block order: the same bits however
        // rayon splits the work (its `reduce` tree depends on scheduling).
        let partials: Vec<Vec<f32>> = x
            .par_chunks(n * ROWS)
            .zip(g.par_chunks(n * ROWS))
            .zip(inv.par_chunks(ROWS))
            .map(|((x, g), inv)| {
                let mut s = vec![0f32; n];
                for ((x, g), &r) in x.chunks(n).zip(g.chunks(n)).zip(inv) {
                    for i in 0..n {
                        s[i] += g[i] * x[i] * r;
                    }
                }
                s
            })
            .collect();
        let mut sums = vec![0f32; n];
        for part in &partials {
            sums.iter_mut().zip(part).for_each(|(a, b)| *a += b);
        }
        dw.copy_from_slice(&sums);
    }
}

/// Heads of rows [b·t, heads·hd] moved to [b, heads, t, hd], each vector rotated by its
/// position's angles (`rotate`: the rotary embedding), or copied.
fn to_heads(x: &[f32], ctx: &BlockContext, heads: usize, hd: usize, rotate: bool) -> Vec<f32> {
    let (b, t, half) = (ctx.b, ctx.t, hd / 2);
    let mut out = vec![0f32; b * heads * t * hd];
    out.par_chunks_mut(t * hd).enumerate().for_each(|(bh, o)| {
        let (bi, hi) = (bh / heads, bh % heads);
        for ti in 0..t {
            let src = &x[((bi * t + ti) * heads + hi) * hd..][..hd];
            let dst = &mut o[ti * hd..(ti + 1) * hd];
            if rotate {
                let at = (bi * t + ti) * half;
                rotate_into(
                    src,
                    dst,
                    &ctx.cos[at..at + half],
                    &ctx.sin[at..at + half],
                    1.0,
                );
            } else {
                dst.copy_from_slice(src);
            }
        }
    });
    out
}

/// The inverse of `to_heads`: [b, heads, t, hd] back to rows [b·t, heads·hd], rotated back by
/// the negated angles with `rotate` (the rotary embedding's backward).
fn from_heads(x: &[f32], ctx: &BlockContext, heads: usize, hd: usize, rotate: bool) -> Vec<f32> {
    let (t, half) = (ctx.t, hd / 2);
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(heads * hd)
        .enumerate()
        .for_each(|(row, o)| {
            let (bi, ti) = (row / t, row % t);
            let at = row * half;
            for hi in 0..heads {
                let src = &x[((bi * heads + hi) * t + ti) * hd..][..hd];
                let dst = &mut o[hi * hd..(hi + 1) * hd];
                if rotate {
                    let (c, s) = (&ctx.cos[at..at + half], &ctx.sin[at..at + half]);
                    rotate_into(src, dst, c, s, -1.0);
                } else {
                    dst.copy_from_slice(src);
                }
            }
        });
    out
}

/// Hugging Face's "rotate half" rotation of one head vector by angles (cos, sign·sin).
fn rotate_into(x: &[f32], o: &mut [f32], cos: &[f32], sin: &[f32], sign: f32) {
    let half = cos.len();
    for i in 0..half {
        let (c, s) = (cos[i], sign * sin[i]);
        let (x1, x2) = (x[i], x[i + half]);
        o[i] = x1 * c - x2 * s;
        o[i + half] = x2 * c + x1 * s;
    }
}

/// a + b, elementwise, into a new buffer.
fn sum(a: &[f32], b: &[f32]) -> Vec<f32> {
    let mut out = a.to_vec();
    add_into(&mut out, b);
    out
}

/// a += b, elementwise.
fn add_into(a: &mut [f32], b: &[f32]) {
    a.par_chunks_mut(1 << 14)
        .zip(b.par_chunks(1 << 14))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
}

/// What backward reads, kept by forward. Names follow the layer: h1/h2 the normed inputs of
/// the attention and the MLP, t_* each adapter's x·Aᵀ, q/k/v by heads (q and k rotated),
/// att the attention's output rows, x2 the residual stream between the two halves.
struct Saved {
    inv1: Vec<f32>,
    h1: Vec<f32>,
    t_q: Vec<f32>,
    t_k: Vec<f32>,
    t_v: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    stats: Vec<(f32, f32)>,
    t_o: Vec<f32>,
    x2: Vec<f32>,
    inv2: Vec<f32>,
    h2: Vec<f32>,
    t_gate: Vec<f32>,
    t_up: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
    t_down: Vec<f32>,
}

struct BlockOp {
    ctx: Arc<BlockContext>,
    packs: Arc<PackCache>,
    dim: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    norm1: Src,
    norm2: Src,
    q: Lin,
    k: Lin,
    v: Lin,
    o: Lin,
    gate: Lin,
    up: Lin,
    down: Lin,
    saved: Mutex<Option<Saved>>,
}

impl BlockOp {
    fn dims(&self) -> Dims {
        Dims {
            h: self.heads,
            kvh: self.kv_heads,
            t: self.ctx.t,
            tk: self.ctx.t,
            hd: self.head_dim,
        }
    }

    fn forward(&self, x: &[f32], p: &[f32]) -> (Vec<f32>, Saved) {
        let ctx = &*self.ctx;
        let (m, d, hd) = (ctx.b * ctx.t, self.dim, self.head_dim);
        let (inv1, h1) = rms_forward(x, self.norm1.get(p, d), ctx.eps);
        let (q, t_q) = self.q.forward(&h1, m, p);
        let (k, t_k) = self.k.forward(&h1, m, p);
        let (v, t_v) = self.v.forward(&h1, m, p);
        let q = to_heads(&q, ctx, self.heads, hd, true);
        let k = to_heads(&k, ctx, self.kv_heads, hd, true);
        let v = to_heads(&v, ctx, self.kv_heads, hd, false);
        let (att, stats) = ctx.attention.forward(&q, &k, &v, ctx.b, self.dims());
        let (o, t_o) = self.o.forward(&att, m, p);
        let x2 = sum(x, &o);
        let (inv2, h2) = rms_forward(&x2, self.norm2.get(p, d), ctx.eps);
        let (gate, t_gate) = self.gate.forward(&h2, m, p);
        let (up, t_up) = self.up.forward(&h2, m, p);
        let act = super::swiglu::forward(&gate, &up);
        let (down, t_down) = self.down.forward(&act, m, p);
        let out = sum(&x2, &down);
        let saved = Saved {
            inv1,
            h1,
            t_q,
            t_k,
            t_v,
            q,
            k,
            v,
            att,
            stats,
            t_o,
            x2,
            inv2,
            h2,
            t_gate,
            t_up,
            gate,
            up,
            act,
            t_down,
        };
        (out, saved)
    }

    /// dx and the parameters' gradient for the output's gradient g.
    fn backward(&self, s: &Saved, x: &[f32], p: &[f32], g: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let ctx = &*self.ctx;
        let (m, d, hd) = (ctx.b * ctx.t, self.dim, self.head_dim);
        let packs = &*self.packs;
        let mut dp = vec![0f32; p.len()];
        // MLP half: out = x2 + down(swiglu(gate(h2), up(h2))).
        let mut d_act = vec![0f32; s.act.len()];
        let down = &self.down;
        down.backward(
            &s.act, &s.t_down, g, m, p, &mut dp, &mut d_act, false, packs,
        )?;
        let (d_gate, d_up) = super::swiglu::backward(&s.gate, &s.up, &d_act);
        drop(d_act);
        let mut dh2 = vec![0f32; m * d];
        let gate = &self.gate;
        gate.backward(
            &s.h2, &s.t_gate, &d_gate, m, p, &mut dp, &mut dh2, false, packs,
        )?;
        let up = &self.up;
        up.backward(&s.h2, &s.t_up, &d_up, m, p, &mut dp, &mut dh2, true, packs)?;
        let mut dx2 = g.to_vec();
        let (w2, dw2) = (self.norm2.get(p, d), self.norm2.var());
        rms_backward(
            &s.x2,
            &s.inv2,
            w2,
            &dh2,
            &mut dx2,
            dw2.map(|o| &mut dp[o..o + d]),
        );
        // Attention half: x2 = x + o(attention(rope(q(h1)), rope(k(h1)), v(h1))).
        let mut d_att = vec![0f32; s.att.len()];
        let o = &self.o;
        o.backward(
            &s.att, &s.t_o, &dx2, m, p, &mut dp, &mut d_att, false, packs,
        )?;
        let (dq, dk, dv) =
            ctx.attention
                .backward(&s.q, &s.k, &s.v, &s.att, &d_att, &s.stats, self.dims());
        drop(d_att);
        let dq = from_heads(&dq, ctx, self.heads, hd, true);
        let dk = from_heads(&dk, ctx, self.kv_heads, hd, true);
        let dv = from_heads(&dv, ctx, self.kv_heads, hd, false);
        let mut dh1 = vec![0f32; m * d];
        let (q, k, v) = (&self.q, &self.k, &self.v);
        q.backward(&s.h1, &s.t_q, &dq, m, p, &mut dp, &mut dh1, false, packs)?;
        k.backward(&s.h1, &s.t_k, &dk, m, p, &mut dp, &mut dh1, true, packs)?;
        v.backward(&s.h1, &s.t_v, &dv, m, p, &mut dp, &mut dh1, true, packs)?;
        let mut dx = dx2;
        let (w1, dw1) = (self.norm1.get(p, d), self.norm1.var());
        rms_backward(
            x,
            &s.inv1,
            w1,
            &dh1,
            &mut dx,
            dw1.map(|o| &mut dp[o..o + d]),
        );
        Ok((dx, dp))
    }
}

impl CustomOp2 for BlockOp {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, NAME)?;
        let p = slice(s2, l2, NAME)?;
        let (out, saved) = self.forward(x, p);
        *self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{NAME}: saved state poisoned")))? =
            Some(saved);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let saved = self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{NAME}: saved state poisoned")))?;
        let s = saved
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg(format!("{NAME}: backward before forward")))?;
        let grad = grad.contiguous()?;
        let (dx, dp) = with_cpu(x, |x| {
            with_cpu(p, |p| with_cpu(&grad, |g| self.backward(s, x, p, g)))
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            p.track_op()
                .then(|| Tensor::from_vec(dp, p.shape(), dev))
                .transpose()?,
        ))
    }
}

/// Whether `layer` can run as one op: CPU f32 weights, no adapter dropout in effect (its mask
/// is drawn by the composed path), no snapshot's materialised transposes.
pub(crate) fn supports(layer: &Block) -> bool {
    let a = &layer.self_attn;
    let m = &layer.mlp;
    [
        &a.q_proj,
        &a.k_proj,
        &a.v_proj,
        &a.o_proj,
        &m.gate_proj,
        &m.up_proj,
        &m.down_proj,
    ]
    .iter()
    .all(|l| l.fusable())
        && super::applies(&layer.input_layernorm)
        && super::applies(&layer.post_attention_layernorm)
}

/// The decoder layer `layer` on hidden states x [b, t, d]; differentiable in x and in every
/// trained tensor of the layer.
pub(crate) fn block(
    x: &Tensor,
    layer: &Block,
    ctx: &Arc<BlockContext>,
    packs: &Arc<PackCache>,
) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    if (b, t) != (ctx.b, ctx.t) || x.dtype() != DType::F32 {
        candle_core::bail!("{NAME}: input {:?} does not fit the context", x.dims());
    }
    let a = &layer.self_attn;
    let mut params = Params::default();
    let norm1 = params.src(&layer.input_layernorm)?;
    let (q, k, v, o) = (
        Lin::new(&a.q_proj, &mut params, packs)?,
        Lin::new(&a.k_proj, &mut params, packs)?,
        Lin::new(&a.v_proj, &mut params, packs)?,
        Lin::new(&a.o_proj, &mut params, packs)?,
    );
    let norm2 = params.src(&layer.post_attention_layernorm)?;
    let mlp = &layer.mlp;
    let (gate, up, down) = (
        Lin::new(&mlp.gate_proj, &mut params, packs)?,
        Lin::new(&mlp.up_proj, &mut params, packs)?,
        Lin::new(&mlp.down_proj, &mut params, packs)?,
    );
    let hd = a.head_dim;
    let fits = q.inp == d
        && q.out == a.heads * hd
        && k.out == a.kv_heads * hd
        && v.out == a.kv_heads * hd
        && o.inp == a.heads * hd
        && o.out == d
        && up.out == gate.out
        && down.inp == gate.out
        && down.out == d
        && 2 * ctx.cos.len() == b * t * hd;
    if !fits {
        candle_core::bail!("{NAME}: the layer's shapes do not fit input {:?}", x.dims());
    }
    let flat = if params.flat.is_empty() {
        // Nothing in the layer trains: a placeholder keeps the op's arity.
        Tensor::zeros(1, DType::F32, x.device())?
    } else {
        Tensor::cat(&params.flat, 0)?
    };
    let op = BlockOp {
        ctx: ctx.clone(),
        packs: packs.clone(),
        dim: d,
        heads: a.heads,
        kv_heads: a.kv_heads,
        head_dim: hd,
        norm1,
        norm2,
        q,
        k,
        v,
        o,
        gate,
        up,
        down,
        saved: Mutex::new(None),
    };
    x.contiguous()?.apply_op2(&flat, op)
}
