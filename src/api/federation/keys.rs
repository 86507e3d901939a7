//! Publishing the server's signing keys (Server-Server API, "Retrieving server keys").

use std::sync::Arc;

use axum::{Json, extract::State};

use crate::service::{now_ms, server_keys::ServerKeys};

/// `GET /_matrix/key/v2/server`
pub async fn server_keys(State(keys): State<Arc<ServerKeys>>) -> Json<ruma::CanonicalJsonObject> {
    Json(keys.document(now_ms()))
}
