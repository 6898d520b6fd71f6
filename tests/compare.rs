//! `osp compare`: the evaluation every method shares. A model against itself is an exact tie
//! with zero KL; swapping the two models turns every win into a loss (both-order judging is
//! antisymmetric and both sides sample with the same seeds); and the CLI runs on a saved
//! model folder.
mod common;

use osp::compare::compare;
use osp::demo::tasks::{JUDGE_ANSWER_A, JUDGE_ANSWER_B, JUDGE_TEMPLATE};
use osp::judge::{Judge, JudgeConfig};
use osp::model::{load_model, Trainable};
use osp::sample::SamplingParams;
use std::process::Command;

#[test]
fn compare_is_a_tie_against_itself_and_antisymmetric() {
    let dir = tempfile::tempdir().unwrap();
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a_dir).unwrap();
    std::fs::create_dir_all(&b_dir).unwrap();
    let dev = candle_core::Device::Cpu;
    let a = load_model(
        &common::tiny_run_model(&a_dir, 1),
        None,
        &dev,
        Trainable::None,
    )
    .unwrap();
    let b = load_model(
        &common::tiny_run_model(&b_dir, 2),
        None,
        &dev,
        Trainable::None,
    )
    .unwrap();
    let tok = &a.tokenizer;
    let prompts: Vec<(String, Vec<u32>)> = ["cat sat on", "dog ran", "red mat", "big dog"]
        .iter()
        .map(|t| (t.to_string(), tok.encode(t, true).unwrap()))
        .collect();
    let judge = JudgeConfig {
        template: JUDGE_TEMPLATE.into(),
        answer_a: JUDGE_ANSWER_A.into(),
        answer_b: JUDGE_ANSWER_B.into(),
        ..Default::default()
    };
    let judge = Judge::new(judge, tok).unwrap();
    let sampling = SamplingParams {
        max_new_tokens: 6,
        ..Default::default()
    };
    let run = |p, q| compare(p, q, &a.model, &judge, tok, &prompts, &sampling, 2, 5).unwrap();

    let same = run(&a.model, &a.model);
    assert_eq!(same.comparisons, 8);
    assert_eq!(same.win_rate, 0.5);
    assert_eq!(same.mean_strength, 0.5);
    assert!(same.kl.abs() < 1e-5, "KL of a model to itself {}", same.kl);
    assert_eq!(same.mean_length, same.baseline_mean_length);

    let ab = run(&a.model, &b.model);
    let ba = run(&b.model, &a.model);
    assert!(
        (ab.win_rate + ba.win_rate - 1.0).abs() < 1e-9,
        "{} + {}",
        ab.win_rate,
        ba.win_rate
    );
    assert!((ab.mean_strength + ba.mean_strength - 1.0).abs() < 1e-6);
    assert_eq!(ab.mean_length, ba.baseline_mean_length);
    assert!(ab.kl.abs() > 1e-3, "two random models with KL {}", ab.kl);
}

#[test]
fn compare_cli_reports_json_and_refuses_a_missing_prompt_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_run_model(dir.path(), 3);
    let prompts = common::write_jsonl(
        &dir.path().join("prompts.jsonl"),
        &[
            serde_json::json!({"prompt": "cat sat"}),
            serde_json::json!({"prompt": "dog"}),
        ],
    );
    let out = Command::new(env!("CARGO_BIN_EXE_osp"))
        .args(["compare", "--model"])
        .arg(&model)
        .arg("--prompts")
        .arg(&prompts)
        .args(["--max-new-tokens", "4", "--json"])
        .args(["--set", &format!("judge.template={JUDGE_TEMPLATE:?}")])
        .args(["--set", &format!("judge.answer_a={JUDGE_ANSWER_A:?}")])
        .args(["--set", &format!("judge.answer_b={JUDGE_ANSWER_B:?}")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["prompts"], 2);
    assert_eq!(r["win_rate"], 0.5, "no adapter: the policy is the start");

    let missing = dir.path().join("nope.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_osp"))
        .args(["compare", "--model"])
        .arg(&model)
        .arg("--prompts")
        .arg(&missing)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nope.jsonl"), "{err}");
}
