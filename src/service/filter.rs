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

/// The longest type pattern a filter may hold: event types are at most 255 bytes, so longer
/// patterns can only be an attempt to make matching expensive.
pub const MAX_PATTERN_LEN: usize = 512;
/// The most type patterns (`types` and `not_types` over every section) in one filter: every
/// event of a sync is matched against each of them.
pub const MAX_PATTERNS: usize = 256;

/// The spec's wildcard is `*` alone, but wildmatch also has a single-character wildcard; give it a
/// noncharacter that no event type uses, so `?` stays literal.
type TypePattern = wildmatch::WildMatchPattern<'*', '\u{FFFF}'>;

/// `*` matches any run of characters. wildmatch matches in O(pattern × type) time; the
/// recursive matcher it replaces was exponential in the number of `*` (`"*a*a*a*a*a*a*b"`).
pub fn type_matches(pattern: &str, event_type: &str) -> bool {
    if !pattern.contains('*') {
        return pattern == event_type;
    }
    TypePattern::new(pattern).matches(event_type)
}

/// Rejects a filter with too many or too long type patterns (400 `M_INVALID_PARAM`), whether it
/// is uploaded or given inline.
pub fn check_limits(filter: &FilterDefinition) -> Result<()> {
    let room = &filter.room;
    let room_sections = [&room.timeline, &room.state, &room.ephemeral, &room.account_data];
    let other_sections = [&filter.presence, &filter.account_data];
    let patterns = room_sections
        .iter()
        .flat_map(|f| f.types.iter().flatten().chain(&f.not_types))
        .chain(other_sections.iter().flat_map(|f| f.types.iter().flatten().chain(&f.not_types)));
    check_patterns(patterns)
}

/// [`check_limits`] for the `RoomEventFilter` of `/messages` and `/context`.
pub fn check_room_event_limits(filter: &RoomEventFilter) -> Result<()> {
    check_patterns(filter.types.iter().flatten().chain(&filter.not_types))
}

fn check_patterns<'a>(patterns: impl Iterator<Item = &'a String>) -> Result<()> {
    let mut count = 0;
    for pattern in patterns {
        count += 1;
        if count > MAX_PATTERNS {
            return Err(Error::InvalidParam(format!("a filter may hold at most {MAX_PATTERNS} type patterns")));
        }
        if pattern.len() > MAX_PATTERN_LEN {
            return Err(Error::InvalidParam(format!("type patterns may be at most {MAX_PATTERN_LEN} bytes")));
        }
    }
    Ok(())
}

pub fn types_allow(types: Option<&[String]>, not_types: &[String], event_type: &str) -> bool {
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
        let definition = serde_json::from_str(filter).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => Error::BadJson(format!("invalid filter: {e}")),
            _ => Error::NotJson(format!("invalid filter: {e}")),
        })?;
        check_limits(&definition)?;
        return Ok(definition);
    }
    let id: i64 = filter.parse().map_err(|_| Error::InvalidParam(format!("invalid filter ID: {filter}")))?;
    let json = db.filter(user_id, id).await?.ok_or_else(|| Error::not_found("Unknown filter"))?;
    serde_json::from_str(&json).map_err(|e| Error::Internal(format!("stored filter is invalid: {e}")))
}

/// Stores a filter and returns its ID.
pub async fn create_filter(db: &Db, user_id: &UserId, filter: &FilterDefinition) -> Result<String> {
    check_limits(filter)?;
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
        assert!(!type_matches("m.room.?essage", "m.room.message"), "? is literal");
        assert!(type_matches("*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*", &"a".repeat(100)));
        assert!(!type_matches("*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b", &"a".repeat(200)));
    }
}
