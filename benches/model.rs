//! candle vs PyTorch on the same model, same machine, same run.
//!
//! `cargo bench --bench model` times (a) a full training step (forward, backward, AdamW) for
//! d=256/4 layers and d=512/8 layers, batch 8, sequence 128, vocab 512, and (b) KV-cache
//! sampling of 64 new tokens for batch 8 (prompts of 16 tokens), then runs
//! `scripts/bench_torch.py` on the identical configuration and prints the ratios of medians.
//! Python: `$OSP_BENCH_PYTHON`, else `pyenv/bin/python` or `../pyenv/bin/python`, else
//! `python3`; without torch the PyTorch column is skipped. `OSP_BENCH_REPEATS` (default 5).
use anyhow::{Context, Result};
use candle_core::{Device, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use osp::model::{init::random_weights, Llama, ModelConfig, Trainable};
use osp::sample::{generate, Request, SamplingParams};
use osp::tokenizer::Tokenizer;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const VOCAB: usize = 512;
const BATCH: usize = 8;
const SEQ: usize = 128;
const PROMPT: usize = 16;
const NEW: usize = 64;

/// The shape bench_torch.py builds: heads = dim/64, SwiGLU hidden by the llama2.c rule.
fn config(dim: usize, layers: usize) -> ModelConfig {
    let hidden = (2 * 4 * dim / 3).div_ceil(32) * 32;
    ModelConfig::from_json(&serde_json::json!({
        "model_type": "llama", "vocab_size": VOCAB, "hidden_size": dim,
        "intermediate_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": dim / 64, "num_key_value_heads": dim / 64,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 1024,
        "tie_word_embeddings": false,
    }))
    .expect("bench config")
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

fn random_seqs(rng: &mut rand_chacha::ChaCha8Rng, n: usize, len: usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|_| {
            (0..len)
                .map(|_| rng.random_range(0..VOCAB as u32))
                .collect()
        })
        .collect()
}

fn train_step_times(dim: usize, layers: usize, repeats: usize) -> Result<Vec<f64>> {
    let cfg = config(dim, layers);
    let model = Llama::new(
        &cfg,
        random_weights(&cfg, 0, 0.02, &Device::Cpu)?,
        Trainable::All,
    )?;
    let vars: Vec<Var> = model.vars().iter().map(|(_, v)| v.clone()).collect();
    let params = ParamsAdamW {
        lr: 1e-4,
        weight_decay: 0.01,
        ..Default::default()
    };
    let mut opt = AdamW::new(vars, params)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mask = vec![vec![true; SEQ]; BATCH];
    let mut times = vec![];
    for i in 0..repeats + 1 {
        let seqs = random_seqs(&mut rng, BATCH, SEQ);
        let start = Instant::now();
        // Causal-LM cross-entropy averaged over every predicted token, as in the torch script.
        let (_, per_token) = model.token_logps(&seqs, &mask)?;
        let loss = (per_token.sum_all()? * (-1.0 / (BATCH * (SEQ - 1)) as f64))?;
        opt.backward_step(&loss)?;
        let dt = start.elapsed().as_secs_f64();
        eprintln!(
            "  candle train d={dim} step {i}: {dt:.3}s loss {:.4}",
            loss.to_scalar::<f32>()?
        );
        if i > 0 {
            times.push(dt);
        }
    }
    Ok(times)
}

fn sample_times(dim: usize, layers: usize, tok: &Tokenizer, repeats: usize) -> Result<Vec<f64>> {
    let cfg = config(dim, layers);
    let model = Llama::new(
        &cfg,
        random_weights(&cfg, 0, 0.02, &Device::Cpu)?,
        Trainable::None,
    )?;
    let params = SamplingParams {
        temperature: 1.0,
        max_new_tokens: NEW,
        stop_at_eos: false,
        ..Default::default()
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let mut times = vec![];
    for i in 0..repeats + 1 {
        let reqs: Vec<Request> = random_seqs(&mut rng, BATCH, PROMPT)
            .into_iter()
            .enumerate()
            .map(|(j, prompt)| Request {
                prompt,
                seed: j as u64,
            })
            .collect();
        let start = Instant::now();
        let out = generate(&model, tok, &reqs, &params)?;
        let dt = start.elapsed().as_secs_f64();
        let n: usize = out.iter().map(|g| g.tokens.len()).sum();
        anyhow::ensure!(n == BATCH * NEW, "expected {} tokens, got {n}", BATCH * NEW);
        eprintln!(
            "  candle sample d={dim} run {i}: {dt:.3}s ({:.0} tok/s)",
            n as f64 / dt
        );
        if i > 0 {
            times.push(dt);
        }
    }
    Ok(times)
}

fn python() -> String {
    if let Ok(p) = std::env::var("OSP_BENCH_PYTHON") {
        return p;
    }
    for p in ["pyenv/bin/python", "../pyenv/bin/python"] {
        if Path::new(p).exists() {
            return p.to_string();
        }
    }
    "python3".to_string()
}

/// Median seconds reported by bench_torch.py, or why it could not run.
fn torch_median(what: &str, dim: usize, layers: usize, repeats: usize) -> Result<f64> {
    let out = Command::new(python())
        .args(["scripts/bench_torch.py", "--what", what, "--threads", "2"])
        .args(["--dim", &dim.to_string(), "--layers", &layers.to_string()])
        .args([
            "--repeats",
            &repeats.to_string(),
            "--vocab",
            &VOCAB.to_string(),
        ])
        .args(["--batch", &BATCH.to_string(), "--seq", &SEQ.to_string()])
        .args([
            "--new-tokens",
            &NEW.to_string(),
            "--prompt-len",
            &PROMPT.to_string(),
        ])
        .output()
        .context("cannot start python")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        anyhow::bail!(
            "bench_torch.py failed: {}",
            err.lines().last().unwrap_or("")
        );
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value =
        serde_json::from_str(line.trim()).context("bench_torch.py output")?;
    v["median_s"].as_f64().context("no median_s")
}

fn main() -> Result<()> {
    // `cargo bench` passes --bench; nothing else is parsed.
    let repeats: usize = std::env::var("OSP_BENCH_REPEATS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    std::env::set_current_dir(&root)?;
    let tok_path = root.join("../shared/data/models/stories260K/tok512.bin");
    let tok = Tokenizer::from_llama2c(&tok_path, VOCAB)
        .context("the sampling bench decodes with the stories260K tokenizer (vocab 512)")?;
    let mut rows = vec![];
    for (dim, layers) in [(256, 4), (512, 8)] {
        let train = median(train_step_times(dim, layers, repeats)?);
        let torch_train = torch_median("train", dim, layers, repeats);
        let sample = median(sample_times(dim, layers, &tok, repeats)?);
        let torch_sample = torch_median("sample", dim, layers, repeats);
        rows.push((dim, layers, train, torch_train, sample, torch_sample));
    }
    let toks = (BATCH * NEW) as f64;
    println!("\nmedians of {repeats} runs, batch {BATCH}; train: seq {SEQ}; sample: {PROMPT}+{NEW} tokens");
    println!("| model | candle train s/step | torch train s/step | train speed (torch time / candle time) | candle sample tok/s | torch sample tok/s | sampling speed (candle / torch tok/s) |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (dim, layers, train, torch_train, sample, torch_sample) in rows {
        let fmt_t = |r: &Result<f64>| match r {
            Ok(s) => format!("{s:.3}"),
            Err(e) => format!("n/a ({e})"),
        };
        let fmt_s = |r: &Result<f64>| match r {
            Ok(s) => format!("{:.0}", toks / s),
            Err(_) => "n/a".into(),
        };
        let train_ratio = torch_train
            .as_ref()
            .map(|t| format!("{:.2}×", t / train))
            .unwrap_or("n/a".into());
        let sample_ratio = torch_sample
            .as_ref()
            .map(|t| format!("{:.2}×", t / sample))
            .unwrap_or("n/a".into());
        println!(
            "| d={dim}, {layers} layers | {train:.3} | {} | {train_ratio} | {:.0} | {} | {sample_ratio} |",
            fmt_t(&torch_train),
            toks / sample,
            fmt_s(&torch_sample)
        );
    }
    println!(
        "goals: sampling ≥ 1.5× torch's tokens/s; a training step no slower than torch's (≥ 1.0×)"
    );
    Ok(())
}
