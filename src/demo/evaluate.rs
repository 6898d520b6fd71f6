//! Oracle evaluation of a policy on a task: win rates against the SFT model (temperature 1 and
//! greedy), against the data's chosen responses, mean oracle reward, KL to πref, response
//! length, and how well the policy judges its own samples.
use super::tasks::Task;
use crate::data::PreferencePair;
use crate::judge::{Judge, JudgeReport};
use crate::model::Llama;
use crate::sample::{generate, Generation, Request, SamplingParams};
use crate::tokenizer::Tokenizer;
use crate::train::pairs::join;
use anyhow::Result;
use serde::Serialize;

/// Prompts tokenized once for a policy and its comparisons.
pub struct EvalSet {
    pub prompts: Vec<String>,
    pub ids: Vec<Vec<u32>>,
}

impl EvalSet {
    pub fn new(tok: &Tokenizer, prompts: &[String]) -> Result<Self> {
        let ids = prompts
            .iter()
            .map(|p| tok.encode(p, true))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            prompts: prompts.to_vec(),
            ids,
        })
    }

    /// One response per prompt; sample i uses seed `seed + i`, so two policies sampled with
    /// the same seed face the same random stream.
    pub fn sample(
        &self,
        model: &Llama,
        tok: &Tokenizer,
        temperature: f64,
        max_new: usize,
        seed: u64,
    ) -> Result<Vec<Generation>> {
        let params = SamplingParams {
            temperature,
            max_new_tokens: max_new,
            ..Default::default()
        };
        let reqs: Vec<Request> = self
            .ids
            .iter()
            .enumerate()
            .map(|(i, p)| Request {
                prompt: p.clone(),
                seed: seed + i as u64,
            })
            .collect();
        generate(model, tok, &reqs, &params)
    }
}

/// Oracle outcomes of `a` against `b` on each prompt: 1 win, 0 loss, ½ tie.
pub fn outcomes(task: &dyn Task, prompts: &[String], a: &[String], b: &[String]) -> Vec<f64> {
    prompts
        .iter()
        .zip(a.iter().zip(b))
        .map(|(p, (x, y))| {
            let (rx, ry) = (task.reward(p, x), task.reward(p, y));
            if (rx - ry).abs() < 1e-9 {
                0.5
            } else if rx > ry {
                1.0
            } else {
                0.0
            }
        })
        .collect()
}

pub fn texts(g: &[Generation]) -> Vec<String> {
    g.iter().map(|g| g.text.trim().to_string()).collect()
}

/// Mean over samples of log πθ(y|x) − log πref(y|x) (a Monte-Carlo KL estimate).
pub fn kl_estimate(
    policy: &Llama,
    reference: &Llama,
    set: &EvalSet,
    gens: &[Generation],
) -> Result<f64> {
    let mut seqs = vec![];
    let mut masks = vec![];
    for (p, g) in set.ids.iter().zip(gens) {
        if g.tokens.is_empty() {
            continue;
        }
        let (s, m) = join(p, &g.tokens);
        seqs.push(s);
        masks.push(m);
    }
    if seqs.is_empty() {
        return Ok(0.0);
    }
    let mut total = 0f64;
    for (s, m) in seqs.chunks(32).zip(masks.chunks(32)) {
        let a = policy.sequence_logps(s, m)?;
        let b = reference.sequence_logps(s, m)?;
        total += (a - b)?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(total / seqs.len() as f64)
}

/// Judge quality summary as reported.
#[derive(Debug, Clone, Serialize)]
pub struct JudgeSummary {
    pub accuracy: f64,
    pub ece: f64,
    pub spearman_vs_oracle: Option<f64>,
    pub position_bias_rate: Option<f64>,
    pub pairs: usize,
}

impl From<&JudgeReport> for JudgeSummary {
    fn from(r: &JudgeReport) -> Self {
        Self {
            accuracy: r.accuracy,
            ece: r.ece,
            spearman_vs_oracle: r.spearman_vs_data_strength,
            position_bias_rate: r.position_bias_rate,
            pairs: r.pairs,
        }
    }
}

/// Pairs oriented by the oracle (the better response is `chosen`; ties dropped) with the
/// oracle's strength σ(Δr / temperature), for scoring a judge against the oracle.
pub fn oracle_pairs(
    task: &dyn Task,
    triples: &[(String, String, String)],
    temperature: f64,
) -> Vec<PreferencePair> {
    triples
        .iter()
        .filter_map(|(p, a, b)| {
            let (ra, rb) = (task.reward(p, a), task.reward(p, b));
            if (ra - rb).abs() < 1e-9 {
                return None;
            }
            let (c, r, gap) = if ra > rb {
                (a, b, ra - rb)
            } else {
                (b, a, rb - ra)
            };
            Some(PreferencePair {
                prompt: p.clone(),
                chosen: c.clone(),
                rejected: r.clone(),
                strength: Some(1.0 / (1.0 + (-gap / temperature).exp())),
                source: "oracle".into(),
            })
        })
        .collect()
}

/// How well `model` judges pairs of its own samples (two per prompt), against the oracle.
pub fn judge_own_samples(
    task: &dyn Task,
    judge: &Judge,
    model: &Llama,
    tok: &Tokenizer,
    set: &EvalSet,
    max_new: usize,
    seed: u64,
) -> Result<JudgeSummary> {
    let a = texts(&set.sample(model, tok, 1.0, max_new, seed)?);
    let b = texts(&set.sample(model, tok, 1.0, max_new, seed + 1_000_003)?);
    let triples: Vec<(String, String, String)> = set
        .prompts
        .iter()
        .zip(a.into_iter().zip(b))
        .map(|(p, (x, y))| (p.clone(), x, y))
        .collect();
    let pairs = oracle_pairs(task, &triples, super::tasks::HUMAN_TEMPERATURE);
    if pairs.is_empty() {
        return Ok(JudgeSummary {
            accuracy: f64::NAN,
            ece: f64::NAN,
            spearman_vs_oracle: None,
            position_bias_rate: None,
            pairs: 0,
        });
    }
    Ok(JudgeSummary::from(&judge.evaluate(
        &*crate::engine::inference_model(model)?,
        tok,
        &pairs,
    )?))
}
