//! Fetching a room's history from other servers (Server-Server API, `/backfill`) when a client
//! paginates back to where the history we hold stops: a backward extremity
//! (`Rooms::gaps`), such as a room's join over federation.
//!
//! The servers asked are the gap event's sender's first, then the room's other servers the
//! room's ACL allows, the next on failure, each within a deadline. Answers are checked as any
//! received event (`Rooms::receive_backfilled`), oldest first; the oldest of a batch, whose prev
//! events we lack, gets the state before it from the same server's `/state` at it. Nothing here
//! holds a room's writer while waiting on a peer.

use std::{
    collections::BTreeSet,
    num::NonZeroUsize,
    sync::Arc,
    time::{Duration, Instant},
};

use lru::LruCache;
use parking_lot::Mutex;

use ruma::{
    CanonicalJsonObject, OwnedEventId, OwnedServerName, RoomId, ServerName, UInt, UserId,
    api::{
        client::filter::RoomEventFilter,
        federation::{backfill::get_backfill, event::get_room_state},
    },
};

use crate::{
    error::{Error, Result},
    federation::{
        client::FederationClient,
        keys::{Keys, WantedKeys, wanted_for_event},
    },
    matrix::pdu::Pdu,
    service::{
        joins::parse_object,
        now_ms,
        rooms::{
            Rooms, StateMap,
            history::ReadAccess,
            pagination::{HistoryPage, PageToken, position_of},
            receive::Outcome,
        },
    },
    storage::rooms::{Dir, TopoPos},
};

/// Events asked for per `/backfill` request (what Synapse serves at most).
const EVENTS_PER_REQUEST: u32 = 100;
/// Servers tried for one gap before giving up for this request.
const MAX_SERVERS: usize = 5;
/// How long one server gets to answer and have its events placed.
const SERVER_DEADLINE: Duration = Duration::from_secs(20);
/// Backward extremities asked about in one request (`v`).
const MAX_FROM: usize = 20;
/// State events taken from one `/state` answer (the largest rooms have tens of thousands).
const MAX_STATE_EVENTS: usize = 100_000;
/// Backfills one page of `/messages` may wait for, and the time they may take together.
const MAX_FILLS_PER_PAGE: usize = 3;
const PAGE_DEADLINE: Duration = Duration::from_secs(30);
/// After a fill behind a gap got nothing, pages skip that gap for this long, doubling with
/// each failure up to `MAX_RETRY_AFTER`: a gap no server can fill (all down, or none has the
/// history) must not make every page of every client wait for the same deadlines again.
const RETRY_AFTER: Duration = Duration::from_secs(10);
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60 * 60);
/// Gaps whose failures are remembered (the least recently failed are forgotten first).
const FAILED_GAPS_KEPT: usize = 10_000;

/// A gap's failed fills: how many in a row, and when the next may be tried.
#[derive(Clone, Copy)]
struct Failed {
    count: u32,
    retry_at: Instant,
}

pub struct Backfill {
    rooms: Arc<Rooms>,
    keys: Arc<Keys>,
    client: Arc<FederationClient>,
    is_enabled: bool,
    /// By missing event ID.
    failed: Mutex<LruCache<OwnedEventId, Failed>>,
}

impl Backfill {
    pub fn new(rooms: Arc<Rooms>, keys: Arc<Keys>, client: Arc<FederationClient>, is_enabled: bool) -> Backfill {
        let failed = Mutex::new(LruCache::new(NonZeroUsize::new(FAILED_GAPS_KEPT).expect("non-zero")));
        Backfill { rooms, keys, client, is_enabled, failed }
    }

    /// Whether the history behind `missing` may be asked for now (no recent failed fill).
    fn may_try(&self, missing: &OwnedEventId, now: Instant) -> bool {
        self.failed.lock().peek(missing).is_none_or(|failed| failed.retry_at <= now)
    }

    /// Remembers how the fill behind `gaps` went: a success forgets their failures, a failure
    /// puts the next try further off.
    fn record_fill(&self, gaps: &[(OwnedEventId, OwnedEventId)], succeeded: bool) {
        let mut failed = self.failed.lock();
        let now = Instant::now();
        for (_, missing) in gaps {
            if succeeded {
                failed.pop(missing);
                continue;
            }
            let count = failed.peek(missing).map_or(1, |f| f.count.saturating_add(1));
            let wait = RETRY_AFTER.saturating_mul(1 << (count - 1).min(16)).min(MAX_RETRY_AFTER);
            failed.put(missing.clone(), Failed { count, retry_at: now + wait });
        }
    }

    /// A page of `/messages` backwards from `from` (down to `to`) that does not stop at a gap:
    /// when the page reaches down past a backward extremity — the history below it is missing —
    /// the history behind it is fetched first and the page read again. Tokens are resolved after
    /// each fill: a stream token's topological position moves down as history arrives below it.
    /// Returns the page and where it started.
    #[allow(clippy::too_many_arguments)] // Rooms::page's parameters, passed through.
    pub async fn page_back(
        &self,
        viewer: &UserId,
        room_id: &RoomId,
        from: PageToken,
        to: Option<PageToken>,
        limit: usize,
        filter: Option<&RoomEventFilter>,
        access: &ReadAccess,
    ) -> Result<(HistoryPage, TopoPos)> {
        let started = Instant::now();
        let mut fills = 0;
        loop {
            let from_pos = self.rooms.topological_position(room_id, from).await?;
            let to_pos = match to {
                Some(token) => Some(self.rooms.topological_position(room_id, token).await?),
                None => None,
            };
            let page = self.rooms.page(viewer, room_id, from_pos, to_pos, Dir::Backward, limit, filter, access).await?;
            if !self.is_enabled {
                return Ok((page, from_pos));
            }
            // The page covers (floor, from]: down to where it would continue, or to its end.
            // History missing below a gap event sorts below it, so any gap above the floor may
            // hide events that belong in this page.
            let floor = page.next.unwrap_or(to_pos.unwrap_or(TopoPos::START));
            let mut gaps = Vec::new();
            let mut highest: Option<TopoPos> = None;
            let now = Instant::now();
            for (gap, missing) in self.rooms.gaps(room_id, 100).await? {
                if self.may_try(&missing, now)
                    && let Some(event) = self.rooms.timeline_event(&gap).await?
                    && position_of(&event) > floor
                {
                    highest = highest.max(Some(position_of(&event)));
                    gaps.push((gap, missing));
                }
            }
            let Some(highest) = highest else {
                return Ok((page, from_pos));
            };
            if fills >= MAX_FILLS_PER_PAGE || started.elapsed() > PAGE_DEADLINE {
                // Out of fills for this request with history still missing: the page ends at
                // the highest gap, so the client's next page asks again from there, instead of
                // reading on below the gap (which would look like the room's whole history).
                // With the gap above the page's start, every fill so far went above it: the page
                // is empty and continues from where it began, while time allows more fills.
                if highest <= from_pos || started.elapsed() > PAGE_DEADLINE {
                    return Ok((truncated_at_gap(page, highest, from_pos), from_pos));
                }
            }
            fills += 1;
            let budget = PAGE_DEADLINE.saturating_sub(started.elapsed());
            // The page we have is still an answer when a fill fails: the gap stays for a later
            // request.
            match tokio::time::timeout(budget, self.fill(room_id, &gaps)).await {
                Ok(Ok(placed)) if placed > 0 => self.record_fill(&gaps, true),
                Ok(Ok(_)) => {
                    self.record_fill(&gaps, false);
                    return Ok((page, from_pos));
                }
                Ok(Err(err)) => {
                    tracing::info!(%room_id, %err, "backfill for a page failed");
                    self.record_fill(&gaps, false);
                    return Ok((page, from_pos));
                }
                Err(_) => {
                    self.record_fill(&gaps, false);
                    return Ok((page, from_pos));
                }
            }
        }
    }

    /// Fetches history behind `gaps` (gap event, missing prev event) of `room_id`: the number
    /// of events placed (0 when no server had any to give).
    pub async fn fill(&self, room_id: &RoomId, gaps: &[(OwnedEventId, OwnedEventId)]) -> Result<usize> {
        if !self.is_enabled || gaps.is_empty() {
            return Ok(0);
        }
        let missing: Vec<OwnedEventId> =
            gaps.iter().map(|(_, m)| m.clone()).collect::<BTreeSet<_>>().into_iter().take(MAX_FROM).collect();
        for server in self.candidates(room_id, gaps).await? {
            match tokio::time::timeout(SERVER_DEADLINE, self.fill_from(&server, room_id, &missing)).await {
                Ok(Ok(0)) => tracing::debug!(%server, %room_id, "backfill: nothing new from this server"),
                Ok(Ok(placed)) => return Ok(placed),
                Ok(Err(err)) => tracing::info!(%server, %room_id, %err, "backfill failed"),
                Err(_) => tracing::info!(%server, %room_id, "backfill timed out"),
            }
        }
        Ok(0)
    }

    /// The servers to ask, best first: those of the gap events' senders, then the room's other
    /// servers, all allowed by the room's ACL.
    async fn candidates(
        &self,
        room_id: &RoomId,
        gaps: &[(OwnedEventId, OwnedEventId)],
    ) -> Result<Vec<OwnedServerName>> {
        let mut servers: Vec<OwnedServerName> = Vec::new();
        for (gap, _) in gaps {
            if let Some(event) = self.rooms.timeline_event(gap).await? {
                servers.push(event.pdu.sender.server_name().to_owned());
            }
        }
        servers.extend(self.rooms.other_servers(room_id));
        let mut chosen = Vec::new();
        for server in servers {
            if server == *self.rooms.server_name() || chosen.contains(&server) {
                continue;
            }
            if self.rooms.is_server_allowed(room_id, &server).await? {
                chosen.push(server);
            }
            if chosen.len() == MAX_SERVERS {
                break;
            }
        }
        Ok(chosen)
    }

    /// One `/backfill` from `server`, its events placed oldest first.
    async fn fill_from(&self, server: &ServerName, room_id: &RoomId, missing: &[OwnedEventId]) -> Result<usize> {
        let request =
            get_backfill::v1::Request::new(room_id.to_owned(), missing.to_vec(), UInt::from(EVENTS_PER_REQUEST));
        let answer = self.client.send(server, request).await?;
        let rules = self.rooms.handle(room_id).await?.rules.clone();
        let mut events: Vec<(u64, CanonicalJsonObject)> = Vec::new();
        for raw in answer.pdus.iter().take(EVENTS_PER_REQUEST as usize) {
            let Ok(object) = parse_object(raw) else { continue };
            let Ok(pdu) = Pdu::from_received(&object, &rules) else { continue };
            if pdu.room_id == room_id {
                events.push((pdu.depth, object));
            }
        }
        events.sort_by_key(|(depth, _)| *depth);
        let keys =
            self.keys.public_key_map(&wanted_keys(events.iter().map(|(_, o)| o), &rules.signatures), now_ms()).await;
        let mut placed = 0;
        for (_, object) in events {
            let mut outcome = self.rooms.receive_backfilled(server, room_id, object.clone(), &keys, None).await?;
            if let Outcome::MissingEvents { event_id, .. } = &outcome {
                // The oldest of the batch: its prev events (or auth events) are not here.
                let state = self.state_before(server, room_id, event_id).await?;
                outcome = self.rooms.receive_backfilled(server, room_id, object, &keys, Some(state)).await?;
            }
            match outcome {
                Outcome::Accepted { .. } => placed += 1,
                other => tracing::debug!(%server, %room_id, ?other, "a backfilled event was not placed"),
            }
        }
        Ok(placed)
    }

    /// The state before `event_id` as `server` has it (`/state`), its events and auth chain
    /// stored as outliers (each checked); the map holds the state events that passed.
    ///
    /// Not `GapFill::state_before` (the state after each missing prev, resolved with the prevs
    /// we hold): the oldest event of a backfilled batch has none of its prevs here, so one
    /// `/state` at the event itself is the same state in one request.
    async fn state_before(&self, server: &ServerName, room_id: &RoomId, event_id: &OwnedEventId) -> Result<StateMap> {
        let request = get_room_state::v1::Request::new(event_id.clone(), room_id.to_owned());
        let answer = self.client.send(server, request).await?;
        let rules = self.rooms.handle(room_id).await?.rules.clone();
        let mut state = Vec::new();
        let mut keyed = Vec::new();
        for raw in answer.pdus.iter().take(MAX_STATE_EVENTS) {
            let Ok(object) = parse_object(raw) else { continue };
            if let Ok(pdu) = Pdu::from_received(&object, &rules)
                && let Some(state_key) = &pdu.state_key
                && pdu.room_id == room_id
            {
                keyed.push(((pdu.event_type.to_string(), state_key.clone()), pdu.event_id.clone()));
                state.push(object);
            }
        }
        let mut outliers: Vec<CanonicalJsonObject> =
            answer.auth_chain.iter().take(MAX_STATE_EVENTS).filter_map(|raw| parse_object(raw).ok()).collect();
        outliers.extend(state);
        let keys = self.keys.public_key_map(&wanted_keys(outliers.iter(), &rules.signatures), now_ms()).await;
        self.rooms.store_outliers(room_id, outliers, &keys).await?;
        let mut map = StateMap::new();
        for (key, id) in keyed {
            if self.rooms.event(&id).await?.is_some() {
                map.insert(key, id);
            }
        }
        if map.is_empty() {
            return Err(Error::BadGateway(format!("{server}: no usable state at {event_id}")));
        }
        Ok(map)
    }
}

/// The signing keys every event of `objects` needs checked.
fn wanted_keys<'a>(
    objects: impl Iterator<Item = &'a CanonicalJsonObject>,
    rules: &ruma::room_version_rules::SignaturesRules,
) -> WantedKeys {
    let mut wanted = WantedKeys::new();
    for object in objects {
        if let Ok((keys, _)) = wanted_for_event(object, rules) {
            for (server, ids) in keys {
                wanted.entry(server).or_default().extend(ids);
            }
        }
    }
    wanted
}

/// `page` cut off below the gap event at `gap` (the gap event itself stays), continuing just
/// below it; with the gap above `from`, an empty page continuing at `from`.
fn truncated_at_gap(mut page: HistoryPage, gap: TopoPos, from: TopoPos) -> HistoryPage {
    if gap > from {
        page.events.clear();
        page.next = Some(from);
        return page;
    }
    page.events.retain(|event| position_of(event) >= gap);
    page.next = Some(TopoPos { depth: gap.depth, stream: gap.stream - 1 });
    page
}
