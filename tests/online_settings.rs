//! The online trainer honours its settings: gradient accumulation over micro-batches of
//! prompts, held-out evaluation every `eval_every` steps, `objective/kl` over every sampled
//! completion, and `train.on_nonfinite` for non-finite log-probabilities. On stories260K
//! (no judge training: these tests check the loop's bookkeeping, not learning).
mod common;
use common::*;
use osp::sample::{generate, Request};
use osp::train::method::{Method, TrainConfig};
use osp::train::online::{sample_seed, OnlineRun};
use osp::train::pairs::response_logps;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn s(v: impl ToString) -> String {
    v.to_string()
}

fn prompts(dir: &Path) -> PathBuf {
    let subjects = [
        "The cat", "Lily", "Tom", "The dog", "Mom", "The bird", "Ben", "Sue",
    ];
    let lines: Vec<String> = subjects
        .iter()
        .flat_map(|x| [" was", " saw"].map(|v| serde_json::json!({"prompt": format!("{x}{v}")})))
        .map(|v| v.to_string())
        .collect();
    let p = dir.join("prompts.jsonl");
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

fn config(model: &Path, prompts: &Path, out: &Path, extra: &[&str]) -> TrainConfig {
    let mut set = vec![
        format!("model.path={:?}", s(model.display())),
        format!("data.prompts={:?}", s(prompts.display())),
        format!("train.out={:?}", s(out.display())),
        s("train.steps=1"),
        s("train.batch_size=4"),
        s("train.save_every=0"),
        s("train.eval_every=0"),
        s("train.max_len=64"),
        s("lora.r=4"),
        s("optim.lr=0.01"),
        s("pairing.k=3"),
        s("sampling.max_new_tokens=5"),
        s("data.eval_fraction=0.0"),
        s("judge.answer_a=\"A\""),
        s("judge.answer_b=\"B\""),
    ];
    set.extend(extra.iter().map(s));
    TrainConfig::load(None, &set, Some(Method::Osp)).unwrap()
}

fn weights(run: &OnlineRun) -> Vec<Vec<f32>> {
    run.trainer
        .model
        .vars()
        .iter()
        .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

fn metrics(run_dir: &Path) -> Vec<Value> {
    osp::train::metrics::read_metrics(&run_dir.join("metrics.jsonl")).unwrap()
}

#[test]
fn grad_accum_accumulates_micro_batches_of_prompts() {
    let Some(model) = shared_data("models/stories260K/stories260K.bin") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let p = prompts(tmp.path());
    // Two micro-batches of 2 prompts and one batch of 4 prompts see the same prompts and
    // samples (seeds depend on step, prompt and sample, not on the batch layout), and the
    // mean of the micro-batches' mean losses is the batch's mean loss: one update.
    let accum = config(
        &model,
        &p,
        &tmp.path().join("a"),
        &["train.batch_size=2", "train.grad_accum=2"],
    );
    let whole = config(&model, &p, &tmp.path().join("b"), &[]);
    let mut a = OnlineRun::new(&accum, false).unwrap();
    let ma = a.iteration().unwrap().unwrap();
    let mut b = OnlineRun::new(&whole, false).unwrap();
    let mb = b.iteration().unwrap().unwrap();
    // K = 3 with the first sample as baseline: one pair per prompt, 4 prompts.
    assert_eq!(ma["pairs"], 4, "{ma:?}");
    assert_eq!(ma["completions/count"], 12, "{ma:?}");
    let (wa, wb) = (weights(&a), weights(&b));
    let before = OnlineRun::new(&config(&model, &p, &tmp.path().join("c"), &[]), false)
        .map(|r| weights(&r))
        .unwrap();
    let (mut diff, mut moved) = (0f32, 0f32);
    for ((x, y), z) in wa.iter().zip(&wb).zip(&before) {
        for ((x, y), z) in x.iter().zip(y).zip(z) {
            diff = diff.max((x - y).abs());
            moved = moved.max((y - z).abs());
        }
    }
    assert!(moved > 1e-3, "the step did not move the weights ({moved})");
    assert!(
        diff < 1e-3 * moved,
        "grad_accum = 2 × batch 2 differs from batch 4: {diff} (update {moved})"
    );
    let (la, lb) = (ma["loss"].as_f64().unwrap(), mb["loss"].as_f64().unwrap());
    assert!(
        (la - lb).abs() < 1e-4 * lb.abs().max(1.0),
        "loss {la} vs {lb}"
    );
}

#[test]
fn held_out_prompts_are_evaluated_every_eval_every_steps() {
    let Some(model) = shared_data("models/stories260K/stories260K.bin") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let p = prompts(tmp.path());
    let out = tmp.path().join("run");
    let cfg = config(
        &model,
        &p,
        &out,
        &[
            "train.steps=3",
            "train.eval_every=2",
            "data.eval_fraction=0.25",
        ],
    );
    let mut run = OnlineRun::new(&cfg, false).unwrap();
    assert_eq!(run.eval_prompts.len(), 4);
    // Before training πθ = πref: the same seeds give the same samples, KL 0, and the judge
    // cannot prefer one of two identical responses.
    let m0 = run.evaluate().unwrap().unwrap();
    assert!(m0["eval/kl"].as_f64().unwrap().abs() < 1e-5, "{m0:?}");
    assert_eq!(m0["eval/win_rate_vs_ref"].as_f64().unwrap(), 0.5, "{m0:?}");
    assert_eq!(m0["eval/mean_length"], m0["eval/ref_mean_length"]);
    run.run(None, |_| Ok(())).unwrap().unwrap();
    let evals: Vec<Value> = metrics(&out)
        .into_iter()
        .filter(|l| l.get("eval/kl").is_some())
        .collect();
    let steps: Vec<u64> = evals.iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [2, 3], "every 2 steps and at the end");
    for l in &evals {
        for k in [
            "eval/kl",
            "eval/mean_length",
            "eval/ref_mean_length",
            "eval/win_rate_vs_ref",
            "eval/judged_strength_vs_ref",
        ] {
            let v = l[k].as_f64().unwrap_or(f64::NAN);
            assert!(v.is_finite(), "{k} = {v} in {l}");
        }
        let w = l["eval/win_rate_vs_ref"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&w), "{l}");
    }
    // The policy moved away from πref: its held-out samples now differ somewhere.
    assert!(evals
        .iter()
        .any(|l| l["eval/kl"].as_f64().unwrap().abs() > 1e-4));
}

#[test]
fn objective_kl_covers_every_sampled_completion() {
    let Some(model) = shared_data("models/stories260K/stories260K.bin") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let p = prompts(tmp.path());
    let cfg = config(&model, &p, &tmp.path().join("run"), &["train.steps=2"]);
    let mut run = OnlineRun::new(&cfg, false).unwrap();
    run.iteration().unwrap().unwrap();
    // Replay step 2's samples: its prompts (the cursor's next batch), its seeds, the policy
    // after step 1; KL is Σ log πθ − log πref per sample, averaged over all K per prompt.
    let mut cursor = run.cursor;
    let batch = cursor.next_batch(run.prompts.len(), 4);
    let k = cfg.pairing.k;
    let reqs: Vec<Request> = batch
        .iter()
        .flat_map(|&q| (0..k).map(move |j| (q, j)))
        .map(|(q, j)| Request {
            prompt: run.prompts[q].1.clone(),
            seed: sample_seed(cfg.train.seed, 1, q, j),
        })
        .collect();
    let policy = run.trainer.model.snapshot().unwrap();
    let samples = generate(&policy, &run.tok, &reqs, &cfg.sampling).unwrap();
    let seqs: Vec<(&[u32], &[u32])> = reqs
        .iter()
        .zip(&samples)
        .map(|(r, g)| (r.prompt.as_slice(), g.tokens.as_slice()))
        .collect();
    let lp: Vec<f32> = response_logps(&policy, &seqs).unwrap().to_vec1().unwrap();
    let lr: Vec<f32> = response_logps(run.reference(), &seqs)
        .unwrap()
        .to_vec1()
        .unwrap();
    let kl = lp.iter().zip(&lr).map(|(a, b)| (a - b) as f64).sum::<f64>() / lp.len() as f64;
    let m = run.iteration().unwrap().unwrap();
    let logged = m["objective/kl"].as_f64().unwrap();
    assert!(kl.abs() > 1e-4, "the policy has not moved: KL {kl}");
    assert!(
        (logged - kl).abs() < 1e-4 * kl.abs().max(1e-2),
        "objective/kl {logged}, over all {} samples {kl}",
        lp.len()
    );
}

/// Makes every adapter weight NaN: πθ's log-probabilities are then NaN while πref (adapters
/// off) and the initial-model judge stay finite.
fn poison(run: &OnlineRun) {
    for (_, v) in run.trainer.model.vars() {
        let nan = (v.as_tensor() * f64::NAN).unwrap();
        v.set(&nan).unwrap();
    }
}

#[test]
fn a_non_finite_log_probability_follows_on_nonfinite() {
    let Some(model) = shared_data("models/stories260K/stories260K.bin") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let p = prompts(tmp.path());
    let out = tmp.path().join("skip");
    let extra = ["judge.model=\"initial\"", "train.on_nonfinite=\"skip\""];
    let mut run = OnlineRun::new(&config(&model, &p, &out, &extra), false).unwrap();
    poison(&run);
    assert!(run.iteration().unwrap().is_none(), "the step is skipped");
    assert_eq!(run.trainer.step(), 0);
    let skipped: Vec<Value> = metrics(&out)
        .into_iter()
        .filter(|l| l.get("skipped").is_some())
        .collect();
    assert_eq!(skipped.len(), 1);
    let why = skipped[0]["skipped"].as_str().unwrap();
    assert!(
        why.contains("step 1") && why.contains("log-probability"),
        "{why}"
    );

    let out = tmp.path().join("abort");
    let extra = ["judge.model=\"initial\"", "train.on_nonfinite=\"abort\""];
    let mut run = OnlineRun::new(&config(&model, &p, &out, &extra), false).unwrap();
    poison(&run);
    let e = format!("{:#}", run.iteration().unwrap_err());
    assert!(
        e.contains("step 1") && e.contains("log-probability") && e.contains("abort"),
        "{e}"
    );
}

#[test]
fn an_even_k_with_the_first_sample_as_baseline_warns_of_a_wasted_sample() {
    let cfg = |k: usize, baseline: &str| {
        let set = [
            s("model.path=\"m\""),
            s("data.prompts=\"p\""),
            format!("pairing.k={k}"),
            format!("pairing.baseline=\"{baseline}\""),
        ];
        TrainConfig::load(None, &set, Some(Method::Osp)).unwrap()
    };
    let w = osp::train::online::pairing_warning(&cfg(4, "first")).unwrap();
    assert!(w.contains("pairing.k = 4") && w.contains("wasted"), "{w}");
    assert!(osp::train::online::pairing_warning(&cfg(7, "first")).is_none());
    assert!(osp::train::online::pairing_warning(&cfg(4, "given")).is_none());
}

#[test]
fn each_online_method_is_a_type_that_pairs_a_prompts_samples() {
    use osp::pairing::Cand;
    use osp::train::online_method::online_method;
    use rand::SeedableRng;
    let cfg = |m: Method, k: usize| {
        let set = [
            s("model.path=\"m\""),
            s("data.prompts=\"p\""),
            format!("pairing.k={k}"),
        ];
        TrainConfig::load(None, &set, Some(m)).unwrap()
    };
    // A scripted judge: sample i is better than sample j with strength 0.5 + (i − j)/10.
    let quality = |c: Cand| match c {
        Cand::Sample(i) => i as f64,
        Cand::Baseline => 0.0,
    };
    let mut judge = |cmp: &[(Cand, Cand)]| -> anyhow::Result<Vec<f64>> {
        Ok(cmp
            .iter()
            .map(|&(a, b)| 0.5 + (quality(a) - quality(b)) / 10.0)
            .collect())
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let osp = online_method(&cfg(Method::Osp, 5)).unwrap();
    let pairs = osp.pairs(5, &mut judge, &mut rng).unwrap();
    // Baseline sample 0; candidates 1..4 ranked 4, 3, 2, 1: best with worst, then the rest.
    assert_eq!(pairs.len(), 2);
    assert_eq!(
        (pairs[0].chosen, pairs[0].rejected, pairs[0].rank),
        (4, 1, 0)
    );
    assert_eq!(
        (pairs[1].chosen, pairs[1].rejected, pairs[1].rank),
        (3, 2, 1)
    );
    assert!(pairs.iter().all(|q| q.strength > 0.5 && q.strength < 1.0));
    let hard = online_method(&cfg(Method::OspHard, 5)).unwrap();
    let pairs = hard.pairs(5, &mut judge, &mut rng).unwrap();
    assert!(pairs.iter().all(|q| q.strength == 1.0), "{pairs:?}");
    let dpo = online_method(&cfg(Method::OnlineDpo, 2)).unwrap();
    let pairs = dpo.pairs(2, &mut judge, &mut rng).unwrap();
    assert_eq!((pairs[0].chosen, pairs[0].rejected), (1, 0));
    assert_eq!(pairs[0].strength, 1.0);
    assert!(dpo.pairs(3, &mut judge, &mut rng).is_err());
}
