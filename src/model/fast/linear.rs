//! Linear layers as one op each: a LoRA layer on a frozen base, y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ, and a
//! plain layer whose weight trains (full fine-tuning), y = x·Wᵀ.
//!
//! Composed from candle ops the same layer is five graph nodes (base product, two adapter
//! products, the scale, the sum), and candle's backward pays a zero-filled buffer and an
//! addition for every edge it walks, most of them [rows, out] wide. Here forward is the base
//! product (the engine's packed kernel) with the adapter's gemm product accumulated onto it,
//! and backward returns dx, dA and dB from products that accumulate in place; W gets no
//! gradient.
use super::{cols, mm, pack_cache, packed, rows, slice, threads, with_cpu};
use crate::engine::packed::{matmul_packed, Packed};
use crate::engine::weights::PackCache;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use std::sync::Arc;

/// y [m, n] = x [m, k]·Wᵀ + scale·(x·Aᵀ)·Bᵀ for a constant W [n, k], A [r, k], B [n, r];
/// differentiable in x, A and B.
///
/// W's products use the inference engine's panel-packed copies of W (forward) and Wᵀ
/// (backward, packed when first needed) from `packs`, the model's cache, so a frozen base is
/// packed once per run (afresh per op without one): no per-call repacking of the largest
/// operand, and the engine kernel's speed.
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    packs: Option<&Arc<PackCache>>,
) -> Result<Tensor> {
    let (_, k) = x.dims2()?;
    let (n, kw) = w.dims2()?;
    let (r, ka) = a.dims2()?;
    if kw != k || ka != k || b.dims() != [n, r] {
        candle_core::bail!(
            "lora_linear: input {:?}, weight {:?}, A {:?}, B {:?} do not fit",
            x.dims(),
            w.dims(),
            a.dims(),
            b.dims()
        );
    }
    let packs = pack_cache(packs);
    let op = LoraLinear {
        wp: packed(&packs, w, false, "lora_linear")?,
        w: w.clone(),
        packs,
        scale: scale as f32,
    };
    x.contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

struct LoraLinear {
    /// W packed; W and its cache for Wᵀ, which only backward needs.
    wp: Arc<Packed>,
    w: Tensor,
    packs: Arc<PackCache>,
    scale: f32,
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "osp-lora-linear"
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
        let x = slice(s1, l1, self.name())?;
        let a = slice(s2, l2, self.name())?;
        let b = slice(s3, l3, self.name())?;
        let (m, k) = l1.shape().dims2()?;
        let (r, _) = l2.shape().dims2()?;
        let (n, _) = l3.shape().dims2()?;
        let mut y = vec![0f32; m * n];
        matmul_packed(x, m, &self.wp, &mut y);
        adapter_forward(x, a, b, [m, k, r, n], self.scale, &mut y);
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (m, k) = x.dims2()?;
        let (r, _) = a.dims2()?;
        let (n, _) = b.dims2()?;
        let grad = grad.contiguous()?;
        let wtp = packed(&self.packs, &self.w, true, self.name())?;
        let s = self.scale;
        let (dx, da, db) = with_cpu(x, |x| {
            with_cpu(a, |a| {
                with_cpu(b, |b| {
                    with_cpu(&grad, |g| {
                        // t = x·Aᵀ [m, r], recomputed (m·r·k: small).
                        let mut t = vec![0f32; m * r];
                        mm(
                            &mut t,
                            [m, r, k],
                            rows(x, k),
                            cols(a, k),
                            1.0,
                            false,
                            threads(),
                        );
                        let mut dx = vec![0f32; m * k];
                        matmul_packed(g, m, &wtp, &mut dx);
                        let (mut da, mut db) = (vec![0f32; r * k], vec![0f32; n * r]);
                        let dims = [m, k, r, n];
                        let grads = (Some(&mut da[..]), Some(&mut db[..]));
                        adapter_backward((x, &t, g), (a, b), dims, s, &mut dx, grads);
                        Ok((dx, da, db))
                    })
                })
            })
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, (m, k), dev)?),
            Some(Tensor::from_vec(da, (r, k), dev)?),
            Some(Tensor::from_vec(db, (n, r), dev)?),
        ))
    }
}

/// y [m, n] = x [m, k]·Wᵀ for a W [n, k] that trains; differentiable in x and W.
///
/// candle's composed form (a matmul with the transposed view W.t()) runs backward as two
/// matmuls on transposed views and a strided addition for the transpose's own backward. Here
/// forward and dx = g·W use the engine's packed kernel (W, then Wᵀ, packed at each call: W
/// changes every step, and packing is O(n·k) against the product's O(m·n·k)), and
/// dW = gᵀ·x is one gemm written straight into W's [n, k] layout.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (_, k) = x.dims2()?;
    let (_, kw) = w.dims2()?;
    if kw != k {
        candle_core::bail!(
            "linear: input {:?} does not fit weight {:?}",
            x.dims(),
            w.dims()
        );
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, TrainedLinear)
}

struct TrainedLinear;

impl CustomOp2 for TrainedLinear {
    fn name(&self) -> &'static str {
        "osp-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let w = slice(s2, l2, self.name())?;
        let (m, k) = l1.shape().dims2()?;
        let (n, _) = l2.shape().dims2()?;
        let mut y = vec![0f32; m * n];
        matmul_packed(x, m, &Packed::new(w, n, k), &mut y);
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (m, k) = x.dims2()?;
        let (n, _) = w.dims2()?;
        let grad = grad.contiguous()?;
        let (dx, dw) = with_cpu(x, |x| {
            with_cpu(w, |w| {
                with_cpu(&grad, |g| {
                    let mut dx = vec![0f32; m * k];
                    matmul_packed(g, m, &Packed::transposed(w, n, k), &mut dx);
                    let mut dw = vec![0f32; n * k];
                    weight_grad(g, x, [m, k, n], &mut dw);
                    Ok((dx, dw))
                })
            })
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, (m, k), dev)?),
            Some(Tensor::from_vec(dw, (n, k), dev)?),
        ))
    }
}

/// y [m, out] += s·(x·Aᵀ)·Bᵀ, a LoRA adapter's term, for x [m, inp], A [r, inp], B [out, r]
/// (`[m, inp, r, out]`); returns t = x·Aᵀ [m, r], which backward reads.
pub(super) fn adapter_forward(
    x: &[f32],
    a: &[f32],
    b: &[f32],
    [m, inp, r, out]: [usize; 4],
    s: f32,
    y: &mut [f32],
) -> Vec<f32> {
    let mut t = vec![0f32; m * r];
    mm(
        &mut t,
        [m, r, inp],
        rows(x, inp),
        cols(a, inp),
        1.0,
        false,
        threads(),
    );
    mm(y, [m, out, r], rows(&t, r), cols(b, r), s, true, threads());
    t
}

/// The adapter's part of a layer's backward for the output gradient g [m, out], with
/// forward's input x and t = x·Aᵀ: dx += s·(g·B)·A, and where asked dA = s·(g·B)ᵀ·x and
/// dB = s·gᵀ·t (written, not added).
pub(super) fn adapter_backward(
    (x, t, g): (&[f32], &[f32], &[f32]),
    (a, b): (&[f32], &[f32]),
    [m, inp, r, out]: [usize; 4],
    s: f32,
    dx: &mut [f32],
    (da, db): (Option<&mut [f32]>, Option<&mut [f32]>),
) {
    let par = threads();
    let mut u = vec![0f32; m * r];
    mm(
        &mut u,
        [m, r, out],
        rows(g, out),
        rows(b, r),
        1.0,
        false,
        par,
    );
    mm(dx, [m, inp, r], rows(&u, r), rows(a, inp), s, true, par);
    if let Some(da) = da {
        mm(da, [r, inp, m], cols(&u, r), rows(x, inp), s, false, par);
    }
    if let Some(db) = db {
        mm(db, [out, r, m], cols(g, out), rows(t, r), s, false, par);
    }
}

/// dW [out, inp] = gᵀ·x for a layer's output gradient g [m, out] and input x [m, inp], written
/// in W's own layout.
pub(super) fn weight_grad(g: &[f32], x: &[f32], [m, inp, out]: [usize; 3], dw: &mut [f32]) {
    mm(
        dw,
        [out, inp, m],
        cols(g, out),
        rows(x, inp),
        1.0,
        false,
        threads(),
    );
}
