//! Pure Matrix protocol logic: identifiers, signing keys, PDUs, auth rules, state resolution and
//! room versions.
//!
//! Nothing here does IO, awaits, or reads a clock — callers pass `now` in — so every rule can be
//! unit-tested and fuzzed on its own. Higher layers depend on this module, never the reverse.

pub mod auth;
pub mod client_event;
pub mod e2e;
pub mod identifiers;
pub mod keys;
pub mod pdu;
pub mod room_version;
pub mod state_res;
