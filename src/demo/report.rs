//! report.md and the plots of a demo run, from its summary.
use crate::report::{fmt_mean_err, histogram_plot, line_plot, markdown_table, Series};
use anyhow::Result;
use serde_json::Value;
use std::fmt::Write;
use std::path::Path;

fn num(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

fn f3(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        "n/a".into()
    }
}

fn curve(v: &Value, k: &str) -> Vec<(f64, f64)> {
    v.get(k)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|p| Some((p.get(0)?.as_f64()?, p.get(1)?.as_f64().unwrap_or(f64::NAN))))
                .collect()
        })
        .unwrap_or_default()
}

/// Writes report.md and `{task}_win_rate.png`, `{task}_strength_by_rank.png`,
/// `{task}_length.png` into `out`.
pub fn write_report(out: &Path, summary: &Value) -> Result<()> {
    let mut md = String::new();
    let quick = summary["quick"].as_bool().unwrap_or(false);
    writeln!(md, "# osp demo report\n")?;
    writeln!(
        md,
        "Seed {}, {} budget, {:.0} s in all, {} \"human\" seed pairs ({:.1}% of {}): augmentation, \
         the reward model and the offline baselines learn from these. Every number below comes \
         from this run; the oracle (the task's exact reward) is used only to make the \"human\" \
         data and to evaluate.\n",
        summary["seed"],
        if quick { "quick" } else { "default" },
        num(summary, "wall_seconds"),
        summary["seed_pairs"],
        100.0 * num(&summary["config"], "seed_fraction"),
        summary["config"]["human_pairs"],
    )?;
    writeln!(md, "## What the numbers mean\n")?;
    writeln!(
        md,
        "- **win vs SFT**: one temperature-1 sample of the method against one of the SFT model on the same \
         held-out prompt, judged by the oracle (ties ½), ± its standard error.\n\
         - **greedy win**: the same with greedy decoding.\n\
         - **win vs chosen**: a sample against the human-chosen response of a held-out pair.\n\
         - **reward**: mean oracle reward of temperature-1 samples (the ideal scores 1).\n\
         - **KL**: mean log πθ(y|x) − log πref(y|x) over the method's samples (πref = SFT + augmentation).\n\
         - **length**: mean response length in tokens.\n\
         - **OOD win**: win vs SFT on out-of-domain prompts.\n\
         - **judge acc / ECE / ρ**: the model judging pairs of its own samples against the oracle: accuracy, \
         expected calibration error, Spearman of judged strength vs the oracle's.\n\
         - **πref (start)**: the model every method starts from (SFT, then preference augmentation, which \
         also continues SFT on a quarter of each batch); a method's gain over this row is what its own \
         training bought.\n"
    )?;
    write_baseline_notes(summary, &mut md)?;
    let tasks = summary["tasks"].as_object().cloned().unwrap_or_default();
    for (task, methods) in &tasks {
        writeln!(md, "## Task `{task}`\n")?;
        let header = [
            "method",
            "win vs SFT",
            "greedy win",
            "win vs chosen",
            "reward",
            "KL",
            "length",
            "OOD win",
            "judge acc",
            "ECE",
            "ρ",
        ];
        let mut rows = vec![];
        let methods = methods.as_object().cloned().unwrap_or_default();
        // In the order the demo runs them (JSON objects come back sorted).
        let order: Vec<(&String, &Value)> = super::methods::METHODS
            .iter()
            .filter_map(|(k, _)| methods.get_key_value(*k))
            .chain(
                methods
                    .iter()
                    .filter(|(k, _)| !super::methods::METHODS.iter().any(|(m, _)| m == k)),
            )
            .collect();
        let reference = summary["reference"]
            .get(task)
            .map(|r| ("πref (start)".to_string(), r));
        let order = reference.iter().map(|(k, r)| (k, *r)).chain(order);
        for (m, r) in order {
            let j = &r["judge_on_own_samples"];
            rows.push(vec![
                m.clone(),
                fmt_mean_err(num(r, "win_rate_vs_sft"), num(r, "win_rate_vs_sft_se")),
                f3(num(r, "greedy_win_rate_vs_sft")),
                f3(num(r, "win_rate_vs_chosen")),
                f3(num(r, "oracle_reward")),
                f3(num(r, "kl")),
                f3(num(r, "mean_length")),
                fmt_mean_err(
                    num(r, "ood_win_rate_vs_sft"),
                    num(r, "ood_win_rate_vs_sft_se"),
                ),
                f3(num(j, "accuracy")),
                f3(num(j, "ece")),
                f3(num(j, "spearman_vs_oracle")),
            ]);
        }
        md.push_str(&markdown_table(&header, &rows));
        if let Some(any) = methods.values().next() {
            let (b, a) = (
                &any["judge_before_augmentation"],
                &any["judge_after_augmentation"],
            );
            writeln!(
                md,
                "\nJudge on held-out human pairs (against the oracle): accuracy {} → {}, ECE {} → {}, \
                 strength-vs-oracle Spearman {} → {} (before → after preference augmentation).\n",
                f3(num(b, "accuracy")),
                f3(num(a, "accuracy")),
                f3(num(b, "ece")),
                f3(num(a, "ece")),
                f3(num(b, "spearman_vs_oracle")),
                f3(num(a, "spearman_vs_oracle")),
            )?;
        }
        let series = |k: &str| -> Vec<Series> {
            methods
                .iter()
                .filter(|(m, _)| m.as_str() != "sft")
                .map(|(m, r)| Series {
                    name: m.clone(),
                    points: curve(r, k),
                })
                .collect()
        };
        let win_png = format!("{task}_win_rate.png");
        line_plot(
            &out.join(&win_png),
            &format!("{task}: oracle win rate vs SFT"),
            "optimiser step",
            "win rate",
            &series("win_rate_curve"),
            Some(0.5),
        )?;
        let len_png = format!("{task}_length.png");
        line_plot(
            &out.join(&len_png),
            &format!("{task}: response length"),
            "optimiser step",
            "tokens",
            &series("length_curve"),
            None,
        )?;
        writeln!(md, "![win rate]({win_png})\n\n![length]({len_png})\n")?;
        if let Some(h) = summary["strength_by_rank"]
            .get(task)
            .and_then(Value::as_array)
        {
            let groups: Vec<(String, Vec<usize>)> = h
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let counts = c
                        .as_array()
                        .map(|a| a.iter().map(|x| x.as_u64().unwrap_or(0) as usize).collect())
                        .unwrap_or_default();
                    (format!("pair {} (rank {})", i + 1, i), counts)
                })
                .collect();
            let png = format!("{task}_strength_by_rank.png");
            histogram_plot(
                &out.join(&png),
                &format!("{task}: OSP judged strength by ranked-pair position"),
                "strength",
                &groups,
                0.0,
                1.0,
            )?;
            writeln!(md, "![strengths]({png})\n\nPair 1 is best-vs-worst; ranked pairing should give it the strongest preferences.\n")?;
        }
        if let Some(c) = summary["claims"].get(task).and_then(Value::as_object) {
            write_claims(c, &mut md)?;
        }
        if let Some(study) = summary["studies"].get(task) {
            write_studies(out, task, study, &mut md)?;
        }
    }
    crate::io::atomic_write(&out.join("report.md"), md.as_bytes())
}

/// How the two baselines of the paper (RLHF and self-rewarding) were given their budgets, and
/// where those budgets cannot equal OSP's; only when either ran.
fn write_baseline_notes(summary: &Value, md: &mut String) -> Result<()> {
    let ran = |m: &str| {
        summary["tasks"]
            .as_object()
            .is_some_and(|t| t.values().any(|r| r.get(m).is_some()))
    };
    if !ran("ppo") && !ran("self_rewarding") {
        return Ok(());
    }
    let c = &summary["config"];
    writeln!(
        md,
        "## Baselines and their budgets
"
    )?;
    if ran("ppo") {
        writeln!(
            md,
            "- **ppo** (RLHF): a reward model (scalar head, Bradley–Terry) trained from πref on the same \
             seed pairs the OSP judge was taught on, for {} steps of {} pairs; then PPO from πref with \
             fresh LoRA adapters, {} prompts × {} samples a rollout and one PPO epoch over one mini-batch, \
             so every rollout is one optimiser step on the same number of samples and prompts as OSP. \
             Not equal: PPO's training signal is per-token advantages rather than pairs, its KL penalty \
             is PPO's own (kl_coef 0.05 per token, TRL's default, not DPO's β), it trains a value head \
             besides the adapters, and its reward model's {} extra steps are a second judge the OSP \
             run does not get.",
            c["rm_steps"], c["pa_batch"], c["prompts_per_step"], c["k"], c["rm_steps"]
        )?;
    }
    if ran("self_rewarding") {
        writeln!(
            md,
            "- **self_rewarding**: πref taught to score one response on a 5-point scale (`judge-train` \
             pointwise: each seed pair gives the better response a high target score and the worse a \
             low one) for {} steps, then {} iterations M1 → M2 … within the same optimiser steps, {} \
             prompts × {} samples a step (OSP's), the best and worst sample of a prompt paired when their \
             scores differ. Not equal: one pair per prompt (OSP gets {} per prompt), and its pointwise \
             judge's extra steps; πref (the KL column's) is the shared one, not its own start.",
            c["sr_judge_steps"], c["sr_iterations"], c["prompts_per_step"], c["k"],
            c["k"].as_u64().map(|k| (k.saturating_sub(1)) / 2).unwrap_or(0)
        )?;
    }
    if let Some(j) = summary["baseline_judges"].as_object() {
        for (task, v) in j {
            writeln!(
                md,
                "- `{task}`: reward model accuracy on the held-out pairs (oriented by the oracle) {}; \
                 pointwise judge accuracy {} (ties ½).",
                f3(num(&v["reward_model"]["after"], "accuracy")),
                fmt_mean_err(
                    num(&v["self_rewarding_judge"], "heldout_accuracy"),
                    num(&v["self_rewarding_judge"], "heldout_accuracy_se")
                ),
            )?;
        }
    }
    md.push('\n');
    Ok(())
}

/// The paper's claims on one task, as this run measured them.
fn write_claims(claims: &serde_json::Map<String, Value>, md: &mut String) -> Result<()> {
    writeln!(
        md,
        "### The paper's claims in this run
"
    )?;
    let rows: Vec<Vec<String>> = claims
        .iter()
        .map(|(claim, c)| {
            let z = num(c, "margin_in_se");
            vec![
                claim.clone(),
                format!(
                    "{} {} − {}",
                    c["metric"].as_str().unwrap_or(""),
                    c["better"].as_str().unwrap_or(""),
                    c["worse"].as_str().unwrap_or("")
                ),
                fmt_mean_err(num(c, "margin"), num(c, "se")),
                if z.is_finite() {
                    format!("{z:+.1}")
                } else {
                    "n/a".into()
                },
                if c["held"].as_bool() == Some(true) {
                    "held"
                } else {
                    "did not hold"
                }
                .into(),
            ]
        })
        .collect();
    md.push_str(&markdown_table(
        &["claim", "compared", "margin ± SE", "in SE", "this run"],
        &rows,
    ));
    writeln!(
        md,
        "
A margin within about two standard errors is noise: another seed, or a CPU whose \
         matrix kernels round differently (AVX2 against AVX-512), can flip it. Claims are \
         reported here and across seeds (`--seeds`), not asserted by the tests.\n"
    )?;
    Ok(())
}

/// The learning-rate collapse and epoch studies of one task (see `pipeline::run_studies`).
fn write_studies(out: &Path, task: &str, study: &Value, md: &mut String) -> Result<()> {
    if let Some(lr) = study.get("lr_collapse") {
        writeln!(
            md,
            "### Study: the online methods at learning rate {:.1e}\n\n\
             The paper reports that hard-label online methods collapse at learning rates where OSP's \
             soft strengths stay stable; compare with the main table's rows at the default rate.\n",
            num(lr, "lr")
        )?;
        let rows: Vec<Vec<String>> = ["online_dpo", "osp_hard", "osp"]
            .iter()
            .filter_map(|k| Some((k, lr.get(*k)?)))
            .map(|(k, r)| {
                vec![
                    k.to_string(),
                    fmt_mean_err(num(r, "win_rate_vs_sft"), num(r, "win_rate_vs_sft_se")),
                    f3(num(r, "oracle_reward")),
                    f3(num(r, "kl")),
                    f3(num(r, "mean_length")),
                ]
            })
            .collect();
        md.push_str(&markdown_table(
            &["method", "win vs SFT", "reward", "KL", "length"],
            &rows,
        ));
        md.push('\n');
    }
    if let Some(ep) = study.get("epochs") {
        writeln!(
            md,
            "### Study: epochs on the {} seed pairs (DPO vs offline SPCE)\n\n\
             The paper reports that DPO degrades with more epochs on a small preference set while \
             SPCE with strengths does not. The plot shows the longest run of each.\n",
            ep["seed_pairs"]
        )?;
        let mut rows = vec![];
        let mut series = vec![];
        for key in ["dpo", "spce_offline"] {
            let runs = ep[key].as_array().cloned().unwrap_or_default();
            for r in &runs {
                rows.push(vec![
                    key.to_string(),
                    f3(num(r, "epochs")),
                    fmt_mean_err(num(r, "win_rate_vs_sft"), num(r, "win_rate_vs_sft_se")),
                    f3(num(r, "oracle_reward")),
                    f3(num(r, "kl")),
                ]);
            }
            // The longest run's curve, against epochs.
            if let Some(r) = runs.last() {
                let per_step = num(r, "epochs") / num(r, "steps");
                series.push(Series {
                    name: key.to_string(),
                    points: curve(r, "win_rate_curve")
                        .into_iter()
                        .map(|(s, w)| (s * per_step, w))
                        .collect(),
                });
            }
        }
        md.push_str(&markdown_table(
            &["method", "epochs", "win vs SFT", "reward", "KL"],
            &rows,
        ));
        let png = format!("{task}_epochs.png");
        line_plot(
            &out.join(&png),
            &format!("{task}: win rate vs SFT over epochs on the seed"),
            "epochs",
            "win rate",
            &series,
            Some(0.5),
        )?;
        writeln!(md, "\n![epochs]({png})\n")?;
    }
    Ok(())
}
