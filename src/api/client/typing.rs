//! Typing notifications.

use std::sync::Arc;

use axum::extract::State;
use ruma::api::client::typing::create_typing_event::{self, v3::Typing as TypingState};

use crate::{
    api::{
        RateLimits,
        extract::{AuthedUser, Ruma},
        respond::ApiResult,
    },
    error::Error,
    service::{ephemeral::Typing, rate_limit::UserAction},
};

/// `PUT /_matrix/client/v3/rooms/{roomId}/typing/{userId}`
pub async fn typing(
    State(typing): State<Arc<Typing>>,
    State(limits): State<Arc<RateLimits>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<create_typing_event::v3::Request>,
) -> ApiResult<create_typing_event::v3::Response> {
    if req.user_id != authed.user_id {
        return Err(Error::forbidden("You cannot set another user's typing state"));
    }
    limits.user.check(UserAction::Typing, &authed.user_id)?;
    match req.state {
        TypingState::Yes(info) => {
            typing.set(&authed.user_id, &req.room_id, true, Some(info.timeout.as_millis() as u64))?
        }
        _ => typing.set(&authed.user_id, &req.room_id, false, None)?,
    }
    Ok(create_typing_event::v3::Response::new().into())
}
