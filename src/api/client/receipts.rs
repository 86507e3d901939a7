//! Receipts and read markers.

use std::sync::Arc;

use axum::extract::State;
use ruma::api::client::{
    read_marker::set_read_marker,
    receipt::create_receipt::{self, v3::ReceiptType},
};
use ruma::events::receipt::ReceiptThread;

use crate::{
    api::{
        extract::{AuthedUser, Ruma},
        respond::ApiResult,
    },
    service::{ephemeral::Presence, push::Push, receipts::Receipts},
};

/// `POST /_matrix/client/v3/rooms/{roomId}/receipt/{receiptType}/{eventId}`
pub async fn receipt(
    State(receipts): State<Arc<Receipts>>,
    State(presence): State<Arc<Presence>>,
    State(push): State<Arc<Push>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<create_receipt::v3::Request>,
) -> ApiResult<create_receipt::v3::Response> {
    let receipt_type = match &req.receipt_type {
        ReceiptType::Read => "m.read".to_owned(),
        ReceiptType::ReadPrivate => "m.read.private".to_owned(),
        ReceiptType::FullyRead => "m.fully_read".to_owned(),
        other => other.to_string(),
    };
    let thread = match &req.thread {
        ReceiptThread::Unthreaded => None,
        ReceiptThread::Main => Some("main".to_owned()),
        ReceiptThread::Thread(root) => Some(root.to_string()),
        other => Some(other.as_str().unwrap_or_default().to_owned()),
    };
    receipts.post(&authed.user_id, &req.room_id, &receipt_type, &req.event_id, thread.as_deref()).await?;
    presence.active(&authed.user_id);
    if receipt_type != "m.fully_read" {
        push.read_receipt(&authed.user_id);
    }
    Ok(create_receipt::v3::Response::new().into())
}

/// `POST /_matrix/client/v3/rooms/{roomId}/read_markers`
pub async fn read_markers(
    State(receipts): State<Arc<Receipts>>,
    State(push): State<Arc<Push>>,
    AuthedUser(authed): AuthedUser,
    Ruma(req): Ruma<set_read_marker::v3::Request>,
) -> ApiResult<set_read_marker::v3::Response> {
    receipts
        .read_markers(
            &authed.user_id,
            &req.room_id,
            req.fully_read.as_deref(),
            req.read_receipt.as_deref(),
            req.private_read_receipt.as_deref(),
        )
        .await?;
    if req.read_receipt.is_some() || req.private_read_receipt.is_some() {
        push.read_receipt(&authed.user_id);
    }
    Ok(set_read_marker::v3::Response::new().into())
}
