//! GGUF checkpoints: SmolLM2-135M-Instruct (Q4_1, ../shared/data) against transformers' own
//! GGUF loader (tests/fixtures/gguf/expected.json, written by scripts/make_gguf_fixture.py),
//! small GGUF files built here (every dequantised type, the q/k permutation), and bad input.
mod common;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::{causal_bias, max_abs, shared_data};
use osp::model::{init::random_weights, load_model, Llama, ModelConfig, Trainable};
use osp::sample::{generate, Request, SamplingParams};
use serde_json::Value as Json;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

const SMOLLM: &str = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf";

fn expected() -> Json {
    let p = common::fixture("gguf/expected.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(v: &Json) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Logits of one unbatched sequence, [len, vocab].
fn logits(model: &Llama, ids: &[u32]) -> Vec<Vec<f32>> {
    let dev = model.device().clone();
    let x = Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap();
    let pos: Vec<u32> = (0..ids.len() as u32).collect();
    let pos = Tensor::new(pos.as_slice(), &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let h = model
        .forward_hidden(&x, &pos, &causal_bias(ids.len(), &dev), None)
        .unwrap();
    model
        .logits(&h.squeeze(0).unwrap())
        .unwrap()
        .to_vec2()
        .unwrap()
}

/// Reads the texts the fixture tokenized, from ../shared/data, in the fixture's order.
fn fixture_texts(exp: &Json) -> Option<Vec<(String, Vec<u32>)>> {
    let max_chars = exp["max_chars"].as_u64().unwrap() as usize;
    let mut cache: HashMap<String, Vec<String>> = HashMap::new();
    let mut out = Vec::new();
    for row in exp["tokens"].as_array().unwrap() {
        let src = row["source"].as_str().unwrap();
        let text = if src == "inline" {
            row["text"].as_str().unwrap().to_string()
        } else {
            if !cache.contains_key(src) {
                cache.insert(src.to_string(), read_source(src)?);
            }
            let i = row["row"].as_u64().unwrap() as usize;
            cache[src][i].chars().take(max_chars).collect()
        };
        out.push((text, ids(&row["ids"])));
    }
    Some(out)
}

fn read_source(src: &str) -> Option<Vec<String>> {
    let (path, field): (String, &[&str]) = match src {
        "tldr/batch13" => ("tldr/comparisons_batch13.jsonl".into(), &["info", "post"]),
        s => (
            format!("hh-rlhf/{}.jsonl.gz", s.strip_prefix("hh/").unwrap()),
            &["chosen"],
        ),
    };
    let p = shared_data(&path)?;
    let mut text = String::new();
    let f = std::fs::File::open(&p).unwrap();
    if path.ends_with(".gz") {
        flate2::read::GzDecoder::new(f)
            .read_to_string(&mut text)
            .unwrap();
    } else {
        std::io::BufReader::new(f)
            .read_to_string(&mut text)
            .unwrap();
    }
    Some(
        text.lines()
            .map(|l| {
                let mut v: Json = serde_json::from_str(l).unwrap();
                for k in field {
                    v = v[*k].take();
                }
                v.as_str().unwrap().to_string()
            })
            .collect(),
    )
}

#[test]
fn smollm_tokenizer_matches_transformers() {
    let Some(path) = shared_data(SMOLLM) else {
        return;
    };
    let exp = expected();
    let Some(texts) = fixture_texts(&exp) else {
        return;
    };
    let g = osp::gguf::GgufFile::open(&path).unwrap();
    let tok = osp::model::load::gguf_tokenizer(&g).unwrap();
    // transformers' GGUF loader ignores `tokenizer.ggml.pre` and splits with GPT-2's regex;
    // osp follows the metadata's "smollm" (digits one by one first, as llama.cpp does). The
    // same vocabulary, merges and special tokens with GPT-2's split must equal transformers
    // on every text; osp's own split may differ only around digits.
    let files = osp::gguf::vocab::hf_tokenizer_files(&g).unwrap();
    let mut tj = files.tokenizer_json.clone();
    tj["pre_tokenizer"] = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": true, "use_regex": true});
    let as_transformers =
        osp::tokenizer::Tokenizer::from_hf_values(&tj, &files.tokenizer_config, &path).unwrap();
    assert!(texts.len() >= 200, "{} texts", texts.len());
    let mut with_specials = 0;
    let mut split_differs = 0;
    for (text, want) in &texts {
        let got = as_transformers.encode(text, false).unwrap();
        assert_eq!(
            &got,
            want,
            "ids differ on {:?}",
            &text[..text.len().min(120)]
        );
        let ours = tok.encode(text, false).unwrap();
        if &ours != want {
            split_differs += 1;
            assert!(text.chars().any(|c| c.is_ascii_digit()), "{text:?}");
        }
        // The GGUF says add_bos_token = false (transformers adds none either): starting a
        // sequence adds nothing.
        assert_eq!(tok.encode(text, true).unwrap(), ours);
        with_specials += usize::from(want.iter().any(|&i| i <= 16));
    }
    eprintln!(
        "smollm split differs from transformers' GPT-2 split on {split_differs} of {} texts",
        texts.len()
    );
    assert!(with_specials >= 3, "special tokens were exercised");
    assert_eq!(tok.bos_id(), Some(1));
    assert!(!tok.adds_bos());
    assert_eq!(tok.eos_ids(), &[2]);
    assert_eq!(tok.pad_id(), Some(2));
    // Greedy prompts: the chat template renders what transformers rendered.
    for g in exp["greedy"].as_array().unwrap() {
        let msgs = [osp::tokenizer::ChatMessage::new(
            "user",
            g["user"].as_str().unwrap(),
        )];
        let text = tok.apply_chat_template(&msgs, true).unwrap();
        assert_eq!(text, g["rendered"].as_str().unwrap());
        assert_eq!(tok.encode(&text, true).unwrap(), ids(&g["ids"]));
    }
}

/// Logits, greedy continuations and the exported Hugging Face folder, with one load of the
/// 135M model (dequantising it is the slow part).
#[test]
fn smollm_logits_greedy_and_export_match() {
    let Some(path) = shared_data(SMOLLM) else {
        return;
    };
    let exp = expected();
    let lm = load_model(&path, None, &Device::Cpu, Trainable::None).unwrap();
    let c = &lm.model.cfg;
    assert_eq!(
        (
            c.num_hidden_layers,
            c.hidden_size,
            c.intermediate_size,
            c.num_attention_heads
        ),
        (30, 576, 1536, 9)
    );
    assert_eq!(
        (c.num_key_value_heads, c.head_dim, c.vocab_size),
        (3, 64, 49152)
    );
    assert!(c.tie_word_embeddings);
    assert_eq!(c.rope_theta, 100000.0);
    let slice = exp["slice"].as_u64().unwrap() as usize;
    let mut worst = 0f32;
    let mut per_prompt = vec![];
    for row in exp["logits"].as_array().unwrap() {
        let x = ids(&row["ids"]);
        assert_eq!(
            lm.tokenizer
                .encode(row["text"].as_str().unwrap(), true)
                .unwrap(),
            x
        );
        let got = logits(&lm.model, &x);
        for (p, want) in row["slice_logits"].as_array().unwrap().iter().enumerate() {
            for (v, w) in want.as_array().unwrap().iter().enumerate().take(slice) {
                worst = worst.max((got[p][v] - w.as_f64().unwrap() as f32).abs());
            }
        }
        let last = got.last().unwrap();
        for (i, w) in ids(&row["top_ids"])
            .iter()
            .zip(row["top_logits"].as_array().unwrap())
        {
            worst = worst.max((last[*i as usize] - w.as_f64().unwrap() as f32).abs());
        }
        per_prompt.push((x, got));
    }
    eprintln!("max |logit - transformers| = {worst:.2e}");
    assert!(worst < 1e-4, "max |logit - transformers| = {worst}");

    let params = SamplingParams {
        temperature: 0.0,
        max_new_tokens: 16,
        ..SamplingParams::default()
    };
    for g in exp["greedy"].as_array().unwrap() {
        let req = [Request {
            prompt: ids(&g["ids"]),
            seed: 0,
        }];
        let out = generate(&lm.model, &lm.tokenizer, &req, &params).unwrap();
        let want = ids(&g["new_ids"]);
        // transformers keeps the EOS it stopped at; osp stops before returning it.
        let got: Vec<u32> = out[0].tokens.clone();
        let want_trim: Vec<u32> = want.iter().copied().filter(|&t| t != 2).collect();
        assert_eq!(
            got.iter().copied().filter(|&t| t != 2).collect::<Vec<_>>(),
            want_trim,
            "greedy continuation of {:?}: osp {:?}",
            g["user"],
            out[0].text
        );
    }

    // export --merge from the GGUF base: a Hugging Face f32 folder osp reloads with equal
    // logits (scripts/make_gguf_fixture.py --check-export checks that transformers loads it).
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    osp::model::export::export_merged(&lm.model, &lm.tokenizer, &path, &out, false).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(f).exists(), "{f} written");
    }
    let cfg: Json =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert!(cfg["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
    assert_eq!(cfg["add_bos_token"], Json::Bool(false));
    drop(lm);
    let back = load_model(&out, None, &Device::Cpu, Trainable::None).unwrap();
    for (x, want) in &per_prompt {
        let got = logits(&back.model, x);
        let a = Tensor::new(got, &Device::Cpu).unwrap();
        let b = Tensor::new(want.clone(), &Device::Cpu).unwrap();
        assert!(max_abs(&a, &b) < 1e-5, "exported folder gives other logits");
    }
    let text = "The capital of France is";
    let g = osp::gguf::GgufFile::open(&path).unwrap();
    let t0 = osp::model::load::gguf_tokenizer(&g).unwrap();
    assert_eq!(
        back.tokenizer.encode(text, true).unwrap(),
        t0.encode(text, true).unwrap()
    );
}

// ---------------------------------------------------------------------------------------
// Small GGUF files built here

/// llama.cpp's `permute`: HF row c·hd/2 + j of a head goes to GGUF row 2j + c.
fn permute(w: &Tensor, heads: usize) -> Tensor {
    let dims = w.dims().to_vec();
    let cols: usize = dims[1..].iter().product();
    let hd = dims[0] / heads;
    w.reshape((heads, 2, hd / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape(dims)
        .unwrap()
}

fn tiny_tokens(n: usize) -> Vec<String> {
    let mut t = vec![
        "<|endoftext|>".to_string(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    for c in "abcdefghijklmnopqrstuvwxyzĠ".chars() {
        t.push(c.to_string());
    }
    t.push("Ġa".into());
    t.push("ab".into());
    let mut i = 0;
    while t.len() < n {
        t.push(format!("z{i}"));
        i += 1;
    }
    t.truncate(n);
    t
}

/// Metadata of a llama GGUF for `cfg` (gpt2 tokenizer of `cfg.vocab_size` tokens).
fn metadata(cfg: &ModelConfig) -> Vec<(String, Value)> {
    let u = |x: usize| Value::U32(x as u32);
    let tokens = tiny_tokens(cfg.vocab_size);
    let mut types = vec![Value::I32(1); tokens.len()];
    for t in types.iter_mut().take(3) {
        *t = Value::I32(3);
    }
    vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("llama.context_length".into(), u(cfg.max_position_embeddings)),
        ("llama.embedding_length".into(), u(cfg.hidden_size)),
        ("llama.block_count".into(), u(cfg.num_hidden_layers)),
        ("llama.feed_forward_length".into(), u(cfg.intermediate_size)),
        ("llama.attention.head_count".into(), u(cfg.num_attention_heads)),
        ("llama.attention.head_count_kv".into(), u(cfg.num_key_value_heads)),
        ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(cfg.rms_norm_eps as f32)),
        ("llama.rope.freq_base".into(), Value::F32(cfg.rope_theta as f32)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(vec![Value::String("Ġ a".into()), Value::String("a b".into())]),
        ),
        ("tokenizer.ggml.bos_token_id".into(), u(1)),
        ("tokenizer.ggml.eos_token_id".into(), u(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        (
            "tokenizer.chat_template".into(),
            Value::String("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}".into()),
        ),
    ]
}

/// GGUF tensors (llama.cpp names, q/k permuted, quantised to `dtype` where a row allows)
/// for the Hugging Face weights `w`, and the weights a reader must give back (dequantised,
/// Hugging Face order).
fn gguf_tensors(
    cfg: &ModelConfig,
    w: &HashMap<String, Tensor>,
    dtype: GgmlDType,
) -> (Vec<(String, QTensor)>, HashMap<String, Tensor>) {
    let mut names = vec![
        (
            "token_embd.weight".to_string(),
            "model.embed_tokens.weight".to_string(),
            0,
        ),
        ("output_norm.weight".into(), "model.norm.weight".into(), 0),
    ];
    if !cfg.tie_word_embeddings {
        names.push(("output.weight".into(), "lm_head.weight".into(), 0));
    }
    for i in 0..cfg.num_hidden_layers {
        for (g, h, heads) in [
            ("attn_norm.weight", "input_layernorm.weight", 0),
            ("ffn_norm.weight", "post_attention_layernorm.weight", 0),
            (
                "attn_q.weight",
                "self_attn.q_proj.weight",
                cfg.num_attention_heads,
            ),
            (
                "attn_k.weight",
                "self_attn.k_proj.weight",
                cfg.num_key_value_heads,
            ),
            ("attn_v.weight", "self_attn.v_proj.weight", 0),
            ("attn_output.weight", "self_attn.o_proj.weight", 0),
            ("ffn_gate.weight", "mlp.gate_proj.weight", 0),
            ("ffn_up.weight", "mlp.up_proj.weight", 0),
            ("ffn_down.weight", "mlp.down_proj.weight", 0),
        ] {
            names.push((
                format!("blk.{i}.{g}"),
                format!("model.layers.{i}.{h}"),
                heads,
            ));
        }
    }
    let mut out = vec![];
    let mut back = HashMap::new();
    for (g, h, heads) in names {
        let t = &w[&h];
        let t = if heads > 0 {
            permute(t, heads)
        } else {
            t.clone()
        };
        let row = *t.dims().last().unwrap();
        let dt = if t.rank() == 2 && row % dtype.block_size() == 0 {
            dtype
        } else {
            GgmlDType::F32
        };
        let q = QTensor::quantize(&t, dt).unwrap();
        let mut d = q.dequantize(&Device::Cpu).unwrap();
        if let Some(hd) = d.dims()[0].checked_div(heads) {
            // Undo the permutation on the dequantised rows (blocks run along rows).
            let cols = d.dims()[1];
            d = d
                .reshape((heads, hd / 2, 2, cols))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((heads * hd, cols))
                .unwrap();
        }
        back.insert(h, d);
        out.push((g, q));
    }
    (out, back)
}

fn write_gguf(path: &Path, meta: &[(String, Value)], tensors: &[(String, QTensor)]) {
    let mut f = std::fs::File::create(path).unwrap();
    let m: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &m, &t).unwrap();
}

fn width_config(hidden: usize, tied: bool) -> ModelConfig {
    let v = serde_json::json!({
        "model_type": "llama", "vocab_size": 40, "hidden_size": hidden,
        "intermediate_size": hidden, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 64, "tie_word_embeddings": tied,
    });
    ModelConfig::from_json(&v).unwrap()
}

/// A tiny GGUF of `dtype` and the model its dequantised weights make (the reference).
fn tiny_gguf(dir: &Path, dtype: GgmlDType, hidden: usize, tied: bool) -> (PathBuf, Llama) {
    let cfg = width_config(hidden, tied);
    let w = random_weights(&cfg, 7, 0.3, &Device::Cpu).unwrap();
    let named = to_map(w);
    let (tensors, back) = gguf_tensors(&cfg, &named, dtype);
    let path = dir.join(format!("tiny-{dtype:?}.gguf"));
    write_gguf(&path, &metadata(&cfg), &tensors);
    let reference = Llama::new(
        &cfg,
        osp::model::Weights::new(back, "reference"),
        Trainable::None,
    )
    .unwrap();
    (path, reference)
}

#[test]
fn every_dequantised_type_and_the_qk_permutation_give_the_reference_logits() {
    let dir = tempfile::tempdir().unwrap();
    let x = [5u32, 9, 3, 30, 12, 7, 1];
    for (dtype, hidden, tied) in [
        (GgmlDType::F32, 32, false),
        (GgmlDType::F16, 32, true),
        (GgmlDType::BF16, 32, false),
        (GgmlDType::Q8_0, 32, true),
        (GgmlDType::Q4_0, 32, false),
        (GgmlDType::Q4_1, 32, true),
        (GgmlDType::Q4K, 256, true),
        (GgmlDType::Q5K, 256, false),
        (GgmlDType::Q6K, 256, true),
    ] {
        let (path, reference) = tiny_gguf(dir.path(), dtype, hidden, tied);
        let lm = load_model(&path, None, &Device::Cpu, Trainable::None)
            .unwrap_or_else(|e| panic!("{dtype:?}: {e:#}"));
        assert_eq!(lm.model.cfg.tie_word_embeddings, tied);
        let a = Tensor::new(logits(&lm.model, &x), &Device::Cpu).unwrap();
        let b = Tensor::new(logits(&reference, &x), &Device::Cpu).unwrap();
        let d = max_abs(&a, &b);
        assert!(d < 1e-5, "{dtype:?}: logits differ by {d}");
        // Without undoing the permutation the model would be a different function.
        assert!(common::max_abs_value(&b) > 0.1);
    }
}

fn to_map(mut w: osp::model::Weights) -> HashMap<String, Tensor> {
    let names: Vec<String> = w.names().cloned().collect();
    names
        .into_iter()
        .map(|n| {
            let t = w.remove(&n).unwrap();
            (n, t)
        })
        .collect()
}

#[test]
fn tiny_gguf_tokenizer_follows_its_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = tiny_gguf(dir.path(), GgmlDType::F32, 32, true);
    let lm = load_model(&path, None, &Device::Cpu, Trainable::None).unwrap();
    let tok = &lm.tokenizer;
    // " ab" -> "Ġa" + "b" (merge "Ġ a" ranks before "a b"), specials matched whole.
    let id = |s: &str| tok.token_to_id(s).unwrap();
    assert_eq!(tok.encode(" ab", false).unwrap(), vec![id("Ġa"), id("b")]);
    assert_eq!(tok.encode("ab", false).unwrap(), vec![id("ab")]);
    assert_eq!(tok.encode("<|im_start|>a", true).unwrap(), vec![1, id("a")]);
    assert_eq!(tok.decode(&[1, id("Ġa"), 2]).unwrap(), " a");
    let chat = tok
        .apply_chat_template(&[osp::tokenizer::ChatMessage::new("user", "ab")], true)
        .unwrap();
    assert_eq!(
        chat,
        "<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n"
    );
}

// ---------------------------------------------------------------------------------------
// Bad input

fn load_err(path: &Path) -> String {
    match load_model(path, None, &Device::Cpu, Trainable::None) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn bad_gguf_files_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = width_config(32, true);
    let w = random_weights(&cfg, 3, 0.3, &Device::Cpu).unwrap();
    let named = to_map(w);
    let (tensors, _) = gguf_tensors(&cfg, &named, GgmlDType::Q8_0);
    let meta = metadata(&cfg);
    let good = dir.path().join("good.gguf");
    write_gguf(&good, &meta, &tensors);
    let bytes = std::fs::read(&good).unwrap();

    // Truncated: in the metadata, in the tensor directory, in the tensor data.
    let cut = |name: &str, at: usize| {
        let p = dir.path().join(name);
        std::fs::write(&p, &bytes[..at]).unwrap();
        load_err(&p)
    };
    let find = |s: &str| {
        bytes
            .windows(s.len())
            .position(|w| w == s.as_bytes())
            .unwrap()
    };
    let e = cut("t1.gguf", find("tokenizer.ggml.tokens") + 40);
    assert!(
        e.contains("truncated") && e.contains("tokenizer.ggml.tokens"),
        "{e}"
    );
    let e = cut("t2.gguf", find("blk.1.attn_q.weight") + 5);
    assert!(e.contains("truncated") && e.contains("tensor"), "{e}");
    let e = cut("t3.gguf", bytes.len() - 100);
    assert!(e.contains("truncated") && e.contains("tensor `"), "{e}");

    // An unknown tensor type (IQ2_XXS = 16) in blk.0.attn_v.weight's info.
    let at = find("blk.0.attn_v.weight") + "blk.0.attn_v.weight".len() + 4 + 2 * 8;
    let mut bad = bytes.clone();
    bad[at..at + 4].copy_from_slice(&16u32.to_le_bytes());
    let p = dir.path().join("type.gguf");
    std::fs::write(&p, &bad).unwrap();
    let e = load_err(&p);
    assert!(
        e.contains("blk.0.attn_v.weight") && e.contains("IQ2_XXS"),
        "{e}"
    );

    // A missing metadata key.
    let p = dir.path().join("key.gguf");
    let less: Vec<_> = meta
        .iter()
        .filter(|(k, _)| k != "llama.block_count")
        .cloned()
        .collect();
    write_gguf(&p, &less, &tensors);
    let e = load_err(&p);
    assert!(
        e.contains("llama.block_count") && e.contains("missing"),
        "{e}"
    );

    // Wrong shapes.
    let p = dir.path().join("shape.gguf");
    let mut wrong: Vec<(String, QTensor)> = vec![];
    for (n, t) in &tensors {
        let t = if n == "blk.1.attn_k.weight" {
            QTensor::quantize(
                &Tensor::zeros((8, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
                GgmlDType::F32,
            )
            .unwrap()
        } else {
            QTensor::quantize(&t.dequantize(&Device::Cpu).unwrap(), t.dtype()).unwrap()
        };
        wrong.push((n.clone(), t));
    }
    write_gguf(&p, &meta, &wrong);
    let e = load_err(&p);
    assert!(
        e.contains("blk.1.attn_k.weight") && e.contains("shape"),
        "{e}"
    );

    // What osp cannot honour, by name.
    let with = |k: &str, v: Value| {
        let mut m: Vec<_> = meta.iter().filter(|(x, _)| x != k).cloned().collect();
        m.push((k.to_string(), v));
        m
    };
    for (k, v, want) in [
        (
            "general.architecture",
            Value::String("gemma2".into()),
            "gemma2",
        ),
        (
            "llama.rope.scaling.type",
            Value::String("yarn".into()),
            "yarn",
        ),
        (
            "tokenizer.ggml.pre",
            Value::String("deepseek-coder".into()),
            "deepseek-coder",
        ),
        ("tokenizer.ggml.model", Value::String("bert".into()), "bert"),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::String("x".into()),
            "layer_norm_rms_epsilon",
        ),
    ] {
        let p = dir.path().join("refused.gguf");
        write_gguf(&p, &with(k, v), &tensors);
        let e = load_err(&p);
        assert!(e.contains(k) && e.contains(want), "{k}: {e}");
    }
    // A tensor osp would ignore.
    let p = dir.path().join("extra.gguf");
    let mut more: Vec<(String, QTensor)> = tensors
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                QTensor::quantize(&t.dequantize(&Device::Cpu).unwrap(), t.dtype()).unwrap(),
            )
        })
        .collect();
    more.push((
        "rope_freqs.weight".into(),
        QTensor::quantize(
            &Tensor::ones(32, candle_core::DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::F32,
        )
        .unwrap(),
    ));
    write_gguf(&p, &meta, &more);
    let e = load_err(&p);
    assert!(e.contains("rope_freqs.weight"), "{e}");
}

// ---------------------------------------------------------------------------------------
// Double BOS: a ChatML tokenizer whose BOS is <|im_start|> and whose config asks for BOS

fn chatml_folder(dir: &Path, add_bos: bool) -> osp::tokenizer::Tokenizer {
    let words = [
        "<unk>",
        "<|im_start|>",
        "<|im_end|>",
        "user",
        "assistant",
        "system",
        "hi",
        "A",
        "B",
        "which",
        "is",
        "better",
        "x",
        "y",
    ];
    let vocab: serde_json::Map<String, Json> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), serde_json::json!(i)))
        .collect();
    let added: Vec<Json> = [1, 2]
        .iter()
        .map(|&i| {
            serde_json::json!({"id": i, "content": words[i], "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tj = serde_json::json!({"version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added, "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}});
    let cfg = serde_json::json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "unk_token": "<unk>", "add_bos_token": add_bos,
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"});
    std::fs::write(dir.join("tokenizer.json"), tj.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    osp::tokenizer::Tokenizer::from_hf_dir(dir).unwrap()
}

#[test]
fn chatml_text_never_gets_a_second_bos() {
    let dir = tempfile::tempdir().unwrap();
    for add_bos in [true, false] {
        let tok = chatml_folder(dir.path(), add_bos);
        assert_eq!(tok.adds_bos(), add_bos);
        let msgs = [osp::tokenizer::ChatMessage::new("user", "hi")];
        let text = tok.apply_chat_template(&msgs, true).unwrap();
        let bos = tok.bos_id().unwrap();
        let count = |ids: &[u32]| ids.iter().take_while(|&&i| i == bos).count();
        // generate --chat and online prompts: encode(text, start of sequence)
        let ids = tok.encode(&text, true).unwrap();
        assert_eq!(count(&ids), 1, "{ids:?}");
        // a plain text gets BOS exactly when the tokenizer says so
        assert_eq!(
            tok.encode("hi", true).unwrap().first() == Some(&bos),
            add_bos
        );
        // preference pairs
        let pair = osp::data::PreferencePair {
            prompt: text.clone(),
            chosen: "x".into(),
            rejected: "y".into(),
            strength: None,
            source: "t:1".into(),
        };
        let tp = osp::train::pairs::tokenize_pair(&tok, &pair, 64)
            .unwrap()
            .unwrap();
        assert_eq!(count(&tp.prompt), 1, "{:?}", tp.prompt);
        // the chat judge: one BOS, and the verdict comes right after "assistant\n"
        let cfg = osp::judge::JudgeConfig {
            template: "which is better {prompt} A {a} B {b}".into(),
            chat: true,
            ..Default::default()
        };
        let judge = osp::judge::Judge::new(cfg, &tok).unwrap();
        let ids = judge.encode(&tok, "hi", "x", "y", 64).unwrap();
        assert_eq!(count(&ids), 1, "{ids:?}");
        assert_eq!(
            judge.answer_ids(),
            (tok.token_to_id("A").unwrap(), tok.token_to_id("B").unwrap())
        );
        let rendered = judge.render("hi", "x", "y");
        assert!(
            rendered.starts_with("<|im_start|>user\nwhich is better hi A x B y<|im_end|>"),
            "{rendered}"
        );
        assert!(rendered.ends_with("<|im_start|>assistant\n"), "{rendered}");
    }
}

#[test]
fn cli_generate_chat_and_judge_verdicts_on_gguf() {
    let osp_bin = env!("CARGO_BIN_EXE_osp");
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = tiny_gguf(dir.path(), GgmlDType::Q8_0, 32, true);
    let data = common::write_jsonl(
        &dir.path().join("pairs.jsonl"),
        &[
            serde_json::json!({"prompt": "ab", "chosen": "a", "rejected": "b"}),
            serde_json::json!({"prompt": "b", "chosen": "ab", "rejected": "c"}),
            serde_json::json!({"prompt": "c", "chosen": "b", "rejected": "a"}),
        ],
    );
    let verdicts = dir.path().join("v.jsonl");
    let out = std::process::Command::new(osp_bin)
        .args(["judge", "--quiet", "--model"])
        .arg(&path)
        .arg("--data")
        .arg(&data)
        .args([
            "--set",
            "judge.chat=true",
            "--set",
            "judge.template=\"{prompt} {a} {b}\"",
            "--set",
            "judge.answer_a=\"a\"",
            "--set",
            "judge.answer_b=\"b\"",
            "--verdicts",
        ])
        .arg(&verdicts)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Json> = std::fs::read_to_string(&verdicts)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["index"], i);
        let s = l["strength"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&s));
        assert!(l["p_backward"].as_f64().is_some());
    }

    let Some(m) = shared_data(SMOLLM) else {
        return;
    };
    let out = std::process::Command::new(osp_bin)
        .args([
            "generate",
            "--chat",
            "--temperature",
            "0",
            "--max-new-tokens",
            "10",
            "--model",
        ])
        .arg(&m)
        .args(["--prompt", "What is the capital of France?"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("The capital of France is Paris"), "{text}");
}
