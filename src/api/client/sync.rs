//! `GET /sync` (long-poll) and filters.

use std::{sync::Arc, time::Duration};

use axum::{Json, extract::State};
use ruma::api::client::{
    filter::{FilterDefinition, create_filter, get_filter},
    sync::sync_events,
};

use crate::{
    api::{
        extract::{GuestOrUser, Ruma},
        respond::ApiResult,
    },
    error::{Error, Result},
    service::{
        filter,
        rooms::Rooms,
        stream::StreamToken,
        sync::{Sync, SyncRequest, SyncResponse},
    },
};

/// Longest long-poll honoured.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(120);

/// `GET /_matrix/client/v3/sync`
pub async fn sync(
    State(sync): State<Arc<Sync>>,
    State(rooms): State<Arc<Rooms>>,
    GuestOrUser(authed): GuestOrUser,
    Ruma(req): Ruma<sync_events::v3::Request>,
) -> Result<Json<SyncResponse>> {
    // The request is taken apart (its filter moved, not copied) before the long-poll: what a
    // parked `/sync` keeps is the `SyncRequest` alone.
    let sync_events::v3::Request { filter: requested, since, full_state, set_presence, timeout, .. } = req;
    let since = since.as_deref().map(StreamToken::parse).transpose()?;
    let definition = match requested {
        None => FilterDefinition::default(),
        Some(sync_events::v3::Filter::FilterDefinition(definition)) => definition,
        Some(sync_events::v3::Filter::FilterId(id)) => {
            Box::pin(filter::resolve_sync_filter(&rooms.db, &authed.user_id, &id)).await?
        }
        Some(_) => return Err(Error::InvalidParam("unsupported filter".to_owned())),
    };
    filter::check_limits(&definition)?;
    let request = SyncRequest {
        user_id: authed.user_id.clone(),
        device_id: authed.device_id.to_string(),
        since,
        filter: definition,
        full_state,
    };
    let _presence = sync.presence().sync_started(&authed.user_id, set_presence.as_str());
    let timeout = timeout.unwrap_or_default().min(MAX_TIMEOUT);
    let response = sync.wait(&request, timeout).await?;
    Ok(Json(response))
}

/// `POST /_matrix/client/v3/user/{userId}/filter`
pub async fn create_filter(
    State(rooms): State<Arc<Rooms>>,
    GuestOrUser(authed): GuestOrUser,
    Ruma(req): Ruma<create_filter::v3::Request>,
) -> ApiResult<create_filter::v3::Response> {
    if req.user_id != authed.user_id {
        return Err(Error::forbidden("You cannot create filters for other users"));
    }
    let id = filter::create_filter(&rooms.db, &authed.user_id, &req.filter).await?;
    Ok(create_filter::v3::Response::new(id).into())
}

/// `GET /_matrix/client/v3/user/{userId}/filter/{filterId}`
pub async fn get_filter(
    State(rooms): State<Arc<Rooms>>,
    GuestOrUser(authed): GuestOrUser,
    Ruma(req): Ruma<get_filter::v3::Request>,
) -> ApiResult<get_filter::v3::Response> {
    if req.user_id != authed.user_id {
        return Err(Error::forbidden("You cannot read other users' filters"));
    }
    let definition = filter::get_filter(&rooms.db, &authed.user_id, &req.filter_id).await?;
    Ok(get_filter::v3::Response::new(definition).into())
}
