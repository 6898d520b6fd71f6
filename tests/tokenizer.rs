//! Tokenizer tests against the real stories260K llama2.c tokenizer and the GPT-2
//! tokenizer.json under ../shared/data/models (skipped when absent).

mod common;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use osp::tokenizer::{ChatMessage, Tokenizer};

fn tok512_path() -> Option<PathBuf> {
    common::shared_data("models/stories260K/tok512.bin")
}

fn gpt2_dir() -> Option<PathBuf> {
    common::shared_data("models/gpt2-tokenizer/tokenizer.json")?;
    common::shared_data("models/gpt2-tokenizer")
}

fn llama2c() -> Option<Tokenizer> {
    let p = tok512_path()?;
    Some(Tokenizer::from_llama2c(&p, 512).expect("load tok512.bin"))
}

fn gpt2() -> Option<Tokenizer> {
    let p = gpt2_dir()?;
    Some(Tokenizer::from_hf_dir(&p).expect("load gpt2 tokenizer"))
}

// ------------------------------------------------------------------------------------
// A literal transcription of run.c's encode (quadratic merge loop), as a reference.

struct RefVocab {
    pieces: Vec<Vec<u8>>,
    scores: Vec<f32>,
    lookup: HashMap<Vec<u8>, i64>,
}

fn read_ref_vocab(path: &Path, vocab_size: usize) -> RefVocab {
    let b = std::fs::read(path).unwrap();
    let mut off = 4;
    let mut pieces = Vec::new();
    let mut scores = Vec::new();
    for _ in 0..vocab_size {
        let score = f32::from_le_bytes(b[off..off + 4].try_into().unwrap());
        let len = i32::from_le_bytes(b[off + 4..off + 8].try_into().unwrap()) as usize;
        off += 8;
        pieces.push(b[off..off + len].to_vec());
        scores.push(score);
        off += len;
    }
    let mut lookup = HashMap::new();
    for (i, p) in pieces.iter().enumerate() {
        lookup.entry(p.clone()).or_insert(i as i64);
    }
    RefVocab {
        pieces,
        scores,
        lookup,
    }
}

fn ref_encode(v: &RefVocab, text: &str, bos: bool) -> Vec<u32> {
    let lookup = |s: &[u8]| v.lookup.get(s).copied().unwrap_or(-1);
    let mut tokens: Vec<i64> = Vec::new();
    if bos {
        tokens.push(1);
    }
    if !text.is_empty() {
        tokens.push(lookup(b" "));
    }
    let bytes = text.as_bytes();
    let mut buf: Vec<u8> = Vec::new();
    for (k, &c) in bytes.iter().enumerate() {
        if c & 0xC0 != 0x80 {
            buf.clear();
        }
        buf.push(c);
        let next = bytes.get(k + 1).copied().unwrap_or(0);
        if next & 0xC0 == 0x80 && buf.len() < 4 {
            continue;
        }
        let id = lookup(&buf);
        if id != -1 {
            tokens.push(id);
        } else {
            for &b in &buf {
                tokens.push(b as i64 + 3);
            }
        }
        buf.clear();
    }
    loop {
        let mut best_score = -1e10f32;
        let mut best_id = -1i64;
        let mut best_idx = usize::MAX;
        for i in 0..tokens.len().saturating_sub(1) {
            let mut s = v.pieces[tokens[i] as usize].clone();
            s.extend_from_slice(&v.pieces[tokens[i + 1] as usize]);
            let id = lookup(&s);
            if id != -1 && v.scores[id as usize] > best_score {
                best_score = v.scores[id as usize];
                best_id = id;
                best_idx = i;
            }
        }
        if best_idx == usize::MAX {
            break;
        }
        tokens[best_idx] = best_id;
        tokens.remove(best_idx + 1);
    }
    tokens.into_iter().map(|t| t as u32).collect()
}

// ------------------------------------------------------------------------------------
// llama2.c

#[test]
fn llama2c_basic_roundtrip_and_bos() {
    let Some(tok) = llama2c() else { return };
    assert_eq!(tok.kind(), "llama2.c");
    assert_eq!(tok.vocab_size(), 512);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_ids(), &[2, 1]);
    assert_eq!(tok.pad_id(), None);
    assert!(!tok.has_chat_template());

    let text = "Once upon a time";
    let with_bos = tok.encode(text, true).unwrap();
    let without = tok.encode(text, false).unwrap();
    assert_eq!(with_bos[0], 1);
    assert_eq!(&with_bos[1..], &without[..]);
    assert!(!without.contains(&1) && !without.contains(&2));
    assert!(with_bos.iter().all(|&id| id < 512));
    // Merging made it much shorter than one token per character.
    assert!(without.len() < text.len() / 2, "{without:?}");

    // After BOS the dummy-prefix space is stripped; without BOS it stays.
    assert_eq!(tok.decode(&with_bos).unwrap(), text);
    assert_eq!(tok.decode(&without).unwrap(), format!(" {text}"));
    // EOS is never added by encode, and is dropped by decode.
    let mut with_eos = with_bos.clone();
    with_eos.push(2);
    assert_eq!(tok.decode(&with_eos).unwrap(), text);

    // Empty text: no dummy prefix.
    assert_eq!(tok.encode("", false).unwrap(), Vec::<u32>::new());
    assert_eq!(tok.encode("", true).unwrap(), vec![1]);

    // Out-of-range ids are an error, not a panic.
    let err = tok.decode(&[5, 512]).unwrap_err();
    assert!(format!("{err:#}").contains("512"), "{err:#}");

    let specials = tok.special_tokens();
    assert_eq!(
        specials,
        vec![
            ("<unk>".to_string(), 0),
            ("<s>".to_string(), 1),
            ("</s>".to_string(), 2)
        ]
    );
    assert_eq!(tok.token_to_id("<s>"), Some(1));
    assert_eq!(tok.id_to_token(3).as_deref(), Some("<0x00>"));
    assert_eq!(tok.id_to_token(512), None);
}

#[test]
fn llama2c_byte_fallback() {
    let Some(tok) = llama2c() else { return };
    for text in ["café é", "a 🦀 crab", "日本", "tab\there\nnewline"] {
        let ids = tok.encode(text, true).unwrap();
        assert!(ids.iter().all(|&id| id < 512), "{text}: {ids:?}");
        assert_eq!(tok.decode(&ids).unwrap(), text, "{ids:?}");
    }
    // The crab emoji is not a piece: it must appear as its 4 UTF-8 bytes, id = byte + 3.
    let ids = tok.encode("🦀", false).unwrap();
    let crab_bytes: Vec<u32> = "🦀".bytes().map(|b| b as u32 + 3).collect();
    assert!(
        ids.windows(4).any(|w| w == crab_bytes.as_slice()),
        "{ids:?} should contain {crab_bytes:?}"
    );
    // A lone byte of a multi-byte character decodes lossily, no panic.
    let s = tok.decode(&[crab_bytes[0]]).unwrap();
    assert_eq!(s, "\u{FFFD}");
}

#[test]
fn llama2c_matches_run_c_reference() {
    let Some(path) = tok512_path() else { return };
    let tok = Tokenizer::from_llama2c(&path, 512).unwrap();
    let v = read_ref_vocab(&path, 512);
    let mut samples: Vec<String> = vec![
        "Once upon a time, there was a little girl named Lily.".into(),
        "She loved to play outside in the sunshine!  Double  spaces,\nnewlines\tand tabs.".into(),
        " leading space".into(),
        "trailing space ".into(),
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".into(),
        "the the the the the and and and".into(),
        "Ünïcödé ✓ 🦀 ™ 日本語".into(),
        "x".into(),
        " ".into(),
    ];
    // Deterministic pseudo-random strings over a mixed alphabet.
    let alphabet: Vec<char> = "abcdefghijklmnopqrstuvwxyz  .,!?'\"\nTOLSé🦀™-"
        .chars()
        .collect();
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..300 {
        let mut s = String::new();
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let len = (state >> 33) % 80;
        for _ in 0..len {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            s.push(alphabet[((state >> 33) % alphabet.len() as u64) as usize]);
        }
        samples.push(s);
    }
    for s in &samples {
        for bos in [false, true] {
            let got = tok.encode(s, bos).unwrap();
            let want = ref_encode(&v, s, bos);
            assert_eq!(got, want, "text {s:?} bos {bos}");
            assert_eq!(tok.decode(&got).unwrap().trim_start(), s.trim_start());
        }
    }
}

#[test]
fn llama2c_single_token_id() {
    let Some(tok) = llama2c() else { return };
    // Encoding adds the dummy prefix, so " the" style pieces are what single words give.
    let id = tok.single_token_id("the").unwrap();
    assert_eq!(tok.id_to_token(id).as_deref(), Some(" the"));
    let err = tok.single_token_id("Once upon a time").unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("Once upon a time"), "{msg}");
    assert!(msg.contains("tok512.bin"), "{msg}");
}

#[test]
fn llama2c_truncated_and_malformed_files() {
    let Some(path) = tok512_path() else { return };
    let bytes = std::fs::read(&path).unwrap();
    let dir = tempfile::tempdir().unwrap();

    // Cut in the middle of the file.
    let cut = dir.path().join("cut.bin");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = Tokenizer::from_llama2c(&cut, 512).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains(&cut.display().to_string()), "{msg}");
    assert!(msg.contains("token "), "{msg}");

    // Cut just before the last piece's bytes end: names the last token index.
    let cut2 = dir.path().join("cut2.bin");
    std::fs::write(&cut2, &bytes[..bytes.len() - 1]).unwrap();
    let msg = format!("{:#}", Tokenizer::from_llama2c(&cut2, 512).unwrap_err());
    assert!(
        msg.contains("cut2.bin") && msg.contains("token 511"),
        "{msg}"
    );

    // Asking for more tokens than the file holds.
    let msg = format!("{:#}", Tokenizer::from_llama2c(&path, 513).unwrap_err());
    assert!(
        msg.contains("tok512.bin") && msg.contains("token 512"),
        "{msg}"
    );

    // Header only / empty file.
    let empty = dir.path().join("empty.bin");
    std::fs::write(&empty, b"").unwrap();
    let msg = format!("{:#}", Tokenizer::from_llama2c(&empty, 512).unwrap_err());
    assert!(msg.contains("empty.bin"), "{msg}");

    // Negative piece length.
    let mut bad = bytes.clone();
    bad[4 + 4..4 + 8].copy_from_slice(&(-5i32).to_le_bytes());
    let badp = dir.path().join("neg.bin");
    std::fs::write(&badp, &bad).unwrap();
    let msg = format!("{:#}", Tokenizer::from_llama2c(&badp, 512).unwrap_err());
    assert!(msg.contains("neg.bin") && msg.contains("token 0"), "{msg}");

    // Missing file.
    let missing = dir.path().join("nope.bin");
    let msg = format!("{:#}", Tokenizer::from_llama2c(&missing, 512).unwrap_err());
    assert!(msg.contains("nope.bin"), "{msg}");
}

// ------------------------------------------------------------------------------------
// GPT-2 (Hugging Face)

#[test]
fn gpt2_encode_decode() {
    let Some(tok) = gpt2() else { return };
    assert_eq!(tok.kind(), "huggingface");
    assert_eq!(tok.vocab_size(), 50257);
    assert_eq!(tok.encode("Hello world", false).unwrap(), vec![15496, 995]);
    assert_eq!(tok.eos_ids(), &[50256]);
    assert_eq!(tok.bos_id(), Some(50256));
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(50256));
    assert_eq!(tok.id_to_token(15496).as_deref(), Some("Hello"));
    // GPT-2's own rules add no BOS (no add_bos_token, a ByteLevel post-processor), as in
    // transformers: starting a sequence adds nothing.
    assert!(!tok.adds_bos());
    assert_eq!(tok.encode("Hello world", true).unwrap(), vec![15496, 995]);
    assert!(!tok.has_chat_template());
    assert_eq!(
        tok.special_tokens(),
        vec![("<|endoftext|>".to_string(), 50256)]
    );

    let text = "The quick brown fox jumps over the lazy dog. Ünïcödé 🦀, 1234!";
    let ids = tok.encode(text, false).unwrap();
    assert!(ids.iter().all(|&id| (id as usize) < tok.vocab_size()));
    assert_eq!(tok.decode(&ids).unwrap(), text);

    // EOS/BOS are skipped when decoding.
    let mut ids2 = tok.encode(text, true).unwrap();
    ids2.push(50256);
    assert_eq!(tok.decode(&ids2).unwrap(), text);

    // The special token written in text is recognised as one token.
    assert_eq!(
        tok.encode("a<|endoftext|>", false).unwrap(),
        vec![64, 50256]
    );

    let err = tok.decode(&[50257]).unwrap_err();
    assert!(format!("{err:#}").contains("50257"));
}

#[test]
fn gpt2_bare_tokenizer_json() {
    let Some(dir) = gpt2_dir() else { return };
    let tok = Tokenizer::from_tokenizer_json(&dir.join("tokenizer.json")).unwrap();
    assert_eq!(tok.eos_ids(), &[50256]);
    assert_eq!(tok.bos_id(), Some(50256));
    assert_eq!(tok.pad_id(), None);
    assert_eq!(tok.encode("Hello world", false).unwrap(), vec![15496, 995]);
}

#[test]
fn gpt2_single_token_id() {
    let Some(tok) = gpt2() else { return };
    assert_eq!(tok.single_token_id("A").unwrap(), 32);
    assert_eq!(tok.single_token_id(" A").unwrap(), 317);
    assert_eq!(tok.single_token_id("B").unwrap(), 33);
    let err = tok.single_token_id("Hello world").unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("Hello world") && msg.contains("15496"),
        "{msg}"
    );
    let err = tok.single_token_id("").unwrap_err();
    assert!(format!("{err:#}").contains("0 tokens"));
}

fn chat_dir(template: &str, extra: &str) -> Option<tempfile::TempDir> {
    let src = gpt2_dir()?;
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        src.join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let cfg = format!(
        r#"{{"bos_token": null, "eos_token": "<|endoftext|>", "pad_token": {{"content": "<|endoftext|>", "special": true}}{extra}, "chat_template": {}}}"#,
        serde_json::to_string(template).unwrap()
    );
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg).unwrap();
    Some(dir)
}

/// Qwen2-style ChatML template (default system prompt, python string methods).
const CHATML: &str = "{%- for message in messages %}
    {%- if loop.first and messages[0]['role'] != 'system' %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('unknown role: ' + message['role']) }}
    {%- endif %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'].strip() + '<|im_end|>' + '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
";

#[test]
fn chat_template_chatml() {
    let Some(dir) = chat_dir(CHATML, "") else {
        return;
    };
    let tok = Tokenizer::from_hf_dir(dir.path()).unwrap();
    assert!(tok.has_chat_template());
    assert_eq!(tok.bos_id(), None);
    assert_eq!(tok.eos_ids(), &[50256]);
    assert_eq!(tok.pad_id(), Some(50256));
    let msgs = vec![
        ChatMessage::new("user", "  What is 2+2?\n"),
        ChatMessage::new("assistant", "4"),
        ChatMessage::new("user", "And 3+3?"),
    ];
    let with = tok.apply_chat_template(&msgs, true).unwrap();
    assert_eq!(
        with,
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
         <|im_start|>user\nWhat is 2+2?<|im_end|>\n\
         <|im_start|>assistant\n4<|im_end|>\n\
         <|im_start|>user\nAnd 3+3?<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    let without = tok.apply_chat_template(&msgs[..1], false).unwrap();
    assert_eq!(
        without,
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
         <|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    );
    let sys = vec![
        ChatMessage::new("system", "Be terse."),
        ChatMessage::new("user", "Hi"),
    ];
    assert_eq!(
        tok.apply_chat_template(&sys, false).unwrap(),
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    );
    // The rendered text encodes and decodes back exactly.
    let ids = tok.encode(&with, false).unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), with);

    // raise_exception surfaces as an error naming the template's file.
    let err = tok
        .apply_chat_template(&[ChatMessage::new("tool", "x")], false)
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("unknown role: tool"), "{msg}");
    assert!(msg.contains("tokenizer_config.json"), "{msg}");
}

#[test]
fn chat_template_uses_special_token_variables() {
    // Llama-2 style: uses bos_token / eos_token, startswith, trim blocks.
    let tmpl = "{% for m in messages %}{% if m.role == 'user' %}{{ bos_token }}[INST] {{ m.content | trim }} [/INST]{% elif m.content.startswith('!') %}{{ m.content[1:] }}{{ eos_token }}{% else %}{{ ' ' + m.content + ' ' + eos_token }}{% endif %}{% endfor %}";
    let Some(dir) = chat_dir(tmpl, "") else {
        return;
    };
    // bos_token is declared null in the config, so rendering sees "".
    let tok = Tokenizer::from_hf_dir(dir.path()).unwrap();
    let out = tok
        .apply_chat_template(
            &[
                ChatMessage::new("user", " hi "),
                ChatMessage::new("assistant", "!yo"),
                ChatMessage::new("user", "bye"),
                ChatMessage::new("assistant", "ok"),
            ],
            false,
        )
        .unwrap();
    assert_eq!(
        out,
        "[INST] hi [/INST]yo<|endoftext|>[INST] bye [/INST] ok <|endoftext|>"
    );
}

#[test]
fn chat_template_errors() {
    let Some(tok) = gpt2() else { return };
    let err = tok
        .apply_chat_template(&[ChatMessage::new("user", "hi")], true)
        .unwrap_err();
    assert!(format!("{err:#}").contains("gpt2-tokenizer"), "{err:#}");

    // A template that does not compile loads fine but fails to render, naming the file.
    let Some(dir) = chat_dir("{% for m in messages %}", "") else {
        return;
    };
    let tok = Tokenizer::from_hf_dir(dir.path()).unwrap();
    assert!(tok.has_chat_template());
    let err = tok.apply_chat_template(&[], false).unwrap_err();
    assert!(
        format!("{err:#}").contains("tokenizer_config.json"),
        "{err:#}"
    );
}

#[test]
fn generation_config_eos_list() {
    let Some(dir) = chat_dir("x", "") else { return };
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [50256, 198], "bos_token_id": 50256}"#,
    )
    .unwrap();
    let tok = Tokenizer::from_hf_dir(dir.path()).unwrap();
    assert_eq!(tok.eos_ids(), &[50256, 198]);
    // tokenizer_config's explicit null bos wins over generation_config.
    assert_eq!(tok.bos_id(), None);

    // An out-of-range id is an error naming the file and the field.
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [50256, 99999]}"#,
    )
    .unwrap();
    let msg = format!("{:#}", Tokenizer::from_hf_dir(dir.path()).unwrap_err());
    assert!(
        msg.contains("generation_config.json")
            && msg.contains("eos_token_id")
            && msg.contains("99999"),
        "{msg}"
    );

    // A config token missing from the vocabulary names file and field.
    std::fs::remove_file(dir.path().join("generation_config.json")).unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"eos_token": "<|im_end|>"}"#,
    )
    .unwrap();
    let msg = format!("{:#}", Tokenizer::from_hf_dir(dir.path()).unwrap_err());
    assert!(
        msg.contains("tokenizer_config.json")
            && msg.contains("eos_token")
            && msg.contains("<|im_end|>"),
        "{msg}"
    );
}

// ------------------------------------------------------------------------------------
// Errors on bad input files

#[test]
fn missing_tokenizer_json() {
    let dir = tempfile::tempdir().unwrap();
    let err = Tokenizer::from_hf_dir(dir.path()).unwrap_err();
    let msg = format!("{err}");
    let expected = dir.path().join("tokenizer.json");
    assert!(msg.contains(&expected.display().to_string()), "{msg}");

    let missing = dir.path().join("tokenizer.json");
    let msg = format!("{}", Tokenizer::from_tokenizer_json(&missing).unwrap_err());
    assert!(msg.contains(&missing.display().to_string()), "{msg}");

    let not_dir = dir.path().join("nothing-here");
    let msg = format!("{}", Tokenizer::from_hf_dir(&not_dir).unwrap_err());
    assert!(msg.contains("nothing-here"), "{msg}");
}

#[test]
fn tokenizer_json_not_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, "this is not json {").unwrap();
    let err = Tokenizer::from_tokenizer_json(&path).unwrap_err();
    let msg = format!("{err}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("line 1"), "{msg}");
    let msg = format!("{}", Tokenizer::from_hf_dir(dir.path()).unwrap_err());
    assert!(msg.contains(&path.display().to_string()), "{msg}");

    // Valid JSON, but not a tokenizer.
    std::fs::write(&path, r#"{"hello": 1}"#).unwrap();
    let msg = format!("{}", Tokenizer::from_tokenizer_json(&path).unwrap_err());
    assert!(msg.contains(&path.display().to_string()), "{msg}");
}

#[test]
fn bad_config_json() {
    let Some(src) = gpt2_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        src.join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let cfg = dir.path().join("tokenizer_config.json");
    std::fs::write(&cfg, "{\n  \"eos_token\": ,\n}").unwrap();
    let msg = format!("{:#}", Tokenizer::from_hf_dir(dir.path()).unwrap_err());
    assert!(
        msg.contains(&cfg.display().to_string()) && msg.contains("line 2"),
        "{msg}"
    );

    std::fs::write(&cfg, r#"{"eos_token": 5}"#).unwrap();
    let msg = format!("{:#}", Tokenizer::from_hf_dir(dir.path()).unwrap_err());
    assert!(
        msg.contains("tokenizer_config.json") && msg.contains("eos_token"),
        "{msg}"
    );

    std::fs::write(&cfg, r#"{"chat_template": 5}"#).unwrap();
    let msg = format!("{:#}", Tokenizer::from_hf_dir(dir.path()).unwrap_err());
    assert!(
        msg.contains("tokenizer_config.json") && msg.contains("chat_template"),
        "{msg}"
    );
}
