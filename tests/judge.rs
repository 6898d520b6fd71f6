//! The self-preferring judge: start-up checks, both-order debiasing against a scripted judge
//! with a constant position bias, and the batched real-model path.
mod common;
use common::*;
use osp::judge::{combine_orders, Judge, JudgeConfig};
use osp::model::{load_model, Trainable};

fn gpt2() -> Option<osp::tokenizer::Tokenizer> {
    let p = shared_data("models/gpt2-tokenizer/tokenizer.json")?;
    Some(osp::tokenizer::Tokenizer::from_tokenizer_json(&p).unwrap())
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// A scripted judge: the quality of a response is its length; p_AB = σ(q_a − q_b + bias).
fn scripted(bias: f64) -> impl FnMut(&[(&str, &str, &str)]) -> anyhow::Result<Vec<f64>> {
    move |items| {
        Ok(items
            .iter()
            .map(|(_, a, b)| sigmoid(0.3 * (a.len() as f64 - b.len() as f64) + bias))
            .collect())
    }
}

#[test]
fn both_orders_cancel_a_constant_position_bias() {
    let Some(tok) = gpt2() else { return };
    let pairs: Vec<(String, String)> = (1..=20)
        .map(|i| ("x".repeat(i + 1), "x".repeat(i)))
        .collect();
    let items: Vec<(&str, &str, &str)> = pairs
        .iter()
        .map(|(c, r)| ("q", c.as_str(), r.as_str()))
        .collect();
    let bias = 3.0; // the scripted judge strongly prefers whatever stands in position A
    let single = Judge::new(
        JudgeConfig {
            both_orders: false,
            ..Default::default()
        },
        &tok,
    )
    .unwrap();
    let both = Judge::new(JudgeConfig::default(), &tok).unwrap();
    // Judged with the better response in position B, single-order judging gets every pair wrong.
    let swapped: Vec<(&str, &str, &str)> = items.iter().map(|&(x, c, r)| (x, r, c)).collect();
    let s1 = single.judge_with(&swapped, &mut scripted(bias)).unwrap();
    assert!(
        s1.iter().all(|j| j.strength > 0.5),
        "single order follows the position"
    );
    // Both orders: the better response wins every pair whichever position it was given.
    for order in [&items, &swapped] {
        let s2 = both.judge_with(order, &mut scripted(bias)).unwrap();
        let better_first = std::ptr::eq(order, &items);
        for j in &s2 {
            assert_eq!(j.strength > 0.5, better_first, "{j:?}");
            assert!(
                j.position_biased(),
                "a bias of 3 makes both orders pick A: {j:?}"
            );
        }
    }
    // The debiased strength is even in the bias and exactly ½ for identical responses.
    let a = both.judge_with(&items, &mut scripted(bias)).unwrap();
    let b = both.judge_with(&items, &mut scripted(-bias)).unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert!((x.strength - y.strength).abs() < 1e-12);
    }
    let same = both
        .judge_with(&[("q", "abc", "abc")], &mut scripted(bias))
        .unwrap();
    assert!((same[0].strength - 0.5).abs() < 1e-12);
    assert_eq!(combine_orders(0.9, Some(0.3)), 0.5 * (0.9 + 0.7));
}

#[test]
fn start_up_checks_name_the_problem() {
    let Some(tok) = gpt2() else { return };
    let err = |cfg: JudgeConfig| format!("{:#}", Judge::new(cfg, &tok).err().unwrap());
    let e = err(JudgeConfig {
        template: "no placeholders".into(),
        ..Default::default()
    });
    assert!(e.contains("{prompt}"), "{e}");
    let e = err(JudgeConfig {
        answer_a: " Alpha Beta".into(),
        ..Default::default()
    });
    assert!(
        e.contains("judge.answer_a") && e.contains("single token"),
        "{e}"
    );
    let e = err(JudgeConfig {
        answer_b: " A".into(),
        ..Default::default()
    });
    assert!(e.contains("same token"), "{e}");
    let j = Judge::new(JudgeConfig::default(), &tok).unwrap();
    assert_eq!(j.answer_ids(), (317, 347));
    // Braces inside the task prompt are left alone.
    let text = j.render("use {a} literally", "first", "second");
    assert!(text.contains("Prompt: use {a} literally") && text.contains("Response A: first"));
}

#[test]
fn real_model_judging_is_batched_and_batch_independent() {
    let Some(bin) = shared_data("models/stories260K/stories260K.bin") else {
        return;
    };
    let lm = load_model(&bin, None, &candle_core::Device::Cpu, Trainable::None).unwrap();
    let cfg = JudgeConfig {
        answer_a: "A".into(),
        answer_b: "B".into(),
        batch_size: 3,
        ..Default::default()
    };
    let judge = Judge::new(cfg, &lm.tokenizer).unwrap();
    let snap = lm.model.snapshot().unwrap();
    let items = [
        (
            "Tell a story.",
            "Once upon a time there was a cat.",
            "The end.",
        ),
        (
            "Who is Lily?",
            "A girl.",
            "Lily is a little girl who likes to play in the park with her dog.",
        ),
        ("Say hi", "hi", "hello there"),
        ("Count", "one two three", "one"),
    ];
    let all = judge.judge(&snap, &lm.tokenizer, &items).unwrap();
    for (i, item) in items.iter().enumerate() {
        let alone = judge.judge(&snap, &lm.tokenizer, &[*item]).unwrap();
        assert!(
            (alone[0].strength - all[i].strength).abs() < 1e-5,
            "pair {i}"
        );
        assert!((0.0..=1.0).contains(&all[i].strength) && all[i].p_backward.is_some());
    }
}
