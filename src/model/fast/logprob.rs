//! log softmax(h·Wᵀ)[target] for selected rows, without materialising [tokens, vocab] logits.
//!
//! Rows are processed in chunks of `ROWS`: one gemm gives the chunk's logits over the whole
//! vocabulary (ROWS × vocab floats, 25 MB at vocab 49,152), a row pass turns them into the
//! target's log-probability, and the chunk buffer is reused. Backward recomputes the chunk's
//! logits, forms dlogits = g·(onehot − softmax) in place and multiplies it out into dh (and dW
//! when the head is trained), so neither pass keeps more than one chunk of logits.
use super::{cols, mm, pack_cache, packed, rows, slice, threads};
use crate::engine::math::exp_shifted;
use crate::engine::packed::{matmul_packed, Packed};
use crate::engine::weights::PackCache;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// Rows per chunk: enough for an efficient gemm, small enough to stay in a few tens of MB.
const ROWS: usize = 128;

/// Log-probabilities [n] of `targets` under the head `w` [vocab, d] for the hidden states
/// `h` [n, d]: entry i is log softmax(h_i·Wᵀ)[y] for each (i, y) in `selected`, 0 for rows
/// not selected (which get no gradient). Differentiable in h, and in w when w is tracked.
///
/// A frozen head's products use the inference engine's panel-packed W (forward) and Wᵀ
/// (backward, packed when first needed) from `packs`, the model's cache: the tied embedding
/// is packed once per run, not per chunk.
pub fn target_logprobs(
    h: &Tensor,
    w: &Tensor,
    selected: &[(usize, u32)],
    packs: Option<&Arc<PackCache>>,
) -> Result<Tensor> {
    let (n, d) = h.dims2()?;
    let (vocab, dw) = w.dims2()?;
    if d != dw {
        candle_core::bail!(
            "target_logprobs: hidden {:?} vs head {:?}",
            h.dims(),
            w.dims()
        );
    }
    for &(row, y) in selected {
        if row >= n || y as usize >= vocab {
            candle_core::bail!(
                "target_logprobs: row {row} / token {y} outside {n} rows / vocab {vocab}"
            );
        }
    }
    let w = w.contiguous()?;
    let head_grad = w.track_op();
    let frozen = if head_grad {
        None
    } else {
        let packs = pack_cache(packs);
        Some((packed(&packs, &w, false, "target_logprobs")?, packs))
    };
    let op = TargetLogprobs {
        selected: Arc::new(selected.to_vec()),
        head_grad,
        frozen,
    };
    h.contiguous()?.apply_op2(&w, op)
}

/// A frozen head's W and Wᵀ, packed.
type PackedHead = Option<(Arc<Packed>, Arc<Packed>)>;

struct TargetLogprobs {
    selected: Arc<Vec<(usize, u32)>>,
    /// Whether the head is trained (a frozen head's gradient is never computed).
    head_grad: bool,
    /// A frozen head: W packed, and the cache that packs Wᵀ when backward first runs.
    frozen: Option<(Arc<Packed>, Arc<PackCache>)>,
}

/// logits [r, vocab] = hc [r, d] · Wᵀ.
fn logits(hc: &[f32], w: &[f32], packed: Option<&Packed>, r: usize, d: usize, out: &mut [f32]) {
    let vocab = w.len() / d.max(1);
    match packed {
        Some(wp) => matmul_packed(hc, r, wp, out),
        None => mm(
            out,
            [r, vocab, d],
            rows(hc, d),
            cols(w, d),
            1.0,
            false,
            threads(),
        ),
    }
}

/// Copies the chunk's selected hidden rows into a dense [r, d] buffer.
fn gather(h: &[f32], chunk: &[(usize, u32)], d: usize) -> Vec<f32> {
    let mut hc = Vec::with_capacity(chunk.len() * d);
    for &(row, _) in chunk {
        hc.extend_from_slice(&h[row * d..(row + 1) * d]);
    }
    hc
}

/// Turns a row of logits into exp(x − max) in place (the engine's vectorised exp) and returns
/// (max, Σ exp(x − max)).
fn exp_row(x: &mut [f32]) -> (f32, f32) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    (max, exp_shifted(x, max))
}

impl CustomOp2 for TargetLogprobs {
    fn name(&self) -> &'static str {
        "osp-target-logprobs"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let h = slice(s1, l1, self.name())?;
        let w = slice(s2, l2, self.name())?;
        let (n, d) = l1.shape().dims2()?;
        let vocab = l2.shape().dims2()?.0;
        let mut out = vec![0f32; n];
        let mut buf = vec![0f32; ROWS * vocab];
        let wp = self.frozen.as_ref().map(|(wp, _)| &**wp);
        for chunk in self.selected.chunks(ROWS) {
            let r = chunk.len();
            let hc = gather(h, chunk, d);
            logits(&hc, w, wp, r, d, &mut buf[..r * vocab]);
            let lp: Vec<f32> = buf[..r * vocab]
                .par_chunks_mut(vocab)
                .zip(chunk.par_iter())
                .map(|(row, &(_, y))| {
                    let target = row[y as usize];
                    let (max, sum) = exp_row(row);
                    target - max - sum.ln()
                })
                .collect();
            for (&(i, _), v) in chunk.iter().zip(lp) {
                out[i] = v;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }
    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, d) = h.dims2()?;
        let vocab = w.dim(0)?;
        let packed = match &self.frozen {
            Some((wp, packs)) => Some((wp.clone(), packed(packs, w, true, self.name())?)),
            None => None,
        };
        let both = h.apply_op3_no_bwd(
            w,
            &grad.contiguous()?,
            &TargetLogprobsBwd {
                selected: self.selected.clone(),
                head_grad: self.head_grad,
                packed,
            },
        )?;
        let dh = both.narrow(0, 0, n * d)?.reshape((n, d))?;
        let dw = if self.head_grad {
            Some(both.narrow(0, n * d, vocab * d)?.reshape((vocab, d))?)
        } else {
            None
        };
        Ok((Some(dh), dw))
    }
}

/// dh [n, d] followed by dW [vocab, d] (when the head is trained), flat.
struct TargetLogprobsBwd {
    selected: Arc<Vec<(usize, u32)>>,
    head_grad: bool,
    packed: PackedHead,
}

impl CustomOp3 for TargetLogprobsBwd {
    fn name(&self) -> &'static str {
        "osp-target-logprobs-bwd"
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
        let h = slice(s1, l1, self.name())?;
        let w = slice(s2, l2, self.name())?;
        let g = slice(s3, l3, self.name())?;
        let (n, d) = l1.shape().dims2()?;
        let vocab = l2.shape().dims2()?.0;
        let head = if self.head_grad { vocab * d } else { 0 };
        let mut out = vec![0f32; n * d + head];
        let (dh, dw) = out.split_at_mut(n * d);
        let mut buf = vec![0f32; ROWS * vocab];
        let mut first = true;
        let wp = self.packed.as_ref().map(|(wp, _)| &**wp);
        for chunk in self.selected.chunks(ROWS) {
            let r = chunk.len();
            let hc = gather(h, chunk, d);
            let dl = &mut buf[..r * vocab];
            logits(&hc, w, wp, r, d, dl);
            // dlogits = g_i·(onehot(y) − softmax(row)).
            dl.par_chunks_mut(vocab)
                .zip(chunk.par_iter())
                .for_each(|(row, &(i, y))| {
                    let (_, sum) = exp_row(row);
                    let scale = -g[i] / sum;
                    row.iter_mut().for_each(|x| *x *= scale);
                    row[y as usize] += g[i];
                });
            let mut dhc = vec![0f32; r * d];
            // dhc [r, d] = dl [r, vocab] · W [vocab, d].
            match &self.packed {
                Some((_, wt)) => matmul_packed(dl, r, wt, &mut dhc),
                None => mm(
                    &mut dhc,
                    [r, d, vocab],
                    rows(dl, vocab),
                    rows(w, d),
                    1.0,
                    false,
                    threads(),
                ),
            }
            if self.head_grad {
                // dW [vocab, d] += dlᵀ [vocab, r] · hc [r, d].
                mm(
                    dw,
                    [vocab, d, r],
                    cols(dl, vocab),
                    rows(&hc, d),
                    1.0,
                    !first,
                    threads(),
                );
            }
            first = false;
            for (k, &(i, _)) in chunk.iter().enumerate() {
                dh[i * d..(i + 1) * d].copy_from_slice(&dhc[k * d..(k + 1) * d]);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(n * d + head)))
    }
}
