//! Supervised fine-tuning examples in TRL's dataset formats, tokenized with a loss mask.
//!
//! Formats, decided per record by its fields:
//! - `{"prompt": str, "completion": str}`: `encode(prompt, add_bos) ++ encode(completion)
//!   ++ [eos]`; the completion and the EOS are trained. The EOS (the tokenizer's first
//!   EOS id) is appended when the tokenizer has one, so the model learns to stop.
//! - `{"text": str}`: `encode(text, add_bos) ++ [eos]`; every token is trained.
//! - `{"messages": [{"role", "content"}, ...]}`: rendered with the chat template; the
//!   tokens of every `assistant` turn are trained (what the template emits for that turn
//!   after the generation prompt, end-of-turn marker included), nothing else.
//! - `{"prompt": [messages], "completion": [messages]}`: the prompt rendered with the
//!   generation prompt, the whole conversation rendered without; everything after the
//!   prompt is trained.
//!
//! Chat renders are encoded without adding BOS: templates write the BOS text themselves.

use std::path::Path;

use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::{Map, Value};

use super::jsonl::{as_object, messages, open, type_name, Diagnostics, OnMalformed, Record};
use crate::tokenizer::{ChatMessage, Tokenizer};

/// One tokenized training example.
///
/// `loss_mask[t]` says whether token `t` is a training target (predicted from the tokens
/// before it). Position 0 has nothing before it, so it is never a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedExample {
    pub ids: Vec<u32>,
    pub loss_mask: Vec<bool>,
    /// `file:line` of the record, for error messages and data audits.
    pub source: String,
}

impl TokenizedExample {
    /// Number of trained tokens.
    pub fn trained_tokens(&self) -> usize {
        self.loss_mask.iter().filter(|&&m| m).count()
    }
}

/// Load and tokenize an SFT file (JSON Lines, JSON array, or gzip of either; see the
/// module docs for the formats).
///
/// Examples longer than `max_len` tokens keep their first `max_len` tokens, with one
/// warning each (`file:line: truncated ...`); an example left with no trained token
/// (truncated before its response, or a conversation with no assistant turn) is dropped
/// with a warning. Malformed records follow `on_malformed`. A conversational record with
/// a tokenizer that has no chat template is always an error.
pub fn load_sft(
    path: &Path,
    tok: &Tokenizer,
    max_len: usize,
    on_malformed: OnMalformed,
) -> Result<(Vec<TokenizedExample>, Vec<String>)> {
    if max_len == 0 {
        bail!("{}: max_len must be at least 1", path.display());
    }
    let (records, mut diag) = open(path, on_malformed)?;
    let mut out = Vec::with_capacity(records.len());
    for rec in &records {
        diag.reached(rec.line)?;
        let (mut ids, mut loss_mask) = match tokenize_record(rec, tok, &diag)? {
            Ok(x) => x,
            Err(reason) => {
                diag.malformed(rec.line, reason)?;
                continue;
            }
        };
        if let Some(m) = loss_mask.first_mut() {
            *m = false;
        }
        if ids.len() > max_len {
            diag.warn(
                rec.line,
                format_args!("truncated from {} to {max_len} tokens", ids.len()),
            );
            ids.truncate(max_len);
            loss_mask.truncate(max_len);
        }
        if !loss_mask.contains(&true) {
            diag.warn(rec.line, "skipped: no trained tokens");
            continue;
        }
        out.push(TokenizedExample {
            ids,
            loss_mask,
            source: diag.source(rec.line),
        });
    }
    Ok((out, diag.finish()?))
}

type Tokens = (Vec<u32>, Vec<bool>);

/// Outer error: fatal (no chat template). Inner error: the record is malformed.
fn tokenize_record(
    rec: &Record,
    tok: &Tokenizer,
    diag: &Diagnostics,
) -> Result<std::result::Result<Tokens, String>> {
    let obj = match as_object(&rec.value) {
        Ok(o) => o,
        Err(e) => return Ok(Err(e)),
    };
    // Only well-formed conversational records need the template; a record with a wrongly
    // typed field (`{"prompt": 123, "completion": [...]}`) is malformed, and is reported so.
    let conversational = matches!(obj.get("messages"), Some(Value::Array(_)))
        || matches!(
            (obj.get("prompt"), obj.get("completion")),
            (Some(Value::Array(_)), Some(Value::Array(_)))
        );
    if conversational && !tok.has_chat_template() {
        // The tokenizer's own error names the tokenizer's files.
        let why = tok
            .apply_chat_template(&[], false)
            .err()
            .map_or_else(|| "no chat template".to_string(), |e| format!("{e:#}"));
        bail!(
            "{}: a conversational record needs the tokenizer's chat template: {why}",
            diag.source(rec.line)
        );
    }
    Ok(tokenize_object(obj, tok))
}

fn tokenize_object(
    obj: &Map<String, Value>,
    tok: &Tokenizer,
) -> std::result::Result<Tokens, String> {
    let enc = |text: &str, bos: bool| tok.encode(text, bos).map_err(|e| format!("{e:#}"));
    let eos: Vec<u32> = tok.eos_ids().first().copied().into_iter().collect();
    if let Some(m) = obj.get("messages") {
        return conversation(&messages(m, "messages")?, tok);
    }
    match (obj.get("prompt"), obj.get("completion"), obj.get("text")) {
        (Some(Value::String(p)), Some(Value::String(c)), _) => {
            let mut ids = enc(p, true)?;
            let n_prompt = ids.len();
            ids.extend(enc(c, false)?);
            ids.extend(&eos);
            let mask = (0..ids.len()).map(|i| i >= n_prompt).collect();
            Ok((ids, mask))
        }
        (Some(p @ Value::Array(_)), Some(c @ Value::Array(_)), _) => {
            prompt_completion(&messages(p, "prompt")?, &messages(c, "completion")?, tok)
        }
        (Some(p), Some(c), _) => Err(format!(
            "`prompt` and `completion` must both be strings or both be message lists, found {} and {}",
            type_name(p),
            type_name(c)
        )),
        (Some(_), None, _) => Err("missing field `completion`".into()),
        (None, Some(_), _) => Err("missing field `prompt`".into()),
        (None, None, Some(Value::String(t))) => {
            let mut ids = enc(t, true)?;
            ids.extend(&eos);
            let mask = vec![true; ids.len()];
            Ok((ids, mask))
        }
        (None, None, Some(t)) => Err(format!(
            "field `text` must be a string, found {}",
            type_name(t)
        )),
        (None, None, None) => Err(
            "expected SFT fields {prompt, completion}, {text} or {messages}; found none".into(),
        ),
    }
}

fn render(
    tok: &Tokenizer,
    msgs: &[ChatMessage],
    gen_prompt: bool,
) -> std::result::Result<Vec<u32>, String> {
    let text = tok
        .apply_chat_template(msgs, gen_prompt)
        .map_err(|e| format!("{e:#}"))?;
    tok.encode(&text, false).map_err(|e| format!("{e:#}"))
}

/// Mark assistant turns by rendering growing prefixes: turn `i` is the tokens between
/// `render(msgs[..i], gen prompt)` and `render(msgs[..=i])`, which must both be token
/// prefixes of the full render.
fn conversation(msgs: &[ChatMessage], tok: &Tokenizer) -> std::result::Result<Tokens, String> {
    let ids = render(tok, msgs, false)?;
    let mut mask = vec![false; ids.len()];
    for (i, m) in msgs.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = render(tok, &msgs[..i], true)?;
        let upto = if i + 1 == msgs.len() {
            ids.clone()
        } else {
            render(tok, &msgs[..=i], false)?
        };
        if !(before.len() <= upto.len() && ids.starts_with(&before) && ids.starts_with(&upto)) {
            return Err(format!(
                "the chat template is not prefix-stable at messages[{i}] (the tokens of the \
                 conversation up to that turn are not a prefix of the whole conversation's), \
                 so the assistant tokens cannot be located"
            ));
        }
        mask[before.len()..upto.len()].fill(true);
    }
    Ok((ids, mask))
}

fn prompt_completion(
    prompt: &[ChatMessage],
    completion: &[ChatMessage],
    tok: &Tokenizer,
) -> std::result::Result<Tokens, String> {
    let before = render(tok, prompt, true)?;
    let all: Vec<ChatMessage> = prompt.iter().chain(completion).cloned().collect();
    let ids = render(tok, &all, false)?;
    if !ids.starts_with(&before) {
        return Err(
            "the chat template is not prefix-stable: the tokens of the prompt (with \
                    the generation prompt) are not a prefix of the whole conversation's"
                .into(),
        );
    }
    let mask = (0..ids.len()).map(|i| i >= before.len()).collect();
    Ok((ids, mask))
}

/// Split `items` into (train, eval), deterministically from `seed`: a seeded shuffle picks
/// `round(eval_fraction · n)` items for eval; both parts keep the input order.
///
/// A fraction in (0, 1) leaves at least one item on each side when there are two or
/// more; a fraction ≤ 0 (or NaN) gives no eval items, ≥ 1 gives all of them.
pub fn split_eval<T>(items: Vec<T>, eval_fraction: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    let n = items.len();
    let frac = if eval_fraction.is_nan() {
        0.0
    } else {
        eval_fraction.clamp(0.0, 1.0)
    };
    let mut n_eval = (frac * n as f64).round() as usize;
    if n >= 2 && frac > 0.0 && frac < 1.0 {
        n_eval = n_eval.clamp(1, n - 1);
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    let mut is_eval = vec![false; n];
    for &i in &order[..n_eval] {
        is_eval[i] = true;
    }
    let (mut train, mut eval) = (Vec::with_capacity(n - n_eval), Vec::with_capacity(n_eval));
    for (item, e) in items.into_iter().zip(is_eval) {
        if e {
            eval.push(item);
        } else {
            train.push(item);
        }
    }
    (train, eval)
}
