//! Federation: how Hearth reaches other servers and proves who it is, and how it checks who is
//! calling. `discovery` finds a server (DNS, `.well-known`, SRV) and refuses private addresses;
//! `client` sends requests signed with X-Matrix over rustls; `keys` fetches, verifies and caches
//! other servers' signing keys (directly or through notaries) and answers notary queries;
//! `outbox` queues PDUs per destination in the database and delivers them as transactions;
//! `auth` verifies the X-Matrix signature of inbound requests; `tls` builds the rustls
//! configurations.
//!
//! Invariants: nothing here holds a lock across network I/O; every outbound address passes
//! `discovery::is_forbidden` unless `federation.allow_private_destinations`; a peer's key is used
//! only after its document's self-signature checked out. This layer reaches storage for its key
//! cache; of the services it uses only the server's own key (`ServerKeys`) and the clock.

pub mod auth;
pub mod client;
pub mod discovery;
pub mod keys;
pub mod outbox;
pub mod tls;

use crate::{error::Error, storage::StorageError};

/// What can go wrong talking to another server.
#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    /// Discovery failed, the address is forbidden, or the connection or TLS failed.
    #[error("{0}")]
    Unreachable(String),
    /// The server answered with an error.
    #[error("{server} answered {status} {errcode}: {message}")]
    Remote { server: String, status: u16, errcode: String, message: String },
    /// The server answered something that is not what the endpoint returns.
    #[error("{0}")]
    BadResponse(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl FederationError {
    /// The HTTP status the remote server answered, if it answered.
    pub fn remote_status(&self) -> Option<u16> {
        match self {
            FederationError::Remote { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// For our own clients, a failure of another server is a gateway error: its errcode is never
/// passed on as if it were ours.
impl From<FederationError> for Error {
    fn from(err: FederationError) -> Self {
        match err {
            FederationError::Storage(err) => Error::from(err),
            other => Error::BadGateway(other.to_string()),
        }
    }
}
