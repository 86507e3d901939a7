//! Push notifications: push rules ([`rules`]), pushers, the list of notifications, and the push
//! sender that tells push gateways (Sygnal and the like) about events that notify.
//!
//! The sender follows the event stream from its last stored position, so a restart loses no
//! event. For each new event it evaluates the push rules of the room's local members that have
//! a pusher (and only theirs: everyone's unread counts are made lazily at sync time by
//! [`Notifications`]). A notification waits `push.coalesce_ms` before it goes out: by then a
//! device with a live `/sync` long-poll or WebSocket has received the event (it acknowledged a
//! token past it) and is not pushed, and a burst of messages in a room becomes one push, of the
//! latest, with the current counts.

pub mod rules;

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use ruma::{
    OwnedRoomId, OwnedUserId, UInt, UserId,
    api::client::push::{
        Pusher, PusherKind,
        get_notifications::v3::Notification,
        set_pusher::v3::{PusherAction, PusherPostData},
    },
    push::{Action, Tweak},
    serde::Raw,
};
use serde_json::{Map, Value, json};

use crate::{
    config::PushConfig,
    error::{Error, Result},
    matrix::client_event::{self, Format, Unsigned},
    service::{
        media::preview::{AddressPolicy, SafeFetcher},
        notifications::Notifications,
        now_ms, receipts,
        rooms::{Rooms, StoredEvent},
        sync::Sync,
    },
    storage::{Db, push::PusherRow},
};
use rules::PushRules;

/// The path every HTTP pusher's URL must have (the spec's push gateway API).
const NOTIFY_PATH: &str = "/_matrix/push/v1/notify";
/// Events the sender reads from the stream at a time.
const BATCH: i64 = 500;
/// Events `/notifications` evaluates per request at most (older ones are on the next page).
const MAX_SCANNED: usize = 2000;
const LONGEST_RETRY_WAIT: Duration = Duration::from_secs(300);

/// One pusher's notification waiting for its moment: the latest notifying event per room.
struct Pending {
    pusher: PusherRow,
    since: Instant,
    rooms: HashMap<OwnedRoomId, (Arc<StoredEvent>, Vec<Action>)>,
}

type PusherKey = (OwnedUserId, String, String);

pub struct Push {
    pub rules: Arc<PushRules>,
    db: Db,
    rooms: Arc<Rooms>,
    notifications: Arc<Notifications>,
    sync: Arc<Sync>,
    config: PushConfig,
    fetcher: Option<SafeFetcher>,
    /// Local users with at least one pusher (a superset: a removed pusher leaves its user here
    /// until the sender next looks their pushers up).
    with_pushers: Mutex<HashSet<OwnedUserId>>,
    pending: Mutex<HashMap<PusherKey, Pending>>,
    /// Wakes the dispatcher when something is pending.
    queued: tokio::sync::Notify,
}

impl Push {
    pub async fn new(
        db: Db,
        rooms: Arc<Rooms>,
        notifications: Arc<Notifications>,
        sync: Arc<Sync>,
        rules: Arc<PushRules>,
        config: &crate::config::Config,
    ) -> std::result::Result<Arc<Push>, String> {
        let push = &config.push;
        let fetcher = || -> std::result::Result<SafeFetcher, String> {
            let dns = crate::federation::discovery::resolver(&config.federation)?;
            let tls = crate::federation::tls::client_config(&config.federation.extra_ca_certificates)?;
            let policy = AddressPolicy {
                allow_private: false,
                allowed: push.allowed_ip_ranges.clone(),
                denied: push.denied_ip_ranges.clone(),
            };
            SafeFetcher::new(dns, policy, tls, Duration::from_secs(push.timeout_secs), 0)
        };
        // A machine without DNS or CA configuration still starts; it just sends no pushes.
        let fetcher = match push.enabled.then(fetcher) {
            Some(Ok(fetcher)) => Some(fetcher),
            Some(Err(err)) => {
                tracing::warn!(%err, "push notifications are off: no HTTP client for push gateways");
                None
            }
            None => None,
        };
        let with_pushers = db.users_with_pushers().await.map_err(|e| format!("cannot read pushers: {e}"))?;
        Ok(Arc::new(Push {
            rules,
            db,
            rooms,
            notifications,
            sync,
            config: push.clone(),
            fetcher,
            with_pushers: Mutex::new(with_pushers.into_iter().collect()),
            pending: Mutex::new(HashMap::new()),
            queued: tokio::sync::Notify::new(),
        }))
    }

    /// Starts the sender (it follows the event stream) and the dispatcher (it pushes).
    pub fn start(self: &Arc<Self>) {
        if self.fetcher.is_none() {
            return;
        }
        let push = self.clone();
        tokio::spawn(async move { push.follow_stream().await });
        let push = self.clone();
        tokio::spawn(async move { push.dispatch().await });
    }

    // ----- pushers -----

    /// `POST /pushers/set`: creates, updates or (`kind: null`) deletes one of `user`'s pushers.
    pub async fn set_pusher(&self, user: &UserId, device: &str, action: PusherAction) -> Result<()> {
        match action {
            PusherAction::Delete(ids) => {
                self.db.delete_pusher(user, &ids.app_id, &ids.pushkey).await?;
                Ok(())
            }
            PusherAction::Post(PusherPostData { pusher, append, .. }) => {
                Self::check_pusher(&pusher)?;
                let row = PusherRow {
                    user_id: user.to_owned(),
                    app_id: pusher.ids.app_id.clone(),
                    pushkey: pusher.ids.pushkey.clone(),
                    device_id: Some(device.to_owned()),
                    pusher_json: serde_json::to_string(&pusher).map_err(|e| Error::Internal(e.to_string()))?,
                    pushkey_ts: now_ms(),
                };
                self.db.set_pusher(&row, append).await?;
                self.with_pushers.lock().insert(user.to_owned());
                Ok(())
            }
            _ => Err(Error::InvalidParam("Unknown pusher action".to_owned())),
        }
    }

    fn check_pusher(pusher: &Pusher) -> Result<()> {
        let invalid = |what: &str| Err(Error::InvalidParam(what.to_owned()));
        if pusher.ids.app_id.is_empty() || pusher.ids.app_id.len() > 64 {
            return invalid("`app_id` must be 1 to 64 characters");
        }
        if pusher.ids.pushkey.is_empty() || pusher.ids.pushkey.len() > 512 {
            return invalid("`pushkey` must be 1 to 512 bytes");
        }
        match &pusher.kind {
            PusherKind::Http(http) => {
                let Ok(url) = url::Url::parse(&http.url) else { return invalid("`data.url` is not a URL") };
                if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                    return invalid("`data.url` must be an http(s) URL");
                }
                if url.path() != NOTIFY_PATH {
                    return invalid("`data.url` must have the path /_matrix/push/v1/notify");
                }
                Ok(())
            }
            PusherKind::Email(_) => invalid("This server sends no email: email pushers are not supported"),
            _ => invalid("Unknown pusher kind"),
        }
    }

    /// `GET /pushers`.
    pub async fn pushers(&self, user: &UserId) -> Result<Vec<Pusher>> {
        let rows = self.db.pushers(user).await?;
        Ok(rows.iter().filter_map(|row| serde_json::from_str::<Pusher>(&row.pusher_json).ok()).collect())
    }

    // ----- the notification list -----

    /// `GET /notifications`: the events in `user`'s joined rooms that their push rules say
    /// notify (only the highlights with `only_highlight`), newest first, before `from`.
    /// Returns them and the token of the next page.
    pub async fn list(
        &self,
        user: &UserId,
        from: Option<&str>,
        limit: usize,
        only_highlight: bool,
    ) -> Result<(Vec<Notification>, Option<String>)> {
        let mut before = match from {
            Some(token) => token.parse::<i64>().map_err(|_| Error::InvalidParam("Invalid `from` token".to_owned()))?,
            None => self.rooms.streams.position() + 1,
        };
        let limit = limit.clamp(1, 100);
        let rooms: Vec<OwnedRoomId> = self
            .rooms
            .streams
            .user_rooms(user, i64::MAX)
            .into_iter()
            .filter(|(_, membership, _)| membership == "join")
            .map(|(room, _, _)| room)
            .collect();
        let rules = self.rules.ruleset(user).await?;
        let ignored = self.rooms.ignored_users(user).await?;
        let mut contexts = HashMap::new();
        let mut found = Vec::new();
        let mut scanned = 0;
        while found.len() < limit && scanned < MAX_SCANNED && !rooms.is_empty() {
            let rows = self.db.notifiable_events(&rooms, user, before, 200).await?;
            let exhausted = rows.len() < 200;
            let Some(last) = rows.last().map(|r| r.stream_pos) else { return Ok((found, None)) };
            scanned += rows.len();
            let events = self.rooms.events_from_rows(rows)?;
            let events = self.rooms.filter_visible(user, events, &ignored).await?;
            for event in events {
                if event.redacted_by.is_some() || event.pdu.sender == user {
                    continue;
                }
                let room_id = &event.pdu.room_id;
                if !contexts.contains_key(room_id) {
                    contexts.insert(room_id.clone(), self.notifications.context(user, room_id).await?);
                }
                let json = client_event::to_client(&event.pdu, Format::WithoutRoomId, &Unsigned::default());
                let raw: Raw<Value> = Raw::from_json(json);
                let actions = rules.get_actions(&raw, &contexts[room_id]).await;
                let notify = actions.iter().any(Action::should_notify);
                let highlight = actions.iter().any(Action::is_highlight);
                if !notify || only_highlight && !highlight {
                    continue;
                }
                let served = self
                    .rooms
                    .serve_timeline(user, None, std::slice::from_ref(&event), Format::WithoutRoomId, i64::MAX)
                    .await?;
                let Some(served) = served.into_iter().next() else { continue };
                let ts = ruma::MilliSecondsSinceUnixEpoch(event.pdu.origin_server_ts.0);
                let thread = receipts::thread_of(&event.pdu);
                let read = self.rooms.streams.read_marks(user, room_id).bound(&thread) >= event.stream_pos;
                found.push(Notification::new(actions.to_vec(), Raw::from_json(served), read, room_id.clone(), ts));
                if found.len() == limit {
                    return Ok((found, Some(event.stream_pos.to_string())));
                }
            }
            before = last;
            if exhausted {
                return Ok((found, None));
            }
        }
        Ok((found, (!rooms.is_empty() && scanned >= MAX_SCANNED).then(|| before.to_string())))
    }

    // ----- the sender -----

    /// Follows the event stream from the stored position, evaluating every new event.
    async fn follow_stream(self: Arc<Self>) {
        let streams = self.rooms.streams.clone();
        let mut pos = match self.db.push_progress().await {
            Ok(Some(pos)) => pos,
            _ => streams.position(),
        };
        let mut published = streams.subscribe_position();
        let mut stored_at = Instant::now();
        let mut stored = pos;
        loop {
            let upto = *published.borrow_and_update();
            if upto <= pos {
                if stored != pos && stored_at.elapsed() >= Duration::from_secs(1) {
                    self.store_progress(pos, &mut stored, &mut stored_at).await;
                }
                tokio::select! {
                    changed = published.changed() => if changed.is_err() { return },
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
            if self.with_pushers.lock().is_empty() {
                pos = upto;
                continue;
            }
            let rows = match self.db.events_between(pos, upto, BATCH).await {
                Ok(rows) => rows,
                Err(err) => {
                    tracing::warn!(%err, "push: cannot read the event stream");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let next = if rows.len() as i64 == BATCH { rows.last().map_or(upto, |r| r.stream_pos) } else { upto };
            match self.rooms.events_from_rows(rows) {
                Ok(events) => {
                    for event in events {
                        if let Err(err) = self.evaluate(&event).await {
                            tracing::warn!(%err, event_id = %event.pdu.event_id, "push: cannot evaluate an event");
                        }
                    }
                }
                Err(err) => tracing::warn!(%err, "push: cannot read events"),
            }
            pos = next;
            // At most one write a second: after a crash, up to a second of events is evaluated
            // again (their pushes may go out twice, never not at all).
            if stored_at.elapsed() >= Duration::from_secs(1) {
                self.store_progress(pos, &mut stored, &mut stored_at).await;
            }
        }
    }

    async fn store_progress(&self, pos: i64, stored: &mut i64, stored_at: &mut Instant) {
        match self.db.set_push_progress(pos).await {
            Ok(()) => *stored = pos,
            Err(err) => tracing::warn!(%err, "push: cannot store progress"),
        }
        *stored_at = Instant::now();
    }

    /// Evaluates `event` for the local members with pushers and queues what notifies.
    async fn evaluate(&self, event: &Arc<StoredEvent>) -> Result<()> {
        if event.redacted_by.is_some() || event.stream_pos <= 0 {
            return Ok(());
        }
        let streams = &self.rooms.streams;
        let room_id = &event.pdu.room_id;
        let sender = &event.pdu.sender;
        let server = streams.server_name();
        let mut candidates: Vec<OwnedUserId> = {
            let with = self.with_pushers.lock();
            streams
                .members(room_id, "join")
                .into_iter()
                .filter(|user| user.server_name() == server && user != sender && with.contains(user))
                .collect()
        };
        // An invite notifies the invited user, who is not a member yet.
        if event.pdu.event_type == ruma::events::TimelineEventType::RoomMember
            && event.pdu.content_value()["membership"] == "invite"
            && let Some(Ok(invited)) = event.pdu.state_key.as_deref().map(UserId::parse)
            && invited.server_name() == server
            && self.with_pushers.lock().contains(&invited)
            && !candidates.contains(&invited)
        {
            candidates.push(invited);
        }
        if candidates.is_empty() {
            return Ok(());
        }
        let json = client_event::to_client(&event.pdu, Format::WithoutRoomId, &Unsigned::default());
        let raw: Raw<Value> = Raw::from_json(json);
        for user in candidates {
            if self.rooms.ignored_users(&user).await?.contains(sender) {
                continue;
            }
            let rules = self.rules.ruleset(&user).await?;
            let context = self.notifications.context(&user, room_id).await?;
            let actions = rules.get_actions(&raw, &context).await;
            if !actions.iter().any(Action::should_notify) {
                continue;
            }
            let pushers = self.db.pushers(&user).await?;
            if pushers.is_empty() {
                self.with_pushers.lock().remove(&user);
                continue;
            }
            let mut pending = self.pending.lock();
            for pusher in pushers {
                let key = (user.clone(), pusher.app_id.clone(), pusher.pushkey.clone());
                let entry = pending.entry(key).or_insert_with(|| Pending {
                    pusher,
                    since: Instant::now(),
                    rooms: HashMap::new(),
                });
                let mut actions = actions.to_vec();
                // A highlight earlier in the burst keeps the push a highlight.
                if let Some((_, earlier)) = entry.rooms.get(room_id)
                    && highlight_of(earlier)
                    && !highlight_of(&actions)
                {
                    actions.retain(|a| !matches!(a, Action::SetTweak(Tweak::Highlight(_))));
                    actions.push(Action::SetTweak(Tweak::Highlight(true.into())));
                }
                entry.rooms.insert(room_id.clone(), (event.clone(), actions));
            }
        }
        self.queued.notify_one();
        Ok(())
    }

    /// Sends what has waited `coalesce_ms`, each pusher's in its own task.
    async fn dispatch(self: Arc<Self>) {
        let wait = Duration::from_millis(self.config.coalesce_ms);
        loop {
            let (due, next) = {
                let mut pending = self.pending.lock();
                let now = Instant::now();
                let due_keys: Vec<PusherKey> = pending
                    .iter()
                    .filter(|(_, p)| now.duration_since(p.since) >= wait)
                    .map(|(k, _)| k.clone())
                    .collect();
                let due: Vec<Pending> = due_keys.iter().filter_map(|k| pending.remove(k)).collect();
                let next = pending.values().map(|p| p.since + wait).min();
                (due, next)
            };
            for pending in due {
                let push = self.clone();
                tokio::spawn(async move { push.deliver(pending).await });
            }
            match next {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => self.queued.notified().await,
            }
        }
    }

    /// Pushes one pusher's waiting notifications: one per room, of its latest event, unless the
    /// device already received it or the user already read it.
    async fn deliver(&self, pending: Pending) {
        let pusher = &pending.pusher;
        let user = &pusher.user_id;
        let received = pusher.device_id.as_deref().map_or(0, |device| self.sync.received_upto(user, device));
        let mut events: Vec<(Arc<StoredEvent>, Vec<Action>)> = pending
            .rooms
            .into_values()
            .filter(|(event, _)| {
                let thread = receipts::thread_of(&event.pdu);
                event.stream_pos > received
                    && self.rooms.streams.read_marks(user, &event.pdu.room_id).bound(&thread) < event.stream_pos
            })
            .collect();
        tracing::debug!(user = %user, received, pushes = events.len(), "push: due");
        if events.is_empty() {
            return;
        }
        events.sort_by_key(|(event, _)| event.stream_pos);
        for (event, actions) in events {
            let badge = match self.badge(user).await {
                Ok(badge) => badge,
                Err(err) => {
                    tracing::warn!(%err, "push: cannot count unread notifications");
                    0
                }
            };
            let body = match self.payload(pusher, Some((&event, &actions)), badge).await {
                Ok(body) => body,
                Err(err) => {
                    tracing::warn!(%err, "push: cannot build a notification");
                    continue;
                }
            };
            if !self.post(pusher, &body).await {
                return;
            }
        }
    }

    /// After `user` read something: their devices' badges get the new count (a push with counts
    /// only, as the push gateway API describes for clearing a badge).
    pub fn read_receipt(self: &Arc<Self>, user: &UserId) {
        if self.fetcher.is_none() || !self.with_pushers.lock().contains(user) {
            return;
        }
        let push = self.clone();
        let user = user.to_owned();
        tokio::spawn(async move {
            let Ok(pushers) = push.db.pushers(&user).await else { return };
            let Ok(badge) = push.badge(&user).await else { return };
            for pusher in pushers {
                if let Ok(body) = push.payload(&pusher, None, badge).await {
                    push.post(&pusher, &body).await;
                }
            }
        });
    }

    /// The unread count on the device's badge: notifying messages in every joined room, and
    /// one per pending invite.
    async fn badge(&self, user: &UserId) -> Result<u64> {
        let upto = self.rooms.streams.position();
        let mut count = 0;
        for (room_id, membership, _) in self.rooms.streams.user_rooms(user, upto) {
            match membership.as_str() {
                "join" => count += self.notifications.unread(user, &room_id, upto).await?.total().notifications,
                "invite" => count += 1,
                _ => {}
            }
        }
        Ok(count)
    }

    /// The `/_matrix/push/v1/notify` body for `pusher`: about `event` (with the actions that
    /// made it notify), or a badge update without one.
    async fn payload(&self, pusher: &PusherRow, event: Option<(&StoredEvent, &[Action])>, badge: u64) -> Result<Value> {
        let stored: Value = serde_json::from_str(&pusher.pusher_json).map_err(|e| Error::Internal(e.to_string()))?;
        let mut data = stored.get("data").and_then(Value::as_object).cloned().unwrap_or_default();
        data.remove("url");
        let event_id_only = data.get("format").and_then(Value::as_str) == Some("event_id_only");
        let mut device = json!({
            "app_id": pusher.app_id,
            "pushkey": pusher.pushkey,
            "pushkey_ts": pusher.pushkey_ts / 1000,
            "data": data,
        });
        let mut notification = Map::new();
        let counts = json!({ "unread": badge });
        let Some((event, actions)) = event else {
            notification.insert("id".to_owned(), json!(""));
            notification.insert("type".to_owned(), Value::Null);
            notification.insert("sender".to_owned(), json!(""));
            notification.insert("counts".to_owned(), counts);
            notification.insert("devices".to_owned(), json!([device]));
            return Ok(json!({ "notification": notification }));
        };
        let mut tweaks = Map::new();
        for action in actions {
            if let Action::SetTweak(tweak) = action
                && let Ok(Value::Object(tweak)) = serde_json::to_value(tweak)
                && let (Some(Value::String(name)), value) = (tweak.get("set_tweak"), tweak.get("value"))
            {
                // `highlight` without a value means true (the spec's default).
                let value = value.cloned().unwrap_or(Value::Bool(true));
                tweaks.insert(name.clone(), value);
            }
        }
        device["tweaks"] = Value::Object(tweaks);
        let pdu = &event.pdu;
        let room_id = &pdu.room_id;
        let (joined, _) = self.rooms.streams.member_counts(room_id);
        let high = highlight_of(actions)
            || joined <= 2
            || matches!(pdu.event_type.to_string().as_str(), "m.call.invite" | "m.room.member");
        notification.insert("event_id".to_owned(), json!(pdu.event_id));
        notification.insert("room_id".to_owned(), json!(room_id));
        notification.insert("counts".to_owned(), counts);
        notification.insert("prio".to_owned(), json!(if high { "high" } else { "low" }));
        notification.insert("devices".to_owned(), json!([device]));
        if !event_id_only {
            let group = self.rooms.current_group(room_id).await?;
            let content = |e: Option<Arc<StoredEvent>>| e.map(|e| e.pdu.content_value());
            let name = content(self.rooms.state_event_at(group, "m.room.name", "").await?);
            let alias = content(self.rooms.state_event_at(group, "m.room.canonical_alias", "").await?);
            let member = content(self.rooms.state_event_at(group, "m.room.member", pdu.sender.as_str()).await?);
            notification.insert("type".to_owned(), json!(pdu.event_type.to_string()));
            notification.insert("sender".to_owned(), json!(pdu.sender));
            if let Some(name) = member.as_ref().and_then(|m| m.get("displayname")).and_then(Value::as_str) {
                notification.insert("sender_display_name".to_owned(), json!(name));
            }
            if let Some(name) = name.as_ref().and_then(|n| n.get("name")).and_then(Value::as_str) {
                notification.insert("room_name".to_owned(), json!(name));
            }
            if let Some(alias) = alias.as_ref().and_then(|a| a.get("alias")).and_then(Value::as_str) {
                notification.insert("room_alias".to_owned(), json!(alias));
            }
            let target = pdu.state_key.as_deref() == Some(pusher.user_id.as_str());
            notification.insert("user_is_target".to_owned(), json!(target));
            notification.insert("content".to_owned(), pdu.content_value());
        }
        Ok(json!({ "notification": notification }))
    }

    /// POSTs one notification, retrying with backoff while the gateway fails. A pushkey the
    /// gateway rejects is removed. Returns false when the pusher should get nothing more now.
    async fn post(&self, pusher: &PusherRow, body: &Value) -> bool {
        let Some(fetcher) = &self.fetcher else { return false };
        let Some(url) = serde_json::from_str::<Value>(&pusher.pusher_json)
            .ok()
            .and_then(|p| p["data"]["url"].as_str().map(str::to_owned))
        else {
            return false;
        };
        let mut wait = Duration::from_secs(1);
        for attempt in 1..=self.config.max_attempts.max(1) {
            match fetcher.post_json(&url, body).await {
                Ok(response) if response.status().is_success() => {
                    let body = response.bytes().await.unwrap_or_default();
                    let answer: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let rejected = answer["rejected"].as_array().cloned().unwrap_or_default();
                    if rejected.iter().any(|key| key.as_str() == Some(pusher.pushkey.as_str())) {
                        tracing::info!(user = %pusher.user_id, app_id = %pusher.app_id, "push gateway rejected a pushkey: pusher removed");
                        if let Err(err) = self.db.delete_pusher(&pusher.user_id, &pusher.app_id, &pusher.pushkey).await
                        {
                            tracing::warn!(%err, "push: cannot remove a rejected pusher");
                        }
                        return false;
                    }
                    return true;
                }
                Ok(response)
                    if response.status().is_client_error()
                        && response.status() != http::StatusCode::TOO_MANY_REQUESTS =>
                {
                    tracing::warn!(%url, status = %response.status(), "push gateway refused a notification");
                    return true;
                }
                Ok(response) => tracing::info!(%url, attempt, status = %response.status(), "push gateway failed"),
                Err(err) => tracing::info!(%url, attempt, %err, "push gateway unreachable"),
            }
            if attempt < self.config.max_attempts {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(LONGEST_RETRY_WAIT);
            }
        }
        tracing::warn!(%url, "push dropped after {} attempts", self.config.max_attempts);
        false
    }
}

fn highlight_of(actions: &[Action]) -> bool {
    actions.iter().any(Action::is_highlight)
}

/// Parses `/notifications`' `limit`.
pub fn limit_of(limit: Option<UInt>) -> usize {
    limit.map_or(20, |l| u64::from(l).min(100) as usize)
}
