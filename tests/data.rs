//! Data loading: record files, SFT tokenization, preference loaders. The real data sets
//! and tokenizers under ../shared/data are read in place (tests skip where absent).

mod common;
use common::shared_data;
use std::io::Write;
use std::path::PathBuf;

use osp::data::{
    load_hh, load_pandalm, load_preferences, load_prompts, load_sft, load_tldr, read_records,
    split_eval, tldr_prompt, ChatRender, OnMalformed, RecordError,
};
use osp::tokenizer::{ChatMessage, Tokenizer};

// ------------------------------------------------------------------------------------
// Helpers

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn write_gz(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let p = dir.path().join(name);
    let f = std::fs::File::create(&p).unwrap();
    let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::default());
    gz.write_all(text.as_bytes()).unwrap();
    gz.finish().unwrap();
    p
}

fn llama2c() -> Option<Tokenizer> {
    let p = shared_data("models/stories260K/tok512.bin")?;
    Some(Tokenizer::from_llama2c(&p, 512).unwrap())
}

/// GPT-2's tokenizer with a chat template, in a temp folder.
fn chat_tok(template: &str) -> Option<(tempfile::TempDir, Tokenizer)> {
    let src = shared_data("models/gpt2-tokenizer/tokenizer.json")?;
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src, dir.path().join("tokenizer.json")).unwrap();
    let cfg = serde_json::json!({
        "bos_token": null,
        "eos_token": "<|endoftext|>",
        "chat_template": template,
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let tok = Tokenizer::from_hf_dir(dir.path()).unwrap();
    Some((dir, tok))
}

const CHATML: &str = "{%- for message in messages %}\
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

fn err_text(e: anyhow::Error) -> String {
    format!("{e:#}")
}

// ------------------------------------------------------------------------------------
// Record files

#[test]
fn jsonl_records_keep_their_lines() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "a.jsonl",
        "{\"a\": 1}\n\n  \r\n{\"a\": 2}\r\n{\"a\": 3}",
    );
    let recs = read_records(&p, OnMalformed::Abort).unwrap();
    let lines: Vec<usize> = recs.records.iter().map(|r| r.line).collect();
    assert_eq!(lines, [1, 4, 5]);
    assert_eq!(recs.records[1].value["a"], 2);
    assert!(recs.warnings.is_empty());
    assert_eq!(recs.source(4), format!("{}:4", p.display()));
}

#[test]
fn json_array_records_start_lines_and_gzip() {
    let text = "\u{feff}[\n  {\"a\": \"x,]}\\\"\"},\n  {\n    \"a\": [1, {\"b\": 2}]\n  }, {\"a\": 3}\n]\n";
    let dir = tempfile::tempdir().unwrap();
    for p in [
        write(&dir, "a.json", text),
        write_gz(&dir, "a.json.gz", text),
    ] {
        let recs = read_records(&p, OnMalformed::Abort).unwrap();
        let lines: Vec<usize> = recs.records.iter().map(|r| r.line).collect();
        assert_eq!(lines, [2, 3, 5], "{}", p.display());
        assert_eq!(recs.records[0].value["a"], "x,]}\"");
        assert_eq!(recs.records[1].value["a"][1]["b"], 2);
    }
    let p = write_gz(&dir, "b.jsonl.gz", "{\"a\": 1}\n{\"a\": 2}\n");
    assert_eq!(
        read_records(&p, OnMalformed::Abort).unwrap().records.len(),
        2
    );
    let p = write(&dir, "empty.json", " [ ] ");
    assert!(read_records(&p, OnMalformed::Abort)
        .unwrap()
        .records
        .is_empty());
}

#[test]
fn bad_json_follows_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "bad.jsonl",
        "{\"a\": 1}\n{\"a\": tru}\n{\"a\": 3}\n{\"a\"\n",
    );
    let err = read_records(&p, OnMalformed::Abort).unwrap_err();
    let rec = err.downcast_ref::<RecordError>().expect("a RecordError");
    assert_eq!((rec.line, rec.file.clone()), (2, p.display().to_string()));
    let msg = err_text(err);
    assert!(
        msg.starts_with(&format!("{}:2: invalid JSON", p.display())),
        "{msg}"
    );

    let recs = read_records(&p, OnMalformed::Skip).unwrap();
    assert_eq!(recs.records.len(), 2);
    assert_eq!(recs.warnings.len(), 2);
    assert!(
        recs.warnings[0].contains("bad.jsonl:2: invalid JSON"),
        "{:?}",
        recs.warnings
    );
    assert!(
        recs.warnings[1].contains("bad.jsonl:4: "),
        "{:?}",
        recs.warnings
    );

    // A bad element of a JSON array is reported at its own line (inside the element).
    let p = write(
        &dir,
        "bad.json",
        "[\n{\"a\": 1},\n{\n\"a\": [1 2]\n},\n{\"a\": 3}\n]",
    );
    let msg = err_text(read_records(&p, OnMalformed::Abort).unwrap_err());
    assert!(msg.contains("bad.json:4: invalid JSON"), "{msg}");
    assert_eq!(
        read_records(&p, OnMalformed::Skip).unwrap().records.len(),
        2
    );

    // Unbalanced arrays cannot be split into records: an error under either policy.
    for (text, line, what) in [
        ("[\n{\"a\": 1},\n{\"a\": \"x}\n]", 3, "unterminated string"),
        ("[\n{\"a\": 1},\n{\"a\": 2}\n", 3, "unterminated JSON array"),
        ("[\n{\"a\": 1},\n]", 2, "trailing `,`"),
        (
            "[{\"a\": 1}]\n[{\"a\": 2}]",
            2,
            "unexpected data after the end",
        ),
    ] {
        let p = write(&dir, "unbalanced.json", text);
        let msg = err_text(read_records(&p, OnMalformed::Skip).unwrap_err());
        assert!(
            msg.contains(&format!("unbalanced.json:{line}: {what}")),
            "{msg}"
        );
    }
    let p = write(&dir, "not.gz", "");
    std::fs::write(&p, [0x1f, 0x8b, 1, 2, 3]).unwrap();
    let msg = err_text(read_records(&p, OnMalformed::Skip).unwrap_err());
    assert!(msg.contains("not.gz") && msg.contains("gzip"), "{msg}");
}

#[test]
fn on_malformed_serde() {
    let v: Vec<OnMalformed> = serde_json::from_str(r#"["skip", "abort"]"#).unwrap();
    assert_eq!(v, [OnMalformed::Skip, OnMalformed::Abort]);
    // The default every config's data.on_malformed has, and documents.
    assert_eq!(OnMalformed::default(), OnMalformed::Skip);
    assert!(serde_json::from_str::<OnMalformed>(r#""Skip""#).is_err());
}

// ------------------------------------------------------------------------------------
// SFT

#[test]
fn sft_prompt_completion_and_text() {
    let Some(tok) = llama2c() else { return };
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "sft.jsonl",
        "{\"prompt\": \"Once upon a time\", \"completion\": \" there was a cat.\"}\n\
         {\"text\": \"The dog ran.\"}\n",
    );
    let (ex, warnings) = load_sft(&p, &tok, 512, OnMalformed::Abort).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(ex.len(), 2);

    let prompt = tok.encode("Once upon a time", true).unwrap();
    let completion = tok.encode(" there was a cat.", false).unwrap();
    let mut ids = prompt.clone();
    ids.extend(&completion);
    ids.push(2);
    assert_eq!(ex[0].ids, ids);
    let mask: Vec<bool> = (0..ids.len()).map(|i| i >= prompt.len()).collect();
    assert_eq!(ex[0].loss_mask, mask);
    assert_eq!(ex[0].trained_tokens(), completion.len() + 1);
    assert_eq!(ex[0].source, format!("{}:1", p.display()));

    let mut ids = tok.encode("The dog ran.", true).unwrap();
    ids.push(2);
    assert_eq!(ex[1].ids, ids);
    assert!(!ex[1].loss_mask[0], "position 0 (BOS) is never a target");
    assert!(ex[1].loss_mask[1..].iter().all(|&m| m));
    assert_eq!(ex[1].source, format!("{}:2", p.display()));
}

#[test]
fn sft_truncation_and_empty_examples() {
    let Some(tok) = llama2c() else { return };
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "sft.jsonl",
        "{\"prompt\": \"A\", \"completion\": \" long long long long story\"}\n\
         {\"prompt\": \"a very long prompt that fills everything\", \"completion\": \" x\"}\n",
    );
    let (ex, warnings) = load_sft(&p, &tok, 4, OnMalformed::Abort).unwrap();
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].ids.len(), 4);
    assert_eq!(ex[0].loss_mask.len(), 4);
    assert_eq!(warnings.len(), 3, "{warnings:?}");
    assert!(
        warnings[0].contains("sft.jsonl:1: truncated from"),
        "{warnings:?}"
    );
    assert!(
        warnings[1].contains("sft.jsonl:2: truncated from"),
        "{warnings:?}"
    );
    assert!(
        warnings[2].contains("sft.jsonl:2: skipped: no trained tokens"),
        "{warnings:?}"
    );
    assert!(load_sft(&p, &tok, 0, OnMalformed::Abort).is_err());
}

#[test]
fn sft_malformed_records() {
    let Some(tok) = llama2c() else { return };
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "m.jsonl",
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n\
         {\"prompt\": \"a\"}\n\
         {\"text\": 5}\n\
         [1, 2]\n\
         {\"prompt\": [{\"role\": \"user\", \"content\": \"a\"}], \"completion\": [{\"role\": \"assistant\", \"content\": \"b\"}]}\n\
         {\"other\": 1}\n\
         {oops\n",
    );
    let msg = err_text(load_sft(&p, &tok, 64, OnMalformed::Abort).unwrap_err());
    assert!(
        msg.contains("m.jsonl:2: missing field `completion`"),
        "{msg}"
    );
    // The conversational record needs a chat template, which tok512 lacks: always fatal.
    let msg = err_text(load_sft(&p, &tok, 64, OnMalformed::Skip).unwrap_err());
    assert!(
        msg.contains("m.jsonl:5: ") && msg.contains("chat template"),
        "{msg}"
    );
    assert!(msg.contains("tok512.bin"), "names the tokenizer: {msg}");

    let p = write(
        &dir,
        "m2.jsonl",
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n\
         {\"prompt\": \"a\"}\n\
         {\"text\": 5}\n\
         [1, 2]\n\
         {\"prompt\": \"a\", \"completion\": 3}\n\
         {\"other\": 1}\n\
         {oops\n",
    );
    let (ex, w) = load_sft(&p, &tok, 64, OnMalformed::Skip).unwrap();
    assert_eq!(ex.len(), 1);
    let expect = [
        "m2.jsonl:2: missing field `completion`",
        "m2.jsonl:3: field `text` must be a string, found a number",
        "m2.jsonl:4: expected a JSON object, found an array",
        "m2.jsonl:5: `prompt` and `completion` must both be strings or both be message lists",
        "m2.jsonl:6: expected SFT fields",
        "m2.jsonl:7: invalid JSON",
    ];
    assert_eq!(w.len(), expect.len(), "{w:?}");
    // Warnings from reading (bad JSON) come first, then the others in file order.
    let mut w_sorted = w.clone();
    w_sorted.sort_by_key(|s| s.split(".jsonl:").nth(1).map(str::to_string));
    for (got, want) in w_sorted.iter().zip(expect) {
        assert!(got.contains(want), "{got:?} should contain {want:?}");
    }
}

#[test]
fn sft_conversations_train_assistant_turns_only() {
    let Some((_dir, tok)) = chat_tok(CHATML) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let conv = serde_json::json!({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello?"},
        {"role": "assistant", "content": "Hi there."},
        {"role": "user", "content": "Bye?"},
        {"role": "assistant", "content": "Bye."},
    ]});
    let pc = serde_json::json!({
        "prompt": [{"role": "user", "content": "Name a colour."}],
        "completion": [{"role": "assistant", "content": "Blue."}],
    });
    let p = write(&dir, "chat.jsonl", &format!("{conv}\n{pc}\n"));
    let (ex, w) = load_sft(&p, &tok, 1024, OnMalformed::Abort).unwrap();
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(ex.len(), 2);

    let msgs: Vec<ChatMessage> = serde_json::from_value(conv["messages"].clone()).unwrap();
    let full = tok.apply_chat_template(&msgs, false).unwrap();
    assert_eq!(ex[0].ids, tok.encode(&full, false).unwrap());
    // The trained tokens, span by span, are exactly the assistant turns.
    let mut spans = Vec::new();
    let mut cur: Vec<u32> = Vec::new();
    for (&id, &m) in ex[0].ids.iter().zip(&ex[0].loss_mask) {
        if m {
            cur.push(id);
        } else if !cur.is_empty() {
            spans.push(tok.decode(&std::mem::take(&mut cur)).unwrap());
        }
    }
    if !cur.is_empty() {
        spans.push(tok.decode(&cur).unwrap());
    }
    assert_eq!(spans, ["Hi there.<|im_end|>\n", "Bye.<|im_end|>\n"]);

    let trained: Vec<u32> = ex[1]
        .ids
        .iter()
        .zip(&ex[1].loss_mask)
        .filter(|(_, &m)| m)
        .map(|(&i, _)| i)
        .collect();
    assert_eq!(tok.decode(&trained).unwrap(), "Blue.<|im_end|>\n");
    let first = ex[1].loss_mask.iter().position(|&m| m).unwrap();
    assert!(tok
        .decode(&ex[1].ids[..first])
        .unwrap()
        .ends_with("<|im_start|>assistant\n"));

    // No assistant turn: nothing to train, dropped with a warning.
    let p = write(
        &dir,
        "none.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
    );
    let (ex, w) = load_sft(&p, &tok, 1024, OnMalformed::Abort).unwrap();
    assert!(ex.is_empty());
    assert!(
        w[0].contains("none.jsonl:1: skipped: no trained tokens"),
        "{w:?}"
    );

    // Bad messages are malformed records.
    let p = write(
        &dir,
        "badmsg.jsonl",
        "{\"messages\": [{\"role\": \"user\"}]}\n{\"messages\": []}\n",
    );
    let (_, w) = load_sft(&p, &tok, 1024, OnMalformed::Skip).unwrap();
    assert!(
        w[0].contains("badmsg.jsonl:1: `messages[0]`: missing field `content`"),
        "{w:?}"
    );
    assert!(
        w[1].contains("badmsg.jsonl:2: field `messages` is an empty list"),
        "{w:?}"
    );
}

#[test]
fn sft_template_that_is_not_prefix_stable_is_an_error() {
    // The message count is written first, so shorter renders are not prefixes.
    let tmpl = "{{ messages|length }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}";
    let Some((_dir, tok)) = chat_tok(tmpl) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "c.jsonl",
        "{\"text\": \"ok\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n",
    );
    let msg = err_text(load_sft(&p, &tok, 64, OnMalformed::Abort).unwrap_err());
    assert!(
        msg.contains("c.jsonl:2: ") && msg.contains("prefix"),
        "{msg}"
    );
    let (ex, w) = load_sft(&p, &tok, 64, OnMalformed::Skip).unwrap();
    assert_eq!((ex.len(), w.len()), (1, 1));
}

#[test]
fn split_eval_is_deterministic() {
    let items: Vec<u32> = (0..100).collect();
    let (train, eval) = split_eval(items.clone(), 0.1, 7);
    assert_eq!((train.len(), eval.len()), (90, 10));
    assert!(train.windows(2).all(|w| w[0] < w[1]) && eval.windows(2).all(|w| w[0] < w[1]));
    let mut all = [train.clone(), eval.clone()].concat();
    all.sort();
    assert_eq!(all, items);
    assert_eq!(split_eval(items.clone(), 0.1, 7), (train, eval.clone()));
    assert_ne!(split_eval(items.clone(), 0.1, 8).1, eval);
    assert_eq!(split_eval(items.clone(), 0.0, 7).1.len(), 0);
    assert_eq!(split_eval(items.clone(), f64::NAN, 7).1.len(), 0);
    assert_eq!(split_eval(items.clone(), 1.5, 7).0.len(), 0);
    // Small sets keep one item on each side.
    assert_eq!(split_eval(vec![1, 2, 3], 0.01, 0).1.len(), 1);
    assert_eq!(split_eval(vec![1, 2, 3], 0.99, 0).0.len(), 1);
    assert_eq!(split_eval(Vec::<u8>::new(), 0.5, 0), (vec![], vec![]));
}

// ------------------------------------------------------------------------------------
// TRL preference layouts

#[test]
fn trl_preferences_plain_and_strength() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "pref.jsonl",
        "{\"prompt\": \"Q\", \"chosen\": \" good\", \"rejected\": \" bad\"}\n\
         {\"prompt\": \"Q\", \"chosen\": \" good\", \"rejected\": \" bad\", \"strength\": 0.3}\n\
         {\"prompt\": \"Q\", \"chosen\": \" good\", \"rejected\": \" bad\", \"strength\": null}\n",
    );
    let (pairs, w) = load_preferences(&p, ChatRender::Plain, OnMalformed::Abort).unwrap();
    assert!(w.is_empty());
    assert_eq!(pairs.len(), 3);
    assert_eq!(
        (
            pairs[0].prompt.as_str(),
            pairs[0].chosen.as_str(),
            pairs[0].rejected.as_str()
        ),
        ("Q", " good", " bad")
    );
    assert_eq!(pairs[0].strength, None);
    assert_eq!(
        pairs[1].strength,
        Some(0.3),
        "kept as P(chosen ≻ rejected), not swapped"
    );
    assert_eq!(pairs[2].strength, None);
    assert_eq!(pairs[1].source, format!("{}:2", p.display()));

    let p = write(
        &dir,
        "badpref.json",
        "[\n{\"prompt\": \"Q\", \"chosen\": \"a\", \"rejected\": \"b\", \"strength\": 1.5},\n\
         {\"prompt\": \"Q\", \"chosen\": \"a\", \"rejected\": \"b\", \"strength\": \"high\"},\n\
         {\"prompt\": \"Q\", \"chosen\": \"a\"},\n\
         {\"chosen\": \"Human: a\", \"rejected\": \"Human: b\"},\n\
         {\"prompt\": \"Q\", \"chosen\": [], \"rejected\": \"b\"},\n\
         {\"prompt\": \"Q\", \"chosen\": \"a\", \"rejected\": \"b\", \"strength\": 0}\n]",
    );
    let msg = err_text(load_preferences(&p, ChatRender::Plain, OnMalformed::Abort).unwrap_err());
    assert!(
        msg.contains("badpref.json:2: field `strength` must be in [0, 1], found 1.5"),
        "{msg}"
    );
    let (pairs, w) = load_preferences(&p, ChatRender::Plain, OnMalformed::Skip).unwrap();
    assert_eq!(pairs.len(), 1);
    assert_eq!(pairs[0].strength, Some(0.0));
    let expect = [
        "badpref.json:2: field `strength` must be in [0, 1]",
        "badpref.json:3: field `strength` must be a number in [0, 1], found a string",
        "badpref.json:4: missing field `rejected`",
        "badpref.json:5: missing field `prompt` (for implicit-prompt",
        "badpref.json:6: `prompt`, `chosen` and `rejected` must all be strings or all be message lists",
    ];
    assert_eq!(w.len(), expect.len(), "{w:?}");
    for (got, want) in w.iter().zip(expect) {
        assert!(got.contains(want), "{got:?} should contain {want:?}");
    }
}

#[test]
fn trl_conversational_preferences_and_prompts() {
    let rec = serde_json::json!({
        "prompt": [{"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    });
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "conv.jsonl", &format!("{rec}\n"));

    // Without a tokenizer: the documented plain rendering.
    assert!(matches!(ChatRender::for_tokenizer(None), ChatRender::Plain));
    let (pairs, _) = load_preferences(&p, ChatRender::Plain, OnMalformed::Abort).unwrap();
    assert_eq!(pairs[0].prompt, "user: 2+2?\n\nassistant:");
    assert_eq!(pairs[0].chosen, " 4");
    assert_eq!(pairs[0].rejected, " 5");

    let (prompts, _) = load_prompts(&p, ChatRender::Plain, OnMalformed::Abort).unwrap();
    assert_eq!(prompts[0].prompt, "user: 2+2?\n\nassistant:");
    assert_eq!(prompts[0].source, format!("{}:1", p.display()));

    // With a chat template.
    if let Some((_d, tok)) = chat_tok(CHATML) {
        let render = ChatRender::for_tokenizer(Some(&tok));
        assert!(matches!(render, ChatRender::Template(_)));
        let (pairs, _) = load_preferences(&p, render, OnMalformed::Abort).unwrap();
        assert_eq!(
            pairs[0].prompt,
            "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(pairs[0].chosen, "4<|im_end|>\n");
        assert_eq!(pairs[0].rejected, "5<|im_end|>\n");
    }

    // A response that does not start with an assistant turn cannot continue the prompt.
    let bad = serde_json::json!({
        "prompt": [{"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "user", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    });
    let p = write(&dir, "bad.jsonl", &format!("{rec}\n{bad}\n"));
    let msg = err_text(load_preferences(&p, ChatRender::Plain, OnMalformed::Abort).unwrap_err());
    assert!(msg.contains("bad.jsonl:2: rendering `chosen`"), "{msg}");

    // Prompt-only files.
    let p = write(
        &dir,
        "prompts.jsonl",
        "{\"prompt\": \"Tell me a story.\"}\n{\"prompt\": 3}\n{\"text\": \"x\"}\n",
    );
    let (prompts, w) = load_prompts(&p, ChatRender::Plain, OnMalformed::Skip).unwrap();
    assert_eq!(prompts.len(), 1);
    assert_eq!(prompts[0].prompt, "Tell me a story.");
    assert!(
        w[0].contains("prompts.jsonl:2: field `prompt` must be a string or a list"),
        "{w:?}"
    );
    assert!(
        w[1].contains("prompts.jsonl:3: missing field `prompt`"),
        "{w:?}"
    );
}

// ------------------------------------------------------------------------------------
// Anthropic HH-RLHF

#[test]
fn hh_real_test_splits() {
    for (name, rows, shared, first_bad) in [
        ("helpful-base_test", 2354, 2345, 169),
        ("harmless-base_test", 2312, 2307, 1255),
    ] {
        let Some(p) = shared_data(&format!("hh-rlhf/{name}.jsonl.gz")) else {
            return;
        };
        assert_eq!(
            read_records(&p, OnMalformed::Abort).unwrap().records.len(),
            rows
        );
        let (pairs, w) = load_hh(&p, OnMalformed::Skip).unwrap();
        assert_eq!(pairs.len(), shared, "{name}: pairs sharing the prompt");
        assert_eq!(w.len(), rows - shared, "{name}");
        assert!(
            w[0].contains(&format!(
                ".jsonl.gz:{first_bad}: chosen and rejected do not share"
            )),
            "{w:?}"
        );
        let msg = err_text(load_hh(&p, OnMalformed::Abort).unwrap_err());
        assert!(
            msg.contains(&format!("{name}.jsonl.gz:{first_bad}: ")),
            "{msg}"
        );
        for pair in &pairs {
            assert!(
                pair.prompt.starts_with("\n\nHuman: ") && pair.prompt.ends_with("\n\nAssistant:")
            );
            assert!(
                !pair.chosen.contains("\n\nAssistant:")
                    && !pair.rejected.contains("\n\nAssistant:")
            );
            assert_eq!(pair.strength, None);
        }
        if name == "helpful-base_test" {
            let p0 = &pairs[0];
            assert_eq!(
                p0.prompt,
                "\n\nHuman: Do you know why turkeys became the official food of thanksgiving?\n\nAssistant:"
            );
            assert!(p0
                .chosen
                .starts_with(" To be honest, I don’t know anything about that."));
            assert!(p0.rejected.starts_with(" I know that the American Indians"));
            assert!(p0.source.ends_with("helpful-base_test.jsonl.gz:1"));
        }
    }
}

#[test]
fn hh_malformed() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_gz(
        &dir,
        "hh.jsonl.gz",
        "{\"chosen\": \"\\n\\nHuman: hi\\n\\nAssistant: yo\", \"rejected\": \"\\n\\nHuman: hi\\n\\nAssistant: go away\"}\n\
         {\"chosen\": \"\\n\\nHuman: hi\", \"rejected\": \"\\n\\nHuman: hi\\n\\nAssistant: x\"}\n\
         {\"chosen\": \"\\n\\nHuman: hi\\n\\nAssistant: a\", \"rejected\": \"\\n\\nHuman: ho\\n\\nAssistant: b\"}\n\
         {\"chosen\": 1, \"rejected\": \"x\"}\n",
    );
    let (pairs, w) = load_hh(&p, OnMalformed::Skip).unwrap();
    assert_eq!(pairs.len(), 1);
    assert_eq!(pairs[0].prompt, "\n\nHuman: hi\n\nAssistant:");
    assert_eq!(pairs[0].chosen, " yo");
    assert_eq!(pairs[0].rejected, " go away");
    assert!(
        w[0].contains("hh.jsonl.gz:2: `chosen` has no \"\\n\\nAssistant:\" turn"),
        "{w:?}"
    );
    assert!(
        w[1].contains("hh.jsonl.gz:3: chosen and rejected do not share the prompt"),
        "{w:?}"
    );
    assert!(w[1].contains("differing from byte 10"), "{w:?}");
    assert!(
        w[2].contains("hh.jsonl.gz:4: field `chosen` must be a string, found a number"),
        "{w:?}"
    );
}

// ------------------------------------------------------------------------------------
// OpenAI TL;DR comparisons

#[test]
fn tldr_real_comparisons() {
    let Some(p) = shared_data("tldr/comparisons_batch13.jsonl") else {
        return;
    };
    let (pairs, stats, w) = load_tldr(&p, OnMalformed::Abort).unwrap();
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(pairs.len(), 1097);
    assert_eq!(stats.rows, 1097);
    assert_eq!(stats.with_confidence, 1097);
    assert_eq!(stats.levels, [233, 315, 261, 288]);
    assert_eq!(stats.choice_disagrees, 0);
    let count = |s: f64| pairs.iter().filter(|p| p.strength == Some(s)).count();
    assert_eq!(
        [count(0.625), count(0.75), count(0.875), count(1.0)],
        [233, 315, 261, 288]
    );

    let p0 = &pairs[0];
    assert!(p0.prompt.starts_with(
        "SUBREDDIT: r/relationships\n\nTITLE: Unsure if new relationship will work out, need advice\n\nPOST: (I'm 15M she's 14F)"
    ));
    assert!(p0.prompt.ends_with("Aidan\n\nTL;DR:"));
    // choice 0, confidence 3 (level 2).
    assert!(p0
        .chosen
        .starts_with(" Started dating this girl 3 weeks ago"));
    assert!(p0
        .rejected
        .starts_with(" Dating a girl, she says she loves me"));
    assert_eq!(p0.strength, Some(0.75));
    assert!(p0.source.ends_with("comparisons_batch13.jsonl:1"));

    let Some(p) = shared_data("tldr/comparisons_edit_b2_eval_test.jsonl") else {
        return;
    };
    let (pairs, stats, w) = load_tldr(&p, OnMalformed::Abort).unwrap();
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(pairs.len(), 5);
    assert_eq!(stats.with_confidence, 5);
    assert_eq!(stats.levels, [0, 1, 4, 0]);
    assert_eq!(stats.choice_disagrees, 0);
}

#[test]
fn tldr_malformed_and_disagreement() {
    let row = |info: &str, choice: &str, extra: &str| {
        format!(
            "{{\"info\": {info}, \"summaries\": [{{\"text\": \" A\"}}, {{\"text\": \" B\"}}], \"choice\": {choice}, \"extra\": {extra}}}\n"
        )
    };
    let info = r#"{"post": "P", "title": "T", "subreddit": "s"}"#;
    let text = [
        row(info, "1", r#"{"confidence": 9}"#),
        row(info, "0", r#"{"confidence": 8}"#),
        row(info, "0", "{}"),
        row(info, "0", r#"{"confidence": 5}"#),
        row(r#"{"title": "T", "subreddit": "s"}"#, "0", "{}"),
        row(info, "2", "{}"),
        "{\"info\": {}, \"summaries\": [], \"choice\": 0}\n".to_string(),
    ]
    .concat();
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "t.jsonl", &text);
    let msg = err_text(load_tldr(&p, OnMalformed::Abort).unwrap_err());
    assert!(
        msg.contains("t.jsonl:4: `extra.confidence` must be an integer in 1..=9 other than 5"),
        "{msg}"
    );
    let (pairs, stats, w) = load_tldr(&p, OnMalformed::Skip).unwrap();
    assert_eq!(pairs.len(), 3);
    assert_eq!(pairs[0].prompt, tldr_prompt("s", "T", "P"));
    assert_eq!(
        pairs[0].prompt,
        "SUBREDDIT: r/s\n\nTITLE: T\n\nPOST: P\n\nTL;DR:"
    );
    assert_eq!(
        (pairs[0].chosen.as_str(), pairs[0].rejected.as_str()),
        (" B", " A")
    );
    assert_eq!(pairs[0].strength, Some(1.0));
    assert_eq!((pairs[1].chosen.as_str(), pairs[1].strength), (" A", None));
    assert_eq!(pairs[2].strength, None);
    assert_eq!(stats.rows, 3);
    assert_eq!(stats.with_confidence, 2);
    assert_eq!(stats.levels, [0, 0, 1, 1]);
    assert_eq!(stats.choice_disagrees, 1);
    let expect = [
        "t.jsonl:2: choice 0 disagrees with confidence 8",
        "t.jsonl:4: `extra.confidence` must be an integer",
        "t.jsonl:5: `info`: missing field `post`",
        "t.jsonl:6: field `choice` must be 0 or 1, found 2",
        "t.jsonl:7: `info`: missing field `subreddit`",
    ];
    assert_eq!(w.len(), expect.len(), "{w:?}");
    for (got, want) in w.iter().zip(expect) {
        assert!(got.contains(want), "{got:?} should contain {want:?}");
    }
}

// ------------------------------------------------------------------------------------
// PandaLM

#[test]
fn pandalm_real_testset() {
    let Some(p) = shared_data("pandalm/testset-v1.json") else {
        return;
    };
    let (pairs, stats, w) = load_pandalm(&p, OnMalformed::Abort).unwrap();
    // idx 157, 158, 159, 161, 162, 164 have a boolean `true` response.
    assert_eq!(stats.boolean_responses, 6);
    assert_eq!(w.len(), 6, "{w:?}");
    assert!(
        w[0].contains("testset-v1.json:1886: a response is a JSON boolean"),
        "{w:?}"
    );
    let p157 = pairs.iter().find(|p| p.source.ends_with(":1886")).unwrap();
    assert_eq!(
        (p157.chosen.as_str(), p157.rejected.as_str()),
        ("True", "True.")
    );
    assert_eq!(stats.rows, 999);
    assert_eq!(stats.votes, [326, 1255, 1416]);
    assert_eq!(stats.majority_response1, 422);
    assert_eq!(stats.majority_response2, 472);
    assert_eq!(stats.majority_tie, 105);
    assert_eq!(stats.no_majority, 0);
    assert_eq!(stats.unanimous, 879);
    assert!((stats.pairwise_agreement - (879.0 + 120.0 / 3.0) / 999.0).abs() < 1e-12);
    assert_eq!(pairs.len(), 894);
    let count = |s: f64| {
        pairs
            .iter()
            .filter(|p| (p.strength.unwrap() - s).abs() < 1e-12)
            .count()
    };
    assert_eq!(
        [count(1.0), count(2.5 / 3.0), count(2.0 / 3.0)],
        [794, 31, 69]
    );

    // idx 0: all three annotators prefer response2.
    let p0 = &pairs[0];
    assert!(p0
        .prompt
        .starts_with("The sentence you are given might be too wordy"));
    assert!(p0.prompt.ends_with(
        "eliminate unnecessary words.\n\nIf you have any questions about my rate or if you find it necessary to increase or decrease the scope for this project, please let me know."
    ));
    assert_eq!(p0.chosen, "If you have any questions, please let me know.");
    assert_eq!(
        p0.rejected,
        "If you have any questions about my rate, please let me know."
    );
    assert_eq!(p0.strength, Some(1.0));
    assert!(p0.source.ends_with("testset-v1.json:2"), "{}", p0.source);
    assert!(
        pairs[1].source.ends_with("testset-v1.json:14"),
        "{}",
        pairs[1].source
    );
}

#[test]
fn pandalm_votes_and_malformed() {
    let row = |a: &str, input: &str| {
        format!(
            "{{\"instruction\": \"I\", \"input\": {input}, \"response1\": \"r1\", \"response2\": \"r2\", {a}}}"
        )
    };
    let rows = [
        row(
            r#""annotator1": 1, "annotator2": 1, "annotator3": 0"#,
            r#""""#,
        ),
        row(
            r#""annotator1": 2, "annotator2": 1, "annotator3": 2"#,
            r#""x""#,
        ),
        row(
            r#""annotator1": 0, "annotator2": 0, "annotator3": 1"#,
            r#""""#,
        ),
        row(
            r#""annotator1": 0, "annotator2": 1, "annotator3": 2"#,
            r#""""#,
        ),
        row(
            r#""annotator1": 3, "annotator2": 1, "annotator3": 2"#,
            r#""""#,
        ),
        row(r#""annotator1": 1, "annotator2": 1"#, r#""""#),
    ];
    let text = format!("[\n{}\n]\n", rows.join(",\n"));
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "panda.json", &text);
    let msg = err_text(load_pandalm(&p, OnMalformed::Abort).unwrap_err());
    assert!(
        msg.contains("panda.json:6: field `annotator1` must be 0 (tie), 1 or 2, found 3"),
        "{msg}"
    );
    let (pairs, stats, w) = load_pandalm(&p, OnMalformed::Skip).unwrap();
    assert_eq!(w.len(), 2);
    assert!(
        w[1].contains("panda.json:7: missing field `annotator3`"),
        "{w:?}"
    );
    assert_eq!(stats.rows, 4);
    assert_eq!((stats.majority_response1, stats.majority_response2), (1, 1));
    assert_eq!(
        (stats.majority_tie, stats.no_majority, stats.unanimous),
        (1, 1, 0)
    );
    assert_eq!(stats.votes, [4, 5, 3]);
    assert_eq!(pairs.len(), 2);
    assert_eq!(
        (pairs[0].prompt.as_str(), pairs[0].chosen.as_str()),
        ("I", "r1")
    );
    assert!((pairs[0].strength.unwrap() - 2.5 / 3.0).abs() < 1e-12);
    assert_eq!(
        (pairs[1].prompt.as_str(), pairs[1].chosen.as_str()),
        ("I\n\nx", "r2")
    );
    assert!((pairs[1].strength.unwrap() - 2.0 / 3.0).abs() < 1e-12);
    assert!(pairs[1].source.ends_with("panda.json:3"));
}
