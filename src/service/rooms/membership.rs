//! Membership: invite, join (by ID or alias, including restricted rooms), leave, kick, ban,
//! unban, knock and forget. The auth rules decide what is allowed; this module adds the checks
//! the Client-Server API asks of the server and picks the content of member events.

use ruma::{OwnedRoomId, OwnedUserId, RoomAliasId, RoomId, UserId};
use serde_json::{Map, Value, json};

use super::{NewEvent, Rooms};
use crate::error::{Error, Result};

impl Rooms {
    /// Resolves a room ID or a local alias to a room ID.
    pub async fn resolve_room(&self, room_id_or_alias: &str) -> Result<OwnedRoomId> {
        if room_id_or_alias.starts_with('#') {
            let alias = RoomAliasId::parse(room_id_or_alias).map_err(|e| Error::InvalidParam(e.to_string()))?;
            return match self.db.alias(alias.as_str()).await? {
                Some((room_id, _)) => Ok(room_id),
                None if alias.server_name() != self.server_name => {
                    Err(Error::not_found("Room alias not found (this server does not federate yet)"))
                }
                None => Err(Error::not_found("Room alias not found")),
            };
        }
        RoomId::parse(room_id_or_alias).map_err(|e| Error::InvalidParam(e.to_string()))
    }

    /// A local invitee must exist; remote ones cannot be reached yet.
    pub(crate) async fn check_invitee(&self, user: &UserId) -> Result<()> {
        if user.server_name() != self.server_name {
            return Err(Error::forbidden(
                "Inviting users of other servers needs federation, which is not available yet",
            ));
        }
        match self.db.user(user).await? {
            Some(row) if !row.deactivated => Ok(()),
            _ => Err(Error::not_found(format!("Unknown user {user}"))),
        }
    }

    pub(crate) async fn invite_content(&self, user: &UserId) -> Result<Map<String, Value>> {
        let mut content = Map::new();
        content.insert("membership".into(), json!("invite"));
        if let Some(row) = self.db.user(user).await? {
            if let Some(name) = row.displayname {
                content.insert("displayname".into(), json!(name));
            }
            if let Some(avatar) = row.avatar_url {
                content.insert("avatar_url".into(), json!(avatar));
            }
        }
        Ok(content)
    }

    async fn member_event(&self, room_id: &RoomId, sender: &UserId, target: &UserId, content: Value) -> Result<()> {
        let handle = self.handle(room_id).await?;
        self.append(&handle, vec![NewEvent::new(sender, "m.room.member", Some(target.as_str()), content)?], None)
            .await?;
        Ok(())
    }

    fn with_reason(mut content: Map<String, Value>, reason: Option<&str>) -> Value {
        if let Some(reason) = reason {
            content.insert("reason".into(), json!(reason));
        }
        Value::Object(content)
    }

    /// `POST /rooms/{roomId}/invite`.
    pub async fn invite(
        &self,
        sender: &UserId,
        room_id: &RoomId,
        target: &UserId,
        reason: Option<&str>,
        is_direct: bool,
    ) -> Result<()> {
        self.handle(room_id).await?;
        self.check_invitee(target).await?;
        if self.streams.membership(target, room_id).as_deref() == Some("join") {
            return Err(Error::forbidden(format!("{target} is already in the room")));
        }
        let mut content = self.invite_content(target).await?;
        if is_direct {
            content.insert("is_direct".into(), json!(true));
        }
        self.member_event(room_id, sender, target, Self::with_reason(content, reason)).await
    }

    /// `POST /rooms/{roomId}/join` and `POST /join/{roomIdOrAlias}`. A guest may join only rooms
    /// whose `m.room.guest_access` is `can_join`, whatever the join rule or an invite says.
    pub async fn join(&self, user: &UserId, is_guest: bool, room_id: &RoomId, reason: Option<&str>) -> Result<()> {
        let handle = self.handle(room_id).await.map_err(|err| match err {
            Error::NotFound(_) => Error::not_found("Unknown room (this server does not federate yet)"),
            other => other,
        })?;
        let mut extra = Map::new();
        if let Some(reason) = reason {
            extra.insert("reason".into(), json!(reason));
        }
        let group = self.current_group(room_id).await?;
        if is_guest {
            // The auth rules know nothing of guests: the spec leaves this check to the server.
            let guest_access = self.state_event_at(group, "m.room.guest_access", "").await?;
            let can_join = guest_access.is_some_and(|event| {
                event.pdu.content_value().get("guest_access").and_then(Value::as_str) == Some("can_join")
            });
            if !can_join {
                return Err(Error::forbidden("Guest access is not allowed in this room"));
            }
        }
        let join_rule = self
            .state_event_at(group, "m.room.join_rules", "")
            .await?
            .map(|e| e.pdu.content_value())
            .unwrap_or(Value::Null);
        let rule = join_rule.get("join_rule").and_then(Value::as_str).unwrap_or("invite");
        let current = self.streams.membership(user, room_id);
        if matches!(rule, "restricted" | "knock_restricted") && !matches!(current.as_deref(), Some("invite" | "join")) {
            let authoriser = self.restricted_join_authoriser(&handle, group, user, &join_rule).await?;
            extra.insert("join_authorised_via_users_server".into(), json!(authoriser.as_str()));
        }
        let content = self.join_content(user, extra).await?;
        self.member_event(room_id, user, user, content).await
    }

    /// For a restricted room: a local member who may invite and vouches for `user`, provided
    /// `user` is in one of the rooms the join rule allows.
    async fn restricted_join_authoriser(
        &self,
        handle: &super::RoomHandle,
        group: i64,
        user: &UserId,
        join_rule: &Value,
    ) -> Result<OwnedUserId> {
        if !handle.rules.authorization.restricted_join_rule {
            return Err(Error::forbidden("This room version does not support restricted joins"));
        }
        let allowed = join_rule.get("allow").and_then(Value::as_array).cloned().unwrap_or_default();
        let in_allowed_room = allowed.iter().any(|condition| {
            condition.get("type").and_then(Value::as_str) == Some("m.room_membership")
                && condition
                    .get("room_id")
                    .and_then(Value::as_str)
                    .and_then(|r| RoomId::parse(r).ok())
                    .is_some_and(|room| self.streams.membership(user, &room).as_deref() == Some("join"))
        });
        if !in_allowed_room {
            return Err(Error::forbidden("You are not in any of the rooms this room admits members of"));
        }
        let levels = self.power_levels_at(handle, group).await?;
        let needed = levels.invite();
        self.streams
            .members(&handle.room_id, "join")
            .into_iter()
            .filter(|member| member.server_name() == self.server_name)
            .find(|member| levels.user_level(member) >= needed)
            .ok_or_else(|| Error::forbidden("No member of this server can authorise your join"))
    }

    /// `POST /rooms/{roomId}/leave` (also rejects invites and retracts knocks).
    pub async fn leave(&self, user: &UserId, room_id: &RoomId, reason: Option<&str>) -> Result<()> {
        self.handle(room_id).await?;
        match self.streams.membership(user, room_id).as_deref() {
            None | Some("leave") => return Ok(()),
            Some("ban") => return Err(Error::forbidden("You are banned from this room")),
            _ => {}
        }
        let content = Self::with_reason(Map::from_iter([("membership".to_owned(), json!("leave"))]), reason);
        self.member_event(room_id, user, user, content).await
    }

    /// `POST /rooms/{roomId}/kick`.
    pub async fn kick(&self, sender: &UserId, room_id: &RoomId, target: &UserId, reason: Option<&str>) -> Result<()> {
        self.handle(room_id).await?;
        if !matches!(self.member_state(room_id, target).await?.as_deref(), Some("join" | "invite" | "knock")) {
            return Err(Error::forbidden(format!("{target} is not in the room")));
        }
        let content = Self::with_reason(Map::from_iter([("membership".to_owned(), json!("leave"))]), reason);
        self.member_event(room_id, sender, target, content).await
    }

    /// `POST /rooms/{roomId}/ban`.
    pub async fn ban(&self, sender: &UserId, room_id: &RoomId, target: &UserId, reason: Option<&str>) -> Result<()> {
        self.handle(room_id).await?;
        let content = Self::with_reason(Map::from_iter([("membership".to_owned(), json!("ban"))]), reason);
        self.member_event(room_id, sender, target, content).await
    }

    /// `POST /rooms/{roomId}/unban`.
    pub async fn unban(&self, sender: &UserId, room_id: &RoomId, target: &UserId, reason: Option<&str>) -> Result<()> {
        self.handle(room_id).await?;
        if self.member_state(room_id, target).await?.as_deref() != Some("ban") {
            return Err(Error::forbidden(format!("{target} is not banned")));
        }
        let content = Self::with_reason(Map::from_iter([("membership".to_owned(), json!("leave"))]), reason);
        self.member_event(room_id, sender, target, content).await
    }

    /// `POST /knock/{roomIdOrAlias}`.
    pub async fn knock(&self, user: &UserId, room_id: &RoomId, reason: Option<&str>) -> Result<()> {
        self.handle(room_id).await.map_err(|err| match err {
            Error::NotFound(_) => Error::not_found("Unknown room (this server does not federate yet)"),
            other => other,
        })?;
        if matches!(self.streams.membership(user, room_id).as_deref(), Some("join")) {
            return Err(Error::forbidden("You are already in this room"));
        }
        let mut content = Map::new();
        content.insert("membership".into(), json!("knock"));
        if let Some(row) = self.db.user(user).await?
            && let Some(name) = row.displayname
        {
            content.insert("displayname".into(), json!(name));
        }
        self.member_event(room_id, user, user, Self::with_reason(content, reason)).await
    }

    /// `POST /rooms/{roomId}/forget`.
    pub async fn forget(&self, user: &UserId, room_id: &RoomId) -> Result<()> {
        match self.streams.membership(user, room_id).as_deref() {
            Some("join" | "invite" | "knock") => {
                Err(Error::Unknown("You must leave the room before forgetting it".to_owned()))
            }
            _ => Ok(self.db.forget_room(room_id, user).await?),
        }
    }

    /// Membership of any user (local or not) from the room's current state.
    pub async fn member_state(&self, room_id: &RoomId, user: &UserId) -> Result<Option<String>> {
        Ok(self.db.membership(room_id, user).await?.map(|m| m.membership))
    }

    /// Sends a fresh join event into every room `user` is in, carrying their current profile.
    pub async fn propagate_profile(&self, user: &UserId) -> Result<()> {
        for (room_id, membership, _) in self.streams.user_rooms(user, i64::MAX) {
            if membership != "join" {
                continue;
            }
            let content = self.join_content(user, Map::new()).await?;
            if let Err(err) = self.member_event(&room_id, user, user, content).await {
                tracing::warn!(%room_id, %err, "could not update the profile in a room");
            }
        }
        Ok(())
    }

    /// Makes a deactivated user leave (and decline invites to) every room.
    pub async fn leave_all(&self, user: &UserId) -> Result<()> {
        for (room_id, membership, _) in self.streams.user_rooms(user, i64::MAX) {
            if matches!(membership.as_str(), "join" | "invite" | "knock")
                && let Err(err) = self.leave(user, &room_id, Some("Account deactivated")).await
            {
                tracing::warn!(%room_id, %err, "could not remove a deactivated user from a room");
            }
        }
        Ok(())
    }
}
