//! Trains a small LoRA reward model with `osp rm-train`'s code and writes what
//! `scripts/check_reward_model.py` needs to compare osp's rewards with transformers', PEFT's
//! and TRL's:
//!
//!     cargo run --example reward_export -- OUT_DIR
//!     /work/pyenv/bin/python scripts/check_reward_model.py OUT_DIR
//!
//! OUT_DIR/base is a Hugging Face Llama (the GQA fixture's weights, an untied head) with a
//! word-level tokenizer; OUT_DIR/run/reward_model the PEFT folder; OUT_DIR/run/
//! reward_model_merged the transformers LlamaForSequenceClassification folder; and
//! OUT_DIR/rewards.json the token ids of a few (prompt, response) texts with osp's rewards
//! from both folders.
use anyhow::Result;
use osp::reward::io::load_reward_model;
use osp::reward::tokenize_scored;
use osp::reward::train::{run_rm_train, RmTrainConfig};
use serde_json::json;
use std::path::PathBuf;

fn main() -> Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "target/reward_export".into()),
    );
    if out.exists() {
        std::fs::remove_dir_all(&out)?;
    }
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_gqa");
    let base = out.join("base");
    std::fs::create_dir_all(&base)?;
    std::fs::copy(
        fixture.join("model.safetensors"),
        base.join("model.safetensors"),
    )?;
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json"))?)?;
    // The word-level tokenizer's specials: <pad> 0, <unk> 1, <s> 2, </s> 3.
    cfg["pad_token_id"] = json!(0);
    cfg["bos_token_id"] = json!(2);
    cfg["eos_token_id"] = json!(3);
    osp::io::save_json(&base.join("config.json"), &cfg)?;
    let words: Vec<String> = (0..100).map(|i| format!("w{i}")).collect();
    osp::demo::wordlevel::write_tokenizer(&base, &words)?;

    // Prompts of two words; responses with words 10–19 are preferred to words 20–29.
    let prefs: Vec<String> = (0..64)
        .map(|i| {
            json!({
                "prompt": format!("w{} w{}", 40 + i % 30, 70 + (i * 7) % 30),
                "chosen": format!(" w{} w{}", 10 + i % 10, 10 + (i * 3) % 10),
                "rejected": format!(" w{} w{} w{}", 20 + i % 10, 20 + (i * 3) % 10, 40 + i % 7),
            })
            .to_string()
        })
        .collect();
    let data = out.join("prefs.jsonl");
    std::fs::write(&data, prefs.join("\n"))?;
    let q = |p: &std::path::Path| format!("{:?}", p.display().to_string());
    let sets: Vec<String> = vec![
        format!("model.path={}", q(&base)),
        format!("data.preferences={}", q(&data)),
        format!("train.out={}", q(&out.join("run"))),
        "train.steps=25".into(),
        "train.batch_size=8".into(),
        "train.save_every=0".into(),
        "train.eval_every=0".into(),
        "train.max_len=48".into(),
        "lora.r=4".into(),
        "lora.lora_alpha=8.0".into(),
        "optim.lr=0.01".into(),
        "reward.export_merged=true".into(),
    ];
    let rcfg = RmTrainConfig::load(None, &sets)?;
    let outcome = run_rm_train(&rcfg, false, None)?;
    if let (Some(b), Some(a)) = (outcome.before, outcome.after) {
        eprintln!(
            "held-out accuracy {:.3} → {:.3}",
            b.stats.accuracy, a.stats.accuracy
        );
    }
    let lora = load_reward_model(&outcome.output, "cpu")?;
    let merged = load_reward_model(outcome.merged.as_ref().expect("merged export"), "cpu")?;
    let texts = [
        ("w41 w77", " w12 w15"),
        ("w41 w77", " w22 w25 w44"),
        ("w5", " w13"),
        ("w60 w61 w62 w63 w64", " w21 w20 w19 w18 w17 w16"),
        ("w99 w98", " w11 w11 w11"),
        ("w30 w31", " w29"),
    ];
    let mut items = vec![];
    for (p, r) in texts {
        let ids = tokenize_scored(&lora.tokenizer, p, r, 48)?;
        let a = lora.model.score_ids(std::slice::from_ref(&ids), 1)?[0];
        let b = merged.model.score_ids(std::slice::from_ref(&ids), 1)?[0];
        let prompt_len = lora.tokenizer.encode(p, true)?.len();
        items.push(
            json!({"prompt": p, "response": r, "ids": ids, "prompt_len": prompt_len,
                          "osp_lora": a, "osp_merged": b}),
        );
    }
    // The same texts scored as one right-padded batch.
    let all: Vec<Vec<u32>> = items
        .iter()
        .map(|i| serde_json::from_value(i["ids"].clone()).unwrap())
        .collect();
    let batched = lora.model.score_ids(&all, all.len())?;
    osp::io::save_json(
        &out.join("rewards.json"),
        &json!({"pad_token_id": lora.model.pad_token_id, "items": items, "osp_lora_batched": batched}),
    )?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
