//! The durable half of the outbound EDU queue, the record of to-device messages received from
//! other servers, and the cache of remote users' device lists (migration 0011).

use ruma::UserId;

use super::{Db, StorageResult, on_reader, on_writer};

/// A queued EDU for one destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEduRow {
    pub id: i64,
    pub edu_json: String,
}

/// What we know of a remote user's devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteDeviceList {
    pub stream_id: i64,
    pub devices_json: String,
}

impl Db {
    /// Queues one EDU (JSON `{edu_type, content}`) for each destination, in one transaction.
    pub async fn enqueue_outbound_edu(&self, destinations: &[String], edu_json: &str, now: i64) -> StorageResult<()> {
        on_writer!(self, pool => {
            let mut tx = pool.begin().await?;
            for destination in destinations {
                sqlx::query("INSERT INTO federation_outbox_edus (destination, edu_json, queued_ts) VALUES ($1, $2, $3)")
                    .bind(destination)
                    .bind(edu_json)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// The oldest `limit` EDUs queued for `destination`, in queue order.
    pub async fn outbound_edu_batch(&self, destination: &str, limit: i64) -> StorageResult<Vec<OutboxEduRow>> {
        let rows: Vec<(i64, String)> = on_reader!(self, pool => {
            sqlx::query_as("SELECT id, edu_json FROM federation_outbox_edus WHERE destination = $1 ORDER BY id LIMIT $2")
                .bind(destination)
                .bind(limit)
                .fetch_all(pool)
                .await?
        });
        Ok(rows.into_iter().map(|(id, edu_json)| OutboxEduRow { id, edu_json }).collect())
    }

    /// Forgets the EDUs delivered to `destination`: its rows up to `last_id`.
    pub async fn delete_outbound_edus(&self, destination: &str, last_id: i64) -> StorageResult<()> {
        on_writer!(self, pool => {
            sqlx::query("DELETE FROM federation_outbox_edus WHERE destination = $1 AND id <= $2")
                .bind(destination)
                .bind(last_id)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Every destination with an EDU queued.
    pub async fn outbound_edu_destinations(&self) -> StorageResult<Vec<String>> {
        let rows: Vec<(String,)> = on_reader!(self, pool => {
            sqlx::query_as("SELECT DISTINCT destination FROM federation_outbox_edus").fetch_all(pool).await?
        });
        Ok(rows.into_iter().map(|(d,)| d).collect())
    }

    /// Records that `origin`'s to-device message `message_id` arrived; `false` when it had already.
    pub async fn record_inbound_to_device(&self, origin: &str, message_id: &str, now: i64) -> StorageResult<bool> {
        let inserted = on_writer!(self, pool => {
            sqlx::query(
                "INSERT INTO federation_inbound_to_device (origin, message_id, received_ts) VALUES ($1, $2, $3) \
                 ON CONFLICT (origin, message_id) DO NOTHING",
            )
            .bind(origin)
            .bind(message_id)
            .bind(now)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(inserted == 1)
    }

    /// Forgets the to-device message IDs recorded before `before_ts` (ms); how many went.
    pub async fn prune_inbound_to_device(&self, before_ts: i64) -> StorageResult<u64> {
        let pruned = on_writer!(self, pool => {
            sqlx::query("DELETE FROM federation_inbound_to_device WHERE received_ts < $1")
                .bind(before_ts)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(pruned)
    }

    /// Forgets a recorded to-device message (its delivery failed, so a resend must get through).
    pub async fn forget_inbound_to_device(&self, origin: &str, message_id: &str) -> StorageResult<()> {
        on_writer!(self, pool => {
            sqlx::query("DELETE FROM federation_inbound_to_device WHERE origin = $1 AND message_id = $2")
                .bind(origin)
                .bind(message_id)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// The position of `user_id`'s device-list change before `before` (0 when none): a
    /// `device_list_update`'s `prev_id`.
    pub async fn previous_device_list_change(&self, user_id: &UserId, before: i64) -> StorageResult<i64> {
        let pos: Option<i64> = on_reader!(self, pool => {
            sqlx::query_scalar("SELECT MAX(stream_pos) FROM device_list_changes WHERE user_id = $1 AND stream_pos < $2")
                .bind(user_id.as_str())
                .bind(before)
                .fetch_one(pool)
                .await?
        });
        Ok(pos.unwrap_or(0))
    }

    /// The cached device list of a remote user.
    pub async fn remote_device_list(&self, user_id: &UserId) -> StorageResult<Option<RemoteDeviceList>> {
        let row: Option<(i64, String)> = on_reader!(self, pool => {
            sqlx::query_as("SELECT stream_id, devices_json FROM remote_device_lists WHERE user_id = $1")
                .bind(user_id.as_str())
                .fetch_optional(pool)
                .await?
        });
        Ok(row.map(|(stream_id, devices_json)| RemoteDeviceList { stream_id, devices_json }))
    }

    /// Stores a remote user's device list as of `stream_id`.
    pub async fn store_remote_device_list(
        &self,
        user_id: &UserId,
        list: &RemoteDeviceList,
        now: i64,
    ) -> StorageResult<()> {
        on_writer!(self, pool => {
            sqlx::query(
                "INSERT INTO remote_device_lists (user_id, stream_id, devices_json, updated_ts) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (user_id) DO UPDATE SET stream_id = excluded.stream_id, \
                 devices_json = excluded.devices_json, updated_ts = excluded.updated_ts",
            )
            .bind(user_id.as_str())
            .bind(list.stream_id)
            .bind(&list.devices_json)
            .bind(now)
            .execute(pool)
            .await?;
        });
        Ok(())
    }
}
