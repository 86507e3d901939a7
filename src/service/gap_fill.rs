//! Filling holes in a room's graph from other servers (Server-Server API, "Retrieving events"):
//! a received PDU whose prev events or auth events this server does not hold.
//!
//! Missing auth events come from the sender's `/event_auth` and are stored as outliers. Missing
//! prev events come from `get_missing_events`, asked repeatedly (walking back from the event to our
//! forward extremities) until the hole closes or [`MAX_GAP_EVENTS`] were fetched; they are then
//! received oldest first, each through the usual checks. When the hole does not close — a gap too
//! big to fill at once, or a peer that does not answer — the oldest event that still misses prev
//! events is placed with the state before it worked out from the peer's `/state_ids` (and the
//! events we lacked, from `/event` or, for many, one `/state`): the room's history then has a gap
//! there, which pagination fills later through backfill.
//!
//! Everything a peer can make this do is bounded: events per gap, state events per fetch, requests
//! in flight, and each answer's size and time (the federation client's limits). An answer that
//! is not what was asked for (another room, an event of another ID) is thrown away.

use std::{collections::HashMap, sync::Arc};

use ruma::{
    CanonicalJsonObject, EventId, OwnedEventId, RoomId, ServerName, UInt,
    api::federation::{
        authorization::get_event_authorization,
        event::{get_event, get_missing_events, get_room_state, get_room_state_ids},
    },
    room_version_rules::RoomVersionRules,
    signatures::PublicKeyMap,
};
use serde_json::value::RawValue;

use crate::{
    error::{Error, Result},
    federation::{FederationError, client::FederationClient, keys::Keys},
    matrix::pdu::Pdu,
    service::rooms::{Rooms, StateMap, receive::Outcome},
};

/// Events asked for per `get_missing_events` request.
const MISSING_PER_REQUEST: u32 = 100;
/// Events fetched to close one hole before it is left as a gap for backfill to fill.
pub const MAX_GAP_EVENTS: usize = 1000;
/// State and auth chain events taken from one `/state_ids` answer (a room of tens of thousands
/// of members has that many).
const MAX_STATE_EVENTS: usize = 100_000;
/// Above this many unknown events, one `/state` request fetches them instead of one `/event` each.
const FETCH_ONE_BY_ONE: usize = 50;
/// Events of one fill placed across a gap of their own (each costs a state fetch): a peer handing
/// out events that all cite unknown events cannot make us fetch a state per event.
const MAX_GAPS_PER_FILL: usize = 20;
/// `/event` requests in flight at once to one server.
const PARALLEL_FETCHES: usize = 10;

fn remote_failed(err: FederationError) -> Error {
    Error::BadGateway(format!("filling a gap: {err}"))
}

pub struct GapFill {
    rooms: Arc<Rooms>,
    keys: Arc<Keys>,
    client: Arc<FederationClient>,
}

/// A fetched PDU: its object and what it parses to.
struct Fetched {
    object: CanonicalJsonObject,
    pdu: Pdu,
}

impl GapFill {
    pub fn new(rooms: Arc<Rooms>, keys: Arc<Keys>, client: Arc<FederationClient>) -> GapFill {
        GapFill { rooms, keys, client }
    }

    /// Receives a PDU of `room_id` (a room this server is in) that `origin` sent us, fetching
    /// from `origin` whatever it cites that we lack.
    pub async fn receive(&self, origin: &ServerName, room_id: &RoomId, object: CanonicalJsonObject) -> Result<Outcome> {
        let rules = self.rooms.handle(room_id).await?.rules.clone();
        let outcome = self.receive_once(origin, room_id, &object, &rules).await?;
        let Outcome::MissingEvents { event_id, .. } = &outcome else { return Ok(outcome) };
        let pdu = Pdu::from_received(&object, &rules).map_err(Error::BadJson)?;
        if self.missing_prevs(&pdu).await?.is_empty() {
            // Only auth events are missing.
            self.fetch_auth_chain(origin, room_id, event_id, &rules).await?;
            return self.receive_once(origin, room_id, &object, &rules).await;
        }
        self.fill_before(origin, room_id, &pdu, &rules).await?;
        let outcome = self.receive_once(origin, room_id, &object, &rules).await?;
        if !matches!(outcome, Outcome::MissingEvents { .. }) {
            return Ok(outcome);
        }
        self.receive_across_gap(origin, room_id, &object, &pdu, &rules).await
    }

    /// Checks the signatures' keys and hands the PDU to the room graph once.
    async fn receive_once(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        object: &CanonicalJsonObject,
        rules: &RoomVersionRules,
    ) -> Result<Outcome> {
        let keys = self.keys.public_key_map_for_event(object, &rules.signatures).await.map_err(Error::BadJson)?;
        self.rooms.receive_pdu(origin, room_id, object.clone(), &keys, Vec::new()).await
    }

    /// The prev events of `pdu` that have no place in our graph.
    async fn missing_prevs(&self, pdu: &Pdu) -> Result<Vec<OwnedEventId>> {
        let mut missing = Vec::new();
        for prev in &pdu.prev_events {
            if !self.rooms.is_placed(prev).await? {
                missing.push(prev.clone());
            }
        }
        Ok(missing)
    }

    /// Fetches the events between our forward extremities and `pdu` from `server` with
    /// `get_missing_events` (at most [`MAX_GAP_EVENTS`]) and receives them oldest first. A
    /// server that cannot or will not answer leaves the hole as it is.
    async fn fill_before(
        &self,
        server: &ServerName,
        room_id: &RoomId,
        pdu: &Pdu,
        rules: &RoomVersionRules,
    ) -> Result<()> {
        let earliest = self.rooms.forward_extremities(room_id).await?;
        let mut latest = vec![pdu.event_id.clone()];
        let mut fetched: HashMap<OwnedEventId, Fetched> = HashMap::new();
        while fetched.len() < MAX_GAP_EVENTS && !latest.is_empty() {
            let mut request = get_missing_events::v1::Request::new(room_id.to_owned(), earliest.clone(), latest);
            request.limit = UInt::from(MISSING_PER_REQUEST);
            let response = match self.client.send(server, request).await {
                Ok(response) => response,
                Err(err) => {
                    tracing::info!(%server, %room_id, %err, "get_missing_events failed; the gap stays");
                    break;
                }
            };
            let mut new = 0;
            for raw in response.events.iter().take(MISSING_PER_REQUEST as usize) {
                let Some(event) = parse_fetched(raw, room_id, rules) else { continue };
                if fetched.contains_key(&event.pdu.event_id) || self.rooms.is_placed(&event.pdu.event_id).await? {
                    continue;
                }
                new += 1;
                fetched.insert(event.pdu.event_id.clone(), event);
            }
            if new == 0 {
                break;
            }
            // Walk on from the oldest fetched events whose prev events are still unknown.
            latest = Vec::new();
            for event in fetched.values() {
                for prev in &event.pdu.prev_events {
                    if !fetched.contains_key(prev) && !self.rooms.is_placed(prev).await? {
                        latest.push(event.pdu.event_id.clone());
                        break;
                    }
                }
            }
        }
        // Oldest first: a prev event has a smaller depth than the events citing it.
        let mut events: Vec<Fetched> = fetched.into_values().collect();
        events.sort_by(|a, b| (a.pdu.depth, &a.pdu.event_id).cmp(&(b.pdu.depth, &b.pdu.event_id)));
        tracing::debug!(%server, %room_id, count = events.len(), "receiving the events of a gap");
        let mut gaps = 0;
        for event in events {
            // One bad event (keys that cannot be had, a peer failing mid-way) does not stop the rest.
            match self.receive_fetched(server, room_id, &event, rules, &mut gaps).await {
                Ok(outcome) => {
                    tracing::trace!(%room_id, event_id = %event.pdu.event_id, ?outcome, "gap event received")
                }
                Err(err) => {
                    tracing::info!(%server, %room_id, event_id = %event.pdu.event_id, %err, "a gap event failed")
                }
            }
        }
        Ok(())
    }

    /// Receives one event `get_missing_events` brought: its auth chain fetched if that is what
    /// it lacks, placed across a gap (at most [`MAX_GAPS_PER_FILL`] per fill) if prev events.
    async fn receive_fetched(
        &self,
        server: &ServerName,
        room_id: &RoomId,
        event: &Fetched,
        rules: &RoomVersionRules,
        gaps: &mut usize,
    ) -> Result<Outcome> {
        match self.receive_once(server, room_id, &event.object, rules).await? {
            Outcome::MissingEvents { event_id, .. } if self.missing_prevs(&event.pdu).await?.is_empty() => {
                self.fetch_auth_chain(server, room_id, &event_id, rules).await?;
                self.receive_once(server, room_id, &event.object, rules).await
            }
            Outcome::MissingEvents { .. } if *gaps < MAX_GAPS_PER_FILL => {
                *gaps += 1;
                self.receive_across_gap(server, room_id, &event.object, &event.pdu, rules).await
            }
            outcome => Ok(outcome),
        }
    }

    /// Places `pdu`, which still misses prev events, with the state before it worked out from
    /// `server`'s state after each missing prev: the history behind it is a gap.
    async fn receive_across_gap(
        &self,
        server: &ServerName,
        room_id: &RoomId,
        object: &CanonicalJsonObject,
        pdu: &Pdu,
        rules: &RoomVersionRules,
    ) -> Result<Outcome> {
        let state = self.state_before(server, room_id, pdu).await?;
        // Its auth events may be among what was just stored; if not, the sender has them.
        let keys = self.keys.public_key_map_for_event(object, &rules.signatures).await.map_err(Error::BadJson)?;
        let outcome =
            self.rooms.receive_with_state_before(server, room_id, object.clone(), &keys, state.clone()).await?;
        if !matches!(outcome, Outcome::MissingEvents { .. }) {
            return Ok(outcome);
        }
        self.fetch_auth_chain(server, room_id, &pdu.event_id, rules).await?;
        self.rooms.receive_with_state_before(server, room_id, object.clone(), &keys, state).await
    }

    /// The state before `pdu`, some of whose prev events we lack, as [`Rooms::state_across_gap`]
    /// resolves it: for each missing prev, `server`'s state before it (`/state_ids`) plus the
    /// prev itself, with every event of it we lacked fetched and stored as an outlier.
    pub async fn state_before(&self, server: &ServerName, room_id: &RoomId, pdu: &Pdu) -> Result<StateMap> {
        let rules = self.rooms.handle(room_id).await?.rules.clone();
        let mut remote = Vec::new();
        for prev in self.missing_prevs(pdu).await? {
            let ids = self
                .client
                .send(server, get_room_state_ids::v1::Request::new(prev.clone(), room_id.to_owned()))
                .await
                .map_err(remote_failed)?;
            if ids.pdu_ids.len() + ids.auth_chain_ids.len() > MAX_STATE_EVENTS {
                return Err(Error::BadGateway(format!(
                    "{server} answered a state of more than {MAX_STATE_EVENTS} events"
                )));
            }
            let mut wanted: Vec<OwnedEventId> = Vec::new();
            for id in ids.pdu_ids.iter().chain(&ids.auth_chain_ids).chain(std::iter::once(&prev)) {
                if !wanted.contains(id) && self.rooms.event(id).await?.is_none() {
                    wanted.push(id.clone());
                }
            }
            let events = self.fetch_events(server, room_id, &prev, &wanted, &rules).await?;
            self.store(room_id, events, &rules).await?;
            let mut state = self.rooms.state_map_of(&ids.pdu_ids).await?;
            let prev_state = self.rooms.state_map_of(std::slice::from_ref(&prev)).await?;
            if prev_state.is_empty() && self.rooms.event(&prev).await?.is_none() {
                return Err(Error::BadGateway(format!("{server} did not hand out the event {prev}")));
            }
            state.extend(prev_state);
            remote.push(state);
        }
        self.rooms.state_across_gap(room_id, &pdu.prev_events, remote).await
    }

    /// The events `wanted` of `room_id` from `server`: one `/event` each, or one `/state` at
    /// `at` (which holds the state before `at` and its auth chain) when there are many, plus
    /// `/event` for any still missing.
    async fn fetch_events(
        &self,
        server: &ServerName,
        room_id: &RoomId,
        at: &EventId,
        wanted: &[OwnedEventId],
        rules: &RoomVersionRules,
    ) -> Result<Vec<Fetched>> {
        let mut found: HashMap<OwnedEventId, Fetched> = HashMap::new();
        if wanted.len() > FETCH_ONE_BY_ONE {
            let state = self
                .client
                .send(server, get_room_state::v1::Request::new(at.to_owned(), room_id.to_owned()))
                .await
                .map_err(remote_failed)?;
            for raw in state.pdus.iter().chain(&state.auth_chain).take(MAX_STATE_EVENTS) {
                if let Some(event) = parse_fetched(raw, room_id, rules)
                    && wanted.contains(&event.pdu.event_id)
                {
                    found.insert(event.pdu.event_id.clone(), event);
                }
            }
        }
        let rest: Vec<OwnedEventId> = wanted.iter().filter(|id| !found.contains_key(*id)).cloned().collect();
        let mut answers: Vec<Option<Fetched>> = Vec::with_capacity(rest.len());
        for chunk in rest.chunks(PARALLEL_FETCHES) {
            let requests = chunk.iter().map(|id| self.fetch_event(server, room_id, id, rules));
            answers.extend(futures_util::future::join_all(requests).await);
        }
        found.extend(answers.into_iter().flatten().map(|event| (event.pdu.event_id.clone(), event)));
        Ok(found.into_values().collect())
    }

    /// One event from `server`'s `/event`, if it answers with the event asked for.
    async fn fetch_event(
        &self,
        server: &ServerName,
        room_id: &RoomId,
        id: &EventId,
        rules: &RoomVersionRules,
    ) -> Option<Fetched> {
        match self.client.send(server, get_event::v1::Request::new(id.to_owned())).await {
            Ok(response) => parse_fetched(&response.pdu, room_id, rules).filter(|event| event.pdu.event_id == id),
            Err(err) => {
                tracing::info!(%server, event_id = %id, %err, "could not fetch an event");
                None
            }
        }
    }

    /// Fetches the auth chain of `event_id` from `server` (`/event_auth`) and stores what we
    /// lacked of it as outliers.
    async fn fetch_auth_chain(
        &self,
        server: &ServerName,
        room_id: &RoomId,
        event_id: &EventId,
        rules: &RoomVersionRules,
    ) -> Result<()> {
        let response = self
            .client
            .send(server, get_event_authorization::v1::Request::new(room_id.to_owned(), event_id.to_owned()))
            .await
            .map_err(remote_failed)?;
        let mut events = Vec::new();
        for raw in response.auth_chain.iter().take(MAX_STATE_EVENTS) {
            if let Some(event) = parse_fetched(raw, room_id, rules)
                && self.rooms.event(&event.pdu.event_id).await?.is_none()
            {
                events.push(event);
            }
        }
        self.store(room_id, events, rules).await
    }

    /// Stores fetched events as outliers (each checked as `Rooms::store_outliers` checks them).
    async fn store(&self, room_id: &RoomId, events: Vec<Fetched>, rules: &RoomVersionRules) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let mut keys = PublicKeyMap::new();
        for event in &events {
            if let Ok(map) = self.keys.public_key_map_for_event(&event.object, &rules.signatures).await {
                for (server, set) in map {
                    keys.entry(server).or_default().extend(set);
                }
            }
        }
        let objects = events.into_iter().map(|event| event.object).collect();
        let report = self.rooms.store_outliers(room_id, objects, &keys).await?;
        tracing::debug!(%room_id, ?report, "stored fetched events");
        Ok(())
    }
}

/// A PDU from another server's answer, if it parses and belongs to `room_id`.
fn parse_fetched(raw: &RawValue, room_id: &RoomId, rules: &RoomVersionRules) -> Option<Fetched> {
    let object: CanonicalJsonObject = serde_json::from_str(raw.get()).ok()?;
    let pdu = Pdu::from_received(&object, rules).ok()?;
    (pdu.room_id == room_id).then_some(Fetched { object, pdu })
}
