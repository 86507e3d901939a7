//! PDUs: building, hashing and signing new room events, and reading stored ones.
//!
//! Every room event — local or (later) received over federation — is a PDU: it points at its
//! `prev_events` and `auth_events`, carries a content hash and the origin server's signature, and
//! (room versions 4+) its event ID is the reference hash of its redacted form. In room version 12
//! the create event has no `room_id`; the room ID is derived from the create event's reference hash.

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, EventId, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId,
    OwnedUserId, RoomId, ServerName, UInt, UserId,
    events::TimelineEventType,
    room_version_rules::RoomVersionRules,
    signatures::{PublicKeyMap, PublicKeySet, Verified},
};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::matrix::keys::SigningKey;

/// Largest PDU in bytes (Client-Server API "Size limits").
pub const MAX_PDU_BYTES: usize = 65_536;

/// A room event as stored and exchanged between servers.
#[derive(Debug, Clone)]
pub struct Pdu {
    pub event_id: OwnedEventId,
    pub room_id: OwnedRoomId,
    pub sender: OwnedUserId,
    pub event_type: TimelineEventType,
    pub state_key: Option<String>,
    pub content: Box<RawValue>,
    pub prev_events: Vec<OwnedEventId>,
    pub auth_events: Vec<OwnedEventId>,
    pub depth: u64,
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
    /// The event a redaction redacts (top-level in room v10, inside `content` from v11).
    pub redacts: Option<OwnedEventId>,
    /// The PDU as canonical JSON text.
    pub json: String,
    /// Whether the JSON carries `room_id` (a v12 create event does not).
    pub has_room_id: bool,
    /// Whether the event was rejected by the checks on receipt (ruma's auth rules then refuse
    /// events that cite it).
    pub rejected: bool,
}

/// What a new event says, before it is placed in the DAG.
#[derive(Debug, Clone)]
pub struct EventTemplate {
    pub event_type: String,
    pub state_key: Option<String>,
    pub content: CanonicalJsonObject,
    pub redacts: Option<OwnedEventId>,
}

/// Where a new event goes in its room.
pub struct Placement<'a> {
    /// `None` only for the create event of a room version that derives the room ID from it.
    pub room_id: Option<&'a RoomId>,
    pub sender: &'a UserId,
    pub prev_events: &'a [OwnedEventId],
    pub auth_events: &'a [OwnedEventId],
    pub depth: u64,
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("event is larger than {MAX_PDU_BYTES} bytes")]
    TooLarge,
    #[error("invalid event: {0}")]
    Invalid(String),
}

#[derive(Deserialize)]
struct StoredFields {
    #[serde(rename = "type")]
    event_type: String,
    sender: OwnedUserId,
    #[serde(default)]
    state_key: Option<String>,
    content: Box<RawValue>,
    #[serde(default)]
    prev_events: Vec<OwnedEventId>,
    #[serde(default)]
    auth_events: Vec<OwnedEventId>,
    depth: UInt,
    origin_server_ts: MilliSecondsSinceUnixEpoch,
    #[serde(default)]
    redacts: Option<OwnedEventId>,
    #[serde(default)]
    room_id: Option<OwnedRoomId>,
}

#[derive(Deserialize)]
struct ContentRedacts {
    #[serde(default)]
    redacts: Option<OwnedEventId>,
}

impl Pdu {
    /// Builds, hashes and signs a new event, computing its event ID (and, for a v12 create event,
    /// the room ID).
    pub fn build(
        template: EventTemplate,
        placement: &Placement<'_>,
        rules: &RoomVersionRules,
        server_name: &ServerName,
        key: &SigningKey,
    ) -> Result<Pdu, BuildError> {
        use CanonicalJsonValue as V;
        let ids = |ids: &[OwnedEventId]| V::Array(ids.iter().map(|id| V::String(id.to_string())).collect());
        let mut content = template.content;
        let mut object = CanonicalJsonObject::new();
        if let Some(redacts) = &template.redacts {
            if rules.redaction.content_field_redacts {
                content.insert("redacts".into(), V::String(redacts.to_string()));
            } else {
                object.insert("redacts".into(), V::String(redacts.to_string()));
            }
        }
        object.insert("auth_events".into(), ids(placement.auth_events));
        object.insert("content".into(), V::Object(content));
        object.insert("depth".into(), V::Integer(ruma::Int::try_from(placement.depth).unwrap_or(ruma::Int::MAX)));
        object.insert("origin_server_ts".into(), V::Integer(placement.origin_server_ts.0.into()));
        object.insert("prev_events".into(), ids(placement.prev_events));
        if let Some(room_id) = placement.room_id {
            object.insert("room_id".into(), V::String(room_id.to_string()));
        }
        object.insert("sender".into(), V::String(placement.sender.to_string()));
        if let Some(state_key) = &template.state_key {
            object.insert("state_key".into(), V::String(state_key.clone()));
        }
        object.insert("type".into(), V::String(template.event_type));

        ruma::signatures::hash_and_sign_event(server_name.as_str(), key.key_pair(), &mut object, &rules.redaction)
            .map_err(|err| match err {
                ruma::signatures::JsonError::PduTooLarge => BuildError::TooLarge,
                other => BuildError::Invalid(other.to_string()),
            })?;
        let json = serde_json::to_string(&object).expect("canonical JSON serialises");
        if json.len() > MAX_PDU_BYTES {
            return Err(BuildError::TooLarge);
        }
        let hash = ruma::signatures::reference_hash(&object, rules).map_err(|err| match err {
            ruma::signatures::JsonError::PduTooLarge => BuildError::TooLarge,
            other => BuildError::Invalid(other.to_string()),
        })?;
        let event_id = EventId::parse(format!("${hash}")).map_err(|err| BuildError::Invalid(err.to_string()))?;
        let room_id = match placement.room_id {
            Some(room_id) => room_id.to_owned(),
            None => RoomId::parse(format!("!{hash}")).map_err(|err| BuildError::Invalid(err.to_string()))?,
        };
        let pdu = Pdu::from_json(json, room_id, event_id).map_err(BuildError::Invalid)?;
        // The checks every server applies on receipt, applied to what we send too: an event
        // others would drop (a 256-byte type, say) is refused here rather than sent.
        check_format_of_size(&object, pdu.json.len(), rules).map_err(|err| match err {
            FormatError::TooLarge => BuildError::TooLarge,
            FormatError::Invalid(why) => BuildError::Invalid(why),
        })?;
        Ok(pdu)
    }

    /// Reads a stored PDU. The room and event IDs are not (always) in the JSON, so the caller
    /// supplies them.
    pub fn from_json(json: String, room_id: OwnedRoomId, event_id: OwnedEventId) -> Result<Pdu, String> {
        let fields: StoredFields = serde_json::from_str(&json).map_err(|err| format!("malformed PDU: {err}"))?;
        let event_type = TimelineEventType::from(fields.event_type);
        let redacts = match fields.redacts {
            Some(redacts) => Some(redacts),
            None if event_type == TimelineEventType::RoomRedaction => {
                serde_json::from_str::<ContentRedacts>(fields.content.get()).ok().and_then(|c| c.redacts)
            }
            None => None,
        };
        Ok(Pdu {
            has_room_id: fields.room_id.is_some(),
            event_id,
            room_id,
            sender: fields.sender,
            event_type,
            state_key: fields.state_key,
            content: fields.content,
            prev_events: fields.prev_events,
            auth_events: fields.auth_events,
            depth: fields.depth.into(),
            origin_server_ts: fields.origin_server_ts,
            redacts,
            json,
            rejected: false,
        })
    }

    /// Reads a PDU received from another server: computes its event ID (the reference hash) and
    /// takes the room ID from the JSON, or for a v12 create event from its own hash. The format
    /// checks ([`check_format`]) come first.
    pub fn from_received(object: &CanonicalJsonObject, rules: &RoomVersionRules) -> Result<Pdu, String> {
        let hash = ruma::signatures::reference_hash(object, rules).map_err(|err| err.to_string())?;
        let event_id = EventId::parse(format!("${hash}")).map_err(|err| err.to_string())?;
        let room_id = match object.get("room_id") {
            Some(CanonicalJsonValue::String(room_id)) => RoomId::parse(room_id).map_err(|err| err.to_string())?,
            Some(_) => return Err("`room_id` is not a string".to_owned()),
            None => RoomId::parse(format!("!{hash}")).map_err(|err| err.to_string())?,
        };
        let json = serde_json::to_string(object).map_err(|err| err.to_string())?;
        Pdu::from_json(json, room_id, event_id)
    }

    pub fn is_state(&self) -> bool {
        self.state_key.is_some()
    }

    /// The PDU as a canonical JSON object.
    pub fn canonical_object(&self) -> CanonicalJsonObject {
        serde_json::from_str(&self.json).expect("stored PDUs are canonical JSON objects")
    }

    /// Content as a JSON value.
    pub fn content_value(&self) -> serde_json::Value {
        serde_json::from_str(self.content.get()).unwrap_or_default()
    }

    /// The redacted form of this PDU (redaction algorithm of the room version).
    pub fn redacted(&self, rules: &RoomVersionRules) -> Result<Pdu, String> {
        let redacted = ruma::canonical_json::redact(self.canonical_object(), &rules.redaction, None)
            .map_err(|err| err.to_string())?;
        let json = serde_json::to_string(&redacted).expect("canonical JSON serialises");
        Pdu::from_json(json, self.room_id.clone(), self.event_id.clone())
    }

    /// Checks the signature of `server_name` with `public_key_base64` and the content hash.
    /// `Ok(true)` means signature and hash both hold; `Ok(false)` means the signature holds but
    /// the content was redacted since.
    pub fn verify(
        &self,
        server_name: &ServerName,
        key_id: &str,
        public_key_base64: &str,
        rules: &RoomVersionRules,
    ) -> Result<bool, String> {
        let mut keys = PublicKeySet::new();
        keys.insert(key_id.to_owned(), ruma::serde::Base64::parse(public_key_base64).map_err(|e| e.to_string())?);
        let mut key_map = PublicKeyMap::new();
        key_map.insert(server_name.to_string(), keys);
        match ruma::signatures::verify_event(&key_map, &self.canonical_object(), rules) {
            Ok(Verified::All) => Ok(true),
            Ok(Verified::Signatures) => Ok(false),
            Err(err) => Err(err.to_string()),
        }
    }

    /// Recomputes the event ID from the reference hash.
    pub fn recomputed_event_id(&self, rules: &RoomVersionRules) -> Result<OwnedEventId, String> {
        let hash = ruma::signatures::reference_hash(&self.canonical_object(), rules).map_err(|e| e.to_string())?;
        EventId::parse(format!("${hash}")).map_err(|e| e.to_string())
    }
}

impl ruma::state_res::Event for Pdu {
    type Id = OwnedEventId;

    fn event_id(&self) -> &Self::Id {
        &self.event_id
    }

    fn room_id(&self) -> Option<&RoomId> {
        self.has_room_id.then_some(&*self.room_id)
    }

    fn sender(&self) -> &UserId {
        &self.sender
    }

    fn origin_server_ts(&self) -> MilliSecondsSinceUnixEpoch {
        self.origin_server_ts
    }

    fn event_type(&self) -> &TimelineEventType {
        &self.event_type
    }

    fn content(&self) -> &RawValue {
        &self.content
    }

    fn state_key(&self) -> Option<&str> {
        self.state_key.as_deref()
    }

    fn prev_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.prev_events.iter())
    }

    fn auth_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.auth_events.iter())
    }

    fn redacts(&self) -> Option<&Self::Id> {
        self.redacts.as_ref()
    }

    fn rejected(&self) -> bool {
        self.rejected
    }
}

/// Why a PDU fails the format checks.
#[derive(Debug, PartialEq, Eq)]
pub enum FormatError {
    TooLarge,
    Invalid(String),
}

/// Adds `server_name`'s signature to another server's event, leaving its hashes and other
/// signatures as they are: the authorising server's signature on a restricted join. Signatures
/// cover the redacted form, so that is what is signed (ruma's `hash_and_sign_event` would also
/// recompute the content hash, which is not ours to set).
pub fn co_sign(
    object: &mut CanonicalJsonObject,
    rules: &RoomVersionRules,
    server_name: &ServerName,
    key: &SigningKey,
) -> Result<(), String> {
    let mut redacted =
        ruma::canonical_json::redact(object.clone(), &rules.redaction, None).map_err(|err| err.to_string())?;
    ruma::signatures::sign_json(server_name.as_str(), key.key_pair(), &mut redacted).map_err(|err| err.to_string())?;
    match redacted.remove("signatures") {
        Some(signatures) => {
            object.insert("signatures".to_owned(), signatures);
            Ok(())
        }
        None => Err("signing left no signatures".to_owned()),
    }
}

/// The format checks of a PDU (Server-Server API, "Checks performed on receipt of a PDU", step
/// 1): ruma's `check_pdu_format` for the room version (field presence and types, 255-byte IDs,
/// type and state key, at most 20 `prev_events` and 10 `auth_events`), and the size limit of
/// 65,536 bytes (ruma's own bound is one byte tighter, so the size is judged here first).
pub fn check_format(object: &CanonicalJsonObject, rules: &RoomVersionRules) -> Result<(), FormatError> {
    let size = serde_json::to_string(object).map_err(|err| FormatError::Invalid(err.to_string()))?.len();
    check_format_of_size(object, size, rules)
}

/// [`check_format`] for an object whose serialised size is already known.
fn check_format_of_size(
    object: &CanonicalJsonObject,
    size: usize,
    rules: &RoomVersionRules,
) -> Result<(), FormatError> {
    if size > MAX_PDU_BYTES {
        return Err(FormatError::TooLarge);
    }
    if size == MAX_PDU_BYTES {
        // Within the spec's limit; ruma would refuse it on size alone, so check the rest on a
        // copy without its signatures (they do not affect the other checks).
        let mut trimmed = object.clone();
        trimmed.remove("signatures");
        return ruma::state_res::check_pdu_format(&trimmed, &rules.event_format).map_err(FormatError::Invalid);
    }
    ruma::state_res::check_pdu_format(object, &rules.event_format).map_err(FormatError::Invalid)
}

/// Turns client-supplied JSON content into canonical JSON, refusing what canonical JSON cannot
/// carry (floats, integers beyond ±2^53).
pub fn canonical_content(value: serde_json::Value) -> Result<CanonicalJsonObject, String> {
    match CanonicalJsonValue::try_from(value) {
        Ok(CanonicalJsonValue::Object(object)) => Ok(object),
        Ok(_) => Err("content must be a JSON object".to_owned()),
        Err(err) => Err(format!("content is not valid canonical JSON: {err}")),
    }
}

#[cfg(test)]
mod tests {
    use ruma::{RoomVersionId, server_name};
    use serde_json::json;

    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_file(&SigningKey::generate_file()).unwrap()
    }

    fn template(event_type: &str, state_key: Option<&str>, content: serde_json::Value) -> EventTemplate {
        EventTemplate {
            event_type: event_type.to_owned(),
            state_key: state_key.map(str::to_owned),
            content: canonical_content(content).unwrap(),
            redacts: None,
        }
    }

    #[test]
    fn v12_create_event_derives_the_room_id_and_everything_verifies() {
        let key = key();
        let rules = RoomVersionId::V12.rules().unwrap();
        let sender = ruma::user_id!("@alice:example.org");
        let placement = Placement {
            room_id: None,
            sender,
            prev_events: &[],
            auth_events: &[],
            depth: 1,
            origin_server_ts: MilliSecondsSinceUnixEpoch(UInt::new(1_700_000_000_000).unwrap()),
        };
        let create = Pdu::build(
            template("m.room.create", Some(""), json!({"room_version": "12"})),
            &placement,
            &rules,
            server_name!("example.org"),
            &key,
        )
        .unwrap();
        assert_eq!(create.room_id.as_str(), format!("!{}", &create.event_id.as_str()[1..]));
        assert!(!create.json.contains("room_id"));
        assert_eq!(create.recomputed_event_id(&rules).unwrap(), create.event_id);
        assert!(create.verify(server_name!("example.org"), &key.key_id(), &key.public_key_base64(), &rules).unwrap());

        let message = Pdu::build(
            template("m.room.message", None, json!({"body": "hi 👋", "msgtype": "m.text"})),
            &Placement {
                room_id: Some(&create.room_id),
                prev_events: std::slice::from_ref(&create.event_id),
                depth: 2,
                ..placement
            },
            &rules,
            server_name!("example.org"),
            &key,
        )
        .unwrap();
        assert_eq!(message.room_id, create.room_id);
        assert_eq!(message.recomputed_event_id(&rules).unwrap(), message.event_id);
        assert!(message.verify(server_name!("example.org"), &key.key_id(), &key.public_key_base64(), &rules).unwrap());
        let redacted = message.redacted(&rules).unwrap();
        assert_eq!(redacted.content.get(), "{}");
        assert_eq!(redacted.recomputed_event_id(&rules).unwrap(), message.event_id, "redaction keeps the event ID");
        assert!(
            !redacted.verify(server_name!("example.org"), &key.key_id(), &key.public_key_base64(), &rules).unwrap()
        );
    }

    #[test]
    fn redacts_goes_to_content_from_v11() {
        let key = key();
        let sender = ruma::user_id!("@alice:example.org");
        let room = ruma::room_id!("!room:example.org");
        let target = ruma::owned_event_id!("$target");
        for (version, in_content) in [(RoomVersionId::V10, false), (RoomVersionId::V11, true)] {
            let rules = version.rules().unwrap();
            let mut t = template("m.room.redaction", None, json!({}));
            t.redacts = Some(target.clone());
            let placement = Placement {
                room_id: Some(room),
                sender,
                prev_events: &[],
                auth_events: &[],
                depth: 3,
                origin_server_ts: MilliSecondsSinceUnixEpoch(UInt::new(1).unwrap()),
            };
            let pdu = Pdu::build(t, &placement, &rules, server_name!("example.org"), &key).unwrap();
            assert_eq!(pdu.redacts.as_ref(), Some(&target));
            assert_eq!(pdu.content_value().get("redacts").is_some(), in_content, "{version}");
        }
    }

    #[test]
    fn oversized_and_float_content_are_refused() {
        assert!(canonical_content(json!({"x": 1.5})).is_err());
        assert!(canonical_content(json!([1])).is_err());
        let key = key();
        let rules = RoomVersionId::V11.rules().unwrap();
        let placement = Placement {
            room_id: Some(ruma::room_id!("!room:example.org")),
            sender: ruma::user_id!("@alice:example.org"),
            prev_events: &[],
            auth_events: &[],
            depth: 1,
            origin_server_ts: MilliSecondsSinceUnixEpoch(UInt::new(1).unwrap()),
        };
        let long_type = template(&"t".repeat(256), None, json!({}));
        assert!(
            matches!(
                Pdu::build(long_type, &placement, &rules, server_name!("example.org"), &key),
                Err(BuildError::Invalid(why)) if why.contains("type")
            ),
            "the receipt checks' 255-byte limit applies to our own events"
        );
        let big = template("m.room.message", None, json!({"body": "x".repeat(70_000)}));
        assert!(matches!(
            Pdu::build(big, &placement, &rules, server_name!("example.org"), &key),
            Err(BuildError::TooLarge)
        ));
    }
}
