//! Unread notification counts: the events after a user's read receipt that the push rules say
//! notify (and highlight), evaluated with ruma's push-rule engine and the user's own rules.
//!
//! Counting happens when a user syncs, not when an event is sent, so a message into a huge room
//! costs nothing per member until that member looks. Results are cached per (user, room) and
//! extended incrementally.

use std::{
    collections::{BTreeMap, HashSet},
    num::NonZeroUsize,
    sync::Arc,
};

use lru::LruCache;
use parking_lot::Mutex;
use ruma::{
    Int, OwnedRoomId, OwnedUserId, RoomId, UInt, UserId,
    power_levels::NotificationPowerLevels,
    push::{PushConditionPowerLevelsCtx, PushConditionRoomCtx, Ruleset},
    room_version_rules::RoomPowerLevelsRules,
    serde::Raw,
};
use serde_json::Value;

use crate::{
    error::Result,
    matrix::client_event::{self, Format, Unsigned},
    service::{push::rules::PushRules, rooms::Rooms},
};

/// At most this many unread events are evaluated for a room (older ones count as read).
const MAX_EVALUATED: i64 = 1000;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnreadCounts {
    pub notifications: u64,
    pub highlights: u64,
}

#[derive(Clone)]
struct Cached {
    read_pos: i64,
    evaluated_upto: i64,
    counts: UnreadCounts,
    /// The ignore list the counts were made with: a change recounts from the read receipt.
    ignored: Arc<HashSet<OwnedUserId>>,
    /// The push rules they were made with: a change recounts too.
    rules: Arc<Ruleset>,
}

pub struct Notifications {
    rooms: Arc<Rooms>,
    rules: Arc<PushRules>,
    cache: Mutex<LruCache<(OwnedUserId, OwnedRoomId), Cached>>,
}

impl Notifications {
    pub fn new(rooms: Arc<Rooms>, rules: Arc<PushRules>) -> Notifications {
        Notifications { rooms, rules, cache: Mutex::new(LruCache::new(NonZeroUsize::new(200_000).unwrap())) }
    }

    /// Counts for `user` in `room_id` over events up to `upto`. Events from users `user`
    /// ignores never count: the client shows them nowhere.
    pub async fn unread(&self, user: &UserId, room_id: &RoomId, upto: i64) -> Result<UnreadCounts> {
        // Nothing before the user's join counts (their invite included), as in Synapse.
        let joined_at = match self.rooms.streams.membership_pos(user, room_id) {
            Some((membership, pos)) if membership == "join" => pos,
            _ => 0,
        };
        let read_pos = self.rooms.streams.read_pos(user, room_id).max(joined_at);
        let ignored = self.rooms.ignored_users(user).await?;
        let ruleset = self.rules.ruleset(user).await?;
        let key = (user.to_owned(), room_id.to_owned());
        let cached = self.cache.lock().get(&key).cloned();
        let (mut counts, from) = match cached {
            Some(c)
                if c.read_pos == read_pos
                    && c.evaluated_upto <= upto
                    && (Arc::ptr_eq(&c.ignored, &ignored) || c.ignored == ignored)
                    && Arc::ptr_eq(&c.rules, &ruleset) =>
            {
                (c.counts, c.evaluated_upto)
            }
            _ => (UnreadCounts::default(), read_pos),
        };
        if from < upto {
            let after = from.max(read_pos);
            // Recent events come from memory; older backlogs from the database.
            let events = match self.rooms.streams.recent_events(room_id, after, upto) {
                Some(recent) => recent
                    .into_iter()
                    .filter(|e| {
                        e.pdu.sender != user
                            && !(e.pdu.event_type == ruma::events::TimelineEventType::RoomMember
                                && e.pdu.state_key.as_deref() != Some(user.as_str()))
                    })
                    .collect(),
                None => {
                    let rows = self.rooms.db.room_events_for_push(room_id, user, after, upto, MAX_EVALUATED).await?;
                    self.rooms.events_from_rows(rows)?
                }
            };
            if !events.is_empty() {
                let context = self.context(user, room_id).await?;
                let counted = events
                    .iter()
                    .filter(|e| e.pdu.sender != user && e.redacted_by.is_none() && !ignored.contains(&e.pdu.sender));
                for event in counted {
                    let json = client_event::to_client(&event.pdu, Format::WithoutRoomId, &Unsigned::default());
                    let raw: Raw<Value> = Raw::from_json(json);
                    let actions = ruleset.get_actions(&raw, &context).await;
                    if actions.iter().any(|a| a.should_notify()) {
                        counts.notifications += 1;
                        if actions.iter().any(|a| a.is_highlight()) {
                            counts.highlights += 1;
                        }
                    }
                }
            }
        }
        self.cache.lock().put(key, Cached { read_pos, evaluated_upto: upto, counts, ignored, rules: ruleset });
        Ok(counts)
    }

    /// The push-rule context of `user` in `room_id` now.
    pub async fn context(&self, user: &UserId, room_id: &RoomId) -> Result<PushConditionRoomCtx> {
        let handle = self.rooms.handle(room_id).await?;
        let group = self.rooms.current_group(room_id).await?;
        let levels = self.rooms.power_levels_at(&handle, group).await?;
        let (joined, _) = self.rooms.streams.member_counts(room_id);
        let display_name = self
            .rooms
            .state_event_at(group, "m.room.member", user.as_str())
            .await?
            .and_then(|e| e.pdu.content_value().get("displayname").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| user.localpart().to_owned());
        let content = levels.content();
        let users: BTreeMap<OwnedUserId, Int> = content
            .get("users")
            .and_then(Value::as_object)
            .map(|users| {
                users.iter().filter_map(|(u, l)| Some((UserId::parse(u).ok()?, Int::new(l.as_i64()?)?))).collect()
            })
            .unwrap_or_default();
        let users_default =
            Int::new(content.get("users_default").and_then(Value::as_i64).unwrap_or(0)).unwrap_or_default();
        let mut notifications = NotificationPowerLevels::new();
        notifications.room = Int::new(levels.notifications_room()).unwrap_or_default();
        let rules = RoomPowerLevelsRules::new(&handle.rules.authorization, levels.creators().iter().cloned());
        let mut ctx = PushConditionRoomCtx::new(
            room_id.to_owned(),
            UInt::new(joined).unwrap_or_default(),
            user.to_owned(),
            display_name,
        );
        ctx.power_levels = Some(PushConditionPowerLevelsCtx::new(users, users_default, notifications, rules));
        Ok(ctx)
    }
}
