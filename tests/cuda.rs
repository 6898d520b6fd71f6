//! The model on a GPU against the outside references and the CPU: transformers' logits, the
//! custom ops' gradients, a whole model's gradients, cached decoding, sampling and a training
//! step. Each test runs on `cuda:0` when osp is built with `--features cuda` and a GPU
//! answers, and otherwise prints why it skipped; `OSP_REQUIRE_CUDA=1` turns a skip into a
//! failure (scripts/gpu-check.sh sets it), and `OSP_TEST_DEVICE=cpu` runs them on the CPU.
//!
//! Fixtures are read from `$OSP_REPO/tests/fixtures` when set (the GPU machine runs this
//! binary from another folder than the one it was built in), else from the source tree. The
//! real-model tests read `$OSP_DATA` (a copy of ../shared/data's stories260K) or
//! ../shared/data, and skip when neither has it.
mod common;
use candle_core::{DType, Device, Tensor, Var, D};
use common::{max_abs, max_abs_value, tiny_config};
use osp::loss::{preference_loss, LossConfig, PairLogps};
use osp::model::load::read_hf_weights;
use osp::model::{init::random_weights, load_model, ops, Llama, ModelConfig};
use osp::model::{TokenBatch, Trainable};
use osp::sample::{generate, Decoder, Request, SamplingParams};
use osp::train::optim::{AdamW, OptimConfig};
use rand::SeedableRng;
use std::collections::HashMap;
use std::path::PathBuf;

/// `cuda:0`, or None with the reason printed (a panic under OSP_REQUIRE_CUDA=1).
/// `OSP_TEST_DEVICE=cpu` runs the tests with the CPU standing in for the GPU, which checks the
/// tests themselves on a machine without one.
fn gpu() -> Option<Device> {
    if std::env::var("OSP_TEST_DEVICE").is_ok_and(|v| v == "cpu") {
        return Some(Device::Cpu);
    }
    let why = if !candle_core::utils::cuda_is_available() {
        "osp was built without the `cuda` feature".to_string()
    } else {
        match osp::device("cuda:0") {
            Ok(d) => return Some(d),
            Err(e) => format!("no CUDA device: {e:#}"),
        }
    };
    if std::env::var("OSP_REQUIRE_CUDA").is_ok_and(|v| v == "1") {
        panic!("OSP_REQUIRE_CUDA=1 but {why}");
    }
    eprintln!("skipping: {why}");
    None
}

fn repo() -> PathBuf {
    match std::env::var_os("OSP_REPO") {
        Some(p) => PathBuf::from(p),
        None => common::repo(),
    }
}

fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures").join(name)
}

/// stories260K (model and tokenizer), from $OSP_DATA or ../shared/data.
fn stories260k() -> Option<PathBuf> {
    let rel = "models/stories260K/stories260K.bin";
    let dirs = [
        std::env::var_os("OSP_DATA").map(PathBuf::from),
        Some(repo().join("../shared/data")),
    ];
    let found = dirs
        .into_iter()
        .flatten()
        .map(|d| d.join(rel))
        .find(|p| p.exists());
    if found.is_none() {
        eprintln!("skipping: {rel} is in neither $OSP_DATA nor ../shared/data");
    }
    found
}

fn cpu(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu).unwrap()
}

/// Largest |a − b| relative to the larger of 1 and max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&cpu(a), &cpu(b)) / max_abs_value(&cpu(b)).max(1.0)
}

fn randn(shape: &[usize], seed: u64, device: &Device) -> Tensor {
    let n = shape.iter().product();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let v = osp::model::init::normal_vec(&mut rng, n, 1.0);
    Tensor::from_vec(v, shape, device).unwrap()
}

fn rows_u32(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(DType::U32).unwrap().to_vec2().unwrap()
}

#[test]
fn logits_match_the_transformers_fixtures_on_cuda() {
    let Some(dev) = gpu() else { return };
    for name in ["llama_gqa", "llama_sharded", "qwen2_tied", "mistral"] {
        let dir = fixture(name);
        let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let model =
            Llama::new(&cfg, read_hf_weights(&dir, &dev).unwrap(), Trainable::None).unwrap();
        let exp: HashMap<String, Tensor> =
            candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
        let ids = rows_u32(&exp["input_ids"]);
        let logits = model
            .forward(&TokenBatch::right_padded(&ids, &dev).unwrap())
            .unwrap();
        assert!(
            logits.device().same_device(&dev),
            "{name}: the logits left the device"
        );
        let err = max_abs(&cpu(&logits), &exp["logits"]);
        assert!(err < 1e-3, "{name}: max abs logit error {err} on CUDA");

        // Left padding: compared where the mask is 1.
        let padded = rows_u32(&exp["padded_input_ids"]);
        let mask = rows_u32(&exp["padded_attention_mask"]);
        let seqs: Vec<Vec<u32>> = padded
            .iter()
            .zip(&mask)
            .map(|(r, m)| {
                r.iter()
                    .zip(m)
                    .filter(|(_, &m)| m == 1)
                    .map(|(&t, _)| t)
                    .collect()
            })
            .collect();
        let logits = cpu(&model
            .forward(&TokenBatch::left_padded(&seqs, &dev).unwrap())
            .unwrap());
        let want = &exp["padded_logits"];
        for (b, m) in mask.iter().enumerate() {
            for (t, _) in m.iter().enumerate().filter(|(_, &real)| real == 1) {
                let err = max_abs(
                    &logits.get(b).unwrap().get(t).unwrap(),
                    &want.get(b).unwrap().get(t).unwrap(),
                );
                assert!(
                    err < 1e-3,
                    "{name}: padded row {b} position {t}: error {err}"
                );
            }
        }
    }
}

/// d(Σ f(x)⊙r)/dx on `dev`, moved to the CPU.
fn grad_on(dev: &Device, x: &Tensor, f: &dyn Fn(&Tensor) -> Tensor, seed: u64) -> Tensor {
    let var = Var::from_tensor(&x.to_device(dev).unwrap()).unwrap();
    let y = f(var.as_tensor());
    assert!(y.device().same_device(dev), "the op changed device");
    let r = randn(y.dims(), seed, dev);
    let grads = (y * r).unwrap().sum_all().unwrap().backward().unwrap();
    cpu(grads
        .get(var.as_tensor())
        .expect("gradient reaches the input"))
}

#[test]
fn custom_ops_forward_and_backward_match_the_cpu() {
    let Some(dev) = gpu() else { return };
    let c = Device::Cpu;
    // Softmax: attention-score shapes, a masked (−1e30) column included.
    let mut x = (randn(&[2, 3, 5, 9], 1, &c) * 4.0).unwrap();
    x = x
        .slice_assign(
            &[0..2, 0..3, 0..5, 8..9],
            &Tensor::full(-1e30f32, (2, 3, 5, 1), &c).unwrap(),
        )
        .unwrap();
    let sm = |x: &Tensor| ops::softmax_last_dim(x).unwrap();
    assert!(rel_err(&sm(&x.to_device(&dev).unwrap()), &sm(&x)) < 1e-5);
    assert!(rel_err(&grad_on(&dev, &x, &sm, 2), &grad_on(&c, &x, &sm, 2)) < 1e-4);

    // RMSNorm: gradients in x and in the weight.
    let x = randn(&[4, 6, 64], 3, &c);
    let w = randn(&[64], 4, &c).affine(0.5, 1.0).unwrap();
    let (xg, wg) = (x.to_device(&dev).unwrap(), w.to_device(&dev).unwrap());
    let y = |x: &Tensor, w: &Tensor| ops::rms_norm(x, w, 1e-5).unwrap();
    assert!(rel_err(&y(&xg, &wg), &y(&x, &w)) < 1e-5);
    let fx = |w: Tensor| move |x: &Tensor| ops::rms_norm(x, &w, 1e-5).unwrap();
    assert!(
        rel_err(
            &grad_on(&dev, &x, &fx(wg.clone()), 5),
            &grad_on(&c, &x, &fx(w.clone()), 5)
        ) < 1e-4
    );
    let fw = |x: Tensor| move |w: &Tensor| ops::rms_norm(&x, w, 1e-5).unwrap();
    assert!(
        rel_err(
            &grad_on(&dev, &w, &fw(xg.clone()), 6),
            &grad_on(&c, &w, &fw(x.clone()), 6)
        ) < 1e-4
    );

    // Rotary embeddings with per-sequence positions.
    let (b, h, t, d) = (2, 4, 6, 16);
    let x = randn(&[b, h, t, d], 7, &c);
    let pos: Vec<u32> = vec![0, 1, 2, 3, 4, 5, 0, 0, 0, 1, 2, 3];
    let tables = |dev: &Device| {
        let p = Tensor::from_vec(pos.clone(), (b, t), dev).unwrap();
        ops::rope_tables(&p, d, 10000.0).unwrap()
    };
    let ((cg, sg), (cc, sc)) = (tables(&dev), tables(&c));
    assert!(rel_err(&cg, &cc) < 1e-5 && rel_err(&sg, &sc) < 1e-5);
    let rope = |cs: (Tensor, Tensor)| move |x: &Tensor| ops::rope(x, &cs.0, &cs.1).unwrap();
    let (rg, rc) = (rope((cg, sg)), rope((cc, sc)));
    assert!(rel_err(&rg(&x.to_device(&dev).unwrap()), &rc(&x)) < 1e-5);
    assert!(rel_err(&grad_on(&dev, &x, &rg, 8), &grad_on(&c, &x, &rc, 8)) < 1e-4);

    // Frozen linear: the input's gradient only.
    let x = randn(&[10, 24], 9, &c);
    let w = randn(&[12, 24], 10, &c);
    let lin = |w: Tensor| move |x: &Tensor| ops::frozen_linear(x, &w).unwrap();
    let (lg, lc) = (lin(w.to_device(&dev).unwrap()), lin(w.clone()));
    assert!(rel_err(&lg(&x.to_device(&dev).unwrap()), &lc(&x)) < 1e-5);
    assert!(rel_err(&grad_on(&dev, &x, &lg, 11), &grad_on(&c, &x, &lc, 11)) < 1e-4);
}

/// The same tiny model (biases, GQA, untied head) on the CPU and on `dev`.
fn twin_models(trainable: Trainable, dev: &Device) -> (Llama, Llama) {
    let cfg = tiny_config("qwen2", false);
    let make = |d: &Device| {
        Llama::new(
            &cfg,
            random_weights(&cfg, 3, 0.2, d).unwrap(),
            trainable.clone(),
        )
        .unwrap()
    };
    (make(&Device::Cpu), make(dev))
}

fn batch() -> (Vec<Vec<u32>>, Vec<Vec<bool>>) {
    let seqs = vec![
        vec![1u32, 5, 9, 3, 7, 2, 11],
        vec![1, 4, 4, 8, 30],
        vec![2, 3],
    ];
    let masks = vec![
        vec![false, false, false, true, true, true, true],
        vec![false, true, true, true, true],
        vec![false, true],
    ];
    (seqs, masks)
}

#[test]
fn every_gradient_of_a_full_model_matches_the_cpu() {
    let Some(dev) = gpu() else { return };
    let (m_cpu, m_gpu) = twin_models(Trainable::All, &dev);
    let (seqs, masks) = batch();
    let grads = |m: &Llama| {
        m.sequence_logps(&seqs, &masks)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    };
    let (g_cpu, g_gpu) = (grads(&m_cpu), grads(&m_gpu));
    assert_eq!(m_cpu.vars().len(), m_gpu.vars().len());
    for ((name, vc), (_, vg)) in m_cpu.vars().iter().zip(m_gpu.vars()) {
        let want = g_cpu.get(vc.as_tensor()).unwrap();
        let got = g_gpu
            .get(vg.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient on CUDA"));
        assert!(
            got.device().same_device(&dev),
            "{name}: gradient left the device"
        );
        let err = rel_err(got, want);
        assert!(
            err < 1e-3,
            "{name}: CUDA gradient differs from the CPU's by {err}"
        );
    }
}

#[test]
fn a_lora_preference_step_matches_the_cpu_and_lowers_the_loss() {
    let Some(dev) = gpu() else { return };
    let lora = Trainable::Lora {
        config: osp::lora::LoraConfig::default(),
        seed: 5,
    };
    let (m_cpu, m_gpu) = twin_models(lora, &dev);
    let (chosen, masks) = batch();
    let rejected: Vec<Vec<u32>> = chosen
        .iter()
        .map(|s| s.iter().map(|&t| (t * 7 + 3) % 40).collect())
        .collect();
    let cfg = LossConfig::default();
    let loss = |m: &Llama| {
        let r = m.without_adapter();
        let lp = |m: &Llama, s: &[Vec<u32>]| m.sequence_logps(s, &masks).unwrap();
        let (pc, pr) = (lp(m, &chosen), lp(m, &rejected));
        let (rc, rr) = (lp(&r, &chosen).detach(), lp(&r, &rejected).detach());
        let s = Tensor::new(&[0.9f32, 0.7, 0.6], m.device()).unwrap();
        let lp = PairLogps {
            policy_chosen: &pc,
            policy_rejected: &pr,
            ref_chosen: &rc,
            ref_rejected: &rr,
        };
        preference_loss(&cfg, &lp, Some(&s)).unwrap().loss
    };
    let optim = OptimConfig {
        lr: 1e-2,
        ..Default::default()
    };
    let step = |m: &Llama| {
        let l = loss(m);
        let grads = l.backward().unwrap();
        let mut opt = AdamW::new(m.vars().to_vec(), optim.clone(), 10).unwrap();
        let mut acc = opt.new_accumulator();
        acc.add(m.vars(), &grads, 1.0).unwrap();
        let stats = opt.step(&mut acc).unwrap();
        (
            l.to_scalar::<f32>().unwrap(),
            stats.grad_norm,
            loss(m).to_scalar::<f32>().unwrap(),
        )
    };
    let (before_c, norm_c, after_c) = step(&m_cpu);
    let (before_g, norm_g, after_g) = step(&m_gpu);
    assert!(
        (before_c - before_g).abs() < 1e-4,
        "loss {before_g} on CUDA, {before_c} on the CPU"
    );
    assert!(
        (norm_c - norm_g).abs() < 1e-3 * norm_c.max(1.0),
        "grad norm {norm_g} on CUDA, {norm_c} on the CPU"
    );
    assert!(
        after_g < before_g,
        "one step did not lower the loss on CUDA: {before_g} → {after_g}"
    );
    assert!(
        (after_c - after_g).abs() < 1e-3,
        "loss after a step {after_g} on CUDA, {after_c} on the CPU"
    );
    for ((name, vc), (_, vg)) in m_cpu.vars().iter().zip(m_gpu.vars()) {
        let err = max_abs(&cpu(vg.as_tensor()), vc.as_tensor());
        // AdamW's first step moves each weight by about ±lr, so a sign flip of a gradient
        // element near zero would show as 2·lr; anything far below that is rounding.
        assert!(
            err < 0.2 * optim.lr as f32,
            "{name}: updated weights differ by {err}"
        );
    }
}

#[test]
fn cached_decoding_equals_the_full_forward_on_cuda() {
    let Some(dev) = gpu() else { return };
    let dir = fixture("llama_gqa");
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let model = Llama::new(&cfg, read_hf_weights(&dir, &dev).unwrap(), Trainable::None).unwrap();
    let model_cpu = Llama::new(
        &cfg,
        read_hf_weights(&dir, &Device::Cpu).unwrap(),
        Trainable::None,
    )
    .unwrap();
    let v = cfg.vocab_size as u32;
    let prompts: Vec<Vec<u32>> = vec![vec![1, 5, 9, 3], vec![2, 7], vec![4, 4, 8, 30 % v, 11, 6]];
    let (mut dec, mut logits) = Decoder::prefill(&model, &prompts).unwrap();
    let mut seqs = prompts.clone();
    for step in 0..10 {
        let next: Vec<u32> = logits.argmax(D::Minus1).unwrap().to_vec1().unwrap();
        let last = |m: &Llama, d: &Device| {
            let batch = TokenBatch::left_padded(&seqs, d).unwrap();
            cpu(&m
                .forward(&batch)
                .unwrap()
                .narrow(1, batch.len - 1, 1)
                .unwrap()
                .squeeze(1)
                .unwrap())
        };
        let err = max_abs(&cpu(&logits), &last(&model, &dev));
        assert!(
            err < 1e-4,
            "step {step}: cached vs full logits differ by {err} on CUDA"
        );
        let err = max_abs(&cpu(&logits), &last(&model_cpu, &Device::Cpu));
        assert!(
            err < 1e-3,
            "step {step}: CUDA's cached logits differ from the CPU's by {err}"
        );
        for (s, &t) in seqs.iter_mut().zip(&next) {
            s.push(t);
        }
        logits = dec.step(&next).unwrap();
    }
}

#[test]
fn stories260k_decodes_the_published_sample_on_cuda() {
    let Some(dev) = gpu() else { return };
    let Some(bin) = stories260k() else { return };
    let lm = load_model(&bin, None, &dev, Trainable::None).unwrap();
    let bos = lm.tokenizer.encode("", true).unwrap();
    let greedy = SamplingParams {
        temperature: 0.0,
        max_new_tokens: 40,
        ..Default::default()
    };
    let out = generate(
        &lm.model,
        &lm.tokenizer,
        &[Request {
            prompt: bos.clone(),
            seed: 0,
        }],
        &greedy,
    )
    .unwrap();
    assert!(
        out[0]
            .text
            .starts_with("Once upon a time, there was a little girl named Lily"),
        "greedy on CUDA: {:?}",
        out[0].text
    );
    // Sampling on CUDA: the same tokens as the CPU for the same seeds (the host draws from
    // logits that agree to rounding), and a request is reproducible.
    let cpu_lm = load_model(&bin, None, &Device::Cpu, Trainable::None).unwrap();
    let params = SamplingParams {
        temperature: 1.0,
        top_k: 40,
        top_p: 0.95,
        max_new_tokens: 24,
        ..Default::default()
    };
    let reqs: Vec<Request> = (0..4)
        .map(|seed| Request {
            prompt: bos.clone(),
            seed,
        })
        .collect();
    let on_gpu = generate(&lm.model, &lm.tokenizer, &reqs, &params).unwrap();
    let on_cpu = generate(&cpu_lm.model, &cpu_lm.tokenizer, &reqs, &params).unwrap();
    let same = on_gpu
        .iter()
        .zip(&on_cpu)
        .filter(|(g, c)| g.tokens == c.tokens)
        .count();
    assert!(same >= 3, "only {same} of 4 samples equal the CPU's");
    let again = generate(&lm.model, &lm.tokenizer, &reqs, &params).unwrap();
    for (a, b) in on_gpu.iter().zip(&again) {
        assert_eq!(
            a.tokens, b.tokens,
            "a seeded sample is not reproducible on CUDA"
        );
    }
}
