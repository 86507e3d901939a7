//! Typing notifications and presence: in-memory state with positions on the ephemeral counter of
//! [`Streams`], so sync can ask "what changed since serial E".
//!
//! Typing expires after the client's timeout. Presence follows the user: online while a client
//! syncs (or holds a socket), unavailable after an idle period without activity, offline once no
//! client has synced for a while.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Once, OnceLock, Weak},
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::{
    error::{Error, Result},
    service::{edus::Edus, now_ms, stream::Streams},
};

/// How long a remote user's typing lasts without being renewed: the `m.typing` EDU carries no
/// timeout, and servers resend it while the user keeps typing.
const REMOTE_TYPING_MS: u64 = 30_000;

/// Longest typing timeout honoured.
const MAX_TYPING_MS: u64 = 120_000;
/// A user counts as "currently active" this long after their last action.
const CURRENTLY_ACTIVE_MS: i64 = 60_000;

#[derive(Default)]
struct RoomTyping {
    serial: i64,
    users: HashMap<OwnedUserId, Instant>,
}

#[derive(Default)]
struct TypingState {
    rooms: HashMap<OwnedRoomId, RoomTyping>,
    /// Every typing user's expiry, earliest first: the one sweeper task sleeps until the first
    /// entry. A task per PUT would let a client pile up thousands of sleeping tasks cheaply.
    deadlines: BTreeSet<(Instant, OwnedRoomId, OwnedUserId)>,
}

pub struct Typing {
    streams: Arc<Streams>,
    state: Mutex<TypingState>,
    /// Wakes the sweeper when a deadline earlier than the one it sleeps on is inserted.
    earlier: Arc<Notify>,
    sweeper: Once,
    /// Tells other servers about local users' typing (federation).
    edus: OnceLock<Arc<Edus>>,
}

impl Typing {
    pub fn new(streams: Arc<Streams>) -> Arc<Typing> {
        Arc::new(Typing {
            streams,
            state: Mutex::new(TypingState::default()),
            earlier: Arc::new(Notify::new()),
            sweeper: Once::new(),
            edus: OnceLock::new(),
        })
    }

    /// Local typing changes are also sent to the room's other servers through `edus`.
    pub fn set_edus(&self, edus: Arc<Edus>) {
        let _ = self.edus.set(edus);
    }

    /// An `m.typing` EDU from the user's server (the caller checked that the user belongs to it
    /// and is joined): shown like a local user's typing, for [`REMOTE_TYPING_MS`] unless renewed.
    pub fn set_remote(self: &Arc<Self>, user: &UserId, room_id: &RoomId, typing: bool) {
        self.apply(user, room_id, typing, REMOTE_TYPING_MS);
    }

    /// `PUT /rooms/{roomId}/typing/{userId}`.
    pub fn set(self: &Arc<Self>, user: &UserId, room_id: &RoomId, typing: bool, timeout_ms: Option<u64>) -> Result<()> {
        if self.streams.membership(user, room_id).as_deref() != Some("join") {
            return Err(Error::forbidden("You are not in this room"));
        }
        self.apply(user, room_id, typing, timeout_ms.unwrap_or(30_000).min(MAX_TYPING_MS));
        Ok(())
    }

    /// Records `user`'s typing state in the room, expiring after `timeout_ms`.
    fn apply(self: &Arc<Self>, user: &UserId, room_id: &RoomId, typing: bool, timeout_ms: u64) {
        // Started on first use, from inside the runtime (the service is built before it runs).
        self.sweeper.call_once(|| {
            tokio::spawn(Self::sweep(Arc::downgrade(self)));
        });
        let expiry = Instant::now() + Duration::from_millis(timeout_ms);
        let (changed, wake_sweeper) = {
            let mut guard = self.state.lock();
            let state = &mut *guard;
            let room = state.rooms.entry(room_id.to_owned()).or_default();
            let previous = if typing { room.users.insert(user.to_owned(), expiry) } else { room.users.remove(user) };
            let changed = previous.is_none() == typing;
            // Another server is told of each start, renewal and stop of a local user's typing
            // (it expires remote typing on its own clock, so renewals matter).
            if changed {
                room.serial = self.streams.next_ephemeral();
            }
            if let Some(edus) = self.edus.get()
                && (changed || typing)
            {
                let serial = if changed { room.serial } else { self.streams.next_ephemeral() };
                edus.typing(room_id, user, typing, serial);
            }
            if let Some(at) = previous {
                state.deadlines.remove(&(at, room_id.to_owned(), user.to_owned()));
            }
            let mut wake_sweeper = false;
            if typing {
                wake_sweeper = state.deadlines.first().is_none_or(|(first, _, _)| expiry < *first);
                state.deadlines.insert((expiry, room_id.to_owned(), user.to_owned()));
            }
            (changed, wake_sweeper)
        };
        if wake_sweeper {
            self.earlier.notify_one();
        }
        if changed {
            self.wake_room(room_id);
        }
    }

    /// The sweeper: sleeps until the earliest deadline (or until an earlier one is inserted),
    /// then expires everything due. Ends when the service is dropped.
    async fn sweep(this: Weak<Typing>) {
        loop {
            let next = {
                let Some(typing) = this.upgrade() else { return };
                let expired = typing.expire_due(Instant::now());
                for room_id in expired {
                    typing.wake_room(&room_id);
                }
                typing.state.lock().deadlines.first().map(|(at, _, _)| *at)
            };
            // Not holding a strong reference while asleep, so the service can go away. A
            // notification sent since the deadlines were read is kept as a permit, so none is lost.
            let Some(notify) = this.upgrade().map(|typing| typing.earlier.clone()) else { return };
            let earlier = notify.notified();
            match next {
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at.into()) => {}
                        _ = earlier => {}
                    }
                }
                None => earlier.await,
            }
        }
    }

    /// Removes every typing user whose deadline is at or before `now`; returns the rooms that
    /// changed (their typing position has been bumped).
    fn expire_due(&self, now: Instant) -> Vec<OwnedRoomId> {
        let mut guard = self.state.lock();
        let state = &mut *guard;
        let mut changed = Vec::new();
        while let Some((at, _, _)) = state.deadlines.first() {
            if *at > now {
                break;
            }
            let (at, room_id, user) = state.deadlines.pop_first().expect("first exists");
            let Some(room) = state.rooms.get_mut(&room_id) else { continue };
            if room.users.get(&user) == Some(&at) {
                room.users.remove(&user);
                room.serial = self.streams.next_ephemeral();
                if let Some(edus) = self.edus.get() {
                    edus.typing(&room_id, &user, false, room.serial);
                }
                if !changed.contains(&room_id) {
                    changed.push(room_id);
                }
            }
        }
        changed
    }

    fn wake_room(&self, room_id: &RoomId) {
        self.streams.wake_room(room_id);
    }

    /// Who is typing in a room, if that changed after `since` (always, when `since` is 0).
    pub fn typing_since(&self, room_id: &RoomId, since: i64) -> Option<Vec<OwnedUserId>> {
        let state = self.state.lock();
        let room = state.rooms.get(room_id)?;
        if room.serial <= since && since != 0 {
            return None;
        }
        if since == 0 && room.users.is_empty() {
            return None;
        }
        let mut users: Vec<_> = room.users.keys().cloned().collect();
        users.sort();
        Some(users)
    }
}

#[derive(Debug, Clone)]
struct PresenceEntry {
    state: String,
    status_msg: Option<String>,
    last_active_ts: i64,
    /// Clients currently syncing (or holding a socket) for this user.
    syncing: u32,
    last_sync_ts: i64,
    serial: i64,
    /// Set explicitly through the presence API (not by syncing).
    explicit: bool,
    /// A remote user's, as their server last told: not aged here (their server does that).
    is_remote: bool,
}

/// A user's presence as served to clients.
#[derive(Debug, Clone)]
pub struct PresenceView {
    pub user_id: OwnedUserId,
    pub presence: String,
    pub status_msg: Option<String>,
    pub last_active_ago: Option<i64>,
    pub currently_active: bool,
}

impl PresenceView {
    pub fn to_event(&self) -> Value {
        let mut content = json!({"presence": self.presence, "currently_active": self.currently_active});
        if let Some(ago) = self.last_active_ago {
            content["last_active_ago"] = json!(ago);
        }
        if let Some(msg) = &self.status_msg {
            content["status_msg"] = json!(msg);
        }
        json!({"type": "m.presence", "sender": self.user_id.as_str(), "content": content})
    }
}

pub struct Presence {
    streams: Arc<Streams>,
    users: Mutex<HashMap<OwnedUserId, PresenceEntry>>,
    enabled: bool,
    idle_after_ms: i64,
    offline_after_ms: i64,
    /// Tells other servers about local users' presence (federation).
    edus: OnceLock<Arc<Edus>>,
}

impl Presence {
    pub fn new(streams: Arc<Streams>, enabled: bool, idle_after: Duration, offline_after: Duration) -> Arc<Presence> {
        Arc::new(Presence {
            streams,
            users: Mutex::new(HashMap::new()),
            enabled,
            idle_after_ms: idle_after.as_millis() as i64,
            offline_after_ms: offline_after.as_millis() as i64,
            edus: OnceLock::new(),
        })
    }

    /// Local presence changes are also sent to the servers sharing a room with the user.
    pub fn set_edus(&self, edus: Arc<Edus>) {
        let _ = self.edus.set(edus);
    }

    /// A presence update from the user's server (the caller checked that the user belongs to it
    /// and shares a room with a local user).
    pub fn set_remote(
        &self,
        user: &UserId,
        state: &str,
        status_msg: Option<String>,
        last_active_ago: i64,
        currently_active: bool,
    ) {
        let now = now_ms();
        self.update(user, |entry| {
            let last_active_ts = now - last_active_ago.max(0);
            // Aged on arrival: `currently_active` is re-derived from `last_active_ts` when shown.
            let last_active_ts =
                if currently_active { last_active_ts.max(now - CURRENTLY_ACTIVE_MS + 1) } else { last_active_ts };
            let changed = entry.state != state || entry.status_msg != status_msg || !entry.is_remote;
            entry.state = state.to_owned();
            entry.status_msg = status_msg;
            entry.last_active_ts = last_active_ts;
            entry.is_remote = true;
            entry.explicit = true;
            changed
        });
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn changed(&self, user: &UserId) {
        if user.server_name() == self.streams.server_name() {
            self.streams.wake_contacts(user);
        } else {
            self.streams.wake_rooms_of_member(user);
        }
    }

    /// Hands a local user's new presence to federation.
    fn tell_other_servers(&self, user: &UserId, entry: &PresenceEntry, now: i64) {
        if let Some(edus) = self.edus.get()
            && !entry.is_remote
        {
            edus.presence(Self::view(user, entry, now), entry.serial);
        }
    }

    fn update(&self, user: &UserId, change: impl FnOnce(&mut PresenceEntry) -> bool) {
        if !self.enabled {
            return;
        }
        let changed = {
            let mut users = self.users.lock();
            let entry = users.entry(user.to_owned()).or_insert_with(|| PresenceEntry {
                state: "offline".to_owned(),
                status_msg: None,
                last_active_ts: 0,
                syncing: 0,
                last_sync_ts: 0,
                serial: 0,
                explicit: false,
                is_remote: false,
            });
            let changed = change(entry);
            if changed {
                entry.serial = self.streams.next_ephemeral();
                self.tell_other_servers(user, entry, now_ms());
            }
            changed
        };
        if changed {
            self.changed(user);
        }
    }

    /// `PUT /presence/{userId}/status`.
    pub fn set(&self, user: &UserId, state: &str, status_msg: Option<String>) {
        let now = now_ms();
        self.update(user, |entry| {
            let changed = entry.state != state || entry.status_msg != status_msg;
            entry.state = state.to_owned();
            entry.status_msg = status_msg;
            entry.explicit = state != "online";
            if state == "online" {
                entry.last_active_ts = now;
            }
            changed
        });
    }

    /// A client of `user` started a sync (or socket) with `set_presence`; returns a guard that
    /// records its end.
    pub fn sync_started(self: &Arc<Self>, user: &UserId, set_presence: &str) -> SyncGuard {
        let now = now_ms();
        self.update(user, |entry| {
            entry.syncing += 1;
            entry.last_sync_ts = now;
            match set_presence {
                "online" if entry.state == "offline" || (entry.state == "unavailable" && !entry.explicit) => {
                    entry.state = "online".to_owned();
                    entry.explicit = false;
                    entry.last_active_ts = entry.last_active_ts.max(now);
                    true
                }
                "unavailable" if entry.state != "unavailable" => {
                    entry.state = "unavailable".to_owned();
                    entry.explicit = true;
                    true
                }
                _ => false,
            }
        });
        SyncGuard { presence: self.clone(), user: user.to_owned() }
    }

    /// The user did something (sent an event, read a message): they are active.
    pub fn active(&self, user: &UserId) {
        let now = now_ms();
        self.update(user, |entry| {
            let was_recent = now - entry.last_active_ts < CURRENTLY_ACTIVE_MS;
            entry.last_active_ts = now;
            if entry.state != "online" && !entry.explicit {
                entry.state = "online".to_owned();
                return true;
            }
            !was_recent
        });
    }

    /// Moves idle users to unavailable and users no client syncs for to offline.
    pub fn sweep(&self) {
        let now = now_ms();
        let mut changed = Vec::new();
        {
            let mut users = self.users.lock();
            for (user, entry) in users.iter_mut() {
                let new_state = if entry.is_remote {
                    None
                } else if entry.syncing == 0
                    && entry.state != "offline"
                    && now - entry.last_sync_ts > self.offline_after_ms
                {
                    Some("offline")
                } else if entry.state == "online" && !entry.explicit && now - entry.last_active_ts > self.idle_after_ms
                {
                    Some("unavailable")
                } else {
                    None
                };
                if let Some(state) = new_state {
                    entry.state = state.to_owned();
                    entry.explicit = false;
                    entry.serial = self.streams.next_ephemeral();
                    self.tell_other_servers(user, entry, now);
                    changed.push(user.clone());
                }
            }
        }
        for user in changed {
            self.changed(&user);
        }
    }

    fn view(user: &UserId, entry: &PresenceEntry, now: i64) -> PresenceView {
        PresenceView {
            user_id: user.to_owned(),
            presence: entry.state.clone(),
            status_msg: entry.status_msg.clone(),
            last_active_ago: (entry.last_active_ts > 0).then(|| (now - entry.last_active_ts).max(0)),
            currently_active: entry.state == "online" && now - entry.last_active_ts < CURRENTLY_ACTIVE_MS,
        }
    }

    /// `GET /presence/{userId}/status`: the user themself or someone sharing a room.
    pub fn get(&self, viewer: &UserId, user: &UserId) -> Result<PresenceView> {
        if viewer != user && !self.streams.share_a_room(viewer, user) {
            return Err(Error::forbidden("You cannot see this user's presence"));
        }
        let users = self.users.lock();
        Ok(match users.get(user) {
            Some(entry) => Self::view(user, entry, now_ms()),
            None => PresenceView {
                user_id: user.to_owned(),
                presence: "offline".to_owned(),
                status_msg: None,
                last_active_ago: None,
                currently_active: false,
            },
        })
    }

    /// Presence of the users `viewer` shares rooms with, changed after serial `since` (all known
    /// ones when `since` is 0).
    pub fn changes_for(&self, viewer: &UserId, since: i64) -> Vec<PresenceView> {
        if !self.enabled {
            return Vec::new();
        }
        let now = now_ms();
        let candidates: Vec<(OwnedUserId, PresenceEntry)> = {
            let users = self.users.lock();
            users
                .iter()
                .filter(|(_, entry)| entry.serial > since && (since > 0 || entry.state != "offline"))
                .map(|(u, e)| (u.clone(), e.clone()))
                .collect()
        };
        if candidates.is_empty() {
            return Vec::new();
        }
        let sharing = self.streams.users_sharing_rooms(viewer);
        let mut views: Vec<_> = candidates
            .into_iter()
            .filter(|(u, e)| sharing.contains(u) || (e.is_remote && self.streams.share_a_room(viewer, u)))
            .map(|(u, e)| Self::view(&u, &e, now))
            .collect();
        views.sort_by(|a, b| a.user_id.cmp(&b.user_id));
        views
    }
}

/// Marks the end of a sync for presence when dropped.
pub struct SyncGuard {
    presence: Arc<Presence>,
    user: OwnedUserId,
}

impl Drop for SyncGuard {
    fn drop(&mut self) {
        let now = now_ms();
        let mut users = self.presence.users.lock();
        if let Some(entry) = users.get_mut(&self.user) {
            entry.syncing = entry.syncing.saturating_sub(1);
            entry.last_sync_ts = now;
        }
    }
}
