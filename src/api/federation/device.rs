//! Device management (Server-Server API "Device management"): a local user's device list for
//! the servers that share a room with them, with each device's identity keys (an empty key set
//! for a device that uploaded none) and the user's master and self-signing keys.

use std::sync::Arc;

use axum::extract::State;
use ruma::{
    UInt,
    api::federation::device::get_devices::{self, v1::UserDevice},
    serde::Raw,
};
use serde_json::json;

use crate::{
    api::{
        extract::{Origin, Ruma},
        respond::ApiResult,
    },
    error::Error,
    service::{e2ee::E2ee, users::Users},
};

/// `GET /_matrix/federation/v1/user/devices/{userId}`
pub async fn devices(
    State(users): State<Arc<Users>>,
    State(e2ee): State<Arc<E2ee>>,
    Origin(origin): Origin,
    Ruma(req): Ruma<get_devices::v1::Request>,
) -> ApiResult<get_devices::v1::Response> {
    tracing::debug!(%origin, user = %req.user_id, "device list query");
    let (stream_id, rows) = users.devices_for_federation(&req.user_id).await?;
    let mut devices = Vec::with_capacity(rows.len());
    for row in rows {
        let keys = match e2ee.device_keys_for_federation(&req.user_id, row.device_id.as_str()).await? {
            Some(keys) => keys,
            None => json!({
                "user_id": req.user_id,
                "device_id": row.device_id,
                "algorithms": [],
                "keys": {},
                "signatures": {},
            }),
        };
        let keys = serde_json::value::to_raw_value(&keys).map_err(|err| Error::Internal(err.to_string()))?;
        let mut device = UserDevice::new(row.device_id, Raw::from_json(keys));
        device.device_display_name = row.display_name;
        devices.push(device);
    }
    let mut response =
        get_devices::v1::Response::new(req.user_id, UInt::try_from(stream_id.max(0)).unwrap_or_default());
    response.devices = devices;
    let (master, self_signing) = e2ee.cross_signing_for_federation(&response.user_id).await?;
    response.master_key = master.as_ref().map(crate::api::client::keys::raw);
    response.self_signing_key = self_signing.as_ref().map(crate::api::client::keys::raw);
    Ok(response.into())
}
