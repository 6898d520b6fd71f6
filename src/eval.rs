//! Judge and evaluation metrics (OSP.md §1, §7): pure functions on `f64` slices.
//!
//! Conventions: a *strength* is P(chosen ≻ rejected) where the label says the chosen
//! response wins; an exact 0.5 is a tie and counts ½ wherever a winner is counted. Metrics
//! that are undefined for their input (empty input, mismatched lengths, non-finite values
//! where noted) return NaN rather than panicking; [`spearman`] returns `None`.

/// 1 if `p` > 0.5, ½ if `p` = 0.5, 0 otherwise (NaN counts 0).
fn vote(p: f64) -> f64 {
    if p > 0.5 {
        1.0
    } else if p == 0.5 {
        0.5
    } else {
        0.0
    }
}

/// Judge accuracy: the fraction of pairs whose strength P(chosen ≻ rejected) is above 0.5,
/// an exact 0.5 counting ½. NaN for empty input.
pub fn accuracy(pred_strengths: &[f64]) -> f64 {
    if pred_strengths.is_empty() {
        return f64::NAN;
    }
    pred_strengths.iter().map(|&p| vote(p)).sum::<f64>() / pred_strengths.len() as f64
}

/// Expected calibration error of a pairwise judge.
///
/// Each input p = P(chosen ≻ rejected), the label saying the chosen response wins. The
/// predicted winner's confidence is max(p, 1 − p) ∈ [0.5, 1] and it is correct when p > 0.5
/// (½ at p = 0.5). The confidences fall into `n_bins` equal-width bins on [0.5, 1]: bin j
/// covers [0.5 + j·w, 0.5 + (j+1)·w) with w = 0.5 / n_bins, the last bin closed at 1. Then
///   ECE = Σ_bins (|B| / N) · |mean correctness(B) − mean confidence(B)|.
/// NaN for empty input, `n_bins` = 0, or any non-finite or out-of-[0, 1] input.
pub fn expected_calibration_error(confidences_of_chosen: &[f64], n_bins: usize) -> f64 {
    if confidences_of_chosen.is_empty()
        || n_bins == 0
        || confidences_of_chosen
            .iter()
            .any(|p| !p.is_finite() || !(0.0..=1.0).contains(p))
    {
        return f64::NAN;
    }
    let mut count = vec![0usize; n_bins];
    let mut sum_conf = vec![0.0f64; n_bins];
    let mut sum_correct = vec![0.0f64; n_bins];
    for &p in confidences_of_chosen {
        let conf = p.max(1.0 - p);
        // floor(conf · 2n) − n rather than floor((conf − 0.5) / w): exact at decimal edges
        // such as 0.6 with 5 bins.
        let bin = ((conf * 2.0 * n_bins as f64).floor() as usize)
            .saturating_sub(n_bins)
            .min(n_bins - 1);
        count[bin] += 1;
        sum_conf[bin] += conf;
        sum_correct[bin] += vote(p);
    }
    let n = confidences_of_chosen.len() as f64;
    (0..n_bins)
        .filter(|&j| count[j] > 0)
        .map(|j| (sum_correct[j] - sum_conf[j]).abs() / n)
        .sum()
}

/// Position-bias rate: the fraction of pairs whose two judging orders disagree about the
/// winner.
///
/// `p_forward[i]` = p_AB(x, y1, y2) and `p_backward[i]` = p_AB(x, y2, y1), each the
/// probability that the response in position A is better. The forward order votes for y1
/// when p_forward > 0.5, the backward order when p_backward < 0.5; a consistent judge picks
/// the same response in both orders, while e.g. p_forward > 0.5 and p_backward > 0.5 (both
/// orders pick position A) is a disagreement. Each order's vote for y1 is 1, ½ (p = 0.5)
/// or 0 and a pair contributes |vote_forward − vote_backward|, so a tie against a decided
/// vote counts ½ and two ties count 0. NaN for empty input or mismatched lengths.
pub fn position_bias_rate(p_forward: &[f64], p_backward: &[f64]) -> f64 {
    if p_forward.is_empty() || p_forward.len() != p_backward.len() {
        return f64::NAN;
    }
    p_forward
        .iter()
        .zip(p_backward)
        .map(|(&f, &b)| (vote(f) - vote(1.0 - b)).abs())
        .sum::<f64>()
        / p_forward.len() as f64
}

/// Ranks 1…n, tied values sharing the average of their ranks (input must be finite).
fn average_ranks(xs: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..xs.len()).collect();
    order.sort_by(|&i, &j| xs[i].total_cmp(&xs[j]));
    let mut ranks = vec![0.0; xs.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && xs[order[end]] == xs[order[start]] {
            end += 1;
        }
        // Positions start..end (0-based) hold ranks start+1 ..= end; their mean:
        let avg = (start + 1 + end) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = avg;
        }
        start = end;
    }
    ranks
}

/// Pearson correlation; `None` when either side has zero variance.
fn pearson(a: &[f64], b: &[f64]) -> Option<f64> {
    let n = a.len() as f64;
    let ma = a.iter().sum::<f64>() / n;
    let mb = b.iter().sum::<f64>() / n;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        sab += (x - ma) * (y - mb);
        saa += (x - ma) * (x - ma);
        sbb += (y - mb) * (y - mb);
    }
    if saa <= 0.0 || sbb <= 0.0 {
        return None;
    }
    Some((sab / (saa.sqrt() * sbb.sqrt())).clamp(-1.0, 1.0))
}

/// Spearman rank correlation: the Pearson correlation of the ranks, ties getting their
/// average rank (as `scipy.stats.spearmanr`). `None` with fewer than 2 points, mismatched
/// lengths, a non-finite value, or a side whose values are all equal.
pub fn spearman(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() < 2 || a.len() != b.len() || a.iter().chain(b).any(|x| !x.is_finite()) {
        return None;
    }
    pearson(&average_ranks(a), &average_ranks(b))
}

/// Win rate and its standard error. Each outcome is 1 (win), 0 (loss) or 0.5 (tie); the
/// rate is their mean and the standard error is the sample standard deviation (n − 1
/// denominator) over √n. (NaN, NaN) for empty input; the error is NaN for one outcome.
pub fn win_rate(outcomes: &[f64]) -> (f64, f64) {
    let (mean, std) = mean_std(outcomes);
    (mean, std / (outcomes.len() as f64).sqrt())
}

/// Mean and sample standard deviation (n − 1 denominator, numpy's `std(ddof=1)`).
/// (NaN, NaN) for empty input; the deviation is NaN for a single value.
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, f64::NAN);
    }
    let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// Mean |s − ½| of judged strengths: how decisive the judge is (logged per OSP.md §1).
/// NaN for empty input.
pub fn mean_decisiveness(strengths: &[f64]) -> f64 {
    if strengths.is_empty() {
        return f64::NAN;
    }
    strengths.iter().map(|s| (s - 0.5).abs()).sum::<f64>() / strengths.len() as f64
}

/// Counts of `xs` in `n_bins` equal-width bins on [0, 1] (bin j covers [j/n, (j+1)/n), the
/// last bin closed at 1), e.g. for the strength histogram of OSP.md §5. Values outside
/// [0, 1] or non-finite are not counted. Empty for `n_bins` = 0.
pub fn histogram01(xs: &[f64], n_bins: usize) -> Vec<usize> {
    let mut counts = vec![0usize; n_bins];
    if n_bins == 0 {
        return counts;
    }
    for &x in xs {
        if x.is_finite() && (0.0..=1.0).contains(&x) {
            let bin = ((x * n_bins as f64).floor() as usize).min(n_bins - 1);
            counts[bin] += 1;
        }
    }
    counts
}
