//! EDUs (Server-Server API, "EDUs"): what this server tells other servers about its users
//! besides room events, and what it takes from theirs.
//!
//! Outbound ([`Edus`]): typing, receipts, presence, to-device messages and device-list updates of
//! local users become EDUs for the servers that need them: a room's EDU goes to the room's other
//! joined servers that its server ACL allows (the same destinations as our PDUs,
//! `Rooms::other_servers`); a user's EDU (presence, device lists) to every server sharing a room
//! with the user; a to-device message to the recipients' servers. The outbox carries them;
//! typing and presence in memory, the rest durably. `m.read.private` never leaves the server.
//! Nothing is sent while federation is off. Inbound: [`inbound::InboundEdus`].

pub mod inbound;

use std::{
    collections::BTreeSet,
    sync::{Arc, OnceLock},
};

use ruma::{OwnedServerName, RoomId, UserId};
use serde_json::{Map, Value, json};

use crate::{
    federation::outbox::Outbox,
    service::{ephemeral::PresenceView, receipts::READ_PRIVATE, rooms::Rooms},
};

pub struct Edus {
    rooms: Arc<Rooms>,
    /// Set when federation is on.
    outbox: OnceLock<Arc<Outbox>>,
}

/// One receipt of a local user, as it goes into an `m.receipt` EDU.
pub struct OutgoingReceipt<'a> {
    pub room_id: &'a RoomId,
    pub receipt_type: &'a str,
    pub user_id: &'a UserId,
    /// Empty for an unthreaded receipt.
    pub thread_id: &'a str,
    pub event_id: &'a ruma::EventId,
    pub ts: i64,
}

impl Edus {
    pub fn new(rooms: Arc<Rooms>) -> Arc<Edus> {
        Arc::new(Edus { rooms, outbox: OnceLock::new() })
    }

    /// Federation is on: EDUs go out through `outbox`.
    pub fn enable(&self, outbox: Arc<Outbox>) {
        let _ = self.outbox.set(outbox);
    }

    fn outbox_for(&self, user: &UserId) -> Option<&Arc<Outbox>> {
        // Only our own users' news is ours to tell; a remote user's typing or presence shown
        // here came from their server, which tells the others itself.
        (user.server_name() == self.rooms.server_name()).then(|| self.outbox.get()).flatten()
    }

    /// The room's other joined servers its ACL allows.
    async fn room_destinations(&self, room_id: &RoomId) -> Vec<OwnedServerName> {
        self.rooms.allowed_servers(room_id, self.rooms.other_servers(room_id)).await
    }

    /// Every server sharing a room with `user` (and allowed by that room's ACL).
    async fn contact_destinations(&self, user: &UserId) -> Vec<OwnedServerName> {
        let mut servers = BTreeSet::new();
        for room_id in self.rooms.joined_rooms_of(user) {
            servers.extend(self.room_destinations(&room_id).await);
        }
        servers.into_iter().collect()
    }

    /// A local user started or stopped typing (`serial`: the typing position of the change).
    pub fn typing(self: &Arc<Self>, room_id: &RoomId, user: &UserId, typing: bool, serial: i64) {
        if self.outbox_for(user).is_none() {
            return;
        }
        let (this, room_id, user) = (self.clone(), room_id.to_owned(), user.to_owned());
        // The ACL is read from the database; the caller (a sync PUT handler or the typing
        // sweeper) does not wait for it. The serial keeps the latest state winning.
        tokio::spawn(async move {
            let Some(outbox) = this.outbox_for(&user) else { return };
            let destinations = this.room_destinations(&room_id).await;
            outbox.queue_typing(&destinations, &room_id, &user, typing, serial);
        });
    }

    /// A local user's presence changed (`serial`: its position).
    pub fn presence(self: &Arc<Self>, view: PresenceView, serial: i64) {
        if self.outbox_for(&view.user_id).is_none() {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let Some(outbox) = this.outbox_for(&view.user_id) else { return };
            let destinations = this.contact_destinations(&view.user_id).await;
            let mut update = json!({
                "user_id": view.user_id,
                "presence": view.presence,
                "currently_active": view.currently_active,
                "last_active_ago": view.last_active_ago.unwrap_or(0),
            });
            if let Some(msg) = &view.status_msg {
                update["status_msg"] = json!(msg);
            }
            outbox.queue_presence(&destinations, &view.user_id, update, serial);
        });
    }

    /// A local user's receipt was recorded: an `m.receipt` EDU for the room's servers. Private
    /// receipts stay here.
    pub async fn receipt(&self, receipt: OutgoingReceipt<'_>) {
        if receipt.receipt_type == READ_PRIVATE {
            return;
        }
        let Some(outbox) = self.outbox_for(receipt.user_id) else { return };
        let destinations = self.room_destinations(receipt.room_id).await;
        let mut data = json!({"ts": receipt.ts});
        if !receipt.thread_id.is_empty() {
            data["thread_id"] = json!(receipt.thread_id);
        }
        let edu = json!({"edu_type": "m.receipt", "content": {
            receipt.room_id.as_str(): {receipt.receipt_type: {receipt.user_id.as_str(): {
                "event_ids": [receipt.event_id],
                "data": data,
            }}}
        }});
        outbox.enqueue_edu(&destinations, &edu).await;
    }

    /// A local user sent a to-device message to users of other servers: one
    /// `m.direct_to_device` EDU per server, with the recipients of that server.
    pub async fn to_device(
        &self,
        sender: &UserId,
        event_type: &str,
        message_id: &str,
        per_server: std::collections::BTreeMap<OwnedServerName, Map<String, Value>>,
    ) {
        let Some(outbox) = self.outbox_for(sender) else {
            if !per_server.is_empty() {
                tracing::debug!(%sender, "to-device messages for other servers dropped: federation is off");
            }
            return;
        };
        for (server, messages) in per_server {
            let edu = json!({"edu_type": "m.direct_to_device", "content": {
                "sender": sender,
                "type": event_type,
                "message_id": message_id,
                "messages": messages,
            }});
            outbox.enqueue_edu(&[server], &edu).await;
        }
    }

    /// A local user's device was added, renamed or deleted: an `m.device_list_update` for every
    /// server sharing a room with them. `stream_id` is the change's position, `prev_id` the
    /// user's change before it (0: none).
    pub async fn device_list_update(&self, update: DeviceListUpdate<'_>) {
        let Some(outbox) = self.outbox_for(update.user_id) else { return };
        let destinations = self.contact_destinations(update.user_id).await;
        let mut content = json!({
            "user_id": update.user_id,
            "device_id": update.device_id,
            "stream_id": update.stream_id,
            "prev_id": if update.prev_id > 0 { vec![update.prev_id] } else { Vec::new() },
            "deleted": update.is_deleted,
        });
        if let Some(name) = update.display_name {
            content["device_display_name"] = json!(name);
        }
        if let Some(keys) = update.keys {
            content["keys"] = keys;
        }
        outbox.enqueue_edu(&destinations, &json!({"edu_type": "m.device_list_update", "content": content})).await;
    }

    /// A local user's master or self-signing key changed (or got a new signature): an
    /// `m.signing_key_update` for every server sharing a room with them.
    pub async fn signing_key_update(
        &self,
        user_id: &UserId,
        master_key: Option<Value>,
        self_signing_key: Option<Value>,
    ) {
        let Some(outbox) = self.outbox_for(user_id) else { return };
        let destinations = self.contact_destinations(user_id).await;
        if destinations.is_empty() {
            return;
        }
        let mut content = json!({"user_id": user_id});
        if let Some(key) = master_key {
            content["master_key"] = key;
        }
        if let Some(key) = self_signing_key {
            content["self_signing_key"] = key;
        }
        outbox.enqueue_edu(&destinations, &json!({"edu_type": "m.signing_key_update", "content": content})).await;
    }
}

/// A change of one local device, for [`Edus::device_list_update`].
pub struct DeviceListUpdate<'a> {
    pub user_id: &'a UserId,
    pub device_id: &'a str,
    pub display_name: Option<&'a str>,
    pub is_deleted: bool,
    pub stream_id: i64,
    pub prev_id: i64,
    /// The device's identity keys with their signatures, once it uploaded them.
    pub keys: Option<Value>,
}
