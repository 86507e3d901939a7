//! Event filters (Client-Server API "Filtering"): stored filter definitions and matching.
//! Type patterns accept `*` as a wildcard, as the spec allows.

use ruma::{
    RoomId, UserId,
    api::client::filter::{Filter, FilterDefinition, LazyLoadOptions, RoomEventFilter, UrlFilter},
};

use crate::{
    error::{Error, Result},
    matrix::pdu::Pdu,
    storage::Db,
};

/// `*` matches any run of characters.
pub fn type_matches(pattern: &str, event_type: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == event_type,
        Some((prefix, rest)) => {
            if !event_type.starts_with(prefix) {
                return false;
            }
            let remainder = &event_type[prefix.len()..];
            if rest.is_empty() {
                return true;
            }
            (0..=remainder.len()).any(|i| remainder.is_char_boundary(i) && type_matches(rest, &remainder[i..]))
        }
    }
}

fn types_allow(types: Option<&[String]>, not_types: &[String], event_type: &str) -> bool {
    if not_types.iter().any(|pattern| type_matches(pattern, event_type)) {
        return false;
    }
    types.is_none_or(|types| types.iter().any(|pattern| type_matches(pattern, event_type)))
}

/// Whether a room event passes a `RoomEventFilter` (types, senders, `contains_url`).
pub fn room_event_matches(filter: &RoomEventFilter, pdu: &Pdu) -> bool {
    let event_type = pdu.event_type.to_string();
    if !types_allow(filter.types.as_deref(), &filter.not_types, &event_type) {
        return false;
    }
    if filter.not_senders.contains(&pdu.sender) {
        return false;
    }
    if filter.senders.as_ref().is_some_and(|senders| !senders.contains(&pdu.sender)) {
        return false;
    }
    match filter.url_filter {
        Some(UrlFilter::EventsWithUrl) => pdu.content_value().get("url").is_some(),
        Some(UrlFilter::EventsWithoutUrl) => pdu.content_value().get("url").is_none(),
        _ => true,
    }
}

/// Whether a non-room event (account data, presence) of `event_type` from `sender` passes.
pub fn event_matches(filter: &Filter, event_type: &str, sender: Option<&UserId>) -> bool {
    if !types_allow(filter.types.as_deref(), &filter.not_types, event_type) {
        return false;
    }
    match sender {
        Some(sender) => {
            !filter.not_senders.iter().any(|s| s == sender)
                && filter.senders.as_ref().is_none_or(|senders| senders.iter().any(|s| s == sender))
        }
        None => true,
    }
}

/// Whether a room passes the `rooms`/`not_rooms` of a room filter section.
pub fn room_allowed(rooms: Option<&[ruma::OwnedRoomId]>, not_rooms: &[ruma::OwnedRoomId], room_id: &RoomId) -> bool {
    !not_rooms.iter().any(|r| r == room_id) && rooms.is_none_or(|rooms| rooms.iter().any(|r| r == room_id))
}

pub fn lazy_loading(filter: &RoomEventFilter) -> bool {
    matches!(filter.lazy_load_options, LazyLoadOptions::Enabled { .. })
}

/// Parses the `filter` query parameter of `/sync` and `/messages`: a filter ID or inline JSON.
pub async fn resolve_sync_filter(db: &Db, user_id: &UserId, filter: &str) -> Result<FilterDefinition> {
    if filter.trim_start().starts_with('{') {
        return serde_json::from_str(filter).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => Error::BadJson(format!("invalid filter: {e}")),
            _ => Error::NotJson(format!("invalid filter: {e}")),
        });
    }
    let id: i64 = filter.parse().map_err(|_| Error::InvalidParam(format!("invalid filter ID: {filter}")))?;
    let json = db.filter(user_id, id).await?.ok_or_else(|| Error::not_found("Unknown filter"))?;
    serde_json::from_str(&json).map_err(|e| Error::Internal(format!("stored filter is invalid: {e}")))
}

/// Stores a filter and returns its ID.
pub async fn create_filter(db: &Db, user_id: &UserId, filter: &FilterDefinition) -> Result<String> {
    let json = serde_json::to_string(filter).map_err(|e| Error::BadJson(e.to_string()))?;
    Ok(db.create_filter(user_id, &json).await?.to_string())
}

pub async fn get_filter(db: &Db, user_id: &UserId, filter_id: &str) -> Result<FilterDefinition> {
    let id: i64 = filter_id.parse().map_err(|_| Error::not_found("Unknown filter"))?;
    let json = db.filter(user_id, id).await?.ok_or_else(|| Error::not_found("Unknown filter"))?;
    serde_json::from_str(&json).map_err(|e| Error::Internal(format!("stored filter is invalid: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_like_the_spec_says() {
        assert!(type_matches("m.room.message", "m.room.message"));
        assert!(type_matches("m.room.*", "m.room.message"));
        assert!(type_matches("*", "anything"));
        assert!(type_matches("m.*.message", "m.room.message"));
        assert!(!type_matches("m.room.*", "m.reaction"));
        assert!(!type_matches("m.room.message", "m.room.messages"));
    }
}
