//! Reading a room: who may see which events (history visibility), serving events to clients
//! with their `unsigned` data and bundled aggregations, and the history endpoints (`/messages`,
//! `/context`, `/event`, `/relations`, `/threads`, `/timestamp_to_event`, `/state`, `/members`).
//!
//! Ordering is always the stream order, which never changes once an event is stored.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use ruma::{EventId, OwnedEventId, OwnedUserId, RoomId, UserId, api::client::filter::RoomEventFilter};
use serde_json::{Value, json, value::RawValue};

use super::{Rooms, StoredEvent};
use crate::{
    error::{Error, Result},
    matrix::client_event::{self, Format, Unsigned},
    service::{filter, now_ms},
    storage::rooms::Dir,
};

/// How far back a user may read a room, and how they are in it.
#[derive(Debug, Clone)]
pub struct ReadAccess {
    /// The last position the user may see (their leave event for left users).
    pub upto: i64,
    pub membership: Option<String>,
}

/// A page of events.
pub struct Page {
    pub events: Vec<Arc<StoredEvent>>,
    /// Position to continue from, when there may be more.
    pub next: Option<i64>,
}

impl Rooms {
    /// The users `viewer` ignores (`m.ignored_user_list`).
    pub async fn ignored_users(&self, viewer: &UserId) -> Result<Arc<HashSet<OwnedUserId>>> {
        // Cached per user, valid while their account data has not changed since.
        let position = self.streams.account_data_pos(viewer);
        if let Some((cached_at, ignored)) = self.ignored.lock().get(viewer)
            && *cached_at == position
        {
            return Ok(ignored.clone());
        }
        let ignored: HashSet<OwnedUserId> = match self.db.account_data(viewer, None, "m.ignored_user_list").await? {
            None => HashSet::new(),
            Some(json) => serde_json::from_str::<Value>(&json)
                .unwrap_or_default()
                .get("ignored_users")
                .and_then(Value::as_object)
                .map(|users| users.keys().filter_map(|u| UserId::parse(u).ok()).collect())
                .unwrap_or_default(),
        };
        let ignored = Arc::new(ignored);
        self.ignored.lock().put(viewer.to_owned(), (position, ignored.clone()));
        Ok(ignored)
    }

    /// Whether a room is world readable now.
    async fn world_readable(&self, room_id: &RoomId) -> Result<bool> {
        Ok(self
            .current_state_content(room_id, "m.room.history_visibility", "")
            .await?
            .and_then(|c| c.get("history_visibility").and_then(Value::as_str).map(|v| v == "world_readable"))
            .unwrap_or(false))
    }

    /// What `viewer` may read in `room_id`: everything up to now while joined, up to their leave
    /// afterwards, nothing (403) if they never were in a non-world-readable room.
    pub async fn read_access(&self, viewer: &UserId, room_id: &RoomId) -> Result<ReadAccess> {
        self.handle(room_id).await?;
        let now = self.streams.position();
        match self.db.membership(room_id, viewer).await? {
            Some(m) if m.membership == "join" => Ok(ReadAccess { upto: now, membership: Some(m.membership) }),
            Some(m) => {
                let upto = if self.world_readable(room_id).await? { now } else { m.stream_pos };
                Ok(ReadAccess { upto, membership: Some(m.membership) })
            }
            None if self.world_readable(room_id).await? => Ok(ReadAccess { upto: now, membership: None }),
            None => Err(Error::forbidden("You are not in this room")),
        }
    }

    /// Keeps the events `viewer` may see (history visibility at each event; ignored senders out).
    pub async fn filter_visible(
        &self,
        viewer: &UserId,
        events: Vec<Arc<StoredEvent>>,
        ignored: &HashSet<OwnedUserId>,
    ) -> Result<Vec<Arc<StoredEvent>>> {
        let mut currently_joined: HashMap<ruma::OwnedRoomId, bool> = HashMap::new();
        let mut visibility_cache: HashMap<i64, String> = HashMap::new();
        let mut membership_cache: HashMap<i64, Option<String>> = HashMap::new();
        let mut visible = Vec::with_capacity(events.len());
        for event in events {
            if ignored.contains(&event.pdu.sender) && event.pdu.state_key.is_none() {
                continue;
            }
            // A user always sees their own membership changes (their join, their kick).
            if event.pdu.event_type == ruma::events::TimelineEventType::RoomMember
                && event.pdu.state_key.as_deref() == Some(viewer.as_str())
            {
                visible.push(event);
                continue;
            }
            let group = event.state_after;
            let visibility = match visibility_cache.get(&group) {
                Some(v) => v.clone(),
                None => {
                    let v = self
                        .state_event_at(group, "m.room.history_visibility", "")
                        .await?
                        .and_then(|e| {
                            e.pdu.content_value().get("history_visibility").and_then(Value::as_str).map(str::to_owned)
                        })
                        .unwrap_or_else(|| "shared".to_owned());
                    visibility_cache.insert(group, v.clone());
                    v
                }
            };
            if visibility == "world_readable" {
                visible.push(event);
                continue;
            }
            let membership = match membership_cache.get(&group) {
                Some(m) => m.clone(),
                None => {
                    let m = self.state_event_at(group, "m.room.member", viewer.as_str()).await?.and_then(|e| {
                        e.pdu.content_value().get("membership").and_then(Value::as_str).map(str::to_owned)
                    });
                    membership_cache.insert(group, m.clone());
                    m
                }
            };
            let allowed = match membership.as_deref() {
                Some("join") => true,
                Some("invite") => {
                    visibility == "invited"
                        || visibility == "shared"
                            && self.is_joined_now(viewer, &event.pdu.room_id, &mut currently_joined)
                }
                _ => visibility == "shared" && self.is_joined_now(viewer, &event.pdu.room_id, &mut currently_joined),
            };
            if allowed {
                visible.push(event);
            }
        }
        Ok(visible)
    }

    fn is_joined_now(&self, viewer: &UserId, room_id: &RoomId, cache: &mut HashMap<ruma::OwnedRoomId, bool>) -> bool {
        *cache
            .entry(room_id.to_owned())
            .or_insert_with(|| self.streams.membership(viewer, room_id).as_deref() == Some("join"))
    }

    /// Serves events to `viewer` (on `device`): client format, `unsigned` (age, the sender
    /// device's transaction ID, previous state content, redaction cause) and bundled
    /// aggregations (edits, thread summaries, references).
    pub async fn serve(
        &self,
        viewer: &UserId,
        device: Option<&str>,
        events: &[Arc<StoredEvent>],
        format: Format,
    ) -> Result<Vec<Box<RawValue>>> {
        let now = now_ms();
        // Only events older than their room's latest relation can have one bundled.
        let targets: Vec<&EventId> = events
            .iter()
            .filter(|e| e.redacted_by.is_none() && e.pdu.state_key.is_none())
            .filter(|e| e.stream_pos < self.streams.latest_relation(&e.pdu.room_id))
            .map(|e| &*e.pdu.event_id)
            .collect();
        let relations = self.bundled_relations(viewer, device, &targets, format).await?;
        let mut served = Vec::with_capacity(events.len());
        for event in events {
            served.push(
                self.serve_one(viewer, device, event, format, now, relations.get(&event.pdu.event_id).map(|r| &**r))
                    .await?,
            );
        }
        Ok(served)
    }

    async fn serve_one(
        &self,
        viewer: &UserId,
        device: Option<&str>,
        event: &StoredEvent,
        format: Format,
        now: i64,
        relations: Option<&RawValue>,
    ) -> Result<Box<RawValue>> {
        let txn = if event.pdu.sender != viewer || device.is_none() {
            None
        } else if event.txn_known {
            event.txn.as_ref().filter(|(d, _)| Some(d.as_str()) == device).map(|(_, txn)| txn.clone())
        } else {
            self.db
                .event_txn(&event.pdu.event_id)
                .await?
                .filter(|(d, _)| Some(d.as_str()) == device)
                .map(|(_, txn)| txn)
        };
        let previous = match &event.replaces_state {
            Some(id) => self.event(id).await?,
            None => None,
        };
        let redacted_because = match &event.redacted_by {
            Some(id) => self
                .event(id)
                .await?
                .map(|redaction| client_event::to_client(&redaction.pdu, Format::WithRoomId, &Unsigned::default())),
            None => None,
        };
        let unsigned = Unsigned {
            age: Some((now - i64::from(event.pdu.origin_server_ts.0)).max(0)),
            transaction_id: txn.as_deref(),
            prev_content: previous.as_ref().map(|p| &*p.pdu.content),
            replaces_state: event.replaces_state.as_deref(),
            redacted_because: redacted_because.as_deref(),
            relations,
            membership: None,
        };
        Ok(client_event::to_client(&event.pdu, format, &unsigned))
    }

    /// `unsigned.m.relations` for each of `targets` that has edits, a thread or references.
    async fn bundled_relations(
        &self,
        viewer: &UserId,
        device: Option<&str>,
        targets: &[&EventId],
        format: Format,
    ) -> Result<HashMap<OwnedEventId, Box<RawValue>>> {
        let mut bundles: HashMap<OwnedEventId, serde_json::Map<String, Value>> = HashMap::new();
        if targets.is_empty() {
            return Ok(HashMap::new());
        }
        let related = self.db.edits_and_references(targets).await?;
        let mut latest_edit: HashMap<OwnedEventId, Arc<StoredEvent>> = HashMap::new();
        let mut references: HashMap<OwnedEventId, Vec<Value>> = HashMap::new();
        let senders: HashMap<OwnedEventId, OwnedUserId> = HashMap::new();
        let _ = senders;
        for (target, rel_type, row) in related {
            let event = self.events_from_rows(vec![row])?.remove(0);
            match rel_type.as_str() {
                "m.replace" => {
                    // Only the original sender's edits count; the newest wins.
                    let Some(original) = self.event(&target).await? else { continue };
                    if original.pdu.sender != event.pdu.sender || original.pdu.event_type != event.pdu.event_type {
                        continue;
                    }
                    latest_edit.insert(target, event);
                }
                _ => references.entry(target).or_default().push(json!({"event_id": event.pdu.event_id.as_str()})),
            }
        }
        for (target, edit) in latest_edit {
            let served = Box::pin(self.serve_one(viewer, device, &edit, format, now_ms(), None)).await?;
            let value: Value = serde_json::from_str(served.get()).unwrap_or_default();
            bundles.entry(target).or_default().insert("m.replace".into(), value);
        }
        for (target, chunk) in references {
            bundles.entry(target).or_default().insert("m.reference".into(), json!({"chunk": chunk}));
        }
        for (root, count, latest_pos, participated) in self.db.thread_summaries(targets, viewer).await? {
            let Some(row) = self.db.event_at(latest_pos).await? else { continue };
            let latest = self.events_from_rows(vec![row])?.remove(0);
            let served = Box::pin(self.serve_one(viewer, device, &latest, format, now_ms(), None)).await?;
            let latest_value: Value = serde_json::from_str(served.get()).unwrap_or_default();
            bundles.entry(root).or_default().insert(
                "m.thread".into(),
                json!({"latest_event": latest_value, "count": count, "current_user_participated": participated}),
            );
        }
        Ok(bundles
            .into_iter()
            .map(|(id, bundle)| (id, serde_json::value::to_raw_value(&bundle).expect("serialisable")))
            .collect())
    }

    /// Reads a page of a room's events between two positions, keeping only events that pass
    /// `filter` and visibility, fetching more while the page is short.
    #[allow(clippy::too_many_arguments)] // Mirrors the pagination parameters of the spec endpoints.
    pub async fn page(
        &self,
        viewer: &UserId,
        room_id: &RoomId,
        from: i64,
        to: Option<i64>,
        dir: Dir,
        limit: usize,
        filter: Option<&RoomEventFilter>,
        access: &ReadAccess,
    ) -> Result<Page> {
        let ignored = self.ignored_users(viewer).await?;
        let mut events = Vec::new();
        let (mut after, mut upto) = match dir {
            Dir::Backward => (to.unwrap_or(0), from.min(access.upto)),
            Dir::Forward => (from, to.unwrap_or(access.upto).min(access.upto)),
        };
        let batch = (limit as i64 + 1).clamp(2, 1000);
        let mut exhausted = false;
        for _ in 0..20 {
            if after >= upto {
                exhausted = true;
                break;
            }
            let rows = self.db.room_events(room_id, after, upto, dir, batch).await?;
            let fetched = rows.len() as i64;
            let Some(last) = rows.last().map(|r| r.stream_pos) else {
                exhausted = true;
                break;
            };
            match dir {
                Dir::Backward => upto = last - 1,
                Dir::Forward => after = last,
            }
            let candidates = self.events_from_rows(rows)?;
            let candidates: Vec<_> = candidates
                .into_iter()
                .filter(|e| filter.is_none_or(|f| filter::room_event_matches(f, &e.pdu)))
                .collect();
            let visible = self.filter_visible(viewer, candidates, &ignored).await?;
            for event in visible {
                if events.len() == limit {
                    break;
                }
                events.push(event);
            }
            if events.len() == limit {
                break;
            }
            if fetched < batch {
                exhausted = true;
                break;
            }
        }
        let next = if exhausted && events.len() < limit {
            None
        } else {
            events.last().map(|e| match dir {
                Dir::Backward => e.stream_pos - 1,
                Dir::Forward => e.stream_pos,
            })
        };
        Ok(Page { events, next })
    }

    /// The event with `event_id` if it is in `room_id` and `viewer` may see it.
    pub async fn visible_event(
        &self,
        viewer: &UserId,
        room_id: &RoomId,
        event_id: &EventId,
    ) -> Result<Arc<StoredEvent>> {
        let access = self.read_access(viewer, room_id).await?;
        let event = self.event(event_id).await?.filter(|e| e.pdu.room_id == room_id && !e.soft_failed);
        let Some(event) = event else { return Err(Error::not_found("Event not found")) };
        if event.stream_pos > access.upto {
            return Err(Error::not_found("Event not found"));
        }
        let visible = self.filter_visible(viewer, vec![event], &HashSet::new()).await?;
        visible.into_iter().next().ok_or_else(|| Error::not_found("Event not found"))
    }

    /// The member events (from state group `group`) of the senders of `events`.
    pub async fn members_for(&self, group: i64, events: &[Arc<StoredEvent>]) -> Result<Vec<Arc<StoredEvent>>> {
        let mut seen = HashSet::new();
        let mut members = Vec::new();
        for event in events {
            if !seen.insert(event.pdu.sender.clone()) {
                continue;
            }
            if let Some(member) = self.state_event_at(group, "m.room.member", event.pdu.sender.as_str()).await? {
                members.push(member);
            }
        }
        Ok(members)
    }

    /// The state events of a state group (optionally filtered).
    pub async fn state_events(&self, group: i64, filter: Option<&RoomEventFilter>) -> Result<Vec<Arc<StoredEvent>>> {
        let state = self.state_at(group).await?;
        let mut events = Vec::with_capacity(state.len());
        for ((event_type, _), event_id) in state.iter() {
            if let Some(filter) = filter
                && filter.types.as_ref().is_some_and(|types| !types.iter().any(|t| filter::type_matches(t, event_type)))
            {
                continue;
            }
            if let Some(event) = self.event(event_id).await? {
                if filter.is_some_and(|f| !filter::room_event_matches(f, &event.pdu)) {
                    continue;
                }
                events.push(event);
            }
        }
        events.sort_by_key(|e| e.stream_pos);
        Ok(events)
    }

    /// The state group a user's view of a room ends at (current, or at their leave).
    pub async fn viewer_state_group(&self, room_id: &RoomId, access: &ReadAccess) -> Result<i64> {
        Ok(self.db.room_state_group_at(room_id, access.upto).await?.unwrap_or(0))
    }

    /// `GET /rooms/{roomId}/state/{eventType}/{stateKey}`.
    pub async fn state_event_for(
        &self,
        viewer: &UserId,
        room_id: &RoomId,
        event_type: &str,
        state_key: &str,
    ) -> Result<Arc<StoredEvent>> {
        let access = self.read_access(viewer, room_id).await?;
        let group = self.viewer_state_group(room_id, &access).await?;
        self.state_event_at(group, event_type, state_key)
            .await?
            .ok_or_else(|| Error::not_found("State event not found"))
    }

    /// `GET /rooms/{roomId}/state`.
    pub async fn full_state_for(&self, viewer: &UserId, room_id: &RoomId) -> Result<Vec<Arc<StoredEvent>>> {
        let access = self.read_access(viewer, room_id).await?;
        let group = self.viewer_state_group(room_id, &access).await?;
        self.state_events(group, None).await
    }

    /// `GET /rooms/{roomId}/members`: member events at `at` (a position) or the viewer's latest
    /// view, filtered by membership.
    pub async fn members_at(
        &self,
        viewer: &UserId,
        room_id: &RoomId,
        at: Option<i64>,
        membership: Option<&str>,
        not_membership: Option<&str>,
    ) -> Result<Vec<Arc<StoredEvent>>> {
        let access = self.read_access(viewer, room_id).await?;
        let upto = at.map_or(access.upto, |at| at.min(access.upto));
        let group = self.db.room_state_group_at(room_id, upto).await?.unwrap_or(0);
        let state = self.state_at(group).await?;
        let mut members = Vec::new();
        for ((event_type, _), event_id) in state.iter() {
            if event_type != "m.room.member" {
                continue;
            }
            let Some(event) = self.event(event_id).await? else { continue };
            let value = event.pdu.content_value();
            let m = value.get("membership").and_then(Value::as_str).unwrap_or("leave");
            if membership.is_some_and(|wanted| wanted != m) || not_membership.is_some_and(|unwanted| unwanted == m) {
                continue;
            }
            members.push(event);
        }
        members.sort_by_key(|e| e.stream_pos);
        Ok(members)
    }

    /// `GET /rooms/{roomId}/joined_members`: display name and avatar of each joined member.
    pub async fn joined_members(
        &self,
        viewer: &UserId,
        room_id: &RoomId,
    ) -> Result<Vec<(OwnedUserId, Option<String>, Option<String>)>> {
        self.handle(room_id).await?;
        if self.streams.membership(viewer, room_id).as_deref() != Some("join") && !self.world_readable(room_id).await? {
            return Err(Error::forbidden("You are not in this room"));
        }
        Ok(self
            .db
            .room_memberships(room_id)
            .await?
            .into_iter()
            .filter(|m| m.membership == "join")
            .map(|m| (m.user_id, m.displayname, m.avatar_url))
            .collect())
    }

    /// `GET /rooms/{roomId}/context/{eventId}`: the event, events around it and the state at the
    /// last returned event.
    pub async fn context(
        &self,
        viewer: &UserId,
        room_id: &RoomId,
        event_id: &EventId,
        limit: usize,
        filter: Option<&RoomEventFilter>,
    ) -> Result<(Arc<StoredEvent>, Page, Page, i64)> {
        let event = self.visible_event(viewer, room_id, event_id).await?;
        let access = self.read_access(viewer, room_id).await?;
        let before_limit = limit / 2;
        let after_limit = limit - before_limit;
        let before = self
            .page(viewer, room_id, event.stream_pos - 1, None, Dir::Backward, before_limit, filter, &access)
            .await?;
        let after =
            self.page(viewer, room_id, event.stream_pos, None, Dir::Forward, after_limit, filter, &access).await?;
        let state_group = after.events.last().map_or(event.state_after, |e| e.state_after);
        Ok((event, before, after, state_group))
    }

    /// `GET /rooms/{roomId}/relations/{eventId}[/{relType}[/{eventType}]]`.
    #[allow(clippy::too_many_arguments)] // Mirrors the endpoint's parameters one to one.
    pub async fn relations(
        &self,
        viewer: &UserId,
        room_id: &RoomId,
        event_id: &EventId,
        rel_type: Option<&str>,
        event_type: Option<&str>,
        from: Option<i64>,
        to: Option<i64>,
        dir: Dir,
        limit: usize,
        recurse: bool,
    ) -> Result<Page> {
        self.visible_event(viewer, room_id, event_id).await?;
        let access = self.read_access(viewer, room_id).await?;
        let ignored = self.ignored_users(viewer).await?;
        let (after, upto) = match dir {
            Dir::Backward => (to.unwrap_or(0), from.unwrap_or(access.upto).min(access.upto)),
            Dir::Forward => (from.unwrap_or(0), to.unwrap_or(access.upto).min(access.upto)),
        };
        // Relations of relations, up to three levels deep, when asked to recurse.
        let mut parents = vec![event_id.to_owned()];
        let mut all = Vec::new();
        for _ in 0..if recurse { 3 } else { 1 } {
            let mut next = Vec::new();
            for parent in &parents {
                let rows = self.db.related_events(parent, rel_type, after, upto, dir, 1000).await?;
                for event in self.events_from_rows(rows)? {
                    next.push(event.pdu.event_id.clone());
                    all.push(event);
                }
            }
            parents = next;
            if parents.is_empty() {
                break;
            }
        }
        all.sort_by_key(|e| e.stream_pos);
        if dir == Dir::Backward {
            all.reverse();
        }
        let all: Vec<_> =
            all.into_iter().filter(|e| event_type.is_none_or(|t| e.pdu.event_type.to_string() == t)).collect();
        let visible = self.filter_visible(viewer, all, &ignored).await?;
        let more = visible.len() > limit;
        let events: Vec<_> = visible.into_iter().take(limit).collect();
        let next = if more {
            events.last().map(|e| if dir == Dir::Backward { e.stream_pos - 1 } else { e.stream_pos })
        } else {
            None
        };
        Ok(Page { events, next })
    }

    /// `GET /rooms/{roomId}/threads`: thread roots, most recently active first.
    pub async fn threads(
        &self,
        viewer: &UserId,
        room_id: &RoomId,
        participated_only: bool,
        from: Option<i64>,
        limit: usize,
    ) -> Result<Page> {
        let access = self.read_access(viewer, room_id).await?;
        let ignored = self.ignored_users(viewer).await?;
        let mut before = from.unwrap_or(i64::MAX);
        let mut roots = Vec::new();
        let mut next = None;
        for _ in 0..10 {
            let batch = self.db.thread_roots(room_id, before, (limit as i64 + 1).max(2)).await?;
            let fetched = batch.len();
            for (root_id, latest) in batch {
                before = latest;
                if latest > access.upto {
                    continue;
                }
                let Some(root) = self.event(&root_id).await? else { continue };
                if root.pdu.room_id != room_id {
                    continue;
                }
                if participated_only {
                    let summaries = self.db.thread_summaries(&[&root.pdu.event_id], viewer).await?;
                    let participated = root.pdu.sender == viewer || summaries.first().is_some_and(|s| s.3);
                    if !participated {
                        continue;
                    }
                }
                if self.filter_visible(viewer, vec![root.clone()], &ignored).await?.is_empty() {
                    continue;
                }
                if roots.len() == limit {
                    // The next page starts with this thread (bounds are exclusive).
                    next = Some(latest + 1);
                    break;
                }
                roots.push(root);
            }
            if next.is_some() || fetched <= limit {
                break;
            }
        }
        Ok(Page { events: roots, next })
    }

    /// `GET /rooms/{roomId}/timestamp_to_event`.
    pub async fn event_near(
        &self,
        viewer: &UserId,
        room_id: &RoomId,
        ts: i64,
        forward: bool,
    ) -> Result<(OwnedEventId, i64)> {
        self.read_access(viewer, room_id).await?;
        let (event_id, ts) = self
            .db
            .event_by_timestamp(room_id, ts, forward)
            .await?
            .ok_or_else(|| Error::not_found("No event found"))?;
        self.visible_event(viewer, room_id, &event_id).await?;
        Ok((event_id, ts))
    }
}
