//! Account data (global and per room) and room tags.

use std::sync::Arc;

use axum::extract::State;
use ruma::{
    api::client::{
        config::{get_global_account_data, get_room_account_data, set_global_account_data, set_room_account_data},
        tag::{create_tag, delete_tag, get_tags},
    },
    serde::Raw,
};
use serde_json::Value;

use crate::{
    api::{
        extract::{AuthedUser, GuestOrUser, Ruma},
        respond::ApiResult,
    },
    error::{Error, Result},
    service::account_data::AccountData,
};

fn content_of<T>(raw: &Raw<T>) -> Result<Value> {
    serde_json::from_str(raw.json().get()).map_err(|e| Error::BadJson(e.to_string()))
}

fn raw_of<T>(value: &Value) -> Raw<T> {
    Raw::from_json(serde_json::value::to_raw_value(value).expect("serialisable"))
}

/// `PUT /_matrix/client/v3/user/{userId}/account_data/{type}`
pub async fn set_global(
    State(account_data): State<Arc<AccountData>>,
    GuestOrUser(authed): GuestOrUser,
    Ruma(req): Ruma<set_global_account_data::v3::Request>,
) -> ApiResult<set_global_account_data::v3::Response> {
    let content = content_of(&req.data)?;
    account_data.set(&authed.user_id, &req.user_id, None, &req.event_type.to_string(), content).await?;
    Ok(set_global_account_data::v3::Response::new().into())
}

/// `GET /_matrix/client/v3/user/{userId}/account_data/{type}`
pub async fn get_global(
    State(account_data): State<Arc<AccountData>>,
    GuestOrUser(authed): GuestOrUser,
    Ruma(req): Ruma<get_global_account_data::v3::Request>,
) -> ApiResult<get_global_account_data::v3::Response> {
    let content = account_data.get(&authed.user_id, &req.user_id, None, &req.event_type.to_string()).await?;
    Ok(get_global_account_data::v3::Response::new(raw_of(&content)).into())
}

/// `PUT /_matrix/client/v3/user/{userId}/rooms/{roomId}/account_data/{type}`
pub async fn set_room(
    State(account_data): State<Arc<AccountData>>,
    GuestOrUser(authed): GuestOrUser,
    Ruma(req): Ruma<set_room_account_data::v3::Request>,
) -> ApiResult<set_room_account_data::v3::Response> {
    let content = content_of(&req.data)?;
    account_data.set(&authed.user_id, &req.user_id, Some(&req.room_id), &req.event_type.to_string(), content).await?;
    Ok(set_room_account_data::v3::Response::new().into())
}

/// `GET /_matrix/client/v3/user/{userId}/rooms/{roomId}/account_data/{type}`
pub async fn get_room(
    State(account_data): State<Arc<AccountData>>,
    GuestOrUser(authed): GuestOrUser,
    Ruma(req): Ruma<get_room_account_data::v3::Request>,
) -> ApiResult<get_room_account_data::v3::Response> {
    let content =
        account_data.get(&authed.user_id, &req.user_id, Some(&req.room_id), &req.event_type.to_string()).await?;
    Ok(get_room_account_data::v3::Response::new(raw_of(&content)).into())
}

/// `GET /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags`
pub async fn tags(
    State(account_data): State<Arc<AccountData>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<get_tags::v3::Request>,
) -> ApiResult<get_tags::v3::Response> {
    let tags = account_data.tags(&authed.user_id, &req.user_id, &req.room_id).await?;
    let tags = serde_json::from_value(Value::Object(tags)).map_err(|e| Error::Internal(e.to_string()))?;
    Ok(get_tags::v3::Response::new(tags).into())
}

/// `PUT /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags/{tag}`
pub async fn set_tag(
    State(account_data): State<Arc<AccountData>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<create_tag::v3::Request>,
) -> ApiResult<create_tag::v3::Response> {
    let info = serde_json::to_value(&req.tag_info).map_err(|e| Error::BadJson(e.to_string()))?;
    account_data.set_tag(&authed.user_id, &req.user_id, &req.room_id, &req.tag, info).await?;
    Ok(create_tag::v3::Response::new().into())
}

/// `DELETE /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags/{tag}`
pub async fn delete_tag(
    State(account_data): State<Arc<AccountData>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<delete_tag::v3::Request>,
) -> ApiResult<delete_tag::v3::Response> {
    account_data.delete_tag(&authed.user_id, &req.user_id, &req.room_id, &req.tag).await?;
    Ok(delete_tag::v3::Response::new().into())
}
