//! LoRA against PEFT: adapters written by Python PEFT load with the same logits, osp's saved
//! adapters use PEFT's names and shapes, merging equals the adapted model, and only the
//! adapters train.
mod common;
use candle_core::{Device, Tensor};
use common::*;
use osp::lora::LoraConfig;
use osp::model::load::{read_hf_weights, read_safetensors};
use osp::model::{load_adapter, save_adapter};
use osp::model::{Llama, ModelConfig, TokenBatch, Trainable};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("peft_llama/expected.safetensors"), &Device::Cpu)
        .unwrap()
}

fn base_with(trainable: Trainable) -> Llama {
    let dir = fixture("llama_gqa");
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    Llama::new(
        &cfg,
        read_hf_weights(&dir, &Device::Cpu).unwrap(),
        trainable,
    )
    .unwrap()
}

fn with_peft_adapter(dir: &Path) -> Llama {
    let config = LoraConfig::from_peft_dir(dir).unwrap();
    let model = base_with(Trainable::Lora { config, seed: 0 });
    load_adapter(&model, dir).unwrap();
    model
}

fn logits(model: &Llama) -> Tensor {
    let ids: Vec<Vec<u32>> = expected()["input_ids"]
        .to_dtype(candle_core::DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    model
        .forward(&TokenBatch::right_padded(&ids, &Device::Cpu).unwrap())
        .unwrap()
}

#[test]
fn peft_adapter_gives_peft_logits_and_disabling_it_gives_the_base() {
    let model = with_peft_adapter(&fixture("peft_llama/adapter"));
    let exp = expected();
    let err = max_abs(&logits(&model), &exp["logits"]);
    assert!(err < 1e-4, "adapter logits differ from PEFT's by {err}");
    let err = max_abs(&logits(&model.without_adapter()), &exp["base_logits"]);
    assert!(
        err < 1e-4,
        "πref (adapter off) differs from PEFT's disable_adapter() by {err}"
    );
    // The adapter matters: the two are far apart, so the checks above could fail.
    assert!(max_abs(&exp["logits"], &exp["base_logits"]) > 0.5);
    // The snapshot used for sampling merges the adapter and gives the same logits.
    let err = max_abs(&logits(&model.snapshot().unwrap()), &exp["logits"]);
    assert!(err < 1e-4, "snapshot differs by {err}");
}

#[test]
fn rslora_adapter_on_a_subset_of_modules() {
    let dir = fixture("peft_llama/adapter_rslora");
    let cfg = LoraConfig::from_peft_dir(&dir).unwrap();
    assert!(cfg.use_rslora);
    assert!((cfg.scale() - 16.0 / 8f64.sqrt()).abs() < 1e-12);
    let model = with_peft_adapter(&dir);
    assert_eq!(
        model.vars().len(),
        2 * 2 * 2,
        "q_proj and v_proj, A and B, 2 layers"
    );
    let err = max_abs(&logits(&model), &expected()["rslora_logits"]);
    assert!(err < 1e-4, "rsLoRA logits differ from PEFT's by {err}");
}

#[test]
fn saved_adapter_matches_peft_layout_and_reloads() {
    let src = fixture("peft_llama/adapter");
    let model = with_peft_adapter(&src);
    let tmp = tempfile::tempdir().unwrap();
    save_adapter(&model, tmp.path(), "tests/fixtures/llama_gqa").unwrap();
    let shapes = |p: &Path| -> BTreeMap<String, Vec<usize>> {
        read_safetensors(&p.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(n, t)| (n, t.dims().to_vec()))
            .collect()
    };
    assert_eq!(
        shapes(tmp.path()),
        shapes(&src),
        "tensor names and shapes must equal PEFT's"
    );
    assert!(shapes(tmp.path())
        .values()
        .all(|s| s.iter().all(|&d| d > 0)));
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    for (k, v) in [
        ("peft_type", "LORA"),
        ("task_type", "CAUSAL_LM"),
        ("bias", "none"),
    ] {
        assert_eq!(cfg[k], v);
    }
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 8.0);
    assert_eq!(
        LoraConfig::from_peft_dir(tmp.path()).unwrap(),
        LoraConfig::from_peft_dir(&src).unwrap()
    );
    let again = with_peft_adapter(tmp.path());
    assert!(max_abs(&logits(&again), &expected()["logits"]) < 1e-5);
}

#[test]
fn merged_export_equals_the_adapted_model() {
    let model = with_peft_adapter(&fixture("peft_llama/adapter"));
    let tok_src = shared_data("models/gpt2-tokenizer/tokenizer.json");
    let tmp = tempfile::tempdir().unwrap();
    let Some(tok_json) = tok_src else { return };
    let tok = osp::tokenizer::Tokenizer::from_tokenizer_json(&tok_json).unwrap();
    osp::model::export::save_hf_model(&model, &tok, Some(&fixture("llama_gqa")), tmp.path())
        .unwrap();
    let cfg = ModelConfig::from_file(&tmp.path().join("config.json")).unwrap();
    assert_eq!(cfg, model.cfg);
    let merged = Llama::new(
        &cfg,
        read_hf_weights(tmp.path(), &Device::Cpu).unwrap(),
        Trainable::None,
    )
    .unwrap();
    let err = max_abs(&logits(&merged), &expected()["logits"]);
    assert!(err < 1e-4, "merged export differs by {err}");
    let names: Vec<String> = read_safetensors(&tmp.path().join("model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(names.iter().all(|n| !n.contains("lora")));
    assert!(names.contains(&"lm_head.weight".to_string()));
}

#[test]
fn only_adapters_train_and_fresh_adapters_start_as_the_base() {
    let config = LoraConfig {
        r: 2,
        ..Default::default()
    };
    let model = base_with(Trainable::Lora { config, seed: 5 });
    assert_eq!(model.vars().len(), 2 * 7 * 2);
    assert!(model
        .vars()
        .iter()
        .all(|(n, _)| n.starts_with("base_model.model.model.layers.") && n.contains(".lora_")));
    // B = 0: a fresh adapter leaves the function unchanged.
    let base = base_with(Trainable::None);
    assert!(max_abs(&logits(&model), &logits(&base)) < 1e-6);
    let seqs = vec![vec![1u32, 5, 9, 3, 7, 2], vec![1, 4, 4, 8]];
    let masks = vec![
        vec![false, false, true, true, true, true],
        vec![false, true, true, true],
    ];
    let grads = model
        .sequence_logps(&seqs, &masks)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, var) in model.vars() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let m = max_abs_value(g);
        // With B = 0, A's gradient is zero (it flows through B); B's is not.
        if name.contains("lora_B") {
            assert!(m > 0.0, "{name}");
        }
    }
}

#[test]
fn adapter_config_mismatch_and_missing_files_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let e = format!("{:#}", LoraConfig::from_peft_dir(tmp.path()).unwrap_err());
    assert!(e.contains("adapter_config.json"), "{e}");
    // A model built with another rank refuses the adapter.
    let model = base_with(Trainable::Lora {
        config: LoraConfig {
            r: 2,
            ..Default::default()
        },
        seed: 0,
    });
    let e = format!(
        "{:#}",
        load_adapter(&model, &fixture("peft_llama/adapter")).unwrap_err()
    );
    assert!(e.contains("differs"), "{e}");
    // A DoRA adapter is refused by name.
    let src = fixture("peft_llama/adapter");
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        tmp.path().join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    cfg["use_dora"] = true.into();
    std::fs::write(tmp.path().join("adapter_config.json"), cfg.to_string()).unwrap();
    let e = format!("{:#}", LoraConfig::from_peft_dir(tmp.path()).unwrap_err());
    assert!(e.contains("use_dora"), "{e}");
}
