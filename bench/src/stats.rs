//! Small statistics over repeated timings.

use std::time::Duration;

/// Min and median of a set of samples.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Summary {
    pub(crate) min: Duration,
    pub(crate) median: Duration,
}

/// Min and median; `None` for no samples.
pub(crate) fn summarize(samples: &[Duration]) -> Option<Summary> {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let n = sorted.len();
    let median = match n {
        0 => return None,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2,
    };
    Some(Summary {
        min: sorted[0],
        median,
    })
}

/// `a / b` as a ratio.
pub(crate) fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(f64::MIN_POSITIVE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_and_median() {
        let ms = |v: &[u64]| {
            v.iter()
                .map(|&m| Duration::from_millis(m))
                .collect::<Vec<_>>()
        };
        let s = summarize(&ms(&[5, 1, 3])).expect("samples");
        assert_eq!(
            (s.min, s.median),
            (Duration::from_millis(1), Duration::from_millis(3))
        );
        assert_eq!(
            summarize(&ms(&[4, 2])).expect("samples").median,
            Duration::from_millis(3)
        );
        assert!(summarize(&[]).is_none());
        assert!((ratio(Duration::from_millis(1), Duration::from_millis(4)) - 0.25).abs() < 1e-12);
    }
}
