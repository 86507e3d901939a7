//! Push rules: each user's [`Ruleset`], stored as the global account data `m.push_rules` (the
//! form clients also receive in `/sync`), edited with ruma's rule-set operations.
//!
//! A user who never changed a rule has none stored and gets the spec's server-default rules.
//! A stored set is brought up to the current server defaults whenever it is read, so rules a
//! newer spec version adds reach every user.

use std::{num::NonZeroUsize, sync::Arc};

use lru::LruCache;
use parking_lot::Mutex;
use ruma::{OwnedUserId, UserId, push::Ruleset};
use serde_json::{Value, json};

use crate::{
    error::{Error, Result},
    service::stream::Streams,
    storage::{Db, stream::StreamWrite},
};

/// The account data type push rules live under.
pub const PUSH_RULES: &str = "m.push_rules";

pub struct PushRules {
    db: Db,
    streams: Arc<Streams>,
    cache: Mutex<LruCache<OwnedUserId, Arc<Ruleset>>>,
    /// Rule changes are read-modify-write of one account data entry: one at a time, so two
    /// concurrent changes never lose one another.
    writing: tokio::sync::Mutex<()>,
}

impl PushRules {
    pub fn new(db: Db, streams: Arc<Streams>) -> PushRules {
        PushRules {
            db,
            streams,
            cache: Mutex::new(LruCache::new(NonZeroUsize::new(100_000).unwrap())),
            writing: tokio::sync::Mutex::new(()),
        }
    }

    /// `user`'s rules. The same `Arc` comes back until they change, so callers can cache work
    /// done with a rule set and compare pointers to see whether it still holds.
    pub async fn ruleset(&self, user: &UserId) -> Result<Arc<Ruleset>> {
        if let Some(rules) = self.cache.lock().get(user) {
            return Ok(rules.clone());
        }
        let stored = self.db.account_data(user, None, PUSH_RULES).await?;
        let rules = Arc::new(Self::parse(user, stored.as_deref()));
        let mut cache = self.cache.lock();
        // A change that landed meanwhile put its own set in the cache: keep that one.
        Ok(cache.get_or_insert(user.to_owned(), || rules).clone())
    }

    fn parse(user: &UserId, stored: Option<&str>) -> Ruleset {
        let server_default = Ruleset::server_default(user);
        let Some(json) = stored else { return server_default };
        let parsed = serde_json::from_str::<Value>(json)
            .ok()
            .and_then(|content| serde_json::from_value::<Ruleset>(content.get("global")?.clone()).ok());
        match parsed {
            Some(mut rules) => {
                rules.update_with_server_default(server_default);
                rules
            }
            None => {
                tracing::warn!(%user, "stored push rules do not parse: using the server defaults");
                server_default
            }
        }
    }

    /// Applies `change` to `user`'s rules and stores the result (clients see it as account
    /// data in `/sync`). Nothing is stored when `change` fails.
    pub async fn change<T>(&self, user: &UserId, change: impl FnOnce(&mut Ruleset) -> Result<T>) -> Result<T> {
        let _writing = self.writing.lock().await;
        let mut rules = (*self.ruleset(user).await?).clone();
        let result = change(&mut rules)?;
        let content = json!({ "global": rules });
        self.streams
            .persist(vec![StreamWrite::AccountData {
                user_id: user.to_owned(),
                room_id: None,
                data_type: PUSH_RULES.to_owned(),
                content: content.to_string(),
            }])
            .await?;
        self.cache.lock().put(user.to_owned(), Arc::new(rules));
        Ok(result)
    }

    /// The account data event an initial sync carries when the user never changed a rule.
    pub fn default_event(user: &UserId) -> Value {
        json!({ "type": PUSH_RULES, "content": { "global": Ruleset::server_default(user) } })
    }
}

/// The rule-set errors as Matrix errors.
pub fn insert_error(err: ruma::push::InsertPushRuleError) -> Error {
    use ruma::push::InsertPushRuleError as E;
    match err {
        E::UnknownRuleId => Error::not_found("The `before` or `after` rule does not exist"),
        E::ServerDefaultRuleId => Error::InvalidParam("Rule IDs starting with `.` are reserved".to_owned()),
        E::InvalidRuleId => Error::InvalidParam("Rule IDs cannot contain `/` or `\\`".to_owned()),
        E::RelativeToServerDefaultRule => {
            Error::InvalidParam("Rules cannot be placed relative to a server-default rule".to_owned())
        }
        E::BeforeHigherThanAfter => Error::InvalidParam("`before` is higher than `after`".to_owned()),
        other => Error::InvalidParam(other.to_string()),
    }
}
