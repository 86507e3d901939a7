//! Sending: message events (idempotent per device transaction ID), state events and redactions.

use std::sync::Arc;

use ruma::{EventId, OwnedEventId, RoomAliasId, RoomId, UserId};
use serde_json::{Value, json};

use super::{NewEvent, Rooms, StoredEvent};
use crate::{
    error::{Error, Result},
    matrix::pdu::canonical_content,
};

/// Who is sending: the user and, for client requests, the device and transaction ID.
pub struct Sender<'a> {
    pub user_id: &'a UserId,
    pub device_id: Option<&'a str>,
    pub txn_id: Option<&'a str>,
}

impl Rooms {
    /// The event this device already sent into the room with this transaction ID, if any: a
    /// retry is answered with it, and costs nothing from the sender's rate limit.
    pub async fn sent_with_txn(
        &self,
        user_id: &UserId,
        device_id: &str,
        room_id: &RoomId,
        txn_id: &str,
    ) -> Result<Option<OwnedEventId>> {
        Ok(self.db.txn_event(user_id, device_id, room_id, txn_id).await?)
    }

    /// `PUT /rooms/{roomId}/send/{eventType}/{txnId}`.
    pub async fn send_message(
        &self,
        sender: &Sender<'_>,
        room_id: &RoomId,
        event_type: &str,
        content: Value,
    ) -> Result<Arc<StoredEvent>> {
        if event_type == "m.room.create" {
            return Err(Error::forbidden("m.room.create cannot be sent into an existing room"));
        }
        let handle = self.handle(room_id).await?;
        let mut template = NewEvent::new(sender.user_id, event_type, None, content)?;
        if event_type == "m.reaction" {
            self.check_annotation(sender.user_id, &template.template.content).await?;
        }
        if event_type == "m.room.redaction" {
            let target = template
                .template
                .content
                .get("redacts")
                .and_then(|v| match v {
                    ruma::CanonicalJsonValue::String(s) => EventId::parse(s).ok(),
                    _ => None,
                })
                .ok_or_else(|| Error::BadJson("a redaction needs content.redacts".to_owned()))?;
            self.check_redaction(sender.user_id, &handle, &target).await?;
            template.template.content.remove("redacts");
            template.template.redacts = Some(target);
        }
        if let (Some(device), Some(txn)) = (sender.device_id, sender.txn_id) {
            template.txn = Some((device.to_owned(), txn.to_owned()));
        }
        self.append_message(&handle, template).await
    }

    /// Refuses a second identical reaction (Synapse's `M_DUPLICATE_ANNOTATION`).
    async fn check_annotation(&self, sender: &UserId, content: &ruma::CanonicalJsonObject) -> Result<()> {
        let Some(ruma::CanonicalJsonValue::Object(relates_to)) = content.get("m.relates_to") else { return Ok(()) };
        let field = |name: &str| match relates_to.get(name) {
            Some(ruma::CanonicalJsonValue::String(s)) => Some(s.as_str()),
            _ => None,
        };
        if field("rel_type") != Some("m.annotation") {
            return Ok(());
        }
        if let (Some(event_id), Some(key)) = (field("event_id").and_then(|id| EventId::parse(id).ok()), field("key"))
            && self.db.annotation_exists(&event_id, sender, key).await?
        {
            return Err(Error::DuplicateAnnotation);
        }
        Ok(())
    }

    /// `PUT /rooms/{roomId}/state/{eventType}/{stateKey}`. Sending the same content again returns
    /// the existing event instead of storing a duplicate (as Synapse does).
    pub async fn send_state(
        &self,
        sender: &UserId,
        room_id: &RoomId,
        event_type: &str,
        state_key: &str,
        content: Value,
        txn: Option<(&str, &str)>,
    ) -> Result<Arc<StoredEvent>> {
        if event_type == "m.room.create" {
            return Err(Error::forbidden("m.room.create cannot be sent into an existing room"));
        }
        let handle = self.handle(room_id).await?;
        if event_type == "m.room.canonical_alias" {
            self.check_canonical_alias(room_id, &content).await?;
        }
        let canonical = canonical_content(content.clone()).map_err(Error::BadJson)?;
        if let Some(current) = self.current_state_event(room_id, event_type, state_key).await?
            && current.pdu.sender == sender
            && serde_json::from_str::<ruma::CanonicalJsonObject>(current.pdu.content.get()).ok().as_ref()
                == Some(&canonical)
        {
            return Ok(current);
        }
        let mut event = NewEvent::new(sender, event_type, Some(state_key), content)?;
        event.txn = txn.map(|(device, txn)| (device.to_owned(), txn.to_owned()));
        let mut events = self.append(&handle, vec![event], None).await?;
        Ok(events.remove(0))
    }

    /// The aliases a canonical-alias event names must exist here and point at this room.
    async fn check_canonical_alias(&self, room_id: &RoomId, content: &Value) -> Result<()> {
        let mut aliases = Vec::new();
        match content.get("alias") {
            None | Some(Value::Null) => {}
            Some(Value::String(alias)) => aliases.push(alias.clone()),
            Some(_) => return Err(Error::BadJson("alias must be a string".to_owned())),
        }
        match content.get("alt_aliases") {
            None => {}
            Some(Value::Array(alt)) => {
                for alias in alt {
                    aliases.push(
                        alias
                            .as_str()
                            .ok_or_else(|| Error::BadJson("alt_aliases must be strings".to_owned()))?
                            .to_owned(),
                    );
                }
            }
            Some(_) => return Err(Error::BadJson("alt_aliases must be an array".to_owned())),
        }
        for alias in aliases {
            let parsed =
                RoomAliasId::parse(&alias).map_err(|_| Error::InvalidParam(format!("{alias} is not a room alias")))?;
            if parsed.server_name() != self.server_name {
                continue;
            }
            match self.db.alias(parsed.as_str()).await? {
                Some((target, _)) if target == room_id => {}
                _ => return Err(Error::BadAlias(format!("{alias} does not point to this room"))),
            }
        }
        Ok(())
    }

    /// A redaction is allowed for the event's own sender or a user with the redact level.
    async fn check_redaction(&self, sender: &UserId, handle: &super::RoomHandle, target: &EventId) -> Result<()> {
        let event = self.event(target).await?.filter(|e| e.pdu.room_id == handle.room_id);
        let Some(event) = event else { return Err(Error::not_found("Event not found")) };
        if event.pdu.sender == sender {
            return Ok(());
        }
        let group = self.current_group(&handle.room_id).await?;
        let levels = self.power_levels_at(handle, group).await?;
        if levels.user_level(sender) >= levels.redact() {
            Ok(())
        } else {
            Err(Error::forbidden("You may only redact your own events"))
        }
    }

    /// `PUT /rooms/{roomId}/redact/{eventId}/{txnId}`.
    pub async fn redact(
        &self,
        sender: &Sender<'_>,
        room_id: &RoomId,
        target: &EventId,
        reason: Option<&str>,
    ) -> Result<OwnedEventId> {
        let handle = self.handle(room_id).await?;
        self.check_redaction(sender.user_id, &handle, target).await?;
        let content = match reason {
            Some(reason) => json!({"reason": reason}),
            None => json!({}),
        };
        let mut event = NewEvent::new(sender.user_id, "m.room.redaction", None, content)?;
        event.template.redacts = Some(target.to_owned());
        if let (Some(device), Some(txn)) = (sender.device_id, sender.txn_id) {
            event.txn = Some((device.to_owned(), txn.to_owned()));
        }
        let mut events = self.append(&handle, vec![event], None).await?;
        Ok(events.remove(0).pdu.event_id.clone())
    }
}
