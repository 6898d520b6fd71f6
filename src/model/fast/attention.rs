//! Causal grouped-query attention, fused forward and backward.
//!
//! Each (sequence, kv head) group is one rayon task: the n_rep query heads that share a kv
//! head read its K and V in place (no repeated copies) and its dK/dV accumulate without locks.
//! Forward keeps only each query row's softmax max and 1/sum; backward recomputes the row's
//! probabilities from them instead of storing [T, T] matrices.
use super::{axpy, dot, slice, values};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// An additive bias at or below this hides the key (the model's mask is −1e30).
const HIDDEN: f32 = -1e29;

/// softmax(q·kᵀ·scale + bias)·v for q [b, h, t, hd], k and v [b, kvh, T, hd] (h a multiple of
/// kvh; query head i reads kv head i / (h / kvh)) and an additive bias [b, 1, t, T]. Returns
/// [b, t, h, hd], the layout the output projection reads. Differentiable in q, k and v.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f32) -> Result<Tensor> {
    let (b, h, t, hd) = q.dims4()?;
    let (bk, kvh, tk, hdk) = k.dims4()?;
    if bk != b || hdk != hd || v.dims() != k.dims() || kvh == 0 || h % kvh != 0 {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if bias.dims() != [b, 1, t, tk] {
        candle_core::bail!(
            "attention: bias {:?}, expected {:?}",
            bias.dims(),
            [b, 1, t, tk]
        );
    }
    let op = Attention {
        bias: Arc::new(values(bias)?),
        scale,
        stats: Arc::new(Mutex::new(Vec::new())),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

struct Attention {
    /// [b, t, T] additive bias.
    bias: Arc<Vec<f32>>,
    scale: f32,
    /// Per query row (b, h, t): the softmax's max and 1/sum, saved by forward for backward.
    stats: Arc<Mutex<Vec<(f32, f32)>>>,
}

/// One (sequence, kv head) task's outputs [n_rep, t, hd] and its rows' (max, 1/sum).
type Group = (Vec<f32>, Vec<(f32, f32)>);

/// Sizes of one call.
#[derive(Clone, Copy)]
struct Dims {
    h: usize,
    kvh: usize,
    t: usize,
    tk: usize,
    hd: usize,
}

impl Dims {
    fn n_rep(&self) -> usize {
        self.h / self.kvh
    }
}

impl Attention {
    /// The keys query row `i` of sequence `bi` attends to: those its bias does not hide, or
    /// all keys when every one is hidden (a padding row), where the composed softmax is uniform.
    fn visible(&self, d: Dims, bi: usize, i: usize) -> (&[f32], bool) {
        let row = &self.bias[(bi * d.t + i) * d.tk..(bi * d.t + i + 1) * d.tk];
        let any = row.iter().any(|&x| x > HIDDEN);
        (row, any)
    }

    /// Scores s_j = q·k_j·scale + bias_j for the visible keys (others −∞) into `s`.
    fn scores(&self, d: Dims, qrow: &[f32], kg: &[f32], brow: &[f32], any: bool, s: &mut [f32]) {
        for j in 0..d.tk {
            s[j] = if !any || brow[j] > HIDDEN {
                dot(qrow, &kg[j * d.hd..(j + 1) * d.hd]) * self.scale + brow[j]
            } else {
                f32::NEG_INFINITY
            };
        }
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "osp-fused-attention"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            slice(s1, l1, self.name())?,
            slice(s2, l2, self.name())?,
            slice(s3, l3, self.name())?,
        );
        let (b, h, t, hd) = l1.shape().dims4()?;
        let (_, kvh, tk, _) = l2.shape().dims4()?;
        let d = Dims { h, kvh, t, tk, hd };
        let n_rep = d.n_rep();
        // One task per (sequence, kv head): its heads' outputs [n_rep, t, hd] and row stats.
        let groups: Vec<Group> = (0..b * kvh)
            .into_par_iter()
            .map(|gi| {
                let bi = gi / kvh;
                let kg = &k[gi * tk * hd..(gi + 1) * tk * hd];
                let vg = &v[gi * tk * hd..(gi + 1) * tk * hd];
                let mut out = vec![0f32; n_rep * t * hd];
                let mut stats = Vec::with_capacity(n_rep * t);
                let mut s = vec![0f32; tk];
                for r in 0..n_rep {
                    let head = (gi % kvh) * n_rep + r;
                    for i in 0..t {
                        let qrow = &q[((bi * h + head) * t + i) * hd..][..hd];
                        let (brow, any) = self.visible(d, bi, i);
                        self.scores(d, qrow, kg, brow, any, &mut s);
                        let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        let mut sum = 0f32;
                        for x in s.iter_mut() {
                            *x = (*x - max).exp();
                            sum += *x;
                        }
                        let inv = 1.0 / sum;
                        let o = &mut out[(r * t + i) * hd..][..hd];
                        for (j, &p) in s.iter().enumerate() {
                            if p != 0.0 {
                                axpy(o, p * inv, &vg[j * hd..(j + 1) * hd]);
                            }
                        }
                        stats.push((max, inv));
                    }
                }
                (out, stats)
            })
            .collect();
        // Scatter into [b, t, h, hd]; keep the stats in (b, h, t) order.
        let mut out = vec![0f32; b * t * h * hd];
        let mut all_stats = vec![(0f32, 0f32); b * h * t];
        for (gi, (o, st)) in groups.into_iter().enumerate() {
            let (bi, g) = (gi / kvh, gi % kvh);
            for r in 0..n_rep {
                let head = g * n_rep + r;
                for i in 0..t {
                    out[((bi * t + i) * h + head) * hd..][..hd]
                        .copy_from_slice(&o[(r * t + i) * hd..][..hd]);
                    all_stats[(bi * h + head) * t + i] = st[r * t + i];
                }
            }
        }
        *self
            .stats
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention stats poisoned".into()))? = all_stats;
        Ok((CpuStorage::F32(out), Shape::from((b, t, h, hd))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, h, t, hd) = q.dims4()?;
        let (_, kvh, tk, _) = k.dims4()?;
        let d = Dims { h, kvh, t, tk, hd };
        let n_rep = d.n_rep();
        let stats = self
            .stats
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention stats poisoned".into()))?
            .clone();
        if stats.len() != b * h * t {
            candle_core::bail!("attention backward: forward statistics are missing");
        }
        let (qv, kv, vv) = (values(q)?, values(k)?, values(v)?);
        let (o, go) = (values(res)?, values(grad)?);
        let mut dq = vec![0f32; qv.len()];
        let mut dk = vec![0f32; kv.len()];
        let mut dv = vec![0f32; vv.len()];
        dq.par_chunks_mut(n_rep * t * hd)
            .zip(dk.par_chunks_mut(tk * hd).zip(dv.par_chunks_mut(tk * hd)))
            .enumerate()
            .for_each(|(gi, (dqg, (dkg, dvg)))| {
                let bi = gi / kvh;
                let kg = &kv[gi * tk * hd..(gi + 1) * tk * hd];
                let vg = &vv[gi * tk * hd..(gi + 1) * tk * hd];
                let mut s = vec![0f32; tk];
                for r in 0..n_rep {
                    let head = (gi % kvh) * n_rep + r;
                    for i in 0..t {
                        let qrow = &qv[((bi * h + head) * t + i) * hd..][..hd];
                        let at = ((bi * t + i) * h + head) * hd;
                        let (orow, grow) = (&o[at..at + hd], &go[at..at + hd]);
                        let (max, inv) = stats[(bi * h + head) * t + i];
                        let (brow, any) = self.visible(d, bi, i);
                        self.scores(d, qrow, kg, brow, any, &mut s);
                        // dS_j = P_j (dO·v_j − dO·O); dq += dS·k·scale, dk_j += dS_j·q·scale.
                        let delta = dot(grow, orow);
                        let dqrow = &mut dqg[(r * t + i) * hd..][..hd];
                        for j in 0..tk {
                            let p = (s[j] - max).exp() * inv;
                            if p == 0.0 {
                                continue;
                            }
                            let vj = &vg[j * hd..(j + 1) * hd];
                            axpy(&mut dvg[j * hd..(j + 1) * hd], p, grow);
                            let ds = p * (dot(grow, vj) - delta) * self.scale;
                            axpy(dqrow, ds, &kg[j * hd..(j + 1) * hd]);
                            axpy(&mut dkg[j * hd..(j + 1) * hd], ds, qrow);
                        }
                    }
                }
            });
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}
