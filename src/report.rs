//! Plots and tables for the demo report: plain data in, files (or strings) out.
//!
//! Plots are 800×500 PNG files drawn with `plotters`' bitmap backend. Text is rendered
//! with DejaVu Sans embedded in the binary (`assets/DejaVuSans.ttf`), so plotting needs no
//! system fonts and no fontconfig.

use std::error::Error;
use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontStyle;

/// One line of a line plot.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// `(x, y)` points, joined in the given order; a point with a non-finite coordinate
    /// is skipped and breaks the line.
    pub points: Vec<(f64, f64)>,
}

/// Width and height of every plot, in pixels.
pub const PLOT_SIZE: (u32, u32) = (800, 500);

/// The font family every text element uses; the embedded font is registered under it.
const FONT: &str = "sans-serif";
static FONT_BYTES: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Distinct colours (the Tableau 10 palette), cycled when there are more series.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];
const REFERENCE_COLOR: RGBColor = RGBColor(90, 90, 90);

/// Longest legend entry, in characters, before it is shortened with "…".
const MAX_LEGEND_CHARS: usize = 32;

type DrawResult = std::result::Result<(), Box<dyn Error>>;

/// A line plot (x: e.g. iteration, y: e.g. win rate) with a legend, axis labels and a title,
/// and an optional dashed horizontal reference line (e.g. y = 0.5).
///
/// Points with a non-finite coordinate are skipped and break their line; a point with no
/// finite neighbour is drawn as a dot; series without points still get a legend entry.
/// Colours repeat after 10 series. Text outside DejaVu Sans (e.g. CJK, emoji) shows as boxes.
/// Axis ranges come from the finite data (and the reference line) with a margin.
/// `path` must end in `.png`; its directory must exist.
pub fn line_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    reference_y: Option<f64>,
) -> Result<()> {
    check_png_path(path)?;
    register_font()?;
    draw_line_plot(path, title, x_label, y_label, series, reference_y)
        .map_err(|e| anyhow!("plot {}: {e}", path.display()))
}

/// Grouped histograms: for each group (e.g. ranked-pair position 0, 1, 2), counts over equal
/// bins on `[lo, hi]` (a group's `counts.len()` is its number of bins), drawn side by side
/// within each bin, with a legend of the group names. Groups may be empty. Groups normally
/// share one bin count; with different counts their bars may overlap.
/// `lo` and `hi` must be finite with `lo < hi`; `path` must end in `.png`.
pub fn histogram_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    groups: &[(String, Vec<usize>)],
    lo: f64,
    hi: f64,
) -> Result<()> {
    check_png_path(path)?;
    if !(lo.is_finite() && hi.is_finite() && lo < hi && (hi - lo).is_finite()) {
        bail!(
            "plot {}: histogram range [{lo}, {hi}] must be finite and non-empty",
            path.display()
        );
    }
    register_font()?;
    draw_histogram(path, title, x_label, groups, lo, hi)
        .map_err(|e| anyhow!("plot {}: {e}", path.display()))
}

/// A markdown table: a header row, a separator and the rows; numbers are formatted by the
/// caller. Columns are padded to a common width; `|` in a cell is escaped and line breaks
/// become spaces. Short rows are padded with empty cells; extra cells get an empty header.
/// Returns an empty string when there is neither a header nor a row.
pub fn markdown_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let columns = rows
        .iter()
        .map(Vec::len)
        .chain(std::iter::once(header.len()))
        .max()
        .unwrap_or(0);
    if columns == 0 {
        return String::new();
    }
    let cells = |row: &mut dyn Iterator<Item = &str>| -> Vec<String> {
        let mut out: Vec<String> = row.map(escape_cell).collect();
        out.resize(columns, String::new());
        out
    };
    let header = cells(&mut header.iter().copied());
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| cells(&mut r.iter().map(String::as_str)))
        .collect();
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            std::iter::once(&header)
                .chain(&rows)
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
                .max(3)
        })
        .collect();
    let line = |row: &[String]| -> String {
        let mut s = String::from("|");
        for (cell, &w) in row.iter().zip(&widths) {
            let pad = w - cell.chars().count();
            s.push(' ');
            s.push_str(cell);
            s.extend(std::iter::repeat_n(' ', pad));
            s.push_str(" |");
        }
        s.push('\n');
        s
    };
    let mut out = line(&header);
    out.push('|');
    for &w in &widths {
        out.push(' ');
        out.extend(std::iter::repeat_n('-', w));
        out.push_str(" |");
    }
    out.push('\n');
    for row in &rows {
        out.push_str(&line(row));
    }
    out
}

/// "0.58 ± 0.03" style formatting of a mean and its standard error (or spread).
///
/// The error is rounded to one significant digit (two when its leading digit is 1) and the
/// mean to the same decimal place. Without a usable error (zero, negative or non-finite),
/// the mean gets three significant digits. NaN shows as "n/a": a NaN mean gives just
/// "n/a", a NaN error gives e.g. "0.580 ± n/a". At most 6 decimals are shown.
pub fn fmt_mean_err(mean: f64, err: f64) -> String {
    if mean.is_nan() {
        return "n/a".to_string();
    }
    let usable_err = err.is_finite() && err > 0.0;
    let decimals = if usable_err {
        let exp = err.log10().floor();
        let lead = err / 10f64.powf(exp);
        let digits = if lead < 1.95 { 2.0 } else { 1.0 };
        (digits - 1.0 - exp).clamp(0.0, 6.0) as usize
    } else if mean.is_finite() && mean != 0.0 {
        (2.0 - mean.abs().log10().floor()).clamp(0.0, 6.0) as usize
    } else {
        2
    };
    let m = fmt_fixed(mean, decimals);
    let e = if err.is_nan() {
        "n/a".to_string()
    } else {
        fmt_fixed(err, decimals)
    };
    format!("{m} ± {e}")
}

/// `{:.N}` without a minus sign on a value that rounds to zero.
fn fmt_fixed(v: f64, decimals: usize) -> String {
    let s = format!("{v:.decimals$}");
    match s.strip_prefix('-') {
        Some(rest) if rest.chars().all(|c| c == '0' || c == '.') => rest.to_string(),
        _ => s,
    }
}

/// A tick label with as many digits as the axis range needs and no trailing zeros;
/// scientific notation for very large or very small magnitudes.
fn tick_label(v: f64, (lo, hi): (f64, f64)) -> String {
    let span = hi - lo;
    if v == 0.0 || !(span > 0.0 && span.is_finite() && v.is_finite()) {
        return if v == 0.0 {
            "0".to_string()
        } else {
            format!("{v}")
        };
    }
    let magnitude = lo.abs().max(hi.abs());
    if !(1e-3..1e6).contains(&magnitude) {
        let digits = ((magnitude / span).log10().ceil() + 1.0).clamp(1.0, 10.0) as usize;
        let s = format!("{v:.digits$e}");
        return match s.split_once('e') {
            Some((mantissa, exp)) => format!("{}e{exp}", trim_zeros(mantissa)),
            None => s,
        };
    }
    let decimals = (2.0 - span.log10().floor()).clamp(0.0, 10.0) as usize;
    trim_zeros(&fmt_fixed(v, decimals)).to_string()
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

fn escape_cell(cell: &str) -> String {
    cell.replace("\r\n", " ")
        .replace(['\n', '\r'], " ")
        .replace('|', "\\|")
}

fn check_png_path(path: &Path) -> Result<()> {
    let is_png = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if !is_png {
        bail!("plot {}: the file name must end in .png", path.display());
    }
    Ok(())
}

/// Registers the embedded font under [`FONT`] once per process.
fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok()
    });
    if !ok {
        bail!("the embedded plot font (assets/DejaVuSans.ttf) could not be loaded");
    }
    Ok(())
}

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// The range shown for the finite `values`, widened by `margin` of the span on each side;
/// a single value gets a range around it; no values give `[0, 1]`.
fn axis_range(values: impl Iterator<Item = f64>, margin: f64) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if lo > hi {
        return (0.0, 1.0);
    }
    let pad = if hi > lo {
        (hi - lo) * margin
    } else {
        (lo.abs() * 0.1).max(0.5)
    };
    let (a, b) = (lo - pad, hi + pad);
    if a.is_finite() && b.is_finite() && (b - a).is_finite() {
        return (a, b);
    }
    // Near the ends of f64: no margin, and keep the span finite.
    let (lo, hi) = (
        lo.clamp(f64::MIN / 4.0, f64::MAX / 4.0),
        hi.clamp(f64::MIN / 4.0, f64::MAX / 4.0),
    );
    if hi > lo {
        (lo, hi)
    } else {
        (lo - lo.abs() * 0.5 - 0.5, hi + hi.abs() * 0.5 + 0.5)
    }
}

/// Room left of the plot for the y tick labels (estimated from labels spread over the
/// range, formatted as the axis formats them) and the axis description.
fn y_label_area(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    (lo, hi): (f64, f64),
) -> std::result::Result<u32, Box<dyn Error>> {
    let style = (FONT, 14).into_text_style(area);
    let mut widest = 0;
    for k in 0..=8 {
        let v = lo + (hi - lo) * k as f64 / 8.0;
        let label = tick_label(v, (lo, hi));
        widest = widest.max(area.estimate_text_size(&label, &style)?.0);
    }
    Ok((widest + 36).clamp(56, 160))
}

/// How a legend entry is marked.
enum Mark {
    Line(RGBColor),
    Dashed(RGBColor),
    Box(RGBColor),
}

/// A legend entry: control characters become spaces; long names are cut with "…".
fn shorten(name: &str) -> String {
    let clean = name.chars().map(|c| if c.is_control() { ' ' } else { c });
    if name.chars().count() <= MAX_LEGEND_CHARS {
        clean.collect()
    } else {
        let mut s: String = clean.take(MAX_LEGEND_CHARS - 1).collect();
        s.push('…');
        s
    }
}

fn draw_legend(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    entries: &[(String, Mark)],
) -> DrawResult {
    let font = (FONT, 14).into_font();
    let style = font.color(&BLACK).pos(Pos::new(HPos::Left, VPos::Center));
    let (_, h) = area.dim_in_pixel();
    let row = 24;
    let mut y = 30;
    for (i, (name, mark)) in entries.iter().enumerate() {
        if y + row / 2 > h as i32 - 4 {
            let more = entries.len() - i;
            area.draw(&Text::new(format!("… {more} more"), (8, y), style.clone()))?;
            break;
        }
        match *mark {
            Mark::Line(c) => {
                area.draw(&PathElement::new(vec![(6, y), (34, y)], c.stroke_width(3)))?;
            }
            Mark::Dashed(c) => {
                for x in [6, 18, 30] {
                    area.draw(&PathElement::new(
                        vec![(x, y), (x + 6, y)],
                        c.stroke_width(2),
                    ))?;
                }
            }
            Mark::Box(c) => {
                area.draw(&Rectangle::new([(10, y - 7), (30, y + 7)], c.filled()))?;
            }
        }
        area.draw(&Text::new(shorten(name), (42, y), style.clone()))?;
        y += row;
    }
    Ok(())
}

/// The plot area of `root` after the title, and the legend panel (if any entries).
fn layout<'a>(
    root: &DrawingArea<BitMapBackend<'a>, Shift>,
    title: &str,
    entries: &[(String, Mark)],
) -> std::result::Result<DrawingArea<BitMapBackend<'a>, Shift>, Box<dyn Error>> {
    root.fill(&WHITE)?;
    let body = if title.trim().is_empty() {
        root.clone()
    } else {
        root.titled(title, (FONT, 22).into_font().color(&BLACK))?
    };
    if entries.is_empty() {
        return Ok(body);
    }
    let font = (FONT, 14).into_text_style(&body);
    let mut text_w = 0;
    for (name, _) in entries {
        text_w = text_w.max(body.estimate_text_size(&shorten(name), &font)?.0);
    }
    let legend_w = (text_w + 54).clamp(110, 330);
    let (w, _) = body.dim_in_pixel();
    let (plot, legend) = body.split_horizontally(w.saturating_sub(legend_w));
    draw_legend(&legend, entries)?;
    Ok(plot)
}

fn draw_line_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    reference_y: Option<f64>,
) -> DrawResult {
    let reference_y = reference_y.filter(|y| y.is_finite());
    let finite = |&&(x, y): &&(f64, f64)| x.is_finite() && y.is_finite();
    let all = || series.iter().flat_map(|s| s.points.iter()).filter(finite);
    let x_range = axis_range(all().map(|p| p.0), 0.03);
    let y_range = axis_range(all().map(|p| p.1).chain(reference_y), 0.08);

    let mut entries: Vec<(String, Mark)> = series
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.clone(), Mark::Line(color(i))))
        .collect();
    if let Some(y) = reference_y {
        entries.push((format!("y = {y}"), Mark::Dashed(REFERENCE_COLOR)));
    }

    let root = BitMapBackend::new(path, PLOT_SIZE).into_drawing_area();
    let plot = layout(&root, title, &entries)?;
    let mut chart = axes(&plot, (x_label, y_label), x_range, y_range, None)?;

    if let Some(y) = reference_y {
        chart.draw_series(DashedLineSeries::new(
            vec![(x_range.0, y), (x_range.1, y)],
            8,
            6,
            REFERENCE_COLOR.stroke_width(2),
        ))?;
    }
    for (i, s) in series.iter().enumerate() {
        let c = color(i);
        for segment in s
            .points
            .split(|&(x, y)| !(x.is_finite() && y.is_finite()))
            .filter(|seg| !seg.is_empty())
        {
            if let [p] = segment {
                chart.draw_series(std::iter::once(Circle::new(*p, 3, c.filled())))?;
            } else {
                chart.draw_series(LineSeries::new(segment.iter().copied(), c.stroke_width(2)))?;
            }
        }
    }
    root.present()?;
    Ok(())
}

/// The chart both plots draw on: axes with their labels, tick labels and a light grid, inside
/// the area `layout` left under the title and legend. `y_labels`: how many y ticks (default:
/// plotters' own).
fn axes<'a, 'b>(
    plot: &'a DrawingArea<BitMapBackend<'b>, Shift>,
    (x_label, y_label): (&str, &str),
    x_range: (f64, f64),
    y_range: (f64, f64),
    y_labels: Option<usize>,
) -> std::result::Result<
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    Box<dyn Error>,
> {
    let mut chart = ChartBuilder::on(plot)
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(y_label_area(plot, y_range)?)
        .build_cartesian_2d(x_range.0..x_range.1, y_range.0..y_range.1)?;
    let x_ticks = |v: &f64| tick_label(*v, x_range);
    let y_ticks = |v: &f64| tick_label(*v, y_range);
    let mut mesh = chart.configure_mesh();
    mesh.x_desc(x_label)
        .y_desc(y_label)
        .axis_desc_style((FONT, 16))
        .label_style((FONT, 14))
        .x_label_formatter(&x_ticks)
        .y_label_formatter(&y_ticks)
        .light_line_style(TRANSPARENT)
        .bold_line_style(RGBColor(225, 225, 225));
    if let Some(n) = y_labels {
        mesh.y_labels(n);
    }
    mesh.draw()?;
    Ok(chart)
}

fn draw_histogram(
    path: &Path,
    title: &str,
    x_label: &str,
    groups: &[(String, Vec<usize>)],
    lo: f64,
    hi: f64,
) -> DrawResult {
    let max_count = groups
        .iter()
        .flat_map(|(_, c)| c.iter().copied())
        .max()
        .unwrap_or(0);
    let y_hi = if max_count == 0 {
        1.0
    } else {
        max_count as f64 * 1.08
    };
    let (x_range, y_range) = ((lo, hi), (0.0, y_hi));
    let entries: Vec<(String, Mark)> = groups
        .iter()
        .enumerate()
        .map(|(i, (name, _))| (name.clone(), Mark::Box(color(i))))
        .collect();

    let root = BitMapBackend::new(path, PLOT_SIZE).into_drawing_area();
    let plot = layout(&root, title, &entries)?;
    // Integer steps for small counts.
    let y_labels = y_hi.floor().clamp(1.0, 9.0) as usize + 1;
    let mut chart = axes(&plot, (x_label, "count"), x_range, y_range, Some(y_labels))?;

    let k = groups.len() as f64;
    for (g, (_, counts)) in groups.iter().enumerate() {
        if counts.is_empty() {
            continue;
        }
        let bin = (hi - lo) / counts.len() as f64;
        let slot = bin / k;
        let c = color(g);
        chart.draw_series(
            counts
                .iter()
                .enumerate()
                .filter(|(_, &n)| n > 0)
                .map(|(i, &n)| {
                    let x0 = lo + i as f64 * bin + g as f64 * slot + 0.06 * slot;
                    let x1 = x0 + 0.88 * slot;
                    Rectangle::new([(x0, 0.0), (x1, n as f64)], c.filled())
                }),
        )?;
    }
    root.present()?;
    Ok(())
}
