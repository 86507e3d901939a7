//! Serving a room's graph to other servers (Server-Server API "Retrieving events", `/event`,
//! `/state`, `/state_ids`, `/event_auth`): which server may see which event, the state before an
//! event with its auth chain, and server ACLs (`m.room.server_acl`), which every inbound request
//! about a room must pass.
//!
//! Nothing here does network I/O or takes a room's writer lock: everything is read from stored
//! events and state groups.

use std::{collections::HashSet, sync::Arc};

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
    /// servers: a `world_readable` event goes to anyone; otherwise the server must have had a
    /// member in the room at the event (joined, or for `invited`/`shared` also invited), and
    /// gets the redacted form when the visibility rules hide the event from all its members.
    pub async fn server_view(&self, server: &ServerName, event: &StoredEvent) -> Result<ServerView> {
        // The state at the event: after it for a state event (a join is visible to the joiner),
        // before it otherwise — the two only differ by the event itself.
        let group = if event.is_outlier() { 0 } else { event.state_after };
        let visibility = self
            .state_event_at(group, "m.room.history_visibility", "")
            .await?
            .and_then(|e| e.pdu.content_value().get("history_visibility").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| "shared".to_owned());
        if visibility == "world_readable" {
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
}
