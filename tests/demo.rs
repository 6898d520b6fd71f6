//! `osp demo --quick` end to end: every stage runs and summary.json has every field.
use std::process::Command;

const FIELDS: [&str; 12] = [
    "win_rate_vs_sft",
    "win_rate_vs_sft_se",
    "greedy_win_rate_vs_sft",
    "win_rate_vs_chosen",
    "oracle_reward",
    "kl",
    "mean_length",
    "ood_win_rate_vs_sft",
    "judge_before_augmentation",
    "judge_after_augmentation",
    "judge_on_own_samples",
    "win_rate_curve",
];

#[test]
fn quick_demo_writes_a_complete_summary_report_and_plots() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let status = Command::new(env!("CARGO_BIN_EXE_osp"))
        .args([
            "demo",
            "--quick",
            "--seed",
            "0",
            "--out",
            out.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["seed"], 0);
    assert!(summary["wall_seconds"].as_f64().unwrap() > 0.0);
    for task in ["summarize", "dialogue"] {
        for method in [
            "sft",
            "dpo",
            "ipo",
            "online_dpo",
            "osp",
            "osp_hard",
            "osp_random_pairs",
        ] {
            let r = &summary["tasks"][task][method];
            for f in FIELDS {
                assert!(!r[f].is_null(), "{task}/{method} lacks {f}");
            }
            let w = r["win_rate_vs_sft"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&w));
            for j in [
                "judge_before_augmentation",
                "judge_after_augmentation",
                "judge_on_own_samples",
            ] {
                assert!(
                    r[j]["accuracy"].is_number() || r[j]["pairs"] == 0,
                    "{task}/{method}/{j}"
                );
            }
        }
        // SFT against itself, with the same seeds, is an exact tie.
        assert_eq!(summary["tasks"][task]["sft"]["win_rate_vs_sft"], 0.5);
        for png in ["win_rate", "length", "strength_by_rank"] {
            let p = out.join(format!("{task}_{png}.png"));
            let bytes = std::fs::read(&p).unwrap_or_else(|_| panic!("{} missing", p.display()));
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        }
        assert!(out
            .join(task)
            .join("osp/adapter/adapter_model.safetensors")
            .exists());
        assert!(out.join(task).join("osp/metrics.jsonl").exists());
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("## Task `summarize`") && report.contains("| osp "));
}
