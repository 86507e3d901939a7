//! Accounts aggregate: users and profiles, devices, access/refresh tokens, registration tokens and
//! user-interactive-auth sessions.
//!
//! Tokens are only ever stored as SHA-256 hashes; the caller hashes. Every method that ends a
//! device's session deletes the device's tokens in the same transaction, so a deleted device can
//! never authenticate again.

use ruma::{DeviceId, OwnedDeviceId, OwnedUserId, UserId};

use super::{Db, StorageResult, on_reader, on_writer, parse_id};

/// A stored account.
#[derive(Debug, Clone)]
pub struct UserRow {
    pub user_id: OwnedUserId,
    pub password_hash: Option<String>,
    pub is_admin: bool,
    pub is_guest: bool,
    pub deactivated: bool,
    pub created_ts: i64,
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
}

type UserTuple = (String, Option<String>, bool, bool, bool, i64, Option<String>, Option<String>);

const USER_COLUMNS: &str =
    "user_id, password_hash, is_admin, is_guest, deactivated, created_ts, displayname, avatar_url";

impl TryFrom<UserTuple> for UserRow {
    type Error = super::StorageError;
    fn try_from(t: UserTuple) -> StorageResult<Self> {
        Ok(UserRow {
            user_id: parse_id(t.0)?,
            password_hash: t.1,
            is_admin: t.2,
            is_guest: t.3,
            deactivated: t.4,
            created_ts: t.5,
            displayname: t.6,
            avatar_url: t.7,
        })
    }
}

/// An account to create.
pub struct NewUser<'a> {
    pub user_id: &'a UserId,
    pub password_hash: Option<&'a str>,
    pub is_admin: bool,
    pub is_guest: bool,
    pub displayname: Option<&'a str>,
    pub now: i64,
}

/// A logged-in session to create: a device (new or reused) with fresh tokens.
pub struct NewSession<'a> {
    pub device_id: &'a DeviceId,
    pub device_display_name: Option<&'a str>,
    pub access_token_hash: &'a str,
    pub access_expires_ts: Option<i64>,
    pub refresh_token_hash: Option<&'a str>,
    pub refresh_expires_ts: Option<i64>,
    pub ip: Option<&'a str>,
    pub now: i64,
}

/// What an access token proves.
#[derive(Debug, Clone)]
pub struct AccessTokenRow {
    pub id: i64,
    pub user_id: OwnedUserId,
    pub device_id: OwnedDeviceId,
    pub expires_ts: Option<i64>,
    pub refresh_token_id: Option<i64>,
    pub used: bool,
    pub is_guest: bool,
}

#[derive(Debug, Clone)]
pub struct RefreshTokenRow {
    pub id: i64,
    pub user_id: OwnedUserId,
    pub device_id: OwnedDeviceId,
    pub expires_ts: Option<i64>,
    pub next_token_id: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct DeviceRow {
    pub device_id: OwnedDeviceId,
    pub display_name: Option<String>,
    pub last_seen_ts: Option<i64>,
    pub last_seen_ip: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationTokenRow {
    pub token: String,
    pub uses_allowed: Option<i64>,
    pub pending: i64,
    pub completed: i64,
    pub expiry_ts: Option<i64>,
}

impl RegistrationTokenRow {
    pub fn is_valid(&self, now: i64) -> bool {
        self.expiry_ts.is_none_or(|expiry| expiry > now)
            && self.uses_allowed.is_none_or(|allowed| self.pending + self.completed < allowed)
    }
}

#[derive(Debug, Clone)]
pub struct UiaSessionRow {
    pub purpose: String,
    pub completed: Vec<String>,
    pub registration_token: Option<String>,
    pub created_ts: i64,
}

/// Inserts a session's device (or keeps the existing one, dropping its old tokens as the spec asks
/// when a client reuses a device ID) and its tokens.
macro_rules! insert_session {
    ($tx:expr, $user_id:expr, $s:expr) => {{
        let s: &NewSession<'_> = $s;
        let user = $user_id.as_str();
        let device = s.device_id.as_str();
        sqlx::query(
            "INSERT INTO devices (user_id, device_id, display_name, created_ts, last_seen_ts, last_seen_ip)
             VALUES ($1, $2, $3, $4, $4, $5)
             ON CONFLICT (user_id, device_id) DO UPDATE SET
                display_name = COALESCE(devices.display_name, EXCLUDED.display_name),
                last_seen_ts = EXCLUDED.last_seen_ts, last_seen_ip = EXCLUDED.last_seen_ip",
        )
        .bind(user)
        .bind(device)
        .bind(s.device_display_name)
        .bind(s.now)
        .bind(s.ip)
        .execute(&mut *$tx)
        .await?;
        sqlx::query("DELETE FROM access_tokens WHERE user_id = $1 AND device_id = $2")
            .bind(user)
            .bind(device)
            .execute(&mut *$tx)
            .await?;
        sqlx::query("DELETE FROM refresh_tokens WHERE user_id = $1 AND device_id = $2")
            .bind(user)
            .bind(device)
            .execute(&mut *$tx)
            .await?;
        let refresh_id: Option<i64> = match s.refresh_token_hash {
            Some(hash) => Some(
                sqlx::query_scalar(
                    "INSERT INTO refresh_tokens (token_hash, user_id, device_id, created_ts, expires_ts)
                     VALUES ($1, $2, $3, $4, $5) RETURNING id",
                )
                .bind(hash)
                .bind(user)
                .bind(device)
                .bind(s.now)
                .bind(s.refresh_expires_ts)
                .fetch_one(&mut *$tx)
                .await?,
            ),
            None => None,
        };
        sqlx::query(
            "INSERT INTO access_tokens (token_hash, user_id, device_id, created_ts, expires_ts, refresh_token_id)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(s.access_token_hash)
        .bind(user)
        .bind(device)
        .bind(s.now)
        .bind(s.access_expires_ts)
        .bind(refresh_id)
        .execute(&mut *$tx)
        .await?;
    }};
}

/// Deletes devices and every token they hold.
macro_rules! delete_devices_where {
    ($tx:expr, $filter:literal, $user:expr, $device:expr) => {{
        for table in [
            // End-to-end keys go with the device (cross-signing signatures of it included).
            concat!(
                "DELETE FROM e2e_signatures WHERE target_user = $1 AND target_key IN ",
                "(SELECT device_id FROM devices WHERE user_id = $1",
                $filter,
                ")"
            ),
            concat!("DELETE FROM e2e_device_keys WHERE user_id = $1", $filter),
            concat!("DELETE FROM e2e_one_time_keys WHERE user_id = $1", $filter),
            concat!("DELETE FROM e2e_fallback_keys WHERE user_id = $1", $filter),
            concat!("DELETE FROM e2e_dehydrated_devices WHERE user_id = $1", $filter),
            concat!("DELETE FROM to_device_messages WHERE user_id = $1", $filter),
            // A removed device gets no more pushes.
            concat!("DELETE FROM pushers WHERE user_id = $1", $filter),
            concat!("DELETE FROM access_tokens WHERE user_id = $1", $filter),
            concat!("DELETE FROM refresh_tokens WHERE user_id = $1", $filter),
            concat!("DELETE FROM devices WHERE user_id = $1", $filter),
        ] {
            let query = sqlx::query(table).bind($user);
            let query = if $filter.is_empty() { query } else { query.bind($device) };
            query.execute(&mut *$tx).await?;
        }
    }};
}

impl Db {
    /// Creates an account, optionally with its first session, atomically. `Conflict` if the user ID
    /// was ever taken.
    pub async fn create_account(&self, user: &NewUser<'_>, session: Option<&NewSession<'_>>) -> StorageResult<()> {
        let localpart = user.user_id.localpart();
        on_writer!(self, pool => {
            let mut tx = pool.begin().await?;
            sqlx::query(
                "INSERT INTO users (user_id, localpart, password_hash, is_admin, is_guest, created_ts, displayname)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(user.user_id.as_str())
            .bind(localpart)
            .bind(user.password_hash)
            .bind(user.is_admin)
            .bind(user.is_guest)
            .bind(user.now)
            .bind(user.displayname)
            .execute(&mut *tx)
            .await?;
            if let Some(session) = session {
                insert_session!(tx, user.user_id, session);
            }
            tx.commit().await?;
        });
        Ok(())
    }

    pub async fn user(&self, user_id: &UserId) -> StorageResult<Option<UserRow>> {
        let sql = sqlx::AssertSqlSafe(format!("SELECT {USER_COLUMNS} FROM users WHERE user_id = $1"));
        let row: Option<UserTuple> = on_reader!(self, pool => {
            sqlx::query_as(sql).bind(user_id.as_str()).fetch_optional(pool).await?
        });
        row.map(UserRow::try_from).transpose()
    }

    /// Whether a local name was ever used (deactivated accounts keep theirs).
    pub async fn localpart_exists(&self, localpart: &str) -> StorageResult<bool> {
        let found: Option<i64> = on_reader!(self, pool => {
            sqlx::query_scalar("SELECT CAST(1 AS BIGINT) FROM users WHERE localpart = $1").bind(localpart).fetch_optional(pool).await?
        });
        Ok(found.is_some())
    }

    pub async fn list_users(&self) -> StorageResult<Vec<UserRow>> {
        let sql = sqlx::AssertSqlSafe(format!("SELECT {USER_COLUMNS} FROM users ORDER BY user_id"));
        let rows: Vec<UserTuple> = on_reader!(self, pool => sqlx::query_as(sql).fetch_all(pool).await?);
        rows.into_iter().map(UserRow::try_from).collect()
    }

    /// Adds a session (device + tokens) to an existing account.
    pub async fn create_session(&self, user_id: &UserId, session: &NewSession<'_>) -> StorageResult<()> {
        on_writer!(self, pool => {
            let mut tx = pool.begin().await?;
            insert_session!(tx, user_id, session);
            tx.commit().await?;
        });
        Ok(())
    }

    /// Looks up an access token by hash, with the owner's guest flag. Tokens of deactivated users
    /// are deleted at deactivation, so they never resolve.
    pub async fn access_token(&self, token_hash: &str) -> StorageResult<Option<AccessTokenRow>> {
        type Row = (i64, String, String, Option<i64>, Option<i64>, bool, bool);
        let row: Option<Row> = on_reader!(self, pool => {
            sqlx::query_as(
                "SELECT t.id, t.user_id, t.device_id, t.expires_ts, t.refresh_token_id, t.used, u.is_guest
                 FROM access_tokens t JOIN users u ON u.user_id = t.user_id
                 WHERE t.token_hash = $1 AND NOT u.deactivated",
            )
            .bind(token_hash)
            .fetch_optional(pool)
            .await?
        });
        row.map(|r| {
            Ok(AccessTokenRow {
                id: r.0,
                user_id: parse_id(r.1)?,
                device_id: r.2.into(),
                expires_ts: r.3,
                refresh_token_id: r.4,
                used: r.5,
                is_guest: r.6,
            })
        })
        .transpose()
    }

    /// First use of a token issued by a refresh: the refresh token it replaced is now spent.
    pub async fn mark_access_token_used(&self, token_id: i64, refresh_token_id: Option<i64>) -> StorageResult<()> {
        on_writer!(self, pool => {
            let mut tx = pool.begin().await?;
            sqlx::query("UPDATE access_tokens SET used = TRUE WHERE id = $1").bind(token_id).execute(&mut *tx).await?;
            if let Some(refresh_id) = refresh_token_id {
                sqlx::query("DELETE FROM refresh_tokens WHERE next_token_id = $1")
                    .bind(refresh_id)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    pub async fn refresh_token(&self, token_hash: &str) -> StorageResult<Option<RefreshTokenRow>> {
        type Row = (i64, String, String, Option<i64>, Option<i64>);
        let row: Option<Row> = on_reader!(self, pool => {
            sqlx::query_as(
                "SELECT r.id, r.user_id, r.device_id, r.expires_ts, r.next_token_id
                 FROM refresh_tokens r JOIN users u ON u.user_id = r.user_id
                 WHERE r.token_hash = $1 AND NOT u.deactivated",
            )
            .bind(token_hash)
            .fetch_optional(pool)
            .await?
        });
        row.map(|r| {
            Ok(RefreshTokenRow {
                id: r.0,
                user_id: parse_id(r.1)?,
                device_id: r.2.into(),
                expires_ts: r.3,
                next_token_id: r.4,
            })
        })
        .transpose()
    }

    /// Exchanges refresh token `old` for a new refresh/access pair. The old access tokens die now;
    /// the old refresh token lives until the new pair is first used (so a client that lost the
    /// response can retry). A retry replaces the unused pair from the previous attempt.
    pub async fn exchange_refresh_token(
        &self,
        old: &RefreshTokenRow,
        new_refresh_hash: &str,
        refresh_expires_ts: Option<i64>,
        new_access_hash: &str,
        access_expires_ts: Option<i64>,
        now: i64,
    ) -> StorageResult<()> {
        let (user, device) = (old.user_id.as_str(), old.device_id.as_str());
        on_writer!(self, pool => {
            let mut tx = pool.begin().await?;
            if let Some(previous) = old.next_token_id {
                sqlx::query("DELETE FROM access_tokens WHERE refresh_token_id = $1").bind(previous).execute(&mut *tx).await?;
                sqlx::query("DELETE FROM refresh_tokens WHERE id = $1").bind(previous).execute(&mut *tx).await?;
            }
            sqlx::query("DELETE FROM access_tokens WHERE refresh_token_id = $1").bind(old.id).execute(&mut *tx).await?;
            let new_id: i64 = sqlx::query_scalar(
                "INSERT INTO refresh_tokens (token_hash, user_id, device_id, created_ts, expires_ts)
                 VALUES ($1, $2, $3, $4, $5) RETURNING id",
            )
            .bind(new_refresh_hash)
            .bind(user)
            .bind(device)
            .bind(now)
            .bind(refresh_expires_ts)
            .fetch_one(&mut *tx)
            .await?;
            sqlx::query("UPDATE refresh_tokens SET next_token_id = $1 WHERE id = $2")
                .bind(new_id)
                .bind(old.id)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO access_tokens (token_hash, user_id, device_id, created_ts, expires_ts, refresh_token_id)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(new_access_hash)
            .bind(user)
            .bind(device)
            .bind(now)
            .bind(access_expires_ts)
            .bind(new_id)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Using the new refresh token also spends the one it replaced.
    pub async fn spend_replaced_refresh_tokens(&self, refresh_token_id: i64) -> StorageResult<()> {
        on_writer!(self, pool => {
            sqlx::query("DELETE FROM refresh_tokens WHERE next_token_id = $1").bind(refresh_token_id).execute(pool).await?;
        });
        Ok(())
    }

    pub async fn devices(&self, user_id: &UserId) -> StorageResult<Vec<DeviceRow>> {
        type Row = (String, Option<String>, Option<i64>, Option<String>);
        let rows: Vec<Row> = on_reader!(self, pool => {
            sqlx::query_as(
                "SELECT device_id, display_name, last_seen_ts, last_seen_ip FROM devices WHERE user_id = $1 ORDER BY device_id",
            )
            .bind(user_id.as_str())
            .fetch_all(pool)
            .await?
        });
        Ok(rows
            .into_iter()
            .map(|r| DeviceRow { device_id: r.0.into(), display_name: r.1, last_seen_ts: r.2, last_seen_ip: r.3 })
            .collect())
    }

    pub async fn device(&self, user_id: &UserId, device_id: &DeviceId) -> StorageResult<Option<DeviceRow>> {
        type Row = (String, Option<String>, Option<i64>, Option<String>);
        let row: Option<Row> = on_reader!(self, pool => {
            sqlx::query_as(
                "SELECT device_id, display_name, last_seen_ts, last_seen_ip FROM devices WHERE user_id = $1 AND device_id = $2",
            )
            .bind(user_id.as_str())
            .bind(device_id.as_str())
            .fetch_optional(pool)
            .await?
        });
        Ok(row.map(|r| DeviceRow { device_id: r.0.into(), display_name: r.1, last_seen_ts: r.2, last_seen_ip: r.3 }))
    }

    /// Renames a device; false if the user has no such device.
    pub async fn set_device_display_name(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        display_name: Option<&str>,
    ) -> StorageResult<bool> {
        let changed = on_writer!(self, pool => {
            sqlx::query("UPDATE devices SET display_name = $1 WHERE user_id = $2 AND device_id = $3")
                .bind(display_name)
                .bind(user_id.as_str())
                .bind(device_id.as_str())
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(changed > 0)
    }

    pub async fn touch_device(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        now: i64,
        ip: Option<&str>,
    ) -> StorageResult<()> {
        on_writer!(self, pool => {
            sqlx::query("UPDATE devices SET last_seen_ts = $1, last_seen_ip = COALESCE($2, last_seen_ip) WHERE user_id = $3 AND device_id = $4")
                .bind(now)
                .bind(ip)
                .bind(user_id.as_str())
                .bind(device_id.as_str())
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Deletes the given devices and their tokens.
    pub async fn delete_devices(&self, user_id: &UserId, device_ids: &[OwnedDeviceId]) -> StorageResult<()> {
        let user = user_id.as_str();
        on_writer!(self, pool => {
            let mut tx = pool.begin().await?;
            for device in device_ids {
                delete_devices_where!(tx, " AND device_id = $2", user, device.as_str());
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Deletes every device of the user except `keep` (and its tokens).
    pub async fn delete_devices_except(&self, user_id: &UserId, keep: Option<&DeviceId>) -> StorageResult<()> {
        let user = user_id.as_str();
        on_writer!(self, pool => {
            let mut tx = pool.begin().await?;
            match keep {
                Some(keep) => delete_devices_where!(tx, " AND device_id <> $2", user, keep.as_str()),
                None => delete_devices_where!(tx, "", user, ""),
            }
            tx.commit().await?;
        });
        Ok(())
    }

    pub async fn set_password_hash(&self, user_id: &UserId, hash: &str) -> StorageResult<bool> {
        let changed = on_writer!(self, pool => {
            sqlx::query("UPDATE users SET password_hash = $1 WHERE user_id = $2 AND NOT deactivated")
                .bind(hash)
                .bind(user_id.as_str())
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(changed > 0)
    }

    /// Deactivates an account for good: no password, no devices, no tokens, no profile. The row
    /// stays so the name is never reused. False if there was no active account.
    pub async fn deactivate_user(&self, user_id: &UserId) -> StorageResult<bool> {
        let user = user_id.as_str();
        let changed = on_writer!(self, pool => {
            let mut tx = pool.begin().await?;
            let changed = sqlx::query(
                "UPDATE users SET deactivated = TRUE, password_hash = NULL, displayname = NULL, avatar_url = NULL
                 WHERE user_id = $1 AND NOT deactivated",
            )
            .bind(user)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            delete_devices_where!(tx, "", user, "");
            tx.commit().await?;
            changed
        });
        Ok(changed > 0)
    }

    pub async fn set_displayname(&self, user_id: &UserId, displayname: Option<&str>) -> StorageResult<()> {
        on_writer!(self, pool => {
            sqlx::query("UPDATE users SET displayname = $1 WHERE user_id = $2")
                .bind(displayname)
                .bind(user_id.as_str())
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    pub async fn set_avatar_url(&self, user_id: &UserId, avatar_url: Option<&str>) -> StorageResult<()> {
        on_writer!(self, pool => {
            sqlx::query("UPDATE users SET avatar_url = $1 WHERE user_id = $2")
                .bind(avatar_url)
                .bind(user_id.as_str())
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    pub async fn create_registration_token(&self, row: &RegistrationTokenRow, now: i64) -> StorageResult<()> {
        on_writer!(self, pool => {
            sqlx::query(
                "INSERT INTO registration_tokens (token, uses_allowed, pending, completed, expiry_ts, created_ts)
                 VALUES ($1, $2, 0, 0, $3, $4)",
            )
            .bind(&row.token)
            .bind(row.uses_allowed)
            .bind(row.expiry_ts)
            .bind(now)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    pub async fn registration_tokens(&self) -> StorageResult<Vec<RegistrationTokenRow>> {
        type Row = (String, Option<i64>, i64, i64, Option<i64>);
        let rows: Vec<Row> = on_reader!(self, pool => {
            sqlx::query_as("SELECT token, uses_allowed, pending, completed, expiry_ts FROM registration_tokens ORDER BY created_ts, token")
                .fetch_all(pool)
                .await?
        });
        Ok(rows
            .into_iter()
            .map(|r| RegistrationTokenRow {
                token: r.0,
                uses_allowed: r.1,
                pending: r.2,
                completed: r.3,
                expiry_ts: r.4,
            })
            .collect())
    }

    pub async fn registration_token(&self, token: &str) -> StorageResult<Option<RegistrationTokenRow>> {
        type Row = (String, Option<i64>, i64, i64, Option<i64>);
        let row: Option<Row> = on_reader!(self, pool => {
            sqlx::query_as("SELECT token, uses_allowed, pending, completed, expiry_ts FROM registration_tokens WHERE token = $1")
                .bind(token)
                .fetch_optional(pool)
                .await?
        });
        Ok(row.map(|r| RegistrationTokenRow {
            token: r.0,
            uses_allowed: r.1,
            pending: r.2,
            completed: r.3,
            expiry_ts: r.4,
        }))
    }

    /// Records a UIA stage that used `token`, atomically taking one of its uses (as "pending" until
    /// the registration completes). False if the token is unknown, expired or used up.
    pub async fn reserve_registration_token(&self, session_id: &str, token: &str, now: i64) -> StorageResult<bool> {
        let reserved = on_writer!(self, pool => {
            let mut tx = pool.begin().await?;
            let taken = sqlx::query(
                "UPDATE registration_tokens SET pending = pending + 1
                 WHERE token = $1 AND (expiry_ts IS NULL OR expiry_ts > $2)
                   AND (uses_allowed IS NULL OR pending + completed < uses_allowed)",
            )
            .bind(token)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                > 0;
            if taken {
                sqlx::query("UPDATE uia_sessions SET registration_token = $1 WHERE session_id = $2")
                    .bind(token)
                    .bind(session_id)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            taken
        });
        Ok(reserved)
    }

    /// A registration that used `token` finished: its pending use becomes a completed one.
    pub async fn complete_registration_token(&self, token: &str) -> StorageResult<()> {
        on_writer!(self, pool => {
            sqlx::query("UPDATE registration_tokens SET pending = pending - 1, completed = completed + 1 WHERE token = $1")
                .bind(token)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    pub async fn create_uia_session(&self, session_id: &str, purpose: &str, now: i64) -> StorageResult<()> {
        on_writer!(self, pool => {
            sqlx::query("INSERT INTO uia_sessions (session_id, purpose, completed, created_ts) VALUES ($1, $2, '[]', $3)")
                .bind(session_id)
                .bind(purpose)
                .bind(now)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    pub async fn uia_session(&self, session_id: &str) -> StorageResult<Option<UiaSessionRow>> {
        type Row = (String, String, Option<String>, i64);
        let row: Option<Row> = on_reader!(self, pool => {
            sqlx::query_as("SELECT purpose, completed, registration_token, created_ts FROM uia_sessions WHERE session_id = $1")
                .bind(session_id)
                .fetch_optional(pool)
                .await?
        });
        row.map(|r| {
            Ok(UiaSessionRow {
                purpose: r.0,
                completed: serde_json::from_str(&r.1).map_err(|e| super::StorageError::Corrupt(e.to_string()))?,
                registration_token: r.2,
                created_ts: r.3,
            })
        })
        .transpose()
    }

    pub async fn set_uia_completed(&self, session_id: &str, completed: &[String]) -> StorageResult<()> {
        let completed = serde_json::to_string(completed).expect("a list of strings serialises");
        on_writer!(self, pool => {
            sqlx::query("UPDATE uia_sessions SET completed = $1 WHERE session_id = $2")
                .bind(completed)
                .bind(session_id)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Ends a session, returning the registration token it reserved (if any) for the caller to
    /// complete.
    pub async fn delete_uia_session(&self, session_id: &str) -> StorageResult<()> {
        on_writer!(self, pool => {
            sqlx::query("DELETE FROM uia_sessions WHERE session_id = $1").bind(session_id).execute(pool).await?;
        });
        Ok(())
    }

    /// Forgets abandoned sessions, releasing the registration-token uses they held.
    pub async fn expire_uia_sessions(&self, older_than_ts: i64) -> StorageResult<u64> {
        let removed = on_writer!(self, pool => {
            let mut tx = pool.begin().await?;
            let tokens: Vec<String> = sqlx::query_scalar(
                "SELECT registration_token FROM uia_sessions WHERE created_ts < $1 AND registration_token IS NOT NULL",
            )
            .bind(older_than_ts)
            .fetch_all(&mut *tx)
            .await?;
            for token in tokens {
                sqlx::query("UPDATE registration_tokens SET pending = pending - 1 WHERE token = $1 AND pending > 0")
                    .bind(token)
                    .execute(&mut *tx)
                    .await?;
            }
            let removed = sqlx::query("DELETE FROM uia_sessions WHERE created_ts < $1")
                .bind(older_than_ts)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            tx.commit().await?;
            removed
        });
        Ok(removed)
    }
}
