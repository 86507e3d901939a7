//! Account data (global and per room), room tags, and to-device messages: between local devices,
//! to other servers' users (as `m.direct_to_device` EDUs, through [`Edus`]), and from them
//! ([`AccountData::receive_to_device`]), each delivered once.

use std::{
    collections::{BTreeMap, HashSet},
    num::NonZeroUsize,
    sync::{Arc, OnceLock},
};

use lru::LruCache;
use parking_lot::Mutex;
use ruma::{OwnedServerName, OwnedUserId, RoomId, ServerName, UserId};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::{
    error::{Error, Result},
    service::{edus::Edus, now_ms, stream::Streams},
    storage::{
        Db,
        stream::{StreamWrite, ToDeviceWrite},
    },
};

/// Types that have their own endpoints and cannot be written as plain account data.
const RESERVED_TYPES: &[&str] = &["m.fully_read", "m.push_rules"];

pub struct AccountData {
    db: Db,
    streams: Arc<Streams>,
    /// Recently seen to-device transaction IDs, so a retried send is not delivered twice.
    to_device_txns: Mutex<LruCache<(OwnedUserId, String, String), ()>>,
    /// Sends to-device messages for other servers' users (federation).
    edus: OnceLock<Arc<Edus>>,
}

/// The `message_id` of a to-device send for other servers: the same for a client's retry of the
/// same transaction, even after our restart, so the receiver's deduplication catches it.
fn message_id(sender: &UserId, sender_device: &str, txn_id: &str) -> String {
    let digest = Sha256::digest(format!("{sender}\n{sender_device}\n{txn_id}").as_bytes());
    digest[..16].iter().map(|byte| format!("{byte:02x}")).collect()
}

impl AccountData {
    pub fn new(db: Db, streams: Arc<Streams>) -> AccountData {
        AccountData {
            db,
            streams,
            to_device_txns: Mutex::new(LruCache::new(NonZeroUsize::new(100_000).unwrap())),
            edus: OnceLock::new(),
        }
    }

    /// Messages for other servers' users go out through `edus`.
    pub fn set_edus(&self, edus: Arc<Edus>) {
        let _ = self.edus.set(edus);
    }

    /// The writes delivering `devices` (device ID or `*` → content) to a local user's devices.
    async fn local_to_device_writes(
        &self,
        sender: &UserId,
        event_type: &str,
        user: &UserId,
        devices: &Map<String, Value>,
    ) -> Result<Vec<StreamWrite>> {
        let known: HashSet<String> =
            self.db.devices(user).await?.into_iter().map(|d| d.device_id.to_string()).collect();
        let mut writes = Vec::new();
        for (device, content) in devices {
            if !content.is_object() {
                return Err(Error::BadJson("to-device content must be an object".to_owned()));
            }
            let targets: Vec<&String> =
                if device == "*" { known.iter().collect() } else { known.get(device).into_iter().collect() };
            for target in targets {
                writes.push(StreamWrite::ToDevice(ToDeviceWrite {
                    user_id: user.to_owned(),
                    device_id: target.clone(),
                    sender: sender.to_owned(),
                    event_type: event_type.to_owned(),
                    content: content.to_string(),
                }));
            }
        }
        Ok(writes)
    }

    /// An `m.direct_to_device` EDU from `origin` (the caller checked that `sender` belongs to
    /// it): delivered to the local recipients' devices once per (origin, `message_id`), however
    /// often it is sent. Recipients of other servers are skipped.
    pub async fn receive_to_device(
        &self,
        origin: &ServerName,
        sender: &UserId,
        event_type: &str,
        message_id: &str,
        messages: &Map<String, Value>,
    ) -> Result<()> {
        let mut writes = Vec::new();
        for (user, devices) in messages {
            let Ok(user) = UserId::parse(user.as_str()) else { continue };
            let Some(devices) = devices.as_object() else { continue };
            if user.server_name() != self.streams.server_name() {
                continue;
            }
            match self.local_to_device_writes(sender, event_type, &user, devices).await {
                Ok(more) => writes.extend(more),
                Err(Error::BadJson(why)) => tracing::debug!(%origin, %why, "ignored a malformed to-device message"),
                Err(err) => return Err(err),
            }
        }
        if !self.db.record_inbound_to_device(origin.as_str(), message_id, now_ms()).await? {
            tracing::debug!(%origin, %message_id, "to-device message already delivered");
            return Ok(());
        }
        if !writes.is_empty()
            && let Err(err) = self.streams.persist(writes).await
        {
            // Not delivered: a resend of the message must not be taken for a duplicate.
            let _ = self.db.forget_inbound_to_device(origin.as_str(), message_id).await;
            return Err(err);
        }
        Ok(())
    }

    fn check_owner(user: &UserId, target: &UserId) -> Result<()> {
        if user != target {
            return Err(Error::forbidden("You cannot access another user's account data"));
        }
        Ok(())
    }

    /// `PUT /user/{userId}/account_data/{type}` and the per-room form.
    pub async fn set(
        &self,
        user: &UserId,
        target: &UserId,
        room_id: Option<&RoomId>,
        data_type: &str,
        content: Value,
    ) -> Result<()> {
        Self::check_owner(user, target)?;
        if RESERVED_TYPES.contains(&data_type) {
            return Err(Error::BadJson(format!("{data_type} cannot be set through the account data API")));
        }
        if !content.is_object() {
            return Err(Error::BadJson("account data content must be an object".to_owned()));
        }
        if let Some(room_id) = room_id {
            crate::service::rooms::Rooms::check_room_id_exists(&self.db, room_id).await?;
        }
        self.write(user, room_id, data_type, &content).await
    }

    async fn write(&self, user: &UserId, room_id: Option<&RoomId>, data_type: &str, content: &Value) -> Result<()> {
        self.streams
            .persist(vec![StreamWrite::AccountData {
                user_id: user.to_owned(),
                room_id: room_id.map(ToOwned::to_owned),
                data_type: data_type.to_owned(),
                content: content.to_string(),
            }])
            .await?;
        Ok(())
    }

    /// `GET /user/{userId}/account_data/{type}` and the per-room form.
    pub async fn get(
        &self,
        user: &UserId,
        target: &UserId,
        room_id: Option<&RoomId>,
        data_type: &str,
    ) -> Result<Value> {
        Self::check_owner(user, target)?;
        let json = self
            .db
            .account_data(user, room_id, data_type)
            .await?
            .ok_or_else(|| Error::not_found("Account data not found"))?;
        serde_json::from_str(&json).map_err(|e| Error::Internal(e.to_string()))
    }

    async fn tags_map(&self, user: &UserId, room_id: &RoomId) -> Result<Map<String, Value>> {
        let content = self.db.account_data(user, Some(room_id), "m.tag").await?;
        Ok(content
            .and_then(|json| serde_json::from_str::<Value>(&json).ok())
            .and_then(|v| v.get("tags").and_then(Value::as_object).cloned())
            .unwrap_or_default())
    }

    /// `GET /user/{userId}/rooms/{roomId}/tags`.
    pub async fn tags(&self, user: &UserId, target: &UserId, room_id: &RoomId) -> Result<Map<String, Value>> {
        Self::check_owner(user, target)?;
        self.tags_map(user, room_id).await
    }

    /// `PUT /user/{userId}/rooms/{roomId}/tags/{tag}`.
    pub async fn set_tag(
        &self,
        user: &UserId,
        target: &UserId,
        room_id: &RoomId,
        tag: &str,
        info: Value,
    ) -> Result<()> {
        Self::check_owner(user, target)?;
        if tag.is_empty() || tag.len() > 255 {
            return Err(Error::InvalidParam("tag must be 1-255 bytes".to_owned()));
        }
        if !info.is_object() {
            return Err(Error::BadJson("tag content must be an object".to_owned()));
        }
        if let Some(order) = info.get("order")
            && !order.is_number()
        {
            return Err(Error::BadJson("order must be a number".to_owned()));
        }
        let mut tags = self.tags_map(user, room_id).await?;
        tags.insert(tag.to_owned(), info);
        self.write(user, Some(room_id), "m.tag", &json!({"tags": tags})).await
    }

    /// `DELETE /user/{userId}/rooms/{roomId}/tags/{tag}`.
    pub async fn delete_tag(&self, user: &UserId, target: &UserId, room_id: &RoomId, tag: &str) -> Result<()> {
        Self::check_owner(user, target)?;
        let mut tags = self.tags_map(user, room_id).await?;
        if tags.remove(tag).is_some() {
            self.write(user, Some(room_id), "m.tag", &json!({"tags": tags})).await?;
        }
        Ok(())
    }

    /// Whether this device already sent a to-device request with this transaction ID (a retry,
    /// answered without sending again or counting against the sender's rate limit).
    /// The recent ones are in memory; the rest are read from the database, where each
    /// transaction ID is committed with its messages (so a retry after a restart is caught too).
    pub async fn is_to_device_retry(&self, sender: &UserId, sender_device: &str, txn_id: &str) -> Result<bool> {
        let key = (sender.to_owned(), sender_device.to_owned(), txn_id.to_owned());
        if self.to_device_txns.lock().contains(&key) {
            return Ok(true);
        }
        if self.db.to_device_txn_seen(sender, sender_device, txn_id).await? {
            self.to_device_txns.lock().put(key, ());
            return Ok(true);
        }
        Ok(false)
    }

    /// `PUT /sendToDevice/{eventType}/{txnId}`: delivers to local devices (`*` = all of a user's
    /// devices). Messages for other servers wait for federation and are dropped for now.
    pub async fn send_to_device(
        &self,
        sender: &UserId,
        sender_device: &str,
        event_type: &str,
        txn_id: &str,
        messages: &Map<String, Value>,
    ) -> Result<()> {
        let key = (sender.to_owned(), sender_device.to_owned(), txn_id.to_owned());
        if self.is_to_device_retry(sender, sender_device, txn_id).await? {
            return Ok(());
        }
        let mut writes = Vec::new();
        let mut remote: BTreeMap<OwnedServerName, Map<String, Value>> = BTreeMap::new();
        for (user, devices) in messages {
            let user =
                UserId::parse(user.as_str()).map_err(|_| Error::InvalidParam(format!("{user} is not a user ID")))?;
            let devices = devices
                .as_object()
                .ok_or_else(|| Error::BadJson("messages must map devices to contents".to_owned()))?;
            if user.server_name() != sender.server_name() {
                if devices.values().any(|content| !content.is_object()) {
                    return Err(Error::BadJson("to-device content must be an object".to_owned()));
                }
                remote
                    .entry(user.server_name().to_owned())
                    .or_default()
                    .insert(user.to_string(), Value::Object(devices.clone()));
                continue;
            }
            writes.extend(self.local_to_device_writes(sender, event_type, &user, devices).await?);
        }
        writes.push(StreamWrite::ToDeviceTxn {
            user_id: sender.to_owned(),
            device_id: sender_device.to_owned(),
            txn_id: txn_id.to_owned(),
            ts: crate::service::now_ms(),
        });
        self.streams.persist(writes).await?;
        if !remote.is_empty()
            && let Some(edus) = self.edus.get()
        {
            edus.to_device(sender, event_type, &message_id(sender, sender_device, txn_id), remote).await;
        }
        self.to_device_txns.lock().put(key, ());
        Ok(())
    }
}
