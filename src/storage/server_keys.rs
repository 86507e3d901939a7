//! Other servers' signing keys and their latest key documents (migration 0006).

use ruma::ServerName;

use super::{Db, StorageResult, on_reader, on_writer};

/// One stored public key of another server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerKeyRow {
    pub key_id: String,
    /// Unpadded standard base64.
    pub public_key: String,
    /// Until when the key may be used (for an old key: when it expired).
    pub valid_until_ts: i64,
    /// Set when the server lists the key in `old_verify_keys`.
    pub expired_ts: Option<i64>,
}

/// A key document to store with the keys it lists.
pub struct NewKeyDocument<'a> {
    pub server_name: &'a ServerName,
    /// Canonical JSON, signatures included.
    pub json: &'a str,
    pub valid_until_ts: i64,
    pub keys: &'a [ServerKeyRow],
}

impl Db {
    /// Stores a verified key document and its keys in one transaction. A key's validity only ever
    /// grows (a stale document fetched late cannot shorten it), and a key once listed as old stays
    /// old; the document is replaced only by one valid for at least as long.
    pub async fn store_server_keys(&self, document: &NewKeyDocument<'_>, now: i64) -> StorageResult<()> {
        on_writer!(self, pool => {
            let mut tx = pool.begin().await?;
            for key in document.keys {
                sqlx::query(
                    "INSERT INTO server_signing_keys \
                     (server_name, key_id, public_key, valid_until_ts, expired_ts, fetched_ts) \
                     VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (server_name, key_id) DO UPDATE SET \
                       valid_until_ts = CASE WHEN excluded.valid_until_ts > server_signing_keys.valid_until_ts \
                         AND server_signing_keys.expired_ts IS NULL \
                         THEN excluded.valid_until_ts ELSE server_signing_keys.valid_until_ts END, \
                       expired_ts = COALESCE(server_signing_keys.expired_ts, excluded.expired_ts), \
                       fetched_ts = excluded.fetched_ts",
                )
                .bind(document.server_name.as_str())
                .bind(&key.key_id)
                .bind(&key.public_key)
                .bind(key.valid_until_ts)
                .bind(key.expired_ts)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query(
                "INSERT INTO server_key_documents (server_name, json, valid_until_ts, fetched_ts) \
                 VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (server_name) DO UPDATE SET json = excluded.json, \
                   valid_until_ts = excluded.valid_until_ts, fetched_ts = excluded.fetched_ts \
                 WHERE excluded.valid_until_ts >= server_key_documents.valid_until_ts",
            )
            .bind(document.server_name.as_str())
            .bind(document.json)
            .bind(document.valid_until_ts)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Every stored key of `server`, current and old.
    pub async fn server_keys(&self, server: &ServerName) -> StorageResult<Vec<ServerKeyRow>> {
        let rows: Vec<(String, String, i64, Option<i64>)> = on_reader!(self, pool => {
            sqlx::query_as(
                "SELECT key_id, public_key, valid_until_ts, expired_ts FROM server_signing_keys \
                 WHERE server_name = $1 ORDER BY key_id",
            )
            .bind(server.as_str())
            .fetch_all(pool)
            .await?
        });
        Ok(rows
            .into_iter()
            .map(|(key_id, public_key, valid_until_ts, expired_ts)| ServerKeyRow {
                key_id,
                public_key,
                valid_until_ts,
                expired_ts,
            })
            .collect())
    }

    /// The latest stored key document of `server` and until when it is valid.
    pub async fn server_key_document(&self, server: &ServerName) -> StorageResult<Option<(String, i64)>> {
        Ok(on_reader!(self, pool => {
            sqlx::query_as("SELECT json, valid_until_ts FROM server_key_documents WHERE server_name = $1")
                .bind(server.as_str())
                .fetch_optional(pool)
                .await?
        }))
    }
}
