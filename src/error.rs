//! The service-level error type and its one mapping to Matrix error responses.
//!
//! Variants say what went wrong; [`Error::status_and_errcode`] is the only place that decides the
//! HTTP status and `errcode`. Internal causes are logged, never shown to clients.

use std::borrow::Cow;

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Map, Value, json};

use crate::storage::StorageError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A user-interactive-auth challenge: the 401 body telling the client which stages remain.
#[derive(Debug, Clone)]
pub struct UiaChallenge {
    pub flows: Vec<Vec<String>>,
    pub completed: Vec<String>,
    pub session: String,
    pub params: Value,
    /// Set when the client's last attempt at a stage failed.
    pub failure: Option<(&'static str, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("request body is not valid JSON: {0}")]
    NotJson(String),
    #[error("{0}")]
    BadJson(String),
    #[error("{0}")]
    MissingParam(String),
    #[error("{0}")]
    InvalidParam(String),
    #[error("{0}")]
    Forbidden(Cow<'static, str>),
    #[error("missing access token")]
    MissingToken,
    #[error("unknown access token")]
    UnknownToken { soft_logout: bool },
    #[error("{0}")]
    NotFound(Cow<'static, str>),
    #[error("unrecognized request")]
    Unrecognized,
    #[error("method not allowed")]
    MethodNotAllowed,
    /// A request the server understood but cannot act on (400 `M_UNKNOWN`).
    #[error("{0}")]
    Unknown(String),
    #[error("{0}")]
    WeakPassword(Cow<'static, str>),
    #[error("user ID already taken")]
    UserInUse,
    #[error("{0}")]
    InvalidUsername(Cow<'static, str>),
    #[error("this account has been deactivated")]
    UserDeactivated,
    #[error("guest access is not allowed")]
    GuestAccessForbidden,
    #[error("too many requests")]
    LimitExceeded { retry_after_ms: u64 },
    /// The server has as many requests in flight as `limits.max_concurrent_requests` allows.
    #[error("the server is busy, try again shortly")]
    Overloaded,
    /// The request ran past `limits.request_timeout_secs`.
    #[error("the request took too long")]
    TimedOut,
    #[error("{0}")]
    TooLarge(Cow<'static, str>),
    #[error("additional authentication required")]
    Uia(Box<UiaChallenge>),
    #[error("this room version is not supported by this server")]
    UnsupportedRoomVersion,
    /// A server asked to join a room whose version it does not support (`make_join`).
    #[error("the room's version {0} is not among the versions your server supports")]
    IncompatibleRoomVersion(ruma::RoomVersionId),
    /// A restricted join this server cannot vouch for: it cannot tell whether the user is in
    /// one of the rooms the join rule allows (`make_join`, 400 `M_UNABLE_TO_AUTHORISE_JOIN`).
    #[error("{0}")]
    UnableToAuthoriseJoin(Cow<'static, str>),
    /// A restricted join no user of this server may authorise (400 `M_UNABLE_TO_GRANT_JOIN`).
    #[error("{0}")]
    UnableToGrantJoin(Cow<'static, str>),
    #[error("{0}")]
    RoomInUse(Cow<'static, str>),
    /// The thing to create already exists (409 `M_UNKNOWN`, as the spec says for
    /// `PUT /directory/room/{roomAlias}`; `createRoom` uses `RoomInUse` instead).
    #[error("{0}")]
    Conflict(Cow<'static, str>),
    #[error("{0}")]
    InvalidRoomState(String),
    #[error("{0}")]
    BadAlias(String),
    #[error("you have already sent this reaction")]
    DuplicateAnnotation,
    /// A federation request without a valid X-Matrix signature (401 `M_UNAUTHORIZED`).
    #[error("{0}")]
    Unauthorized(String),
    /// Another server could not be reached or did not answer properly (502 `M_UNKNOWN`); the
    /// cause is logged, the client gets a short message.
    #[error("{0}")]
    BadGateway(String),
    /// `PUT /media/v3/upload/…` for a URI that has its content already.
    #[error("this media has been uploaded already")]
    CannotOverwriteMedia,
    /// A created URI whose upload has not arrived within the download's `timeout_ms`.
    #[error("this media has not been uploaded yet")]
    NotYetUploaded,
    /// The upload would take the user past `media.user_quota_bytes`.
    #[error("{0}")]
    QuotaExceeded(String),
    /// A room key backup request for a version that is not the current one (403
    /// `M_WRONG_ROOM_KEYS_VERSION`, with the current version).
    #[error("this is not the current backup version")]
    WrongRoomKeysVersion { current_version: Option<String> },
    /// An upload would leave a device with more one-time keys than it may hold (400
    /// `M_TOO_LARGE`, as Synapse answers).
    #[error("{0}")]
    TooManyKeys(String),
    /// An uploaded key's signature does not verify (400 `M_INVALID_SIGNATURE`).
    #[error("{0}")]
    InvalidSignature(String),
    #[error("{0}")]
    Internal(String),
}

impl Error {
    pub fn forbidden(message: impl Into<Cow<'static, str>>) -> Self {
        Error::Forbidden(message.into())
    }

    pub fn not_found(message: impl Into<Cow<'static, str>>) -> Self {
        Error::NotFound(message.into())
    }

    /// The HTTP status and Matrix `errcode` for this error, per the Client-Server spec.
    pub fn status_and_errcode(&self) -> (StatusCode, &'static str) {
        match self {
            Error::NotJson(_) => (StatusCode::BAD_REQUEST, "M_NOT_JSON"),
            Error::BadJson(_) => (StatusCode::BAD_REQUEST, "M_BAD_JSON"),
            Error::MissingParam(_) => (StatusCode::BAD_REQUEST, "M_MISSING_PARAM"),
            Error::InvalidParam(_) => (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"),
            Error::Forbidden(_) => (StatusCode::FORBIDDEN, "M_FORBIDDEN"),
            Error::MissingToken => (StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN"),
            Error::UnknownToken { .. } => (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN"),
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "M_NOT_FOUND"),
            Error::Unrecognized => (StatusCode::NOT_FOUND, "M_UNRECOGNIZED"),
            Error::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "M_UNRECOGNIZED"),
            Error::Unknown(_) => (StatusCode::BAD_REQUEST, "M_UNKNOWN"),
            Error::WeakPassword(_) => (StatusCode::BAD_REQUEST, "M_WEAK_PASSWORD"),
            Error::UserInUse => (StatusCode::BAD_REQUEST, "M_USER_IN_USE"),
            Error::InvalidUsername(_) => (StatusCode::BAD_REQUEST, "M_INVALID_USERNAME"),
            Error::UserDeactivated => (StatusCode::FORBIDDEN, "M_USER_DEACTIVATED"),
            Error::GuestAccessForbidden => (StatusCode::FORBIDDEN, "M_GUEST_ACCESS_FORBIDDEN"),
            Error::LimitExceeded { .. } => (StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED"),
            // 503 says the server, not this client, is over its limit; the errcode and
            // `retry_after_ms` tell Matrix clients to back off and retry, as they do for 429.
            Error::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "M_LIMIT_EXCEEDED"),
            Error::TimedOut => (StatusCode::GATEWAY_TIMEOUT, "M_UNKNOWN"),
            Error::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE"),
            Error::Uia(challenge) => {
                (StatusCode::UNAUTHORIZED, challenge.failure.as_ref().map_or("", |(code, _)| code))
            }
            Error::UnsupportedRoomVersion => (StatusCode::BAD_REQUEST, "M_UNSUPPORTED_ROOM_VERSION"),
            Error::IncompatibleRoomVersion(_) => (StatusCode::BAD_REQUEST, "M_INCOMPATIBLE_ROOM_VERSION"),
            Error::UnableToAuthoriseJoin(_) => (StatusCode::BAD_REQUEST, "M_UNABLE_TO_AUTHORISE_JOIN"),
            Error::UnableToGrantJoin(_) => (StatusCode::BAD_REQUEST, "M_UNABLE_TO_GRANT_JOIN"),
            Error::RoomInUse(_) => (StatusCode::BAD_REQUEST, "M_ROOM_IN_USE"),
            Error::Conflict(_) => (StatusCode::CONFLICT, "M_UNKNOWN"),
            Error::InvalidRoomState(_) => (StatusCode::BAD_REQUEST, "M_INVALID_ROOM_STATE"),
            Error::BadAlias(_) => (StatusCode::BAD_REQUEST, "M_BAD_ALIAS"),
            Error::DuplicateAnnotation => (StatusCode::BAD_REQUEST, "M_DUPLICATE_ANNOTATION"),
            Error::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED"),
            Error::BadGateway(_) => (StatusCode::BAD_GATEWAY, "M_UNKNOWN"),
            Error::CannotOverwriteMedia => (StatusCode::CONFLICT, "M_CANNOT_OVERWRITE_MEDIA"),
            Error::NotYetUploaded => (StatusCode::GATEWAY_TIMEOUT, "M_NOT_YET_UPLOADED"),
            Error::QuotaExceeded(_) => (StatusCode::FORBIDDEN, "M_RESOURCE_LIMIT_EXCEEDED"),
            Error::WrongRoomKeysVersion { .. } => (StatusCode::FORBIDDEN, "M_WRONG_ROOM_KEYS_VERSION"),
            Error::InvalidSignature(_) => (StatusCode::BAD_REQUEST, "M_INVALID_SIGNATURE"),
            Error::TooManyKeys(_) => (StatusCode::BAD_REQUEST, "M_TOO_LARGE"),
            Error::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN"),
        }
    }

    fn body(&self) -> Value {
        let (_, errcode) = self.status_and_errcode();
        match self {
            Error::Uia(challenge) => {
                let mut body = Map::new();
                let flows: Vec<Value> = challenge.flows.iter().map(|stages| json!({ "stages": stages })).collect();
                body.insert("flows".into(), flows.into());
                body.insert("params".into(), challenge.params.clone());
                body.insert("session".into(), challenge.session.clone().into());
                if !challenge.completed.is_empty() {
                    body.insert("completed".into(), challenge.completed.clone().into());
                }
                if let Some((code, message)) = &challenge.failure {
                    body.insert("errcode".into(), (*code).into());
                    body.insert("error".into(), message.clone().into());
                }
                Value::Object(body)
            }
            Error::Internal(_) => json!({ "errcode": errcode, "error": "Internal server error" }),
            Error::BadGateway(_) => json!({ "errcode": errcode, "error": "The other server could not be reached" }),
            Error::UnknownToken { soft_logout } => {
                json!({ "errcode": errcode, "error": self.to_string(), "soft_logout": soft_logout })
            }
            Error::LimitExceeded { retry_after_ms } => {
                json!({ "errcode": errcode, "error": self.to_string(), "retry_after_ms": retry_after_ms })
            }
            Error::Overloaded => {
                json!({ "errcode": errcode, "error": self.to_string(), "retry_after_ms": OVERLOADED_RETRY_MS })
            }
            Error::WrongRoomKeysVersion { current_version } => {
                json!({ "errcode": errcode, "error": self.to_string(), "current_version": current_version })
            }
            Error::IncompatibleRoomVersion(version) => {
                json!({ "errcode": errcode, "error": self.to_string(), "room_version": version })
            }
            _ => json!({ "errcode": errcode, "error": self.to_string() }),
        }
    }
}

impl From<StorageError> for Error {
    fn from(err: StorageError) -> Self {
        Error::Internal(err.to_string())
    }
}

/// How long a client refused for overload is asked to wait.
const OVERLOADED_RETRY_MS: u64 = 1000;

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, _) = self.status_and_errcode();
        if let Error::Internal(cause) = &self {
            tracing::error!(%cause, "request failed");
        }
        if let Error::BadGateway(cause) = &self {
            tracing::warn!(%cause, "another server did not answer");
        }
        let mut response = (status, axum::Json(self.body())).into_response();
        if let Error::TooLarge(_) = self {
            // The unread body is still on the wire; closing tells the client not to reuse the
            // connection (hyper closes it after this response either way).
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        let retry_after_ms = match self {
            Error::LimitExceeded { retry_after_ms } => Some(retry_after_ms),
            Error::Overloaded => Some(OVERLOADED_RETRY_MS),
            _ => None,
        };
        if let Some(retry_after_ms) = retry_after_ms {
            let seconds = retry_after_ms.div_ceil(1000).max(1);
            if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        response
    }
}
