//! `osp bench`: sampling speed and a LoRA training step on a randomly initialised model of a
//! named shape, on any device. It needs no checkpoint, so the same command measures a CPU or
//! a GPU (scripts/gpu-check.sh runs it on CUDA).
use crate::model::{init::random_weights, Llama, ModelConfig, Trainable};
use crate::sample::{generate, Request, SamplingParams};
use crate::train::optim::{AdamW, OptimConfig};
use anyhow::{bail, Result};
use candle_core::Device;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// `smollm2-135m`, `d512` or `d256` (see [`shape`]).
    pub shape: String,
    /// Sequences per sampling batch and per training batch.
    pub batch: usize,
    /// Prompt tokens before sampling.
    pub prompt: usize,
    /// New tokens sampled per sequence.
    pub new_tokens: usize,
    /// Tokens per training sequence.
    pub seq: usize,
    /// Timed repeats (after one warm-up); the median is reported.
    pub repeats: usize,
}

/// Medians of one shape's measurements.
#[derive(Debug, Clone)]
pub struct BenchResult {
    pub shape: String,
    pub params: usize,
    /// Tokens per second sampled at temperature 1 (top-k/top-p off), batch included.
    pub sampling_tok_s: f64,
    /// Tokens per second decoded greedily.
    pub greedy_tok_s: f64,
    /// One LoRA step (r = 8 on every projection): forward, backward, AdamW.
    pub lora_step_s: f64,
}

/// The model config of a named shape: `smollm2-135m` (SmolLM2-135M: 30 layers, d = 576,
/// 9 heads / 3 KV heads, vocab 49152, tied head), `d512` and `d256` (the CPU benchmark's
/// d=512/8-layer and d=256/4-layer models, vocab 512).
pub fn shape(name: &str) -> Result<ModelConfig> {
    let small = |dim: usize, layers: usize| {
        serde_json::json!({
            "model_type": "llama", "vocab_size": 512, "hidden_size": dim,
            "intermediate_size": (2 * 4 * dim / 3).div_ceil(32) * 32,
            "num_hidden_layers": layers, "num_attention_heads": dim / 64,
            "num_key_value_heads": dim / 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": 1024, "tie_word_embeddings": false,
        })
    };
    let v = match name {
        "smollm2-135m" => serde_json::json!({
            "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
            "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
            "num_key_value_heads": 3, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
            "max_position_embeddings": 8192, "tie_word_embeddings": true,
        }),
        "d512" => small(512, 8),
        "d256" => small(256, 4),
        other => bail!("unknown shape `{other}` (smollm2-135m, d512, d256)"),
    };
    ModelConfig::from_json(&v)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn random_seqs(rng: &mut ChaCha8Rng, n: usize, len: usize, vocab: usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|_| {
            (0..len)
                .map(|_| rng.random_range(0..vocab as u32))
                .collect()
        })
        .collect()
}

/// Runs `f` once to warm up, then `repeats` times, and returns the median seconds.
fn time(repeats: usize, dev: &Device, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut times = Vec::with_capacity(repeats);
    for i in 0..=repeats {
        let start = Instant::now();
        f()?;
        // Kernels run asynchronously; the clock stops when the device is done.
        dev.synchronize()?;
        if i > 0 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(median(times))
}

/// A word-level tokenizer of exactly `vocab` tokens (sampling decodes what it generates).
fn word_tokenizer(vocab: usize) -> Result<crate::tokenizer::Tokenizer> {
    let specials = crate::demo::wordlevel::SPECIALS.len();
    let words: Vec<String> = (0..vocab.saturating_sub(specials))
        .map(|i| format!("w{i}"))
        .collect();
    let dir = std::env::temp_dir().join(format!("osp-bench-tokenizer-{}", std::process::id()));
    crate::demo::wordlevel::write_tokenizer(&dir, &words)?;
    let tok = crate::tokenizer::Tokenizer::from_hf_dir(&dir);
    std::fs::remove_dir_all(&dir).ok();
    tok
}

/// Measures sampling and a LoRA step for `opts.shape` on `dev`.
pub fn run(opts: &BenchOptions, dev: &Device) -> Result<BenchResult> {
    if opts.batch == 0 || opts.prompt == 0 || opts.new_tokens == 0 || opts.seq < 2 {
        bail!("bench: batch, prompt and new tokens must be > 0 and seq ≥ 2");
    }
    let cfg = shape(&opts.shape)?;
    let params: usize = crate::model::init::parameter_shapes(&cfg)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let lora = Trainable::Lora {
        config: crate::lora::LoraConfig::default(),
        seed: 0,
    };
    let model = Llama::new(&cfg, random_weights(&cfg, 0, 0.02, dev)?, lora)?;
    let tok = word_tokenizer(cfg.vocab_size)?;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let v = cfg.vocab_size;

    let prompts = random_seqs(&mut rng, opts.batch, opts.prompt, v);
    let requests: Vec<Request> = prompts
        .into_iter()
        .enumerate()
        .map(|(i, prompt)| Request {
            prompt,
            seed: i as u64,
        })
        .collect();
    let sample = |temperature: f64| -> Result<f64> {
        let params = SamplingParams {
            temperature,
            max_new_tokens: opts.new_tokens,
            stop_at_eos: false,
            ..Default::default()
        };
        let secs = time(opts.repeats, dev, || {
            generate(&model, &tok, &requests, &params).map(|_| ())
        })?;
        Ok((opts.batch * opts.new_tokens) as f64 / secs)
    };
    let sampling_tok_s = sample(1.0)?;
    let greedy_tok_s = sample(0.0)?;

    let seqs = random_seqs(&mut rng, opts.batch, opts.seq, v);
    let masks: Vec<Vec<bool>> = seqs
        .iter()
        .map(|s| (0..s.len()).map(|j| j >= s.len() / 2).collect())
        .collect();
    let mut opt = AdamW::new(model.vars().to_vec(), OptimConfig::default(), 1_000_000)?;
    model.set_training(true);
    let lora_step_s = time(opts.repeats, dev, || {
        let loss = model.sequence_logps(&seqs, &masks)?.mean_all()?.neg()?;
        let grads = loss.backward()?;
        let mut acc = opt.new_accumulator();
        acc.add(model.vars(), &grads, 1.0)?;
        opt.step(&mut acc)?;
        Ok(())
    })?;
    Ok(BenchResult {
        shape: opts.shape.clone(),
        params,
        sampling_tok_s,
        greedy_tok_s,
        lora_step_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_have_the_documented_sizes() {
        let count = |name: &str| -> usize {
            crate::model::init::parameter_shapes(&shape(name).unwrap())
                .iter()
                .map(|(_, s)| s.iter().product::<usize>())
                .sum()
        };
        // SmolLM2-135M: 134,515,008 parameters with the head tied.
        assert_eq!(count("smollm2-135m"), 134_515_008);
        assert!(shape("d1024").is_err());
    }

    #[test]
    fn a_small_run_measures_every_column() {
        let opts = BenchOptions {
            shape: "d256".into(),
            batch: 2,
            prompt: 3,
            new_tokens: 2,
            seq: 6,
            repeats: 1,
        };
        let r = run(&opts, &Device::Cpu).unwrap();
        assert_eq!(
            r.params,
            crate::model::init::parameter_shapes(&shape("d256").unwrap())
                .iter()
                .map(|(_, s)| s.iter().product::<usize>())
                .sum::<usize>()
        );
        for v in [r.sampling_tok_s, r.greedy_tok_s, 1.0 / r.lora_step_s] {
            assert!(v.is_finite() && v > 0.0, "{r:?}");
        }
    }
}
