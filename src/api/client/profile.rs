//! User profiles: display name and avatar; a remote user's is asked of their server.

use std::sync::Arc;

use axum::extract::State;
use ruma::{
    api::client::profile::{get_avatar_url, get_display_name, get_profile, set_avatar_url, set_display_name},
    profile::ProfileFieldName,
};
use serde_json::Value;

use crate::{
    api::{
        RateLimits,
        extract::{AuthedUser, Ruma},
        respond::ApiResult,
    },
    error::Error,
    service::{profiles::Profiles, rate_limit::UserAction, rooms::Rooms, users::Users},
};

/// `GET /_matrix/client/v3/profile/{userId}`
pub async fn get(
    State(profiles): State<Arc<Profiles>>,
    Ruma(req): Ruma<get_profile::v3::Request>,
) -> ApiResult<get_profile::v3::Response> {
    let profile = profiles.profile(&req.user_id, None).await?;
    let mut response = get_profile::v3::Response::new();
    for (field, value) in profile.iter() {
        response.set(field.clone(), value.clone());
    }
    Ok(response.into())
}

/// A string field of a profile (a remote server may send anything).
fn text_field(profile: &ruma::profile::UserProfile, field: &str) -> Option<String> {
    profile.get(field).and_then(Value::as_str).map(str::to_owned)
}

/// `GET /_matrix/client/v3/profile/{userId}/displayname`
pub async fn get_displayname(
    State(profiles): State<Arc<Profiles>>,
    Ruma(req): Ruma<get_display_name::v3::Request>,
) -> ApiResult<get_display_name::v3::Response> {
    let profile = profiles.profile(&req.user_id, Some(&ProfileFieldName::DisplayName)).await?;
    Ok(get_display_name::v3::Response::new(text_field(&profile, "displayname")).into())
}

/// `PUT /_matrix/client/v3/profile/{userId}/displayname`
pub async fn set_displayname(
    State(users): State<Arc<Users>>,
    State(rooms): State<Arc<Rooms>>,
    State(limits): State<Arc<RateLimits>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<set_display_name::v3::Request>,
) -> ApiResult<set_display_name::v3::Response> {
    limits.user.check(UserAction::Profile, &authed.user_id)?;
    // The key is required; an empty string clears the name (as in Synapse).
    let displayname = req.displayname.ok_or_else(|| Error::MissingParam("displayname is required".to_owned()))?;
    users.set_displayname(&authed, &req.user_id, Some(&displayname)).await?;
    rooms.propagate_profile(&authed.user_id).await?;
    Ok(set_display_name::v3::Response::new().into())
}

/// `GET /_matrix/client/v3/profile/{userId}/avatar_url`
pub async fn get_avatar_url(
    State(profiles): State<Arc<Profiles>>,
    Ruma(req): Ruma<get_avatar_url::v3::Request>,
) -> ApiResult<get_avatar_url::v3::Response> {
    let profile = profiles.profile(&req.user_id, Some(&ProfileFieldName::AvatarUrl)).await?;
    Ok(get_avatar_url::v3::Response::new(text_field(&profile, "avatar_url").map(Into::into)).into())
}

/// `PUT /_matrix/client/v3/profile/{userId}/avatar_url`
pub async fn set_avatar_url(
    State(users): State<Arc<Users>>,
    State(rooms): State<Arc<Rooms>>,
    State(limits): State<Arc<RateLimits>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<set_avatar_url::v3::Request>,
) -> ApiResult<set_avatar_url::v3::Response> {
    limits.user.check(UserAction::Profile, &authed.user_id)?;
    users.set_avatar_url(&authed, &req.user_id, req.avatar_url.as_ref().map(|url| url.as_str())).await?;
    rooms.propagate_profile(&authed.user_id).await?;
    Ok(set_avatar_url::v3::Response::new().into())
}
