//! The inference engine against the reference model (`model::llama`): logits on every fixture
//! with and without a LoRA adapter, the judge's p_AB and response log-probabilities, greedy
//! generation, and batch independence of sampled requests that share prompts.
mod common;
use candle_core::{Device, Tensor, D};
use common::*;
use osp::engine::{score, Engine, Segment};
use osp::lora::LoraConfig;
use osp::model::load::read_hf_weights;
use osp::model::{load_model, Llama, ModelConfig, TokenBatch, Trainable};
use osp::sample::{generate, Decoder, Request, SamplingParams};
use rand::{Rng, SeedableRng};

const FIXTURES: [&str; 4] = ["llama_gqa", "llama_sharded", "qwen2_tied", "mistral"];

fn load(name: &str, trainable: Trainable) -> Llama {
    let dir = fixture(name);
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    Llama::new(
        &cfg,
        read_hf_weights(&dir, &Device::Cpu).unwrap(),
        trainable,
    )
    .unwrap()
}

fn inputs(name: &str) -> Vec<Vec<u32>> {
    let exp =
        candle_core::safetensors::load(fixture(name).join("expected.safetensors"), &Device::Cpu)
            .unwrap();
    exp["input_ids"]
        .to_dtype(candle_core::DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap()
}

/// Gives every LoRA B a random nonzero value, so the adapter changes the logits.
fn randomise_adapter(model: &Llama, seed: u64) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut n = 0;
    for (name, var) in model.vars() {
        if name.contains("lora_B") {
            let vals: Vec<f32> = (0..var.elem_count())
                .map(|_| rng.random_range(-0.3f32..0.3))
                .collect();
            var.set(&Tensor::from_vec(vals, var.dims(), &Device::Cpu).unwrap())
                .unwrap();
            n += 1;
        }
    }
    assert!(n > 0, "no adapter to randomise");
}

fn lora() -> Trainable {
    Trainable::Lora {
        config: LoraConfig {
            r: 4,
            ..Default::default()
        },
        seed: 3,
    }
}

/// Engine logits [rows, vocab] for each sequence alone and for all in one batch.
fn engine_logits(model: &Llama, seqs: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let engine = Engine::new(model).unwrap();
    let longest = seqs.iter().map(Vec::len).max().unwrap();
    let mut cache = engine.scratch(seqs.len(), longest);
    let segs: Vec<Segment> = seqs
        .iter()
        .enumerate()
        .map(|(i, s)| Segment {
            tokens: s,
            slot: i,
            start: 0,
            pos0: 0,
            prefix: None,
        })
        .collect();
    let h = engine.hidden(&segs, &mut cache, None).unwrap();
    let rows: usize = seqs.iter().map(Vec::len).sum();
    let logits = engine.logits(&h, rows).unwrap();
    let vocab = model.cfg.vocab_size;
    let mut out = vec![];
    let mut r = 0;
    for s in seqs {
        out.push(logits[r * vocab..(r + s.len()) * vocab].to_vec());
        r += s.len();
    }
    out
}

fn check_logits(model: &Llama, name: &str, seqs: &[Vec<u32>]) {
    let got = engine_logits(model, seqs);
    for (s, g) in seqs.iter().zip(&got) {
        let want = model
            .forward(&TokenBatch::right_padded(std::slice::from_ref(s), &Device::Cpu).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let err = g
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            err < 1e-4,
            "{name}: engine vs reference logits differ by {err}"
        );
    }
}

#[test]
fn logits_equal_the_reference_on_every_fixture() {
    for name in FIXTURES {
        let seqs = inputs(name);
        // Unequal lengths in one unpadded batch.
        let mut mixed = seqs.clone();
        mixed[0].truncate(4);
        check_logits(&load(name, Trainable::None), name, &mixed);
        check_logits(&load(name, Trainable::None), name, &seqs);
    }
}

#[test]
fn logits_equal_the_reference_with_a_lora_adapter() {
    for name in FIXTURES {
        let model = load(name, lora());
        randomise_adapter(&model, 7);
        let seqs = inputs(name);
        // The adapter does change the logits (so the comparison tests it).
        let base = engine_logits(&model.without_adapter(), &seqs);
        let adapted = engine_logits(&model, &seqs);
        let moved = base[0]
            .iter()
            .zip(&adapted[0])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            moved > 1e-3,
            "{name}: the adapter moved logits by only {moved}"
        );
        check_logits(&model, name, &seqs);
        // A changed adapter is seen without rebuilding anything.
        randomise_adapter(&model, 8);
        check_logits(&model, name, &seqs);
    }
}

#[test]
fn judge_answer_probabilities_equal_the_reference() {
    for name in FIXTURES {
        let model = load(name, lora());
        randomise_adapter(&model, 9);
        let mut seqs = inputs(name);
        seqs[1].truncate(5);
        let (a, b) = (3u32, 5u32);
        let got = score::p_ab(&Engine::new(&model).unwrap(), &seqs, (a, b), 1).unwrap();
        let got2 = score::p_ab(&Engine::new(&model).unwrap(), &seqs, (a, b), 16).unwrap();
        for (i, s) in seqs.iter().enumerate() {
            let l = model
                .forward(&TokenBatch::right_padded(std::slice::from_ref(s), &Device::Cpu).unwrap())
                .unwrap()
                .get(0)
                .unwrap()
                .get(s.len() - 1)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let want = 1.0 / (1.0 + (-((l[a as usize] - l[b as usize]) as f64)).exp());
            assert!(
                (got[i] - want).abs() < 1e-5,
                "{name}: p_ab {} vs {want}",
                got[i]
            );
            assert!(
                (got2[i] - want).abs() < 1e-5,
                "{name}: batched p_ab {}",
                got2[i]
            );
        }
    }
}

/// Judge prompts sharing a prefix (the template's head and the task prompt) have it computed
/// once; each prompt's p_AB must be bit-identical to judging it alone.
#[test]
fn shared_judge_prefixes_give_exactly_the_values_of_judging_alone() {
    for name in FIXTURES {
        let model = load(name, lora());
        randomise_adapter(&model, 12);
        let engine = Engine::new(&model).unwrap();
        let base = inputs(name).concat();
        let head = &base[..12.min(base.len() - 3)];
        // Three prompts on one long prefix, two on a shorter one, one sharing nothing, and
        // one that is all prefix but its last token.
        let mut seqs = vec![];
        for (cut, tail) in [(0, 0), (0, 1), (0, 2), (3, 0), (3, 2)] {
            let mut s = head[..head.len() - cut].to_vec();
            s.extend(base.iter().rev().skip(tail).take(4 + tail));
            seqs.push(s);
        }
        seqs.push(base.iter().rev().take(9).copied().collect());
        seqs.push(head[..9].to_vec());
        let (a, b) = (3u32, 5u32);
        let together = score::p_ab(&engine, &seqs, (a, b), 4).unwrap();
        for (i, s) in seqs.iter().enumerate() {
            let alone = score::p_ab(&engine, std::slice::from_ref(s), (a, b), 1).unwrap();
            assert_eq!(together[i], alone[0], "{name}: prompt {i}");
        }
    }
}

#[test]
fn response_logps_equal_the_reference() {
    for name in FIXTURES {
        let model = load(name, lora());
        randomise_adapter(&model, 10);
        let seqs = inputs(name);
        let masks: Vec<Vec<bool>> = seqs
            .iter()
            .map(|s| (0..s.len()).map(|j| j >= 3).collect())
            .collect();
        let want = model
            .sequence_logps(&seqs, &masks)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let got = score::sequence_logps(&Engine::new(&model).unwrap(), &seqs, &masks).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-4 * (1.0 + w.abs()), "{name}: {g} vs {w}");
        }
    }
}

/// Responses to one prompt (the K samples of an online iteration): the prompt runs once for
/// all of them, and each sum is exactly what the sequence gets alone.
#[test]
fn response_logps_with_a_shared_prompt_equal_scoring_alone() {
    for name in FIXTURES {
        let model = load(name, lora());
        randomise_adapter(&model, 13);
        let inp = inputs(name);
        let prompt: Vec<u32> = inp[0].iter().chain(&inp[1][..3]).copied().collect();
        let seqs: Vec<Vec<u32>> = inp
            .iter()
            .map(|s| prompt.iter().chain(&s[s.len() - 5..]).copied().collect())
            .collect();
        let masks: Vec<Vec<bool>> = seqs
            .iter()
            .map(|s| (0..s.len()).map(|j| j >= prompt.len()).collect())
            .collect();
        let engine = Engine::new(&model).unwrap();
        let got = score::sequence_logps(&engine, &seqs, &masks).unwrap();
        let want = model
            .sequence_logps(&seqs, &masks)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() < 1e-4 * (1.0 + w.abs()), "{name}: {g} vs {w}");
            let alone = score::sequence_logps(&engine, &seqs[i..=i], &masks[i..=i]).unwrap();
            assert_eq!(
                alone[0].to_bits(),
                g.to_bits(),
                "{name}: sequence {i} alone"
            );
        }
    }
}

/// Greedy tokens from the reference path (the autograd model, `Decoder`'s cache).
fn reference_greedy(model: &Llama, prompts: &[Vec<u32>], n: usize) -> Vec<Vec<u32>> {
    let (mut dec, mut logits) = Decoder::prefill(model, prompts).unwrap();
    let mut out = vec![vec![]; prompts.len()];
    for step in 0..n {
        let next: Vec<u32> = logits.argmax(D::Minus1).unwrap().to_vec1().unwrap();
        for (o, &t) in out.iter_mut().zip(&next) {
            o.push(t);
        }
        if step + 1 < n {
            logits = dec.step(&next).unwrap();
        }
    }
    out
}

#[test]
fn greedy_generation_equals_the_reference_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_run_model(dir.path(), 5);
    let lm = load_model(&path, None, &Device::Cpu, lora()).unwrap();
    randomise_adapter(&lm.model, 11);
    let tok = &lm.tokenizer;
    let prompts = vec![
        tok.encode("cat sat on mat", true).unwrap(),
        tok.encode("dog", true).unwrap(),
        tok.encode("cat sat on mat", true).unwrap(),
    ];
    let params = SamplingParams {
        temperature: 0.0,
        max_new_tokens: 20,
        stop_at_eos: false,
        ..Default::default()
    };
    let reqs: Vec<Request> = prompts
        .iter()
        .map(|p| Request {
            prompt: p.clone(),
            seed: 0,
        })
        .collect();
    let got = generate(&lm.model, tok, &reqs, &params).unwrap();
    let want = reference_greedy(&lm.model, &prompts, 20);
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(&g.tokens, w);
    }
    if let Some(bin) = shared_data("models/stories260K/stories260K.bin") {
        let lm = load_model(&bin, None, &Device::Cpu, Trainable::None).unwrap();
        let tok = &lm.tokenizer;
        let prompts = vec![
            tok.encode("Once upon a time", true).unwrap(),
            tok.encode("Tom and his friend went to the big park", true)
                .unwrap(),
        ];
        let reqs: Vec<Request> = prompts
            .iter()
            .map(|p| Request {
                prompt: p.clone(),
                seed: 0,
            })
            .collect();
        let params = SamplingParams {
            max_new_tokens: 40,
            ..params
        };
        let got = generate(&lm.model, tok, &reqs, &params).unwrap();
        let want = reference_greedy(&lm.model, &prompts, 40);
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(&g.tokens, w);
        }
    }
}

#[test]
fn samples_are_the_same_alone_and_in_a_batch_with_shared_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_run_model(dir.path(), 6);
    let lm = load_model(&path, None, &Device::Cpu, Trainable::None).unwrap();
    let tok = &lm.tokenizer;
    let p1 = tok.encode("cat sat on the mat", true).unwrap();
    let p2 = tok.encode("dog ran", true).unwrap();
    let params = SamplingParams {
        temperature: 1.0,
        top_k: 10,
        top_p: 0.9,
        max_new_tokens: 24,
        stop_strings: vec!["red".into()],
        ..Default::default()
    };
    // K = 4 samples of p1 and 3 of p2, interleaved, sharing their prompts' caches.
    let reqs: Vec<Request> = (0..7)
        .map(|j| Request {
            prompt: if j % 2 == 0 { p1.clone() } else { p2.clone() },
            seed: 100 + j as u64,
        })
        .collect();
    let together = generate(&lm.model, tok, &reqs, &params).unwrap();
    for (r, t) in reqs.iter().zip(&together) {
        let alone = generate(&lm.model, tok, std::slice::from_ref(r), &params).unwrap();
        assert_eq!(alone[0].tokens, t.tokens);
        assert_eq!(alone[0].text, t.text);
        assert_eq!(alone[0].finish, t.finish);
    }
    // Same seeds, same run; the samples of one prompt differ from each other.
    let again = generate(&lm.model, tok, &reqs, &params).unwrap();
    for (a, b) in together.iter().zip(&again) {
        assert_eq!(a.tokens, b.tokens);
    }
    assert_ne!(together[0].tokens, together[2].tokens);
}

/// The log-probability the sampler records for each sample (its raw logits, before
/// temperature, top-k and top-p) is the reference model's score of the same tokens.
#[test]
fn recorded_sample_log_probabilities_equal_the_reference_score() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_run_model(dir.path(), 6);
    let lm = load_model(&path, None, &Device::Cpu, lora()).unwrap();
    randomise_adapter(&lm.model, 11);
    let tok = &lm.tokenizer;
    let params = SamplingParams {
        temperature: 0.7,
        top_k: 10,
        top_p: 0.9,
        max_new_tokens: 20,
        stop_strings: vec!["red".into()],
        ..Default::default()
    };
    let reqs: Vec<Request> = ["cat sat on the mat", "dog ran", "cat sat on the mat"]
        .iter()
        .enumerate()
        .map(|(j, p)| Request {
            prompt: tok.encode(p, true).unwrap(),
            seed: 7 + j as u64,
        })
        .collect();
    let gens = generate(&lm.model, tok, &reqs, &params).unwrap();
    let (seqs, masks): (Vec<Vec<u32>>, Vec<Vec<bool>>) = reqs
        .iter()
        .zip(&gens)
        .map(|(r, g)| {
            let mut s = r.prompt.clone();
            s.extend_from_slice(&g.tokens);
            let m = (0..s.len()).map(|j| j >= r.prompt.len()).collect();
            (s, m)
        })
        .unzip();
    let want = lm
        .model
        .sequence_logps(&seqs, &masks)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (g, w) in gens.iter().zip(&want) {
        let got = g
            .logprob
            .expect("the CPU engine records the log-probability");
        assert!(!g.tokens.is_empty());
        assert!((got - w).abs() < 1e-4 * (1.0 + w.abs()), "{got} vs {w}");
    }
}

#[test]
fn an_out_of_range_token_is_an_error() {
    let model = load("llama_gqa", Trainable::None);
    let engine = Engine::new(&model).unwrap();
    let err = score::p_ab(&engine, &[vec![1, 5000]], (1, 2), 4).unwrap_err();
    assert!(err.to_string().contains("5000"), "{err}");
}

/// Smoke comparison (not a reported figure) of the engine's product against candle's gemm
/// for decode-shaped products: `cargo test --test engine kernel_smoke -- --ignored --nocapture`.
#[test]
#[ignore]
fn kernel_smoke_vs_candle_gemm() {
    use osp::engine::kernels::matmul_nt;
    for (rows, inp, out) in [
        (8, 576, 1536),
        (56, 576, 1536),
        (8, 576, 49152),
        (512, 576, 1536),
    ] {
        let x: Vec<f32> = (0..rows * inp).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..out * inp).map(|i| (i % 11) as f32 * 0.01).collect();
        let mut y = vec![0f32; rows * out];
        let reps = 20;
        let t = std::time::Instant::now();
        for _ in 0..reps {
            matmul_nt(&x, rows, inp, &w, out, &mut y);
        }
        let ours = t.elapsed().as_secs_f64() / reps as f64;
        let xt = Tensor::from_vec(x, (rows, inp), &Device::Cpu).unwrap();
        let wt = Tensor::from_vec(w, (out, inp), &Device::Cpu).unwrap();
        let t = std::time::Instant::now();
        for _ in 0..reps {
            std::hint::black_box(xt.matmul(&wt.t().unwrap()).unwrap());
        }
        let gemm = t.elapsed().as_secs_f64() / reps as f64;
        let flop = 2.0 * (rows * inp * out) as f64;
        eprintln!(
            "{rows}×{inp}×{out}: engine {:.1} GFLOP/s, candle gemm {:.1} GFLOP/s",
            flop / ours / 1e9,
            flop / gemm / 1e9
        );
    }
}
