//! Presence.

use std::{sync::Arc, time::Duration};

use axum::extract::State;
use ruma::{
    api::client::presence::{get_presence, set_presence},
    presence::PresenceState,
};

use crate::{
    api::{
        RateLimits,
        extract::{AuthedUser, Ruma},
        respond::ApiResult,
    },
    error::Error,
    service::{ephemeral::Presence, rate_limit::UserAction},
};

/// `PUT /_matrix/client/v3/presence/{userId}/status`
pub async fn set(
    State(presence): State<Arc<Presence>>,
    State(limits): State<Arc<RateLimits>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<set_presence::v3::Request>,
) -> ApiResult<set_presence::v3::Response> {
    if req.user_id != authed.user_id {
        return Err(Error::forbidden("You cannot set another user's presence"));
    }
    limits.user.check(UserAction::Presence, &authed.user_id)?;
    let state = match req.presence {
        PresenceState::Online => "online",
        PresenceState::Unavailable => "unavailable",
        PresenceState::Offline => "offline",
        _ => return Err(Error::InvalidParam("presence must be online, unavailable or offline".to_owned())),
    };
    if req.status_msg.as_ref().is_some_and(|msg| msg.len() > 1024) {
        return Err(Error::InvalidParam("status_msg is too long".to_owned()));
    }
    presence.set(&authed.user_id, state, req.status_msg);
    Ok(set_presence::v3::Response::new().into())
}

/// `GET /_matrix/client/v3/presence/{userId}/status`
pub async fn get(
    State(presence): State<Arc<Presence>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<get_presence::v3::Request>,
) -> ApiResult<get_presence::v3::Response> {
    let view = presence.get(&authed.user_id, &req.user_id)?;
    let state = match view.presence.as_str() {
        "online" => PresenceState::Online,
        "unavailable" => PresenceState::Unavailable,
        _ => PresenceState::Offline,
    };
    let mut response = get_presence::v3::Response::new(state);
    response.status_msg = view.status_msg;
    response.currently_active = Some(view.currently_active);
    response.last_active_ago = view.last_active_ago.map(|ms| Duration::from_millis(ms as u64));
    Ok(response.into())
}
