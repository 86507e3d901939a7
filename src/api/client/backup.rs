//! Server-side key backups (`/room_keys/…`): versions and the encrypted session keys in them.
//! The rules are in `service::e2ee::backup`.

use std::{collections::BTreeMap, sync::Arc};

use axum::extract::State;
use ruma::{
    OwnedRoomId, UInt,
    api::client::backup::{
        RoomKeyBackup, add_backup_keys, add_backup_keys_for_room, add_backup_keys_for_session, create_backup_version,
        delete_backup_keys, delete_backup_keys_for_room, delete_backup_keys_for_session, delete_backup_version,
        get_backup_info, get_backup_keys, get_backup_keys_for_room, get_backup_keys_for_session,
        get_latest_backup_info, update_backup_version,
    },
    serde::Raw,
};
use serde_json::{Value, json};

use super::keys::raw;
use crate::{
    api::{
        extract::{AuthedUser, Ruma},
        respond::ApiResult,
    },
    error::{Error, Result},
    service::e2ee::{E2ee, backup::key_json},
};

fn value_of<T>(raw: &Raw<T>) -> Result<Value> {
    serde_json::from_str(raw.json().get()).map_err(|err| Error::BadJson(err.to_string()))
}

fn count(n: u64) -> UInt {
    UInt::try_from(n).unwrap_or_default()
}

fn sessions_of(
    sessions: &BTreeMap<String, Raw<ruma::api::client::backup::KeyBackupData>>,
) -> Result<BTreeMap<String, Value>> {
    sessions.iter().map(|(id, data)| Ok((id.clone(), value_of(data)?))).collect()
}

/// `POST /_matrix/client/v3/room_keys/version`
pub async fn create_version(
    State(e2ee): State<Arc<E2ee>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<create_backup_version::v3::Request>,
) -> ApiResult<create_backup_version::v3::Response> {
    let version = e2ee.create_backup(&authed.user_id, &value_of(&req.algorithm)?).await?;
    Ok(create_backup_version::v3::Response::new(version).into())
}

fn algorithm(info: &crate::service::e2ee::backup::BackupInfo) -> Raw<ruma::api::client::backup::BackupAlgorithm> {
    raw(&json!({"algorithm": info.algorithm, "auth_data": info.auth_data}))
}

/// `GET /_matrix/client/v3/room_keys/version`
pub async fn latest_version(
    State(e2ee): State<Arc<E2ee>>,
    AuthedUser(authed): AuthedUser,
    Ruma(_req): Ruma<get_latest_backup_info::v3::Request>,
) -> ApiResult<get_latest_backup_info::v3::Response> {
    let info = e2ee.backup_info(&authed.user_id, None).await?;
    Ok(get_latest_backup_info::v3::Response::new(algorithm(&info), count(info.count), info.etag, info.version).into())
}

/// `GET /_matrix/client/v3/room_keys/version/{version}`
pub async fn version(
    State(e2ee): State<Arc<E2ee>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<get_backup_info::v3::Request>,
) -> ApiResult<get_backup_info::v3::Response> {
    let info = e2ee.backup_info(&authed.user_id, Some(&req.version)).await?;
    Ok(get_backup_info::v3::Response::new(algorithm(&info), count(info.count), info.etag, info.version).into())
}

/// `PUT /_matrix/client/v3/room_keys/version/{version}`
pub async fn update_version(
    State(e2ee): State<Arc<E2ee>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<update_backup_version::v3::Request>,
) -> ApiResult<update_backup_version::v3::Response> {
    e2ee.update_backup(&authed.user_id, &req.version, &value_of(&req.algorithm)?).await?;
    Ok(update_backup_version::v3::Response::new().into())
}

/// `DELETE /_matrix/client/v3/room_keys/version/{version}`
pub async fn delete_version(
    State(e2ee): State<Arc<E2ee>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<delete_backup_version::v3::Request>,
) -> ApiResult<delete_backup_version::v3::Response> {
    e2ee.delete_backup(&authed.user_id, &req.version).await?;
    Ok(delete_backup_version::v3::Response::new().into())
}

/// `PUT /_matrix/client/v3/room_keys/keys`
pub async fn put_keys(
    State(e2ee): State<Arc<E2ee>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<add_backup_keys::v3::Request>,
) -> ApiResult<add_backup_keys::v3::Response> {
    let mut rooms = BTreeMap::new();
    for (room_id, backup) in &req.rooms {
        rooms.insert(room_id.to_string(), sessions_of(&backup.sessions)?);
    }
    let (etag, n) = e2ee.put_backup_keys(&authed.user_id, &req.version, &rooms).await?;
    Ok(add_backup_keys::v3::Response::new(etag, count(n)).into())
}

/// `PUT /_matrix/client/v3/room_keys/keys/{roomId}`
pub async fn put_room_keys(
    State(e2ee): State<Arc<E2ee>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<add_backup_keys_for_room::v3::Request>,
) -> ApiResult<add_backup_keys_for_room::v3::Response> {
    let rooms = BTreeMap::from([(req.room_id.to_string(), sessions_of(&req.sessions)?)]);
    let (etag, n) = e2ee.put_backup_keys(&authed.user_id, &req.version, &rooms).await?;
    Ok(add_backup_keys_for_room::v3::Response::new(etag, count(n)).into())
}

/// `PUT /_matrix/client/v3/room_keys/keys/{roomId}/{sessionId}`
pub async fn put_session_key(
    State(e2ee): State<Arc<E2ee>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<add_backup_keys_for_session::v3::Request>,
) -> ApiResult<add_backup_keys_for_session::v3::Response> {
    let sessions = BTreeMap::from([(req.session_id.clone(), value_of(&req.session_data)?)]);
    let rooms = BTreeMap::from([(req.room_id.to_string(), sessions)]);
    let (etag, n) = e2ee.put_backup_keys(&authed.user_id, &req.version, &rooms).await?;
    Ok(add_backup_keys_for_session::v3::Response::new(etag, count(n)).into())
}

/// `GET /_matrix/client/v3/room_keys/keys`
pub async fn keys(
    State(e2ee): State<Arc<E2ee>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<get_backup_keys::v3::Request>,
) -> ApiResult<get_backup_keys::v3::Response> {
    let mut rooms: BTreeMap<OwnedRoomId, BTreeMap<String, Raw<_>>> = BTreeMap::new();
    for key in e2ee.backup_keys(&authed.user_id, &req.version, None, None).await? {
        let Ok(room_id) = OwnedRoomId::try_from(key.room_id.clone()) else { continue };
        rooms.entry(room_id).or_default().insert(key.session_id.clone(), raw(&key_json(&key)));
    }
    let rooms = rooms.into_iter().map(|(room, sessions)| (room, RoomKeyBackup::new(sessions))).collect();
    Ok(get_backup_keys::v3::Response::new(rooms).into())
}

/// `GET /_matrix/client/v3/room_keys/keys/{roomId}`
pub async fn room_keys(
    State(e2ee): State<Arc<E2ee>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<get_backup_keys_for_room::v3::Request>,
) -> ApiResult<get_backup_keys_for_room::v3::Response> {
    let keys = e2ee.backup_keys(&authed.user_id, &req.version, Some(req.room_id.as_str()), None).await?;
    let sessions = keys.iter().map(|key| (key.session_id.clone(), raw(&key_json(key)))).collect();
    Ok(get_backup_keys_for_room::v3::Response::new(sessions).into())
}

/// `GET /_matrix/client/v3/room_keys/keys/{roomId}/{sessionId}`
pub async fn session_key(
    State(e2ee): State<Arc<E2ee>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<get_backup_keys_for_session::v3::Request>,
) -> ApiResult<get_backup_keys_for_session::v3::Response> {
    let keys =
        e2ee.backup_keys(&authed.user_id, &req.version, Some(req.room_id.as_str()), Some(&req.session_id)).await?;
    let key = keys.first().ok_or_else(|| Error::not_found("No key for this session in the backup"))?;
    Ok(get_backup_keys_for_session::v3::Response::new(raw(&key_json(key))).into())
}

/// `DELETE /_matrix/client/v3/room_keys/keys`
pub async fn delete_keys(
    State(e2ee): State<Arc<E2ee>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<delete_backup_keys::v3::Request>,
) -> ApiResult<delete_backup_keys::v3::Response> {
    let (etag, n) = e2ee.delete_backup_keys(&authed.user_id, &req.version, None, None).await?;
    Ok(delete_backup_keys::v3::Response::new(etag, count(n)).into())
}

/// `DELETE /_matrix/client/v3/room_keys/keys/{roomId}`
pub async fn delete_room_keys(
    State(e2ee): State<Arc<E2ee>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<delete_backup_keys_for_room::v3::Request>,
) -> ApiResult<delete_backup_keys_for_room::v3::Response> {
    let (etag, n) = e2ee.delete_backup_keys(&authed.user_id, &req.version, Some(req.room_id.as_str()), None).await?;
    Ok(delete_backup_keys_for_room::v3::Response::new(etag, count(n)).into())
}

/// `DELETE /_matrix/client/v3/room_keys/keys/{roomId}/{sessionId}`
pub async fn delete_session_key(
    State(e2ee): State<Arc<E2ee>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<delete_backup_keys_for_session::v3::Request>,
) -> ApiResult<delete_backup_keys_for_session::v3::Response> {
    let (etag, n) = e2ee
        .delete_backup_keys(&authed.user_id, &req.version, Some(req.room_id.as_str()), Some(&req.session_id))
        .await?;
    Ok(delete_backup_keys_for_session::v3::Response::new(etag, count(n)).into())
}
