//! Self-rewarding scoring (Yuan et al. 2024): the expected score over the answer tokens, pair
//! selection, verdict parsing, pointwise targets from seed preferences, start-up checks, a
//! scripted scorer end to end, and the pointwise judge loss teaching stories260K a preference.
mod common;
use common::*;
use osp::data::PreferencePair;
use osp::self_reward::{
    expected_score, mean_parsed_score, parse_verdict, pointwise_loss, pointwise_targets, render,
    select_pair, two_hot, PointwiseExample, SelfJudge, SelfRewardConfig, DEFAULT_TEMPLATE,
};
use osp::tokenizer::Tokenizer;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn expected_score_is_the_mean_under_the_answer_softmax() {
    let (s, p) = expected_score(&[0.0; 5]);
    assert!(close(s, 3.0) && p.iter().all(|&q| close(q, 0.2)));
    let (s, _) = expected_score(&[-50.0, -50.0, -50.0, 10.0, -50.0]);
    assert!((s - 4.0).abs() < 1e-12);
    // By hand: logits 1, 2, 0, 0, 0 (large offsets cancel).
    let l = [1001.0, 1002.0, 1000.0, 1000.0, 1000.0];
    let e = [1f64.exp(), 2f64.exp(), 1.0, 1.0, 1.0];
    let z: f64 = e.iter().sum();
    let want: f64 = e
        .iter()
        .enumerate()
        .map(|(k, x)| (k + 1) as f64 * x / z)
        .sum();
    let (s, p) = expected_score(&l);
    assert!(close(s, want), "{s} vs {want}");
    assert!(close(p.iter().sum::<f64>(), 1.0));
}

#[test]
fn pointwise_targets_and_two_hot() {
    assert_eq!(pointwise_targets(None, 2.0, 5), (5.0, 1.0));
    assert_eq!(pointwise_targets(Some(0.5), 2.0, 5), (3.0, 3.0));
    assert_eq!(pointwise_targets(Some(0.75), 2.0, 5), (4.0, 2.0));
    assert_eq!(pointwise_targets(Some(1.0), 5.0, 5), (5.0, 1.0), "clamped");
    let (hi, lo) = pointwise_targets(Some(0.9), 2.0, 5);
    assert!(close(hi, 4.6) && close(lo, 1.4));
    for t in [1.0, 1.4, 3.0, 4.6, 5.0] {
        let p = two_hot(t, 5);
        assert!(close(p.iter().sum::<f64>(), 1.0));
        let mean: f64 = p.iter().enumerate().map(|(k, q)| (k + 1) as f64 * q).sum();
        assert!(close(mean, t), "two_hot({t}) has mean {mean}");
        assert!(p.iter().filter(|&&q| q > 0.0).count() <= 2);
    }
    assert_eq!(two_hot(4.0, 5), vec![0.0, 0.0, 0.0, 1.0, 0.0]);
}

#[test]
fn best_and_worst_are_paired_when_their_scores_differ() {
    assert_eq!(
        select_pair(&[2.0, 4.5, 1.0, 4.5], 0.0).unwrap(),
        Some((1, 2))
    );
    assert_eq!(
        select_pair(&[3.0, 3.0, 3.0], 0.0).unwrap(),
        None,
        "all tied"
    );
    assert_eq!(
        select_pair(&[3.0, 3.2], 0.5).unwrap(),
        None,
        "gap too small"
    );
    assert_eq!(select_pair(&[3.0, 3.6], 0.5).unwrap(), Some((1, 0)));
    assert_eq!(select_pair(&[3.0], 0.0).unwrap(), None);
    assert!(select_pair(&[3.0, f64::NAN], 0.0).is_err());
}

#[test]
fn generated_verdicts_parse_as_the_paper_does() {
    assert_eq!(parse_verdict("It is relevant... Score: 4", 5), Some(4));
    assert_eq!(
        parse_verdict("Score: 2\nOn reflection, Score: 3.", 5),
        Some(3)
    );
    assert_eq!(parse_verdict("Score: 0", 5), Some(0));
    assert_eq!(parse_verdict("Score: 4/5", 5), Some(4));
    assert_eq!(parse_verdict("Score: 7", 5), None);
    assert_eq!(parse_verdict("Score: 4.5", 5), None);
    assert_eq!(parse_verdict("no verdict here", 5), None);
    assert_eq!(
        parse_verdict("Score: 3 ... Score: <total points>", 5),
        Some(3)
    );
    let texts = ["Score: 4".to_string(), "garbage".into(), "Score: 5".into()];
    assert_eq!(mean_parsed_score(&texts, 5), Some(4.5));
    assert_eq!(mean_parsed_score(&["x".to_string()], 5), None);
}

#[test]
fn the_template_is_the_papers_and_fills_outside_the_prompt() {
    assert!(DEFAULT_TEMPLATE.starts_with("Review the user's question and the corresponding response using the additive 5-point scoring system"));
    assert!(DEFAULT_TEMPLATE.contains("User: {prompt}\n<response>{response}</response>"));
    assert!(DEFAULT_TEMPLATE.ends_with("based on the outlined criteria.\n\nScore:"));
    let r = render("Q: {prompt} A: {response}", "what is {response}?", "42");
    assert_eq!(r, "Q: what is {response}? A: 42");
}

/// A word-level tokenizer in which " 1" … " 5" are single tokens.
fn word_tokenizer(dir: &std::path::Path) -> Tokenizer {
    let words: Vec<String> = ["1", "2", "3", "4", "5", "good", "bad", "Score:", "Q:", "A:"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    osp::demo::wordlevel::write_tokenizer(dir, &words).unwrap();
    Tokenizer::from_hf_dir(dir).unwrap()
}

#[test]
fn start_up_checks_name_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = word_tokenizer(tmp.path());
    assert!(SelfJudge::new(SelfRewardConfig::default(), &tok).is_ok());
    let bad = |f: &dyn Fn(&mut SelfRewardConfig)| {
        let mut c = SelfRewardConfig::default();
        f(&mut c);
        format!("{:#}", SelfJudge::new(c, &tok).err().unwrap())
    };
    assert!(bad(&|c| c.template = "{prompt} only".into()).contains("{response}"));
    let e = bad(&|c| c.answers[2] = " three points".into());
    assert!(
        e.contains("self_reward.answers[2]") && e.contains("score 3"),
        "{e}"
    );
    let e = bad(&|c| c.answers[4] = " 1".into());
    assert!(e.contains("same token"), "{e}");
    assert!(bad(&|c| c.answers.truncate(1)).contains("at least 2"));
    assert!(bad(&|c| c.pair_min_gap = -1.0).contains("pair_min_gap"));
}

#[test]
fn a_scripted_scorer_ranks_and_pairs_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = word_tokenizer(tmp.path());
    let cfg = SelfRewardConfig {
        template: "Q: {prompt} A: {response} Score:".into(),
        ..Default::default()
    };
    let judge = SelfJudge::new(cfg, &tok).unwrap();
    // Scores by the count of "good" words: logits peak at min(1 + count, 5).
    let mut scripted = |items: &[(&str, &str)]| -> anyhow::Result<Vec<Vec<f64>>> {
        Ok(items
            .iter()
            .map(|(_, y)| {
                let k = (1 + y.matches("good").count()).min(5);
                (1..=5).map(|s| if s == k { 4.0 } else { 0.0 }).collect()
            })
            .collect())
    };
    let samples = ["bad", "good good good", "good", "bad bad"];
    let items: Vec<(&str, &str)> = samples.iter().map(|y| ("Q:", *y)).collect();
    let scores = judge.score_with(&items, &mut scripted).unwrap();
    let e: Vec<f64> = scores.iter().map(|s| s.expected).collect();
    assert!(e[1] > e[2] && e[2] > e[0] && close(e[0], e[3]), "{e:?}");
    assert_eq!(select_pair(&e, 0.0).unwrap(), Some((1, 0)));
    // A scorer returning the wrong shape is an error, not a silent pair.
    let mut short = |items: &[(&str, &str)]| -> anyhow::Result<Vec<Vec<f64>>> {
        Ok(items.iter().map(|_| vec![0.0; 4]).collect())
    };
    assert!(judge.score_with(&items, &mut short).is_err());
    // Pointwise examples: chosen to the top, rejected to the bottom, by strength.
    let pair = PreferencePair {
        prompt: "Q:".into(),
        chosen: "good".into(),
        rejected: "bad".into(),
        strength: Some(0.75),
        source: "t:1".into(),
    };
    let [c, r] = judge.pointwise_examples(&tok, &pair, 64).unwrap();
    assert_eq!(c.target, two_hot(4.0, 5));
    assert_eq!(r.target, two_hot(2.0, 5));
    assert_ne!(c.ids, r.ids);
}

#[test]
fn the_pointwise_loss_teaches_stories260k_to_score_a_preference() {
    use osp::train::config::TrainSection;
    use osp::train::optim::OptimConfig;
    use osp::train::trainer::Trainer;
    let Some(path) = shared_data("models/stories260K/stories260K.bin") else {
        return;
    };
    let lm = osp::model::load_model(
        &path,
        None,
        &candle_core::Device::Cpu,
        osp::model::Trainable::Lora {
            config: osp::lora::LoraConfig::default(),
            seed: 1,
        },
    )
    .unwrap();
    let tok = &lm.tokenizer;
    let cfg = SelfRewardConfig {
        template: "{prompt}{response} Score:".into(),
        answers: (1..=5).map(|k| k.to_string()).collect(),
        ..Default::default()
    };
    let judge = SelfJudge::new(cfg, tok).unwrap();
    let good = [
        " very happy.",
        " happy and glad.",
        " so happy.",
        " happy all day.",
    ];
    let bad = [" sad.", " very angry.", " scared and sad.", " mad."];
    let subjects = [
        "The cat",
        "Lily",
        "Tom",
        "The little dog",
        "Mom",
        "The bird",
        "Ben",
        "Sue",
    ];
    let pair = |i: usize, subj: &str| PreferencePair {
        prompt: format!("{subj} was"),
        chosen: good[(i * 3) % 4].into(),
        rejected: bad[(i * 5 + 1) % 4].into(),
        strength: Some([0.9, 1.0, 0.8, 1.0][i % 4]),
        source: format!("t:{i}"),
    };
    let train: Vec<PreferencePair> = (0..24).map(|i| pair(i, subjects[i % 6])).collect();
    let held: Vec<PreferencePair> = (0..8).map(|i| pair(i + 1, subjects[6 + i % 2])).collect();
    let examples: Vec<PointwiseExample> = train
        .iter()
        .flat_map(|p| judge.pointwise_examples(tok, p, 128).unwrap())
        .collect();
    let accuracy = |model: &osp::model::Llama| -> (f64, f64) {
        let snap = model.snapshot().unwrap();
        let items: Vec<(&str, &str)> = held
            .iter()
            .flat_map(|p| {
                [
                    (p.prompt.as_str(), p.chosen.as_str()),
                    (p.prompt.as_str(), p.rejected.as_str()),
                ]
            })
            .collect();
        let s = judge.score(&snap, tok, &items).unwrap();
        let wins = (0..held.len())
            .filter(|&i| s[2 * i].expected > s[2 * i + 1].expected)
            .count();
        let gap: f64 = (0..held.len())
            .map(|i| s[2 * i].expected - s[2 * i + 1].expected)
            .sum();
        (wins as f64 / held.len() as f64, gap / held.len() as f64)
    };
    let before = accuracy(&lm.model);
    let tmp = tempfile::tempdir().unwrap();
    let train_cfg = TrainSection {
        steps: 40,
        save_every: 0,
        out: tmp.path().join("run"),
        ..Default::default()
    };
    let optim = OptimConfig {
        lr: 3e-3,
        ..Default::default()
    };
    let (mut trainer, _) =
        Trainer::new(lm.model.clone(), &optim, &train_cfg, false, "pointwise").unwrap();
    let mut first_loss = None;
    let mut last_loss = 0.0;
    for step in 0..40 {
        let batch: Vec<&PointwiseExample> = (0..8)
            .map(|k| &examples[(step * 8 + k) % examples.len()])
            .collect();
        let loss = pointwise_loss(&trainer.model, &judge, &batch).unwrap();
        last_loss = loss.to_scalar::<f32>().unwrap() as f64;
        first_loss.get_or_insert(last_loss);
        trainer.accumulate(&loss, 0).unwrap();
        trainer.finish_step(serde_json::Map::new()).unwrap();
    }
    let after = accuracy(&trainer.model);
    eprintln!("held-out: accuracy/gap {before:?} → {after:?}; loss {first_loss:?} → {last_loss}");
    assert!(last_loss < 0.7 * first_loss.unwrap());
    assert!(after.0 >= 0.875, "{before:?} → {after:?}");
    assert!(
        after.1 > 1.0 && after.1 > before.1 + 1.0,
        "{before:?} → {after:?}"
    );
}
