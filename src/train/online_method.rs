//! What makes one online method differ from another: how a prompt's K samples become
//! training signal. Everything around it (sampling, log-probs under πθ and πref, the loss,
//! the optimiser step, evaluation) is the shared loop of `online.rs`, as TRL keeps one small
//! trainer per method over shared machinery.
use super::method::{Method, TrainConfig};
use super::self_rewarding::SelfRewarding;
use crate::pairing::{pair_candidates, Cand, JudgeFn, PairingConfig};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Result};
use rand_chacha::ChaCha8Rng;

/// A pair of one prompt's samples, with its judged strength and rank.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OnlinePair {
    /// Indices of the chosen and rejected samples (within the prompt's samples; the loop
    /// shifts them to the micro-batch's).
    pub chosen: usize,
    pub rejected: usize,
    /// s(chosen ≻ rejected), the SPCE target (1 for the DPO family).
    pub strength: f64,
    /// 0 for the best-with-worst pair, 1 for the next, …
    pub rank: usize,
}

/// One online method's signal: pairs with strengths from a prompt's samples, asking `judge`
/// for s(a ≻ b) of the comparisons it needs.
pub trait OnlineMethod {
    fn pairs(
        &self,
        n_samples: usize,
        judge: &mut JudgeFn<'_>,
        rng: &mut ChaCha8Rng,
    ) -> Result<Vec<OnlinePair>>;

    /// A method that scores each sample alone instead (self-rewarding): the loop then pairs
    /// a prompt's samples with its `score_and_pair`.
    fn self_rewarding(&self) -> Option<&SelfRewarding> {
        None
    }
}

/// OSP (OSP.md §2): ranked (or, for the ablation, random) pairs with judged strengths; with
/// `hard`, strengths rounded to 0/1 (the osp-hard ablation).
pub struct Osp {
    pub pairing: PairingConfig,
    pub hard: bool,
}

impl OnlineMethod for Osp {
    fn pairs(
        &self,
        n_samples: usize,
        judge: &mut JudgeFn<'_>,
        rng: &mut ChaCha8Rng,
    ) -> Result<Vec<OnlinePair>> {
        let pairing = pair_candidates(n_samples, &self.pairing, rng, judge)?;
        Ok(pairing
            .pairs
            .iter()
            .map(|q| OnlinePair {
                chosen: q.chosen,
                rejected: q.rejected,
                strength: match self.hard {
                    true if q.strength >= 0.5 => 1.0,
                    true => 0.0,
                    false => q.strength,
                },
                rank: q.rank,
            })
            .collect())
    }
}

/// Online DPO, OAIF-style: two samples, one binary self-judgement, the winner is chosen.
pub struct OnlineDpo;

impl OnlineMethod for OnlineDpo {
    fn pairs(
        &self,
        n_samples: usize,
        judge: &mut JudgeFn<'_>,
        _rng: &mut ChaCha8Rng,
    ) -> Result<Vec<OnlinePair>> {
        if n_samples != 2 {
            bail!("online-dpo pairs exactly 2 samples per prompt, got {n_samples}");
        }
        let s = judge(&[(Cand::Sample(0), Cand::Sample(1))])?[0];
        let (chosen, rejected) = if s >= 0.5 { (0, 1) } else { (1, 0) };
        Ok(vec![OnlinePair {
            chosen,
            rejected,
            strength: 1.0,
            rank: 0,
        }])
    }
}

/// The method type of an online `cfg.method`.
pub fn online_method(cfg: &TrainConfig) -> Result<Box<dyn OnlineMethod>> {
    Ok(match cfg.method {
        Method::Osp | Method::OspRandomPairs => Box::new(Osp {
            pairing: cfg.pairing.clone(),
            hard: false,
        }),
        Method::OspHard => Box::new(Osp {
            pairing: cfg.pairing.clone(),
            hard: true,
        }),
        Method::OnlineDpo => Box::new(OnlineDpo),
        Method::SelfRewarding => {
            bail!("method self-rewarding needs the tokenizer: use online_method_with")
        }
        m => bail!("method {m:?} is not a pairwise online method"),
    })
}

/// [`online_method`], plus the methods that need the tokenizer (self-rewarding's judge).
pub fn online_method_with(cfg: &TrainConfig, tok: &Tokenizer) -> Result<Box<dyn OnlineMethod>> {
    match cfg.method {
        Method::SelfRewarding => Ok(Box::new(SelfRewarding::new(cfg, tok)?)),
        _ => online_method(cfg),
    }
}
