//! Keyed token-bucket rate limits (GCRA, from the `governor` crate), answering how long the caller
//! must wait when a key is over its budget.

use std::{num::NonZeroU32, time::Duration};

use governor::{
    DefaultKeyedRateLimiter, Quota,
    clock::{Clock, DefaultClock},
};

use crate::{config::RateLimit, error::Error};

/// A limit per key (a client address, an account).
pub struct KeyedLimit {
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    clock: DefaultClock,
}

impl KeyedLimit {
    /// `None` disables the limit.
    pub fn new(limit: Option<RateLimit>) -> Self {
        let limiter = limit.map(|limit| {
            let period = Duration::from_secs_f64(1.0 / limit.per_second).max(Duration::from_nanos(1));
            let quota = Quota::with_period(period)
                .expect("period is positive")
                .allow_burst(NonZeroU32::new(limit.burst).unwrap_or(NonZeroU32::MIN));
            DefaultKeyedRateLimiter::keyed(quota)
        });
        KeyedLimit { limiter, clock: DefaultClock::default() }
    }

    /// Takes one action from `key`'s budget, or says how long until one is available.
    pub fn check(&self, key: &str) -> Result<(), Error> {
        let Some(limiter) = &self.limiter else { return Ok(()) };
        limiter.check_key(&key.to_owned()).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            Error::LimitExceeded { retry_after_ms: wait.as_millis().max(1) as u64 }
        })
    }

    /// Forgets keys whose budget has fully refilled, so memory follows recent activity.
    pub fn forget_idle_keys(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refuses_with_retry_hint() {
        let limit = KeyedLimit::new(Some(RateLimit { per_second: 0.5, burst: 2 }));
        assert!(limit.check("a").is_ok());
        assert!(limit.check("a").is_ok());
        match limit.check("a") {
            Err(Error::LimitExceeded { retry_after_ms }) => assert!(retry_after_ms > 0 && retry_after_ms <= 2000),
            other => panic!("expected LimitExceeded, got {other:?}"),
        }
        // Keys are independent.
        assert!(limit.check("b").is_ok());
    }

    #[test]
    fn disabled_limit_allows_everything() {
        let limit = KeyedLimit::new(None);
        for _ in 0..1000 {
            assert!(limit.check("a").is_ok());
        }
    }
}
