//! The room directory: aliases, the public room list and room visibility, and the user
//! directory.

use std::sync::Arc;

use ruma::{OwnedRoomId, OwnedUserId, RoomAliasId, RoomId, UserId};
use serde_json::Value;

use super::Rooms;
use crate::{
    error::{Error, Result},
    service::now_ms,
    storage::StorageError,
};

/// How stale the served public room list may be.
const PUBLIC_LIST_TTL: std::time::Duration = std::time::Duration::from_secs(5);

/// One entry of the public room list.
#[derive(Debug, Clone)]
pub struct PublicRoom {
    pub room_id: OwnedRoomId,
    pub name: Option<String>,
    pub topic: Option<String>,
    pub canonical_alias: Option<String>,
    pub avatar_url: Option<String>,
    pub num_joined_members: u64,
    pub world_readable: bool,
    pub guest_can_join: bool,
    pub join_rule: String,
    pub room_type: Option<String>,
}

impl Rooms {
    /// `PUT /directory/room/{roomAlias}`.
    pub async fn create_alias(&self, user: &UserId, alias: &RoomAliasId, room_id: &RoomId) -> Result<()> {
        if alias.server_name() != self.server_name {
            return Err(Error::InvalidParam("Aliases of other servers cannot be created here".to_owned()));
        }
        self.handle(room_id).await?;
        if self.streams.membership(user, room_id).as_deref() != Some("join") {
            return Err(Error::forbidden("You must be in the room to give it an alias"));
        }
        self.db.create_alias(alias.as_str(), room_id, user, now_ms()).await.map_err(|err| match err {
            StorageError::Conflict(_) => Error::Conflict("Room alias already exists".into()),
            other => other.into(),
        })
    }

    /// `GET /directory/room/{roomAlias}`.
    pub async fn resolve_alias(&self, alias: &RoomAliasId) -> Result<(OwnedRoomId, Vec<String>)> {
        let (room_id, _) =
            self.db.alias(alias.as_str()).await?.ok_or_else(|| Error::not_found("Room alias not found"))?;
        Ok((room_id, vec![self.server_name.to_string()]))
    }

    /// `DELETE /directory/room/{roomAlias}`: by its creator or a room member allowed to change
    /// the canonical alias.
    pub async fn delete_alias(&self, user: &UserId, alias: &RoomAliasId) -> Result<()> {
        let (room_id, creator) =
            self.db.alias(alias.as_str()).await?.ok_or_else(|| Error::not_found("Room alias not found"))?;
        if creator != user {
            let handle = self.handle(&room_id).await?;
            let group = self.current_group(&room_id).await?;
            let levels = self.power_levels_at(&handle, group).await?;
            if self.streams.membership(user, &room_id).as_deref() != Some("join")
                || levels.user_level(user) < levels.event_level("m.room.canonical_alias", true)
            {
                return Err(Error::forbidden("You may not remove this alias"));
            }
        }
        self.db.delete_alias(alias.as_str()).await?;
        Ok(())
    }

    /// `GET /rooms/{roomId}/aliases`.
    pub async fn local_aliases(&self, user: &UserId, room_id: &RoomId) -> Result<Vec<String>> {
        self.read_access(user, room_id).await?;
        Ok(self.db.room_aliases(room_id).await?)
    }

    /// `GET /directory/list/room/{roomId}`.
    pub async fn is_listed(&self, room_id: &RoomId) -> Result<bool> {
        Ok(self.db.room(room_id).await?.ok_or_else(|| Error::not_found("Unknown room"))?.is_public)
    }

    /// `PUT /directory/list/room/{roomId}`: room admins (who may change the room's state) decide.
    pub async fn set_listed(&self, user: &UserId, room_id: &RoomId, public: bool) -> Result<()> {
        let handle = self.handle(room_id).await?;
        let group = self.current_group(room_id).await?;
        let levels = self.power_levels_at(&handle, group).await?;
        if self.streams.membership(user, room_id).as_deref() != Some("join")
            || levels.user_level(user) < levels.event_level("m.room.canonical_alias", true)
        {
            return Err(Error::forbidden("You may not change this room's directory visibility"));
        }
        self.db.set_room_public(room_id, public).await?;
        // Publishing shows at once; other changes (names, members) within `PUBLIC_LIST_TTL`.
        *self.public_list.lock() = None;
        Ok(())
    }

    async fn state_str(&self, room_id: &RoomId, event_type: &str, field: &str) -> Result<Option<String>> {
        Ok(self
            .current_state_content(room_id, event_type, "")
            .await?
            .and_then(|c| c.get(field).and_then(Value::as_str).map(str::to_owned))
            .filter(|s| !s.is_empty()))
    }

    /// The public room list, most members first, filtered by a search term. Served from a
    /// snapshot at most `PUBLIC_LIST_TTL` old: the endpoint needs no login, and building the list
    /// reads several state events per public room, so each call must not rebuild it.
    pub async fn public_rooms(
        &self,
        search: Option<&str>,
        room_types: Option<&[Option<String>]>,
    ) -> Result<Vec<PublicRoom>> {
        let term = search.map(str::to_lowercase).filter(|t| !t.is_empty());
        let cached =
            self.public_list.lock().as_ref().filter(|(at, _)| at.elapsed() < PUBLIC_LIST_TTL).map(|(_, l)| l.clone());
        let all = match cached {
            Some(list) => list,
            None => {
                let list = Arc::new(self.build_public_list().await?);
                *self.public_list.lock() = Some((std::time::Instant::now(), list.clone()));
                list
            }
        };
        Ok(all
            .iter()
            .filter(|room| room_types.is_none_or(|types| types.contains(&room.room_type)))
            .filter(|room| {
                let Some(term) = &term else { return true };
                let haystack = [&room.name, &room.topic, &room.canonical_alias]
                    .iter()
                    .filter_map(|s| s.as_deref())
                    .collect::<Vec<_>>()
                    .join(" ");
                haystack.to_lowercase().contains(term.as_str())
                    || room.room_id.as_str().to_lowercase().contains(term.as_str())
            })
            .cloned()
            .collect())
    }

    /// Every public room, most members first (ties by room ID, so pages are stable).
    async fn build_public_list(&self) -> Result<Vec<PublicRoom>> {
        let mut rooms = Vec::new();
        for room_id in self.db.public_room_ids().await? {
            let name = self.state_str(&room_id, "m.room.name", "name").await?;
            let topic = self.state_str(&room_id, "m.room.topic", "topic").await?;
            let canonical_alias = self.state_str(&room_id, "m.room.canonical_alias", "alias").await?;
            let room_type = self.state_str(&room_id, "m.room.create", "type").await?;
            let (joined, _) = self.streams.member_counts(&room_id);
            rooms.push(PublicRoom {
                name,
                topic,
                canonical_alias,
                avatar_url: self.state_str(&room_id, "m.room.avatar", "url").await?,
                num_joined_members: joined,
                world_readable: self
                    .state_str(&room_id, "m.room.history_visibility", "history_visibility")
                    .await?
                    .as_deref()
                    == Some("world_readable"),
                guest_can_join: self.state_str(&room_id, "m.room.guest_access", "guest_access").await?.as_deref()
                    == Some("can_join"),
                join_rule: self
                    .state_str(&room_id, "m.room.join_rules", "join_rule")
                    .await?
                    .unwrap_or_else(|| "invite".to_owned()),
                room_type,
                room_id,
            });
        }
        rooms.sort_by(|a, b| b.num_joined_members.cmp(&a.num_joined_members).then_with(|| a.room_id.cmp(&b.room_id)));
        Ok(rooms)
    }

    /// `POST /user_directory/search`.
    pub async fn search_users(
        &self,
        searcher: &UserId,
        term: &str,
        limit: usize,
    ) -> Result<(Vec<(OwnedUserId, Option<String>, Option<String>)>, bool)> {
        let mut results = self.db.search_user_directory(searcher, term, limit as i64 + 1).await?;
        let limited = results.len() > limit;
        results.truncate(limit);
        Ok((results, limited))
    }
}
