//! A rollout turned into training signal: TRL's per-token rewards, GAE, returns and whitened
//! advantages, the rollout's metrics, and mini-batches of it as tensors.
use super::{KlEstimator, PpoConfig, INVALID_LOGPROB};
use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};
use serde::Serialize;
use serde_json::{json, Map, Value};

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
    pub(crate) n_response: usize,
    pub(crate) n_value: usize,
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
