//! Latency summaries and the compact log-scale histogram written to the JSON output.

use serde::Serialize;

/// Percentiles of a set of latencies, in milliseconds.
#[derive(Serialize, Debug, Default, Clone)]
pub struct Summary {
    pub count: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// Nearest-rank percentile of sorted samples.
fn rank(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

fn ms(us: u64) -> f64 {
    round3(us as f64 / 1000.0)
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Summarises latencies given in microseconds; sorts them in place.
pub fn summarize(samples_us: &mut [u64]) -> Summary {
    samples_us.sort_unstable();
    if samples_us.is_empty() {
        return Summary::default();
    }
    let total: u128 = samples_us.iter().map(|&x| x as u128).sum();
    Summary {
        count: samples_us.len(),
        mean: round3(total as f64 / samples_us.len() as f64 / 1000.0),
        p50: ms(rank(samples_us, 0.50)),
        p90: ms(rank(samples_us, 0.90)),
        p99: ms(rank(samples_us, 0.99)),
        p999: ms(rank(samples_us, 0.999)),
        max: ms(*samples_us.last().unwrap_or(&0)),
    }
}

/// Buckets per factor of ten: each bucket spans a factor of 10^(1/20) ≈ 1.122 (12 %).
pub const BUCKETS_PER_DECADE: f64 = 20.0;
/// The upper bound of the first bucket, in milliseconds; anything faster is counted there.
const FIRST_BUCKET_MS: f64 = 0.01;

/// Upper bound (ms) of the log-scale bucket holding `us` microseconds.
fn bucket_upper_ms(us: u64) -> (i64, f64) {
    let x = (us as f64 / 1000.0).max(FIRST_BUCKET_MS);
    let idx = ((x / FIRST_BUCKET_MS).log10() * BUCKETS_PER_DECADE - 1e-9).ceil().max(0.0) as i64;
    let upper = FIRST_BUCKET_MS * 10f64.powf(idx as f64 / BUCKETS_PER_DECADE);
    (idx, upper)
}

/// `[[bucket_upper_bound_ms, count], ...]` over the non-empty buckets, ascending; `samples_us` must be sorted.
/// The cumulative sum of the counts divided by the total is the CDF at each upper bound.
pub fn histogram(sorted_us: &[u64]) -> Vec<(f64, u64)> {
    let mut out: Vec<(i64, f64, u64)> = Vec::new();
    for &us in sorted_us {
        let (idx, upper) = bucket_upper_ms(us);
        match out.last_mut() {
            Some((last, _, count)) if *last == idx => *count += 1,
            _ => out.push((idx, upper, 1)),
        }
    }
    out.into_iter().map(|(_, upper, count)| (sig4(upper), count)).collect()
}

/// Rounds to four significant digits (bucket bounds need no more).
fn sig4(x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    let mag = 10f64.powi(3 - x.log10().floor() as i32);
    (x * mag).round() / mag
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        let s = summarize(&mut v);
        assert_eq!((s.count, s.p50, s.p90, s.p99, s.max), (100, 50.0, 90.0, 99.0, 100.0));
        assert_eq!(summarize(&mut []).count, 0);
    }

    #[test]
    fn histogram_counts_everything_in_ascending_buckets() {
        let mut v = vec![0, 5, 10, 999, 1000, 1001, 1500, 250_000, 250_000];
        v.sort_unstable();
        let h = histogram(&v);
        assert_eq!(h.iter().map(|b| b.1).sum::<u64>(), v.len() as u64);
        assert!(h.windows(2).all(|w| w[0].0 < w[1].0));
        // 1 ms exactly is the upper bound of its bucket; 1.001 ms goes to the next one.
        assert!(h.contains(&(1.0, 2)));
        assert_eq!(h[0], (0.01, 3));
        for &us in &v {
            let (_, upper) = bucket_upper_ms(us);
            assert!(us as f64 / 1000.0 <= upper + 1e-9);
            assert!(us as f64 / 1000.0 > upper / 1.1221 - 1e-9 || us <= 10);
        }
    }
}
