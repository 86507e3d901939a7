//! Serving events to clients: the PDU reshaped into the Client-Server API's event formats.
//!
//! Clients never see PDU-only fields (`auth_events`, `prev_events`, `depth`, `hashes`,
//! `signatures`). The content is copied as raw JSON, never re-parsed, so unknown fields pass
//! through untouched.

use ruma::{EventId, MilliSecondsSinceUnixEpoch, RoomId, UserId};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::matrix::pdu::Pdu;

/// Which event format to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `ClientEvent`: with `room_id` (`/messages`, `/context`, `/event`, `/state`).
    WithRoomId,
    /// `ClientEventWithoutRoomID`: inside `/sync`, where the room is the enclosing key.
    WithoutRoomId,
}

/// Per-request extras in `unsigned`.
#[derive(Debug, Default, Serialize)]
pub struct Unsigned<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub age: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transaction_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prev_content: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replaces_state: Option<&'a EventId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redacted_because: Option<&'a RawValue>,
    #[serde(rename = "m.relations", skip_serializing_if = "Option::is_none")]
    pub relations: Option<&'a RawValue>,
    /// The requesting user's membership at the time of the event (MSC4115, now in the spec).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub membership: Option<&'a str>,
}

impl Unsigned<'_> {
    fn is_empty(&self) -> bool {
        self.age.is_none()
            && self.transaction_id.is_none()
            && self.prev_content.is_none()
            && self.replaces_state.is_none()
            && self.redacted_because.is_none()
            && self.relations.is_none()
            && self.membership.is_none()
    }
}

#[derive(Serialize)]
struct ClientEvent<'a> {
    content: &'a RawValue,
    event_id: &'a EventId,
    origin_server_ts: MilliSecondsSinceUnixEpoch,
    #[serde(skip_serializing_if = "Option::is_none")]
    room_id: Option<&'a RoomId>,
    sender: &'a UserId,
    #[serde(skip_serializing_if = "Option::is_none")]
    state_key: Option<&'a str>,
    #[serde(rename = "type")]
    event_type: String,
    /// Kept at the top level for redactions in every room version: older clients read it there.
    #[serde(skip_serializing_if = "Option::is_none")]
    redacts: Option<&'a EventId>,
    #[serde(skip_serializing_if = "Unsigned::is_empty")]
    unsigned: &'a Unsigned<'a>,
}

/// The event as a client sees it.
pub fn to_client(pdu: &Pdu, format: Format, unsigned: &Unsigned<'_>) -> Box<RawValue> {
    let event = ClientEvent {
        content: &pdu.content,
        event_id: &pdu.event_id,
        origin_server_ts: pdu.origin_server_ts,
        room_id: (format == Format::WithRoomId).then_some(&*pdu.room_id),
        sender: &pdu.sender,
        state_key: pdu.state_key.as_deref(),
        event_type: pdu.event_type.to_string(),
        redacts: pdu.redacts.as_deref(),
        unsigned,
    };
    serde_json::value::to_raw_value(&event).expect("client events serialise")
}

#[derive(Serialize)]
struct StrippedState<'a> {
    content: &'a RawValue,
    sender: &'a UserId,
    state_key: &'a str,
    #[serde(rename = "type")]
    event_type: String,
}

/// A stripped state event, as in `invite_state` and `knock_state`.
pub fn to_stripped(pdu: &Pdu) -> Box<RawValue> {
    let event = StrippedState {
        content: &pdu.content,
        sender: &pdu.sender,
        state_key: pdu.state_key.as_deref().unwrap_or_default(),
        event_type: pdu.event_type.to_string(),
    };
    serde_json::value::to_raw_value(&event).expect("stripped events serialise")
}
