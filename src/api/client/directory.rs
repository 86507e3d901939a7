//! Room aliases, the public room directory and the user directory.

use std::sync::Arc;

use axum::extract::State;
use ruma::{
    UInt,
    api::client::{
        alias::{create_alias, delete_alias, get_alias},
        directory::{get_public_rooms, get_public_rooms_filtered, get_room_visibility, set_room_visibility},
        room::{Visibility, aliases},
        user_directory::search_users,
    },
    directory::{PublicRoomsChunk, PublicRoomsChunkInit},
};

use crate::{
    api::{
        extract::{AuthedUser, Ruma},
        respond::ApiResult,
    },
    error::{Error, Result},
    service::{
        aliases::Aliases,
        rooms::{Rooms, directory::PublicRoom},
    },
};

/// `PUT /_matrix/client/v3/directory/room/{roomAlias}`
pub async fn create(
    State(rooms): State<Arc<Rooms>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<create_alias::v3::Request>,
) -> ApiResult<create_alias::v3::Response> {
    rooms.create_alias(&authed.user_id, &req.room_alias, &req.room_id).await?;
    Ok(create_alias::v3::Response::new().into())
}

/// `GET /_matrix/client/v3/directory/room/{roomAlias}` (another server's alias is asked of it)
pub async fn get(
    State(aliases): State<Arc<Aliases>>,
    Ruma(req): Ruma<get_alias::v3::Request>,
) -> ApiResult<get_alias::v3::Response> {
    let (room_id, servers) = aliases.resolve(&req.room_alias).await?;
    Ok(get_alias::v3::Response::new(room_id, servers).into())
}

/// `DELETE /_matrix/client/v3/directory/room/{roomAlias}`
pub async fn delete(
    State(rooms): State<Arc<Rooms>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<delete_alias::v3::Request>,
) -> ApiResult<delete_alias::v3::Response> {
    rooms.delete_alias(&authed.user_id, &req.room_alias).await?;
    Ok(delete_alias::v3::Response::new().into())
}

/// `GET /_matrix/client/v3/rooms/{roomId}/aliases`
pub async fn room_aliases(
    State(rooms): State<Arc<Rooms>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<aliases::v3::Request>,
) -> ApiResult<aliases::v3::Response> {
    let list = rooms.local_aliases(&authed.user_id, &req.room_id).await?;
    Ok(aliases::v3::Response::new(list.into_iter().filter_map(|a| a.try_into().ok()).collect()).into())
}

/// `GET /_matrix/client/v3/directory/list/room/{roomId}`
pub async fn visibility(
    State(rooms): State<Arc<Rooms>>,
    Ruma(req): Ruma<get_room_visibility::v3::Request>,
) -> ApiResult<get_room_visibility::v3::Response> {
    let public = rooms.is_listed(&req.room_id).await?;
    Ok(get_room_visibility::v3::Response::new(if public { Visibility::Public } else { Visibility::Private }).into())
}

/// `PUT /_matrix/client/v3/directory/list/room/{roomId}`
pub async fn set_visibility(
    State(rooms): State<Arc<Rooms>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<set_room_visibility::v3::Request>,
) -> ApiResult<set_room_visibility::v3::Response> {
    let public = match req.visibility {
        Visibility::Public => true,
        Visibility::Private => false,
        _ => return Err(Error::InvalidParam("visibility must be public or private".to_owned())),
    };
    rooms.set_listed(&authed.user_id, &req.room_id, public).await?;
    Ok(set_room_visibility::v3::Response::new().into())
}

fn chunk(room: PublicRoom) -> PublicRoomsChunk {
    let mut chunk: PublicRoomsChunk = PublicRoomsChunkInit {
        num_joined_members: UInt::try_from(room.num_joined_members).unwrap_or_default(),
        room_id: room.room_id,
        world_readable: room.world_readable,
        guest_can_join: room.guest_can_join,
    }
    .into();
    chunk.name = room.name;
    chunk.topic = room.topic;
    chunk.canonical_alias = room.canonical_alias.and_then(|a| a.try_into().ok());
    chunk.avatar_url = room.avatar_url.map(Into::into);
    chunk.join_rule = room.join_rule.as_str().into();
    chunk.room_type = room.room_type.map(|t| t.as_str().into());
    chunk
}

/// A page of the directory: entries, next and previous tokens, total count.
pub(crate) type DirectoryPage = (Vec<PublicRoomsChunk>, Option<String>, Option<String>, usize);

/// A page of the public room list matching a directory filter (search term, room types), for
/// the client's and the federation's `POST /publicRooms`.
pub(crate) async fn filtered_page(
    rooms: &Rooms,
    filter: &ruma::directory::Filter,
    limit: Option<UInt>,
    since: Option<&str>,
) -> Result<DirectoryPage> {
    let types: Vec<Option<String>> = filter.room_types.iter().map(|t| t.as_str().map(str::to_owned)).collect();
    let all =
        rooms.public_rooms(filter.generic_search_term.as_deref(), (!types.is_empty()).then_some(&types[..])).await?;
    paginate(all, limit, since)
}

/// Where a room sorts in the list: most members first, then by room ID.
fn sort_key(room: &PublicRoom) -> (std::cmp::Reverse<u64>, &str) {
    (std::cmp::Reverse(room.num_joined_members), room.room_id.as_str())
}

/// Pages through the public rooms. Tokens name a position by sort key, not by offset, so a room
/// joining or leaving the list between two requests neither repeats nor skips others:
/// `n{members}_{roomId}` starts after that room, `p{members}_{roomId}` ends before it.
pub(crate) fn paginate(all: Vec<PublicRoom>, limit: Option<UInt>, since: Option<&str>) -> Result<DirectoryPage> {
    let total = all.len();
    let limit = limit.map_or(total.max(1), |l| u64::from(l) as usize).max(1);
    let (start, end) = match since {
        None => (0, limit.min(total)),
        Some(token) => {
            let invalid = || Error::InvalidParam("invalid since token".to_owned());
            let (forward, rest) = match token.split_at_checked(1) {
                Some(("n", rest)) => (true, rest),
                Some(("p", rest)) => (false, rest),
                _ => return Err(invalid()),
            };
            let (members, room_id) = rest.split_once('_').ok_or_else(invalid)?;
            let key = (std::cmp::Reverse(members.parse::<u64>().map_err(|_| invalid())?), room_id);
            if forward {
                let start = all.partition_point(|room| sort_key(room) <= key);
                (start, (start + limit).min(total))
            } else {
                let end = all.partition_point(|room| sort_key(room) < key);
                (end.saturating_sub(limit), end)
            }
        }
    };
    let token = |prefix: char, room: &PublicRoom| format!("{prefix}{}_{}", room.num_joined_members, room.room_id);
    let next = (end < total && end > start).then(|| token('n', &all[end - 1]));
    let prev = (start > 0 && start < total).then(|| token('p', &all[start]));
    let page: Vec<_> = all.into_iter().skip(start).take(end - start).map(chunk).collect();
    Ok((page, next, prev, total))
}

fn check_server(rooms: &Rooms, server: Option<&ruma::ServerName>) -> Result<()> {
    match server {
        Some(server) if server != rooms.server_name() => {
            Err(Error::not_found("Other servers' directories need federation, which is not available yet"))
        }
        _ => Ok(()),
    }
}

/// `GET /_matrix/client/v3/publicRooms`
pub async fn public_rooms(
    State(rooms): State<Arc<Rooms>>,
    Ruma(req): Ruma<get_public_rooms::v3::Request>,
) -> ApiResult<get_public_rooms::v3::Response> {
    check_server(&rooms, req.server.as_deref())?;
    let all = rooms.public_rooms(None, None).await?;
    let (page, next, prev, total) = paginate(all, req.limit, req.since.as_deref())?;
    let mut response = get_public_rooms::v3::Response::new(page);
    response.next_batch = next;
    response.prev_batch = prev;
    response.total_room_count_estimate = UInt::try_from(total as u64).ok();
    Ok(response.into())
}

/// `POST /_matrix/client/v3/publicRooms`
pub async fn public_rooms_filtered(
    State(rooms): State<Arc<Rooms>>,
    AuthedUser(_authed): AuthedUser,
    Ruma(req): Ruma<get_public_rooms_filtered::v3::Request>,
) -> ApiResult<get_public_rooms_filtered::v3::Response> {
    check_server(&rooms, req.server.as_deref())?;
    let (page, next, prev, total) = filtered_page(&rooms, &req.filter, req.limit, req.since.as_deref()).await?;
    let mut response = get_public_rooms_filtered::v3::Response::new();
    response.chunk = page;
    response.next_batch = next;
    response.prev_batch = prev;
    response.total_room_count_estimate = UInt::try_from(total as u64).ok();
    Ok(response.into())
}

/// `POST /_matrix/client/v3/user_directory/search`
pub async fn search_users(
    State(rooms): State<Arc<Rooms>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<search_users::v3::Request>,
) -> ApiResult<search_users::v3::Response> {
    let limit = (u64::from(req.limit) as usize).clamp(1, 100);
    let (users, limited) = rooms.search_users(&authed.user_id, &req.search_term, limit).await?;
    let results = users
        .into_iter()
        .map(|(user_id, name, avatar)| {
            let mut user = search_users::v3::User::new(user_id);
            user.display_name = name;
            user.avatar_url = avatar.map(Into::into);
            user
        })
        .collect();
    Ok(search_users::v3::Response::new(results, limited).into())
}
