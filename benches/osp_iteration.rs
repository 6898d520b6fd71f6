//! One OSP iteration, osp against the same loop in PyTorch (`scripts/bench_osp_torch.py`):
//! 8 prompts × K = 7 samples of 64 new tokens, both-order self-judging in two ranked-pairing
//! stages, πref and policy log-probabilities, SPCE and one AdamW step on LoRA adapters (r 16,
//! all seven projections). Both sides load the same random-weight model folder, the real GPT-2
//! tokenizer and the same prompts (the first 8 HH helpful-base prompts of at most 64 tokens).
//!
//! `cargo bench --bench osp_iteration`. Model: `OSP_BENCH_ITER_MODEL=d512` (default: d=512,
//! 8 layers, vocab 50,257, tied) or `smollm2` (the SmolLM2-135M shape: 30 layers, d=576, 9/3
//! heads, FFN 1536). `OSP_BENCH_REPEATS` (default 5) timed iterations after one warm-up;
//! Python as in `benches/model.rs` (`OSP_BENCH_PYTHON`, else `pyenv/bin/python`,
//! `../pyenv/bin/python`, `python3`).
use anyhow::{bail, Context, Result};
use candle_core::Device;
use osp::data::{load_hh, OnMalformed};
use osp::model::{export::save_hf_model, init::random_weights, Llama, ModelConfig, Trainable};
use osp::tokenizer::Tokenizer;
use osp::train::method::{Method, TrainConfig};
use osp::train::online::OnlineRun;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PROMPTS: usize = 8;
const K: usize = 7;
const NEW: usize = 64;
const MAX_PROMPT_TOKENS: usize = 64;

fn model_config(which: &str) -> Result<ModelConfig> {
    let (d, layers, heads, kv, ff) = match which {
        "d512" => (512, 8, 8, 8, 1376),
        "smollm2" => (576, 30, 9, 3, 1536),
        other => bail!("OSP_BENCH_ITER_MODEL: unknown model `{other}` (d512, smollm2)"),
    };
    ModelConfig::from_json(&serde_json::json!({
        "model_type": "llama", "vocab_size": 50257, "hidden_size": d,
        "intermediate_size": ff, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 1024,
        "tie_word_embeddings": true,
    }))
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

/// The first `PROMPTS` HH helpful-base prompts of at most `MAX_PROMPT_TOKENS` tokens.
fn write_prompts(tok: &Tokenizer, hh: &Path, out: &Path) -> Result<()> {
    let (pairs, _) = load_hh(hh, OnMalformed::Skip)?;
    let mut lines = String::new();
    let mut n = 0;
    for p in pairs {
        if tok.encode(&p.prompt, false)?.len() <= MAX_PROMPT_TOKENS {
            lines.push_str(&serde_json::json!({ "prompt": p.prompt }).to_string());
            lines.push('\n');
            n += 1;
            if n == PROMPTS {
                break;
            }
        }
    }
    anyhow::ensure!(n == PROMPTS, "only {n} short HH prompts");
    std::fs::write(out, lines)?;
    Ok(())
}

fn main() -> Result<()> {
    osp::alloc::retain_freed_memory();
    let repeats: usize = std::env::var("OSP_BENCH_REPEATS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let which = std::env::var("OSP_BENCH_ITER_MODEL").unwrap_or_else(|_| "d512".into());
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    std::env::set_current_dir(&root)?;
    let data = root.join("../shared/data");
    let tok_dir = data.join("models/gpt2-tokenizer");
    let tok_json = tok_dir.join("tokenizer.json");
    let tok = Tokenizer::from_tokenizer_json(&tok_json)
        .context("the OSP iteration bench needs ../shared/data (GPT-2 tokenizer, HH prompts)")?;

    let dir = std::env::temp_dir().join(format!("osp-bench-iter-{}", std::process::id()));
    let model_dir = dir.join("model");
    let cfg = model_config(&which)?;
    let model = Llama::new(
        &cfg,
        random_weights(&cfg, 0, 0.02, &Device::Cpu)?,
        Trainable::None,
    )?;
    save_hf_model(&model, &tok, Some(&tok_dir), &model_dir)?;
    drop(model);
    let prompts = dir.join("prompts.jsonl");
    write_prompts(
        &tok,
        &data.join("hh-rlhf/helpful-base_test.jsonl.gz"),
        &prompts,
    )?;

    let set: Vec<String> = vec![
        format!("model.path={:?}", model_dir.display().to_string()),
        format!("data.prompts={:?}", prompts.display().to_string()),
        format!("train.out={:?}", dir.join("run").display().to_string()),
        format!("train.steps={}", repeats + 1),
        format!("train.batch_size={PROMPTS}"),
        "train.save_every=0".into(),
        "train.max_len=512".into(),
        "data.eval_fraction=0.0".into(),
        format!("pairing.k={K}"),
        format!("sampling.max_new_tokens={NEW}"),
        "sampling.stop_at_eos=false".into(),
        "lora.r=16".into(),
        "lora.lora_alpha=32.0".into(),
        "optim.lr=5e-5".into(),
    ];
    let train_cfg = TrainConfig::load(None, &set, Some(Method::Osp))?;
    let mut run = OnlineRun::new(&train_cfg, false)?;
    let batch: Vec<usize> = (0..PROMPTS).collect();
    let mut times = vec![];
    for i in 0..repeats + 1 {
        let t = Instant::now();
        let m = run.step_on(std::slice::from_ref(&batch))?;
        let dt = t.elapsed().as_secs_f64();
        let phases: Vec<String> = m
            .iter()
            .flat_map(|m| m.iter())
            .filter(|(k, _)| k.starts_with("speed/") && k.ends_with("_seconds"))
            .map(|(k, v)| format!("{}={:.2}s", &k[6..k.len() - 8], v.as_f64().unwrap_or(0.0)))
            .collect();
        eprintln!("  osp OSP iteration {i}: {dt:.2}s {}", phases.join(" "));
        if i > 0 {
            times.push(dt);
        }
    }
    drop(run);
    let ours = median(times);

    let out = Command::new(python())
        .args(["scripts/bench_osp_torch.py", "--threads", "2"])
        .arg("--model-dir")
        .arg(&model_dir)
        .arg("--tokenizer")
        .arg(&tok_json)
        .arg("--prompts")
        .arg(&prompts)
        .args(["--repeats", &repeats.to_string()])
        .args(["--k", &K.to_string(), "--new-tokens", &NEW.to_string()])
        .output()
        .context("cannot start python");
    let theirs = match out {
        Ok(o) if o.status.success() => {
            let v: serde_json::Value =
                serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim())
                    .context("bench_osp_torch.py output")?;
            eprintln!("  torch phases (median s): {}", v["phases_median_s"]);
            v["median_s"].as_f64()
        }
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            eprintln!(
                "bench_osp_torch.py failed: {}",
                err.lines().last().unwrap_or("")
            );
            None
        }
        Err(e) => {
            eprintln!("{e:#}");
            None
        }
    };
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "\none OSP iteration ({which}: {PROMPTS} prompts × K={K}, {NEW} new tokens, LoRA r=16), medians of {repeats}"
    );
    println!("| model | osp s/iteration | torch s/iteration | speed (torch time / osp time) |");
    println!("| --- | --- | --- | --- |");
    match theirs {
        Some(t) => println!("| {which} | {ours:.2} | {t:.2} | {:.2}× |", t / ours),
        None => println!("| {which} | {ours:.2} | n/a | n/a |"),
    }
    println!("goal: one OSP iteration ≥ 2× the PyTorch loop");
    Ok(())
}
