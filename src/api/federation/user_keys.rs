//! End-to-end encryption keys for other servers (Server-Server API "End-to-End Encryption"):
//! our users' device and cross-signing keys, and their one-time keys.

use std::{collections::BTreeMap, sync::Arc};

use axum::extract::State;
use ruma::api::federation::keys::{claim_keys, get_keys};

use crate::{
    api::{
        client::keys::raw,
        extract::{Origin, Ruma},
        respond::ApiResult,
    },
    service::e2ee::E2ee,
};

/// `POST /_matrix/federation/v1/user/keys/query`
pub async fn query(
    State(e2ee): State<Arc<E2ee>>,
    Origin(origin): Origin,
    Ruma(req): Ruma<get_keys::v1::Request>,
) -> ApiResult<get_keys::v1::Response> {
    tracing::debug!(%origin, users = req.device_keys.len(), "keys query");
    let result = e2ee.query_for_federation(req.device_keys).await?;
    let mut response = get_keys::v1::Response::new(
        result
            .device_keys
            .into_iter()
            .map(|(user, devices)| (user, devices.iter().map(|(d, k)| (d.clone(), raw(k))).collect()))
            .collect(),
    );
    response.master_keys = result.master_keys.iter().map(|(u, k)| (u.clone(), raw(k))).collect();
    response.self_signing_keys = result.self_signing_keys.iter().map(|(u, k)| (u.clone(), raw(k))).collect();
    Ok(response.into())
}

/// `POST /_matrix/federation/v1/user/keys/claim`
pub async fn claim(
    State(e2ee): State<Arc<E2ee>>,
    Origin(origin): Origin,
    Ruma(req): Ruma<claim_keys::v1::Request>,
) -> ApiResult<claim_keys::v1::Response> {
    tracing::debug!(%origin, users = req.one_time_keys.len(), "key claim");
    let wanted = req
        .one_time_keys
        .into_iter()
        .map(|(user, devices)| (user, devices.into_iter().map(|(d, a)| (d, a.to_string())).collect()))
        .collect();
    let result = e2ee.claim_for_federation(wanted).await?;
    let mut one_time_keys = BTreeMap::new();
    for (user, devices) in result.one_time_keys {
        let mut by_device = BTreeMap::new();
        for (device, keys) in devices {
            let keys = keys
                .into_iter()
                .filter_map(|(id, key)| Some((ruma::OwnedOneTimeKeyId::try_from(id).ok()?, raw(&key))))
                .collect();
            by_device.insert(device, keys);
        }
        one_time_keys.insert(user, by_device);
    }
    Ok(claim_keys::v1::Response::new(one_time_keys).into())
}
