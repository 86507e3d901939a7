//! What the room graph offers the membership handshakes other than joins (invites, leaves and
//! knocks across servers): a member event built on the current forward extremities and checked
//! against the current state without committing it, and the stripped state sent with an invite
//! (passing a handshake's event on is `Rooms::forward_received`). No network IO here.

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, MilliSecondsSinceUnixEpoch, OwnedEventId, RoomId, RoomVersionId, UInt,
    UserId,
};
use serde_json::{Value, value::RawValue};

use super::{NewEvent, Rooms, graph};
use crate::{
    error::{Error, Result},
    matrix::{
        auth::{self, AuthState},
        pdu::{BuildError, Pdu, Placement},
    },
    service::now_ms,
    storage::{out_of_band::OutOfBandMembership, stream::StreamWrite},
};

/// The state event types sent with an invite or a knock (the spec's recommended stripped state).
const STRIPPED_STATE_TYPES: [&str; 7] = [
    "m.room.create",
    "m.room.join_rules",
    "m.room.name",
    "m.room.avatar",
    "m.room.canonical_alias",
    "m.room.topic",
    "m.room.encryption",
];

impl Rooms {
    /// A member event of `sender` about `target` on the room's forward extremities, signed by
    /// us and allowed by the auth rules against the current state — not committed: the invite
    /// goes to the invitee's server first, and `make_leave`/`make_knock` hand it out as a
    /// template. The writer lock is held only to read the extremities and the state.
    pub(crate) async fn build_member_event(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        target: &UserId,
        content: Value,
    ) -> Result<(RoomVersionId, Pdu)> {
        let handle = self.handle(room_id).await?;
        let (prevs, state) = {
            let writer = handle.writer.lock().await;
            (graph::choose_prev_events(&writer.extremities), writer.current.map.clone())
        };
        let rules = &handle.rules;
        let template = NewEvent::new(sender, "m.room.member", Some(target.as_str()), content)?.template;
        let keys = auth::auth_state_keys(&template, sender, &rules.authorization).map_err(Error::BadJson)?;
        let mut auth_state = AuthState::new();
        for key in keys {
            let Some(event_id) = state.get(&(key.0.to_string(), key.1.clone())) else { continue };
            if let Some(event) = self.event(event_id).await? {
                auth_state.insert(key, std::sync::Arc::new(event.pdu.clone()));
            }
        }
        let auth_events: Vec<OwnedEventId> = auth_state
            .values()
            .filter(|event| auth::belongs_in_auth_events(event, &rules.authorization))
            .map(|event| event.event_id.clone())
            .collect();
        let prev_events: Vec<OwnedEventId> = prevs.iter().map(|(id, _)| id.clone()).collect();
        let placement = Placement {
            room_id: Some(room_id),
            sender,
            prev_events: &prev_events,
            auth_events: &auth_events,
            depth: prevs.iter().map(|(_, depth)| *depth).max().unwrap_or(0) + 1,
            origin_server_ts: MilliSecondsSinceUnixEpoch(UInt::try_from(now_ms()).unwrap_or_default()),
        };
        let pdu =
            Pdu::build(template, &placement, rules, &self.server_name, self.keys.key()).map_err(|err| match err {
                BuildError::TooLarge => Error::TooLarge("Event is larger than 65536 bytes".into()),
                BuildError::Invalid(why) => Error::BadJson(why),
            })?;
        auth::check(&rules.authorization, &pdu, &auth_state)
            .map_err(|why| Error::forbidden(format!("Not allowed in this room: {why}")))?;
        Ok((handle.version.clone(), pdu))
    }

    /// `make_join`/`make_leave`/`make_knock`: the member event of a user of another server with
    /// `content`, unsigned and unhashed, for that server to sign. Only a resident server answers.
    pub async fn member_template(
        &self,
        room_id: &RoomId,
        user: &UserId,
        content: Value,
    ) -> Result<(RoomVersionId, CanonicalJsonObject)> {
        self.handle(room_id).await.map_err(|_| Error::not_found("Unknown room"))?;
        if !self.has_local_member(room_id) {
            return Err(Error::not_found("This server is not in the room"));
        }
        let (version, pdu) = self.build_member_event(room_id, user, user, content).await?;
        let mut object = pdu.canonical_object();
        // The user's server hashes and signs it; our signature would not cover its changes.
        object.remove("signatures");
        object.remove("hashes");
        object.insert("origin".to_owned(), CanonicalJsonValue::String(self.server_name.to_string()));
        Ok((version, object))
    }

    /// The stripped state of an invite or knock answer, as full PDUs (Matrix 1.16: a receiving
    /// server can then check them).
    pub async fn stripped_state_pdus(&self, room_id: &RoomId) -> Result<Vec<Box<RawValue>>> {
        let mut events = Vec::new();
        for event_type in STRIPPED_STATE_TYPES {
            if let Some(event) = self.current_state_event(room_id, event_type, "").await? {
                events.push(
                    RawValue::from_string(event.pdu.json.clone()).map_err(|err| Error::Internal(err.to_string()))?,
                );
            }
        }
        Ok(events)
    }
}

impl Rooms {
    /// The user's out-of-band membership of the room (`storage::out_of_band`), if it is newer
    /// than what the room's own graph says about them.
    pub async fn out_of_band_membership(&self, room_id: &RoomId, user: &UserId) -> Result<Option<OutOfBandMembership>> {
        let Some(row) = self.db.out_of_band_membership(room_id, user).await? else { return Ok(None) };
        let in_graph = self.db.membership(room_id, user).await?;
        Ok(in_graph.is_none_or(|m| m.stream_pos < row.stream_pos).then_some(row))
    }

    /// Records a membership of a room this server is not in, through the stream writer so
    /// syncs see it at its position.
    pub async fn record_out_of_band(&self, row: OutOfBandMembership) -> Result<i64> {
        self.streams.persist(vec![StreamWrite::OutOfBand(Box::new(row))]).await
    }
}
