//! Summary statistics of a set of runs: median and the 10th/90th percentiles.
//!
//! Percentiles use linear interpolation between closest ranks (the "R-7" definition, the
//! one numpy and spreadsheets use), so a summary of few runs is still well defined.

use serde::{Deserialize, Serialize};

/// Median, p10, p90 and count of a sample.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// 50th percentile.
    pub median: f64,
    /// 10th percentile.
    pub p10: f64,
    /// 90th percentile.
    pub p90: f64,
    /// Number of values summarised.
    pub n: usize,
}

/// The `q` quantile (0..=1) of already sorted values; `None` when empty.
pub fn quantile_sorted(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let frac = pos - lo as f64;
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * frac)
}

/// Summarises `values` (NaNs are dropped: they are not measurements); `None` when empty.
pub fn summarize(values: &[f64]) -> Option<Summary> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    sorted.sort_by(f64::total_cmp);
    Some(Summary {
        median: quantile_sorted(&sorted, 0.5)?,
        p10: quantile_sorted(&sorted, 0.1)?,
        p90: quantile_sorted(&sorted, 0.9)?,
        n: sorted.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_has_no_summary() {
        assert_eq!(summarize(&[]), None);
        assert_eq!(summarize(&[f64::NAN]), None);
    }

    #[test]
    fn odd_and_even_medians() {
        assert_eq!(summarize(&[3.0, 1.0, 2.0]).unwrap().median, 2.0);
        assert_eq!(summarize(&[4.0, 1.0, 3.0, 2.0]).unwrap().median, 2.5);
    }

    #[test]
    fn percentiles_interpolate() {
        let v: Vec<f64> = (1..=11).map(f64::from).collect();
        let s = summarize(&v).unwrap();
        assert_eq!((s.p10, s.median, s.p90, s.n), (2.0, 6.0, 10.0, 11));
        let s = summarize(&[10.0, 20.0]).unwrap();
        assert!((s.p10 - 11.0).abs() < 1e-9);
        assert!((s.p90 - 19.0).abs() < 1e-9);
        let one = summarize(&[7.0]).unwrap();
        assert_eq!((one.p10, one.median, one.p90, one.n), (7.0, 7.0, 7.0, 1));
    }
}
