//! The server lock: one running server per database.
//!
//! Stream positions and state-group IDs are handed out from memory (after a `MAX(…)` at start),
//! so two servers on one database would hand out the same ones and corrupt each other. The server
//! holds a lock for its whole life and a second one refuses to start, naming the holder:
//! - SQLite: an OS file lock on `hearth.lock` in the data directory, which also records who holds
//!   it (the OS releases it when the process ends, however it ends);
//! - PostgreSQL: a session advisory lock on a connection of its own, kept open for the process's
//!   life, whose `application_name` names the holder (released when that session ends).
//!
//! Operator commands (`hearth user …`) act on the database through ordinary transactions and
//! never take this lock, so they work while the server runs.

use std::{
    fs::File,
    io::{Read, Seek, Write},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use sqlx::{ConnectOptions, Connection, PgConnection, postgres::PgConnectOptions};
use tokio::sync::watch;

/// The advisory lock key ("hearth" in ASCII): one per database, which is the scope of advisory
/// locks in PostgreSQL.
const ADVISORY_KEY: i64 = 0x6865_6172_7468;
/// A just-ended holder (a restart right after `kill -9`) may take a moment to leave PostgreSQL;
/// wait this long before deciding the lock is really held.
const TAKEN_GRACE: Duration = Duration::from_secs(3);
/// How often the PostgreSQL lock session is checked.
const CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Why the lock was not taken.
#[derive(Debug)]
pub enum LockError {
    /// The database could not be reached (the caller names it, without its password).
    Unreachable(String),
    /// Held by another server, or the lock file cannot be used: phrased for the operator.
    Refused(String),
}

/// Held while the server runs; dropping it releases the lock.
pub struct ServerLock {
    _held: Held,
    lost: watch::Receiver<Option<String>>,
}

enum Held {
    File(#[allow(dead_code)] File), // Kept open: closing the file would release the OS lock.
    Postgres(tokio::task::JoinHandle<()>),
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Held::Postgres(task) = self {
            task.abort();
        }
    }
}

/// Who this process is, as the lock records it.
fn holder_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown host".to_owned());
    format!("hearth pid {} on {host}", std::process::id())
}

impl ServerLock {
    /// Takes the lock for the database at `url` (`data_dir` holds SQLite's lock file), or says
    /// who holds it.
    pub async fn acquire(url: &str, data_dir: &Path, connect_timeout: Duration) -> Result<ServerLock, LockError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Self::acquire_postgres(url, connect_timeout).await
        } else {
            Self::acquire_file(&data_dir.join("hearth.lock")).map_err(LockError::Refused)
        }
    }

    /// Resolves when the lock is lost for good (PostgreSQL only), with the reason.
    pub async fn lost(&mut self) -> String {
        if matches!(self._held, Held::File(_)) {
            // The OS holds a file lock until the process ends: it cannot be lost.
            return std::future::pending().await;
        }
        match self.lost.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            // The watcher never gives up without saying why; if it is gone, so is the lock.
            Err(_) => "the database lock watcher stopped".to_owned(),
        }
    }

    fn acquire_file(path: &PathBuf) -> Result<ServerLock, String> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|err| format!("cannot open the lock file {}: {err}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let holder = if holder.is_empty() { "another process" } else { holder };
                return Err(format!(
                    "another Hearth server is running on this data directory ({holder} holds {}); \
                     stop it first — two servers on one database corrupt it",
                    path.display()
                ));
            }
            Err(std::fs::TryLockError::Error(err)) => {
                return Err(format!("cannot lock {}: {err}", path.display()));
            }
        }
        let record = (|| {
            file.set_len(0)?;
            file.rewind()?;
            writeln!(file, "{}", holder_name())?;
            file.sync_all()
        })();
        record.map_err(|err| format!("cannot write the lock file {}: {err}", path.display()))?;
        let (_, lost) = watch::channel(None);
        Ok(ServerLock { _held: Held::File(file), lost })
    }

    async fn acquire_postgres(url: &str, connect_timeout: Duration) -> Result<ServerLock, LockError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|err| LockError::Unreachable(err.to_string()))?
            .application_name(&holder_name());
        let deadline = tokio::time::Instant::now() + TAKEN_GRACE;
        let conn = loop {
            let mut conn = match tokio::time::timeout(connect_timeout, options.connect()).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(err)) => return Err(LockError::Unreachable(err.to_string())),
                Err(_) => return Err(LockError::Unreachable(format!("no connection within {connect_timeout:?}"))),
            };
            let taken = try_advisory_lock(&mut conn).await.map_err(|err| LockError::Unreachable(err.to_string()))?;
            if taken {
                break conn;
            }
            let holder = advisory_holder(&mut conn).await.unwrap_or_else(|err| format!("unknown ({err})"));
            if tokio::time::Instant::now() >= deadline {
                return Err(LockError::Refused(format!(
                    "another Hearth server is running on this database (held by {holder}); \
                     stop it first — two servers on one database corrupt it"
                )));
            }
            let _ = conn.close().await;
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let (report, lost) = watch::channel(None);
        let task = tokio::spawn(watch_postgres(options, conn, report));
        Ok(ServerLock { _held: Held::Postgres(task), lost })
    }
}

async fn try_advisory_lock(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(ADVISORY_KEY).fetch_one(conn).await
}

/// Who holds the advisory lock: the holder's `application_name`, address and backend pid.
async fn advisory_holder(conn: &mut PgConnection) -> Result<String, sqlx::Error> {
    let row: Option<(Option<String>, Option<String>, i32)> = sqlx::query_as(
        "SELECT a.application_name, host(a.client_addr), a.pid FROM pg_locks l
         JOIN pg_stat_activity a ON a.pid = l.pid
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND l.classid = $1 AND l.objid = $2",
    )
    .bind(ADVISORY_KEY >> 32)
    .bind(ADVISORY_KEY & 0xffff_ffff)
    .fetch_optional(conn)
    .await?;
    Ok(match row {
        Some((name, addr, pid)) => {
            let name = name.filter(|n| !n.is_empty()).unwrap_or_else(|| "an unnamed session".to_owned());
            let addr = addr.map(|a| format!(" from {a}")).unwrap_or_default();
            format!("{name}, connected{addr} as backend pid {pid}")
        }
        None => "a session that just ended".to_owned(),
    })
}

/// Keeps the lock session alive; if it dies (a PostgreSQL restart, a terminated backend),
/// reconnects and takes the lock again. If someone else took it meanwhile, or the database stays
/// unreachable, reports the loss so the server stops rather than run unprotected.
async fn watch_postgres(options: PgConnectOptions, mut conn: PgConnection, report: watch::Sender<Option<String>>) {
    loop {
        tokio::time::sleep(CHECK_INTERVAL).await;
        if conn.ping().await.is_ok() {
            continue;
        }
        tracing::warn!("the database lock session ended; taking the lock again");
        let mut attempts = 0;
        conn = loop {
            attempts += 1;
            match options.connect().await {
                Ok(mut fresh) => match try_advisory_lock(&mut fresh).await {
                    Ok(true) => break fresh,
                    Ok(false) => {
                        let holder = advisory_holder(&mut fresh).await.unwrap_or_default();
                        let _ = report.send(Some(format!(
                            "lost the database lock to another server ({holder}); stopping so the two do not corrupt the database"
                        )));
                        return;
                    }
                    Err(err) => tracing::warn!(%err, "cannot take the database lock again"),
                },
                Err(err) => tracing::warn!(%err, "cannot reconnect for the database lock"),
            }
            if attempts >= 30 {
                let _ = report.send(Some(
                    "lost the database lock and could not take it again within a minute; stopping".to_owned(),
                ));
                return;
            }
            tokio::time::sleep(CHECK_INTERVAL).await;
        };
        tracing::info!("database lock taken again");
    }
}
