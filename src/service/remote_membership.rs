//! Invites, leaves and knocks across servers (Server-Server API, "Inviting to a room",
//! "Leaving Rooms (Rejecting Invites)", "Knocking upon a room"): a local user inviting a user of
//! another server (`/v2/invite` to their server, then the doubly signed event into our room), an
//! invite from another server for a local user (checked, countersigned, and — for a room this
//! server is not in — kept as an out-of-band membership that sync shows), rejecting or
//! retracting through the room's server (`make_leave`/`send_leave`), knocking on a remote room
//! (`make_knock`/`send_knock`), and serving those handshakes to other servers. Network IO
//! happens before the room's writer is taken (`Rooms::build_member_event` reads the
//! extremities, the commit goes through `Rooms::receive_pdu`).

use std::sync::Arc;

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, EventId, OwnedServerName, RoomId, RoomVersionId, ServerName, UserId,
    api::federation::membership::{
        RawStrippedState, create_invite, create_knock_event, create_leave_event, prepare_knock_event,
        prepare_leave_event,
    },
    events::TimelineEventType,
    room_version_rules::RoomVersionRules,
};
use serde_json::{Value, json, value::RawValue};

use crate::{
    error::{Error, Result},
    federation::{FederationError, client::FederationClient, keys::Keys, outbox::Outbox},
    matrix::{pdu::Pdu, room_version},
    service::{
        joins::{
            check_sent_member_event, check_template_request, parse_object, sign_member_template,
            take_sent_member_event, to_raw,
        },
        now_ms,
        rooms::{Rooms, receive::Outcome},
        server_keys::ServerKeys,
    },
    storage::out_of_band::OutOfBandMembership,
};

/// Servers tried for one rejection or knock.
const MAX_CANDIDATES: usize = 5;

pub struct RemoteMembership {
    rooms: Arc<Rooms>,
    client: Arc<FederationClient>,
    keys: Arc<Keys>,
    server_keys: Arc<ServerKeys>,
    outbox: Arc<Outbox>,
    is_federation_enabled: bool,
}

/// The stripped state of an invite or knock as JSON values, whichever form each entry came in
/// (a full PDU, as Matrix 1.16 sends, or the older stripped event); unreadable entries are left out.
fn stripped_as_json(state: &[RawStrippedState]) -> Vec<Value> {
    state
        .iter()
        .filter_map(|raw| {
            let json = match raw {
                RawStrippedState::Pdu(pdu) => pdu.get().to_owned(),
                other => serde_json::to_string(other).ok()?,
            };
            serde_json::from_str(&json).ok()
        })
        .collect()
}

fn membership_of(pdu: &Pdu) -> Option<String> {
    if pdu.event_type != TimelineEventType::RoomMember {
        return None;
    }
    pdu.content_value().get("membership").and_then(Value::as_str).map(str::to_owned)
}

/// A remote server's refusal, in our words (its errcode is never passed on as ours).
fn refused(what: &str, err: FederationError) -> Error {
    match err {
        FederationError::Remote { status: 403, message, .. } => {
            Error::forbidden(format!("The other server refused the {what}: {message}"))
        }
        FederationError::Remote { status: 404, .. } => Error::not_found("The room is not known to that server"),
        other => other.into(),
    }
}

/// Whether `server` signed `object` with a key in `keys`: the redacted event, stripped of the
/// other servers' signatures, checked with ruma's JSON verifier (ruma's `verify_event` checks
/// only the servers the spec requires of every receiver, which for an invite is not the
/// invitee's).
fn is_signed_by(
    object: &CanonicalJsonObject,
    server: &ServerName,
    keys: &ruma::signatures::PublicKeyMap,
    rules: &RoomVersionRules,
) -> bool {
    let Ok(mut redacted) = ruma::canonical_json::redact(object.clone(), &rules.redaction, None) else {
        return false;
    };
    let Some(CanonicalJsonValue::Object(signatures)) = redacted.get_mut("signatures") else { return false };
    signatures.retain(|name, _| name == server.as_str());
    if signatures.is_empty() {
        return false;
    }
    let Some(server_keys) = keys.get(server.as_str()) else { return false };
    let only = ruma::signatures::PublicKeyMap::from([(server.to_string(), server_keys.clone())]);
    ruma::signatures::verify_json(&only, &redacted).is_ok()
}

/// Servers to reach a room through, from an invite or knock: the member event's sender's, the
/// stripped state's senders', the room ID's (pre-v12 IDs name one), without ours.
fn servers_of(sender: &UserId, stripped: &[Value], room_id: &RoomId, ours: &ServerName) -> Vec<OwnedServerName> {
    let mut servers = vec![sender.server_name().to_owned()];
    for event in stripped {
        if let Some(server) = event
            .get("sender")
            .and_then(Value::as_str)
            .and_then(|s| UserId::parse(s).ok())
            .map(|u| u.server_name().to_owned())
            && !servers.contains(&server)
        {
            servers.push(server);
        }
    }
    if let Some(server) = room_id.server_name()
        && !servers.iter().any(|s| s == server)
    {
        servers.push(server.to_owned());
    }
    servers.retain(|server| server != ours);
    servers
}

impl RemoteMembership {
    pub fn new(
        rooms: Arc<Rooms>,
        client: Arc<FederationClient>,
        keys: Arc<Keys>,
        server_keys: Arc<ServerKeys>,
        outbox: Arc<Outbox>,
        is_federation_enabled: bool,
    ) -> RemoteMembership {
        RemoteMembership { rooms, client, keys, server_keys, outbox, is_federation_enabled }
    }

    /// `POST /rooms/{roomId}/invite` for a user of another server: our invite event, built on
    /// the room's extremities and checked, goes to the invitee's server (`/v2/invite`) with the
    /// room's stripped state; the event it returns, signed by it too, is committed into the room
    /// like any received event (its prev events are ours), which queues it for the room's
    /// servers and the invitee's.
    pub async fn invite(&self, sender: &UserId, room_id: &RoomId, target: &UserId, reason: Option<&str>) -> Result<()> {
        let mut content = json!({ "membership": "invite" });
        if let Some(reason) = reason {
            content["reason"] = json!(reason);
        }
        if !self.is_federation_enabled {
            return Err(Error::forbidden("Federation is disabled on this server"));
        }
        if self.rooms.member_state(room_id, target).await?.as_deref() == Some("join") {
            return Err(Error::forbidden(format!("{target} is already in the room")));
        }
        let (version, pdu) = self.rooms.build_member_event(room_id, sender, target, content).await?;
        let rules = room_version::rules(&version).ok_or(Error::UnsupportedRoomVersion)?;
        let stripped = self.rooms.stripped_state_pdus(room_id).await?.into_iter().map(RawStrippedState::Pdu).collect();
        let request = create_invite::v2::Request::new(
            room_id.to_owned(),
            pdu.event_id.clone(),
            version.clone(),
            to_raw(pdu.json.clone())?,
            stripped,
        );
        let server = target.server_name();
        // Any refusal of the invitee's server (unknown user, not allowed) is a refusal of the invite.
        let answer = self.client.send(server, request).await.map_err(|err| match err {
            FederationError::Remote { status: 400..=499, message, .. } => {
                Error::forbidden(format!("The invitee's server refused the invite: {message}"))
            }
            other => other.into(),
        })?;
        let returned = parse_object(&answer.event)
            .map_err(|_| Error::BadGateway(format!("{server} returned an invite that is not JSON")))?;
        let checked = Pdu::from_received(&returned, &rules)
            .map_err(|why| Error::BadGateway(format!("{server} returned a bad invite: {why}")))?;
        // The invitee's server may add its signature and nothing else: same event ID.
        if checked.event_id != pdu.event_id {
            return Err(Error::BadGateway(format!("{server} changed the invite event")));
        }
        let key_ids = match returned.get("signatures") {
            Some(CanonicalJsonValue::Object(signatures)) => match signatures.get(server.as_str()) {
                Some(CanonicalJsonValue::Object(by_key)) => by_key.keys().cloned().collect(),
                _ => Default::default(),
            },
            _ => Default::default(),
        };
        let wanted = crate::federation::keys::WantedKeys::from([(server.to_owned(), key_ids)]);
        let mut keys = self.keys.public_key_map(&wanted, now_ms()).await;
        if !is_signed_by(&returned, server, &keys, &rules) {
            return Err(Error::BadGateway(format!("{server} did not sign the invite")));
        }
        let ours = self.keys.public_key_map_for_event(&returned, &rules.signatures).await.map_err(Error::BadJson)?;
        keys.extend(ours);
        let own = self.rooms.server_name().clone();
        match self.rooms.receive_pdu(&own, room_id, returned, &keys, Vec::new()).await? {
            Outcome::Accepted { .. } | Outcome::AlreadyKnown { .. } => Ok(()),
            Outcome::SoftFailed { .. } | Outcome::Rejected { .. } => {
                Err(Error::forbidden("The invite is no longer allowed in this room"))
            }
            other => Err(Error::Internal(format!("our own invite was not taken: {other:?}"))),
        }
    }

    /// `PUT /_matrix/federation/v2/invite/{roomId}/{eventId}` (and v1): checks the invite per
    /// the spec (an invite event, of a sender of `origin`, signed by it, for an existing user of
    /// ours, in a version we support), countersigns it, and — when this server is not in the
    /// room — records it as an out-of-band membership with the stripped state, so the invitee's
    /// sync shows it. A resident server gets the event through `/send` as well.
    pub async fn receive_invite(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        event_id: &EventId,
        version: &RoomVersionId,
        event: &RawValue,
        invite_room_state: &[RawStrippedState],
    ) -> Result<Box<RawValue>> {
        self.outbox.peer_seen(origin);
        let rules = room_version::rules(version).ok_or_else(|| Error::IncompatibleRoomVersion(version.clone()))?;
        let mut object = parse_object(event)?;
        crate::matrix::pdu::check_format(&object, &rules).map_err(|err| match err {
            crate::matrix::pdu::FormatError::TooLarge => Error::TooLarge("The invite is too large".into()),
            crate::matrix::pdu::FormatError::Invalid(why) => Error::BadJson(why),
        })?;
        let pdu = Pdu::from_received(&object, &rules).map_err(Error::BadJson)?;
        if pdu.event_id != event_id || pdu.room_id != room_id {
            return Err(Error::BadJson("The event ID or room ID does not match the event".into()));
        }
        if membership_of(&pdu).as_deref() != Some("invite") {
            return Err(Error::BadJson("Not an invite event".into()));
        }
        let target = pdu
            .state_key
            .as_deref()
            .and_then(|key| UserId::parse(key).ok())
            .ok_or_else(|| Error::BadJson("The invite's state_key is not a user ID".into()))?;
        if target.server_name() != self.rooms.server_name() {
            return Err(Error::forbidden("The invited user is not of this server"));
        }
        if pdu.sender.server_name() != origin {
            return Err(Error::forbidden("The inviting user is not of the requesting server"));
        }
        self.rooms.check_invitee(&target).await?;
        let keys = self.keys.public_key_map_for_event(&object, &rules.signatures).await.map_err(Error::BadJson)?;
        if ruma::signatures::verify_event(&keys, &object, &rules).is_err() {
            return Err(Error::forbidden("The invite's signature does not check out"));
        }
        ruma::signatures::sign_event(
            self.rooms.server_name().as_str(),
            self.server_keys.key().key_pair(),
            &mut object,
            &rules.redaction,
        )
        .map_err(|err| Error::Internal(format!("cannot sign the invite: {err}")))?;
        let signed = serde_json::to_string(&object).map_err(|err| Error::Internal(err.to_string()))?;

        let is_resident = self.rooms.handle(room_id).await.is_ok() && self.rooms.has_local_member(room_id);
        if is_resident {
            // Where we hold the room's state, its server ACL applies to the inviting server too.
            self.rooms.check_server_acl(room_id, origin).await?;
        } else {
            let stripped = stripped_as_json(invite_room_state);
            let servers = servers_of(&pdu.sender, &stripped, room_id, self.rooms.server_name());
            self.rooms
                .record_out_of_band(OutOfBandMembership {
                    room_id: room_id.to_owned(),
                    user_id: target.clone(),
                    membership: "invite".to_owned(),
                    event_id: pdu.event_id.clone(),
                    sender: pdu.sender.clone(),
                    room_version: version.to_string(),
                    event_json: signed.clone(),
                    stripped_state: json!(stripped).to_string(),
                    servers: json!(servers).to_string(),
                    stream_pos: 0,
                })
                .await?;
        }
        to_raw(signed)
    }

    /// `POST /rooms/{roomId}/leave`: for an invite or knock of a room this server is not in,
    /// the leave goes through the room's servers (`make_leave`, `send_leave`); if none can be
    /// reached, the invite is still rejected here (the user wants it gone) and the log says so.
    /// Everything else is a leave in a room we are in.
    pub async fn leave(&self, user: &UserId, room_id: &RoomId, reason: Option<&str>) -> Result<()> {
        let resident = self.rooms.handle(room_id).await.is_ok() && self.rooms.has_local_member(room_id);
        let out_of_band = self.rooms.out_of_band_membership(room_id, user).await?;
        let Some(row) = out_of_band.filter(|row| !resident && matches!(row.membership.as_str(), "invite" | "knock"))
        else {
            return self.rooms.leave(user, room_id, reason).await;
        };
        let servers: Vec<OwnedServerName> = serde_json::from_str(&row.servers).unwrap_or_default();
        let mut left = None;
        for server in servers.iter().take(MAX_CANDIDATES) {
            match self.leave_through(server, user, room_id, reason).await {
                Ok(pdu) => {
                    left = Some(pdu);
                    break;
                }
                Err(err) => tracing::info!(%server, %room_id, %err, "a remote leave failed; trying the next server"),
            }
        }
        let (event_id, event_json) = match left {
            Some(pdu) => (pdu.event_id, pdu.json),
            None => {
                tracing::warn!(%room_id, %user, "no server of the room took the leave: it is only recorded here");
                (row.event_id.clone(), "{}".to_owned())
            }
        };
        self.rooms
            .record_out_of_band(OutOfBandMembership {
                membership: "leave".to_owned(),
                event_id,
                sender: user.to_owned(),
                event_json,
                stream_pos: 0,
                ..row
            })
            .await?;
        Ok(())
    }

    /// One `make_leave` + `send_leave` through one server; the signed leave on success.
    async fn leave_through(
        &self,
        server: &ServerName,
        user: &UserId,
        room_id: &RoomId,
        reason: Option<&str>,
    ) -> Result<Pdu> {
        let template = self
            .client
            .send(server, prepare_leave_event::v1::Request::new(room_id.to_owned(), user.to_owned()))
            .await
            .map_err(|err| refused("leave", err))?;
        let version = template.room_version.unwrap_or(RoomVersionId::V1);
        let mut content = serde_json::Map::from_iter([("membership".to_owned(), json!("leave"))]);
        if let Some(reason) = reason {
            content.insert("reason".to_owned(), json!(reason));
        }
        let pdu = sign_member_template(
            &self.server_keys,
            server,
            user,
            room_id,
            &version,
            &template.event,
            "leave",
            Value::Object(content),
        )?;
        let request =
            create_leave_event::v2::Request::new(room_id.to_owned(), pdu.event_id.clone(), to_raw(pdu.json.clone())?);
        self.client.send(server, request).await.map_err(|err| refused("leave", err))?;
        Ok(pdu)
    }

    /// `POST /knock/{roomIdOrAlias}` on a room this server is not in: `make_knock` and
    /// `send_knock` through the given servers (the room ID's server last); the room then shows
    /// in the knocker's sync under `knock` with the `knock_room_state` the room's server sent.
    pub async fn knock(
        &self,
        user: &UserId,
        room_id: &RoomId,
        via: &[OwnedServerName],
        reason: Option<&str>,
    ) -> Result<()> {
        let resident = self.rooms.handle(room_id).await.is_ok() && self.rooms.has_local_member(room_id);
        if resident || !self.is_federation_enabled {
            return self.rooms.knock(user, room_id, reason).await;
        }
        let mut candidates: Vec<OwnedServerName> = via.to_vec();
        if let Some(server) = room_id.server_name() {
            candidates.push(server.to_owned());
        }
        candidates.dedup();
        candidates.retain(|server| server != self.rooms.server_name());
        let mut last_error = Error::not_found("No server of the room is known: give one with `via`");
        for server in candidates.iter().take(MAX_CANDIDATES) {
            match self.knock_through(server, user, room_id, reason).await {
                Ok(()) => return Ok(()),
                Err(err) => {
                    tracing::info!(%server, %room_id, %err, "a remote knock failed; trying the next server");
                    last_error = err;
                }
            }
        }
        Err(last_error)
    }

    async fn knock_through(
        &self,
        server: &ServerName,
        user: &UserId,
        room_id: &RoomId,
        reason: Option<&str>,
    ) -> Result<()> {
        let mut request = prepare_knock_event::v1::Request::new(room_id.to_owned(), user.to_owned());
        request.ver = room_version::SUPPORTED.to_vec();
        let template = self.client.send(server, request).await.map_err(|err| refused("knock", err))?;
        let version = template.room_version;
        let mut content = serde_json::Map::from_iter([("membership".to_owned(), json!("knock"))]);
        if let Some(reason) = reason {
            content.insert("reason".to_owned(), json!(reason));
        }
        let pdu = sign_member_template(
            &self.server_keys,
            server,
            user,
            room_id,
            &version,
            &template.event,
            "knock",
            Value::Object(content),
        )?;
        let request =
            create_knock_event::v1::Request::new(room_id.to_owned(), pdu.event_id.clone(), to_raw(pdu.json.clone())?);
        let answer = self.client.send(server, request).await.map_err(|err| refused("knock", err))?;
        let stripped = stripped_as_json(&answer.knock_room_state);
        let mut servers = vec![server.to_owned()];
        servers.extend(servers_of(user, &stripped, room_id, self.rooms.server_name()));
        servers.dedup();
        self.rooms
            .record_out_of_band(OutOfBandMembership {
                room_id: room_id.to_owned(),
                user_id: user.to_owned(),
                membership: "knock".to_owned(),
                event_id: pdu.event_id.clone(),
                sender: user.to_owned(),
                room_version: version.to_string(),
                event_json: pdu.json.clone(),
                stripped_state: json!(stripped).to_string(),
                servers: json!(servers).to_string(),
                stream_pos: 0,
            })
            .await?;
        Ok(())
    }

    /// `GET /make_leave/{roomId}/{userId}` and `GET /make_knock/{roomId}/{userId}` for a user of
    /// `origin`.
    pub async fn make_member_event(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        user: &UserId,
        membership: &str,
        versions: Option<&[RoomVersionId]>,
    ) -> Result<(RoomVersionId, Box<RawValue>)> {
        self.outbox.peer_seen(origin);
        check_template_request(&self.rooms, origin, room_id, user, versions).await?;
        let (version, template) =
            self.rooms.member_template(room_id, user, json!({ "membership": membership })).await?;
        let json = serde_json::to_string(&template).map_err(|err| Error::Internal(err.to_string()))?;
        Ok((version, to_raw(json)?))
    }

    /// `PUT /send_leave/{roomId}/{eventId}` (v2) and `PUT /send_knock/{roomId}/{eventId}`: the
    /// member event of a user of `origin`, checked and taken into the room like a `send_join`,
    /// then passed on to the room's other servers.
    pub async fn send_member_event(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        event_id: &EventId,
        pdu: &RawValue,
        membership: &str,
    ) -> Result<()> {
        self.outbox.peer_seen(origin);
        let (handle, object, _) =
            check_sent_member_event(&self.rooms, origin, room_id, event_id, pdu, membership).await?;
        take_sent_member_event(&self.rooms, &self.keys, origin, &handle, object, membership).await
    }

    /// `send_knock`'s answer: the room's stripped state.
    pub async fn knock_room_state(&self, room_id: &RoomId) -> Result<Vec<RawStrippedState>> {
        Ok(self.rooms.stripped_state_pdus(room_id).await?.into_iter().map(RawStrippedState::Pdu).collect())
    }
}
