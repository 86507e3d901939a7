//! Dehydrated devices (MSC3814, unstable prefix `org.matrix.msc3814.v1`). The rules are in
//! `service::e2ee::dehydrated`.

use std::sync::Arc;

use axum::extract::State;
use ruma::{
    api::client::dehydrated_device::{
        delete_dehydrated_device, get_dehydrated_device, get_events, put_dehydrated_device,
    },
    serde::Raw,
};

use super::keys::raw;
use crate::{
    api::{
        extract::{AuthedUser, Ruma},
        respond::ApiResult,
    },
    service::e2ee::{E2ee, dehydrated::NewDehydratedDevice},
};

/// `PUT /_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device`
pub async fn put(
    State(e2ee): State<Arc<E2ee>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<put_dehydrated_device::unstable::Request>,
) -> ApiResult<put_dehydrated_device::unstable::Response> {
    let one_time_keys = req.one_time_keys.iter().map(|(id, key)| (id.to_string(), key.json().to_owned())).collect();
    let fallback_keys = req.fallback_keys.iter().map(|(id, key)| (id.to_string(), key.json().to_owned())).collect();
    let device_id = e2ee
        .put_dehydrated_device(
            &authed.user_id,
            NewDehydratedDevice {
                device_id: &req.device_id,
                display_name: req.initial_device_display_name.as_deref(),
                device_data: req.device_data.json(),
                device_keys: req.device_keys.json(),
                one_time_keys: &one_time_keys,
                fallback_keys: &fallback_keys,
            },
        )
        .await?;
    Ok(put_dehydrated_device::unstable::Response::new(device_id).into())
}

/// `GET /_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device`
pub async fn get(
    State(e2ee): State<Arc<E2ee>>,
    AuthedUser(authed): AuthedUser,
    Ruma(_req): Ruma<get_dehydrated_device::unstable::Request>,
) -> ApiResult<get_dehydrated_device::unstable::Response> {
    let (device_id, data) = e2ee.dehydrated_device(&authed.user_id).await?;
    Ok(get_dehydrated_device::unstable::Response::new(device_id, raw(&data)).into())
}

/// `DELETE /_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device`
pub async fn delete(
    State(e2ee): State<Arc<E2ee>>,
    AuthedUser(authed): AuthedUser,
    Ruma(_req): Ruma<delete_dehydrated_device::unstable::Request>,
) -> ApiResult<delete_dehydrated_device::unstable::Response> {
    let device_id = e2ee.delete_dehydrated_device(&authed.user_id).await?;
    Ok(delete_dehydrated_device::unstable::Response::new(device_id).into())
}

/// `POST /_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device/{deviceId}/events`
pub async fn events(
    State(e2ee): State<Arc<E2ee>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<get_events::unstable::Request>,
) -> ApiResult<get_events::unstable::Response> {
    let (events, next_batch) =
        e2ee.dehydrated_events(&authed.user_id, &req.device_id, req.next_batch.as_deref()).await?;
    let events: Vec<Raw<_>> = events.iter().map(raw).collect();
    Ok({
        let mut response = get_events::unstable::Response::new(events);
        response.next_batch = Some(next_batch);
        response
    }
    .into())
}
