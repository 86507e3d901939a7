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
    service::{
        push::rules::PushRules,
        receipts,
        rooms::{Rooms, StoredEvent},
        stream::ReadMarks,
    },
};

/// At most this many unread events are evaluated for a room (older ones count as read).
const MAX_EVALUATED: i64 = 1000;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnreadCounts {
    pub notifications: u64,
    pub highlights: u64,
}

impl UnreadCounts {
    fn add(&mut self, highlight: bool) {
        self.notifications += 1;
        self.highlights += u64::from(highlight);
    }

    fn remove(&mut self, highlight: bool) {
        self.notifications = self.notifications.saturating_sub(1);
        self.highlights = self.highlights.saturating_sub(u64::from(highlight));
    }
}

/// A room's unread counts: its main timeline and each thread (by root), each counted after
/// the user's receipt for it (or their unthreaded receipt, whichever is further).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoomUnread {
    pub main: UnreadCounts,
    pub threads: BTreeMap<String, UnreadCounts>,
}

impl RoomUnread {
    /// Main timeline and threads together (what a client that does not ask for thread counts
    /// gets, and what a push badge adds up).
    pub fn total(&self) -> UnreadCounts {
        let mut total = self.main;
        for counts in self.threads.values() {
            total.notifications += counts.notifications;
            total.highlights += counts.highlights;
        }
        total
    }

    fn counts_mut(&mut self, thread: &str) -> &mut UnreadCounts {
        match thread {
            "main" => &mut self.main,
            root => self.threads.entry(root.to_owned()).or_default(),
        }
    }
}

#[derive(Clone)]
struct Cached {
    marks: ReadMarks,
    joined_at: i64,
    evaluated_upto: i64,
    unread: RoomUnread,
    /// The ignore list the counts were made with: a change recounts from the read receipt.
    ignored: Arc<HashSet<OwnedUserId>>,
    /// The push rules they were made with: a change recounts too.
    rules: Arc<Ruleset>,
}

/// An event the rules said notifies: its position, thread and whether it highlights.
struct Notified {
    pos: i64,
    thread: String,
    highlight: bool,
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

    /// Counts for `user` in `room_id` over events up to `upto`, per thread. Events from users
    /// `user` ignores never count: the client shows them nowhere.
    pub async fn unread(&self, user: &UserId, room_id: &RoomId, upto: i64) -> Result<RoomUnread> {
        // Nothing before the user's join counts (their invite included), as in Synapse.
        let joined_at = match self.rooms.streams.membership_pos(user, room_id) {
            Some((membership, pos)) if membership == "join" => pos,
            _ => 0,
        };
        let marks = self.rooms.streams.read_marks(user, room_id);
        let bound = |thread: &str| marks.bound(thread).max(joined_at);
        let ignored = self.rooms.ignored_users(user).await?;
        let ruleset = self.rules.ruleset(user).await?;
        let key = (user.to_owned(), room_id.to_owned());
        let cached = self.cache.lock().get(&key).cloned();
        let usable = cached.filter(|c| {
            c.joined_at == joined_at
                && c.marks.unthreaded == marks.unthreaded
                && c.marks.main <= marks.main
                && c.marks.threads.iter().all(|(root, pos)| marks.threads.get(root).is_some_and(|p| p >= pos))
                && c.evaluated_upto <= upto
                && (Arc::ptr_eq(&c.ignored, &ignored) || c.ignored == ignored)
                && Arc::ptr_eq(&c.rules, &ruleset)
        });
        let floor = marks.unthreaded.max(joined_at);
        let (mut unread, from) = match usable {
            Some(c) if c.marks == marks => (c.unread, c.evaluated_upto),
            Some(c) => {
                // Receipts moved within threads (or the main timeline): take back what is now
                // read, evaluating only the newly read range.
                let old = |thread: &str| c.marks.bound(thread).max(joined_at);
                let mut moved: Vec<(&str, i64, i64)> = Vec::new();
                if c.marks.main != marks.main {
                    moved.push(("main", old("main"), bound("main")));
                }
                for root in marks.threads.keys() {
                    if c.marks.threads.get(root) != marks.threads.get(root) {
                        moved.push((root, old(root), bound(root)));
                    }
                }
                let low = moved.iter().map(|m| m.1).min().unwrap_or(c.evaluated_upto);
                let high = moved.iter().map(|m| m.2).max().unwrap_or(low).min(c.evaluated_upto);
                match self.notified(user, room_id, low, high, &ignored, &ruleset).await? {
                    (read, true) => {
                        let mut unread = c.unread;
                        for event in read {
                            if moved
                                .iter()
                                .any(|(t, from, to)| *t == event.thread && event.pos > *from && event.pos <= *to)
                            {
                                unread.counts_mut(&event.thread).remove(event.highlight);
                            }
                        }
                        unread.threads.retain(|_, counts| counts.notifications > 0);
                        (unread, c.evaluated_upto)
                    }
                    // Too much newly read to take back one by one: count afresh.
                    (_, false) => (RoomUnread::default(), floor),
                }
            }
            None => (RoomUnread::default(), floor),
        };
        if from < upto {
            // Of a backlog past the evaluation limit only the newest events count.
            let (notified, _) = self.notified(user, room_id, from, upto, &ignored, &ruleset).await?;
            for event in notified {
                if event.pos > bound(&event.thread) {
                    unread.counts_mut(&event.thread).add(event.highlight);
                }
            }
        }
        let cached = Cached {
            marks,
            joined_at,
            evaluated_upto: upto.max(from),
            unread: unread.clone(),
            ignored,
            rules: ruleset,
        };
        self.cache.lock().put(key, cached);
        Ok(unread)
    }

    /// The events in `(after, upto]` that notify `user` — of a backlog longer than the
    /// evaluation limit only the newest — and whether that was all of them.
    async fn notified(
        &self,
        user: &UserId,
        room_id: &RoomId,
        after: i64,
        upto: i64,
        ignored: &HashSet<OwnedUserId>,
        ruleset: &Ruleset,
    ) -> Result<(Vec<Notified>, bool)> {
        if after >= upto {
            return Ok((Vec::new(), true));
        }
        let (events, complete) = match self.rooms.streams.recent_events(room_id, after, upto) {
            Some(recent) => (recent, true),
            None => {
                let mut rows =
                    self.rooms.db.room_events_for_push(room_id, user, after, upto, MAX_EVALUATED + 1).await?;
                // Newest first: what falls off is the oldest.
                let complete = rows.len() as i64 <= MAX_EVALUATED;
                rows.truncate(MAX_EVALUATED as usize);
                (self.rooms.events_from_rows(rows)?, complete)
            }
        };
        Ok((self.evaluate(user, room_id, &events, ignored, ruleset).await?, complete))
    }

    /// Runs the push rules over `events` for `user`.
    async fn evaluate(
        &self,
        user: &UserId,
        room_id: &RoomId,
        events: &[Arc<StoredEvent>],
        ignored: &HashSet<OwnedUserId>,
        ruleset: &Ruleset,
    ) -> Result<Vec<Notified>> {
        let counted: Vec<&Arc<StoredEvent>> = events
            .iter()
            .filter(|e| {
                e.pdu.sender != user
                    && !e.soft_failed
                    && e.redacted_by.is_none()
                    && !ignored.contains(&e.pdu.sender)
                    && !(e.pdu.event_type == ruma::events::TimelineEventType::RoomMember
                        && e.pdu.state_key.as_deref() != Some(user.as_str()))
            })
            .collect();
        if counted.is_empty() {
            return Ok(Vec::new());
        }
        let context = self.context(user, room_id).await?;
        let mut notified = Vec::new();
        for event in counted {
            let json = client_event::to_client(&event.pdu, Format::WithoutRoomId, &Unsigned::default());
            let raw: Raw<Value> = Raw::from_json(json);
            let actions = ruleset.get_actions(&raw, &context).await;
            if actions.iter().any(|a| a.should_notify()) {
                notified.push(Notified {
                    pos: event.stream_pos,
                    thread: receipts::thread_of(&event.pdu),
                    highlight: actions.iter().any(|a| a.is_highlight()),
                });
            }
        }
        Ok(notified)
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
