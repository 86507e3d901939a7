//! End-to-end encryption keys (Client-Server API "End-to-End Encryption"): upload, query, claim,
//! changes, cross-signing keys and signatures. The rules are in `service::e2ee`.

use std::{collections::BTreeMap, sync::Arc};

use axum::extract::State;
use ruma::{
    OwnedDeviceId, OwnedUserId, UInt,
    api::client::keys::{claim_keys, get_key_changes, get_keys, upload_keys, upload_signatures, upload_signing_keys},
    serde::Raw,
};
use serde_json::{Value, value::RawValue};

use crate::{
    api::{
        extract::{AuthedUser, Ruma},
        respond::ApiResult,
    },
    error::{Error, Result},
    service::{e2ee::E2ee, stream::StreamToken},
};

/// A JSON value as a ruma `Raw` of any type.
pub fn raw<T>(value: &Value) -> Raw<T> {
    Raw::from_json(serde_json::value::to_raw_value(value).expect("JSON values serialise"))
}

fn raw_keys<K: ToString, T>(keys: &BTreeMap<K, Raw<T>>) -> BTreeMap<String, Box<RawValue>> {
    keys.iter().map(|(id, key)| (id.to_string(), key.json().to_owned())).collect()
}

fn counts(counts: BTreeMap<String, u64>) -> BTreeMap<ruma::OneTimeKeyAlgorithm, UInt> {
    counts.into_iter().map(|(algorithm, count)| (algorithm.into(), UInt::try_from(count).unwrap_or_default())).collect()
}

/// `POST /_matrix/client/v3/keys/upload`
pub async fn upload(
    State(e2ee): State<Arc<E2ee>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<upload_keys::v3::Request>,
) -> ApiResult<upload_keys::v3::Response> {
    let result = e2ee
        .upload_keys(
            &authed.user_id,
            &authed.device_id,
            req.device_keys.as_ref().map(Raw::json),
            &raw_keys(&req.one_time_keys),
            &raw_keys(&req.fallback_keys),
        )
        .await?;
    Ok(upload_keys::v3::Response::new(counts(result)).into())
}

/// `POST /_matrix/client/v3/keys/query`
pub async fn query(
    State(e2ee): State<Arc<E2ee>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<get_keys::v3::Request>,
) -> ApiResult<get_keys::v3::Response> {
    let result = e2ee.query(&authed.user_id, req.device_keys, req.timeout).await?;
    let mut response = get_keys::v3::Response::new();
    response.failures = result.failures.into_iter().collect();
    response.device_keys = result
        .device_keys
        .into_iter()
        .map(|(user, devices)| (user, devices.iter().map(|(d, k)| (d.clone(), raw(k))).collect()))
        .collect();
    response.master_keys = result.master_keys.iter().map(|(u, k)| (u.clone(), raw(k))).collect();
    response.self_signing_keys = result.self_signing_keys.iter().map(|(u, k)| (u.clone(), raw(k))).collect();
    response.user_signing_keys = result.user_signing_keys.iter().map(|(u, k)| (u.clone(), raw(k))).collect();
    Ok(response.into())
}

/// `POST /_matrix/client/v3/keys/claim`
pub async fn claim(
    State(e2ee): State<Arc<E2ee>>,
    AuthedUser(_authed): AuthedUser,
    Ruma(req): Ruma<claim_keys::v3::Request>,
) -> ApiResult<claim_keys::v3::Response> {
    let wanted: BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, String>> = req
        .one_time_keys
        .into_iter()
        .map(|(user, devices)| (user, devices.into_iter().map(|(d, a)| (d, a.to_string())).collect()))
        .collect();
    let result = e2ee.claim(wanted, req.timeout).await?;
    let mut one_time_keys = BTreeMap::new();
    for (user, devices) in result.one_time_keys {
        let mut by_device = BTreeMap::new();
        for (device, keys) in devices {
            let mut by_id = BTreeMap::new();
            for (key_id, key) in keys {
                let Ok(key_id) = ruma::OwnedOneTimeKeyId::try_from(key_id) else { continue };
                by_id.insert(key_id, raw(&key));
            }
            by_device.insert(device, by_id);
        }
        one_time_keys.insert(user, by_device);
    }
    let mut response = claim_keys::v3::Response::new(one_time_keys);
    response.failures = result.failures.into_iter().collect();
    Ok(response.into())
}

/// `GET /_matrix/client/v3/keys/changes`
pub async fn changes(
    State(e2ee): State<Arc<E2ee>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<get_key_changes::v3::Request>,
) -> ApiResult<get_key_changes::v3::Response> {
    let from = StreamToken::parse(&req.from)?.stream;
    let to = StreamToken::parse(&req.to)?.stream;
    let (changed, left) = e2ee.changes(&authed.user_id, from, to).await?;
    Ok(get_key_changes::v3::Response::new(changed, left).into())
}

/// `POST /_matrix/client/v3/keys/device_signing/upload`
pub async fn upload_signing(
    State(e2ee): State<Arc<E2ee>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<upload_signing_keys::v3::Request>,
) -> ApiResult<upload_signing_keys::v3::Response> {
    let keys = [
        req.master_key.as_ref().map(Raw::json),
        req.self_signing_key.as_ref().map(Raw::json),
        req.user_signing_key.as_ref().map(Raw::json),
    ];
    e2ee.upload_signing_keys(&authed, req.auth.as_ref(), keys).await?;
    Ok(upload_signing_keys::v3::Response::new().into())
}

/// `POST /_matrix/client/v3/keys/signatures/upload`
pub async fn upload_signatures(
    State(e2ee): State<Arc<E2ee>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<upload_signatures::v3::Request>,
) -> ApiResult<upload_signatures::v3::Response> {
    let mut signed = BTreeMap::new();
    for (user, keys) in &req.signed_keys {
        let keys = serde_json::to_value(keys).map_err(|err| Error::BadJson(err.to_string()))?;
        let Value::Object(keys) = keys else {
            return Err(Error::BadJson("each user's signed keys must be an object".to_owned()));
        };
        signed.insert(user.clone(), keys.into_iter().collect());
    }
    let failures = e2ee.upload_signatures(&authed.user_id, signed).await?;
    let mut response = upload_signatures::v3::Response::new();
    response.failures = failures
        .into_iter()
        .map(|(user, keys)| {
            let keys = keys.into_iter().filter_map(|(key, failure)| Some((key, failure_of(failure).ok()?))).collect();
            (user, keys)
        })
        .collect();
    Ok(response.into())
}

/// ruma's `Failure` has private fields: it is built from its JSON form.
fn failure_of(value: Value) -> Result<upload_signatures::v3::Failure> {
    serde_json::from_value(value).map_err(|err| Error::Internal(err.to_string()))
}
