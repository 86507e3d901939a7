//! Joining rooms (Server-Server API, "Joining Rooms"): the join template and taking in the
//! signed join, for users of other servers.

use std::sync::Arc;

use axum::extract::State;
use ruma::api::federation::membership::{create_join_event, prepare_join_event};

use crate::{
    api::{
        extract::{Origin, Ruma},
        respond::ApiResult,
    },
    service::joins::Joins,
};

/// `GET /_matrix/federation/v1/make_join/{roomId}/{userId}`
pub async fn make_join(
    State(joins): State<Arc<Joins>>,
    Origin(origin): Origin,
    Ruma(req): Ruma<prepare_join_event::v1::Request>,
) -> ApiResult<prepare_join_event::v1::Response> {
    let (version, event) = joins.make_join(&origin, &req.room_id, &req.user_id, &req.ver).await?;
    let mut response = prepare_join_event::v1::Response::new(event);
    response.room_version = Some(version);
    Ok(response.into())
}

/// `PUT /_matrix/federation/v2/send_join/{roomId}/{eventId}`
pub async fn send_join(
    State(joins): State<Arc<Joins>>,
    Origin(origin): Origin,
    Ruma(req): Ruma<create_join_event::v2::Request>,
) -> ApiResult<create_join_event::v2::Response> {
    let room_state = joins.send_join(&origin, &req.room_id, &req.event_id, &req.pdu, req.omit_members).await?;
    Ok(create_join_event::v2::Response::new(room_state).into())
}
