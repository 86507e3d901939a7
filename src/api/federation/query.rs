//! Queries (Server-Server API, "Querying for information"): profiles of our users, what our
//! room aliases point to, and our public room list ("Public Room Directory").

use std::sync::Arc;

use axum::extract::State;
use ruma::{
    UInt,
    api::federation::{
        directory::{get_public_rooms, get_public_rooms_filtered},
        query::{get_profile_information, get_room_information},
    },
};

use crate::{
    api::{
        client::directory::{filtered_page, paginate},
        extract::{Origin, Ruma},
        respond::ApiResult,
    },
    error::Error,
    service::{profiles::Profiles, rooms::Rooms},
};

/// `GET /_matrix/federation/v1/query/profile`
pub async fn profile(
    State(profiles): State<Arc<Profiles>>,
    Origin(origin): Origin,
    Ruma(req): Ruma<get_profile_information::v1::Request>,
) -> ApiResult<get_profile_information::v1::Response> {
    tracing::debug!(%origin, user = %req.user_id, "profile query");
    let profile = profiles.local(&req.user_id, req.field.as_ref()).await?;
    Ok(get_profile_information::v1::Response::from(profile).into())
}

/// `GET /_matrix/federation/v1/query/directory`
pub async fn directory(
    State(rooms): State<Arc<Rooms>>,
    Origin(origin): Origin,
    Ruma(req): Ruma<get_room_information::v1::Request>,
) -> ApiResult<get_room_information::v1::Response> {
    tracing::debug!(%origin, alias = %req.room_alias, "directory query");
    if req.room_alias.server_name() != rooms.server_name() {
        return Err(Error::not_found("Room alias not found"));
    }
    let (room_id, servers) = rooms.resolve_alias(&req.room_alias).await?;
    let servers = servers.into_iter().filter_map(|server| server.try_into().ok()).collect();
    Ok(get_room_information::v1::Response::new(room_id, servers).into())
}

/// `GET /_matrix/federation/v1/publicRooms`
pub async fn public_rooms(
    State(rooms): State<Arc<Rooms>>,
    Origin(origin): Origin,
    Ruma(req): Ruma<get_public_rooms::v1::Request>,
) -> ApiResult<get_public_rooms::v1::Response> {
    tracing::debug!(%origin, "public rooms query");
    let all = rooms.public_rooms(None, None).await?;
    let (page, next, prev, total) = paginate(all, req.limit, req.since.as_deref())?;
    let mut response = get_public_rooms::v1::Response::new();
    response.chunk = page;
    response.next_batch = next;
    response.prev_batch = prev;
    response.total_room_count_estimate = UInt::try_from(total as u64).ok();
    Ok(response.into())
}

/// `POST /_matrix/federation/v1/publicRooms`
pub async fn public_rooms_filtered(
    State(rooms): State<Arc<Rooms>>,
    Origin(origin): Origin,
    Ruma(req): Ruma<get_public_rooms_filtered::v1::Request>,
) -> ApiResult<get_public_rooms_filtered::v1::Response> {
    tracing::debug!(%origin, "public rooms query");
    let (page, next, prev, total) = filtered_page(&rooms, &req.filter, req.limit, req.since.as_deref()).await?;
    let mut response = get_public_rooms_filtered::v1::Response::new();
    response.chunk = page;
    response.next_batch = next;
    response.prev_batch = prev;
    response.total_room_count_estimate = UInt::try_from(total as u64).ok();
    Ok(response.into())
}
