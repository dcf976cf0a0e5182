//! The paper's figures, drawn with plotters as PNG and SVG into `OUT/figures/`: metric vs
//! downsampling factor and metric vs tiles per slide (Figure 2a/2b; one line per model), per-model
//! comparison bars, ROC curves and the confusion matrix (survival: Kaplan-Meier curves of the
//! predicted high- and low-risk halves with the log-rank p-value, instead of the last two).
//! Error bars are the bootstrap CIs of the
//! rows' pooled test predictions when the table has them, else the std over repeats.
//! Only the figures the sweep has data for are drawn; the others are listed with the reason.

use crate::error::ReportError;
use crate::record::SweepRecord;
use crate::results::{
    compact, display_value, lower_is_better, percent, results_table, short_key, task_ci_columns,
    ResultRow, ResultsTable,
};
use crate::roc::{area, read_scores, roc_curve};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// What `draw_all` produced.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Figures {
    /// Every file written (PNG and SVG of each figure).
    pub written: Vec<PathBuf>,
    /// Figures not drawn, with the reason.
    pub skipped: Vec<String>,
}

/// Matplotlib's tab10: distinct, print-safe line colours.
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

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

const FONT: &str = "sans-serif";
/// Width of the legend panel right of the plot.
const LEGEND_WIDTH: u32 = 320;
/// At most this many models/rows in one figure (more would be unreadable).
const MAX_SERIES: usize = 10;

fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// Draws a figure as `stem.png` and `stem.svg` in `dir`.
macro_rules! render {
    ($figs:expr, $dir:expr, $stem:expr, $size:expr, |$root:ident| $body:expr) => {{
        let png = $dir.join(format!("{}.png", $stem));
        let svg = $dir.join(format!("{}.svg", $stem));
        {
            let $root = BitMapBackend::new(&png, $size).into_drawing_area();
            $body.map_err(|message| ReportError::Draw {
                path: png.clone(),
                message,
            })?;
        }
        {
            let $root = SVGBackend::new(&svg, $size).into_drawing_area();
            $body.map_err(|message| ReportError::Draw {
                path: svg.clone(),
                message,
            })?;
        }
        $figs.written.push(png);
        $figs.written.push(svg);
    }};
}

/// A legend in its own panel: a coloured line and the label for each entry.
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    entries: &[(String, RGBColor)],
) -> Result<(), String> {
    let style = (FONT, 16).into_font().color(&BLACK);
    let mut y = 70;
    area.draw(&Text::new(
        title.to_string(),
        (10, y - 28),
        (FONT, 17).into_font().style(FontStyle::Bold),
    ))
    .map_err(err)?;
    for (label, c) in entries {
        area.draw(&PathElement::new(
            vec![(10, y + 8), (40, y + 8)],
            c.stroke_width(3),
        ))
        .map_err(err)?;
        area.draw(&Circle::new((25, y + 8), 4, c.filled()))
            .map_err(err)?;
        let mut text = label.clone();
        if text.chars().count() > 36 {
            text = text.chars().take(35).collect::<String>() + "…";
        }
        area.draw(&Text::new(text, (48, y), style.clone()))
            .map_err(err)?;
        y += 26;
    }
    Ok(())
}

/// Which axis [`axis_ticks`] labels.
#[derive(Clone, Copy)]
enum Axis {
    X,
    Y,
}

/// Labels on an axis at exactly the given values (plotters would pick its own "nice" values):
/// a tick and a label for each, below the plot for x (centred), left of it for y. `across` is
/// where the ticks sit on the other axis.
fn axis_ticks<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    chart: &ChartContext<DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    axis: Axis,
    across: f64,
    ticks: &[(f64, String)],
) -> Result<(), String> {
    let base = area.get_base_pixel();
    let (anchor, tick, gap) = match axis {
        Axis::X => (Pos::new(HPos::Center, VPos::Top), [(0, 0), (0, 6)], (0, 10)),
        Axis::Y => (
            Pos::new(HPos::Right, VPos::Center),
            [(-6, 0), (0, 0)],
            (-10, 0),
        ),
    };
    let style = (FONT, 15).into_font().color(&BLACK).pos(anchor);
    for (value, label) in ticks {
        let point = match axis {
            Axis::X => (*value, across),
            Axis::Y => (across, *value),
        };
        let (px, py) = chart.backend_coord(&point);
        let (px, py) = (px - base.0, py - base.1);
        area.draw(&PathElement::new(
            tick.iter()
                .map(|(dx, dy)| (px + dx, py + dy))
                .collect::<Vec<_>>(),
            BLACK,
        ))
        .map_err(err)?;
        area.draw(&Text::new(
            label.clone(),
            (px + gap.0, py + gap.1),
            style.clone(),
        ))
        .map_err(err)?;
    }
    Ok(())
}

/// The text with its first letter upper-case (metric names are lower-case in tables).
fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

/// Formats an axis value: integers without decimals.
fn tick(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round() as i64)
    } else {
        format!("{v:.3}")
    }
}

/// What the error bars of a figure show: one kind per figure, named on its axis.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Bars {
    /// The rows' bootstrap CIs at this level (rows without one get no bar).
    Ci(f64),
    /// Mean ± std over the repeats.
    Std,
    None,
}

impl Bars {
    /// CIs when any of `rows` has one for one of `metrics`, else std when any row has repeats.
    fn of(table: &ResultsTable, rows: &[&ResultRow], metrics: &[&str]) -> Bars {
        let ci = rows
            .iter()
            .any(|r| metrics.iter().any(|m| r.ci.contains_key(*m)));
        match table.bootstrap {
            Some(b) if ci => Bars::Ci(b.level),
            _ if rows.iter().any(|r| r.runs > 1) => Bars::Std,
            _ => Bars::None,
        }
    }

    /// The error bar `(low, high)` of a row's metric, clipped to [0, 1].
    fn of_row(self, row: &ResultRow, metric: &str) -> Option<(f64, f64)> {
        let bar = match self {
            Bars::Ci(_) => row.ci.get(metric).copied(),
            Bars::Std => row
                .metrics
                .get(metric)
                .filter(|m| m.std > 0.0)
                .map(|m| (m.mean - m.std, m.mean + m.std)),
            Bars::None => None,
        };
        bar.map(|(lo, hi)| (lo.max(0.0), hi.min(1.0)))
    }

    /// What the axis says about the values and the bars.
    fn describe(self) -> String {
        match self {
            Bars::Ci(level) => format!(" (mean; bars: {}% bootstrap CI)", percent(level)),
            Bars::Std => " (mean ± std)".into(),
            Bars::None => String::new(),
        }
    }
}

/// Lines of a figure: (label, [(x, mean, error bar)] sorted by x).
type Series = Vec<(String, Vec<(f64, f64, Option<(f64, f64)>)>)>;

/// One line figure: a metric against a numeric swept parameter.
struct LineFigure {
    title: String,
    x_label: String,
    y_label: String,
    /// Plot x as log2 (wide ranges such as d = 1..512).
    log_x: bool,
    /// The swept x values (ticks).
    xs: Vec<f64>,
    legend_title: String,
    series: Series,
}

fn draw_lines<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    fig: &LineFigure,
) -> Result<(), String> {
    root.fill(&WHITE).map_err(err)?;
    let (w, _) = root.dim_in_pixel();
    let (plot, legend) = root.split_horizontally(w - LEGEND_WIDTH);
    let t = |x: f64| if fig.log_x { x.log2() } else { x };
    let ticks: Vec<f64> = fig.xs.iter().map(|&x| t(x)).collect();
    let (lo, hi) = ticks
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    let pad = ((hi - lo) * 0.06).max(0.5);
    // The plotted metrics lie in [0, 1]: so do the axis and the error bars.
    let (y0, y1) = (0.0f64, 1.0f64);
    let mut chart = ChartBuilder::on(&plot)
        .caption(&fig.title, (FONT, 24))
        .margin(18)
        .x_label_area_size(55)
        .y_label_area_size(70)
        .build_cartesian_2d((lo - pad)..(hi + pad), (y0 - 0.03)..(y1 + 0.03))
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_labels(0)
        .x_desc(fig.x_label.as_str())
        .y_desc(fig.y_label.as_str())
        .y_label_formatter(&|v| format!("{v:.1}"))
        .axis_desc_style((FONT, 19))
        .label_style((FONT, 15))
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(BLACK.mix(0.12))
        .draw()
        .map_err(err)?;
    let labelled: Vec<(f64, String)> = fig.xs.iter().map(|&x| (t(x), tick(x))).collect();
    axis_ticks(&plot, &chart, Axis::X, y0 - 0.03, &labelled)?;
    // Series side by side around each x (dodged), so their error bars do not hide each other.
    let step = (hi - lo + 2.0 * pad) * 0.008;
    let centre = (fig.series.len().max(1) - 1) as f64 / 2.0;
    for (i, (_, pts)) in fig.series.iter().enumerate() {
        let c = color(i);
        let at = |x: f64| t(x) + (i as f64 - centre) * step;
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|&(x, m, _)| (at(x), m)),
                c.stroke_width(2),
            ))
            .map_err(err)?;
        chart
            .draw_series(pts.iter().filter_map(|&(x, m, bar)| {
                let (lo, hi) = bar?;
                Some(ErrorBar::new_vertical(
                    at(x),
                    lo,
                    m,
                    hi,
                    c.stroke_width(2),
                    10,
                ))
            }))
            .map_err(err)?;
        chart
            .draw_series(
                pts.iter()
                    .map(|&(x, m, _)| Circle::new((at(x), m), 4, c.filled())),
            )
            .map_err(err)?;
    }
    let entries: Vec<(String, RGBColor)> = fig
        .series
        .iter()
        .enumerate()
        .map(|(i, (l, _))| (l.clone(), color(i)))
        .collect();
    draw_legend(&legend, &fig.legend_title, &entries)?;
    root.present().map_err(err)
}

/// Label of a row by the keys other than `except`.
fn label_without(row: &ResultRow, keys: &[String], except: &str) -> String {
    let others: Vec<&(String, Value)> = row.params.iter().filter(|(k, _)| k != except).collect();
    let others_keys = keys.iter().filter(|k| *k != except).count();
    if others.is_empty() {
        return "all runs".into();
    }
    others
        .iter()
        .map(|(k, v)| {
            if others_keys == 1 {
                display_value(v)
            } else {
                compact(k, v)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The line figures of one numeric key (one per plotted metric), or why there are none.
fn line_figures(table: &ResultsTable, key: &str, x_label: &str) -> Vec<(String, LineFigure)> {
    let mut xs: Vec<f64> = table
        .rows
        .iter()
        .filter_map(|r| r.param(key).and_then(Value::as_f64))
        .collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    let mut out = Vec::new();
    let headline = task_ci_columns(table.task.as_deref());
    for (metric, header) in table.columns().iter().filter(|(m, _)| headline.contains(m)) {
        let mut series: Series = Vec::new();
        let rows: Vec<&ResultRow> = table.rows.iter().collect();
        let bars = Bars::of(table, &rows, &[metric]);
        for r in &table.rows {
            let (Some(x), Some(ms)) =
                (r.param(key).and_then(Value::as_f64), r.metrics.get(*metric))
            else {
                continue;
            };
            let label = label_without(r, &table.keys, key);
            let point = (x, ms.mean, bars.of_row(r, metric));
            match series.iter_mut().find(|(l, _)| *l == label) {
                Some((_, pts)) => pts.push(point),
                None => series.push((label, vec![point])),
            }
        }
        if series.is_empty() {
            continue;
        }
        for (_, pts) in &mut series {
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        series.truncate(MAX_SERIES);
        let min = xs.first().copied().unwrap_or(1.0);
        let max = xs.last().copied().unwrap_or(1.0);
        out.push((
            format!("{metric}_vs_{}", short_key(key)),
            LineFigure {
                title: capitalized(&format!(
                    "{header} vs {}",
                    x_label.split(" (").next().unwrap_or(x_label)
                )),
                x_label: x_label.to_string(),
                y_label: format!("test {header}{}", bars.describe()),
                log_x: min > 0.0 && max / min >= 16.0,
                xs: xs.clone(),
                legend_title: {
                    let others: Vec<&str> = table
                        .keys
                        .iter()
                        .filter(|k| *k != key)
                        .map(|k| match short_key(k) {
                            "pooling" => "model",
                            "tiles_per_slide" => "K (tiles per slide)",
                            "downsample" | "downsample_px" => "d (downsampling)",
                            other => other,
                        })
                        .collect();
                    if others.is_empty() {
                        "runs".into()
                    } else {
                        others.join(", ")
                    }
                },
                series,
            },
        ));
    }
    out
}

/// Grouped bars: one group per metric, one bar per row (model).
fn draw_bars<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    table: &ResultsTable,
    rows: &[&ResultRow],
    title: &str,
) -> Result<(), String> {
    root.fill(&WHITE).map_err(err)?;
    let (w, _) = root.dim_in_pixel();
    let (plot, legend) = root.split_horizontally(w - LEGEND_WIDTH);
    // Metrics on a 0-1 scale, higher better.
    let metrics: Vec<(&str, &str)> = table
        .columns()
        .iter()
        .copied()
        .filter(|(m, _)| !lower_is_better(m))
        .collect();
    let names_only: Vec<&str> = metrics.iter().map(|(m, _)| *m).collect();
    let bars = Bars::of(table, rows, &names_only);
    let y_desc = format!("test metric{}", bars.describe());
    let groups = metrics.len();
    let mut chart = ChartBuilder::on(&plot)
        .caption(title, (FONT, 24))
        .margin(18)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..groups as f64, 0.0..1.05)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(y_desc)
        .y_label_formatter(&|v| format!("{v:.1}"))
        .axis_desc_style((FONT, 19))
        .label_style((FONT, 16))
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(BLACK.mix(0.12))
        .draw()
        .map_err(err)?;
    let names: Vec<(f64, String)> = metrics
        .iter()
        .enumerate()
        .map(|(g, m)| (g as f64 + 0.5, m.1.to_string()))
        .collect();
    axis_ticks(&plot, &chart, Axis::X, 0.0, &names)?;
    let n = rows.len().max(1) as f64;
    let width = 0.8 / n;
    for (i, r) in rows.iter().enumerate() {
        let c = color(i);
        for (g, (metric, _)) in metrics.iter().enumerate() {
            let Some(ms) = r.metrics.get(*metric) else {
                continue;
            };
            let left = g as f64 + 0.1 + i as f64 * width;
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(left, 0.0), (left + width * 0.92, ms.mean)],
                    c.filled(),
                )))
                .map_err(err)?;
            if let Some((lo, hi)) = bars.of_row(r, metric) {
                let x = left + width * 0.46;
                chart
                    .draw_series(std::iter::once(ErrorBar::new_vertical(
                        x,
                        lo,
                        ms.mean,
                        hi,
                        BLACK.stroke_width(1),
                        6,
                    )))
                    .map_err(err)?;
            }
        }
    }
    let entries: Vec<(String, RGBColor)> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| (r.label(&table.keys), color(i)))
        .collect();
    draw_legend(&legend, "model", &entries)?;
    root.present().map_err(err)
}

/// ROC curves, one per row.
fn draw_roc<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    curves: &[(String, Vec<(f64, f64)>)],
    title: &str,
) -> Result<(), String> {
    root.fill(&WHITE).map_err(err)?;
    let (w, _) = root.dim_in_pixel();
    let (plot, legend) = root.split_horizontally(w - LEGEND_WIDTH);
    let mut chart = ChartBuilder::on(&plot)
        .caption(title, (FONT, 24))
        .margin(18)
        .x_label_area_size(55)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..1.0, 0.0..1.0)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("false positive rate")
        .y_desc("true positive rate")
        .x_label_formatter(&|v| format!("{v:.1}"))
        .y_label_formatter(&|v| format!("{v:.1}"))
        .axis_desc_style((FONT, 19))
        .label_style((FONT, 15))
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(BLACK.mix(0.12))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(DashedLineSeries::new(
            vec![(0.0, 0.0), (1.0, 1.0)],
            6,
            4,
            BLACK.mix(0.4).stroke_width(1),
        ))
        .map_err(err)?;
    for (i, (_, pts)) in curves.iter().enumerate() {
        chart
            .draw_series(LineSeries::new(
                pts.iter().copied(),
                color(i).stroke_width(2),
            ))
            .map_err(err)?;
    }
    let entries: Vec<(String, RGBColor)> = curves
        .iter()
        .enumerate()
        .map(|(i, (l, _))| (l.clone(), color(i)))
        .collect();
    draw_legend(&legend, "model (AUC)", &entries)?;
    root.present().map_err(err)
}

/// Kaplan-Meier curves of the high- and low-risk halves (median split of the predicted risk)
/// of one run's evaluated split, with the log-rank p-value.
fn draw_km<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    curves: &[(String, Vec<(f64, f64)>)],
    title: &str,
    x_max: f64,
) -> Result<(), String> {
    root.fill(&WHITE).map_err(err)?;
    let (w, _) = root.dim_in_pixel();
    let (plot, legend) = root.split_horizontally(w - LEGEND_WIDTH);
    let mut chart = ChartBuilder::on(&plot)
        .caption(title, (FONT, 22))
        .margin(18)
        .x_label_area_size(55)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, 0.0..1.05)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("time")
        .y_desc("event-free probability (Kaplan-Meier)")
        .y_label_formatter(&|v| format!("{v:.1}"))
        .axis_desc_style((FONT, 19))
        .label_style((FONT, 15))
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(BLACK.mix(0.12))
        .draw()
        .map_err(err)?;
    for (i, (_, pts)) in curves.iter().enumerate() {
        chart
            .draw_series(LineSeries::new(
                pts.iter().copied(),
                color(i).stroke_width(2),
            ))
            .map_err(err)?;
    }
    let entries: Vec<(String, RGBColor)> = curves
        .iter()
        .enumerate()
        .map(|(i, (l, _))| (l.clone(), color(i)))
        .collect();
    draw_legend(&legend, "predicted risk group", &entries)?;
    root.present().map_err(err)
}

/// A Kaplan-Meier estimate as the corners of its step function, from time 0 to `end`.
fn km_steps(outcomes: &[tessera_stats::Outcome], end: f64) -> Vec<(f64, f64)> {
    let km = tessera_stats::kaplan_meier(outcomes, None, false);
    let mut pts = vec![(0.0, 1.0)];
    let mut s = 1.0;
    for (t, v) in km.times.iter().zip(&km.survival) {
        pts.push((*t, s));
        pts.push((*t, *v));
        s = *v;
    }
    pts.push((end, s));
    pts
}

/// The Kaplan-Meier figure of the best row (by the C-index): its first run's evaluated split,
/// split at the median predicted risk, with the log-rank p-value.
fn draw_survival(
    out_dir: &Path,
    record: &SweepRecord,
    table: &ResultsTable,
    rows: &[&ResultRow],
    dir: &Path,
    figs: &mut Figures,
) -> Result<(), ReportError> {
    let best = rows
        .iter()
        .filter(|r| r.metrics.contains_key("c_index"))
        .max_by(|a, b| {
            a.metrics["c_index"]
                .mean
                .total_cmp(&b.metrics["c_index"].mean)
        });
    let Some(best) = best else {
        figs.skipped
            .push("Kaplan-Meier curves: no run with a C-index".into());
        return Ok(());
    };
    for point in &best.points {
        let path = out_dir.join(point).join(crate::runs::PREDICTIONS_FILE);
        if !path.exists() || metrics_of(record, point).is_none() {
            continue;
        }
        let rows = crate::runs::evaluated_rows(crate::runs::read_predictions(&path)?);
        let data: Vec<(f64, bool, f64)> = rows.iter().filter_map(|r| r.survival).collect();
        if data.len() < 2 {
            continue;
        }
        let outcomes: Vec<tessera_stats::Outcome> = data
            .iter()
            .map(|&(time, event, _)| tessera_stats::Outcome { time, event })
            .collect();
        let risk: Vec<f64> = data.iter().map(|d| d.2).collect();
        let mut sorted = risk.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        let high: Vec<bool> = risk.iter().map(|&r| r > median).collect();
        let end = outcomes
            .iter()
            .map(|o| o.time)
            .fold(0.0, f64::max)
            .max(1e-9);
        let group = |flag: bool| -> Vec<tessera_stats::Outcome> {
            outcomes
                .iter()
                .zip(&high)
                .filter(|(_, h)| **h == flag)
                .map(|(o, _)| *o)
                .collect()
        };
        let (hi, lo) = (group(true), group(false));
        let logrank =
            tessera_stats::logrank_test(&outcomes, &high).map_err(|source| ReportError::Stats {
                what: format!("the log-rank test of {point}"),
                source,
            })?;
        let curves = vec![
            (format!("high risk (n={})", hi.len()), km_steps(&hi, end)),
            (format!("low risk (n={})", lo.len()), km_steps(&lo, end)),
        ];
        let label = if table.keys.is_empty() {
            String::new()
        } else {
            format!(" — {}", best.label(&table.keys))
        };
        let title = format!(
            "Kaplan-Meier by predicted risk (median split){label}, log-rank p = {}",
            logrank.map_or("n/a".into(), |l| format!("{:.2e}", l.p_value))
        );
        render!(figs, dir, "kaplan_meier", (1150, 640), |root| draw_km(
            root, &curves, &title, end
        ));
        return Ok(());
    }
    figs.skipped
        .push("Kaplan-Meier curves: no predictions.parquet with survival columns".into());
    Ok(())
}

/// A confusion matrix: rows = true class, columns = predicted, shaded by row fraction.
fn draw_confusion<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    matrix: &[Vec<u64>],
    classes: &[String],
    title: &str,
) -> Result<(), String> {
    root.fill(&WHITE).map_err(err)?;
    let n = classes.len();
    let nf = n as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 19))
        .margin(18)
        .x_label_area_size(60)
        .y_label_area_size(110)
        .build_cartesian_2d(0.0..nf, 0.0..nf)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(0)
        .y_labels(0)
        .x_desc("predicted class")
        .y_desc("true class")
        .axis_desc_style((FONT, 19))
        .label_style((FONT, 15))
        .draw()
        .map_err(err)?;
    let xs: Vec<(f64, String)> = classes
        .iter()
        .enumerate()
        .map(|(i, c)| (i as f64 + 0.5, c.clone()))
        .collect();
    let ys: Vec<(f64, String)> = classes
        .iter()
        .enumerate()
        .map(|(i, c)| ((n - 1 - i) as f64 + 0.5, c.clone()))
        .collect();
    axis_ticks(&root, &chart, Axis::X, 0.0, &xs)?;
    axis_ticks(&root, &chart, Axis::Y, 0.0, &ys)?;
    let text_size = if n <= 6 {
        22
    } else if n <= 16 {
        13
    } else {
        9
    };
    for (i, row) in matrix.iter().enumerate().take(n) {
        let total: u64 = row.iter().sum();
        for (j, &count) in row.iter().enumerate().take(n) {
            let frac = if total > 0 {
                count as f64 / total as f64
            } else {
                0.0
            };
            // white -> tab blue
            let mix = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * frac).round() as u8;
            let fill = RGBColor(mix(255, 31), mix(255, 119), mix(255, 180));
            let y = (n - 1 - i) as f64;
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(j as f64, y), (j as f64 + 1.0, y + 1.0)],
                    fill.filled(),
                )))
                .map_err(err)?;
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(j as f64, y), (j as f64 + 1.0, y + 1.0)],
                    BLACK.mix(0.25).stroke_width(1),
                )))
                .map_err(err)?;
            let ink = if frac > 0.55 { WHITE } else { BLACK };
            let style = (FONT, text_size)
                .into_font()
                .color(&ink)
                .pos(Pos::new(HPos::Center, VPos::Center));
            chart
                .draw_series(std::iter::once(Text::new(
                    format!("{count}"),
                    (j as f64 + 0.5, y + 0.5),
                    style,
                )))
                .map_err(err)?;
        }
    }
    root.present().map_err(err)
}

/// The metrics of a point, as loaded.
fn metrics_of<'a>(record: &'a SweepRecord, point: &str) -> Option<&'a Value> {
    record
        .points
        .iter()
        .find(|p| p.name == point)
        .and_then(|p| p.metrics.as_ref())
}

/// Draws every figure the sweep has data for into `out_dir/figures/`.
pub fn draw_all(out_dir: &Path, record: &SweepRecord) -> Result<Figures, ReportError> {
    crate::font::ensure_font()?;
    let dir = out_dir.join("figures");
    std::fs::create_dir_all(&dir).map_err(|e| ReportError::io(&dir, e))?;
    let table = results_table(out_dir, record)?;
    let mut figs = Figures::default();
    let with_metrics = table.rows.iter().filter(|r| r.runs > 0).count();
    if with_metrics == 0 {
        figs.skipped
            .push("every figure: no point wrote metrics.json".into());
        return Ok(figs);
    }

    // Figure 2a/2b: metric vs d, metric vs K.
    for (params, x_label, name) in [
        (
            &["downsample", "downsample_px"][..],
            "downsampling factor d",
            "metric vs downsampling factor",
        ),
        (
            &["tiles_per_slide"][..],
            "tiles per slide K",
            "metric vs tiles per slide",
        ),
    ] {
        let key = table.keys.iter().find(|k| {
            params.contains(&short_key(k))
                && table
                    .rows
                    .iter()
                    .filter_map(|r| r.param(k).and_then(Value::as_f64))
                    .fold(Vec::<f64>::new(), |mut v, x| {
                        if !v.contains(&x) {
                            v.push(x);
                        }
                        v
                    })
                    .len()
                    >= 2
        });
        let Some(key) = key else {
            figs.skipped.push(format!(
                "{name}: the sweep does not vary {} over two or more numbers",
                params
                    .iter()
                    .map(|p| format!("`{p}`"))
                    .collect::<Vec<_>>()
                    .join(" or ")
            ));
            continue;
        };
        let label = if short_key(key) == "downsample_px" {
            "downsampling factor d (level-0 px)".to_string()
        } else if short_key(key) == "downsample" {
            "downsampling factor d (tile-grid units)".to_string()
        } else {
            x_label.to_string()
        };
        for (stem, fig) in line_figures(&table, key, &label) {
            render!(figs, dir, stem, (1100, 640), |root| draw_lines(root, &fig));
        }
    }

    // Per-model comparison bars.
    let pooling = table
        .keys
        .iter()
        .find(|k| short_key(k) == "pooling")
        .filter(|k| {
            let mut seen: Vec<&Value> = Vec::new();
            for r in &table.rows {
                if let Some(v) = r.param(k) {
                    if !seen.contains(&v) {
                        seen.push(v);
                    }
                }
            }
            seen.len() >= 2
        });
    let rows: Vec<&ResultRow> = table
        .rows
        .iter()
        .filter(|r| r.runs > 0)
        .take(MAX_SERIES)
        .collect();
    // With other swept parameters, each model at its best setting (balanced accuracy; the
    // C-index for survival, MAE for regression).
    let headline = task_ci_columns(table.task.as_deref())[0];
    let mut best: Vec<&ResultRow> = Vec::new();
    if let Some(pooling) = pooling {
        let score = |r: &ResultRow| {
            r.metrics.get(headline).map_or(f64::MIN, |m| {
                if lower_is_better(headline) {
                    -m.mean
                } else {
                    m.mean
                }
            })
        };
        for r in table.rows.iter().filter(|r| r.runs > 0) {
            match best
                .iter_mut()
                .find(|b| b.param(pooling) == r.param(pooling))
            {
                Some(b) if score(r) > score(b) => *b = r,
                Some(_) => {}
                None => best.push(r),
            }
        }
        best.truncate(MAX_SERIES);
        let title = if table.keys.len() > 1 {
            "Per-model comparison (each model at its best setting)"
        } else {
            "Per-model comparison (test split)"
        };
        render!(figs, dir, "models", (1150, 620), |root| draw_bars(
            root, &table, &best, title
        ));
    } else {
        figs.skipped
            .push("per-model comparison bars: the sweep does not vary `train.pooling`".into());
    }
    let rows = if best.is_empty() { rows } else { best };
    if let Some(task) = table.task.as_deref() {
        if task == "survival" {
            draw_survival(out_dir, record, &table, &rows, &dir, &mut figs)?;
        }
        figs.skipped.push(format!(
            "ROC curves and confusion matrix: a {task} run has no classes"
        ));
        return Ok(figs);
    }

    // ROC curves, from each row's first point with predictions.
    let mut curves: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    let mut multi_class = false;
    for r in &rows {
        for point in &r.points {
            let path = out_dir.join(point).join("predictions.parquet");
            let split = metrics_of(record, point)
                .and_then(|m| m.get("split"))
                .and_then(Value::as_str)
                .unwrap_or("test");
            if !path.exists() {
                continue;
            }
            multi_class |= metrics_of(record, point)
                .and_then(|m| m.get("classes"))
                .and_then(Value::as_array)
                .is_some_and(|c| c.len() > 2);
            let pairs = read_scores(&path, split)?;
            if let Some(curve) = roc_curve(&pairs) {
                let label = format!("{} ({:.2})", r.label(&table.keys), area(&curve));
                curves.push((label, curve));
                break;
            }
        }
    }
    if curves.is_empty() {
        figs.skipped.push(
            "ROC curves: no predictions.parquet with both classes in its evaluated split".into(),
        );
    } else {
        let title = match (multi_class, pooling.is_some() && table.keys.len() > 1) {
            (true, true) => "ROC (micro-averaged one-vs-rest; each model at its best setting)",
            (true, false) => "ROC (micro-averaged one-vs-rest, test split)",
            (false, true) => "ROC curves (each model at its best setting)",
            (false, false) => "ROC curves (test split)",
        };
        render!(figs, dir, "roc", (1050, 640), |root| draw_roc(
            root, &curves, title
        ));
    }

    // Confusion matrix of the best row (by balanced accuracy), summed over its runs.
    let best = table
        .rows
        .iter()
        .filter(|r| r.metrics.contains_key("balanced_accuracy"))
        .max_by(|a, b| {
            a.metrics["balanced_accuracy"]
                .mean
                .total_cmp(&b.metrics["balanced_accuracy"].mean)
        });
    let mut drawn = false;
    if let Some(best) = best {
        let mut classes: Vec<String> = Vec::new();
        let mut sum: Vec<Vec<u64>> = Vec::new();
        let mut runs = 0;
        for point in &best.points {
            let Some(m) = metrics_of(record, point) else {
                continue;
            };
            let cls: Vec<String> = m
                .get("classes")
                .and_then(Value::as_array)
                .map(|c| c.iter().map(display_value).collect())
                .unwrap_or_default();
            let Some(cm) = m.get("confusion_matrix").and_then(Value::as_array) else {
                continue;
            };
            if classes.is_empty() {
                classes = cls.clone();
                sum = vec![vec![0; classes.len()]; classes.len()];
            }
            if cls != classes || cm.len() != classes.len() {
                continue;
            }
            for (i, row) in cm.iter().enumerate() {
                for (j, v) in row
                    .as_array()
                    .into_iter()
                    .flatten()
                    .enumerate()
                    .take(classes.len())
                {
                    sum[i][j] += v.as_u64().unwrap_or(0);
                }
            }
            runs += 1;
        }
        if runs > 0 && !classes.is_empty() {
            let label = if table.keys.is_empty() {
                String::new()
            } else {
                format!(": {}", best.label(&table.keys))
            };
            let title = format!(
                "Confusion matrix{label}{}",
                if runs > 1 {
                    format!(" (sum of {runs} runs)")
                } else {
                    String::new()
                }
            );
            let side = (560 + 24 * classes.len() as u32).min(1400);
            render!(figs, dir, "confusion_matrix", (side + 60, side), |root| {
                draw_confusion(root, &sum, &classes, &title)
            });
            drawn = true;
        }
    }
    if !drawn {
        figs.skipped
            .push("confusion matrix: no metrics.json with a confusion_matrix".into());
    }
    Ok(figs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::PointRecord;
    use serde_json::json;

    /// Two models x two downsampling factors, two seeds each, with metrics and predictions.
    fn sweep(dir: &Path) -> SweepRecord {
        use crate::runs::tests::write_predictions;
        let mut points = Vec::new();
        for (m, model) in ["sparseconvmil", "mean"].iter().enumerate() {
            for d in [1, 8] {
                for seed in [0u64, 1] {
                    let name = format!("d={d}__m={model}__seed={seed}");
                    let p = dir.join(&name);
                    std::fs::create_dir_all(&p).unwrap();
                    let ba = 0.9 - 0.3 * m as f64 + 0.01 * seed as f64 - 0.001 * d as f64;
                    let metrics = json!({"balanced_accuracy": ba, "auc": ba, "f1": ba,
                        "precision": ba, "recall": ba, "cross_entropy": 1.0 - ba,
                        "split": "test", "classes": ["a", "b"],
                        "confusion_matrix": [[3, 1], [0, 4]]});
                    std::fs::write(p.join("metrics.json"), metrics.to_string()).unwrap();
                    let labels = [0i64, 1, 0, 1, 1, 0];
                    let rows: Vec<(String, i64, f32)> = labels
                        .iter()
                        .enumerate()
                        .map(|(i, &l)| {
                            let s = (0.2 + 0.1 * i as f32 + 0.3 * l as f32).min(1.0);
                            (format!("s{i}"), l, s)
                        })
                        .collect();
                    let rows: Vec<(&str, &str, i64, f32)> = rows
                        .iter()
                        .map(|(id, l, s)| (id.as_str(), "test", *l, *s))
                        .collect();
                    write_predictions(&p, &rows);
                    points.push(PointRecord {
                        name,
                        params: json!({"sparse_map.downsample": d, "train.pooling": model})
                            .as_object()
                            .cloned()
                            .unwrap(),
                        seed: Some(seed),
                        status: "ok".into(),
                        ..PointRecord::default()
                    });
                }
            }
        }
        let mut record = SweepRecord {
            name: "t".into(),
            keys: vec!["sparse_map.downsample".into(), "train.pooling".into()],
            seeds: vec![0, 1],
            points,
            ..SweepRecord::default()
        };
        record.load_metrics(dir).unwrap();
        record
    }

    #[test]
    fn draws_the_figures_the_sweep_has_data_for_and_names_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let record = sweep(dir.path());
        let figs = draw_all(dir.path(), &record).unwrap();
        let names: Vec<String> = figs
            .written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for stem in [
            "balanced_accuracy_vs_downsample",
            "auc_vs_downsample",
            "models",
            "roc",
            "confusion_matrix",
        ] {
            for ext in ["png", "svg"] {
                let name = format!("{stem}.{ext}");
                assert!(names.contains(&name), "{name} not in {names:?}");
                let len = std::fs::metadata(dir.path().join("figures").join(&name))
                    .unwrap()
                    .len();
                assert!(len > 1000, "{name} is {len} bytes");
            }
        }
        assert_eq!(figs.skipped.len(), 1, "{:?}", figs.skipped);
        assert!(
            figs.skipped[0].contains("tiles per slide"),
            "{:?}",
            figs.skipped
        );
        let png = image::open(dir.path().join("figures/models.png")).unwrap();
        assert_eq!((png.width(), png.height()), (1150, 620));
        let svg = std::fs::read_to_string(dir.path().join("figures/roc.svg")).unwrap();
        assert!(
            svg.contains("false positive rate") && svg.contains("sparseconvmil"),
            "labels missing"
        );
    }
}
