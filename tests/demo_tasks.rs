//! The demo's built-in tasks: oracles, demonstrations, human labels and splits.

use std::collections::{BTreeSet, HashSet};

use osp::demo::tasks::{
    all_tasks, all_vocabulary, build_task_data, human_preferences, normalize, task_by_name, words,
    Dialogue, Summarize, Task, TaskSizes, FILLERS, JUDGE_ANSWER_A, JUDGE_ANSWER_B, JUDGE_TEMPLATE,
    OOD_OBJECTS, REFUSAL, SCORE_ANSWERS, SCORE_TEMPLATE, SEEN_TOPICS, UNSEEN_TOPICS,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const EPS: f64 = 1e-9;

fn prompts(task: &dyn Task, n: usize, ood: bool, seed: u64) -> Vec<String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| task.prompt(&mut rng, ood)).collect()
}

fn post_words(prompt: &str) -> Vec<String> {
    let w: Vec<String> = prompt.split_whitespace().map(String::from).collect();
    assert_eq!(&w[..2], ["post", ":"], "{prompt}");
    assert_eq!(&w[w.len() - 2..], ["tldr", ":"], "{prompt}");
    w[2..w.len() - 2].to_vec()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < EPS
}

#[test]
fn summarize_exact_values() {
    let t = Summarize;
    let p = "post : rent today rent job night rent job money tldr :";
    assert_eq!(t.ideal(p), "rent job");
    assert_eq!(t.reward(p, "rent job"), 1.0);
    assert_eq!(t.reward(p, "job rent"), 1.0); // order does not matter
    assert_eq!(t.reward(p, ""), 0.0);
    assert!(close(t.reward(p, "rent"), 0.6)); // 3 of 5
    assert!(close(t.reward(p, "job"), 0.4));
    assert!(close(t.reward(p, "rent job today"), 0.65));
    assert!(close(t.reward(p, "rent job rent"), 0.65));
    assert!(close(t.reward(p, "today"), -0.35));
    assert!(close(t.reward(p, "rent today today"), 0.6 - 0.7));
    // ties by first appearance
    let p = "post : job a rent job rent b tldr :";
    assert_eq!(t.ideal(p), "job rent");
}

#[test]
fn dialogue_exact_values() {
    let t = Dialogue;
    let q = "human : what is 3 plus 4 ? assistant :";
    assert_eq!(t.ideal(q), "it is 7 .");
    assert_eq!(t.reward(q, "it is 7 ."), 1.0);
    assert_eq!(t.reward(q, "7"), 1.0);
    assert!(close(t.reward(q, "it is 8 ."), 0.7));
    assert!(close(t.reward(q, "it is 5 ."), 0.4));
    assert!(close(t.reward(q, "it is 11 ."), 0.0));
    assert!(close(t.reward(q, "let me think . it is 7 ."), 0.6));
    assert!(close(t.reward(q, REFUSAL), -0.5));
    assert!(close(t.reward(q, "cat dog"), 0.0));
    assert!(close(
        t.reward("human : subtract 4 from 9 ? assistant :", "it is 5 ."),
        1.0
    ));
    assert!(close(
        t.reward("human : add 12 and 5 ? assistant :", "17"),
        1.0
    ));

    let h = "human : how do i hurt the cat ? assistant :";
    assert_eq!(t.ideal(h), REFUSAL);
    assert_eq!(t.reward(h, REFUSAL), 1.0);
    assert!(close(t.reward(h, "no ."), 0.5));
    assert!(close(t.reward(h, "sorry ."), 0.75));
    assert!(close(t.reward(h, "i can not ."), 0.75));
    assert!(close(t.reward(h, "just hurt the cat ."), -1.0));
    assert!(close(t.reward(h, "use stick to hurt the cat ."), -1.0));
    assert!(close(t.reward(h, "use food to feed the cat ."), -1.0));
    assert!(close(t.reward(h, "i do not know ."), 0.0));
    assert!(close(t.reward(h, ""), 0.0));

    let b = "human : how do i feed the dog ? assistant :";
    assert_eq!(t.ideal(b), "use food to feed the dog .");
    assert_eq!(t.reward(b, "use food to feed the dog ."), 1.0);
    assert!(close(t.reward(b, REFUSAL), -0.5));
    assert!(close(t.reward(b, "no ."), -0.5));
    assert!(close(t.reward(b, "use soap to feed the dog ."), 2.0 / 3.0));
    assert!(close(t.reward(b, "use food to feed it ."), 2.0 / 3.0));
    assert!(close(
        t.reward(b, "let me think . use food to feed the dog ."),
        0.6
    ));
    assert!(close(t.reward(b, "kick the dog ."), -1.0));

    // unparseable prompts score 0 and do not panic
    assert_eq!(t.reward("hello", "anything"), 0.0);
    assert_eq!(t.ideal(""), "");
    assert_eq!(Summarize.reward("", "x"), -0.35);
    assert_eq!(Summarize.ideal("garbage"), "");
}

#[test]
fn ideal_is_maximal_and_flaws_graded() {
    for task in all_tasks() {
        let task = task.as_ref();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut values = BTreeSet::new();
        for ood in [false, true] {
            for p in prompts(task, 400, ood, 11) {
                let ideal = task.ideal(&p);
                let best = task.reward(&p, &ideal);
                assert_eq!(best, 1.0, "{}: {p}", task.name());
                for _ in 0..4 {
                    let d = task.demonstration(&p, &mut rng, 0.0);
                    let r = task.reward(&p, &d);
                    assert!(
                        r < best - EPS,
                        "{}: flaw {d:?} scored {r} on {p}",
                        task.name()
                    );
                    values.insert((r * 1e6).round() as i64);
                }
                // ideal with p_ideal = 1
                assert_eq!(task.demonstration(&p, &mut rng, 1.0), ideal);
                // mixed demonstrations never beat the ideal
                let d = task.demonstration(&p, &mut rng, 0.25);
                assert!(task.reward(&p, &d) <= best);
            }
        }
        eprintln!(
            "{}: {} distinct flaw rewards: {:?}",
            task.name(),
            values.len(),
            values.iter().map(|v| *v as f64 / 1e6).collect::<Vec<_>>()
        );
        assert!(values.len() >= 6, "{}: {values:?}", task.name());
        // bad p_ideal values do not panic
        let p = task.prompt(&mut rng, false);
        for bad in [f64::NAN, -1.0, 2.0, f64::INFINITY] {
            let _ = task.demonstration(&p, &mut rng, bad);
        }
    }
}

#[test]
fn demonstration_mix_is_mediocre() {
    for task in all_tasks() {
        let task = task.as_ref();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let ps = prompts(task, 2000, false, 4);
        let mut ideal = 0;
        let mut total = 0.0;
        for p in &ps {
            let d = task.demonstration(p, &mut rng, 0.25);
            ideal += usize::from(d == task.ideal(p));
            total += task.reward(p, &d);
        }
        let frac = ideal as f64 / ps.len() as f64;
        let mean = total / ps.len() as f64;
        eprintln!("{}: ideal {frac:.3}, mean reward {mean:.3}", task.name());
        assert!((0.2..0.32).contains(&frac), "{frac}");
        assert!(mean > -0.2 && mean < 0.8, "{mean}");
    }
}

#[test]
fn reward_deterministic_and_whitespace_robust() {
    for task in all_tasks() {
        let task = task.as_ref();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for p in prompts(task, 200, false, 6) {
            let d = task.demonstration(&p, &mut rng, 0.0);
            let r = task.reward(&p, &d);
            assert_eq!(r, task.reward(&p, &d));
            let spaced_p = format!("  {}\n", p.replace(' ', " \t  "));
            let spaced_d = format!("\n {}   ", d.replace(' ', "   "));
            assert_eq!(r, task.reward(&spaced_p, &spaced_d), "{p} / {d}");
            assert_eq!(task.ideal(&spaced_p), task.ideal(&p));
            // punctuation glued to a word reads the same
            let glued = d.replace(" .", ".").replace(" ?", "?");
            assert_eq!(r, task.reward(&p, &glued), "{glued}");
            assert_eq!(r, task.reward(&p, &d.to_uppercase()));
        }
    }
}

#[test]
fn summarize_prompt_shapes() {
    let t = Summarize;
    let seen: HashSet<&str> = SEEN_TOPICS.iter().copied().collect();
    let unseen: HashSet<&str> = UNSEEN_TOPICS.iter().copied().collect();
    let fillers: HashSet<&str> = FILLERS.iter().copied().collect();
    for (ood, lens, nkeys) in [(false, 12..=16, 2..=3), (true, 20..=26, 3..=4)] {
        for p in prompts(&t, 1000, ood, 21) {
            let post = post_words(&p);
            assert!(lens.contains(&post.len()), "{p}");
            let ideal = t.ideal(&p);
            let keys: Vec<&str> = ideal.split_whitespace().collect();
            assert!(nkeys.contains(&keys.len()), "{p}");
            for k in &keys {
                let c = post.iter().filter(|w| w == k).count();
                assert!((2..=4).contains(&c), "{p}");
                assert!(if ood { &unseen } else { &seen }.contains(k), "{p}");
            }
            for w in &post {
                assert!(keys.contains(&w.as_str()) || fillers.contains(w.as_str()));
            }
        }
    }
}

#[test]
fn ood_prompts_differ_in_kind() {
    // summarize: unseen topic words never occur in in-domain prompts or demonstrations
    let t = Summarize;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut indomain_words = HashSet::new();
    for p in prompts(&t, 3000, false, 2) {
        indomain_words.extend(words(&p));
        indomain_words.extend(words(&t.demonstration(&p, &mut rng, 0.25)));
    }
    for w in UNSEEN_TOPICS {
        assert!(!indomain_words.contains(*w), "{w}");
    }
    for p in prompts(&t, 500, true, 3) {
        assert!(post_words(&p).len() >= 20);
        assert!(words(&p).iter().any(|w| !indomain_words.contains(w)), "{p}");
    }

    // dialogue: OOD prompts are never in-domain prompts, and each has an unseen word or a
    // two-digit operand
    let t = Dialogue;
    let indomain: HashSet<String> = prompts(&t, 20000, false, 2).into_iter().collect();
    let mut indomain_words = HashSet::new();
    for p in &indomain {
        indomain_words.extend(words(p));
    }
    let ood = prompts(&t, 1000, true, 3);
    let (mut forms, mut big, mut objects) = (0, 0, 0);
    for p in &ood {
        assert!(!indomain.contains(p), "{p}");
        let w = words(p);
        let unseen = w.iter().any(|x| !indomain_words.contains(x));
        let two_digit = w.iter().any(|x| x.len() == 2 && x.parse::<u32>().is_ok());
        assert!(unseen || two_digit, "{p}");
        forms += usize::from(w[2] == "add" || w[2] == "subtract");
        big += usize::from(two_digit);
        objects += usize::from(w.iter().any(|x| OOD_OBJECTS.contains(&x.as_str())));
        assert_eq!(t.reward(p, &t.ideal(p)), 1.0);
    }
    eprintln!(
        "dialogue OOD: {forms} unseen forms, {big} two-digit operands, {objects} unseen objects"
    );
    assert!(forms > 150 && big > 150 && objects > 250);
    // in-domain arithmetic uses single-digit operands only
    for p in &indomain {
        let w = words(p);
        if w[2] == "what" {
            assert!(number_len_ok(&w[4]) && number_len_ok(&w[6]), "{p}");
        }
    }
}

fn number_len_ok(w: &str) -> bool {
    w.len() == 1 && w.parse::<u32>().is_ok()
}

#[test]
fn dialogue_mix() {
    let t = Dialogue;
    let ps = prompts(&t, 5000, false, 9);
    let questions = ps.iter().filter(|p| p.contains(" what is ")).count();
    let harmful = ps.iter().filter(|p| t.ideal(p) == REFUSAL).count();
    let q = questions as f64 / ps.len() as f64;
    let h = harmful as f64 / ps.len() as f64;
    assert!((0.57..0.63).contains(&q), "{q}");
    assert!((0.17..0.23).contains(&h), "{h}");
}

#[test]
fn vocabulary_covers_everything() {
    let judge_words: Vec<String> = JUDGE_TEMPLATE
        .split_whitespace()
        .filter(|w| !w.starts_with('{'))
        .map(String::from)
        .chain([JUDGE_ANSWER_A.trim().into(), JUDGE_ANSWER_B.trim().into()])
        // the self-rewarding baseline's pointwise judge prompt and its five score answers
        .chain(
            SCORE_TEMPLATE
                .split_whitespace()
                .filter(|w| !w.starts_with('{'))
                .map(String::from),
        )
        .chain(SCORE_ANSWERS.iter().map(|a| a.trim().to_string()))
        .collect();
    for task in all_tasks() {
        let task = task.as_ref();
        let vocab = task.vocabulary();
        let set: HashSet<&str> = vocab.iter().map(String::as_str).collect();
        assert_eq!(set.len(), vocab.len(), "{}: duplicates", task.name());
        assert!(vocab.len() < 200, "{}", vocab.len());
        eprintln!("{}: {} words", task.name(), vocab.len());
        for w in &vocab {
            // one pre-token under either whitespace splitting or \w+|[^\w\s]+
            assert_eq!(words(w), vec![w.clone()], "{w:?}");
        }
        for w in &judge_words {
            assert!(set.contains(w.as_str()), "judge word {w}");
        }
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        let check = |text: &str| {
            for w in text.split_whitespace() {
                assert!(set.contains(w), "{}: {w:?} in {text:?}", task.name());
            }
        };
        let mut used = HashSet::new();
        for ood in [false, true] {
            for p in prompts(task, 3000, ood, 17) {
                check(&p);
                check(&task.ideal(&p));
                used.extend(words(&p));
                used.extend(words(&task.ideal(&p)));
                for _ in 0..3 {
                    let d = task.demonstration(&p, &mut rng, 0.25);
                    check(&d);
                    used.extend(words(&d));
                }
            }
        }
        used.extend(judge_words.iter().cloned());
        let unused: Vec<&String> = vocab.iter().filter(|w| !used.contains(*w)).collect();
        assert!(unused.is_empty(), "{}: unused {unused:?}", task.name());
    }
    let all = all_vocabulary();
    let set: HashSet<&String> = all.iter().collect();
    assert_eq!(set.len(), all.len());
    assert!(all.len() < 200);
}

#[test]
fn human_label_agreement() {
    for task in all_tasks() {
        let task = task.as_ref();
        let pairs = human_preferences(task, 4000, 0.3, 0.25, 42);
        assert_eq!(pairs.len(), 4000);
        let mut untied = 0;
        let mut agree = 0;
        let mut expected_sum = 0.0;
        for p in &pairs {
            assert_ne!(normalize(&p.chosen), normalize(&p.rejected));
            assert_eq!(p.chosen_reward, task.reward(&p.prompt, &p.chosen));
            assert_eq!(p.rejected_reward, task.reward(&p.prompt, &p.rejected));
            let s = 1.0 / (1.0 + (-(p.chosen_reward - p.rejected_reward) / 0.3).exp());
            assert!(close(p.strength, s));
            assert!((0.0..=1.0).contains(&p.strength));
            assert_eq!(
                p.strength < 0.5,
                p.chosen_reward < p.rejected_reward,
                "{p:?}"
            );
            if (p.chosen_reward - p.rejected_reward).abs() > EPS {
                untied += 1;
                agree += usize::from(p.chosen_reward > p.rejected_reward);
                // P(the label agrees with the oracle) = σ(|Δr| / T)
                expected_sum += p.strength.max(1.0 - p.strength);
            }
        }
        let rate = agree as f64 / untied as f64;
        let expected = expected_sum / untied as f64;
        eprintln!(
            "{}: {untied} untied of {}, agreement {rate:.3} (expected {expected:.3})",
            task.name(),
            pairs.len()
        );
        assert!((0.75..0.95).contains(&rate), "{rate}");
        // measured at this seed: summarize 0.818, dialogue 0.866
        let measured = if task.name() == "summarize" {
            0.818
        } else {
            0.866
        };
        assert!((rate - measured).abs() < 0.04, "{rate}");
        assert!((rate - expected).abs() < 0.03, "{rate} vs {expected}");
    }
}

#[test]
fn human_labels_noiseless_at_zero_temperature_and_identical_pairs() {
    let pairs = human_preferences(&Dialogue, 300, 0.0, 0.25, 1);
    for p in &pairs {
        assert!(p.chosen_reward >= p.rejected_reward);
    }
    // p_ideal = 1: every demonstration is the ideal; pairs are kept (identical) without hanging
    let pairs = human_preferences(&Summarize, 2, 0.3, 1.0, 1);
    assert_eq!(pairs.len(), 2);
    assert!(pairs.iter().all(|p| p.strength == 0.5));
    assert!(human_preferences(&Summarize, 0, 0.3, 0.25, 1).is_empty());
}

#[test]
fn task_data_deterministic_and_disjoint() {
    let sizes = TaskSizes {
        sft: 600,
        preferences: 300,
        heldout: 100,
        ood: 100,
        train_prompts: 500,
        format: 200,
    };
    for task in all_tasks() {
        let task = task.as_ref();
        let a = build_task_data(task, &sizes, 1);
        let b = build_task_data(task, &sizes, 1);
        let c = build_task_data(task, &sizes, 2);
        assert_eq!(a, b);
        assert_ne!(a.sft, c.sft);
        assert_ne!(a.heldout, c.heldout);
        assert_ne!(a.preferences, c.preferences);
        assert_eq!(a.sft.len(), sizes.sft);
        assert_eq!(a.preferences.len(), sizes.preferences);
        assert_eq!(a.heldout.len(), sizes.heldout);
        assert_eq!(a.ood.len(), sizes.ood);
        assert_eq!(a.train_prompts.len(), sizes.train_prompts);
        // format examples: the judge template over two demonstrations, verdicts a fair coin
        assert_eq!(a.format.len(), sizes.format);
        let n_a = a.format.iter().filter(|(_, v)| v == JUDGE_ANSWER_A).count();
        assert!(a.format.iter().all(|(t, v)| {
            t.starts_with("which response is better ? prompt : ")
                && t.ends_with("the better response is response")
                && (v == JUDGE_ANSWER_A || v == JUDGE_ANSWER_B)
        }));
        assert!((70..=130).contains(&n_a), "{n_a} of 200 verdicts are a");

        let training: HashSet<String> = a
            .sft
            .iter()
            .map(|(p, _)| p)
            .chain(a.preferences.iter().map(|p| &p.prompt))
            .chain(&a.train_prompts)
            .map(|p| normalize(p))
            .collect();
        for p in a.heldout.iter().chain(&a.ood) {
            assert!(!training.contains(&normalize(p)), "{}: {p}", task.name());
        }
        let heldout: HashSet<&String> = a.heldout.iter().collect();
        eprintln!(
            "{}: {} distinct held-out prompts of {}, {} distinct training prompts",
            task.name(),
            heldout.len(),
            a.heldout.len(),
            training.len()
        );
        // held-out prompts are in-domain: same shape as training prompts
        for p in &a.heldout {
            assert_eq!(task.reward(p, &task.ideal(p)), 1.0);
        }
    }
}

#[test]
fn default_sizes_fill_up_on_small_prompt_spaces() {
    // dialogue's in-domain prompt space is a few hundred prompts; the default sizes still fill
    let d = build_task_data(&Dialogue, &TaskSizes::default(), 0);
    let s = TaskSizes::default();
    assert_eq!(d.sft.len(), s.sft);
    assert_eq!(d.preferences.len(), s.preferences);
    assert_eq!(d.train_prompts.len(), s.train_prompts);
}

#[test]
fn lookup_by_name() {
    assert_eq!(task_by_name("summarize").unwrap().name(), "summarize");
    assert_eq!(task_by_name("dialogue").unwrap().name(), "dialogue");
    assert!(task_by_name("nope").is_err());
}

#[test]
fn print_examples() {
    // run with --nocapture to see one prompt, its ideal and flawed demonstrations per task
    for task in all_tasks() {
        let task = task.as_ref();
        let mut rng = ChaCha8Rng::seed_from_u64(2024);
        for ood in [false, true] {
            let p = task.prompt(&mut rng, ood);
            let ideal = task.ideal(&p);
            eprintln!("{} ood={ood}: {p}", task.name());
            eprintln!("  ideal {:.3}: {ideal}", task.reward(&p, &ideal));
            for _ in 0..3 {
                let d = task.demonstration(&p, &mut rng, 0.0);
                eprintln!("  flaw  {:.3}: {d}", task.reward(&p, &d));
            }
            assert_eq!(task.reward(&p, &ideal), 1.0);
        }
    }
}

#[test]
fn score_answers_are_single_tokens_and_come_last() {
    use osp::demo::tasks::SCORE_WORDS;
    for task in all_tasks() {
        let vocab = task.vocabulary();
        let tmp = tempfile::tempdir().unwrap();
        osp::demo::wordlevel::write_tokenizer(tmp.path(), &vocab).unwrap();
        let tok = osp::tokenizer::Tokenizer::from_hf_dir(tmp.path()).unwrap();
        let cfg = osp::self_reward::SelfRewardConfig {
            template: SCORE_TEMPLATE.into(),
            answers: SCORE_ANSWERS.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        };
        // refuses answers that are not one token each, or a template without placeholders
        osp::self_reward::SelfJudge::new(cfg, &tok)
            .unwrap_or_else(|e| panic!("{}: {e:#}", task.name()));
        // The score words the task lacked come last, so adding them kept every other id;
        // dialogue had the numbers already (its vocabulary did not change).
        let tail = vocab.len()
            - vocab
                .iter()
                .rev()
                .take_while(|w| SCORE_WORDS.contains(&w.as_str()))
                .count();
        for w in SCORE_WORDS {
            let at = vocab.iter().position(|v| v == w).unwrap();
            assert!(
                at >= tail || task.name() == "dialogue",
                "{}: score word {w} at {at}, inside the task's own words",
                task.name()
            );
        }
    }
}
