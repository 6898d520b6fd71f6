//! Ranked pairing (OSP.md §2) with a scripted judge: each candidate has a hidden quality q
//! and s(a ≻ b) = σ(q_a − q_b).
use anyhow::{bail, Result};
use osp::pairing::{
    bradley_terry, pair_candidates, Baseline, Cand, JudgeFn, Pairing, PairingConfig, PairingMode,
    StrengthSource,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn logit(c: f64) -> f64 {
    (c / (1.0 - c)).ln()
}

/// A judge over hidden qualities that records every batch it is called with.
struct Scripted {
    q: Vec<f64>,
    q_base: f64,
    calls: Vec<Vec<(Cand, Cand)>>,
}

impl Scripted {
    fn new(q: &[f64]) -> Self {
        Self {
            q: q.to_vec(),
            q_base: 0.0,
            calls: vec![],
        }
    }

    fn quality(&self, c: Cand) -> f64 {
        match c {
            Cand::Sample(i) => self.q[i],
            Cand::Baseline => self.q_base,
        }
    }

    fn judge(&mut self, batch: &[(Cand, Cand)]) -> Result<Vec<f64>> {
        self.calls.push(batch.to_vec());
        Ok(batch
            .iter()
            .map(|&(a, b)| sigmoid(self.quality(a) - self.quality(b)))
            .collect())
    }

    fn run(&mut self, cfg: &PairingConfig, seed: u64) -> Result<Pairing> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n = self.q.len();
        pair_candidates(n, cfg, &mut rng, &mut |b: &[(Cand, Cand)]| self.judge(b))
    }
}

fn cfg(k: usize) -> PairingConfig {
    PairingConfig {
        k,
        ..PairingConfig::default()
    }
}

/// (chosen, rejected, rank) of each pair.
fn shape(p: &Pairing) -> Vec<(usize, usize, usize)> {
    p.pairs
        .iter()
        .map(|p| (p.chosen, p.rejected, p.rank))
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[test]
fn k7_ranked_fresh() {
    let q = [0.0, 1.5, -2.0, 0.3, 2.5, -0.7, 0.9];
    let mut j = Scripted::new(&q);
    let p = j.run(&cfg(7), 0).unwrap();
    // Sorted by c: 4 (2.5), 1 (1.5), 6 (0.9), 3 (0.3), 5 (−0.7), 2 (−2.0).
    assert_eq!(shape(&p), vec![(4, 2, 0), (1, 5, 1), (6, 3, 2)]);
    let order: Vec<usize> = p.scores.iter().map(|s| s.0).collect();
    assert_eq!(order, vec![4, 1, 6, 3, 5, 2]);
    for &(i, c) in &p.scores {
        assert!(close(c, sigmoid(q[i])));
    }
    assert_eq!(p.baseline, Some(0));
    for pair in &p.pairs {
        assert!(close(
            pair.strength,
            sigmoid(q[pair.chosen] - q[pair.rejected])
        ));
        assert!(close(pair.baseline_scores.0, sigmoid(q[pair.chosen])));
        assert!(close(pair.baseline_scores.1, sigmoid(q[pair.rejected])));
    }
    // Exactly two judge calls: 6 baseline comparisons, then the 3 pairs.
    assert_eq!(p.judge_calls, 2);
    assert_eq!(p.comparisons, 9);
    assert_eq!(j.calls.len(), 2);
    let first: Vec<(Cand, Cand)> = (1..7).map(|i| (Cand::Sample(i), Cand::Sample(0))).collect();
    assert_eq!(j.calls[0], first);
    assert_eq!(
        j.calls[1],
        vec![
            (Cand::Sample(4), Cand::Sample(2)),
            (Cand::Sample(1), Cand::Sample(5)),
            (Cand::Sample(6), Cand::Sample(3)),
        ]
    );
}

#[test]
fn k5_ranked() {
    let q = [0.0, -1.0, 2.0, 0.5, -0.2];
    let mut j = Scripted::new(&q);
    let p = j.run(&cfg(5), 0).unwrap();
    assert_eq!(shape(&p), vec![(2, 1, 0), (3, 4, 1)]);
    assert_eq!(j.calls.iter().map(Vec::len).collect::<Vec<_>>(), [4, 2]);
}

#[test]
fn k8_leaves_the_middle_out() {
    let q = [0.0, 0.4, -1.0, 2.0, 1.1, -0.3, 0.8, -2.2];
    let mut j = Scripted::new(&q);
    let p = j.run(&cfg(8), 0).unwrap();
    // Sorted: 3, 4, 6, [1], 5, 2, 7 — sample 1 is in the middle and unpaired.
    assert_eq!(shape(&p), vec![(3, 7, 0), (4, 2, 1), (6, 5, 2)]);
    assert!(p.pairs.iter().all(|x| x.chosen != 1 && x.rejected != 1));
    assert_eq!(p.scores.len(), 7);
    assert_eq!(j.calls.iter().map(Vec::len).collect::<Vec<_>>(), [7, 3]);
    assert_eq!(cfg(8).n_pairs(8), 3);
    assert_eq!(cfg(7).n_pairs(7), 3);
}

#[test]
fn ties_break_by_index() {
    let q = [0.0, 1.0, 1.0, 1.0, 1.0];
    let p = Scripted::new(&q).run(&cfg(5), 0).unwrap();
    assert_eq!(shape(&p), vec![(1, 4, 0), (2, 3, 1)]);
    assert!(p.pairs.iter().all(|x| close(x.strength, 0.5)));
}

#[test]
fn given_baseline_scores_all_samples() {
    let q = [0.3, -0.5, 1.2, 0.0, 2.0, -1.5];
    let mut j = Scripted::new(&q);
    j.q_base = 0.1;
    let c = PairingConfig {
        k: 6,
        baseline: Baseline::Given,
        ..PairingConfig::default()
    };
    let p = j.run(&c, 0).unwrap();
    // Sorted: 4 (2.0), 2 (1.2), 0 (0.3), 3 (0.0), 1 (−0.5), 5 (−1.5).
    assert_eq!(shape(&p), vec![(4, 5, 0), (2, 1, 1), (0, 3, 2)]);
    assert_eq!(p.baseline, None);
    let first: Vec<(Cand, Cand)> = (0..6).map(|i| (Cand::Sample(i), Cand::Baseline)).collect();
    assert_eq!(j.calls[0], first);
    assert_eq!(j.calls[1].len(), 3);
    for &(i, ci) in &p.scores {
        assert!(close(ci, sigmoid(q[i] - 0.1)));
    }
    // Odd n with a given baseline: n//2 pairs, the middle one left out.
    let mut j = Scripted::new(&q[..5]);
    let c5 = PairingConfig { k: 5, ..c };
    let p = j.run(&c5, 0).unwrap();
    assert_eq!(shape(&p), vec![(4, 1, 0), (2, 3, 1)]);
    assert_eq!(c5.n_pairs(5), 2);
}

#[test]
fn bradley_terry_strengths_use_one_call() {
    let q = [0.0, 1.5, -2.0, 0.3, 2.5, -0.7, 0.9];
    let mut j = Scripted::new(&q);
    let c = PairingConfig {
        strength: StrengthSource::BradleyTerry,
        ..cfg(7)
    };
    let p = j.run(&c, 0).unwrap();
    assert_eq!(shape(&p), vec![(4, 2, 0), (1, 5, 1), (6, 3, 2)]);
    assert_eq!(p.judge_calls, 1);
    assert_eq!(j.calls.len(), 1);
    assert_eq!(j.calls[0].len(), 6);
    for pair in &p.pairs {
        let (ca, cb) = pair.baseline_scores;
        let want = sigmoid(logit(ca) - logit(cb));
        assert!((pair.strength - want).abs() < 1e-12);
        // With this judge the BT estimate recovers σ(q_a − q_b).
        assert!((pair.strength - sigmoid(q[pair.chosen] - q[pair.rejected])).abs() < 1e-9);
    }
}

#[test]
fn bradley_terry_clamps_certain_scores() {
    let eps: f64 = 1e-6;
    let want = sigmoid(2.0 * ((1.0 - eps) / eps).ln());
    assert!(close(bradley_terry(1.0, 0.0), want));
    assert!(close(bradley_terry(0.0, 1.0), 1.0 - want));
    assert!(close(bradley_terry(0.3, 0.3), 0.5));
    // Through pair_candidates: a judge that is certain about the baseline comparisons.
    let c = PairingConfig {
        strength: StrengthSource::BradleyTerry,
        ..cfg(3)
    };
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let p = pair_candidates(3, &c, &mut rng, &mut |b: &[(Cand, Cand)]| {
        assert_eq!(b.len(), 2);
        Ok(vec![0.0, 1.0])
    })
    .unwrap();
    assert_eq!(shape(&p), vec![(2, 1, 0)]);
    assert!(close(p.pairs[0].strength, want));
    assert!(p.pairs[0].strength.is_finite() && p.pairs[0].strength < 1.0);
}

#[test]
fn fresh_strengths_come_from_the_second_call_and_are_not_flipped() {
    // The second call disagrees with the baseline ranking (0.2 for the top pair): the pair
    // keeps its orientation and reports 0.2.
    let q = [0.0, 1.5, -2.0, 0.3, 2.5, -0.7, 0.9];
    let mut calls = 0;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let p = pair_candidates(7, &cfg(7), &mut rng, &mut |b: &[(Cand, Cand)]| {
        calls += 1;
        Ok(match calls {
            1 => b
                .iter()
                .map(|&(a, _)| match a {
                    Cand::Sample(i) => sigmoid(q[i]),
                    Cand::Baseline => unreachable!(),
                })
                .collect(),
            2 => vec![0.2, 0.6, 0.55],
            _ => bail!("too many calls"),
        })
    })
    .unwrap();
    assert_eq!(calls, 2);
    assert_eq!(shape(&p), vec![(4, 2, 0), (1, 5, 1), (6, 3, 2)]);
    let s: Vec<f64> = p.pairs.iter().map(|x| x.strength).collect();
    assert_eq!(s, vec![0.2, 0.6, 0.55]);
}

#[test]
fn random_pairing_is_reproducible_and_differs_from_ranked() {
    let q = [0.0, 1.5, -2.0, 0.3, 2.5, -0.7, 0.9];
    let ranked = Scripted::new(&q).run(&cfg(7), 0).unwrap();
    let rc = PairingConfig {
        mode: PairingMode::Random,
        ..cfg(7)
    };
    let unordered = |p: &Pairing| {
        let mut v: Vec<(usize, usize)> = p.pairs.iter().map(|x| (x.chosen, x.rejected)).collect();
        v.sort();
        v
    };
    let mut differing = 0;
    for seed in 0..20 {
        let mut j = Scripted::new(&q);
        let a = j.run(&rc, seed).unwrap();
        let b = Scripted::new(&q).run(&rc, seed).unwrap();
        assert_eq!(a, b, "seed {seed} not reproducible");
        assert_eq!(j.calls.iter().map(Vec::len).collect::<Vec<_>>(), [6, 3]);
        // Three pairs covering the six scored samples once each, oriented by score.
        let mut seen: Vec<usize> = a
            .pairs
            .iter()
            .flat_map(|x| [x.chosen, x.rejected])
            .collect();
        seen.sort();
        assert_eq!(seen, vec![1, 2, 3, 4, 5, 6]);
        for (r, x) in a.pairs.iter().enumerate() {
            assert_eq!(x.rank, r);
            assert!(x.baseline_scores.0 > x.baseline_scores.1);
            assert!(close(x.strength, sigmoid(q[x.chosen] - q[x.rejected])));
        }
        if unordered(&a) != unordered(&ranked) {
            differing += 1;
        }
    }
    // 15 perfect matchings of 6 candidates: most seeds give a non-ranked one.
    assert!(
        differing >= 10,
        "only {differing} of 20 seeds differ from ranked"
    );
    // Different seeds give different pairings.
    let all: std::collections::HashSet<Vec<(usize, usize)>> = (0..20)
        .map(|s| unordered(&Scripted::new(&q).run(&rc, s).unwrap()))
        .collect();
    assert!(all.len() > 3);
    // Random + Bradley–Terry: one call.
    let mut j = Scripted::new(&q);
    let bt = PairingConfig {
        strength: StrengthSource::BradleyTerry,
        ..rc
    };
    let p = j.run(&bt, 3).unwrap();
    assert_eq!(j.calls.len(), 1);
    assert_eq!(p.pairs.len(), 3);
}

#[test]
fn invalid_judge_output_errors() {
    let run = |k: usize, judge: &mut JudgeFn<'_>| {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        pair_candidates(k, &cfg(k), &mut rng, judge)
    };
    // Wrong count.
    let e = run(5, &mut |_| Ok(vec![0.5; 3])).unwrap_err().to_string();
    assert!(e.contains("3 values for 4 comparisons"), "{e}");
    // Out of range / not finite, naming the comparison.
    for bad in [1.5, -0.1, f64::NAN, f64::INFINITY] {
        let e = run(5, &mut |_| Ok(vec![0.5, 0.5, bad, 0.5]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("comparison 2 (sample 3 vs sample 0"), "{e}");
    }
    // Bad value in the second (fresh strength) call.
    let mut n = 0;
    let e = run(5, &mut |_| {
        n += 1;
        Ok(if n == 1 {
            vec![0.9, 0.1, 0.6, 0.4]
        } else {
            vec![0.7, 2.0]
        })
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("comparison 1 (sample 3 vs sample 4, pair strengths)"),
        "{e}"
    );
    // Judge errors propagate.
    let e = run(5, &mut |_| bail!("out of memory")).unwrap_err();
    assert!(format!("{e:#}").contains("out of memory"));
}

#[test]
fn too_few_samples_error_without_judging() {
    let mut called = false;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut judge = |_: &[(Cand, Cand)]| -> Result<Vec<f64>> {
        called = true;
        Ok(vec![])
    };
    assert!(pair_candidates(2, &cfg(2), &mut rng, &mut judge).is_err());
    let given = PairingConfig {
        baseline: Baseline::Given,
        ..cfg(1)
    };
    assert!(pair_candidates(1, &given, &mut rng, &mut judge).is_err());
    assert!(pair_candidates(0, &given, &mut rng, &mut judge).is_err());
    assert!(!called);
    assert!(cfg(2).validate().is_err());
    assert!(cfg(3).validate().is_ok());
    assert!(given.validate().is_err());
    assert!(PairingConfig { k: 2, ..given }.validate().is_ok());
}

#[test]
fn config_toml_defaults_and_unknown_fields() {
    let d: PairingConfig = toml::from_str("").unwrap();
    assert_eq!(d, PairingConfig::default());
    assert_eq!(
        (d.k, d.baseline, d.strength, d.mode),
        (
            7,
            Baseline::First,
            StrengthSource::Fresh,
            PairingMode::Ranked
        )
    );
    let c: PairingConfig = toml::from_str(
        "k = 5\nbaseline = \"given\"\nstrength = \"bradley_terry\"\nmode = \"random\"\n",
    )
    .unwrap();
    assert_eq!(
        c,
        PairingConfig {
            k: 5,
            baseline: Baseline::Given,
            strength: StrengthSource::BradleyTerry,
            mode: PairingMode::Random
        }
    );
    assert!(toml::from_str::<PairingConfig>("kk = 5").is_err());
    assert!(toml::from_str::<PairingConfig>("baseline = \"greedy\"").is_err());
}

/// Standard normal draw (Box–Muller).
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Coverage claim: ranked pairs span strong to weak preferences, rank 0 (best vs worst)
/// being the most decisive on average, even with a noisy judge.
#[test]
fn ranked_pairs_span_strong_to_weak() {
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let trials = 400;
    let mut by_rank = [0.0f64; 3];
    let mut random_mean = 0.0;
    let ranked = cfg(7);
    let random = PairingConfig {
        mode: PairingMode::Random,
        ..cfg(7)
    };
    for t in 0..trials {
        let q: Vec<f64> = (0..7).map(|_| normal(&mut rng)).collect();
        let mut noise = ChaCha8Rng::seed_from_u64(1000 + t);
        let mut judge = |b: &[(Cand, Cand)]| -> Result<Vec<f64>> {
            Ok(b.iter()
                .map(|&(a, c)| {
                    let (Cand::Sample(a), Cand::Sample(c)) = (a, c) else {
                        unreachable!()
                    };
                    sigmoid(q[a] - q[c] + 0.5 * normal(&mut noise))
                })
                .collect())
        };
        let p = pair_candidates(7, &ranked, &mut rng, &mut judge).unwrap();
        assert_eq!(p.pairs.len(), 3);
        for x in &p.pairs {
            by_rank[x.rank] += (x.strength - 0.5).abs() / trials as f64;
        }
        let p = pair_candidates(7, &random, &mut rng, &mut judge).unwrap();
        for x in &p.pairs {
            random_mean += (x.strength - 0.5).abs() / (3 * trials) as f64;
        }
    }
    assert!(
        by_rank[0] > by_rank[1] && by_rank[1] > by_rank[2],
        "mean |s − ½| by rank: {by_rank:?}"
    );
    assert!(
        by_rank[0] > random_mean,
        "{by_rank:?} vs random {random_mean}"
    );
}
