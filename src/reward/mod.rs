//! Reward models, RLHF's first stage: a Llama-family backbone (LoRA or full) with a scalar
//! head, trained on preference pairs with the Bradley–Terry loss, as TRL's `RewardTrainer`
//! trains `AutoModelForSequenceClassification(num_labels = 1)`.
//!
//! The reward of a sequence is `score · h`, where `h` is the final-norm hidden state at the
//! *last non-padding token* and `score` is a [1, d] matrix without bias (transformers'
//! `score.weight`). "Last non-padding token" is transformers' rule exactly: the rightmost
//! position whose id is not `pad_token_id`. With a tokenizer that has no pad token, TRL (and
//! osp) pad with EOS, so a response ending in EOS is read at the token before its EOS; this
//! is what a merged export scores in transformers too.
//!
//! Training (`osp rm-train`, [`train`]): −log σ(r_w − r_l − m) averaged over pairs, with TRL's
//! optional margin m and `center_rewards_coefficient` c adding c · mean((r_w + r_l)²).
//! Files ([`io`]): a PEFT adapter folder holding the head under PEFT's `modules_to_save` name,
//! or a transformers `LlamaForSequenceClassification` folder.
pub mod io;
pub mod train;

use crate::data::PreferencePair;
use crate::model::{Llama, TokenBatch};
use crate::tokenizer::Tokenizer;
use crate::train::pairs::{join, tokenize_pair};
use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{DType, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// The head's tensor name in transformers' sequence-classification models.
pub const SCORE: &str = "score.weight";
/// The head's name inside a PEFT adapter file (`modules_to_save = ["score"]`).
pub const PEFT_SCORE: &str = "base_model.model.score.weight";
/// transformers' default `initializer_range`, the std of a fresh head.
const HEAD_INIT_STD: f32 = 0.02;
/// Mixed into the run seed so that the head's stream differs from the adapters'.
const HEAD_SEED_SALT: u64 = 0x0073_636f_7265; // "score"

/// A backbone with a scalar head.
#[derive(Clone)]
pub struct RewardModel {
    pub backbone: Llama,
    /// `score.weight`, [1, hidden_size].
    pub score: Tensor,
    /// Sequences are read at their rightmost token that is not this id.
    pub pad_token_id: u32,
}

/// The pad id a reward model uses: `configured`, else the tokenizer's pad token, else its EOS
/// (TRL's fallback).
pub fn resolve_pad_id(tok: &Tokenizer, configured: Option<u32>) -> Result<u32> {
    if let Some(id) = configured {
        ensure!(
            (id as usize) < tok.vocab_size(),
            "reward.pad_token_id {id} is outside the tokenizer's {} ids",
            tok.vocab_size()
        );
        return Ok(id);
    }
    tok.pad_id()
        .or_else(|| tok.eos_ids().first().copied())
        .ok_or_else(|| {
            anyhow!("the tokenizer has neither a pad nor an EOS token: set reward.pad_token_id")
        })
}

/// Where each sequence is read: its rightmost position whose id is not `pad`.
pub fn pooled_positions(seqs: &[Vec<u32>], pad: u32) -> Result<Vec<usize>> {
    seqs.iter()
        .enumerate()
        .map(|(i, s)| {
            s.iter().rposition(|&t| t != pad).ok_or_else(|| {
                anyhow!(
                    "sequence {i} has no token other than the pad token {pad}: nothing to score"
                )
            })
        })
        .collect()
}

impl RewardModel {
    /// A frozen reward model from its parts.
    pub fn new(backbone: Llama, score: Tensor, pad_token_id: u32) -> Result<Self> {
        let d = backbone.cfg.hidden_size;
        ensure!(
            score.dims() == [1, d],
            "`{SCORE}` has shape {:?}, the backbone needs [1, {d}]",
            score.dims()
        );
        ensure!(
            (pad_token_id as usize) < backbone.cfg.vocab_size,
            "pad_token_id {pad_token_id} is outside the vocabulary ({})",
            backbone.cfg.vocab_size
        );
        let score = score.to_dtype(DType::F32)?.to_device(backbone.device())?;
        Ok(Self {
            backbone,
            score,
            pad_token_id,
        })
    }

    /// Adds a fresh trainable head, N(0, 0.02²) as transformers initialises `score`, and
    /// registers it with the backbone's trainable tensors (under PEFT's name when the backbone
    /// has LoRA adapters, else `score.weight`) so that optimiser and checkpoints include it.
    pub fn with_fresh_head(mut backbone: Llama, pad_token_id: u32, seed: u64) -> Result<Self> {
        let d = backbone.cfg.hidden_size;
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ HEAD_SEED_SALT);
        let w = crate::model::init::normal_vec(&mut rng, d, HEAD_INIT_STD);
        let var = Var::from_tensor(&Tensor::from_vec(w, (1, d), backbone.device())?)?;
        let score = var.as_tensor().clone();
        backbone.add_var(Self::head_var_name(&backbone), var)?;
        Self::new(backbone, score, pad_token_id)
    }

    /// The head's name among the backbone's trainable tensors.
    pub fn head_var_name(backbone: &Llama) -> &'static str {
        if backbone.lora_config().is_some() {
            PEFT_SCORE
        } else {
            SCORE
        }
    }

    /// A frozen copy for scoring: adapters merged, no autograd graph (see `Llama::snapshot`).
    pub fn snapshot(&self) -> Result<Self> {
        Ok(Self {
            backbone: self.backbone.snapshot()?,
            score: self.score.detach().copy()?,
            pad_token_id: self.pad_token_id,
        })
    }

    /// Rewards [n] of whole sequences (prompt and response token ids), differentiable.
    pub fn rewards(&self, seqs: &[Vec<u32>]) -> Result<Tensor> {
        ensure!(!seqs.is_empty(), "no sequences to score");
        let pos = pooled_positions(seqs, self.pad_token_id)?;
        let batch = TokenBatch::right_padded(seqs, self.backbone.device())?;
        let h = self
            .backbone
            .forward_hidden(&batch.ids, &batch.positions, &batch.bias, None)?;
        let (b, t, d) = h.dims3()?;
        let rows: Vec<u32> = pos
            .iter()
            .enumerate()
            .map(|(i, &p)| (i * t + p) as u32)
            .collect();
        let idx = Tensor::from_vec(rows, b, self.backbone.device())?;
        let last = h.reshape((b * t, d))?.index_select(&idx, 0)?;
        Ok(last.matmul(&self.score.t()?)?.squeeze(1)?)
    }

    /// Rewards of sequences without gradients, `batch_size` at a time (use a snapshot).
    pub fn score_ids(&self, seqs: &[Vec<u32>], batch_size: usize) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(seqs.len());
        for chunk in seqs.chunks(batch_size.max(1)) {
            out.extend(self.rewards(chunk)?.detach().to_vec1::<f32>()?);
        }
        Ok(out)
    }

    /// Rewards of (prompt, response) texts: the prompt encoded with BOS, the response without
    /// and followed by EOS (as osp tokenizes preference pairs and as responses are sampled),
    /// cut to `max_len` tokens like training pairs. This is what PPO calls.
    pub fn score_texts(
        &self,
        tok: &Tokenizer,
        items: &[(&str, &str)],
        max_len: usize,
        batch_size: usize,
    ) -> Result<Vec<f32>> {
        let seqs = items
            .iter()
            .enumerate()
            .map(|(i, (p, r))| {
                tokenize_scored(tok, p, r, max_len).with_context(|| format!("item {i}"))
            })
            .collect::<Result<Vec<_>>>()?;
        self.score_ids(&seqs, batch_size)
    }
}

/// prompt (BOS) ++ response ++ EOS, cut like a training pair to `max_len` tokens.
pub fn tokenize_scored(
    tok: &Tokenizer,
    prompt: &str,
    response: &str,
    max_len: usize,
) -> Result<Vec<u32>> {
    let pair = PreferencePair {
        prompt: prompt.to_string(),
        chosen: response.to_string(),
        rejected: response.to_string(),
        strength: None,
        source: String::new(),
    };
    match tokenize_pair(tok, &pair, max_len)? {
        Ok(t) => Ok(join(&t.prompt, &t.chosen).0),
        Err(_) => {
            bail!("the prompt fills the {max_len}-token limit; nothing of the response remains")
        }
    }
}

/// Where a pair's margin comes from (TRL's optional `margin` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MarginSource {
    /// No margin: −log σ(r_w − r_l).
    None,
    /// m = margin_scale · (2s − 1) from the pair's strength s = P(chosen ≻ rejected): 0 for a
    /// coin flip, margin_scale for a certain preference (Llama 2's graded margins, from the
    /// data's confidence). Pairs without a strength get m = 0.
    Strength,
}

/// Per-pair margins for `strengths` (see [`MarginSource`]).
pub fn margins(source: MarginSource, scale: f64, strengths: &[Option<f64>]) -> Option<Vec<f64>> {
    match source {
        MarginSource::None => None,
        MarginSource::Strength => Some(
            strengths
                .iter()
                .map(|s| s.map_or(0.0, |s| scale * (2.0 * s - 1.0)))
                .collect(),
        ),
    }
}

/// TRL RewardTrainer's loss: −mean(log σ(r_w − r_l − m)) (+ c · mean((r_w + r_l)²) with a
/// `center_rewards_coefficient` c). `chosen` and `rejected` are [n].
pub fn bradley_terry_loss(
    chosen: &Tensor,
    rejected: &Tensor,
    margin: Option<&[f64]>,
    center_rewards_coefficient: Option<f64>,
) -> Result<Tensor> {
    let n = chosen.dim(0)?;
    ensure!(n > 0, "no pairs");
    ensure!(
        chosen.dims() == [n] && rejected.dims() == [n],
        "chosen {:?} and rejected {:?} rewards must both be [n]",
        chosen.dims(),
        rejected.dims()
    );
    let mut diff = (chosen - rejected)?;
    if let Some(m) = margin {
        ensure!(m.len() == n, "{} margins for {n} pairs", m.len());
        let m: Vec<f32> = m.iter().map(|&x| x as f32).collect();
        diff = (diff - Tensor::from_vec(m, n, chosen.device())?)?;
    }
    let mut loss = crate::loss::log_sigmoid(&diff)?.mean_all()?.neg()?;
    if let Some(c) = center_rewards_coefficient {
        loss = (loss + ((chosen + rejected)?.sqr()?.mean_all()? * c)?)?;
    }
    Ok(loss)
}

/// TRL's logged reward statistics of a batch of pairs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RewardStats {
    /// Share of pairs with r_w > r_l (ties count as wrong, as TRL's `>`).
    pub accuracy: f64,
    /// mean(r_w − r_l).
    pub margin: f64,
    pub min_reward: f64,
    pub mean_reward: f64,
    pub max_reward: f64,
}

pub fn reward_stats(chosen: &[f32], rejected: &[f32]) -> RewardStats {
    let n = chosen.len().max(1) as f64;
    let all = chosen.iter().chain(rejected).map(|&x| x as f64);
    let (mut lo, mut hi, mut sum, mut cnt) = (f64::INFINITY, f64::NEG_INFINITY, 0.0, 0usize);
    for x in all {
        lo = lo.min(x);
        hi = hi.max(x);
        sum += x;
        cnt += 1;
    }
    RewardStats {
        accuracy: chosen.iter().zip(rejected).filter(|(c, r)| c > r).count() as f64 / n,
        margin: chosen
            .iter()
            .zip(rejected)
            .map(|(c, r)| (c - r) as f64)
            .sum::<f64>()
            / n,
        min_reward: lo,
        mean_reward: sum / cnt.max(1) as f64,
        max_reward: hi,
    }
}
