//! Receipts (`m.read`, `m.read.private`, threaded) and read markers (`m.fully_read`).

use std::sync::Arc;

use ruma::{EventId, RoomId, UserId};
use serde_json::json;

use crate::{
    error::{Error, Result},
    service::{now_ms, rooms::Rooms, stream::Streams},
    storage::stream::{ReceiptWrite, StreamWrite},
};

pub const READ: &str = "m.read";
pub const READ_PRIVATE: &str = "m.read.private";
pub const FULLY_READ: &str = "m.fully_read";

pub struct Receipts {
    rooms: Arc<Rooms>,
    streams: Arc<Streams>,
}

impl Receipts {
    pub fn new(rooms: Arc<Rooms>, streams: Arc<Streams>) -> Receipts {
        Receipts { rooms, streams }
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
        if !matches!(receipt_type, READ | READ_PRIVATE) {
            return Err(Error::InvalidParam(format!("unknown receipt type {receipt_type}")));
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
        self.streams
            .persist(vec![StreamWrite::Receipt(ReceiptWrite {
                room_id: room_id.to_owned(),
                receipt_type: receipt_type.to_owned(),
                user_id: user.to_owned(),
                thread_id,
                event_id: event_id.to_owned(),
                event_pos: event.stream_pos,
                ts: now_ms(),
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
