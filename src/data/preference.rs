//! Preference pairs (for DPO-style training, preference augmentation and judge evaluation)
//! and prompt lists (for online sampling), from TRL's layouts and from three public data
//! sets: Anthropic HH-RLHF, OpenAI TL;DR comparisons and PandaLM.
//!
//! Every loader reads JSON Lines, a JSON array, or gzip of either, and reports problems as
//! `file:line: reason`, following [`OnMalformed`].

use std::path::Path;

use anyhow::Result;
use serde_json::{Map, Value};

use super::jsonl::{as_object, field, messages, open, str_field, type_name, OnMalformed};
use crate::tokenizer::{ChatMessage, Tokenizer};

/// One human (or judged) preference: `chosen` is preferred to `rejected` given `prompt`.
/// The responses are continuations of the prompt text, as a policy would generate them.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    /// P(chosen ≻ rejected) when the data say how sure the preference is (the soft label
    /// of OSP's SPCE loss); `None` for a plain binary label.
    pub strength: Option<f64>,
    /// `file:line` of the record.
    pub source: String,
}

/// A prompt to sample responses for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptRecord {
    pub prompt: String,
    /// `file:line` of the record.
    pub source: String,
}

/// How conversational records (lists of `{"role", "content"}` messages) become text.
///
/// `Template` uses the tokenizer's chat template, as TRL does: the prompt is rendered with
/// the generation prompt, and a response is what rendering prompt + response adds after
/// it (end-of-turn markers included); a template for which that is not a prefix makes the
/// record malformed. `Plain` needs no tokenizer: each message is `"{role}: {content}"`,
/// messages are joined by `"\n\n"`, and the prompt ends with `"\n\nassistant:"`, so a
/// single assistant response becomes `" {content}"` (the Anthropic HH layout, with the
/// roles as written in the data).
#[derive(Debug, Clone, Copy)]
pub enum ChatRender<'a> {
    Template(&'a Tokenizer),
    Plain,
}

impl<'a> ChatRender<'a> {
    /// The tokenizer's template when it has one, else `Plain`.
    pub fn for_tokenizer(tok: Option<&'a Tokenizer>) -> Self {
        match tok {
            Some(t) if t.has_chat_template() => Self::Template(t),
            _ => Self::Plain,
        }
    }

    /// The prompt text, ending where the assistant's response begins.
    pub fn prompt(&self, prompt: &[ChatMessage]) -> Result<String> {
        match self {
            Self::Template(tok) => tok.apply_chat_template(prompt, true),
            Self::Plain => Ok(plain_prompt(prompt)),
        }
    }

    /// The text that `response` adds after the rendered `prompt`.
    pub fn response(&self, prompt: &[ChatMessage], response: &[ChatMessage]) -> Result<String> {
        let all: Vec<ChatMessage> = prompt.iter().chain(response).cloned().collect();
        let (p, full) = match self {
            Self::Template(tok) => (
                tok.apply_chat_template(prompt, true)?,
                tok.apply_chat_template(&all, false)?,
            ),
            Self::Plain => (plain_prompt(prompt), plain_join(&all)),
        };
        match full.strip_prefix(&p) {
            Some(r) => Ok(r.to_string()),
            None => anyhow::bail!(
                "the rendered prompt is not a prefix of the rendered prompt + response \
                 (does the response start with an assistant message?)"
            ),
        }
    }
}

fn plain_join(msgs: &[ChatMessage]) -> String {
    msgs.iter()
        .map(|m| format!("{}: {}", m.role, m.content))
        .collect::<Vec<_>>()
        .join("\n\n")
}

fn plain_prompt(msgs: &[ChatMessage]) -> String {
    if msgs.is_empty() {
        "assistant:".to_string()
    } else {
        format!("{}\n\nassistant:", plain_join(msgs))
    }
}

type Reason = String;

/// Prompt-only records (`{"prompt": str}` or `{"prompt": [messages]}`, other fields
/// ignored), the prompts for online sampling.
pub fn load_prompts(
    path: &Path,
    render: ChatRender<'_>,
    on_malformed: OnMalformed,
) -> Result<(Vec<PromptRecord>, Vec<String>)> {
    let (records, mut diag) = open(path, on_malformed)?;
    let mut out = Vec::with_capacity(records.len());
    for rec in &records {
        let prompt = diag.record(rec.line, || {
            as_object(&rec.value)
                .and_then(|obj| field(obj, "prompt"))
                .and_then(|p| match p {
                    Value::String(s) => Ok(s.clone()),
                    Value::Array(_) => render
                        .prompt(&messages(p, "prompt")?)
                        .map_err(|e| format!("{e:#}")),
                    other => Err(format!(
                        "field `prompt` must be a string or a list of messages, found {}",
                        type_name(other)
                    )),
                })
        })?;
        if let Some(prompt) = prompt {
            out.push(PromptRecord {
                prompt,
                source: diag.source(rec.line),
            });
        }
    }
    Ok((out, diag.finish()?))
}

/// TRL's explicit-prompt preference layout: `{"prompt", "chosen", "rejected"}`, all three
/// strings or all three message lists (rendered with `render`), and an optional
/// `"strength"` in [0, 1] (the probability that chosen is preferred; null = unknown).
///
/// Implicit-prompt records (`{"chosen", "rejected"}` transcripts) are rejected here: use
/// [`load_hh`] for those.
pub fn load_preferences(
    path: &Path,
    render: ChatRender<'_>,
    on_malformed: OnMalformed,
) -> Result<(Vec<PreferencePair>, Vec<String>)> {
    let (records, mut diag) = open(path, on_malformed)?;
    let mut out = Vec::with_capacity(records.len());
    for rec in &records {
        let pair = diag.record(rec.line, || {
            as_object(&rec.value).and_then(|obj| trl_pair(obj, render))
        })?;
        if let Some((prompt, chosen, rejected, strength)) = pair {
            out.push(PreferencePair {
                prompt,
                chosen,
                rejected,
                strength,
                source: diag.source(rec.line),
            });
        }
    }
    Ok((out, diag.finish()?))
}

type Pair = (String, String, String, Option<f64>);

fn trl_pair(obj: &Map<String, Value>, render: ChatRender<'_>) -> std::result::Result<Pair, Reason> {
    if !obj.contains_key("prompt") && obj.contains_key("chosen") {
        return Err(
            "missing field `prompt` (for implicit-prompt {chosen, rejected} \
                    transcripts use the HH loader)"
                .into(),
        );
    }
    let (p, c, r) = (
        field(obj, "prompt")?,
        field(obj, "chosen")?,
        field(obj, "rejected")?,
    );
    let strength = match obj.get("strength") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_f64() {
            Some(s) if (0.0..=1.0).contains(&s) => Some(s),
            _ => return Err(format!("field `strength` must be in [0, 1], found {n}")),
        },
        Some(other) => {
            return Err(format!(
                "field `strength` must be a number in [0, 1], found {}",
                type_name(other)
            ))
        }
    };
    let (prompt, chosen, rejected) = match (p, c, r) {
        (Value::String(p), Value::String(c), Value::String(r)) => (p.clone(), c.clone(), r.clone()),
        (Value::Array(_), Value::Array(_), Value::Array(_)) => {
            let pm = messages(p, "prompt")?;
            let side = |v: &Value, name: &str| -> std::result::Result<String, Reason> {
                render
                    .response(&pm, &messages(v, name)?)
                    .map_err(|e| format!("rendering `{name}`: {e:#}"))
            };
            let prompt = render.prompt(&pm).map_err(|e| format!("{e:#}"))?;
            (prompt, side(c, "chosen")?, side(r, "rejected")?)
        }
        _ => {
            return Err(format!(
                "`prompt`, `chosen` and `rejected` must all be strings or all be message \
                 lists, found {}, {} and {}",
                type_name(p),
                type_name(c),
                type_name(r)
            ))
        }
    };
    Ok((prompt, chosen, rejected, strength))
}

// ---------------------------------------------------------------------------------------
// Anthropic HH-RLHF

/// Where HH transcripts are split into prompt and response.
pub const HH_ASSISTANT: &str = "\n\nAssistant:";

/// Anthropic HH-RLHF (`{"chosen", "rejected"}`, each a full `\n\nHuman: …\n\nAssistant: …`
/// transcript). Each side is split at its last `"\n\nAssistant:"`: the prompt runs up to
/// and including it, the response is the rest (usually starting with a space). Both sides
/// must give the same prompt; a pair that does not (in the public test splits, a response
/// that itself contains `"\n\nAssistant:"`, or an empty last turn) is malformed. The labels
/// are binary, so `strength` is `None`.
pub fn load_hh(
    path: &Path,
    on_malformed: OnMalformed,
) -> Result<(Vec<PreferencePair>, Vec<String>)> {
    let (records, mut diag) = open(path, on_malformed)?;
    let mut out = Vec::with_capacity(records.len());
    for rec in &records {
        let pair = diag.record(rec.line, || as_object(&rec.value).and_then(hh_pair))?;
        if let Some((prompt, chosen, rejected)) = pair {
            out.push(PreferencePair {
                prompt,
                chosen,
                rejected,
                strength: None,
                source: diag.source(rec.line),
            });
        }
    }
    Ok((out, diag.finish()?))
}

fn hh_pair(obj: &Map<String, Value>) -> std::result::Result<(String, String, String), Reason> {
    let split = |name: &str| -> std::result::Result<(&str, &str), Reason> {
        let t = str_field(obj, name)?;
        let i = t
            .rfind(HH_ASSISTANT)
            .ok_or_else(|| format!("`{name}` has no {HH_ASSISTANT:?} turn"))?;
        Ok(t.split_at(i + HH_ASSISTANT.len()))
    };
    let (pc, c) = split("chosen")?;
    let (pr, r) = split("rejected")?;
    if pc != pr {
        let at = pc
            .char_indices()
            .zip(pr.chars())
            .find(|((_, a), b)| a != b)
            .map_or(pc.len().min(pr.len()), |((i, _), _)| i);
        return Err(format!(
            "chosen and rejected do not share the prompt before their last {HH_ASSISTANT:?} \
             (prompts of {} and {} bytes, differing from byte {at})",
            pc.len(),
            pr.len()
        ));
    }
    Ok((pc.to_string(), c.to_string(), r.to_string()))
}

// ---------------------------------------------------------------------------------------
// OpenAI TL;DR comparisons

/// What [`load_tldr`] found, beyond the pairs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TldrStats {
    /// Records read and used (malformed ones excluded).
    pub rows: usize,
    /// Rows with an `extra.confidence`.
    pub with_confidence: usize,
    /// `levels[k - 1]` = rows with confidence level |confidence − 5| = k, k in 1..=4.
    pub levels: [usize; 4],
    /// Rows whose `choice` contradicts the side of their confidence (their strength is
    /// left `None`).
    pub choice_disagrees: usize,
}

/// The TL;DR query format of OpenAI's summarize-from-feedback (and of most re-implementations
/// since): `"SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"`. The
/// summaries in the data start with a space, so they continue it directly.
pub fn tldr_prompt(subreddit: &str, title: &str, post: &str) -> String {
    format!("SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:")
}

/// OpenAI summarize-from-feedback comparisons (`{info: {post, title, subreddit, …},
/// summaries: [{text, …}, {text, …}], choice, extra: {confidence}}`); the prompt is
/// [`tldr_prompt`], chosen is `summaries[choice].text`, rejected the other summary.
///
/// Confidence is on a 1–9 scale (5 unused): 1–4 favour summary 0, 6–9 summary 1, 1 and 9
/// most strongly. Level k = |confidence − 5| ∈ 1..4 maps linearly onto
/// strength = 0.5 + 0.125·k (0.625, 0.75, 0.875, 1.0), so that the surest label is a hard
/// preference and the weakest stays near a tie. A missing or null confidence gives
/// `strength: None`; 5 or a value outside 1..9 is malformed; a confidence on the other
/// side from `choice` is counted and warned about, and gives `None`.
pub fn load_tldr(
    path: &Path,
    on_malformed: OnMalformed,
) -> Result<(Vec<PreferencePair>, TldrStats, Vec<String>)> {
    let (records, mut diag) = open(path, on_malformed)?;
    let mut stats = TldrStats::default();
    let mut out = Vec::with_capacity(records.len());
    for rec in &records {
        let Some(row) = diag.record(rec.line, || as_object(&rec.value).and_then(tldr_row))? else {
            continue;
        };
        stats.rows += 1;
        let mut strength = None;
        if let Some(conf) = row.confidence {
            stats.with_confidence += 1;
            let level = conf.abs_diff(5) as usize;
            stats.levels[level - 1] += 1;
            let side = usize::from(conf > 5);
            if side == row.choice {
                strength = Some(0.5 + 0.125 * level as f64);
            } else {
                stats.choice_disagrees += 1;
                diag.warn(
                    rec.line,
                    format_args!(
                        "choice {} disagrees with confidence {conf} (which favours summary {side}); strength left unknown",
                        row.choice
                    ),
                );
            }
        }
        let [s0, s1] = row.summaries;
        let (chosen, rejected) = if row.choice == 0 { (s0, s1) } else { (s1, s0) };
        out.push(PreferencePair {
            prompt: row.prompt,
            chosen,
            rejected,
            strength,
            source: diag.source(rec.line),
        });
    }
    Ok((out, stats, diag.finish()?))
}

struct TldrRow {
    prompt: String,
    summaries: [String; 2],
    choice: usize,
    confidence: Option<u64>,
}

fn tldr_row(obj: &Map<String, Value>) -> std::result::Result<TldrRow, Reason> {
    let info = as_object(field(obj, "info")?).map_err(|e| format!("`info`: {e}"))?;
    let info_str = |k: &str| str_field(info, k).map_err(|e| format!("`info`: {e}"));
    let prompt = tldr_prompt(
        info_str("subreddit")?,
        info_str("title")?,
        info_str("post")?,
    );
    let sums = field(obj, "summaries")?;
    let sums = match sums.as_array() {
        Some(a) if a.len() == 2 => a,
        _ => {
            return Err(format!(
                "field `summaries` must be a list of 2 summaries, found {}",
                match sums.as_array() {
                    Some(a) => format!("{} of them", a.len()),
                    None => type_name(sums).to_string(),
                }
            ))
        }
    };
    let text = |i: usize| -> std::result::Result<String, Reason> {
        let s = as_object(&sums[i]).map_err(|e| format!("`summaries[{i}]`: {e}"))?;
        str_field(s, "text")
            .map(str::to_string)
            .map_err(|e| format!("`summaries[{i}]`: {e}"))
    };
    let summaries = [text(0)?, text(1)?];
    let choice = match field(obj, "choice")?.as_u64() {
        Some(c @ (0 | 1)) => c as usize,
        _ => {
            return Err(format!(
                "field `choice` must be 0 or 1, found {}",
                obj["choice"]
            ))
        }
    };
    let confidence = match obj.get("extra").and_then(|e| e.get("confidence")) {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(c @ (1..=4 | 6..=9)) => Some(c),
            _ => {
                return Err(format!(
                    "`extra.confidence` must be an integer in 1..=9 other than 5, found {v}"
                ))
            }
        },
    };
    Ok(TldrRow {
        prompt,
        summaries,
        choice,
        confidence,
    })
}

// ---------------------------------------------------------------------------------------
// PandaLM

/// What [`load_pandalm`] found: how the three annotators voted and agreed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PandaLmStats {
    /// Records read and used (malformed ones excluded).
    pub rows: usize,
    /// Votes over all rows and annotators: `[tie, response1, response2]`.
    pub votes: [usize; 3],
    /// Rows whose majority (2 or 3 of 3) prefers response 1 / response 2: the pairs.
    pub majority_response1: usize,
    pub majority_response2: usize,
    /// Rows whose majority says tie (no pair is made).
    pub majority_tie: usize,
    /// Rows where all three annotators differ (no pair is made).
    pub no_majority: usize,
    /// Rows where all three annotators agree.
    pub unanimous: usize,
    /// Responses stored as JSON booleans (6 in the public test set), read as the text
    /// `"True"` / `"False"`, each row with a warning.
    pub boolean_responses: usize,
    /// Mean over rows of the fraction of the 3 annotator pairs that agree (1 when
    /// unanimous, 1/3 for a 2–1 split, 0 when all differ).
    pub pairwise_agreement: f64,
}

/// PandaLM's human test set (a JSON array of `{instruction, input, response1, response2,
/// annotator1, annotator2, annotator3, …}`, each annotator 0 = tie, 1 or 2 = that response
/// is better). The prompt is `instruction`, plus `"\n\n" + input` when the input is not
/// empty.
///
/// A pair is made when a majority (at least 2 of 3) prefers one response; its strength is
/// the share of annotators preferring the winner with each tie vote counting half:
/// (winner votes + ½·tie votes) / 3, i.e. 1, 5/6 or 2/3. Rows with a tie majority or no
/// majority only enter the stats. A response stored as a JSON boolean becomes the text
/// `"True"` / `"False"` (see [`PandaLmStats::boolean_responses`]).
pub fn load_pandalm(
    path: &Path,
    on_malformed: OnMalformed,
) -> Result<(Vec<PreferencePair>, PandaLmStats, Vec<String>)> {
    let (records, mut diag) = open(path, on_malformed)?;
    let mut stats = PandaLmStats::default();
    let mut agreement_sum = 0.0;
    let mut out = Vec::new();
    for rec in &records {
        let Some(row) = diag.record(rec.line, || as_object(&rec.value).and_then(pandalm_row))?
        else {
            continue;
        };
        stats.rows += 1;
        if row.boolean_responses > 0 {
            stats.boolean_responses += row.boolean_responses;
            diag.warn(
                rec.line,
                "a response is a JSON boolean, read as the text \"True\"/\"False\"",
            );
        }
        let mut counts = [0usize; 3];
        for &v in &row.votes {
            counts[v] += 1;
            stats.votes[v] += 1;
        }
        let agreeing_pairs: usize = counts.iter().map(|&c| c * c.saturating_sub(1) / 2).sum();
        agreement_sum += agreeing_pairs as f64 / 3.0;
        if counts.contains(&3) {
            stats.unanimous += 1;
        }
        let Some(winner) = (0..3).find(|&l| counts[l] >= 2) else {
            stats.no_majority += 1;
            continue;
        };
        let (chosen, rejected) = match winner {
            1 => {
                stats.majority_response1 += 1;
                (row.response1, row.response2)
            }
            2 => {
                stats.majority_response2 += 1;
                (row.response2, row.response1)
            }
            _ => {
                stats.majority_tie += 1;
                continue;
            }
        };
        let strength = (counts[winner] as f64 + 0.5 * counts[0] as f64) / 3.0;
        out.push(PreferencePair {
            prompt: row.prompt,
            chosen,
            rejected,
            strength: Some(strength),
            source: diag.source(rec.line),
        });
    }
    if stats.rows > 0 {
        stats.pairwise_agreement = agreement_sum / stats.rows as f64;
    }
    Ok((out, stats, diag.finish()?))
}

struct PandaLmRow {
    prompt: String,
    response1: String,
    response2: String,
    votes: [usize; 3],
    boolean_responses: usize,
}

fn pandalm_row(obj: &Map<String, Value>) -> std::result::Result<PandaLmRow, Reason> {
    let instruction = str_field(obj, "instruction")?;
    let input = match obj.get("input") {
        None | Some(Value::Null) => "",
        Some(_) => str_field(obj, "input")?,
    };
    let prompt = if input.is_empty() {
        instruction.to_string()
    } else {
        format!("{instruction}\n\n{input}")
    };
    let vote = |k: &str| -> std::result::Result<usize, Reason> {
        let v = field(obj, k)?;
        match v.as_u64() {
            Some(x @ 0..=2) => Ok(x as usize),
            _ => Err(format!("field `{k}` must be 0 (tie), 1 or 2, found {v}")),
        }
    };
    // A few responses of the public file are JSON booleans (a model answering "True" was
    // parsed as a value somewhere upstream); they are read back as Python spelled them.
    let mut boolean_responses = 0;
    let mut response = |k: &str| -> std::result::Result<String, Reason> {
        match field(obj, k)? {
            Value::Bool(b) => {
                boolean_responses += 1;
                Ok(if *b { "True" } else { "False" }.to_string())
            }
            _ => str_field(obj, k).map(str::to_string),
        }
    };
    let (response1, response2) = (response("response1")?, response("response2")?);
    Ok(PandaLmRow {
        prompt,
        response1,
        response2,
        boolean_responses,
        votes: [
            vote("annotator1")?,
            vote("annotator2")?,
            vote("annotator3")?,
        ],
    })
}
