//! Server-side room key backups (`/room_keys/…`): versions with their algorithm and auth data,
//! and per-session encrypted keys, replaced only by a key the spec prefers. The server cannot
//! read any of it; it keeps versions apart and the etag moving so clients notice changes.

use std::collections::BTreeMap;

use ruma::UserId;
use serde_json::Value;

use super::E2ee;
use crate::{
    error::{Error, Result},
    storage::e2e::BackupKey,
};

/// A backup version as `GET /room_keys/version` shows it.
#[derive(Debug)]
pub struct BackupInfo {
    pub version: String,
    pub algorithm: String,
    pub auth_data: Value,
    pub etag: String,
    pub count: u64,
}

/// Versions are decimal numbers; anything else names no version.
fn parse_version(version: &str) -> Result<i64> {
    version
        .parse::<i64>()
        .ok()
        .filter(|v| *v > 0 && version.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| Error::not_found("Unknown backup version"))
}

/// The algorithm and auth data of a version body (`{"algorithm": …, "auth_data": {…}}`).
fn algorithm_of(body: &Value) -> Result<(String, &Value)> {
    let algorithm = body
        .get("algorithm")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::BadJson("algorithm must be a string".to_owned()))?;
    let auth_data = body
        .get("auth_data")
        .filter(|a| a.is_object())
        .ok_or_else(|| Error::BadJson("auth_data must be an object".to_owned()))?;
    Ok((algorithm.to_owned(), auth_data))
}

/// One session's uploaded key data.
fn backup_key(room_id: &str, session_id: &str, data: &Value) -> Result<BackupKey> {
    let number = |field: &str| {
        data.get(field)
            .and_then(Value::as_i64)
            .filter(|n| *n >= 0)
            .ok_or_else(|| Error::BadJson(format!("{field} must be a non-negative integer")))
    };
    let session_data = data
        .get("session_data")
        .filter(|s| s.is_object())
        .ok_or_else(|| Error::BadJson("session_data must be an object".to_owned()))?;
    Ok(BackupKey {
        room_id: room_id.to_owned(),
        session_id: session_id.to_owned(),
        first_message_index: number("first_message_index")?,
        forwarded_count: number("forwarded_count")?,
        is_verified: data
            .get("is_verified")
            .and_then(Value::as_bool)
            .ok_or_else(|| Error::BadJson("is_verified must be a boolean".to_owned()))?,
        session_data: session_data.to_string(),
    })
}

/// A stored key in the form clients upload it.
pub fn key_json(key: &BackupKey) -> Value {
    let session_data: Value = serde_json::from_str(&key.session_data).unwrap_or_default();
    serde_json::json!({
        "first_message_index": key.first_message_index,
        "forwarded_count": key.forwarded_count,
        "is_verified": key.is_verified,
        "session_data": session_data,
    })
}

impl E2ee {
    /// `POST /room_keys/version`: a new version, which becomes the current one.
    pub async fn create_backup(&self, user: &UserId, body: &Value) -> Result<String> {
        let (algorithm, auth_data) = algorithm_of(body)?;
        let version = self.db.create_backup_version(user, &algorithm, &auth_data.to_string()).await?;
        Ok(version.to_string())
    }

    /// `GET /room_keys/version[/{version}]`.
    pub async fn backup_info(&self, user: &UserId, version: Option<&str>) -> Result<BackupInfo> {
        let version = version.map(parse_version).transpose()?;
        let row = self.db.backup_version(user, version).await?.ok_or_else(|| {
            Error::not_found(if version.is_some() { "Unknown backup version" } else { "No current backup version" })
        })?;
        Ok(BackupInfo {
            version: row.version.to_string(),
            algorithm: row.algorithm,
            auth_data: serde_json::from_str(&row.auth_data).unwrap_or_default(),
            etag: row.etag.to_string(),
            count: u64::try_from(row.count).unwrap_or(0),
        })
    }

    /// `PUT /room_keys/version/{version}`: new auth data; the algorithm cannot change.
    pub async fn update_backup(&self, user: &UserId, version: &str, body: &Value) -> Result<()> {
        let number = parse_version(version)?;
        let (algorithm, auth_data) = algorithm_of(body)?;
        if let Some(given) = body.get("version")
            && given.as_str() != Some(version)
        {
            return Err(Error::InvalidParam("The version in the body does not match the path".to_owned()));
        }
        let current = self
            .db
            .backup_version(user, Some(number))
            .await?
            .ok_or_else(|| Error::not_found("Unknown backup version"))?;
        if current.algorithm != algorithm {
            return Err(Error::InvalidParam("A backup version's algorithm cannot be changed".to_owned()));
        }
        if !self.db.update_backup_version(user, number, &auth_data.to_string()).await? {
            return Err(Error::not_found("Unknown backup version"));
        }
        Ok(())
    }

    /// `DELETE /room_keys/version/{version}`: the version and its keys.
    pub async fn delete_backup(&self, user: &UserId, version: &str) -> Result<()> {
        if !self.db.delete_backup_version(user, parse_version(version)?).await? {
            return Err(Error::not_found("Unknown backup version"));
        }
        Ok(())
    }

    /// The version a key upload names must be the current one.
    async fn current_backup(&self, user: &UserId, version: &str) -> Result<i64> {
        let current = self.db.backup_version(user, None).await?;
        let number = parse_version(version)?;
        match current {
            Some(current) if current.version == number => Ok(number),
            Some(current) => Err(Error::WrongRoomKeysVersion { current_version: Some(current.version.to_string()) }),
            None => Err(Error::not_found("Unknown backup version")),
        }
    }

    /// `PUT /room_keys/keys[/{roomId}[/{sessionId}]]`: room → session → key data. Returns the
    /// version's (etag, count) after the upload.
    pub async fn put_backup_keys(
        &self,
        user: &UserId,
        version: &str,
        rooms: &BTreeMap<String, BTreeMap<String, Value>>,
    ) -> Result<(String, u64)> {
        let number = self.current_backup(user, version).await?;
        let mut keys = Vec::new();
        for (room_id, sessions) in rooms {
            for (session_id, data) in sessions {
                keys.push(backup_key(room_id, session_id, data)?);
            }
        }
        let (etag, count) = self.db.put_backup_keys(user, number, &keys).await?;
        Ok((etag.to_string(), u64::try_from(count).unwrap_or(0)))
    }

    /// `GET /room_keys/keys[/{roomId}[/{sessionId}]]` of an existing version.
    pub async fn backup_keys(
        &self,
        user: &UserId,
        version: &str,
        room_id: Option<&str>,
        session_id: Option<&str>,
    ) -> Result<Vec<BackupKey>> {
        let number = parse_version(version)?;
        if self.db.backup_version(user, Some(number)).await?.is_none() {
            return Err(Error::not_found("Unknown backup version"));
        }
        Ok(self.db.backup_keys(user, number, room_id, session_id).await?)
    }

    /// `DELETE /room_keys/keys[/{roomId}[/{sessionId}]]`. Returns the version's (etag, count).
    pub async fn delete_backup_keys(
        &self,
        user: &UserId,
        version: &str,
        room_id: Option<&str>,
        session_id: Option<&str>,
    ) -> Result<(String, u64)> {
        let number = parse_version(version)?;
        if self.db.backup_version(user, Some(number)).await?.is_none() {
            return Err(Error::not_found("Unknown backup version"));
        }
        let (etag, count) = self.db.delete_backup_keys(user, number, room_id, session_id).await?;
        Ok((etag.to_string(), u64::try_from(count).unwrap_or(0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_positive_decimal_numbers() {
        assert_eq!(parse_version("12").unwrap(), 12);
        for bad in ["", "0", "-1", "+3", "1e3", "abc", "99999999999999999999"] {
            assert!(parse_version(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn key_data_needs_its_fields() {
        let good = serde_json::json!({"first_message_index": 1, "forwarded_count": 0, "is_verified": true,
                                      "session_data": {"ciphertext": "x"}});
        let key = backup_key("!r:x", "s", &good).unwrap();
        assert_eq!(key_json(&key), good);
        for field in ["first_message_index", "forwarded_count", "is_verified", "session_data"] {
            let mut bad = good.clone();
            bad.as_object_mut().unwrap().remove(field);
            assert!(backup_key("!r:x", "s", &bad).is_err(), "{field}");
        }
    }
}
