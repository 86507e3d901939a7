//! Room membership: invite, join, leave, kick, ban, unban, knock, forget, and member lists.

use std::sync::Arc;

use axum::extract::State;
use ruma::{
    api::client::{
        knock::knock_room,
        membership::{
            ban_user, forget_room, get_member_events, invite_user, join_room_by_id, join_room_by_id_or_alias,
            joined_members, joined_rooms, kick_user, leave_room, unban_user,
        },
    },
    serde::Raw,
};

use crate::{
    api::{
        RateLimits,
        extract::{AuthedUser, GuestOrUser, Ruma},
        respond::ApiResult,
    },
    error::Error,
    matrix::client_event::Format,
    service::{
        ephemeral::Presence, joins::Joins, rate_limit::UserAction, remote_membership::RemoteMembership, rooms::Rooms,
        stream::StreamToken,
    },
};

/// `POST /_matrix/client/v3/rooms/{roomId}/invite`
pub async fn invite(
    State(rooms): State<Arc<Rooms>>,
    State(remote): State<Arc<RemoteMembership>>,
    State(limits): State<Arc<RateLimits>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<invite_user::v3::Request>,
) -> ApiResult<invite_user::v3::Response> {
    let invite_user::v3::InvitationRecipient::UserId(recipient) = req.recipient else {
        return Err(Error::forbidden("Third-party invites are not supported"));
    };
    limits.user.check(UserAction::Invite, &authed.user_id)?;
    if recipient.user_id.server_name() != rooms.server_name() {
        remote.invite(&authed.user_id, &req.room_id, &recipient.user_id, recipient.reason.as_deref()).await?;
        return Ok(invite_user::v3::Response::new().into());
    }
    rooms.invite(&authed.user_id, &req.room_id, &recipient.user_id, recipient.reason.as_deref(), false).await?;
    Ok(invite_user::v3::Response::new().into())
}

/// `POST /_matrix/client/v3/rooms/{roomId}/join`
pub async fn join_by_id(
    State(joins): State<Arc<Joins>>,
    State(presence): State<Arc<Presence>>,
    State(limits): State<Arc<RateLimits>>,
    GuestOrUser(authed): GuestOrUser,
    Ruma(req): Ruma<join_room_by_id::v3::Request>,
) -> ApiResult<join_room_by_id::v3::Response> {
    limits.user.check(UserAction::Join, &authed.user_id)?;
    // A room on other servers is joined through the room ID's server (pre-v12 IDs name one).
    joins.join(&authed.user_id, authed.is_guest, req.room_id.as_str(), &[], req.reason.as_deref()).await?;
    presence.active(&authed.user_id);
    Ok(join_room_by_id::v3::Response::new(req.room_id).into())
}

/// `POST /_matrix/client/v3/join/{roomIdOrAlias}`
pub async fn join_by_id_or_alias(
    State(joins): State<Arc<Joins>>,
    State(presence): State<Arc<Presence>>,
    State(limits): State<Arc<RateLimits>>,
    GuestOrUser(authed): GuestOrUser,
    Ruma(req): Ruma<join_room_by_id_or_alias::v3::Request>,
) -> ApiResult<join_room_by_id_or_alias::v3::Response> {
    limits.user.check(UserAction::Join, &authed.user_id)?;
    let room_id = joins
        .join(&authed.user_id, authed.is_guest, req.room_id_or_alias.as_str(), &req.via, req.reason.as_deref())
        .await?;
    presence.active(&authed.user_id);
    Ok(join_room_by_id_or_alias::v3::Response::new(room_id).into())
}

/// `POST /_matrix/client/v3/knock/{roomIdOrAlias}`
pub async fn knock(
    State(rooms): State<Arc<Rooms>>,
    State(remote): State<Arc<RemoteMembership>>,
    State(limits): State<Arc<RateLimits>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<knock_room::v3::Request>,
) -> ApiResult<knock_room::v3::Response> {
    limits.user.check(UserAction::Join, &authed.user_id)?;
    let room_id = rooms.resolve_room(req.room_id_or_alias.as_str()).await?;
    remote.knock(&authed.user_id, &room_id, &req.via, req.reason.as_deref()).await?;
    Ok(knock_room::v3::Response::new(room_id).into())
}

/// `POST /_matrix/client/v3/rooms/{roomId}/leave`
pub async fn leave(
    State(remote): State<Arc<RemoteMembership>>,
    GuestOrUser(authed): GuestOrUser,
    Ruma(req): Ruma<leave_room::v3::Request>,
) -> ApiResult<leave_room::v3::Response> {
    remote.leave(&authed.user_id, &req.room_id, req.reason.as_deref()).await?;
    Ok(leave_room::v3::Response::new().into())
}

/// `POST /_matrix/client/v3/rooms/{roomId}/kick`
pub async fn kick(
    State(rooms): State<Arc<Rooms>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<kick_user::v3::Request>,
) -> ApiResult<kick_user::v3::Response> {
    rooms.kick(&authed.user_id, &req.room_id, &req.user_id, req.reason.as_deref()).await?;
    Ok(kick_user::v3::Response::new().into())
}

/// `POST /_matrix/client/v3/rooms/{roomId}/ban`
pub async fn ban(
    State(rooms): State<Arc<Rooms>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<ban_user::v3::Request>,
) -> ApiResult<ban_user::v3::Response> {
    rooms.ban(&authed.user_id, &req.room_id, &req.user_id, req.reason.as_deref()).await?;
    Ok(ban_user::v3::Response::new().into())
}

/// `POST /_matrix/client/v3/rooms/{roomId}/unban`
pub async fn unban(
    State(rooms): State<Arc<Rooms>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<unban_user::v3::Request>,
) -> ApiResult<unban_user::v3::Response> {
    rooms.unban(&authed.user_id, &req.room_id, &req.user_id, req.reason.as_deref()).await?;
    Ok(unban_user::v3::Response::new().into())
}

/// `POST /_matrix/client/v3/rooms/{roomId}/forget`
pub async fn forget(
    State(rooms): State<Arc<Rooms>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<forget_room::v3::Request>,
) -> ApiResult<forget_room::v3::Response> {
    rooms.forget(&authed.user_id, &req.room_id).await?;
    Ok(forget_room::v3::Response::new().into())
}

/// `GET /_matrix/client/v3/joined_rooms`
pub async fn joined(
    State(rooms): State<Arc<Rooms>>,
    GuestOrUser(authed): GuestOrUser,
    Ruma(_): Ruma<joined_rooms::v3::Request>,
) -> ApiResult<joined_rooms::v3::Response> {
    let mut joined: Vec<_> = rooms
        .streams
        .user_rooms(&authed.user_id, i64::MAX)
        .into_iter()
        .filter(|(_, membership, _)| membership == "join")
        .map(|(room, _, _)| room)
        .collect();
    joined.sort();
    Ok(joined_rooms::v3::Response::new(joined).into())
}

/// `GET /_matrix/client/v3/rooms/{roomId}/members`
pub async fn members(
    State(rooms): State<Arc<Rooms>>,
    GuestOrUser(authed): GuestOrUser,
    Ruma(req): Ruma<get_member_events::v3::Request>,
) -> ApiResult<get_member_events::v3::Response> {
    let at = req.at.as_deref().map(StreamToken::parse).transpose()?.map(|t| t.stream);
    let membership = req.membership.as_ref().map(|m| m.as_str());
    let not_membership = req.not_membership.as_ref().map(|m| m.as_str());
    let events = rooms.members_at(&authed.user_id, &req.room_id, at, membership, not_membership).await?;
    let served = rooms.serve(&authed.user_id, Some(authed.device_id.as_str()), &events, Format::WithRoomId).await?;
    Ok(get_member_events::v3::Response::new(served.into_iter().map(Raw::from_json).collect()).into())
}

/// `GET /_matrix/client/v3/rooms/{roomId}/joined_members`
pub async fn joined_members(
    State(rooms): State<Arc<Rooms>>,
    GuestOrUser(authed): GuestOrUser,
    Ruma(req): Ruma<joined_members::v3::Request>,
) -> ApiResult<joined_members::v3::Response> {
    let mut joined = std::collections::BTreeMap::new();
    for (user_id, display_name, avatar_url) in rooms.joined_members(&authed.user_id, &req.room_id).await? {
        let mut member = joined_members::v3::RoomMember::new();
        member.display_name = display_name;
        member.avatar_url = avatar_url.map(Into::into);
        joined.insert(user_id, member);
    }
    Ok(joined_members::v3::Response::new(joined).into())
}
