//! Causal grouped-query attention, fused forward and backward.
//!
//! Each (sequence, kv head) group is one rayon task: the n_rep query heads that share a kv
//! head read its K and V in place (no repeated copies) and its dK/dV accumulate without locks.
//! Within a task the products are gemm calls over the group's [n_rep·t, T] scores, which
//! live only while the task runs. Forward keeps only each query row's softmax max and 1/sum;
//! backward recomputes the probabilities from them instead of storing [T, T] matrices.
use super::{cols, mm, rows, slice, values};
use crate::engine::math;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;

/// Products inside a rayon task run on its thread.
const ONE: Parallelism = Parallelism::None;
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// An additive bias at or below this hides the key (the model's mask is −1e30).
const HIDDEN: f32 = -1e29;

/// Query rows per block: each block's products stop at the last key any of its rows sees,
/// which skips most of a causal mask's hidden upper triangle.
const ROW_BLOCK: usize = 32;

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
    let op = Attention::new(Arc::new(values(bias)?), tk, scale);
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

pub(super) struct Attention {
    /// [b, t, T] additive bias.
    bias: Arc<Vec<f32>>,
    /// Per bias row: one past the last key it does not hide, None when it hides every key.
    ends: Vec<Option<usize>>,
    scale: f32,
    /// Per query row (b, h, t): the softmax's max and 1/sum, saved by forward for backward.
    stats: Arc<Mutex<Vec<(f32, f32)>>>,
}

/// One (sequence, kv head) task's outputs [n_rep, t, hd] and its rows' (max, 1/sum).
type Group = (Vec<f32>, Vec<(f32, f32)>);

/// Sizes of one call.
#[derive(Clone, Copy)]
pub(super) struct Dims {
    pub(super) h: usize,
    pub(super) kvh: usize,
    pub(super) t: usize,
    pub(super) tk: usize,
    pub(super) hd: usize,
}

impl Dims {
    fn n_rep(&self) -> usize {
        self.h / self.kvh
    }
}

impl Attention {
    /// The kernel for an additive bias [b, t, T] (rows of `tk` keys) and score scale; `block`
    /// keeps the row statistics itself.
    pub(super) fn new(bias: Arc<Vec<f32>>, tk: usize, scale: f32) -> Self {
        let ends = bias
            .chunks(tk.max(1))
            .map(|row| row.iter().rposition(|&x| x > HIDDEN).map(|last| last + 1))
            .collect();
        Self {
            bias,
            ends,
            scale,
            stats: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// The keys query row `i` of sequence `bi` attends to: those its bias does not hide, or
    /// all keys when every one is hidden (a padding row), where the composed softmax is uniform.
    fn visible(&self, d: Dims, bi: usize, i: usize) -> (&[f32], bool) {
        let at = bi * d.t + i;
        (
            &self.bias[at * d.tk..(at + 1) * d.tk],
            self.ends[at].is_some(),
        )
    }

    /// Keys past the last one any of rows r0..r1 of a group sees are hidden from all of them
    /// (a causal mask's upper triangle), so products over these rows stop at this count.
    fn key_span(&self, d: Dims, bi: usize, r0: usize, r1: usize) -> usize {
        (r0..r1)
            .map(|row| self.ends[bi * d.t + row % d.t].unwrap_or(d.tk))
            .max()
            .unwrap_or(0)
    }

    /// Probabilities [r1 − r0, span] of a group's query rows r0..r1 (qg [n_rep·t, hd]) over its
    /// first `span` keys (kg [T, hd]; the rest are hidden from these rows): softmax over the keys
    /// a row's bias does not hide (over all keys, as the composed softmax does, for a row that
    /// hides every key). With `stats` (the group's rows), rows are normalised by the saved
    /// (max, 1/sum); otherwise the rows' stats are computed and returned.
    #[allow(clippy::too_many_arguments)]
    fn probs(
        &self,
        d: Dims,
        bi: usize,
        qg: &[f32],
        kg: &[f32],
        (r0, r1, span): (usize, usize, usize),
        stats: Option<&[(f32, f32)]>,
    ) -> (Vec<f32>, Vec<(f32, f32)>) {
        let n = r1 - r0;
        let mut p = vec![0f32; n * span];
        mm(
            &mut p,
            [n, span, d.hd],
            rows(&qg[r0 * d.hd..r1 * d.hd], d.hd),
            cols(&kg[..span * d.hd], d.hd),
            self.scale,
            false,
            ONE,
        );
        let mut out_stats = Vec::with_capacity(if stats.is_some() { 0 } else { n });
        for (ri, s) in p.chunks_mut(span.max(1)).enumerate() {
            let row = r0 + ri;
            let (brow, any) = self.visible(d, bi, row % d.t);
            let brow = &brow[..span];
            for (x, &bj) in s.iter_mut().zip(brow) {
                *x = if !any || bj > HIDDEN {
                    *x + bj
                } else {
                    f32::NEG_INFINITY
                };
            }
            let inv = match stats {
                Some(st) => {
                    math::exp_shifted(s, st[row].0);
                    st[row].1
                }
                None => {
                    let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let inv = 1.0 / math::exp_shifted(s, max);
                    out_stats.push((max, inv));
                    inv
                }
            };
            // The vectorised exp floors at ~1e-38; hidden keys get exactly zero.
            for (x, &bj) in s.iter_mut().zip(brow) {
                *x = if !any || bj > HIDDEN { *x * inv } else { 0.0 };
            }
        }
        (p, out_stats)
    }

    /// Outputs [b, t, h, hd] and each query row's (max, 1/sum) in (b, h, t) order, for q
    /// [b, h, t, hd] and k, v [b, kvh, T, hd].
    pub(super) fn forward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        b: usize,
        d: Dims,
    ) -> (Vec<f32>, Vec<(f32, f32)>) {
        let Dims { h, kvh, t, tk, hd } = d;
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
                let mut out = vec![0f32; n * hd];
                let mut stats = Vec::with_capacity(n);
                for r0 in (0..n).step_by(ROW_BLOCK) {
                    let r1 = (r0 + ROW_BLOCK).min(n);
                    let span = self.key_span(d, bi, r0, r1);
                    let (p, st) = self.probs(d, bi, qg, kg, (r0, r1, span), None);
                    mm(
                        &mut out[r0 * hd..r1 * hd],
                        [r1 - r0, hd, span],
                        rows(&p, span),
                        rows(vg, hd),
                        1.0,
                        false,
                        ONE,
                    );
                    stats.extend(st);
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
        (out, all_stats)
    }

    /// dq, dk, dv for the inputs of `forward`, its output o [b, t, h, hd] and row `stats`,
    /// and the output's gradient go.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(
        &self,
        qv: &[f32],
        kv: &[f32],
        vv: &[f32],
        o: &[f32],
        go: &[f32],
        stats: &[(f32, f32)],
        d: Dims,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let Dims { h, kvh, t, tk, hd } = d;
        let n_rep = d.n_rep();
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
                // Per block of query rows, over the keys they see: dV += Pᵀ·dO; dP = dO·Vᵀ;
                // dS = P⊙(dP − δ)·scale; dQ = dS·K; dK += dSᵀ·Q.
                for r0 in (0..n).step_by(ROW_BLOCK) {
                    let r1 = (r0 + ROW_BLOCK).min(n);
                    let (nb, span) = (r1 - r0, self.key_span(d, bi, r0, r1));
                    let (mut p, _) = self.probs(d, bi, qg, kg, (r0, r1, span), Some(st));
                    let dob = &dog[r0 * hd..r1 * hd];
                    let (dvs, dks) = (&mut dvg[..span * hd], &mut dkg[..span * hd]);
                    mm(
                        dvs,
                        [span, hd, nb],
                        cols(&p, span),
                        rows(dob, hd),
                        1.0,
                        true,
                        ONE,
                    );
                    let mut dp = vec![0f32; nb * span];
                    mm(
                        &mut dp,
                        [nb, span, hd],
                        rows(dob, hd),
                        cols(vg, hd),
                        1.0,
                        false,
                        ONE,
                    );
                    let rows_delta = p.chunks_mut(span.max(1)).zip(dp.chunks(span.max(1)));
                    for ((prow, dprow), &dl) in rows_delta.zip(&delta[r0..r1]) {
                        for (x, &dpx) in prow.iter_mut().zip(dprow) {
                            *x *= (dpx - dl) * self.scale;
                        }
                    }
                    let dqb = &mut dqg[r0 * hd..r1 * hd];
                    mm(
                        dqb,
                        [nb, hd, span],
                        rows(&p, span),
                        rows(kg, hd),
                        1.0,
                        false,
                        ONE,
                    );
                    let qb = &qg[r0 * hd..r1 * hd];
                    mm(
                        dks,
                        [span, hd, nb],
                        cols(&p, span),
                        rows(qb, hd),
                        1.0,
                        true,
                        ONE,
                    );
                }
            });
        (dq, dk, dv)
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
        let (out, all_stats) = self.forward(q, k, v, b, d);
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
        let stats = self
            .stats
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention stats poisoned".into()))?;
        if stats.len() != b * h * t {
            candle_core::bail!("attention backward: forward statistics are missing");
        }
        let (qv, kv, vv) = (values(q)?, values(k)?, values(v)?);
        let (o, go) = (values(res)?, values(grad)?);
        let (dq, dk, dv) = self.backward(&qv, &kv, &vv, &o, &go, &stats, d);
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}
