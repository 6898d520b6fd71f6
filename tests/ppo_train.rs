//! `osp train --method ppo` end to end on a tiny model made on the spot: a reward model is
//! trained on the seed pairs, PPO runs against it with TRL's metric names (every value finite),
//! saves the policy and its value head, resumes bit-identically, and refuses a missing reward
//! model or one whose tokenizer is not the policy's.
mod common;
use common::*;
use osp::reward::train::{run_rm_train, RmTrainConfig};
use osp::train::method::{Method, TrainConfig};
use osp::train::ppo::{PpoRun, VALUE_HEAD_FILE};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn q(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// A LoRA reward model trained on the seed pairs (chosen " very good and yes .").
fn reward_model(model: &Path, prefs: &Path, out: &Path) -> PathBuf {
    let cfg = RmTrainConfig::load(
        None,
        &[
            format!("model.path={}", q(model)),
            format!("data.preferences={}", q(prefs)),
            format!("train.out={}", q(out)),
            "data.eval_fraction=0".into(),
            "train.steps=20".into(),
            "train.batch_size=8".into(),
            "train.save_every=0".into(),
            "train.eval_every=0".into(),
            "train.max_len=64".into(),
            "optim.lr=0.01".into(),
        ],
    )
    .unwrap();
    run_rm_train(&cfg, false, None).unwrap().output
}

struct Setup {
    _tmp: tempfile::TempDir,
    files: RunFiles,
    rm: PathBuf,
    root: PathBuf,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let files = tiny_run_files(tmp.path(), 7);
    let rm = reward_model(&files.model, &files.prefs, &tmp.path().join("rm"));
    let root = tmp.path().to_path_buf();
    Setup {
        _tmp: tmp,
        files,
        rm,
        root,
    }
}

fn ppo_config(s: &Setup, out: &Path, extra: &[&str]) -> TrainConfig {
    let mut set = vec![
        format!("model.path={}", q(&s.files.model)),
        format!("data.prompts={}", q(&s.files.prompts)),
        format!("ppo.reward_model={}", q(&s.rm)),
        format!("train.out={}", q(out)),
        "train.steps=5".into(),
        "train.batch_size=2".into(),
        "train.save_every=2".into(),
        "train.eval_every=2".into(),
        "train.max_len=64".into(),
        "pairing.k=2".into(),
        "sampling.max_new_tokens=5".into(),
        "data.eval_fraction=0".into(),
        "lora.r=4".into(),
        "optim.lr=0.01".into(),
        "optim.warmup_steps=1".into(),
    ];
    set.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::load(None, &set, Some(Method::Ppo)).unwrap()
}

fn metrics(run: &Path) -> Vec<Value> {
    osp::train::metrics::read_metrics(&run.join("metrics.jsonl")).unwrap()
}

const TRL_NAMES: [&str; 13] = [
    "objective/kl",
    "objective/entropy",
    "objective/non_score_reward",
    "objective/rlhf_reward",
    "objective/scores",
    "val/num_eos_tokens",
    "policy/approxkl_avg",
    "policy/clipfrac_avg",
    "policy/entropy_avg",
    "loss/policy_avg",
    "loss/value_avg",
    "val/clipfrac_avg",
    "val/ratio",
];

#[test]
fn ppo_trains_logs_trl_metrics_and_saves_policy_and_value_head() {
    let s = setup();
    let out = s.root.join("ppo");
    // 2 prompts × 2 samples, 2 epochs × 2 mini-batches: 4 optimiser steps per rollout.
    let cfg = ppo_config(
        &s,
        &out,
        &[
            "train.steps=8",
            "ppo.num_ppo_epochs=2",
            "ppo.num_mini_batches=2",
            "data.eval_fraction=0.25",
        ],
    );
    let mut run = PpoRun::new(&cfg, false).unwrap();
    let head_before = run.value_head().weight.to_vec2::<f32>().unwrap();
    let saved = run.run(None).unwrap().unwrap();
    let head_after = run.value_head().weight.to_vec2::<f32>().unwrap();
    assert_ne!(head_before, head_after, "the value head did not train");

    let lines = metrics(&out);
    let steps: Vec<&Value> = lines.iter().filter(|m| m.get("lr").is_some()).collect();
    assert_eq!(
        steps
            .iter()
            .map(|m| m["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>()
    );
    for m in &steps {
        for name in TRL_NAMES.iter().chain(&["loss", "grad_norm", "ppo/epoch"]) {
            assert!(m.get(*name).is_some(), "{name} missing from {m}");
        }
    }
    // The first update of a rollout is at the rollout's own policy: ratio 1, nothing clipped.
    for m in [steps[0], steps[4]] {
        assert!((m["val/ratio"].as_f64().unwrap() - 1.0).abs() < 1e-4, "{m}");
        assert_eq!(m["policy/clipfrac_avg"].as_f64().unwrap(), 0.0, "{m}");
    }
    let evals: Vec<&Value> = lines
        .iter()
        .filter(|m| m.get("eval/scores").is_some())
        .collect();
    assert!(!evals.is_empty(), "no evaluation logged");
    for m in &lines {
        for (k, v) in m.as_object().unwrap() {
            if let Some(x) = v.as_f64() {
                assert!(x.is_finite(), "{k} = {v} in {m}");
            }
        }
    }
    // The adapter holds the policy alone; the head is beside it.
    assert!(saved.ends_with("adapter"), "{}", saved.display());
    let names: Vec<String> = osp::model::load::read_safetensors(
        &saved.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap()
    .into_iter()
    .map(|(n, _)| n)
    .collect();
    assert!(names.iter().all(|n| !n.contains("v_head")), "{names:?}");
    let head: Vec<String> =
        osp::model::load::read_safetensors(&out.join(VALUE_HEAD_FILE), &candle_core::Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
    assert_eq!(head.len(), 2, "{head:?}");
    assert!(
        head.contains(&"v_head.summary.weight".to_string()),
        "{head:?}"
    );
}

#[test]
fn ppo_raises_the_reward_models_score() {
    let s = setup();
    let out = s.root.join("ppo-learn");
    let cfg = ppo_config(
        &s,
        &out,
        &[
            "train.steps=160",
            "train.batch_size=4",
            "pairing.k=4",
            "ppo.num_ppo_epochs=2",
            "ppo.num_mini_batches=2",
            "train.save_every=0",
            "train.eval_every=0",
            "optim.lr=0.02",
        ],
    );
    PpoRun::new(&cfg, false).unwrap().run(None).unwrap();
    let scores: Vec<f64> = metrics(&out)
        .iter()
        .filter(|m| m.get("lr").is_some())
        .map(|m| m["objective/scores"].as_f64().unwrap())
        .collect();
    let n = scores.len();
    // Each rollout's 4 lines repeat its score: the first and the last 5 rollouts.
    let first = scores[..20].iter().sum::<f64>() / 20.0;
    let last = scores[n - 20..].iter().sum::<f64>() / 20.0;
    eprintln!("objective/scores first {first:.3} last {last:.3}: {scores:?}");
    // Seeds 0-4 gave gains of 0.6 to 0.9.
    assert!(last > first + 0.3, "first {first:.3} last {last:.3}");
}

fn optimiser_steps(run: &Path) -> Vec<u64> {
    metrics(run)
        .iter()
        .filter(|m| m.get("loss").is_some() && m.get("lr").is_some())
        .map(|m| m["step"].as_u64().unwrap())
        .collect()
}

fn assert_same_files(a: &Path, b: &Path) {
    let mut names: Vec<_> = std::fs::read_dir(a)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert!(!names.is_empty());
    for n in names {
        let x = std::fs::read(a.join(&n)).unwrap();
        let y = std::fs::read(b.join(&n));
        assert!(
            y.as_ref().is_ok_and(|y| *y == x),
            "{} differs after resume",
            n.to_string_lossy()
        );
    }
}

#[test]
fn ppo_resumes_bit_identically_value_head_included() {
    let s = setup();
    // One optimiser step per rollout, so that --stop-after 3 stops after step 3; dropout on
    // in the config is off in PPO's passes.
    let extra = ["lora.lora_dropout=0.1"];
    let run = |out: &Path, resume: bool, stop: Option<usize>| -> PathBuf {
        let cfg = ppo_config(&s, out, &extra);
        let cfg = TrainConfig {
            ppo: osp::ppo::PpoConfig {
                num_ppo_epochs: 1,
                ..cfg.ppo.clone()
            },
            ..cfg
        };
        PpoRun::new(&cfg, resume)
            .unwrap()
            .run(stop)
            .unwrap()
            .unwrap_or_default()
    };
    let (a, b) = (s.root.join("ppo-a"), s.root.join("ppo-b"));
    let straight = run(&a, false, None);
    assert!(
        run(&b, false, Some(3)).as_os_str().is_empty(),
        "not stopped"
    );
    let resumed = run(&b, true, None);
    assert_same_files(&straight, &resumed);
    assert_eq!(
        std::fs::read(a.join(VALUE_HEAD_FILE)).unwrap(),
        std::fs::read(b.join(VALUE_HEAD_FILE)).unwrap(),
        "value head differs after resume"
    );
    assert_eq!(optimiser_steps(&a), (1..=5).collect::<Vec<_>>());
    assert_eq!(optimiser_steps(&b), optimiser_steps(&a));
    let strip = |run: &Path| -> Vec<Value> {
        metrics(run)
            .into_iter()
            .filter(|m| m.get("lr").is_some())
            .map(|mut m| {
                let o = m.as_object_mut().unwrap();
                o.retain(|k, _| !k.contains("seconds") && !k.contains("per_s"));
                m
            })
            .collect()
    };
    assert_eq!(strip(&a), strip(&b), "metrics differ after resume");
}

/// A tiny model whose word-level vocabulary differs from the run model's.
fn other_vocab_model(dir: &Path) -> PathBuf {
    use osp::model::{init::random_weights, Llama, ModelConfig, Trainable};
    let words: Vec<String> = ["apple", "pear", "plum", "fig", "kiwi", "lime", "."]
        .iter()
        .map(|w| w.to_string())
        .collect();
    let n = osp::demo::wordlevel::write_tokenizer(dir, &words).unwrap();
    let cfg = ModelConfig::from_json(&serde_json::json!({
        "model_type": "llama", "vocab_size": n, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 128,
        "tie_word_embeddings": true, "bos_token_id": 2, "eos_token_id": 3,
    }))
    .unwrap();
    let w = random_weights(&cfg, 3, 0.2, &candle_core::Device::Cpu).unwrap();
    let model = Llama::new(&cfg, w, Trainable::None).unwrap();
    let tok = osp::tokenizer::Tokenizer::from_hf_dir(dir).unwrap();
    osp::model::export::save_hf_model(&model, &tok, Some(dir), dir).unwrap();
    dir.to_path_buf()
}

#[test]
fn ppo_refuses_a_missing_or_mismatched_reward_model() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tiny_run_files(tmp.path(), 7);
    let base = |extra: &[String]| {
        let mut set = vec![
            format!("model.path={}", q(&f.model)),
            format!("data.prompts={}", q(&f.prompts)),
            format!("train.out={}", q(&tmp.path().join("out"))),
            "train.max_len=64".into(),
        ];
        set.extend(extra.iter().cloned());
        set
    };
    let e = format!(
        "{:#}",
        TrainConfig::load(None, &base(&[]), Some(Method::Ppo)).unwrap_err()
    );
    assert!(
        e.contains("--reward-model") && e.contains("ppo.reward_model"),
        "{e}"
    );
    // A reward model on another method is a mistake, not silently ignored.
    let with_rm = base(&[format!("ppo.reward_model={}", q(tmp.path()))]);
    let e = format!(
        "{:#}",
        TrainConfig::load(None, &with_rm, Some(Method::Osp)).unwrap_err()
    );
    assert!(e.contains("only --method ppo"), "{e}");
    // Not a reward model folder.
    let cfg = TrainConfig::load(
        None,
        &base(&[format!(
            "ppo.reward_model={}",
            q(&tmp.path().join("nothing"))
        )]),
        Some(Method::Ppo),
    )
    .unwrap();
    let e = format!("{:#}", PpoRun::new(&cfg, false).err().unwrap());
    assert!(e.contains("nothing") && e.contains("not a folder"), "{e}");
    // A reward model of another vocabulary.
    let other = other_vocab_model(&tmp.path().join("other"));
    let prefs = write_jsonl(
        &tmp.path().join("other.jsonl"),
        &vec![serde_json::json!({"prompt": "apple", "chosen": " pear .", "rejected": " fig ."}); 4],
    );
    let rm = reward_model(&other, &prefs, &tmp.path().join("other-rm"));
    let cfg = TrainConfig::load(
        None,
        &base(&[format!("ppo.reward_model={}", q(&rm))]),
        Some(Method::Ppo),
    )
    .unwrap();
    let e = format!("{:#}", PpoRun::new(&cfg, false).err().unwrap());
    assert!(e.contains("tokenizer differs from the policy's"), "{e}");
    // Settings PPO cannot run with.
    let rm_set = format!("ppo.reward_model={}", q(&rm));
    for (bad, says) in [
        ("sampling.temperature=0", "temperature > 0"),
        ("ppo.num_mini_batches=3", "multiple of ppo.num_mini_batches"),
        ("ppo.cliprange=-1", "ppo.cliprange"),
    ] {
        let e = format!(
            "{:#}",
            TrainConfig::load(
                None,
                &base(&[rm_set.clone(), bad.into()]),
                Some(Method::Ppo)
            )
            .unwrap_err()
        );
        assert!(e.contains(says), "{bad}: {e}");
    }
}

#[test]
fn the_command_line_takes_the_reward_model_flag() {
    let s = setup();
    let out = s.root.join("cli");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_osp"))
        .args(["train", "--method", "ppo", "--reward-model"])
        .arg(&s.rm)
        .args(["--config", "/dev/null"])
        .args(["--set", &format!("model.path={}", q(&s.files.model))])
        .args(["--set", &format!("data.prompts={}", q(&s.files.prompts))])
        .args(["--set", &format!("train.out={}", q(&out))])
        .args(["--set", "train.steps=2", "--set", "train.max_len=64"])
        .args(["--set", "train.batch_size=2", "--set", "pairing.k=2"])
        .args([
            "--set",
            "sampling.max_new_tokens=4",
            "--set",
            "ppo.num_ppo_epochs=1",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join(VALUE_HEAD_FILE).exists());
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_osp"))
        .args(["rm-train", "--config", "/dev/null", "--reward-model", "x"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--reward-model belongs to"));
}
