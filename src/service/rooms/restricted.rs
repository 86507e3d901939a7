//! Restricted joins of other servers' users, as the authorising server (Server-Server API,
//! "Restricted rooms"): whether a user who is neither invited nor joined may join a
//! `restricted`/`knock_restricted` room by being in one of the rooms its join rule allows, and
//! which of our users vouches for it in `join_authorised_via_users_server`. Our local users'
//! restricted joins go through `membership.rs`. No network IO: we judge only by our own state.

use ruma::{OwnedUserId, RoomId, UserId};
use serde_json::Value;

use super::{RoomHandle, Rooms};
use crate::error::{Error, Result};

impl Rooms {
    /// The local user to name in `join_authorised_via_users_server` for `user`'s join, or `None`
    /// when the join needs no authorisation (the room is not restricted, its version has no
    /// restricted joins, or the user is already invited or joined). Errors: `M_FORBIDDEN` when
    /// every allowed room is one we are in and the user is joined to none of them,
    /// `M_UNABLE_TO_AUTHORISE_JOIN` when we cannot tell (we are not in an allowed room), and
    /// `M_UNABLE_TO_GRANT_JOIN` when none of our joined users may invite.
    pub async fn remote_join_authoriser(&self, handle: &RoomHandle, user: &UserId) -> Result<Option<OwnedUserId>> {
        let authorization = &handle.rules.authorization;
        let group = self.current_group(&handle.room_id).await?;
        let join_rule = self
            .state_event_at(group, "m.room.join_rules", "")
            .await?
            .map(|event| event.pdu.content_value())
            .unwrap_or(Value::Null);
        let needs_authoriser = match join_rule.get("join_rule").and_then(Value::as_str) {
            Some("restricted") => authorization.restricted_join_rule,
            Some("knock_restricted") => authorization.knock_restricted_join_rule,
            _ => false,
        };
        if !needs_authoriser
            || matches!(self.member_state(&handle.room_id, user).await?.as_deref(), Some("invite" | "join"))
        {
            return Ok(None);
        }
        let allowed_rooms: Vec<ruma::OwnedRoomId> = join_rule
            .get("allow")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|condition| condition.get("type").and_then(Value::as_str) == Some("m.room_membership"))
            .filter_map(|condition| condition.get("room_id").and_then(Value::as_str))
            .filter_map(|room_id| RoomId::parse(room_id).ok())
            .collect();
        let mut cannot_tell = false;
        let mut is_in_allowed_room = false;
        for room_id in &allowed_rooms {
            // Our state of a room tells only while one of our users is in it.
            if self.handle(room_id).await.is_err() || !self.has_local_member(room_id) {
                cannot_tell = true;
                continue;
            }
            if self.member_state(room_id, user).await?.as_deref() == Some("join") {
                is_in_allowed_room = true;
                break;
            }
        }
        if !is_in_allowed_room {
            return Err(if cannot_tell {
                Error::UnableToAuthoriseJoin("This server cannot tell whether you are in an allowed room".into())
            } else {
                Error::forbidden("You are not in any of the rooms this room admits members of")
            });
        }
        let levels = self.power_levels_at(handle, group).await?;
        let needed = levels.invite();
        let authoriser = self
            .streams
            .members(&handle.room_id, "join")
            .into_iter()
            .filter(|member| member.server_name() == self.server_name)
            .find(|member| levels.user_level(member) >= needed)
            .ok_or_else(|| Error::UnableToGrantJoin("No user of this server may authorise your join".into()))?;
        Ok(Some(authoriser))
    }
}
