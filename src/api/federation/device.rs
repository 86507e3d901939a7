//! Device management (Server-Server API "Device management"): a local user's device list for
//! the servers that share a room with them. Devices carry no identity keys until end-to-end
//! encryption is built, so each device's `keys` is an empty key set.

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
    service::users::Users,
};

/// `GET /_matrix/federation/v1/user/devices/{userId}`
pub async fn devices(
    State(users): State<Arc<Users>>,
    Origin(origin): Origin,
    Ruma(req): Ruma<get_devices::v1::Request>,
) -> ApiResult<get_devices::v1::Response> {
    tracing::debug!(%origin, user = %req.user_id, "device list query");
    let (stream_id, rows) = users.devices_for_federation(&req.user_id).await?;
    let mut devices = Vec::with_capacity(rows.len());
    for row in rows {
        // TODO(issue 8 sequel: end-to-end encryption) the device's uploaded identity keys.
        let keys = json!({
            "user_id": req.user_id,
            "device_id": row.device_id,
            "algorithms": [],
            "keys": {},
            "signatures": {},
        });
        let keys = serde_json::value::to_raw_value(&keys).map_err(|err| Error::Internal(err.to_string()))?;
        let mut device = UserDevice::new(row.device_id, Raw::from_json(keys));
        device.device_display_name = row.display_name;
        devices.push(device);
    }
    let mut response =
        get_devices::v1::Response::new(req.user_id, UInt::try_from(stream_id.max(0)).unwrap_or_default());
    response.devices = devices;
    Ok(response.into())
}
