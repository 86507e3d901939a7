//! Account data (global and per room), room tags, and to-device messages between local devices.

use std::{collections::HashSet, num::NonZeroUsize, sync::Arc};

use lru::LruCache;
use parking_lot::Mutex;
use ruma::{OwnedUserId, RoomId, UserId};
use serde_json::{Map, Value, json};

use crate::{
    error::{Error, Result},
    service::stream::Streams,
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
}

impl AccountData {
    pub fn new(db: Db, streams: Arc<Streams>) -> AccountData {
        AccountData { db, streams, to_device_txns: Mutex::new(LruCache::new(NonZeroUsize::new(100_000).unwrap())) }
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
    pub fn is_to_device_retry(&self, sender: &UserId, sender_device: &str, txn_id: &str) -> bool {
        self.to_device_txns.lock().contains(&(sender.to_owned(), sender_device.to_owned(), txn_id.to_owned()))
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
        if self.to_device_txns.lock().contains(&key) {
            return Ok(());
        }
        let mut writes = Vec::new();
        for (user, devices) in messages {
            let user =
                UserId::parse(user.as_str()).map_err(|_| Error::InvalidParam(format!("{user} is not a user ID")))?;
            let devices = devices
                .as_object()
                .ok_or_else(|| Error::BadJson("messages must map devices to contents".to_owned()))?;
            if user.server_name() != sender.server_name() {
                tracing::debug!(%user, "to-device message for another server dropped (no federation yet)");
                continue;
            }
            let known: HashSet<String> =
                self.db.devices(&user).await?.into_iter().map(|d| d.device_id.to_string()).collect();
            for (device, content) in devices {
                if !content.is_object() {
                    return Err(Error::BadJson("to-device content must be an object".to_owned()));
                }
                let targets: Vec<&String> =
                    if device == "*" { known.iter().collect() } else { known.get(device).into_iter().collect() };
                for target in targets {
                    writes.push(StreamWrite::ToDevice(ToDeviceWrite {
                        user_id: user.clone(),
                        device_id: target.clone(),
                        sender: sender.to_owned(),
                        event_type: event_type.to_owned(),
                        content: content.to_string(),
                    }));
                }
            }
        }
        if !writes.is_empty() {
            self.streams.persist(writes).await?;
        }
        self.to_device_txns.lock().put(key, ());
        Ok(())
    }
}
