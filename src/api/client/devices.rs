//! Device management: list, inspect, rename and delete the caller's devices.

use std::sync::Arc;

use axum::extract::State;
use ruma::{
    MilliSecondsSinceUnixEpoch, UInt,
    api::client::device::{Device, delete_device, delete_devices, get_device, get_devices, update_device},
};

use crate::{
    api::{
        extract::{AuthedUser, Ruma},
        respond::ApiResult,
    },
    service::users::Users,
    storage::accounts::DeviceRow,
};

fn device(row: DeviceRow) -> Device {
    let mut device = Device::new(row.device_id);
    device.display_name = row.display_name;
    device.last_seen_ip = row.last_seen_ip;
    device.last_seen_ts = row.last_seen_ts.and_then(|ts| UInt::try_from(ts).ok()).map(MilliSecondsSinceUnixEpoch);
    device
}

/// `GET /_matrix/client/v3/devices`
pub async fn list(
    State(users): State<Arc<Users>>,
    AuthedUser(authed): AuthedUser,
    Ruma(_): Ruma<get_devices::v3::Request>,
) -> ApiResult<get_devices::v3::Response> {
    let devices = users.devices(&authed.user_id).await?.into_iter().map(device).collect();
    Ok(get_devices::v3::Response::new(devices).into())
}

/// `GET /_matrix/client/v3/devices/{deviceId}`
pub async fn get(
    State(users): State<Arc<Users>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<get_device::v3::Request>,
) -> ApiResult<get_device::v3::Response> {
    let row = users.device(&authed.user_id, &req.device_id).await?;
    Ok(get_device::v3::Response::new(device(row)).into())
}

/// `PUT /_matrix/client/v3/devices/{deviceId}`
pub async fn update(
    State(users): State<Arc<Users>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<update_device::v3::Request>,
) -> ApiResult<update_device::v3::Response> {
    users.rename_device(&authed.user_id, &req.device_id, req.display_name.as_deref()).await?;
    Ok(update_device::v3::Response::new().into())
}

/// `DELETE /_matrix/client/v3/devices/{deviceId}`
pub async fn delete(
    State(users): State<Arc<Users>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<delete_device::v3::Request>,
) -> ApiResult<delete_device::v3::Response> {
    users.delete_devices(&authed, std::slice::from_ref(&req.device_id), req.auth.as_ref(), true).await?;
    Ok(delete_device::v3::Response::new().into())
}

/// `POST /_matrix/client/v3/delete_devices`
pub async fn delete_many(
    State(users): State<Arc<Users>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<delete_devices::v3::Request>,
) -> ApiResult<delete_devices::v3::Response> {
    users.delete_devices(&authed, &req.devices, req.auth.as_ref(), false).await?;
    Ok(delete_devices::v3::Response::new().into())
}
