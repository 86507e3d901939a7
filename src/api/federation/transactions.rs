//! Transactions (Server-Server API, "Transactions"): PDUs and EDUs pushed by other servers.

use std::sync::Arc;

use axum::extract::State;
use ruma::api::federation::transactions::send_transaction_message;

use crate::{
    api::{
        extract::{Origin, Ruma},
        respond::ApiResult,
    },
    error::Error,
    service::transactions::Transactions,
};

/// `PUT /_matrix/federation/v1/send/{txnId}`
pub async fn send(
    State(transactions): State<Arc<Transactions>>,
    Origin(origin): Origin,
    Ruma(req): Ruma<send_transaction_message::v1::Request>,
) -> ApiResult<send_transaction_message::v1::Response> {
    if req.origin != origin {
        return Err(Error::forbidden("The transaction's origin is not the server that signed the request"));
    }
    let edus: Vec<Box<serde_json::value::RawValue>> = req.edus.iter().map(|edu| edu.json().to_owned()).collect();
    let results = transactions.receive(&origin, req.transaction_id.as_str(), &req.pdus, &edus).await?;
    Ok(send_transaction_message::v1::Response::new(results).into())
}
