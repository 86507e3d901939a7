//! `POST /search` over room events: the database's full-text index (`storage::search`) finds
//! candidates in the rooms the user is or was in; history visibility decides which they see.
//!
//! Encrypted messages are never indexed (the server cannot read them; clients search those
//! themselves). Redacted events leave the index when the redaction is stored.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use ruma::{
    OwnedRoomId, OwnedUserId, UInt, UserId,
    api::client::search::search_events::v3::{
        Criteria, EventContextResult, GroupingKey, OrderBy, ResultGroup, ResultGroupMap, ResultRoomEvents, SearchKeys,
        SearchResult, UserProfile,
    },
    serde::Raw,
};
use serde_json::Value;

use crate::{
    config::SearchConfig,
    error::{Error, Result},
    matrix::client_event::Format,
    service::{
        filter,
        rooms::{
            Rooms, StoredEvent,
            history::ReadAccess,
            pagination::{PageToken, position_before, position_of},
        },
    },
    storage::{
        rooms::Dir,
        search::{SearchFrom, SearchQuery},
    },
};

/// Results per page when the filter does not say, and at most.
const DEFAULT_LIMIT: usize = 10;
const MAX_LIMIT: usize = 50;
/// Events of context at most on each side of a result.
const MAX_CONTEXT: usize = 20;
/// Index reads per request while hits keep turning out invisible.
const MAX_ROUNDS: usize = 5;
/// Words of a search term used at most.
const MAX_WORDS: usize = 16;

pub struct Search {
    rooms: Arc<Rooms>,
    config: SearchConfig,
}

/// Where the next page starts: `next_batch` is `r{below}.{skip}` in rank order and
/// `b{below}` in recent order (see [`SearchFrom`]).
fn parse_cursor(token: &str) -> Result<SearchFrom> {
    let invalid = || Error::InvalidParam("Invalid next_batch token".to_owned());
    let (kind, value) = token.split_at_checked(1).ok_or_else(invalid)?;
    match kind {
        "r" => {
            let (below, skip) = value.split_once('.').ok_or_else(invalid)?;
            let below: i64 = below.parse().map_err(|_| invalid())?;
            let skip: i64 = skip.parse().map_err(|_| invalid())?;
            if skip < 0 {
                return Err(invalid());
            }
            Ok(SearchFrom::Rank { below, skip })
        }
        "b" => Ok(SearchFrom::Recent { below: value.parse().map_err(|_| invalid())? }),
        _ => Err(invalid()),
    }
}

fn format_cursor(from: SearchFrom) -> String {
    match from {
        SearchFrom::Rank { below, skip } => format!("r{below}.{skip}"),
        SearchFrom::Recent { below } => format!("b{below}"),
    }
}

/// The words of a search term, lowercased: letters and digits, everything else a separator.
pub fn words(term: &str) -> Vec<String> {
    term.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .take(MAX_WORDS)
        .map(str::to_lowercase)
        .collect()
}

impl Search {
    pub fn new(rooms: Arc<Rooms>, config: SearchConfig) -> Search {
        Search { rooms, config }
    }

    /// The `room_events` category of `POST /search` for `user` (on `device`).
    pub async fn room_events(
        &self,
        user: &UserId,
        device: Option<&str>,
        criteria: &Criteria,
        with_context: bool,
        next_batch: Option<&str>,
    ) -> Result<ResultRoomEvents> {
        let words = words(&criteria.search_term);
        if words.is_empty() {
            return Err(Error::InvalidParam("The search term has no words".to_owned()));
        }
        // A first page reads below the newest position now, so that later pages of the same
        // search see the same matches however many arrive meanwhile.
        let below = self.rooms.streams.position() + 1;
        let mut cursor = match (next_batch, &criteria.order_by) {
            (Some(token), _) => parse_cursor(token)?,
            (None, Some(OrderBy::Recent)) => SearchFrom::Recent { below },
            (None, _) => SearchFrom::Rank { below, skip: 0 },
        };
        let filter = &criteria.filter;
        let limit = filter.limit.map_or(DEFAULT_LIMIT, |l| (u64::from(l) as usize).clamp(1, MAX_LIMIT));
        let keys = criteria
            .keys
            .clone()
            .unwrap_or_else(|| vec![SearchKeys::ContentBody, SearchKeys::ContentName, SearchKeys::ContentTopic]);
        let types: Vec<&str> = keys
            .iter()
            .filter_map(|key| match key {
                SearchKeys::ContentBody => Some("m.room.message"),
                SearchKeys::ContentName => Some("m.room.name"),
                SearchKeys::ContentTopic => Some("m.room.topic"),
                _ => None,
            })
            .filter(|t| filter::types_allow(filter.types.as_deref(), &filter.not_types, t))
            .collect();

        // Rooms the user is in or left (what they saw before leaving stays searchable), each
        // with how far they may read.
        let mut access: HashMap<OwnedRoomId, ReadAccess> = HashMap::new();
        for (room_id, membership, _) in self.rooms.streams.user_rooms(user, i64::MAX) {
            if !matches!(membership.as_str(), "join" | "leave" | "ban")
                || !filter::room_allowed(filter.rooms.as_deref(), &filter.not_rooms, &room_id)
            {
                continue;
            }
            if membership == "join" {
                // Joined: everything so far (history visibility still decides per event).
                let read = ReadAccess { upto: self.rooms.streams.position(), membership: Some(membership) };
                access.insert(room_id, read);
            } else if let Ok(read) = self.rooms.read_access(user, &room_id).await {
                access.insert(room_id, read);
            }
        }
        let rooms: Vec<OwnedRoomId> = access.keys().cloned().collect();
        let senders: Option<Vec<String>> =
            filter.senders.as_ref().map(|s| s.iter().map(|u| u.as_str().to_owned()).collect());
        let not_senders: Vec<String> = filter.not_senders.iter().map(|u| u.as_str().to_owned()).collect();
        let query = |from: SearchFrom, limit: usize| SearchQuery {
            words: &words,
            rooms: &rooms,
            types: &types,
            senders: senders.as_deref(),
            not_senders: &not_senders,
            from,
            limit: limit as i64,
            rank_window: self.config.rank_window.max(1) as i64,
        };

        let ignored = self.rooms.ignored_users(user).await?;
        let mut found: Vec<(Arc<StoredEvent>, f64)> = Vec::new();
        let mut more = false;
        for _ in 0..MAX_ROUNDS {
            // Read one more than needed to know whether there is a next page.
            let want = limit - found.len() + 1;
            let hits = self.rooms.db.search_events(&query(cursor, want)).await?;
            let exhausted = hits.len() < want;
            let positions: Vec<i64> = hits.iter().map(|hit| hit.stream_pos).collect();
            let mut events = self.rooms.events_from_rows(self.rooms.db.events_at(&positions).await?)?;
            // Within the user's read bound of each room, then by history visibility.
            events.retain(|e| access.get(&e.pdu.room_id).is_some_and(|a| e.stream_pos <= a.upto));
            let visible = self.rooms.filter_visible(user, events, &ignored).await?;
            let by_pos: HashMap<i64, Arc<StoredEvent>> = visible.into_iter().map(|e| (e.stream_pos, e)).collect();
            // Walk the hits in order: the cursor moves past each one looked at.
            for hit in &hits {
                if found.len() == limit {
                    more = true;
                    break;
                }
                cursor = hit.next;
                if let Some(event) = by_pos.get(&hit.stream_pos) {
                    found.push((event.clone(), hit.rank));
                }
            }
            if more || exhausted {
                break;
            }
            if found.len() == limit {
                // Exactly filled by the last hit read: whether more exist is unknown, so offer a
                // next page (it may come back empty).
                more = true;
                break;
            }
        }

        let count = self.rooms.db.search_count(&query(cursor, 0), self.config.exact_count_up_to as i64).await?;
        let mut response = ResultRoomEvents::new();
        // An estimate (see `storage::search`) is never less than what this page holds.
        response.count = UInt::new(count.max(found.len() as i64).max(0) as u64);
        response.highlights = words.clone();
        response.next_batch = more.then(|| format_cursor(cursor));

        let context = &criteria.event_context;
        let before_limit = (u64::from(context.before_limit) as usize).min(MAX_CONTEXT);
        let after_limit = (u64::from(context.after_limit) as usize).min(MAX_CONTEXT);
        for (event, rank) in &found {
            let read = &access[&event.pdu.room_id];
            let served = self
                .rooms
                .serve_timeline(user, device, std::slice::from_ref(event), Format::WithRoomId, read.upto)
                .await?;
            let mut result = SearchResult::new();
            result.rank = Some(*rank);
            result.result = served.into_iter().next().map(Raw::from_json);
            if with_context {
                result.context =
                    self.context(user, device, event, read, before_limit, after_limit, context.include_profile).await?;
            }
            response.results.push(result);
        }

        if criteria.include_state == Some(true) {
            let mut seen = Vec::new();
            for (event, _) in &found {
                let room_id = &event.pdu.room_id;
                if seen.contains(room_id) {
                    continue;
                }
                seen.push(room_id.clone());
                let group = self.rooms.current_group_at(room_id, access[room_id].upto).await?;
                let state = self.rooms.state_events(group, None).await?;
                let served = self.rooms.serve(user, device, &state, Format::WithRoomId).await?;
                response.state.insert(room_id.clone(), served.into_iter().map(Raw::from_json).collect());
            }
        }

        for grouping in &criteria.groupings.group_by {
            match &grouping.key {
                Some(GroupingKey::RoomId) => {
                    let groups = group_by(&found, |e| e.pdu.room_id.clone(), &response.next_batch);
                    response.groups.insert(ResultGroupMap::RoomId(groups));
                }
                Some(GroupingKey::Sender) => {
                    let groups: BTreeMap<OwnedUserId, ResultGroup> =
                        group_by(&found, |e| e.pdu.sender.clone(), &response.next_batch);
                    response.groups.insert(ResultGroupMap::Sender(groups));
                }
                _ => {}
            }
        }
        Ok(response)
    }

    /// The events around a result, within what the user may see, with the senders' profiles
    /// at the result when asked.
    #[allow(clippy::too_many_arguments)]
    async fn context(
        &self,
        user: &UserId,
        device: Option<&str>,
        event: &Arc<StoredEvent>,
        read: &ReadAccess,
        before_limit: usize,
        after_limit: usize,
        include_profile: bool,
    ) -> Result<EventContextResult> {
        let mut context = EventContextResult::new();
        let room_id = &event.pdu.room_id;
        if before_limit == 0 && after_limit == 0 && !include_profile {
            return Ok(context);
        }
        let before = if before_limit > 0 {
            self.rooms
                .page(user, room_id, position_before(event), None, Dir::Backward, before_limit, None, read)
                .await?
                .events
        } else {
            Vec::new()
        };
        let after = if after_limit > 0 {
            self.rooms
                .page(user, room_id, position_of(event), None, Dir::Forward, after_limit, None, read)
                .await?
                .events
        } else {
            Vec::new()
        };
        context.start = Some(PageToken::format(position_before(before.last().unwrap_or(event))));
        context.end = Some(PageToken::format(position_of(after.last().unwrap_or(event))));
        if include_profile {
            let mut senders: Vec<&ruma::OwnedUserId> = vec![&event.pdu.sender];
            senders.extend(before.iter().chain(after.iter()).map(|e| &e.pdu.sender));
            senders.sort();
            senders.dedup();
            for sender in senders {
                let member = self.rooms.state_event_at(event.state_after, "m.room.member", sender.as_str()).await?;
                let content = member.map(|m| m.pdu.content_value()).unwrap_or(Value::Null);
                let mut profile = UserProfile::new();
                profile.displayname = content.get("displayname").and_then(Value::as_str).map(str::to_owned);
                profile.avatar_url = content.get("avatar_url").and_then(Value::as_str).map(ruma::OwnedMxcUri::from);
                context.profile_info.insert(sender.clone(), profile);
            }
        }
        let serve = |events: Vec<Arc<StoredEvent>>| async move {
            self.rooms.serve_timeline(user, device, &events, Format::WithRoomId, read.upto).await
        };
        context.events_before = serve(before).await?.into_iter().map(Raw::from_json).collect();
        context.events_after = serve(after).await?.into_iter().map(Raw::from_json).collect();
        Ok(context)
    }
}

/// Results grouped by `key`, each group in result order, groups ordered by their first result.
fn group_by<K: Ord + Clone>(
    found: &[(Arc<StoredEvent>, f64)],
    key: impl Fn(&StoredEvent) -> K,
    next_batch: &Option<String>,
) -> BTreeMap<K, ResultGroup> {
    let mut groups: BTreeMap<K, ResultGroup> = BTreeMap::new();
    let mut order = 0u32;
    for (event, _) in found {
        let group = groups.entry(key(event)).or_insert_with(|| {
            order += 1;
            let mut group = ResultGroup::new();
            group.order = Some(UInt::from(order));
            group.next_batch = next_batch.clone();
            group
        });
        group.results.push(event.pdu.event_id.clone());
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_letters_and_digits_lowercased() {
        assert_eq!(words("Hello, wörld! it's 2026"), ["hello", "wörld", "it", "s", "2026"]);
        assert!(words(" ,.;").is_empty());
        assert_eq!(words(&"a ".repeat(40)).len(), MAX_WORDS);
    }

    #[test]
    fn cursors_round_trip_and_bad_ones_are_refused() {
        for cursor in [
            SearchFrom::Rank { below: 10, skip: 0 },
            SearchFrom::Rank { below: 7, skip: 30 },
            SearchFrom::Recent { below: -5 },
            SearchFrom::Recent { below: 1234 },
        ] {
            assert_eq!(parse_cursor(&format_cursor(cursor)).unwrap(), cursor);
        }
        for bad in ["", "r", "r5", "r5.-1", "r.3", "x5", "o4", "b1.5", "rb"] {
            assert!(parse_cursor(bad).is_err(), "{bad}");
        }
    }
}
