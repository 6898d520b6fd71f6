//! `osp train`: one config for OSP, its ablations and the baselines, so that they run on the
//! same data, budget and evaluation.
use super::config::{load_config, ModelSection, TrainSection};
use super::optim::OptimConfig;
use super::pairs::DataFormat;
use crate::data::OnMalformed;
use crate::judge::JudgeConfig;
use crate::lora::LoraConfig;
use crate::loss::{LossConfig, LossKind};
use crate::pairing::{PairingConfig, PairingMode};
use crate::ppo::PpoConfig;
use crate::sample::SamplingParams;
use crate::self_reward::SelfRewardConfig;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The training method (OSP.md §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum Method {
    /// Online Self-Preferring: K samples, self-judged ranked pairs, SPCE with judged strengths.
    Osp,
    /// OSP with strengths rounded to 0/1 (ablation).
    OspHard,
    /// OSP with random instead of ranked pairing (ablation).
    OspRandomPairs,
    /// Online DPO with a binary self-judge and K = 2 (OAIF-style).
    OnlineDpo,
    /// RLHF: PPO against a reward model (`ppo.reward_model`), TRL's semantics (see `ppo`).
    Ppo,
    /// Self-rewarding (Yuan et al. 2024): the model scores its K samples on a 5-point scale,
    /// best vs worst trained with DPO, πref renewed every iteration (see `self_rewarding`).
    SelfRewarding,
    /// Offline DPO on a preference file.
    Dpo,
    /// Offline IPO.
    Ipo,
    /// Offline conservative DPO (label smoothing ε = loss.label_smoothing).
    Cdpo,
    /// Offline SPCE with the data's own strengths (1 where a pair has none).
    SpceOffline,
}

impl Method {
    pub fn is_online(self) -> bool {
        matches!(
            self,
            Method::Osp
                | Method::OspHard
                | Method::OspRandomPairs
                | Method::OnlineDpo
                | Method::Ppo
                | Method::SelfRewarding
        )
    }

    /// The loss this method trains with (PPO has its own clipped loss and leaves `[loss]` at
    /// its default, unused).
    pub fn loss_kind(self) -> LossKind {
        match self {
            Method::Osp
            | Method::OspHard
            | Method::OspRandomPairs
            | Method::SpceOffline
            | Method::Ppo => LossKind::Spce,
            Method::OnlineDpo | Method::Dpo | Method::SelfRewarding => LossKind::Dpo,
            Method::Ipo => LossKind::Ipo,
            Method::Cdpo => LossKind::Cdpo,
        }
    }
}

/// `[data]` of a preference run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrefData {
    /// Preference file (offline methods; online methods take their prompts from it when
    /// `prompts` is absent). Default: none.
    pub preferences: Option<PathBuf>,
    /// Prompt-only file for online methods (TRL `{"prompt"}` records). Default: none.
    pub prompts: Option<PathBuf>,
    /// "auto", "trl", "hh", "tldr" or "pandalm". Default "auto".
    pub format: DataFormat,
    /// Share held out for evaluation (offline: pairs; online: prompts). Default 0.05.
    pub eval_fraction: f64,
    /// "skip" or "abort" on a malformed record. Default "skip".
    pub on_malformed: OnMalformed,
}

impl Default for PrefData {
    fn default() -> Self {
        Self {
            preferences: None,
            prompts: None,
            format: DataFormat::Auto,
            eval_fraction: 0.05,
            on_malformed: OnMalformed::default(),
        }
    }
}

/// A whole `osp train` run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Which method. Default "osp".
    pub method: Method,
    pub model: ModelSection,
    pub lora: LoraConfig,
    pub optim: OptimConfig,
    pub train: TrainSection,
    pub loss: LossConfig,
    pub judge: JudgeConfig,
    pub pairing: PairingConfig,
    pub sampling: SamplingParams,
    pub data: PrefData,
    /// PPO's settings (method "ppo"; TRL `PPOConfig`'s names and defaults).
    pub ppo: PpoConfig,
    /// How the model scores its own samples (method "self-rewarding").
    pub self_reward: SelfRewardConfig,
    /// The iterations of method "self-rewarding".
    pub self_rewarding: SelfRewardingSection,
}

/// `[self_rewarding]`: M1 → M2 → … as one run. `train.steps` is split evenly (the first
/// iterations take the remainder's extra steps); at the start of every iteration after the
/// first, πref becomes the model trained so far (Yuan et al.'s M_t), saved as
/// `RUN/self_rewarding/m{t}/` (an adapter or model folder). Optimiser state and the learning
/// rate schedule run on across iterations (the paper restarts the optimiser per iteration).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SelfRewardingSection {
    /// Iterations (each one restarts πref from the previous one's model). Default 2.
    pub iterations: usize,
}

impl Default for SelfRewardingSection {
    fn default() -> Self {
        Self { iterations: 2 }
    }
}

impl SelfRewardingSection {
    /// The optimiser step at which each iteration starts, for a run of `steps` steps.
    pub fn starts(&self, steps: usize) -> Vec<usize> {
        let n = self.iterations.max(1);
        let (q, r) = (steps / n, steps % n);
        let mut at = 0;
        (0..n)
            .map(|i| {
                let s = at;
                at += q + usize::from(i < r);
                s
            })
            .collect()
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            method: Method::Osp,
            model: ModelSection::default(),
            lora: LoraConfig::default(),
            optim: OptimConfig {
                lr: 5e-5,
                ..Default::default()
            },
            train: TrainSection {
                batch_size: 4,
                ..Default::default()
            },
            loss: LossConfig::default(),
            judge: JudgeConfig::default(),
            pairing: PairingConfig::default(),
            sampling: SamplingParams {
                max_new_tokens: 64,
                ..Default::default()
            },
            data: PrefData::default(),
            ppo: PpoConfig::default(),
            self_reward: SelfRewardConfig::default(),
            self_rewarding: SelfRewardingSection::default(),
        }
    }
}

/// The documented defaults (configs/train.toml), printed by `osp train --print-config`.
pub const TRAIN_TEMPLATE: &str = include_str!("../../configs/train.toml");

impl super::resume::RunConfig for TrainConfig {
    fn command(&self) -> &'static str {
        "train"
    }

    fn method(&self) -> Option<String> {
        serde_json::to_value(self.method)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
    }
}

impl TrainConfig {
    /// Reads the config, applies overrides and `method` (from the command line, when given),
    /// and aligns the loss and pairing with the method. A loss the method does not use is
    /// an error rather than silently replaced.
    pub fn load(path: Option<&Path>, overrides: &[String], method: Option<Method>) -> Result<Self> {
        let mut cfg: Self = load_config(path, overrides)?;
        if let Some(m) = method {
            cfg.method = m;
        }
        cfg.resolve()?;
        Ok(cfg)
    }

    pub fn resolve(&mut self) -> Result<()> {
        let want = self.method.loss_kind();
        let explicit = self.loss.kind != LossConfig::default().kind;
        if explicit && self.loss.kind != want {
            bail!(
                "loss.kind = {:?} contradicts method {:?}, which trains with {want:?}; remove loss.kind or change the method",
                self.loss.kind,
                self.method
            );
        }
        self.loss.kind = want;
        match self.method {
            Method::OspRandomPairs => self.pairing.mode = PairingMode::Random,
            Method::Osp | Method::OspHard if self.pairing.mode == PairingMode::Random => {
                bail!("pairing.mode = \"random\" is the osp-random-pairs method; use --method osp-random-pairs")
            }
            Method::OnlineDpo => self.pairing.k = 2,
            Method::Ppo => {
                self.ppo.validate()?;
                if self.ppo.reward_model.is_none() {
                    bail!("method ppo needs a reward model: pass --reward-model DIR or set ppo.reward_model (train one with osp rm-train)");
                }
                super::config::no_empty_path("ppo.reward_model", self.ppo.reward_model.as_deref())?;
                if self.sampling.temperature <= 0.0 {
                    bail!("method ppo needs sampling.temperature > 0 (its ratios are of sampled tokens)");
                }
                if self.pairing.k < 1 {
                    bail!("pairing.k (samples per prompt) must be at least 1");
                }
                let rows = self.train.batch_size * self.pairing.k;
                if !rows.is_multiple_of(self.ppo.num_mini_batches) {
                    bail!(
                        "method ppo: train.batch_size × pairing.k = {rows} samples per micro-batch must be a multiple of ppo.num_mini_batches = {}",
                        self.ppo.num_mini_batches
                    );
                }
            }
            Method::SelfRewarding => {
                if self.pairing.k < 2 {
                    bail!("method self-rewarding needs pairing.k ≥ 2 samples per prompt to pair");
                }
                let n = self.self_rewarding.iterations;
                if n < 1 || n > self.train.steps.max(1) {
                    bail!(
                        "self_rewarding.iterations = {n} must be in 1..=train.steps ({})",
                        self.train.steps
                    );
                }
            }
            Method::Cdpo if self.loss.label_smoothing <= 0.0 => {
                bail!("method cdpo needs loss.label_smoothing > 0 (the ε of conservative DPO)")
            }
            _ => {}
        }
        self.model.validate()?;
        self.train.validate()?;
        super::config::no_empty_path("data.prompts", self.data.prompts.as_deref())?;
        super::config::no_empty_path("data.preferences", self.data.preferences.as_deref())?;
        if self.method.is_online() {
            if self.data.prompts.is_none() && self.data.preferences.is_none() {
                bail!(
                    "online methods need data.prompts (or data.preferences to take prompts from)"
                );
            }
        } else if self.data.preferences.is_none() {
            bail!("method {:?} needs data.preferences", self.method);
        }
        if !(0.0..1.0).contains(&self.data.eval_fraction) {
            bail!("data.eval_fraction must be in [0, 1)");
        }
        self.sampling.validate()?;
        if !matches!(
            self.method,
            Method::OnlineDpo | Method::Ppo | Method::SelfRewarding
        ) {
            self.pairing.validate()?;
        }
        if self.method != Method::Ppo && self.ppo.reward_model.is_some() {
            bail!(
                "ppo.reward_model is set but the method is {:?}; only --method ppo uses a reward model",
                self.method
            );
        }
        Ok(())
    }
}
