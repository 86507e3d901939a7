//! Server-Server API endpoints, one file per spec section: `discovery` (server version,
//! `/.well-known/matrix/server`), `keys` (publishing keys, notary queries), `query` (profile
//! and directory queries), `membership` (make_join, send_join), `transactions` (`/send`), and
//! the TLS `listener` they are served on.

pub mod discovery;
pub mod keys;
pub mod listener;
pub mod membership;
pub mod query;
pub mod transactions;
