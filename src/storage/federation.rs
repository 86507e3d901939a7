//! The outbound federation queue and the record of transactions received (migration 0008).

use super::{Db, StorageResult, on_reader, on_writer};

/// A queued PDU for one destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub id: i64,
    pub event_id: String,
    pub pdu_json: String,
}

impl Db {
    /// Queues one PDU (of `room_id`) for each destination, in one transaction.
    pub async fn enqueue_outbound(
        &self,
        destinations: &[String],
        room_id: Option<&str>,
        event_id: &str,
        pdu_json: &str,
        now: i64,
    ) -> StorageResult<()> {
        on_writer!(self, pool => {
            let mut tx = pool.begin().await?;
            for destination in destinations {
                sqlx::query(
                    "INSERT INTO federation_outbox (destination, room_id, event_id, pdu_json, queued_ts) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(destination)
                .bind(room_id)
                .bind(event_id)
                .bind(pdu_json)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// The oldest `limit` PDUs queued for `destination`, in queue order.
    pub async fn outbound_batch(&self, destination: &str, limit: i64) -> StorageResult<Vec<OutboxRow>> {
        let rows: Vec<(i64, String, String)> = on_reader!(self, pool => {
            sqlx::query_as(
                "SELECT id, event_id, pdu_json FROM federation_outbox WHERE destination = $1 \
                 ORDER BY id LIMIT $2",
            )
            .bind(destination)
            .bind(limit)
            .fetch_all(pool)
            .await?
        });
        Ok(rows.into_iter().map(|(id, event_id, pdu_json)| OutboxRow { id, event_id, pdu_json }).collect())
    }

    /// Forgets what was delivered to `destination`: its rows up to `last_id`.
    pub async fn delete_outbound(&self, destination: &str, last_id: i64) -> StorageResult<()> {
        on_writer!(self, pool => {
            sqlx::query("DELETE FROM federation_outbox WHERE destination = $1 AND id <= $2")
                .bind(destination)
                .bind(last_id)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// How many PDUs are queued for `destination`.
    pub async fn outbound_count(&self, destination: &str) -> StorageResult<i64> {
        let (count,): (i64,) = on_reader!(self, pool => {
            sqlx::query_as("SELECT COUNT(*) FROM federation_outbox WHERE destination = $1")
                .bind(destination)
                .fetch_one(pool)
                .await?
        });
        Ok(count)
    }

    /// Keeps of `destination`'s queue only the newest PDU of each room (rows without a room are
    /// kept); how many rows went.
    pub async fn compact_outbound(&self, destination: &str) -> StorageResult<u64> {
        let done = on_writer!(self, pool => {
            sqlx::query(
                "DELETE FROM federation_outbox WHERE destination = $1 AND room_id IS NOT NULL AND id NOT IN \
                 (SELECT MAX(id) FROM federation_outbox WHERE destination = $1 AND room_id IS NOT NULL GROUP BY room_id)",
            )
            .bind(destination)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(done)
    }

    /// Every destination with something queued.
    pub async fn outbound_destinations(&self) -> StorageResult<Vec<String>> {
        let rows: Vec<(String,)> = on_reader!(self, pool => {
            sqlx::query_as("SELECT DISTINCT destination FROM federation_outbox").fetch_all(pool).await?
        });
        Ok(rows.into_iter().map(|(d,)| d).collect())
    }

    /// Our answer to a transaction already received from `origin`.
    pub async fn inbound_txn(&self, origin: &str, txn_id: &str) -> StorageResult<Option<String>> {
        let row: Option<(String,)> = on_writer!(self, pool => {
            // From the writer: an answer recorded a moment ago must be seen.
            sqlx::query_as("SELECT response_json FROM federation_inbound_txns WHERE origin = $1 AND txn_id = $2")
                .bind(origin)
                .bind(txn_id)
                .fetch_optional(pool)
                .await?
        });
        Ok(row.map(|(json,)| json))
    }

    /// Forgets the answers to transactions received before `before_ts` (ms); how many.
    pub async fn prune_inbound_txns(&self, before_ts: i64) -> StorageResult<u64> {
        let deleted = on_writer!(self, pool => {
            sqlx::query("DELETE FROM federation_inbound_txns WHERE received_ts < $1")
                .bind(before_ts)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(deleted)
    }

    /// Records our answer to a transaction (the first answer stays).
    pub async fn record_inbound_txn(
        &self,
        origin: &str,
        txn_id: &str,
        response_json: &str,
        now: i64,
    ) -> StorageResult<()> {
        on_writer!(self, pool => {
            sqlx::query(
                "INSERT INTO federation_inbound_txns (origin, txn_id, response_json, received_ts) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (origin, txn_id) DO NOTHING",
            )
            .bind(origin)
            .bind(txn_id)
            .bind(response_json)
            .bind(now)
            .execute(pool)
            .await?;
        });
        Ok(())
    }
}
