//! Tests for `osp::report`: plots are valid PNGs of the promised size, odd inputs do not
//! panic, tables and mean ± error strings are exact.
//!
//! Set `OSP_PLOT_SAMPLES=DIR` to keep a copy of the sample plots in DIR for a look.

use std::path::{Path, PathBuf};

use osp::report::{fmt_mean_err, histogram_plot, line_plot, markdown_table, Series};

/// Checks the PNG signature and the IHDR chunk's width and height; returns the file size.
fn assert_png(path: &Path, width: u32, height: u32) -> usize {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(bytes.len() > 33, "{}: too short for a PNG", path.display());
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&bytes[8..12], &13u32.to_be_bytes(), "IHDR length");
    assert_eq!(&bytes[12..16], b"IHDR");
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((w, h), (width, height), "{}: size", path.display());
    bytes.len()
}

fn keep_sample(path: &Path) {
    if let Some(dir) = std::env::var_os("OSP_PLOT_SAMPLES") {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(path, dir.join(path.file_name().unwrap())).unwrap();
    }
}

fn series(name: &str, points: &[(f64, f64)]) -> Series {
    Series {
        name: name.to_string(),
        points: points.to_vec(),
    }
}

#[test]
fn line_plot_writes_a_png_of_the_requested_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("win_rate.png");
    let methods = [
        ("dpo", 0.55),
        ("ipo", 0.53),
        ("online_dpo", 0.51),
        ("osp", 0.58),
        ("osp_hard", 0.44),
        ("osp_random_pairs", 0.52),
        ("sft", 0.5),
    ];
    let mut all: Vec<Series> = methods
        .iter()
        .enumerate()
        .map(|(m, &(name, end))| {
            let points = (0..=20)
                .map(|i| {
                    let t = i as f64 / 20.0;
                    let wiggle = 0.015 * ((i * 7 + m * 3) % 5) as f64 - 0.03;
                    (i as f64 * 10.0, 0.5 + (end - 0.5) * t + wiggle * t)
                })
                .collect();
            Series {
                name: name.to_string(),
                points,
            }
        })
        .collect();
    // A gap: the NaN breaks the line.
    all[3].points[8].1 = f64::NAN;
    line_plot(
        &path,
        "Win rate vs SFT (oracle, temperature 1)",
        "iteration",
        "win rate vs SFT",
        &all,
        Some(0.5),
    )
    .unwrap();
    let size = assert_png(&path, 800, 500);
    // A blank 800×500 image compresses to a few KB; lines and text take more.
    assert!(size > 8_000, "suspiciously small plot: {size} bytes");
    keep_sample(&path);
}

#[test]
fn line_plot_survives_empty_nan_and_degenerate_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let nan = f64::NAN;
    let cases: Vec<(&str, Vec<Series>, Option<f64>)> = vec![
        ("no_series", vec![], None),
        ("no_series_ref", vec![], Some(0.5)),
        (
            "empty_points",
            vec![series("a", &[]), series("b", &[])],
            None,
        ),
        (
            "all_nan",
            vec![series("a", &[(nan, nan), (1.0, nan)])],
            Some(nan),
        ),
        ("single_point", vec![series("a", &[(3.0, 0.25)])], None),
        (
            "all_equal",
            vec![series("a", &[(0.0, 0.5), (1.0, 0.5), (2.0, 0.5)])],
            Some(0.5),
        ),
        ("same_x", vec![series("a", &[(1.0, 0.1), (1.0, 0.9)])], None),
        ("zero", vec![series("a", &[(0.0, 0.0), (0.0, 0.0)])], None),
        (
            "isolated_points",
            vec![series(
                "a",
                &[(0.0, 1.0), (nan, 2.0), (2.0, 3.0), (3.0, nan)],
            )],
            None,
        ),
        (
            "infinities",
            vec![series(
                "a",
                &[(0.0, f64::INFINITY), (1.0, 1.0), (2.0, f64::NEG_INFINITY)],
            )],
            Some(f64::INFINITY),
        ),
        (
            "huge",
            vec![series(
                "a",
                &[(f64::MIN, f64::MAX), (0.0, -1e300), (f64::MAX, 1e300)],
            )],
            None,
        ),
        ("max_only", vec![series("a", &[(f64::MAX, f64::MAX)])], None),
        (
            "tiny",
            vec![series("a", &[(0.0, 1e-12), (1e-12, 2e-12)])],
            None,
        ),
        (
            "many_series_long_names",
            (0..30)
                .map(|i| {
                    series(
                        &format!("a rather long series name that goes on and on {i}"),
                        &[(0.0, i as f64), (1.0, i as f64 + 1.0)],
                    )
                })
                .collect(),
            None,
        ),
        (
            "unicode_names",
            vec![
                series("β = 0.1, ½ ± σ — ok", &[(0.0, 0.0), (1.0, 1.0)]),
                series("名前 🙂\ttab\nnewline", &[(0.0, 1.0), (1.0, 0.0)]),
            ],
            None,
        ),
    ];
    for (name, s, reference) in cases {
        let path = dir.path().join(format!("{name}.png"));
        line_plot(&path, name, "x", "y", &s, reference)
            .unwrap_or_else(|e| panic!("case {name}: {e:#}"));
        assert_png(&path, 800, 500);
        keep_sample(&path);
    }
    // Empty title and labels are fine too.
    let path = dir.path().join("untitled.png");
    line_plot(
        &path,
        "",
        "",
        "",
        &[series("a", &[(0.0, 1.0), (1.0, 2.0)])],
        None,
    )
    .unwrap();
    assert_png(&path, 800, 500);
}

#[test]
fn histogram_plot_writes_a_png_of_the_requested_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("strengths.png");
    let groups = vec![
        (
            "position 0".to_string(),
            vec![1, 2, 4, 9, 15, 22, 18, 10, 5, 2],
        ),
        (
            "position 1".to_string(),
            vec![3, 6, 12, 18, 20, 14, 8, 4, 2, 1],
        ),
        (
            "position 2".to_string(),
            vec![12, 20, 18, 14, 9, 6, 4, 2, 1, 0],
        ),
    ];
    histogram_plot(
        &path,
        "Judged strength per ranked-pair position",
        "judged strength",
        &groups,
        0.0,
        1.0,
    )
    .unwrap();
    let size = assert_png(&path, 800, 500);
    assert!(size > 8_000, "suspiciously small plot: {size} bytes");
    keep_sample(&path);
}

#[test]
fn histogram_plot_survives_empty_and_odd_inputs() {
    let dir = tempfile::tempdir().unwrap();
    type Groups = Vec<(String, Vec<usize>)>;
    let cases: Vec<(&str, Groups)> = vec![
        ("no_groups", vec![]),
        (
            "empty_counts",
            vec![("a".into(), vec![]), ("b".into(), vec![])],
        ),
        ("all_zero", vec![("a".into(), vec![0, 0, 0])]),
        (
            "ragged",
            vec![("a".into(), vec![1, 2, 3]), ("b".into(), vec![5; 10])],
        ),
        ("huge_count", vec![("a".into(), vec![usize::MAX, 1])]),
        ("one_bin", vec![("a".into(), vec![7])]),
    ];
    for (name, groups) in cases {
        let path = dir.path().join(format!("{name}.png"));
        histogram_plot(&path, name, "x", &groups, -1.0, 1.0)
            .unwrap_or_else(|e| panic!("case {name}: {e:#}"));
        assert_png(&path, 800, 500);
        keep_sample(&path);
    }
    let groups = vec![("a".to_string(), vec![1, 2])];
    for (lo, hi) in [
        (f64::NAN, 1.0),
        (0.0, f64::NAN),
        (0.0, f64::INFINITY),
        (1.0, 1.0),
        (2.0, 1.0),
        (f64::MIN, f64::MAX),
    ] {
        let path = dir.path().join("bad_range.png");
        let err = histogram_plot(&path, "t", "x", &groups, lo, hi).unwrap_err();
        assert!(
            err.to_string().contains("bad_range.png"),
            "error should name the path: {err}"
        );
    }
}

#[test]
fn plot_errors_name_the_output_path() {
    let dir = tempfile::tempdir().unwrap();
    let s = [series("a", &[(0.0, 1.0), (1.0, 2.0)])];

    let missing = dir.path().join("no_such_dir").join("plot.png");
    let err = line_plot(&missing, "t", "x", "y", &s, None).unwrap_err();
    assert!(
        format!("{err:#}").contains(&missing.display().to_string()),
        "{err:#}"
    );
    let err = histogram_plot(&missing, "t", "x", &[("a".into(), vec![1])], 0.0, 1.0).unwrap_err();
    assert!(
        format!("{err:#}").contains(&missing.display().to_string()),
        "{err:#}"
    );

    let not_png = dir.path().join("plot.jpg");
    let err = line_plot(&not_png, "t", "x", "y", &s, None).unwrap_err();
    assert!(format!("{err:#}").contains("plot.jpg"), "{err:#}");
    assert!(!not_png.exists());
}

#[test]
fn markdown_table_is_exact() {
    let table = markdown_table(
        &["method", "win rate"],
        &[
            vec!["sft".to_string(), "0.50 ± 0.00".to_string()],
            vec!["osp".to_string(), "0.58 ± 0.03".to_string()],
        ],
    );
    assert_eq!(
        table,
        "| method | win rate    |\n\
         | ------ | ----------- |\n\
         | sft    | 0.50 ± 0.00 |\n\
         | osp    | 0.58 ± 0.03 |\n"
    );
}

#[test]
fn markdown_table_handles_odd_cells() {
    // Pipes are escaped, line breaks flattened, short rows padded, long rows get a column.
    let table = markdown_table(
        &["a", "b"],
        &[
            vec!["x|y".to_string()],
            vec![
                "1".to_string(),
                "two\nlines".to_string(),
                "extra".to_string(),
            ],
        ],
    );
    assert_eq!(
        table,
        "| a    | b         |       |\n\
         | ---- | --------- | ----- |\n\
         | x\\|y |           |       |\n\
         | 1    | two lines | extra |\n"
    );
    assert_eq!(markdown_table(&[], &[]), "");
    assert_eq!(markdown_table(&["only"], &[]), "| only |\n| ---- |\n");
}

#[test]
fn fmt_mean_err_examples() {
    assert_eq!(fmt_mean_err(0.5812, 0.0312), "0.58 ± 0.03");
    assert_eq!(fmt_mean_err(0.58, 0.03), "0.58 ± 0.03");
    assert_eq!(fmt_mean_err(0.5812, 0.0151), "0.581 ± 0.015");
    assert_eq!(fmt_mean_err(0.5812, 0.0012), "0.5812 ± 0.0012");
    assert_eq!(fmt_mean_err(523.4, 12.4), "523 ± 12");
    assert_eq!(fmt_mean_err(523.4, 42.0), "523 ± 42");
    assert_eq!(fmt_mean_err(0.5, 0.096), "0.50 ± 0.10");
    assert_eq!(fmt_mean_err(-0.001, 0.03), "0.00 ± 0.03");
    assert_eq!(fmt_mean_err(-0.21, 0.03), "-0.21 ± 0.03");
    // No usable error: three significant digits for the mean.
    assert_eq!(fmt_mean_err(0.58, 0.0), "0.580 ± 0.000");
    assert_eq!(fmt_mean_err(0.58, f64::NAN), "0.580 ± n/a");
    assert_eq!(fmt_mean_err(14.237, f64::NAN), "14.2 ± n/a");
    assert_eq!(fmt_mean_err(0.0, f64::NAN), "0.00 ± n/a");
    // NaN mean.
    assert_eq!(fmt_mean_err(f64::NAN, 0.03), "n/a");
    assert_eq!(fmt_mean_err(f64::NAN, f64::NAN), "n/a");
    // Never panics on extremes.
    for (m, e) in [
        (f64::INFINITY, 0.1),
        (f64::MAX, f64::MAX),
        (1e-300, 1e-300),
        (0.5, -0.1),
        (0.5, f64::INFINITY),
    ] {
        assert!(!fmt_mean_err(m, e).is_empty());
    }
}
