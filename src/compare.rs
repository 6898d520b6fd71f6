//! `osp compare`: does a judge prefer a trained model's responses to its starting model's?
//! The evaluation every method shares (online or offline, trained from any start): one
//! sampled response per prompt (or several) from the policy and from the baseline, with the
//! same seeds, judged in both orders by a model that is not being trained; plus the KL
//! estimate Σ log πθ(y) − log πbase(y) over the policy's own samples and the mean lengths.
use crate::engine::inference_model;
use crate::judge::Judge;
use crate::model::Llama;
use crate::sample::{generate, Generation, Request, SamplingParams};
use crate::tokenizer::Tokenizer;
use crate::train::online::sample_seed;
use crate::train::pairs::frozen_response_logps;
use anyhow::{ensure, Result};
use serde::Serialize;

/// Requests sampled per batch (bounds the KV cache of long runs).
const CHUNK: usize = 32;

/// What `compare` measured.
#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    pub prompts: usize,
    pub comparisons: usize,
    /// Share of comparisons where the judge prefers the policy's response (s > ½; a tie ½).
    pub win_rate: f64,
    /// Its standard error over comparisons.
    pub win_rate_se: f64,
    /// Mean judged strength s(policy ≻ baseline).
    pub mean_strength: f64,
    /// Mean over the policy's samples of Σ_t log πθ(y_t) − log πbase(y_t).
    pub kl: f64,
    /// Mean new tokens per response.
    pub mean_length: f64,
    pub baseline_mean_length: f64,
    /// Share of comparisons whose two orders picked the same position.
    pub position_bias_rate: f64,
}

/// Samples `samples` responses per prompt from `policy` and `baseline` (sample j of prompt p
/// uses the same seed in both), judges each policy response against the baseline's with
/// `judge` on `judge_model`, and estimates KL(policy ‖ baseline) on the policy's samples.
/// `prompts` are (text, token ids).
#[allow(clippy::too_many_arguments)]
pub fn compare(
    policy: &Llama,
    baseline: &Llama,
    judge_model: &Llama,
    judge: &Judge,
    tok: &Tokenizer,
    prompts: &[(String, Vec<u32>)],
    sampling: &SamplingParams,
    samples: usize,
    seed: u64,
) -> Result<CompareReport> {
    ensure!(!prompts.is_empty(), "no prompts to compare on");
    ensure!(samples >= 1, "samples per prompt must be at least 1");
    let policy = inference_model(policy)?;
    let baseline = inference_model(baseline)?;
    let reqs: Vec<(usize, Request)> = (0..prompts.len())
        .flat_map(|p| (0..samples).map(move |j| (p, j)))
        .map(|(p, j)| {
            let req = Request {
                prompt: prompts[p].1.clone(),
                seed: sample_seed(seed, 0, p, j),
            };
            (p, req)
        })
        .collect();
    let (mut ours, mut theirs, mut kl) = (vec![], vec![], vec![]);
    for chunk in reqs.chunks(CHUNK) {
        let chunk: Vec<Request> = chunk.iter().map(|(_, r)| r.clone()).collect();
        let o: Vec<Generation> = generate(&policy, tok, &chunk, sampling)?;
        let seqs: Vec<(&[u32], &[u32])> = chunk
            .iter()
            .zip(&o)
            .map(|(r, g)| (r.prompt.as_slice(), g.tokens.as_slice()))
            .collect();
        // On the engine: the LM head only at response tokens, in chunks (the autograd path
        // would hold [rows, tokens, vocab] logits: 24 GB for 32 HH prompts at vocab 49,152).
        let lp = frozen_response_logps(&policy, &seqs)?;
        let lb = frozen_response_logps(&baseline, &seqs)?;
        kl.extend(lp.iter().zip(&lb).map(|(p, b)| (p - b) as f64));
        theirs.extend(generate(&baseline, tok, &chunk, sampling)?);
        ours.extend(o);
    }
    let items: Vec<(&str, &str, &str)> = reqs
        .iter()
        .enumerate()
        .map(|(i, (p, _))| {
            (
                prompts[*p].0.as_str(),
                ours[i].text.as_str(),
                theirs[i].text.as_str(),
            )
        })
        .collect();
    let judge_model = inference_model(judge_model)?;
    let js = judge.judge(&judge_model, tok, &items)?;
    let wins: Vec<f64> = js.iter().map(|j| outcome(j.strength)).collect();
    let (win_rate, win_rate_se) = crate::eval::win_rate(&wins);
    let mean = |xs: &[f64]| crate::eval::mean_std(xs).0;
    let len = |g: &[Generation]| mean(&g.iter().map(|g| g.tokens.len() as f64).collect::<Vec<_>>());
    Ok(CompareReport {
        prompts: prompts.len(),
        comparisons: js.len(),
        win_rate,
        win_rate_se,
        mean_strength: mean(&js.iter().map(|j| j.strength).collect::<Vec<_>>()),
        kl: mean(&kl),
        mean_length: len(&ours),
        baseline_mean_length: len(&theirs),
        position_bias_rate: js.iter().filter(|j| j.position_biased()).count() as f64
            / js.len() as f64,
    })
}

/// A win 1, a loss 0, a tie (s exactly ½) ½.
pub fn outcome(strength: f64) -> f64 {
    match strength.partial_cmp(&0.5) {
        Some(std::cmp::Ordering::Greater) => 1.0,
        Some(std::cmp::Ordering::Equal) => 0.5,
        _ => 0.0,
    }
}
