//! The one output form every scenario shares: figures side by side with a
//! baseline, as a human table or as one JSON object.
//!
//! JSON (`--json`) is exactly one object on stdout:
//! `{"scenario": "...", "rows": [{"case", "subject", "value", "unit",
//! "baseline", "ratio"}, ...]}`. `ratio` is always "how many times better
//! than the baseline": subject/baseline for speeds, baseline/subject for
//! latencies, so above 1 means the subject wins either way.

use std::io::Write;

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// Output options every scenario takes.
#[derive(Clone, Debug, clap::Args)]
pub struct OutputArgs {
    /// Print one JSON object on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Which direction is better for a figure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    /// A speed: handles/s, messages/s.
    Higher,
    /// A latency: microseconds per round trip.
    Lower,
}

/// One measured figure before it is compared: all the samples of one
/// subject in one case.
#[derive(Clone, Debug)]
pub struct Figure {
    pub case: String,
    pub subject: String,
    pub unit: &'static str,
    pub better: Better,
    pub samples: Vec<f64>,
}

/// A case as the scenarios lay their samples out: `samples[case][subject]`
/// holds one entry per run.
pub struct Case {
    pub name: String,
    pub unit: &'static str,
    pub better: Better,
}

/// The figures of a scenario: one per case and subject from `value`, then,
/// for each case where every subject's runs gave one, a "CPU time" figure
/// from `cpu` (steadier than a rate on a shared machine).
pub fn figures<S>(
    cases: &[Case],
    subjects: &[&str],
    samples: &[Vec<Vec<S>>],
    value: impl Fn(&S) -> f64,
    cpu_unit: &'static str,
    cpu: impl Fn(&S) -> Option<f64>,
) -> Vec<Figure> {
    let mut figures = Vec::new();
    for (c, case) in cases.iter().enumerate() {
        for (s, subject) in subjects.iter().enumerate() {
            figures.push(Figure {
                case: case.name.clone(),
                subject: (*subject).to_owned(),
                unit: case.unit,
                better: case.better,
                samples: samples[c][s].iter().map(&value).collect(),
            });
        }
    }
    for (c, case) in cases.iter().enumerate() {
        let per_subject: Vec<Vec<f64>> = samples[c]
            .iter()
            .map(|runs| runs.iter().filter_map(&cpu).collect())
            .collect();
        if per_subject.iter().any(Vec::is_empty) {
            continue;
        }
        for (subject, runs) in subjects.iter().zip(per_subject) {
            figures.push(Figure {
                case: format!("{}, CPU time", case.name),
                subject: (*subject).to_owned(),
                unit: cpu_unit,
                better: Better::Lower,
                samples: runs,
            });
        }
    }
    figures
}

/// One row of the report.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub case: String,
    pub subject: String,
    /// The median of the samples.
    pub value: f64,
    pub unit: String,
    pub baseline: String,
    /// How many times better than the baseline (above 1: better). Infinite
    /// when the subject's figure is 0 and the baseline's is not (a count of
    /// failures, say); JSON has no infinity, so it is `null` there.
    #[serde(serialize_with = "finite_or_null")]
    pub ratio: f64,
    /// Every sample, for the table's spread column; not in the JSON.
    #[serde(skip)]
    pub samples: Vec<f64>,
}

/// A scenario's result.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub rows: Vec<Row>,
    /// A line under the table's title; not in the JSON.
    #[serde(skip)]
    pub title: String,
    /// Footnotes for the table; not in the JSON.
    #[serde(skip)]
    pub notes: Vec<String>,
    /// A scenario's goals and whether they were met: in the JSON (only
    /// when there are any) and under the table.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<Check>,
}

/// One goal of a scenario, checked against a measured figure.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// What the goal is, in words: "failed requests with handover = 0".
    pub goal: String,
    pub subject: String,
    /// The measured figure the goal is about.
    pub value: f64,
    /// The figure the goal allows at most.
    pub limit: f64,
    pub met: bool,
}

impl Check {
    /// A goal of "at most `limit`".
    pub fn at_most(goal: String, subject: &str, value: f64, limit: f64) -> Check {
        Check {
            goal,
            subject: subject.to_owned(),
            value: round_significant(value, 4),
            limit,
            met: value <= limit,
        }
    }
}

fn finite_or_null<S: serde::Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    if v.is_finite() {
        s.serialize_f64(*v)
    } else {
        s.serialize_none()
    }
}

impl Report {
    /// Compares every figure with the baseline subject's figure in the
    /// same case. Every case must have a baseline figure.
    pub fn compare(
        scenario: &str,
        title: String,
        baseline: &str,
        figures: Vec<Figure>,
        notes: Vec<String>,
    ) -> Result<Report> {
        let mut rows = Vec::with_capacity(figures.len());
        for f in &figures {
            let Some(base) = figures
                .iter()
                .find(|b| b.case == f.case && b.subject == baseline)
            else {
                bail!("case {:?} has no {baseline} figure to compare with", f.case);
            };
            let value = median(&f.samples).with_context(|| format!("{} {}", f.case, f.subject))?;
            let base_value = median(&base.samples).context("baseline")?;
            let ratio = if value == base_value {
                // Also 0 against 0, which would otherwise be NaN.
                1.0
            } else {
                match f.better {
                    Better::Higher => value / base_value,
                    Better::Lower => base_value / value,
                }
            };
            rows.push(Row {
                case: f.case.clone(),
                subject: f.subject.clone(),
                value: round_significant(value, 4),
                unit: f.unit.to_owned(),
                baseline: baseline.to_owned(),
                ratio: (ratio * 1000.0).round() / 1000.0,
                samples: f.samples.clone(),
            });
        }
        Ok(Report {
            scenario: scenario.to_owned(),
            rows,
            title,
            notes,
            checks: Vec::new(),
        })
    }

    /// Prints the report on stdout, as JSON or as a table.
    pub fn print(&self, out: &OutputArgs) -> Result<()> {
        let mut stdout = std::io::stdout().lock();
        if out.json {
            serde_json::to_writer(&mut stdout, self)?;
            writeln!(stdout)?;
        } else {
            stdout.write_all(self.table().as_bytes())?;
        }
        stdout.flush()?;
        Ok(())
    }

    /// The human form: one line per figure, its ratio to the baseline, and
    /// the spread of the samples it is the median of.
    pub fn table(&self) -> String {
        let baseline = self
            .rows
            .first()
            .map_or("baseline", |r| r.baseline.as_str());
        let ratio_head = format!("vs {baseline}");
        let head = vec![
            "case".to_owned(),
            "subject".to_owned(),
            "median".to_owned(),
            ratio_head,
            "runs (min .. max)".to_owned(),
        ];
        let mut lines = vec![head];
        let mut last_case = None;
        for r in &self.rows {
            let case = if last_case == Some(r.case.as_str()) {
                String::new()
            } else {
                r.case.clone()
            };
            last_case = Some(r.case.as_str());
            let (lo, hi) = r
                .samples
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &s| {
                    (lo.min(s), hi.max(s))
                });
            lines.push(vec![
                case,
                r.subject.clone(),
                format!("{} {}", human(r.value), r.unit),
                if r.ratio.is_finite() {
                    format!("{:.2}x", r.ratio)
                } else {
                    "inf".to_owned()
                },
                format!("{} .. {} (n={})", human(lo), human(hi), r.samples.len()),
            ]);
        }
        let widths: Vec<usize> = (0..5)
            .map(|i| {
                lines
                    .iter()
                    .map(|l| l[i].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = format!("{}: {}\n\n", self.scenario, self.title);
        for (n, l) in lines.iter().enumerate() {
            if n > 1 && !l[0].is_empty() {
                out.push('\n');
            }
            let mut line = String::new();
            for (i, cell) in l.iter().enumerate() {
                let pad = widths[i] - cell.chars().count();
                // Numbers right-aligned, words left-aligned.
                if (2..=3).contains(&i) {
                    line.push_str(&" ".repeat(pad));
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad));
                }
                line.push_str("  ");
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        if !self.notes.is_empty() {
            out.push('\n');
            for n in &self.notes {
                out.push_str(&format!("* {n}\n"));
            }
        }
        if !self.checks.is_empty() {
            out.push('\n');
            for c in &self.checks {
                out.push_str(&format!(
                    "goal: {} ({}): {} (limit {}): {}\n",
                    c.goal,
                    c.subject,
                    human(c.value),
                    human(c.limit),
                    if c.met { "met" } else { "MISSED" }
                ));
            }
        }
        out
    }
}

/// The median of the samples (the mean of the middle two for an even count).
pub fn median(samples: &[f64]) -> Result<f64> {
    if samples.is_empty() {
        bail!("no samples");
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let mid = s.len() / 2;
    Ok(if s.len() % 2 == 1 {
        s[mid]
    } else {
        (s[mid - 1] + s[mid]) / 2.0
    })
}

fn round_significant(v: f64, digits: i32) -> f64 {
    if v == 0.0 || !v.is_finite() {
        return v;
    }
    let scale = 10f64.powi(digits - 1 - v.abs().log10().floor() as i32);
    (v * scale).round() / scale
}

/// 451234.0 as "451.2 k", 3.3e6 as "3.30 M", 4719.2 as "4719",
/// 516.47 as "516.5", 12.345 as "12.35".
fn human(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1} k", v / 1e3)
    } else if a >= 1e3 {
        format!("{v:.0}")
    } else if a >= 1e2 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fig(case: &str, subject: &str, better: Better, samples: &[f64]) -> Figure {
        Figure {
            case: case.into(),
            subject: subject.into(),
            unit: "x",
            better,
            samples: samples.to_vec(),
        }
    }

    #[test]
    fn ratios_point_the_same_way_for_speed_and_latency() {
        let r = Report::compare(
            "t",
            String::new(),
            "plain",
            vec![
                fig("speed", "plain", Better::Higher, &[100.0, 1.0, 100.0]),
                fig("speed", "lib", Better::Higher, &[50.0]),
                fig("lat", "plain", Better::Lower, &[10.0, 12.0]),
                fig("lat", "lib", Better::Lower, &[22.0]),
            ],
            vec![],
        )
        .unwrap();
        let ratios: Vec<f64> = r.rows.iter().map(|r| r.ratio).collect();
        assert_eq!(ratios, [1.0, 0.5, 1.0, 0.5]);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["scenario"], "t");
        assert_eq!(json["rows"][1]["baseline"], "plain");
        assert!(json["rows"][1].get("samples").is_none());
        assert!(json.get("checks").is_none());
    }

    #[test]
    fn zero_against_zero_is_level_and_zero_against_some_is_null_in_json() {
        let r = Report::compare(
            "t",
            String::new(),
            "naive",
            vec![
                fig("failed", "naive", Better::Lower, &[120.0]),
                fig("failed", "lib", Better::Lower, &[0.0]),
                fig("none", "naive", Better::Lower, &[0.0]),
                fig("none", "lib", Better::Lower, &[0.0]),
            ],
            vec![],
        )
        .unwrap();
        assert!(r.rows[1].ratio.is_infinite());
        assert_eq!(r.rows[3].ratio, 1.0);
        let json = serde_json::to_value(&r).unwrap();
        assert!(json["rows"][1]["ratio"].is_null());
        assert!(r.table().contains("inf"));
    }

    #[test]
    fn rounding() {
        assert_eq!(round_significant(451_234.0, 4), 451_200.0);
        assert_eq!(round_significant(12.3456, 4), 12.35);
    }
}
