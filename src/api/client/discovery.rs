//! Server discovery and version negotiation: `/versions` and `/.well-known/matrix/client`.

use std::{collections::BTreeMap, sync::Arc};

use axum::extract::State;
use ruma::api::client::discovery::{discover_homeserver, get_supported_versions};

use crate::api::{ServerInfo, extract::Ruma, respond::ApiResult};

/// Spec versions whose Client-Server API Hearth serves.
///
/// A version is advertised only when what it *added* to the server's obligations is present,
/// because clients switch behaviour on these strings (matrix-js-sdk: v1.4 for threads and private
/// receipts, v1.11 for authenticated media, v1.16 for extended profiles). v1.2 added the space
/// hierarchy (`GET /_matrix/client/v1/rooms/{roomId}/hierarchy`), which Hearth does not serve, so
/// the list stops at v1.1 (knocking, `/v3` paths, room versions 7–9: all present); later versions
/// (v1.11's authenticated media, …) are missing more. Features Hearth has from later versions
/// (threads, threaded receipts and counts) are announced one by one as `unstable_features` (see
/// `app.rs`), which is how clients learn of them short of the whole version; they are not a
/// reason to claim a version whose other requirements fail.
pub const SUPPORTED_VERSIONS: &[&str] =
    &["r0.0.1", "r0.1.0", "r0.2.0", "r0.3.0", "r0.4.0", "r0.5.0", "r0.6.0", "r0.6.1", "v1.1"];

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
