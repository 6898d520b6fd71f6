//! `osp demo --seeds 0,1,2`: the demo once per seed (each into `OUT/seed-S`), then the mean
//! and spread of every headline number across seeds, and how often each of the paper's
//! comparisons held, in `OUT/seeds.json` and `OUT/seeds.md`. Studies (`--studies`) run on the
//! first seed only.
use super::methods::{ALL_METHODS, CLAIMS};
use super::pipeline::{run_demo, DemoBudget, DemoOptions};
use super::tasks::all_tasks;
use crate::eval::mean_std;
use crate::report::markdown_table;
use anyhow::Result;
use serde_json::{json, Map, Value};
use std::fmt::Write;

/// Per-method numbers aggregated across seeds.
const METRICS: [&str; 7] = [
    "win_rate_vs_sft",
    "greedy_win_rate_vs_sft",
    "win_rate_vs_chosen",
    "oracle_reward",
    "kl",
    "mean_length",
    "ood_win_rate_vs_sft",
];

fn get(s: &Value, task: &str, method: &str, metric: &str) -> Option<f64> {
    s["tasks"][task][method][metric].as_f64()
}

/// Runs every seed, then writes seeds.json and seeds.md; returns the aggregate.
pub fn run_seeds(opts: &DemoOptions, seeds: &[u64]) -> Result<Value> {
    let mut summaries = vec![];
    for (i, &seed) in seeds.iter().enumerate() {
        eprintln!("==== seed {seed}");
        let mut o = DemoOptions {
            seed,
            out: opts.out.join(format!("seed-{seed}")),
            ..opts.clone()
        };
        if i > 0 {
            // The studies are long; they run on the first seed only.
            o.overrides.extend([
                "collapse_lr_factor=0.0".into(),
                "epoch_multipliers=[]".into(),
            ]);
        }
        match finished_seed(&o)? {
            Some(s) => {
                eprintln!(
                    "   reusing {} (same seed, budget and tasks; delete it to rerun)",
                    o.out.join("summary.json").display()
                );
                summaries.push(s);
            }
            None => summaries.push(run_demo(&o)?),
        }
    }
    let agg = aggregate(seeds, &summaries);
    crate::io::save_json(&opts.out.join("seeds.json"), &agg)?;
    crate::io::atomic_write(&opts.out.join("seeds.md"), seeds_markdown(&agg)?.as_bytes())?;
    Ok(agg)
}

/// The summary a finished run of exactly this seed left in its folder, if any: same seed,
/// quick flag, budget (overrides applied) and tasks. A long multi-seed run that stopped, or
/// one extended by more seeds, then reruns only the seeds it lacks.
pub fn finished_seed(o: &DemoOptions) -> Result<Option<Value>> {
    let path = o.out.join("summary.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    // A half-written or foreign file is not an error: the seed simply runs again.
    let Ok(s) = serde_json::from_str::<Value>(&text) else {
        return Ok(None);
    };
    let budget = DemoBudget::new(o.quick).with_overrides(&o.overrides)?;
    let mut have: Vec<String> = s["tasks"]
        .as_object()
        .map(|t| t.keys().cloned().collect())
        .unwrap_or_default();
    let mut want: Vec<String> = if o.tasks.is_empty() {
        all_tasks().iter().map(|t| t.name().to_string()).collect()
    } else {
        o.tasks.clone()
    };
    have.sort_unstable();
    want.sort_unstable();
    let same = s["seed"].as_u64() == Some(o.seed)
        && s["quick"].as_bool() == Some(o.quick)
        && s["config"] == serde_json::to_value(&budget)?
        && have == want;
    Ok(same.then_some(s))
}

/// Mean, sample standard deviation, min and max of each metric across seeds, per task and
/// method; and per claim, the seeds where it held (ties count as not holding).
pub fn aggregate(seeds: &[u64], summaries: &[Value]) -> Value {
    let mut tasks = Map::new();
    let Some(first) = summaries.first() else {
        return json!({"seeds": seeds, "tasks": tasks});
    };
    for (task, methods) in first["tasks"].as_object().into_iter().flatten() {
        let mut per_method = Map::new();
        for method in methods.as_object().into_iter().flatten().map(|(m, _)| m) {
            let mut metrics = Map::new();
            for metric in METRICS {
                let xs: Vec<f64> = summaries
                    .iter()
                    .filter_map(|s| get(s, task, method, metric))
                    .collect();
                metrics.insert(metric.into(), spread(&xs));
            }
            per_method.insert(method.clone(), Value::Object(metrics));
        }
        let judge: Vec<f64> = summaries
            .iter()
            .filter_map(|s| {
                s["tasks"][task]["osp"]["judge_after_augmentation"]["accuracy"].as_f64()
            })
            .collect();
        let mut claims = Map::new();
        for (claim, better, worse, metric) in CLAIMS {
            let held: Vec<bool> = summaries
                .iter()
                .filter_map(|s| Some(get(s, task, better, metric)? > get(s, task, worse, metric)?))
                .collect();
            if !held.is_empty() {
                claims.insert(
                    claim.into(),
                    json!({"held": held.iter().filter(|h| **h).count(), "of": held.len(),
                           "metric": metric, "better": better, "worse": worse}),
                );
            }
        }
        tasks.insert(
            task.clone(),
            json!({"methods": per_method, "judge_accuracy_after_augmentation": spread(&judge),
                   "claims": claims}),
        );
    }
    let wall: Vec<f64> = summaries
        .iter()
        .filter_map(|s| s["wall_seconds"].as_f64())
        .collect();
    // Summaries written before `seed_pairs` was recorded have it only through their budget.
    let seed_pairs = first["seed_pairs"].as_u64().or_else(|| {
        serde_json::from_value::<DemoBudget>(first["config"].clone())
            .ok()
            .map(|b| b.seed_pairs() as u64)
    });
    json!({"seeds": seeds, "seed_pairs": seed_pairs, "wall_seconds": spread(&wall),
           "tasks": tasks})
}

fn spread(xs: &[f64]) -> Value {
    if xs.is_empty() {
        return Value::Null;
    }
    let (mean, std) = mean_std(xs);
    let min = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    json!({"mean": mean, "std": std, "min": min, "max": max, "values": xs})
}

fn cell(v: &Value) -> String {
    match (v["mean"].as_f64(), v["std"].as_f64()) {
        (Some(m), Some(s)) => format!("{m:.3} ± {s:.3}"),
        (Some(m), None) => format!("{m:.3}"),
        _ => "n/a".into(),
    }
}

fn seeds_markdown(agg: &Value) -> Result<String> {
    let mut md = String::new();
    writeln!(md, "# osp demo across seeds {}\n", agg["seeds"])?;
    writeln!(
        md,
        "Mean ± standard deviation across seeds (each seed's own report is in `seed-S/`). \
         Every seed regenerates the data, the SFT model and the judge, from {} \"human\" seed \
         pairs.\n",
        agg["seed_pairs"]
    )?;
    for (task, t) in agg["tasks"].as_object().into_iter().flatten() {
        writeln!(md, "## Task `{task}`\n")?;
        let header = [
            "method",
            "win vs SFT",
            "greedy win",
            "reward",
            "KL",
            "OOD win",
        ];
        let methods = t["methods"].as_object().cloned().unwrap_or_default();
        let rows: Vec<Vec<String>> = ALL_METHODS
            .iter()
            .filter_map(|(k, _)| methods.get_key_value(*k))
            .map(|(m, v)| {
                let mut row = vec![m.clone()];
                for k in [
                    "win_rate_vs_sft",
                    "greedy_win_rate_vs_sft",
                    "oracle_reward",
                    "kl",
                    "ood_win_rate_vs_sft",
                ] {
                    row.push(cell(&v[k]));
                }
                row
            })
            .collect();
        md.push_str(&markdown_table(&header, &rows));
        writeln!(
            md,
            "\nJudge accuracy after augmentation: {}.\n",
            cell(&t["judge_accuracy_after_augmentation"])
        )?;
        let rows: Vec<Vec<String>> = t["claims"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(claim, c)| {
                vec![
                    claim.clone(),
                    format!("{} of {}", c["held"], c["of"]),
                    format!(
                        "{} {} > {}",
                        c["metric"].as_str().unwrap_or(""),
                        c["better"].as_str().unwrap_or(""),
                        c["worse"].as_str().unwrap_or("")
                    ),
                ]
            })
            .collect();
        md.push_str(&markdown_table(
            &["claim", "seeds where it held", "compared"],
            &rows,
        ));
        md.push('\n');
    }
    Ok(md)
}
