//! Creating rooms (`POST /createRoom`) and upgrading them (`POST /rooms/{roomId}/upgrade`).

use std::sync::Arc;

use ruma::{MilliSecondsSinceUnixEpoch, OwnedRoomId, OwnedUserId, RoomAliasId, RoomId, RoomVersionId, UInt, UserId};
use serde_json::{Map, Value, json};

use super::{NewEvent, Rooms};
use crate::{
    error::{Error, Result},
    matrix::{
        pdu::{EventTemplate, Pdu, Placement, canonical_content},
        room_version,
    },
    service::now_ms,
    storage::stream::NewRoom,
};

/// The presets of `POST /createRoom`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    PrivateChat,
    TrustedPrivateChat,
    PublicChat,
}

/// A `POST /createRoom` request, reduced to what the service needs.
#[derive(Debug, Default)]
pub struct CreateRoom {
    pub preset: Option<Preset>,
    pub is_public: bool,
    pub name: Option<String>,
    pub topic: Option<String>,
    pub room_alias_name: Option<String>,
    pub invite: Vec<OwnedUserId>,
    pub is_direct: bool,
    pub initial_state: Vec<(String, String, Value)>,
    pub creation_content: Option<Map<String, Value>>,
    pub power_level_content_override: Option<Map<String, Value>>,
    pub room_version: Option<RoomVersionId>,
}

/// State event types an upgrade carries over to the new room.
const STATE_TO_COPY: &[&str] = &[
    "m.room.server_acl",
    "m.room.encryption",
    "m.room.name",
    "m.room.avatar",
    "m.room.topic",
    "m.room.guest_access",
    "m.room.history_visibility",
    "m.room.join_rules",
    "m.room.power_levels",
];

fn random_room_localpart() -> String {
    use rand::Rng;
    rand::thread_rng().sample_iter(rand::distributions::Alphanumeric).take(18).map(char::from).collect()
}

/// Power levels Synapse gives a new room, adjusted per preset.
fn default_power_levels(
    creator: &UserId,
    creators_are_implicit: bool,
    preset: Preset,
    trusted: &[OwnedUserId],
) -> Map<String, Value> {
    let mut users = Map::new();
    if !creators_are_implicit {
        users.insert(creator.to_string(), json!(100));
        if preset == Preset::TrustedPrivateChat {
            for user in trusted {
                users.insert(user.to_string(), json!(100));
            }
        }
    }
    let invite = if preset == Preset::PublicChat { 50 } else { 0 };
    let value = json!({
        "users": users,
        "users_default": 0,
        "events": {
            "m.room.name": 50,
            "m.room.power_levels": 100,
            "m.room.history_visibility": 100,
            "m.room.canonical_alias": 50,
            "m.room.avatar": 50,
            "m.room.tombstone": 100,
            "m.room.server_acl": 100,
            "m.room.encryption": 100,
        },
        "events_default": 0,
        "state_default": 50,
        "ban": 50,
        "kick": 50,
        "redact": 50,
        "invite": invite,
        "notifications": {"room": 50},
    });
    value.as_object().cloned().expect("an object")
}

impl Rooms {
    /// The member event content for `user_id` joining (with their profile).
    pub(crate) async fn join_content(&self, user_id: &UserId, extra: Map<String, Value>) -> Result<Value> {
        let mut content = Map::new();
        content.insert("membership".into(), json!("join"));
        if let Some(user) = self.db.user(user_id).await? {
            if let Some(name) = user.displayname {
                content.insert("displayname".into(), json!(name));
            }
            if let Some(avatar) = user.avatar_url {
                content.insert("avatar_url".into(), json!(avatar));
            }
        }
        content.extend(extra);
        Ok(Value::Object(content))
    }

    /// `POST /createRoom`.
    pub async fn create_room(&self, creator: &UserId, request: CreateRoom) -> Result<OwnedRoomId> {
        self.create_room_replacing(creator, request, None).await
    }

    /// Creates a room; with `upgrade_of`, as the replacement of that room (recorded in the same
    /// transaction, and refused if it already has one).
    async fn create_room_replacing(
        &self,
        creator: &UserId,
        request: CreateRoom,
        upgrade_of: Option<&RoomId>,
    ) -> Result<OwnedRoomId> {
        let version = request.room_version.clone().unwrap_or(room_version::DEFAULT);
        let rules = room_version::rules(&version).ok_or(Error::UnsupportedRoomVersion)?;
        let preset = request.preset.unwrap_or(if request.is_public { Preset::PublicChat } else { Preset::PrivateChat });

        let alias = match &request.room_alias_name {
            Some(name) => {
                let alias = RoomAliasId::parse(format!("#{name}:{}", self.server_name))
                    .map_err(|_| Error::InvalidParam(format!("invalid room alias name: {name}")))?;
                if self.db.alias(alias.as_str()).await?.is_some() {
                    return Err(Error::RoomInUse("Room alias already taken".into()));
                }
                Some(alias)
            }
            None => None,
        };
        for user in &request.invite {
            self.check_invitee(user).await?;
        }
        if let Some(name) = &request.name
            && name.len() > 255
        {
            return Err(Error::BadJson("name is longer than 255 bytes".to_owned()));
        }
        let creators_are_implicit = rules.authorization.explicitly_privilege_room_creators;

        // Create event.
        let mut create_content = request.creation_content.clone().unwrap_or_default();
        create_content.remove("creator");
        create_content.insert("room_version".into(), json!(version.as_str()));
        if !rules.authorization.use_room_create_sender {
            create_content.insert("creator".into(), json!(creator.as_str()));
        }
        if creators_are_implicit && preset == Preset::TrustedPrivateChat && !request.invite.is_empty() {
            let mut additional: Vec<Value> =
                create_content.get("additional_creators").and_then(Value::as_array).cloned().unwrap_or_default();
            for user in &request.invite {
                if !additional.iter().any(|u| u.as_str() == Some(user.as_str())) {
                    additional.push(json!(user.as_str()));
                }
            }
            create_content.insert("additional_creators".into(), Value::Array(additional));
        }
        let create_template = EventTemplate {
            event_type: "m.room.create".to_owned(),
            state_key: Some(String::new()),
            content: canonical_content(Value::Object(create_content)).map_err(Error::BadJson)?,
            redacts: None,
        };
        // Reserve the room ID. A v12 room ID is the create event's hash, so two identical
        // requests in the same millisecond would collide: move the timestamp on until free.
        let mut now = now_ms();
        let (room_id, handle) = loop {
            let room_id = if rules.authorization.room_create_event_id_as_room_id {
                let placement = Placement {
                    room_id: None,
                    sender: creator,
                    prev_events: &[],
                    auth_events: &[],
                    depth: 1,
                    origin_server_ts: MilliSecondsSinceUnixEpoch(UInt::try_from(now).unwrap_or_default()),
                };
                Pdu::build(create_template.clone(), &placement, &rules, &self.server_name, self.keys.key())
                    .map_err(|e| Error::BadJson(e.to_string()))?
                    .room_id
            } else {
                RoomId::parse(format!("!{}:{}", random_room_localpart(), self.server_name))
                    .map_err(|e| Error::Internal(e.to_string()))?
            };
            if self.db.room(&room_id).await?.is_none()
                && let Some(handle) = self.reserve_handle(&room_id, version.clone())?
            {
                break (room_id, handle);
            }
            now += 1;
        };

        let mut events = vec![NewEvent { template: create_template, sender: creator.to_owned(), txn: None }];
        events.push(NewEvent::new(
            creator,
            "m.room.member",
            Some(creator.as_str()),
            self.join_content(creator, Map::new()).await?,
        )?);

        let defaults = default_power_levels(creator, creators_are_implicit, preset, &request.invite);
        let mut power_levels = defaults.clone();
        let mut final_power_levels = None;
        if let Some(overrides) = &request.power_level_content_override {
            for (key, value) in overrides {
                power_levels.insert(key.clone(), value.clone());
            }
            // The creator needs its power to send the rest of the initial state; if the override
            // takes it away, send the override as the last event instead (as Synapse does).
            if !creators_are_implicit {
                let creator_level =
                    power_levels.get("users").and_then(|u| u.get(creator.as_str())).and_then(Value::as_i64);
                if creator_level.unwrap_or(0) < 100 {
                    final_power_levels = Some(power_levels.clone());
                    let users = power_levels.entry("users").or_insert_with(|| json!({}));
                    if let Some(users) = users.as_object_mut() {
                        users.insert(creator.to_string(), json!(100));
                    }
                }
            }
        }
        if creators_are_implicit && let Some(users) = power_levels.get_mut("users").and_then(Value::as_object_mut) {
            // Creators have infinite power in room version 12 and must not be listed.
            users.remove(creator.as_str());
            for user in &request.invite {
                if preset == Preset::TrustedPrivateChat {
                    users.remove(user.as_str());
                }
            }
        }
        events.push(NewEvent::new(creator, "m.room.power_levels", Some(""), Value::Object(power_levels))?);
        if let Some(alias) = &alias {
            events.push(NewEvent::new(creator, "m.room.canonical_alias", Some(""), json!({"alias": alias.as_str()}))?);
        }
        let join_rule = if preset == Preset::PublicChat { "public" } else { "invite" };
        events.push(NewEvent::new(creator, "m.room.join_rules", Some(""), json!({"join_rule": join_rule}))?);
        events.push(NewEvent::new(
            creator,
            "m.room.history_visibility",
            Some(""),
            json!({"history_visibility": "shared"}),
        )?);
        if preset != Preset::PublicChat {
            events.push(NewEvent::new(creator, "m.room.guest_access", Some(""), json!({"guest_access": "can_join"}))?);
        }
        for (event_type, state_key, content) in &request.initial_state {
            if matches!(event_type.as_str(), "m.room.create" | "m.room.member") {
                return Err(Error::InvalidRoomState(format!("{event_type} cannot be set in initial_state")));
            }
            events.push(NewEvent::new(creator, event_type, Some(state_key), content.clone())?);
        }
        if let Some(name) = &request.name {
            events.push(NewEvent::new(creator, "m.room.name", Some(""), json!({"name": name}))?);
        }
        if let Some(topic) = &request.topic {
            events.push(NewEvent::new(
                creator,
                "m.room.topic",
                Some(""),
                json!({"topic": topic, "m.topic": [{"body": topic, "mimetype": "text/plain"}]}),
            )?);
        }
        if let Some(final_levels) = final_power_levels {
            events.push(NewEvent::new(creator, "m.room.power_levels", Some(""), Value::Object(final_levels))?);
        }
        for user in &request.invite {
            let mut content = self.invite_content(user).await?;
            if request.is_direct {
                content.insert("is_direct".into(), json!(true));
            }
            events.push(NewEvent::new(creator, "m.room.member", Some(user.as_str()), Value::Object(content))?);
        }

        let new_room = NewRoom {
            room_version: version.to_string(),
            creator: creator.to_owned(),
            is_public: request.is_public,
            created_ts: now,
            // Claimed in the room's own transaction: a race for the alias creates one room, and
            // the loser's room is never created (the check above is only the fast answer).
            alias: alias.as_ref().map(|a| a.to_string()),
            upgrade_of: upgrade_of.map(ToOwned::to_owned),
        };
        // The create event is rebuilt with the timestamp its room ID was derived from.
        let result = self.append_at(&handle, events, Some(new_room), now).await;
        if let Err(err) = result {
            self.handles.lock().pop(&room_id);
            if let Some(alias) = &alias
                && self.db.alias(alias.as_str()).await?.is_some()
            {
                return Err(Error::RoomInUse("Room alias already taken".into()));
            }
            return Err(err);
        }
        if request.is_public {
            // A room published at creation shows in the directory at once, as publishing later does.
            *self.public_list.lock() = None;
        }
        tracing::info!(%room_id, %creator, %version, "created a room");
        Ok(room_id)
    }

    /// Appends with a fixed `origin_server_ts` for every event (room creation derives the v12
    /// room ID from the create event, so its timestamp must not change between the two builds).
    async fn append_at(
        &self,
        handle: &Arc<super::RoomHandle>,
        events: Vec<NewEvent>,
        new_room: Option<NewRoom>,
        now: i64,
    ) -> Result<Vec<Arc<super::StoredEvent>>> {
        self.commit(handle, events, new_room, Some(now)).await
    }

    /// The lock one upgrade of `room_id` holds (entries nobody holds are dropped as we go).
    fn upgrade_lock(&self, room_id: &RoomId) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.upgrades.lock();
        locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        locks.entry(room_id.to_owned()).or_default().clone()
    }

    /// `POST /rooms/{roomId}/upgrade`: tombstones the room and creates its replacement.
    pub async fn upgrade_room(
        &self,
        user: &UserId,
        old_room: &RoomId,
        new_version: RoomVersionId,
    ) -> Result<OwnedRoomId> {
        let rules = room_version::rules(&new_version).ok_or(Error::UnsupportedRoomVersion)?;
        let old = self.handle(old_room).await?;
        // One upgrade of a room at a time (across processes, `room_upgrades` allows a single
        // replacement). A retry, or a request that waited here, finishes the upgrade already made
        // instead of making a second replacement.
        let lock = self.upgrade_lock(old_room);
        let _upgrading = lock.lock().await;
        if self.streams.membership(user, old_room).as_deref() != Some("join") {
            return Err(Error::forbidden("You are not in this room"));
        }
        let group = self.current_group(old_room).await?;
        let levels = self.power_levels_at(&old, group).await?;
        if levels.user_level(user) < levels.event_level("m.room.tombstone", true) {
            return Err(Error::forbidden("You may not upgrade this room"));
        }
        if let Some((new_room, version)) = self.db.room_replacement(old_room).await? {
            if version != new_version.as_str() {
                return Err(Error::InvalidParam(format!("This room has already been replaced by {new_room}")));
            }
            let is_public = self.db.room(old_room).await?.is_some_and(|r| r.is_public);
            self.finish_upgrade(user, &old, &new_room, &levels, is_public).await?;
            return Ok(new_room);
        }
        let old_create = self
            .state_event_at(group, "m.room.create", "")
            .await?
            .ok_or_else(|| Error::Internal("no create event".to_owned()))?;
        let old_create_content = old_create.pdu.content_value();

        let mut creation = Map::new();
        let mut predecessor = json!({"room_id": old_room.as_str()});
        if let Some(tip) =
            self.db.room_events(old_room, 0, i64::MAX, crate::storage::rooms::Dir::Backward, 1).await?.first()
        {
            predecessor["event_id"] = json!(tip.event_id.as_str());
        }
        creation.insert("predecessor".into(), predecessor);
        for key in ["type", "m.federate"] {
            if let Some(value) = old_create_content.get(key) {
                creation.insert(key.into(), value.clone());
            }
        }
        let mut initial_state = Vec::new();
        let mut old_power_levels = None;
        let mut join_rule_public = false;
        for event_type in STATE_TO_COPY {
            if let Some(event) = self.state_event_at(group, event_type, "").await? {
                let content = event.pdu.content_value();
                if *event_type == "m.room.power_levels" {
                    old_power_levels = Some(content);
                    continue;
                }
                if *event_type == "m.room.join_rules"
                    && content.get("join_rule").and_then(Value::as_str) == Some("public")
                {
                    join_rule_public = true;
                }
                initial_state.push((event_type.to_string(), String::new(), content));
            }
        }
        // Carry the old room's levels over, minus the upgrader's own entry when they are a
        // creator of the new room (room version 12 forbids listing creators).
        let mut power_override = old_power_levels.and_then(|v| v.as_object().cloned());
        if rules.authorization.explicitly_privilege_room_creators
            && let Some(levels) = power_override.as_mut()
            && let Some(users) = levels.get_mut("users").and_then(Value::as_object_mut)
        {
            users.remove(user.as_str());
        }
        let is_public = self.db.room(old_room).await?.is_some_and(|r| r.is_public);
        let request = CreateRoom {
            preset: Some(if join_rule_public { Preset::PublicChat } else { Preset::PrivateChat }),
            is_public,
            initial_state,
            creation_content: Some(creation),
            power_level_content_override: power_override,
            room_version: Some(new_version.clone()),
            ..CreateRoom::default()
        };
        let new_room = match self.create_room_replacing(user, request, Some(old_room)).await {
            Ok(new_room) => new_room,
            // Another process replaced it meanwhile: finish that upgrade rather than fail.
            Err(err) => match self.db.room_replacement(old_room).await? {
                Some((new_room, version)) if version == new_version.as_str() => new_room,
                _ => return Err(err),
            },
        };
        self.finish_upgrade(user, &old, &new_room, &levels, is_public).await?;
        Ok(new_room)
    }

    /// The steps of an upgrade after the replacement room exists. Each is skipped when already
    /// done, so an upgrade interrupted midway (a crash) completes when it is retried.
    async fn finish_upgrade(
        &self,
        user: &UserId,
        old: &Arc<super::RoomHandle>,
        new_room: &RoomId,
        levels: &super::PowerLevels,
        is_public: bool,
    ) -> Result<()> {
        let old_room = &old.room_id;
        let new_handle = self.handle(new_room).await?;
        // Bans carry over.
        for member in self.db.room_memberships(old_room).await? {
            if member.membership != "ban"
                || self.db.membership(new_room, &member.user_id).await?.is_some_and(|m| m.membership == "ban")
            {
                continue;
            }
            let ban =
                NewEvent::new(user, "m.room.member", Some(member.user_id.as_str()), json!({"membership": "ban"}))?;
            // Best effort: a ban the upgrader has no power for in the new room is skipped.
            if let Err(err) = self.append(&new_handle, vec![ban], None).await {
                tracing::debug!(%err, "ban not carried over to the upgraded room");
            }
        }
        // Aliases and the canonical alias move to the new room.
        self.db.repoint_aliases(old_room, new_room).await?;
        let canonical = self.current_state_content(old_room, "m.room.canonical_alias", "").await?;
        if let Some(canonical) = canonical
            && (canonical.get("alias").is_some() || canonical.get("alt_aliases").is_some())
        {
            if self.current_state_content(new_room, "m.room.canonical_alias", "").await?.as_ref() != Some(&canonical) {
                self.append(
                    &new_handle,
                    vec![NewEvent::new(user, "m.room.canonical_alias", Some(""), canonical)?],
                    None,
                )
                .await?;
            }
            self.append(old, vec![NewEvent::new(user, "m.room.canonical_alias", Some(""), json!({}))?], None).await?;
        }
        // The tombstone, then stop the old room from being used.
        let tombstoned = self
            .current_state_content(old_room, "m.room.tombstone", "")
            .await?
            .is_some_and(|t| t.get("replacement_room").and_then(Value::as_str) == Some(new_room.as_str()));
        if !tombstoned {
            let tombstone = json!({"body": "This room has been replaced", "replacement_room": new_room.as_str()});
            self.append(old, vec![NewEvent::new(user, "m.room.tombstone", Some(""), tombstone)?], None).await?;
        }
        let current = levels.content().as_object().cloned().unwrap_or_default();
        let mut restricted = current.clone();
        let users_default = restricted.get("users_default").and_then(Value::as_i64).unwrap_or(0);
        let floor = json!((users_default + 1).max(50));
        restricted.insert("events_default".into(), floor.clone());
        restricted.insert("invite".into(), floor);
        if restricted != current
            && let Err(err) = self
                .append(
                    old,
                    vec![NewEvent::new(user, "m.room.power_levels", Some(""), Value::Object(restricted))?],
                    None,
                )
                .await
        {
            tracing::debug!(%err, "could not restrict the old room after an upgrade");
        }
        if is_public {
            self.db.set_room_public(old_room, false).await?;
        }
        Ok(())
    }
}
