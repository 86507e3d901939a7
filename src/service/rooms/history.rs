//! Reading a room: who may see which events (history visibility), serving events to clients
//! with their `unsigned` data and bundled aggregations, and the history endpoints (`/event`,
//! `/relations`, `/threads`, `/timestamp_to_event`, `/state`, `/members`).
//!
//! `/relations` and `/threads` page in stream order, which never changes once an event is
//! stored; `/messages` and `/context` page in the room's topological order (`pagination.rs`).

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
    /// The last position the user may see (the end of their last stay for users who left).
    pub upto: i64,
    pub membership: Option<String>,
}

/// A page of events.
pub struct Page {
    pub events: Vec<Arc<StoredEvent>>,
    /// Position to continue from, when there may be more.
    pub next: Option<i64>,
    /// The viewer's read bound the page was read under: what is served with its events (bundled
    /// edits, thread summaries) stops there too.
    pub upto: i64,
}

/// At most this many of a user's membership changes in one room are looked through to find
/// their last stay (a user who changed membership more often than that in one room reads it
/// as if they never joined, until they join again).
const MEMBERSHIP_HISTORY_LIMIT: i64 = 1000;

/// A user's membership in a member event's content (`leave` when unreadable).
fn membership_of(event: &StoredEvent) -> String {
    event.pdu.content_value().get("membership").and_then(Value::as_str).unwrap_or("leave").to_owned()
}

/// The history visibility rules of the Client-Server API ("Room History Visibility", server
/// behaviour), for one value of `m.room.history_visibility` and the viewer's membership at the
/// event. `ever_joined`: the viewer joined the room at some point (the callers bound what they
/// read by the end of the viewer's stay, so "joined after the event was sent" reduces to this).
fn visibility_allows(visibility: &str, membership: Option<&str>, ever_joined: bool) -> bool {
    match (visibility, membership) {
        ("world_readable", _) | (_, Some("join")) => true,
        ("invited", Some("invite")) => true,
        ("joined" | "invited", _) => false,
        // `shared`, and any value not understood, which counts as `shared`.
        _ => ever_joined,
    }
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

    /// What `viewer` may read in `room_id`: everything up to now while joined (or when the room
    /// is world readable), up to the end of their last stay after they left, were kicked or
    /// banned; nothing (403) for users who never joined — invitees and knockers see the stripped
    /// state of their sync's `invite`/`knock` section only — or who forgot the room.
    pub async fn read_access(&self, viewer: &UserId, room_id: &RoomId) -> Result<ReadAccess> {
        self.handle(room_id).await?;
        let now = self.streams.position();
        let current = self.db.membership(room_id, viewer).await?;
        if current.as_ref().is_some_and(|m| m.membership == "join") {
            return Ok(ReadAccess { upto: now, membership: Some("join".to_owned()) });
        }
        let membership = current.as_ref().map(|m| m.membership.clone());
        if self.world_readable(room_id).await? {
            return Ok(ReadAccess { upto: now, membership });
        }
        // `POST /forget`: "a user will no longer be able to retrieve history for this room".
        if current.as_ref().is_none_or(|m| m.forgotten) {
            return Err(Error::forbidden("You are not in this room"));
        }
        match self.end_of_last_stay(room_id, viewer).await? {
            Some(upto) => Ok(ReadAccess { upto, membership }),
            None => Err(Error::forbidden("You are not in this room")),
        }
    }

    /// Where `user`'s last stay in the room ended: the position of the membership event that
    /// followed their latest join (now if they are joined), `None` if they never joined.
    async fn end_of_last_stay(&self, room_id: &RoomId, user: &UserId) -> Result<Option<i64>> {
        let rows = self.db.member_events(room_id, user, MEMBERSHIP_HISTORY_LIMIT).await?;
        let mut ended_at = None;
        for event in self.events_from_rows(rows)? {
            if membership_of(&event) == "join" {
                return Ok(Some(ended_at.unwrap_or_else(|| self.streams.position())));
            }
            ended_at = Some(event.stream_pos);
        }
        Ok(None)
    }

    /// The value of `m.room.history_visibility` in a state group (`shared` when unset).
    async fn visibility_at(&self, group: i64, cache: &mut HashMap<i64, String>) -> Result<String> {
        if let Some(v) = cache.get(&group) {
            return Ok(v.clone());
        }
        let v = self
            .state_event_at(group, "m.room.history_visibility", "")
            .await?
            .and_then(|e| e.pdu.content_value().get("history_visibility").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| "shared".to_owned());
        cache.insert(group, v.clone());
        Ok(v)
    }

    /// `viewer`'s membership in a state group, if they have one.
    async fn membership_at(
        &self,
        viewer: &UserId,
        group: i64,
        cache: &mut HashMap<i64, Option<String>>,
    ) -> Result<Option<String>> {
        if let Some(m) = cache.get(&group) {
            return Ok(m.clone());
        }
        let m = self.state_event_at(group, "m.room.member", viewer.as_str()).await?.map(|e| membership_of(&e));
        cache.insert(group, m.clone());
        Ok(m)
    }

    /// Keeps the events `viewer` may see (history visibility at each event; ignored senders out).
    /// Callers bound the range by the viewer's [`ReadAccess::upto`].
    pub async fn filter_visible(
        &self,
        viewer: &UserId,
        events: Vec<Arc<StoredEvent>>,
        ignored: &HashSet<OwnedUserId>,
    ) -> Result<Vec<Arc<StoredEvent>>> {
        let mut ever_joined: HashMap<ruma::OwnedRoomId, bool> = HashMap::new();
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
            let mut visibilities = vec![self.visibility_at(event.state_after, &mut visibility_cache).await?];
            // A visibility change is visible to whoever the value before or after it lets see it.
            if event.pdu.event_type == ruma::events::TimelineEventType::RoomHistoryVisibility
                && event.pdu.state_key.as_deref() == Some("")
            {
                visibilities.push(self.visibility_at(event.state_before, &mut visibility_cache).await?);
            }
            if visibilities.iter().any(|v| v == "world_readable") {
                visible.push(event);
                continue;
            }
            let membership = self.membership_at(viewer, event.state_after, &mut membership_cache).await?;
            let allows =
                |joined: bool| visibilities.iter().any(|v| visibility_allows(v, membership.as_deref(), joined));
            // Whether the viewer ever joined matters only when membership alone does not decide.
            let allowed = allows(false)
                || allows(true) && {
                    match ever_joined.get(&event.pdu.room_id) {
                        Some(joined) => *joined,
                        None => {
                            let joined = self.streams.membership(viewer, &event.pdu.room_id).as_deref() == Some("join")
                                || self.end_of_last_stay(&event.pdu.room_id, viewer).await?.is_some();
                            ever_joined.insert(event.pdu.room_id.clone(), joined);
                            joined
                        }
                    }
                };
            if allowed {
                visible.push(event);
            }
        }
        Ok(visible)
    }

    /// Serves state events to `viewer` (on `device`): client format and `unsigned` (age, the
    /// sender device's transaction ID, previous state content, redaction cause). Timeline events
    /// go through [`Rooms::serve_timeline`].
    pub async fn serve(
        &self,
        viewer: &UserId,
        device: Option<&str>,
        events: &[Arc<StoredEvent>],
        format: Format,
    ) -> Result<Vec<Box<RawValue>>> {
        let now = now_ms();
        let mut served = Vec::with_capacity(events.len());
        for event in events {
            served.push(self.serve_one(viewer, device, event, format, now, None, None).await?);
        }
        Ok(served)
    }

    /// Serves timeline events to `viewer` (on `device`) who may read up to `upto`: as
    /// [`Rooms::serve`], plus the viewer's membership at each event (`unsigned.membership`) and
    /// bundled aggregations (latest edit, thread summary, references) made only of related
    /// events the viewer may see at or before `upto`.
    pub async fn serve_timeline(
        &self,
        viewer: &UserId,
        device: Option<&str>,
        events: &[Arc<StoredEvent>],
        format: Format,
        upto: i64,
    ) -> Result<Vec<Box<RawValue>>> {
        let now = now_ms();
        // Only events older than their room's latest relation can have one bundled.
        let targets: Vec<&EventId> = events
            .iter()
            .filter(|e| e.redacted_by.is_none() && e.pdu.state_key.is_none())
            .filter(|e| e.stream_pos < self.streams.latest_relation(&e.pdu.room_id))
            .map(|e| &*e.pdu.event_id)
            .collect();
        let relations = self.bundled_relations(viewer, device, &targets, format, upto).await?;
        let mut memberships = HashMap::new();
        let mut served = Vec::with_capacity(events.len());
        for event in events {
            // "The requesting user's m.room.member state at the point of the event, including any
            // changes caused by the event", `leave` when they had none (spec v1.11).
            let membership = self.membership_at(viewer, event.state_after, &mut memberships).await?;
            let membership = membership.as_deref().unwrap_or("leave");
            let bundle = relations.get(&event.pdu.event_id).map(|r| &**r);
            served.push(self.serve_one(viewer, device, event, format, now, bundle, Some(membership)).await?);
        }
        Ok(served)
    }

    #[allow(clippy::too_many_arguments)] // The parts of one served event; private.
    async fn serve_one(
        &self,
        viewer: &UserId,
        device: Option<&str>,
        event: &StoredEvent,
        format: Format,
        now: i64,
        relations: Option<&RawValue>,
        membership: Option<&str>,
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
            membership,
        };
        Ok(client_event::to_client(&event.pdu, format, &unsigned))
    }

    /// `unsigned.m.relations` for each of `targets` that has edits, a thread or references
    /// `viewer` may see: at or before `upto`, visible to them, not from a user they ignore — the
    /// checks the related events themselves pass when served.
    async fn bundled_relations(
        &self,
        viewer: &UserId,
        device: Option<&str>,
        targets: &[&EventId],
        format: Format,
        upto: i64,
    ) -> Result<HashMap<OwnedEventId, Box<RawValue>>> {
        let mut bundles: HashMap<OwnedEventId, serde_json::Map<String, Value>> = HashMap::new();
        if targets.is_empty() {
            return Ok(HashMap::new());
        }
        let ignored = self.ignored_users(viewer).await?;
        let mut related = Vec::new();
        for (target, rel_type, row) in self.db.edits_and_references(targets).await? {
            if row.stream_pos <= upto {
                related.push((target, rel_type, self.events_from_rows(vec![row])?.remove(0)));
            }
        }
        let candidates = related.iter().map(|(_, _, event)| event.clone()).collect();
        let visible: HashSet<OwnedEventId> = self
            .filter_visible(viewer, candidates, &ignored)
            .await?
            .into_iter()
            .map(|e| e.pdu.event_id.clone())
            .collect();
        let mut latest_edit: HashMap<OwnedEventId, Arc<StoredEvent>> = HashMap::new();
        let mut references: HashMap<OwnedEventId, Vec<Value>> = HashMap::new();
        for (target, rel_type, event) in related {
            if !visible.contains(&event.pdu.event_id) {
                continue;
            }
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
            let served = Box::pin(self.serve_one(viewer, device, &edit, format, now_ms(), None, None)).await?;
            let value: Value = serde_json::from_str(served.get()).unwrap_or_default();
            bundles.entry(target).or_default().insert("m.replace".into(), value);
        }
        for (target, chunk) in references {
            bundles.entry(target).or_default().insert("m.reference".into(), json!({"chunk": chunk}));
        }
        let excluded: Vec<&UserId> = ignored.iter().map(|u| &**u).collect();
        for (root, count, latest_pos, participated) in
            self.db.thread_summaries(targets, viewer, upto, &excluded).await?
        {
            let Some(latest) = self.latest_visible_reply(viewer, &root, latest_pos, &ignored).await? else { continue };
            let served = Box::pin(self.serve_one(viewer, device, &latest, format, now_ms(), None, None)).await?;
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

    /// The newest reply of thread `root` at or before `latest_pos` that `viewer` may see, looking
    /// back through a bounded number of replies (a thread with none visible gets no summary).
    async fn latest_visible_reply(
        &self,
        viewer: &UserId,
        root: &EventId,
        latest_pos: i64,
        ignored: &HashSet<OwnedUserId>,
    ) -> Result<Option<Arc<StoredEvent>>> {
        const BATCH: i64 = 20;
        let mut upto = latest_pos;
        for _ in 0..5 {
            let rows = self.db.related_events(root, Some("m.thread"), 0, upto, Dir::Backward, BATCH).await?;
            let fetched = rows.len() as i64;
            let Some(last) = rows.last().map(|r| r.stream_pos) else { break };
            let replies = self.events_from_rows(rows)?;
            if let Some(reply) = self.filter_visible(viewer, replies, ignored).await?.into_iter().next() {
                return Ok(Some(reply));
            }
            if fetched < BATCH {
                break;
            }
            upto = last - 1;
        }
        Ok(None)
    }

    /// The event with `event_id` if it is in `room_id` and `viewer` may see it.
    pub async fn visible_event(
        &self,
        viewer: &UserId,
        room_id: &RoomId,
        event_id: &EventId,
    ) -> Result<Arc<StoredEvent>> {
        Ok(self.visible_event_with_access(viewer, room_id, event_id).await?.0)
    }

    /// [`Rooms::visible_event`], with the viewer's read access it was checked under.
    pub async fn visible_event_with_access(
        &self,
        viewer: &UserId,
        room_id: &RoomId,
        event_id: &EventId,
    ) -> Result<(Arc<StoredEvent>, ReadAccess)> {
        let access = self.read_access(viewer, room_id).await?;
        let event =
            self.event(event_id).await?.filter(|e| e.pdu.room_id == room_id && !e.soft_failed && !e.is_outlier());
        let Some(event) = event else { return Err(Error::not_found("Event not found")) };
        if event.stream_pos > access.upto {
            return Err(Error::not_found("Event not found"));
        }
        let visible = self.filter_visible(viewer, vec![event], &HashSet::new()).await?;
        let event = visible.into_iter().next().ok_or_else(|| Error::not_found("Event not found"))?;
        Ok((event, access))
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
        let (_, access) = self.visible_event_with_access(viewer, room_id, event_id).await?;
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
        Ok(Page { events, next, upto: access.upto })
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
                    let summaries = self.db.thread_summaries(&[&root.pdu.event_id], viewer, access.upto, &[]).await?;
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
        Ok(Page { events: roots, next, upto: access.upto })
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

#[cfg(test)]
mod tests {
    use super::visibility_allows;

    #[test]
    fn visibility_rules_follow_the_spec_list() {
        // 1. world_readable: anyone.
        assert!(visibility_allows("world_readable", None, false));
        // 2. joined at the event: always.
        for v in ["shared", "invited", "joined", "something new"] {
            assert!(visibility_allows(v, Some("join"), false), "{v}");
        }
        // 3. shared: whoever joined at some point.
        assert!(visibility_allows("shared", None, true));
        assert!(visibility_allows("shared", Some("leave"), true));
        assert!(!visibility_allows("shared", Some("invite"), false));
        // 4. invited: invitees too.
        assert!(visibility_allows("invited", Some("invite"), false));
        assert!(!visibility_allows("invited", Some("leave"), true));
        // 5. otherwise deny.
        assert!(!visibility_allows("joined", Some("invite"), true));
        assert!(!visibility_allows("joined", None, true));
        assert!(!visibility_allows("shared", Some("knock"), false));
    }

    #[test]
    fn unknown_visibility_counts_as_shared() {
        assert!(visibility_allows("no such value", Some("leave"), true));
        assert!(!visibility_allows("no such value", Some("leave"), false));
    }
}
