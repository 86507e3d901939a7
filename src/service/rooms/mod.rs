//! Rooms: the event pipeline and everything built on it.
//!
//! Every event goes through one pipeline, `build → authorize → persist → notify`, under the
//! room's writer lock (one writer per room, so the forward extremities and the state never
//! race): local events through [`Rooms::append`] (built on the forward extremities, signed,
//! checked), events from other servers through [`Rooms::receive_pdu`] (the checks on receipt).
//! Both are persisted through the stream writer with their state groups, the room's new current
//! state, membership and relation bookkeeping, in one transaction. Reads never take the writer
//! lock: they read committed rows and cached state groups.
//!
//! Submodules: `graph` (extremities, state before/after, current state, resolution), `receive`
//! (PDUs from other servers, outliers), `create` (createRoom, upgrade), `membership`, `send`
//! (messages, state, redactions), `history` (messages, context, relations, threads,
//! visibility), `directory` (aliases, public rooms, user directory).

pub mod backfilled;
pub mod create;
pub mod directory;
mod event_cache;
mod federated;
pub mod graph;
pub mod history;
pub mod membership;
pub mod pagination;
pub mod receive;
mod remote_members;
mod restricted;
pub mod send;
pub mod serving;

use std::{
    collections::HashMap,
    num::NonZeroUsize,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
};

use lru::LruCache;
use parking_lot::Mutex;
use ruma::{
    EventId, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedServerName, OwnedUserId, RoomId,
    RoomVersionId, UInt, UserId,
    events::{StateEventType, TimelineEventType},
    room_version_rules::RoomVersionRules,
};
use serde_json::Value;

use crate::{
    error::{Error, Result},
    matrix::{
        auth::{self, AuthState, StateKey},
        pdu::{BuildError, EventTemplate, Pdu, Placement},
        room_version,
    },
    service::{now_ms, server_keys::ServerKeys, stream::Streams},
    storage::{
        Db,
        rooms::EventRow,
        stream::{EventWrite, MembershipChange, NewRoom, NewStateGroup, StreamWrite},
    },
};

/// A full snapshot is stored after this many deltas in a state-group chain.
const SNAPSHOT_INTERVAL: i64 = 50;
/// Upper bound on the snapshot interval of big rooms.
const MAX_SNAPSHOT_INTERVAL: i64 = 1000;
const EVENT_CACHE_SIZE: usize = 50_000;
const GROUP_CACHE_SIZE: usize = 20_000;
const FULL_STATE_CACHE_SIZE: usize = 64;
/// Stripes of the per-room load lock (see `Rooms::loading`).
const LOAD_STRIPES: usize = 64;

/// Room state as a map from (event type, state key) to event ID.
pub type StateMap = HashMap<(String, String), OwnedEventId>;

/// An event with its storage bookkeeping.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub pdu: Pdu,
    pub stream_pos: i64,
    pub redacted_by: Option<OwnedEventId>,
    pub soft_failed: bool,
    pub state_before: i64,
    pub state_after: i64,
    pub replaces_state: Option<OwnedEventId>,
    /// The (device, transaction ID) it was sent with, when known without asking the database
    /// (events this process appended); `None` with `txn_known` false means "look it up".
    pub txn: Option<(String, String)>,
    pub txn_known: bool,
}

impl StoredEvent {
    /// Known without its place in the graph: in no timeline, with no stream position.
    pub fn is_outlier(&self) -> bool {
        self.stream_pos == 0
    }

    fn from_row(row: EventRow) -> Result<StoredEvent> {
        let pdu = Pdu::from_json(row.json, row.room_id, row.event_id).map_err(Error::Internal)?;
        Ok(StoredEvent {
            pdu,
            stream_pos: row.stream_pos,
            redacted_by: row.redacted_by,
            soft_failed: row.soft_failed,
            state_before: row.state_before,
            state_after: row.state_after,
            replaces_state: row.replaces_state,
            txn: None,
            txn_known: false,
        })
    }
}

/// A state group: a full snapshot (`chain_len == 0`) or the changes on top of `prev_group`.
/// Snapshots still name the group they follow, so the history of a room's state stays a chain.
struct GroupData {
    prev_group: Option<i64>,
    chain_len: i64,
    entries: StateMap,
}

/// What a room's writer knows about the tip of its DAG.
struct WriterState {
    /// The forward extremities (events nothing points at yet, soft-failed ones never), with
    /// their depths.
    extremities: Vec<(OwnedEventId, u64)>,
    /// The room's current state: the resolved state of the forward extremities.
    current: graph::GroupState,
}

pub struct RoomHandle {
    pub room_id: OwnedRoomId,
    pub version: RoomVersionId,
    pub rules: RoomVersionRules,
    writer: tokio::sync::Mutex<WriterState>,
    /// Messages waiting to be appended by the next holder of `writer` (see
    /// [`Rooms::append_message`]).
    pending: Mutex<Vec<PendingMessage>>,
}

/// A message waiting for its room's writer, and where its result goes.
type PendingMessage = (NewEvent, tokio::sync::oneshot::Sender<Result<Arc<StoredEvent>>>);

/// An event to append.
#[derive(Clone)]
pub struct NewEvent {
    pub template: EventTemplate,
    pub sender: OwnedUserId,
    /// (device ID, transaction ID) of the client request.
    pub txn: Option<(String, String)>,
}

impl NewEvent {
    pub fn new(sender: &UserId, event_type: &str, state_key: Option<&str>, content: Value) -> Result<NewEvent> {
        Ok(NewEvent {
            template: EventTemplate {
                event_type: event_type.to_owned(),
                state_key: state_key.map(str::to_owned),
                content: crate::matrix::pdu::canonical_content(content).map_err(Error::BadJson)?,
                redacts: None,
            },
            sender: sender.to_owned(),
            txn: None,
        })
    }
}

/// A user's ignore list and the account-data position it was read at.
type IgnoreList = (i64, Arc<std::collections::HashSet<OwnedUserId>>);

pub struct Rooms {
    pub(crate) db: Db,
    pub(crate) server_name: OwnedServerName,
    keys: Arc<ServerKeys>,
    pub streams: Arc<Streams>,
    /// Loaded rooms, most recently used first. Unbounded as an LRU: [`Rooms::insert_handle`]
    /// evicts down to `max_handles`, skipping handles in use, so a room never gets two writers.
    handles: Mutex<LruCache<OwnedRoomId, Arc<RoomHandle>>>,
    max_handles: usize,
    /// Loads of handles from the database, serialised per room (by hash stripe): without this,
    /// a load reading the tip while another request loads, writes to and evicts the same room
    /// could insert a handle with a stale tip.
    loading: Vec<tokio::sync::Mutex<()>>,
    events: Mutex<event_cache::EventCache>,
    groups: Mutex<LruCache<i64, Arc<GroupData>>>,
    full_states: Mutex<LruCache<i64, Arc<StateMap>>>,
    next_group: AtomicI64,
    /// Per user: their ignore list and the account-data position it was read at.
    ignored: Mutex<LruCache<OwnedUserId, IgnoreList>>,
    /// This service itself, for the tasks that append (see [`Rooms::commit`]).
    me: std::sync::Weak<Rooms>,
    /// Per room being upgraded: the lock its upgrade holds (see `create.rs`).
    upgrades: Mutex<HashMap<OwnedRoomId, Arc<tokio::sync::Mutex<()>>>>,
    /// The whole public room list and when it was built (see `directory.rs`).
    public_list: Mutex<Option<(std::time::Instant, Arc<Vec<directory::PublicRoom>>)>>,
    /// Where committed local events go for the other servers in their rooms (set once federation
    /// is wired up; without it nothing is sent).
    outbox: std::sync::OnceLock<Arc<crate::federation::outbox::Outbox>>,
    /// The stream position the last backfilled event got (they count down from below every
    /// other position, see `backfilled.rs`); also serialises their commits.
    backfill_pos: tokio::sync::Mutex<i64>,
}

impl Rooms {
    pub async fn new(
        db: Db,
        server_name: OwnedServerName,
        keys: Arc<ServerKeys>,
        streams: Arc<Streams>,
        max_handles: usize,
    ) -> Result<Arc<Rooms>> {
        let next_group = db.max_state_group().await?;
        let backfill_pos = db.min_stream_pos().await?.min(0);
        Ok(Arc::new_cyclic(|me| Rooms {
            db,
            server_name,
            keys,
            streams,
            handles: Mutex::new(LruCache::unbounded()),
            max_handles: max_handles.max(1),
            loading: (0..LOAD_STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            events: Mutex::new(event_cache::EventCache::new(EVENT_CACHE_SIZE)),
            groups: Mutex::new(LruCache::new(NonZeroUsize::new(GROUP_CACHE_SIZE).unwrap())),
            full_states: Mutex::new(LruCache::new(NonZeroUsize::new(FULL_STATE_CACHE_SIZE).unwrap())),
            next_group: AtomicI64::new(next_group),
            ignored: Mutex::new(LruCache::new(NonZeroUsize::new(100_000).unwrap())),
            me: me.clone(),
            upgrades: Mutex::new(HashMap::new()),
            public_list: Mutex::new(None),
            outbox: std::sync::OnceLock::new(),
            backfill_pos: tokio::sync::Mutex::new(backfill_pos),
        }))
    }

    pub fn server_name(&self) -> &OwnedServerName {
        &self.server_name
    }

    /// Sends committed local events to the other servers of their rooms from now on.
    pub fn set_outbox(&self, outbox: Arc<crate::federation::outbox::Outbox>) {
        let _ = self.outbox.set(outbox);
    }

    /// The handle of a room this server knows; `NotFound` otherwise.
    pub async fn handle(&self, room_id: &RoomId) -> Result<Arc<RoomHandle>> {
        if let Some(handle) = self.handles.lock().get(room_id) {
            return Ok(handle.clone());
        }
        let stripe = {
            use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
            BuildHasherDefault::<DefaultHasher>::default().hash_one(room_id) as usize % LOAD_STRIPES
        };
        let _loading = self.loading[stripe].lock().await;
        if let Some(handle) = self.handles.lock().get(room_id) {
            return Ok(handle.clone());
        }
        let room = self.db.room(room_id).await?.ok_or_else(|| Error::not_found("Unknown room"))?;
        let version =
            RoomVersionId::try_from(room.room_version.as_str()).map_err(|e| Error::Internal(e.to_string()))?;
        let rules = room_version::rules(&version)
            .ok_or_else(|| Error::Internal(format!("unsupported room version {version}")))?;
        let tip = self.db.room_tip(room_id).await?;
        let handle = Arc::new(RoomHandle {
            room_id: room_id.to_owned(),
            version,
            rules,
            writer: tokio::sync::Mutex::new(WriterState {
                extremities: tip.forward_extremities.into_iter().map(|(id, depth)| (id, depth.max(0) as u64)).collect(),
                current: graph::GroupState {
                    group: tip.state_group,
                    chain_len: tip.state_chain_len,
                    map: Arc::new(tip.current_state.into_iter().map(|(t, k, e)| ((t, k), e)).collect()),
                },
            }),
            pending: Mutex::new(Vec::new()),
        });
        let mut handles = self.handles.lock();
        if let Some(existing) = handles.get(room_id) {
            // Another request loaded it meanwhile: theirs is the one writers may hold.
            return Ok(existing.clone());
        }
        Ok(self.insert_handle(&mut handles, handle))
    }

    /// Adds a handle (absent from `handles`), then evicts least recently used handles that
    /// nobody holds until the cache is back within its bound. Every user of a handle clones it
    /// out of the map under this lock, so a handle the map alone holds (strong count 1) cannot
    /// be taken meanwhile: no writer holds it or waits for it, and no message is pending on it.
    /// Its state is all committed, so reloading it from the database later gives the same tip.
    fn insert_handle(
        &self,
        handles: &mut LruCache<OwnedRoomId, Arc<RoomHandle>>,
        handle: Arc<RoomHandle>,
    ) -> Arc<RoomHandle> {
        handles.put(handle.room_id.clone(), handle.clone());
        if handles.len() > self.max_handles {
            let excess = handles.len() - self.max_handles;
            let idle: Vec<OwnedRoomId> = handles
                .iter()
                .rev()
                .filter(|(_, h)| {
                    Arc::strong_count(h) == 1 && h.writer.try_lock().is_ok() && h.pending.lock().is_empty()
                })
                .take(excess)
                .map(|(room_id, _)| room_id.clone())
                .collect();
            for room_id in idle {
                handles.pop(&room_id);
            }
        }
        handle
    }

    /// Drops a room's handle if nobody holds it (as eviction would): its state is all
    /// committed, so the next use reloads it — or finds no room, for one that was reserved and
    /// never created.
    pub(super) fn release_idle_handle(&self, room_id: &RoomId) {
        let mut handles = self.handles.lock();
        if handles
            .peek(room_id)
            .is_some_and(|h| Arc::strong_count(h) == 1 && h.writer.try_lock().is_ok() && h.pending.lock().is_empty())
        {
            handles.pop(room_id);
        }
    }

    /// `NotFound` unless the room exists.
    pub async fn check_room_id_exists(db: &Db, room_id: &RoomId) -> Result<()> {
        db.room(room_id).await?.map(|_| ()).ok_or_else(|| Error::not_found("Unknown room"))
    }

    /// The room's version, if the room is known.
    pub async fn room_version(&self, room_id: &RoomId) -> Result<RoomVersionId> {
        Ok(self.handle(room_id).await?.version.clone())
    }

    /// An event of the timeline by ID (soft-failed ones included, outliers not).
    pub async fn timeline_event(&self, event_id: &EventId) -> Result<Option<Arc<StoredEvent>>> {
        Ok(self.event(event_id).await?.filter(|event| !event.is_outlier()))
    }

    /// Fetches an event by ID (cache, then database): of the timeline, or an outlier (a state
    /// event of a room joined over federation, say), which has no stream position.
    pub async fn event(&self, event_id: &EventId) -> Result<Option<Arc<StoredEvent>>> {
        let generation = {
            let mut cache = self.events.lock();
            if let Some(event) = cache.get(event_id) {
                return Ok(Some(event));
            }
            cache.generation()
        };
        let Some(row) = self.db.event(event_id).await? else { return Ok(None) };
        let event = Arc::new(StoredEvent::from_row(row)?);
        self.events.lock().insert_read(generation, event.clone());
        Ok(Some(event))
    }

    /// Turns stored rows into events, reusing cached ones.
    pub(crate) fn events_from_rows(&self, rows: Vec<EventRow>) -> Result<Vec<Arc<StoredEvent>>> {
        let mut cache = self.events.lock();
        rows.into_iter()
            .map(|row| {
                if let Some(event) = cache.get(&row.event_id)
                    && (event.redacted_by == row.redacted_by || event.redacted_by.is_some())
                {
                    // A cached redacted form is newer than an unredacted row.
                    return Ok(event);
                }
                let event = Arc::new(StoredEvent::from_row(row)?);
                cache.insert(event.clone());
                Ok(event)
            })
            .collect()
    }

    /// A new state group ID: from a counter that only moves forward, so a failed commit leaves a
    /// gap, never a reuse.
    fn next_group_id(&self) -> i64 {
        self.next_group.fetch_add(1, Ordering::SeqCst) + 1
    }

    async fn group(&self, group: i64) -> Result<Arc<GroupData>> {
        if let Some(data) = self.groups.lock().get(&group) {
            return Ok(data.clone());
        }
        let row =
            self.db.state_group(group).await?.ok_or_else(|| Error::Internal(format!("missing state group {group}")))?;
        let data = Arc::new(GroupData {
            prev_group: row.prev_group,
            chain_len: row.chain_len,
            entries: row.entries.into_iter().map(|(t, k, e)| ((t, k), e)).collect(),
        });
        self.groups.lock().put(group, data.clone());
        Ok(data)
    }

    /// The full room state of a state group. Group 0 is the empty state.
    pub async fn state_at(&self, group: i64) -> Result<Arc<StateMap>> {
        if group == 0 {
            return Ok(Arc::new(StateMap::new()));
        }
        if let Some(state) = self.full_states.lock().get(&group) {
            return Ok(state.clone());
        }
        let mut chain = Vec::new();
        let mut next = Some(group);
        while let Some(id) = next {
            let data = self.group(id).await?;
            next = if data.chain_len > 0 { data.prev_group } else { None };
            chain.push(data);
        }
        let mut state = StateMap::new();
        for data in chain.iter().rev() {
            state.extend(data.entries.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        let state = Arc::new(state);
        self.full_states.lock().put(group, state.clone());
        Ok(state)
    }

    /// One key of a state group's state, without materialising the whole state.
    pub async fn state_lookup(&self, group: i64, event_type: &str, state_key: &str) -> Result<Option<OwnedEventId>> {
        if group == 0 {
            return Ok(None);
        }
        if let Some(state) = self.full_states.lock().get(&group) {
            return Ok(state.get(&(event_type.to_owned(), state_key.to_owned())).cloned());
        }
        let key = (event_type.to_owned(), state_key.to_owned());
        let mut next = Some(group);
        while let Some(id) = next {
            let data = self.group(id).await?;
            if let Some(event_id) = data.entries.get(&key) {
                return Ok(Some(event_id.clone()));
            }
            next = if data.chain_len > 0 { data.prev_group } else { None };
        }
        Ok(None)
    }

    /// The state entries that differ between groups `before` and `after` (the value in
    /// `after`). Walks the chain back from `after`, so the cost follows the number of changes;
    /// falls back to comparing the full states when `before` is not reachable through deltas.
    pub async fn state_delta(&self, before: i64, after: i64) -> Result<Vec<OwnedEventId>> {
        let mut changed: StateMap = StateMap::new();
        let mut current = after;
        for _ in 0..(MAX_SNAPSHOT_INTERVAL * 2) {
            if current == before {
                return Ok(changed.into_values().collect());
            }
            if current == 0 {
                break;
            }
            let data = self.group(current).await?;
            if data.chain_len == 0 {
                break;
            }
            for (key, event_id) in &data.entries {
                changed.entry(key.clone()).or_insert_with(|| event_id.clone());
            }
            match data.prev_group {
                Some(prev) => current = prev,
                None => break,
            }
        }
        let before_state = self.state_at(before).await?;
        let after_state = self.state_at(after).await?;
        Ok(after_state
            .iter()
            .filter(|(key, id)| before_state.get(*key) != Some(*id))
            .map(|(_, id)| id.clone())
            .collect())
    }

    /// The state event at a key of a state group, as an event.
    pub async fn state_event_at(
        &self,
        group: i64,
        event_type: &str,
        state_key: &str,
    ) -> Result<Option<Arc<StoredEvent>>> {
        match self.state_lookup(group, event_type, state_key).await? {
            Some(event_id) => self.event(&event_id).await,
            None => Ok(None),
        }
    }

    /// The current state event of a room at a key.
    pub async fn current_state_event(
        &self,
        room_id: &RoomId,
        event_type: &str,
        state_key: &str,
    ) -> Result<Option<Arc<StoredEvent>>> {
        match self.db.current_state_event_id(room_id, event_type, state_key).await? {
            Some(event_id) => self.event(&event_id).await,
            None => Ok(None),
        }
    }

    /// The content of the current state event at a key, as JSON.
    pub async fn current_state_content(
        &self,
        room_id: &RoomId,
        event_type: &str,
        state_key: &str,
    ) -> Result<Option<Value>> {
        Ok(self.current_state_event(room_id, event_type, state_key).await?.map(|event| event.pdu.content_value()))
    }

    /// The room's current state group as of stream position `pos` (the views, else the log of
    /// current-state changes).
    pub async fn current_group_at(&self, room_id: &RoomId, pos: i64) -> Result<i64> {
        match self.streams.room_group_at(room_id, pos) {
            Some(group) => Ok(group),
            None => Ok(self.db.room_state_group_at(room_id, pos).await?.unwrap_or(0)),
        }
    }

    /// The room's current state group (the resolved state of its forward extremities).
    pub async fn current_group(&self, room_id: &RoomId) -> Result<i64> {
        match self.streams.room_group(room_id) {
            0 => Ok(self.db.room_state_group_at(room_id, i64::MAX).await?.unwrap_or(0)),
            group => Ok(group),
        }
    }

    /// Creates the handle of a brand-new room (no events yet); `None` if the ID is already taken.
    fn reserve_handle(&self, room_id: &RoomId, version: RoomVersionId) -> Result<Option<Arc<RoomHandle>>> {
        let rules = room_version::rules(&version).ok_or_else(|| Error::Internal("unsupported version".to_owned()))?;
        let handle = Arc::new(RoomHandle {
            room_id: room_id.to_owned(),
            version,
            rules,
            writer: tokio::sync::Mutex::new(WriterState {
                extremities: Vec::new(),
                current: graph::GroupState::default(),
            }),
            pending: Mutex::new(Vec::new()),
        });
        let mut handles = self.handles.lock();
        if handles.contains(room_id) {
            return Ok(None);
        }
        Ok(Some(self.insert_handle(&mut handles, handle)))
    }

    /// Appends events to a room, in order, atomically: either all are persisted or none. Returns
    /// the stored events. `new_room` creates the room row with the first (create) event.
    pub async fn append(
        &self,
        handle: &Arc<RoomHandle>,
        events: Vec<NewEvent>,
        new_room: Option<NewRoom>,
    ) -> Result<Vec<Arc<StoredEvent>>> {
        self.commit(handle, events, new_room, None).await
    }

    /// Takes the room's writer and appends, in a task of its own: the writer's state is updated
    /// after the commit, so the work must not stop half-way when the request that asked for it
    /// goes away (a client that disconnects mid-send), or the room would build on a stale tip.
    async fn commit(
        &self,
        handle: &Arc<RoomHandle>,
        events: Vec<NewEvent>,
        new_room: Option<NewRoom>,
        clock: Option<i64>,
    ) -> Result<Vec<Arc<StoredEvent>>> {
        let rooms = self.me.upgrade().ok_or_else(|| Error::Internal("the rooms service has stopped".to_owned()))?;
        let handle = handle.clone();
        tokio::spawn(async move {
            let mut writer = handle.writer.lock().await;
            rooms.append_with_clock(&handle, &mut writer, events, new_room, clock).await
        })
        .await
        .map_err(|err| Error::Internal(format!("appending failed: {err}")))?
    }

    /// Appends one message. Messages sent to a room while its writer is busy are appended
    /// together by the next writer, in one commit: a busy room then commits many messages per
    /// transaction instead of queueing them one commit at a time (each still gets its own
    /// event, in arrival order, and its own result).
    pub async fn append_message(&self, handle: &Arc<RoomHandle>, event: NewEvent) -> Result<Arc<StoredEvent>> {
        let rooms = self.me.upgrade().ok_or_else(|| Error::Internal("the rooms service has stopped".to_owned()))?;
        let (reply, result) = tokio::sync::oneshot::channel();
        handle.pending.lock().push((event, reply));
        let handle = handle.clone();
        // In a task of its own for the reason given at [`Rooms::commit`]; it also answers the
        // other messages it takes.
        tokio::spawn(async move {
            let mut writer = handle.writer.lock().await;
            let batch = std::mem::take(&mut *handle.pending.lock());
            if !batch.is_empty() {
                rooms.append_batch(&handle, &mut writer, batch).await;
            }
        });
        result.await.map_err(|_| Error::Internal("the room writer dropped a message".to_owned()))?
    }

    async fn append_batch(&self, handle: &RoomHandle, writer: &mut WriterState, batch: Vec<PendingMessage>) {
        let (events, replies): (Vec<NewEvent>, Vec<_>) = batch.into_iter().unzip();
        if events.len() > 1 {
            // All or nothing: if one message is refused (or the batch fails), each is retried on
            // its own so the others still land and the refused one gets its own error.
            if let Ok(stored) = self.append_with_clock(handle, writer, events.clone(), None, None).await
                && stored.len() == replies.len()
            {
                for (reply, event) in replies.into_iter().zip(stored) {
                    let _ = reply.send(Ok(event));
                }
                return;
            }
        }
        for (event, reply) in events.into_iter().zip(replies) {
            let result = self.append_with_clock(handle, writer, vec![event], None, None).await;
            let _ =
                reply.send(result.and_then(|mut stored| {
                    stored.pop().ok_or_else(|| Error::Internal("nothing was appended".to_owned()))
                }));
        }
    }

    /// [`Rooms::append`] with the writer lock held and, optionally, a fixed timestamp.
    ///
    /// Each event points at the forward extremities (all of them, up to
    /// [`graph::MAX_PREV_EVENTS`]), so after it the room has one extremity again and the state
    /// after it is the room's current state: the state moves on one entry at a time, as in a
    /// chain. Only with more extremities than one event may cite is the state before it the
    /// resolution of the branches it cites, and the current state the resolution of what is left.
    async fn append_with_clock(
        &self,
        handle: &RoomHandle,
        writer: &mut WriterState,
        events: Vec<NewEvent>,
        mut new_room: Option<NewRoom>,
        clock: Option<i64>,
    ) -> Result<Vec<Arc<StoredEvent>>> {
        let rules = &handle.rules;
        // The room's current state as this batch moves it.
        let mut current = Working::from(&writer.current);
        // States after events of this batch that did not become the current state.
        let mut batch_states: HashMap<OwnedEventId, Arc<StateMap>> = HashMap::new();
        let mut batch_pdus: HashMap<OwnedEventId, Arc<Pdu>> = HashMap::new();
        let mut built: HashMap<OwnedEventId, Arc<StoredEvent>> = HashMap::new();
        let mut extremities = writer.extremities.clone();
        let mut writes = Vec::with_capacity(events.len());
        let mut stored = Vec::with_capacity(events.len());
        let now = clock.unwrap_or_else(now_ms);

        for new in events {
            if let Some((device, txn)) = &new.txn
                && let Some(existing) = self.db.txn_event(&new.sender, device, &handle.room_id, txn).await?
                && let Some(event) = self.event(&existing).await?
            {
                stored.push(event);
                continue;
            }
            let prevs = graph::choose_prev_events(&extremities);
            let from_current = prevs.len() == extremities.len();
            let mut new_state_groups = Vec::new();
            // The state before the event, then after it.
            let mut state = if from_current {
                std::mem::take(&mut current)
            } else {
                // A busy fork: the state before it is the resolution of the branches it cites.
                let mut states = Vec::with_capacity(prevs.len());
                for (prev, _) in &prevs {
                    states.push(match batch_states.get(prev) {
                        Some(state) => state.clone(),
                        None => self.state_after_event(prev).await?,
                    });
                }
                let resolved = self.resolve_states(handle, &states, &batch_pdus).await?;
                let (before, new_group) = self.derive_group(&current.merged(), resolved);
                new_state_groups.extend(new_group);
                Working::from(&before)
            };
            // Gather the auth state the rules will look at.
            let keys =
                auth::auth_state_keys(&new.template, &new.sender, &rules.authorization).map_err(Error::BadJson)?;
            let mut auth_state = AuthState::new();
            for key in &keys {
                let string_key = (key.0.to_string(), key.1.clone());
                let Some(event_id) = state.get(&string_key) else { continue };
                let event = match built.get(&event_id) {
                    Some(event) => event.clone(),
                    None => self
                        .event(&event_id)
                        .await?
                        .ok_or_else(|| Error::Internal(format!("missing state event {event_id}")))?,
                };
                auth_state.insert(key.clone(), Arc::new(event.pdu.clone()));
            }
            let auth_events: Vec<OwnedEventId> = auth_state
                .values()
                .filter(|event| auth::belongs_in_auth_events(event, &rules.authorization))
                .map(|event| event.event_id.clone())
                .collect();
            let room_id_for_build =
                if new.template.event_type == "m.room.create" && rules.authorization.room_create_event_id_as_room_id {
                    None
                } else {
                    Some(&*handle.room_id)
                };
            let is_create = new.template.event_type == "m.room.create";
            let prev_ids: Vec<OwnedEventId> = prevs.iter().map(|(id, _)| id.clone()).collect();
            let depth = prevs.iter().map(|(_, depth)| *depth).max().unwrap_or(0) + 1;
            let placement = Placement {
                room_id: room_id_for_build,
                sender: &new.sender,
                prev_events: &prev_ids,
                auth_events: &auth_events,
                depth,
                origin_server_ts: MilliSecondsSinceUnixEpoch(UInt::try_from(now).unwrap_or_default()),
            };
            let redacts = new.template.redacts.clone();
            let pdu = Pdu::build(new.template, &placement, rules, &self.server_name, self.keys.key()).map_err(
                |err| match err {
                    BuildError::TooLarge => Error::TooLarge("Event is larger than 65536 bytes".into()),
                    BuildError::Invalid(why) => Error::BadJson(why),
                },
            )?;
            if is_create && pdu.room_id != handle.room_id {
                return Err(Error::Internal("create event does not match the room ID".to_owned()));
            }
            auth::check(&rules.authorization, &pdu, &auth_state).map_err(|why| {
                tracing::debug!(event_type = %pdu.event_type, sender = %pdu.sender, %why, "event refused by the auth rules");
                Error::forbidden(format!("Event not allowed: {why}"))
            })?;

            // State bookkeeping.
            let state_before = state.group;
            let mut replaces_state = None;
            if let Some(state_key) = &pdu.state_key {
                let key = (pdu.event_type.to_string(), state_key.clone());
                replaces_state = state.get(&key);
                new_state_groups.push(self.apply_state_event(&mut state, key, pdu.event_id.clone()));
            }
            let state_after = state.group;
            let pdu = Arc::new(pdu);
            batch_pdus.insert(pdu.event_id.clone(), pdu.clone());
            extremities = graph::extremities_after(&extremities, &prev_ids, (pdu.event_id.clone(), depth));
            let current_change = if from_current {
                // It cites every extremity, so it is the only one now: the state after it is
                // the room's current state.
                current = state;
                match &pdu.state_key {
                    Some(_) => Self::linear_change(&pdu, state_after),
                    None => None,
                }
            } else {
                // Extremities it could not cite remain: current state is the resolution of the
                // state after it and theirs.
                let after = Arc::new(state.merged().map.as_ref().clone());
                batch_states.insert(pdu.event_id.clone(), after.clone());
                let mut states = vec![after];
                for (extremity, _) in extremities.iter().filter(|(id, _)| *id != pdu.event_id) {
                    states.push(match batch_states.get(extremity) {
                        Some(state) => state.clone(),
                        None => self.state_after_event(extremity).await?,
                    });
                }
                let resolved = self.resolve_states(handle, &states, &batch_pdus).await?;
                let old = current.merged();
                let (resolved, new_group) = self.derive_group(&old, resolved);
                new_state_groups.extend(new_group);
                let change = self.current_change(&old.map, &resolved, &batch_pdus).await?;
                current = Working::from(&resolved);
                change
            };
            let (relates_to, rel_type) = relation_of(&pdu);
            let redaction_target = match &redacts {
                Some(target) => self.redaction_target(&handle.room_id, target, rules).await?,
                None => None,
            };
            let event = Arc::new(StoredEvent {
                pdu: (*pdu).clone(),
                stream_pos: 0,
                redacted_by: None,
                soft_failed: false,
                state_before,
                state_after,
                replaces_state: replaces_state.clone(),
                txn: new.txn.clone(),
                txn_known: true,
            });
            built.insert(pdu.event_id.clone(), event.clone());
            writes.push(StreamWrite::Event(Box::new(EventWrite {
                pdu,
                relates_to,
                rel_type,
                state_before,
                state_after,
                replaces_state,
                new_state_groups,
                current: current_change,
                forward_extremities: extremities.iter().map(|(id, _)| id.clone()).collect(),
                soft_failed: false,
                redacted_by: None,
                was_outlier: false,
                txn: new.txn.map(|(device, txn)| (new.sender.clone(), device, txn)),
                redaction_target,
                new_room: new_room.take(),
                backfilled: false,
            })));
            stored.push(event);
        }
        if writes.is_empty() {
            return Ok(stored);
        }
        let count = writes.len() as i64;
        let last_pos = self.streams.persist(writes.clone()).await?;
        self.queue_for_other_servers(&handle.room_id, &writes).await;

        // Committed: advance the writer and fill the caches with the final positions. The
        // writer's map is released first, so extending it does not copy a big room's state.
        writer.current.map = Arc::default();
        writer.current = current.into_group_state();
        writer.extremities = extremities;
        let mut pos = last_pos - count;
        let mut cache = self.events.lock();
        let mut result = Vec::with_capacity(stored.len());
        let mut positions: HashMap<OwnedEventId, i64> = HashMap::new();
        for write in &writes {
            pos += 1;
            let StreamWrite::Event(write) = write else { continue };
            positions.insert(write.pdu.event_id.clone(), pos);
            if let Some((target, _)) = &write.redaction_target {
                cache.redacted(target);
            }
        }
        for event in stored {
            let event = match positions.get(&event.pdu.event_id) {
                Some(&stream_pos) => {
                    let event = Arc::new(StoredEvent { stream_pos, ..(*event).clone() });
                    cache.insert(event.clone());
                    event
                }
                None => event,
            };
            result.push(event);
        }
        Ok(result)
    }

    /// The state after a stored event (of the timeline; a rejected event's is the state before
    /// it, which it did not change).
    pub(super) async fn state_after_event(&self, event_id: &EventId) -> Result<Arc<StateMap>> {
        if let Some(event) = self.timeline_event(event_id).await? {
            return self.state_at(event.state_after).await;
        }
        if let Some(rejected) = self.db.rejected(event_id).await?
            && let Some(group) = rejected.state_group
        {
            return self.state_at(group).await;
        }
        Err(Error::Internal(format!("no state known after {event_id}")))
    }

    /// Applies a state event to a working state: a new group, a delta on the previous one (or a
    /// snapshot every so often).
    fn apply_state_event(&self, state: &mut Working, key: (String, String), event_id: OwnedEventId) -> NewStateGroup {
        state.overlay.insert(key.clone(), event_id.clone());
        let id = self.next_group_id();
        // Big rooms snapshot less often: a snapshot costs a row per state entry.
        let interval = SNAPSHOT_INTERVAL.max((state.base.len() as i64 / 10).min(MAX_SNAPSHOT_INTERVAL));
        let snapshot = state.group == 0 || state.chain_len + 1 >= interval;
        let entries = if snapshot {
            let mut full: StateMap = (*state.base).clone();
            full.extend(state.overlay.iter().map(|(k, v)| (k.clone(), v.clone())));
            full.into_iter().map(|((t, k), e)| (t, k, e)).collect()
        } else {
            vec![(key.0, key.1, event_id)]
        };
        let group = NewStateGroup {
            id,
            prev_group: (state.group != 0).then_some(state.group),
            chain_len: if snapshot { 0 } else { state.chain_len + 1 },
            entries,
        };
        state.chain_len = group.chain_len;
        state.group = id;
        group
    }

    /// The redacted form of `target` to store, if it is an event of this room.
    async fn redaction_target(
        &self,
        room_id: &RoomId,
        target: &EventId,
        rules: &RoomVersionRules,
    ) -> Result<Option<(OwnedEventId, String)>> {
        let Some(event) = self.timeline_event(target).await? else { return Ok(None) };
        if event.pdu.room_id != room_id || event.redacted_by.is_some() {
            return Ok(None);
        }
        let redacted = event.pdu.redacted(rules).map_err(Error::Internal)?;
        Ok(Some((target.to_owned(), redacted.json)))
    }

    /// The power levels content of a room at a state group (defaults when absent).
    pub async fn power_levels_at(&self, handle: &RoomHandle, group: i64) -> Result<PowerLevels> {
        let create = self.state_event_at(group, "m.room.create", "").await?;
        let levels = self.state_event_at(group, "m.room.power_levels", "").await?;
        Ok(PowerLevels::new(create.as_deref(), levels.as_deref(), &handle.rules))
    }
}

/// A state being moved on by a batch of events: a full map plus the batch's changes (so a big
/// room's state is not copied per event), and the group of the whole.
#[derive(Default)]
struct Working {
    base: Arc<StateMap>,
    overlay: StateMap,
    group: i64,
    chain_len: i64,
}

impl Working {
    fn from(state: &graph::GroupState) -> Working {
        Working { base: state.map.clone(), overlay: StateMap::new(), group: state.group, chain_len: state.chain_len }
    }

    fn get(&self, key: &(String, String)) -> Option<OwnedEventId> {
        self.overlay.get(key).or_else(|| self.base.get(key)).cloned()
    }

    /// The whole state as a group state (copies the map when the batch changed it).
    fn merged(&self) -> graph::GroupState {
        let map = if self.overlay.is_empty() {
            self.base.clone()
        } else {
            let mut map = (*self.base).clone();
            map.extend(self.overlay.iter().map(|(k, v)| (k.clone(), v.clone())));
            Arc::new(map)
        };
        graph::GroupState { group: self.group, chain_len: self.chain_len, map }
    }

    /// The whole state, extending the map in place when nothing else holds it.
    fn into_group_state(self) -> graph::GroupState {
        let mut map = self.base;
        if !self.overlay.is_empty() {
            Arc::make_mut(&mut map).extend(self.overlay);
        }
        graph::GroupState { group: self.group, chain_len: self.chain_len, map }
    }
}

/// A room's power levels, with the creator rules of the room version applied.
#[derive(Debug, Clone)]
pub struct PowerLevels {
    content: Value,
    /// Users with infinite power (room version 12 creators).
    creators: Vec<OwnedUserId>,
    explicit: bool,
    room_creator: Option<OwnedUserId>,
}

impl PowerLevels {
    fn new(create: Option<&StoredEvent>, levels: Option<&StoredEvent>, rules: &RoomVersionRules) -> PowerLevels {
        let mut creators = Vec::new();
        let room_creator = create.map(|c| c.pdu.sender.clone());
        if rules.authorization.explicitly_privilege_room_creators
            && let Some(create) = create
        {
            creators.push(create.pdu.sender.clone());
            if let Some(extra) = create.pdu.content_value().get("additional_creators").and_then(Value::as_array) {
                creators.extend(extra.iter().filter_map(|u| u.as_str()).filter_map(|u| UserId::parse(u).ok()));
            }
        }
        PowerLevels {
            content: levels.map(|l| l.pdu.content_value()).unwrap_or(Value::Null),
            creators,
            explicit: levels.is_some(),
            room_creator,
        }
    }

    fn int(&self, field: &str, default: i64) -> i64 {
        self.content.get(field).and_then(as_int).unwrap_or(default)
    }

    /// A user's level (`i64::MAX` for v12 creators).
    pub fn user_level(&self, user_id: &UserId) -> i64 {
        if self.creators.iter().any(|c| c == user_id) {
            return i64::MAX;
        }
        if !self.explicit {
            // Without a power levels event, the creator has 100 and everyone else 0.
            return if self.room_creator.as_deref() == Some(user_id) { 100 } else { 0 };
        }
        self.content
            .get("users")
            .and_then(|users| users.get(user_id.as_str()))
            .and_then(as_int)
            .unwrap_or_else(|| self.int("users_default", 0))
    }

    /// Level needed to send an event of `event_type` (state or not).
    pub fn event_level(&self, event_type: &str, is_state: bool) -> i64 {
        if let Some(level) = self.content.get("events").and_then(|e| e.get(event_type)).and_then(as_int) {
            return level;
        }
        if is_state {
            self.int("state_default", if self.explicit { 50 } else { 0 })
        } else {
            self.int("events_default", 0)
        }
    }

    pub fn invite(&self) -> i64 {
        self.int("invite", 0)
    }
    pub fn kick(&self) -> i64 {
        self.int("kick", 50)
    }
    pub fn ban(&self) -> i64 {
        self.int("ban", 50)
    }
    pub fn redact(&self) -> i64 {
        self.int("redact", 50)
    }

    /// The level for `@room` notifications.
    pub fn notifications_room(&self) -> i64 {
        self.content.get("notifications").and_then(|n| n.get("room")).and_then(as_int).unwrap_or(50)
    }

    pub fn content(&self) -> &Value {
        &self.content
    }

    /// Users with infinite power (room version 12 creators).
    pub fn creators(&self) -> &[OwnedUserId] {
        &self.creators
    }
}

/// Power levels may be integers or (in old rooms) strings of integers.
fn as_int(value: &Value) -> Option<i64> {
    value.as_i64().or_else(|| value.as_str().and_then(|s| s.trim().parse().ok()))
}

/// The membership change a member event makes.
fn membership_change(pdu: &Pdu) -> Option<MembershipChange> {
    if pdu.event_type != TimelineEventType::RoomMember {
        return None;
    }
    let user_id = UserId::parse(pdu.state_key.as_deref()?).ok()?;
    let content = pdu.content_value();
    Some(MembershipChange {
        event_id: pdu.event_id.clone(),
        user_id,
        membership: content.get("membership").and_then(Value::as_str).unwrap_or("leave").to_owned(),
        sender: pdu.sender.clone(),
        displayname: content.get("displayname").and_then(Value::as_str).map(str::to_owned),
        avatar_url: content.get("avatar_url").and_then(Value::as_str).map(str::to_owned),
    })
}

/// `content.m.relates_to` as (related event, relation type).
fn relation_of(pdu: &Pdu) -> (Option<OwnedEventId>, Option<String>) {
    let content = pdu.content_value();
    let Some(relates_to) = content.get("m.relates_to") else { return (None, None) };
    let rel_type = relates_to.get("rel_type").and_then(Value::as_str);
    let event_id = relates_to.get("event_id").and_then(Value::as_str).and_then(|id| EventId::parse(id).ok());
    match (event_id, rel_type) {
        (Some(event_id), Some(rel_type)) => (Some(event_id), Some(rel_type.to_owned())),
        _ => (None, None),
    }
}

/// Helper for building state keys from ruma types.
pub fn state_key(event_type: StateEventType, state_key: &str) -> StateKey {
    (event_type, state_key.to_owned())
}
