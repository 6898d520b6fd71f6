//! The fused training kernels (`model::fast`) against the composed ops and the reference
//! model: values to 1e-5 relative, gradients against autograd of the composed graph and
//! against central finite differences, with grouped-query attention, padding and a tied head.
mod common;
use candle_core::{DType, Device, Tensor, Var, D};
use common::*;
use osp::lora::LoraConfig;
use osp::model::load::read_hf_weights;
use osp::model::{fast, ops, Llama, ModelConfig, TokenBatch, Trainable};
use rand::SeedableRng;

fn randn(shape: &[usize], seed: u64, std: f32) -> Tensor {
    let n = shape.iter().product();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let v = osp::model::init::normal_vec(&mut rng, n, std);
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// max |a − b| / (1 + max |b|): relative to the reference's scale.
fn rel(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(a, b) / (1.0 + max_abs_value(b))
}

/// Gradients of Σ f(xs)⊙r with respect to each x.
fn grads(xs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Tensor, r: &Tensor) -> Vec<Tensor> {
    let vars: Vec<Var> = xs.iter().map(|x| Var::from_tensor(x).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let g = (f(&ts) * r).unwrap().sum_all().unwrap().backward().unwrap();
    ts.iter()
        .map(|t| g.get(t).expect("gradient reaches the input").clone())
        .collect()
}

/// Checks one element-sample of each input's gradient against central differences.
fn finite_differences(xs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Tensor, r: &Tensor) {
    let g = grads(xs, f, r);
    let loss = |xs: &[Tensor]| -> f64 {
        let v: f32 = (f(xs) * r).unwrap().sum_all().unwrap().to_scalar().unwrap();
        v as f64
    };
    for (which, x) in xs.iter().enumerate() {
        let base: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let gv: Vec<f32> = g[which].flatten_all().unwrap().to_vec1().unwrap();
        let step = (base.len() / 37).max(1);
        for i in (0..base.len()).step_by(step) {
            let eps = 1e-2f32;
            let at = |delta: f32| {
                let mut v = base.clone();
                v[i] += delta;
                let mut ys = xs.to_vec();
                ys[which] = Tensor::from_vec(v, x.shape(), &Device::Cpu).unwrap();
                loss(&ys)
            };
            let fd = ((at(eps) - at(-eps)) / (2.0 * eps as f64)) as f32;
            assert!(
                (fd - gv[i]).abs() < 3e-3 * (1.0 + fd.abs()),
                "input {which} element {i}: autograd {} vs finite difference {fd}",
                gv[i]
            );
        }
    }
}

/// The composed attention the reference model computes, returned as [b, t, h, hd].
fn attention_composed(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Tensor {
    let (b, h, _, hd) = q.dims4().unwrap();
    let (_, kvh, tk, _) = k.dims4().unwrap();
    let rep = |x: &Tensor| {
        x.unsqueeze(2)
            .unwrap()
            .broadcast_as((b, kvh, h / kvh, tk, hd))
            .unwrap()
            .reshape((b, h, tk, hd))
            .unwrap()
    };
    let (k, v) = (rep(k), rep(v));
    let s = (q.matmul(&k.t().unwrap()).unwrap() * (1.0 / (hd as f64).sqrt())).unwrap();
    let p = ops::softmax_composed(&s.broadcast_add(bias).unwrap()).unwrap();
    p.matmul(&v).unwrap().transpose(1, 2).unwrap()
}

fn padded_bias(lens: &[usize], t: usize, left: bool) -> Tensor {
    let seqs: Vec<Vec<u32>> = lens.iter().map(|&n| vec![1u32; n]).collect();
    let tb = if left {
        TokenBatch::left_padded(&seqs, &Device::Cpu)
    } else {
        TokenBatch::right_padded(&seqs, &Device::Cpu)
    }
    .unwrap();
    assert_eq!(tb.len, t);
    tb.bias
}

#[test]
fn fused_attention_equals_composed_with_gqa_and_padding() {
    for (h, kvh, left) in [(4, 2, false), (4, 2, true), (3, 3, false), (6, 1, true)] {
        let (b, t, hd) = (3, 7, 8);
        let q = randn(&[b, h, t, hd], 1, 1.0);
        let k = randn(&[b, kvh, t, hd], 2, 1.0);
        let v = randn(&[b, kvh, t, hd], 3, 1.0);
        let bias = padded_bias(&[7, 4, 2], t, left);
        let scale = 1.0 / (hd as f32).sqrt();
        let fused = |x: &[Tensor]| fast::attention(&x[0], &x[1], &x[2], &bias, scale).unwrap();
        let composed = |x: &[Tensor]| attention_composed(&x[0], &x[1], &x[2], &bias);
        let xs = [q, k, v];
        let (a, e) = (fused(&xs), composed(&xs));
        assert_eq!(a.dims(), [b, t, h, hd]);
        assert!(
            rel(&a, &e) < 1e-5,
            "h {h}/{kvh}: values differ by {}",
            rel(&a, &e)
        );
        let r = randn(a.dims(), 4, 1.0);
        for (gf, gc) in grads(&xs, &fused, &r).iter().zip(grads(&xs, &composed, &r)) {
            assert!(
                rel(gf, &gc) < 1e-5,
                "h {h}/{kvh}: gradients differ by {}",
                rel(gf, &gc)
            );
        }
        // A left-padding query row sees no key: its scores are all −1e30 in f32, so finite
        // differences there are 0 while autograd (composed and fused alike) gives the exact
        // derivative. Those rows feed nothing real; they are left out of the difference check.
        let real = bias
            .max_keepdim(3)
            .unwrap()
            .gt(-1e29)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .reshape((b, t, 1, 1))
            .unwrap();
        finite_differences(&xs, &fused, &r.broadcast_mul(&real).unwrap());
    }
}

#[test]
fn fused_log_probabilities_equal_log_softmax_and_gather() {
    let (n, d, vocab) = (300, 16, 97); // more rows than one chunk
    let h = randn(&[n, d], 5, 1.0);
    let w = randn(&[vocab, d], 6, 0.5);
    // Two rows in three selected, targets spread over the vocabulary.
    let (selected, mask, target) = selection(n, vocab, 3, 7919);
    let fused = |x: &[Tensor]| fast::target_logprobs(&x[0], &x[1], &selected, None).unwrap();
    let composed = |x: &[Tensor]| composed_logprobs(&x[0], &x[1], &mask, &target);
    let xs = [h, w];
    let (a, e) = (fused(&xs), composed(&xs));
    assert!(rel(&a, &e) < 1e-5, "values differ by {}", rel(&a, &e));
    let r = randn(&[n], 7, 1.0);
    for (gf, gc) in grads(&xs, &fused, &r).iter().zip(grads(&xs, &composed, &r)) {
        assert!(rel(gf, &gc) < 1e-5, "gradients differ by {}", rel(gf, &gc));
    }
    let small: Vec<(usize, u32)> = selected.iter().copied().filter(|p| p.0 < 12).collect();
    let f_small = |x: &[Tensor]| fast::target_logprobs(&x[0], &x[1], &small, None).unwrap();
    let xs_small = [xs[0].narrow(0, 0, 12).unwrap(), xs[1].clone()];
    finite_differences(&xs_small, &f_small, &r.narrow(0, 0, 12).unwrap());
}

/// Rows i with i % every ≠ 1 selected, target (i · mul) mod vocab: (selected, mask [n],
/// targets [n, 1]).
fn selection(
    n: usize,
    vocab: usize,
    every: usize,
    mul: usize,
) -> (Vec<(usize, u32)>, Tensor, Tensor) {
    let selected: Vec<(usize, u32)> = (0..n)
        .filter(|i| i % every != 1)
        .map(|i| (i, ((i * mul) % vocab) as u32))
        .collect();
    let mut mask = vec![0f32; n];
    let mut target = vec![0u32; n];
    for &(i, y) in &selected {
        mask[i] = 1.0;
        target[i] = y;
    }
    (
        selected,
        Tensor::from_vec(mask, n, &Device::Cpu).unwrap(),
        Tensor::from_vec(target, (n, 1), &Device::Cpu).unwrap(),
    )
}

/// The selected rows' log softmax(h·Wᵀ)[target] from candle's ops, 0 elsewhere.
fn composed_logprobs(h: &Tensor, w: &Tensor, mask: &Tensor, target: &Tensor) -> Tensor {
    let logits = h.matmul(&w.t().unwrap()).unwrap();
    let lp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    (lp.gather(target, 1).unwrap().squeeze(1).unwrap() * mask).unwrap()
}

/// A frozen head takes the packed-kernel path: values and dh equal the composed ops.
#[test]
fn fused_log_probabilities_with_a_frozen_head_equal_the_composed_ops() {
    let (n, d, vocab) = (150, 24, 301);
    let w = randn(&[vocab, d], 16, 0.5); // a constant: packed once
    let (selected, mask, target) = selection(n, vocab, 4, 104_729);
    let fused = |x: &[Tensor]| fast::target_logprobs(&x[0], &w, &selected, None).unwrap();
    let composed = |x: &[Tensor]| composed_logprobs(&x[0], &w, &mask, &target);
    let xs = [randn(&[n, d], 15, 1.0)];
    let (a, e) = (fused(&xs), composed(&xs));
    assert!(rel(&a, &e) < 1e-5, "values differ by {}", rel(&a, &e));
    let r = randn(&[n], 17, 1.0);
    let (gf, gc) = (grads(&xs, &fused, &r), grads(&xs, &composed, &r));
    assert!(
        rel(&gf[0], &gc[0]) < 1e-5,
        "dh differs by {}",
        rel(&gf[0], &gc[0])
    );
}

#[test]
fn a_frozen_head_gets_no_gradient_from_the_fused_log_probabilities() {
    let h = Var::from_tensor(&randn(&[5, 8], 8, 1.0)).unwrap();
    let w = randn(&[11, 8], 9, 1.0); // a constant, as a LoRA model's head is
    let lp = fast::target_logprobs(h.as_tensor(), &w, &[(0, 3), (4, 10)], None).unwrap();
    let g = lp.sum_all().unwrap().backward().unwrap();
    assert!(g.get(&w).is_none());
    assert!(max_abs_value(g.get(h.as_tensor()).unwrap()) > 0.0);
}

#[test]
fn fused_swiglu_equals_silu_times_up() {
    let g = randn(&[4, 5, 33], 10, 2.0);
    let u = randn(&[4, 5, 33], 11, 1.0);
    let fused = |x: &[Tensor]| fast::swiglu(&x[0], &x[1]).unwrap();
    let composed = |x: &[Tensor]| (candle_nn::ops::silu(&x[0]).unwrap() * &x[1]).unwrap();
    let xs = [g, u];
    assert!(rel(&fused(&xs), &composed(&xs)) < 1e-5);
    let r = randn(&[4, 5, 33], 12, 1.0);
    for (gf, gc) in grads(&xs, &fused, &r).iter().zip(grads(&xs, &composed, &r)) {
        assert!(rel(gf, &gc) < 1e-5, "gradients differ by {}", rel(gf, &gc));
    }
    finite_differences(&xs, &fused, &r);
}

#[test]
fn fused_lora_linear_equals_the_composed_layer() {
    // x [6, 10], W [7, 10] constant, A [3, 10], B [7, 3], scale 1.5; B non-zero so that A
    // gets a gradient.
    let w = randn(&[7, 10], 20, 0.5);
    let xs = [
        randn(&[6, 10], 21, 1.0),
        randn(&[3, 10], 22, 0.5),
        randn(&[7, 3], 23, 0.5),
    ];
    let fused = |x: &[Tensor]| fast::lora_linear(&x[0], &w, &x[1], &x[2], 1.5, None).unwrap();
    let composed = |x: &[Tensor]| {
        let base = x[0].matmul(&w.t().unwrap()).unwrap();
        let delta = x[0]
            .matmul(&x[1].t().unwrap())
            .unwrap()
            .matmul(&x[2].t().unwrap())
            .unwrap();
        (base + (delta * 1.5).unwrap()).unwrap()
    };
    assert!(rel(&fused(&xs), &composed(&xs)) < 1e-5);
    let r = randn(&[6, 7], 24, 1.0);
    for (gf, gc) in grads(&xs, &fused, &r).iter().zip(grads(&xs, &composed, &r)) {
        assert!(rel(gf, &gc) < 1e-5, "gradients differ by {}", rel(gf, &gc));
    }
    finite_differences(&xs, &fused, &r);
    assert!(
        fast::lora_linear(&xs[0], &w, &xs[1], &w, 1.0, None).is_err(),
        "B of the wrong shape"
    );
}

#[test]
fn fused_trained_linear_equals_the_transposed_matmul() {
    // x [6, 10], W [37, 10]: 37 outputs span two panels of the packed kernel, the last partial.
    let xs = [randn(&[6, 10], 31, 1.0), randn(&[37, 10], 32, 0.5)];
    let fused = |x: &[Tensor]| fast::linear(&x[0], &x[1]).unwrap();
    let composed = |x: &[Tensor]| x[0].matmul(&x[1].t().unwrap()).unwrap();
    assert!(rel(&fused(&xs), &composed(&xs)) < 1e-5);
    let r = randn(&[6, 37], 33, 1.0);
    for (gf, gc) in grads(&xs, &fused, &r).iter().zip(grads(&xs, &composed, &r)) {
        assert!(rel(gf, &gc) < 1e-5, "gradients differ by {}", rel(gf, &gc));
    }
    finite_differences(&xs, &fused, &r);
    assert!(
        fast::linear(&xs[0], &xs[0].t().unwrap()).is_err(),
        "weight of the wrong shape"
    );
}

fn fixture_model(name: &str, trainable: Trainable) -> Llama {
    let dir = fixture(name);
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    Llama::new(
        &cfg,
        read_hf_weights(&dir, &Device::Cpu).unwrap(),
        trainable,
    )
    .unwrap()
}

/// Padded batch of three sequences with prompt/response masks.
fn batch(vocab: usize) -> (Vec<Vec<u32>>, Vec<Vec<bool>>) {
    let v = vocab as u32;
    let seqs = vec![
        (0..11).map(|i| (i * 37 + 5) % v).collect::<Vec<u32>>(),
        (0..6).map(|i| (i * 11 + 2) % v).collect(),
        (0..9).map(|i| (i * 53 + 1) % v).collect(),
    ];
    let masks = seqs
        .iter()
        .map(|s| (0..s.len()).map(|j| j >= s.len() / 3).collect())
        .collect();
    (seqs, masks)
}

/// The training loss and every trainable gradient, fused and reference, must agree.
fn check_step(model: &mut Llama, what: &str) {
    let (seqs, masks) = batch(model.cfg.vocab_size);
    let mut run = |fused: bool| {
        model.set_fused(fused);
        let (sum, per_token) = model.token_logps(&seqs, &masks).unwrap();
        let loss = sum.sum_all().unwrap().neg().unwrap();
        let g = loss.backward().unwrap();
        let gs: Vec<Tensor> = model
            .vars()
            .iter()
            .map(|(n, v)| {
                g.get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{what}: no gradient for {n}"))
                    .clone()
            })
            .collect();
        (per_token, gs)
    };
    let (pf, gf) = run(true);
    let (pr, gr) = run(false);
    assert!(
        rel(&pf, &pr) < 1e-5,
        "{what}: log-probs differ by {}",
        rel(&pf, &pr)
    );
    for ((name, _), (a, e)) in model.vars().iter().zip(gf.iter().zip(&gr)) {
        assert!(
            max_abs_value(e) > 0.0,
            "{what}: {name} has a zero reference gradient"
        );
        assert!(
            rel(a, e) < 1e-4,
            "{what}: gradient of {name} differs by {}",
            rel(a, e)
        );
    }
}

/// LoRA adapters with non-zero B (fresh ones have B = 0 and so no gradient for A).
fn randomise_vars(model: &Llama, seed: u64) {
    for (i, (_, var)) in model.vars().iter().enumerate() {
        var.set(&randn(var.dims(), seed + i as u64, 0.05)).unwrap();
    }
}

#[test]
fn fused_training_step_equals_reference_on_every_fixture() {
    for name in ["llama_gqa", "qwen2_tied", "mistral"] {
        let lora = Trainable::Lora {
            config: LoraConfig {
                r: 4,
                ..Default::default()
            },
            seed: 3,
        };
        let mut m = fixture_model(name, lora);
        randomise_vars(&m, 100);
        check_step(&mut m, &format!("{name} LoRA"));
        let mut m = fixture_model(name, Trainable::All);
        check_step(&mut m, &format!("{name} full"));
    }
}

/// The fused layer mixes adapted and plain projections when LoRA targets only some of them,
/// and under full fine-tuning trains norms and biases (qwen2's q/k/v have biases).
#[test]
fn fused_layer_handles_partial_adapters_and_trained_biases() {
    for name in ["llama_gqa", "qwen2_tied"] {
        let lora = Trainable::Lora {
            config: LoraConfig {
                r: 2,
                target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
                ..Default::default()
            },
            seed: 4,
        };
        let mut m = fixture_model(name, lora);
        assert_eq!(m.vars().len(), 2 * 3 * m.cfg.num_hidden_layers, "{name}");
        randomise_vars(&m, 7);
        check_step(&mut m, &format!("{name} LoRA on q, v, down"));
    }
    let m = fixture_model("qwen2_tied", Trainable::All);
    assert!(m.vars().iter().any(|(n, _)| n.ends_with("q_proj.bias")));
    let mut m = m;
    randomise_vars(&m, 9);
    check_step(&mut m, "qwen2 full, randomised");
}

#[test]
fn fused_logits_path_matches_reference_with_tied_head_and_gqa() {
    for tied in [true, false] {
        let mut m = tiny_model("qwen2", tied, Trainable::None, 5);
        let (seqs, masks) = batch(m.cfg.vocab_size);
        let (a, pa) = m.token_logps(&seqs, &masks).unwrap();
        m.set_fused(false);
        let (b, pb) = m.token_logps(&seqs, &masks).unwrap();
        assert!(rel(&a, &b) < 1e-5 && rel(&pa, &pb) < 1e-5, "tied {tied}");
        assert_eq!(pa.dtype(), DType::F32);
    }
}

#[test]
fn cached_reference_log_probabilities_equal_recomputed_ones() {
    use osp::train::pairs::{
        cache_reference_logps, cached_reference_logps, pair_logps_detached, reference_for,
        TokenizedPair,
    };
    let lora = Trainable::Lora {
        config: LoraConfig::default(),
        seed: 1,
    };
    let policy = tiny_model("llama", false, lora, 2);
    randomise_vars(&policy, 50);
    let reference = reference_for(&policy).unwrap();
    let mut pairs: Vec<TokenizedPair> = (0..5u32)
        .map(|i| TokenizedPair {
            prompt: (0..3 + i).map(|j| (j * 7 + i) % 40).collect(),
            chosen: (0..2 + i % 3).map(|j| (j * 5 + 1) % 40).collect(),
            rejected: (0..4).map(|j| (j * 3 + i) % 40).collect(),
            strength: None,
            source: format!("pair {i}"),
            ref_logps: None,
        })
        .collect();
    // Cached in chunks of 2; recomputed as one batch of all five, as a step would.
    cache_reference_logps(&reference, &mut pairs, 2).unwrap();
    let all: Vec<&TokenizedPair> = pairs.iter().collect();
    let (cc, cr) = cached_reference_logps(&all, &Device::Cpu).unwrap().unwrap();
    let refs: Vec<(&[u32], &[u32], &[u32])> = pairs
        .iter()
        .map(|p| (&p.prompt[..], &p.chosen[..], &p.rejected[..]))
        .collect();
    let (ec, er) = pair_logps_detached(&reference, &refs).unwrap();
    assert!(rel(&cc, &ec) < 1e-5 && rel(&cr, &er) < 1e-5);
    // The reference is πref, not the policy: the adapters would change the values.
    let (pc, _) = pair_logps_detached(&policy, &refs).unwrap();
    assert!(max_abs(&pc, &ec) > 1e-3);
    pairs[3].ref_logps = None;
    let all: Vec<&TokenizedPair> = pairs.iter().collect();
    assert!(cached_reference_logps(&all, &Device::Cpu)
        .unwrap()
        .is_none());
}

/// The layer op's gradients are the same bits on every run: its parallel sums (the norms'
/// weight gradients over rows, the products) must not depend on how rayon splits the work.
/// 12 sequences of 40 tokens give the norms' reductions many row blocks.
#[test]
fn fused_full_step_gradients_are_the_same_bits_every_run() {
    let model = tiny_model("qwen2", false, Trainable::All, 11);
    let v = model.cfg.vocab_size as u32;
    let seqs: Vec<Vec<u32>> = (0..12u32)
        .map(|i| (0..40u32).map(|j| (i * 31 + j * 7 + 1) % v).collect())
        .collect();
    let masks: Vec<Vec<bool>> = seqs.iter().map(|s| vec![true; s.len()]).collect();
    let run = || -> Vec<Vec<u32>> {
        let (sum, _) = model.token_logps(&seqs, &masks).unwrap();
        let g = sum.sum_all().unwrap().backward().unwrap();
        model
            .vars()
            .iter()
            .map(|(n, var)| {
                let t = g
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("no gradient for {n}"));
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            })
            .collect()
    };
    let first = run();
    for _ in 0..4 {
        assert!(run() == first, "a rerun's gradients differ");
    }
}
