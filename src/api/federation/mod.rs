//! Server-Server API endpoints, one file per spec section: `discovery` (server version,
//! `/.well-known/matrix/server`), `keys` (publishing keys, notary queries), `query` (profile
//! and directory queries), `device` (a user's device list), `events` (serving the room graph:
//! `/event`, `/state`, `/state_ids`, `/event_auth`, `/backfill`, `/get_missing_events`), `membership` (make_join, send_join),
//! `invites` (invites, make_leave/send_leave, make_knock/send_knock),
//! `transactions` (`/send`), and the TLS `listener` they are served on.

pub mod device;
pub mod discovery;
pub mod events;
pub mod invites;
pub mod keys;
pub mod listener;
pub mod media;
pub mod membership;
pub mod query;
pub mod transactions;
pub mod user_keys;
