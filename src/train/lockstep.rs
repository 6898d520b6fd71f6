//! Ranked pairing asks the judge in rounds (the baseline scores, then the pairs' fresh
//! strengths), and what a prompt asks next depends on the answers. To fill the judge's batches
//! with every prompt of a micro-batch, the rounds of all prompts run in lockstep: each prompt's
//! method runs against the judgements known so far; where it asks for one not yet judged, its
//! run stops there ([`NeedJudging`]) and the comparison joins the round's batch; once the batch
//! is judged the methods run again from the start with the same random stream, replaying their
//! earlier rounds from the known judgements, until every prompt has its pairs. Methods stay
//! plain functions of their judge's answers and random stream (`OnlineMethod`), and as long as
//! a comparison's judgement does not depend on the batch it is in (the engine's do not), the
//! pairs are exactly those of judging each prompt alone.
use super::online_method::{OnlineMethod, OnlinePair};
use crate::judge::Judgement;
use crate::pairing::Cand;
use anyhow::Result;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

/// A method's run stopped at a comparison not judged yet.
#[derive(Debug)]
pub struct NeedJudging;

impl std::fmt::Display for NeedJudging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a comparison is waiting for the round's batched judge call")
    }
}

impl std::error::Error for NeedJudging {}

/// What the lockstep rounds produced for each prompt.
pub struct PromptPairs {
    pub pairs: Vec<OnlinePair>,
    /// The judgements the method used, in the order it asked for them.
    pub used: Vec<Judgement>,
}

/// Pairs for `n_prompts` prompts of `n_samples` samples each: `rng(b)` gives prompt b's
/// random stream (the same at every replay), `judge_round` judges one round's comparisons
/// (prompt, a, b) of every prompt in one call. Returns the pairs and the number of rounds.
pub fn lockstep_pairs(
    method: &dyn OnlineMethod,
    n_prompts: usize,
    n_samples: usize,
    rng: impl Fn(usize) -> ChaCha8Rng,
    mut judge_round: impl FnMut(&[(usize, Cand, Cand)]) -> Result<Vec<Judgement>>,
) -> Result<(Vec<PromptPairs>, usize)> {
    let mut known: Vec<HashMap<(Cand, Cand), Judgement>> = vec![HashMap::new(); n_prompts];
    let mut done: Vec<Option<PromptPairs>> = (0..n_prompts).map(|_| None).collect();
    let mut rounds = 0;
    loop {
        let mut wanted: Vec<(usize, Cand, Cand)> = vec![];
        for b in 0..n_prompts {
            if done[b].is_some() {
                continue;
            }
            let mut used: Vec<Judgement> = vec![];
            let mut missing: Vec<(Cand, Cand)> = vec![];
            let mut judge = |cmp: &[(Cand, Cand)]| -> Result<Vec<f64>> {
                for c in cmp {
                    if !known[b].contains_key(c) && !missing.contains(c) {
                        missing.push(*c);
                    }
                }
                if !missing.is_empty() {
                    return Err(NeedJudging.into());
                }
                let js: Vec<Judgement> = cmp.iter().map(|c| known[b][c]).collect();
                used.extend(&js);
                Ok(js.iter().map(|j| j.strength).collect())
            };
            match method.pairs(n_samples, &mut judge, &mut rng(b)) {
                Ok(pairs) => done[b] = Some(PromptPairs { pairs, used }),
                Err(e) if e.downcast_ref::<NeedJudging>().is_some() => {
                    wanted.extend(missing.into_iter().map(|(x, y)| (b, x, y)));
                }
                Err(e) => return Err(e),
            }
        }
        if wanted.is_empty() {
            break;
        }
        rounds += 1;
        let js = judge_round(&wanted)?;
        anyhow::ensure!(
            js.len() == wanted.len(),
            "the judge returned {} judgements for {} comparisons",
            js.len(),
            wanted.len()
        );
        for (&(b, x, y), j) in wanted.iter().zip(js) {
            known[b].insert((x, y), j);
        }
    }
    Ok((done.into_iter().flatten().collect(), rounds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pairing::{PairingConfig, StrengthSource};
    use crate::train::online_method::Osp;
    use rand::SeedableRng;

    /// A scripted judge: a fixed, asymmetric value per (prompt, a, b).
    fn scripted(b: usize, x: Cand, y: Cand) -> Judgement {
        let id = |c: Cand| match c {
            Cand::Sample(i) => i as f64,
            Cand::Baseline => 9.5,
        };
        let s = ((id(x) * 0.37 + id(y) * 0.11 + b as f64 * 0.23).sin() + 1.0) / 2.0;
        Judgement {
            strength: s,
            p_forward: s,
            p_backward: Some(1.0 - s),
        }
    }

    #[test]
    fn lockstep_rounds_give_the_pairs_of_judging_each_prompt_alone() {
        for strength in [StrengthSource::Fresh, StrengthSource::BradleyTerry] {
            let method = Osp {
                pairing: PairingConfig {
                    strength,
                    ..PairingConfig::default()
                },
                hard: false,
            };
            let (n, k) = (5, 7);
            let rng = |b: usize| ChaCha8Rng::seed_from_u64(40 + b as u64);
            let mut calls = 0;
            let (got, rounds) = lockstep_pairs(&method, n, k, rng, |w| {
                calls += 1;
                // Every prompt is in every round's single call.
                let mut prompts: Vec<usize> = w.iter().map(|c| c.0).collect();
                prompts.dedup();
                assert_eq!(prompts, (0..n).collect::<Vec<_>>());
                Ok(w.iter().map(|&(b, x, y)| scripted(b, x, y)).collect())
            })
            .unwrap();
            let want_rounds = match strength {
                StrengthSource::Fresh => 2,
                StrengthSource::BradleyTerry => 1,
            };
            assert_eq!((rounds, calls), (want_rounds, want_rounds));
            for (b, g) in got.iter().enumerate() {
                let mut judge = |cmp: &[(Cand, Cand)]| -> Result<Vec<f64>> {
                    Ok(cmp
                        .iter()
                        .map(|&(x, y)| scripted(b, x, y).strength)
                        .collect())
                };
                let alone = method.pairs(k, &mut judge, &mut rng(b)).unwrap();
                assert_eq!(g.pairs, alone, "prompt {b}");
                assert_eq!(g.pairs.len(), 3);
                let asked = 6 + if want_rounds == 2 { 3 } else { 0 };
                assert_eq!(g.used.len(), asked);
            }
        }
    }

    #[test]
    fn a_judge_error_is_returned() {
        let method = Osp {
            pairing: PairingConfig::default(),
            hard: false,
        };
        let rng = |b: usize| ChaCha8Rng::seed_from_u64(b as u64);
        let err = lockstep_pairs(&method, 2, 7, rng, |_| anyhow::bail!("judge broke"))
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("judge broke"));
    }
}
