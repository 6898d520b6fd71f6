//! Probe: LoRA or full train step d=512/8 layers batch 8 × 128, vocab 512, looping.
use anyhow::Result;
use candle_core::{Device, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use osp::lora::LoraConfig;
use osp::model::{init::random_weights, Llama, ModelConfig, Trainable};
use rand::{Rng, SeedableRng};
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    osp::alloc::retain_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(|s| s.as_str()).unwrap_or("lora");
    let dim: usize = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(512);
    let layers: usize = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(8);
    let n: usize = args.get(4).map(|s| s.parse().unwrap()).unwrap_or(6);
    let hidden = (2 * 4 * dim / 3).div_ceil(32) * 32;
    let cfg = ModelConfig::from_json(&serde_json::json!({
        "model_type": "llama", "vocab_size": 512, "hidden_size": dim,
        "intermediate_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": dim / 64, "num_key_value_heads": dim / 64,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 1024,
        "tie_word_embeddings": false,
    }))?;
    let tr = if mode == "lora" {
        Trainable::Lora {
            config: LoraConfig {
                r: 16,
                lora_alpha: 32.0,
                ..Default::default()
            },
            seed: 0,
        }
    } else {
        Trainable::All
    };
    let model = Llama::new(&cfg, random_weights(&cfg, 0, 0.02, &Device::Cpu)?, tr)?;
    let vars: Vec<Var> = model.vars().iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr: 1e-4,
            weight_decay: 0.01,
            ..Default::default()
        },
    )?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let (b, t) = (8, 128);
    let mask = vec![vec![true; t]; b];
    model.set_training(true);
    let mut times = vec![];
    for i in 0..n {
        let seqs: Vec<Vec<u32>> = (0..b)
            .map(|_| (0..t).map(|_| rng.random_range(0..512u32)).collect())
            .collect();
        let s = Instant::now();
        let (_, per_token) = model.token_logps(&seqs, &mask)?;
        let loss = (per_token.sum_all()? * (-1.0 / (b * (t - 1)) as f64))?;
        let f = s.elapsed().as_secs_f64();
        let grads = loss.backward()?;
        let bw = s.elapsed().as_secs_f64();
        opt.step(&grads)?;
        let dt = s.elapsed().as_secs_f64();
        eprintln!(
            "step {i}: fwd {f:.3} bwd {:.3} opt {:.3} total {dt:.3}",
            bw - f,
            dt - bw
        );
        if i > 0 {
            times.push(dt);
        }
    }
    times.sort_by(f64::total_cmp);
    println!("median {:.3} min {:.3}", times[times.len() / 2], times[0]);
    Ok(())
}
