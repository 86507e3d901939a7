//! Room state: sending state events and reading the state.

use std::sync::Arc;

use axum::extract::State;
use ruma::{
    api::client::state::{get_state_event_for_key, get_state_events, send_state_event},
    serde::Raw,
};
use serde_json::Value;

use crate::{
    api::{
        RateLimits,
        extract::{AuthedUser, GuestOrUser, Ruma},
        respond::ApiResult,
    },
    error::Error,
    matrix::client_event::Format,
    service::{rate_limit::UserAction, rooms::Rooms},
};

/// `PUT /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}`
pub async fn send(
    State(rooms): State<Arc<Rooms>>,
    State(limits): State<Arc<RateLimits>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<send_state_event::v3::Request>,
) -> ApiResult<send_state_event::v3::Response> {
    limits.user.check(UserAction::Message, &authed.user_id)?;
    let content: Value = serde_json::from_str(req.body.json().get()).map_err(|e| Error::BadJson(e.to_string()))?;
    if !content.is_object() {
        return Err(Error::BadJson("state content must be an object".to_owned()));
    }
    let event = rooms
        .send_state(&authed.user_id, &req.room_id, &req.event_type.to_string(), &req.state_key, content, None)
        .await?;
    Ok(send_state_event::v3::Response::new(event.pdu.event_id.clone()).into())
}

/// `GET /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}`
pub async fn get_one(
    State(rooms): State<Arc<Rooms>>,
    GuestOrUser(authed): GuestOrUser,
    Ruma(req): Ruma<get_state_event_for_key::v3::Request>,
) -> ApiResult<get_state_event_for_key::v3::Response> {
    let event =
        rooms.state_event_for(&authed.user_id, &req.room_id, &req.event_type.to_string(), &req.state_key).await?;
    let body = match req.format {
        get_state_event_for_key::v3::StateEventFormat::Event => {
            rooms.serve(&authed.user_id, Some(authed.device_id.as_str()), &[event], Format::WithRoomId).await?.remove(0)
        }
        _ => event.pdu.content.clone(),
    };
    Ok(get_state_event_for_key::v3::Response::new(body).into())
}

/// `GET /_matrix/client/v3/rooms/{roomId}/state`
pub async fn get_all(
    State(rooms): State<Arc<Rooms>>,
    GuestOrUser(authed): GuestOrUser,
    Ruma(req): Ruma<get_state_events::v3::Request>,
) -> ApiResult<get_state_events::v3::Response> {
    let events = rooms.full_state_for(&authed.user_id, &req.room_id).await?;
    let served = rooms.serve(&authed.user_id, Some(authed.device_id.as_str()), &events, Format::WithRoomId).await?;
    Ok(get_state_events::v3::Response::new(served.into_iter().map(Raw::from_json).collect()).into())
}
