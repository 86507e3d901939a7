//! Pushers and the push sender's place in the event stream.

use ruma::{OwnedUserId, UserId};

use super::{Db, StorageResult, on_reader, on_writer, parse_id};

/// A stored pusher: its owner, keys, the device that set it and the pusher as clients see it.
#[derive(Debug, Clone)]
pub struct PusherRow {
    pub user_id: OwnedUserId,
    pub app_id: String,
    pub pushkey: String,
    pub device_id: Option<String>,
    pub pusher_json: String,
    pub pushkey_ts: i64,
}

type PusherTuple = (String, String, String, Option<String>, String, i64);
const PUSHER_COLUMNS: &str = "user_id, app_id, pushkey, device_id, pusher_json, pushkey_ts";

fn pusher_row(t: PusherTuple) -> StorageResult<PusherRow> {
    Ok(PusherRow {
        user_id: parse_id(t.0)?,
        app_id: t.1,
        pushkey: t.2,
        device_id: t.3,
        pusher_json: t.4,
        pushkey_ts: t.5,
    })
}

impl Db {
    /// Creates or replaces `row`'s pusher. Unless `append`, the same (app, pushkey) of other
    /// users goes (a device handed to someone else stops getting the old owner's pushes).
    pub async fn set_pusher(&self, row: &PusherRow, append: bool) -> StorageResult<()> {
        on_writer!(self, pool => {
            let mut tx = pool.begin().await?;
            if !append {
                sqlx::query("DELETE FROM pushers WHERE app_id = $1 AND pushkey = $2 AND user_id <> $3")
                    .bind(&row.app_id)
                    .bind(&row.pushkey)
                    .bind(row.user_id.as_str())
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query(
                "INSERT INTO pushers (user_id, app_id, pushkey, device_id, pusher_json, pushkey_ts)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (app_id, pushkey, user_id) DO UPDATE SET device_id = EXCLUDED.device_id,
                    pusher_json = EXCLUDED.pusher_json, pushkey_ts = EXCLUDED.pushkey_ts",
            )
            .bind(row.user_id.as_str())
            .bind(&row.app_id)
            .bind(&row.pushkey)
            .bind(row.device_id.as_deref())
            .bind(&row.pusher_json)
            .bind(row.pushkey_ts)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Removes one pusher; whether there was one.
    pub async fn delete_pusher(&self, user_id: &UserId, app_id: &str, pushkey: &str) -> StorageResult<bool> {
        let done = on_writer!(self, pool => {
            sqlx::query("DELETE FROM pushers WHERE user_id = $1 AND app_id = $2 AND pushkey = $3")
                .bind(user_id.as_str())
                .bind(app_id)
                .bind(pushkey)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(done > 0)
    }

    pub async fn pushers(&self, user_id: &UserId) -> StorageResult<Vec<PusherRow>> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {PUSHER_COLUMNS} FROM pushers WHERE user_id = $1 ORDER BY app_id, pushkey"
        ));
        let rows: Vec<PusherTuple> = on_reader!(self, pool => {
            sqlx::query_as(sql).bind(user_id.as_str()).fetch_all(pool).await?
        });
        rows.into_iter().map(pusher_row).collect()
    }

    /// Every user with at least one pusher.
    pub async fn users_with_pushers(&self) -> StorageResult<Vec<OwnedUserId>> {
        let rows: Vec<String> = on_reader!(self, pool => {
            sqlx::query_scalar("SELECT DISTINCT user_id FROM pushers").fetch_all(pool).await?
        });
        rows.into_iter().map(parse_id).collect()
    }

    /// The push sender's last evaluated position, if it ever ran.
    pub async fn push_progress(&self) -> StorageResult<Option<i64>> {
        Ok(on_reader!(self, pool => {
            sqlx::query_scalar("SELECT pos FROM push_progress WHERE id = 1").fetch_optional(pool).await?
        }))
    }

    pub async fn set_push_progress(&self, pos: i64) -> StorageResult<()> {
        on_writer!(self, pool => {
            sqlx::query(
                "INSERT INTO push_progress (id, pos) VALUES (1, $1)
                 ON CONFLICT (id) DO UPDATE SET pos = EXCLUDED.pos",
            )
            .bind(pos)
            .execute(pool)
            .await?;
        });
        Ok(())
    }
}
