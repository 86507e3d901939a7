//! Federation tests: several real `hearth` processes on loopback addresses of their own, with TLS
//! certificates from a test CA and discovery through a DNS server the tests run (`testnet.rs`,
//! `dns.rs`), once on SQLite and once on PostgreSQL. No test asks the machine's resolver or
//! reaches a non-loopback address.

// The API tests' harness (start a server per test, its own data directory and database); this
// binary uses only part of it (not its macro, whose bodies-in-macro form we avoid here).
#[allow(dead_code, unused_macros, unused_imports)]
#[path = "../tests/api/harness.rs"]
mod harness;

// The client SDKs' virtualenv, shared with the API tests.
#[path = "../tests/api/sdk_venv.rs"]
mod sdk_venv;

mod dns;
mod testnet;

mod abuse;
mod auth;
mod bench;
mod config;
mod devices;
mod discovery;
mod e2ee;
mod edus;
mod forks;
mod gaps;
mod graph;
mod history;
mod hostile;
mod interop;
mod invites;
mod joins;
mod keys;
mod media;
mod membership;
mod partition;
mod public_rooms;
mod synapse_peer;

/// Runs each named test body (an `async fn(Backend)` of the enclosing module) once per storage
/// backend, as `<name>::sqlite` and `<name>::postgres`. Only names go in here, so rustfmt and
/// clippy see the bodies as ordinary code.
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name(crate::harness::Backend::Sqlite).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    if crate::harness::postgres_available().await {
                        super::$name(crate::harness::Backend::Postgres).await
                    }
                }
            }
        )*
    };
}
pub(crate) use backend_tests;
