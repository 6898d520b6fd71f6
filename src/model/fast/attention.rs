//! Causal grouped-query attention, fused forward and backward.
//!
//! Each (sequence, kv head) group is one rayon task: the n_rep query heads that share a kv
//! head read its K and V in place (no repeated copies) and its dK/dV accumulate without locks.
//! Within a task the products are gemm calls over the group's [n_rep·t, T] scores, which
//! live only while the task runs. Forward keeps only each query row's softmax max and 1/sum;
//! backward recomputes the probabilities from them instead of storing [T, T] matrices.
use super::{cols, mm, rows, slice, values};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;

/// Products inside a rayon task run on its thread.
const ONE: Parallelism = Parallelism::None;
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

    /// The group's probabilities [n_rep·t, T] for its queries qg [n_rep·t, hd] and keys
    /// kg [T, hd]: softmax over the keys a row's bias does not hide (over all keys, as the
    /// composed softmax does, for a row that hides every key). With `stats` given, rows are
    /// normalised by the saved (max, 1/sum); otherwise the row stats are computed and returned.
    fn probs(
        &self,
        d: Dims,
        bi: usize,
        qg: &[f32],
        kg: &[f32],
        stats: Option<&[(f32, f32)]>,
    ) -> (Vec<f32>, Vec<(f32, f32)>) {
        let n = d.n_rep() * d.t;
        let mut p = vec![0f32; n * d.tk];
        mm(
            &mut p,
            [n, d.tk, d.hd],
            rows(qg, d.hd),
            cols(kg, d.hd),
            self.scale,
            false,
            ONE,
        );
        let mut out_stats = Vec::with_capacity(if stats.is_some() { 0 } else { n });
        for (row, s) in p.chunks_mut(d.tk).enumerate() {
            let i = row % d.t;
            let (brow, any) = self.visible(d, bi, i);
            for (x, &bj) in s.iter_mut().zip(brow) {
                *x = if !any || bj > HIDDEN {
                    *x + bj
                } else {
                    f32::NEG_INFINITY
                };
            }
            let (max, inv) = match stats {
                Some(st) => st[row],
                None => {
                    let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let sum: f32 = s
                        .iter_mut()
                        .map(|x| {
                            *x = (*x - max).exp();
                            *x
                        })
                        .sum();
                    let inv = 1.0 / sum;
                    out_stats.push((max, inv));
                    for x in s.iter_mut() {
                        *x *= inv;
                    }
                    continue;
                }
            };
            for x in s.iter_mut() {
                *x = (*x - max).exp() * inv;
            }
        }
        (p, out_stats)
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
                let n = n_rep * t;
                let qg = &q[gi * n * hd..(gi + 1) * n * hd];
                let (p, stats) = self.probs(d, bi, qg, kg, None);
                let mut out = vec![0f32; n * hd];
                mm(
                    &mut out,
                    [n, hd, tk],
                    rows(&p, tk),
                    rows(vg, hd),
                    1.0,
                    false,
                    ONE,
                );
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
                let n = n_rep * t;
                let qg = &qv[gi * n * hd..(gi + 1) * n * hd];
                let st = &stats[gi * n..(gi + 1) * n];
                let (mut p, _) = self.probs(d, bi, qg, kg, Some(st));
                // The group's dO and O as [n_rep·t, hd], gathered from [b, t, h, hd].
                let mut dog = vec![0f32; n * hd];
                let mut delta = vec![0f32; n];
                for r in 0..n_rep {
                    let head = (gi % kvh) * n_rep + r;
                    for i in 0..t {
                        let at = ((bi * t + i) * h + head) * hd;
                        let row = r * t + i;
                        dog[row * hd..(row + 1) * hd].copy_from_slice(&go[at..at + hd]);
                        delta[row] = go[at..at + hd]
                            .iter()
                            .zip(&o[at..at + hd])
                            .map(|(a, b)| a * b)
                            .sum();
                    }
                }
                // dV = Pᵀ·dO; dP = dO·Vᵀ; dS = P⊙(dP − δ)·scale; dQ = dS·K; dK = dSᵀ·Q.
                mm(
                    dvg,
                    [tk, hd, n],
                    cols(&p, tk),
                    rows(&dog, hd),
                    1.0,
                    false,
                    ONE,
                );
                let mut dp = vec![0f32; n * tk];
                mm(
                    &mut dp,
                    [n, tk, hd],
                    rows(&dog, hd),
                    cols(vg, hd),
                    1.0,
                    false,
                    ONE,
                );
                for ((prow, dprow), &dl) in p.chunks_mut(tk).zip(dp.chunks(tk)).zip(&delta) {
                    for (x, &dpx) in prow.iter_mut().zip(dprow) {
                        *x *= (dpx - dl) * self.scale;
                    }
                }
                mm(
                    dqg,
                    [n, hd, tk],
                    rows(&p, tk),
                    rows(kg, hd),
                    1.0,
                    false,
                    ONE,
                );
                mm(
                    dkg,
                    [tk, hd, n],
                    cols(&p, tk),
                    rows(qg, hd),
                    1.0,
                    false,
                    ONE,
                );
            });
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}
