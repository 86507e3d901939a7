//! Server discovery and version negotiation: `/versions` and `/.well-known/matrix/client`.

use std::{collections::BTreeMap, sync::Arc};

use axum::extract::State;
use ruma::api::client::discovery::{discover_homeserver, get_supported_versions};

use crate::api::{ServerInfo, extract::Ruma, respond::ApiResult};

/// Spec versions whose Client-Server API Hearth serves.
pub const SUPPORTED_VERSIONS: &[&str] = &[
    "r0.0.1", "r0.1.0", "r0.2.0", "r0.3.0", "r0.4.0", "r0.5.0", "r0.6.0", "r0.6.1", "v1.1", "v1.2", "v1.3", "v1.4",
    "v1.5", "v1.6", "v1.7", "v1.8", "v1.9", "v1.10", "v1.11", "v1.12",
];

/// `GET /_matrix/client/versions`
pub async fn versions(
    State(info): State<Arc<ServerInfo>>,
    Ruma(_): Ruma<get_supported_versions::Request>,
) -> ApiResult<get_supported_versions::Response> {
    let mut response =
        get_supported_versions::Response::new(SUPPORTED_VERSIONS.iter().map(|v| (*v).to_owned()).collect());
    response.unstable_features =
        info.unstable_features.iter().map(|f| ((*f).to_owned(), true)).collect::<BTreeMap<_, _>>();
    Ok(response.into())
}

/// `GET /.well-known/matrix/client`
pub async fn well_known_client(
    State(info): State<Arc<ServerInfo>>,
    Ruma(_): Ruma<discover_homeserver::Request>,
) -> ApiResult<discover_homeserver::Response> {
    let base_url = info.public_baseurl.trim_end_matches('/').to_owned();
    Ok(discover_homeserver::Response::new(discover_homeserver::HomeserverInfo::new(base_url)).into())
}
