//! Room creation and upgrade, single events, `/context` and `/timestamp_to_event`.

use std::sync::Arc;

use axum::extract::State;
use ruma::{
    MilliSecondsSinceUnixEpoch, UInt,
    api::{
        Direction,
        client::{
            context::get_context,
            room::{Visibility, create_room, get_event_by_timestamp, get_room_event, upgrade_room},
        },
    },
    serde::Raw,
};
use serde_json::Value;

use crate::{
    api::{
        RateLimits,
        extract::{AuthedUser, Ruma},
        respond::ApiResult,
    },
    error::{Error, Result},
    matrix::client_event::Format,
    service::{
        rate_limit::UserAction,
        rooms::{
            Rooms,
            create::{CreateRoom, Preset},
            pagination::{Context, PageToken, position_before, position_of},
        },
    },
};

fn object_of<T>(raw: &Raw<T>, what: &str) -> Result<serde_json::Map<String, Value>> {
    match serde_json::from_str::<Value>(raw.json().get()) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(Error::BadJson(format!("{what} must be an object"))),
    }
}

/// `POST /_matrix/client/v3/createRoom`
pub async fn create(
    State(rooms): State<Arc<Rooms>>,
    State(remote): State<Arc<crate::service::remote_membership::RemoteMembership>>,
    State(limits): State<Arc<RateLimits>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<create_room::v3::Request>,
) -> ApiResult<create_room::v3::Response> {
    limits.user.check(UserAction::RoomCreation, &authed.user_id)?;
    let preset = match req.preset.as_ref().map(|p| p.as_str()) {
        None => None,
        Some("private_chat") => Some(Preset::PrivateChat),
        Some("trusted_private_chat") => Some(Preset::TrustedPrivateChat),
        Some("public_chat") => Some(Preset::PublicChat),
        Some(other) => return Err(Error::InvalidParam(format!("unknown preset {other}"))),
    };
    let mut initial_state = Vec::new();
    for event in &req.initial_state {
        let event = object_of(event, "initial_state entries")?;
        let event_type = event
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::BadJson("initial_state entry needs a type".to_owned()))?;
        let state_key = event.get("state_key").and_then(Value::as_str).unwrap_or("");
        let content = event
            .get("content")
            .cloned()
            .ok_or_else(|| Error::BadJson("initial_state entry needs content".to_owned()))?;
        initial_state.push((event_type.to_owned(), state_key.to_owned(), content));
    }
    // Users of other servers are invited once the room exists: their invite goes to their
    // server first (`RemoteMembership::invite`), which creation itself cannot wait on.
    let (invite, remote_invites): (Vec<_>, Vec<_>) =
        req.invite.into_iter().partition(|user| user.server_name() == rooms.server_name());
    let request = CreateRoom {
        preset,
        is_public: req.visibility == Visibility::Public,
        name: req.name,
        topic: req.topic,
        room_alias_name: req.room_alias_name,
        invite,
        is_direct: req.is_direct,
        initial_state,
        creation_content: req.creation_content.as_ref().map(|c| object_of(c, "creation_content")).transpose()?,
        power_level_content_override: req
            .power_level_content_override
            .as_ref()
            .map(|c| object_of(c, "power_level_content_override"))
            .transpose()?,
        room_version: req.room_version,
    };
    let room_id = rooms.create_room(&authed.user_id, request).await?;
    for user in remote_invites {
        if let Err(err) = remote.invite(&authed.user_id, &room_id, &user, None).await {
            tracing::info!(%room_id, %user, %err, "createRoom could not invite a user of another server");
        }
    }
    Ok(create_room::v3::Response::new(room_id).into())
}

/// `POST /_matrix/client/v3/rooms/{roomId}/upgrade`
pub async fn upgrade(
    State(rooms): State<Arc<Rooms>>,
    State(limits): State<Arc<RateLimits>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<upgrade_room::v3::Request>,
) -> ApiResult<upgrade_room::v3::Response> {
    limits.user.check(UserAction::RoomCreation, &authed.user_id)?;
    let new_room = rooms.upgrade_room(&authed.user_id, &req.room_id, req.new_version).await?;
    Ok(upgrade_room::v3::Response::new(new_room).into())
}

/// `GET /_matrix/client/v3/rooms/{roomId}/event/{eventId}`
pub async fn event(
    State(rooms): State<Arc<Rooms>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<get_room_event::v3::Request>,
) -> ApiResult<get_room_event::v3::Response> {
    let (event, access) = rooms.visible_event_with_access(&authed.user_id, &req.room_id, &req.event_id).await?;
    let mut served = rooms
        .serve_timeline(&authed.user_id, Some(authed.device_id.as_str()), &[event], Format::WithRoomId, access.upto)
        .await?;
    Ok(get_room_event::v3::Response::new(Raw::from_json(served.remove(0))).into())
}

/// `GET /_matrix/client/v1/rooms/{roomId}/timestamp_to_event`
pub async fn timestamp_to_event(
    State(rooms): State<Arc<Rooms>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<get_event_by_timestamp::v1::Request>,
) -> ApiResult<get_event_by_timestamp::v1::Response> {
    let forward = req.dir == Direction::Forward;
    let (event_id, ts) = rooms.event_near(&authed.user_id, &req.room_id, i64::from(req.ts.0), forward).await?;
    let ts = MilliSecondsSinceUnixEpoch(UInt::try_from(ts).unwrap_or_default());
    Ok(get_event_by_timestamp::v1::Response::new(event_id, ts).into())
}

/// `GET /_matrix/client/v3/rooms/{roomId}/context/{eventId}`
pub async fn context(
    State(rooms): State<Arc<Rooms>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<get_context::v3::Request>,
) -> ApiResult<get_context::v3::Response> {
    let limit = u64::from(req.limit).min(100) as usize;
    let user = &authed.user_id;
    let device = Some(authed.device_id.as_str());
    crate::service::filter::check_room_event_limits(&req.filter)?;
    let Context { event, before, after, state_group, upto } =
        rooms.context(user, &req.room_id, &req.event_id, limit, Some(&req.filter)).await?;
    let mut response = get_context::v3::Response::new();
    response.start = Some(PageToken::format(position_before(before.events.last().unwrap_or(&event))));
    response.end = Some(PageToken::format(position_of(after.events.last().unwrap_or(&event))));
    let lazy = crate::service::filter::lazy_loading(&req.filter);
    let state = if lazy {
        let mut all = before.events.clone();
        all.push(event.clone());
        all.extend(after.events.iter().cloned());
        rooms.members_for(state_group, &all).await?
    } else {
        rooms.state_events(state_group, None).await?
    };
    // Timeline events: `unsigned.membership` and bundles up to the viewer's read bound.
    let mut served = rooms.serve_timeline(user, device, &[event], Format::WithRoomId, upto).await?;
    response.event = served.pop().map(Raw::from_json);
    response.events_before = rooms
        .serve_timeline(user, device, &before.events, Format::WithRoomId, upto)
        .await?
        .into_iter()
        .map(Raw::from_json)
        .collect();
    response.events_after = rooms
        .serve_timeline(user, device, &after.events, Format::WithRoomId, upto)
        .await?
        .into_iter()
        .map(Raw::from_json)
        .collect();
    response.state =
        rooms.serve(user, device, &state, Format::WithRoomId).await?.into_iter().map(Raw::from_json).collect();
    Ok(response.into())
}
