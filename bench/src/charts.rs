//! SVG charts (plotters), drawn from [`Results`] only: startup phases as stacked bars per
//! box, and overhead ratios (box median / native median) per scenario.

use crate::report::{has_phases, phase_medians, ratio};
use crate::results::Results;
use crate::runner::native;
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use std::path::Path;
use thiserror::Error;

/// A chart that could not be drawn.
#[derive(Debug, Error)]
#[error("drawing {path}: {message}")]
pub struct ChartError {
    /// The SVG being written.
    pub path: String,
    /// What plotters said.
    pub message: String,
}

const COLORS: [RGBColor; 8] = [
    RGBColor(0x4e, 0x79, 0xa7),
    RGBColor(0xf2, 0x8e, 0x2b),
    RGBColor(0xe1, 0x57, 0x59),
    RGBColor(0x76, 0xb7, 0xb2),
    RGBColor(0x59, 0xa1, 0x4f),
    RGBColor(0xed, 0xc9, 0x48),
    RGBColor(0xb0, 0x7a, 0xa1),
    RGBColor(0x9c, 0x75, 0x5f),
];

/// One bar made of stacked segments: (label, [(segment name, height)]).
type Stack = (String, Vec<(String, f64)>);

/// Startup phases per box: each bar is spawn → torn_down, split at the phases the box
/// stamps (median ms), for every scenario that times spawn → torn_down; tiny-guest runs
/// (the `vmm` scenario) are marked `*`.
pub fn startup(r: &Results, path: &Path) -> Result<(), ChartError> {
    let mut bars: Vec<Stack> = Vec::new();
    for s in r.scenarios.iter().filter(|s| has_phases(s)) {
        let tiny = crate::scenario::by_name(&s.name).is_some_and(|x| x.boots_tiny_guest());
        let suffix = if tiny { "*" } else { "" };
        for b in &s.boxes {
            let med = phase_medians(s, b);
            if med.is_empty() {
                continue;
            }
            let mut prev = 0.0;
            let segs = med
                .into_iter()
                .map(|(p, at)| {
                    let d = (at - prev).max(0.0);
                    prev = prev.max(at);
                    (format!("→ {}", p.name()), d)
                })
                .collect();
            bars.push((format!("{b}{suffix}"), segs));
        }
    }
    stacked(
        path,
        "Start-up: spawn → torn_down by phase (median; * = tiny guest, no kernel)",
        "ms",
        &bars,
    )
}

/// Overhead: for each scenario's charted metrics ([`crate::scenario::Scenario::charted`],
/// the headline unless it says otherwise), box median / native median.
pub fn overhead(r: &Results, path: &Path) -> Result<(), ChartError> {
    let mut bars: Vec<Stack> = Vec::new();
    for s in &r.scenarios {
        let charted: Vec<String> = match crate::scenario::by_name(&s.name) {
            Some(scn) => scn.charted().iter().map(|m| m.key.to_string()).collect(),
            None => s
                .metrics
                .first()
                .map(|m| m.key.clone())
                .into_iter()
                .collect(),
        };
        // More than one metric of a scenario: each bar says which.
        let labelled = charted.len() > 1;
        for key in &charted {
            for b in s.boxes.iter().filter(|b| b.as_str() != native::NAME) {
                if let Some(x) = ratio(s, key, b, native::NAME) {
                    let label = if labelled {
                        format!("{}/{b} {key}", s.name)
                    } else {
                        format!("{}/{b}", s.name)
                    };
                    bars.push((label, vec![(b.clone(), x)]));
                }
            }
        }
    }
    stacked(
        path,
        "Box median / native median (time, memory: >1 is worse; throughput: <1 is worse)",
        "× native",
        &bars,
    )
}

/// Draws stacked bars; segments with the same name share a colour and a legend entry.
fn stacked(path: &Path, title: &str, unit: &str, bars: &[Stack]) -> Result<(), ChartError> {
    let err = |e: &dyn std::fmt::Display| ChartError {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let mut names: Vec<String> = Vec::new();
    for (_, segs) in bars {
        for (n, _) in segs {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
    }
    let ymax = bars
        .iter()
        .map(|(_, s)| s.iter().map(|x| x.1).sum::<f64>())
        .fold(0.0, f64::max)
        .max(1e-3)
        * 1.15;
    let width = (160 + 110 * bars.len().max(1)) as u32;
    let root = SVGBackend::new(path, (width.max(640), 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let n = bars.len().max(1) as i32;
    let labels: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((0..n).into_segmented(), 0.0..ymax)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len().max(1))
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => labels.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .y_desc(unit)
        .draw()
        .map_err(|e| err(&e))?;
    if bars.is_empty() {
        root.draw(&Text::new(
            "no successful runs to chart",
            (40, 60),
            ("sans-serif", 16),
        ))
        .map_err(|e| err(&e))?;
    }
    for (k, name) in names.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let rects: Vec<_> = bars
            .iter()
            .enumerate()
            .filter_map(|(i, (_, segs))| {
                let pos = segs.iter().position(|(s, _)| s == name)?;
                let base: f64 = segs[..pos].iter().map(|x| x.1).sum();
                let mut r = Rectangle::new(
                    [
                        (SegmentValue::Exact(i as i32), base),
                        (SegmentValue::Exact(i as i32 + 1), base + segs[pos].1),
                    ],
                    color.filled(),
                );
                r.set_margin(0, 0, 12, 12);
                Some(r)
            })
            .collect();
        chart
            .draw_series(rects)
            .map_err(|e| err(&e))?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    if !names.is_empty() {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_render_from_results() {
        let dir = std::env::temp_dir().join(format!("bench-charts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let r = crate::results::tests::sample();
        overhead(&r, &dir.join("o.svg")).unwrap();
        startup(&r, &dir.join("s.svg")).unwrap();
        let svg = std::fs::read_to_string(dir.join("o.svg")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("cpu/container"));
    }

    #[test]
    fn the_net_scenario_charts_throughput_and_round_trip() {
        let dir = std::env::temp_dir().join(format!("bench-charts-net-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let r = crate::results::tests::sample_with_net();
        overhead(&r, &dir.join("o.svg")).unwrap();
        let svg = std::fs::read_to_string(dir.join("o.svg")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(svg.contains("net/container tcp_to_box_gbit_s"), "{svg}");
        assert!(svg.contains("net/container tcp_rr_p50_us"), "{svg}");
        assert!(
            !svg.contains("tcp_rr_p99_us"),
            "only the two charted metrics"
        );
        // Other scenarios keep their one unlabelled headline bar.
        assert!(svg.contains("\ncpu/container\n"), "{svg}");
    }
}
