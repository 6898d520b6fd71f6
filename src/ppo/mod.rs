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
//!   mean over all T columns (padding counts as 0 and 1), clip fractions as masked means.
//!
//! Two deliberate differences, both about padding: TRL's `objective/entropy` sums −log π over
//! the padding slots too, where its log-probs hold the placeholder 1.0, and its
//! `policy/entropy_avg` averages the entropy of the logits at padding positions too; both
//! figures then depend on the padding width. osp takes both over response tokens only
//! ([`RolloutMetrics`], [`PolicyOutputs::entropy_mean`]). The fixture records TRL's figures.
//!
//! Files: [`rollout`] (advantages and returns, mini-batches), [`loss`] (the clipped losses and
//! their statistics), [`policy`] (the value head and the policy's forward pass).
pub mod loss;
pub mod policy;
pub mod rollout;

pub use loss::{
    early_stop, entropy_from_logits, ppo_loss, response_logps, PpoLoss, PpoStatsLog, PpoStepStats,
};
pub use policy::{policy_forward, to_rows, PolicyOutputs, ValueHead};
pub use rollout::{masked_whiten, process_rollout, MiniBatch, Processed, Rollout, RolloutMetrics};

use anyhow::{ensure, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

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
    /// The reward model folder (`osp rm-train`'s `RUN/reward_model`, or a transformers
    /// sequence-classification folder); `--reward-model` on the command line sets it.
    /// Required by method "ppo". Default: none.
    pub reward_model: Option<std::path::PathBuf>,
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
            reward_model: None,
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
