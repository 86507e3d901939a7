//! Services: what Hearth does, independent of how it is asked (HTTP today, WebSocket and the CLI
//! too). Each service owns one area and reaches storage only through `storage::Db`'s typed methods.
//! Services never see HTTP types; they return `crate::error::Error`.

pub mod account_data;
pub mod aliases;
pub mod backfill;
pub mod e2ee;
pub mod edus;
pub mod ephemeral;
pub mod filter;
pub mod gap_fill;
pub mod joins;
pub mod media;
pub mod notifications;
pub mod profiles;
pub mod push;
pub mod rate_limit;
pub mod receipts;
pub mod remote_membership;
pub mod rooms;
pub mod search;
pub mod server_keys;
pub mod stream;
pub mod sync;
pub mod transactions;
pub mod uia;
pub mod users;

/// Milliseconds since the Unix epoch, the unit of every Matrix timestamp.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or(0)
}
