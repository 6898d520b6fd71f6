//! The self-preferring judge (OSP.md §1): the model reads a judge template with two responses
//! and its next-token logits for the two answer tokens give p_AB = σ(ℓA − ℓB). Judging both
//! orders removes a constant position bias:
//!   s(y1 ≻ y2 | x) = ½ [ p_AB(x, y1, y2) + (1 − p_AB(x, y2, y1)) ].
use crate::engine::{score, Engine};
use crate::model::{Llama, TokenBatch};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

/// Default template: ends exactly where the answer token comes.
pub const DEFAULT_TEMPLATE: &str = "Which response to the prompt is better?\n\nPrompt: {prompt}\n\nResponse A: {a}\n\nResponse B: {b}\n\nThe better response is Response";

/// Default user message of a chat judge (`judge.chat = true`): the task as a question; the
/// chat template's generation prompt follows, so the verdict is the first token of the
/// assistant's reply ("A" or "B", without a leading space).
pub const DEFAULT_CHAT_TEMPLATE: &str = "Which response to the prompt is better?\n\nPrompt: {prompt}\n\nResponse A: {a}\n\nResponse B: {b}\n\nAnswer with a single letter, A or B.";

/// Stands for the user message while the chat template is rendered once, to find the text
/// around it.
const CHAT_MARK: &str = "\u{1}osp-judge-message\u{1}";

/// Which weights judge during online training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JudgeModel {
    /// The current policy ("self-preferring").
    #[serde(rename = "self")]
    Current,
    /// The frozen starting model πref.
    Initial,
}

/// `[judge]`: how the model judges a pair.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JudgeConfig {
    /// Judge prompt with `{prompt}`, `{a}` and `{b}`; it must end where the answer comes.
    /// Default: see `DEFAULT_TEMPLATE`.
    pub template: String,
    /// Answer meaning "A is better"; must be a single token. Default " A".
    pub answer_a: String,
    /// Answer meaning "B is better"; must be a single token. Default " B".
    pub answer_b: String,
    /// Judge both orders and average (removes constant position bias). Default true.
    pub both_orders: bool,
    /// "self" (the current policy) or "initial" (πref). Default "self".
    pub model: JudgeModel,
    /// Judge prompts per forward pass. Default 16.
    pub batch_size: usize,
    /// Longest judge prompt in tokens (0: the model's limit); longer ones lose the start of
    /// the task prompt. Default 0.
    pub max_len: usize,
    /// Render the judge prompt as a chat: `template` filled in is the user message, the
    /// tokenizer's chat template wraps it with the generation prompt, and the verdict is the
    /// first token of the assistant's reply. A template and answers left at their plain
    /// defaults switch to `DEFAULT_CHAT_TEMPLATE` and "A"/"B". Off by default because the
    /// plain template works for every model, base or chat, and keeps existing runs and
    /// judge-training data unchanged; chat models were tuned on their template, so try it
    /// for them and compare `osp judge` accuracy on held-out pairs. Default false.
    pub chat: bool,
}

impl Default for JudgeConfig {
    fn default() -> Self {
        Self {
            template: DEFAULT_TEMPLATE.to_string(),
            answer_a: " A".into(),
            answer_b: " B".into(),
            both_orders: true,
            model: JudgeModel::Current,
            batch_size: 16,
            max_len: 0,
            chat: false,
        }
    }
}

/// A source of p_AB(x, a, b) for a batch of (prompt, response in A, response in B).
pub type PAbFn<'a> = dyn FnMut(&[(&str, &str, &str)]) -> Result<Vec<f64>> + 'a;

/// One judged pair.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Judgement {
    /// s(y1 ≻ y2): the debiased strength (or p_AB alone with single-order judging).
    pub strength: f64,
    /// p_AB(x, y1, y2): "A" with y1 in position A.
    pub p_forward: f64,
    /// p_AB(x, y2, y1), when both orders were judged.
    pub p_backward: Option<f64>,
}

impl Judgement {
    /// The two orders pick the same *position* (both A or both B): an inconsistent verdict.
    pub fn position_biased(&self) -> bool {
        self.p_backward
            .is_some_and(|pb| (self.p_forward > 0.5) == (pb > 0.5))
    }
}

/// A judge bound to a tokenizer: template and answer tokens checked once, at start-up.
pub struct Judge {
    pub cfg: JudgeConfig,
    answer_a: u32,
    answer_b: u32,
    bos: Option<u32>,
    /// `cfg.template`, inside the chat template's text when `cfg.chat`.
    full_template: String,
}

/// A judge template with `{prompt}`, `{a}` and `{b}` filled in.
pub fn render_template(template: &str, prompt: &str, a: &str, b: &str) -> String {
    // Fill {a}/{b} outside the prompt only, so that braces inside the task prompt are left alone.
    let (pre, post) = template.split_once("{prompt}").unwrap_or((template, ""));
    let fill = |s: &str| s.replace("{a}", a).replace("{b}", b);
    format!("{}{prompt}{}", fill(pre), fill(post))
}

impl Judge {
    pub fn new(mut cfg: JudgeConfig, tok: &Tokenizer) -> Result<Self> {
        let full_template = if cfg.chat {
            if cfg.template == DEFAULT_TEMPLATE {
                cfg.template = DEFAULT_CHAT_TEMPLATE.to_string();
            }
            if (cfg.answer_a.as_str(), cfg.answer_b.as_str()) == (" A", " B") {
                (cfg.answer_a, cfg.answer_b) = ("A".into(), "B".into());
            }
            chat_wrapped(&cfg.template, tok)?
        } else {
            cfg.template.clone()
        };
        for key in ["{prompt}", "{a}", "{b}"] {
            if !cfg.template.contains(key) {
                bail!("judge.template has no {key} placeholder");
            }
        }
        if cfg.batch_size == 0 {
            bail!("judge.batch_size must be at least 1");
        }
        let answer_a = tok.single_token_id(&cfg.answer_a).with_context(|| {
            format!(
                "judge.answer_a {:?} must be one token of this tokenizer",
                cfg.answer_a
            )
        })?;
        let answer_b = tok.single_token_id(&cfg.answer_b).with_context(|| {
            format!(
                "judge.answer_b {:?} must be one token of this tokenizer",
                cfg.answer_b
            )
        })?;
        if answer_a == answer_b {
            bail!("judge.answer_a and judge.answer_b are the same token ({answer_a})");
        }
        let judge = Self {
            cfg,
            answer_a,
            answer_b,
            bos: tok.sequence_bos(),
            full_template,
        };
        let bare = judge.protected_len(tok, "", "", "")?;
        if judge.cfg.max_len > 0 && bare >= judge.cfg.max_len {
            bail!(
                "judge.max_len = {} leaves no room for the responses: the template around them \
                 takes {bare} tokens without any",
                judge.cfg.max_len
            );
        }
        Ok(judge)
    }

    /// Tokens (with BOS) from the first response placeholder to the end of the judge prompt:
    /// what cutting an over-long prompt must never reach, or the judge would compare less
    /// than both responses.
    fn protected_len(&self, tok: &Tokenizer, prompt: &str, a: &str, b: &str) -> Result<usize> {
        let t = &self.full_template;
        let at = [t.find("{a}"), t.find("{b}")]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(0);
        let tail = &t[at..];
        let text = if tail.contains("{prompt}") {
            render_template(tail, prompt, a, b)
        } else {
            tail.replace("{a}", a).replace("{b}", b)
        };
        Ok(tok.encode(&text, false)?.len() + usize::from(self.bos.is_some()))
    }

    pub fn answer_ids(&self) -> (u32, u32) {
        (self.answer_a, self.answer_b)
    }

    /// The judge prompt's text for (x, a, b).
    pub fn render(&self, prompt: &str, a: &str, b: &str) -> String {
        render_template(&self.full_template, prompt, a, b)
    }

    /// Token ids of the judge prompt, cut from the left to `limit` tokens.
    pub fn encode(
        &self,
        tok: &Tokenizer,
        prompt: &str,
        a: &str,
        b: &str,
        limit: usize,
    ) -> Result<Vec<u32>> {
        let mut ids = tok.encode(&self.render(prompt, a, b), self.bos.is_some())?;
        let limit = if self.cfg.max_len > 0 {
            self.cfg.max_len.min(limit)
        } else {
            limit
        };
        if ids.len() > limit {
            let keep = self.protected_len(tok, prompt, a, b)?;
            if keep > limit {
                bail!(
                    "a judge prompt of {} tokens does not fit the {limit}-token limit (judge.max_len \
                     or the model's positions): the two responses and the template around them \
                     alone take {keep}; raise judge.max_len or shorten the responses",
                    ids.len()
                );
            }
            let cut = ids.len() - limit;
            ids.drain(..cut);
            if let (Some(bos), Some(first)) = (self.bos, ids.first_mut()) {
                *first = bos;
            }
        }
        Ok(ids)
    }

    /// p_AB for many judge prompts (already tokenized): one batched prefill per chunk of
    /// `batch_size` prompts that computes the LM head at the last position only (on the CPU,
    /// unpadded on the inference engine and only for the two answer tokens).
    pub fn p_ab(&self, model: &Llama, prompts: &[Vec<u32>]) -> Result<Vec<f64>> {
        if Engine::supports(model) {
            let answers = (self.answer_a, self.answer_b);
            return score::p_ab(&Engine::new(model)?, prompts, answers, self.cfg.batch_size);
        }
        let mut out = Vec::with_capacity(prompts.len());
        for chunk in prompts.chunks(self.cfg.batch_size) {
            let batch = TokenBatch::left_padded(chunk, model.device())?;
            let h = model.forward_hidden(&batch.ids, &batch.positions, &batch.bias, None)?;
            let last = h.narrow(1, batch.len - 1, 1)?.squeeze(1)?;
            let logits = model.logits(&last)?;
            let idx = Tensor::new(&[self.answer_a, self.answer_b], model.device())?;
            let two: Vec<Vec<f32>> = logits.index_select(&idx, D::Minus1)?.to_vec2()?;
            for row in two {
                let d = (row[0] - row[1]) as f64;
                out.push(1.0 / (1.0 + (-d).exp()));
            }
        }
        Ok(out)
    }

    /// Judges pairs (x, y1, y2) with the model; `model` should be a snapshot (no graph).
    pub fn judge(
        &self,
        model: &Llama,
        tok: &Tokenizer,
        pairs: &[(&str, &str, &str)],
    ) -> Result<Vec<Judgement>> {
        let limit = model.cfg.max_position_embeddings;
        self.judge_with(pairs, &mut |items| {
            let prompts = items
                .iter()
                .map(|(x, a, b)| self.encode(tok, x, a, b, limit))
                .collect::<Result<Vec<_>>>()?;
            self.p_ab(model, &prompts)
        })
    }

    /// Judges pairs with any source of p_AB(x, a, b) (the model, or a scripted judge in
    /// tests), in one call covering both orders.
    pub fn judge_with(
        &self,
        pairs: &[(&str, &str, &str)],
        p_ab: &mut PAbFn<'_>,
    ) -> Result<Vec<Judgement>> {
        let mut items: Vec<(&str, &str, &str)> = pairs.to_vec();
        if self.cfg.both_orders {
            items.extend(pairs.iter().map(|&(x, y1, y2)| (x, y2, y1)));
        }
        let p = p_ab(&items)?;
        if p.len() != items.len() {
            bail!(
                "judge returned {} probabilities for {} prompts",
                p.len(),
                items.len()
            );
        }
        let n = pairs.len();
        Ok((0..n)
            .map(|i| {
                let pf = p[i];
                let pb = self.cfg.both_orders.then(|| p[n + i]);
                Judgement {
                    strength: combine_orders(pf, pb),
                    p_forward: pf,
                    p_backward: pb,
                }
            })
            .collect())
    }
}

/// `template` as the user message of `tok`'s chat template, with the generation prompt: the
/// template is rendered once around a marker, and the text around it kept.
fn chat_wrapped(template: &str, tok: &Tokenizer) -> Result<String> {
    if !tok.has_chat_template() {
        bail!("judge.chat = true, but the tokenizer has no chat template");
    }
    let msg = [crate::tokenizer::ChatMessage::new("user", CHAT_MARK)];
    let text = tok
        .apply_chat_template(&msg, true)
        .context("judge.chat = true: rendering the chat template")?;
    let Some((pre, post)) = text.split_once(CHAT_MARK) else {
        bail!("judge.chat = true: the chat template does not show the user message verbatim");
    };
    for key in ["{prompt}", "{a}", "{b}"] {
        if pre.contains(key) || post.contains(key) {
            bail!("judge.chat = true: the chat template's own text contains {key}");
        }
    }
    Ok(format!("{pre}{template}{post}"))
}

/// s(y1 ≻ y2) = ½[p_AB(x, y1, y2) + 1 − p_AB(x, y2, y1)]; p_AB alone without the second order.
/// With p_AB = σ(d + b) for a quality gap d and a constant position bias b, this is
/// ½[σ(d+b) + σ(d−b)]: even in b, ½ exactly at d = 0, and above ½ iff d > 0.
pub fn combine_orders(p_forward: f64, p_backward: Option<f64>) -> f64 {
    match p_backward {
        Some(pb) => 0.5 * (p_forward + (1.0 - pb)),
        None => p_forward,
    }
}

/// How well a judge agrees with labelled pairs (chosen ≻ rejected).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JudgeReport {
    pub pairs: usize,
    /// Fraction of pairs where the judged strength favours the labelled winner (ties ½).
    pub accuracy: f64,
    /// Expected calibration error of the judged winner's confidence (10 bins).
    pub ece: f64,
    /// Fraction of pairs whose two orders pick the same position (both orders judged only).
    pub position_bias_rate: Option<f64>,
    /// Mean |s − ½|: how decisive the judge is.
    pub mean_abs_margin: f64,
    /// Spearman correlation of judged strength with the data's strength, where present.
    pub spearman_vs_data_strength: Option<f64>,
    /// The judged strengths s(chosen ≻ rejected), in data order.
    #[serde(skip)]
    pub strengths: Vec<f64>,
}

impl Judge {
    /// Judges labelled pairs (chosen ≻ rejected) and scores the judge; `model` should be a
    /// snapshot.
    pub fn evaluate(
        &self,
        model: &Llama,
        tok: &Tokenizer,
        pairs: &[crate::data::PreferencePair],
    ) -> Result<JudgeReport> {
        let items: Vec<(&str, &str, &str)> = pairs
            .iter()
            .map(|p| (p.prompt.as_str(), p.chosen.as_str(), p.rejected.as_str()))
            .collect();
        let js = self.judge(model, tok, &items)?;
        Ok(JudgeReport::from_judgements(
            pairs,
            &js,
            self.cfg.both_orders,
        ))
    }
}

impl JudgeReport {
    /// Scores judgements of labelled pairs (chosen ≻ rejected), in data order.
    pub fn from_judgements(
        pairs: &[crate::data::PreferencePair],
        js: &[Judgement],
        both_orders: bool,
    ) -> JudgeReport {
        let s: Vec<f64> = js.iter().map(|j| j.strength).collect();
        let position_bias_rate = if both_orders {
            let pf: Vec<f64> = js.iter().map(|j| j.p_forward).collect();
            let pb: Vec<f64> = js.iter().filter_map(|j| j.p_backward).collect();
            Some(crate::eval::position_bias_rate(&pf, &pb))
        } else {
            None
        };
        let (ours, theirs): (Vec<f64>, Vec<f64>) = pairs
            .iter()
            .zip(&s)
            .filter_map(|(p, &si)| p.strength.map(|h| (si, h)))
            .unzip();
        JudgeReport {
            pairs: pairs.len(),
            accuracy: crate::eval::accuracy(&s),
            ece: crate::eval::expected_calibration_error(&s, 10),
            position_bias_rate,
            mean_abs_margin: crate::eval::mean_decisiveness(&s),
            spearman_vs_data_strength: crate::eval::spearman(&ours, &theirs),
            strengths: s,
        }
    }
}
