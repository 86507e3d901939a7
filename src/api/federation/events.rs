//! Serving the room graph (Server-Server API "Retrieving events"): one event, the state before
//! an event (full or as IDs), an event's auth chain and walks back through history (`/backfill`,
//! `/get_missing_events`), each only to a server the room's ACL allows and history visibility
//! lets see the event (`Rooms::server_view`).

use std::sync::Arc;

use axum::extract::State;
use ruma::{
    MilliSecondsSinceUnixEpoch,
    api::federation::{
        authorization::get_event_authorization,
        backfill::get_backfill,
        event::{get_event, get_missing_events, get_room_state, get_room_state_ids},
    },
};
use serde_json::value::RawValue;

use crate::{
    api::{
        ServerInfo,
        extract::{Origin, Ruma},
        respond::ApiResult,
    },
    error::{Error, Result},
    service::rooms::{Rooms, StoredEvent},
};

/// An event in the federation format: the stored PDU as it is (signatures, hashes, no
/// `event_id`).
fn pdu_json(event: &StoredEvent) -> Result<Box<RawValue>> {
    RawValue::from_string(event.pdu.json.clone()).map_err(|err| Error::Internal(format!("stored PDU: {err}")))
}

fn pdus_json(events: &[Arc<StoredEvent>]) -> Result<Vec<Box<RawValue>>> {
    events.iter().map(|event| pdu_json(event)).collect()
}

/// `GET /_matrix/federation/v1/event/{eventId}`
pub async fn event(
    State(rooms): State<Arc<Rooms>>,
    State(info): State<Arc<ServerInfo>>,
    Origin(origin): Origin,
    Ruma(req): Ruma<get_event::v1::Request>,
) -> ApiResult<get_event::v1::Response> {
    let event = rooms.event_for_server(&origin, &req.event_id).await?;
    let pdu = pdu_json(&event)?;
    Ok(get_event::v1::Response::new(info.server_name.clone(), MilliSecondsSinceUnixEpoch::now(), pdu).into())
}

/// `GET /_matrix/federation/v1/state/{roomId}`
pub async fn state(
    State(rooms): State<Arc<Rooms>>,
    Origin(origin): Origin,
    Ruma(req): Ruma<get_room_state::v1::Request>,
) -> ApiResult<get_room_state::v1::Response> {
    let (state, auth_chain) = rooms.state_for_server(&origin, &req.room_id, &req.event_id).await?;
    Ok(get_room_state::v1::Response::new(pdus_json(&auth_chain)?, pdus_json(&state)?).into())
}

/// `GET /_matrix/federation/v1/state_ids/{roomId}`
pub async fn state_ids(
    State(rooms): State<Arc<Rooms>>,
    Origin(origin): Origin,
    Ruma(req): Ruma<get_room_state_ids::v1::Request>,
) -> ApiResult<get_room_state_ids::v1::Response> {
    let (state, auth_chain) = rooms.state_for_server(&origin, &req.room_id, &req.event_id).await?;
    let ids = |events: Vec<Arc<StoredEvent>>| events.iter().map(|e| e.pdu.event_id.clone()).collect();
    Ok(get_room_state_ids::v1::Response::new(ids(auth_chain), ids(state)).into())
}

/// `GET /_matrix/federation/v1/event_auth/{roomId}/{eventId}`
pub async fn event_auth(
    State(rooms): State<Arc<Rooms>>,
    Origin(origin): Origin,
    Ruma(req): Ruma<get_event_authorization::v1::Request>,
) -> ApiResult<get_event_authorization::v1::Response> {
    let auth_chain = rooms.event_auth_for_server(&origin, &req.room_id, &req.event_id).await?;
    Ok(get_event_authorization::v1::Response::new(pdus_json(&auth_chain)?).into())
}

/// `GET /_matrix/federation/v1/backfill/{roomId}`
pub async fn backfill(
    State(rooms): State<Arc<Rooms>>,
    State(info): State<Arc<ServerInfo>>,
    Origin(origin): Origin,
    Ruma(req): Ruma<get_backfill::v1::Request>,
) -> ApiResult<get_backfill::v1::Response> {
    let limit = usize::try_from(u64::from(req.limit)).unwrap_or(usize::MAX);
    let events = rooms.backfill_for_server(&origin, &req.room_id, &req.v, limit).await?;
    Ok(get_backfill::v1::Response::new(
        info.server_name.clone(),
        MilliSecondsSinceUnixEpoch::now(),
        pdus_json(&events)?,
    )
    .into())
}

/// `POST /_matrix/federation/v1/get_missing_events/{roomId}`
pub async fn missing_events(
    State(rooms): State<Arc<Rooms>>,
    Origin(origin): Origin,
    Ruma(req): Ruma<get_missing_events::v1::Request>,
) -> ApiResult<get_missing_events::v1::Response> {
    let limit = usize::try_from(u64::from(req.limit)).unwrap_or(usize::MAX);
    let events = rooms
        .missing_events_for_server(
            &origin,
            &req.room_id,
            &req.earliest_events,
            &req.latest_events,
            limit,
            u64::from(req.min_depth),
        )
        .await?;
    Ok(get_missing_events::v1::Response::new(pdus_json(&events)?).into())
}
