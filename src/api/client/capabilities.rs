//! Capabilities negotiation: `GET /capabilities`.

use std::collections::BTreeMap;

use ruma::{
    RoomVersionId,
    api::client::discovery::get_capabilities::{
        self,
        v3::{Capabilities, RoomVersionStability, RoomVersionsCapability},
    },
};

use crate::api::{
    extract::{GuestOrUser, Ruma},
    respond::ApiResult,
};

/// `GET /_matrix/client/v3/capabilities`
pub async fn capabilities(
    _user: GuestOrUser,
    Ruma(_): Ruma<get_capabilities::v3::Request>,
) -> ApiResult<get_capabilities::v3::Response> {
    let available: BTreeMap<RoomVersionId, RoomVersionStability> =
        [RoomVersionId::V10, RoomVersionId::V11, RoomVersionId::V12]
            .into_iter()
            .map(|version| (version, RoomVersionStability::Stable))
            .collect();
    let mut capabilities = Capabilities::new();
    capabilities.room_versions = RoomVersionsCapability::new(RoomVersionId::V12, available);
    capabilities.change_password.enabled = true;
    capabilities.thirdparty_id_changes.enabled = false;
    capabilities.get_login_token.enabled = false;
    Ok(get_capabilities::v3::Response::new(capabilities).into())
}
