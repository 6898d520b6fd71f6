//! Ranked pairing (OSP.md §2): turn K sampled responses to one prompt into K//2 preference
//! pairs, each with a judged strength, independent of the model.
//!
//! The judge is abstracted as a closure over candidate indices, so the pairing logic can be
//! tested with a scripted judge and the real judge can run one batched forward per call:
//!
//! 1. Every scored candidate y_k is compared with the baseline y_b in **one** judge call:
//!    c_k = s(y_k ≻ y_b | x).
//! 2. The scored candidates are sorted by c_k, descending (ties: lower index first), and
//!    paired best with worst, second-best with second-worst, …: (y(i), y(m+1−i)) for
//!    i = 1 … m//2, where m is the number of scored candidates; with m odd the middle one is
//!    left out.
//! 3. The strength of each pair is either a fresh judgement s(y(i) ≻ y(m+1−i)) (a **second**
//!    judge call holding all the pairs) or the Bradley–Terry estimate
//!    σ(logit c(i) − logit c(m+1−i)) (no extra call).
//!
//! The judge is therefore called once (Bradley–Terry) or twice (fresh) per prompt.
use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Which response the candidates are scored against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Baseline {
    /// The first sample (index 0) is the baseline; the other K − 1 samples are scored and
    /// paired, giving (K − 1)//2 pairs (3 for K = 7).
    First,
    /// A baseline response supplied by the caller (e.g. the greedy response of πref),
    /// passed to the judge as [`Cand::Baseline`]; all K samples are scored and paired,
    /// giving K//2 pairs.
    Given,
}

/// Where a pair's strength comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StrengthSource {
    /// A fresh judgement s(chosen ≻ rejected): one more judge call per prompt holding every
    /// pair.
    Fresh,
    /// The Bradley–Terry estimate σ(logit c_chosen − logit c_rejected) from the baseline
    /// scores, each clamped to [1e-6, 1 − 1e-6]; no extra judge call.
    BradleyTerry,
}

/// How the scored candidates are paired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PairingMode {
    /// Best with worst, second-best with second-worst, … (OSP default).
    Ranked,
    /// Ablation: shuffle the scored candidates with the caller's random stream and pair
    /// consecutive ones.
    Random,
}

/// Ranked-pairing options (OSP.md §2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PairingConfig {
    /// Responses sampled per prompt, K. Default 7. At least 3 with `baseline = "first"`
    /// (two scored candidates are needed for a pair), at least 2 with `baseline = "given"`.
    pub k: usize,
    /// What the candidates are scored against: `"first"` (sample 0) or `"given"` (a response
    /// supplied by the caller, e.g. πref's greedy response). Default "first".
    pub baseline: Baseline,
    /// Pair strength: `"fresh"` (one extra batched judge call) or `"bradley_terry"` (from the
    /// baseline scores, no extra call). Default "fresh".
    pub strength: StrengthSource,
    /// `"ranked"` or `"random"` (ablation; set by the osp-random-pairs method). Default
    /// "ranked".
    pub mode: PairingMode,
}

impl Default for PairingConfig {
    fn default() -> Self {
        Self {
            k: 7,
            baseline: Baseline::First,
            strength: StrengthSource::Fresh,
            mode: PairingMode::Ranked,
        }
    }
}

impl PairingConfig {
    /// The fewest samples per prompt that give at least one pair with this baseline.
    pub fn min_samples(&self) -> usize {
        match self.baseline {
            Baseline::First => 3,
            Baseline::Given => 2,
        }
    }

    /// Check `k` against the baseline choice.
    pub fn validate(&self) -> Result<()> {
        if self.k < self.min_samples() {
            bail!(
                "pairing: k = {} is too small: baseline `{}` needs k >= {}",
                self.k,
                self.baseline.name(),
                self.min_samples()
            );
        }
        Ok(())
    }

    /// How many pairs `n_samples` samples give: (n − 1)//2 with the first sample as
    /// baseline, n//2 with a given baseline.
    pub fn n_pairs(&self, n_samples: usize) -> usize {
        match self.baseline {
            Baseline::First => n_samples.saturating_sub(1) / 2,
            Baseline::Given => n_samples / 2,
        }
    }
}

impl Baseline {
    fn name(self) -> &'static str {
        match self {
            Baseline::First => "first",
            Baseline::Given => "given",
        }
    }
}

/// A candidate response, as the judge closure sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Cand {
    /// The i-th sampled response (0-based). With [`Baseline::First`] the baseline is
    /// `Sample(0)`.
    Sample(usize),
    /// The caller's baseline response ([`Baseline::Given`] only).
    Baseline,
}

impl fmt::Display for Cand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cand::Sample(i) => write!(f, "sample {i}"),
            Cand::Baseline => write!(f, "the given baseline"),
        }
    }
}

/// One preference pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pair {
    /// Index of the preferred response in the sample list (the higher-scored one).
    pub chosen: usize,
    /// Index of the dispreferred response in the sample list.
    pub rejected: usize,
    /// P(chosen ≻ rejected), the soft label of the SPCE loss. With
    /// [`StrengthSource::Fresh`] a fresh judgement may disagree with the baseline ranking
    /// and come back below 0.5: the orientation is then kept and the strength reported as
    /// it is (never silently flipped); the SPCE loss handles s < 0.5 correctly.
    pub strength: f64,
    /// 0 = best-vs-worst pair, 1 = second-best vs second-worst, … In random mode, the
    /// position of the pair in the shuffled order.
    pub rank: usize,
    /// The baseline scores (c_chosen, c_rejected) of the two responses.
    pub baseline_scores: (f64, f64),
}

/// The pairs made from one prompt's samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pairing {
    /// The pairs, by rank (rank 0 first).
    pub pairs: Vec<Pair>,
    /// (sample index, c_k) for every scored (non-baseline) sample, best first.
    pub scores: Vec<(usize, f64)>,
    /// Index of the baseline sample (`Some(0)` with [`Baseline::First`]), `None` when the
    /// baseline was given by the caller.
    pub baseline: Option<usize>,
    /// Judge calls made (1 with Bradley–Terry strengths, 2 with fresh ones).
    pub judge_calls: usize,
    /// Comparisons judged over all calls (each one is judged in both orders by the real
    /// judge).
    pub comparisons: usize,
}

/// The judge closure: s(a ≻ b) in [0, 1] for each (a, b) of the batch, in order.
pub type JudgeFn<'a> = dyn FnMut(&[(Cand, Cand)]) -> Result<Vec<f64>> + 'a;

/// Pair `n_samples` responses to one prompt (module docs give the procedure).
///
/// `rng` is used only in [`PairingMode::Random`]. Errors when `n_samples` is below
/// [`PairingConfig::min_samples`], when the judge fails, returns the wrong number of values,
/// or returns a value that is not a finite number in [0, 1] (naming the comparison).
/// `cfg.k` is what the sampler draws; `n_samples` is what is paired.
pub fn pair_candidates(
    n_samples: usize,
    cfg: &PairingConfig,
    rng: &mut ChaCha8Rng,
    judge: &mut JudgeFn<'_>,
) -> Result<Pairing> {
    if n_samples < cfg.min_samples() {
        bail!(
            "pairing: {n_samples} samples are too few: baseline `{}` needs at least {}",
            cfg.baseline.name(),
            cfg.min_samples()
        );
    }
    let (baseline_idx, baseline_cand, scored): (Option<usize>, Cand, Vec<usize>) =
        match cfg.baseline {
            Baseline::First => (Some(0), Cand::Sample(0), (1..n_samples).collect()),
            Baseline::Given => (None, Cand::Baseline, (0..n_samples).collect()),
        };

    // Call 1: every scored candidate against the baseline.
    let batch: Vec<(Cand, Cand)> = scored
        .iter()
        .map(|&i| (Cand::Sample(i), baseline_cand))
        .collect();
    let c = call_judge(judge, &batch, "baseline scores")?;
    let mut judge_calls = 1;
    let mut comparisons = batch.len();
    // c_of[i] for sample i (NaN for the baseline sample, never read).
    let mut c_of = vec![f64::NAN; n_samples];
    for (&i, &ci) in scored.iter().zip(&c) {
        c_of[i] = ci;
    }

    let mut scores: Vec<(usize, f64)> = scored.iter().map(|&i| (i, c_of[i])).collect();
    scores.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));

    let m = scores.len();
    let idx_pairs: Vec<(usize, usize)> = match cfg.mode {
        PairingMode::Ranked => (0..m / 2)
            .map(|i| (scores[i].0, scores[m - 1 - i].0))
            .collect(),
        PairingMode::Random => {
            let mut order = scored.clone();
            order.shuffle(rng);
            order
                .chunks_exact(2)
                .map(|p| {
                    let (a, b) = (p[0], p[1]);
                    // Orient by the baseline scores, as in ranked mode (ties: lower index).
                    if c_of[a] > c_of[b] || (c_of[a] == c_of[b] && a < b) {
                        (a, b)
                    } else {
                        (b, a)
                    }
                })
                .collect()
        }
    };

    let strengths: Vec<f64> = match cfg.strength {
        StrengthSource::BradleyTerry => idx_pairs
            .iter()
            .map(|&(a, b)| bradley_terry(c_of[a], c_of[b]))
            .collect(),
        StrengthSource::Fresh => {
            let batch: Vec<(Cand, Cand)> = idx_pairs
                .iter()
                .map(|&(a, b)| (Cand::Sample(a), Cand::Sample(b)))
                .collect();
            let s = call_judge(judge, &batch, "pair strengths")?;
            judge_calls += 1;
            comparisons += batch.len();
            s
        }
    };

    let pairs = idx_pairs
        .iter()
        .zip(strengths)
        .enumerate()
        .map(|(rank, (&(a, b), strength))| Pair {
            chosen: a,
            rejected: b,
            strength,
            rank,
            baseline_scores: (c_of[a], c_of[b]),
        })
        .collect();

    Ok(Pairing {
        pairs,
        scores,
        baseline: baseline_idx,
        judge_calls,
        comparisons,
    })
}

/// The clamp applied to baseline scores before taking logits in [`bradley_terry`].
pub const BT_EPS: f64 = 1e-6;

/// Bradley–Terry strength from two baseline scores: σ(logit c_a − logit c_b), each c
/// clamped to [`BT_EPS`, 1 − `BT_EPS`].
pub fn bradley_terry(c_a: f64, c_b: f64) -> f64 {
    let logit = |c: f64| {
        let c = c.clamp(BT_EPS, 1.0 - BT_EPS);
        (c / (1.0 - c)).ln()
    };
    let d = logit(c_a) - logit(c_b);
    1.0 / (1.0 + (-d).exp())
}

fn call_judge(judge: &mut JudgeFn<'_>, batch: &[(Cand, Cand)], what: &str) -> Result<Vec<f64>> {
    let out = judge(batch).map_err(|e| e.context(format!("pairing: judge failed ({what})")))?;
    if out.len() != batch.len() {
        bail!(
            "pairing: judge returned {} values for {} comparisons ({what})",
            out.len(),
            batch.len()
        );
    }
    for (j, (&s, (a, b))) in out.iter().zip(batch).enumerate() {
        if !s.is_finite() || !(0.0..=1.0).contains(&s) {
            bail!(
                "pairing: judge returned {s} for comparison {j} ({a} vs {b}, {what}); \
                 expected a probability in [0, 1]"
            );
        }
    }
    Ok(out)
}
