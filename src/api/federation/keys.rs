//! Server keys (Server-Server API, "Retrieving server keys"): publishing ours, and the notary
//! endpoints that hand on other servers' key documents with our signature added.

use std::sync::Arc;

use axum::extract::State;
use ruma::{
    api::federation::discovery::{get_remote_server_keys, get_remote_server_keys_batch, get_server_keys},
    serde::Raw,
};

use crate::{
    api::{extract::Ruma, respond::ApiResult},
    error::Error,
    federation::keys::{Keys, MAX_NOTARY_SERVERS, NotaryRequest},
    service::{now_ms, server_keys::ServerKeys},
};

/// `GET /_matrix/key/v2/server`
pub async fn server_keys(State(keys): State<Arc<ServerKeys>>) -> ApiResult<get_server_keys::v2::Response> {
    let json = serde_json::value::to_raw_value(&keys.document(now_ms()))
        .map_err(|err| Error::Internal(format!("cannot serialise the key document: {err}")))?;
    Ok(get_server_keys::v2::Response::new(Raw::from_json(json)).into())
}

fn millis(ts: ruma::MilliSecondsSinceUnixEpoch) -> i64 {
    i64::try_from(u64::from(ts.get())).unwrap_or(i64::MAX)
}

/// `POST /_matrix/key/v2/query`
pub async fn query_batch(
    State(keys): State<Arc<Keys>>,
    Ruma(req): Ruma<get_remote_server_keys_batch::v2::Request>,
) -> ApiResult<get_remote_server_keys_batch::v2::Response> {
    if req.server_keys.len() > MAX_NOTARY_SERVERS {
        return Err(Error::InvalidParam(format!("at most {MAX_NOTARY_SERVERS} servers per query")));
    }
    let servers = req
        .server_keys
        .into_iter()
        .map(|(server, criteria)| NotaryRequest {
            key_ids: criteria.keys().map(ToString::to_string).collect(),
            minimum_valid_until_ts: criteria.values().filter_map(|c| c.minimum_valid_until_ts).map(millis).max(),
            server,
        })
        .collect();
    Ok(get_remote_server_keys_batch::v2::Response::new(keys.notary_query(servers).await).into())
}

/// `GET /_matrix/key/v2/query/{serverName}`
pub async fn query(
    State(keys): State<Arc<Keys>>,
    Ruma(req): Ruma<get_remote_server_keys::v2::Request>,
) -> ApiResult<get_remote_server_keys::v2::Response> {
    let wanted = NotaryRequest {
        server: req.server_name,
        key_ids: Default::default(),
        minimum_valid_until_ts: Some(millis(req.minimum_valid_until_ts)),
    };
    Ok(get_remote_server_keys::v2::Response::new(keys.notary_query(vec![wanted]).await).into())
}
