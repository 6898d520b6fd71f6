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
            // both studies, at a small size
            "--set",
            "collapse_lr_factor=3.0",
            "--set",
            "epoch_multipliers=[1, 2]",
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
            "ppo",
            "self_rewarding",
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
        // The paper's baselines ran, with finite metrics (whether they lose is reported, not
        // asserted), and their own judges were measured.
        for method in ["ppo", "self_rewarding"] {
            let r = &summary["tasks"][task][method];
            for f in [
                "win_rate_vs_sft",
                "oracle_reward",
                "kl",
                "mean_length",
                "ood_win_rate_vs_sft",
            ] {
                assert!(
                    r[f].as_f64().is_some_and(f64::is_finite),
                    "{task}/{method}/{f}: {}",
                    r[f]
                );
            }
            assert!(r["win_rate_curve"].as_array().unwrap().len() >= 2);
        }
        let judges = &summary["baseline_judges"][task];
        for (k, f) in [
            ("reward_model", "after"),
            ("self_rewarding_judge", "heldout_accuracy"),
        ] {
            assert!(!judges[k][f].is_null(), "{task}: {judges}");
        }
        for claim in ["OSP beats RLHF", "OSP beats RLHF out of domain"] {
            let c = &summary["claims"][task][claim];
            assert!(
                c["margin"].as_f64().is_some_and(f64::is_finite),
                "{task}: {c}"
            );
            assert!(c["held"].is_boolean());
        }
        // SFT against itself, with the same seeds, is an exact tie.
        assert_eq!(summary["tasks"][task]["sft"]["win_rate_vs_sft"], 0.5);
        // The paper's claims are measured and reported (with their margins in standard
        // errors), not asserted: on dialogue, OSP's reward over SFT at this budget is within
        // noise, and flipped on a CPU with AVX-512 (other kernels, other rounding).
        let claim = &summary["claims"][task]["OSP beats SFT"];
        for k in ["margin", "se"] {
            assert!(
                claim[k].as_f64().is_some_and(f64::is_finite),
                "{task}: {claim}"
            );
        }
        assert!(claim["held"].is_boolean());
        // What the quick budget shows with a wide margin on every task and CPU tried:
        // preference augmentation makes the judge agree with the oracle more often (0.44 →
        // 0.73 on summarize, 0.66 → 0.86 on dialogue, seed 0 with AVX2; the test asserts a
        // third of the smaller gain). OSP's reward over SFT moved with kernel and sampler
        // changes (summarize +0.04 to +0.16, dialogue −0.04 to +0.09), so it is reported as a
        // claim with its margin, not asserted.
        let acc = |k: &str| {
            summary["tasks"][task]["osp"][k]["accuracy"]
                .as_f64()
                .unwrap_or(f64::NAN)
        };
        assert!(
            acc("judge_after_augmentation") > acc("judge_before_augmentation") + 0.06,
            "{task}: judge accuracy {} before augmentation, {} after",
            acc("judge_before_augmentation"),
            acc("judge_after_augmentation")
        );
        // πref (the start of every method) is evaluated too.
        assert!(summary["reference"][task]["oracle_reward"].is_number());
        // Studies: three online runs at the higher learning rate, and DPO / offline SPCE at
        // 1x and 2x the steps, where 2x means twice the epochs.
        let study = &summary["studies"][task];
        for m in ["online_dpo", "osp_hard", "osp"] {
            assert!(
                study["lr_collapse"][m]["win_rate_vs_sft"].is_number(),
                "{task}/{m}"
            );
        }
        assert!((study["lr_collapse"]["lr"].as_f64().unwrap() - 3e-3).abs() < 1e-12);
        for m in ["dpo", "spce_offline"] {
            let runs = study["epochs"][m].as_array().unwrap();
            assert_eq!(runs.len(), 2);
            let e: Vec<f64> = runs.iter().map(|r| r["epochs"].as_f64().unwrap()).collect();
            assert!((e[1] - 2.0 * e[0]).abs() < 1e-9 && e[0] > 0.0);
            assert!(runs[1]["win_rate_curve"].as_array().unwrap().len() >= 2);
        }
        let bytes = std::fs::read(out.join(format!("{task}_epochs.png"))).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
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
    assert!(report.contains("πref (start)") && report.contains("### Study: epochs"));
    assert!(
        report.contains("### The paper's claims in this run") && report.contains("OSP beats SFT")
    );
    assert!(report.contains("| ppo ") && report.contains("| self_rewarding "));
    assert!(report.contains("## Baselines and their budgets") && report.contains("OSP beats RLHF"));
}

#[test]
fn unknown_method_or_task_is_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    for (args, needle) in [
        (
            vec!["--set", "methods=[\"osp\", \"rlhf\"]"],
            "demo method `rlhf`",
        ),
        (vec!["--task", "poetry"], "poetry"),
        (vec!["--set", "pa_stepz=3"], "no budget field `pa_stepz`"),
        (
            vec!["--set", "eval_every=0"],
            "eval_every must be at least 1",
        ),
        (vec!["--set", "k=0"], "k = 0 must be at least 3"),
        (vec!["--set", "k=1"], "k = 1 must be at least 3"),
        (vec!["--set", "epoch_multipliers=[0]"], "epoch_multipliers"),
        (
            vec!["--set", "sft_lr=-1.0"],
            "sft_lr must be a positive number",
        ),
        (vec!["--set", "hidden_size=30"], "hidden_size 30 must split"),
        (
            vec!["--set", "seed_fraction=2.0"],
            "seed_fraction must be in",
        ),
        (vec!["--set", "methods=[]"], "methods is empty"),
        (vec!["--set", "rm_steps=0"], "rm_steps must be at least 1"),
        (
            vec!["--set", "sr_judge_steps=0"],
            "sr_judge_steps must be at least 1",
        ),
        (
            vec!["--set", "sr_iterations=17"],
            "sr_iterations = 17 exceeds method_steps = 16",
        ),
        (vec!["--set", "max_new_tokens=500"], "max_new_tokens = 500"),
    ] {
        let out = tmp.path().join("d");
        let o = Command::new(env!("CARGO_BIN_EXE_osp"))
            .args(["demo", "--quick", "--out", out.to_str().unwrap()])
            .args(&args)
            .output()
            .unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!out.join("summarize").exists(), "{args:?} did work first");
    }
}

#[test]
fn seeds_aggregate_mean_spread_and_claims() {
    use serde_json::json;
    let run = |osp: f64, dpo: f64, reward: f64| {
        json!({"wall_seconds": 10.0, "tasks": {"t": {
            "sft": {"win_rate_vs_sft": 0.5, "oracle_reward": 0.1},
            "dpo": {"win_rate_vs_sft": dpo, "oracle_reward": 0.2},
            "osp": {"win_rate_vs_sft": osp, "oracle_reward": reward,
                    "judge_after_augmentation": {"accuracy": 0.9}},
        }}})
    };
    let agg = osp::demo::seeds::aggregate(
        &[0, 1, 2],
        &[
            run(0.6, 0.55, 0.3),
            run(0.5, 0.55, 0.05),
            run(0.7, 0.65, 0.4),
        ],
    );
    let w = &agg["tasks"]["t"]["methods"]["osp"]["win_rate_vs_sft"];
    assert!((w["mean"].as_f64().unwrap() - 0.6).abs() < 1e-12);
    assert!((w["std"].as_f64().unwrap() - 0.1).abs() < 1e-12); // sample std of .6 .5 .7
    assert_eq!(w["min"], 0.5);
    assert_eq!(w["max"], 0.7);
    let claims = &agg["tasks"]["t"]["claims"];
    assert_eq!(claims["OSP beats DPO"]["held"], 2);
    assert_eq!(claims["OSP beats SFT"]["held"], 2); // reward 0.05 < 0.1 on seed 1
    assert_eq!(claims["OSP beats SFT"]["of"], 3);
    // a claim whose methods did not run is left out, not counted as failing
    assert!(claims.get("OSP beats IPO").is_none());
    assert!(
        (agg["tasks"]["t"]["judge_accuracy_after_augmentation"]["mean"]
            .as_f64()
            .unwrap()
            - 0.9)
            .abs()
            < 1e-12
    );
}

#[test]
fn seeds_reuse_a_finished_seed_only_when_it_matches() {
    use osp::demo::{pipeline::DemoBudget, seeds::finished_seed, DemoOptions};
    use serde_json::json;
    let tmp = tempfile::tempdir().unwrap();
    let opts = DemoOptions {
        quick: true,
        out: tmp.path().to_path_buf(),
        seed: 3,
        overrides: vec!["method_steps=8".into()],
        tasks: vec!["dialogue".into()],
    };
    assert!(finished_seed(&opts).unwrap().is_none(), "no summary yet");
    let budget = DemoBudget::new(true)
        .with_overrides(&opts.overrides)
        .unwrap();
    let summary = json!({"seed": 3, "quick": true, "config": budget,
                         "tasks": {"dialogue": {"osp": {"win_rate_vs_sft": 0.6}}}});
    std::fs::write(tmp.path().join("summary.json"), summary.to_string()).unwrap();
    let reused = finished_seed(&opts)
        .unwrap()
        .expect("the same run is reused");
    assert_eq!(reused["tasks"]["dialogue"]["osp"]["win_rate_vs_sft"], 0.6);
    // Anything that changes the run makes it run again.
    for changed in [
        DemoOptions {
            seed: 4,
            ..opts.clone()
        },
        DemoOptions {
            quick: false,
            ..opts.clone()
        },
        DemoOptions {
            overrides: vec!["method_steps=9".into()],
            ..opts.clone()
        },
        DemoOptions {
            tasks: vec![],
            ..opts.clone()
        },
    ] {
        assert!(finished_seed(&changed).unwrap().is_none(), "{changed:?}");
    }
    // A half-written summary is not an error: the seed runs again.
    std::fs::write(tmp.path().join("summary.json"), "{\"seed\": 3, \"qu").unwrap();
    assert!(finished_seed(&opts).unwrap().is_none());
    // A bad override is still refused, by name.
    std::fs::write(tmp.path().join("summary.json"), summary.to_string()).unwrap();
    let bad = DemoOptions {
        overrides: vec!["no_such_field=1".into()],
        ..opts
    };
    assert!(format!("{:#}", finished_seed(&bad).unwrap_err()).contains("no_such_field"));
}
