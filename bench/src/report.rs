//! The report: a markdown page with one table per scenario (every run, the
//! median, the targets of issue 5 with PASS or MISS) and an SVG bar chart of
//! the latency percentiles. Both are plain strings so they can be tested
//! without touching the disk.

use std::fmt::Write;

use crate::stats::{PERCENTILES, median};

/// One figure measured in every run.
#[derive(Debug, Clone)]
pub struct Metric {
    /// What was measured, e.g. "GetCounts batch 1 (requests/s)".
    pub name: String,
    /// The figure of each run, in run order.
    pub runs: Vec<f64>,
}

impl Metric {
    /// A metric named `name` with the figures `runs`.
    pub fn new(name: impl Into<String>, runs: Vec<f64>) -> Metric {
        Metric { name: name.into(), runs }
    }

    /// The median over the runs.
    pub fn median(&self) -> f64 {
        median(&self.runs)
    }
}

/// A target of the issue, checked against a median.
#[derive(Debug, Clone)]
pub struct Target {
    /// What the target is about.
    pub name: String,
    /// The measured median (a ratio, a rate or milliseconds).
    pub measured: f64,
    /// The target as written, e.g. ">= 0.5x".
    pub target: String,
    /// True when the measured figure meets it.
    pub pass: bool,
}

/// The section of one scenario.
#[derive(Debug, Clone, Default)]
pub struct Section {
    /// Heading.
    pub title: String,
    /// What the scenario does and what its baseline is.
    pub about: String,
    /// The figures of every run.
    pub metrics: Vec<Metric>,
    /// The targets with their verdict.
    pub targets: Vec<Target>,
}

/// Latency percentiles of one measurement (medians over the runs), in ms.
#[derive(Debug, Clone)]
pub struct Latency {
    /// The scenario and the side (service or baseline).
    pub label: String,
    /// p50, p90, p99, p999.
    pub ms: [f64; 4],
}

/// The whole report.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Lines under the title: machine, date, parameters.
    pub preamble: Vec<String>,
    /// One per scenario that ran.
    pub sections: Vec<Section>,
    /// Every latency series, for the table and the chart.
    pub latencies: Vec<Latency>,
}

/// Formats a figure with a precision that suits its size; whole numbers
/// (request and error counts) without decimals.
pub fn fmt_num(x: f64) -> String {
    if x.abs() >= 1000.0 || x.fract() == 0.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.3}")
    }
}

/// Renders the report as markdown.
pub fn render_markdown(r: &Report) -> String {
    let mut out = String::from("# thumbup-bench report\n\n");
    for line in &r.preamble {
        let _ = writeln!(out, "- {line}");
    }
    for s in &r.sections {
        let _ = write!(out, "\n## {}\n\n{}\n\n", s.title, s.about);
        let runs = s.metrics.iter().map(|m| m.runs.len()).max().unwrap_or(0);
        out.push_str("| metric |");
        for i in 1..=runs {
            let _ = write!(out, " run {i} |");
        }
        out.push_str(" median |\n|---|");
        out.push_str(&"---:|".repeat(runs + 1));
        out.push('\n');
        for m in &s.metrics {
            let _ = write!(out, "| {} |", m.name);
            for i in 0..runs {
                let cell = m.runs.get(i).map(|x| fmt_num(*x)).unwrap_or_default();
                let _ = write!(out, " {cell} |");
            }
            let _ = writeln!(out, " **{}** |", fmt_num(m.median()));
        }
        if !s.targets.is_empty() {
            out.push_str("\n| target | measured (median) | goal | verdict |\n|---|---:|---|---|\n");
            for t in &s.targets {
                let verdict = if t.pass { "PASS" } else { "MISS" };
                let _ = writeln!(out, "| {} | {} | {} | {verdict} |", t.name, fmt_num(t.measured), t.target);
            }
        }
    }
    if !r.latencies.is_empty() {
        out.push_str("\n## Latency (ms, median over runs)\n\n| measurement |");
        for (_, name) in PERCENTILES {
            let _ = write!(out, " {name} |");
        }
        out.push_str("\n|---|---:|---:|---:|---:|\n");
        for l in &r.latencies {
            let _ = write!(out, "| {} |", l.label);
            for v in l.ms {
                let _ = write!(out, " {v:.3} |");
            }
            out.push('\n');
        }
        out.push_str("\n![latency percentiles](latency.svg)\n");
    }
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Renders the latency percentiles as a grouped bar chart: one `<g
/// class="series">` per measurement, four bars (p50, p90, p99, p999) each, on
/// a log scale so that a p999 does not flatten the p50s.
pub fn render_svg(series: &[Latency]) -> String {
    const ROW: f64 = 26.0;
    const LEFT: f64 = 260.0;
    const PLOT: f64 = 560.0;
    const TOP: f64 = 40.0;
    const COLORS: [&str; 4] = ["#4e79a7", "#59a14f", "#f28e2b", "#e15759"];
    let group = ROW * 4.0 + 12.0;
    let height = TOP + group * series.len() as f64 + 40.0;
    let width = LEFT + PLOT + 120.0;
    let max = series.iter().flat_map(|s| s.ms).fold(1.0_f64, f64::max);
    // Log scale from 0.01 ms to the largest value.
    let lo = 0.01_f64.log10();
    let hi = max.log10().max(lo + 1.0);
    let scale = |v: f64| ((v.max(0.01).log10() - lo) / (hi - lo) * PLOT).max(1.0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ =
        writeln!(out, r#"<text x="10" y="20" font-size="14">thumbup-bench latency percentiles (ms, log scale)</text>"#);
    for (i, s) in series.iter().enumerate() {
        let y0 = TOP + group * i as f64;
        let _ =
            writeln!(out, r#"<g class="series"><text x="10" y="{:.1}">{}</text>"#, y0 + ROW * 2.0, escape(&s.label));
        for (j, ((_, name), v)) in PERCENTILES.iter().zip(s.ms).enumerate() {
            let y = y0 + ROW * j as f64;
            let _ = writeln!(
                out,
                r#"<rect x="{LEFT}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"/><text x="{:.1}" y="{:.1}">{name} {v:.3}</text>"#,
                scale(v),
                ROW - 6.0,
                COLORS[j],
                LEFT + scale(v) + 4.0,
                y + ROW - 10.0,
            );
        }
        out.push_str("</g>\n");
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        Report {
            preamble: vec!["machine: test".into()],
            sections: vec![Section {
                title: "a. reads".into(),
                about: "GetCounts against Redis GET".into(),
                metrics: vec![Metric::new("service req/s", vec![100.0, 300.0, 200.0])],
                targets: vec![
                    Target { name: "ratio".into(), measured: 0.6, target: ">= 0.5x".into(), pass: true },
                    Target { name: "items/s".into(), measured: 10.0, target: ">= 200000".into(), pass: false },
                ],
            }],
            latencies: vec![Latency { label: "a <svc>".into(), ms: [0.1, 0.2, 0.5, 1.0] }],
        }
    }

    #[test]
    fn markdown_table_shows_every_run_the_median_and_the_verdicts() {
        let md = render_markdown(&sample());
        assert!(md.contains("| metric | run 1 | run 2 | run 3 | median |"), "{md}");
        assert!(md.contains("| service req/s | 100 | 300 | 200 | **200** |"), "{md}");
        assert!(md.contains("| ratio | 0.600 | >= 0.5x | PASS |"), "{md}");
        assert!(md.contains("| items/s | 10 | >= 200000 | MISS |"), "{md}");
        assert_eq!(fmt_num(0.0), "0");
        assert_eq!(fmt_num(12.25), "12.2");
        assert_eq!(fmt_num(0.5), "0.500");
        assert!(md.contains("latency.svg"));
    }

    #[test]
    fn svg_has_one_group_per_series_and_balanced_tags() {
        let mut series = sample().latencies;
        series.push(Latency { label: "b".into(), ms: [1.0, 2.0, 3.0, 40.0] });
        let svg = render_svg(&series);
        assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches(r#"<g class="series">"#).count(), 2);
        assert_eq!(svg.matches("</g>").count(), 2);
        assert_eq!(svg.matches("<rect ").count(), 8);
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
        // Labels are escaped.
        assert!(svg.contains("a &lt;svc&gt;") && !svg.contains("<svc>"));
    }
}
