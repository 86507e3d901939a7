//! Receipts (`m.read`, `m.read.private`, threaded) and read markers (`m.fully_read`). Local
//! users' public receipts (`m.read`, `org.hearth.delivered`) go to the room's other servers as
//! `m.receipt` EDUs; those other servers send for their users are recorded like local ones
//! ([`Receipts::receive_remote`]).

use std::{
    collections::HashMap,
    sync::{Arc, OnceLock},
};

use ruma::{EventId, RoomId, UserId};
use serde_json::json;

use crate::{
    config::DeliveredReceiptsConfig,
    error::{Error, Result},
    matrix::pdu::Pdu,
    service::{
        edus::{Edus, OutgoingReceipt},
        now_ms,
        rooms::Rooms,
        stream::Streams,
        sync::Delivered,
    },
    storage::stream::{ReceiptWrite, StreamWrite},
};

pub const READ: &str = "m.read";
pub const READ_PRIVATE: &str = "m.read.private";
pub const FULLY_READ: &str = "m.fully_read";
/// Hearth's delivered receipt (`spec/delivered-receipts.md`).
pub const DELIVERED: &str = "org.hearth.delivered";
/// Account data with which a user turns delivered receipts off.
pub const DELIVERED_SETTING: &str = "org.hearth.delivered_receipts";

/// The thread an event belongs to for threaded receipts: its thread root, or `main`.
pub fn thread_of(pdu: &Pdu) -> String {
    let content = pdu.content_value();
    let relates_to = &content["m.relates_to"];
    match (relates_to["rel_type"].as_str(), relates_to["event_id"].as_str()) {
        (Some("m.thread"), Some(root)) => root.to_owned(),
        _ => "main".to_owned(),
    }
}

pub struct Receipts {
    rooms: Arc<Rooms>,
    streams: Arc<Streams>,
    delivered_enabled: bool,
    /// Rooms with more joined members record no delivered receipts.
    delivered_max_members: u64,
    /// Per user: whether they record delivered receipts, and the account-data position read at.
    settings: parking_lot::Mutex<lru::LruCache<ruma::OwnedUserId, (i64, bool)>>,
    /// Sends local users' receipts to other servers (federation).
    edus: OnceLock<Arc<Edus>>,
}

impl Receipts {
    pub fn new(rooms: Arc<Rooms>, streams: Arc<Streams>, config: &DeliveredReceiptsConfig) -> Receipts {
        let settings = parking_lot::Mutex::new(lru::LruCache::new(std::num::NonZeroUsize::new(100_000).unwrap()));
        Receipts {
            rooms,
            streams,
            delivered_enabled: config.enabled,
            delivered_max_members: config.max_room_members,
            settings,
            edus: OnceLock::new(),
        }
    }

    /// Recorded receipts of local users also go to the room's other servers through `edus`.
    pub fn set_edus(&self, edus: Arc<Edus>) {
        let _ = self.edus.set(edus);
    }

    /// Persists receipt writes and hands the public ones of local users to federation.
    async fn persist_receipts(&self, writes: Vec<StreamWrite>) -> Result<()> {
        self.streams.persist(writes.clone()).await?;
        let Some(edus) = self.edus.get() else { return Ok(()) };
        for write in &writes {
            let StreamWrite::Receipt(receipt) = write else { continue };
            edus.receipt(OutgoingReceipt {
                room_id: &receipt.room_id,
                receipt_type: &receipt.receipt_type,
                user_id: &receipt.user_id,
                thread_id: &receipt.thread_id,
                event_id: &receipt.event_id,
                ts: receipt.ts,
            })
            .await;
        }
        Ok(())
    }

    /// A receipt from the user's server, in an `m.receipt` EDU (the caller checked that the user
    /// belongs to that server and that the server may speak in the room). Recorded as a local
    /// user's would be: only `m.read` and, while delivered receipts are on here,
    /// `org.hearth.delivered`; only for an event we have in the room; only forward.
    pub async fn receive_remote(
        &self,
        room_id: &RoomId,
        receipt_type: &str,
        user: &UserId,
        event_id: &EventId,
        thread_id: Option<&str>,
        ts: i64,
    ) -> Result<()> {
        let accepted = receipt_type == READ || (receipt_type == DELIVERED && self.delivered_enabled);
        if !accepted || self.streams.members(room_id, "join").iter().all(|member| member != user) {
            tracing::debug!(%room_id, %user, %receipt_type, "ignored a remote receipt");
            return Ok(());
        }
        let Some(event) = self.rooms.timeline_event(event_id).await?.filter(|event| event.pdu.room_id == room_id)
        else {
            tracing::debug!(%room_id, %user, %event_id, "ignored a remote receipt for an event we do not have");
            return Ok(());
        };
        let thread_id = match thread_id {
            None => String::new(),
            Some("main") => "main".to_owned(),
            Some(root) => match EventId::parse(root) {
                Ok(root) => root.to_string(),
                Err(_) => return Ok(()),
            },
        };
        if let Some(current) = self.rooms.db.receipt(room_id, receipt_type, user, &thread_id).await?
            && current.event_pos >= event.stream_pos
        {
            return Ok(());
        }
        self.streams
            .persist(vec![StreamWrite::Receipt(ReceiptWrite {
                room_id: room_id.to_owned(),
                receipt_type: receipt_type.to_owned(),
                user_id: user.to_owned(),
                thread_id,
                event_id: event_id.to_owned(),
                event_pos: event.stream_pos,
                // The sender's clock, as for a local receipt; not later than ours.
                ts: ts.min(now_ms()),
                wake_only: (receipt_type == DELIVERED).then(|| vec![event.pdu.sender.clone()]),
            })])
            .await?;
        Ok(())
    }

    /// The most joined members a room may have to record delivered receipts, when they are on.
    pub fn delivered_room_limit(&self) -> Option<u64> {
        self.delivered_enabled.then_some(self.delivered_max_members)
    }

    /// Whether the room is small enough to record delivered receipts in.
    fn delivered_recorded_in(&self, room_id: &RoomId) -> bool {
        self.streams.member_counts(room_id).0 <= self.delivered_max_members
    }

    /// Whether `user` records and shows delivered receipts (on unless they turned it off).
    pub async fn delivered_enabled_for(&self, user: &UserId) -> Result<bool> {
        if !self.delivered_enabled {
            return Ok(false);
        }
        // Cached per user, valid while their account data has not changed since.
        let position = self.streams.account_data_pos(user);
        if let Some((cached_at, enabled)) = self.settings.lock().get(user)
            && *cached_at == position
        {
            return Ok(*enabled);
        }
        let setting = self.rooms.db.account_data(user, None, DELIVERED_SETTING).await?;
        let enabled = setting
            .and_then(|json| serde_json::from_str::<serde_json::Value>(&json).ok())
            .is_none_or(|value| value.get("enabled") != Some(&serde_json::Value::Bool(false)));
        self.settings.lock().put(user.to_owned(), (position, enabled));
        Ok(enabled)
    }

    /// Records that `user` received `delivered`: per room and thread, a delivered receipt at the
    /// latest event, moving forward only.
    pub async fn record_delivered(&self, user: &UserId, delivered: &[Delivered]) -> Result<()> {
        if delivered.is_empty() || !self.delivered_enabled_for(user).await? {
            return Ok(());
        }
        let mut latest: HashMap<(&RoomId, &str), &Delivered> = HashMap::new();
        for item in delivered {
            let entry = latest.entry((&item.room_id, item.thread.as_str())).or_insert(item);
            if item.stream_pos > entry.stream_pos {
                *entry = item;
            }
        }
        let mut writes = Vec::new();
        for ((room_id, thread), item) in latest {
            if self.streams.delivered_pos(user, room_id, thread) >= item.stream_pos
                || !self.delivered_recorded_in(room_id)
            {
                continue;
            }
            writes.push(StreamWrite::Receipt(ReceiptWrite {
                room_id: room_id.to_owned(),
                receipt_type: DELIVERED.to_owned(),
                user_id: user.to_owned(),
                thread_id: thread.to_owned(),
                event_id: item.event_id.clone(),
                event_pos: item.stream_pos,
                ts: now_ms(),
                wake_only: Some(vec![item.sender.clone(), user.to_owned()]),
            }));
        }
        if !writes.is_empty() {
            self.persist_receipts(writes).await?;
        }
        Ok(())
    }

    /// `POST /rooms/{roomId}/receipt/{receiptType}/{eventId}`. Receipts only move forward: one
    /// for an event before the user's current receipt is accepted and ignored.
    pub async fn post(
        &self,
        user: &UserId,
        room_id: &RoomId,
        receipt_type: &str,
        event_id: &EventId,
        thread_id: Option<&str>,
    ) -> Result<()> {
        if self.streams.membership(user, room_id).as_deref() != Some("join") {
            return Err(Error::forbidden("You are not in this room"));
        }
        let event = self.rooms.visible_event(user, room_id, event_id).await?;
        if receipt_type == FULLY_READ {
            if thread_id.is_some() {
                return Err(Error::InvalidParam("m.fully_read cannot be threaded".to_owned()));
            }
            let content = json!({"event_id": event_id.as_str()}).to_string();
            self.streams
                .persist(vec![StreamWrite::AccountData {
                    user_id: user.to_owned(),
                    room_id: Some(room_id.to_owned()),
                    data_type: FULLY_READ.to_owned(),
                    content,
                }])
                .await?;
            return Ok(());
        }
        if !matches!(receipt_type, READ | READ_PRIVATE | DELIVERED) {
            return Err(Error::InvalidParam(format!("unknown receipt type {receipt_type}")));
        }
        if receipt_type == DELIVERED
            && (!self.delivered_enabled_for(user).await? || !self.delivered_recorded_in(room_id))
        {
            // Turned off, or a room too big: accepted, and nothing recorded (as the spec page says).
            return Ok(());
        }
        let thread_id = match thread_id {
            None => String::new(),
            Some("main") => "main".to_owned(),
            Some(root) => EventId::parse(root)
                .map_err(|_| Error::InvalidParam("thread_id must be \"main\" or an event ID".to_owned()))?
                .to_string(),
        };
        if let Some(current) = self.rooms.db.receipt(room_id, receipt_type, user, &thread_id).await?
            && current.event_pos >= event.stream_pos
        {
            return Ok(());
        }
        self.persist_receipts(vec![StreamWrite::Receipt(ReceiptWrite {
            room_id: room_id.to_owned(),
            receipt_type: receipt_type.to_owned(),
            user_id: user.to_owned(),
            thread_id,
            event_id: event_id.to_owned(),
            event_pos: event.stream_pos,
            ts: now_ms(),
            wake_only: (receipt_type == DELIVERED).then(|| vec![event.pdu.sender.clone(), user.to_owned()]),
        })])
        .await?;
        Ok(())
    }

    /// `POST /rooms/{roomId}/read_markers`.
    pub async fn read_markers(
        &self,
        user: &UserId,
        room_id: &RoomId,
        fully_read: Option<&EventId>,
        read: Option<&EventId>,
        read_private: Option<&EventId>,
    ) -> Result<()> {
        if let Some(event_id) = fully_read {
            self.post(user, room_id, FULLY_READ, event_id, None).await?;
        }
        if let Some(event_id) = read {
            self.post(user, room_id, READ, event_id, None).await?;
        }
        if let Some(event_id) = read_private {
            self.post(user, room_id, READ_PRIVATE, event_id, None).await?;
        }
        Ok(())
    }
}
