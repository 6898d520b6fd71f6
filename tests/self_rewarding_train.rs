//! `osp train --method self-rewarding` end to end on a tiny model made on the spot: the model
//! scores its samples on the 5-point scale, best-vs-worst pairs train with DPO, πref is
//! renewed per iteration (M2, M3 saved), every logged metric is finite, resume across an
//! iteration boundary is bit-identical, and answers that are not single tokens are refused.
mod common;
use common::*;
use osp::train::method::{Method, SelfRewardingSection, TrainConfig};
use osp::train::online::OnlineRun;
use osp::train::self_rewarding::model_dir;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn q(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// Word-level answers of the tiny vocabulary stand for " 1" … " 5".
const ANSWERS: &str = "[\" bad\", \" no\", \" yes\", \" good\", \" very\"]";

fn config(f: &RunFiles, out: &Path, extra: &[&str]) -> TrainConfig {
    let mut set = vec![
        format!("model.path={}", q(&f.model)),
        format!("data.prompts={}", q(&f.prompts)),
        format!("train.out={}", q(out)),
        format!("judge.template={:?}", osp::demo::tasks::JUDGE_TEMPLATE),
        format!("judge.answer_a={:?}", osp::demo::tasks::JUDGE_ANSWER_A),
        format!("judge.answer_b={:?}", osp::demo::tasks::JUDGE_ANSWER_B),
        "self_reward.template=\"prompt : {prompt} response : {response} the response is\"".into(),
        format!("self_reward.answers={ANSWERS}"),
        "train.steps=5".into(),
        "train.batch_size=2".into(),
        "train.save_every=2".into(),
        "train.eval_every=2".into(),
        "train.max_len=64".into(),
        "pairing.k=3".into(),
        "sampling.max_new_tokens=4".into(),
        "data.eval_fraction=0".into(),
        "lora.r=4".into(),
        "lora.lora_dropout=0.1".into(),
        "optim.lr=0.01".into(),
        "optim.warmup_steps=1".into(),
        "self_rewarding.iterations=3".into(),
    ];
    set.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::load(None, &set, Some(Method::SelfRewarding)).unwrap()
}

fn metrics(run: &Path) -> Vec<Value> {
    osp::train::metrics::read_metrics(&run.join("metrics.jsonl")).unwrap()
}

#[test]
fn iterations_split_the_steps_evenly() {
    let s = |n| SelfRewardingSection { iterations: n };
    assert_eq!(s(3).starts(5), vec![0, 2, 4]);
    assert_eq!(s(2).starts(100), vec![0, 50]);
    assert_eq!(s(1).starts(7), vec![0]);
}

#[test]
fn self_rewarding_trains_saves_each_iteration_and_resumes_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tiny_run_files(tmp.path(), 7);
    let run = |out: &Path, resume: bool, stop: Option<usize>| -> PathBuf {
        let mut r = OnlineRun::new(&config(&f, out, &[]), resume).unwrap();
        r.run(stop, |_| Ok(())).unwrap().unwrap_or_default()
    };
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let straight = run(&a, false, None);
    // Stopped after step 3: resumed inside iteration 2 (started at step 2), whose πref M2
    // is read back from RUN/self_rewarding/m2.
    assert!(run(&b, false, Some(3)).as_os_str().is_empty());
    let resumed = run(&b, true, None);
    for t in [2, 3] {
        let (x, y) = (model_dir(&a, t), model_dir(&b, t));
        assert!(x.join("adapter/adapter_model.safetensors").exists(), "M{t}");
        assert_eq!(
            std::fs::read(x.join("adapter/adapter_model.safetensors")).unwrap(),
            std::fs::read(y.join("adapter/adapter_model.safetensors")).unwrap(),
            "M{t} differs after resume"
        );
    }
    assert!(!model_dir(&a, 4).exists());
    for n in ["adapter_model.safetensors", "adapter_config.json"] {
        assert_eq!(
            std::fs::read(straight.join(n)).unwrap(),
            std::fs::read(resumed.join(n)).unwrap(),
            "{n} differs after resume"
        );
    }
    let steps = |run: &Path| -> Vec<Value> {
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
    let la = steps(&a);
    assert_eq!(la.len(), 5);
    assert_eq!(la, steps(&b), "metrics differ after resume");
    let pairs: u64 = la.iter().map(|m| m["pairs"].as_u64().unwrap()).sum();
    assert!(pairs > 0, "no prompt gave a pair");
    for m in metrics(&a) {
        for (k, v) in m.as_object().unwrap() {
            if let Some(x) = v.as_f64() {
                assert!(x.is_finite(), "{k} = {v}");
            }
        }
        if m.get("lr").is_some() {
            assert!(
                m.get("loss").is_some() && m.get("objective/kl").is_some(),
                "{m}"
            );
        }
    }
}

#[test]
fn answers_that_are_not_single_tokens_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tiny_run_files(tmp.path(), 7);
    // Two words are two tokens of the word-level vocabulary.
    let mut cfg = config(&f, &tmp.path().join("out"), &[]);
    cfg.self_reward.answers[0] = " very good".into();
    let e = format!("{:#}", OnlineRun::new(&cfg, false).err().unwrap());
    assert!(
        e.contains("self_reward.answers[0]") && e.contains("one token"),
        "{e}"
    );
    // Two answers that are one token.
    cfg.self_reward.answers[4] = " bad".into();
    cfg.self_reward.answers[0] = " bad".into();
    let e = format!("{:#}", OnlineRun::new(&cfg, false).err().unwrap());
    assert!(e.contains("are the same token"), "{e}");
    let e = format!(
        "{:#}",
        TrainConfig::load(
            None,
            &[
                format!("model.path={}", q(&f.model)),
                format!("data.prompts={}", q(&f.prompts)),
                "pairing.k=1".into(),
            ],
            Some(Method::SelfRewarding)
        )
        .unwrap_err()
    );
    assert!(e.contains("pairing.k"), "{e}");
}

#[test]
fn judge_train_teaches_the_pointwise_judge_from_seed_pairs() {
    use osp::train::judge_train::{run_judge_train, JudgeTrainConfig};
    let tmp = tempfile::tempdir().unwrap();
    let f = tiny_run_files(tmp.path(), 7);
    let cfg = JudgeTrainConfig::load(
        None,
        &[
            format!("model.path={}", q(&f.model)),
            format!("data.preferences={}", q(&f.prefs)),
            format!("train.out={}", q(&tmp.path().join("jt"))),
            "data.mode=\"pointwise\"".into(),
            "data.eval_fraction=0.25".into(),
            "self_reward.template=\"prompt : {prompt} response : {response} the response is\""
                .into(),
            format!("self_reward.answers={ANSWERS}"),
            "train.steps=30".into(),
            "train.batch_size=8".into(),
            "train.save_every=0".into(),
            "train.eval_every=0".into(),
            "train.max_len=64".into(),
            "optim.lr=0.01".into(),
        ],
    )
    .unwrap();
    let out = run_judge_train(&cfg, false, None).unwrap();
    let after = out.after.unwrap();
    assert_eq!(after.pairs, 4);
    assert!(
        after.accuracy == 1.0 && after.mean_abs_margin > out.before.mean_abs_margin,
        "before {:?} after {after:?}",
        out.before
    );
    // The trained adapter scores a chosen response above its rejected one when loaded as the
    // self-rewarding run's starting model.
    let run_cfg = config(
        &f,
        &tmp.path().join("sr"),
        &[&format!("model.adapter={}", q(&out.output))],
    );
    let run = OnlineRun::new(&run_cfg, false).unwrap();
    let judge = osp::self_reward::SelfJudge::new(run_cfg.self_reward.clone(), &run.tok).unwrap();
    let s = judge
        .score(
            run.reference(),
            &run.tok,
            &[("the cat", " very good and yes ."), ("the cat", " bad .")],
        )
        .unwrap();
    assert!(s[0].expected > s[1].expected + 0.5, "{s:?}");
}
