//! EDUs received in a transaction (`PUT /_matrix/federation/v1/send/{txnId}`): each is checked
//! and then handed to the service that owns its kind, as if a local user had done it.
//!
//! Checks, for every EDU: the user it is about (`user_id`, `sender`) belongs to the origin
//! server; for a room's EDU, the origin has a joined member in the room, a local user is joined
//! too, and the room's server ACL allows the origin. What fails a check, or does not parse, is
//! ignored (logged at debug): an EDU never fails the transaction or its PDUs.

use std::{sync::Arc, time::Duration};

use ruma::{
    OwnedUserId, RoomId, ServerName, UserId,
    api::federation::{
        device::get_devices,
        transactions::edu::{DeviceListUpdateContent, PresenceContent, SigningKeyUpdateContent, TypingContent},
    },
};
use serde_json::{Map, Value, json};

use crate::{
    federation::client::FederationClient,
    service::{
        account_data::AccountData,
        ephemeral::{Presence, Typing},
        now_ms,
        receipts::Receipts,
        rooms::Rooms,
    },
    storage::{federation_edus::RemoteDeviceList, stream::StreamWrite},
};

/// How long a device-list resync may take before the EDU is applied without it.
const RESYNC_TIMEOUT: Duration = Duration::from_secs(10);

pub struct InboundEdus {
    rooms: Arc<Rooms>,
    typing: Arc<Typing>,
    presence: Arc<Presence>,
    receipts: Arc<Receipts>,
    account_data: Arc<AccountData>,
    client: Arc<FederationClient>,
}

/// Why an EDU was ignored (for the debug log).
type Ignored = String;

impl InboundEdus {
    pub fn new(
        rooms: Arc<Rooms>,
        typing: Arc<Typing>,
        presence: Arc<Presence>,
        receipts: Arc<Receipts>,
        account_data: Arc<AccountData>,
        client: Arc<FederationClient>,
    ) -> InboundEdus {
        InboundEdus { rooms, typing, presence, receipts, account_data, client }
    }

    /// Applies the EDUs of one transaction of `origin`, in order.
    pub async fn receive(&self, origin: &ServerName, edus: &[Box<serde_json::value::RawValue>]) {
        for raw in edus {
            let edu: Value = match serde_json::from_str(raw.get()) {
                Ok(edu) => edu,
                Err(err) => {
                    tracing::debug!(%origin, %err, "ignored an EDU that is not JSON");
                    continue;
                }
            };
            let edu_type = edu["edu_type"].as_str().unwrap_or_default().to_owned();
            let content = edu.get("content").cloned().unwrap_or(Value::Null);
            let outcome = match edu_type.as_str() {
                "m.typing" => self.typing(origin, content).await,
                "m.receipt" => self.receipts(origin, content).await,
                "m.presence" => self.presence(origin, content),
                "m.direct_to_device" => self.to_device(origin, content).await,
                "m.device_list_update" => self.device_list_update(origin, content).await,
                "m.signing_key_update" => self.signing_key_update(origin, content).await,
                _ => Err(format!("unknown EDU type {edu_type:?}")),
            };
            if let Err(why) = outcome {
                tracing::debug!(%origin, %edu_type, %why, "ignored an EDU");
            }
        }
    }

    /// `user` must be one of `origin`'s.
    fn check_user(origin: &ServerName, user: &UserId) -> std::result::Result<(), Ignored> {
        if user.server_name() != origin {
            return Err(format!("{user} is not a user of {origin}"));
        }
        Ok(())
    }

    /// The origin may speak in the room: one of its users is joined, so is one of ours, and the
    /// room's server ACL allows it.
    async fn check_room(&self, origin: &ServerName, room_id: &RoomId) -> std::result::Result<(), Ignored> {
        if !self.rooms.has_local_member(room_id) {
            return Err(format!("no local user is in {room_id}"));
        }
        if !self.rooms.other_servers(room_id).iter().any(|server| server == origin) {
            return Err(format!("{origin} is not in {room_id}"));
        }
        match self.rooms.is_server_allowed(room_id, origin).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!("{room_id}'s server ACL denies {origin}")),
            Err(err) => Err(format!("cannot read {room_id}'s server ACL: {err}")),
        }
    }

    async fn typing(&self, origin: &ServerName, content: Value) -> std::result::Result<(), Ignored> {
        let typing: TypingContent = serde_json::from_value(content).map_err(|err| err.to_string())?;
        Self::check_user(origin, &typing.user_id)?;
        self.check_room(origin, &typing.room_id).await?;
        if !self.rooms.streams.members(&typing.room_id, "join").contains(&typing.user_id) {
            return Err(format!("{} is not joined to {}", typing.user_id, typing.room_id));
        }
        self.typing.set_remote(&typing.user_id, &typing.room_id, typing.typing);
        Ok(())
    }

    /// `m.receipt`: `{room_id: {receipt_type: {user_id: {event_ids, data: {ts, thread_id}}}}}`.
    /// Parsed by hand rather than with ruma's `ReceiptContent`, which keeps only `m.read`.
    async fn receipts(&self, origin: &ServerName, content: Value) -> std::result::Result<(), Ignored> {
        let Value::Object(rooms) = content else { return Err("content is not an object".to_owned()) };
        for (room_id, types) in rooms {
            let Ok(room_id) = RoomId::parse(&room_id) else { continue };
            if let Err(why) = self.check_room(origin, &room_id).await {
                tracing::debug!(%origin, %why, "ignored the receipts of a room");
                continue;
            }
            let Value::Object(types) = types else { continue };
            for (receipt_type, users) in types {
                let Value::Object(users) = users else { continue };
                for (user, receipt) in users {
                    let Ok(user) = UserId::parse(&user) else { continue };
                    if let Err(why) = Self::check_user(origin, &user) {
                        tracing::debug!(%why, "ignored a receipt");
                        continue;
                    }
                    // Several event IDs are allowed; the last is the furthest.
                    let Some(event_id) = receipt["event_ids"]
                        .as_array()
                        .and_then(|ids| ids.last())
                        .and_then(Value::as_str)
                        .and_then(|id| ruma::EventId::parse(id).ok())
                    else {
                        continue;
                    };
                    let thread_id = receipt["data"]["thread_id"].as_str();
                    let ts = receipt["data"]["ts"].as_i64().unwrap_or_else(now_ms);
                    if let Err(err) =
                        self.receipts.receive_remote(&room_id, &receipt_type, &user, &event_id, thread_id, ts).await
                    {
                        tracing::warn!(%origin, %room_id, %user, %err, "could not record a remote receipt");
                    }
                }
            }
        }
        Ok(())
    }

    fn presence(&self, origin: &ServerName, content: Value) -> std::result::Result<(), Ignored> {
        let content: PresenceContent = serde_json::from_value(content).map_err(|err| err.to_string())?;
        for update in content.push {
            if let Err(why) = Self::check_user(origin, &update.user_id) {
                tracing::debug!(%why, "ignored a presence update");
                continue;
            }
            // Only the presence of people our users can see is worth keeping.
            if !self.rooms.streams.shares_room_with_local(&update.user_id) {
                continue;
            }
            let last_active_ago = i64::try_from(u64::from(update.last_active_ago)).unwrap_or(i64::MAX);
            self.presence.set_remote(
                &update.user_id,
                update.presence.as_str(),
                update.status_msg,
                last_active_ago,
                update.currently_active,
            );
        }
        Ok(())
    }

    /// `m.direct_to_device`; parsed by hand to keep each content exactly as sent.
    async fn to_device(&self, origin: &ServerName, content: Value) -> std::result::Result<(), Ignored> {
        let sender = content["sender"].as_str().and_then(|s| UserId::parse(s).ok()).ok_or("no valid sender")?;
        Self::check_user(origin, &sender)?;
        let event_type = content["type"].as_str().filter(|t| !t.is_empty()).ok_or("no type")?;
        let message_id = content["message_id"].as_str().filter(|id| !id.is_empty()).ok_or("no message_id")?;
        let messages: &Map<String, Value> = content["messages"].as_object().ok_or("no messages")?;
        self.account_data
            .receive_to_device(origin, &sender, event_type, message_id, messages)
            .await
            .map_err(|err| format!("could not deliver: {err}"))
    }

    async fn signing_key_update(&self, origin: &ServerName, content: Value) -> std::result::Result<(), Ignored> {
        let update: SigningKeyUpdateContent = serde_json::from_value(content).map_err(|err| err.to_string())?;
        Self::check_user(origin, &update.user_id)?;
        // Cross-signing keys are not kept yet (issue 11); the change still tells our users'
        // clients to look at the user's keys again.
        self.mark_changed(&update.user_id).await
    }

    /// `m.device_list_update`: applied to our copy of the user's devices when it follows the
    /// last update we have (its `prev_id` names our `stream_id`); after a gap, the whole list is
    /// fetched from the user's server again. Either way the user's devices count as changed for
    /// the local users sharing a room with them.
    async fn device_list_update(&self, origin: &ServerName, content: Value) -> std::result::Result<(), Ignored> {
        let update: DeviceListUpdateContent = serde_json::from_value(content).map_err(|err| err.to_string())?;
        let user = update.user_id.clone();
        Self::check_user(origin, &user)?;
        if !self.rooms.streams.shares_room_with_local(&user) {
            return Err(format!("{user} shares no room with a local user"));
        }
        let stream_id = i64::try_from(u64::from(update.stream_id)).map_err(|_| "stream_id out of range")?;
        let cached = self.rooms.db.remote_device_list(&user).await.map_err(|err| err.to_string())?;
        if cached.as_ref().is_some_and(|list| list.stream_id >= stream_id) {
            return Ok(());
        }
        let prev: Vec<i64> = update.prev_id.iter().filter_map(|id| i64::try_from(u64::from(*id)).ok()).collect();
        let follows = match &cached {
            Some(list) => prev.contains(&list.stream_id),
            None => false,
        };
        let list = if follows && let Some(list) = cached {
            let mut devices: Vec<Value> = serde_json::from_str(&list.devices_json).unwrap_or_default();
            devices.retain(|device| device["device_id"] != update.device_id.as_str());
            if update.deleted != Some(true) {
                devices.push(json!({
                    "device_id": update.device_id,
                    "device_display_name": update.device_display_name,
                }));
            }
            Some(RemoteDeviceList { stream_id, devices_json: Value::Array(devices).to_string() })
        } else {
            self.resync_devices(origin, &user).await
        };
        if let Some(list) = list
            && let Err(err) = self.rooms.db.store_remote_device_list(&user, &list, now_ms()).await
        {
            tracing::warn!(%user, %err, "could not store a remote device list");
        }
        self.mark_changed(&user).await
    }

    /// The user's devices as their server lists them now (`GET /user/devices/{userId}`).
    async fn resync_devices(&self, origin: &ServerName, user: &UserId) -> Option<RemoteDeviceList> {
        let request = get_devices::v1::Request::new(user.to_owned());
        let response = match tokio::time::timeout(RESYNC_TIMEOUT, self.client.send(origin, request)).await {
            Ok(Ok(response)) if response.user_id == user => response,
            Ok(Ok(_)) => return None,
            Ok(Err(err)) => {
                tracing::info!(%origin, %user, %err, "could not resync a device list");
                return None;
            }
            Err(_) => {
                tracing::info!(%origin, %user, "a device-list resync timed out");
                return None;
            }
        };
        let devices: Vec<Value> = response
            .devices
            .iter()
            .map(|device| json!({"device_id": device.device_id, "device_display_name": device.device_display_name}))
            .collect();
        Some(RemoteDeviceList {
            stream_id: i64::try_from(u64::from(response.stream_id)).unwrap_or(i64::MAX),
            devices_json: Value::Array(devices).to_string(),
        })
    }

    async fn mark_changed(&self, user: &OwnedUserId) -> std::result::Result<(), Ignored> {
        if !self.rooms.streams.shares_room_with_local(user) {
            return Err(format!("{user} shares no room with a local user"));
        }
        let write = StreamWrite::DeviceListChange { user_id: user.clone() };
        self.rooms.streams.persist(vec![write]).await.map(|_| ()).map_err(|err| err.to_string())
    }
}
