//! A PNG of busbw against message size, one line per runtime and world size.

use std::path::Path;

use anyhow::{anyhow, Context};
use plotters::prelude::*;

/// Where the label font comes from (Debian's `fonts-dejavu-core`, which `scripts/bench.sh`
/// installs).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// One line of the plot: a name and `(size in bytes, busbw in GB/s)` points.
pub(crate) type Series = (String, Vec<(f64, f64)>);

/// Draws `series` to a PNG at `path`.
pub(crate) fn busbw_png(path: &Path, title: &str, series: &[Series]) -> anyhow::Result<()> {
    let font = std::fs::read(FONT)
        .with_context(|| format!("{FONT} (apt-get install fonts-dejavu-core)"))?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| anyhow!("{FONT} is not a usable font"))?;
    let points = series
        .iter()
        .flat_map(|(_, p)| p.iter())
        .filter(|(s, b)| *s > 0.0 && b.is_finite());
    let (lo, hi, top) = points.fold((f64::MAX, 1.0f64, 0.1f64), |(lo, hi, top), &(s, b)| {
        (lo.min(s), hi.max(s), top.max(b))
    });
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(path, (960, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(60)
            .build_cartesian_2d((lo.min(hi)..hi).log_scale(), 0f64..top * 1.1)?;
        chart
            .configure_mesh()
            .x_desc("message size (bytes)")
            .y_desc("busbw (GB/s)")
            .x_label_formatter(&|v| human(*v))
            .label_style(("sans-serif", 14))
            .draw()?;
        for (i, (name, pts)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let pts: Vec<(f64, f64)> = pts
                .iter()
                .copied()
                .filter(|(s, b)| *s > 0.0 && b.is_finite())
                .collect();
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2))
                });
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow!("cannot draw {}: {e}", path.display()))
}

/// Axis ticks in SI units: `10000` → `10k`, `1000000` → `1M`.
fn human(bytes: f64) -> String {
    let trim = |v: f64| format!("{v:.1}").trim_end_matches(".0").to_owned();
    match bytes {
        b if b >= 1e9 => format!("{}G", trim(b / 1e9)),
        b if b >= 1e6 => format!("{}M", trim(b / 1e6)),
        b if b >= 1e3 => format!("{}k", trim(b / 1e3)),
        b => trim(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_read_in_si_units() {
        assert_eq!(human(4.0), "4");
        assert_eq!(human(10_000.0), "10k");
        assert_eq!(human(1_000_000.0), "1M");
        assert_eq!(human(67_108_864.0), "67.1M");
    }
}
