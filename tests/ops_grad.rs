//! Every custom op: forward equals the composed reference, and the backward pass equals
//! central finite differences (and the composed op's autograd gradient).
mod common;
use candle_core::{Device, Tensor, Var};
use common::max_abs;
use osp::model::ops;
use rand::SeedableRng;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let v = osp::model::init::normal_vec(&mut rng, n, 1.0);
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Checks d(Σ f(x)⊙r)/dx from autograd against central differences at every element of x.
fn check_grad(x0: &Tensor, f: &dyn Fn(&Tensor) -> Tensor, seed: u64) -> Tensor {
    let out_shape = f(x0).dims().to_vec();
    let r = randn(&out_shape, seed);
    let loss = |x: &Tensor| (f(x) * &r).unwrap().sum_all().unwrap();
    let var = Var::from_tensor(x0).unwrap();
    let grads = loss(var.as_tensor()).backward().unwrap();
    let g = grads
        .get(var.as_tensor())
        .expect("gradient reaches the input")
        .clone();
    let g_vec: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
    let x_vec: Vec<f32> = x0.flatten_all().unwrap().to_vec1().unwrap();
    let eps = 1e-2f32;
    for i in 0..x_vec.len() {
        let mut plus = x_vec.clone();
        plus[i] += eps;
        let mut minus = x_vec.clone();
        minus[i] -= eps;
        let lp: f32 = loss(&Tensor::from_vec(plus, x0.shape(), &Device::Cpu).unwrap())
            .to_scalar()
            .unwrap();
        let lm: f32 = loss(&Tensor::from_vec(minus, x0.shape(), &Device::Cpu).unwrap())
            .to_scalar()
            .unwrap();
        let fd = (lp - lm) / (2.0 * eps);
        let tol = 2e-3 * (1.0 + fd.abs());
        assert!(
            (fd - g_vec[i]).abs() < tol,
            "element {i}: autograd {} vs finite difference {fd}",
            g_vec[i]
        );
    }
    g
}

fn autograd(x0: &Tensor, f: &dyn Fn(&Tensor) -> Tensor, seed: u64) -> Tensor {
    let r = randn(f(x0).dims(), seed);
    let var = Var::from_tensor(x0).unwrap();
    let grads = (f(var.as_tensor()) * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    grads.get(var.as_tensor()).unwrap().clone()
}

#[test]
fn softmax_forward_and_gradient() {
    let x = (randn(&[3, 2, 7], 1) * 3.0).unwrap();
    let fused = |x: &Tensor| ops::softmax_last_dim(x).unwrap();
    let composed = |x: &Tensor| ops::softmax_composed(x).unwrap();
    assert!(max_abs(&fused(&x), &composed(&x)) < 1e-6);
    let g = check_grad(&x, &fused, 11);
    assert!(max_abs(&g, &autograd(&x, &composed, 11)) < 1e-5);
    // A large input takes the parallel path.
    let big = randn(&[64, 600], 2);
    assert!(max_abs(&fused(&big), &composed(&big)) < 1e-6);
    assert!(max_abs(&autograd(&big, &fused, 3), &autograd(&big, &composed, 3)) < 1e-5);
}

#[test]
fn rms_norm_forward_and_gradients_in_x_and_weight() {
    let x = randn(&[2, 3, 8], 4);
    let w = randn(&[8], 5).affine(0.5, 1.0).unwrap();
    let eps = 1e-5;
    let fused_x = |x: &Tensor| ops::rms_norm(x, &w, eps).unwrap();
    let comp_x = |x: &Tensor| ops::rms_norm_composed(x, &w, eps).unwrap();
    assert!(max_abs(&fused_x(&x), &comp_x(&x)) < 1e-5);
    let g = check_grad(&x, &fused_x, 12);
    assert!(max_abs(&g, &autograd(&x, &comp_x, 12)) < 1e-4);
    let fused_w = |w: &Tensor| ops::rms_norm(&x, w, eps).unwrap();
    let comp_w = |w: &Tensor| ops::rms_norm_composed(&x, w, eps).unwrap();
    let gw = check_grad(&w, &fused_w, 13);
    assert!(max_abs(&gw, &autograd(&w, &comp_w, 13)) < 1e-4);
}

#[test]
fn rope_forward_and_gradient() {
    let (b, h, t, d) = (2, 3, 5, 8);
    let x = randn(&[b, h, t, d], 6);
    let pos =
        Tensor::from_vec(vec![0u32, 1, 2, 3, 4, 0, 0, 7, 8, 9], (b, t), &Device::Cpu).unwrap();
    let (cos, sin) = ops::rope_tables(&pos, d, 10000.0).unwrap();
    let fused = |x: &Tensor| ops::rope(x, &cos, &sin).unwrap();
    let composed = |x: &Tensor| ops::rope_composed(x, &cos, &sin).unwrap();
    assert!(max_abs(&fused(&x), &composed(&x)) < 1e-6);
    let g = check_grad(&x, &fused, 14);
    assert!(max_abs(&g, &autograd(&x, &composed, 14)) < 1e-5);
    // Position 0 is the identity rotation.
    let y = fused(&x);
    let first = |t: &Tensor| t.narrow(0, 0, 1).unwrap().narrow(2, 0, 1).unwrap();
    assert!(max_abs(&first(&y), &first(&x)) < 1e-7);
}

#[test]
fn frozen_linear_matches_matmul_and_gives_no_weight_gradient() {
    let x = randn(&[5, 6], 7);
    let w = randn(&[4, 6], 8);
    let frozen = |x: &Tensor| ops::frozen_linear(x, &w).unwrap();
    let plain = |x: &Tensor| x.matmul(&w.t().unwrap()).unwrap();
    assert!(max_abs(&frozen(&x), &plain(&x)) < 1e-6);
    let g = check_grad(&x, &frozen, 15);
    assert!(max_abs(&g, &autograd(&x, &plain, 15)) < 1e-5);
    // Even with the weight a variable, the op computes no gradient for it.
    let wv = Var::from_tensor(&w).unwrap();
    let xv = Var::from_tensor(&x).unwrap();
    let grads = ops::frozen_linear(xv.as_tensor(), wv.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(grads.get(xv.as_tensor()).is_some());
    assert!(grads.get(wv.as_tensor()).is_none());
}

/// The CUDA path of each op (candle's fused kernel forward, our backward attached) runs on
/// the CPU too: its forward and gradients must equal the composed ops' and finite differences.
#[test]
fn kernel_paths_have_the_composed_gradients() {
    let x = (randn(&[3, 2, 7], 21) * 3.0).unwrap();
    let kernel = |x: &Tensor| ops::softmax_kernel(x).unwrap();
    let composed = |x: &Tensor| ops::softmax_composed(x).unwrap();
    assert!(max_abs(&kernel(&x), &composed(&x)) < 1e-6);
    let g = check_grad(&x, &kernel, 22);
    assert!(max_abs(&g, &autograd(&x, &composed, 22)) < 1e-5);

    let x = randn(&[2, 3, 8], 23);
    let w = randn(&[8], 24).affine(0.5, 1.0).unwrap();
    let eps = 1e-5;
    let kernel_x = |x: &Tensor| ops::rms_norm_kernel(x, &w, eps).unwrap();
    let comp_x = |x: &Tensor| ops::rms_norm_composed(x, &w, eps).unwrap();
    assert!(max_abs(&kernel_x(&x), &comp_x(&x)) < 1e-5);
    let g = check_grad(&x, &kernel_x, 25);
    assert!(max_abs(&g, &autograd(&x, &comp_x, 25)) < 1e-4);
    let kernel_w = |w: &Tensor| ops::rms_norm_kernel(&x, w, eps).unwrap();
    let comp_w = |w: &Tensor| ops::rms_norm_composed(&x, w, eps).unwrap();
    let gw = check_grad(&w, &kernel_w, 26);
    assert!(max_abs(&gw, &autograd(&w, &comp_w, 26)) < 1e-4);

    let (b, h, t, d) = (2, 3, 5, 8);
    let x = randn(&[b, h, t, d], 27);
    let pos =
        Tensor::from_vec(vec![0u32, 1, 2, 3, 4, 0, 0, 7, 8, 9], (b, t), &Device::Cpu).unwrap();
    let (cos, sin) = ops::rope_tables(&pos, d, 10000.0).unwrap();
    let kernel = |x: &Tensor| ops::rope_kernel(x, &cos, &sin).unwrap();
    let composed = |x: &Tensor| ops::rope_composed(x, &cos, &sin).unwrap();
    assert!(max_abs(&kernel(&x), &composed(&x)) < 1e-6);
    let g = check_grad(&x, &kernel, 28);
    assert!(max_abs(&g, &autograd(&x, &composed, 28)) < 1e-5);
}
