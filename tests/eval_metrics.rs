//! Judge/evaluation metrics against hand-computed values and textbook examples.
use osp::eval::{
    accuracy, expected_calibration_error, histogram01, mean_decisiveness, mean_std,
    position_bias_rate, spearman, win_rate,
};

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[test]
fn accuracy_counts_ties_half() {
    assert!(close(accuracy(&[0.9, 0.4, 0.5, 0.7]), 0.625));
    assert!(close(accuracy(&[1.0, 0.51]), 1.0));
    assert!(close(accuracy(&[0.0, 0.49]), 0.0));
    assert!(accuracy(&[]).is_nan());
}

#[test]
fn ece_hand_computed() {
    // 5 bins of width 0.1 on [0.5, 1]:
    //   bin 0: conf 0.5 (tie, correct ½), 0.55 (correct)   → |1.5 − 1.05| = 0.45
    //   bin 1: 0.65 (correct)                              → 0.35
    //   bin 2: 0.75 (correct), 0.72 (p = 0.28, wrong)      → |1 − 1.47| = 0.47
    //   bin 3: 0.85 (p = 0.15, wrong)                      → 0.85
    //   bin 4: 0.9, 0.95 (both correct)                    → |2 − 1.85| = 0.15
    // ECE = (0.45 + 0.35 + 0.47 + 0.85 + 0.15) / 8 = 0.28375
    let p = [0.9, 0.75, 0.28, 0.65, 0.5, 0.95, 0.15, 0.55];
    let ece = expected_calibration_error(&p, 5);
    assert!((ece - 0.28375).abs() < 1e-12, "{ece}");
}

#[test]
fn ece_perfect_and_worst_calibration() {
    // One bin, confidence 0.75 everywhere, right 3 times out of 4: calibrated.
    assert!(close(
        expected_calibration_error(&[0.75, 0.75, 0.75, 0.25], 1),
        0.0
    ));
    assert!(close(expected_calibration_error(&[1.0, 1.0], 10), 0.0));
    // Always certain and always wrong.
    assert!(close(expected_calibration_error(&[0.0, 0.0, 0.0], 10), 1.0));
    // A tie (p = 0.5) has confidence 0.5 and correctness ½: calibrated.
    assert!(close(expected_calibration_error(&[0.5], 5), 0.0));
    // Bin edges at decimal values (0.6 with 5 bins) go to the upper bin: 0.6 (right) and
    // 0.45 (confidence 0.55, wrong) in separate bins give (0.4 + 0.55) / 2; in one bin they
    // would give |1 − 1.15| / 2 = 0.075.
    assert!(close(expected_calibration_error(&[0.6, 0.45], 5), 0.475));
    assert!(close(expected_calibration_error(&[0.6, 0.45], 1), 0.075));
}

#[test]
fn ece_undefined_inputs_are_nan() {
    assert!(expected_calibration_error(&[], 10).is_nan());
    assert!(expected_calibration_error(&[0.7], 0).is_nan());
    assert!(expected_calibration_error(&[0.7, f64::NAN], 10).is_nan());
    assert!(expected_calibration_error(&[1.5], 10).is_nan());
}

#[test]
fn position_bias_rate_hand_computed() {
    let f = [0.8, 0.7, 0.3, 0.5, 0.6, 0.5];
    let b = [0.3, 0.9, 0.2, 0.5, 0.5, 0.1];
    // consistent, both pick A, both pick B, both tie, tie vs decided (½), tie vs decided (½)
    assert!(close(position_bias_rate(&f, &b), 0.5));
    // A perfectly consistent judge: p_AB(y2, y1) = 1 − p_AB(y1, y2).
    let f = [0.9, 0.2, 0.65];
    let b: Vec<f64> = f.iter().map(|p| 1.0 - p).collect();
    assert!(close(position_bias_rate(&f, &b), 0.0));
    // A judge that always answers "A".
    assert!(close(position_bias_rate(&[0.9, 0.8], &[0.7, 0.99]), 1.0));
    assert!(position_bias_rate(&[0.9], &[0.1, 0.2]).is_nan());
    assert!(position_bias_rate(&[], &[]).is_nan());
}

#[test]
fn spearman_textbook_example() {
    // Wikipedia "Spearman's rank correlation coefficient": IQ vs hours of TV per week,
    // rho = −29/165 ≈ −0.175757575...
    let iq = [
        106.0, 100.0, 86.0, 101.0, 99.0, 103.0, 97.0, 113.0, 112.0, 110.0,
    ];
    let tv = [7.0, 27.0, 2.0, 50.0, 28.0, 29.0, 20.0, 12.0, 6.0, 17.0];
    let rho = spearman(&iq, &tv).unwrap();
    assert!((rho - (-29.0 / 165.0)).abs() < 1e-12, "{rho}");
}

#[test]
fn spearman_with_ties_matches_scipy() {
    // Reference: Pearson of average ranks (scipy.stats.spearmanr), computed with numpy:
    // ranks x = [1, 2.5, 2.5, 4, 6, 6, 6, 8], ranks y = [2, 1, 3.5, 3.5, 7, 5.5, 5.5, 8].
    let x = [1.0, 2.0, 2.0, 3.0, 4.0, 4.0, 4.0, 5.0];
    let y = [2.0, 1.0, 3.0, 3.0, 5.0, 4.0, 4.0, 6.0];
    let rho = spearman(&x, &y).unwrap();
    assert!((rho - 0.925_626_545_313_669_2).abs() < 1e-12, "{rho}");
    let x = [10.0, 20.0, 20.0, 30.0, 40.0];
    let y = [1.0, 3.0, 2.0, 2.0, 5.0];
    let rho = spearman(&x, &y).unwrap();
    assert!((rho - 0.763_157_894_736_842_1).abs() < 1e-12, "{rho}");
    // Symmetric, invariant under monotone transforms, ±1 for (anti)monotone data.
    assert!(close(spearman(&y, &x).unwrap(), rho));
    let ex: Vec<f64> = x.iter().map(|v: &f64| v.exp()).collect();
    assert!(close(spearman(&ex, &y).unwrap(), rho));
    assert!(close(
        spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 35.0]).unwrap(),
        1.0
    ));
    assert!(close(
        spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]).unwrap(),
        -1.0
    ));
}

#[test]
fn spearman_undefined_is_none() {
    assert_eq!(spearman(&[], &[]), None);
    assert_eq!(spearman(&[1.0], &[2.0]), None);
    assert_eq!(spearman(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]), None);
    assert_eq!(spearman(&[1.0, 2.0], &[1.0, 2.0, 3.0]), None);
    assert_eq!(spearman(&[1.0, f64::NAN], &[1.0, 2.0]), None);
}

#[test]
fn win_rate_and_mean_std() {
    // numpy: mean 0.6428571428571429, std(ddof=1)/sqrt(7) = 0.17975796274454164
    let (m, se) = win_rate(&[1.0, 0.0, 0.5, 1.0, 1.0, 0.0, 1.0]);
    assert!(close(m, 0.642_857_142_857_142_9), "{m}");
    assert!(close(se, 0.179_757_962_744_541_64), "{se}");
    // Textbook: [2, 4, 4, 4, 5, 5, 7, 9] has mean 5, population std 2, sample std
    // sqrt(32/7) = 2.138089935299395.
    let (m, s) = mean_std(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
    assert!(close(m, 5.0));
    assert!(close(s, (32.0f64 / 7.0).sqrt()));
    let (m, s) = mean_std(&[3.0]);
    assert!(close(m, 3.0) && s.is_nan());
    let (m, s) = mean_std(&[]);
    assert!(m.is_nan() && s.is_nan());
    let (m, se) = win_rate(&[1.0, 1.0, 1.0]);
    assert!(close(m, 1.0) && close(se, 0.0));
}

#[test]
fn decisiveness_and_histogram() {
    assert!(close(mean_decisiveness(&[0.5, 1.0, 0.0, 0.7]), 0.3));
    assert!(mean_decisiveness(&[]).is_nan());
    assert_eq!(
        histogram01(&[0.0, 0.1, 0.25, 0.5, 0.99, 1.0, 1.5, f64::NAN], 4),
        vec![2, 1, 1, 2]
    );
    assert!(histogram01(&[0.3], 0).is_empty());
}
