//! Storage: the only layer that speaks SQL.
//!
//! [`Db`] holds either an embedded SQLite database (one writer connection plus a reader pool, WAL
//! journal) or a PostgreSQL pool. Every query is written once, in SQL both engines accept (`$1`
//! placeholders, `ON CONFLICT`, `RETURNING`), and compiled against both native drivers by the
//! [`on_writer!`]/[`on_reader!`] macros, so the two backends cannot drift apart. Schema differences
//! (types, auto-increment) live only in `migrations/sqlite` and `migrations/postgres`, which keep the
//! same numbering.
//!
//! Methods are grouped per aggregate in the submodules and match transactions ("create this account
//! with its first device and tokens"), not single statements. Storage never calls services or the
//! network, and takes the current time as a parameter instead of reading a clock.

pub mod accounts;
pub mod e2e;
pub mod federation;
pub mod federation_edus;
pub mod lock;
pub mod media;
pub mod out_of_band;
pub mod push;
pub mod rooms;
pub mod search;
pub mod server_keys;
pub mod stream;

use std::{borrow::Cow, path::Path, str::FromStr, time::Duration};

use sqlx::{
    PgPool, SqlitePool,
    migrate::{MigrateError, Migration, MigrationType, Migrator},
    postgres::{PgConnectOptions, PgPoolOptions},
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};

/// Runs `$body` with `$pool` bound to the pool that takes writes. The body is expanded once per
/// backend, so it is type-checked against both drivers.
macro_rules! on_writer {
    ($db:expr, $pool:ident => $body:expr) => {
        match &*$db.backend {
            $crate::storage::Backend::Sqlite { writer: $pool, .. } => $body,
            $crate::storage::Backend::Postgres { pool: $pool } => $body,
        }
    };
}

/// Like [`on_writer!`] for read-only work: SQLite reads go to the reader pool and never queue
/// behind the single writer connection.
macro_rules! on_reader {
    ($db:expr, $pool:ident => $body:expr) => {
        match &*$db.backend {
            $crate::storage::Backend::Sqlite { reader: $pool, .. } => $body,
            $crate::storage::Backend::Postgres { pool: $pool } => $body,
        }
    };
}

pub(crate) use {on_reader, on_writer};

/// Embedded migrations, in order. `storage::tests::every_migration_file_is_embedded` keeps this list
/// in step with the folders.
const SQLITE_MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "accounts", include_str!("../../migrations/sqlite/0001_accounts.sql")),
    (2, "rooms", include_str!("../../migrations/sqlite/0002_rooms.sql")),
    (5, "upgrades_and_stream_position", include_str!("../../migrations/sqlite/0005_upgrades_and_stream_position.sql")),
    (6, "federation_transport", include_str!("../../migrations/sqlite/0006_federation_transport.sql")),
    (7, "event_graph", include_str!("../../migrations/sqlite/0007_event_graph.sql")),
    (8, "federation_outbox", include_str!("../../migrations/sqlite/0008_federation_outbox.sql")),
    (9, "out_of_band_memberships", include_str!("../../migrations/sqlite/0009_out_of_band_memberships.sql")),
    (10, "backward_extremities", include_str!("../../migrations/sqlite/0010_backward_extremities.sql")),
    (11, "federation_edus", include_str!("../../migrations/sqlite/0011_federation_edus.sql")),
    (12, "federation_catch_up", include_str!("../../migrations/sqlite/0012_federation_catch_up.sql")),
    (13, "media", include_str!("../../migrations/sqlite/0013_media.sql")),
    (14, "e2ee", include_str!("../../migrations/sqlite/0014_e2ee.sql")),
    (15, "push", include_str!("../../migrations/sqlite/0015_push.sql")),
    (16, "search", include_str!("../../migrations/sqlite/0016_search.sql")),
    (17, "search_filters", include_str!("../../migrations/sqlite/0017_search_filters.sql")),
];
const POSTGRES_MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "accounts", include_str!("../../migrations/postgres/0001_accounts.sql")),
    (2, "rooms", include_str!("../../migrations/postgres/0002_rooms.sql")),
    (
        5,
        "upgrades_and_stream_position",
        include_str!("../../migrations/postgres/0005_upgrades_and_stream_position.sql"),
    ),
    (6, "federation_transport", include_str!("../../migrations/postgres/0006_federation_transport.sql")),
    (7, "event_graph", include_str!("../../migrations/postgres/0007_event_graph.sql")),
    (8, "federation_outbox", include_str!("../../migrations/postgres/0008_federation_outbox.sql")),
    (9, "out_of_band_memberships", include_str!("../../migrations/postgres/0009_out_of_band_memberships.sql")),
    (10, "backward_extremities", include_str!("../../migrations/postgres/0010_backward_extremities.sql")),
    (11, "federation_edus", include_str!("../../migrations/postgres/0011_federation_edus.sql")),
    (12, "federation_catch_up", include_str!("../../migrations/postgres/0012_federation_catch_up.sql")),
    (13, "media", include_str!("../../migrations/postgres/0013_media.sql")),
    (14, "e2ee", include_str!("../../migrations/postgres/0014_e2ee.sql")),
    (15, "push", include_str!("../../migrations/postgres/0015_push.sql")),
    (16, "search", include_str!("../../migrations/postgres/0016_search.sql")),
    (17, "search_filters", include_str!("../../migrations/postgres/0017_search_filters.sql")),
];

/// A storage failure, in terms the service layer can act on.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A unique key already exists (e.g. a user ID that is taken).
    #[error("already exists: {0}")]
    Conflict(String),
    /// A stored value failed to parse back (a bug or a hand-edited database).
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
    #[error("database: {0}")]
    Database(sqlx::Error),
    #[error("migration: {0}")]
    Migrate(#[from] MigrateError),
}

impl From<sqlx::Error> for StorageError {
    fn from(err: sqlx::Error) -> Self {
        match err.as_database_error() {
            Some(db) if db.is_unique_violation() => Self::Conflict(db.message().to_owned()),
            _ => Self::Database(err),
        }
    }
}

pub type StorageResult<T> = Result<T, StorageError>;

pub(crate) enum Backend {
    Sqlite { writer: SqlitePool, reader: SqlitePool },
    Postgres { pool: PgPool },
}

/// Handle to the database; cheap to clone.
#[derive(Clone)]
pub struct Db {
    backend: std::sync::Arc<Backend>,
}

/// How to reach the database.
#[derive(Debug, Clone)]
pub struct DbOptions {
    /// `sqlite://PATH` or `postgres://…`.
    pub url: String,
    /// Upper bound on pooled connections (PostgreSQL pool, SQLite reader pool).
    pub max_connections: u32,
    pub connect_timeout: Duration,
}

impl Db {
    /// Connects (creating a SQLite file if needed) and applies pending migrations.
    pub async fn open(options: &DbOptions) -> StorageResult<Db> {
        let db = if options.url.starts_with("postgres://") || options.url.starts_with("postgresql://") {
            let connect = PgConnectOptions::from_str(&options.url)?;
            let pool = PgPoolOptions::new()
                .max_connections(options.max_connections)
                .acquire_timeout(options.connect_timeout)
                .connect_with(connect)
                .await?;
            Db { backend: std::sync::Arc::new(Backend::Postgres { pool }) }
        } else {
            let connect = SqliteConnectOptions::from_str(&options.url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                // NORMAL in WAL mode loses nothing when the process is killed: a committed
                // transaction is in the WAL file; only an OS crash or power loss can drop the last
                // few commits (SQLite's own recommendation for WAL). Deployments that must survive
                // power loss use PostgreSQL.
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(30))
                .foreign_keys(false)
                .pragma("cache_size", "-16000");
            // One writer: SQLite serialises writers anyway, and a single connection turns lock
            // contention into an orderly queue in the pool.
            let writer = SqlitePoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(60))
                .connect_with(connect.clone())
                .await?;
            let reader = SqlitePoolOptions::new()
                .max_connections(options.max_connections.max(2))
                .acquire_timeout(Duration::from_secs(60))
                .connect_with(connect.read_only(false))
                .await?;
            Db { backend: std::sync::Arc::new(Backend::Sqlite { writer, reader }) }
        };
        db.migrate().await?;
        Ok(db)
    }

    /// The default embedded database inside the data directory.
    pub fn sqlite_url(data_dir: &Path) -> String {
        format!("sqlite://{}", data_dir.join("hearth.db").display())
    }

    pub fn backend_name(&self) -> &'static str {
        match *self.backend {
            Backend::Sqlite { .. } => "sqlite",
            Backend::Postgres { .. } => "postgres",
        }
    }

    async fn migrate(&self) -> StorageResult<()> {
        let list = match *self.backend {
            Backend::Sqlite { .. } => SQLITE_MIGRATIONS,
            Backend::Postgres { .. } => POSTGRES_MIGRATIONS,
        };
        let migrations = list
            .iter()
            .map(|&(version, description, sql)| {
                Migration::new(
                    version,
                    Cow::Borrowed(description),
                    MigrationType::Simple,
                    sqlx::SqlSafeStr::into_sql_str(sql),
                    false,
                )
            })
            .collect();
        let migrator = Migrator::with_migrations(migrations);
        on_writer!(self, pool => migrator.run(pool).await)?;
        Ok(())
    }

    /// Waits for in-flight queries and closes every connection (SQLite checkpoints its WAL).
    pub async fn close(&self) {
        match &*self.backend {
            Backend::Sqlite { writer, reader } => {
                reader.close().await;
                writer.close().await;
            }
            Backend::Postgres { pool } => pool.close().await,
        }
    }
}

/// Parses a stored identifier back into its ruma type.
pub(crate) fn parse_id<T>(value: String) -> StorageResult<T>
where
    T: TryFrom<String>,
    T::Error: std::fmt::Display,
{
    T::try_from(value).map_err(|err| StorageError::Corrupt(err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &str) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn every_migration_file_is_embedded() {
        for (dir, list) in [("migrations/sqlite", SQLITE_MIGRATIONS), ("migrations/postgres", POSTGRES_MIGRATIONS)] {
            let on_disk = files(dir);
            assert_eq!(on_disk.len(), list.len(), "{dir} has files that are not embedded");
            for (name, &(version, description, sql)) in on_disk.iter().zip(list) {
                assert_eq!(name, &format!("{version:04}_{description}.sql"));
                assert_eq!(std::fs::read_to_string(format!("{dir}/{name}")).unwrap(), sql);
            }
        }
    }

    #[test]
    fn both_backends_have_the_same_migrations() {
        let versions = |list: &[(i64, &str, &str)]| list.iter().map(|m| (m.0, m.1.to_owned())).collect::<Vec<_>>();
        assert_eq!(versions(SQLITE_MIGRATIONS), versions(POSTGRES_MIGRATIONS));
    }
}
