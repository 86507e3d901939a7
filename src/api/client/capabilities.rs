//! Capabilities negotiation: `GET /capabilities`.

use std::collections::BTreeMap;

use axum::extract::State;
use ruma::{
    RoomVersionId,
    api::client::discovery::get_capabilities::{
        self,
        v3::{Capabilities, RoomVersionStability, RoomVersionsCapability},
    },
};

use crate::{
    api::{
        extract::{GuestOrUser, Ruma},
        respond::ApiResult,
    },
    error::Error,
    matrix::room_version,
    service::receipts::Receipts,
};

/// `GET /_matrix/client/v3/capabilities`
pub async fn capabilities(
    State(receipts): State<std::sync::Arc<Receipts>>,
    _user: GuestOrUser,
    Ruma(_): Ruma<get_capabilities::v3::Request>,
) -> ApiResult<get_capabilities::v3::Response> {
    let available: BTreeMap<RoomVersionId, RoomVersionStability> =
        room_version::SUPPORTED.into_iter().map(|version| (version, RoomVersionStability::Stable)).collect();
    let mut capabilities = Capabilities::new();
    capabilities.room_versions = RoomVersionsCapability::new(room_version::DEFAULT, available);
    if let Some(max_room_members) = receipts.delivered_room_limit() {
        // spec/delivered-receipts.md §10: clients show "delivery not confirmed" in bigger rooms.
        capabilities
            .set("org.hearth.delivered_receipts", serde_json::json!({"max_room_members": max_room_members}))
            .map_err(|err| Error::Internal(err.to_string()))?;
    }
    capabilities.change_password.enabled = true;
    capabilities.thirdparty_id_changes.enabled = false;
    capabilities.get_login_token.enabled = false;
    Ok(get_capabilities::v3::Response::new(capabilities).into())
}
