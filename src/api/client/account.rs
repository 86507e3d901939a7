//! Account management: `whoami`, password change and deactivation.

use std::sync::Arc;

use axum::extract::State;
use ruma::api::client::account::{ThirdPartyIdRemovalStatus, change_password, deactivate, whoami};

use crate::{
    api::{
        extract::{AuthedUser, GuestOrUser, Ruma},
        respond::ApiResult,
    },
    service::{rooms::Rooms, users::Users},
};

/// `GET /_matrix/client/v3/account/whoami`
pub async fn whoami(
    GuestOrUser(authed): GuestOrUser,
    Ruma(_): Ruma<whoami::v3::Request>,
) -> ApiResult<whoami::v3::Response> {
    let mut response = whoami::v3::Response::new(authed.user_id, authed.is_guest);
    response.device_id = Some(authed.device_id);
    Ok(response.into())
}

/// `POST /_matrix/client/v3/account/password`
pub async fn change_password(
    State(users): State<Arc<Users>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<change_password::v3::Request>,
) -> ApiResult<change_password::v3::Response> {
    users.change_password(&authed, req.auth.as_ref(), req.new_password, req.logout_devices).await?;
    Ok(change_password::v3::Response::new().into())
}

/// `POST /_matrix/client/v3/account/deactivate`
pub async fn deactivate(
    State(users): State<Arc<Users>>,
    State(rooms): State<Arc<Rooms>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<deactivate::v3::Request>,
) -> ApiResult<deactivate::v3::Response> {
    users.deactivate(&authed, req.auth.as_ref()).await?;
    rooms.leave_all(&authed.user_id).await?;
    // Hearth keeps no third-party identifiers, so there is nothing to unbind anywhere.
    Ok(deactivate::v3::Response::new(ThirdPartyIdRemovalStatus::NoSupport).into())
}
