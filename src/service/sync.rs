//! The delivery core: "what changed for this user and device since token T".
//!
//! [`Sync::changes`] computes a sync-shaped delta between two positions; [`Sync::wait`] is the
//! long-poll around it (subscribe to the notifier first, compute, sleep until woken or timed
//! out). `/sync` and the WebSocket transport are thin layers over these two functions — there is
//! no second implementation of "what changed".
//!
//! Cost follows what changed: an incremental sync looks only at the rooms that have events,
//! receipts, typing or membership changes after the token (see `Streams::changed_rooms`).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use ruma::{
    OwnedRoomId, OwnedUserId, RoomId, UserId,
    api::client::filter::{FilterDefinition, RoomEventFilter},
};
use serde::Serialize;
use serde_json::{Value, json, value::RawValue};

use crate::{
    error::Result,
    matrix::{
        client_event::{self, Format},
        pdu::Pdu,
    },
    service::{
        ephemeral::{Presence, Typing},
        filter,
        notifications::Notifications,
        push::rules::PUSH_RULES,
        receipts::Receipts,
        rooms::{Rooms, StoredEvent},
        stream::{StreamToken, Streams},
    },
    storage::{out_of_band::OutOfBandMembership, rooms::Dir},
};

/// Default number of timeline events per room.
const DEFAULT_TIMELINE_LIMIT: usize = 10;
/// Largest timeline limit honoured.
const MAX_TIMELINE_LIMIT: usize = 100;
/// To-device messages delivered per sync at most.
const TO_DEVICE_LIMIT: i64 = 10_000;

#[derive(Debug, Default, Serialize)]
pub struct EventList {
    pub events: Vec<Box<RawValue>>,
}

impl EventList {
    fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Timeline {
    pub events: Vec<Box<RawValue>>,
    pub limited: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prev_batch: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Summary {
    #[serde(rename = "m.heroes", skip_serializing_if = "Option::is_none")]
    pub heroes: Option<Vec<OwnedUserId>>,
    #[serde(rename = "m.joined_member_count", skip_serializing_if = "Option::is_none")]
    pub joined_member_count: Option<u64>,
    #[serde(rename = "m.invited_member_count", skip_serializing_if = "Option::is_none")]
    pub invited_member_count: Option<u64>,
}

#[derive(Debug, Default, Serialize)]
pub struct UnreadNotifications {
    pub notification_count: u64,
    pub highlight_count: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct JoinedRoom {
    pub summary: Summary,
    pub state: EventList,
    pub timeline: Timeline,
    pub ephemeral: EventList,
    pub account_data: EventList,
    pub unread_notifications: UnreadNotifications,
    /// Per thread root, when the timeline filter asks for `unread_thread_notifications`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub unread_thread_notifications: BTreeMap<String, UnreadNotifications>,
    /// Membership changes of this response's member events after `since` (not serialised): who
    /// newly shares the room or no longer does, for `device_lists`.
    #[serde(skip)]
    pub member_changes: Vec<(OwnedUserId, String)>,
}

#[derive(Debug, Default, Serialize)]
pub struct InvitedRoom {
    pub invite_state: EventList,
}

#[derive(Debug, Default, Serialize)]
pub struct KnockedRoom {
    pub knock_state: EventList,
}

#[derive(Debug, Default, Serialize)]
pub struct LeftRoom {
    pub state: EventList,
    pub timeline: Timeline,
    pub account_data: EventList,
}

#[derive(Debug, Default, Serialize)]
pub struct RoomSections {
    pub join: BTreeMap<OwnedRoomId, JoinedRoom>,
    pub invite: BTreeMap<OwnedRoomId, InvitedRoom>,
    pub leave: BTreeMap<OwnedRoomId, LeftRoom>,
    pub knock: BTreeMap<OwnedRoomId, KnockedRoom>,
}

impl RoomSections {
    fn is_empty(&self) -> bool {
        self.join.is_empty() && self.invite.is_empty() && self.leave.is_empty() && self.knock.is_empty()
    }
}

#[derive(Debug, Default, Serialize)]
pub struct DeviceLists {
    pub changed: Vec<OwnedUserId>,
    pub left: Vec<OwnedUserId>,
}

/// A sync response body (Client-Server API `GET /sync`).
#[derive(Debug, Default, Serialize)]
pub struct SyncResponse {
    pub next_batch: String,
    pub rooms: RoomSections,
    pub presence: EventList,
    pub account_data: EventList,
    pub to_device: EventList,
    pub device_lists: DeviceLists,
    pub device_one_time_keys_count: BTreeMap<String, u64>,
    pub device_unused_fallback_key_types: Vec<String>,
    /// Where this response's stream data ends (not serialised).
    #[serde(skip)]
    pub token: StreamToken,
    /// The timeline events from others this response delivers (not serialised): once the device
    /// confirms it got them, they count as delivered (`spec/delivered-receipts.md`).
    #[serde(skip)]
    pub delivered: Vec<Delivered>,
}

/// An event that reached a device.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub room_id: OwnedRoomId,
    pub event_id: ruma::OwnedEventId,
    pub sender: OwnedUserId,
    pub stream_pos: i64,
    /// `main` or the thread root.
    pub thread: String,
}

impl SyncResponse {
    /// Whether the response carries anything besides the token.
    pub fn is_empty(&self) -> bool {
        self.rooms.is_empty()
            && self.presence.is_empty()
            && self.account_data.is_empty()
            && self.to_device.is_empty()
            && self.device_lists.changed.is_empty()
            && self.device_lists.left.is_empty()
    }
}

/// A device: user and device ID.
type DeviceKey = (OwnedUserId, String);

/// One sync request, transport-independent.
#[derive(Debug, Clone)]
pub struct SyncRequest {
    pub user_id: OwnedUserId,
    pub device_id: String,
    pub since: Option<StreamToken>,
    pub filter: FilterDefinition,
    pub full_state: bool,
}

pub struct Sync {
    rooms: Arc<Rooms>,
    streams: Arc<Streams>,
    typing: Arc<Typing>,
    presence: Arc<Presence>,
    notifications: Arc<Notifications>,
    receipts: Arc<Receipts>,
    /// Per device: the token of the last `/sync` response and what it delivered. The device's
    /// next request with that token as `since` proves the response arrived.
    last_responses: parking_lot::Mutex<HashMap<DeviceKey, (StreamToken, Vec<Delivered>)>>,
    /// Per device: up to where its to-device messages are known to be deleted.
    to_device_deleted: parking_lot::Mutex<HashMap<DeviceKey, i64>>,
    /// Per device: the stream position its latest acknowledged token reaches (it holds every
    /// event up to there); the push sender does not push those to it.
    received: parking_lot::Mutex<HashMap<DeviceKey, i64>>,
}

impl Sync {
    pub fn new(
        rooms: Arc<Rooms>,
        typing: Arc<Typing>,
        presence: Arc<Presence>,
        notifications: Arc<Notifications>,
        receipts: Arc<Receipts>,
    ) -> Sync {
        let streams = rooms.streams.clone();
        Sync {
            rooms,
            streams,
            typing,
            presence,
            notifications,
            receipts,
            last_responses: Default::default(),
            to_device_deleted: Default::default(),
            received: Default::default(),
        }
    }

    /// A device confirmed it holds everything up to `token`: to-device messages before it are
    /// deleted and the events in `delivered` count as delivered.
    pub async fn acknowledge(
        &self,
        user: &UserId,
        device: &str,
        token: StreamToken,
        delivered: &[Delivered],
    ) -> Result<()> {
        // Delete only when there is something new to delete (a write per sync would queue every
        // sync behind the database writer).
        let key = (user.to_owned(), device.to_owned());
        {
            let mut received = self.received.lock();
            if received.len() > 200_000 {
                received.clear();
            }
            let upto = received.entry(key.clone()).or_default();
            *upto = (*upto).max(token.stream);
        }
        let latest = self.streams.to_device_pos(user, device);
        let deleted = self.to_device_deleted.lock().get(&key).copied();
        // Only as far as the token says they were delivered (a sync sends a page at most).
        let upto = token.to_device();
        if deleted.is_none_or(|deleted| latest > deleted) && upto > deleted.unwrap_or(-1) {
            self.rooms.db.delete_to_device_upto(user, device, upto).await?;
            self.to_device_deleted.lock().insert(key, upto.min(latest).max(deleted.unwrap_or(0)));
        }
        self.receipts.record_delivered(user, delivered).await
    }

    /// The stream position up to which `device` acknowledged receiving everything.
    pub fn received_upto(&self, user: &UserId, device: &str) -> i64 {
        self.received.lock().get(&(user.to_owned(), device.to_owned())).copied().unwrap_or(0)
    }

    pub fn streams(&self) -> &Arc<Streams> {
        &self.streams
    }

    pub fn presence(&self) -> &Arc<Presence> {
        &self.presence
    }

    /// Remembers deliveries a device has not confirmed yet (a WebSocket closed before its last
    /// frames were acknowledged); a later `/sync` or `subscribe` from `token` confirms them.
    pub fn remember_unconfirmed(&self, user: &UserId, device: &str, token: StreamToken, delivered: Vec<Delivered>) {
        let mut last = self.last_responses.lock();
        if last.len() > 100_000 {
            last.clear();
        }
        last.insert((user.to_owned(), device.to_owned()), (token, delivered));
    }

    /// The unconfirmed deliveries a resume from `since` confirms.
    pub fn take_unconfirmed(&self, user: &UserId, device: &str, since: StreamToken) -> Vec<Delivered> {
        let key = (user.to_owned(), device.to_owned());
        let mut last = self.last_responses.lock();
        match last.get(&key) {
            Some((token, _)) if *token == since => last.remove(&key).map(|(_, d)| d).unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// `/sync`: the request's `since` acknowledges the previous response, then long-polls.
    pub async fn wait(&self, request: &SyncRequest, timeout: Duration) -> Result<SyncResponse> {
        let key = (request.user_id.clone(), request.device_id.clone());
        if let Some(since) = request.since {
            let confirmed = self.take_unconfirmed(&request.user_id, &request.device_id, since);
            // Boxed, as is every step of `long_poll` that is not the wait: a future is as big
            // as its biggest state, and a parked long-poll should hold only what it waits with.
            Box::pin(self.acknowledge(&request.user_id, &request.device_id, since, &confirmed)).await?;
        }
        let response = self.long_poll(request, timeout).await?;
        if !response.delivered.is_empty() {
            self.remember_unconfirmed(&key.0, &key.1, response.token, response.delivered.clone());
        }
        Ok(response)
    }

    /// Long-poll without side effects: returns as soon as there is something new after `since`
    /// (or at `timeout`).
    pub async fn long_poll(&self, request: &SyncRequest, timeout: Duration) -> Result<SyncResponse> {
        let mut woken = self.streams.notifier.subscribe(&request.user_id);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // The response is built in its own box and, when empty, dropped before the wait:
            // while parked, this future holds the notifier's receiver and the deadline only.
            {
                let response = Box::pin(self.changes(request)).await?;
                if !response.is_empty()
                    || request.since.is_none()
                    || request.full_state
                    || tokio::time::Instant::now() >= deadline
                    || self.streams.is_shutting_down()
                {
                    return Ok(response);
                }
            }
            let closed = tokio::select! {
                changed = woken.changed() => changed.is_err(),
                () = tokio::time::sleep_until(deadline) => false,
            };
            if closed {
                return Box::pin(self.changes(request)).await;
            }
        }
    }

    /// The device's one-time key counts (the usual algorithm always listed: clients read a
    /// missing count as "upload keys") and its unused fallback key algorithms.
    async fn key_counts(&self, user: &UserId, device: &str) -> Result<(BTreeMap<String, u64>, Vec<String>)> {
        let mut counts = self.rooms.db.one_time_key_counts(user, device).await?;
        counts.entry("signed_curve25519".to_owned()).or_insert(0);
        Ok((counts, self.rooms.db.unused_fallback_key_types(user, device).await?))
    }

    /// Everything that changed for the request's user and device since its token, up to now.
    pub async fn changes(&self, request: &SyncRequest) -> Result<SyncResponse> {
        let upto = self.streams.position();
        let ephemeral_upto = self.streams.ephemeral_position();
        let user = &*request.user_id;
        let initial = request.since.is_none();
        let since = request.since.unwrap_or_default();
        let room_filter = &request.filter.room;
        let mut response = SyncResponse {
            next_batch: StreamToken::new(upto, ephemeral_upto).to_string(),
            token: StreamToken::new(upto, ephemeral_upto),
            ..SyncResponse::default()
        };
        let (counts, fallback_types) = self.key_counts(user, request.device_id.as_str()).await?;
        response.device_one_time_keys_count = counts;
        response.device_unused_fallback_key_types = fallback_types;

        let ignored = self.rooms.ignored_users(user).await?;
        let mut memberships = self.streams.user_rooms(user, upto);
        memberships
            .retain(|(room, _, _)| filter::room_allowed(room_filter.rooms.as_deref(), &room_filter.not_rooms, room));

        // Account data, grouped by room, fetched once.
        // Each section is read only if the in-memory views say something changed since `since`.
        let account_data = if initial || self.streams.account_data_pos(user) > since.stream {
            self.rooms.db.account_data_since(user, if initial { 0 } else { since.stream }, upto).await?
        } else {
            Vec::new()
        };
        let mut room_account_data: HashMap<OwnedRoomId, Vec<Box<RawValue>>> = HashMap::new();
        // Clients read their push rules from account data: a user who never changed one has
        // the server defaults, which an initial sync carries as if stored.
        if initial
            && !account_data.iter().any(|row| row.room_id.is_none() && row.data_type == PUSH_RULES)
            && filter::event_matches(&request.filter.account_data, PUSH_RULES, None)
        {
            let event = crate::service::push::rules::PushRules::default_event(user);
            response.account_data.events.push(serde_json::value::to_raw_value(&event).expect("json"));
        }
        for row in account_data {
            let event = account_data_event(&row.data_type, &row.content);
            match row.room_id {
                None => {
                    if filter::event_matches(&request.filter.account_data, &row.data_type, None) {
                        response.account_data.events.push(event);
                    }
                }
                Some(room) => {
                    if filter::event_matches(&filter_as_filter(&room_filter.account_data), &row.data_type, None) {
                        room_account_data.entry(room).or_default().push(event);
                    }
                }
            }
        }

        let joined: HashSet<OwnedRoomId> =
            memberships.iter().filter(|(_, m, _)| m == "join").map(|(room, _, _)| room.clone()).collect();
        let candidates: HashSet<OwnedRoomId> = if initial || request.full_state {
            joined.clone()
        } else {
            let mut changed = self.streams.changed_rooms(&joined, since.stream, upto);
            for (room, membership, pos) in &memberships {
                if membership == "join" && *pos > since.stream {
                    changed.insert(room.clone());
                }
            }
            changed.extend(room_account_data.keys().filter(|r| joined.contains(*r)).cloned());
            for room in &joined {
                if self.typing.typing_since(room, since.ephemeral).is_some() {
                    changed.insert(room.clone());
                }
            }
            changed
        };

        let mut newly_shared = HashSet::new();
        // Users who may no longer share a room with `user`: members of rooms they left, and
        // members seen leaving rooms they are in.
        let mut maybe_unshared = HashSet::new();
        for (room_id, membership, membership_pos) in &memberships {
            let newly = !initial && *membership_pos > since.stream;
            match membership.as_str() {
                "join" if candidates.contains(room_id) => {
                    // A room seen for the first time gets its last events and full state;
                    // `full_state` only widens the state, the timeline still starts at `since`.
                    let fresh = initial || newly;
                    let full_state = fresh || request.full_state;
                    let data = room_account_data.remove(room_id).unwrap_or_default();
                    let room = self
                        .joined_room(
                            request,
                            room_id,
                            since,
                            upto,
                            fresh,
                            full_state,
                            data,
                            &ignored,
                            &mut response.delivered,
                        )
                        .await?;
                    if newly {
                        newly_shared.extend(self.streams.members(room_id, "join"));
                    }
                    if let Some(mut room) = room {
                        for (member, membership) in std::mem::take(&mut room.member_changes) {
                            match membership.as_str() {
                                "join" => _ = newly_shared.insert(member),
                                "leave" | "ban" => _ = maybe_unshared.insert(member),
                                _ => {}
                            }
                        }
                        response.rooms.join.insert(room_id.clone(), room);
                    }
                }
                "invite" if initial || newly => {
                    if let Some(room) = self.invited_room(user, room_id, &ignored).await? {
                        response.rooms.invite.insert(room_id.clone(), room);
                    }
                }
                "knock" if initial || newly => {
                    let state = match self.out_of_band(room_id, user).await? {
                        Some(knock) => out_of_band_state(&knock),
                        None => self.stripped_state(room_id, user).await?,
                    };
                    response
                        .rooms
                        .knock
                        .insert(room_id.clone(), KnockedRoom { knock_state: EventList { events: state } });
                }
                "leave" | "ban" if (newly && !initial) || (initial && room_filter.include_leave) => {
                    if self.rooms.db.membership(room_id, user).await?.is_some_and(|m| m.forgotten) {
                        continue;
                    }
                    if newly {
                        maybe_unshared.extend(self.streams.members(room_id, "join"));
                    }
                    let data = room_account_data.remove(room_id).unwrap_or_default();
                    if let Some(left) = self.out_of_band(room_id, user).await? {
                        response.rooms.leave.insert(room_id.clone(), out_of_band_left(&left, data));
                        continue;
                    }
                    let room = self.left_room(request, room_id, since, *membership_pos, data, &ignored).await?;
                    response.rooms.leave.insert(room_id.clone(), room);
                }
                _ => {}
            }
        }

        // Presence of people sharing rooms.
        if self.presence.enabled() {
            for view in self.presence.changes_for(user, if initial { 0 } else { since.ephemeral }) {
                if filter::event_matches(&request.filter.presence, "m.presence", Some(&view.user_id)) {
                    response.presence.events.push(serde_json::value::to_raw_value(&view.to_event()).expect("json"));
                }
            }
        }

        // To-device messages for this device, continuing from where the last response stopped.
        // At most a page per response: the token then says how far they were delivered, so the
        // next sync continues there and only what was sent is deleted.
        let to_device_after = if initial { 0 } else { since.to_device() };
        let to_device = if initial || self.streams.to_device_pos(user, &request.device_id) > to_device_after {
            self.rooms.db.to_device_since(user, &request.device_id, to_device_after, upto, TO_DEVICE_LIMIT + 1).await?
        } else {
            Vec::new()
        };
        if to_device.len() as i64 > TO_DEVICE_LIMIT {
            let delivered_upto = to_device[TO_DEVICE_LIMIT as usize - 1].stream_pos;
            response.token = response.token.with_to_device(delivered_upto);
            response.next_batch = response.token.to_string();
        }
        for message in to_device.into_iter().take(TO_DEVICE_LIMIT as usize) {
            let content: Box<RawValue> = RawValue::from_string(message.content).unwrap_or_else(|_| empty_object());
            let event = json!({"type": message.event_type, "sender": message.sender.as_str(), "content": content});
            response.to_device.events.push(serde_json::value::to_raw_value(&event).expect("json"));
        }

        // Device lists: `changed` has the people sharing a room whose devices changed and those
        // who newly share one; `left` those who shared one and no longer do (the client stops
        // tracking their devices).
        if !initial
            && (self.streams.device_change_pos() > since.stream
                || !newly_shared.is_empty()
                || !maybe_unshared.is_empty())
        {
            let sharing = self.streams.users_sharing_rooms(user);
            let changes = if self.streams.device_change_pos() > since.stream {
                self.rooms.db.device_list_changes_since(since.stream, upto).await?
            } else {
                Vec::new()
            };
            // `sharing` holds local users; a remote user's change counts if they share a room.
            let mut changed: HashSet<OwnedUserId> = changes
                .into_iter()
                .filter(|u| {
                    sharing.contains(u)
                        || (u.server_name() != self.rooms.server_name() && self.streams.share_a_room(user, u))
                })
                .collect();
            changed.extend(newly_shared.into_iter().filter(|u| u != user && self.streams.share_a_room(user, u)));
            let mut changed: Vec<_> = changed.into_iter().collect();
            changed.sort();
            response.device_lists.changed = changed;
            let mut left: Vec<_> =
                maybe_unshared.into_iter().filter(|u| u != user && !self.streams.share_a_room(user, u)).collect();
            left.sort();
            response.device_lists.left = left;
        }
        Ok(response)
    }

    #[allow(clippy::too_many_arguments)] // One call site; the parameters are the sync's context.
    async fn joined_room(
        &self,
        request: &SyncRequest,
        room_id: &RoomId,
        since: StreamToken,
        upto: i64,
        fresh: bool,
        full: bool,
        account_data: Vec<Box<RawValue>>,
        ignored: &HashSet<OwnedUserId>,
        delivered: &mut Vec<Delivered>,
    ) -> Result<Option<JoinedRoom>> {
        let user = &*request.user_id;
        let room_filter = &request.filter.room;
        let timeline_filter = &room_filter.timeline;
        let limit = timeline_filter
            .limit
            .map_or(DEFAULT_TIMELINE_LIMIT, |l| u64::from(l) as usize)
            .clamp(1, MAX_TIMELINE_LIMIT);
        let lazy = filter::lazy_loading(&room_filter.state);

        let (events, limited) = self
            .timeline(user, room_id, if fresh { 0 } else { since.stream }, upto, limit, timeline_filter, ignored)
            .await?;
        // The room's state where the timeline starts: its current state then (from the log of
        // current-state changes), not the state before the first event, which may sit on a side
        // branch.
        let start_group = match events.first() {
            Some(first) => match self.rooms.current_group_at(room_id, first.stream_pos - 1).await? {
                // Nothing was current before it: a room joined over federation, whose state came
                // with the join (the state before the join event).
                0 => first.state_before,
                group => group,
            },
            None => self.rooms.current_group_at(room_id, upto).await?,
        };
        let in_timeline: HashSet<&ruma::EventId> = events.iter().map(|e| &*e.pdu.event_id).collect();

        let mut state: Vec<Arc<StoredEvent>> = if full {
            let all = self.rooms.state_events(start_group, Some(&room_filter.state)).await?;
            if lazy {
                let senders: HashSet<&UserId> = events.iter().map(|e| &*e.pdu.sender).chain([user]).collect();
                all.into_iter()
                    .filter(|e| {
                        e.pdu.event_type.to_string() != "m.room.member"
                            || e.pdu
                                .state_key
                                .as_deref()
                                .and_then(|k| UserId::parse(k).ok())
                                .is_some_and(|u| senders.contains(&*u))
                    })
                    .collect()
            } else {
                all
            }
        } else if limited || self.streams.state_resolved_since(room_id, since.stream) {
            // A gap in the timeline, or a resolution between branches changed the state in a
            // way its events do not show: the changes from the state at `since`. (Without
            // either, the timeline's state events are the whole change.)
            let before_group = self.rooms.current_group_at(room_id, since.stream).await?;
            let after_group = if limited { start_group } else { self.rooms.current_group_at(room_id, upto).await? };
            let mut delta = Vec::new();
            for event_id in self.rooms.state_delta(before_group, after_group).await? {
                if let Some(event) = self.rooms.event(&event_id).await?
                    && filter::room_event_matches(&room_filter.state, &event.pdu)
                {
                    delta.push(event);
                }
            }
            if lazy {
                // Members of the senders in view, so the client can render them.
                for member in self.rooms.members_for(start_group, &events).await? {
                    if !delta.iter().any(|e| e.pdu.event_id == member.pdu.event_id) {
                        delta.push(member);
                    }
                }
            }
            delta.sort_by_key(|e| e.stream_pos);
            delta
        } else if lazy && !events.is_empty() {
            // Members of senders not otherwise known to the client.
            self.rooms.members_for(start_group, &events).await?
        } else {
            Vec::new()
        };
        state.retain(|e| !in_timeline.contains(&*e.pdu.event_id));

        let typing = self.typing.typing_since(room_id, if fresh { 0 } else { since.ephemeral });
        let receipts = if fresh || self.streams.latest_receipt(room_id) > since.stream {
            let after = if fresh { 0 } else { since.stream };
            match self.streams.recent_receipts(room_id, after, upto) {
                Some(rows) => rows,
                None => self.rooms.db.room_receipts_since(room_id, after, upto).await?,
            }
        } else {
            Vec::new()
        };
        let mut ephemeral = Vec::new();
        if let Some(users) = typing {
            ephemeral.push(
                serde_json::value::to_raw_value(&json!({"type": "m.typing", "content": {"user_ids": users}}))
                    .expect("json"),
            );
        }
        let mut receipt_content: BTreeMap<String, BTreeMap<String, BTreeMap<String, Value>>> = BTreeMap::new();
        let mut opted_out: HashMap<OwnedUserId, bool> = HashMap::new();
        for receipt in receipts {
            if receipt.receipt_type == "m.read.private" && receipt.user_id != user {
                continue;
            }
            if receipt.receipt_type == crate::service::receipts::DELIVERED {
                // Shown to everyone in the room, the user's own devices included (their other
                // devices learn what already arrived), unless the user opted out.
                let hidden = match opted_out.get(&receipt.user_id) {
                    Some(hidden) => *hidden,
                    None => {
                        let hidden = !self.receipts.delivered_enabled_for(&receipt.user_id).await?;
                        opted_out.insert(receipt.user_id.clone(), hidden);
                        hidden
                    }
                };
                if hidden {
                    continue;
                }
            }
            if ignored.contains(&receipt.user_id) {
                continue;
            }
            let mut info = json!({"ts": receipt.ts});
            if !receipt.thread_id.is_empty() {
                info["thread_id"] = json!(receipt.thread_id);
            }
            receipt_content
                .entry(receipt.event_id.to_string())
                .or_default()
                .entry(receipt.receipt_type.clone())
                .or_default()
                .insert(receipt.user_id.to_string(), info);
        }
        if !receipt_content.is_empty() {
            ephemeral.push(
                serde_json::value::to_raw_value(&json!({"type": "m.receipt", "content": receipt_content}))
                    .expect("json"),
            );
        }
        let ephemeral_filter = filter_as_filter(&room_filter.ephemeral);
        ephemeral.retain(|e| {
            let event_type =
                serde_json::from_str::<Value>(e.get()).ok().and_then(|v| v["type"].as_str().map(str::to_owned));
            event_type.is_none_or(|t| filter::event_matches(&ephemeral_filter, &t, None))
        });

        let changed_membership =
            events.iter().chain(state.iter()).any(|e| e.pdu.event_type.to_string() == "m.room.member");
        if !full && events.is_empty() && state.is_empty() && ephemeral.is_empty() && account_data.is_empty() {
            return Ok(None);
        }
        let (joined_count, invited_count) = self.streams.member_counts(room_id);
        let summary = if full || limited || changed_membership {
            Summary {
                heroes: Some(self.streams.heroes(room_id, user, 5)),
                joined_member_count: Some(joined_count),
                invited_member_count: Some(invited_count),
            }
        } else {
            Summary::default()
        };
        let unread = self.notifications.unread(user, room_id, upto).await?;
        // Thread counts apart when the client asks for them; otherwise all in one.
        let (main, unread_thread_notifications) = if timeline_filter.unread_thread_notifications {
            let threads = unread
                .threads
                .iter()
                .map(|(root, c)| {
                    (
                        root.clone(),
                        UnreadNotifications { notification_count: c.notifications, highlight_count: c.highlights },
                    )
                })
                .collect();
            (unread.main, threads)
        } else {
            (unread.total(), BTreeMap::new())
        };
        // A timeline that reaches a gap (history we do not hold, such as before a join over
        // federation) is limited too, so the client paginates back from `prev_batch`, where
        // `/messages` backfills. Only the flag: the state sections stay as computed above.
        let reaches_gap = !limited && !events.is_empty() && self.rooms.reaches_gap(&events).await?;
        let prev_batch = match events.first() {
            Some(first) => StreamToken::new(first.stream_pos - 1, 0).to_string(),
            None => StreamToken::new(upto, 0).to_string(),
        };
        let member_changes = if fresh {
            Vec::new()
        } else {
            events
                .iter()
                .chain(state.iter())
                .filter(|e| {
                    e.stream_pos > since.stream && e.pdu.event_type == ruma::events::TimelineEventType::RoomMember
                })
                .filter_map(|e| {
                    let member = UserId::parse(e.pdu.state_key.as_deref()?).ok()?;
                    let membership = e.pdu.content_value().get("membership")?.as_str()?.to_owned();
                    Some((member, membership))
                })
                .collect()
        };
        delivered.extend(events.iter().filter(|e| e.pdu.sender != user).map(|e| Delivered {
            room_id: room_id.to_owned(),
            event_id: e.pdu.event_id.clone(),
            sender: e.pdu.sender.clone(),
            stream_pos: e.stream_pos,
            thread: crate::service::receipts::thread_of(&e.pdu),
        }));
        Ok(Some(JoinedRoom {
            summary,
            state: EventList {
                events: self.rooms.serve(user, Some(&request.device_id), &state, Format::WithoutRoomId).await?,
            },
            timeline: Timeline {
                events: self
                    .rooms
                    .serve_timeline(user, Some(&request.device_id), &events, Format::WithoutRoomId, upto)
                    .await?,
                limited: limited || reaches_gap,
                prev_batch: Some(prev_batch),
            },
            ephemeral: EventList { events: ephemeral },
            account_data: EventList { events: account_data },
            unread_notifications: UnreadNotifications {
                notification_count: main.notifications,
                highlight_count: main.highlights,
            },
            unread_thread_notifications,
            member_changes,
        }))
    }

    /// The newest events in `(after, upto]` (at most `limit`, oldest first) and whether older
    /// ones were left out.
    #[allow(clippy::too_many_arguments)] // Internal helper mirroring the timeline filter's inputs.
    async fn timeline(
        &self,
        user: &UserId,
        room_id: &RoomId,
        after: i64,
        upto: i64,
        limit: usize,
        timeline_filter: &RoomEventFilter,
        ignored: &HashSet<OwnedUserId>,
    ) -> Result<(Vec<Arc<StoredEvent>>, bool)> {
        // Active rooms are served from the in-memory window of recent events.
        if let Some(recent) = self.streams.recent_events(room_id, after, upto) {
            let candidates: Vec<_> = recent
                .into_iter()
                .filter(|e| !e.soft_failed && filter::room_event_matches(timeline_filter, &e.pdu))
                .collect();
            let mut visible = self.rooms.filter_visible(user, candidates, ignored).await?;
            let limited = visible.len() > limit;
            if limited {
                visible.drain(..visible.len() - limit);
            }
            if !limited || visible.len() == limit {
                return Ok((visible, limited));
            }
        }
        let mut events = Vec::new();
        let mut cursor = upto;
        let mut limited = false;
        let batch = (limit as i64 + 1).max(2);
        for _ in 0..20 {
            let rows = self.rooms.db.room_events(room_id, after, cursor, Dir::Backward, batch).await?;
            let fetched = rows.len() as i64;
            let Some(last) = rows.last().map(|r| r.stream_pos) else { break };
            cursor = last - 1;
            let candidates: Vec<_> = self
                .rooms
                .events_from_rows(rows)?
                .into_iter()
                .filter(|e| filter::room_event_matches(timeline_filter, &e.pdu))
                .collect();
            for event in self.rooms.filter_visible(user, candidates, ignored).await? {
                if events.len() == limit {
                    limited = true;
                    break;
                }
                events.push(event);
            }
            if limited || fetched < batch {
                break;
            }
        }
        events.reverse();
        Ok((events, limited))
    }

    async fn invited_room(
        &self,
        user: &UserId,
        room_id: &RoomId,
        ignored: &HashSet<OwnedUserId>,
    ) -> Result<Option<InvitedRoom>> {
        if let Some(invite) = self.out_of_band(room_id, user).await? {
            if ignored.contains(&invite.sender) {
                return Ok(None);
            }
            return Ok(Some(InvitedRoom { invite_state: EventList { events: out_of_band_state(&invite) } }));
        }
        let Some(invite) = self.rooms.db.membership(room_id, user).await? else { return Ok(None) };
        if ignored.contains(&invite.sender) {
            return Ok(None);
        }
        let mut events = self.stripped_state(room_id, user).await?;
        if let Some(event) = self.rooms.event(&invite.event_id).await? {
            events.push(self.rooms.serve(user, None, &[event], Format::WithoutRoomId).await?.remove(0));
        }
        Ok(Some(InvitedRoom { invite_state: EventList { events } }))
    }

    /// See [`Rooms::out_of_band_membership`].
    async fn out_of_band(&self, room_id: &RoomId, user: &UserId) -> Result<Option<OutOfBandMembership>> {
        self.rooms.out_of_band_membership(room_id, user).await
    }

    /// The stripped state shown with invites and knocks.
    async fn stripped_state(&self, room_id: &RoomId, user: &UserId) -> Result<Vec<Box<RawValue>>> {
        let mut events = Vec::new();
        for event_type in [
            "m.room.create",
            "m.room.join_rules",
            "m.room.name",
            "m.room.avatar",
            "m.room.canonical_alias",
            "m.room.topic",
            "m.room.encryption",
        ] {
            if let Some(event) = self.rooms.current_state_event(room_id, event_type, "").await? {
                events.push(client_event::to_stripped(&event.pdu));
            }
        }
        let _ = user;
        Ok(events)
    }

    async fn left_room(
        &self,
        request: &SyncRequest,
        room_id: &RoomId,
        since: StreamToken,
        left_at: i64,
        account_data: Vec<Box<RawValue>>,
        ignored: &HashSet<OwnedUserId>,
    ) -> Result<LeftRoom> {
        let user = &*request.user_id;
        let timeline_filter = &request.filter.room.timeline;
        let limit = timeline_filter
            .limit
            .map_or(DEFAULT_TIMELINE_LIMIT, |l| u64::from(l) as usize)
            .clamp(1, MAX_TIMELINE_LIMIT);
        let (events, limited) =
            self.timeline(user, room_id, since.stream, left_at, limit, timeline_filter, ignored).await?;
        let group = self.rooms.db.room_state_group_at(room_id, left_at).await?.unwrap_or(0);
        let in_timeline: HashSet<&ruma::EventId> = events.iter().map(|e| &*e.pdu.event_id).collect();
        let state: Vec<_> = if limited {
            self.rooms
                .state_events(group, Some(&request.filter.room.state))
                .await?
                .into_iter()
                .filter(|e| !in_timeline.contains(&*e.pdu.event_id))
                .collect()
        } else {
            Vec::new()
        };
        let prev_batch = events.first().map(|first| StreamToken::new(first.stream_pos - 1, 0).to_string());
        Ok(LeftRoom {
            state: EventList {
                events: self.rooms.serve(user, Some(&request.device_id), &state, Format::WithoutRoomId).await?,
            },
            timeline: Timeline {
                events: self
                    .rooms
                    .serve_timeline(user, Some(&request.device_id), &events, Format::WithoutRoomId, left_at)
                    .await?,
                limited,
                prev_batch,
            },
            account_data: EventList { events: account_data },
        })
    }
}

/// The stripped state the room's server sent with an out-of-band invite or knock, each event
/// cut to `type`, `state_key`, `content` and `sender` (the server may have sent full PDUs), and
/// the member event itself last.
fn out_of_band_state(row: &OutOfBandMembership) -> Vec<Box<RawValue>> {
    let mut sent: Vec<Value> = serde_json::from_str(&row.stripped_state).unwrap_or_default();
    if let Ok(member) = serde_json::from_str::<Value>(&row.event_json) {
        sent.push(member);
    }
    sent.iter()
        .filter_map(|event| {
            let stripped = json!({
                "type": event.get("type")?.as_str()?,
                "state_key": event.get("state_key")?.as_str()?,
                "content": event.get("content")?.as_object()?,
                "sender": event.get("sender")?.as_str()?,
            });
            serde_json::value::to_raw_value(&stripped).ok()
        })
        .collect()
}

/// A room left without this server ever being in it (a rejected or withdrawn invite, a
/// retracted or refused knock, a ban): no state, the member event as the timeline when the
/// room's server gave us one.
fn out_of_band_left(row: &OutOfBandMembership, account_data: Vec<Box<RawValue>>) -> LeftRoom {
    let leave = Pdu::from_json(row.event_json.clone(), row.room_id.clone(), row.event_id.clone()).ok();
    let events = leave
        .iter()
        .filter(|pdu| matches!(pdu.content_value().get("membership").and_then(Value::as_str), Some("leave" | "ban")))
        .map(|pdu| client_event::to_client(pdu, Format::WithoutRoomId, &client_event::Unsigned::default()))
        .collect();
    LeftRoom {
        state: EventList::default(),
        timeline: Timeline { events, limited: false, prev_batch: None },
        account_data: EventList { events: account_data },
    }
}

fn empty_object() -> Box<RawValue> {
    RawValue::from_string("{}".to_owned()).expect("valid JSON")
}

fn account_data_event(data_type: &str, content: &str) -> Box<RawValue> {
    let content = RawValue::from_string(content.to_owned()).unwrap_or_else(|_| empty_object());
    serde_json::value::to_raw_value(&json!({"type": data_type, "content": content})).expect("json")
}

/// A room event filter's type and sender parts, as a plain event filter.
fn filter_as_filter(filter: &RoomEventFilter) -> ruma::api::client::filter::Filter {
    let mut plain = ruma::api::client::filter::Filter::default();
    plain.types = filter.types.clone();
    plain.not_types = filter.not_types.clone();
    plain.senders = filter.senders.clone();
    plain.not_senders = filter.not_senders.clone();
    plain
}
