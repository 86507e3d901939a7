//! Relations (edits, reactions, threads, references) and the thread list.

use std::sync::Arc;

use axum::extract::State;
use ruma::{
    OwnedEventId, OwnedRoomId, UInt,
    api::{
        Direction,
        client::{
            relations::{
                get_relating_events, get_relating_events_with_rel_type,
                get_relating_events_with_rel_type_and_event_type,
            },
            threads::get_threads,
        },
    },
    serde::Raw,
};

use crate::{
    api::{
        extract::{AuthedUser, Ruma},
        respond::ApiResult,
    },
    error::Result,
    matrix::client_event::Format,
    service::{rooms::Rooms, stream::StreamToken},
    storage::rooms::Dir,
};

/// The parts the three relation endpoints share.
struct RelationsQuery<'a> {
    room_id: &'a OwnedRoomId,
    event_id: &'a OwnedEventId,
    rel_type: Option<String>,
    event_type: Option<String>,
    from: Option<&'a str>,
    to: Option<&'a str>,
    dir: Direction,
    limit: Option<UInt>,
    recurse: bool,
}

type RelationsPage = (Vec<Raw<ruma::events::AnyMessageLikeEvent>>, Option<String>, Option<String>, Option<UInt>);

async fn relations(
    rooms: &Rooms,
    authed: &crate::service::users::Authed,
    q: RelationsQuery<'_>,
) -> Result<RelationsPage> {
    let dir = if q.dir == Direction::Forward { Dir::Forward } else { Dir::Backward };
    let from = q.from.map(StreamToken::parse).transpose()?.map(|t| t.stream);
    let to = q.to.map(StreamToken::parse).transpose()?.map(|t| t.stream);
    let limit = q.limit.map_or(50, |l| u64::from(l) as usize).clamp(1, 100);
    let page = rooms
        .relations(
            &authed.user_id,
            q.room_id,
            q.event_id,
            q.rel_type.as_deref(),
            q.event_type.as_deref(),
            from,
            to,
            dir,
            limit,
            q.recurse,
        )
        .await?;
    let served = rooms
        .serve_timeline(&authed.user_id, Some(authed.device_id.as_str()), &page.events, Format::WithRoomId, page.upto)
        .await?;
    Ok((
        served.into_iter().map(Raw::from_json).collect(),
        page.next.map(|p| StreamToken::new(p, 0).to_string()),
        q.from.map(str::to_owned),
        q.recurse.then(|| UInt::from(3u32)),
    ))
}

/// `GET /_matrix/client/v1/rooms/{roomId}/relations/{eventId}`
pub async fn all(
    State(rooms): State<Arc<Rooms>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<get_relating_events::v1::Request>,
) -> ApiResult<get_relating_events::v1::Response> {
    let query = RelationsQuery {
        room_id: &req.room_id,
        event_id: &req.event_id,
        rel_type: None,
        event_type: None,
        from: req.from.as_deref(),
        to: req.to.as_deref(),
        dir: req.dir,
        limit: req.limit,
        recurse: req.recurse,
    };
    let (chunk, next, prev, depth) = relations(&rooms, &authed, query).await?;
    let mut response = get_relating_events::v1::Response::new(chunk);
    response.next_batch = next;
    response.prev_batch = prev;
    response.recursion_depth = depth;
    Ok(response.into())
}

/// `GET /_matrix/client/v1/rooms/{roomId}/relations/{eventId}/{relType}`
pub async fn by_type(
    State(rooms): State<Arc<Rooms>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<get_relating_events_with_rel_type::v1::Request>,
) -> ApiResult<get_relating_events_with_rel_type::v1::Response> {
    let query = RelationsQuery {
        room_id: &req.room_id,
        event_id: &req.event_id,
        rel_type: Some(req.rel_type.to_string()),
        event_type: None,
        from: req.from.as_deref(),
        to: req.to.as_deref(),
        dir: req.dir,
        limit: req.limit,
        recurse: req.recurse,
    };
    let (chunk, next, prev, depth) = relations(&rooms, &authed, query).await?;
    let mut response = get_relating_events_with_rel_type::v1::Response::new(chunk);
    response.next_batch = next;
    response.prev_batch = prev;
    response.recursion_depth = depth;
    Ok(response.into())
}

/// `GET /_matrix/client/v1/rooms/{roomId}/relations/{eventId}/{relType}/{eventType}`
pub async fn by_type_and_event_type(
    State(rooms): State<Arc<Rooms>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<get_relating_events_with_rel_type_and_event_type::v1::Request>,
) -> ApiResult<get_relating_events_with_rel_type_and_event_type::v1::Response> {
    let query = RelationsQuery {
        room_id: &req.room_id,
        event_id: &req.event_id,
        rel_type: Some(req.rel_type.to_string()),
        event_type: Some(req.event_type.to_string()),
        from: req.from.as_deref(),
        to: req.to.as_deref(),
        dir: req.dir,
        limit: req.limit,
        recurse: req.recurse,
    };
    let (chunk, next, prev, depth) = relations(&rooms, &authed, query).await?;
    let mut response = get_relating_events_with_rel_type_and_event_type::v1::Response::new(chunk);
    response.next_batch = next;
    response.prev_batch = prev;
    response.recursion_depth = depth;
    Ok(response.into())
}

/// `GET /_matrix/client/v1/rooms/{roomId}/threads`
pub async fn threads(
    State(rooms): State<Arc<Rooms>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<get_threads::v1::Request>,
) -> ApiResult<get_threads::v1::Response> {
    let from = req.from.as_deref().map(StreamToken::parse).transpose()?.map(|t| t.stream);
    let limit = req.limit.map_or(50, |l| u64::from(l) as usize).clamp(1, 100);
    let participated = matches!(req.include, get_threads::v1::IncludeThreads::Participated);
    let page = rooms.threads(&authed.user_id, &req.room_id, participated, from, limit).await?;
    let served = rooms
        .serve_timeline(&authed.user_id, Some(authed.device_id.as_str()), &page.events, Format::WithRoomId, page.upto)
        .await?;
    let mut response = get_threads::v1::Response::new(served.into_iter().map(Raw::from_json).collect());
    response.next_batch = page.next.map(|p| StreamToken::new(p, 0).to_string());
    Ok(response.into())
}
