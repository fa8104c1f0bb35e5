//! Figures, their min/median/max over repeated runs, ratios and targets.
use serde::{Deserialize, Serialize};

/// min / median / max of one figure's samples.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stat {
    pub n: usize,
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Stat {
    /// None for an empty sample set (a figure that was not measured).
    pub fn of(samples: &[f64]) -> Option<Stat> {
        let mut s: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
        if s.is_empty() {
            return None;
        }
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        Some(Stat {
            n,
            min: s[0],
            median,
            max: s[n - 1],
        })
    }
}

/// What a figure must stay under.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Target {
    /// Human-readable, e.g. "median ≤ 1.3× direct libvirt".
    pub text: String,
    /// The checked value (the ratio or the median/max of the figure).
    pub value: f64,
    pub limit: f64,
    pub met: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Figure {
    pub id: String,
    pub title: String,
    pub unit: String,
    pub stat: Option<Stat>,
    pub samples: Vec<f64>,
    /// Id of the same-run baseline this figure is compared with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<String>,
    /// median / baseline median.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,
}

impl Figure {
    pub fn new(id: &str, title: &str, unit: &str, samples: Vec<f64>) -> Figure {
        Figure {
            id: id.into(),
            title: title.into(),
            unit: unit.into(),
            stat: Stat::of(&samples),
            samples,
            baseline: None,
            ratio: None,
            target: None,
        }
    }

    pub fn median(&self) -> Option<f64> {
        self.stat.as_ref().map(|s| s.median)
    }

    pub fn max(&self) -> Option<f64> {
        self.stat.as_ref().map(|s| s.max)
    }

    /// Compare the median with `base`'s median (same run).
    pub fn against(mut self, base: &Figure) -> Figure {
        self.baseline = Some(base.id.clone());
        self.ratio = match (self.median(), base.median()) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        self
    }

    /// Target on the ratio to the baseline.
    pub fn ratio_at_most(self, limit: f64, text: &str) -> Figure {
        let ratio = self.ratio;
        self.target_on(ratio, limit, text, |v, limit| v <= limit)
    }

    /// Target on the median.
    pub fn median_at_most(self, limit: f64, text: &str) -> Figure {
        let median = self.median();
        self.target_on(median, limit, text, |v, limit| v <= limit)
    }

    /// Target on the worst sample.
    pub fn max_at_most(self, limit: f64, text: &str) -> Figure {
        let max = self.max();
        self.target_on(max, limit, text, |v, limit| v <= limit)
    }

    /// Target on the worst (lowest) sample, for figures where more is better.
    pub fn min_at_least(self, limit: f64, text: &str) -> Figure {
        let min = self.stat.as_ref().map(|s| s.min);
        self.target_on(min, limit, text, |v, limit| v >= limit)
    }

    /// The target checked on `value` (none without a value: no samples, no baseline).
    fn target_on(
        mut self,
        value: Option<f64>,
        limit: f64,
        text: &str,
        met: fn(f64, f64) -> bool,
    ) -> Figure {
        self.target = value.map(|v| Target {
            text: text.into(),
            value: v,
            limit,
            met: met(v, limit),
        });
        self
    }
}

/// One benchmark (P1..P5): its figures and what the reader must know about the method.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Section {
    pub id: String,
    pub title: String,
    pub figures: Vec<Figure>,
    pub notes: Vec<String>,
    /// Markdown tables shown after the figures (e.g. how figures grow with scale).
    #[serde(default)]
    pub tables: Vec<String>,
}

impl Section {
    pub fn new(id: &str, title: &str) -> Section {
        Section {
            id: id.into(),
            title: title.into(),
            figures: Vec::new(),
            notes: Vec::new(),
            tables: Vec::new(),
        }
    }

    /// Add `figure` compared with its same-run baseline `base` (target on the ratio of the
    /// medians), then the baseline.
    pub fn versus(&mut self, figure: Figure, base: Figure, limit: f64, text: &str) {
        self.figures
            .push(figure.against(&base).ratio_at_most(limit, text));
        self.figures.push(base);
    }

    /// Add a figure without baseline or target.
    pub fn plain(&mut self, id: &str, title: &str, unit: &str, samples: Vec<f64>) {
        self.figures.push(Figure::new(id, title, unit, samples));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_an_even_count_is_the_mean_of_the_middle_two() {
        let s = Stat::of(&[4.0, 1.0, 3.0, 2.0]).expect("samples");
        assert_eq!((s.min, s.median, s.max, s.n), (1.0, 2.5, 4.0, 4));
    }

    #[test]
    fn median_of_an_odd_count_is_the_middle_sample() {
        let s = Stat::of(&[9.0, 1.0, 5.0]).expect("samples");
        assert_eq!(s.median, 5.0);
    }

    #[test]
    fn no_samples_give_no_stat() {
        assert!(Stat::of(&[]).is_none());
    }

    #[test]
    fn the_ratio_compares_medians_with_the_baseline() {
        let base = Figure::new("b", "base", "ms", vec![10.0, 10.0, 30.0]);
        let f = Figure::new("f", "fig", "ms", vec![12.0, 13.0, 11.0])
            .against(&base)
            .ratio_at_most(1.3, "median ≤ 1.3× base");
        assert_eq!(f.ratio, Some(1.2));
        assert!(f.target.expect("target").met);
    }

    #[test]
    fn a_floor_is_met_only_when_the_lowest_sample_reaches_it() {
        let f = Figure::new("r", "rate", "/s", vec![1200.0, 900.0]).min_at_least(1000.0, "x");
        assert!(!f.target.expect("target").met);
        let f = Figure::new("r", "rate", "/s", vec![1200.0, 1000.0]).min_at_least(1000.0, "x");
        assert!(f.target.expect("target").met);
    }

    #[test]
    fn a_figure_versus_its_baseline_comes_first_with_the_ratio_checked() {
        let mut s = Section::new("S", "section");
        let base = Figure::new("b", "base", "ms", vec![10.0]);
        s.versus(Figure::new("f", "fig", "ms", vec![12.0]), base, 1.1, "x");
        let ids: Vec<&str> = s.figures.iter().map(|f| f.id.as_str()).collect();
        assert_eq!(ids, ["f", "b"]);
        assert_eq!(s.figures[0].baseline.as_deref(), Some("b"));
        assert!(!s.figures[0].target.as_ref().expect("target").met);
    }

    #[test]
    fn a_median_target_ignores_the_worst_sample_and_a_max_target_does_not() {
        let samples = vec![1.0, 1.0, 9.0];
        let f = Figure::new("m", "median", "ms", samples.clone()).median_at_most(2.0, "x");
        assert!(f.target.expect("target").met);
        let f = Figure::new("m", "max", "ms", samples).max_at_most(2.0, "x");
        assert!(!f.target.expect("target").met);
    }

    #[test]
    fn a_ratio_above_its_limit_is_not_met() {
        let base = Figure::new("b", "base", "ms", vec![10.0]);
        let f = Figure::new("f", "fig", "ms", vec![20.0])
            .against(&base)
            .ratio_at_most(1.5, "x");
        assert!(!f.target.expect("target").met);
    }
}
