//! `POST /_matrix/client/v3/search` (`service::search`).

use std::sync::Arc;

use axum::extract::State;
use ruma::api::client::search::search_events;

use crate::{
    api::{
        extract::{AuthedUser, RumaWithBody},
        respond::ApiResult,
    },
    service::{filter, search::Search},
};

/// `POST /_matrix/client/v3/search`: the `room_events` category (the only one the spec has).
pub async fn search(
    State(search): State<Arc<Search>>,
    AuthedUser(authed): AuthedUser,
    RumaWithBody(req, body): RumaWithBody<search_events::v3::Request>,
) -> ApiResult<search_events::v3::Response> {
    let mut categories = search_events::v3::ResultCategories::new();
    if let Some(criteria) = &req.search_categories.room_events {
        filter::check_room_event_limits(&criteria.filter)?;
        // Context only when asked for: ruma fills in 5 before and 5 after when it is left out.
        let with_context = serde_json::from_slice::<serde_json::Value>(&body)
            .is_ok_and(|v| v["search_categories"]["room_events"].get("event_context").is_some());
        categories.room_events = search
            .room_events(
                &authed.user_id,
                Some(authed.device_id.as_str()),
                criteria,
                with_context,
                req.next_batch.as_deref(),
            )
            .await?;
    }
    Ok(search_events::v3::Response::new(categories).into())
}
