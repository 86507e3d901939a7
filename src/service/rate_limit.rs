//! Keyed token-bucket rate limits (GCRA, from the `governor` crate), answering how long the caller
//! must wait when a key is over its budget; [`UserLimits`], one such limit per kind of action a
//! user takes (Synapse's `rc_message`, `rc_joins`, …); and [`FailureLimit`], which locks a key out
//! once its failures have spent the budget.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    time::{Duration, Instant},
};

use governor::{
    DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
    middleware::StateInformationMiddleware,
    state::keyed::DefaultKeyedStateStore,
};
use parking_lot::Mutex;

use ruma::UserId;

use crate::{
    config::{RateLimit, RateLimitsConfig},
    error::Error,
};

/// A limit per key (a client address, an account).
pub struct KeyedLimit {
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    clock: DefaultClock,
}

impl KeyedLimit {
    /// `None` disables the limit.
    pub fn new(limit: Option<RateLimit>) -> Self {
        let limiter = limit.map(|limit| DefaultKeyedRateLimiter::keyed(quota(limit)));
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

/// What a user spends from one of their budgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserAction {
    /// An event sent into a room: a message, a state event, a redaction.
    Message,
    /// A room created or upgraded.
    RoomCreation,
    /// A join or a knock.
    Join,
    Invite,
    /// A display name or avatar change (each writes a member event into every room of the user).
    Profile,
    /// An explicit presence update.
    Presence,
    Typing,
    /// A `sendToDevice` request.
    ToDevice,
    /// A media upload (or an `mxc://` URI created for one).
    MediaUpload,
}

/// The per-user budgets, one per [`UserAction`], keyed by user ID.
pub struct UserLimits {
    message: KeyedLimit,
    room_creation: KeyedLimit,
    join: KeyedLimit,
    invite: KeyedLimit,
    profile: KeyedLimit,
    presence: KeyedLimit,
    typing: KeyedLimit,
    to_device: KeyedLimit,
    media_upload: KeyedLimit,
}

impl UserLimits {
    /// All limits off when `config.enabled` is false.
    pub fn new(config: &RateLimitsConfig) -> Self {
        let limit = |limit: RateLimit| KeyedLimit::new(config.enabled.then_some(limit));
        UserLimits {
            message: limit(config.message),
            room_creation: limit(config.room_creation),
            join: limit(config.join),
            invite: limit(config.invite),
            profile: limit(config.profile),
            presence: limit(config.presence),
            typing: limit(config.typing),
            to_device: limit(config.to_device),
            media_upload: limit(config.media_upload),
        }
    }

    /// Takes one `action` from `user`'s budget, or answers `M_LIMIT_EXCEEDED` with how long to wait.
    pub fn check(&self, action: UserAction, user: &UserId) -> Result<(), Error> {
        self.limit(action).check(user.as_str())
    }

    fn limit(&self, action: UserAction) -> &KeyedLimit {
        match action {
            UserAction::Message => &self.message,
            UserAction::RoomCreation => &self.room_creation,
            UserAction::Join => &self.join,
            UserAction::Invite => &self.invite,
            UserAction::Profile => &self.profile,
            UserAction::Presence => &self.presence,
            UserAction::Typing => &self.typing,
            UserAction::ToDevice => &self.to_device,
            UserAction::MediaUpload => &self.media_upload,
        }
    }

    /// Forgets users whose budgets have refilled.
    pub fn forget_idle_keys(&self) {
        for limit in [
            &self.message,
            &self.room_creation,
            &self.join,
            &self.invite,
            &self.profile,
            &self.presence,
            &self.typing,
            &self.to_device,
            &self.media_upload,
        ] {
            limit.forget_idle_keys();
        }
    }
}

fn quota(limit: RateLimit) -> Quota {
    let period = Duration::from_secs_f64(1.0 / limit.per_second).max(Duration::from_nanos(1));
    Quota::with_period(period)
        .expect("period is positive")
        .allow_burst(NonZeroU32::new(limit.burst).unwrap_or(NonZeroU32::MIN))
}

type SnapshotLimiter = RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock, StateInformationMiddleware>;

/// A limit on failures (wrong passwords) per key, checked *before* the attempt: once the failures
/// have spent a key's budget, every attempt is refused until the budget refills, whether or not it
/// would have succeeded. Otherwise a lockout would only hide the answer of wrong guesses, and a
/// right one would still get in.
pub struct FailureLimit {
    limiter: Option<SnapshotLimiter>,
    locked_until: Mutex<HashMap<String, Instant>>,
    clock: DefaultClock,
}

impl FailureLimit {
    /// `None` disables the limit.
    pub fn new(limit: Option<RateLimit>) -> Self {
        let limiter =
            limit.map(|limit| RateLimiter::keyed(quota(limit)).with_middleware::<StateInformationMiddleware>());
        FailureLimit { limiter, locked_until: Mutex::new(HashMap::new()), clock: DefaultClock::default() }
    }

    /// Refuses an attempt for a locked-out key, saying how long the lockout lasts.
    pub fn check(&self, key: &str) -> Result<(), Error> {
        let mut locked = self.locked_until.lock();
        let Some(&until) = locked.get(key) else { return Ok(()) };
        let now = Instant::now();
        if until <= now {
            locked.remove(key);
            return Ok(());
        }
        Err(Error::LimitExceeded { retry_after_ms: (until - now).as_millis().max(1) as u64 })
    }

    /// Counts a failed attempt; the key is locked out once no failure is left in its budget.
    pub fn record_failure(&self, key: &str) {
        let Some(limiter) = &self.limiter else { return };
        let wait = match limiter.check_key(&key.to_owned()) {
            Ok(snapshot) if snapshot.remaining_burst_capacity() == 0 => snapshot.quota().replenish_interval(),
            Ok(_) => return,
            Err(not_until) => not_until.wait_time_from(self.clock.now()),
        };
        self.locked_until.lock().insert(key.to_owned(), Instant::now() + wait);
    }

    /// Forgets refilled budgets and ended lockouts.
    pub fn forget_idle_keys(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        let now = Instant::now();
        self.locked_until.lock().retain(|_, until| *until > now);
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
    fn user_limits_are_per_action_and_per_user() {
        let config = RateLimitsConfig {
            message: RateLimit { per_second: 0.01, burst: 2 },
            typing: RateLimit { per_second: 0.01, burst: 1 },
            ..RateLimitsConfig::default()
        };
        let limits = UserLimits::new(&config);
        let (alice, bob) = (ruma::user_id!("@alice:x"), ruma::user_id!("@bob:x"));
        assert!(limits.check(UserAction::Message, alice).is_ok());
        assert!(limits.check(UserAction::Message, alice).is_ok());
        assert!(matches!(limits.check(UserAction::Message, alice), Err(Error::LimitExceeded { .. })));
        // Another action's budget and another user's are untouched.
        assert!(limits.check(UserAction::Typing, alice).is_ok());
        assert!(limits.check(UserAction::Message, bob).is_ok());
        let off = UserLimits::new(&RateLimitsConfig { enabled: false, ..config });
        for _ in 0..100 {
            assert!(off.check(UserAction::Message, alice).is_ok());
        }
    }

    #[test]
    fn disabled_limit_allows_everything() {
        let limit = KeyedLimit::new(None);
        for _ in 0..1000 {
            assert!(limit.check("a").is_ok());
        }
    }

    #[test]
    fn failures_lock_the_key_out_before_the_next_attempt() {
        let limit = FailureLimit::new(Some(RateLimit { per_second: 0.5, burst: 2 }));
        assert!(limit.check("a").is_ok());
        limit.record_failure("a");
        assert!(limit.check("a").is_ok(), "one failure is left in the budget");
        limit.record_failure("a");
        match limit.check("a") {
            Err(Error::LimitExceeded { retry_after_ms }) => assert!(retry_after_ms > 0 && retry_after_ms <= 2000),
            other => panic!("expected LimitExceeded, got {other:?}"),
        }
        assert!(limit.check("b").is_ok());
        let disabled = FailureLimit::new(None);
        for _ in 0..100 {
            disabled.record_failure("a");
        }
        assert!(disabled.check("a").is_ok());
    }
}
