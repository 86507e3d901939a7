//! Server discovery and implementation info (Server-Server API, "Server discovery", "Server
//! implementation").

use std::sync::Arc;

use axum::extract::State;
use ruma::api::federation::discovery::{discover_homeserver, get_server_version};

use crate::{
    api::{ServerInfo, extract::Ruma, respond::ApiResult},
    error::Error,
};

/// `GET /.well-known/matrix/server`: the delegated server name, when `federation.well_known_server`
/// is configured (served on the client and the federation listener, whichever answers on 443).
pub async fn well_known_server(
    State(info): State<Arc<ServerInfo>>,
    Ruma(_): Ruma<discover_homeserver::Request>,
) -> ApiResult<discover_homeserver::Response> {
    let delegated = info.well_known_server.as_deref().ok_or_else(|| Error::not_found("No delegation is configured"))?;
    let server =
        delegated.try_into().map_err(|_| Error::Internal("well_known_server is not a server name".to_owned()))?;
    Ok(discover_homeserver::Response::new(server).into())
}

/// `GET /_matrix/federation/v1/version`
pub async fn version(Ruma(_): Ruma<get_server_version::v1::Request>) -> ApiResult<get_server_version::v1::Response> {
    let mut server = get_server_version::v1::Server::new();
    server.name = Some("Hearth".to_owned());
    server.version = Some(env!("CARGO_PKG_VERSION").to_owned());
    let mut response = get_server_version::v1::Response::new();
    response.server = Some(server);
    Ok(response.into())
}
