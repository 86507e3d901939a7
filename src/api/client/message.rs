//! Sending and paginating room events, and redactions.

use std::sync::Arc;

use axum::extract::State;
use ruma::{
    api::{
        Direction,
        client::{
            message::{get_message_events, send_message_event},
            redact::redact_event,
        },
    },
    serde::Raw,
};
use serde_json::Value;

use crate::{
    api::{
        RateLimits,
        extract::{AuthedUser, Ruma},
        respond::ApiResult,
    },
    error::Error,
    matrix::client_event::Format,
    service::{
        backfill::Backfill,
        ephemeral::Presence,
        filter,
        rate_limit::UserAction,
        rooms::{Rooms, pagination::PageToken, send::Sender},
    },
    storage::rooms::{Dir, TopoPos},
};

/// `PUT /_matrix/client/v3/rooms/{roomId}/send/{eventType}/{txnId}`
pub async fn send(
    State(rooms): State<Arc<Rooms>>,
    State(presence): State<Arc<Presence>>,
    State(limits): State<Arc<RateLimits>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<send_message_event::v3::Request>,
) -> ApiResult<send_message_event::v3::Response> {
    if let Some(event_id) =
        rooms.sent_with_txn(&authed.user_id, authed.device_id.as_str(), &req.room_id, req.txn_id.as_str()).await?
    {
        return Ok(send_message_event::v3::Response::new(event_id).into());
    }
    limits.user.check(UserAction::Message, &authed.user_id)?;
    let content: Value = serde_json::from_str(req.body.json().get()).map_err(|e| Error::BadJson(e.to_string()))?;
    if !content.is_object() {
        return Err(Error::BadJson("event content must be an object".to_owned()));
    }
    let sender = Sender {
        user_id: &authed.user_id,
        device_id: Some(authed.device_id.as_str()),
        txn_id: Some(req.txn_id.as_str()),
    };
    let event = rooms.send_message(&sender, &req.room_id, &req.event_type.to_string(), content).await?;
    presence.active(&authed.user_id);
    Ok(send_message_event::v3::Response::new(event.pdu.event_id.clone()).into())
}

/// `PUT /_matrix/client/v3/rooms/{roomId}/redact/{eventId}/{txnId}`
pub async fn redact(
    State(rooms): State<Arc<Rooms>>,
    State(limits): State<Arc<RateLimits>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<redact_event::v3::Request>,
) -> ApiResult<redact_event::v3::Response> {
    if let Some(event_id) =
        rooms.sent_with_txn(&authed.user_id, authed.device_id.as_str(), &req.room_id, req.txn_id.as_str()).await?
    {
        return Ok(redact_event::v3::Response::new(event_id).into());
    }
    limits.user.check(UserAction::Message, &authed.user_id)?;
    let sender = Sender {
        user_id: &authed.user_id,
        device_id: Some(authed.device_id.as_str()),
        txn_id: Some(req.txn_id.as_str()),
    };
    let event_id = rooms.redact(&sender, &req.room_id, &req.event_id, req.reason.as_deref()).await?;
    Ok(redact_event::v3::Response::new(event_id).into())
}

/// `GET /_matrix/client/v3/rooms/{roomId}/messages`
pub async fn messages(
    State(rooms): State<Arc<Rooms>>,
    State(backfill): State<Arc<Backfill>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<get_message_events::v3::Request>,
) -> ApiResult<get_message_events::v3::Response> {
    let user = &authed.user_id;
    let access = rooms.read_access(user, &req.room_id).await?;
    let dir = if req.dir == Direction::Backward { Dir::Backward } else { Dir::Forward };
    let from = match req.from.as_deref() {
        Some(token) => PageToken::parse(token)?,
        None if dir == Dir::Backward => PageToken::Stream(access.upto),
        None => PageToken::Topological(TopoPos::START),
    };
    let to = req.to.as_deref().map(PageToken::parse).transpose()?;
    let limit = (u64::from(req.limit) as usize).clamp(1, 1000);
    crate::service::filter::check_room_event_limits(&req.filter)?;
    let (page, from) = match dir {
        Dir::Backward => backfill.page_back(user, &req.room_id, from, to, limit, Some(&req.filter), &access).await?,
        Dir::Forward => {
            let from = rooms.topological_position(&req.room_id, from).await?;
            let to = match to {
                Some(token) => Some(rooms.topological_position(&req.room_id, token).await?),
                None => None,
            };
            (rooms.page(user, &req.room_id, from, to, dir, limit, Some(&req.filter), &access).await?, from)
        }
    };
    let device = Some(authed.device_id.as_str());
    let mut response = get_message_events::v3::Response::new();
    response.start = req.from.clone().unwrap_or_else(|| PageToken::format(from));
    response.end = page.next.map(PageToken::format);
    if filter::lazy_loading(&req.filter) && !page.events.is_empty() {
        let group = page.events.iter().map(|e| (e.stream_pos, e.state_after)).max().map(|(_, g)| g).unwrap_or(0);
        let members = rooms.members_for(group, &page.events).await?;
        response.state =
            rooms.serve(user, device, &members, Format::WithRoomId).await?.into_iter().map(Raw::from_json).collect();
    }
    response.chunk = rooms
        .serve_timeline(user, device, &page.events, Format::WithRoomId, page.upto)
        .await?
        .into_iter()
        .map(Raw::from_json)
        .collect();
    Ok(response.into())
}
