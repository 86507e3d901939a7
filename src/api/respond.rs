//! Turning ruma response types into HTTP responses.

use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use ruma::api::{OutgoingResponse, OutgoingResponseExt};

use crate::error::Error;

/// A ruma response, serialised by ruma (so field names and omissions follow the spec types).
pub struct RumaResponse<T>(pub T);

impl<T> From<T> for RumaResponse<T> {
    fn from(response: T) -> Self {
        RumaResponse(response)
    }
}

impl<T: OutgoingResponse> IntoResponse for RumaResponse<T> {
    fn into_response(self) -> Response {
        match self.0.try_into_http_response::<BytesMut>() {
            Ok(response) => response.map(|body| axum::body::Body::from(body.freeze())).into_response(),
            Err(err) => Error::Internal(format!("could not serialise a response: {err}")).into_response(),
        }
    }
}

/// What handlers return.
pub type ApiResult<T> = Result<RumaResponse<T>, Error>;
