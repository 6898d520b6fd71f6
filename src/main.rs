//! The `osp` command line.
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use osp::model::{load_model, Trainable};
use osp::sample::{generate, Request, SamplingParams};
use std::path::PathBuf;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "osp",
    version,
    about = "Online Self-Preferring alignment of language models"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a Hugging Face model folder or a llama2.c checkpoint.
    Generate(GenerateArgs),
    /// Describe a model: architecture, parameter count, tokenizer, special tokens.
    Inspect(InspectArgs),
    /// Supervised fine-tuning (LoRA or full) from a TOML config.
    Sft(RunArgs),
    /// Write a Hugging Face checkpoint with a LoRA adapter merged into its base.
    Export(ExportArgs),
    /// Preference training: OSP, its ablations, online DPO, and offline DPO/IPO/cDPO/SPCE.
    Train(RunArgs),
    /// Preference augmentation: teach the model to judge from seed preferences.
    JudgeTrain(RunArgs),
    /// Score the model as a judge on labelled preference pairs.
    Judge(JudgeArgs),
    /// Win rate of a trained adapter over its starting model on held-out prompts, by a
    /// judge that is not being trained, with KL and lengths.
    Compare(CompareArgs),
    /// Train a reward model (scalar head, Bradley–Terry loss) on preference pairs.
    RmTrain(RunArgs),
    /// The built-in demo: oracle tasks, SFT from scratch, augmentation, every method, a report.
    Demo(DemoArgs),
    /// Time sampling and a LoRA training step on a random model of a named shape.
    Bench(BenchArgs),
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Device: cpu, or cuda / cuda:N with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Model shapes: smollm2-135m, d512, d256 (repeatable).
    #[arg(long = "shape", default_values_t = ["smollm2-135m".to_string(), "d512".to_string()])]
    shapes: Vec<String>,
    /// Sequences per sampling and training batch.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Prompt tokens before sampling.
    #[arg(long, default_value_t = 16)]
    prompt: usize,
    /// New tokens per sampled sequence.
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    /// Tokens per training sequence.
    #[arg(long, default_value_t = 128)]
    seq: usize,
    /// Timed repeats after one warm-up (the median is printed).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

#[derive(clap::Args)]
struct DemoArgs {
    /// The small budget (about a minute on 2 cores; what the tests run).
    #[arg(long)]
    quick: bool,
    /// Output folder: summary.json, report.md, plots, run folders.
    #[arg(long, default_value = "demo-out")]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Override a budget field (see summary.json's `config`): --set pa_steps=400.
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    set: Vec<String>,
    /// Run only this task (repeatable; default: every task).
    #[arg(long, value_name = "NAME")]
    task: Vec<String>,
    /// Run once per seed into OUT/seed-S and aggregate (mean, spread, claims) into
    /// OUT/seeds.json and OUT/seeds.md: --seeds 0,1,2. Overrides --seed.
    #[arg(long, value_delimiter = ',', value_name = "S,S,...")]
    seeds: Vec<u64>,
    /// Add the studies: a learning-rate collapse run (online methods at 3× the learning
    /// rate) and an epoch study (DPO and offline SPCE for 1×, 4× and 16× the steps). Same as
    /// --set collapse_lr_factor=3 --set epoch_multipliers=[1,4,16]. With --seeds, on the
    /// first seed only.
    #[arg(long)]
    studies: bool,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The run's TOML config (see --print-config for every field and default).
    #[arg(long, required_unless_present = "print_config")]
    config: Option<PathBuf>,
    /// The method (osp train only); overrides `method` in the config.
    #[arg(long, value_enum)]
    method: Option<osp::train::method::Method>,
    /// Override a config field: --set section.field=value (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Continue the run in train.out from its newest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Stop after this many optimiser steps (with a checkpoint); continue later with --resume.
    #[arg(long)]
    stop_after: Option<usize>,
    /// Print the documented default config and exit.
    #[arg(long)]
    print_config: bool,
    /// The reward model folder of `osp train --method ppo` (sets ppo.reward_model).
    #[arg(long, value_name = "DIR")]
    reward_model: Option<PathBuf>,
}

#[derive(clap::Args)]
struct JudgeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Labelled preference pairs (TRL JSON/JSONL, HH .jsonl.gz, TL;DR comparisons, PandaLM).
    #[arg(long)]
    data: PathBuf,
    /// Data layout: auto, trl, hh, tldr, pandalm.
    #[arg(long, default_value = "auto")]
    format: String,
    /// Judge only the first N pairs.
    #[arg(long)]
    limit: Option<usize>,
    /// Judge settings: --set judge.field=value (as in a config's [judge] section).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Write one JSON line per pair (index, strength s(chosen ≻ rejected), both orders'
    /// p_AB, the data's strength, whether the judge agrees) to this file.
    #[arg(long)]
    verdicts: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(clap::Args)]
struct CompareArgs {
    /// The base model (Hugging Face folder, GGUF file or llama2.c .bin).
    #[arg(long)]
    model: PathBuf,
    /// Tokenizer file or folder, when it is not beside the model.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Device: cpu, or cuda / cuda:N with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The starting model's adapter, merged into the base (a training config's
    /// model.adapter): the baseline is base + this adapter. Default: the base alone.
    #[arg(long)]
    start_adapter: Option<PathBuf>,
    /// The trained adapter (RUN/adapter), applied on top of the starting model. Without it the
    /// policy is the starting model (a win rate of ½ up to sampling noise).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The judge: "start" (the frozen starting model) or "base" (the base model alone).
    #[arg(long, default_value = "start", value_parser = ["start", "base"])]
    judge: String,
    /// A judge of its own: the base model with this adapter (e.g. an augmented judge).
    /// Overrides --judge.
    #[arg(long)]
    judge_adapter: Option<PathBuf>,
    /// Prompt-only records (TRL `{"prompt"}`, text or messages), JSON or JSONL.
    #[arg(long)]
    prompts: PathBuf,
    /// Use only the first N prompts.
    #[arg(long)]
    limit: Option<usize>,
    /// Responses per prompt from each model.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    samples: u64,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Seed of the samples (the same for both models).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Judge settings: --set judge.field=value (as in a config's [judge] section).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ExportArgs {
    /// The base model (Hugging Face folder, GGUF file or llama2.c .bin).
    #[arg(long)]
    model: PathBuf,
    /// Tokenizer, when it is not beside the model.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// PEFT adapter folder (adapter_config.json, adapter_model.safetensors).
    #[arg(long)]
    adapter: PathBuf,
    /// Merge the adapter into the base weights (the only export osp writes today).
    #[arg(long)]
    merge: bool,
    /// Output folder for config.json, model.safetensors and tokenizer files.
    #[arg(long)]
    out: PathBuf,
    /// Replace `--out` when it already exists (it is refused otherwise).
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args)]
struct ModelArgs {
    /// A Hugging Face model folder (config.json, safetensors, tokenizer.json), a GGUF file
    /// (model and tokenizer in one), or a llama2.c .bin.
    #[arg(long)]
    model: PathBuf,
    /// Tokenizer file or folder, when it is not beside the model.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Device: cpu, or cuda / cuda:N with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// A LoRA adapter folder (PEFT format) to apply on top of the model.
    #[arg(long)]
    adapter: Option<PathBuf>,
}

impl ModelArgs {
    fn load(&self) -> Result<osp::model::LoadedModel> {
        let device = osp::device(&self.device)?;
        let trainable = match &self.adapter {
            Some(dir) => Trainable::Lora {
                config: osp::lora::LoraConfig::from_peft_dir(dir)?,
                seed: 0,
            },
            None => Trainable::None,
        };
        let lm = load_model(&self.model, self.tokenizer.as_deref(), &device, trainable)?;
        if let Some(dir) = &self.adapter {
            osp::model::load_adapter(&lm.model, dir)?;
        }
        Ok(lm)
    }
}

#[derive(clap::Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt text; empty starts from BOS alone.
    #[arg(long, default_value = "")]
    prompt: String,
    /// Render the prompt as a user message through the model's chat template, with the
    /// generation prompt (the assistant's turn) after it.
    #[arg(long)]
    chat: bool,
    /// A system message before the user message (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Independent samples of the prompt, generated as one batch (at least 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    num_samples: u64,
    /// Sample i uses seed + i.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Sampling options shared by `generate` and `compare`.
#[derive(clap::Args)]
struct SamplingArgs {
    /// Sampling temperature; 0 is greedy (values in (0, 0.001) are refused).
    #[arg(long, default_value_t = SamplingParams::default().temperature)]
    temperature: f64,
    /// Keep the k most likely tokens (0 = all).
    #[arg(long, default_value_t = SamplingParams::default().top_k)]
    top_k: usize,
    /// Nucleus sampling threshold (1 = off).
    #[arg(long, default_value_t = SamplingParams::default().top_p)]
    top_p: f64,
    /// Upper bound on generated tokens per sample.
    #[arg(long, default_value_t = SamplingParams::default().max_new_tokens)]
    max_new_tokens: usize,
    /// Stop when this string is generated (repeatable).
    #[arg(long = "stop")]
    stop: Vec<String>,
}

impl SamplingArgs {
    /// The options as validated sampling parameters.
    fn params(&self) -> Result<SamplingParams> {
        let params = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            max_new_tokens: self.max_new_tokens,
            stop_strings: self.stop.clone(),
            stop_at_eos: SamplingParams::default().stop_at_eos,
        };
        params.validate()?;
        Ok(params)
    }
}

#[derive(clap::Args)]
struct InspectArgs {
    #[command(flatten)]
    model: ModelArgs,
}

fn cmd_bench(a: BenchArgs) -> Result<()> {
    let dev = osp::device(&a.device)?;
    println!(
        "| device | shape | parameters | batch | sampling tok/s | greedy tok/s | LoRA step (batch × {} tokens) |",
        a.seq
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for shape in &a.shapes {
        let opts = osp::bench::BenchOptions {
            shape: shape.clone(),
            batch: a.batch,
            prompt: a.prompt,
            new_tokens: a.new_tokens,
            seq: a.seq,
            repeats: a.repeats,
        };
        let r = osp::bench::run(&opts, &dev).with_context(|| format!("bench {shape}"))?;
        println!(
            "| {} | {} | {:.1}M | {} | {:.0} | {:.0} | {:.3} s |",
            a.device,
            r.shape,
            r.params as f64 / 1e6,
            a.batch,
            r.sampling_tok_s,
            r.greedy_tok_s,
            r.lora_step_s
        );
    }
    Ok(())
}

fn main() {
    osp::alloc::retain_freed_memory();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Generate(a) => cmd_generate(a),
        Cmd::Inspect(a) => cmd_inspect(a),
        Cmd::Sft(a) => cmd_sft(a),
        Cmd::Export(a) => cmd_export(a),
        Cmd::Train(a) => cmd_train(a),
        Cmd::JudgeTrain(a) => cmd_judge_train(a),
        Cmd::Judge(a) => cmd_judge(a),
        Cmd::RmTrain(a) => cmd_rm_train(a),
        Cmd::Compare(a) => cmd_compare(a),
        Cmd::Bench(a) => cmd_bench(a),
        Cmd::Demo(a) => {
            let mut overrides = vec![];
            if a.studies {
                overrides.push("collapse_lr_factor=3.0".to_string());
                overrides.push("epoch_multipliers=[1, 4, 16]".to_string());
            }
            overrides.extend(a.set.iter().cloned());
            let opts = osp::demo::DemoOptions {
                quick: a.quick,
                out: a.out.clone(),
                seed: a.seed,
                overrides,
                tasks: a.task.clone(),
            };
            let (json, md) = if a.seeds.is_empty() {
                osp::demo::run_demo(&opts)?;
                ("summary.json", "report.md")
            } else {
                osp::demo::run_seeds(&opts, &a.seeds)?;
                ("seeds.json", "seeds.md")
            };
            eprintln!(
                "wrote {} and {}",
                a.out.join(json).display(),
                a.out.join(md).display()
            );
            Ok(())
        }
    }
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let params = a.sampling.params()?;
    let lm = a.model.load()?;
    let tok = &lm.tokenizer;
    let prompt = if a.chat {
        let mut msgs = vec![];
        if let Some(sys) = &a.system {
            msgs.push(osp::tokenizer::ChatMessage::new("system", sys));
        }
        msgs.push(osp::tokenizer::ChatMessage::new("user", &a.prompt));
        let text = tok.apply_chat_template(&msgs, true)?;
        tok.encode(&text, true)?
    } else if a.prompt.is_empty() {
        let bos = tok
            .bos_id()
            .context("the prompt is empty and the tokenizer has no BOS token to start from")?;
        vec![bos]
    } else {
        tok.encode(&a.prompt, tok.bos_id().is_some())?
    };
    let requests: Vec<Request> = (0..a.num_samples)
        .map(|i| Request {
            prompt: prompt.clone(),
            seed: a.seed.wrapping_add(i),
        })
        .collect();
    let start = Instant::now();
    let gens = generate(&lm.model, tok, &requests, &params)?;
    let secs = start.elapsed().as_secs_f64();
    let new_tokens: usize = gens.iter().map(|g| g.tokens.len()).sum();
    for (i, g) in gens.iter().enumerate() {
        if gens.len() > 1 {
            println!(
                "--- sample {} (seed {}, {:?}) ---",
                i, requests[i].seed, g.finish
            );
        }
        if a.chat {
            println!("{}", g.text);
        } else {
            println!("{}{}", a.prompt, g.text);
        }
    }
    eprintln!(
        "[{} new tokens in {:.2}s, {:.1} tokens/s]",
        new_tokens,
        secs,
        new_tokens as f64 / secs.max(1e-9)
    );
    Ok(())
}

fn cmd_inspect(a: InspectArgs) -> Result<()> {
    let lm = a.model.load()?;
    let c = &lm.model.cfg;
    println!("source:            {}", lm.source);
    println!(
        "architecture:      {} (decoder-only, RMSNorm, rotary, SwiGLU)",
        c.model_type
    );
    println!("parameters:        {}", c.num_parameters());
    println!("layers:            {}", c.num_hidden_layers);
    println!("hidden size:       {}", c.hidden_size);
    println!("mlp size:          {}", c.intermediate_size);
    println!(
        "attention heads:   {} query, {} key/value (head dim {})",
        c.num_attention_heads, c.num_key_value_heads, c.head_dim
    );
    println!("rope theta:        {}", c.rope_theta);
    println!("rms norm eps:      {}", c.rms_norm_eps);
    println!("max positions:     {}", c.max_position_embeddings);
    println!("tied lm head:      {}", c.tie_word_embeddings);
    println!("qkv bias:          {}", c.attention_bias);
    println!("vocab size:        {}", c.vocab_size);
    let t = &lm.tokenizer;
    println!(
        "tokenizer:         {} ({} tokens)",
        t.kind(),
        t.vocab_size()
    );
    println!(
        "chat template:     {}",
        if t.has_chat_template() { "yes" } else { "no" }
    );
    for (name, id) in t.special_tokens() {
        println!("special token:     {name:<20} {id}");
    }
    Ok(())
}

fn cmd_sft(a: RunArgs) -> Result<()> {
    if a.print_config {
        print!("{}", osp::train::sft::SFT_TEMPLATE);
        return Ok(());
    }
    anyhow::ensure!(a.method.is_none(), "--method belongs to osp train");
    anyhow::ensure!(
        a.reward_model.is_none(),
        "--reward-model belongs to osp train --method ppo"
    );
    let cfg = osp::train::sft::SftConfig::load(a.config.as_deref(), &a.set)?;
    let out = osp::train::sft::run_sft(&cfg, a.resume, a.stop_after)?;
    for (step, loss) in &out.eval_losses {
        eprintln!("eval loss at step {step}: {loss:.4}");
    }
    if out.output.as_os_str().is_empty() {
        eprintln!(
            "stopped early; continue with --resume (run folder {})",
            out.run_dir.display()
        );
    } else {
        eprintln!("saved {}", out.output.display());
    }
    Ok(())
}

fn cmd_export(a: ExportArgs) -> Result<()> {
    anyhow::ensure!(
        a.merge,
        "only merged exports exist: pass --merge (the adapter folder itself is already PEFT's format)"
    );
    let args = ModelArgs {
        model: a.model.clone(),
        tokenizer: a.tokenizer,
        device: "cpu".into(),
        adapter: Some(a.adapter),
    };
    osp::model::export::check_export_target(&a.out, a.force)?;
    let lm = args.load()?;
    osp::model::export::export_merged(&lm.model, &lm.tokenizer, &a.model, &a.out, a.force)?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

fn cmd_train(a: RunArgs) -> Result<()> {
    use osp::train::method::TrainConfig;
    if a.print_config {
        print!("{}", osp::train::method::TRAIN_TEMPLATE);
        return Ok(());
    }
    let mut set = a.set.clone();
    if let Some(dir) = &a.reward_model {
        set.push(format!(
            "ppo.reward_model={}",
            toml::Value::String(dir.display().to_string())
        ));
    }
    let cfg = TrainConfig::load(a.config.as_deref(), &set, a.method)?;
    let output = if cfg.method == osp::train::method::Method::Ppo {
        osp::train::ppo::PpoRun::new(&cfg, a.resume)?.run(a.stop_after)?
    } else if cfg.method.is_online() {
        let mut run = osp::train::online::OnlineRun::new(&cfg, a.resume)?;
        run.run(a.stop_after, |_| Ok(()))?
    } else {
        let out = osp::train::offline::run_offline(&cfg, a.resume, a.stop_after)?;
        Some(out.output).filter(|p| !p.as_os_str().is_empty())
    };
    match output {
        Some(p) => eprintln!("saved {}", p.display()),
        None => eprintln!(
            "stopped early; continue with --resume (run folder {})",
            cfg.train.out.display()
        ),
    }
    Ok(())
}

fn cmd_judge_train(a: RunArgs) -> Result<()> {
    use osp::train::judge_train::{run_judge_train, JudgeTrainConfig, JUDGE_TRAIN_TEMPLATE};
    if a.print_config {
        print!("{JUDGE_TRAIN_TEMPLATE}");
        return Ok(());
    }
    anyhow::ensure!(a.method.is_none(), "--method belongs to osp train");
    anyhow::ensure!(
        a.reward_model.is_none(),
        "--reward-model belongs to osp train --method ppo"
    );
    let cfg = JudgeTrainConfig::load(a.config.as_deref(), &a.set)?;
    let out = run_judge_train(&cfg, a.resume, a.stop_after)?;
    let Some(after) = &out.after else {
        eprintln!(
            "stopped early; continue with --resume (run folder {})",
            out.run_dir.display()
        );
        return Ok(());
    };
    for (when, r) in [("before", &out.before), ("after", after)] {
        eprintln!(
            "judge {when}: accuracy {:.3}, ECE {:.3}, position bias {}, on {} held-out pairs",
            r.accuracy,
            r.ece,
            r.position_bias_rate
                .map(|x| format!("{x:.3}"))
                .unwrap_or("n/a".into()),
            r.pairs
        );
    }
    eprintln!("saved {}", out.output.display());
    Ok(())
}

fn cmd_rm_train(a: RunArgs) -> Result<()> {
    use osp::reward::train::{run_rm_train, RmTrainConfig, RM_TEMPLATE};
    if a.print_config {
        print!("{RM_TEMPLATE}");
        return Ok(());
    }
    anyhow::ensure!(a.method.is_none(), "--method belongs to osp train");
    anyhow::ensure!(
        a.reward_model.is_none(),
        "--reward-model belongs to osp train --method ppo"
    );
    let cfg = RmTrainConfig::load(a.config.as_deref(), &a.set)?;
    let out = run_rm_train(&cfg, a.resume, a.stop_after)?;
    for (when, e) in [("before", &out.before), ("after", &out.after)] {
        if let Some(e) = e {
            eprintln!(
                "reward model {when}: held-out accuracy {:.3}, loss {:.4}, margin {:.3}, on {} pairs",
                e.stats.accuracy, e.loss, e.stats.margin, e.pairs
            );
        }
    }
    if out.output.as_os_str().is_empty() {
        eprintln!(
            "stopped early; continue with --resume (run folder {})",
            out.run_dir.display()
        );
        return Ok(());
    }
    eprintln!("saved {}", out.output.display());
    if let Some(m) = &out.merged {
        eprintln!(
            "saved {} (merged, transformers LlamaForSequenceClassification)",
            m.display()
        );
    }
    Ok(())
}

/// One JSON line per judged pair, in data order.
fn write_verdicts(
    path: &std::path::Path,
    pairs: &[osp::data::PreferencePair],
    verdicts: &[osp::judge::Judgement],
) -> Result<()> {
    let mut text = String::new();
    for (i, (p, v)) in pairs.iter().zip(verdicts).enumerate() {
        let row = serde_json::json!({
            "index": i,
            "source": p.source,
            "strength": v.strength,
            "p_forward": v.p_forward,
            "p_backward": v.p_backward,
            "data_strength": p.strength,
            "correct": v.strength > 0.5,
            "position_biased": v.position_biased(),
        });
        text.push_str(&row.to_string());
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

fn cmd_judge(a: JudgeArgs) -> Result<()> {
    use osp::train::pairs::{load_pairs, DataFormat};
    #[derive(serde::Deserialize, Default)]
    #[serde(default, deny_unknown_fields)]
    struct Sets {
        judge: osp::judge::JudgeConfig,
    }
    let sets: Sets = osp::train::config::load_config(None, &a.set)?;
    let format: DataFormat = serde_json::from_value(serde_json::Value::String(a.format.clone()))
        .map_err(|_| {
            anyhow::anyhow!(
                "--format {}: expected auto, trl, hh, tldr or pandalm",
                a.format
            )
        })?;
    let lm = a.model.load()?;
    let judge = osp::judge::Judge::new(sets.judge, &lm.tokenizer)?;
    let (mut pairs, warnings) = load_pairs(
        &a.data,
        format,
        Some(&lm.tokenizer),
        osp::train::method::PrefData::default().on_malformed,
    )?;
    for w in warnings.iter().take(5) {
        eprintln!("warning: {w}");
    }
    if let Some(n) = a.limit {
        pairs.truncate(n);
    }
    anyhow::ensure!(!pairs.is_empty(), "{}: no pairs to judge", a.data.display());
    let start = Instant::now();
    let model = osp::engine::inference_model(&lm.model)?;
    // Judged in chunks of a few forward batches so that the bar moves.
    let bar = if a.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(pairs.len() as u64)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "judging {bar:30} {pos}/{len} pairs [{elapsed_precise} < {eta_precise}]",
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    let chunk = judge.cfg.batch_size.max(1) * 4;
    let mut verdicts = Vec::with_capacity(pairs.len());
    for part in pairs.chunks(chunk) {
        let items: Vec<(&str, &str, &str)> = part
            .iter()
            .map(|p| (p.prompt.as_str(), p.chosen.as_str(), p.rejected.as_str()))
            .collect();
        verdicts.extend(judge.judge(&model, &lm.tokenizer, &items)?);
        bar.inc(part.len() as u64);
    }
    bar.finish_and_clear();
    let report = osp::judge::JudgeReport::from_judgements(&pairs, &verdicts, judge.cfg.both_orders);
    let secs = start.elapsed().as_secs_f64();
    if let Some(path) = &a.verdicts {
        write_verdicts(path, &pairs, &verdicts)?;
        eprintln!(
            "wrote {} per-pair verdicts to {}",
            verdicts.len(),
            path.display()
        );
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("pairs judged:        {}", report.pairs);
        println!("accuracy:            {:.4}", report.accuracy);
        println!("ECE (10 bins):       {:.4}", report.ece);
        match report.position_bias_rate {
            Some(x) => println!("position-bias rate:  {x:.4}"),
            None => println!("position-bias rate:  n/a (single-order judging)"),
        }
        println!("mean |s - 1/2|:      {:.4}", report.mean_abs_margin);
        match report.spearman_vs_data_strength {
            Some(x) => println!("Spearman vs data strength: {x:.4}"),
            None => println!("Spearman vs data strength: n/a (the data carry no strengths)"),
        }
    }
    eprintln!("[{:.1} pairs/s]", report.pairs as f64 / secs.max(1e-9));
    Ok(())
}

fn cmd_compare(a: CompareArgs) -> Result<()> {
    use osp::train::config::{ModelSection, TrainMode};
    #[derive(serde::Deserialize, Default)]
    #[serde(default, deny_unknown_fields)]
    struct Sets {
        judge: osp::judge::JudgeConfig,
    }
    let sets: Sets = osp::train::config::load_config(None, &a.set)?;
    let sampling = a.sampling.params()?;
    let section = |adapter: Option<PathBuf>| ModelSection {
        path: a.model.clone(),
        tokenizer: a.tokenizer.clone(),
        adapter,
        device: a.device.clone(),
        train: TrainMode::Lora,
    };
    // The policy: the start merged into the base, the trained adapter on top; the baseline is
    // the same model with the adapter off (no second copy of the weights).
    let lora = match &a.adapter {
        Some(dir) => osp::lora::LoraConfig::from_peft_dir(dir)?,
        None => osp::lora::LoraConfig::default(),
    };
    let lm = osp::train::policy::load_policy(&section(a.start_adapter.clone()), &lora, 0, true)?;
    if let Some(dir) = &a.adapter {
        osp::model::load_adapter(&lm.model, dir)?;
    }
    let tok = &lm.tokenizer;
    let baseline = lm.model.without_adapter();
    let judge_model = match (&a.judge_adapter, a.judge.as_str()) {
        (Some(dir), _) => {
            let lora = osp::lora::LoraConfig::from_peft_dir(dir)?;
            osp::train::policy::load_policy(&section(Some(dir.clone())), &lora, 0, false)?.model
        }
        (None, "base") if a.start_adapter.is_some() => {
            let device = osp::device(&a.device)?;
            load_model(&a.model, a.tokenizer.as_deref(), &device, Trainable::None)?.model
        }
        _ => baseline.clone(),
    };
    let (records, warnings) = osp::data::load_prompts(
        &a.prompts,
        osp::data::ChatRender::for_tokenizer(Some(tok)),
        osp::train::method::PrefData::default().on_malformed,
    )?;
    for w in warnings.iter().take(5) {
        eprintln!("warning: {w}");
    }
    let n = a.limit.unwrap_or(usize::MAX).min(records.len());
    anyhow::ensure!(n > 0, "{}: no prompts", a.prompts.display());
    let room = lm
        .model
        .cfg
        .max_position_embeddings
        .saturating_sub(sampling.max_new_tokens)
        .max(1);
    let mut prompts = Vec::with_capacity(n);
    for r in records.into_iter().take(n) {
        let ids = osp::train::online::encode_prompt(tok, &r.prompt, room)?;
        prompts.push((r.prompt, ids));
    }
    let judge = osp::judge::Judge::new(sets.judge, tok)?;
    let start = Instant::now();
    let r = osp::compare::compare(
        &lm.model,
        &baseline,
        &judge_model,
        &judge,
        tok,
        &prompts,
        &sampling,
        a.samples as usize,
        a.seed,
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("prompts:             {}", r.prompts);
        println!("comparisons:         {}", r.comparisons);
        println!(
            "win rate:            {:.4} ± {:.4}",
            r.win_rate, r.win_rate_se
        );
        println!("mean strength:       {:.4}", r.mean_strength);
        println!("KL to the start:     {:.4}", r.kl);
        println!(
            "mean length:         {:.1} (start {:.1})",
            r.mean_length, r.baseline_mean_length
        );
        println!("position-bias rate:  {:.4}", r.position_bias_rate);
    }
    eprintln!("[{:.1}s]", start.elapsed().as_secs_f64());
    Ok(())
}
