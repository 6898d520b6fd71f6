//! Softmax, RMSNorm and rotary embeddings with their own backward passes.
//!
//! candle's fused versions of these ops (`candle_nn::ops::softmax_last_dim`, `rms_norm`,
//! `rotary_emb::rope`) are built without a backward pass: gradients silently stop there. Here
//! each op has a backward on every device:
//! - CPU (f32): a `CustomOp` whose forward and backward are fused loops;
//! - CUDA: candle's fused kernel forward, wrapped by `with_backward` into an op whose backward
//!   is composed from basic tensor ops (softmax, RMSNorm) or is the rope kernel itself, run
//!   with the angles negated;
//! - anything else: the maths composed from basic ops, which candle differentiates.
use candle_core::{
    backend::BackendStorage, CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType,
    Device, Layout, Result, Shape, Tensor, D,
};
use rayon::prelude::*;

/// Below this many elements, a single thread is faster than rayon's hand-off.
const PAR_MIN: usize = 1 << 15;

pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("{op}: only f32 is supported, got {:?}", s.dtype()),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// Runs `f(out_row, row_index)` over rows of width `n`, in parallel when the work is large.
pub(crate) fn for_rows(out: &mut [f32], n: usize, f: impl Fn(&mut [f32], usize) + Sync + Send) {
    if out.len() >= PAR_MIN {
        out.par_chunks_mut(n).enumerate().for_each(|(r, o)| f(o, r));
    } else {
        out.chunks_mut(n).enumerate().for_each(|(r, o)| f(o, r));
    }
}

fn is_cpu_f32(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32
}

// ---------------------------------------------------------------- kernels with a backward

/// The backward of an op with one differentiable input: dL/dx from x, the output y and dL/dy.
trait Backward1: Send + Sync {
    const NAME: &'static str;
    fn dx(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Tensor>;
}

/// The backward of an op with two differentiable inputs (x and a weight w).
trait Backward2: Send + Sync {
    const NAME: &'static str;
    fn dx_dw(&self, x: &Tensor, w: &Tensor, y: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)>;
}

/// Wraps `y`, computed from the inputs by a kernel that has no backward pass, as the output
/// of an op on those inputs whose backward is `B`. The forward is a copy of `y` (one device
/// memcpy): a `CustomOp` must return storage of its own.
struct WithBackward<B>(B);

/// `y` as a fresh storage; `y` must be a kernel's own output (contiguous from offset 0, so
/// its storage holds exactly its elements).
fn copy_output<S: BackendStorage>(s: &S, l: &Layout, op: &str) -> Result<(S, Shape)> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("{op}: the kernel's output must be contiguous");
    }
    Ok((s.try_clone(l)?, l.shape().clone()))
}

impl<B: Backward1> CustomOp2 for WithBackward<B> {
    fn name(&self) -> &'static str {
        B::NAME
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        y: &CpuStorage,
        l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        copy_output(y, l, B::NAME)
    }
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        y: &CudaStorage,
        l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        copy_output(y, l, B::NAME)
    }
    fn bwd(
        &self,
        x: &Tensor,
        _y: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(self.0.dx(x, res, grad)?), None))
    }
}

impl<B: Backward2> CustomOp3 for WithBackward<B> {
    fn name(&self) -> &'static str {
        B::NAME
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        y: &CpuStorage,
        l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        copy_output(y, l, B::NAME)
    }
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        y: &CudaStorage,
        l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        copy_output(y, l, B::NAME)
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = self.0.dx_dw(x, w, res, grad)?;
        Ok((Some(dx), Some(dw), None))
    }
}

// ---------------------------------------------------------------- softmax

/// Softmax over the last dimension, differentiable.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if is_cpu_f32(x) {
        x.contiguous()?.apply_op1(Softmax)
    } else if x.device().is_cuda() {
        softmax_kernel(x)
    } else {
        softmax_composed(x)
    }
}

/// candle's fused softmax forward (the CUDA path; it runs on the CPU too, for the tests) with
/// the composed backward dx = y ⊙ (g − Σ g⊙y).
pub fn softmax_kernel(x: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    let y = candle_nn::ops::softmax_last_dim(&x)?;
    x.apply_op2(&y, WithBackward(SoftmaxGrad))
}

struct SoftmaxGrad;

impl Backward1 for SoftmaxGrad {
    const NAME: &'static str = "osp-softmax-kernel";
    fn dx(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Tensor> {
        let dot = (g * y)?.sum_keepdim(D::Minus1)?;
        y * g.broadcast_sub(&dot)?
    }
}

/// Softmax from basic ops (the reference the fused op is tested against).
pub fn softmax_composed(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(x, D::Minus1)
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "osp-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let n = l.dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; x.len()];
        for_rows(&mut out, n, |o, r| {
            let xr = &x[r * n..(r + 1) * n];
            let max = xr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (o, &v) in o.iter_mut().zip(xr) {
                *o = (v - max).exp();
                sum += *o;
            }
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|o| *o *= inv);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBwd)?,
        ))
    }
}

/// dx = y ⊙ (g − Σ g⊙y), one fused pass per row.
struct SoftmaxBwd;

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "osp-softmax-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = f32_slice(s1, l1, self.name())?;
        let g = f32_slice(s2, l2, self.name())?;
        let n = l1.dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; y.len()];
        for_rows(&mut out, n, |o, r| {
            let (yr, gr) = (&y[r * n..(r + 1) * n], &g[r * n..(r + 1) * n]);
            let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
            for ((o, &y), &g) in o.iter_mut().zip(yr).zip(gr) {
                *o = y * (g - dot);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------- RMSNorm

/// y = x / sqrt(mean(x²) + eps) ⊙ w over the last dimension, differentiable in x and w.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if is_cpu_f32(x) {
        x.contiguous()?
            .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
    } else if x.device().is_cuda() {
        rms_norm_kernel(x, w, eps)
    } else {
        rms_norm_composed(x, w, eps)
    }
}

/// candle's fused RMSNorm forward (the CUDA path; it runs on the CPU too, for the tests) with
/// a composed backward.
pub fn rms_norm_kernel(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let y = candle_nn::ops::rms_norm(&x, &w, eps as f32)?;
    x.apply_op3(&w, &y, WithBackward(RmsNormGrad { eps }))
}

struct RmsNormGrad {
    eps: f64,
}

impl Backward2 for RmsNormGrad {
    const NAME: &'static str = "osp-rmsnorm-kernel";
    /// With r = 1/rms(x), x̂ = x·r and gw = g⊙w: dx = r·(gw − x̂·mean(gw⊙x̂)), dw = Σ_rows g⊙x̂.
    fn dx_dw(&self, x: &Tensor, w: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        let xhat = x.broadcast_mul(&r)?;
        let gw = g.broadcast_mul(w)?;
        let dot = (&gw * &xhat)?.mean_keepdim(D::Minus1)?;
        let dx = (gw - xhat.broadcast_mul(&dot)?)?.broadcast_mul(&r)?;
        let n = w.elem_count();
        let dw = (g * xhat)?.reshape(((), n))?.sum(0)?;
        Ok((dx, dw))
    }
}

/// RMSNorm from basic ops (the reference the fused op is tested against).
pub fn rms_norm_composed(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

#[derive(Clone, Copy)]
struct RmsNorm {
    eps: f32,
}

impl RmsNorm {
    fn inv_rms(&self, x: &[f32]) -> f32 {
        let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
        1.0 / (ms + self.eps).sqrt()
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "osp-rmsnorm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let w = f32_slice(s2, l2, self.name())?;
        let n = w.len();
        if l1.dims().last() != Some(&n) {
            candle_core::bail!(
                "rms_norm: weight {:?} does not match input {:?}",
                l2.dims(),
                l1.dims()
            );
        }
        let mut out = vec![0f32; x.len()];
        for_rows(&mut out, n, |o, r| {
            let xr = &x[r * n..(r + 1) * n];
            let inv = self.inv_rms(xr);
            for ((o, &x), &w) in o.iter_mut().zip(xr).zip(w) {
                *o = x * inv * w;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &g, &RmsNormBwdX(*self))?;
        let dw = x.apply_op2_no_bwd(&g, &RmsNormBwdW(*self))?;
        Ok((Some(dx), Some(dw)))
    }
}

/// dx = r · (g⊙w − x̂ · mean(g⊙w⊙x̂)), with r = 1/rms(x) and x̂ = x·r.
struct RmsNormBwdX(RmsNorm);

impl CustomOp3 for RmsNormBwdX {
    fn name(&self) -> &'static str {
        "osp-rmsnorm-bwd-x"
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
        let x = f32_slice(s1, l1, self.name())?;
        let w = f32_slice(s2, l2, self.name())?;
        let g = f32_slice(s3, l3, self.name())?;
        let n = w.len();
        let mut out = vec![0f32; x.len()];
        for_rows(&mut out, n, |o, r| {
            let (xr, gr) = (&x[r * n..(r + 1) * n], &g[r * n..(r + 1) * n]);
            let inv = self.0.inv_rms(xr);
            let mut dot = 0f32;
            for i in 0..n {
                dot += gr[i] * w[i] * xr[i] * inv;
            }
            let mean = dot / n as f32;
            for i in 0..n {
                o[i] = inv * (gr[i] * w[i] - xr[i] * inv * mean);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// dw = Σ_rows g ⊙ x̂.
struct RmsNormBwdW(RmsNorm);

impl CustomOp2 for RmsNormBwdW {
    fn name(&self) -> &'static str {
        "osp-rmsnorm-bwd-w"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let g = f32_slice(s2, l2, self.name())?;
        let n = l1.dims().last().copied().unwrap_or(1).max(1);
        let mut dw = vec![0f32; n];
        for (xr, gr) in x.chunks(n).zip(g.chunks(n)) {
            let inv = self.0.inv_rms(xr);
            for i in 0..n {
                dw[i] += gr[i] * xr[i] * inv;
            }
        }
        Ok((CpuStorage::F32(dw), Shape::from(n)))
    }
}

// ---------------------------------------------------------------- rotary embeddings

/// Rotary embeddings in Hugging Face's "rotate half" layout: x is [b, h, t, d], cos and sin are
/// [b, t, d/2] (per-sequence positions, so left padding does not shift a sequence's angles).
/// Differentiable in x; the tables are constants.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if is_cpu_f32(x) {
        x.contiguous()?.apply_op3(
            &cos.contiguous()?,
            &sin.contiguous()?,
            Rope { inverse: false },
        )
    } else if x.device().is_cuda() {
        rope_kernel(x, cos, sin)
    } else {
        rope_composed(x, cos, sin)
    }
}

/// candle's fused rope kernel forward (the CUDA path; it runs on the CPU too, for the tests);
/// the backward is the same kernel rotating the gradient by the negated angles.
pub fn rope_kernel(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (x, cos, sin) = (x.contiguous()?, cos.contiguous()?, sin.contiguous()?);
    let y = candle_nn::rotary_emb::rope(&x, &cos, &sin)?;
    x.apply_op2(&y, WithBackward(RopeGrad { cos, sin }))
}

struct RopeGrad {
    cos: Tensor,
    sin: Tensor,
}

impl Backward1 for RopeGrad {
    const NAME: &'static str = "osp-rope-kernel";
    fn dx(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Tensor> {
        candle_nn::rotary_emb::rope(&g.contiguous()?, &self.cos, &self.sin.neg()?)
    }
}

/// Rotary embeddings from basic ops (the reference the fused op is tested against).
pub fn rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let cos = cos.unsqueeze(1)?;
    let sin = sin.unsqueeze(1)?;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let y1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let y2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Tensor::cat(&[y1, y2], D::Minus1)
}

/// Rotation by the table's angles; `inverse` rotates by their negation, which is the backward.
struct Rope {
    inverse: bool,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "osp-rope"
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
        let x = f32_slice(s1, l1, self.name())?;
        let cos = f32_slice(s2, l2, self.name())?;
        let sin = f32_slice(s3, l3, self.name())?;
        let (b, h, t, d) = l1.shape().dims4()?;
        let half = d / 2;
        if l2.dims() != [b, t, half] || l3.dims() != [b, t, half] {
            candle_core::bail!(
                "rope: tables {:?}/{:?} do not match input {:?}",
                l2.dims(),
                l3.dims(),
                l1.dims()
            );
        }
        let sign = if self.inverse { -1f32 } else { 1f32 };
        let mut out = vec![0f32; x.len()];
        // One row is one (batch, head, position) vector of width d.
        for_rows(&mut out, d, |o, r| {
            let bi = r / (h * t);
            let ti = r % t;
            let xr = &x[r * d..(r + 1) * d];
            let base = (bi * t + ti) * half;
            for i in 0..half {
                let (c, s) = (cos[base + i], sign * sin[base + i]);
                let (x1, x2) = (xr[i], xr[i + half]);
                o[i] = x1 * c - x2 * s;
                o[i + half] = x2 * c + x1 * s;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let inv = Rope {
            inverse: !self.inverse,
        };
        let dx = grad.contiguous()?.apply_op3_no_bwd(cos, sin, &inv)?;
        Ok((Some(dx), None, None))
    }
}

/// cos and sin tables [b, t, d/2] for integer positions [b, t], computed as transformers does
/// (f32 inverse frequencies times f32 positions).
pub fn rope_tables(positions: &Tensor, head_dim: usize, theta: f64) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let inv_freq = Tensor::from_vec(inv_freq, (1, 1, half), positions.device())?;
    let angles = positions
        .to_dtype(DType::F32)?
        .unsqueeze(D::Minus1)?
        .broadcast_mul(&inv_freq)?;
    Ok((angles.cos()?, angles.sin()?))
}

// ---------------------------------------------------------------- frozen linear

/// x [rows, in] · Wᵀ for a constant W [out, in]. candle's matmul backward computes the
/// gradient of both operands, constants included; this op returns only the input's, which is
/// what LoRA and a frozen πref need (a d=512 LoRA step: 3.4 s → 2.4 s in CANDLE_NOTES).
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.apply_op2(w, FrozenMatmul)
}

struct FrozenMatmul;

impl FrozenMatmul {
    fn dims(l1: &Layout, l2: &Layout) -> Result<(usize, usize, usize, Layout)> {
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!(
                "frozen_linear: input {:?} does not match weight {:?}",
                l1.dims(),
                l2.dims()
            );
        }
        Ok((m, n, k, l2.transpose(0, 1)?))
    }
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "osp-frozen-linear"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, n, k, l2t) = Self::dims(l1, l2)?;
        Ok((s1.matmul(s2, (1, m, n, k), l1, &l2t)?, Shape::from((m, n))))
    }
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (m, n, k, l2t) = Self::dims(l1, l2)?;
        Ok((s1.matmul(s2, (1, m, n, k), l1, &l2t)?, Shape::from((m, n))))
    }
    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // cuBLAS takes only unit-stride rows or columns; a gradient can arrive as a view.
        Ok((Some(grad.contiguous()?.matmul(w)?), None))
    }
}
