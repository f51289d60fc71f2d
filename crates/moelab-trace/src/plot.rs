//! Heatmaps and line plots, each written as PNG and SVG with plotters.
//!
//! Text uses the bundled DejaVu Sans through plotters' `ab_glyph` feature, so no system fonts
//! (fontconfig/freetype) are needed at build or run time.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{Result, TraceError};

/// DejaVu Sans (Bitstream Vera license, see assets/DejaVuSans-LICENSE.txt).
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Registers the bundled font once; plotters looks fonts up by family name.
fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(TraceError::Plot {
            path: PathBuf::from("assets/DejaVuSans.ttf"),
            reason: "bundled font could not be parsed".to_string(),
        })
    }
}

/// A matrix drawn as coloured cells with row and column labels.
pub(crate) struct Heatmap<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub rows: &'a [String],
    pub cols: &'a [String],
    /// Row-major `rows x cols`; `None` cells are grey.
    pub values: &'a [Option<f64>],
    pub vmin: f64,
    pub vmax: f64,
    /// Blue-white-red around the middle of [vmin, vmax] (deltas: pass a range centred on 0)
    /// instead of viridis.
    pub diverging: bool,
}

/// Several named (x, y) series on shared axes.
pub(crate) struct Lines<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub series: &'a [(String, Vec<(f64, f64)>)],
    /// The x axis counts something whole (layers, steps): ticks only at integers.
    pub integer_x: bool,
}

/// Draws `h` to `stem.png` and `stem.svg`; returns both paths.
pub(crate) fn heatmap(stem: &Path, h: &Heatmap<'_>) -> Result<Vec<PathBuf>> {
    let label_chars = h.rows.iter().map(|r| r.chars().count()).max().unwrap_or(4);
    // Cells are at least as wide as the longest column label, so labels never run together.
    let col_chars = h.cols.iter().map(|c| c.chars().count()).max().unwrap_or(1);
    let cell = (7 * col_chars + 12).max(36);
    let width = (140 + 8 * label_chars + cell * h.cols.len()).clamp(480, 4000) as u32;
    let height = (150 + 28 * h.rows.len()).clamp(260, 1800) as u32;
    draw_both(stem, (width, height), |root| draw_heatmap(root, h))
}

/// Draws `l` to `stem.png` and `stem.svg`; returns both paths.
pub(crate) fn lines(stem: &Path, l: &Lines<'_>) -> Result<Vec<PathBuf>> {
    draw_both(stem, (820, 480), |root| draw_lines(root, l))
}

/// Runs one drawing function on a bitmap and an SVG backend.
fn draw_both(
    stem: &Path,
    size: (u32, u32),
    draw: impl Fn(&dyn AnyArea) -> std::result::Result<(), String>,
) -> Result<Vec<PathBuf>> {
    ensure_font()?;
    // Appended, not `with_extension`: a stem like `run_jsd_scaffold_0.25` keeps its `.25`.
    let with = |ext: &str| {
        let mut name = stem.as_os_str().to_os_string();
        name.push(ext);
        PathBuf::from(name)
    };
    let (png, svg) = (with(".png"), with(".svg"));
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |reason: String| TraceError::Plot { path, reason }
    };
    {
        let root = BitMapBackend::new(&png, size).into_drawing_area();
        draw(&root).map_err(err(&png))?;
        root.present().map_err(|e| err(&png)(e.to_string()))?;
    }
    {
        let root = SVGBackend::new(&svg, size).into_drawing_area();
        draw(&root).map_err(err(&svg))?;
        root.present().map_err(|e| err(&svg)(e.to_string()))?;
    }
    Ok(vec![png, svg])
}

/// Object-safe view of a drawing area, so one closure serves both backends.
trait AnyArea {
    fn heatmap(&self, h: &Heatmap<'_>) -> std::result::Result<(), String>;
    fn lines(&self, l: &Lines<'_>) -> std::result::Result<(), String>;
}

impl<DB: DrawingBackend> AnyArea for DrawingArea<DB, Shift> {
    fn heatmap(&self, h: &Heatmap<'_>) -> std::result::Result<(), String> {
        heatmap_on(self, h).map_err(|e| e.to_string())
    }
    fn lines(&self, l: &Lines<'_>) -> std::result::Result<(), String> {
        lines_on(self, l).map_err(|e| e.to_string())
    }
}

fn draw_heatmap(root: &dyn AnyArea, h: &Heatmap<'_>) -> std::result::Result<(), String> {
    root.heatmap(h)
}

fn draw_lines(root: &dyn AnyArea, l: &Lines<'_>) -> std::result::Result<(), String> {
    root.lines(l)
}

/// Viridis, sampled at 5 points and interpolated linearly: perceptually ordered, colour-blind safe.
impl Heatmap<'_> {
    /// The cell colour at `t` in [0, 1] of the colour range.
    fn color(&self, t: f64) -> RGBColor {
        if self.diverging {
            diverging(t)
        } else {
            viridis(t)
        }
    }
}

/// Blue (0) - white (0.5) - red (1), linear in each half (ColorBrewer RdBu end points).
fn diverging(t: f64) -> RGBColor {
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.5
    };
    let (blue, white, red) = (
        (33.0, 102.0, 172.0),
        (247.0, 247.0, 247.0),
        (178.0, 24.0, 43.0),
    );
    let (from, to, u) = if t < 0.5 {
        (blue, white, t * 2.0)
    } else {
        (white, red, (t - 0.5) * 2.0)
    };
    let mix = |a: f64, b: f64| (a + (b - a) * u).round() as u8;
    RGBColor(mix(from.0, to.0), mix(from.1, to.1), mix(from.2, to.2))
}

fn viridis(t: f64) -> RGBColor {
    const STOPS: [(f64, f64, f64); 5] = [
        (68.0, 1.0, 84.0),
        (59.0, 82.0, 139.0),
        (33.0, 145.0, 140.0),
        (94.0, 201.0, 98.0),
        (253.0, 231.0, 37.0),
    ];
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let pos = t * (STOPS.len() - 1) as f64;
    let i = (pos.floor() as usize).min(STOPS.len() - 2);
    let f = pos - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let mix = |x: f64, y: f64| (x + (y - x) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

type DrawResult<DB> =
    std::result::Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

fn heatmap_on<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    h: &Heatmap<'_>,
) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    let (width, _) = root.dim_in_pixel();
    let (area, bar) = root.split_horizontally(width.saturating_sub(90));
    let (n_rows, n_cols) = (h.rows.len() as i32, h.cols.len() as i32);
    let label_chars = h.rows.iter().map(|r| r.chars().count()).max().unwrap_or(4) as u32;
    // Segmented ranges put labels at cell centres; a one-cell axis is padded to two cells
    // because a degenerate range has no scale.
    let mut chart = ChartBuilder::on(&area)
        .caption(h.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(50)
        .y_label_area_size(30 + 8 * label_chars)
        .build_cartesian_2d(
            (0..(n_cols.max(2) - 1)).into_segmented(),
            (0..(n_rows.max(2) - 1)).into_segmented(),
        )?;
    let row_at = |y: i32| n_rows - 1 - y;
    let col_label = |v: &SegmentValue<i32>| match v {
        SegmentValue::CenterOf(i) => h.cols.get(*i as usize).cloned().unwrap_or_default(),
        _ => String::new(),
    };
    let row_label = |v: &SegmentValue<i32>| match v {
        SegmentValue::CenterOf(y) => h.rows.get(row_at(*y) as usize).cloned().unwrap_or_default(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(h.cols.len().max(1))
        .y_labels(h.rows.len().max(1))
        .x_label_formatter(&col_label)
        .y_label_formatter(&row_label)
        .x_desc(h.x_label)
        .y_desc(h.y_label)
        .label_style(("sans-serif", 12))
        .draw()?;
    let span = if h.vmax > h.vmin {
        h.vmax - h.vmin
    } else {
        1.0
    };
    let annotate = h.rows.len() * h.cols.len() <= 160;
    for r in 0..n_rows {
        for c in 0..n_cols {
            let value = h.values.get((r * n_cols + c) as usize).copied().flatten();
            let y = n_rows - 1 - r;
            let color = match value {
                Some(v) => h.color((v - h.vmin) / span),
                None => RGBColor(210, 210, 210),
            };
            chart.draw_series(std::iter::once(Rectangle::new(
                [
                    (SegmentValue::Exact(c), SegmentValue::Exact(y)),
                    (SegmentValue::Exact(c + 1), SegmentValue::Exact(y + 1)),
                ],
                color.filled(),
            )))?;
            if let (true, Some(v)) = (annotate, value) {
                let t = (v - h.vmin) / span;
                let dark = if h.diverging {
                    !(0.2..=0.8).contains(&t)
                } else {
                    t < 0.6
                };
                let style = ("sans-serif", 11)
                    .into_font()
                    .color(if dark { &WHITE } else { &BLACK })
                    .pos(Pos::new(HPos::Center, VPos::Center));
                chart.draw_series(std::iter::once(Text::new(
                    format!("{v:.2}"),
                    (SegmentValue::CenterOf(c), SegmentValue::CenterOf(y)),
                    style,
                )))?;
            }
        }
    }
    // Colour bar: a vertical gradient from vmin (bottom) to vmax (top).
    let (_, bar_h) = bar.dim_in_pixel();
    let (top, bottom) = (50i32, bar_h as i32 - 70);
    let steps = 64;
    for s in 0..steps {
        let y0 = bottom - (bottom - top) * (s + 1) / steps;
        let y1 = bottom - (bottom - top) * s / steps;
        bar.draw(&Rectangle::new(
            [(15, y0), (35, y1)],
            h.color(f64::from(s) / f64::from(steps - 1)).filled(),
        ))?;
    }
    let text = ("sans-serif", 12).into_font().color(&BLACK);
    bar.draw_text(&format!("{:.3}", h.vmax), &text, (40, top - 6))?;
    bar.draw_text(&format!("{:.3}", h.vmin), &text, (40, bottom - 6))?;
    Ok(())
}

fn lines_on<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, l: &Lines<'_>) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    // The legend has its own panel right of the plot, so it never covers data.
    let (width, _) = root.dim_in_pixel();
    let name_chars = l
        .series
        .iter()
        .map(|(n, _)| n.chars().count())
        .max()
        .unwrap_or(0) as u32;
    let legend_w = if l.series.is_empty() {
        0
    } else {
        (40 + 7 * name_chars).clamp(90, 300)
    };
    let (area, legend) = root.split_horizontally(width.saturating_sub(legend_w));
    let points = || l.series.iter().flat_map(|(_, pts)| pts.iter());
    let (mut x0, mut x1, mut y0, mut y1) = points().fold(
        (
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ),
        |(a, b, c, d), &(x, y)| (a.min(x), b.max(x), c.min(y), d.max(y)),
    );
    if !x0.is_finite() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    // Pad so flat or single-point series still get a usable scale.
    let xpad = if x1 > x0 { (x1 - x0) * 0.03 } else { 0.5 };
    let ypad = if y1 > y0 {
        (y1 - y0) * 0.08
    } else {
        y0.abs().max(0.05) * 0.1
    };
    let mut chart = ChartBuilder::on(&area)
        .caption(l.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d((x0 - xpad)..(x1 + xpad), (y0 - ypad)..(y1 + ypad))?;
    let whole = |x: &f64| {
        if (x - x.round()).abs() < 1e-6 {
            format!("{}", x.round() as i64)
        } else {
            String::new()
        }
    };
    let plain = |x: &f64| {
        let a = x.abs();
        if a != 0.0 && !(1e-3..1e5).contains(&a) {
            format!("{x:.1e}")
        } else {
            format!("{}", (x * 1e4).round() / 1e4)
        }
    };
    let span = (x1 - x0).round() as usize + 1;
    let x_ticks = if l.integer_x { span.clamp(2, 10) } else { 10 };
    chart
        .configure_mesh()
        .x_desc(l.x_label)
        .y_desc(l.y_label)
        .x_labels(x_ticks)
        .x_label_formatter(if l.integer_x { &whole } else { &plain })
        .y_label_formatter(&plain)
        .label_style(("sans-serif", 12))
        .draw()?;
    for (i, (_, pts)) in l.series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?;
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    let text = ("sans-serif", 12).into_font().color(&BLACK);
    for (i, (name, _)) in l.series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let y = 48 + 18 * i as i32;
        legend.draw(&PathElement::new(
            vec![(6, y), (26, y)],
            color.stroke_width(2),
        ))?;
        legend.draw_text(name, &text, (32, y - 7))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn writes_png_and_svg_with_text() {
        let dir = crate::test_util::tmp_dir("plot");
        let rows = vec!["web".to_string(), "code".to_string()];
        let cols: Vec<String> = (0..3).map(|e| e.to_string()).collect();
        let files = heatmap(
            &dir.join("h"),
            &Heatmap {
                title: "share",
                x_label: "expert",
                y_label: "domain",
                rows: &rows,
                cols: &cols,
                values: &[Some(0.1), Some(0.5), None, Some(1.0), Some(0.0), Some(0.2)],
                vmin: 0.0,
                vmax: 1.0,
                diverging: false,
            },
        )
        .unwrap();
        let png = std::fs::read(&files[0]).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        let svg = std::fs::read_to_string(&files[1]).unwrap();
        assert!(
            svg.contains("code") && svg.contains("share"),
            "labels missing from SVG"
        );
        let series = vec![("a".to_string(), vec![(0.0, 1.0), (1.0, 0.5)])];
        let files = lines(
            &dir.join("l"),
            &Lines {
                title: "t",
                x_label: "x",
                y_label: "y",
                series: &series,
                integer_x: true,
            },
        )
        .unwrap();
        assert!(std::fs::metadata(&files[0]).unwrap().len() > 1000);
        // A dot in the stem (variant `scaffold_0.25`) stays in the file name.
        let files = lines(
            &dir.join("run_jsd_scaffold_0.25"),
            &Lines {
                title: "t",
                x_label: "x",
                y_label: "y",
                series: &series,
                integer_x: false,
            },
        )
        .unwrap();
        assert_eq!(files[0], dir.join("run_jsd_scaffold_0.25.png"));
        assert!(files[1].is_file());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
