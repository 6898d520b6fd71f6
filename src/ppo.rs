//! PPO for RLHF with TRL's semantics, as functions the online loop calls: the rollout's
//! per-token rewards, GAE, whitened advantages and returns ([`process_rollout`]); the clipped
//! policy and value losses of a mini-batch ([`ppo_loss`]); the statistics TRL logs under its
//! metric names ([`PpoStatsLog`], [`RolloutMetrics`]); a value head on the policy
//! ([`ValueHead`]); and the optional early stop on a target KL ([`early_stop`]).
//!
//! The reference is TRL's `PPOTrainer` (last shipped in `trl/experimental/ppo/ppo_trainer.py`;
//! TRL 1.16 no longer has it). `scripts/make_ppo_fixture.py` runs its lines, copied verbatim,
//! on fixed tensors and `tests/ppo.rs` matches every output to 1e-6.
//!
//! Layout. A rollout is response-aligned: row i, column t is response token t of sample i,
//! every row padded to one width T. `lengths[i]` counts row i's real tokens (its EOS
//! included, when it produced one). The value at column t is the value head's output at the
//! hidden state that predicts response token t (the same position as that token's logits).
//!
//! Semantics, following TRL line by line:
//! - per-token KL `kl_t = log πθ_old(y_t) − log πref(y_t)` (k1), or k3 `(e^r − 1) − r` with
//!   `r = log πref − log πθ_old`; reward `r_t = −kl_coef · kl_t`;
//! - the reward model's score is added at column `lengths[i]` (the first padding slot) when
//!   the row is shorter than T, else at its last token `lengths[i] − 1`. TRL computes the
//!   padding mask "p1" one slot wider for values and rewards than for log-probs, so the value
//!   head also predicts that slot (where the return is the score) and the last real token's
//!   advantage sees the score through λ·δ. `missing_eos_penalty` is subtracted from the score
//!   of a row without EOS first;
//! - optional reward whitening (`whiten_rewards`, over the value mask, mean kept);
//! - GAE over every column (padding included; its rewards and values are zero):
//!   `δ_t = r_t + γ V_{t+1} − V_t`, `A_t = δ_t + γλ A_{t+1}`; returns `A + V`; advantages
//!   whitened over response tokens (unbiased variance, +1e-8) and zero on padding;
//! - policy loss `masked_mean(max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)))` over response tokens,
//!   `ρ = exp(log πθ − log πθ_old)`; value loss `½ masked_mean(max((V − R)², (clip(V, V_old ±
//!   cliprange_value) − R)²))` over the value mask; total `pg + vf_coef · vf`;
//! - statistics as TRL logs them: `approxkl = ½ mean((log πθ − log πθ_old)²)` and the ratio's
//!   mean over all T columns (padding counts as 0 and 1), clip fractions as masked means, the
//!   entropy of the temperature-scaled logits averaged over all columns.
//!
//! One deliberate difference: TRL's `objective/entropy` sums −log π over the padding slots
//! too, where its log-probs hold the placeholder 1.0, so the figure depends on the padding
//! width; osp sums over response tokens only. The fixture records both.
use crate::model::Llama;
use anyhow::{bail, ensure, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// TRL's placeholder log-probability at padding positions (`INVALID_LOGPROB`).
pub const INVALID_LOGPROB: f64 = 1.0;

/// Which estimator of KL(πθ ‖ πref) per token the reward penalises (joschu.net/blog/kl-approx).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// `log πθ − log πref`: unbiased, can be negative per token.
    K1,
    /// `(e^r − 1) − r` with `r = log πref − log πθ`: unbiased, non-negative, lower variance.
    K3,
}

/// PPO settings: TRL `PPOConfig`'s names and defaults, plus `target_kl` (TRL 0.11's early stop).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PpoConfig {
    /// Passes over each rollout. Default 4.
    pub num_ppo_epochs: usize,
    /// Mini-batches per rollout per epoch (one optimiser step each). Default 1.
    pub num_mini_batches: usize,
    /// β of the per-token KL penalty. Default 0.05.
    pub kl_coef: f64,
    /// "k1" or "k3". Default "k1".
    pub kl_estimator: KlEstimator,
    /// ε of the clipped policy ratio. Default 0.2.
    pub cliprange: f64,
    /// Weight of the value loss in the total loss. Default 0.1.
    pub vf_coef: f64,
    /// How far a value prediction may move from the rollout's before its loss is clipped.
    /// Default 0.2.
    pub cliprange_value: f64,
    /// Discount γ. Default 1.0.
    pub gamma: f64,
    /// GAE λ. Default 0.95.
    pub lam: f64,
    /// Whiten the per-token rewards (mean kept) before GAE. Default false.
    pub whiten_rewards: bool,
    /// Subtracted from the score of a response that produced no EOS. Default: none.
    pub missing_eos_penalty: Option<f64>,
    /// Stop a rollout's remaining PPO epochs when the last mini-batch's policy KL
    /// (`masked_mean(log πθ_old − log πθ)`) exceeds 1.5 × this (TRL 0.11's `early_stopping`
    /// with `target_kl`). Default: none (never stop early, as TRL's current PPO).
    pub target_kl: Option<f64>,
}

impl Default for PpoConfig {
    fn default() -> Self {
        Self {
            num_ppo_epochs: 4,
            num_mini_batches: 1,
            kl_coef: 0.05,
            kl_estimator: KlEstimator::K1,
            cliprange: 0.2,
            vf_coef: 0.1,
            cliprange_value: 0.2,
            gamma: 1.0,
            lam: 0.95,
            whiten_rewards: false,
            missing_eos_penalty: None,
            target_kl: None,
        }
    }
}

impl PpoConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.num_ppo_epochs >= 1,
            "ppo.num_ppo_epochs must be at least 1"
        );
        ensure!(
            self.num_mini_batches >= 1,
            "ppo.num_mini_batches must be at least 1"
        );
        for (name, v) in [
            ("ppo.kl_coef", self.kl_coef),
            ("ppo.cliprange", self.cliprange),
            ("ppo.vf_coef", self.vf_coef),
            ("ppo.cliprange_value", self.cliprange_value),
        ] {
            ensure!(v.is_finite() && v >= 0.0, "{name} must be ≥ 0, got {v}");
        }
        ensure!(
            (0.0..=1.0).contains(&self.gamma),
            "ppo.gamma must be in [0, 1], got {}",
            self.gamma
        );
        ensure!(
            (0.0..=1.0).contains(&self.lam),
            "ppo.lam must be in [0, 1], got {}",
            self.lam
        );
        if let Some(p) = self.missing_eos_penalty {
            ensure!(
                p.is_finite() && p >= 0.0,
                "ppo.missing_eos_penalty must be ≥ 0 (it is subtracted), got {p}"
            );
        }
        if let Some(k) = self.target_kl {
            ensure!(
                k.is_finite() && k > 0.0,
                "ppo.target_kl must be > 0, got {k}"
            );
        }
        Ok(())
    }
}

impl PpoConfig {
    /// The mini-batches of one PPO epoch over a rollout of `rows` samples: a fresh permutation
    /// per (seed, epoch), split into `num_mini_batches` equal parts (TRL requires the rollout
    /// to be a multiple of `num_mini_batches`, and so does osp).
    pub fn minibatches(&self, rows: usize, seed: u64, epoch: usize) -> Result<Vec<Vec<usize>>> {
        use rand::seq::SliceRandom;
        ensure!(
            rows > 0 && rows.is_multiple_of(self.num_mini_batches),
            "a rollout of {rows} samples does not split into ppo.num_mini_batches = {} equal mini-batches",
            self.num_mini_batches
        );
        let mut order: Vec<usize> = (0..rows).collect();
        let mut rng =
            ChaCha8Rng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        order.shuffle(&mut rng);
        let size = rows / self.num_mini_batches;
        Ok(order.chunks(size).map(<[usize]>::to_vec).collect())
    }
}

/// One rollout, response-aligned (see the module docs); every per-token row has width T.
#[derive(Debug, Clone, Copy)]
pub struct Rollout<'a> {
    /// log πθ_old of each response token, from temperature-scaled logits, [B][T].
    pub logprobs: &'a [Vec<f32>],
    /// log πref of each response token, same temperature, [B][T].
    pub ref_logprobs: &'a [Vec<f32>],
    /// Value-head outputs at the positions predicting each response token, [B][T].
    pub values: &'a [Vec<f32>],
    /// Real tokens per row, 1..=T (a row's EOS counts).
    pub lengths: &'a [usize],
    /// The reward model's score of each response, [B].
    pub scores: &'a [f32],
    /// Whether each response produced EOS, [B].
    pub contains_eos: &'a [bool],
}

/// A rollout turned into training signal: what PPO's epochs read.
#[derive(Debug, Clone)]
pub struct Processed {
    pub width: usize,
    /// Scores after the missing-EOS penalty.
    pub scores: Vec<f64>,
    /// log πθ_old, `INVALID_LOGPROB` on padding.
    pub logprobs: Vec<Vec<f64>>,
    /// log πref, `INVALID_LOGPROB` on padding.
    pub ref_logprobs: Vec<Vec<f64>>,
    /// Values, zero outside the value mask.
    pub values: Vec<Vec<f64>>,
    /// Per-token KL estimate (zero on padding).
    pub kl: Vec<Vec<f64>>,
    /// −kl_coef · kl.
    pub non_score_reward: Vec<Vec<f64>>,
    /// Per-token rewards: the KL penalty plus the score (whitened when configured).
    pub rewards: Vec<Vec<f64>>,
    /// Whitened GAE advantages, zero on padding.
    pub advantages: Vec<Vec<f64>>,
    /// Value targets: raw advantages + values.
    pub returns: Vec<Vec<f64>>,
    /// Response tokens: column t < length (TRL's `~padding_mask`).
    pub response_mask: Vec<Vec<bool>>,
    /// Columns t ≤ length (TRL's `~padding_mask_p1`): where values are trained.
    pub value_mask: Vec<Vec<bool>>,
}

fn masked_mean(x: &[Vec<f64>], m: &[Vec<bool>]) -> (f64, usize) {
    let (mut s, mut n) = (0.0, 0usize);
    for (xr, mr) in x.iter().zip(m) {
        for (v, &k) in xr.iter().zip(mr) {
            if k {
                s += v;
                n += 1;
            }
        }
    }
    (s / n as f64, n)
}

/// TRL's `masked_whiten`: (x − mean)/√(var + 1e-8) over the mask, unbiased variance; with
/// `shift_mean = false` the mean is added back. Needs at least two masked entries.
pub fn masked_whiten(x: &[Vec<f64>], m: &[Vec<bool>], shift_mean: bool) -> Result<Vec<Vec<f64>>> {
    let (mean, n) = masked_mean(x, m);
    ensure!(
        n >= 2,
        "whitening needs at least 2 tokens, got {n} (use a larger rollout or mini-batch)"
    );
    let mut ss = 0.0;
    for (xr, mr) in x.iter().zip(m) {
        for (v, &k) in xr.iter().zip(mr) {
            if k {
                ss += (v - mean) * (v - mean);
            }
        }
    }
    let var = ss / n as f64 * (n as f64 / (n as f64 - 1.0));
    let inv = 1.0 / (var + 1e-8).sqrt();
    Ok(x.iter()
        .map(|r| {
            r.iter()
                .map(|v| {
                    let w = (v - mean) * inv;
                    if shift_mean {
                        w
                    } else {
                        w + mean
                    }
                })
                .collect()
        })
        .collect())
}

/// Turns a rollout into per-token rewards, advantages and returns (TRL's steps 3–6).
pub fn process_rollout(cfg: &PpoConfig, r: &Rollout<'_>) -> Result<Processed> {
    cfg.validate()?;
    let b = r.lengths.len();
    ensure!(b > 0, "empty rollout");
    let width = r.logprobs.first().map(Vec::len).unwrap_or(0);
    for (name, n) in [
        ("logprobs", r.logprobs.len()),
        ("ref_logprobs", r.ref_logprobs.len()),
        ("values", r.values.len()),
        ("scores", r.scores.len()),
        ("contains_eos", r.contains_eos.len()),
    ] {
        ensure!(n == b, "rollout: {name} has {n} rows, lengths has {b}");
    }
    for i in 0..b {
        for (name, row) in [
            ("logprobs", &r.logprobs[i]),
            ("ref_logprobs", &r.ref_logprobs[i]),
            ("values", &r.values[i]),
        ] {
            ensure!(
                row.len() == width,
                "rollout: {name} row {i} has {} columns, expected {width}",
                row.len()
            );
        }
        let n = r.lengths[i];
        ensure!(
            (1..=width).contains(&n),
            "rollout: row {i} has length {n}, must be in 1..={width} (an empty response cannot be scored)"
        );
        let finite = |row: &[f32]| row[..n].iter().all(|v| v.is_finite());
        ensure!(
            finite(&r.logprobs[i]) && finite(&r.ref_logprobs[i]) && finite(&r.values[i]),
            "rollout: row {i} has a non-finite log-prob or value"
        );
        ensure!(
            r.scores[i].is_finite(),
            "rollout: score {i} is {}",
            r.scores[i]
        );
    }
    let scores: Vec<f64> = r
        .scores
        .iter()
        .zip(r.contains_eos)
        .map(|(&s, &eos)| match (cfg.missing_eos_penalty, eos) {
            (Some(p), false) => s as f64 - p,
            _ => s as f64,
        })
        .collect();
    let response_mask: Vec<Vec<bool>> = r
        .lengths
        .iter()
        .map(|&n| (0..width).map(|t| t < n).collect())
        .collect();
    let value_mask: Vec<Vec<bool>> = r
        .lengths
        .iter()
        .map(|&n| (0..width).map(|t| t <= n).collect())
        .collect();
    let fill = |rows: &[Vec<f32>], mask: &[Vec<bool>], with: f64| -> Vec<Vec<f64>> {
        rows.iter()
            .zip(mask)
            .map(|(row, m)| {
                row.iter()
                    .zip(m)
                    .map(|(&v, &k)| if k { v as f64 } else { with })
                    .collect()
            })
            .collect()
    };
    let logprobs = fill(r.logprobs, &response_mask, INVALID_LOGPROB);
    let ref_logprobs = fill(r.ref_logprobs, &response_mask, INVALID_LOGPROB);
    let values = fill(r.values, &value_mask, 0.0);
    let kl: Vec<Vec<f64>> = logprobs
        .iter()
        .zip(&ref_logprobs)
        .map(|(lp, rp)| {
            lp.iter()
                .zip(rp)
                .map(|(&l, &rf)| {
                    let logr = rf - l;
                    match cfg.kl_estimator {
                        KlEstimator::K1 => -logr,
                        KlEstimator::K3 => (logr.exp() - 1.0) - logr,
                    }
                })
                .collect()
        })
        .collect();
    let non_score_reward: Vec<Vec<f64>> = kl
        .iter()
        .map(|row| row.iter().map(|k| -cfg.kl_coef * k).collect())
        .collect();
    let mut rewards = non_score_reward.clone();
    for (i, row) in rewards.iter_mut().enumerate() {
        let n = r.lengths[i];
        let end = if n < width { n } else { n - 1 };
        row[end] += scores[i];
    }
    if cfg.whiten_rewards {
        rewards = masked_whiten(&rewards, &value_mask, false)?;
        for (row, m) in rewards.iter_mut().zip(&value_mask) {
            for (v, &k) in row.iter_mut().zip(m) {
                if !k {
                    *v = 0.0;
                }
            }
        }
    }
    let mut raw_adv = vec![vec![0.0; width]; b];
    for i in 0..b {
        let mut last = 0.0;
        for t in (0..width).rev() {
            let next = if t + 1 < width { values[i][t + 1] } else { 0.0 };
            let delta = rewards[i][t] + cfg.gamma * next - values[i][t];
            last = delta + cfg.gamma * cfg.lam * last;
            raw_adv[i][t] = last;
        }
    }
    let returns: Vec<Vec<f64>> = raw_adv
        .iter()
        .zip(&values)
        .map(|(a, v)| a.iter().zip(v).map(|(x, y)| x + y).collect())
        .collect();
    let mut advantages = masked_whiten(&raw_adv, &response_mask, true)?;
    for (row, m) in advantages.iter_mut().zip(&response_mask) {
        for (v, &k) in row.iter_mut().zip(m) {
            if !k {
                *v = 0.0;
            }
        }
    }
    Ok(Processed {
        width,
        scores,
        logprobs,
        ref_logprobs,
        values,
        kl,
        non_score_reward,
        rewards,
        advantages,
        returns,
        response_mask,
        value_mask,
    })
}

/// The rollout's summary, logged once per rollout under TRL's names.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RolloutMetrics {
    /// `objective/kl`: mean over rows of the summed per-token KL estimate.
    pub kl: f64,
    /// `objective/entropy`: mean over rows of Σ −log πθ_old over response tokens.
    pub entropy: f64,
    /// `objective/non_score_reward`: mean over rows of Σ −kl_coef · kl.
    pub non_score_reward: f64,
    /// `objective/rlhf_reward`: non_score_reward + scores.
    pub rlhf_reward: f64,
    /// `objective/scores`: mean score (after the missing-EOS penalty).
    pub scores: f64,
    /// `val/num_eos_tokens`: responses that produced EOS.
    pub num_eos: usize,
}

impl Processed {
    pub fn rows(&self) -> usize {
        self.scores.len()
    }

    pub fn metrics(&self, contains_eos: &[bool]) -> RolloutMetrics {
        let b = self.rows() as f64;
        let row_sum_mean = |x: &[Vec<f64>], mask: Option<&[Vec<bool>]>| -> f64 {
            x.iter()
                .enumerate()
                .map(|(i, r)| {
                    r.iter()
                        .enumerate()
                        .filter(|(t, _)| mask.is_none_or(|m| m[i][*t]))
                        .map(|(_, v)| v)
                        .sum::<f64>()
                })
                .sum::<f64>()
                / b
        };
        let neg: Vec<Vec<f64>> = self
            .logprobs
            .iter()
            .map(|r| r.iter().map(|v| -v).collect())
            .collect();
        let kl = row_sum_mean(&self.kl, None);
        let non_score_reward = row_sum_mean(&self.non_score_reward, None);
        let scores = self.scores.iter().sum::<f64>() / b;
        RolloutMetrics {
            kl,
            entropy: row_sum_mean(&neg, Some(&self.response_mask)),
            non_score_reward,
            rlhf_reward: non_score_reward + scores,
            scores,
            num_eos: contains_eos.iter().filter(|&&e| e).count(),
        }
    }

    /// The rows `idx` as a mini-batch on `device`.
    pub fn minibatch(&self, idx: &[usize], device: &Device) -> Result<MiniBatch> {
        let pick =
            |x: &[Vec<f64>]| -> Vec<Vec<f64>> { idx.iter().map(|&i| x[i].clone()).collect() };
        let pickm =
            |x: &[Vec<bool>]| -> Vec<Vec<bool>> { idx.iter().map(|&i| x[i].clone()).collect() };
        for &i in idx {
            ensure!(
                i < self.rows(),
                "mini-batch row {i} of a {}-row rollout",
                self.rows()
            );
        }
        MiniBatch::new(
            &pick(&self.logprobs),
            &pick(&self.values),
            &pick(&self.returns),
            &pick(&self.advantages),
            &pickm(&self.response_mask),
            &pickm(&self.value_mask),
            device,
        )
    }
}

impl RolloutMetrics {
    pub fn to_json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("objective/kl".into(), json!(self.kl));
        m.insert("objective/entropy".into(), json!(self.entropy));
        m.insert(
            "objective/non_score_reward".into(),
            json!(self.non_score_reward),
        );
        m.insert("objective/rlhf_reward".into(), json!(self.rlhf_reward));
        m.insert("objective/scores".into(), json!(self.scores));
        m.insert("val/num_eos_tokens".into(), json!(self.num_eos));
        m
    }
}

/// The constants of one mini-batch, [b, T] tensors (f32) on the policy's device.
pub struct MiniBatch {
    pub old_logprobs: Tensor,
    pub old_values: Tensor,
    pub returns: Tensor,
    pub advantages: Tensor,
    /// 1 on response tokens, 0 on padding.
    pub response_mask: Tensor,
    /// 1 where values train (t ≤ length), else 0.
    pub value_mask: Tensor,
    n_response: usize,
    n_value: usize,
}

fn tensor2(rows: &[Vec<f64>], device: &Device) -> Result<Tensor> {
    let b = rows.len();
    let t = rows.first().map(Vec::len).unwrap_or(0);
    let flat: Vec<f32> = rows
        .iter()
        .flat_map(|r| r.iter().map(|&v| v as f32))
        .collect();
    ensure!(flat.len() == b * t, "ragged rows");
    Ok(Tensor::from_vec(flat, (b, t), device)?)
}

fn mask2(rows: &[Vec<bool>], device: &Device) -> Result<(Tensor, usize)> {
    let f: Vec<Vec<f64>> = rows
        .iter()
        .map(|r| r.iter().map(|&k| if k { 1.0 } else { 0.0 }).collect())
        .collect();
    let n = rows.iter().flatten().filter(|&&k| k).count();
    Ok((tensor2(&f, device)?, n))
}

impl MiniBatch {
    pub fn new(
        old_logprobs: &[Vec<f64>],
        old_values: &[Vec<f64>],
        returns: &[Vec<f64>],
        advantages: &[Vec<f64>],
        response_mask: &[Vec<bool>],
        value_mask: &[Vec<bool>],
        device: &Device,
    ) -> Result<Self> {
        ensure!(!old_logprobs.is_empty(), "empty mini-batch");
        let (rm, n_response) = mask2(response_mask, device)?;
        let (vm, n_value) = mask2(value_mask, device)?;
        ensure!(n_response > 0, "a mini-batch without response tokens");
        let mb = Self {
            old_logprobs: tensor2(old_logprobs, device)?,
            old_values: tensor2(old_values, device)?,
            returns: tensor2(returns, device)?,
            advantages: tensor2(advantages, device)?,
            response_mask: rm,
            value_mask: vm,
            n_response,
            n_value,
        };
        let dims = mb.old_logprobs.dims().to_vec();
        for (name, t) in [
            ("old_values", &mb.old_values),
            ("returns", &mb.returns),
            ("advantages", &mb.advantages),
            ("response_mask", &mb.response_mask),
            ("value_mask", &mb.value_mask),
        ] {
            ensure!(
                t.dims() == dims.as_slice(),
                "mini-batch: {name} has shape {:?}, old_logprobs {:?}",
                t.dims(),
                dims
            );
        }
        Ok(mb)
    }

    pub fn shape(&self) -> (usize, usize) {
        let d = self.old_logprobs.dims();
        (d[0], d[1])
    }
}

/// What one mini-batch update measured (TRL's per-micro-batch statistics).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PpoStepStats {
    pub pg_loss: f64,
    pub vf_loss: f64,
    pub pg_clipfrac: f64,
    pub vf_clipfrac: f64,
    /// ½ mean((log πθ − log πθ_old)²) over all columns.
    pub approxkl: f64,
    /// masked_mean(log πθ_old − log πθ): TRL 0.11's early-stop statistic.
    pub policykl: f64,
    /// Mean ratio over all columns.
    pub ratio_mean: f64,
}

/// The loss to backpropagate and its statistics.
pub struct PpoLoss {
    pub loss: Tensor,
    pub stats: PpoStepStats,
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// The clipped PPO loss of a mini-batch. `new_logprobs` [b, T] are the current policy's
/// log-probs of the rollout's response tokens (temperature-scaled, with gradient; any value
/// on padding) and `vpred` [b, T] the value head's outputs (with gradient), both at the
/// rollout's width.
pub fn ppo_loss(
    cfg: &PpoConfig,
    new_logprobs: &Tensor,
    vpred: &Tensor,
    mb: &MiniBatch,
) -> Result<PpoLoss> {
    let (b, t) = mb.shape();
    for (name, x) in [("new_logprobs", new_logprobs), ("vpred", vpred)] {
        if x.dims() != [b, t] {
            bail!(
                "ppo_loss: {name} has shape {:?}, the mini-batch is [{b}, {t}]",
                x.dims()
            );
        }
    }
    let rm = &mb.response_mask;
    let vm = &mb.value_mask;
    // masked_fill(new_logprobs, padding, INVALID_LOGPROB) and masked_fill(vpred, padding_p1, 0)
    let new_lp = ((new_logprobs.to_dtype(DType::F32)? * rm)? + ((1.0 - rm)? * INVALID_LOGPROB)?)?;
    let vpred = (vpred.to_dtype(DType::F32)? * vm)?;
    let c = cfg.cliprange_value;
    let vclip = vpred
        .maximum(&(&mb.old_values - c)?)?
        .minimum(&(&mb.old_values + c)?)?;
    let vf1 = (&vpred - &mb.returns)?.sqr()?;
    let vf2 = (&vclip - &mb.returns)?.sqr()?;
    let vf_max = vf1.maximum(&vf2)?;
    let vf_loss = ((vf_max * vm)?.sum_all()? * (0.5 / mb.n_value.max(1) as f64))?;
    let diff = (&new_lp - &mb.old_logprobs)?;
    let ratio = diff.exp()?;
    let neg_adv = mb.advantages.neg()?;
    let pg1 = (&neg_adv * &ratio)?;
    let pg2 = (&neg_adv * ratio.clamp(1.0 - cfg.cliprange, 1.0 + cfg.cliprange)?)?;
    let pg_max = pg1.maximum(&pg2)?;
    let pg_loss = ((pg_max * rm)?.sum_all()? / mb.n_response as f64)?;
    let loss = (&pg_loss + (&vf_loss * cfg.vf_coef)?)?;
    let frac = |a: &Tensor, b: &Tensor, m: &Tensor, n: usize| -> Result<f64> {
        let gt = a.detach().gt(&b.detach())?.to_dtype(DType::F32)?;
        Ok(scalar(&(gt * m)?.sum_all()?)? / n.max(1) as f64)
    };
    let d = diff.detach();
    let stats = PpoStepStats {
        pg_loss: scalar(&pg_loss)?,
        vf_loss: scalar(&vf_loss)?,
        pg_clipfrac: frac(&pg2, &pg1, rm, mb.n_response)?,
        vf_clipfrac: frac(&vf2, &vf1, vm, mb.n_value)?,
        approxkl: 0.5 * scalar(&d.sqr()?.mean_all()?)?,
        policykl: -scalar(&(&d * rm)?.sum_all()?)? / mb.n_response as f64,
        ratio_mean: scalar(&ratio.detach().mean_all()?)?,
    };
    Ok(PpoLoss { loss, stats })
}

/// TRL 0.11's early stop: true when the policy KL exceeds 1.5 × `target_kl`.
pub fn early_stop(target_kl: Option<f64>, policykl: f64) -> bool {
    target_kl.is_some_and(|k| policykl > 1.5 * k)
}

/// log π of `tokens` [b, T] (u32) under `logits` [b, T, V] divided by (temperature + 1e-7), as
/// TRL scores sampled tokens; differentiable through `logits`.
pub fn response_logps(logits: &Tensor, tokens: &Tensor, temperature: f64) -> Result<Tensor> {
    let scaled = (logits / (temperature + 1e-7))?;
    let logp = candle_nn::ops::log_softmax(&scaled, D::Minus1)?;
    Ok(logp
        .gather(&tokens.unsqueeze(D::Minus1)?.contiguous()?, D::Minus1)?
        .squeeze(D::Minus1)?)
}

/// Entropy of softmax(`logits`) along the last axis: logsumexp(ℓ) − Σ softmax(ℓ)·ℓ (TRL's
/// formula; pass the temperature-scaled logits), evaluated in f64 because the difference
/// cancels most of f32's digits; returned as f32. No gradient.
pub fn entropy_from_logits(logits: &Tensor) -> Result<Tensor> {
    let l = logits.detach().to_dtype(DType::F64)?;
    let max = l.max_keepdim(D::Minus1)?;
    let e = l.broadcast_sub(&max)?.exp()?;
    let z = e.sum_keepdim(D::Minus1)?;
    let lse = (z.log()? + &max)?;
    let p = e.broadcast_div(&z)?;
    let h = (lse.squeeze(D::Minus1)? - (p * &l)?.sum(D::Minus1)?)?;
    Ok(h.to_dtype(DType::F32)?)
}

/// Averages of the per-mini-batch statistics over a rollout's PPO epochs, logged under TRL's
/// names. `val/ratio_var` is the (unbiased) variance of the mini-batch mean ratios, as TRL's.
#[derive(Debug, Clone, Default)]
pub struct PpoStatsLog {
    steps: Vec<PpoStepStats>,
    entropy: Vec<f64>,
    /// Whether the target-KL early stop ended the epochs.
    pub early_stopped: bool,
}

impl PpoStatsLog {
    /// Records one mini-batch: its statistics and the mean entropy of its (temperature-scaled)
    /// logits over all columns (`entropy_from_logits(..).mean_all()`).
    pub fn push(&mut self, s: PpoStepStats, entropy_mean: f64) {
        self.steps.push(s);
        self.entropy.push(entropy_mean);
    }

    pub fn len(&self) -> usize {
        self.steps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    pub fn to_json(&self) -> Map<String, Value> {
        let n = self.steps.len().max(1) as f64;
        let mean = |f: &dyn Fn(&PpoStepStats) -> f64| self.steps.iter().map(f).sum::<f64>() / n;
        let mut m = Map::new();
        m.insert("policy/approxkl_avg".into(), json!(mean(&|s| s.approxkl)));
        m.insert(
            "policy/clipfrac_avg".into(),
            json!(mean(&|s| s.pg_clipfrac)),
        );
        m.insert("policy/policykl_avg".into(), json!(mean(&|s| s.policykl)));
        m.insert("loss/policy_avg".into(), json!(mean(&|s| s.pg_loss)));
        m.insert("loss/value_avg".into(), json!(mean(&|s| s.vf_loss)));
        m.insert("val/clipfrac_avg".into(), json!(mean(&|s| s.vf_clipfrac)));
        m.insert(
            "policy/entropy_avg".into(),
            json!(self.entropy.iter().sum::<f64>() / n),
        );
        let r = mean(&|s| s.ratio_mean);
        m.insert("val/ratio".into(), json!(r));
        if self.steps.len() >= 2 {
            let var = self
                .steps
                .iter()
                .map(|s| (s.ratio_mean - r).powi(2))
                .sum::<f64>()
                / (n - 1.0);
            m.insert("val/ratio_var".into(), json!(var));
        }
        m.insert("ppo/minibatch_updates".into(), json!(self.steps.len()));
        m.insert("ppo/early_stopped".into(), json!(self.early_stopped));
        m
    }
}

/// A value head on the policy: V(h) = w·h + b on the final-norm hidden state, one scalar per
/// position, as TRL's `ValueHead` (`v_head.summary`, a `Linear(hidden, 1)` with bias) on
/// `AutoModelForCausalLMWithValueHead`. It shares the policy's backbone, so with LoRA the
/// value loss also trains the adapters (TRL's current PPO uses a separate value model
/// initialised from the reward model instead; a shared backbone costs no second model).
/// TRL's dropout on the head input is omitted. Initialisation is PyTorch's `nn.Linear`
/// default, U(±1/√d) for weight and bias, from a seeded stream.
#[derive(Clone)]
pub struct ValueHead {
    pub weight: Tensor,
    pub bias: Tensor,
    vars: Vec<(String, Var)>,
}

impl ValueHead {
    pub const WEIGHT: &'static str = "v_head.summary.weight";
    pub const BIAS: &'static str = "v_head.summary.bias";

    /// A fresh, trainable head for hidden size `d`.
    pub fn new(d: usize, seed: u64, device: &Device) -> Result<Self> {
        ensure!(d > 0, "value head: hidden size 0");
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let bound = 1.0 / (d as f32).sqrt();
        let w = crate::model::init::uniform_vec(&mut rng, d, bound);
        let b = crate::model::init::uniform_vec(&mut rng, 1, bound);
        Self::from_tensors(
            Tensor::from_vec(w, (1, d), device)?,
            Tensor::from_vec(b, 1, device)?,
            true,
        )
    }

    /// A head from saved tensors (weight [1, d], bias [1]); `trainable` wraps them in `Var`s.
    pub fn from_tensors(weight: Tensor, bias: Tensor, trainable: bool) -> Result<Self> {
        ensure!(
            weight.rank() == 2 && weight.dim(0)? == 1,
            "value head: `{}` must have shape [1, d], got {:?}",
            Self::WEIGHT,
            weight.dims()
        );
        ensure!(
            bias.dims() == [1],
            "value head: `{}` must have shape [1], got {:?}",
            Self::BIAS,
            bias.dims()
        );
        let (weight, bias) = (weight.to_dtype(DType::F32)?, bias.to_dtype(DType::F32)?);
        if !trainable {
            return Ok(Self {
                weight,
                bias,
                vars: vec![],
            });
        }
        let (wv, bv) = (Var::from_tensor(&weight)?, Var::from_tensor(&bias)?);
        Ok(Self {
            weight: wv.as_tensor().clone(),
            bias: bv.as_tensor().clone(),
            vars: vec![(Self::WEIGHT.into(), wv), (Self::BIAS.into(), bv)],
        })
    }

    /// The trainable variables under TRL's names (empty for a frozen head).
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Values [b, t] for hidden states [b, t, d].
    pub fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        let d = self.weight.dim(1)?;
        let (b, t, hd) = hidden.dims3()?;
        ensure!(
            hd == d,
            "value head of width {d} applied to hidden states of width {hd}"
        );
        let v = hidden
            .reshape((b * t, d))?
            .matmul(&self.weight.t()?)?
            .broadcast_add(&self.bias)?;
        Ok(v.reshape((b, t))?)
    }

    /// The head's tensors under TRL's names, for saving.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        vec![
            (Self::WEIGHT.into(), self.weight.detach()),
            (Self::BIAS.into(), self.bias.detach()),
        ]
    }
}

/// What one forward pass of the policy gives PPO, response-aligned at a rollout's width.
pub struct PolicyOutputs {
    /// log π of each response token at the sampling temperature, [b, width] (0 on padding).
    pub logprobs: Tensor,
    /// The value head's output at the position predicting each response token, [b, width]
    /// (0 on padding); None without a head.
    pub values: Option<Tensor>,
    /// Mean entropy of the temperature-scaled next-token distribution over response tokens
    /// (`policy/entropy_avg`; TRL averages over padding positions too).
    pub entropy_mean: f64,
}

/// Runs `model` on prompt ++ response and returns, for response token t of row i (t < width),
/// its log-probability at `temperature` and the value head's output, read at position
/// `prompt_i + t − 1`, the one whose logits predict it. Differentiable through the model and
/// the head; use a snapshot (and no head) for πref and for the rollout's old log-probs.
pub fn policy_forward(
    model: &Llama,
    head: Option<&ValueHead>,
    prompts: &[&[u32]],
    responses: &[&[u32]],
    width: usize,
    temperature: f64,
) -> Result<PolicyOutputs> {
    let b = prompts.len();
    ensure!(b > 0, "no sequences");
    ensure!(
        responses.len() == b,
        "{b} prompts but {} responses",
        responses.len()
    );
    let mut seqs = Vec::with_capacity(b);
    for (i, (p, r)) in prompts.iter().zip(responses).enumerate() {
        ensure!(
            !p.is_empty(),
            "row {i}: empty prompt (it needs at least BOS)"
        );
        ensure!(
            !r.is_empty() && r.len() <= width,
            "row {i}: response of {} tokens for a width of {width}",
            r.len()
        );
        seqs.push([*p, *r].concat());
    }
    let device = model.device();
    let batch = crate::model::TokenBatch::right_padded(&seqs, device)?;
    let h = model.forward_hidden(&batch.ids, &batch.positions, &batch.bias, None)?;
    let (_, len, d) = h.dims3()?;
    let mut rows = Vec::with_capacity(b * width);
    let mut tokens = Vec::with_capacity(b * width);
    let mut mask = Vec::with_capacity(b * width);
    for i in 0..b {
        let (p, r) = (prompts[i].len(), responses[i]);
        for t in 0..width {
            let real = t < r.len();
            // Padding columns read the last real position: finite, and masked below.
            let pos = p - 1 + t.min(r.len() - 1);
            rows.push((i * len + pos) as u32);
            tokens.push(if real { r[t] } else { 0 });
            mask.push(if real { 1f32 } else { 0.0 });
        }
    }
    let idx = Tensor::from_vec(rows, b * width, device)?;
    let hs = h.reshape((b * len, d))?.index_select(&idx, 0)?;
    let logits = model.logits(&hs)?.reshape((b, width, ()))?;
    let tokens = Tensor::from_vec(tokens, (b, width), device)?;
    let mask = Tensor::from_vec(mask, (b, width), device)?;
    let logprobs = (response_logps(&logits, &tokens, temperature)? * &mask)?;
    let entropy = entropy_from_logits(&(&logits / (temperature + 1e-7))?)?;
    let n_real: usize = responses.iter().map(|r| r.len()).sum();
    let entropy_mean = scalar(&(entropy * &mask)?.sum_all()?)? / n_real as f64;
    let values = match head {
        Some(hd) => Some((hd.forward(&hs.reshape((b, width, d))?)? * &mask)?),
        None => None,
    };
    Ok(PolicyOutputs {
        logprobs,
        values,
        entropy_mean,
    })
}

/// A [b, width] tensor as rows (what [`Rollout`] takes).
pub fn to_rows(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.detach().to_dtype(DType::F32)?.to_vec2::<f32>()?)
}
