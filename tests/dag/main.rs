//! The room graph as a DAG, driven in-process: a local user's room that a user of a second
//! server ("remote.test", with an ed25519 key of its own) joins, and PDUs from that server fed to
//! `Rooms::receive_pdu` as the federation layer would, on a real SQLite or PostgreSQL database.
//! Every PDU is built and signed with ruma through `matrix::pdu`, as a remote server would.
//!
//! Each test runs on both backends (`<name>::sqlite`, `<name>::postgres`); PostgreSQL comes from
//! `HEARTH_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/postgres`), a fresh
//! database per test; without it the PostgreSQL variants are skipped unless
//! `HEARTH_TEST_REQUIRE_POSTGRES=1`.

// The API tests' harness, for its backends and per-test PostgreSQL databases (this binary does
// not start servers).
#[allow(dead_code, unused_macros, unused_imports)]
#[path = "../api/harness.rs"]
mod api_harness;
mod harness;
mod idle;
mod join;
mod receipt;
mod transactions;

/// Runs each test body once per storage backend, as `<name>::sqlite` and `<name>::postgres`.
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name(crate::harness::Backend::Sqlite).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    if crate::harness::postgres_available().await {
                        super::$name(crate::harness::Backend::Postgres).await;
                    }
                }
            }
        )*
    };
}
pub(crate) use backend_tests;
