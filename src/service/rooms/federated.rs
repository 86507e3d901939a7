//! What the room graph offers federation: the servers of a room and the queueing of our events
//! for them (and of events other servers handed us, for the rest of the room), under the room's
//! server ACL, the join template other servers ask for (`make_join`), and the state and auth chain
//! before an event (`send_join`'s answer). No network IO here.

use std::collections::{BTreeSet, HashSet};

use ruma::{CanonicalJsonObject, EventId, OwnedEventId, OwnedServerName, RoomId, RoomVersionId, ServerName, UserId};
use serde_json::json;

use super::Rooms;
use crate::{
    error::{Error, Result},
    matrix::pdu::Pdu,
    storage::stream::StreamWrite,
};

/// Largest auth chain served with a `send_join` answer.
const MAX_AUTH_CHAIN: usize = 100_000;

impl Rooms {
    /// The servers of the room's joined members (current state), other than ours.
    pub fn other_servers(&self, room_id: &RoomId) -> Vec<OwnedServerName> {
        let servers: BTreeSet<OwnedServerName> = self
            .streams
            .members(room_id, "join")
            .into_iter()
            .map(|user| user.server_name().to_owned())
            .filter(|server| *server != self.server_name)
            .collect();
        servers.into_iter().collect()
    }

    /// The rooms a local user is joined to.
    pub fn joined_rooms_of(&self, user: &UserId) -> Vec<ruma::OwnedRoomId> {
        let rooms = self.streams.user_rooms(user, i64::MAX);
        rooms.into_iter().filter(|(_, membership, _)| membership == "join").map(|(room_id, _, _)| room_id).collect()
    }

    /// Whether a user of this server is joined to the room.
    pub fn has_local_member(&self, room_id: &RoomId) -> bool {
        self.streams.members(room_id, "join").iter().any(|user| user.server_name() == self.server_name)
    }

    /// Of `servers`, those the room's current `m.room.server_acl` lets take part: our events
    /// never go to a denied server (spec "Server Access Control Lists").
    pub(crate) async fn allowed_servers(
        &self,
        room_id: &RoomId,
        servers: Vec<OwnedServerName>,
    ) -> Vec<OwnedServerName> {
        let mut allowed = Vec::with_capacity(servers.len());
        for server in servers {
            match self.is_server_allowed(room_id, &server).await {
                Ok(true) => allowed.push(server),
                Ok(false) => tracing::debug!(%room_id, %server, "not sending to a server the room's ACL denies"),
                // The ACL could not be read: sending is the safer mistake (the receiver applies
                // the room's ACL to us as well), losing the event for everyone is not.
                Err(err) => {
                    tracing::warn!(%room_id, %server, %err, "cannot read the room's server ACL");
                    allowed.push(server);
                }
            }
        }
        allowed
    }

    /// Sends an event another server handed us to put into the room (a join through
    /// `send_join`, and likewise a leave or knock through `send_leave`/`send_knock`) on to every
    /// other server in the room except `origin`: the spec makes the resident server do this, as
    /// the origin knows only the servers of the state it was given. Call it after the event was
    /// accepted; the member's own server is `origin`, so it is not sent back.
    pub async fn forward_received(&self, origin: &ServerName, pdu: &Pdu) {
        let Some(outbox) = self.outbox.get() else { return };
        let servers = self.other_servers(&pdu.room_id).into_iter().filter(|server| server != origin).collect();
        let destinations = self.allowed_servers(&pdu.room_id, servers).await;
        outbox.enqueue(&destinations, pdu.event_id.as_str(), &pdu.json).await;
    }

    /// Queues committed local events for the other servers in the room (those its server ACL
    /// allows). A member event also goes to its target's server (a kick or a leave reaches the
    /// one who left).
    pub(super) async fn queue_for_other_servers(&self, room_id: &RoomId, writes: &[StreamWrite]) {
        let Some(outbox) = self.outbox.get() else { return };
        let servers = self.allowed_servers(room_id, self.other_servers(room_id)).await;
        for write in writes {
            let StreamWrite::Event(write) = write else { continue };
            let mut destinations = servers.clone();
            if write.pdu.event_type == ruma::events::TimelineEventType::RoomMember
                && let Some(target) = write.pdu.state_key.as_deref().and_then(|k| UserId::parse(k).ok())
                && target.server_name() != self.server_name
                && !destinations.iter().any(|s| s == target.server_name())
                && self.is_server_allowed(room_id, target.server_name()).await.unwrap_or(true)
            {
                destinations.push(target.server_name().to_owned());
            }
            outbox.enqueue(&destinations, write.pdu.event_id.as_str(), &write.pdu.json).await;
        }
    }

    /// `make_join`: a join event of `user` on the room's forward extremities, allowed by the auth
    /// rules against the current state, unsigned, for the user's server to fill in and sign. In
    /// a restricted room it names one of our users as the join's authoriser.
    pub async fn join_template(&self, room_id: &RoomId, user: &UserId) -> Result<(RoomVersionId, CanonicalJsonObject)> {
        let handle = self.handle(room_id).await?;
        if !self.has_local_member(room_id) {
            return Err(Error::not_found("This server is not in the room"));
        }
        let mut content = json!({ "membership": "join" });
        if let Some(authoriser) = self.remote_join_authoriser(&handle, user).await? {
            content["join_authorised_via_users_server"] = json!(authoriser);
        }
        self.member_template(room_id, user, content).await
    }

    /// `send_join`'s answer: the room's state before `event_id` and the auth chain of that state
    /// and of the event, as PDUs (canonical JSON).
    pub async fn state_and_auth_chain_before(&self, event_id: &EventId) -> Result<(Vec<String>, Vec<String>)> {
        let event = self.timeline_event(event_id).await?.ok_or_else(|| Error::not_found("Unknown event"))?;
        let state = self.state_at(event.state_before).await?;
        let state_ids: Vec<&EventId> = state.values().map(|id| &**id).collect();
        let state_events = self.pdus_by_id(&state_ids).await?;
        let roots = state_events.values().flat_map(|pdu| pdu.auth_events.iter().cloned());
        let chain = self.auth_chain_json(event.pdu.auth_events.iter().cloned().chain(roots), &HashSet::new()).await?;
        Ok((state_events.values().map(|pdu| pdu.json.clone()).collect(), chain))
    }

    /// `send_join`'s answer for `omit_members=true` (spec: send_join v2, partial state): the
    /// state before `event_id` without `m.room.member` events, except the joiner's own and, when
    /// the room has neither `m.room.name` nor `m.room.canonical_alias`, those of the heroes a
    /// client would name it by; and the auth chain of the event and of that state, leaving out
    /// what the state already carries. Also the servers in the room before the join, which the
    /// joiner then knows without the member events.
    pub async fn partial_state_and_auth_chain_before(
        &self,
        event_id: &EventId,
        joiner: &UserId,
    ) -> Result<(Vec<String>, Vec<String>, Vec<OwnedServerName>)> {
        let event = self.timeline_event(event_id).await?.ok_or_else(|| Error::not_found("Unknown event"))?;
        let room_id = &event.pdu.room_id;
        let state = self.state_at(event.state_before).await?;
        let is_named = state.contains_key(&("m.room.name".to_owned(), String::new()))
            || state.contains_key(&("m.room.canonical_alias".to_owned(), String::new()));
        let mut kept_members: HashSet<String> = HashSet::from([joiner.to_string()]);
        if !is_named {
            kept_members.extend(self.streams.heroes(room_id, joiner, 5).into_iter().map(|user| user.to_string()));
        }
        let kept_ids: Vec<&EventId> = state
            .iter()
            .filter(|((event_type, state_key), _)| event_type != "m.room.member" || kept_members.contains(state_key))
            .map(|(_, id)| &**id)
            .collect();
        let state_events = self.pdus_by_id(&kept_ids).await?;
        let in_state: HashSet<OwnedEventId> = state_events.keys().cloned().collect();
        let roots = state_events.values().flat_map(|pdu| pdu.auth_events.iter().cloned());
        let chain = self.auth_chain_json(event.pdu.auth_events.iter().cloned().chain(roots), &in_state).await?;
        // The servers joined before the join: those of every joined member but the joiner.
        let mut servers: BTreeSet<OwnedServerName> = self
            .streams
            .members(room_id, "join")
            .into_iter()
            .filter(|user| user != joiner)
            .map(|user| user.server_name().to_owned())
            .collect();
        servers.insert(self.server_name.clone());
        Ok((state_events.values().map(|pdu| pdu.json.clone()).collect(), chain, servers.into_iter().collect()))
    }

    /// The PDUs reachable from `roots` through `auth_events` (the roots included), leaving out
    /// `skip` and not walking on through it (the receiver has those already).
    async fn auth_chain_json(
        &self,
        roots: impl IntoIterator<Item = OwnedEventId>,
        skip: &HashSet<OwnedEventId>,
    ) -> Result<Vec<String>> {
        let mut seen: HashSet<OwnedEventId> = skip.clone();
        let mut frontier: Vec<OwnedEventId> = roots.into_iter().collect();
        let mut chain = Vec::new();
        while !frontier.is_empty() && seen.len() < MAX_AUTH_CHAIN + skip.len() {
            frontier.retain(|id| !seen.contains(id));
            frontier.sort();
            frontier.dedup();
            let ids: Vec<&EventId> = frontier.iter().map(|id| &**id).collect();
            let found = self.pdus_by_id(&ids).await?;
            seen.extend(frontier.drain(..));
            for pdu in found.values() {
                frontier.extend(pdu.auth_events.iter().filter(|id| !seen.contains(*id)).cloned());
                chain.push(pdu.json.clone());
            }
        }
        Ok(chain)
    }
}
