//! Events from other servers: [`Rooms::receive_pdu`] runs the checks on receipt of a PDU in the
//! spec's order and persists the event through the same stream writer as local events;
//! [`Rooms::store_outliers`] keeps events known without their place in the graph.
//!
//! Server-Server API, "Checks performed on receipt of a PDU": (1) format, else dropped; (2) the
//! signatures of the sender's server (and of the authorising server of a restricted join), else
//! dropped; (3) the content hash, else the redacted form is kept; (4) the auth rules against its
//! own `auth_events`, (5) against the state before it, else rejected; (6) against the current
//! state, else soft-failed. No network IO here: the caller (the federation layer) fetched the
//! signing keys and any missing auth events first, so nothing waits on a peer while the room's
//! writer lock is held.

use std::{collections::HashSet, sync::Arc};

use ruma::{
    CanonicalJsonObject, EventId, OwnedEventId, RoomId, RoomVersionId, ServerName,
    signatures::{PublicKeyMap, Verified},
};

use super::{
    PowerLevels, RoomHandle, Rooms, StateMap, StoredEvent, WriterState,
    graph::{self, GroupState},
    relation_of,
};
use crate::{
    error::{Error, Result},
    matrix::{
        auth::{self, AuthState},
        pdu::{self, Pdu},
        state_res::EventMap,
    },
    service::now_ms,
    storage::{
        rooms::{OutlierRow, RejectedRow},
        stream::{EventWrite, NewRoom, StreamWrite},
    },
};

/// How many events [`Rooms::receive_pdu`] looks at to find the place of an event whose prev
/// events were rejected without one (it walks through them to their own prev events): a peer
/// cannot make it walk a long rejected chain.
const MAX_REJECTED_PREVS: usize = 100;

/// What became of a received PDU. None of these is an error of the request that carried it: a
/// transaction answers each PDU with its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// In the room's graph and timeline at this stream position.
    Accepted { event_id: OwnedEventId, stream_pos: i64 },
    /// Allowed at its place in the graph but not by the current state (a banned user's late
    /// message): stored, never sent to clients, never a prev event of ours.
    SoftFailed { event_id: OwnedEventId, stream_pos: i64 },
    /// Refused by the auth rules; recorded, so it is never used or checked again.
    Rejected { event_id: OwnedEventId, reason: String },
    /// Malformed or not signed by its server: not stored at all.
    Dropped { reason: String },
    /// Already stored.
    AlreadyKnown { event_id: OwnedEventId },
    /// It cites events we do not have (prev events not in the graph, auth events not stored):
    /// the caller fetches them and tries again. Nothing was stored.
    MissingEvents { event_id: OwnedEventId, missing: Vec<OwnedEventId> },
}

/// What [`Rooms::store_outliers`] did with a batch.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OutlierReport {
    pub stored: usize,
    pub already_known: usize,
    pub rejected: usize,
    /// Malformed, wrongly signed, of another room, or citing auth events nobody supplied.
    pub dropped: usize,
}

/// A received event placed in the graph, on its way to the commit.
struct Placed {
    pdu: Pdu,
    was_redacted: bool,
    before: GroupState,
    /// Its state before is the room's current state (it cites every forward extremity).
    before_is_current: bool,
    soft_failed: bool,
    new_state_groups: Vec<crate::storage::stream::NewStateGroup>,
    /// The room row, for the first event of a room this server did not know.
    new_room: Option<NewRoom>,
}

/// A received PDU past the checks that need no room state (1–3).
pub(super) struct Checked {
    pub(super) pdu: Pdu,
    /// The content hash did not match: `pdu` is the redacted form.
    pub(super) was_redacted: bool,
}

/// The ID of a room version 12 create event, which is the room ID's hash (it cites no
/// create event in `auth_events`, yet the rules need it).
fn create_event_id(handle: &RoomHandle) -> Option<OwnedEventId> {
    if !handle.rules.authorization.room_create_event_id_as_room_id {
        return None;
    }
    EventId::parse(format!("${}", &handle.room_id.as_str()[1..])).ok()
}

impl Rooms {
    /// What every received PDU goes through first: the checks of [`Self::check_received`] (a
    /// failure drops it), then whether it is already in the timeline or was rejected before.
    pub(super) async fn screen(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        handle: &RoomHandle,
        pdu: CanonicalJsonObject,
        keys: &PublicKeyMap,
    ) -> Result<Result<Checked, Outcome>> {
        let checked = match self.check_received(handle, pdu, keys) {
            Ok(checked) => checked,
            Err(reason) => {
                tracing::info!(%origin, %room_id, %reason, "dropped a received event");
                return Ok(Err(Outcome::Dropped { reason }));
            }
        };
        let event_id = checked.pdu.event_id.clone();
        if self.timeline_event(&event_id).await?.is_some() {
            return Ok(Err(Outcome::AlreadyKnown { event_id }));
        }
        if let Some(rejected) = self.db.rejected(&event_id).await? {
            return Ok(Err(Outcome::Rejected { event_id, reason: rejected.reason }));
        }
        Ok(Ok(checked))
    }

    /// Steps 1–4 for an event about to be placed: [`Self::screen`], then the auth rules
    /// against its own auth events. `Err` is what to answer instead (dropped, already known,
    /// rejected, or missing auth events).
    pub(super) async fn check_up_to_auth_events(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        handle: &RoomHandle,
        pdu: CanonicalJsonObject,
        keys: &PublicKeyMap,
    ) -> Result<Result<Checked, Outcome>> {
        let checked = match self.screen(origin, room_id, handle, pdu, keys).await? {
            Ok(checked) => checked,
            Err(outcome) => return Ok(Err(outcome)),
        };
        let event_id = checked.pdu.event_id.clone();
        match self.check_auth_events(handle, &checked.pdu, &EventMap::new()).await? {
            Ok(()) => Ok(Ok(checked)),
            Err(Ok(missing)) => Ok(Err(Outcome::MissingEvents { event_id, missing })),
            Err(Err(reason)) => Ok(Err(self.reject(&checked.pdu, format!("auth events: {reason}"), None).await?)),
        }
    }

    /// [`Self::place_with_state`] under the room's writer, in a task of its own (the writer's
    /// state moves on after the commit, which must not be abandoned half-way).
    async fn place_with_state_held(
        &self,
        handle: Arc<RoomHandle>,
        checked: Checked,
        state: StateMap,
    ) -> Result<Outcome> {
        let rooms = self.me.upgrade().ok_or_else(|| Error::Internal("the rooms service has stopped".to_owned()))?;
        tokio::spawn(async move {
            let mut writer = handle.writer.lock().await;
            rooms.place_with_state(&handle, &mut writer, checked, state).await
        })
        .await
        .map_err(|err| Error::Internal(format!("receiving failed: {err}")))?
    }

    /// Steps 1–3 of the checks on receipt: format, signatures, content hash.
    fn check_received(
        &self,
        handle: &RoomHandle,
        object: CanonicalJsonObject,
        keys: &PublicKeyMap,
    ) -> Result<Checked, String> {
        let rules = &handle.rules;
        pdu::check_format(&object, rules).map_err(|err| match err {
            pdu::FormatError::TooLarge => format!("larger than {} bytes", pdu::MAX_PDU_BYTES),
            pdu::FormatError::Invalid(why) => why,
        })?;
        let parsed = Pdu::from_received(&object, rules)?;
        if parsed.room_id != handle.room_id {
            return Err(format!("event of room {}, not {}", parsed.room_id, handle.room_id));
        }
        match ruma::signatures::verify_event(keys, &object, rules) {
            Err(err) => Err(format!("signature check failed: {err}")),
            Ok(Verified::All) => Ok(Checked { pdu: parsed, was_redacted: false }),
            Ok(Verified::Signatures) => {
                // The content was altered (or redacted on the way): keep and serve only what
                // the signature covers.
                let redacted = parsed.redacted(rules)?;
                Ok(Checked { pdu: redacted, was_redacted: true })
            }
        }
    }

    /// Step 4: the auth rules against the event's own `auth_events`. `Err(Ok(missing))` when
    /// some are unknown, `Err(Err(reason))` when it is rejected.
    pub(super) async fn check_auth_events(
        &self,
        handle: &RoomHandle,
        pdu: &Pdu,
        batch: &EventMap,
    ) -> Result<std::result::Result<(), std::result::Result<Vec<OwnedEventId>, String>>> {
        let mut ids: Vec<OwnedEventId> = pdu.auth_events.clone();
        if pdu.event_type != ruma::events::TimelineEventType::RoomCreate
            && let Some(create) = create_event_id(handle)
        {
            ids.push(create);
        }
        let mut auth_events = EventMap::new();
        let mut wanted: Vec<&EventId> = Vec::new();
        for id in &ids {
            match batch.get(id) {
                Some(event) => {
                    auth_events.insert(id.clone(), event.clone());
                }
                None => wanted.push(id),
            }
        }
        auth_events.extend(self.pdus_by_id(&wanted).await?);
        let mut missing = Vec::new();
        for id in &ids {
            if auth_events.contains_key(id) {
                continue;
            }
            if let Some(rejected) = self.db.rejected(id).await? {
                return Ok(Err(Err(format!("cites the rejected event {id}: {}", rejected.reason))));
            }
            missing.push(id.clone());
        }
        if !missing.is_empty() {
            return Ok(Err(Ok(missing)));
        }
        Ok(auth::check_against_auth_events(&handle.rules.authorization, pdu, &auth_events).map_err(Err))
    }

    /// The events of `state` at the keys the auth rules look at for `pdu`.
    pub(super) async fn auth_state_for(&self, handle: &RoomHandle, pdu: &Pdu, state: &StateMap) -> Result<AuthState> {
        let keys = auth::auth_state_keys_of(pdu, &handle.rules.authorization).map_err(Error::BadJson)?;
        let ids: Vec<(auth::StateKey, OwnedEventId)> = keys
            .into_iter()
            .filter_map(|key| state.get(&(key.0.to_string(), key.1.clone())).map(|id| (key, id.clone())))
            .collect();
        let wanted: Vec<&EventId> = ids.iter().map(|(_, id)| &**id).collect();
        let events = self.pdus_by_id(&wanted).await?;
        Ok(ids.into_iter().filter_map(|(key, id)| events.get(&id).map(|event| (key, event.clone()))).collect())
    }

    pub(super) async fn reject(&self, pdu: &Pdu, reason: String, state_group: Option<i64>) -> Result<Outcome> {
        tracing::info!(event_id = %pdu.event_id, room_id = %pdu.room_id, %reason, "rejected a received event");
        let row = RejectedRow {
            event_id: pdu.event_id.clone(),
            room_id: pdu.room_id.clone(),
            reason: reason.clone(),
            state_group,
            depth: pdu.depth as i64,
            json: pdu.json.clone(),
        };
        self.db.record_rejected(&row, now_ms()).await?;
        Ok(Outcome::Rejected { event_id: pdu.event_id.clone(), reason })
    }

    /// Receives a PDU of `room_id` from `origin`: the checks on receipt in the spec's order,
    /// then (unless dropped or rejected) persistence through the stream writer with the state
    /// after it, the new forward extremities and the room's new current state, and wake-ups.
    ///
    /// `keys` are the signing keys of the servers whose signatures the event needs (fetched by
    /// the caller); `auth_events` are events the caller fetched that it cites, stored first as
    /// outliers. Prev events must already be in the graph, else [`Outcome::MissingEvents`].
    pub async fn receive_pdu(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        pdu: CanonicalJsonObject,
        keys: &PublicKeyMap,
        auth_events: Vec<CanonicalJsonObject>,
    ) -> Result<Outcome> {
        let handle = self.handle(room_id).await?;
        let checked = match self.screen(origin, room_id, &handle, pdu, keys).await? {
            Ok(checked) => checked,
            Err(outcome) => return Ok(outcome),
        };
        let event_id = checked.pdu.event_id.clone();
        if !auth_events.is_empty() {
            self.store_outliers(room_id, auth_events, keys).await?;
        }
        match self.check_auth_events(&handle, &checked.pdu, &EventMap::new()).await? {
            Ok(()) => {}
            Err(Ok(missing)) => return Ok(Outcome::MissingEvents { event_id, missing }),
            Err(Err(reason)) => return self.reject(&checked.pdu, format!("auth events: {reason}"), None).await,
        }
        // The rest under the room's writer, in a task of its own: the writer's state moves on
        // after the commit, which must not be abandoned half-way (see `Rooms::commit`).
        let rooms = self.me.upgrade().ok_or_else(|| Error::Internal("the rooms service has stopped".to_owned()))?;
        tokio::spawn(async move {
            let mut writer = handle.writer.lock().await;
            rooms.place_received(&handle, &mut writer, checked).await
        })
        .await
        .map_err(|err| Error::Internal(format!("receiving failed: {err}")))?
    }

    /// Steps 5 and 6 and persistence, with the room's writer held.
    async fn place_received(&self, handle: &RoomHandle, writer: &mut WriterState, checked: Checked) -> Result<Outcome> {
        let Checked { pdu, was_redacted } = checked;
        let event_id = pdu.event_id.clone();
        if self.timeline_event(&event_id).await?.is_some() {
            return Ok(Outcome::AlreadyKnown { event_id });
        }
        // Where it sits: the states after its prev events. A rejected event changed nothing, so
        // the state after it is the state before it: its recorded group, or, when it was refused
        // before it had a place (by its own auth events), the states after its own prev events.
        let mut prev_groups = Vec::with_capacity(pdu.prev_events.len());
        let mut missing = Vec::new();
        let mut prevs: Vec<OwnedEventId> = pdu.prev_events.clone();
        let mut seen: HashSet<OwnedEventId> = HashSet::new();
        let mut next = 0;
        while let Some(prev) = prevs.get(next).cloned() {
            next += 1;
            if !seen.insert(prev.clone()) {
                continue;
            }
            if next > MAX_REJECTED_PREVS {
                return Ok(Outcome::Dropped { reason: "cites too long a chain of rejected events".to_owned() });
            }
            if let Some(event) = self.timeline_event(&prev).await? {
                prev_groups.push(event.state_after);
            } else if let Some(rejected) = self.db.rejected(&prev).await? {
                match rejected.state_group {
                    Some(group) => prev_groups.push(group),
                    None => {
                        let event = Pdu::from_json(rejected.json, rejected.room_id, rejected.event_id)
                            .map_err(Error::Internal)?;
                        prevs.extend(event.prev_events);
                    }
                }
            } else {
                missing.push(prev);
            }
        }
        if prev_groups.is_empty() && missing.is_empty() {
            // Only a create event starts a graph, and this room has one.
            return Ok(Outcome::Dropped { reason: "no prev events".to_owned() });
        }
        if !missing.is_empty() {
            return Ok(Outcome::MissingEvents { event_id, missing });
        }
        let mut new_state_groups = Vec::new();
        let extremity_ids: HashSet<&EventId> = writer.extremities.iter().map(|(id, _)| &**id).collect();
        let prev_ids: HashSet<&EventId> = pdu.prev_events.iter().map(|id| &**id).collect();
        let before_is_current = extremity_ids == prev_ids;
        let before: GroupState = if before_is_current {
            writer.current.clone()
        } else if prev_groups.iter().all(|g| *g == prev_groups[0]) {
            self.group_state(prev_groups[0]).await?
        } else {
            let mut states = Vec::with_capacity(prev_groups.len());
            for group in &prev_groups {
                states.push(self.state_at(*group).await?);
            }
            let resolved = self.resolve_states(handle, &states, &EventMap::new()).await?;
            let base = self.group_state(prev_groups[0]).await?;
            let (before, new_group) = self.derive_group(&base, resolved);
            new_state_groups.extend(new_group);
            before
        };
        let before_is_stored = new_state_groups.is_empty();

        // Step 5: against the state before it.
        let rules = &handle.rules.authorization;
        let before_auth = self.auth_state_for(handle, &pdu, &before.map).await?;
        if let Err(why) = auth::check_against_state(rules, &pdu, &before_auth) {
            return self
                .reject(&pdu, format!("state before it: {why}"), before_is_stored.then_some(before.group))
                .await;
        }
        // Step 6: against the current state. Soft-fail rather than reject: the event passed
        // auth at its own place in the DAG, so other servers keep it; we only keep it out of
        // clients' timelines and our forward extremities.
        let soft_failed = !before_is_current && {
            let current_auth = self.auth_state_for(handle, &pdu, &writer.current.map).await?;
            auth::check_against_state(rules, &pdu, &current_auth).is_err()
        };

        self.commit_placed(
            handle,
            writer,
            Placed { pdu, was_redacted, before, before_is_current, soft_failed, new_state_groups, new_room: None },
        )
        .await
    }

    /// Places a received event whose prev events we do not have, with the state before it that
    /// the caller fetched: the state and auth chain of a `send_join` response, or the state at
    /// an event across a gap. The state and auth chain are stored as outliers first (checked as
    /// [`Rooms::store_outliers`] checks them); the event then gets the usual checks, with that
    /// state (its events that passed) as the state before it. For a room this server does not
    /// know yet, `version` creates it, and the event is its one forward extremity.
    #[allow(clippy::too_many_arguments)] // The parts of a send_join response, as they come.
    pub async fn receive_with_state(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        version: &RoomVersionId,
        pdu: CanonicalJsonObject,
        state: Vec<CanonicalJsonObject>,
        auth_chain: Vec<CanonicalJsonObject>,
        keys: &PublicKeyMap,
    ) -> Result<Outcome> {
        let result = self.receive_with_state_held(origin, room_id, version, pdu, state, auth_chain, keys).await;
        if !matches!(result, Ok(Outcome::Accepted { .. } | Outcome::SoftFailed { .. })) {
            // A handle reserved for a room that did not come to be must not make it look known.
            self.release_idle_handle(room_id);
        }
        result
    }

    #[allow(clippy::too_many_arguments)] // As `receive_with_state`.
    async fn receive_with_state_held(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        version: &RoomVersionId,
        pdu: CanonicalJsonObject,
        state: Vec<CanonicalJsonObject>,
        auth_chain: Vec<CanonicalJsonObject>,
        keys: &PublicKeyMap,
    ) -> Result<Outcome> {
        let handle = match self.handle(room_id).await {
            Ok(handle) => handle,
            Err(Error::NotFound(_)) => match self.reserve_handle(room_id, version.clone())? {
                Some(handle) => handle,
                None => self.handle(room_id).await?,
            },
            Err(err) => return Err(err),
        };
        let checked = match self.screen(origin, room_id, &handle, pdu, keys).await? {
            Ok(checked) => checked,
            Err(outcome) => return Ok(outcome),
        };
        let event_id = checked.pdu.event_id.clone();
        let mut keyed: Vec<((String, String), OwnedEventId)> = Vec::with_capacity(state.len());
        for object in &state {
            if let Ok(event) = Pdu::from_received(object, &handle.rules)
                && let Some(state_key) = &event.state_key
            {
                keyed.push(((event.event_type.to_string(), state_key.clone()), event.event_id.clone()));
            }
        }
        let mut outliers = auth_chain;
        outliers.extend(state);
        self.store_outliers(room_id, outliers, keys).await?;
        let ids: Vec<&EventId> = keyed.iter().map(|(_, id)| &**id).collect();
        let stored = self.pdus_by_id(&ids).await?;
        let state_map: StateMap = keyed.into_iter().filter(|(_, id)| stored.contains_key(id)).collect();
        match self.check_auth_events(&handle, &checked.pdu, &EventMap::new()).await? {
            Ok(()) => {}
            Err(Ok(missing)) => return Ok(Outcome::MissingEvents { event_id, missing }),
            Err(Err(reason)) => return self.reject(&checked.pdu, format!("auth events: {reason}"), None).await,
        }
        self.place_with_state_held(handle, checked, state_map).await
    }

    /// Whether `event_id` has its place in the room graph: in the timeline, or rejected (a
    /// rejected event is a known point of the graph too). Outliers do not count.
    pub async fn is_placed(&self, event_id: &EventId) -> Result<bool> {
        Ok(self.timeline_event(event_id).await?.is_some() || self.db.rejected(event_id).await?.is_some())
    }

    /// The room's forward extremities now (waits for a write in progress).
    pub async fn forward_extremities(&self, room_id: &RoomId) -> Result<Vec<OwnedEventId>> {
        let handle = self.handle(room_id).await?;
        let writer = handle.writer.lock().await;
        Ok(writer.extremities.iter().map(|(id, _)| id.clone()).collect())
    }

    /// The state map of the stored events `ids` (outliers included), keyed by type and state key;
    /// unknown and non-state events are left out.
    pub async fn state_map_of(&self, ids: &[OwnedEventId]) -> Result<StateMap> {
        let wanted: Vec<&EventId> = ids.iter().map(|id| &**id).collect();
        let events = self.pdus_by_id(&wanted).await?;
        Ok(events
            .values()
            .filter_map(|pdu| {
                let state_key = pdu.state_key.clone()?;
                Some(((pdu.event_type.to_string(), state_key), pdu.event_id.clone()))
            })
            .collect())
    }

    /// The state before an event of `room_id` with prev events `prevs`, some of which this server
    /// does not hold: `remote` is, for each of those, the state after it as another server gave it
    /// (its events stored); for the prevs we hold, the state after each is ours. One state is
    /// the answer; several are resolved.
    pub async fn state_across_gap(
        &self,
        room_id: &RoomId,
        prevs: &[OwnedEventId],
        remote: Vec<StateMap>,
    ) -> Result<StateMap> {
        let handle = self.handle(room_id).await?;
        let mut states: Vec<Arc<StateMap>> = remote.into_iter().map(Arc::new).collect();
        for prev in prevs {
            if self.is_placed(prev).await? {
                states.push(self.state_after_event(prev).await?);
            }
        }
        if states.is_empty() {
            return Err(Error::Internal("no state known before the event".to_owned()));
        }
        self.resolve_states(&handle, &states, &EventMap::new()).await
    }

    /// Receives a PDU of a room this server is in, some of whose prev events it does not hold,
    /// with `state` as the state before it (worked out by [`Rooms::state_across_gap`], every
    /// event of it stored). It gets the checks on receipt with that state; it joins the forward
    /// extremities without replacing those it does not cite, and the history behind it stays a
    /// gap until backfill fills it.
    pub async fn receive_with_state_before(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        pdu: CanonicalJsonObject,
        keys: &PublicKeyMap,
        state: StateMap,
    ) -> Result<Outcome> {
        let handle = self.handle(room_id).await?;
        match self.check_up_to_auth_events(origin, room_id, &handle, pdu, keys).await? {
            Ok(checked) => self.place_with_state_held(handle, checked, state).await,
            Err(outcome) => Ok(outcome),
        }
    }

    /// Steps 5 and 6 and persistence for [`Rooms::receive_with_state`], with the writer held.
    async fn place_with_state(
        &self,
        handle: &RoomHandle,
        writer: &mut WriterState,
        checked: Checked,
        state: StateMap,
    ) -> Result<Outcome> {
        let Checked { pdu, was_redacted } = checked;
        if self.timeline_event(&pdu.event_id).await?.is_some() {
            return Ok(Outcome::AlreadyKnown { event_id: pdu.event_id.clone() });
        }
        let room = self.db.room(&handle.room_id).await?;
        let (before, new_group) = self.derive_group(&GroupState::default(), state);
        let new_state_groups: Vec<_> = new_group.into_iter().collect();
        let rules = &handle.rules.authorization;
        let before_auth = self.auth_state_for(handle, &pdu, &before.map).await?;
        if let Err(why) = auth::check_against_state(rules, &pdu, &before_auth) {
            return self.reject(&pdu, format!("state before it: {why}"), None).await;
        }
        // A rejoin of a room this server had left: what it holds as current state and forward
        // extremities stopped at its last user's leave (nothing reached it since), so the state
        // the resident server sent is the truth and the join is the one extremity — judging it
        // by the stale state would soft-fail a join after an unban.
        let is_rejoin = room.is_some() && !self.has_local_member(&handle.room_id);
        let soft_failed = room.is_some() && !is_rejoin && writer.current.group != 0 && {
            let current_auth = self.auth_state_for(handle, &pdu, &writer.current.map).await?;
            auth::check_against_state(rules, &pdu, &current_auth).is_err()
        };
        let new_room = match room {
            Some(_) => None,
            None => {
                let create = before.map.get(&("m.room.create".to_owned(), String::new())).cloned();
                let create = match create {
                    Some(id) => self.pdus_by_id(&[&id]).await?.remove(&id),
                    None => None,
                };
                let Some(create) = create else {
                    return self.reject(&pdu, "the state before it has no create event".to_owned(), None).await;
                };
                Some(NewRoom {
                    room_version: handle.version.to_string(),
                    creator: create.sender.clone(),
                    is_public: false,
                    created_ts: now_ms(),
                    alias: None,
                    upgrade_of: None,
                })
            }
        };
        let stale_extremities = is_rejoin.then(|| std::mem::take(&mut writer.extremities));
        let placed =
            Placed { pdu, was_redacted, before, before_is_current: false, soft_failed, new_state_groups, new_room };
        let result = self.commit_placed(handle, writer, placed).await;
        if result.is_err()
            && let Some(extremities) = stale_extremities
        {
            writer.extremities = extremities;
        }
        result
    }

    /// The rest of placing a received event whose state before is known and which passed the
    /// checks: its state after, the forward extremities and current state after it, redactions
    /// of it or by it, and the commit.
    async fn commit_placed(&self, handle: &RoomHandle, writer: &mut WriterState, placed: Placed) -> Result<Outcome> {
        let Placed { pdu, was_redacted, before, before_is_current, soft_failed, mut new_state_groups, new_room } =
            placed;
        let event_id = pdu.event_id.clone();
        let (after, replaces_state) = self.state_after_placed(&before, &pdu, &mut new_state_groups);

        // The forward extremities and the room's current state after it.
        let pdu = Arc::new(pdu);
        let (extremities, current_change, current) = if soft_failed {
            (writer.extremities.clone(), None, writer.current.clone())
        } else {
            let extremities =
                graph::extremities_after(&writer.extremities, &pdu.prev_events, (event_id.clone(), pdu.depth));
            let batch = std::collections::HashMap::from([(event_id.clone(), pdu.clone())]);
            if extremities.len() == 1 {
                let change = if before_is_current {
                    pdu.state_key.as_ref().and_then(|_| Self::linear_change(&pdu, after.group))
                } else {
                    self.current_change(&writer.current.map, &after, &batch).await?
                };
                (extremities, change, after.clone())
            } else {
                // Several branches remain: current state is their resolution.
                let mut states = vec![after.map.clone()];
                for (extremity, _) in extremities.iter().filter(|(id, _)| *id != event_id) {
                    states.push(self.state_after_event(extremity).await?);
                }
                let resolved = self.resolve_states(handle, &states, &batch).await?;
                let (current, new_group) = self.derive_group(&writer.current, resolved);
                new_state_groups.extend(new_group);
                let change = self.current_change(&writer.current.map, &current, &batch).await?;
                (extremities, change, current)
            }
        };

        // Redactions: of a target we have, or of this event, received before it.
        let redaction_target =
            if soft_failed { None } else { self.redaction_of_held(handle, &pdu, &before.map).await? };
        let (stored_pdu, redacted_by) = self.apply_held_redaction(handle, &pdu).await?;
        if was_redacted {
            tracing::info!(%event_id, "a received event's content hash did not match; stored redacted");
        }

        let (relates_to, rel_type) = relation_of(&stored_pdu);
        let was_outlier = self.db.is_outlier(&event_id).await?;
        let write = EventWrite {
            pdu: stored_pdu.clone(),
            relates_to,
            rel_type,
            state_before: before.group,
            state_after: after.group,
            replaces_state: replaces_state.clone(),
            new_state_groups,
            current: current_change,
            forward_extremities: extremities.iter().map(|(id, _)| id.clone()).collect(),
            soft_failed,
            redacted_by: redacted_by.clone(),
            was_outlier,
            txn: None,
            redaction_target: redaction_target.clone(),
            new_room,
            backfilled: false,
        };
        let stream_pos = self.streams.persist(vec![StreamWrite::Event(Box::new(write))]).await?;

        // Committed: the writer moves on, the caches learn the event.
        writer.extremities = extremities;
        writer.current = current;
        let mut cache = self.events.lock();
        if let Some((target, _)) = &redaction_target {
            cache.redacted(target);
        }
        cache.insert(Arc::new(StoredEvent {
            pdu: (*stored_pdu).clone(),
            stream_pos,
            redacted_by,
            soft_failed,
            state_before: before.group,
            state_after: after.group,
            replaces_state,
            txn: None,
            txn_known: true,
        }));
        Ok(if soft_failed {
            Outcome::SoftFailed { event_id, stream_pos }
        } else {
            Outcome::Accepted { event_id, stream_pos }
        })
    }

    /// The state after a placed event: `before` with it at its key when it is a state event
    /// (a new group, added to `new_groups`), and the event it replaced there.
    pub(super) fn state_after_placed(
        &self,
        before: &GroupState,
        pdu: &Pdu,
        new_groups: &mut Vec<crate::storage::stream::NewStateGroup>,
    ) -> (GroupState, Option<OwnedEventId>) {
        let Some(state_key) = &pdu.state_key else { return (before.clone(), None) };
        let key = (pdu.event_type.to_string(), state_key.clone());
        let replaces = before.map.get(&key).cloned();
        let mut map = (*before.map).clone();
        map.insert(key, pdu.event_id.clone());
        let (after, new_group) = self.derive_group(before, map);
        new_groups.extend(new_group);
        (after, replaces)
    }

    /// When `pdu` is a redaction of an event we hold, not yet redacted, that it may redact (by
    /// `state`, the state before it): the target's ID and its redacted form, to store.
    pub(super) async fn redaction_of_held(
        &self,
        handle: &RoomHandle,
        pdu: &Pdu,
        state: &StateMap,
    ) -> Result<Option<(OwnedEventId, String)>> {
        let Some(target) = pdu.redacts.as_ref() else { return Ok(None) };
        let Some(target_event) = self.timeline_event(target).await? else { return Ok(None) };
        if target_event.pdu.room_id != handle.room_id
            || target_event.redacted_by.is_some()
            || !self.may_redact(handle, pdu, &target_event.pdu, state).await?
        {
            return Ok(None);
        }
        let redacted = target_event.pdu.redacted(&handle.rules).map_err(Error::Internal)?;
        Ok(Some((target.clone(), redacted.json)))
    }

    /// A redaction of `pdu` received before it (kept by target) that may redact it: the form to
    /// store (redacted, or `pdu` as it is) and the redaction's ID.
    pub(super) async fn apply_held_redaction(
        &self,
        handle: &RoomHandle,
        pdu: &Arc<Pdu>,
    ) -> Result<(Arc<Pdu>, Option<OwnedEventId>)> {
        for redaction_id in self.db.redactions_of(&pdu.event_id).await? {
            let Some(redaction) = self.timeline_event(&redaction_id).await? else { continue };
            if redaction.pdu.room_id != handle.room_id || redaction.soft_failed {
                continue;
            }
            let state = self.state_at(redaction.state_before).await?;
            if self.may_redact(handle, &redaction.pdu, pdu, &state).await? {
                return Ok((Arc::new(pdu.redacted(&handle.rules).map_err(Error::Internal)?), Some(redaction_id)));
            }
        }
        Ok((pdu.clone(), None))
    }

    /// Whether `redaction` may redact `target` (room versions 3+, applied when both are known):
    /// its sender's server sent the target, or its sender has the redact level in `state`.
    pub(super) async fn may_redact(
        &self,
        handle: &RoomHandle,
        redaction: &Pdu,
        target: &Pdu,
        state: &StateMap,
    ) -> Result<bool> {
        if redaction.sender.server_name() == target.sender.server_name() {
            return Ok(true);
        }
        let ids: Vec<&EventId> = [("m.room.create", ""), ("m.room.power_levels", "")]
            .iter()
            .filter_map(|(t, k)| state.get(&((*t).to_owned(), (*k).to_owned())).map(|id| &**id))
            .collect();
        let events = self.pdus_by_id(&ids).await?;
        let as_stored = |key: &str| {
            state.get(&(key.to_owned(), String::new())).and_then(|id| events.get(id)).map(|pdu| StoredEvent {
                pdu: (**pdu).clone(),
                stream_pos: 0,
                redacted_by: None,
                soft_failed: false,
                state_before: 0,
                state_after: 0,
                replaces_state: None,
                txn: None,
                txn_known: true,
            })
        };
        let levels = PowerLevels::new(
            as_stored("m.room.create").as_ref(),
            as_stored("m.room.power_levels").as_ref(),
            &handle.rules,
        );
        Ok(levels.user_level(&redaction.sender) >= levels.redact())
    }

    /// Stores events of `room_id` known without their place in the graph — an auth chain, the
    /// state a join brought, an invite into a remote room — as outliers: no stream position,
    /// never in a timeline, `/messages`, `/context` or `/sync`. Each passes the format,
    /// signature and hash checks and the auth rules against its own `auth_events` (from the
    /// batch or already stored); refused ones are recorded as rejected. Written in bounded
    /// transactions outside the room's writer, so a join's thousands of state events do not hold
    /// up other writes.
    pub async fn store_outliers(
        &self,
        room_id: &RoomId,
        events: Vec<CanonicalJsonObject>,
        keys: &PublicKeyMap,
    ) -> Result<OutlierReport> {
        let handle = self.handle(room_id).await?;
        let mut report = OutlierReport::default();
        let mut checked: Vec<Checked> = Vec::with_capacity(events.len());
        for object in events {
            match self.check_received(&handle, object, keys) {
                Ok(c) => checked.push(c),
                Err(reason) => {
                    tracing::debug!(%room_id, %reason, "dropped a received outlier");
                    report.dropped += 1;
                }
            }
        }
        // Auth events before the events citing them: ascending depth is a topological order of
        // a well-formed auth graph; events whose auth events come later wait for another pass.
        checked.sort_by_key(|c| c.pdu.depth);
        let mut accepted = EventMap::new();
        let mut rows: Vec<OutlierRow> = Vec::new();
        let mut pending = checked;
        for _pass in 0..8 {
            let mut waiting = Vec::new();
            let before = pending.len();
            for c in pending {
                let event_id = c.pdu.event_id.clone();
                if accepted.contains_key(&event_id) {
                    continue;
                }
                if self.event(&event_id).await?.is_some() {
                    report.already_known += 1;
                    continue;
                }
                match self.check_auth_events(&handle, &c.pdu, &accepted).await? {
                    Ok(()) => {
                        rows.push(OutlierRow {
                            event_id: event_id.clone(),
                            room_id: handle.room_id.clone(),
                            event_type: c.pdu.event_type.to_string(),
                            state_key: c.pdu.state_key.clone(),
                            json: c.pdu.json.clone(),
                        });
                        accepted.insert(event_id, Arc::new(c.pdu));
                    }
                    Err(Ok(_missing)) => waiting.push(c),
                    Err(Err(reason)) => {
                        self.reject(&c.pdu, format!("auth events: {reason}"), None).await?;
                        report.rejected += 1;
                    }
                }
            }
            pending = waiting;
            if pending.is_empty() || pending.len() == before {
                break;
            }
        }
        report.dropped += pending.len();
        report.stored = rows.len();
        self.db.store_outliers(&rows, now_ms()).await?;
        Ok(report)
    }
}
