//! Joins across servers (Server-Server API, "Joining Rooms"): a local user joining a room that
//! lives on other servers (`make_join` to a resident server, sign, `send_join` v2, check the
//! returned state and auth chain, then `Rooms::receive_with_state`), and serving both steps to
//! other servers. Keys are fetched before the room graph is touched, so no network IO happens
//! under a room's writer lock.

use std::sync::Arc;

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedServerName,
    RoomId, RoomVersionId, ServerName, UInt, UserId,
    api::federation::membership::{create_join_event, prepare_join_event},
    signatures::PublicKeyMap,
};
use serde_json::{Map, value::RawValue};

use crate::{
    error::{Error, Result},
    federation::{
        client::FederationClient,
        keys::{Keys, WantedKeys, wanted_for_event},
        outbox::Outbox,
    },
    matrix::{
        pdu::{EventTemplate, Pdu, Placement},
        room_version,
    },
    service::{
        aliases::Aliases,
        now_ms,
        rooms::{RoomHandle, Rooms, receive::Outcome},
        server_keys::ServerKeys,
    },
};

/// Resident servers tried for one join.
const MAX_JOIN_CANDIDATES: usize = 5;

pub struct Joins {
    rooms: Arc<Rooms>,
    aliases: Arc<Aliases>,
    client: Arc<FederationClient>,
    keys: Arc<Keys>,
    server_keys: Arc<ServerKeys>,
    outbox: Arc<Outbox>,
    is_federation_enabled: bool,
}

pub(crate) fn parse_object(raw: &RawValue) -> Result<CanonicalJsonObject> {
    serde_json::from_str(raw.get()).map_err(|err| Error::BadJson(format!("not a PDU: {err}")))
}

pub(crate) fn to_raw(json: String) -> Result<Box<RawValue>> {
    RawValue::from_string(json).map_err(|err| Error::Internal(format!("PDU is not JSON: {err}")))
}

fn ids_of(object: &CanonicalJsonObject, field: &str) -> Result<Vec<OwnedEventId>> {
    match object.get(field) {
        Some(CanonicalJsonValue::Array(items)) => items
            .iter()
            .map(|item| match item {
                CanonicalJsonValue::String(id) => {
                    OwnedEventId::try_from(id.as_str()).map_err(|err| Error::BadJson(err.to_string()))
                }
                _ => Err(Error::BadJson(format!("`{field}` holds a non-string"))),
            })
            .collect(),
        _ => Err(Error::BadJson(format!("`{field}` is missing"))),
    }
}

/// Our user's member event on a resident server's `make_join`/`make_leave`/`make_knock`
/// template: the template's prev events, auth events and depth (its membership must be
/// `membership`), our `content`, hashed and signed with our key.
#[allow(clippy::too_many_arguments)] // Each is one fact of the handshake; a struct would only rename them.
pub(crate) fn sign_member_template(
    server_keys: &ServerKeys,
    server: &ServerName,
    user: &UserId,
    room_id: &RoomId,
    version: &RoomVersionId,
    template: &RawValue,
    membership: &str,
    content: serde_json::Value,
) -> Result<Pdu> {
    let rules = room_version::rules(version).ok_or(Error::UnsupportedRoomVersion)?;
    let bad = |why: &str| Error::BadGateway(format!("{server}: bad make_{membership} template: {why}"));
    let object = parse_object(template).map_err(|_| bad("not JSON"))?;
    let (prev_events, auth_events) = match (ids_of(&object, "prev_events"), ids_of(&object, "auth_events")) {
        (Ok(prev), Ok(auth)) => (prev, auth),
        _ => return Err(bad("prev_events or auth_events")),
    };
    let depth = match object.get("depth") {
        Some(CanonicalJsonValue::Integer(depth)) => u64::try_from(i64::from(*depth)).map_err(|_| bad("depth"))?,
        _ => return Err(bad("depth")),
    };
    let asked = match object.get("content") {
        Some(CanonicalJsonValue::Object(content)) => match content.get("membership") {
            Some(CanonicalJsonValue::String(asked)) => Some(asked.as_str()),
            _ => None,
        },
        _ => None,
    };
    if asked != Some(membership) {
        return Err(bad("membership"));
    }
    let template = EventTemplate {
        event_type: "m.room.member".to_owned(),
        state_key: Some(user.to_string()),
        content: crate::matrix::pdu::canonical_content(content).map_err(Error::BadJson)?,
        redacts: None,
    };
    let placement = Placement {
        room_id: Some(room_id),
        sender: user,
        prev_events: &prev_events,
        auth_events: &auth_events,
        depth,
        origin_server_ts: MilliSecondsSinceUnixEpoch(UInt::try_from(now_ms()).unwrap_or_default()),
    };
    Pdu::build(template, &placement, &rules, server_keys.server_name(), server_keys.key())
        .map_err(|err| Error::BadGateway(format!("{server}: cannot build the {membership}: {err}")))
}

/// The checks both the template requests (`make_join`, `make_leave`, `make_knock`) share: the
/// room's ACL admits `origin`, the user is of `origin`, and (when `versions` is given) the joiner
/// supports the room's version.
pub(crate) async fn check_template_request(
    rooms: &Rooms,
    origin: &ServerName,
    room_id: &RoomId,
    user: &UserId,
    versions: Option<&[RoomVersionId]>,
) -> Result<()> {
    rooms.check_server_acl(room_id, origin).await?;
    if user.server_name() != origin {
        return Err(Error::forbidden("The user is not of the requesting server"));
    }
    let version = rooms.room_version(room_id).await.map_err(|_| Error::not_found("Unknown room"))?;
    if let Some(versions) = versions
        && !versions.contains(&version)
    {
        return Err(Error::IncompatibleRoomVersion(version));
    }
    Ok(())
}

/// The checks both the send requests (`send_join`, `send_leave`, `send_knock`) share before the
/// event goes to the graph: a room we are resident in whose ACL admits `origin`, the event is the
/// one named in the path, and it is a `membership` event of its own sender, a user of `origin`.
pub(crate) async fn check_sent_member_event(
    rooms: &Rooms,
    origin: &ServerName,
    room_id: &RoomId,
    event_id: &ruma::EventId,
    pdu: &RawValue,
    membership: &str,
) -> Result<(Arc<RoomHandle>, CanonicalJsonObject, Pdu)> {
    rooms.check_server_acl(room_id, origin).await?;
    let handle = rooms.handle(room_id).await.map_err(|_| Error::not_found("Unknown room"))?;
    if !rooms.has_local_member(room_id) {
        return Err(Error::not_found("This server is not in the room"));
    }
    let object = parse_object(pdu)?;
    let parsed = Pdu::from_received(&object, &handle.rules).map_err(Error::BadJson)?;
    if parsed.event_id != event_id || parsed.room_id != room_id {
        return Err(Error::BadJson("The event ID or room ID does not match the event".into()));
    }
    let is_own_member_event = parsed.event_type == ruma::events::TimelineEventType::RoomMember
        && parsed.state_key.as_deref() == Some(parsed.sender.as_str())
        && parsed.content_value().get("membership").and_then(|m| m.as_str()) == Some(membership);
    if !is_own_member_event {
        return Err(Error::BadJson(format!("Not a {membership} event of its sender")));
    }
    if parsed.sender.server_name() != origin {
        return Err(Error::forbidden("The user is not of the requesting server"));
    }
    Ok((handle, object, parsed))
}

/// Takes a checked member event another server sent us (`send_join`, `send_leave`,
/// `send_knock`) into the room and, when it is new, sends it on to the room's other servers.
pub(crate) async fn take_sent_member_event(
    rooms: &Rooms,
    keys: &Keys,
    origin: &ServerName,
    handle: &RoomHandle,
    object: CanonicalJsonObject,
    membership: &str,
) -> Result<()> {
    let keys = keys.public_key_map_for_event(&object, &handle.rules.signatures).await.map_err(Error::BadJson)?;
    match rooms.receive_pdu(origin, &handle.room_id, object, &keys, Vec::new()).await? {
        Outcome::Accepted { event_id, .. } => {
            // The stored copy: for a restricted join it carries our signature as authoriser.
            if let Some(event) = rooms.event(&event_id).await? {
                rooms.forward_received(origin, &event.pdu).await;
            }
            Ok(())
        }
        Outcome::AlreadyKnown { .. } => Ok(()),
        Outcome::SoftFailed { .. } | Outcome::Rejected { .. } => {
            Err(Error::forbidden(format!("The {membership} is not allowed")))
        }
        Outcome::Dropped { reason } => Err(Error::BadJson(format!("The {membership} was refused: {reason}"))),
        Outcome::MissingEvents { .. } => {
            Err(Error::BadJson(format!("The {membership} cites events this server does not have")))
        }
    }
}

impl Joins {
    pub fn new(
        rooms: Arc<Rooms>,
        aliases: Arc<Aliases>,
        client: Arc<FederationClient>,
        keys: Arc<Keys>,
        server_keys: Arc<ServerKeys>,
        outbox: Arc<Outbox>,
        is_federation_enabled: bool,
    ) -> Joins {
        Joins { rooms, aliases, client, keys, server_keys, outbox, is_federation_enabled }
    }

    /// `POST /join/{roomIdOrAlias}` and `/rooms/{roomId}/join`: joins locally when this server
    /// is in the room (or the room is ours), else through the `via` servers, the alias's servers
    /// and the room ID's server, in that order, until one lets us in.
    pub async fn join(
        &self,
        user: &UserId,
        is_guest: bool,
        room_id_or_alias: &str,
        via: &[OwnedServerName],
        reason: Option<&str>,
    ) -> Result<OwnedRoomId> {
        let mut candidates: Vec<OwnedServerName> = via.to_vec();
        let invited_through = self.invite_servers(user, room_id_or_alias).await?;
        let room_id = if room_id_or_alias.starts_with('#') {
            let alias = ruma::RoomAliasId::parse(room_id_or_alias).map_err(|e| Error::InvalidParam(e.to_string()))?;
            let (room_id, servers) = self.aliases.resolve(&alias).await?;
            candidates.extend(servers);
            candidates.push(alias.server_name().to_owned());
            room_id
        } else {
            RoomId::parse(room_id_or_alias).map_err(|e| Error::InvalidParam(e.to_string()))?
        };
        let is_known = self.rooms.handle(&room_id).await.is_ok();
        let is_remote =
            is_known && !self.rooms.has_local_member(&room_id) && !self.rooms.other_servers(&room_id).is_empty();
        if (is_known && !is_remote) || !self.is_federation_enabled {
            self.rooms.join(user, is_guest, &room_id, reason).await?;
            return Ok(room_id);
        }
        if is_guest {
            return Err(Error::forbidden("Guests cannot join rooms on other servers"));
        }
        candidates.extend(invited_through);
        if let Some(server) = room_id.server_name() {
            candidates.push(server.to_owned());
        }
        candidates.extend(self.rooms.other_servers(&room_id));
        let mut tried: Vec<OwnedServerName> = Vec::new();
        let mut last_error = Error::not_found("No server in the room is known: give one with `via`");
        for server in candidates {
            if server == *self.rooms.server_name() || tried.contains(&server) {
                continue;
            }
            if tried.len() >= MAX_JOIN_CANDIDATES {
                break;
            }
            tried.push(server.clone());
            match self.join_through(&server, user, &room_id, reason).await {
                Ok(()) => return Ok(room_id),
                Err(err) => {
                    tracing::info!(%server, %room_id, %err, "a remote join failed; trying the next server");
                    last_error = err;
                }
            }
        }
        Err(last_error)
    }

    /// The servers recorded with `user`'s out-of-band invite or knock of the room, or its end
    /// (the inviter's first): how a room whose ID names no server (v12) is reached.
    async fn invite_servers(&self, user: &UserId, room_id_or_alias: &str) -> Result<Vec<OwnedServerName>> {
        let Ok(room_id) = RoomId::parse(room_id_or_alias) else { return Ok(Vec::new()) };
        let row = self.rooms.out_of_band_membership(&room_id, user).await?;
        Ok(row.and_then(|row| serde_json::from_str(&row.servers).ok()).unwrap_or_default())
    }

    /// One attempt through one resident server.
    async fn join_through(
        &self,
        server: &ServerName,
        user: &UserId,
        room_id: &RoomId,
        reason: Option<&str>,
    ) -> Result<()> {
        let mut request = prepare_join_event::v1::Request::new(room_id.to_owned(), user.to_owned());
        request.ver = room_version::SUPPORTED.to_vec();
        let template = match self.client.send(server, request).await {
            Ok(response) => response,
            Err(crate::federation::FederationError::Remote { status: 403, message, .. }) => {
                return Err(Error::forbidden(format!("The room's server refused the join: {message}")));
            }
            Err(crate::federation::FederationError::Remote { status: 404, .. }) => {
                return Err(Error::not_found("The room is not known to that server"));
            }
            // A restricted room's server that cannot vouch for the user: the caller tries the
            // next one, and if none can, the client hears that it may not join.
            Err(crate::federation::FederationError::Remote { errcode, message, .. })
                if errcode == "M_UNABLE_TO_AUTHORISE_JOIN" || errcode == "M_UNABLE_TO_GRANT_JOIN" =>
            {
                return Err(Error::forbidden(format!("The room's server cannot authorise the join: {message}")));
            }
            Err(err) => return Err(err.into()),
        };
        let version = template.room_version.unwrap_or(RoomVersionId::V1);
        let rules = room_version::rules(&version).ok_or(Error::UnsupportedRoomVersion)?;
        let object = parse_object(&template.event).map_err(|_| Error::BadGateway("bad make_join template".into()))?;
        let bad = |why: &str| Error::BadGateway(format!("{server}: bad make_join template: {why}"));
        let mut extra = Map::new();
        if let Some(reason) = reason {
            extra.insert("reason".into(), serde_json::json!(reason));
        }
        // A restricted room's resident server names who vouches for the join; it signs it too.
        if let Some(CanonicalJsonValue::Object(content)) = object.get("content")
            && let Some(CanonicalJsonValue::String(authoriser)) = content.get("join_authorised_via_users_server")
        {
            extra.insert("join_authorised_via_users_server".into(), serde_json::json!(authoriser));
        }
        let content = self.rooms.join_content(user, extra).await?;
        let join =
            sign_member_template(&self.server_keys, server, user, room_id, &version, &template.event, "join", content)?;
        // `omit_members` stays false: a partial-state room would need its member events fetched
        // later (and events checked against state we lack meanwhile), which we do not do yet, so
        // as joiner we always ask for the full state.
        let request =
            create_join_event::v2::Request::new(room_id.to_owned(), join.event_id.clone(), to_raw(join.json.clone())?);
        let answer = self.client.send(server, request).await?.room_state;
        // The resident server's copy carries its signature as authoriser of a restricted join;
        // it must still be our event.
        let join_object = match &answer.event {
            Some(raw) => {
                let signed = parse_object(raw).map_err(|_| bad("event"))?;
                let parsed = Pdu::from_received(&signed, &rules).map_err(|_| bad("event"))?;
                if parsed.event_id != join.event_id {
                    return Err(bad("the signed join is not our join"));
                }
                signed
            }
            None => join.canonical_object(),
        };

        let mut state = Vec::with_capacity(answer.state.len());
        for raw in &answer.state {
            state.push(parse_object(raw).map_err(|_| bad("state"))?);
        }
        let mut auth_chain = Vec::with_capacity(answer.auth_chain.len());
        for raw in &answer.auth_chain {
            auth_chain.push(parse_object(raw).map_err(|_| bad("auth_chain"))?);
        }
        // Every signature's key, fetched before the graph is touched.
        let mut wanted = WantedKeys::new();
        for object in state.iter().chain(&auth_chain).chain(std::iter::once(&join_object)) {
            if let Ok((keys, _)) = wanted_for_event(object, &rules.signatures) {
                for (server, ids) in keys {
                    wanted.entry(server).or_default().extend(ids);
                }
            }
        }
        let keys: PublicKeyMap = self.keys.public_key_map(&wanted, now_ms()).await;
        let outcome =
            self.rooms.receive_with_state(server, room_id, &version, join_object, state, auth_chain, &keys).await?;
        match outcome {
            Outcome::Accepted { .. } | Outcome::AlreadyKnown { .. } => Ok(()),
            other => Err(Error::BadGateway(format!("{server}: the join's state did not check out: {other:?}"))),
        }
    }

    /// `GET /make_join/{roomId}/{userId}` for another server's user.
    pub async fn make_join(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        user: &UserId,
        versions: &[RoomVersionId],
    ) -> Result<(RoomVersionId, Box<RawValue>)> {
        self.outbox.peer_seen(origin);
        check_template_request(&self.rooms, origin, room_id, user, Some(versions)).await?;
        let (version, template) = self.rooms.join_template(room_id, user).await?;
        let json = serde_json::to_string(&template).map_err(|err| Error::Internal(err.to_string()))?;
        Ok((version, to_raw(json)?))
    }

    /// `PUT /send_join/{roomId}/{eventId}` (v2): checks the join and takes it into the room,
    /// sends it on to the room's other servers, then answers with the state before it and its
    /// auth chain — without most member events when the joiner asked `omit_members`.
    pub async fn send_join(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        event_id: &ruma::EventId,
        pdu: &RawValue,
        omit_members: bool,
    ) -> Result<create_join_event::v2::RoomState> {
        self.outbox.peer_seen(origin);
        let (handle, object, parsed) =
            check_sent_member_event(&self.rooms, origin, room_id, event_id, pdu, "join").await?;
        let (object, is_co_signed) = self.authorise_restricted_join(&handle, &parsed, object).await?;
        take_sent_member_event(&self.rooms, &self.keys, origin, &handle, object, "join").await?;
        let mut room_state = create_join_event::v2::RoomState::new();
        let (state, auth_chain) = if omit_members {
            let (state, auth_chain, servers) =
                self.rooms.partial_state_and_auth_chain_before(event_id, &parsed.sender).await?;
            room_state.members_omitted = true;
            room_state.servers_in_room = Some(servers.into_iter().map(|server| server.to_string()).collect());
            (state, auth_chain)
        } else {
            self.rooms.state_and_auth_chain_before(event_id).await?
        };
        room_state.state = state.into_iter().map(to_raw).collect::<Result<_>>()?;
        room_state.auth_chain = auth_chain.into_iter().map(to_raw).collect::<Result<_>>()?;
        if is_co_signed {
            let event = self.rooms.event(event_id).await?.ok_or_else(|| Error::Internal("join vanished".into()))?;
            room_state.event = Some(to_raw(event.pdu.json.clone())?);
        }
        Ok(room_state)
    }

    /// A restricted join naming one of our users as its authoriser (`make_join` put it there):
    /// checked again against our state, then signed by us, as the auth rules want the
    /// authorising server's signature. Other joins pass unchanged. Returns whether we signed.
    async fn authorise_restricted_join(
        &self,
        handle: &crate::service::rooms::RoomHandle,
        join: &Pdu,
        mut object: CanonicalJsonObject,
    ) -> Result<(CanonicalJsonObject, bool)> {
        let is_ours = join
            .content_value()
            .get("join_authorised_via_users_server")
            .and_then(|user| user.as_str())
            .and_then(|user| UserId::parse(user).ok())
            .is_some_and(|user| user.server_name() == self.rooms.server_name());
        if !is_ours {
            return Ok((object, false));
        }
        // Whether `authoriser` may invite is the auth rules' question (in `receive_pdu`); here,
        // whether the user may join through an allowed room at all.
        if self.rooms.remote_join_authoriser(handle, &join.sender).await?.is_none() {
            return Ok((object, false));
        }
        crate::matrix::pdu::co_sign(&mut object, &handle.rules, self.rooms.server_name(), self.server_keys.key())
            .map_err(|err| Error::BadJson(format!("cannot sign the join: {err}")))?;
        Ok((object, true))
    }
}
