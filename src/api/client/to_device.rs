//! Send-to-device messaging.

use std::sync::Arc;

use axum::extract::State;
use ruma::api::client::to_device::send_event_to_device;
use serde_json::{Map, Value};

use crate::{
    api::{
        RateLimits,
        extract::{AuthedUser, Ruma},
        respond::ApiResult,
    },
    error::Error,
    service::{account_data::AccountData, rate_limit::UserAction},
};

/// `PUT /_matrix/client/v3/sendToDevice/{eventType}/{txnId}`
pub async fn send(
    State(account_data): State<Arc<AccountData>>,
    State(limits): State<Arc<RateLimits>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<send_event_to_device::v3::Request>,
) -> ApiResult<send_event_to_device::v3::Response> {
    if account_data.is_to_device_retry(&authed.user_id, authed.device_id.as_str(), req.txn_id.as_str()).await? {
        return Ok(send_event_to_device::v3::Response::new().into());
    }
    limits.user.check(UserAction::ToDevice, &authed.user_id)?;
    let messages: Map<String, Value> = match serde_json::to_value(&req.messages) {
        Ok(Value::Object(map)) => map,
        _ => return Err(Error::BadJson("messages must be an object".to_owned())),
    };
    account_data
        .send_to_device(
            &authed.user_id,
            authed.device_id.as_str(),
            &req.event_type.to_string(),
            req.txn_id.as_str(),
            &messages,
        )
        .await?;
    Ok(send_event_to_device::v3::Response::new().into())
}
