//! The transformer against outside references (transformers' logits, llama2.c's published
//! sample), its gradients, its cached path, and its errors on bad checkpoints.
mod common;
use candle_core::{Device, Tensor, D};
use common::*;
use osp::model::load::{read_hf_weights, read_llama2c};
use osp::model::{load_model, Llama, ModelConfig, TokenBatch, Trainable};
use osp::sample::{generate, Decoder, Request, SamplingParams};
use std::collections::HashMap;

fn load_fixture(name: &str) -> Llama {
    let dir = fixture(name);
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    Llama::new(
        &cfg,
        read_hf_weights(&dir, &Device::Cpu).unwrap(),
        Trainable::None,
    )
    .unwrap()
}

fn expected(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("expected.safetensors"), &Device::Cpu)
        .unwrap()
}

fn rows_u32(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(candle_core::DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap()
}

/// Logits equal transformers' to 1e-4, unpadded and with left padding (compared where real).
fn check_parity(name: &str) {
    let model = load_fixture(name);
    let exp = expected(name);
    let ids = rows_u32(&exp["input_ids"]);
    let batch = TokenBatch::right_padded(&ids, &Device::Cpu).unwrap();
    let logits = model.forward(&batch).unwrap();
    let err = max_abs(&logits, &exp["logits"]);
    assert!(err < 1e-4, "{name}: max abs logit error {err}");

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
    let batch = TokenBatch::left_padded(&seqs, &Device::Cpu).unwrap();
    let logits = model.forward(&batch).unwrap();
    let want = &exp["padded_logits"];
    for (b, m) in mask.iter().enumerate() {
        for (t, &real) in m.iter().enumerate() {
            if real == 1 {
                let got = logits.get(b).unwrap().get(t).unwrap();
                let exp = want.get(b).unwrap().get(t).unwrap();
                let err = max_abs(&got, &exp);
                assert!(
                    err < 1e-4,
                    "{name}: padded row {b} position {t}: error {err}"
                );
            }
        }
    }
}

#[test]
fn logits_match_transformers_llama_gqa_untied() {
    check_parity("llama_gqa");
}

#[test]
fn logits_match_transformers_llama_sharded() {
    check_parity("llama_sharded");
}

#[test]
fn logits_match_transformers_qwen2_biases_tied() {
    check_parity("qwen2_tied");
}

#[test]
fn logits_match_transformers_mistral_head_dim() {
    check_parity("mistral");
}

#[test]
fn stories260k_greedy_reproduces_published_llama2c_sample() {
    let Some(bin) = shared_data("models/stories260K/stories260K.bin") else {
        return;
    };
    let lm = load_model(&bin, None, &Device::Cpu, Trainable::None).unwrap();
    let params = SamplingParams {
        temperature: 0.0,
        max_new_tokens: 40,
        ..Default::default()
    };
    let bos = lm.tokenizer.bos_id().unwrap();
    let out = generate(
        &lm.model,
        &lm.tokenizer,
        &[Request {
            prompt: vec![bos],
            seed: 0,
        }],
        &params,
    )
    .unwrap();
    let published = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.";
    assert!(out[0].text.starts_with(published), "got: {:?}", out[0].text);
}

#[test]
fn every_trainable_tensor_receives_a_gradient() {
    for (kind, tied) in [("qwen2", true), ("llama", false)] {
        let model = tiny_model(kind, tied, Trainable::All, 7);
        let names: Vec<&str> = model.vars().iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names.len(),
            osp::model::init::parameter_shapes(&model.cfg).len()
        );
        let seqs = vec![vec![1u32, 5, 9, 3, 7, 2], vec![1, 4, 4, 8]];
        let masks = vec![
            vec![false, false, true, true, true, true],
            vec![false, true, true, true],
        ];
        let loss = model
            .sequence_logps(&seqs, &masks)
            .unwrap()
            .sum_all()
            .unwrap()
            .neg()
            .unwrap();
        let grads = loss.backward().unwrap();
        for (name, var) in model.vars() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{kind}: no gradient for {name}"));
            let m = max_abs_value(g);
            assert!(
                m > 0.0 && m.is_finite(),
                "{kind}: gradient of {name} is {m}"
            );
        }
    }
}

#[test]
fn full_model_gradient_matches_finite_differences() {
    let model = tiny_model("qwen2", false, Trainable::All, 3);
    let seqs = vec![vec![1u32, 5, 9, 3, 7, 2, 11], vec![1, 4, 4, 8, 30]];
    let masks = vec![
        vec![false, false, false, true, true, true, true],
        vec![false, true, true, true, true],
    ];
    let loss = |m: &Llama| -> f32 {
        m.sequence_logps(&seqs, &masks)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    let grads = model
        .sequence_logps(&seqs, &masks)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let probes = [
        ("model.embed_tokens.weight", 5 * 32 + 3),
        ("model.layers.0.input_layernorm.weight", 7),
        ("model.layers.0.self_attn.q_proj.weight", 100),
        ("model.layers.0.self_attn.k_proj.bias", 2),
        ("model.layers.1.self_attn.v_proj.weight", 33),
        ("model.layers.1.mlp.down_proj.weight", 77),
        ("model.norm.weight", 4),
        ("lm_head.weight", 9 * 32 + 1),
    ];
    for (name, idx) in probes {
        let var = &model.vars().iter().find(|(n, _)| n == name).unwrap().1;
        let g: Vec<f32> = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let orig = var.as_tensor().copy().unwrap();
        let flat: Vec<f32> = orig.flatten_all().unwrap().to_vec1().unwrap();
        let eps = 3e-3f32; // small enough that curvature (O(eps²)) stays under the tolerance
        let at = |delta: f32| {
            let mut v = flat.clone();
            v[idx] += delta;
            var.set(&Tensor::from_vec(v, orig.shape(), &Device::Cpu).unwrap())
                .unwrap();
            loss(&model)
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * eps);
        var.set(&orig).unwrap();
        assert!(
            (fd - g[idx]).abs() < 5e-3 * (1.0 + fd.abs()),
            "{name}[{idx}]: autograd {} vs fd {fd}",
            g[idx]
        );
    }
}

#[test]
fn cached_logits_equal_full_forward() {
    let Some(bin) = shared_data("models/stories260K/stories260K.bin") else {
        return;
    };
    let lm = load_model(&bin, None, &Device::Cpu, Trainable::None).unwrap();
    let tok = &lm.tokenizer;
    let prompts = vec![
        tok.encode("Once upon a time", true).unwrap(),
        tok.encode("The cat", true).unwrap(),
        tok.encode("Tom and his friend went to the big park", true)
            .unwrap(),
    ];
    let (mut dec, mut logits) = Decoder::prefill(&lm.model, &prompts).unwrap();
    let mut composed = lm.model.clone();
    composed.set_fused(false);
    let mut seqs = prompts.clone();
    for step in 0..12 {
        let next: Vec<u32> = logits.argmax(D::Minus1).unwrap().to_vec1().unwrap();
        // The full forward over the same (left-padded) batch, last position, through the
        // same composed ops as the cached path (the fused kernels sum in another order;
        // tests/fast_train.rs holds them to the reference).
        let batch = TokenBatch::left_padded(&seqs, &Device::Cpu).unwrap();
        let full = composed
            .forward(&batch)
            .unwrap()
            .narrow(1, batch.len - 1, 1)
            .unwrap()
            .squeeze(1)
            .unwrap();
        let err = max_abs(&logits, &full);
        assert!(
            err < 1e-5,
            "step {step}: cached vs full logits differ by {err}"
        );
        // Each sequence alone, unpadded, agrees to transformers' parity tolerance.
        for (i, s) in seqs.iter().enumerate() {
            let alone = lm
                .model
                .forward(&TokenBatch::right_padded(std::slice::from_ref(s), &Device::Cpu).unwrap())
                .unwrap();
            let want = alone.get(0).unwrap().get(s.len() - 1).unwrap();
            let err = max_abs(&logits.get(i).unwrap(), &want);
            assert!(
                err < 1e-4,
                "step {step}, sequence {i}: padded-batch vs alone differ by {err}"
            );
        }
        for (s, &t) in seqs.iter_mut().zip(&next) {
            s.push(t);
        }
        logits = dec.step(&next).unwrap();
    }
}

#[test]
fn a_request_does_not_depend_on_its_batch() {
    let Some(bin) = shared_data("models/stories260K/stories260K.bin") else {
        return;
    };
    let lm = load_model(&bin, None, &Device::Cpu, Trainable::None).unwrap();
    let tok = &lm.tokenizer;
    let target = Request {
        prompt: tok.encode("Lily went", true).unwrap(),
        seed: 42,
    };
    let others = [
        Request {
            prompt: tok
                .encode("A very long prompt about a dog and a cat and a bird", true)
                .unwrap(),
            seed: 1,
        },
        Request {
            prompt: tok.encode("Hi", true).unwrap(),
            seed: 2,
        },
    ];
    let params = SamplingParams {
        temperature: 1.0,
        top_k: 40,
        top_p: 0.95,
        max_new_tokens: 40,
        ..Default::default()
    };
    let alone = generate(&lm.model, tok, std::slice::from_ref(&target), &params).unwrap();
    let batch = vec![others[0].clone(), target.clone(), others[1].clone()];
    let together = generate(&lm.model, tok, &batch, &params).unwrap();
    assert_eq!(alone[0].tokens, together[1].tokens);
    assert_eq!(alone[0].text, together[1].text);
    // The seed is what varies a sample, and the same seed reproduces it.
    let again = generate(&lm.model, tok, std::slice::from_ref(&target), &params).unwrap();
    assert_eq!(alone[0].tokens, again[0].tokens);
    let other_seed = generate(&lm.model, tok, &[Request { seed: 43, ..target }], &params).unwrap();
    assert_ne!(alone[0].tokens, other_seed[0].tokens);
}

#[test]
fn sampling_options_behave() {
    let Some(bin) = shared_data("models/stories260K/stories260K.bin") else {
        return;
    };
    let lm = load_model(&bin, None, &Device::Cpu, Trainable::None).unwrap();
    let tok = &lm.tokenizer;
    let req = |seed| Request {
        prompt: vec![1],
        seed,
    };
    let greedy = SamplingParams {
        temperature: 0.0,
        max_new_tokens: 30,
        ..Default::default()
    };
    let g = generate(&lm.model, tok, &[req(0)], &greedy).unwrap();
    // top-k 1 and a tiny top-p both reduce sampling to the argmax.
    for p in [
        SamplingParams {
            temperature: 1.0,
            top_k: 1,
            max_new_tokens: 30,
            ..Default::default()
        },
        SamplingParams {
            temperature: 1.0,
            top_p: 1e-6,
            max_new_tokens: 30,
            ..Default::default()
        },
    ] {
        let s = generate(&lm.model, tok, &[req(5), req(6)], &p).unwrap();
        assert_eq!(s[0].tokens, g[0].tokens);
        assert_eq!(s[1].tokens, g[0].tokens);
    }
    assert_eq!(g[0].tokens.len(), 30);
    assert_eq!(g[0].finish, osp::sample::FinishReason::Length);
    // A stop string cuts the text before it.
    let stop = SamplingParams {
        stop_strings: vec!["Lily".into()],
        ..greedy.clone()
    };
    let s = generate(&lm.model, tok, &[req(0)], &stop).unwrap();
    assert_eq!(s[0].finish, osp::sample::FinishReason::StopString);
    assert_eq!(
        s[0].text,
        "Once upon a time, there was a little girl named "
    );
    // Long greedy generation ends at EOS, which is kept as the last token.
    let long = SamplingParams {
        max_new_tokens: 400,
        ..greedy
    };
    let s = generate(&lm.model, tok, &[req(0)], &long).unwrap();
    assert_eq!(s[0].finish, osp::sample::FinishReason::Eos);
    // llama2.c stories are delimited by BOS, which run.c (and osp) treat as the end.
    assert_eq!(s[0].tokens.last(), Some(&1));
    // Temperature sampling with different seeds explores.
    let hot = SamplingParams {
        temperature: 1.0,
        max_new_tokens: 30,
        ..Default::default()
    };
    let s = generate(&lm.model, tok, &[req(1), req(2)], &hot).unwrap();
    assert_ne!(s[0].tokens, s[1].tokens);
}

// ------------------------------------------------------------------ bad input

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn err_of<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

fn load_dir(dir: &std::path::Path) -> anyhow::Result<Llama> {
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    Llama::new(&cfg, read_hf_weights(dir, &Device::Cpu)?, Trainable::None)
}

#[test]
fn missing_files_are_named() {
    let e = err_of(load_model(
        std::path::Path::new("/nonexistent/model"),
        None,
        &Device::Cpu,
        Trainable::None,
    ));
    assert!(e.contains("/nonexistent/model"), "{e}");
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("llama_gqa"), tmp.path());
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    let e = err_of(load_dir(tmp.path()));
    assert!(
        e.contains("neither model.safetensors nor model.safetensors.index.json"),
        "{e}"
    );
    // A model folder without its tokenizer.
    copy_dir(&fixture("llama_gqa"), tmp.path());
    let e = err_of(load_model(tmp.path(), None, &Device::Cpu, Trainable::None));
    assert!(e.contains("tokenizer.json"), "{e}");
    // A shard listed in the index but absent.
    let sh = tempfile::tempdir().unwrap();
    copy_dir(&fixture("llama_sharded"), sh.path());
    std::fs::remove_file(sh.path().join("model-00003-of-00005.safetensors")).unwrap();
    let e = err_of(load_dir(sh.path()));
    assert!(e.contains("model-00003-of-00005.safetensors"), "{e}");
}

#[test]
fn truncated_safetensors_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("llama_gqa"), tmp.path());
    let f = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let e = err_of(load_dir(tmp.path()));
    assert!(
        e.contains("model.safetensors") && e.contains("truncated or corrupt"),
        "{e}"
    );
}

#[test]
fn config_errors_name_the_field() {
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("llama_gqa/config.json")).unwrap())
            .unwrap();
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "hidden_size",
            serde_json::json!("48"),
            "`hidden_size`: expected a non-negative integer",
        ),
        (
            "rms_norm_eps",
            serde_json::json!("tiny"),
            "`rms_norm_eps`: expected a number",
        ),
        (
            "tie_word_embeddings",
            serde_json::json!(1),
            "`tie_word_embeddings`: expected true or false",
        ),
        (
            "rope_scaling",
            serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
            "`rope_scaling`: rope scaling \"yarn\"",
        ),
        (
            "rope_parameters",
            serde_json::json!({"rope_type": "llama3", "rope_theta": 5e5}),
            "`rope_parameters`: rope scaling \"llama3\"",
        ),
        ("hidden_act", serde_json::json!("gelu"), "`hidden_act`"),
        ("model_type", serde_json::json!("gpt2"), "`model_type`"),
        (
            "num_key_value_heads",
            serde_json::json!(3),
            "`num_key_value_heads`: 3 does not divide",
        ),
    ];
    for (field, value, want) in cases {
        let mut v = base.clone();
        v[field] = value;
        let e = err_of(ModelConfig::from_json(&v));
        assert!(e.contains(want), "{field}: {e}");
    }
    let mut v = base.clone();
    v.as_object_mut().unwrap().remove("vocab_size");
    assert!(err_of(ModelConfig::from_json(&v)).contains("`vocab_size` is missing"));
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("mistral/config.json")).unwrap())
            .unwrap();
    m["sliding_window"] = serde_json::json!(4096);
    assert!(err_of(ModelConfig::from_json(&m)).contains("`sliding_window`"));
    // The older top-level spelling of theta is read too, and a disagreement is refused.
    let mut old = base.clone();
    old.as_object_mut().unwrap().remove("rope_parameters");
    old["rope_theta"] = serde_json::json!(500000.0);
    assert_eq!(ModelConfig::from_json(&old).unwrap().rope_theta, 500000.0);
    let mut both = base.clone();
    both["rope_theta"] = serde_json::json!(1.0);
    assert!(err_of(ModelConfig::from_json(&both)).contains("disagree"));
    // The file path is named when the config is not JSON.
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("config.json");
    std::fs::write(&p, "{ not json").unwrap();
    let e = err_of(ModelConfig::from_file(&p));
    assert!(e.contains(&p.display().to_string()), "{e}");
}

#[test]
fn tensor_errors_name_the_tensor() {
    let dir = fixture("llama_gqa");
    let mut tensors: HashMap<String, Tensor> =
        osp::model::load::read_safetensors(&dir.join("model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
    let cfg = std::fs::read(dir.join("config.json")).unwrap();
    let write = |t: &HashMap<String, Tensor>| {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("config.json"), &cfg).unwrap();
        candle_core::safetensors::save(t, tmp.path().join("model.safetensors")).unwrap();
        tmp
    };
    let q = "model.layers.1.self_attn.q_proj.weight";
    let saved = tensors.remove(q).unwrap();
    let e = err_of(load_dir(write(&tensors).path()));
    assert!(e.contains(q) && e.contains("missing"), "{e}");
    tensors.insert(q.into(), saved.narrow(0, 0, 8).unwrap());
    let e = err_of(load_dir(write(&tensors).path()));
    assert!(e.contains(q) && e.contains("shape [8, 48]"), "{e}");
    tensors.insert(q.into(), saved);
    tensors.insert(
        "model.layers.2.mlp.up_proj.weight".into(),
        Tensor::zeros((4, 4), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let e = err_of(load_dir(write(&tensors).path()));
    assert!(
        e.contains("does not use: model.layers.2.mlp.up_proj.weight"),
        "{e}"
    );
}

#[test]
fn tokenizer_that_does_not_fit_the_model_is_refused() {
    let Some(gpt2) = shared_data("models/gpt2-tokenizer/tokenizer.json") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("llama_gqa"), tmp.path());
    std::fs::copy(gpt2, tmp.path().join("tokenizer.json")).unwrap();
    let e = err_of(load_model(tmp.path(), None, &Device::Cpu, Trainable::None));
    assert!(
        e.contains("50257 tokens") && e.contains("vocab_size is 112"),
        "{e}"
    );
}

#[test]
fn truncated_llama2c_checkpoint_is_reported() {
    let Some(bin) = shared_data("models/stories260K/stories260K.bin") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("cut.bin");
    let bytes = std::fs::read(&bin).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 1000]).unwrap();
    let e = err_of(read_llama2c(&p, &Device::Cpu));
    assert!(e.contains("cut.bin") && e.contains("truncated"), "{e}");
    std::fs::write(&p, &bytes[..10]).unwrap();
    assert!(err_of(read_llama2c(&p, &Device::Cpu)).contains("too short"));
    // Without its tokenizer beside it, the error says where it looked.
    std::fs::write(&p, &bytes).unwrap();
    let e = err_of(load_model(&p, None, &Device::Cpu, Trainable::None));
    assert!(e.contains("tok512.bin") && e.contains("--tokenizer"), "{e}");
}
