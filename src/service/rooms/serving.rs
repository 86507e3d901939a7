//! Serving a room's graph to other servers (Server-Server API "Retrieving events", `/event`,
//! `/state`, `/state_ids`, `/event_auth`, `/backfill`, `/get_missing_events`): which server may
//! see which event, the state before an event with its auth chain, walks back through the graph,
//! and server ACLs (`m.room.server_acl`), which every inbound request about a room must pass.
//!
//! Nothing here does network I/O or takes a room's writer lock: everything is read from stored
//! events and state groups.

use std::{
    collections::{BinaryHeap, HashMap, HashSet},
    sync::Arc,
};

use ruma::{
    EventId, OwnedEventId, RoomId, ServerName, UserId,
    events::{TimelineEventType, room::server_acl::RoomServerAclEventContent},
};
use serde_json::Value;

use super::{Rooms, StoredEvent};
use crate::error::{Error, Result};

/// Auth chains longer than this are refused rather than walked (a room's auth chain is its
/// create, power-level, join-rule and member events: thousands in the largest rooms).
const MAX_AUTH_CHAIN: usize = 100_000;

/// At most this many events per `/backfill` or `/get_missing_events` answer, whatever was asked
/// (Synapse caps backfill at 100 too): a peer pages on with the oldest events it got.
pub const MAX_HISTORY_PAGE: usize = 100;

/// What a server may receive of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerView {
    /// The event as it is.
    Full,
    /// The event's redacted form: the server is in the room but history visibility hides it.
    Redacted,
}

impl Rooms {
    /// Whether the room's current `m.room.server_acl` lets `server` take part (no ACL: yes). An
    /// ACL whose content does not parse allows everyone, as an absent one does (the auth rules
    /// do not validate its content, and denying everyone would cut the room off).
    pub async fn is_server_allowed(&self, room_id: &RoomId, server: &ServerName) -> Result<bool> {
        let Some(event) = self.current_state_event(room_id, "m.room.server_acl", "").await? else {
            return Ok(true);
        };
        Ok(match serde_json::from_str::<RoomServerAclEventContent>(event.pdu.content.get()) {
            Ok(acl) => acl.is_allowed(server),
            Err(_) => true,
        })
    }

    /// Refuses (403) a server the room's ACL denies, and (404) a room we do not know.
    pub async fn check_server_acl(&self, room_id: &RoomId, server: &ServerName) -> Result<()> {
        if self.current_group(room_id).await? == 0 {
            return Err(Error::not_found("Unknown room"));
        }
        if !self.is_server_allowed(room_id, server).await? {
            return Err(Error::forbidden("Server is denied by the room's server ACL"));
        }
        Ok(())
    }

    /// A timeline event of `room_id` (404 for unknown events, outliers — whose place in the graph
    /// we do not know — and events of another room).
    async fn room_event(&self, room_id: &RoomId, event_id: &EventId) -> Result<Arc<StoredEvent>> {
        match self.event(event_id).await? {
            Some(event) if event.pdu.room_id == room_id => Ok(event),
            _ => Err(Error::not_found("Unknown event")),
        }
    }

    /// How `server` may see `event`, or 403 if not at all. Spec "History visibility" for
    /// servers: a `world_readable` event goes to anyone, a `shared` one to a server in the room
    /// now; otherwise the server must have had a member in the room at the event (joined, or
    /// for `invited`/`shared` also invited), and gets the redacted form when the visibility
    /// rules hide the event from all its members.
    pub async fn server_view(&self, server: &ServerName, event: &StoredEvent) -> Result<ServerView> {
        // The state at the event: after it for a state event (a join is visible to the joiner),
        // before it otherwise — the two only differ by the event itself.
        let group = if event.is_outlier() { 0 } else { event.state_after };
        let is_in_room = self.is_server_joined(&event.pdu.room_id, server);
        self.server_view_at(server, group, is_in_room).await
    }

    /// Whether a user of `server` is joined to the room now.
    fn is_server_joined(&self, room_id: &RoomId, server: &ServerName) -> bool {
        self.streams.members(room_id, "join").iter().any(|user| user.server_name() == server)
    }

    /// [`Rooms::server_view`] of any event whose state (after it) is `group`. For a server in
    /// the room now (`is_in_room`), `shared` history is visible whether or not it was there at
    /// the event, as for its users (Synapse's `filter_events_for_server` does the same).
    async fn server_view_at(&self, server: &ServerName, group: i64, is_in_room: bool) -> Result<ServerView> {
        let visibility = self
            .state_event_at(group, "m.room.history_visibility", "")
            .await?
            .and_then(|e| e.pdu.content_value().get("history_visibility").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| "shared".to_owned());
        if visibility == "world_readable" || (is_in_room && visibility == "shared") {
            return Ok(ServerView::Full);
        }
        let (mut joined, mut invited) = (false, false);
        for ((event_type, state_key), member_id) in self.state_at(group).await?.iter() {
            if event_type != "m.room.member" {
                continue;
            }
            let Ok(user) = UserId::parse(state_key) else { continue };
            if user.server_name() != server {
                continue;
            }
            let Some(member) = self.event(member_id).await? else { continue };
            match member.pdu.content_value().get("membership").and_then(Value::as_str) {
                Some("join") => joined = true,
                Some("invite") => invited = true,
                _ => {}
            }
            if joined {
                break;
            }
        }
        match (visibility.as_str(), joined, invited) {
            (_, true, _) => Ok(ServerView::Full),
            ("invited" | "shared", false, true) => Ok(ServerView::Full),
            (_, false, true) => Ok(ServerView::Redacted),
            _ => Err(Error::forbidden("Server is not in the room at this event")),
        }
    }

    /// The event `event_id` as `server` may receive it (`GET /event/{eventId}`): the room's ACL
    /// first, then history visibility.
    pub async fn event_for_server(&self, server: &ServerName, event_id: &EventId) -> Result<Arc<StoredEvent>> {
        let event = self.event(event_id).await?.ok_or_else(|| Error::not_found("Unknown event"))?;
        self.check_server_acl(&event.pdu.room_id, server).await?;
        match self.server_view(server, &event).await? {
            ServerView::Full => Ok(event),
            ServerView::Redacted => {
                let rules = self.handle(&event.pdu.room_id).await?.rules.clone();
                let pdu = event.pdu.redacted(&rules).map_err(Error::Internal)?;
                Ok(Arc::new(StoredEvent { pdu, ..(*event).clone() }))
            }
        }
    }

    /// The state before `event_id` and its auth chain (`/state`, `/state_ids`), for a server
    /// that may see the event or is joined to the room now.
    pub async fn state_for_server(
        &self,
        server: &ServerName,
        room_id: &RoomId,
        event_id: &EventId,
    ) -> Result<(Vec<Arc<StoredEvent>>, Vec<Arc<StoredEvent>>)> {
        self.check_server_acl(room_id, server).await?;
        let event = self.room_event(room_id, event_id).await?;
        if event.is_outlier() {
            return Err(Error::not_found("The state at this event is not known"));
        }
        // A server joined to the room now may read the state at any of its events, whatever the
        // history visibility: a server that joined with partial state (`omit_members`) asks for
        // the state at its join's prev events, from before it was in the room (Synapse serves
        // it the same way). Others need to have been able to see the event.
        let is_joined_now = self.streams.members(room_id, "join").iter().any(|user| user.server_name() == server);
        if !is_joined_now {
            self.server_view(server, &event).await?;
        }
        let state = self.state_at(event.state_before).await?;
        let mut pdus = Vec::with_capacity(state.len());
        for id in state.values() {
            pdus.push(self.event(id).await?.ok_or_else(|| Error::Internal(format!("state event {id} missing")))?);
        }
        let auth_chain = self.auth_chain(room_id, pdus.iter().flat_map(|e| e.pdu.auth_events.iter().cloned())).await?;
        Ok((pdus, auth_chain))
    }

    /// The auth chain of `event_id` (`/event_auth`), for a server that may see the event.
    pub async fn event_auth_for_server(
        &self,
        server: &ServerName,
        room_id: &RoomId,
        event_id: &EventId,
    ) -> Result<Vec<Arc<StoredEvent>>> {
        self.check_server_acl(room_id, server).await?;
        let event = self.room_event(room_id, event_id).await?;
        self.server_view(server, &event).await?;
        self.auth_chain(room_id, event.pdu.auth_events.iter().cloned()).await
    }

    /// Every event reachable from `roots` through `auth_events`, the roots included, and the
    /// room's create event: from room version 12 no event cites it (the room ID is its hash),
    /// but a receiver cannot check any event of the chain without it.
    pub async fn auth_chain(
        &self,
        room_id: &RoomId,
        roots: impl IntoIterator<Item = OwnedEventId>,
    ) -> Result<Vec<Arc<StoredEvent>>> {
        let mut seen: HashSet<OwnedEventId> = HashSet::new();
        let mut pending: Vec<OwnedEventId> = roots.into_iter().collect();
        let mut chain = Vec::new();
        while let Some(id) = pending.pop() {
            if !seen.insert(id.clone()) {
                continue;
            }
            if seen.len() > MAX_AUTH_CHAIN {
                return Err(Error::Internal("auth chain too long to serve".to_owned()));
            }
            // An auth event we never stored (a join's state whose chain was cut) is left out:
            // the receiver asks `/event_auth` of another server.
            let Some(event) = self.event(&id).await? else { continue };
            pending.extend(event.pdu.auth_events.iter().filter(|a| !seen.contains(*a)).cloned());
            chain.push(event);
        }
        if !chain.iter().any(|event| event.pdu.event_type == TimelineEventType::RoomCreate)
            && let Some(create) = self.current_state_event(room_id, "m.room.create", "").await?
        {
            chain.push(create);
        }
        Ok(chain)
    }

    /// Refuses (403) a server the room's ACL denies or that has no joined member in the room
    /// now: history is walked only for servers in the room (as Synapse's `assert_host_in_room`).
    async fn check_server_in_room(&self, room_id: &RoomId, server: &ServerName) -> Result<()> {
        self.check_server_acl(room_id, server).await?;
        if !self.is_server_joined(room_id, server) {
            return Err(Error::forbidden("Server is not in the room"));
        }
        Ok(())
    }

    /// Up to `limit` (at most [`MAX_HISTORY_PAGE`]) events of `room_id` from `from` backwards
    /// (`GET /backfill`): the `from` events themselves and their ancestors through
    /// `prev_events`, deepest first. Unknown `from` events are skipped. An event the server may
    /// not see (history visibility at it) is served in its redacted form, so the asking server
    /// can still place it in the graph without its content (Synapse does the same).
    pub async fn backfill_for_server(
        &self,
        server: &ServerName,
        room_id: &RoomId,
        from: &[OwnedEventId],
        limit: usize,
    ) -> Result<Vec<Arc<StoredEvent>>> {
        self.check_server_in_room(room_id, server).await?;
        let limit = limit.min(MAX_HISTORY_PAGE);
        // A max-heap on (depth, stream position): the walk hands out the newest events first and
        // reaches every branch of a fork in depth order, as Synapse's backfill does.
        let mut queue = BinaryHeap::new();
        let mut seen: HashSet<OwnedEventId> = HashSet::new();
        for id in from.iter().take(MAX_HISTORY_PAGE) {
            if seen.insert(id.clone())
                && let Some(event) = self.history_event(room_id, id).await?
            {
                queue.push(HeapEntry(event));
            }
        }
        let mut page = Vec::with_capacity(limit);
        while page.len() < limit
            && let Some(HeapEntry(event)) = queue.pop()
        {
            for prev in &event.pdu.prev_events {
                if seen.insert(prev.clone())
                    && let Some(prev_event) = self.history_event(room_id, prev).await?
                {
                    queue.push(HeapEntry(prev_event));
                }
            }
            page.push(event);
        }
        self.as_server_sees(server, room_id, page, true).await
    }

    /// Events of `room_id` before `latest` and after `earliest` (`POST /get_missing_events`):
    /// the ancestors of the `latest` events through `prev_events` (the `latest` events
    /// themselves not included), not walking past an `earliest` event nor below `min_depth`, at
    /// most `limit` (capped at [`MAX_HISTORY_PAGE`]) of the nearest ones, oldest first. Events the
    /// server may not see in full are left out (Synapse does the same here).
    pub async fn missing_events_for_server(
        &self,
        server: &ServerName,
        room_id: &RoomId,
        earliest: &[OwnedEventId],
        latest: &[OwnedEventId],
        limit: usize,
        min_depth: u64,
    ) -> Result<Vec<Arc<StoredEvent>>> {
        self.check_server_in_room(room_id, server).await?;
        let limit = limit.min(MAX_HISTORY_PAGE);
        let mut seen: HashSet<OwnedEventId> = earliest.iter().take(MAX_HISTORY_PAGE).cloned().collect();
        let mut queue = BinaryHeap::new();
        for id in latest.iter().take(MAX_HISTORY_PAGE) {
            if seen.insert(id.clone())
                && let Some(event) = self.history_event(room_id, id).await?
            {
                queue.push(HeapEntry(event));
            }
        }
        let mut found = Vec::with_capacity(limit);
        // The latest events are where the walk starts, not part of the answer.
        let mut is_start: HashSet<OwnedEventId> = latest.iter().cloned().collect();
        while found.len() < limit
            && let Some(HeapEntry(event)) = queue.pop()
        {
            if event.pdu.depth < min_depth {
                continue;
            }
            for prev in &event.pdu.prev_events {
                if seen.insert(prev.clone())
                    && let Some(prev_event) = self.history_event(room_id, prev).await?
                {
                    queue.push(HeapEntry(prev_event));
                }
            }
            if !is_start.remove(&event.pdu.event_id) {
                found.push(event);
            }
        }
        found.sort_by_key(|event| (event.pdu.depth, event.stream_pos));
        self.as_server_sees(server, room_id, found, false).await
    }

    /// A timeline event of `room_id` for a walk through history: `None` for unknown events,
    /// outliers and events of other rooms (a peer may name any event ID).
    async fn history_event(&self, room_id: &RoomId, event_id: &EventId) -> Result<Option<Arc<StoredEvent>>> {
        Ok(self.timeline_event(event_id).await?.filter(|event| event.pdu.room_id == room_id))
    }

    /// `events` as `server` may receive them: in full where history visibility allows, else
    /// redacted (`redact_hidden`) or left out.
    async fn as_server_sees(
        &self,
        server: &ServerName,
        room_id: &RoomId,
        events: Vec<Arc<StoredEvent>>,
        redact_hidden: bool,
    ) -> Result<Vec<Arc<StoredEvent>>> {
        let rules = self.handle(room_id).await?.rules.clone();
        // Runs of messages share a state group: decide once per group.
        let mut views: HashMap<i64, Option<ServerView>> = HashMap::new();
        let mut served = Vec::with_capacity(events.len());
        for event in events {
            let view = match views.get(&event.state_after) {
                Some(view) => *view,
                None => {
                    let view = match self.server_view_at(server, event.state_after, true).await {
                        Ok(view) => Some(view),
                        Err(Error::Forbidden(_)) => None,
                        Err(err) => return Err(err),
                    };
                    views.insert(event.state_after, view);
                    view
                }
            };
            match view {
                Some(ServerView::Full) => served.push(event),
                Some(ServerView::Redacted) | None if redact_hidden => {
                    let pdu = event.pdu.redacted(&rules).map_err(Error::Internal)?;
                    served.push(Arc::new(StoredEvent { pdu, ..(*event).clone() }));
                }
                Some(ServerView::Redacted) | None => {}
            }
        }
        Ok(served)
    }
}

/// An event ordered by its place in the graph: depth, then arrival.
struct HeapEntry(Arc<StoredEvent>);

impl HeapEntry {
    fn key(&self) -> (u64, i64) {
        (self.0.pdu.depth, self.0.stream_pos)
    }
}

impl PartialEq for HeapEntry {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for HeapEntry {}

impl PartialOrd for HeapEntry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for HeapEntry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}
