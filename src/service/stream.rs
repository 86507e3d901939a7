//! The stream: one writer that gives every persisted change its position, and the notifier that
//! wakes whoever waits for it.
//!
//! All persisted changes clients are told about (room events, receipts, account data, to-device
//! messages, device-list changes) go through [`Streams::persist`]. A single task drains the queue,
//! commits whole batches in one transaction (group commit: one commit for many concurrent
//! writers), assigns positions in commit order, updates the in-memory views that sync reads
//! (who is in which room, which rooms changed when), and only then publishes the new position and
//! wakes the affected users. Because views are updated before the position is published, a reader
//! that sees position P also sees every view change up to P.
//!
//! Typing and presence are in-memory only; they share a separate "ephemeral" counter that starts
//! at the wall-clock time of boot, so it keeps increasing across restarts.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
};

use parking_lot::{Mutex, RwLock};
use ruma::{EventId, OwnedRoomId, OwnedUserId, RoomId, ServerName, UserId};
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    error::{Error, Result},
    matrix::pdu::Pdu,
    service::{now_ms, rooms::StoredEvent},
    storage::{
        Db,
        stream::{ReceiptRow, StreamWrite},
    },
};

/// Largest batch committed in one transaction.
const MAX_BATCH: usize = 256;
/// How many recent room changes are remembered for cheap "which rooms changed since T" answers.
const CHANGE_LOG_LEN: usize = 100_000;
/// Events kept in memory per room for syncs.
const RECENT_EVENTS_PER_ROOM: usize = 64;
/// Receipt changes kept in memory per room for syncs (a message in a room of N members can
/// bring N delivered receipts, so this is larger than the event window).
const RECENT_RECEIPTS_PER_ROOM: usize = 128;

/// A user's membership of a room, as the views know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub membership: String,
    /// Position of the member event that set it.
    pub pos: i64,
    /// The membership before that event (for readers at an older position).
    pub previous: Option<(String, i64)>,
}

impl Membership {
    /// The membership as of `upto`, if the user had one then.
    pub fn as_of(&self, upto: i64) -> Option<(&str, i64)> {
        if self.pos <= upto {
            Some((&self.membership, self.pos))
        } else {
            self.previous.as_ref().filter(|(_, pos)| *pos <= upto).map(|(m, pos)| (m.as_str(), *pos))
        }
    }
}

/// A room's members, kept so that every per-sync question about them is O(1) or O(answer).
#[derive(Default)]
struct RoomMembers {
    /// Every user with a membership, ordered by user ID (heroes come from the front).
    all: BTreeMap<OwnedUserId, String>,
    joined: u64,
    invited: u64,
    /// Joined users of this server: the fan-out of a new event.
    local_joined: HashSet<OwnedUserId>,
}

impl RoomMembers {
    fn set(&mut self, user: &UserId, membership: &str, is_local: bool) {
        let count = |m: &str, joined: &mut u64, invited: &mut u64, delta: i64| match m {
            "join" => *joined = joined.saturating_add_signed(delta),
            "invite" => *invited = invited.saturating_add_signed(delta),
            _ => {}
        };
        if let Some(previous) = self.all.insert(user.to_owned(), membership.to_owned()) {
            count(&previous, &mut self.joined, &mut self.invited, -1);
        }
        count(membership, &mut self.joined, &mut self.invited, 1);
        if is_local {
            if membership == "join" {
                self.local_joined.insert(user.to_owned());
            } else {
                self.local_joined.remove(user);
            }
        }
    }
}

#[derive(Default)]
struct Views {
    /// Local users → their rooms.
    user_rooms: HashMap<OwnedUserId, HashMap<OwnedRoomId, Membership>>,
    /// Room → its members, all servers.
    room_members: HashMap<OwnedRoomId, RoomMembers>,
    /// Room → position of its latest event / latest receipt.
    room_latest_event: HashMap<OwnedRoomId, i64>,
    room_latest_receipt: HashMap<OwnedRoomId, i64>,
    /// Recent (position, room) changes (events and receipts), oldest first.
    change_log: VecDeque<(i64, OwnedRoomId)>,
    /// Per room: its latest events, oldest first, so syncs of active rooms need no query.
    recent: HashMap<OwnedRoomId, VecDeque<Arc<StoredEvent>>>,
    /// Per room: its latest receipt changes, so syncs need no query for them.
    recent_receipts: HashMap<OwnedRoomId, RecentReceipts>,
    /// Per room: its latest changes of current state (position, state group), oldest first.
    room_state: HashMap<OwnedRoomId, RoomStateLog>,
    /// Per room: position of its latest edit, reference or thread reply.
    room_latest_relation: HashMap<OwnedRoomId, i64>,
    /// Per user: position of their latest account data change.
    account_data_pos: HashMap<OwnedUserId, i64>,
    /// Per device: position of its latest to-device message.
    to_device_pos: HashMap<(OwnedUserId, String), i64>,
    /// Position of the latest device-list change of anyone.
    device_change_pos: i64,
    /// (user, room) → how far their read receipts reach, unthreaded, in the main timeline and
    /// per thread.
    read_marks: HashMap<(OwnedUserId, OwnedRoomId), ReadMarks>,
    /// (user, room, thread) → position of their delivered receipt.
    delivered_pos: HashMap<(OwnedUserId, OwnedRoomId, String), i64>,
}

/// How far a user's read receipts (`m.read` and `m.read.private` alike) reach in a room: the
/// unthreaded receipt covers every thread, `main` the main timeline, the others their thread.
/// Each only moves forward.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadMarks {
    pub unthreaded: i64,
    pub main: i64,
    /// Thread root → position, for threads with a receipt of their own.
    pub threads: BTreeMap<String, i64>,
}

impl ReadMarks {
    /// Events of `thread` (`main` or a thread root) up to this position are read.
    pub fn bound(&self, thread: &str) -> i64 {
        let own = match thread {
            "main" => self.main,
            root => self.threads.get(root).copied().unwrap_or(0),
        };
        self.unthreaded.max(own)
    }

    /// Takes in a receipt of `thread_id` (`""` when unthreaded) at `pos`.
    pub fn record(&mut self, thread_id: &str, pos: i64) {
        let mark = match thread_id {
            "" => &mut self.unthreaded,
            "main" => &mut self.main,
            root => self.threads.entry(root.to_owned()).or_default(),
        };
        *mark = (*mark).max(pos);
    }
}

/// The tail of a room's log of current-state changes (`room_state_changes`): enough to answer
/// "the room's state at P" from memory for P at or after its oldest entry.
#[derive(Default)]
struct RoomStateLog {
    /// (position, state group), oldest first.
    changes: VecDeque<(i64, i64)>,
    /// Position of the latest change that was a resolution between branches rather than one
    /// event's own state entry (0: none since start).
    resolved_pos: i64,
}

/// Current-state changes remembered per room.
const STATE_LOG_PER_ROOM: usize = 8;

/// A room's latest receipt changes, in position order.
struct RecentReceipts {
    /// Every receipt change of the room after this position is in `changes`.
    complete_after: i64,
    changes: VecDeque<ReceiptRow>,
}

/// Wakes long-polling readers per user.
#[derive(Default)]
pub struct Notifier {
    waiters: Mutex<HashMap<OwnedUserId, watch::Sender<u64>>>,
}

impl Notifier {
    /// A receiver that changes whenever something for `user_id` happens. Subscribe *before*
    /// reading, so nothing that lands in between is missed.
    pub fn subscribe(&self, user_id: &UserId) -> watch::Receiver<u64> {
        let mut waiters = self.waiters.lock();
        let sender = waiters.entry(user_id.to_owned()).or_insert_with(|| watch::channel(0).0);
        let mut receiver = sender.subscribe();
        receiver.mark_unchanged();
        receiver
    }

    pub fn wake<'a>(&self, users: impl IntoIterator<Item = &'a UserId>) {
        let waiters = self.waiters.lock();
        for user in users {
            if let Some(sender) = waiters.get(user) {
                sender.send_modify(|generation| *generation += 1);
            }
        }
    }

    /// Wakes everyone (shutdown).
    pub fn wake_all(&self) {
        for sender in self.waiters.lock().values() {
            sender.send_modify(|generation| *generation += 1);
        }
    }

    /// Drops channels nobody listens to.
    pub fn prune(&self) {
        self.waiters.lock().retain(|_, sender| sender.receiver_count() > 0);
    }
}

struct Job {
    writes: Vec<StreamWrite>,
    reply: oneshot::Sender<Result<i64>>,
}

pub struct Streams {
    db: Db,
    server_name: ruma::OwnedServerName,
    queue: mpsc::Sender<Job>,
    published: watch::Sender<i64>,
    views: RwLock<Views>,
    pub notifier: Notifier,
    ephemeral: AtomicI64,
    shutting_down: std::sync::atomic::AtomicBool,
    /// Set when the writer task has ended (it never should).
    writer_stopped: std::sync::atomic::AtomicBool,
}

impl Streams {
    /// Loads the views from the database and starts the writer task.
    pub async fn start(db: Db, server_name: &ServerName) -> Result<Arc<Streams>> {
        let position = db.max_stream_pos().await?;
        let (queue, receiver) = mpsc::channel(4096);
        let streams = Arc::new(Streams {
            db: db.clone(),
            server_name: server_name.to_owned(),
            queue,
            published: watch::channel(position).0,
            views: RwLock::new(Views::default()),
            notifier: Notifier::default(),
            ephemeral: AtomicI64::new(now_ms()),
            shutting_down: std::sync::atomic::AtomicBool::new(false),
            writer_stopped: std::sync::atomic::AtomicBool::new(false),
        });
        streams.load_views().await?;
        tokio::spawn(writer_task(streams.clone(), receiver, position));
        Ok(streams)
    }

    async fn load_views(&self) -> Result<()> {
        let memberships = self.db.all_memberships().await?;
        let out_of_band = self.db.all_out_of_band_memberships().await?;
        let latest = self.db.room_latest_positions().await?;
        let positions = self.db.view_positions().await?;
        let mut views = self.views.write();
        for (room_id, group, pos) in positions.room_groups {
            // Whether that change was a resolution is not stored: assume it was, so a token from
            // before it gets its state delta checked once.
            views
                .room_state
                .insert(room_id, RoomStateLog { changes: VecDeque::from([(pos, group)]), resolved_pos: pos });
        }
        views.room_latest_relation.extend(positions.room_relations);
        views.account_data_pos.extend(positions.account_data);
        views.to_device_pos.extend(positions.to_device.into_iter().map(|(u, d, p)| ((u, d), p)));
        views.device_change_pos = positions.device_change;
        for (user, room, thread, pos) in positions.reads {
            views.read_marks.entry((user, room)).or_default().record(&thread, pos);
        }
        views.delivered_pos.extend(positions.delivered.into_iter().map(|(u, r, t, p)| ((u, r, t), p)));
        for row in memberships {
            if row.user_id.server_name() == self.server_name {
                views.user_rooms.entry(row.user_id.clone()).or_default().insert(
                    row.room_id.clone(),
                    Membership { membership: row.membership.clone(), pos: row.stream_pos, previous: None },
                );
            }
            let is_local = row.user_id.server_name() == self.server_name;
            views.room_members.entry(row.room_id).or_default().set(&row.user_id, &row.membership, is_local);
        }
        // Rooms this server is not in: only the user's own view, unless the room's own
        // membership (from its graph, joined since) is newer.
        for row in out_of_band {
            let rooms = views.user_rooms.entry(row.user_id.clone()).or_default();
            if rooms.get(&row.room_id).is_none_or(|m| m.pos < row.stream_pos) {
                rooms.insert(
                    row.room_id,
                    Membership { membership: row.membership, pos: row.stream_pos, previous: None },
                );
            }
        }
        for (room_id, event_pos, receipt_pos) in latest {
            if event_pos > 0 {
                views.room_latest_event.insert(room_id.clone(), event_pos);
            }
            if receipt_pos > 0 {
                // Changes up to now are in the database only; the window covers what follows.
                views
                    .recent_receipts
                    .insert(room_id.clone(), RecentReceipts { complete_after: receipt_pos, changes: VecDeque::new() });
                views.room_latest_receipt.insert(room_id, receipt_pos);
            }
        }
        Ok(())
    }

    /// Makes every long-poll return now, and new ones return at once (the server is stopping).
    /// This server's name (local users are those of it).
    pub fn server_name(&self) -> &ServerName {
        &self.server_name
    }

    pub fn shut_down(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.notifier.wake_all();
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// The newest position whose changes are committed and visible in the views.
    pub fn position(&self) -> i64 {
        *self.published.borrow()
    }

    /// The published position, to follow it.
    pub fn subscribe_position(&self) -> watch::Receiver<i64> {
        self.published.subscribe()
    }

    /// Waits until the published position reaches `pos`.
    pub async fn wait_for(&self, pos: i64) {
        let mut receiver = self.published.subscribe();
        let _ = receiver.wait_for(|published| *published >= pos).await;
    }

    /// The next ephemeral (typing/presence) serial.
    pub fn next_ephemeral(&self) -> i64 {
        self.ephemeral.fetch_add(1, Ordering::SeqCst) + 1
    }

    pub fn ephemeral_position(&self) -> i64 {
        self.ephemeral.load(Ordering::SeqCst)
    }

    /// Persists `writes` (in order, in one transaction when possible) and returns the position of
    /// the last one once it is committed and visible.
    pub async fn persist(&self, writes: Vec<StreamWrite>) -> Result<i64> {
        let (reply, result) = oneshot::channel();
        self.queue
            .send(Job { writes, reply })
            .await
            .map_err(|_| Error::Internal("the stream writer has stopped".to_owned()))?;
        result.await.map_err(|_| Error::Internal("the stream writer dropped a write".to_owned()))?
    }

    /// A redaction committed outside the stream (a backfilled one, at a negative position):
    /// the recent events sync serves from show its target redacted too.
    pub fn redacted_outside_stream(&self, room: &RoomId, target: &EventId, redacted_json: &str, redaction: &EventId) {
        if let Some(recent) = self.views.write().recent.get_mut(room) {
            redact_recent(recent, target, redacted_json, redaction);
        }
    }

    /// A local user's rooms, with their membership as of `upto`.
    pub fn user_rooms(&self, user_id: &UserId, upto: i64) -> Vec<(OwnedRoomId, String, i64)> {
        let views = self.views.read();
        views
            .user_rooms
            .get(user_id)
            .map(|rooms| {
                rooms
                    .iter()
                    .filter_map(|(room, m)| {
                        m.as_of(upto).map(|(membership, pos)| (room.clone(), membership.to_owned(), pos))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A local user's current membership of one room.
    pub fn membership(&self, user_id: &UserId, room_id: &RoomId) -> Option<String> {
        self.views.read().user_rooms.get(user_id)?.get(room_id).map(|m| m.membership.clone())
    }

    /// A local user's current membership of one room and the position of the event that set it.
    pub fn membership_pos(&self, user_id: &UserId, room_id: &RoomId) -> Option<(String, i64)> {
        self.views.read().user_rooms.get(user_id)?.get(room_id).map(|m| (m.membership.clone(), m.pos))
    }

    /// Members of a room with `membership`.
    pub fn members(&self, room_id: &RoomId, membership: &str) -> Vec<OwnedUserId> {
        self.views
            .read()
            .room_members
            .get(room_id)
            .map(|members| members.all.iter().filter(|(_, m)| *m == membership).map(|(u, _)| u.clone()).collect())
            .unwrap_or_default()
    }

    /// (joined, invited) member counts.
    pub fn member_counts(&self, room_id: &RoomId) -> (u64, u64) {
        let views = self.views.read();
        views.room_members.get(room_id).map_or((0, 0), |members| (members.joined, members.invited))
    }

    /// Up to `count` joined or invited members other than `except`, in user-ID order (the
    /// "heroes" clients name unnamed rooms by).
    pub fn heroes(&self, room_id: &RoomId, except: &UserId, count: usize) -> Vec<OwnedUserId> {
        let views = self.views.read();
        views
            .room_members
            .get(room_id)
            .map(|members| {
                members
                    .all
                    .iter()
                    .filter(|(u, m)| *u != except && (*m == "join" || *m == "invite"))
                    .take(count)
                    .map(|(u, _)| u.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Local users who share a joined room with `user_id` (including the user).
    pub fn users_sharing_rooms(&self, user_id: &UserId) -> HashSet<OwnedUserId> {
        let views = self.views.read();
        let mut users = HashSet::from([user_id.to_owned()]);
        if let Some(rooms) = views.user_rooms.get(user_id) {
            for (room, m) in rooms {
                if m.membership == "join"
                    && let Some(members) = views.room_members.get(room)
                {
                    users.extend(members.local_joined.iter().cloned());
                }
            }
        }
        users
    }

    /// Whether two users share a joined room.
    pub fn share_a_room(&self, a: &UserId, b: &UserId) -> bool {
        let views = self.views.read();
        let Some(rooms) = views.user_rooms.get(a) else { return false };
        rooms.iter().any(|(room, m)| {
            m.membership == "join"
                && views.room_members.get(room).and_then(|members| members.all.get(b)).is_some_and(|m| m == "join")
        })
    }

    /// Of `rooms`, those with events or receipts in `(since, upto]`. Costs the smaller of the
    /// number of changes since `since` and the number of rooms.
    pub fn changed_rooms(&self, rooms: &HashSet<OwnedRoomId>, since: i64, upto: i64) -> HashSet<OwnedRoomId> {
        let views = self.views.read();
        let log = &views.change_log;
        let start = log.partition_point(|(pos, _)| *pos <= since);
        let log_covers = log.front().is_some_and(|(oldest, _)| *oldest <= since + 1) || since >= self.position();
        if log_covers && log.len() - start < rooms.len() {
            log.range(start..)
                .take_while(|(pos, _)| *pos <= upto)
                .filter(|(_, room)| rooms.contains(room))
                .map(|(_, room)| room.clone())
                .collect()
        } else {
            rooms
                .iter()
                .filter(|room| {
                    let changed = |map: &HashMap<OwnedRoomId, i64>| map.get(*room).is_some_and(|pos| *pos > since);
                    changed(&views.room_latest_event) || changed(&views.room_latest_receipt)
                })
                .cloned()
                .collect()
        }
    }

    /// The room's events in `(after, upto]`, oldest first, if the in-memory window covers that
    /// whole range (every event of a room enters the window in order, so it does once
    /// `after` is at or past the position before its oldest entry).
    pub fn recent_events(&self, room_id: &RoomId, after: i64, upto: i64) -> Option<Vec<Arc<StoredEvent>>> {
        let views = self.views.read();
        let recent = views.recent.get(room_id)?;
        let oldest = recent.front()?.stream_pos;
        if after < oldest - 1 {
            return None;
        }
        Some(recent.iter().filter(|e| e.stream_pos > after && e.stream_pos <= upto).cloned().collect())
    }

    /// The room's receipts changed in `(after, upto]` (each at its latest change in that range),
    /// if the in-memory window covers that range.
    pub fn recent_receipts(&self, room_id: &RoomId, after: i64, upto: i64) -> Option<Vec<ReceiptRow>> {
        let views = self.views.read();
        let Some(recent) = views.recent_receipts.get(room_id) else {
            // No receipt since start and none before it.
            return (!views.room_latest_receipt.contains_key(room_id)).then(Vec::new);
        };
        if after < recent.complete_after {
            return None;
        }
        let mut latest: HashMap<(&str, &UserId, &str), &ReceiptRow> = HashMap::new();
        for row in recent.changes.iter().filter(|r| r.stream_pos > after && r.stream_pos <= upto) {
            latest.insert((&row.receipt_type, &row.user_id, &row.thread_id), row);
        }
        let mut rows: Vec<ReceiptRow> = latest.into_values().cloned().collect();
        rows.sort_by_key(|r| r.stream_pos);
        Some(rows)
    }

    /// The room's current state group as of `upto`, if the views know it (when `upto` is at or
    /// after the oldest change they remember).
    pub fn room_group_at(&self, room_id: &RoomId, upto: i64) -> Option<i64> {
        let views = self.views.read();
        let changes = &views.room_state.get(room_id)?.changes;
        if changes.front()?.0 > upto {
            return None;
        }
        changes.iter().rev().find(|(pos, _)| *pos <= upto).map(|(_, group)| *group)
    }

    /// The room's current state group (0 if it has none).
    pub fn room_group(&self, room_id: &RoomId) -> i64 {
        self.views.read().room_state.get(room_id).and_then(|log| log.changes.back()).map_or(0, |(_, group)| *group)
    }

    /// Whether the room's current state changed in `(since, upto]` other than by the state
    /// events of its timeline (a resolution between branches), as far as the views know.
    pub fn state_resolved_since(&self, room_id: &RoomId, since: i64) -> bool {
        self.views.read().room_state.get(room_id).is_some_and(|log| log.resolved_pos > since)
    }

    /// Position of the room's latest relation event (edit, reference, thread reply).
    pub fn latest_relation(&self, room_id: &RoomId) -> i64 {
        self.views.read().room_latest_relation.get(room_id).copied().unwrap_or(0)
    }

    /// Position of the room's latest receipt.
    pub fn latest_receipt(&self, room_id: &RoomId) -> i64 {
        self.views.read().room_latest_receipt.get(room_id).copied().unwrap_or(0)
    }

    /// Position of the user's latest account data change.
    pub fn account_data_pos(&self, user_id: &UserId) -> i64 {
        self.views.read().account_data_pos.get(user_id).copied().unwrap_or(0)
    }

    /// Position of the device's latest to-device message.
    pub fn to_device_pos(&self, user_id: &UserId, device_id: &str) -> i64 {
        self.views.read().to_device_pos.get(&(user_id.to_owned(), device_id.to_owned())).copied().unwrap_or(0)
    }

    /// Position of the latest device-list change.
    pub fn device_change_pos(&self) -> i64 {
        self.views.read().device_change_pos
    }

    /// How far the user's read receipts reach in a room.
    /// Position of the furthest main-timeline event the user has read in a room.
    pub fn read_pos(&self, user_id: &UserId, room_id: &RoomId) -> i64 {
        self.read_marks(user_id, room_id).bound("main")
    }

    /// How far the user's read receipts reach in a room, per thread.
    pub fn read_marks(&self, user_id: &UserId, room_id: &RoomId) -> ReadMarks {
        self.views.read().read_marks.get(&(user_id.to_owned(), room_id.to_owned())).cloned().unwrap_or_default()
    }

    /// Position of the user's delivered receipt in a room's thread.
    pub fn delivered_pos(&self, user_id: &UserId, room_id: &RoomId, thread: &str) -> i64 {
        self.views
            .read()
            .delivered_pos
            .get(&(user_id.to_owned(), room_id.to_owned(), thread.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// Wakes the waiters a change concerns. Touches only users that are actually waiting: in a
    /// room of ten thousand where five people are syncing, five channels are poked, not 10,000.
    pub fn wake(&self, wake: &Wake) {
        let views = self.views.read();
        let waiters = self.notifier.waiters.lock();
        let poke = |sender: &watch::Sender<u64>| sender.send_modify(|generation| *generation += 1);
        for user in &wake.users {
            if let Some(sender) = waiters.get(user) {
                poke(sender);
            }
        }
        for room in &wake.rooms {
            let Some(members) = views.room_members.get(room) else { continue };
            if waiters.len() < members.local_joined.len() {
                for (user, sender) in waiters.iter() {
                    if members.local_joined.contains(user) {
                        poke(sender);
                    }
                }
            } else {
                for user in &members.local_joined {
                    if let Some(sender) = waiters.get(user) {
                        poke(sender);
                    }
                }
            }
        }
    }

    /// Wakes everyone joined to `room_id` (typing changes).
    pub fn wake_room(&self, room_id: &RoomId) {
        self.wake(&Wake { users: HashSet::new(), rooms: HashSet::from([room_id.to_owned()]) });
    }

    /// Whether a (remote) user is joined to a room a local user is joined to.
    pub fn shares_room_with_local(&self, user_id: &UserId) -> bool {
        self.views
            .read()
            .room_members
            .values()
            .any(|members| !members.local_joined.is_empty() && members.all.get(user_id).is_some_and(|m| m == "join"))
    }

    /// Wakes the local members of every room a (remote) user is joined to: their presence
    /// changed. Looks at every room; remote presence updates are rare next to syncs.
    pub fn wake_rooms_of_member(&self, user_id: &UserId) {
        let rooms = self
            .views
            .read()
            .room_members
            .iter()
            .filter(|(_, members)| members.all.get(user_id).is_some_and(|m| m == "join"))
            .map(|(room_id, _)| room_id.clone())
            .collect();
        self.wake(&Wake { users: HashSet::new(), rooms });
    }

    /// Wakes `user_id` and everyone sharing a joined room with them (presence changes).
    pub fn wake_contacts(&self, user_id: &UserId) {
        let rooms = self
            .views
            .read()
            .user_rooms
            .get(user_id)
            .map(|rooms| rooms.iter().filter(|(_, m)| m.membership == "join").map(|(r, _)| r.clone()).collect())
            .unwrap_or_default();
        self.wake(&Wake { users: HashSet::from([user_id.to_owned()]), rooms });
    }

    /// Applies a committed batch to the views and returns who to wake.
    fn apply(&self, first_pos: i64, writes: &[&StreamWrite]) -> Wake {
        let mut wake = Wake::default();
        let mut views = self.views.write();
        for (offset, write) in writes.iter().enumerate() {
            let pos = first_pos + offset as i64;
            match write {
                StreamWrite::Event(event) => {
                    let room = &event.pdu.room_id;
                    if event.soft_failed {
                        // Never shown to clients and changing nothing they see: the position is
                        // spent, nobody is woken.
                        continue;
                    }
                    // Memberships follow the room's current state, not the member event itself
                    // (a late side-branch event may lose the resolution).
                    if let Some(current) = &event.current {
                        let log = views.room_state.entry(room.clone()).or_default();
                        if log.changes.len() >= STATE_LOG_PER_ROOM {
                            log.changes.pop_front();
                        }
                        log.changes.push_back((pos, current.group));
                        if current.resolved {
                            log.resolved_pos = pos;
                        }
                    }
                    for change in event.current.iter().flat_map(|c| c.memberships.iter()) {
                        let is_local = change.user_id.server_name() == self.server_name;
                        views.room_members.entry(room.clone()).or_default().set(
                            &change.user_id,
                            &change.membership,
                            is_local,
                        );
                        if is_local {
                            let rooms = views.user_rooms.entry(change.user_id.clone()).or_default();
                            let previous = rooms.get(room).map(|m| (m.membership.clone(), m.pos));
                            rooms.insert(
                                room.clone(),
                                Membership { membership: change.membership.clone(), pos, previous },
                            );
                            wake.users.insert(change.user_id.clone());
                        }
                    }
                    views.room_latest_event.insert(room.clone(), pos);
                    if matches!(event.rel_type.as_deref(), Some("m.replace" | "m.reference" | "m.thread")) {
                        views.room_latest_relation.insert(room.clone(), pos);
                    }
                    push_change(&mut views.change_log, pos, room);
                    let stored = Arc::new(StoredEvent {
                        pdu: (*event.pdu).clone(),
                        stream_pos: pos,
                        redacted_by: event.redacted_by.clone(),
                        soft_failed: false,
                        state_before: event.state_before,
                        state_after: event.state_after,
                        replaces_state: event.replaces_state.clone(),
                        txn: event.txn.as_ref().map(|(_, device, txn)| (device.clone(), txn.clone())),
                        txn_known: true,
                    });
                    let recent = views.recent.entry(room.clone()).or_default();
                    if let Some((target, redacted_json)) = &event.redaction_target {
                        redact_recent(recent, target, redacted_json, &event.pdu.event_id);
                    }
                    if recent.len() >= RECENT_EVENTS_PER_ROOM {
                        recent.pop_front();
                    }
                    recent.push_back(stored);
                    wake.rooms.insert(room.clone());
                }
                StreamWrite::Receipt(receipt) => {
                    views.room_latest_receipt.insert(receipt.room_id.clone(), pos);
                    let recent = views
                        .recent_receipts
                        .entry(receipt.room_id.clone())
                        .or_insert_with(|| RecentReceipts { complete_after: 0, changes: VecDeque::new() });
                    if recent.changes.len() >= RECENT_RECEIPTS_PER_ROOM
                        && let Some(evicted) = recent.changes.pop_front()
                    {
                        recent.complete_after = evicted.stream_pos;
                    }
                    recent.changes.push_back(ReceiptRow {
                        room_id: receipt.room_id.clone(),
                        receipt_type: receipt.receipt_type.clone(),
                        user_id: receipt.user_id.clone(),
                        thread_id: receipt.thread_id.clone(),
                        event_id: receipt.event_id.clone(),
                        event_pos: receipt.event_pos,
                        ts: receipt.ts,
                        stream_pos: pos,
                    });
                    if matches!(receipt.receipt_type.as_str(), "m.read" | "m.read.private") {
                        views
                            .read_marks
                            .entry((receipt.user_id.clone(), receipt.room_id.clone()))
                            .or_default()
                            .record(&receipt.thread_id, receipt.event_pos);
                    }
                    if receipt.receipt_type == "org.hearth.delivered" {
                        let key = (receipt.user_id.clone(), receipt.room_id.clone(), receipt.thread_id.clone());
                        let delivered = views.delivered_pos.entry(key).or_default();
                        *delivered = (*delivered).max(receipt.event_pos);
                    }
                    push_change(&mut views.change_log, pos, &receipt.room_id);
                    if receipt.receipt_type == "m.read.private" {
                        wake.users.insert(receipt.user_id.clone());
                    } else if let Some(only) = &receipt.wake_only {
                        wake.users.extend(only.iter().cloned());
                    } else {
                        wake.rooms.insert(receipt.room_id.clone());
                    }
                }
                StreamWrite::AccountData { user_id, .. } => {
                    views.account_data_pos.insert(user_id.clone(), pos);
                    wake.users.insert(user_id.clone());
                }
                StreamWrite::ToDevice(message) => {
                    views.to_device_pos.insert((message.user_id.clone(), message.device_id.clone()), pos);
                    wake.users.insert(message.user_id.clone());
                }
                StreamWrite::ToDeviceTxn { .. } => {}
                StreamWrite::OutOfBand(m) => {
                    // The user's own view only: the room has no members here.
                    let rooms = views.user_rooms.entry(m.user_id.clone()).or_default();
                    let previous = rooms.get(&m.room_id).map(|old| (old.membership.clone(), old.pos));
                    rooms.insert(m.room_id.clone(), Membership { membership: m.membership.clone(), pos, previous });
                    wake.users.insert(m.user_id.clone());
                }
                StreamWrite::DeviceListChange { user_id } => {
                    views.device_change_pos = pos;
                    wake.users.insert(user_id.clone());
                    if let Some(rooms) = views.user_rooms.get(user_id) {
                        wake.rooms.extend(rooms.iter().filter(|(_, m)| m.membership == "join").map(|(r, _)| r.clone()));
                    }
                }
            }
        }
        wake
    }
}

fn push_change(log: &mut VecDeque<(i64, OwnedRoomId)>, pos: i64, room: &RoomId) {
    if log.len() >= CHANGE_LOG_LEN {
        log.pop_front();
    }
    log.push_back((pos, room.to_owned()));
}

/// Who a committed change concerns: single users, and everyone (local) joined to some rooms.
#[derive(Default)]
pub struct Wake {
    pub users: HashSet<OwnedUserId>,
    pub rooms: HashSet<OwnedRoomId>,
}

/// Where the stream stands after a commit reported an error, judged from the highest position
/// stored: an error can come after the database committed (a connection dropped before COMMIT
/// was answered), so the batch may have landed after all.
#[derive(Debug, PartialEq, Eq)]
enum AfterFailure {
    /// The batch is in the database: treat it as committed.
    Committed,
    /// Nothing of it is: the positions stay free.
    NotCommitted,
    /// The stored position is neither (something else wrote to the stream): continue after it.
    Moved(i64),
}

fn after_failure(position: i64, batch_len: usize, stored: i64) -> AfterFailure {
    if stored == position + batch_len as i64 {
        AfterFailure::Committed
    } else if stored == position {
        AfterFailure::NotCommitted
    } else {
        AfterFailure::Moved(stored)
    }
}

/// Marks the writer as stopped when its task ends, however it ends (a panic included).
struct WriterAlive(Arc<Streams>);

impl Drop for WriterAlive {
    fn drop(&mut self) {
        self.0.writer_stopped.store(true, Ordering::SeqCst);
        tracing::error!("the stream writer has stopped; writes fail until the server restarts");
    }
}

impl Streams {
    /// Whether the stream writer task is running (`/health` reports it).
    pub fn is_writer_running(&self) -> bool {
        !self.writer_stopped.load(Ordering::SeqCst)
    }

    /// The highest stream position in the database, retried until the database answers: the
    /// writer cannot hand out positions without knowing it.
    async fn stored_position(&self) -> i64 {
        let mut delay = std::time::Duration::from_millis(50);
        loop {
            match self.db.max_stream_pos().await {
                Ok(position) => return position,
                Err(err) => {
                    tracing::warn!(%err, "cannot read the stream position; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(5));
                }
            }
        }
    }

    /// Commits one batch at `position + 1…`; on an error, re-reads the stored position and
    /// finds out whether the batch committed anyway. Returns the new position and whether the
    /// batch is committed (views applied, position published, waiters woken).
    async fn commit_batch(&self, position: i64, writes: &[&StreamWrite]) -> (i64, Result<()>) {
        let first = position + 1;
        if let Err(err) = self.db.commit_stream_batch(first, writes).await {
            let stored = self.stored_position().await;
            match after_failure(position, writes.len(), stored) {
                AfterFailure::Committed => {
                    tracing::warn!(%err, "a stream commit reported an error but is stored; keeping it");
                }
                AfterFailure::NotCommitted => return (position, Err(err.into())),
                AfterFailure::Moved(stored) => {
                    tracing::error!(%err, position, stored, "the stored stream position moved under the writer");
                    return (stored.max(position), Err(err.into()));
                }
            }
        }
        let wake = self.apply(first, writes);
        let position = position + writes.len() as i64;
        self.published.send_replace(position);
        self.wake(&wake);
        (position, Ok(()))
    }
}

/// Drains the queue: batches jobs, commits, updates views, publishes, wakes.
async fn writer_task(streams: Arc<Streams>, mut receiver: mpsc::Receiver<Job>, mut position: i64) {
    let _alive = WriterAlive(streams.clone());
    let mut jobs: Vec<Job> = Vec::new();
    while let Some(job) = receiver.recv().await {
        jobs.push(job);
        let mut count = jobs[0].writes.len();
        while count < MAX_BATCH {
            match receiver.try_recv() {
                Ok(job) => {
                    count += job.writes.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let batch: Vec<&StreamWrite> = jobs.iter().flat_map(|job| job.writes.iter()).collect();
        let first = position + 1;
        let (after, result) = streams.commit_batch(position, &batch).await;
        drop(batch);
        position = after;
        match result {
            Ok(()) => {
                let mut end = first - 1;
                for job in jobs.drain(..) {
                    end += job.writes.len() as i64;
                    let _ = job.reply.send(Ok(end));
                }
            }
            Err(err) if jobs.len() > 1 => {
                // One bad write must not fail its neighbours: retry each job on its own.
                tracing::warn!(%err, "stream batch failed; retrying its jobs one by one");
                for job in jobs.drain(..) {
                    let writes: Vec<&StreamWrite> = job.writes.iter().collect();
                    let (after, result) = streams.commit_batch(position, &writes).await;
                    position = after;
                    let _ = job.reply.send(result.map(|()| position));
                }
            }
            Err(err) => {
                let message = err.to_string();
                for job in jobs.drain(..) {
                    let _ = job.reply.send(Err(Error::Internal(message.clone())));
                }
            }
        }
    }
}

/// A position in the streams as clients see it: `s{stream}_{ephemeral}`, or
/// `s{stream}_{ephemeral}_{to_device}` when the device's to-device messages were delivered only
/// up to `to_device` (a sync delivers at most a page of them; the next one continues from there,
/// and only what was delivered is deleted). Pagination tokens use the same form (their ephemeral
/// and to-device parts are ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamToken {
    pub stream: i64,
    pub ephemeral: i64,
    /// How far to-device messages were delivered, when that is short of `stream`.
    to_device: Option<i64>,
}

impl StreamToken {
    pub fn new(stream: i64, ephemeral: i64) -> Self {
        StreamToken { stream, ephemeral, to_device: None }
    }

    /// This token with to-device messages delivered only up to `pos` (ignored unless it is short
    /// of the stream position).
    pub fn with_to_device(self, pos: i64) -> Self {
        StreamToken { to_device: (pos < self.stream).then_some(pos), ..self }
    }

    /// How far the device's to-device messages were delivered.
    pub fn to_device(&self) -> i64 {
        self.to_device.unwrap_or(self.stream)
    }

    /// Whether this token lies at or after `other` in every paged stream (the ephemeral counter
    /// is not a delivery and does not count). Tokens of one device's syncs are totally ordered.
    pub fn reaches(&self, other: &StreamToken) -> bool {
        (self.stream, self.to_device()) >= (other.stream, other.to_device())
    }

    /// Parses `s{stream}_{ephemeral}[_{to_device}]` (or a bare stream position).
    pub fn parse(token: &str) -> Result<StreamToken> {
        let invalid = || Error::InvalidParam(format!("invalid token: {token}"));
        let body = token.strip_prefix('s').unwrap_or(token);
        let mut parts = body.split('_');
        let mut number = |default: Option<&str>| -> Result<Option<i64>> {
            match parts.next().or(default) {
                None => Ok(None),
                Some(part) => match part.parse::<i64>() {
                    Ok(value) if value >= 0 => Ok(Some(value)),
                    _ => Err(invalid()),
                },
            }
        };
        let stream = number(None)?.ok_or_else(invalid)?;
        let ephemeral = number(Some("0"))?.unwrap_or(0);
        let to_device = number(None)?;
        if parts.next().is_some() || to_device.is_some_and(|pos| pos >= stream) {
            return Err(invalid());
        }
        Ok(StreamToken { stream, ephemeral, to_device })
    }
}

impl std::fmt::Display for StreamToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s{}_{}", self.stream, self.ephemeral)?;
        if let Some(to_device) = self.to_device {
            write!(f, "_{to_device}")?;
        }
        Ok(())
    }
}

/// Puts the redacted form of `target` (redacted by `redaction`) in its place among a room's
/// recent events, when it is one of them.
fn redact_recent(recent: &mut VecDeque<Arc<StoredEvent>>, target: &EventId, redacted_json: &str, redaction: &EventId) {
    if let Some(slot) = recent.iter_mut().find(|e| e.pdu.event_id == target)
        && let Ok(redacted) = Pdu::from_json(redacted_json.to_owned(), slot.pdu.room_id.clone(), target.to_owned())
    {
        *slot = Arc::new(StoredEvent { pdu: redacted, redacted_by: Some(redaction.to_owned()), ..(**slot).clone() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_reject_garbage() {
        let token = StreamToken::new(42, 1_700_000_000_123);
        assert_eq!(StreamToken::parse(&token.to_string()).unwrap(), token);
        assert_eq!(StreamToken::parse("17").unwrap(), StreamToken::new(17, 0));
        for bad in ["", "s", "sx_1", "s1_x", "s-1_0", "t1-2", "s1_2_3_4", "s1_2_x", "s5_2_5", "s5_2_9", "s5_2_-1"] {
            assert!(StreamToken::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_lagging_to_device_position_is_carried_and_only_then() {
        let whole = StreamToken::new(42, 7);
        assert_eq!(whole.to_string(), "s42_7");
        assert_eq!(whole.to_device(), 42);
        assert_eq!(whole.with_to_device(42), whole);
        assert_eq!(whole.with_to_device(50), whole);
        let paged = whole.with_to_device(30);
        assert_eq!(paged.to_string(), "s42_7_30");
        assert_eq!(paged.to_device(), 30);
        assert_eq!(StreamToken::parse("s42_7_30").unwrap(), paged);
        // Old two-part tokens still parse, with everything delivered.
        assert_eq!(StreamToken::parse("s42_7").unwrap().to_device(), 42);
        // Later pages of the same stream position come after earlier ones.
        assert!(whole.reaches(&paged) && !paged.reaches(&whole));
        assert!(whole.with_to_device(35).reaches(&paged));
    }

    #[test]
    fn a_failed_commit_is_judged_by_the_stored_position() {
        assert_eq!(after_failure(10, 3, 13), AfterFailure::Committed);
        assert_eq!(after_failure(10, 3, 10), AfterFailure::NotCommitted);
        assert_eq!(after_failure(10, 3, 20), AfterFailure::Moved(20));
    }

    #[test]
    fn membership_as_of_an_older_position_uses_the_previous_one() {
        let m = Membership { membership: "leave".into(), pos: 10, previous: Some(("join".into(), 5)) };
        assert_eq!(m.as_of(12), Some(("leave", 10)));
        assert_eq!(m.as_of(7), Some(("join", 5)));
        assert_eq!(m.as_of(3), None);
    }
}
