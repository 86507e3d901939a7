//! Inviting, leaving and knocking (Server-Server API, "Inviting to a room", "Leaving Rooms
//! (Rejecting Invites)", "Knocking upon a room"): the other handshakes on a room's membership,
//! served to other servers. Joins are in `membership`.

use std::sync::Arc;

use axum::extract::State;
use ruma::api::federation::membership::{
    create_invite, create_knock_event, create_leave_event, prepare_knock_event, prepare_leave_event,
};

use crate::{
    api::{
        extract::{Origin, Ruma},
        respond::ApiResult,
    },
    service::remote_membership::RemoteMembership,
};

/// `PUT /_matrix/federation/v2/invite/{roomId}/{eventId}`
pub async fn invite(
    State(remote): State<Arc<RemoteMembership>>,
    Origin(origin): Origin,
    Ruma(req): Ruma<create_invite::v2::Request>,
) -> ApiResult<create_invite::v2::Response> {
    let event = remote
        .receive_invite(&origin, &req.room_id, &req.event_id, &req.room_version, &req.event, &req.invite_room_state)
        .await?;
    Ok(create_invite::v2::Response::new(event).into())
}

/// `GET /_matrix/federation/v1/make_leave/{roomId}/{userId}`
pub async fn make_leave(
    State(remote): State<Arc<RemoteMembership>>,
    Origin(origin): Origin,
    Ruma(req): Ruma<prepare_leave_event::v1::Request>,
) -> ApiResult<prepare_leave_event::v1::Response> {
    let (version, event) = remote.make_member_event(&origin, &req.room_id, &req.user_id, "leave", None).await?;
    Ok(prepare_leave_event::v1::Response::new(Some(version), event).into())
}

/// `PUT /_matrix/federation/v2/send_leave/{roomId}/{eventId}`
pub async fn send_leave(
    State(remote): State<Arc<RemoteMembership>>,
    Origin(origin): Origin,
    Ruma(req): Ruma<create_leave_event::v2::Request>,
) -> ApiResult<create_leave_event::v2::Response> {
    remote.send_member_event(&origin, &req.room_id, &req.event_id, &req.pdu, "leave").await?;
    Ok(create_leave_event::v2::Response::new().into())
}

/// `GET /_matrix/federation/v1/make_knock/{roomId}/{userId}`
pub async fn make_knock(
    State(remote): State<Arc<RemoteMembership>>,
    Origin(origin): Origin,
    Ruma(req): Ruma<prepare_knock_event::v1::Request>,
) -> ApiResult<prepare_knock_event::v1::Response> {
    let (version, event) =
        remote.make_member_event(&origin, &req.room_id, &req.user_id, "knock", Some(&req.ver)).await?;
    Ok(prepare_knock_event::v1::Response::new(version, event).into())
}

/// `PUT /_matrix/federation/v1/send_knock/{roomId}/{eventId}`
pub async fn send_knock(
    State(remote): State<Arc<RemoteMembership>>,
    Origin(origin): Origin,
    Ruma(req): Ruma<create_knock_event::v1::Request>,
) -> ApiResult<create_knock_event::v1::Response> {
    remote.send_member_event(&origin, &req.room_id, &req.event_id, &req.pdu, "knock").await?;
    let state = remote.knock_room_state(&req.room_id).await?;
    Ok(create_knock_event::v1::Response::new(state).into())
}
