//! The benchmark charts: one SVG per area, written next to BENCHMARKS.md
//! (`benchmarks/<name>.svg`) so the Markdown can show what the tables say.
//!
//! Two shapes cover every area: horizontal bars, each cut into named
//! segments (a peer's median, or a guest's boot phases stacked), and lines
//! (a latency against a count). The drawing is plotters' SVG backend with its
//! built-in font metrics: no font files, no bitmaps.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use plotters::prelude::*;

/// Where the charts go, relative to the project root (xtask runs there).
pub(super) const CHART_DIR: &str = "benchmarks";

const WIDTH: u32 = 900;
const BAR_HEIGHT: u32 = 46;
const LINE_HEIGHT: u32 = 480;
/// Segment and series colours, in order; readable on white and in grey.
const PALETTE: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
];

/// One horizontal bar: its label and the lengths of its segments, drawn
/// end to end in the order of [`BarChart::segments`].
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Bar {
    pub(super) label: String,
    pub(super) segments: Vec<f64>,
}

impl Bar {
    pub(super) fn new(label: impl Into<String>, segments: Vec<f64>) -> Bar {
        Bar { label: label.into(), segments }
    }

    fn total(&self) -> f64 {
        self.segments.iter().filter(|v| v.is_finite()).sum()
    }
}

/// Bars sharing one axis: the peers of a benchmark, or guests' boot timelines.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct BarChart {
    pub(super) title: String,
    /// The axis caption, with its unit (`median ms`).
    pub(super) axis: String,
    /// One name per segment; a single-segment chart shows no legend.
    pub(super) segments: Vec<String>,
    pub(super) bars: Vec<Bar>,
}

/// Series of points sharing two axes.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct LineChart {
    pub(super) title: String,
    pub(super) x_axis: String,
    pub(super) y_axis: String,
    pub(super) series: Vec<(String, Vec<(f64, f64)>)>,
}

impl BarChart {
    /// One bar per peer, one value each (a median).
    pub(super) fn peers(title: impl Into<String>, axis: impl Into<String>, peers: Vec<(String, f64)>) -> BarChart {
        let axis = axis.into();
        BarChart {
            title: title.into(),
            segments: vec![axis.clone()],
            axis,
            bars: peers.into_iter().map(|(label, value)| Bar::new(label, vec![value])).collect(),
        }
    }

    /// Draws the chart into `benchmarks/<name>.svg`.
    pub(super) fn write(&self, name: &str) -> Result<PathBuf> {
        write(name, &self.svg()?)
    }

    /// The chart as an SVG document.
    pub(super) fn svg(&self) -> Result<String> {
        if self.bars.is_empty() || self.segments.is_empty() {
            bail!("chart `{}` has nothing to draw", self.title);
        }
        if let Some(bar) = self.bars.iter().find(|bar| bar.segments.len() != self.segments.len()) {
            bail!(
                "chart `{}`: bar `{}` has {} segments, expected {}",
                self.title,
                bar.label,
                bar.segments.len(),
                self.segments.len()
            );
        }
        let max = self.bars.iter().map(Bar::total).fold(0.0, f64::max);
        // Room for the end labels, and for the legend beside the bars.
        let headroom = if self.segments.len() > 1 { 1.4 } else { 1.08 };
        let max = if max > 0.0 { max * headroom } else { 1.0 };
        let count = self.bars.len();
        let legend_rows = if self.segments.len() > 1 { 1 } else { 0 };
        let height = 110 + BAR_HEIGHT * u32::try_from(count + legend_rows).unwrap_or(u32::MAX / BAR_HEIGHT);
        let label_width = self.bars.iter().map(|bar| bar.label.chars().count()).max().unwrap_or(0);
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
            let mut chart = chart_builder(&root, &self.title)?
                .y_label_area_size(u32::try_from(label_width * 7 + 16).unwrap_or(300).min(WIDTH / 2))
                .build_cartesian_2d(0.0..max, -0.5..(count as f64 - 0.5))
                .map_err(draw_error)?;
            // Bar i sits at y = count-1-i, so the first bar is on top; its
            // label is printed at that integer tick and nowhere else.
            let labels: Vec<&str> = self.bars.iter().rev().map(|bar| bar.label.as_str()).collect();
            let label_at = |y: &f64| {
                let index = y.round();
                if (y - index).abs() < 1e-6 && index >= 0.0 {
                    labels.get(index as usize).map_or_else(String::new, |label| (*label).to_owned())
                } else {
                    String::new()
                }
            };
            chart
                .configure_mesh()
                .disable_y_mesh()
                .x_label_formatter(&|x| axis_figure(*x, max))
                .y_labels(count * 2 + 1)
                .y_label_formatter(&label_at)
                .x_desc(&self.axis)
                .draw()
                .map_err(draw_error)?;
            for (segment, name) in self.segments.iter().enumerate() {
                let colour = PALETTE[segment % PALETTE.len()];
                let rectangles = self.bars.iter().enumerate().map(move |(index, bar)| {
                    let y = (count - 1 - index) as f64;
                    let start: f64 = bar.segments[..segment].iter().filter(|v| v.is_finite()).sum();
                    let length = if bar.segments[segment].is_finite() { bar.segments[segment] } else { 0.0 };
                    Rectangle::new([(start, y - 0.32), (start + length, y + 0.32)], colour.filled())
                });
                let drawn = chart.draw_series(rectangles).map_err(draw_error)?;
                if self.segments.len() > 1 {
                    drawn
                        .label(name)
                        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], colour.filled()));
                }
            }
            let totals = self.bars.iter().enumerate().map(|(index, bar)| {
                let y = (count - 1 - index) as f64;
                Text::new(format!(" {}", figure(bar.total())), (bar.total(), y), ("sans-serif", 13).into_font())
            });
            chart.draw_series(totals).map_err(draw_error)?;
            if self.segments.len() > 1 {
                draw_legend(&mut chart, SeriesLabelPosition::LowerRight)?;
            }
            root.present().map_err(draw_error)?;
        }
        Ok(svg)
    }
}

impl LineChart {
    /// Draws the chart into `benchmarks/<name>.svg`.
    pub(super) fn write(&self, name: &str) -> Result<PathBuf> {
        write(name, &self.svg()?)
    }

    /// The chart as an SVG document.
    pub(super) fn svg(&self) -> Result<String> {
        let points =
            || self.series.iter().flat_map(|(_, points)| points.iter()).filter(|(x, y)| x.is_finite() && y.is_finite());
        if points().next().is_none() {
            bail!("chart `{}` has nothing to draw", self.title);
        }
        let (x_min, x_max) =
            points().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), (x, _)| (lo.min(*x), hi.max(*x)));
        let y_max = points().fold(0.0, |hi: f64, (_, y)| hi.max(*y));
        let x_max = if x_max > x_min { x_max } else { x_min + 1.0 };
        let y_max = if y_max > 0.0 { y_max * 1.1 } else { 1.0 };
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (WIDTH, LINE_HEIGHT)).into_drawing_area();
            let mut chart = chart_builder(&root, &self.title)?
                .margin_right(28)
                .y_label_area_size(60)
                .build_cartesian_2d(x_min..x_max, 0.0..y_max)
                .map_err(draw_error)?;
            chart
                .configure_mesh()
                .x_label_formatter(&|x| axis_figure(*x, x_max))
                .y_label_formatter(&|y| axis_figure(*y, y_max))
                .x_desc(&self.x_axis)
                .y_desc(&self.y_axis)
                .draw()
                .map_err(draw_error)?;
            for (index, (name, points)) in self.series.iter().enumerate() {
                let colour = PALETTE[index % PALETTE.len()];
                let finite = points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite());
                chart
                    .draw_series(LineSeries::new(finite, colour.stroke_width(2)))
                    .map_err(draw_error)?
                    .label(name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2)));
            }
            draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
            root.present().map_err(draw_error)?;
        }
        Ok(svg)
    }
}

/// Writes `svg` to `benchmarks/<name>.svg` (temp file + rename) and says where.
fn write(name: &str, svg: &str) -> Result<PathBuf> {
    let dir = Path::new(CHART_DIR);
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(format!("{name}.svg"));
    let temp = dir.join(format!(".{name}.svg.tmp"));
    fs::write(&temp, svg).with_context(|| format!("cannot write {}", temp.display()))?;
    fs::rename(&temp, &path).with_context(|| format!("cannot rename {} to {}", temp.display(), path.display()))?;
    println!("chart: {} (show it in BENCHMARKS.md as ![{name}]({}))", path.display(), path.display());
    Ok(path)
}

/// A value as the bar's end label: three significant figures or so.
fn figure(value: f64) -> String {
    match value.abs() {
        v if v >= 100.0 => format!("{value:.0}"),
        v if v >= 10.0 => format!("{value:.1}"),
        v if v >= 1.0 => format!("{value:.2}"),
        _ => format!("{value:.3}"),
    }
}

/// The series' names and marks in a framed box at `position`.
fn draw_legend<'a, 'b: 'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut ChartContext<'a, SVGBackend<'b>, CT>,
    position: SeriesLabelPosition,
) -> Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(draw_error)
}

/// An axis tick: as many decimals as the axis' scale needs, no more.
fn axis_figure(value: f64, axis_max: f64) -> String {
    match axis_max.abs() {
        m if m >= 20.0 => format!("{value:.0}"),
        m if m >= 2.0 => format!("{value:.1}"),
        _ => format!("{value:.2}"),
    }
}

/// Paints the canvas white and starts a chart on it with the caption,
/// margins and x-axis room every kiln chart shares.
fn chart_builder<'a, 'b>(
    root: &'a DrawingArea<SVGBackend<'b>, plotters::coord::Shift>,
    title: &str,
) -> Result<ChartBuilder<'a, 'b, SVGBackend<'b>>> {
    root.fill(&WHITE).map_err(draw_error)?;
    let mut builder = ChartBuilder::on(root);
    builder.caption(title, ("sans-serif", 20)).margin(12).x_label_area_size(40);
    Ok(builder)
}

fn draw_error<E: std::error::Error + Send + Sync + 'static>(err: DrawingAreaErrorKind<E>) -> anyhow::Error {
    anyhow::anyhow!("cannot draw the chart: {err}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers() -> BarChart {
        BarChart {
            title: "FAT builder on ext4".to_owned(),
            axis: "median ms".to_owned(),
            segments: vec!["median ms".to_owned()],
            bars: vec![
                Bar::new("kiln", vec![52.0]),
                Bar::new("fatfs crate", vec![598.0]),
                Bar::new("cp -r (floor)", vec![63.0]),
            ],
        }
    }

    #[test]
    fn bars_are_drawn_to_scale_with_their_labels_and_totals() {
        let svg = peers().svg().unwrap();
        assert!(svg.starts_with("<svg"), "{svg}");
        for text in ["FAT builder on ext4", "median ms", "kiln", "fatfs crate", "cp -r (floor)", " 52.0", " 598"] {
            assert!(svg.contains(text), "missing {text:?} in\n{svg}");
        }
        // One filled rectangle per bar (plus the background); the longest is fatfs's.
        let widths: Vec<f64> = svg
            .lines()
            .filter(|line| line.contains("<rect") && line.contains("fill=\"#1F77B4\""))
            .filter_map(|line| line.split("width=\"").nth(1)?.split('"').next()?.parse().ok())
            .collect();
        assert_eq!(widths.len(), 3, "{svg}");
        let ratio = widths[1] / widths[0];
        assert!((ratio - 598.0 / 52.0).abs() < 0.5, "bars not to scale: {widths:?}");
    }

    #[test]
    fn stacked_bars_have_a_legend_and_add_up() {
        let chart = BarChart {
            title: "Guest boot".to_owned(),
            axis: "seconds since kernel start".to_owned(),
            segments: vec!["kernel".into(), "modules".into(), "disks".into(), "service".into()],
            bars: vec![Bar::new("kiln", vec![2.0, 0.25, 0.1, 0.05]), Bar::new("floor", vec![1.9, 0.0, 0.0, 0.0])],
        };
        let svg = chart.svg().unwrap();
        for text in ["kernel", "modules", "disks", "service", " 2.40", " 1.90"] {
            assert!(svg.contains(text), "missing {text:?}");
        }
    }

    #[test]
    fn lines_show_every_series() {
        let chart = LineChart {
            title: "nft add".to_owned(),
            x_axis: "VMs".to_owned(),
            y_axis: "ms".to_owned(),
            series: vec![
                ("kiln add".to_owned(), (1..=100).map(|i| (f64::from(i), 2.0 + f64::from(i) / 1000.0)).collect()),
                ("per-VM rules".to_owned(), (1..=100).map(|i| (f64::from(i), 2.0 + f64::from(i) / 50.0)).collect()),
            ],
        };
        let svg = chart.svg().unwrap();
        for colour in ["#1F77B4", "#FF7F0E"] {
            let drawn = svg
                .lines()
                .filter(|l| l.starts_with("<polyline") && l.contains(&format!("stroke=\"{colour}\"")))
                .count();
            assert_eq!(drawn, 2, "{colour}: the line and its legend mark:\n{svg}");
        }
        assert!(svg.contains("kiln add") && svg.contains("per-VM rules"));
    }

    #[test]
    fn empty_or_ragged_charts_are_refused() {
        let mut chart = peers();
        chart.bars[1].segments.push(1.0);
        let err = chart.svg().unwrap_err().to_string();
        assert!(err.contains("bar `fatfs crate` has 2 segments, expected 1"), "{err}");
        let empty = LineChart { title: "x".into(), x_axis: "x".into(), y_axis: "y".into(), series: vec![] };
        assert!(empty.svg().unwrap_err().to_string().contains("nothing to draw"));
    }
}
