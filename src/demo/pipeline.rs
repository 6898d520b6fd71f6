//! `osp demo`: the whole OSP story on built-in tasks, end to end, in one command.
//!
//! Per task: generate the data (oracle-labelled), train an SFT model from scratch (full
//! fine-tuning of a fresh Llama, on the demonstrations plus coin-flip judge-format examples
//! that stand in for pretraining), teach it to judge on a 2% seed of the human preferences
//! (preference augmentation; full fine-tuning by default, since LoRA on a model this small
//! learned to judge the summaries far more slowly: this is πref), then train every method
//! from πref with LoRA at equal budgets of pairs and optimiser steps, and evaluate each with
//! the oracle, which no method ever sees.
use super::evaluate::{
    judge_own_samples, kl_estimate, oracle_pairs, outcomes, texts, EvalSet, JudgeSummary,
};
use super::methods::{default_methods, method_by_key};
use super::tasks::{
    all_tasks, build_task_data, Task, TaskData, TaskSizes, HUMAN_TEMPERATURE, JUDGE_ANSWER_A,
    JUDGE_ANSWER_B, JUDGE_TEMPLATE, SCORE_ANSWERS, SCORE_TEMPLATE,
};
use super::wordlevel::write_tokenizer;
use crate::eval::{mean_std, win_rate};
use crate::judge::{Judge, JudgeConfig};
use crate::lora::LoraConfig;
use crate::model::{init::random_weights, load_model, Llama, LoadedModel, ModelConfig, Trainable};
use crate::train::config::{ModelSection, TrainMode, TrainSection};
use crate::train::judge_train::{run_judge_train, JudgeTrainConfig, JudgeTrainData};
use crate::train::method::{Method, PrefData, TrainConfig};
use crate::train::optim::OptimConfig;
use crate::train::sft::{run_sft, SftConfig, SftData};
use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Command-line options of `osp demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The small budget the tests run (about a minute on 2 cores).
    pub quick: bool,
    pub out: PathBuf,
    pub seed: u64,
    /// `field=value` overrides of the budget (e.g. `pa_steps=400`).
    pub overrides: Vec<String>,
    /// Task names to run (empty: every task).
    pub tasks: Vec<String>,
}

/// Every size and rate of a demo run (recorded in summary.json).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoBudget {
    pub hidden_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub sft_examples: usize,
    pub sft_steps: usize,
    pub sft_batch: usize,
    pub sft_lr: f64,
    /// Coin-flip judge-format examples added to the SFT data, as a share of `sft_examples`
    /// (the base model's "pretraining" on the judge prompt; see `tasks::format_examples`).
    pub format_fraction: f64,
    /// The whole "human" preference set; the seed used for augmentation (and by the offline
    /// baselines) is `seed_fraction` of it.
    pub human_pairs: usize,
    pub seed_fraction: f64,
    pub pa_steps: usize,
    pub pa_batch: usize,
    pub pa_lr: f64,
    /// Preference augmentation trains every weight (true) or LoRA adapters (false).
    pub pa_full: bool,
    /// Share of each augmentation batch that is SFT examples (keeps generation from degrading).
    pub pa_sft_mix: f64,
    pub method_steps: usize,
    pub prompts_per_step: usize,
    pub k: usize,
    pub method_lr: f64,
    pub beta: f64,
    pub lora_r: usize,
    pub max_new_tokens: usize,
    pub eval_prompts: usize,
    pub ood_prompts: usize,
    pub curve_prompts: usize,
    pub eval_every: usize,
    /// Judge of the online methods: "self" (the current policy, the paper's default) or
    /// "initial" (πref, frozen).
    pub judge_model: crate::judge::JudgeModel,
    /// Methods to run, by summary key (any of [`super::methods::ALL_METHODS`]); default the seven
    /// of the issue.
    pub methods: Vec<String>,
    /// Study (0 = off): the hard-label online methods and OSP again at `method_lr` × this.
    pub collapse_lr_factor: f64,
    /// Study (empty = off): DPO and offline SPCE on the seed pairs for `method_steps` × each.
    pub epoch_multipliers: Vec<usize>,
    /// RLHF baseline (`ppo`): steps training its reward model on the seed pairs (from πref,
    /// every weight when `pa_full`, `pa_batch` pairs a step at `pa_lr`).
    pub rm_steps: usize,
    /// Self-rewarding baseline: steps teaching its pointwise judge on the seed pairs (from πref,
    /// as `rm_steps`, with `pa_sft_mix` of each batch SFT examples).
    pub sr_judge_steps: usize,
    /// Self-rewarding baseline: iterations M1 → M2 → … within `method_steps` (πref renewed at
    /// each).
    pub sr_iterations: usize,
}

impl DemoBudget {
    pub fn new(quick: bool) -> Self {
        let default = Self {
            hidden_size: 96,
            layers: 3,
            heads: 4,
            sft_examples: 4000,
            sft_steps: 800,
            sft_batch: 32,
            sft_lr: 3e-3,
            format_fraction: 0.1,
            human_pairs: 50_000,
            seed_fraction: 0.02,
            pa_steps: 800,
            pa_batch: 32,
            pa_lr: 3e-3,
            pa_full: true,
            pa_sft_mix: 0.25,
            method_steps: 80,
            prompts_per_step: 8,
            k: 7,
            method_lr: 3e-4,
            beta: 0.1,
            lora_r: 16,
            max_new_tokens: 12,
            eval_prompts: 400,
            ood_prompts: 200,
            curve_prompts: 48,
            eval_every: 10,
            judge_model: crate::judge::JudgeModel::Current,
            methods: default_methods(),
            collapse_lr_factor: 0.0,
            epoch_multipliers: vec![],
            rm_steps: 130,
            sr_judge_steps: 130,
            sr_iterations: 2,
        };
        if !quick {
            return default;
        }
        // Smaller everywhere it costs time; rates and shares as in the default.
        Self {
            hidden_size: 64,
            layers: 2,
            sft_examples: 1500,
            sft_steps: 250,
            human_pairs: 10_000,
            pa_steps: 300,
            method_steps: 16,
            prompts_per_step: 4,
            k: 5,
            method_lr: 1e-3,
            lora_r: 8,
            max_new_tokens: 10,
            eval_prompts: 64,
            ood_prompts: 32,
            curve_prompts: 24,
            eval_every: 5,
            rm_steps: 60,
            sr_judge_steps: 60,
            ..default
        }
    }

    /// Everything that would otherwise fail, or panic, minutes into a run, checked before
    /// any work: counts at least 1, rates positive, shares in range, sizes that fit.
    pub fn validate(&self) -> Result<()> {
        use anyhow::bail;
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("layers", self.layers),
            ("heads", self.heads),
            ("sft_examples", self.sft_examples),
            ("sft_steps", self.sft_steps),
            ("sft_batch", self.sft_batch),
            ("human_pairs", self.human_pairs),
            ("pa_steps", self.pa_steps),
            ("pa_batch", self.pa_batch),
            ("method_steps", self.method_steps),
            ("prompts_per_step", self.prompts_per_step),
            ("lora_r", self.lora_r),
            ("max_new_tokens", self.max_new_tokens),
            ("eval_prompts", self.eval_prompts),
            ("ood_prompts", self.ood_prompts),
            ("curve_prompts", self.curve_prompts),
            ("eval_every", self.eval_every),
            ("rm_steps", self.rm_steps),
            ("sr_judge_steps", self.sr_judge_steps),
            ("sr_iterations", self.sr_iterations),
        ] {
            if v == 0 {
                bail!("demo budget: {name} must be at least 1");
            }
        }
        if self.k < 3 {
            bail!(
                "demo budget: k = {} must be at least 3 (sample 0 is the pairing baseline and a pair needs two more)",
                self.k
            );
        }
        if !self.hidden_size.is_multiple_of(self.heads)
            || !(self.hidden_size / self.heads).is_multiple_of(2)
        {
            bail!(
                "demo budget: hidden_size {} must split into {} heads of an even size",
                self.hidden_size,
                self.heads
            );
        }
        if self.lora_r > self.hidden_size {
            bail!(
                "demo budget: lora_r = {} exceeds hidden_size {}",
                self.lora_r,
                self.hidden_size
            );
        }
        if self.max_new_tokens > DEMO_POSITIONS / 2 {
            bail!(
                "demo budget: max_new_tokens = {} leaves no room for the prompt in the model's {DEMO_POSITIONS} positions (at most {})",
                self.max_new_tokens,
                DEMO_POSITIONS / 2
            );
        }
        for (name, v) in [
            ("sft_lr", self.sft_lr),
            ("pa_lr", self.pa_lr),
            ("method_lr", self.method_lr),
            ("beta", self.beta),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                bail!("demo budget: {name} must be a positive number, got {v}");
            }
        }
        for (name, v, lo, hi, hi_open) in [
            ("format_fraction", self.format_fraction, 0.0, 1.0, false),
            ("seed_fraction", self.seed_fraction, 0.0, 1.0, false),
            ("pa_sft_mix", self.pa_sft_mix, 0.0, 1.0, true),
        ] {
            if !(v >= lo && (v < hi || (!hi_open && v == hi))) {
                let close = if hi_open { ')' } else { ']' };
                bail!("demo budget: {name} must be in [{lo}, {hi}{close}, got {v}");
            }
        }
        if !(self.collapse_lr_factor >= 0.0 && self.collapse_lr_factor.is_finite()) {
            bail!(
                "demo budget: collapse_lr_factor must be ≥ 0 (0 = off), got {}",
                self.collapse_lr_factor
            );
        }
        if let Some(&m) = self.epoch_multipliers.iter().find(|&&m| m == 0) {
            bail!("demo budget: epoch_multipliers must all be at least 1, got {m}");
        }
        if self.sr_iterations > self.method_steps {
            bail!(
                "demo budget: sr_iterations = {} exceeds method_steps = {} (each self-rewarding iteration needs a step)",
                self.sr_iterations,
                self.method_steps
            );
        }
        if self.methods.is_empty() {
            bail!("demo budget: methods is empty: nothing would be compared");
        }
        for key in &self.methods {
            method_by_key(key)?;
        }
        // Sizes computed from the budget, so that none can wrap around.
        let longest = self.epoch_multipliers.iter().max().copied().unwrap_or(1);
        let sizes = [
            self.hidden_size.checked_mul(8),
            self.method_steps.checked_mul(longest),
            self.prompts_per_step.checked_mul(self.k),
            self.method_steps
                .checked_mul(longest)
                .and_then(|s| s.checked_mul(self.prompts_per_step.checked_mul(self.k)?)),
            self.human_pairs.checked_add(self.eval_prompts),
        ];
        if sizes.iter().any(Option::is_none) {
            bail!("demo budget: the sizes overflow (hidden_size, method_steps × epoch_multipliers, prompts_per_step × k, human_pairs)");
        }
        Ok(())
    }

    /// Applies `field=value` overrides (values in TOML syntax) and validates the result.
    pub fn with_overrides(self, overrides: &[String]) -> Result<Self> {
        let mut t = toml::Table::try_from(&self)?;
        for o in overrides {
            let (k, v) = o
                .split_once('=')
                .with_context(|| format!("demo override `{o}`: expected field=value"))?;
            let v: toml::Value = format!("v = {v}")
                .parse::<toml::Table>()?
                .remove("v")
                .context("no value")?;
            if !t.contains_key(k.trim()) {
                anyhow::bail!("demo override `{o}`: no budget field `{}`", k.trim());
            }
            t.insert(k.trim().to_string(), v);
        }
        let b: Self = toml::Value::Table(t).try_into()?;
        b.validate()?;
        Ok(b)
    }

    /// The seed of "human" pairs: augmentation, the reward model and the offline baselines
    /// learn from these; at least 8.
    pub fn seed_pairs(&self) -> usize {
        ((self.human_pairs as f64 * self.seed_fraction).round() as usize).max(8)
    }

    /// The adapters every LoRA stage trains (alpha = 2r).
    pub fn lora(&self) -> LoraConfig {
        LoraConfig {
            r: self.lora_r,
            lora_alpha: 2.0 * self.lora_r as f64,
            ..Default::default()
        }
    }

    /// Pairs per optimiser step of the K-sample online methods; the others match it.
    pub fn pairs_per_step(&self) -> usize {
        self.prompts_per_step * ((self.k - 1) / 2)
    }
}

/// Positions of the demo's models (and the longest tokenized example they train on).
const DEMO_POSITIONS: usize = 256;

fn judge_config() -> JudgeConfig {
    JudgeConfig {
        template: JUDGE_TEMPLATE.to_string(),
        answer_a: JUDGE_ANSWER_A.to_string(),
        answer_b: JUDGE_ANSWER_B.to_string(),
        batch_size: 32,
        ..Default::default()
    }
}

fn write_jsonl(path: &Path, rows: impl Iterator<Item = Value>) -> Result<()> {
    let text: String = rows.map(|r| r.to_string() + "\n").collect();
    crate::io::atomic_write(path, text.as_bytes())
}

/// Data files in TRL layouts for the trainers.
struct TaskFiles {
    /// Demonstrations (what preference augmentation mixes in).
    sft: PathBuf,
    /// Demonstrations and coin-flip judge-format examples (what SFT from scratch trains on).
    base: PathBuf,
    seed_prefs: PathBuf,
    prompts: PathBuf,
}

fn write_task_files(dir: &Path, data: &TaskData, seed_n: usize) -> Result<TaskFiles> {
    let f = TaskFiles {
        sft: dir.join("sft.jsonl"),
        base: dir.join("sft_and_format.jsonl"),
        seed_prefs: dir.join("human_seed.jsonl"),
        prompts: dir.join("prompts.jsonl"),
    };
    let demo = |(p, c): &(String, String)| json!({"prompt": p, "completion": format!(" {c}")});
    write_jsonl(&f.sft, data.sft.iter().map(demo))?;
    write_jsonl(
        &f.base,
        data.sft.iter().map(demo).chain(
            data.format
                .iter()
                .map(|(p, c)| json!({"prompt": p, "completion": c})),
        ),
    )?;
    write_jsonl(
        &f.seed_prefs,
        data.preferences[..seed_n].iter().map(|h| {
            json!({"prompt": h.prompt, "chosen": format!(" {}", h.chosen), "rejected": format!(" {}", h.rejected), "strength": h.strength})
        }),
    )?;
    write_jsonl(
        &f.prompts,
        data.train_prompts.iter().map(|p| json!({"prompt": p})),
    )?;
    Ok(f)
}

/// A fresh Llama for the task's vocabulary, written as a Hugging Face folder.
fn init_model(dir: &Path, vocab: &[String], b: &DemoBudget, seed: u64) -> Result<()> {
    let n = write_tokenizer(dir, vocab)?;
    let cfg = ModelConfig::from_json(&json!({
        "model_type": "llama", "vocab_size": n, "hidden_size": b.hidden_size,
        "intermediate_size": (8 * b.hidden_size / 3).div_ceil(16) * 16, "num_hidden_layers": b.layers,
        "num_attention_heads": b.heads, "num_key_value_heads": b.heads, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": DEMO_POSITIONS, "tie_word_embeddings": true,
        "bos_token_id": 2, "eos_token_id": 3,
    }))?;
    let model = Llama::new(
        &cfg,
        random_weights(&cfg, seed, 0.02, &candle_core::Device::Cpu)?,
        Trainable::None,
    )?;
    let tok = crate::tokenizer::Tokenizer::from_hf_dir(dir)?;
    crate::model::export::save_hf_model(&model, &tok, Some(dir), dir)
}

fn train_section(
    out: &Path,
    steps: usize,
    batch: usize,
    seed: u64,
    eval_every: usize,
) -> TrainSection {
    TrainSection {
        steps,
        batch_size: batch,
        seed,
        max_len: DEMO_POSITIONS,
        eval_every,
        save_every: 0,
        out: out.to_path_buf(),
        ..Default::default()
    }
}

/// Per-method results on one task (the keys of summary.json).
#[derive(Debug, Clone, Serialize)]
pub struct MethodResult {
    pub win_rate_vs_sft: f64,
    pub win_rate_vs_sft_se: f64,
    pub greedy_win_rate_vs_sft: f64,
    pub win_rate_vs_chosen: f64,
    pub oracle_reward: f64,
    /// Standard error of `oracle_reward` (its standard deviation over prompts / √n).
    pub oracle_reward_se: f64,
    pub kl: f64,
    pub mean_length: f64,
    pub ood_win_rate_vs_sft: f64,
    pub ood_win_rate_vs_sft_se: f64,
    pub judge_before_augmentation: JudgeSummary,
    pub judge_after_augmentation: JudgeSummary,
    pub judge_on_own_samples: JudgeSummary,
    /// (step, oracle win rate vs SFT on the curve prompts) during training.
    pub win_rate_curve: Vec<(usize, f64)>,
    /// (step, mean response length on the curve prompts) during training.
    pub length_curve: Vec<(usize, f64)>,
    pub train_seconds: f64,
}

/// Everything one task needs while its methods run.
struct TaskCtx<'a> {
    task: &'a dyn Task,
    b: &'a DemoBudget,
    files: &'a TaskFiles,
    /// πref, where every method starts.
    start_model: ModelSection,
    tok: crate::tokenizer::Tokenizer,
    sft: LoadedModel,
    reference: Llama,
    heldout: EvalSet,
    ood: EvalSet,
    curve: EvalSet,
    /// SFT samples (temperature 1) on each set, with the seeds every policy uses.
    sft_heldout: Vec<String>,
    sft_greedy: Vec<String>,
    sft_ood: Vec<String>,
    sft_curve: Vec<String>,
    /// Held-out human pairs' prompts and chosen responses, for the win rate vs chosen.
    chosen_prompts: EvalSet,
    chosen: Vec<String>,
    judge: Judge,
    judge_before: JudgeSummary,
    judge_after: JudgeSummary,
    /// Held-out human pairs oriented by the oracle: the OSP judge's test, and the baselines'.
    judge_eval: Vec<crate::data::PreferencePair>,
    /// The same pairs as a file (the reward model's held-out set).
    judge_eval_file: PathBuf,
    /// The baselines' own judges on `judge_eval` (summary.json's `baseline_judges`).
    baseline_judges: std::cell::RefCell<Map<String, Value>>,
    seed: u64,
}

const SEED_HELDOUT: u64 = 1_000;
const SEED_OOD: u64 = 2_000_000;
const SEED_CURVE: u64 = 3_000_000;
const SEED_OWN: u64 = 4_000_000;

impl TaskCtx<'_> {
    fn curve_point(&self, policy: &Llama) -> Result<(f64, f64)> {
        let snap = policy.snapshot()?;
        let g = self.curve.sample(
            &snap,
            &self.tok,
            1.0,
            self.b.max_new_tokens,
            SEED_CURVE + self.seed,
        )?;
        let len = mean_std(&g.iter().map(|g| g.tokens.len() as f64).collect::<Vec<_>>()).0;
        let w = win_rate(&outcomes(
            self.task,
            &self.curve.prompts,
            &texts(&g),
            &self.sft_curve,
        ))
        .0;
        Ok((w, len))
    }

    fn evaluate(
        &self,
        policy: &Llama,
        curve: Vec<CurvePoint>,
        train_seconds: f64,
    ) -> Result<MethodResult> {
        let snap = policy.snapshot()?;
        let (tok, task, b) = (&self.tok, self.task, self.b);
        let g = self
            .heldout
            .sample(&snap, tok, 1.0, b.max_new_tokens, SEED_HELDOUT + self.seed)?;
        let ours = texts(&g);
        let (w, se) = win_rate(&outcomes(
            task,
            &self.heldout.prompts,
            &ours,
            &self.sft_heldout,
        ));
        let greedy = texts(&self.heldout.sample(&snap, tok, 0.0, b.max_new_tokens, 0)?);
        let (gw, _) = win_rate(&outcomes(
            task,
            &self.heldout.prompts,
            &greedy,
            &self.sft_greedy,
        ));
        let vs_chosen = texts(&self.chosen_prompts.sample(
            &snap,
            tok,
            1.0,
            b.max_new_tokens,
            SEED_HELDOUT + 7 + self.seed,
        )?);
        let (wc, _) = win_rate(&outcomes(
            task,
            &self.chosen_prompts.prompts,
            &vs_chosen,
            &self.chosen,
        ));
        let rewards: Vec<f64> = self
            .heldout
            .prompts
            .iter()
            .zip(&ours)
            .map(|(p, r)| task.reward(p, r))
            .collect();
        let ood =
            texts(
                &self
                    .ood
                    .sample(&snap, tok, 1.0, b.max_new_tokens, SEED_OOD + self.seed)?,
            );
        let (ow, ose) = win_rate(&outcomes(task, &self.ood.prompts, &ood, &self.sft_ood));
        let own = judge_own_samples(
            task,
            &self.judge,
            &snap,
            tok,
            &self.heldout,
            b.max_new_tokens,
            SEED_OWN + self.seed,
        )?;
        Ok(MethodResult {
            win_rate_vs_sft: w,
            win_rate_vs_sft_se: se,
            greedy_win_rate_vs_sft: gw,
            win_rate_vs_chosen: wc,
            oracle_reward: mean_std(&rewards).0,
            oracle_reward_se: crate::eval::win_rate(&rewards).1,
            kl: kl_estimate(&snap, &self.reference, &self.heldout, &g)?,
            mean_length: mean_std(&g.iter().map(|g| g.tokens.len() as f64).collect::<Vec<_>>()).0,
            ood_win_rate_vs_sft: ow,
            ood_win_rate_vs_sft_se: ose,
            judge_before_augmentation: self.judge_before.clone(),
            judge_after_augmentation: self.judge_after.clone(),
            judge_on_own_samples: own,
            win_rate_curve: curve.iter().map(|&(s, w, _)| (s, w)).collect(),
            length_curve: curve.iter().map(|&(s, _, l)| (s, l)).collect(),
            train_seconds,
        })
    }
}

/// Runs the demo; returns the summary written to `out/summary.json`.
pub fn run_demo(opts: &DemoOptions) -> Result<Value> {
    let start = Instant::now();
    let b = DemoBudget::new(opts.quick).with_overrides(&opts.overrides)?;
    let methods: Vec<(String, Option<Method>)> = b
        .methods
        .iter()
        .map(|k| Ok((k.clone(), method_by_key(k)?)))
        .collect::<Result<_>>()?;
    let tasks = if opts.tasks.is_empty() {
        all_tasks()
    } else {
        opts.tasks
            .iter()
            .map(|t| super::tasks::task_by_name(t))
            .collect::<Result<Vec<_>>>()?
    };
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create {}", opts.out.display()))?;
    let mut tasks_out = Map::new();
    let mut stage_seconds: BTreeMap<String, f64> = BTreeMap::new();
    let mut strength_by_rank: Map<String, Value> = Map::new();
    let mut references = Map::new();
    let mut studies = Map::new();
    let mut claims = Map::new();
    let mut baseline_judges = Map::new();
    for task in tasks {
        let name = task.name();
        let dir = opts.out.join(name);
        let mut clock = Instant::now();
        let mut lap = |stage: &str, clock: &mut Instant| {
            stage_seconds.insert(format!("{name}/{stage}"), clock.elapsed().as_secs_f64());
            *clock = Instant::now();
        };
        eprintln!("== {name}: data and a fresh model");
        let seed_n = b.seed_pairs();
        let sizes = TaskSizes {
            sft: b.sft_examples,
            preferences: seed_n + b.eval_prompts,
            heldout: b.eval_prompts,
            ood: b.ood_prompts,
            train_prompts: 400,
            format: (b.sft_examples as f64 * b.format_fraction).round() as usize,
        };
        let data = build_task_data(task.as_ref(), &sizes, opts.seed);
        let files = write_task_files(&dir, &data, seed_n)?;
        let init = dir.join("init");
        init_model(&init, &task.vocabulary(), &b, opts.seed)?;
        lap("data", &mut clock);

        eprintln!("== {name}: SFT from scratch ({} steps)", b.sft_steps);
        let sft_cfg = SftConfig {
            model: ModelSection {
                path: init.clone(),
                train: TrainMode::Full,
                ..Default::default()
            },
            lora: LoraConfig::default(),
            optim: OptimConfig {
                lr: b.sft_lr,
                warmup_steps: b.sft_steps / 20,
                weight_decay: 0.01,
                ..Default::default()
            },
            train: train_section(
                &dir.join("sft"),
                b.sft_steps,
                b.sft_batch,
                opts.seed,
                b.sft_steps,
            ),
            data: SftData {
                train: files.base.clone(),
                eval_fraction: 0.05,
                ..Default::default()
            },
        };
        let sft_out = run_sft(&sft_cfg, false, None)?;
        let sft_dir = sft_out.output.clone();
        lap("sft_training", &mut clock);

        eprintln!(
            "== {name}: preference augmentation on {seed_n} seed pairs ({} steps)",
            b.pa_steps
        );
        let pa_cfg = JudgeTrainConfig {
            model: ModelSection {
                path: sft_dir.clone(),
                train: if b.pa_full {
                    TrainMode::Full
                } else {
                    TrainMode::Lora
                },
                ..Default::default()
            },
            lora: b.lora(),
            optim: OptimConfig {
                lr: b.pa_lr,
                ..Default::default()
            },
            train: train_section(
                &dir.join("augmentation"),
                b.pa_steps,
                b.pa_batch,
                opts.seed,
                0,
            ),
            judge: judge_config(),
            self_reward: Default::default(),
            data: JudgeTrainData {
                preferences: files.seed_prefs.clone(),
                sft: Some(files.sft.clone()),
                sft_mix: b.pa_sft_mix,
                eval_fraction: 0.0,
                ..Default::default()
            },
        };
        let pa = run_judge_train(&pa_cfg, false, None)?;
        lap("augmentation_training", &mut clock);

        // Judge quality on held-out human pairs, oriented by the oracle.
        let held: Vec<(String, String, String)> = data.preferences[seed_n..]
            .iter()
            .map(|h| {
                (
                    h.prompt.clone(),
                    format!(" {}", h.chosen),
                    format!(" {}", h.rejected),
                )
            })
            .collect();
        let judge_eval = oracle_pairs(task.as_ref(), &held, HUMAN_TEMPERATURE);
        let judge_eval_file = dir.join("human_heldout_oracle.jsonl");
        write_jsonl(
            &judge_eval_file,
            judge_eval.iter().map(|p| {
                json!({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "strength": p.strength})
            }),
        )?;
        let sft = load_model(&sft_dir, None, &candle_core::Device::Cpu, Trainable::None)?;
        let tok = sft.tokenizer.clone();
        let judge = Judge::new(judge_config(), &tok)?;
        let judge_before =
            JudgeSummary::from(&judge.evaluate(&sft.model.snapshot()?, &tok, &judge_eval)?);
        // πref: the augmented model (full weights, or SFT with the augmentation adapter).
        let start_section = if b.pa_full {
            ModelSection {
                path: pa.output.clone(),
                ..Default::default()
            }
        } else {
            ModelSection {
                path: sft_dir.clone(),
                adapter: Some(pa.output.clone()),
                ..Default::default()
            }
        };
        let reference =
            crate::train::policy::load_policy(&start_section, &LoraConfig::default(), 0, true)?
                .model
                .without_adapter();
        let judge_after =
            JudgeSummary::from(&judge.evaluate(&reference.snapshot()?, &tok, &judge_eval)?);
        eprintln!(
            "   judge accuracy vs oracle: {:.3} before, {:.3} after augmentation",
            judge_before.accuracy, judge_after.accuracy
        );

        let (chosen_prompts, chosen_responses): (Vec<String>, Vec<String>) = data.preferences
            [seed_n..]
            .iter()
            .map(|h| (h.prompt.clone(), h.chosen.clone()))
            .unzip();
        let sft_snap = sft.model.snapshot()?;
        let heldout = EvalSet::new(&tok, &data.heldout)?;
        let ood = EvalSet::new(&tok, &data.ood)?;
        let curve = EvalSet::new(
            &tok,
            &data.heldout[..b.curve_prompts.min(data.heldout.len())],
        )?;
        let m = b.max_new_tokens;
        let ctx = TaskCtx {
            task: task.as_ref(),
            b: &b,
            files: &files,
            start_model: start_section,
            sft_heldout: texts(&heldout.sample(
                &sft_snap,
                &tok,
                1.0,
                m,
                SEED_HELDOUT + opts.seed,
            )?),
            sft_greedy: texts(&heldout.sample(&sft_snap, &tok, 0.0, m, 0)?),
            sft_ood: texts(&ood.sample(&sft_snap, &tok, 1.0, m, SEED_OOD + opts.seed)?),
            sft_curve: texts(&curve.sample(&sft_snap, &tok, 1.0, m, SEED_CURVE + opts.seed)?),
            chosen_prompts: EvalSet::new(&tok, &chosen_prompts)?,
            chosen: chosen_responses,
            judge,
            tok,
            sft,
            reference,
            heldout,
            ood,
            curve,
            judge_before,
            judge_after,
            judge_eval,
            judge_eval_file,
            baseline_judges: Default::default(),
            seed: opts.seed,
        };
        lap("reference_samples", &mut clock);

        // Every method starts from πref: its curve point at step 0 is the same for all, and
        // its own evaluation shows what augmentation did to generation.
        let start = ctx.curve_point(&ctx.reference)?;
        let r = ctx.evaluate(&ctx.reference, vec![], 0.0)?;
        eprintln!(
            "   πref (SFT + augmentation): win rate vs SFT {:.3} ± {:.3}, oracle reward {:.3}",
            r.win_rate_vs_sft, r.win_rate_vs_sft_se, r.oracle_reward
        );
        references.insert(name.to_string(), serde_json::to_value(&r)?);
        let mut results = Map::new();
        for (key, method) in &methods {
            eprintln!("== {name}: {key}");
            let t = Instant::now();
            let (policy, curve_pts) = match method {
                None => (ctx.sft.model.clone(), vec![]),
                Some(m) => {
                    train_method(&ctx, &b, *m, &dir.join(key), start, &mut strength_by_rank)?
                }
            };
            let secs = t.elapsed().as_secs_f64();
            let r = ctx.evaluate(&policy, curve_pts, secs)?;
            log_result(&r);
            results.insert(key.to_string(), serde_json::to_value(&r)?);
            lap(&format!("method_{key}"), &mut clock);
        }
        let study = run_studies(&ctx, &results, &dir, start, seed_n)?;
        let judges = ctx.baseline_judges.take();
        if !judges.is_empty() {
            baseline_judges.insert(name.to_string(), Value::Object(judges));
        }
        claims.insert(name.to_string(), super::methods::claims(&results));
        tasks_out.insert(name.to_string(), Value::Object(results));
        if !study.is_empty() {
            studies.insert(name.to_string(), Value::Object(study));
            lap("studies", &mut clock);
        }
    }
    let summary = json!({
        "seed": opts.seed,
        "quick": opts.quick,
        "config": b,
        "seed_pairs": b.seed_pairs(),
        "stage_seconds": stage_seconds,
        "wall_seconds": start.elapsed().as_secs_f64(),
        "strength_by_rank": strength_by_rank,
        "reference": references,
        "studies": studies,
        "claims": claims,
        "baseline_judges": baseline_judges,
        "tasks": tasks_out,
    });
    crate::io::save_json(&opts.out.join("summary.json"), &summary)?;
    super::report::write_report(&opts.out, &summary)?;
    Ok(summary)
}

/// (optimiser step, oracle win rate vs SFT, mean response length) during training.
type CurvePoint = (usize, f64, f64);

/// Trains one method from πref (SFT + augmentation, merged) with fresh LoRA adapters;
/// returns the trained policy and its (step, win rate, length) curve.
fn train_method(
    ctx: &TaskCtx,
    b: &DemoBudget,
    method: Method,
    out: &Path,
    start: (f64, f64),
    strength_by_rank: &mut Map<String, Value>,
) -> Result<(Llama, Vec<CurvePoint>)> {
    if method == Method::Ppo {
        return train_ppo(ctx, b, out, start);
    }
    let seed = ctx.seed;
    let online = method.is_online();
    let batch = match method {
        Method::OnlineDpo => b.pairs_per_step(), // one pair per prompt
        // One pair per prompt too, but the same prompts and samples as OSP (fewer pairs).
        Method::SelfRewarding => b.prompts_per_step,
        m if m.is_online() => b.prompts_per_step,
        _ => b.pairs_per_step(),
    };
    let mut cfg = TrainConfig {
        method,
        model: ctx.start_model.clone(),
        lora: b.lora(),
        optim: OptimConfig {
            lr: b.method_lr,
            schedule: crate::train::optim::Schedule::Constant,
            ..Default::default()
        },
        train: train_section(out, b.method_steps, batch, seed, b.eval_every),
        judge: JudgeConfig {
            model: b.judge_model,
            ..judge_config()
        },
        data: PrefData {
            prompts: online.then(|| ctx.files.prompts.clone()),
            preferences: (!online).then(|| ctx.files.seed_prefs.clone()),
            eval_fraction: 0.0,
            ..Default::default()
        },
        ..Default::default()
    };
    cfg.loss.beta = b.beta;
    if method == Method::Cdpo {
        cfg.loss.label_smoothing = 0.1;
    }
    if method == Method::SelfRewarding {
        cfg.model = teach_pointwise_judge(ctx, b, &out.join("pointwise_judge"))?;
        cfg.self_reward = score_config();
        cfg.self_rewarding.iterations = b.sr_iterations;
    }
    cfg.pairing.k = b.k;
    cfg.sampling.max_new_tokens = b.max_new_tokens;
    cfg.resolve()?;
    let mut curve = vec![(0, start.0, start.1)];
    let policy = if online {
        let mut run = crate::train::online::OnlineRun::new(&cfg, false)?;
        let mut points = vec![];
        run.run(None, |r| {
            let step = r.trainer.step();
            if step % b.eval_every == 0 || step == b.method_steps {
                let (w, l) = ctx.curve_point(&r.trainer.model)?;
                points.push((step, w, l));
            }
            Ok(())
        })?;
        curve.extend(points);
        if method == Method::Osp {
            strength_by_rank.insert(
                ctx.task.name().to_string(),
                strength_histograms(&out.join("metrics.jsonl"))?,
            );
        }
        run.trainer.model.clone()
    } else {
        let mut points = vec![];
        let mut last: Option<Llama> = None;
        crate::train::offline::run_offline_with(&cfg, false, None, &mut |step, model| {
            let (w, l) = ctx.curve_point(model)?;
            points.push((step, w, l));
            last = Some(model.clone());
            Ok(())
        })?;
        curve.extend(points);
        last.context("the offline run never evaluated")?
    };
    Ok((policy, curve))
}

/// The self-rewarding judge of the demo: the tasks' word-level score prompt and answers.
fn score_config() -> crate::self_reward::SelfRewardConfig {
    crate::self_reward::SelfRewardConfig {
        template: SCORE_TEMPLATE.to_string(),
        answers: SCORE_ANSWERS.iter().map(|a| a.to_string()).collect(),
        batch_size: 32,
        ..Default::default()
    }
}

/// The baselines' judges train from πref as augmentation trained the OSP judge from SFT:
/// every weight (or LoRA, without `pa_full`), `pa_batch` examples a step at `pa_lr`.
fn judge_start(ctx: &TaskCtx) -> ModelSection {
    ModelSection {
        train: if ctx.b.pa_full {
            TrainMode::Full
        } else {
            TrainMode::Lora
        },
        ..ctx.start_model.clone()
    }
}

/// Teaches πref the self-rewarding pointwise judge on the seed pairs (`judge-train`
/// `data.mode = "pointwise"`, with SFT mixed in as augmentation does); records its accuracy on
/// the held-out oracle-oriented pairs and returns the model the method starts from.
fn teach_pointwise_judge(ctx: &TaskCtx, b: &DemoBudget, out: &Path) -> Result<ModelSection> {
    eprintln!(
        "   pointwise judge on the seed pairs ({} steps)",
        b.sr_judge_steps
    );
    let cfg = JudgeTrainConfig {
        model: judge_start(ctx),
        lora: b.lora(),
        optim: OptimConfig {
            lr: b.pa_lr,
            ..Default::default()
        },
        train: train_section(out, b.sr_judge_steps, b.pa_batch, ctx.seed, 0),
        judge: judge_config(),
        self_reward: score_config(),
        data: JudgeTrainData {
            preferences: ctx.files.seed_prefs.clone(),
            sft: Some(ctx.files.sft.clone()),
            sft_mix: b.pa_sft_mix,
            eval_fraction: 0.0,
            mode: crate::train::judge_train::JudgeMode::Pointwise,
            ..Default::default()
        },
    };
    let taught = run_judge_train(&cfg, false, None)?;
    // A LoRA judge is an adapter on πref, which itself may be SFT + an adapter: merge πref's
    // first (load_policy does), so that the method's start is one base and one adapter.
    let start = if b.pa_full {
        ModelSection {
            path: taught.output.clone(),
            ..Default::default()
        }
    } else {
        let merged = out.join("start_merged");
        let lm =
            crate::train::policy::load_policy(&ctx.start_model, &LoraConfig::default(), 0, true)?;
        crate::model::export::save_hf_model(
            &lm.model.without_adapter(),
            &lm.tokenizer,
            Some(&ctx.start_model.path),
            &merged,
        )?;
        ModelSection {
            path: merged,
            adapter: Some(taught.output.clone()),
            ..Default::default()
        }
    };
    let model = crate::train::policy::load_policy(&start, &LoraConfig::default(), 0, true)?
        .model
        .without_adapter();
    let judge = crate::self_reward::SelfJudge::new(score_config(), &ctx.tok)?;
    let limit = model.cfg.max_position_embeddings;
    let items: Vec<(&str, &str)> = ctx
        .judge_eval
        .iter()
        .flat_map(|p| {
            [
                (p.prompt.as_str(), p.chosen.as_str()),
                (p.prompt.as_str(), p.rejected.as_str()),
            ]
        })
        .collect();
    let scores = judge.score_with(&items, &mut |chunk| {
        let ids = chunk
            .iter()
            .map(|(x, y)| judge.encode(&ctx.tok, x, y, limit))
            .collect::<Result<Vec<_>>>()?;
        judge.answer_logits(&model, &ids)
    })?;
    let right: Vec<f64> = scores
        .chunks(2)
        .map(|c| match c[0].expected.partial_cmp(&c[1].expected) {
            Some(std::cmp::Ordering::Greater) => 1.0,
            Some(std::cmp::Ordering::Equal) => 0.5,
            _ => 0.0,
        })
        .collect();
    let (accuracy, se) = win_rate(&right);
    let mean = |k: usize| {
        mean_std(
            &scores
                .iter()
                .skip(k)
                .step_by(2)
                .map(|s| s.expected)
                .collect::<Vec<_>>(),
        )
        .0
    };
    eprintln!("   pointwise judge accuracy vs oracle: {accuracy:.3} ± {se:.3}");
    ctx.baseline_judges.borrow_mut().insert(
        "self_rewarding_judge".into(),
        json!({"heldout_accuracy": accuracy, "heldout_accuracy_se": se, "pairs": right.len(),
               "mean_score_better": mean(0), "mean_score_worse": mean(1),
               "steps": b.sr_judge_steps}),
    );
    Ok(start)
}

/// RLHF: a reward model trained from πref on the seed pairs (Bradley–Terry, `osp rm-train`),
/// then PPO from πref against it with fresh LoRA adapters. Equal budget with the online
/// methods: `prompts_per_step` prompts and K samples a rollout, and one PPO epoch over one
/// mini-batch, so each rollout is one optimiser step on the same samples OSP gets.
fn train_ppo(
    ctx: &TaskCtx,
    b: &DemoBudget,
    out: &Path,
    start: (f64, f64),
) -> Result<(Llama, Vec<CurvePoint>)> {
    use crate::reward::train::{run_rm_train, RmData, RmTrainConfig};
    eprintln!("   reward model on the seed pairs ({} steps)", b.rm_steps);
    let rm_cfg = RmTrainConfig {
        model: judge_start(ctx),
        lora: b.lora(),
        optim: OptimConfig {
            lr: b.pa_lr,
            ..Default::default()
        },
        train: train_section(
            &out.join("reward_model"),
            b.rm_steps,
            b.pa_batch,
            ctx.seed,
            0,
        ),
        reward: Default::default(),
        data: RmData {
            preferences: ctx.files.seed_prefs.clone(),
            eval: Some(ctx.judge_eval_file.clone()),
            eval_fraction: 0.0,
            ..Default::default()
        },
    };
    let rm = run_rm_train(&rm_cfg, false, None)?;
    let stats = |e: Option<crate::reward::train::RmEval>| {
        e.map(|e| json!({"accuracy": e.stats.accuracy, "margin": e.stats.margin, "pairs": e.pairs}))
    };
    if let Some(a) = rm.after {
        eprintln!(
            "   reward model accuracy vs oracle: {:.3} on {} held-out pairs",
            a.stats.accuracy, a.pairs
        );
    }
    ctx.baseline_judges.borrow_mut().insert(
        "reward_model".into(),
        json!({"before": stats(rm.before), "after": stats(rm.after), "steps": b.rm_steps}),
    );
    let mut cfg = TrainConfig {
        method: Method::Ppo,
        model: ctx.start_model.clone(),
        lora: b.lora(),
        optim: OptimConfig {
            lr: b.method_lr,
            schedule: crate::train::optim::Schedule::Constant,
            ..Default::default()
        },
        train: train_section(
            out,
            b.method_steps,
            b.prompts_per_step,
            ctx.seed,
            b.eval_every,
        ),
        data: PrefData {
            prompts: Some(ctx.files.prompts.clone()),
            eval_fraction: 0.0,
            ..Default::default()
        },
        ..Default::default()
    };
    cfg.pairing.k = b.k;
    cfg.sampling.max_new_tokens = b.max_new_tokens;
    cfg.ppo.num_ppo_epochs = 1;
    cfg.ppo.num_mini_batches = 1;
    cfg.ppo.reward_model = Some(rm.output.clone());
    cfg.resolve()?;
    let mut run = crate::train::ppo::PpoRun::new(&cfg, false)?;
    let mut curve = vec![(0, start.0, start.1)];
    let mut last = 0;
    run.run_with(None, |r| {
        let step = r.trainer.step();
        let crossed = step / b.eval_every != last / b.eval_every;
        if step > last && (crossed || step == b.method_steps) {
            let (w, l) = ctx.curve_point(&r.trainer.model)?;
            curve.push((step, w, l));
        }
        last = step;
        Ok(())
    })?;
    Ok((run.trainer.model.clone(), curve))
}

/// The budget's studies on one task (empty when none is on):
/// - `lr_collapse`: online DPO, OSP-hard and OSP again at `method_lr × collapse_lr_factor`,
///   where the paper reports that hard-label online methods collapse and soft strengths do not;
/// - `epochs`: DPO (binary labels) and offline SPCE (the seed's strengths) trained for
///   `method_steps × m` steps on the same seed pairs, with their win-rate curves, to see whether
///   DPO degrades with more epochs while SPCE does not. `compared` holds the main comparison's
///   results, which stand in for the 1× runs of methods it ran.
fn run_studies(
    ctx: &TaskCtx,
    compared: &Map<String, Value>,
    dir: &Path,
    start: (f64, f64),
    seed_pairs: usize,
) -> Result<Map<String, Value>> {
    let b = ctx.b;
    let mut out = Map::new();
    if b.collapse_lr_factor > 0.0 {
        let lr = b.method_lr * b.collapse_lr_factor;
        let hot = DemoBudget {
            method_lr: lr,
            ..b.clone()
        };
        let mut runs = Map::new();
        runs.insert("lr".into(), json!(lr));
        for (key, m) in [
            ("online_dpo", Method::OnlineDpo),
            ("osp_hard", Method::OspHard),
            ("osp", Method::Osp),
        ] {
            eprintln!("== {}: study, {key} at lr {lr:e}", ctx.task.name());
            let run_dir = dir.join(format!("study_lr_{key}"));
            let r = study_run(ctx, &hot, m, &run_dir, start)?;
            runs.insert(key.into(), serde_json::to_value(&r)?);
        }
        out.insert("lr_collapse".into(), Value::Object(runs));
    }
    if !b.epoch_multipliers.is_empty() {
        let mut runs = Map::new();
        for (key, m) in [("dpo", Method::Dpo), ("spce_offline", Method::SpceOffline)] {
            let mut rows = vec![];
            for &mult in &b.epoch_multipliers {
                let steps = b.method_steps * mult.max(1);
                let long = DemoBudget {
                    method_steps: steps,
                    eval_every: (steps / 6).max(1),
                    ..b.clone()
                };
                let epochs = (steps * b.pairs_per_step()) as f64 / seed_pairs.max(1) as f64;
                eprintln!(
                    "== {}: study, {key} for {steps} steps ({epochs:.1} epochs)",
                    ctx.task.name()
                );
                // At 1× the main comparison already trained exactly this run (evaluation
                // does not touch training's random streams): reuse it.
                let r = match compared.get(key) {
                    Some(done) if steps == b.method_steps => {
                        eprintln!("   the same run as the main comparison's {key}");
                        done.clone()
                    }
                    _ => {
                        let run_dir = dir.join(format!("study_epochs_{key}_x{mult}"));
                        serde_json::to_value(study_run(ctx, &long, m, &run_dir, start)?)?
                    }
                };
                let mut row = json!({"multiplier": mult, "steps": steps, "epochs": epochs});
                for k in [
                    "win_rate_vs_sft",
                    "win_rate_vs_sft_se",
                    "oracle_reward",
                    "kl",
                    "win_rate_curve",
                ] {
                    row[k] = r[k].clone();
                }
                rows.push(row);
            }
            runs.insert(key.into(), json!(rows));
        }
        runs.insert("seed_pairs".into(), json!(seed_pairs));
        out.insert("epochs".into(), Value::Object(runs));
    }
    Ok(out)
}

/// One study run: train `method` from πref under budget `b`, then evaluate it.
fn study_run(
    ctx: &TaskCtx,
    b: &DemoBudget,
    method: Method,
    out: &Path,
    start: (f64, f64),
) -> Result<MethodResult> {
    let t = Instant::now();
    let mut scratch = Map::new(); // strength histograms of study runs are not reported
    let (policy, curve) = train_method(ctx, b, method, out, start, &mut scratch)?;
    let r = ctx.evaluate(&policy, curve, t.elapsed().as_secs_f64())?;
    log_result(&r);
    Ok(r)
}

fn log_result(r: &MethodResult) {
    eprintln!(
        "   win rate vs SFT {:.3} ± {:.3}, oracle reward {:.3}, KL {:.2}",
        r.win_rate_vs_sft, r.win_rate_vs_sft_se, r.oracle_reward, r.kl
    );
}

/// Sum over the run of the judged-strength histogram per ranked-pair position.
fn strength_histograms(metrics: &Path) -> Result<Value> {
    let lines = crate::train::metrics::read_metrics(metrics)?;
    let mut sums: Vec<Vec<u64>> = vec![];
    for l in &lines {
        if let Some(ranks) = l.get("judge/strength_by_rank").and_then(Value::as_array) {
            sums.resize(
                ranks.len().max(sums.len()),
                vec![0; crate::train::online::STRENGTH_BINS],
            );
            for (r, h) in ranks.iter().enumerate() {
                for (i, c) in h.as_array().into_iter().flatten().enumerate() {
                    if i < sums[r].len() {
                        sums[r][i] += c.as_u64().unwrap_or(0);
                    }
                }
            }
        }
    }
    Ok(json!(sums))
}
