//! End-to-end encryption: the key directory Olm and Megolm clients need (device keys, one-time
//! and fallback keys, cross-signing keys and signatures), locally and across servers, plus room
//! key backups (`backup`) and dehydrated devices (`dehydrated`).
//!
//! The server never sees a secret. It checks what it can — each uploaded object's shape and its
//! signature by the key that must have made it — so that one client cannot plant keys in another
//! user's name, and a device's identity keys are never silently replaced.

pub mod backup;
pub mod dehydrated;

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    sync::{Arc, OnceLock},
    time::Duration,
};

use futures_util::future::join_all;
use ruma::{
    DeviceId, OwnedDeviceId, OwnedServerName, OwnedUserId, ServerName, UserId,
    api::{client::uiaa::AuthData, federation},
    serde::Raw,
};
use serde_json::{Value, json, value::RawValue};

use crate::{
    error::{Error, Result},
    federation::{FederationError, client::FederationClient},
    matrix::e2e::{self as keys, MASTER, SELF_SIGNING, USER_SIGNING},
    service::{
        edus::Edus,
        stream::Streams,
        users::{Authed, Users},
    },
    storage::{
        Db,
        e2e::{NewKey, SignatureRow},
        stream::StreamWrite,
    },
};

/// How long a `/keys/query` or `/keys/claim` waits for other servers unless the client says.
const DEFAULT_REMOTE_TIMEOUT: Duration = Duration::from_secs(10);
/// The most any client may ask us to wait for other servers.
const MAX_REMOTE_TIMEOUT: Duration = Duration::from_secs(30);

/// The most unclaimed one-time keys of one algorithm a device may hold (Synapse's bound).
const MAX_ONE_TIME_KEYS: u64 = 500;

/// What `/keys/query` answers.
#[derive(Debug, Default)]
pub struct QueryResult {
    pub device_keys: BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, Value>>,
    pub master_keys: BTreeMap<OwnedUserId, Value>,
    pub self_signing_keys: BTreeMap<OwnedUserId, Value>,
    pub user_signing_keys: BTreeMap<OwnedUserId, Value>,
    pub failures: BTreeMap<String, Value>,
}

/// What `/keys/claim` answers: user → device → key ID → key.
#[derive(Debug, Default)]
pub struct ClaimResult {
    pub one_time_keys: BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, BTreeMap<String, Value>>>,
    pub failures: BTreeMap<String, Value>,
}

/// A failure for one key of `/keys/signatures/upload`.
fn signature_failure(errcode: &str, error: impl Into<String>) -> Value {
    json!({"errcode": errcode, "error": error.into()})
}

pub struct E2ee {
    db: Db,
    users: Arc<Users>,
    streams: Arc<Streams>,
    client: Arc<FederationClient>,
    server_name: OwnedServerName,
    is_federation_enabled: bool,
    edus: OnceLock<Arc<Edus>>,
}

/// A device's stored identity keys with the signatures others made of them that `viewers` may
/// see (the device's user's own, e.g. by their self-signing key).
pub async fn signed_device_keys(db: &Db, user_id: &UserId, device_id: &str) -> Result<Option<Value>> {
    let Some(json) = db.device_keys(user_id, device_id).await? else { return Ok(None) };
    let mut value: Value = serde_json::from_str(&json).map_err(|err| Error::Internal(err.to_string()))?;
    let signatures = db.signatures_of(user_id, &[user_id]).await?;
    merge_signatures(&mut value, device_id, &signatures);
    Ok(Some(value))
}

/// Adds the stored signatures of `target_key` to a signed object.
fn merge_signatures(object: &mut Value, target_key: &str, signatures: &[SignatureRow]) {
    for row in signatures.iter().filter(|row| row.target_key == target_key) {
        let Some(map) = object.as_object_mut() else { return };
        let all = map.entry("signatures").or_insert_with(|| json!({}));
        if !all.is_object() {
            *all = json!({});
        }
        let by_signer = all.as_object_mut().expect("object").entry(row.signer.as_str()).or_insert_with(|| json!({}));
        if let Some(by_signer) = by_signer.as_object_mut() {
            by_signer.insert(row.signer_key_id.clone(), Value::String(row.signature.clone()));
        }
    }
}

fn parse_json(raw: &RawValue, what: &str) -> Result<Value> {
    let value: Value = serde_json::from_str(raw.get()).map_err(|err| Error::BadJson(format!("{what}: {err}")))?;
    if !value.is_object() {
        return Err(Error::BadJson(format!("{what} must be an object")));
    }
    Ok(value)
}

impl E2ee {
    pub fn new(
        db: Db,
        users: Arc<Users>,
        streams: Arc<Streams>,
        client: Arc<FederationClient>,
        is_federation_enabled: bool,
    ) -> Arc<E2ee> {
        let server_name = client.server_name().to_owned();
        Arc::new(E2ee { db, users, streams, client, server_name, is_federation_enabled, edus: OnceLock::new() })
    }

    /// Cross-signing key changes also go to other servers, through `edus`.
    pub fn set_edus(&self, edus: Arc<Edus>) {
        let _ = self.edus.set(edus);
    }

    fn is_local(&self, user: &UserId) -> bool {
        user.server_name() == self.server_name
    }

    /// `POST /keys/upload`: a device's identity keys, one-time keys and fallback keys. Returns
    /// the device's one-time key counts after the upload.
    pub async fn upload_keys(
        &self,
        user: &UserId,
        device: &DeviceId,
        device_keys: Option<&RawValue>,
        one_time_keys: &BTreeMap<String, Box<RawValue>>,
        fallback_keys: &BTreeMap<String, Box<RawValue>>,
    ) -> Result<BTreeMap<String, u64>> {
        let stored_json = self.db.device_keys(user, device.as_str()).await?;
        let stored: Option<Value> = stored_json.as_deref().and_then(|json| serde_json::from_str(json).ok());
        let mut new_device_keys = None;
        if let Some(raw) = device_keys {
            let value = parse_json(raw, "device_keys")?;
            self.check_device_keys(user, device, &value)?;
            if let Some(old) = &stored
                && old.get("keys") != value.get("keys")
            {
                return Err(Error::InvalidParam(
                    "This device already has identity keys and they cannot be replaced: log in as a new device"
                        .to_owned(),
                ));
            }
            if stored.as_ref() != Some(&value) {
                new_device_keys = Some(value);
            }
        }
        let identity =
            new_device_keys.as_ref().or(stored.as_ref()).and_then(|k| keys::device_ed25519(k, device.as_str()));
        let one_time = Self::check_one_time_keys(user, device, identity.as_deref(), one_time_keys, "one_time_keys")?;
        let fallback = Self::check_one_time_keys(user, device, identity.as_deref(), fallback_keys, "fallback_keys")?;
        // A one-time key ID already stored must come with the very same key: a changed key under
        // an old ID would mean a peer's session could be built on either.
        if !one_time.is_empty() {
            let ids: Vec<String> = one_time.iter().map(|(algorithm, id, _)| format!("{algorithm}:{id}")).collect();
            for existing in self.db.one_time_keys_by_id(user, device.as_str(), &ids).await? {
                let (algorithm, id) = existing.key_id.split_once(':').unwrap_or_default();
                let new = one_time.iter().find(|(a, i, _)| a == algorithm && i == id).map(|(_, _, json)| json);
                let same = new.is_some_and(|new| {
                    serde_json::from_str::<Value>(new).ok() == serde_json::from_str::<Value>(&existing.key_json).ok()
                });
                if !same {
                    return Err(Error::InvalidParam(format!(
                        "One-time key {} already exists with different content",
                        existing.key_id
                    )));
                }
            }
        }
        // A device holds at most MAX_ONE_TIME_KEYS unclaimed keys per algorithm (clients keep
        // about 50; the bound keeps one device from filling the database).
        if !one_time.is_empty() {
            let counts = self.db.one_time_key_counts(user, device.as_str()).await?;
            let ids: Vec<String> = one_time.iter().map(|(algorithm, id, _)| format!("{algorithm}:{id}")).collect();
            let known: HashSet<String> =
                self.db.one_time_keys_by_id(user, device.as_str(), &ids).await?.into_iter().map(|k| k.key_id).collect();
            let mut adding: BTreeMap<&str, u64> = BTreeMap::new();
            for ((algorithm, _, _), id) in one_time.iter().zip(&ids) {
                if !known.contains(id) {
                    *adding.entry(algorithm.as_str()).or_default() += 1;
                }
            }
            for (algorithm, more) in adding {
                let total = counts.get(algorithm).copied().unwrap_or(0) + more;
                if total > MAX_ONE_TIME_KEYS {
                    return Err(Error::TooManyKeys(format!(
                        "Uploading {more} more {algorithm} one-time keys would leave the device holding {total}, \
                         over the limit of {MAX_ONE_TIME_KEYS}"
                    )));
                }
            }
        }
        // One fallback key per algorithm: the last one given.
        let mut fallback_by_algorithm: BTreeMap<&str, (&str, &str)> = BTreeMap::new();
        for (algorithm, id, json) in &fallback {
            fallback_by_algorithm.insert(algorithm, (id, json));
        }
        let device_json = new_device_keys.as_ref().map(Value::to_string);
        let one_time_rows: Vec<NewKey> =
            one_time.iter().map(|(algorithm, key_id, key_json)| NewKey { algorithm, key_id, key_json }).collect();
        let fallback_rows: Vec<NewKey> = fallback_by_algorithm
            .iter()
            .map(|(algorithm, (key_id, key_json))| NewKey { algorithm, key_id, key_json })
            .collect();
        let device_row = device_json.as_deref().map(|json| (json, stored_json.as_deref()));
        if !self.db.store_device_keys(user, device.as_str(), device_row, &one_time_rows, &fallback_rows).await? {
            return Err(Error::Conflict("This device's identity keys changed meanwhile: upload again".into()));
        }
        if new_device_keys.is_some() {
            self.users.announce_device_keys(user, device).await;
        }
        Ok(self.db.one_time_key_counts(user, device.as_str()).await?)
    }

    /// A device's identity keys: its own user and device, an ed25519 and a curve25519 key, and
    /// its own signature over them.
    fn check_device_keys(&self, user: &UserId, device: &DeviceId, value: &Value) -> Result<()> {
        if value.get("user_id").and_then(Value::as_str) != Some(user.as_str()) {
            return Err(Error::InvalidParam("device_keys.user_id must be the caller's user ID".to_owned()));
        }
        if value.get("device_id").and_then(Value::as_str) != Some(device.as_str()) {
            return Err(Error::InvalidParam("device_keys.device_id must be the caller's device ID".to_owned()));
        }
        if !value.get("algorithms").is_some_and(Value::is_array) {
            return Err(Error::BadJson("device_keys.algorithms must be a list".to_owned()));
        }
        let key_map = value
            .get("keys")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::BadJson("device_keys.keys must be an object".to_owned()))?;
        if key_map.values().any(|key| !key.is_string()) {
            return Err(Error::BadJson("device_keys.keys must map key IDs to keys".to_owned()));
        }
        let ed25519 = keys::device_ed25519(value, device.as_str())
            .ok_or_else(|| Error::InvalidParam(format!("device_keys.keys has no ed25519:{device}")))?;
        keys::check_signature(value, user.as_str(), &format!("ed25519:{device}"), &ed25519)
            .map_err(|err| Error::InvalidSignature(format!("device_keys: {err}")))
    }

    /// One-time or fallback keys: `algorithm:key_id` → a bare key (`curve25519`) or a signed key
    /// object, which must carry the device's signature. Returns (algorithm, key ID, JSON).
    fn check_one_time_keys(
        user: &UserId,
        device: &DeviceId,
        identity: Option<&str>,
        uploaded: &BTreeMap<String, Box<RawValue>>,
        what: &str,
    ) -> Result<Vec<(String, String, String)>> {
        let mut out = Vec::with_capacity(uploaded.len());
        for (full_id, raw) in uploaded {
            let (algorithm, key_id) = full_id
                .split_once(':')
                .filter(|(a, k)| !a.is_empty() && !k.is_empty())
                .ok_or_else(|| Error::InvalidParam(format!("{what}: {full_id} is not algorithm:key_id")))?;
            let value: Value =
                serde_json::from_str(raw.get()).map_err(|err| Error::BadJson(format!("{what}.{full_id}: {err}")))?;
            match &value {
                Value::String(_) => {}
                Value::Object(object) => {
                    if !object.get("key").is_some_and(Value::is_string) {
                        return Err(Error::BadJson(format!("{what}.{full_id} has no key")));
                    }
                    let identity = identity.ok_or_else(|| {
                        Error::InvalidParam(format!("{what}: upload the device's identity keys before signed keys"))
                    })?;
                    keys::check_signature(&value, user.as_str(), &format!("ed25519:{device}"), identity)
                        .map_err(|err| Error::InvalidSignature(format!("{what}.{full_id}: {err}")))?;
                }
                _ => return Err(Error::BadJson(format!("{what}.{full_id} must be a key or a signed key object"))),
            }
            out.push((algorithm.to_owned(), key_id.to_owned(), value.to_string()));
        }
        Ok(out)
    }

    /// `POST /keys/query`: local users' keys from the database, other servers' users' from their
    /// servers (in parallel, each bounded by `timeout`; a server that does not answer is named in
    /// `failures`). `requester` sees their own user-signing key and the signatures they made.
    pub async fn query(
        &self,
        requester: &UserId,
        wanted: BTreeMap<OwnedUserId, Vec<OwnedDeviceId>>,
        timeout: Option<Duration>,
    ) -> Result<QueryResult> {
        let mut result = QueryResult::default();
        let mut remote: BTreeMap<OwnedServerName, BTreeMap<OwnedUserId, Vec<OwnedDeviceId>>> = BTreeMap::new();
        let mut local = Vec::new();
        for (user, devices) in wanted {
            if self.is_local(&user) {
                local.push((user, devices));
            } else {
                remote.entry(user.server_name().to_owned()).or_default().insert(user, devices);
            }
        }
        self.local_keys(&local, Some(requester), &mut result).await?;
        if remote.is_empty() {
            return Ok(result);
        }
        if !self.is_federation_enabled {
            result.failures.extend(federation_off(remote.keys()));
            return Ok(result);
        }
        let timeout = timeout.unwrap_or(DEFAULT_REMOTE_TIMEOUT).min(MAX_REMOTE_TIMEOUT);
        let answers = join_all(remote.into_iter().map(|(server, users)| async move {
            let request = federation::keys::get_keys::v1::Request::new(users);
            let answer = tokio::time::timeout(timeout, self.client.send(&server, request)).await;
            (server, answer)
        }))
        .await;
        for (server, answer) in answers {
            let response = match answer {
                Ok(Ok(response)) => response,
                Ok(Err(err)) => {
                    tracing::info!(%server, %err, "a keys query failed");
                    result.failures.insert(server.to_string(), remote_failure(&err));
                    continue;
                }
                Err(_) => {
                    result.failures.insert(server.to_string(), json!({"status": 504, "message": "Timed out"}));
                    continue;
                }
            };
            self.merge_remote_keys(&server, requester, response, &mut result).await?;
        }
        Ok(result)
    }

    /// Adds another server's `/user/keys/query` answer, keeping only that server's users, with
    /// the signatures `requester` made of their master keys.
    async fn merge_remote_keys(
        &self,
        server: &ServerName,
        requester: &UserId,
        response: federation::keys::get_keys::v1::Response,
        result: &mut QueryResult,
    ) -> Result<()> {
        let theirs = |user: &UserId| user.server_name() == server;
        for (user, devices) in response.device_keys {
            if !theirs(&user) {
                continue;
            }
            let entry = result.device_keys.entry(user).or_default();
            for (device, raw) in devices {
                if let Ok(value) = serde_json::from_str::<Value>(raw.json().get()) {
                    entry.insert(device, value);
                }
            }
        }
        for (user, raw) in response.master_keys {
            if !theirs(&user) {
                continue;
            }
            let Ok(mut value) = serde_json::from_str::<Value>(raw.json().get()) else { continue };
            if let Some((_, public)) = keys::cross_signing_public(&value) {
                let mine = self.db.signatures_of(&user, &[requester]).await?;
                merge_signatures(&mut value, &public, &mine);
            }
            result.master_keys.insert(user, value);
        }
        for (user, raw) in response.self_signing_keys {
            if theirs(&user)
                && let Ok(value) = serde_json::from_str::<Value>(raw.json().get())
            {
                result.self_signing_keys.insert(user, value);
            }
        }
        Ok(())
    }

    /// Local users' keys into `result`: the devices asked for (all when none are named), the
    /// master and self-signing keys, and — for the viewer themselves — the user-signing key.
    /// `viewer`: whose own signatures are shown besides each user's (none for other servers).
    /// A few statements for the whole batch, however many users it names.
    async fn local_keys(
        &self,
        wanted: &[(OwnedUserId, Vec<OwnedDeviceId>)],
        viewer: Option<&UserId>,
        result: &mut QueryResult,
    ) -> Result<()> {
        let users: Vec<&str> = wanted.iter().map(|(user, _)| user.as_str()).collect();
        let mut signatures: BTreeMap<String, Vec<SignatureRow>> = BTreeMap::new();
        for row in self.db.signatures_of_users(&users, viewer.map(UserId::as_str)).await? {
            signatures.entry(row.target_user.to_string()).or_default().push(row);
        }
        let no_signatures = Vec::new();
        let wanted_devices: BTreeMap<&str, HashSet<&str>> = wanted
            .iter()
            .map(|(user, devices)| (user.as_str(), devices.iter().map(|d| d.as_str()).collect()))
            .collect();
        // A user the server knows is listed even without devices with keys, as Synapse does.
        for (user, _) in wanted {
            result.device_keys.entry(user.clone()).or_default();
        }
        for (user_id, device_id, json, display_name) in self.db.device_keys_of_users(&users).await? {
            let Some(devices) = wanted_devices.get(user_id.as_str()) else { continue };
            if !devices.is_empty() && !devices.contains(device_id.as_str()) {
                continue;
            }
            let Ok(user) = OwnedUserId::try_from(user_id.as_str()) else { continue };
            let Ok(mut value) = serde_json::from_str::<Value>(&json) else { continue };
            merge_signatures(&mut value, &device_id, signatures.get(&user_id).unwrap_or(&no_signatures));
            if let Some(object) = value.as_object_mut() {
                let unsigned = object.entry("unsigned").or_insert_with(|| json!({}));
                if let Some(unsigned) = unsigned.as_object_mut() {
                    unsigned.insert("device_display_name".to_owned(), json!(display_name));
                }
            }
            result.device_keys.entry(user).or_default().insert(OwnedDeviceId::from(device_id), value);
        }
        for (user_id, key_type, json) in self.db.cross_signing_keys_of_users(&users).await? {
            let Ok(user) = OwnedUserId::try_from(user_id.as_str()) else { continue };
            let Ok(mut value) = serde_json::from_str::<Value>(&json) else { continue };
            if let Some((_, public)) = keys::cross_signing_public(&value) {
                merge_signatures(&mut value, &public, signatures.get(&user_id).unwrap_or(&no_signatures));
            }
            match key_type.as_str() {
                MASTER => {
                    result.master_keys.insert(user, value);
                }
                SELF_SIGNING => {
                    result.self_signing_keys.insert(user, value);
                }
                USER_SIGNING if viewer == Some(&*user) => {
                    result.user_signing_keys.insert(user, value);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// `POST /_matrix/federation/v1/user/keys/query`: our users' keys for another server (their
    /// own signatures only; no user-signing keys).
    pub async fn query_for_federation(&self, wanted: BTreeMap<OwnedUserId, Vec<OwnedDeviceId>>) -> Result<QueryResult> {
        let mut result = QueryResult::default();
        let local: Vec<_> = wanted.into_iter().filter(|(user, _)| self.is_local(user)).collect();
        self.local_keys(&local, None, &mut result).await?;
        Ok(result)
    }

    /// A local device's identity keys with the user's own signatures, for `/user/devices`.
    pub async fn device_keys_for_federation(&self, user: &UserId, device: &str) -> Result<Option<Value>> {
        signed_device_keys(&self.db, user, device).await
    }

    /// A local user's (master, self-signing) keys with their own signatures, for `/user/devices`.
    pub async fn cross_signing_for_federation(&self, user: &UserId) -> Result<(Option<Value>, Option<Value>)> {
        let mut result = QueryResult::default();
        self.local_keys(&[(user.to_owned(), Vec::new())], None, &mut result).await?;
        Ok((result.master_keys.remove(user), result.self_signing_keys.remove(user)))
    }

    /// `POST /keys/claim`: one key per (user, device, algorithm) — a one-time key, handed out
    /// once, or the device's fallback key when none is left.
    pub async fn claim(
        &self,
        wanted: BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, String>>,
        timeout: Option<Duration>,
    ) -> Result<ClaimResult> {
        let mut result = ClaimResult::default();
        let mut remote: BTreeMap<OwnedServerName, BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, String>>> =
            BTreeMap::new();
        for (user, devices) in wanted {
            if self.is_local(&user) {
                self.claim_local(&user, devices, &mut result).await?;
            } else {
                remote.entry(user.server_name().to_owned()).or_default().insert(user, devices);
            }
        }
        if remote.is_empty() {
            return Ok(result);
        }
        if !self.is_federation_enabled {
            result.failures.extend(federation_off(remote.keys()));
            return Ok(result);
        }
        let timeout = timeout.unwrap_or(DEFAULT_REMOTE_TIMEOUT).min(MAX_REMOTE_TIMEOUT);
        let answers = join_all(remote.into_iter().map(|(server, users)| async move {
            let claims = users
                .into_iter()
                .map(|(user, devices)| {
                    let devices = devices.into_iter().map(|(device, algorithm)| (device, algorithm.into())).collect();
                    (user, devices)
                })
                .collect();
            let request = federation::keys::claim_keys::v1::Request::new(claims);
            let answer = tokio::time::timeout(timeout, self.client.send(&server, request)).await;
            (server, answer)
        }))
        .await;
        for (server, answer) in answers {
            match answer {
                Ok(Ok(response)) => {
                    for (user, devices) in response.one_time_keys {
                        if user.server_name() != server {
                            continue;
                        }
                        let entry = result.one_time_keys.entry(user).or_default();
                        for (device, keys) in devices {
                            let keys = keys
                                .into_iter()
                                .filter_map(|(id, raw)| {
                                    Some((id.to_string(), serde_json::from_str::<Value>(raw.json().get()).ok()?))
                                })
                                .collect();
                            entry.insert(device, keys);
                        }
                    }
                }
                Ok(Err(err)) => {
                    tracing::info!(%server, %err, "a key claim failed");
                    result.failures.insert(server.to_string(), remote_failure(&err));
                }
                Err(_) => {
                    result.failures.insert(server.to_string(), json!({"status": 504, "message": "Timed out"}));
                }
            }
        }
        Ok(result)
    }

    async fn claim_local(
        &self,
        user: &UserId,
        devices: BTreeMap<OwnedDeviceId, String>,
        result: &mut ClaimResult,
    ) -> Result<()> {
        for (device, algorithm) in devices {
            if let Some(key) = self.db.claim_key(user, device.as_str(), &algorithm).await? {
                let Ok(value) = serde_json::from_str::<Value>(&key.key_json) else { continue };
                result
                    .one_time_keys
                    .entry(user.to_owned())
                    .or_default()
                    .entry(device)
                    .or_default()
                    .insert(key.key_id, value);
            }
        }
        Ok(())
    }

    /// `POST /_matrix/federation/v1/user/keys/claim`: keys of our users only.
    pub async fn claim_for_federation(
        &self,
        wanted: BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, String>>,
    ) -> Result<ClaimResult> {
        let mut result = ClaimResult::default();
        for (user, devices) in wanted {
            if self.is_local(&user) {
                self.claim_local(&user, devices, &mut result).await?;
            }
        }
        Ok(result)
    }

    /// `GET /keys/changes`: users sharing a room with `user` whose keys changed between the two
    /// sync tokens' positions, and users who no longer share a room (from the membership changes
    /// of that span).
    pub async fn changes(&self, user: &UserId, from: i64, to: i64) -> Result<(Vec<OwnedUserId>, Vec<OwnedUserId>)> {
        let to = to.min(self.streams.position());
        if to <= from {
            return Ok((Vec::new(), Vec::new()));
        }
        let sharing = self.streams.users_sharing_rooms(user);
        let mut changed: BTreeSet<OwnedUserId> = self
            .db
            .device_list_changes_since(from, to)
            .await?
            .into_iter()
            .filter(|u| sharing.contains(u) || (!self.is_local(u) && self.streams.share_a_room(user, u)))
            .collect();
        let mut left = BTreeSet::new();
        for (other, membership) in self.db.member_changes_in_rooms_of(user, from, to).await? {
            if &*other == user {
                continue;
            }
            if membership == "join" && self.streams.share_a_room(user, &other) {
                changed.insert(other);
            } else if membership != "join" && !self.streams.share_a_room(user, &other) {
                left.insert(other);
            }
        }
        Ok((changed.into_iter().collect(), left.into_iter().collect()))
    }

    /// `POST /keys/device_signing/upload`: the user's cross-signing keys. Replacing a master key
    /// needs the password (user-interactive auth); the first upload, or one that changes nothing,
    /// does not (spec v1.11, MSC3967). Self-signing and user-signing keys must be signed by the
    /// master key in effect.
    pub async fn upload_signing_keys(
        &self,
        authed: &Authed,
        auth: Option<&AuthData>,
        uploaded: [Option<&RawValue>; 3],
    ) -> Result<()> {
        let user = &authed.user_id;
        let existing = self.db.cross_signing_keys(user).await?;
        let existing: BTreeMap<String, Value> =
            existing.into_iter().filter_map(|(k, json)| Some((k, serde_json::from_str(&json).ok()?))).collect();
        let mut new: Vec<(&str, Value)> = Vec::new();
        for (key_type, raw) in [MASTER, SELF_SIGNING, USER_SIGNING].into_iter().zip(uploaded) {
            let Some(raw) = raw else { continue };
            let value = parse_json(raw, &format!("{key_type}_key"))?;
            keys::check_cross_signing_key(&value, user.as_str(), key_type).map_err(Error::InvalidParam)?;
            new.push((key_type, value));
        }
        if new.is_empty() {
            return Ok(());
        }
        let changes_something = new.iter().any(|(key_type, value)| existing.get(*key_type) != Some(value));
        if !changes_something {
            return Ok(());
        }
        let master = new.iter().find(|(t, _)| *t == MASTER).map(|(_, v)| v).or(existing.get(MASTER));
        let (master_id, master_public) = master
            .and_then(keys::cross_signing_public)
            .ok_or_else(|| Error::InvalidParam("Upload a master key first".to_owned()))?;
        for (key_type, value) in &new {
            if *key_type != MASTER {
                keys::check_signature(value, user.as_str(), &master_id, &master_public)
                    .map_err(|err| Error::InvalidSignature(format!("{key_type} key: {err}")))?;
            }
        }
        // Keys that do not check out are refused before the password is asked for.
        let completed = if existing.contains_key(MASTER) {
            Some(self.users.authorize_operation(authed, "device_signing_upload", auth).await?)
        } else {
            None
        };
        let replaced_master = existing
            .get(MASTER)
            .and_then(keys::cross_signing_public)
            .map(|(_, public)| public)
            .filter(|old| *old != master_public);
        let rows: Vec<(&str, String)> = new.iter().map(|(t, v)| (*t, v.to_string())).collect();
        self.db.store_cross_signing_keys(user, &rows, replaced_master.as_deref(), crate::service::now_ms()).await?;
        if let Some(completed) = completed {
            self.users.finish_auth(completed).await?;
        }
        self.announce_cross_signing(user).await
    }

    /// The user's cross-signing keys changed: local clients see a device-list change; other
    /// servers get the master and self-signing keys (with the user's own signatures).
    async fn announce_cross_signing(&self, user: &UserId) -> Result<()> {
        self.users.announce_user_keys(user).await;
        if let Some(edus) = self.edus.get() {
            let mut result = QueryResult::default();
            self.local_keys(&[(user.to_owned(), Vec::new())], None, &mut result).await?;
            edus.signing_key_update(user, result.master_keys.remove(user), result.self_signing_keys.remove(user)).await;
        }
        Ok(())
    }

    /// `POST /keys/signatures/upload`: signatures of the caller's own devices (by their
    /// self-signing key), of their own master key (by one of their devices), and of other users'
    /// master keys (by their user-signing key; only the caller sees those). Each signature is
    /// checked against the stored key it claims to sign; what fails is listed in the answer.
    pub async fn upload_signatures(
        &self,
        user: &UserId,
        signed: BTreeMap<OwnedUserId, BTreeMap<String, Value>>,
    ) -> Result<BTreeMap<OwnedUserId, BTreeMap<String, Value>>> {
        let own_keys: BTreeMap<String, Value> = self
            .db
            .cross_signing_keys(user)
            .await?
            .into_iter()
            .filter_map(|(k, json)| Some((k, serde_json::from_str(&json).ok()?)))
            .collect();
        let own_public = |key_type: &str| own_keys.get(key_type).and_then(keys::cross_signing_public);
        let mut failures: BTreeMap<OwnedUserId, BTreeMap<String, Value>> = BTreeMap::new();
        let mut rows = Vec::new();
        let mut signed_devices = Vec::new();
        let mut own_master_signed = false;
        let mut others_signed: BTreeSet<OwnedUserId> = BTreeSet::new();
        for (target_user, objects) in signed {
            for (key_id, object) in objects {
                let outcome = if target_user == user {
                    let own_master = own_public(MASTER).map(|(_, public)| public);
                    if own_master.as_deref() == Some(key_id.as_str()) {
                        self.check_own_master_signatures(user, &own_keys[MASTER], &object).await
                    } else {
                        match self.db.device_keys(user, &key_id).await? {
                            Some(stored) => {
                                let stored: Value = serde_json::from_str(&stored).unwrap_or_default();
                                match own_public(SELF_SIGNING) {
                                    Some((id, public)) => Self::signatures_by(&stored, &object, user, &[(id, public)])
                                        .inspect(|_| {
                                            signed_devices.push(key_id.clone());
                                        }),
                                    None => Err(signature_failure("M_INVALID_SIGNATURE", "No self-signing key")),
                                }
                            }
                            None => Err(signature_failure("M_NOT_FOUND", "Unknown device or key")),
                        }
                    }
                    .inspect(|_| {
                        if own_master.as_deref() == Some(key_id.as_str()) {
                            own_master_signed = true;
                        }
                    })
                } else {
                    match own_public(USER_SIGNING) {
                        None => Err(signature_failure("M_INVALID_SIGNATURE", "No user-signing key")),
                        Some(signer) => match self.master_key_of(&target_user).await {
                            Some(master) if keys::cross_signing_public(&master).is_some_and(|(_, p)| p == key_id) => {
                                others_signed.insert(target_user.clone());
                                Self::signatures_by(&master, &object, user, &[signer])
                            }
                            _ => Err(signature_failure("M_NOT_FOUND", "Unknown master key")),
                        },
                    }
                };
                match outcome {
                    Ok(found) => rows.extend(found.into_iter().map(|(signer_key_id, signature)| SignatureRow {
                        target_user: target_user.clone(),
                        target_key: key_id.clone(),
                        signer: user.to_owned(),
                        signer_key_id,
                        signature,
                    })),
                    Err(failure) => {
                        failures.entry(target_user.clone()).or_default().insert(key_id, failure);
                    }
                }
            }
        }
        self.db.store_signatures(&rows).await?;
        for device in signed_devices {
            self.users.announce_device_keys(user, &OwnedDeviceId::from(device)).await;
        }
        if own_master_signed {
            self.announce_cross_signing(user).await?;
        }
        if !others_signed.is_empty() {
            // The signer's clients must fetch the signed users' keys again to see the new trust
            // (Synapse tells only the signer; a change of the signed users' lists, which their
            // other contacts also see, is the nearest our one device-list stream has).
            let writes = others_signed.into_iter().map(|user_id| StreamWrite::DeviceListChange { user_id }).collect();
            self.streams.persist(writes).await?;
        }
        Ok(failures)
    }

    /// The signatures in `object` by `signer`'s `keys` that verify over `stored` (the key as we
    /// hold it, so a signature of anything else is refused): (key ID, signature).
    fn signatures_by(
        stored: &Value,
        object: &Value,
        signer: &UserId,
        allowed: &[(String, String)],
    ) -> std::result::Result<Vec<(String, String)>, Value> {
        let given = object
            .get("signatures")
            .and_then(|s| s.get(signer.as_str()))
            .and_then(Value::as_object)
            .ok_or_else(|| signature_failure("M_INVALID_SIGNATURE", "No signature by the uploader"))?;
        let mut found = Vec::new();
        for (key_id, signature) in given {
            let Some((_, public)) = allowed.iter().find(|(id, _)| id == key_id) else { continue };
            let Some(signature) = signature.as_str() else { continue };
            keys::verify(stored, key_id, public, signature)
                .map_err(|err| signature_failure("M_INVALID_SIGNATURE", format!("{key_id}: {err}")))?;
            found.push((key_id.clone(), signature.to_owned()));
        }
        if found.is_empty() {
            return Err(signature_failure("M_INVALID_SIGNATURE", "No signature by a key that may sign this"));
        }
        Ok(found)
    }

    /// Signatures of the user's own master key by their devices.
    async fn check_own_master_signatures(
        &self,
        user: &UserId,
        master: &Value,
        object: &Value,
    ) -> std::result::Result<Vec<(String, String)>, Value> {
        let mut allowed = Vec::new();
        for (device_id, json, _) in self.db.user_device_keys(user).await.unwrap_or_default() {
            if let Ok(value) = serde_json::from_str::<Value>(&json)
                && let Some(public) = keys::device_ed25519(&value, &device_id)
            {
                allowed.push((format!("ed25519:{device_id}"), public));
            }
        }
        Self::signatures_by(master, object, user, &allowed)
    }

    /// Any user's master key: a local user's from the database, a remote user's from their
    /// server.
    async fn master_key_of(&self, user: &UserId) -> Option<Value> {
        if self.is_local(user) {
            let json = self.db.cross_signing_keys(user).await.ok()?.remove(MASTER)?;
            return serde_json::from_str(&json).ok();
        }
        if !self.is_federation_enabled {
            return None;
        }
        let request = federation::keys::get_keys::v1::Request::new(BTreeMap::from([(user.to_owned(), Vec::new())]));
        let response = tokio::time::timeout(DEFAULT_REMOTE_TIMEOUT, self.client.send(user.server_name(), request))
            .await
            .ok()?
            .ok()?;
        let raw: Raw<_> = response.master_keys.get(user)?.clone();
        serde_json::from_str(raw.json().get()).ok()
    }
}

/// The failures `/keys/query` and `/keys/claim` report for other servers while federation is off.
fn federation_off<'a>(servers: impl Iterator<Item = &'a OwnedServerName>) -> Vec<(String, Value)> {
    servers.map(|server| (server.to_string(), json!({"status": 503, "message": "Federation is disabled"}))).collect()
}

/// A remote server's failure as `/keys/query` and `/keys/claim` report it.
fn remote_failure(err: &FederationError) -> Value {
    match err {
        FederationError::Remote { status, errcode, message, .. } => {
            json!({"status": status, "errcode": errcode, "message": message})
        }
        _ => json!({"status": 503, "message": "Not reachable"}),
    }
}
