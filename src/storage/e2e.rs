//! End-to-end encryption storage (migration 0014): devices' identity keys, one-time and fallback
//! keys, cross-signing keys and signatures, room key backups, dehydrated devices, and the
//! transaction IDs of `/sendToDevice` requests. Everything here is opaque JSON the clients
//! signed; the rules about it live in `service::e2ee`.

use std::collections::BTreeMap;

use ruma::{OwnedUserId, UserId};

use super::{Db, StorageResult, on_reader, on_writer, parse_id};

/// Users per statement of a batched read (well under both engines' bound-parameter limits).
const USERS_PER_STATEMENT: usize = 500;

/// `$first, $first+1, …` for `count` values.
fn placeholders(first: usize, count: usize) -> String {
    (first..first + count).map(|n| format!("${n}")).collect::<Vec<_>>().join(", ")
}

/// A one-time or fallback key as stored: its ID (`algorithm:key_id`) and the uploaded JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedKey {
    pub key_id: String,
    pub key_json: String,
}

/// A key to store for a device, by algorithm.
#[derive(Debug, Clone)]
pub struct NewKey<'a> {
    pub algorithm: &'a str,
    pub key_id: &'a str,
    pub key_json: &'a str,
}

/// A signature uploaded through `/keys/signatures/upload`.
#[derive(Debug, Clone)]
pub struct SignatureRow {
    pub target_user: OwnedUserId,
    /// A device ID, or a cross-signing key's public part.
    pub target_key: String,
    pub signer: OwnedUserId,
    pub signer_key_id: String,
    pub signature: String,
}

/// A room key backup version.
#[derive(Debug, Clone)]
pub struct BackupVersion {
    pub version: i64,
    pub algorithm: String,
    pub auth_data: String,
    pub etag: i64,
    pub count: i64,
}

/// One session key in a backup.
#[derive(Debug, Clone)]
pub struct BackupKey {
    pub room_id: String,
    pub session_id: String,
    pub first_message_index: i64,
    pub forwarded_count: i64,
    pub is_verified: bool,
    pub session_data: String,
}

/// A user's dehydrated device.
#[derive(Debug, Clone)]
pub struct DehydratedDevice {
    pub device_id: String,
    pub device_data: String,
}

/// Inside a backup transaction: moves the version's etag when `changed`, then reads its
/// (etag, key count), which every key upload and delete answers with.
macro_rules! backup_change_done {
    ($tx:expr, $user:expr, $version:expr, $changed:expr) => {{
        if $changed {
            sqlx::query("UPDATE e2e_backup_versions SET etag = etag + 1 WHERE user_id = $1 AND version = $2")
                .bind($user)
                .bind($version)
                .execute(&mut *$tx)
                .await?;
        }
        let etag: i64 = sqlx::query_scalar("SELECT etag FROM e2e_backup_versions WHERE user_id = $1 AND version = $2")
            .bind($user)
            .bind($version)
            .fetch_one(&mut *$tx)
            .await?;
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM e2e_backup_keys WHERE user_id = $1 AND version = $2")
            .bind($user)
            .bind($version)
            .fetch_one(&mut *$tx)
            .await?;
        (etag, count)
    }};
}

impl Db {
    /// The identity keys a device uploaded, if any.
    pub async fn device_keys(&self, user_id: &UserId, device_id: &str) -> StorageResult<Option<String>> {
        Ok(on_reader!(self, pool => {
            sqlx::query_scalar("SELECT keys_json FROM e2e_device_keys WHERE user_id = $1 AND device_id = $2")
                .bind(user_id.as_str())
                .bind(device_id)
                .fetch_optional(pool)
                .await?
        }))
    }

    /// Every device of the user that uploaded identity keys: (device ID, keys, display name).
    pub async fn user_device_keys(&self, user_id: &UserId) -> StorageResult<Vec<(String, String, Option<String>)>> {
        Ok(on_reader!(self, pool => {
            sqlx::query_as(
                "SELECT k.device_id, k.keys_json, d.display_name FROM e2e_device_keys k \
                 JOIN devices d ON d.user_id = k.user_id AND d.device_id = k.device_id \
                 WHERE k.user_id = $1 ORDER BY k.device_id",
            )
            .bind(user_id.as_str())
            .fetch_all(pool)
            .await?
        }))
    }

    /// Identity keys of every device of these users that uploaded any: (user, device, keys,
    /// display name). Asked in chunks, so a query of thousands of users is a few statements.
    pub async fn device_keys_of_users(
        &self,
        users: &[&str],
    ) -> StorageResult<Vec<(String, String, String, Option<String>)>> {
        let mut out = Vec::new();
        for chunk in users.chunks(USERS_PER_STATEMENT) {
            // Only numbered placeholders are formatted in; the values are bound.
            let sql = format!(
                "SELECT k.user_id, k.device_id, k.keys_json, d.display_name FROM e2e_device_keys k \
                 JOIN devices d ON d.user_id = k.user_id AND d.device_id = k.device_id \
                 WHERE k.user_id IN ({}) ORDER BY k.user_id, k.device_id",
                placeholders(1, chunk.len())
            );
            let rows: Vec<(String, String, String, Option<String>)> = on_reader!(self, pool => {
                let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()));
                for user in chunk {
                    query = query.bind(*user);
                }
                query.fetch_all(pool).await?
            });
            out.extend(rows);
        }
        Ok(out)
    }

    /// Cross-signing keys of these users: (user, key type, JSON).
    pub async fn cross_signing_keys_of_users(&self, users: &[&str]) -> StorageResult<Vec<(String, String, String)>> {
        let mut out = Vec::new();
        for chunk in users.chunks(USERS_PER_STATEMENT) {
            let sql = format!(
                "SELECT user_id, key_type, key_json FROM e2e_cross_signing_keys WHERE user_id IN ({})",
                placeholders(1, chunk.len())
            );
            let rows: Vec<(String, String, String)> = on_reader!(self, pool => {
                let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()));
                for user in chunk {
                    query = query.bind(*user);
                }
                query.fetch_all(pool).await?
            });
            out.extend(rows);
        }
        Ok(out)
    }

    /// The uploaded signatures of these users' keys made by the users themselves or by
    /// `viewer`.
    pub async fn signatures_of_users(&self, users: &[&str], viewer: Option<&str>) -> StorageResult<Vec<SignatureRow>> {
        let mut out = Vec::new();
        for chunk in users.chunks(USERS_PER_STATEMENT) {
            let sql = format!(
                "SELECT target_user, target_key, signer, signer_key_id, signature FROM e2e_signatures \
                 WHERE target_user IN ({}) AND (signer = target_user OR signer = $1)",
                placeholders(2, chunk.len())
            );
            let rows: Vec<(String, String, String, String, String)> = on_reader!(self, pool => {
                let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql.clone())).bind(viewer.unwrap_or(""));
                for user in chunk {
                    query = query.bind(*user);
                }
                query.fetch_all(pool).await?
            });
            for (target_user, target_key, signer, signer_key_id, signature) in rows {
                out.push(SignatureRow {
                    target_user: parse_id(target_user)?,
                    target_key,
                    signer: parse_id(signer)?,
                    signer_key_id,
                    signature,
                });
            }
        }
        Ok(out)
    }

    /// Stores a device's identity keys and its new one-time and fallback keys, in one
    /// transaction. One-time keys already stored under the same ID are left as they are (the
    /// caller checked that their content is the same); a fallback key replaces the previous one
    /// of its algorithm (and is unused again unless it is the very same key).
    ///
    /// `device_keys` is (JSON, the JSON the caller saw stored): the row is written only if it
    /// still holds what the caller checked the new keys against, so two uploads racing with
    /// different identity keys cannot both pass. `false` (nothing written) when it did not.
    pub async fn store_device_keys(
        &self,
        user_id: &UserId,
        device_id: &str,
        device_keys: Option<(&str, Option<&str>)>,
        one_time_keys: &[NewKey<'_>],
        fallback_keys: &[NewKey<'_>],
    ) -> StorageResult<bool> {
        let user = user_id.as_str();
        Ok(on_writer!(self, pool => 'stored: {
            let mut tx = pool.begin().await?;
            if let Some((keys, seen)) = device_keys {
                let written = match seen {
                    None => sqlx::query(
                        "INSERT INTO e2e_device_keys (user_id, device_id, keys_json) VALUES ($1, $2, $3) \
                         ON CONFLICT (user_id, device_id) DO NOTHING",
                    )
                    .bind(user)
                    .bind(device_id)
                    .bind(keys)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected(),
                    Some(seen) => sqlx::query(
                        "UPDATE e2e_device_keys SET keys_json = $3 WHERE user_id = $1 AND device_id = $2 \
                         AND keys_json = $4",
                    )
                    .bind(user)
                    .bind(device_id)
                    .bind(keys)
                    .bind(seen)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected(),
                };
                if written == 0 {
                    // Dropping the transaction rolls it back.
                    break 'stored false;
                }
            }
            for key in one_time_keys {
                sqlx::query(
                    "INSERT INTO e2e_one_time_keys (user_id, device_id, algorithm, key_id, key_json) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (user_id, device_id, algorithm, key_id) DO NOTHING",
                )
                .bind(user)
                .bind(device_id)
                .bind(key.algorithm)
                .bind(key.key_id)
                .bind(key.key_json)
                .execute(&mut *tx)
                .await?;
            }
            for key in fallback_keys {
                sqlx::query(
                    "INSERT INTO e2e_fallback_keys (user_id, device_id, algorithm, key_id, key_json, used) \
                     VALUES ($1, $2, $3, $4, $5, FALSE) ON CONFLICT (user_id, device_id, algorithm) DO UPDATE \
                     SET key_id = excluded.key_id, key_json = excluded.key_json, \
                     used = (e2e_fallback_keys.used AND e2e_fallback_keys.key_id = excluded.key_id \
                             AND e2e_fallback_keys.key_json = excluded.key_json)",
                )
                .bind(user)
                .bind(device_id)
                .bind(key.algorithm)
                .bind(key.key_id)
                .bind(key.key_json)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            true
        }))
    }

    /// The stored one-time keys of a device with these IDs (`algorithm:key_id`): (ID, JSON).
    pub async fn one_time_keys_by_id(
        &self,
        user_id: &UserId,
        device_id: &str,
        key_ids: &[String],
    ) -> StorageResult<Vec<ClaimedKey>> {
        let mut found = Vec::new();
        for chunk in key_ids.chunks(100) {
            let placeholders: Vec<String> = (0..chunk.len()).map(|i| format!("${}", i + 3)).collect();
            // Only numbered placeholders are formatted in; the values are bound.
            let sql = format!(
                "SELECT algorithm || ':' || key_id, key_json FROM e2e_one_time_keys \
                 WHERE user_id = $1 AND device_id = $2 AND algorithm || ':' || key_id IN ({})",
                placeholders.join(", ")
            );
            let rows: Vec<(String, String)> = on_reader!(self, pool => {
                let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql.clone())).bind(user_id.as_str()).bind(device_id);
                for id in chunk {
                    query = query.bind(id);
                }
                query.fetch_all(pool).await?
            });
            found.extend(rows.into_iter().map(|(key_id, key_json)| ClaimedKey { key_id, key_json }));
        }
        Ok(found)
    }

    /// How many unclaimed one-time keys the device has, per algorithm.
    pub async fn one_time_key_counts(&self, user_id: &UserId, device_id: &str) -> StorageResult<BTreeMap<String, u64>> {
        let rows: Vec<(String, i64)> = on_reader!(self, pool => {
            sqlx::query_as(
                "SELECT algorithm, COUNT(*) FROM e2e_one_time_keys WHERE user_id = $1 AND device_id = $2 \
                 GROUP BY algorithm",
            )
            .bind(user_id.as_str())
            .bind(device_id)
            .fetch_all(pool)
            .await?
        });
        Ok(rows.into_iter().map(|(algorithm, count)| (algorithm, u64::try_from(count).unwrap_or(0))).collect())
    }

    /// The algorithms of the device's fallback keys that nobody has claimed yet.
    pub async fn unused_fallback_key_types(&self, user_id: &UserId, device_id: &str) -> StorageResult<Vec<String>> {
        Ok(on_reader!(self, pool => {
            sqlx::query_scalar(
                "SELECT algorithm FROM e2e_fallback_keys WHERE user_id = $1 AND device_id = $2 AND NOT used \
                 ORDER BY algorithm",
            )
            .bind(user_id.as_str())
            .bind(device_id)
            .fetch_all(pool)
            .await?
        }))
    }

    /// Takes one of the device's one-time keys of `algorithm` (the oldest), or, when none is
    /// left, hands out its fallback key (marking it used). A one-time key is deleted as it is
    /// returned, so concurrent claims never get the same one: a claim whose chosen row was taken
    /// by another meanwhile deletes nothing and tries the next.
    pub async fn claim_key(
        &self,
        user_id: &UserId,
        device_id: &str,
        algorithm: &str,
    ) -> StorageResult<Option<ClaimedKey>> {
        let user = user_id.as_str();
        loop {
            let claimed: Option<(String, String)> = on_writer!(self, pool => {
                sqlx::query_as(
                    "DELETE FROM e2e_one_time_keys WHERE id = (SELECT MIN(id) FROM e2e_one_time_keys \
                     WHERE user_id = $1 AND device_id = $2 AND algorithm = $3) RETURNING key_id, key_json",
                )
                .bind(user)
                .bind(device_id)
                .bind(algorithm)
                .fetch_optional(pool)
                .await?
            });
            if let Some((key_id, key_json)) = claimed {
                return Ok(Some(ClaimedKey { key_id: format!("{algorithm}:{key_id}"), key_json }));
            }
            let left: i64 = on_writer!(self, pool => {
                sqlx::query_scalar(
                    "SELECT COUNT(*) FROM e2e_one_time_keys WHERE user_id = $1 AND device_id = $2 AND algorithm = $3",
                )
                .bind(user)
                .bind(device_id)
                .bind(algorithm)
                .fetch_one(pool)
                .await?
            });
            if left == 0 {
                break;
            }
        }
        let fallback: Option<(String, String)> = on_writer!(self, pool => {
            sqlx::query_as(
                "UPDATE e2e_fallback_keys SET used = TRUE WHERE user_id = $1 AND device_id = $2 AND algorithm = $3 \
                 RETURNING key_id, key_json",
            )
            .bind(user)
            .bind(device_id)
            .bind(algorithm)
            .fetch_optional(pool)
            .await?
        });
        Ok(fallback.map(|(key_id, key_json)| ClaimedKey { key_id: format!("{algorithm}:{key_id}"), key_json }))
    }

    /// A user's cross-signing keys by type (`master`, `self_signing`, `user_signing`).
    pub async fn cross_signing_keys(&self, user_id: &UserId) -> StorageResult<BTreeMap<String, String>> {
        let rows: Vec<(String, String)> = on_reader!(self, pool => {
            sqlx::query_as("SELECT key_type, key_json FROM e2e_cross_signing_keys WHERE user_id = $1")
                .bind(user_id.as_str())
                .fetch_all(pool)
                .await?
        });
        Ok(rows.into_iter().collect())
    }

    /// Stores cross-signing keys (type, JSON). A new master key drops the signatures others made
    /// of the old one.
    pub async fn store_cross_signing_keys(
        &self,
        user_id: &UserId,
        keys: &[(&str, String)],
        replaced_master: Option<&str>,
        now: i64,
    ) -> StorageResult<()> {
        let user = user_id.as_str();
        on_writer!(self, pool => {
            let mut tx = pool.begin().await?;
            if let Some(old) = replaced_master {
                sqlx::query("DELETE FROM e2e_signatures WHERE target_user = $1 AND target_key = $2")
                    .bind(user)
                    .bind(old)
                    .execute(&mut *tx)
                    .await?;
            }
            for (key_type, json) in keys {
                sqlx::query(
                    "INSERT INTO e2e_cross_signing_keys (user_id, key_type, key_json, updated_ts) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (user_id, key_type) DO UPDATE SET key_json = excluded.key_json, \
                     updated_ts = excluded.updated_ts",
                )
                .bind(user)
                .bind(*key_type)
                .bind(json)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    pub async fn store_signatures(&self, rows: &[SignatureRow]) -> StorageResult<()> {
        on_writer!(self, pool => {
            let mut tx = pool.begin().await?;
            for row in rows {
                sqlx::query(
                    "INSERT INTO e2e_signatures (target_user, target_key, signer, signer_key_id, signature) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (target_user, target_key, signer, signer_key_id) \
                     DO UPDATE SET signature = excluded.signature",
                )
                .bind(row.target_user.as_str())
                .bind(&row.target_key)
                .bind(row.signer.as_str())
                .bind(&row.signer_key_id)
                .bind(&row.signature)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// The uploaded signatures of `target_user`'s keys made by any of `signers`.
    pub async fn signatures_of(&self, target_user: &UserId, signers: &[&UserId]) -> StorageResult<Vec<SignatureRow>> {
        let mut out = Vec::new();
        for signer in signers {
            let rows: Vec<(String, String, String)> = on_reader!(self, pool => {
                sqlx::query_as(
                    "SELECT target_key, signer_key_id, signature FROM e2e_signatures \
                     WHERE target_user = $1 AND signer = $2",
                )
                .bind(target_user.as_str())
                .bind(signer.as_str())
                .fetch_all(pool)
                .await?
            });
            for (target_key, signer_key_id, signature) in rows {
                out.push(SignatureRow {
                    target_user: target_user.to_owned(),
                    target_key,
                    signer: (*signer).to_owned(),
                    signer_key_id,
                    signature,
                });
            }
        }
        Ok(out)
    }

    /// Members of the rooms `user_id` is or was in whose membership last changed in
    /// `(after, upto]`, with that membership (for `/keys/changes`).
    pub async fn member_changes_in_rooms_of(
        &self,
        user_id: &UserId,
        after: i64,
        upto: i64,
    ) -> StorageResult<Vec<(OwnedUserId, String)>> {
        let rows: Vec<(String, String)> = on_reader!(self, pool => {
            sqlx::query_as(
                "SELECT m.user_id, m.membership FROM room_memberships m \
                 WHERE m.room_id IN (SELECT room_id FROM room_memberships WHERE user_id = $1) \
                 AND m.stream_pos > $2 AND m.stream_pos <= $3",
            )
            .bind(user_id.as_str())
            .bind(after)
            .bind(upto)
            .fetch_all(pool)
            .await?
        });
        rows.into_iter().map(|(user, membership)| Ok((parse_id(user)?, membership))).collect()
    }

    // Room key backups.

    /// Creates a new backup version (one more than any the user had); it becomes the current one.
    pub async fn create_backup_version(
        &self,
        user_id: &UserId,
        algorithm: &str,
        auth_data: &str,
    ) -> StorageResult<i64> {
        let user = user_id.as_str();
        Ok(on_writer!(self, pool => {
            let mut tx = pool.begin().await?;
            let last: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM e2e_backup_versions WHERE user_id = $1")
                .bind(user)
                .fetch_one(&mut *tx)
                .await?;
            let version = last.unwrap_or(0) + 1;
            sqlx::query(
                "INSERT INTO e2e_backup_versions (user_id, version, algorithm, auth_data, etag, deleted) \
                 VALUES ($1, $2, $3, $4, 0, FALSE)",
            )
            .bind(user)
            .bind(version)
            .bind(algorithm)
            .bind(auth_data)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            version
        }))
    }

    /// A backup version (`None`: the current one, the latest not deleted), with its key count.
    pub async fn backup_version(&self, user_id: &UserId, version: Option<i64>) -> StorageResult<Option<BackupVersion>> {
        let user = user_id.as_str();
        let row: Option<(i64, String, String, i64)> = on_reader!(self, pool => {
            match version {
                Some(version) => sqlx::query_as(
                    "SELECT version, algorithm, auth_data, etag FROM e2e_backup_versions \
                     WHERE user_id = $1 AND version = $2 AND NOT deleted",
                )
                .bind(user)
                .bind(version)
                .fetch_optional(pool)
                .await?,
                None => sqlx::query_as(
                    "SELECT version, algorithm, auth_data, etag FROM e2e_backup_versions \
                     WHERE user_id = $1 AND NOT deleted ORDER BY version DESC LIMIT 1",
                )
                .bind(user)
                .fetch_optional(pool)
                .await?,
            }
        });
        let Some((version, algorithm, auth_data, etag)) = row else { return Ok(None) };
        let count: i64 = on_reader!(self, pool => {
            sqlx::query_scalar("SELECT COUNT(*) FROM e2e_backup_keys WHERE user_id = $1 AND version = $2")
                .bind(user)
                .bind(version)
                .fetch_one(pool)
                .await?
        });
        Ok(Some(BackupVersion { version, algorithm, auth_data, etag, count }))
    }

    /// Replaces a backup version's auth data; false when there is no such (undeleted) version.
    pub async fn update_backup_version(&self, user_id: &UserId, version: i64, auth_data: &str) -> StorageResult<bool> {
        let changed = on_writer!(self, pool => {
            sqlx::query("UPDATE e2e_backup_versions SET auth_data = $1 WHERE user_id = $2 AND version = $3 AND NOT deleted")
                .bind(auth_data)
                .bind(user_id.as_str())
                .bind(version)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(changed > 0)
    }

    /// Deletes a backup version and its keys; false when there was no such version.
    pub async fn delete_backup_version(&self, user_id: &UserId, version: i64) -> StorageResult<bool> {
        let user = user_id.as_str();
        Ok(on_writer!(self, pool => {
            let mut tx = pool.begin().await?;
            let changed = sqlx::query(
                "UPDATE e2e_backup_versions SET deleted = TRUE WHERE user_id = $1 AND version = $2 AND NOT deleted",
            )
            .bind(user)
            .bind(version)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            sqlx::query("DELETE FROM e2e_backup_keys WHERE user_id = $1 AND version = $2")
                .bind(user)
                .bind(version)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            changed > 0
        }))
    }

    /// Stores session keys in a backup version, each replacing the stored key of its session only
    /// when the spec prefers it (verified over unverified; then the lower first message index;
    /// then the lower forwarded count). The version's etag moves when anything changed. Returns
    /// the new (etag, count).
    pub async fn put_backup_keys(
        &self,
        user_id: &UserId,
        version: i64,
        keys: &[BackupKey],
    ) -> StorageResult<(i64, i64)> {
        let user = user_id.as_str();
        Ok(on_writer!(self, pool => {
            let mut tx = pool.begin().await?;
            let mut changed = 0;
            for key in keys {
                changed += sqlx::query(
                    "INSERT INTO e2e_backup_keys (user_id, version, room_id, session_id, first_message_index, \
                     forwarded_count, is_verified, session_data) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                     ON CONFLICT (user_id, version, room_id, session_id) DO UPDATE SET \
                     first_message_index = excluded.first_message_index, forwarded_count = excluded.forwarded_count, \
                     is_verified = excluded.is_verified, session_data = excluded.session_data \
                     WHERE (excluded.is_verified AND NOT e2e_backup_keys.is_verified) \
                     OR (excluded.is_verified = e2e_backup_keys.is_verified \
                         AND (excluded.first_message_index < e2e_backup_keys.first_message_index \
                              OR (excluded.first_message_index = e2e_backup_keys.first_message_index \
                                  AND excluded.forwarded_count < e2e_backup_keys.forwarded_count)))",
                )
                .bind(user)
                .bind(version)
                .bind(&key.room_id)
                .bind(&key.session_id)
                .bind(key.first_message_index)
                .bind(key.forwarded_count)
                .bind(key.is_verified)
                .bind(&key.session_data)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            }
            let answer = backup_change_done!(tx, user, version, changed > 0);
            tx.commit().await?;
            answer
        }))
    }

    /// The session keys of a backup version, all of them or one room's or one session's.
    pub async fn backup_keys(
        &self,
        user_id: &UserId,
        version: i64,
        room_id: Option<&str>,
        session_id: Option<&str>,
    ) -> StorageResult<Vec<BackupKey>> {
        let rows: Vec<(String, String, i64, i64, bool, String)> = on_reader!(self, pool => {
            sqlx::query_as(
                "SELECT room_id, session_id, first_message_index, forwarded_count, is_verified, session_data \
                 FROM e2e_backup_keys WHERE user_id = $1 AND version = $2 \
                 AND ($3 IS NULL OR room_id = $3) AND ($4 IS NULL OR session_id = $4) ORDER BY room_id, session_id",
            )
            .bind(user_id.as_str())
            .bind(version)
            .bind(room_id)
            .bind(session_id)
            .fetch_all(pool)
            .await?
        });
        Ok(rows
            .into_iter()
            .map(|(room_id, session_id, first_message_index, forwarded_count, is_verified, session_data)| BackupKey {
                room_id,
                session_id,
                first_message_index,
                forwarded_count,
                is_verified,
                session_data,
            })
            .collect())
    }

    /// Deletes session keys of a backup version (all, one room's or one session's); the etag
    /// moves when any went. Returns the new (etag, count).
    pub async fn delete_backup_keys(
        &self,
        user_id: &UserId,
        version: i64,
        room_id: Option<&str>,
        session_id: Option<&str>,
    ) -> StorageResult<(i64, i64)> {
        let user = user_id.as_str();
        Ok(on_writer!(self, pool => {
            let mut tx = pool.begin().await?;
            let deleted = sqlx::query(
                "DELETE FROM e2e_backup_keys WHERE user_id = $1 AND version = $2 \
                 AND ($3 IS NULL OR room_id = $3) AND ($4 IS NULL OR session_id = $4)",
            )
            .bind(user)
            .bind(version)
            .bind(room_id)
            .bind(session_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            let answer = backup_change_done!(tx, user, version, deleted > 0);
            tx.commit().await?;
            answer
        }))
    }

    // Dehydrated devices.

    /// A device row without access tokens (a dehydrated device); an existing row is kept.
    pub async fn create_tokenless_device(
        &self,
        user_id: &UserId,
        device_id: &str,
        display_name: Option<&str>,
        now: i64,
    ) -> StorageResult<()> {
        on_writer!(self, pool => {
            sqlx::query(
                "INSERT INTO devices (user_id, device_id, display_name, created_ts) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (user_id, device_id) DO NOTHING",
            )
            .bind(user_id.as_str())
            .bind(device_id)
            .bind(display_name)
            .bind(now)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    pub async fn dehydrated_device(&self, user_id: &UserId) -> StorageResult<Option<DehydratedDevice>> {
        let row: Option<(String, String)> = on_reader!(self, pool => {
            sqlx::query_as("SELECT device_id, device_data FROM e2e_dehydrated_devices WHERE user_id = $1")
                .bind(user_id.as_str())
                .fetch_optional(pool)
                .await?
        });
        Ok(row.map(|(device_id, device_data)| DehydratedDevice { device_id, device_data }))
    }

    /// Records the user's dehydrated device (its device row is created by the caller first).
    pub async fn set_dehydrated_device(&self, user_id: &UserId, device: &DehydratedDevice) -> StorageResult<()> {
        on_writer!(self, pool => {
            sqlx::query(
                "INSERT INTO e2e_dehydrated_devices (user_id, device_id, device_data) VALUES ($1, $2, $3) \
                 ON CONFLICT (user_id) DO UPDATE SET device_id = excluded.device_id, device_data = excluded.device_data",
            )
            .bind(user_id.as_str())
            .bind(&device.device_id)
            .bind(&device.device_data)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    // To-device transaction IDs.

    /// Whether this device's `/sendToDevice` transaction ID was already used.
    pub async fn to_device_txn_seen(&self, user_id: &UserId, device_id: &str, txn_id: &str) -> StorageResult<bool> {
        let found: Option<i64> = on_reader!(self, pool => {
            sqlx::query_scalar("SELECT created_ts FROM to_device_txns WHERE user_id = $1 AND device_id = $2 AND txn_id = $3")
                .bind(user_id.as_str())
                .bind(device_id)
                .bind(txn_id)
                .fetch_optional(pool)
                .await?
        });
        Ok(found.is_some())
    }

    /// Forgets to-device transaction IDs recorded before `before_ts`; how many went.
    pub async fn prune_to_device_txns(&self, before_ts: i64) -> StorageResult<u64> {
        Ok(on_writer!(self, pool => {
            sqlx::query("DELETE FROM to_device_txns WHERE created_ts < $1")
                .bind(before_ts)
                .execute(pool)
                .await?
                .rows_affected()
        }))
    }
}
