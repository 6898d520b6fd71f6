//! Writes an osp-made LoRA adapter, its merged export and the expected logits, for
//! `scripts/check_peft_roundtrip.py` to verify with Python PEFT and transformers:
//!
//!     cargo run --example peft_export -- OUT_DIR
//!     pyenv/bin/python scripts/check_peft_roundtrip.py OUT_DIR/adapter tests/fixtures/llama_gqa \
//!         --merged OUT_DIR/merged --expect-logits OUT_DIR/expected.safetensors
use anyhow::Result;
use candle_core::{Device, Tensor};
use osp::lora::LoraConfig;
use osp::model::load::read_hf_weights;
use osp::model::{Llama, ModelConfig, TokenBatch, Trainable};
use std::path::PathBuf;

fn main() -> Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "target/peft_export".into()),
    );
    let base = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_gqa");
    let cfg = ModelConfig::from_file(&base.join("config.json"))?;
    let lora = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        ..Default::default()
    };
    let model = Llama::new(
        &cfg,
        read_hf_weights(&base, &Device::Cpu)?,
        Trainable::Lora {
            config: lora,
            seed: 3,
        },
    )?;
    // Non-zero B, as after training, so the adapter changes the logits.
    for (i, (name, var)) in model.vars().iter().enumerate() {
        if name.contains("lora_B") {
            let t =
                (Tensor::randn(0f32, 1.0, var.dims(), &Device::Cpu)? * (0.3 + 0.01 * i as f64))?;
            var.set(&t)?;
        }
    }
    osp::model::save_adapter(&model, &out.join("adapter"), &base.display().to_string())?;
    let tok = osp::tokenizer::Tokenizer::from_tokenizer_json(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/data/models/gpt2-tokenizer/tokenizer.json"),
    )?;
    osp::model::export::save_hf_model(&model, &tok, Some(&base), &out.join("merged"))?;
    let ids: Vec<Vec<u32>> = (0..2)
        .map(|r| {
            (0..9)
                .map(|t| ((r * 37 + t * 11) % 111 + 1) as u32)
                .collect()
        })
        .collect();
    let logits = model.forward(&TokenBatch::right_padded(&ids, &Device::Cpu)?)?;
    let ids_t = Tensor::new(ids, &Device::Cpu)?.to_dtype(candle_core::DType::I64)?;
    osp::io::save_safetensors(
        &out.join("expected.safetensors"),
        &[("input_ids".into(), ids_t), ("logits".into(), logits)],
    )?;
    println!("wrote {}", out.display());
    Ok(())
}
