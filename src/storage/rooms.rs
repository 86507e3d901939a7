//! Rooms aggregate: room rows, events, state groups, current state, memberships and aliases.
//!
//! Events, state and memberships are written only in `storage::stream`, in the transactions of
//! the stream writer, so that positions and rows always commit together; what this file writes
//! (directory visibility, forgetting a room, aliases) carries no stream position.

use ruma::{EventId, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId};

use super::{Db, StorageResult, on_reader, on_writer, parse_id};

#[derive(Debug, Clone)]
pub struct RoomRow {
    pub room_id: OwnedRoomId,
    pub room_version: String,
    pub creator: OwnedUserId,
    pub is_public: bool,
    pub created_ts: i64,
}

/// An event as stored, with its position and bookkeeping.
#[derive(Debug, Clone)]
pub struct EventRow {
    pub stream_pos: i64,
    pub event_id: OwnedEventId,
    pub room_id: OwnedRoomId,
    pub json: String,
    pub redacted_by: Option<OwnedEventId>,
    pub soft_failed: bool,
    pub state_before: i64,
    pub state_after: i64,
    pub replaces_state: Option<OwnedEventId>,
}

const EVENT_COLUMNS: &str =
    "stream_pos, event_id, room_id, json, redacted_by, soft_failed, state_before, state_after, replaces_state";
type EventTuple = (i64, String, String, String, Option<String>, bool, i64, i64, Option<String>);

fn event_row(t: EventTuple) -> StorageResult<EventRow> {
    Ok(EventRow {
        stream_pos: t.0,
        event_id: parse_id(t.1)?,
        room_id: parse_id(t.2)?,
        json: t.3,
        redacted_by: t.4.map(parse_id).transpose()?,
        soft_failed: t.5,
        state_before: t.6,
        state_after: t.7,
        replaces_state: t.8.map(parse_id).transpose()?,
    })
}

/// What a room's writer needs to resume: the forward extremities and the current state.
#[derive(Debug, Clone, Default)]
pub struct RoomTip {
    /// The forward extremities with their depths.
    pub forward_extremities: Vec<(OwnedEventId, i64)>,
    /// The current state group and its chain length.
    pub state_group: i64,
    pub state_chain_len: i64,
    pub current_state: Vec<(String, String, OwnedEventId)>,
}

/// An event stored as an outlier (no place in the timeline).
#[derive(Debug, Clone)]
pub struct OutlierRow {
    pub event_id: OwnedEventId,
    pub room_id: OwnedRoomId,
    pub event_type: String,
    pub state_key: Option<String>,
    pub json: String,
}

/// What is kept of a rejected event.
#[derive(Debug, Clone)]
pub struct RejectedRow {
    pub event_id: OwnedEventId,
    pub room_id: OwnedRoomId,
    pub reason: String,
    /// The state before it, when it was known.
    pub state_group: Option<i64>,
    pub depth: i64,
    pub json: String,
}

/// Outliers written per transaction: a join brings thousands, and each chunk holds the (SQLite)
/// writer connection only briefly, so other rooms' commits go in between.
pub const OUTLIERS_PER_COMMIT: usize = 200;

#[derive(Debug, Clone)]
pub struct StateGroupRow {
    pub prev_group: Option<i64>,
    pub chain_len: i64,
    pub entries: Vec<(String, String, OwnedEventId)>,
}

#[derive(Debug, Clone)]
pub struct MembershipRow {
    pub room_id: OwnedRoomId,
    pub user_id: OwnedUserId,
    pub membership: String,
    pub event_id: OwnedEventId,
    pub stream_pos: i64,
    pub sender: OwnedUserId,
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
    pub forgotten: bool,
}

const MEMBERSHIP_COLUMNS: &str =
    "room_id, user_id, membership, event_id, stream_pos, sender, displayname, avatar_url, forgotten";
type MembershipTuple = (String, String, String, String, i64, String, Option<String>, Option<String>, bool);

fn membership_row(t: MembershipTuple) -> StorageResult<MembershipRow> {
    Ok(MembershipRow {
        room_id: parse_id(t.0)?,
        user_id: parse_id(t.1)?,
        membership: t.2,
        event_id: parse_id(t.3)?,
        stream_pos: t.4,
        sender: parse_id(t.5)?,
        displayname: t.6,
        avatar_url: t.7,
        forgotten: t.8,
    })
}

/// Raw parts of a room tip: extremities with depths, the latest current-state group, current
/// state rows, chain length of that group.
type TipParts = (Vec<(String, i64)>, Option<i64>, Vec<(String, String, String)>, Option<i64>);
/// Raw parts of a state group: (prev_group, chain_len) and its entries.
type GroupParts = (Option<(Option<i64>, i64)>, Vec<(String, String, String)>);

/// IDs per `IN (…)` list (well under both engines' bound-parameter limits, the list appearing
/// twice in some queries).
const ENTRIES_PER_QUERY: usize = 200;

/// A place in a room's topological order — depth, then stream position — between events: the
/// point just after the event at (`depth`, `stream`), whether or not one is there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TopoPos {
    pub depth: i64,
    pub stream: i64,
}

impl TopoPos {
    /// Before every event.
    pub const START: TopoPos = TopoPos { depth: i64::MIN, stream: i64::MIN };
    /// After every event.
    pub const END: TopoPos = TopoPos { depth: i64::MAX, stream: i64::MAX };
}

/// Direction of a range read over a room's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Forward,
    Backward,
}

impl Db {
    pub async fn room(&self, room_id: &RoomId) -> StorageResult<Option<RoomRow>> {
        type Row = (String, String, String, bool, i64);
        let row: Option<Row> = on_reader!(self, pool => {
            sqlx::query_as("SELECT room_id, room_version, creator, is_public, created_ts FROM rooms WHERE room_id = $1")
                .bind(room_id.as_str())
                .fetch_optional(pool)
                .await?
        });
        row.map(|r| {
            Ok(RoomRow {
                room_id: parse_id(r.0)?,
                room_version: r.1,
                creator: parse_id(r.2)?,
                is_public: r.3,
                created_ts: r.4,
            })
        })
        .transpose()
    }

    pub async fn public_room_ids(&self) -> StorageResult<Vec<OwnedRoomId>> {
        let rows: Vec<String> = on_reader!(self, pool => {
            sqlx::query_scalar("SELECT room_id FROM rooms WHERE is_public ORDER BY created_ts").fetch_all(pool).await?
        });
        rows.into_iter().map(parse_id).collect()
    }

    pub async fn set_room_public(&self, room_id: &RoomId, is_public: bool) -> StorageResult<()> {
        on_writer!(self, pool => {
            sqlx::query("UPDATE rooms SET is_public = $1 WHERE room_id = $2")
                .bind(is_public)
                .bind(room_id.as_str())
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// The DAG tip and current state of a room, for its writer.
    pub async fn room_tip(&self, room_id: &RoomId) -> StorageResult<RoomTip> {
        let room = room_id.as_str();
        let (extremities, group, state, chain): TipParts = on_reader!(self, pool => {
            let mut conn = pool.acquire().await?;
            let extremities: Vec<(String, i64)> = sqlx::query_as(
                "SELECT f.event_id, COALESCE(e.depth, 0) FROM room_forward_extremities f
                 LEFT JOIN events e ON e.event_id = f.event_id WHERE f.room_id = $1 ORDER BY f.event_id",
            )
            .bind(room)
            .fetch_all(&mut *conn)
            .await?;
            let group: Option<i64> = sqlx::query_scalar(
                "SELECT state_group FROM room_state_changes WHERE room_id = $1 ORDER BY stream_pos DESC LIMIT 1",
            )
            .bind(room)
            .fetch_optional(&mut *conn)
            .await?;
            let state: Vec<(String, String, String)> = sqlx::query_as(
                "SELECT event_type, state_key, event_id FROM room_current_state WHERE room_id = $1",
            )
            .bind(room)
            .fetch_all(&mut *conn)
            .await?;
            let chain: Option<i64> = match group {
                Some(group) => sqlx::query_scalar("SELECT chain_len FROM state_groups WHERE id = $1")
                    .bind(group)
                    .fetch_optional(&mut *conn)
                    .await?,
                None => None,
            };
            (extremities, group, state, chain)
        });
        Ok(RoomTip {
            forward_extremities: extremities
                .into_iter()
                .map(|(id, depth)| Ok((parse_id(id)?, depth)))
                .collect::<StorageResult<_>>()?,
            state_group: group.unwrap_or(0),
            state_chain_len: chain.unwrap_or(0),
            current_state: state.into_iter().map(|(t, k, e)| Ok((t, k, parse_id(e)?))).collect::<StorageResult<_>>()?,
        })
    }

    /// Events by ID, from the timeline and the outliers alike, as (event ID, room ID, JSON):
    /// what the checks on receipt and state resolution read (never served to clients).
    pub async fn pdus(&self, event_ids: &[&EventId]) -> StorageResult<Vec<(OwnedEventId, OwnedRoomId, String)>> {
        let mut found = Vec::with_capacity(event_ids.len());
        for chunk in event_ids.chunks(ENTRIES_PER_QUERY) {
            let placeholders = (1..=chunk.len()).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
            let sql = sqlx::AssertSqlSafe(format!(
                "SELECT event_id, room_id, json FROM events WHERE event_id IN ({placeholders})
                 UNION ALL SELECT event_id, room_id, json FROM outliers WHERE event_id IN ({placeholders})"
            ));
            let rows: Vec<(String, String, String)> = on_reader!(self, pool => {
                let mut query = sqlx::query_as(sql);
                for id in chunk {
                    query = query.bind(id.as_str());
                }
                query.fetch_all(pool).await?
            });
            for (id, room, json) in rows {
                found.push((parse_id(id)?, parse_id(room)?, json));
            }
        }
        Ok(found)
    }

    /// Whether an event is stored as an outlier.
    pub async fn is_outlier(&self, event_id: &EventId) -> StorageResult<bool> {
        let row: Option<i64> = on_reader!(self, pool => {
            sqlx::query_scalar("SELECT CAST(1 AS BIGINT) FROM outliers WHERE event_id = $1")
                .bind(event_id.as_str())
                .fetch_optional(pool)
                .await?
        });
        Ok(row.is_some())
    }

    /// Stores outliers (no stream position: they are in no timeline), skipping known ones, in
    /// transactions of [`OUTLIERS_PER_COMMIT`]. Events already in the timeline are not copied.
    pub async fn store_outliers(&self, rows: &[OutlierRow], now: i64) -> StorageResult<()> {
        for chunk in rows.chunks(OUTLIERS_PER_COMMIT) {
            on_writer!(self, pool => {
                let mut tx = pool.begin().await?;
                for row in chunk {
                    sqlx::query(
                        "INSERT INTO outliers (event_id, room_id, event_type, state_key, json, received_ts)
                         SELECT $1, $2, $3, $4, $5, $6 WHERE NOT EXISTS (SELECT 1 FROM events WHERE event_id = $1)
                         ON CONFLICT (event_id) DO NOTHING",
                    )
                    .bind(row.event_id.as_str())
                    .bind(row.room_id.as_str())
                    .bind(&row.event_type)
                    .bind(row.state_key.as_deref())
                    .bind(&row.json)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
            });
        }
        Ok(())
    }

    /// Records a rejected event (no stream position: it is never served or used).
    pub async fn record_rejected(&self, row: &RejectedRow, now: i64) -> StorageResult<()> {
        on_writer!(self, pool => {
            sqlx::query(
                "INSERT INTO rejected_events (event_id, room_id, reason, state_group, depth, json, rejected_ts)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (event_id) DO NOTHING",
            )
            .bind(row.event_id.as_str())
            .bind(row.room_id.as_str())
            .bind(&row.reason)
            .bind(row.state_group)
            .bind(row.depth)
            .bind(&row.json)
            .bind(now)
            .execute(pool)
            .await?;
            // A missing event that turns out rejected is no gap: nothing is missing there.
            sqlx::query("DELETE FROM room_backward_extremities WHERE missing_id = $1")
                .bind(row.event_id.as_str())
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// A rejected event, if this one was.
    pub async fn rejected(&self, event_id: &EventId) -> StorageResult<Option<RejectedRow>> {
        type Row = (String, String, String, Option<i64>, i64, String);
        let row: Option<Row> = on_reader!(self, pool => {
            sqlx::query_as(
                "SELECT event_id, room_id, reason, state_group, depth, json FROM rejected_events WHERE event_id = $1",
            )
            .bind(event_id.as_str())
            .fetch_optional(pool)
            .await?
        });
        row.map(|r| {
            Ok(RejectedRow {
                event_id: parse_id(r.0)?,
                room_id: parse_id(r.1)?,
                reason: r.2,
                state_group: r.3,
                depth: r.4,
                json: r.5,
            })
        })
        .transpose()
    }

    /// The redactions recorded for `target` (which may have arrived after them).
    pub async fn redactions_of(&self, target: &EventId) -> StorageResult<Vec<OwnedEventId>> {
        let rows: Vec<String> = on_reader!(self, pool => {
            sqlx::query_scalar("SELECT redaction_id FROM redactions WHERE target_id = $1 ORDER BY redaction_id")
                .bind(target.as_str())
                .fetch_all(pool)
                .await?
        });
        rows.into_iter().map(parse_id).collect()
    }

    /// An event by ID: from the timeline, else an outlier (stream position 0, state groups 0).
    pub async fn event(&self, event_id: &EventId) -> StorageResult<Option<EventRow>> {
        let sql = sqlx::AssertSqlSafe(format!("SELECT {EVENT_COLUMNS} FROM events WHERE event_id = $1"));
        let row: Option<EventTuple> = on_reader!(self, pool => {
            let mut conn = pool.acquire().await?;
            match sqlx::query_as(sql).bind(event_id.as_str()).fetch_optional(&mut *conn).await? {
                Some(row) => Some(row),
                None => sqlx::query_as(
                    "SELECT CAST(0 AS BIGINT), event_id, room_id, json, CAST(NULL AS TEXT), FALSE, CAST(0 AS BIGINT),
                        CAST(0 AS BIGINT), CAST(NULL AS TEXT) FROM outliers WHERE event_id = $1",
                )
                .bind(event_id.as_str())
                .fetch_optional(&mut *conn)
                .await?,
            }
        });
        row.map(event_row).transpose()
    }

    pub async fn event_at(&self, stream_pos: i64) -> StorageResult<Option<EventRow>> {
        let sql = sqlx::AssertSqlSafe(format!("SELECT {EVENT_COLUMNS} FROM events WHERE stream_pos = $1"));
        let row: Option<EventTuple> = on_reader!(self, pool => {
            sqlx::query_as(sql).bind(stream_pos).fetch_optional(pool).await?
        });
        row.map(event_row).transpose()
    }

    /// The events at these stream positions (those that exist), in no particular order.
    pub async fn events_at(&self, positions: &[i64]) -> StorageResult<Vec<EventRow>> {
        if positions.is_empty() {
            return Ok(Vec::new());
        }
        let list = (1..=positions.len()).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
        let sql = sqlx::AssertSqlSafe(format!("SELECT {EVENT_COLUMNS} FROM events WHERE stream_pos IN ({list})"));
        let rows: Vec<EventTuple> = on_reader!(self, pool => {
            let mut query = sqlx::query_as(sql);
            for pos in positions {
                query = query.bind(*pos);
            }
            query.fetch_all(pool).await?
        });
        rows.into_iter().map(event_row).collect()
    }

    /// A room's events with `after < stream_pos <= upto`, in `dir` order, at most `limit`.
    /// Soft-failed events are never returned.
    pub async fn room_events(
        &self,
        room_id: &RoomId,
        after: i64,
        upto: i64,
        dir: Dir,
        limit: i64,
    ) -> StorageResult<Vec<EventRow>> {
        let order = if dir == Dir::Forward { "ASC" } else { "DESC" };
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM events
             WHERE room_id = $1 AND stream_pos > $2 AND stream_pos <= $3 AND NOT soft_failed
             ORDER BY stream_pos {order} LIMIT $4"
        ));
        let rows: Vec<EventTuple> = on_reader!(self, pool => {
            sqlx::query_as(sql).bind(room_id.as_str()).bind(after).bind(upto).bind(limit).fetch_all(pool).await?
        });
        rows.into_iter().map(event_row).collect()
    }

    /// A room's events whose topological position lies in `(after, upto]` and whose stream
    /// position is at most `max_stream` (a reader's bound), in `dir` order, at most `limit`.
    /// Soft-failed events are never returned.
    pub async fn room_events_topological(
        &self,
        room_id: &RoomId,
        after: TopoPos,
        upto: TopoPos,
        max_stream: i64,
        dir: Dir,
        limit: i64,
    ) -> StorageResult<Vec<EventRow>> {
        let order = if dir == Dir::Forward { "ASC" } else { "DESC" };
        // Row values compare lexicographically on both engines: (depth, stream_pos) is the order.
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM events
             WHERE room_id = $1 AND (depth, stream_pos) > ($2, $3) AND (depth, stream_pos) <= ($4, $5)
               AND stream_pos <= $6 AND NOT soft_failed
             ORDER BY depth {order}, stream_pos {order} LIMIT $7"
        ));
        let rows: Vec<EventTuple> = on_reader!(self, pool => {
            sqlx::query_as(sql)
                .bind(room_id.as_str())
                .bind(after.depth)
                .bind(after.stream)
                .bind(upto.depth)
                .bind(upto.stream)
                .bind(max_stream)
                .bind(limit)
                .fetch_all(pool)
                .await?
        });
        rows.into_iter().map(event_row).collect()
    }

    /// A room's backward extremities: timeline events with prev events we do not hold, and
    /// those prev events, deepest first (at most `limit` rows).
    pub async fn backward_extremities(
        &self,
        room_id: &RoomId,
        limit: i64,
    ) -> StorageResult<Vec<(OwnedEventId, OwnedEventId)>> {
        let rows: Vec<(String, String)> = on_reader!(self, pool => {
            sqlx::query_as(
                "SELECT b.event_id, b.missing_id FROM room_backward_extremities b
                 JOIN events e ON e.event_id = b.event_id
                 WHERE b.room_id = $1 ORDER BY e.depth DESC, e.stream_pos DESC, b.missing_id LIMIT $2",
            )
            .bind(room_id.as_str())
            .bind(limit)
            .fetch_all(pool)
            .await?
        });
        rows.into_iter().map(|(event, missing)| Ok((parse_id(event)?, parse_id(missing)?))).collect()
    }

    /// Whether any of `event_ids` is a backward extremity (history below it is missing).
    pub async fn has_backward_extremity(&self, event_ids: &[&EventId]) -> StorageResult<bool> {
        for chunk in event_ids.chunks(ENTRIES_PER_QUERY) {
            let placeholders = (1..=chunk.len()).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
            let sql = sqlx::AssertSqlSafe(format!(
                "SELECT event_id FROM room_backward_extremities WHERE event_id IN ({placeholders}) LIMIT 1"
            ));
            let row: Option<String> = on_reader!(self, pool => {
                let mut query = sqlx::query_scalar(sql);
                for id in chunk {
                    query = query.bind(id.as_str());
                }
                query.fetch_optional(pool).await?
            });
            if row.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The topological position of stream position `stream` in a room: the greatest depth of its
    /// events at or before it, with `stream` (Synapse's `get_current_topological_token`).
    pub async fn topological_at_stream(&self, room_id: &RoomId, stream: i64) -> StorageResult<TopoPos> {
        let depth: Option<i64> = on_reader!(self, pool => {
            sqlx::query_scalar("SELECT MAX(depth) FROM events WHERE room_id = $1 AND stream_pos <= $2")
                .bind(room_id.as_str())
                .bind(stream)
                .fetch_one(pool)
                .await?
        });
        Ok(TopoPos { depth: depth.unwrap_or(0), stream })
    }

    /// The events of a room in `(after, upto]`, newest first, that push rules could make notify
    /// `user`: other people's membership changes never do, so they are left out (a big room's
    /// join flood would otherwise be evaluated for every member).
    pub async fn room_events_for_push(
        &self,
        room_id: &RoomId,
        user: &UserId,
        after: i64,
        upto: i64,
        limit: i64,
    ) -> StorageResult<Vec<EventRow>> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM events
             WHERE room_id = $1 AND stream_pos > $2 AND stream_pos <= $3 AND NOT soft_failed AND sender <> $4
               AND NOT (event_type = 'm.room.member' AND state_key <> $4)
             ORDER BY stream_pos DESC LIMIT $5"
        ));
        let rows: Vec<EventTuple> = on_reader!(self, pool => {
            sqlx::query_as(sql).bind(room_id.as_str()).bind(after).bind(upto).bind(user.as_str()).bind(limit).fetch_all(pool).await?
        });
        rows.into_iter().map(event_row).collect()
    }

    /// Events of every room with `after < stream_pos <= upto`, oldest first, at most `limit`
    /// (the push sender's read of the stream). Soft-failed events are never returned.
    pub async fn events_between(&self, after: i64, upto: i64, limit: i64) -> StorageResult<Vec<EventRow>> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM events
             WHERE stream_pos > $1 AND stream_pos <= $2 AND NOT soft_failed
             ORDER BY stream_pos LIMIT $3"
        ));
        let rows: Vec<EventTuple> = on_reader!(self, pool => {
            sqlx::query_as(sql).bind(after).bind(upto).bind(limit).fetch_all(pool).await?
        });
        rows.into_iter().map(event_row).collect()
    }

    /// Events of `rooms` before `before` that `user` did not send, newest first, at most
    /// `limit` (`/notifications` evaluates them). Backfilled history is left out.
    pub async fn notifiable_events(
        &self,
        rooms: &[ruma::OwnedRoomId],
        user: &UserId,
        before: i64,
        limit: i64,
    ) -> StorageResult<Vec<EventRow>> {
        if rooms.is_empty() {
            return Ok(Vec::new());
        }
        let mut rows = Vec::new();
        for chunk in rooms.chunks(ENTRIES_PER_QUERY) {
            let list = (0..chunk.len()).map(|i| format!("${}", i + 4)).collect::<Vec<_>>().join(", ");
            let sql = sqlx::AssertSqlSafe(format!(
                "SELECT {EVENT_COLUMNS} FROM events
                 WHERE stream_pos > 0 AND stream_pos < $1 AND sender <> $2 AND NOT soft_failed AND room_id IN ({list})
                 ORDER BY stream_pos DESC LIMIT $3"
            ));
            let chunk_rows: Vec<EventTuple> = on_reader!(self, pool => {
                let mut query = sqlx::query_as(sql).bind(before).bind(user.as_str()).bind(limit);
                for room in chunk {
                    query = query.bind(room.as_str());
                }
                query.fetch_all(pool).await?
            });
            rows.extend(chunk_rows);
        }
        rows.sort_by_key(|row| std::cmp::Reverse(row.0));
        rows.truncate(limit as usize);
        rows.into_iter().map(event_row).collect()
    }

    /// Events related to `event_id` (optionally only of `rel_type`), with `after < stream_pos <=
    /// upto`, in `dir` order.
    pub async fn related_events(
        &self,
        event_id: &EventId,
        rel_type: Option<&str>,
        after: i64,
        upto: i64,
        dir: Dir,
        limit: i64,
    ) -> StorageResult<Vec<EventRow>> {
        let order = if dir == Dir::Forward { "ASC" } else { "DESC" };
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM events
             WHERE relates_to = $1 AND ($2 IS NULL OR rel_type = $2) AND stream_pos > $3 AND stream_pos <= $4
               AND NOT soft_failed AND redacted_by IS NULL
             ORDER BY stream_pos {order} LIMIT $5"
        ));
        let rows: Vec<EventTuple> = on_reader!(self, pool => {
            sqlx::query_as(sql)
                .bind(event_id.as_str())
                .bind(rel_type)
                .bind(after)
                .bind(upto)
                .bind(limit)
                .fetch_all(pool)
                .await?
        });
        rows.into_iter().map(event_row).collect()
    }

    /// Edits (`m.replace`) and references (`m.reference`) of any of `targets`, oldest first.
    pub async fn edits_and_references(
        &self,
        targets: &[&EventId],
    ) -> StorageResult<Vec<(OwnedEventId, String, EventRow)>> {
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        let placeholders = (1..=targets.len()).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT relates_to, rel_type, {EVENT_COLUMNS} FROM events
             WHERE relates_to IN ({placeholders}) AND rel_type IN ('m.replace', 'm.reference')
               AND NOT soft_failed AND redacted_by IS NULL
             ORDER BY stream_pos"
        ));
        type Row = (String, String, i64, String, String, String, Option<String>, bool, i64, i64, Option<String>);
        let rows: Vec<Row> = on_reader!(self, pool => {
            let mut query = sqlx::query_as(sql);
            for target in targets {
                query = query.bind(target.as_str());
            }
            query.fetch_all(pool).await?
        });
        rows.into_iter()
            .map(|r| {
                let row = event_row((r.2, r.3, r.4, r.5, r.6, r.7, r.8, r.9, r.10))?;
                Ok((parse_id(r.0)?, r.1, row))
            })
            .collect()
    }

    /// Per thread root among `roots`: count and position of the latest of its replies up to
    /// `upto` not sent by one of `excluded` (the viewer's ignored users), and whether `viewer`
    /// replied.
    pub async fn thread_summaries(
        &self,
        roots: &[&EventId],
        viewer: &UserId,
        upto: i64,
        excluded: &[&UserId],
    ) -> StorageResult<Vec<(OwnedEventId, i64, i64, bool)>> {
        if roots.is_empty() {
            return Ok(Vec::new());
        }
        let placeholders = (3..roots.len() + 3).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
        let not_excluded = if excluded.is_empty() {
            String::new()
        } else {
            let first = roots.len() + 3;
            let list = (first..first + excluded.len()).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
            format!("AND sender NOT IN ({list})")
        };
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT relates_to, COUNT(*), MAX(stream_pos), MAX(CASE WHEN sender = $1 THEN 1 ELSE 0 END) FROM events
             WHERE relates_to IN ({placeholders}) AND rel_type = 'm.thread' AND NOT soft_failed AND redacted_by IS NULL
               AND stream_pos <= $2 {not_excluded}
             GROUP BY relates_to"
        ));
        let rows: Vec<(String, i64, i64, i32)> = on_reader!(self, pool => {
            let mut query = sqlx::query_as(sql).bind(viewer.as_str()).bind(upto);
            for root in roots {
                query = query.bind(root.as_str());
            }
            for sender in excluded {
                query = query.bind(sender.as_str());
            }
            query.fetch_all(pool).await?
        });
        rows.into_iter().map(|(id, count, latest, mine)| Ok((parse_id(id)?, count, latest, mine > 0))).collect()
    }

    /// Thread roots of a room (events that have `m.thread` children), newest activity first.
    pub async fn thread_roots(
        &self,
        room_id: &RoomId,
        before: i64,
        limit: i64,
    ) -> StorageResult<Vec<(OwnedEventId, i64)>> {
        let rows: Vec<(String, i64)> = on_reader!(self, pool => {
            sqlx::query_as(
                "SELECT relates_to, MAX(stream_pos) AS latest FROM events
                 WHERE room_id = $1 AND rel_type = 'm.thread' AND NOT soft_failed AND redacted_by IS NULL
                 GROUP BY relates_to HAVING MAX(stream_pos) < $2
                 ORDER BY latest DESC LIMIT $3",
            )
            .bind(room_id.as_str())
            .bind(before)
            .bind(limit)
            .fetch_all(pool)
            .await?
        });
        rows.into_iter().map(|(id, pos)| Ok((parse_id(id)?, pos))).collect()
    }

    /// A user's member events in a room (their membership history), newest first, at most
    /// `limit`.
    pub async fn member_events(&self, room_id: &RoomId, user_id: &UserId, limit: i64) -> StorageResult<Vec<EventRow>> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM events
             WHERE room_id = $1 AND event_type = 'm.room.member' AND state_key = $2 AND NOT soft_failed
             ORDER BY stream_pos DESC LIMIT $3"
        ));
        let rows: Vec<EventTuple> = on_reader!(self, pool => {
            sqlx::query_as(sql).bind(room_id.as_str()).bind(user_id.as_str()).bind(limit).fetch_all(pool).await?
        });
        rows.into_iter().map(event_row).collect()
    }

    /// Events of a room closest to `ts`: the first at or after it (forward) or at or before it.
    pub async fn event_by_timestamp(
        &self,
        room_id: &RoomId,
        ts: i64,
        forward: bool,
    ) -> StorageResult<Option<(OwnedEventId, i64)>> {
        let sql = if forward {
            "SELECT event_id, origin_server_ts FROM events WHERE room_id = $1 AND origin_server_ts >= $2 AND NOT soft_failed
             ORDER BY origin_server_ts ASC, stream_pos ASC LIMIT 1"
        } else {
            "SELECT event_id, origin_server_ts FROM events WHERE room_id = $1 AND origin_server_ts <= $2 AND NOT soft_failed
             ORDER BY origin_server_ts DESC, stream_pos DESC LIMIT 1"
        };
        let row: Option<(String, i64)> = on_reader!(self, pool => {
            sqlx::query_as(sql).bind(room_id.as_str()).bind(ts).fetch_optional(pool).await?
        });
        row.map(|(id, ts)| Ok((parse_id(id)?, ts))).transpose()
    }

    /// The room's current state group as of `pos` (from the log of current-state changes: the
    /// state after the newest event may be a side branch's).
    pub async fn room_state_group_at(&self, room_id: &RoomId, pos: i64) -> StorageResult<Option<i64>> {
        let row: Option<i64> = on_reader!(self, pool => {
            sqlx::query_scalar(
                "SELECT state_group FROM room_state_changes WHERE room_id = $1 AND stream_pos <= $2
                 ORDER BY stream_pos DESC LIMIT 1",
            )
            .bind(room_id.as_str())
            .bind(pos)
            .fetch_optional(pool)
            .await?
        });
        Ok(row)
    }

    pub async fn state_group(&self, group: i64) -> StorageResult<Option<StateGroupRow>> {
        let (head, entries): GroupParts = on_reader!(self, pool => {
            let mut conn = pool.acquire().await?;
            let head: Option<(Option<i64>, i64)> =
                sqlx::query_as("SELECT prev_group, chain_len FROM state_groups WHERE id = $1")
                    .bind(group)
                    .fetch_optional(&mut *conn)
                    .await?;
            let entries: Vec<(String, String, String)> =
                sqlx::query_as("SELECT event_type, state_key, event_id FROM state_group_entries WHERE group_id = $1")
                    .bind(group)
                    .fetch_all(&mut *conn)
                    .await?;
            (head, entries)
        });
        let Some((prev_group, chain_len)) = head else { return Ok(None) };
        Ok(Some(StateGroupRow {
            prev_group,
            chain_len,
            entries: entries.into_iter().map(|(t, k, e)| Ok((t, k, parse_id(e)?))).collect::<StorageResult<_>>()?,
        }))
    }

    pub async fn max_state_group(&self) -> StorageResult<i64> {
        let max: Option<i64> = on_reader!(self, pool => {
            sqlx::query_scalar("SELECT MAX(id) FROM state_groups").fetch_one(pool).await?
        });
        Ok(max.unwrap_or(0))
    }

    /// The current state event at (type, state_key), if any.
    pub async fn current_state_event_id(
        &self,
        room_id: &RoomId,
        event_type: &str,
        state_key: &str,
    ) -> StorageResult<Option<OwnedEventId>> {
        let row: Option<String> = on_reader!(self, pool => {
            sqlx::query_scalar("SELECT event_id FROM room_current_state WHERE room_id = $1 AND event_type = $2 AND state_key = $3")
                .bind(room_id.as_str())
                .bind(event_type)
                .bind(state_key)
                .fetch_optional(pool)
                .await?
        });
        row.map(parse_id).transpose()
    }

    /// Every membership row of a user (current state of each room).
    pub async fn user_memberships(&self, user_id: &UserId) -> StorageResult<Vec<MembershipRow>> {
        let sql = sqlx::AssertSqlSafe(format!("SELECT {MEMBERSHIP_COLUMNS} FROM room_memberships WHERE user_id = $1"));
        let rows: Vec<MembershipTuple> = on_reader!(self, pool => {
            sqlx::query_as(sql).bind(user_id.as_str()).fetch_all(pool).await?
        });
        rows.into_iter().map(membership_row).collect()
    }

    /// Every membership row (the stream's views are built from them at start).
    pub async fn all_memberships(&self) -> StorageResult<Vec<MembershipRow>> {
        let sql = sqlx::AssertSqlSafe(format!("SELECT {MEMBERSHIP_COLUMNS} FROM room_memberships ORDER BY stream_pos"));
        let rows: Vec<MembershipTuple> = on_reader!(self, pool => sqlx::query_as(sql).fetch_all(pool).await?);
        rows.into_iter().map(membership_row).collect()
    }

    /// Per room: the position of its latest event and of its latest receipt (0 when none).
    pub async fn room_latest_positions(&self) -> StorageResult<Vec<(OwnedRoomId, i64, i64)>> {
        let rows: Vec<(String, i64, i64)> = on_reader!(self, pool => {
            sqlx::query_as(
                "SELECT room_id, MAX(e), MAX(r) FROM (
                    SELECT room_id, MAX(stream_pos) AS e, CAST(0 AS BIGINT) AS r FROM events GROUP BY room_id
                    UNION ALL SELECT room_id, CAST(0 AS BIGINT), MAX(stream_pos) FROM receipts GROUP BY room_id
                 ) AS latest GROUP BY room_id",
            )
            .fetch_all(pool)
            .await?
        });
        rows.into_iter().map(|(room, e, r)| Ok((parse_id(room)?, e, r))).collect()
    }

    /// Every membership row of a room.
    pub async fn room_memberships(&self, room_id: &RoomId) -> StorageResult<Vec<MembershipRow>> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {MEMBERSHIP_COLUMNS} FROM room_memberships WHERE room_id = $1 ORDER BY stream_pos"
        ));
        let rows: Vec<MembershipTuple> = on_reader!(self, pool => {
            sqlx::query_as(sql).bind(room_id.as_str()).fetch_all(pool).await?
        });
        rows.into_iter().map(membership_row).collect()
    }

    pub async fn membership(&self, room_id: &RoomId, user_id: &UserId) -> StorageResult<Option<MembershipRow>> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {MEMBERSHIP_COLUMNS} FROM room_memberships WHERE room_id = $1 AND user_id = $2"
        ));
        let row: Option<MembershipTuple> = on_reader!(self, pool => {
            sqlx::query_as(sql).bind(room_id.as_str()).bind(user_id.as_str()).fetch_optional(pool).await?
        });
        row.map(membership_row).transpose()
    }

    /// Marks a left room as forgotten by the user (it leaves their sync).
    pub async fn forget_room(&self, room_id: &RoomId, user_id: &UserId) -> StorageResult<()> {
        on_writer!(self, pool => {
            sqlx::query("UPDATE room_memberships SET forgotten = TRUE WHERE room_id = $1 AND user_id = $2")
                .bind(room_id.as_str())
                .bind(user_id.as_str())
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// The members of one user's rooms that share a joined room with them (for presence and
    /// device lists).
    pub async fn users_sharing_rooms(&self, user_id: &UserId) -> StorageResult<Vec<OwnedUserId>> {
        let rows: Vec<String> = on_reader!(self, pool => {
            sqlx::query_scalar(
                "SELECT DISTINCT other.user_id FROM room_memberships mine
                 JOIN room_memberships other ON other.room_id = mine.room_id AND other.membership = 'join'
                 WHERE mine.user_id = $1 AND mine.membership = 'join'",
            )
            .bind(user_id.as_str())
            .fetch_all(pool)
            .await?
        });
        rows.into_iter().map(parse_id).collect()
    }

    /// Local users whose ID or display name contains `term` and who share a room with `searcher`
    /// or are in a publicly joinable room.
    pub async fn search_user_directory(
        &self,
        searcher: &UserId,
        term: &str,
        limit: i64,
    ) -> StorageResult<Vec<(OwnedUserId, Option<String>, Option<String>)>> {
        let pattern =
            format!("%{}%", term.to_lowercase().replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_"));
        let rows: Vec<(String, Option<String>, Option<String>)> = on_reader!(self, pool => {
            sqlx::query_as(
                "SELECT u.user_id, u.displayname, u.avatar_url FROM users u
                 WHERE NOT u.deactivated AND NOT u.is_guest
                   AND (LOWER(u.user_id) LIKE $1 ESCAPE '\\' OR LOWER(COALESCE(u.displayname, '')) LIKE $1 ESCAPE '\\')
                   AND (u.user_id = $2
                        OR EXISTS (SELECT 1 FROM room_memberships a JOIN room_memberships b ON a.room_id = b.room_id
                                   WHERE a.user_id = $2 AND a.membership = 'join' AND b.user_id = u.user_id AND b.membership = 'join')
                        OR EXISTS (SELECT 1 FROM room_memberships m JOIN room_current_state s
                                     ON s.room_id = m.room_id AND s.event_type = 'm.room.join_rules' AND s.state_key = ''
                                   JOIN events e ON e.event_id = s.event_id
                                   WHERE m.user_id = u.user_id AND m.membership = 'join' AND e.json LIKE '%\"join_rule\":\"public\"%'))
                 ORDER BY u.user_id LIMIT $3",
            )
            .bind(pattern)
            .bind(searcher.as_str())
            .bind(limit)
            .fetch_all(pool)
            .await?
        });
        rows.into_iter().map(|(id, name, avatar)| Ok((parse_id(id)?, name, avatar))).collect()
    }

    pub async fn create_alias(&self, alias: &str, room_id: &RoomId, creator: &UserId, now: i64) -> StorageResult<()> {
        on_writer!(self, pool => {
            sqlx::query("INSERT INTO room_aliases (alias, room_id, creator, created_ts) VALUES ($1, $2, $3, $4)")
                .bind(alias)
                .bind(room_id.as_str())
                .bind(creator.as_str())
                .bind(now)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// The replacement of an upgraded room and its version, if it has one.
    pub async fn room_replacement(&self, old_room: &RoomId) -> StorageResult<Option<(OwnedRoomId, String)>> {
        let row: Option<(String, String)> = on_reader!(self, pool => {
            sqlx::query_as("SELECT new_room_id, room_version FROM room_upgrades WHERE old_room_id = $1")
                .bind(old_room.as_str())
                .fetch_optional(pool)
                .await?
        });
        row.map(|(room, version)| Ok((parse_id(room)?, version))).transpose()
    }

    pub async fn alias(&self, alias: &str) -> StorageResult<Option<(OwnedRoomId, OwnedUserId)>> {
        let row: Option<(String, String)> = on_reader!(self, pool => {
            sqlx::query_as("SELECT room_id, creator FROM room_aliases WHERE alias = $1").bind(alias).fetch_optional(pool).await?
        });
        row.map(|(room, creator)| Ok((parse_id(room)?, parse_id(creator)?))).transpose()
    }

    pub async fn delete_alias(&self, alias: &str) -> StorageResult<bool> {
        let deleted = on_writer!(self, pool => {
            sqlx::query("DELETE FROM room_aliases WHERE alias = $1").bind(alias).execute(pool).await?.rows_affected()
        });
        Ok(deleted > 0)
    }

    pub async fn room_aliases(&self, room_id: &RoomId) -> StorageResult<Vec<String>> {
        let rows: Vec<String> = on_reader!(self, pool => {
            sqlx::query_scalar("SELECT alias FROM room_aliases WHERE room_id = $1 ORDER BY alias")
                .bind(room_id.as_str())
                .fetch_all(pool)
                .await?
        });
        Ok(rows)
    }

    pub async fn repoint_aliases(&self, from: &RoomId, to: &RoomId) -> StorageResult<()> {
        on_writer!(self, pool => {
            sqlx::query("UPDATE room_aliases SET room_id = $1 WHERE room_id = $2")
                .bind(to.as_str())
                .bind(from.as_str())
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// The device and transaction ID a local event was sent with, if any.
    pub async fn event_txn(&self, event_id: &EventId) -> StorageResult<Option<(String, String)>> {
        let row: Option<(String, String)> = on_reader!(self, pool => {
            sqlx::query_as("SELECT device_id, txn_id FROM event_txns WHERE event_id = $1")
                .bind(event_id.as_str())
                .fetch_optional(pool)
                .await?
        });
        Ok(row)
    }

    /// The event a device already sent with this transaction ID in this room, if any.
    pub async fn txn_event(
        &self,
        user_id: &UserId,
        device_id: &str,
        room_id: &RoomId,
        txn_id: &str,
    ) -> StorageResult<Option<OwnedEventId>> {
        let row: Option<String> = on_reader!(self, pool => {
            sqlx::query_scalar(
                "SELECT event_id FROM event_txns WHERE user_id = $1 AND device_id = $2 AND room_id = $3 AND txn_id = $4",
            )
            .bind(user_id.as_str())
            .bind(device_id)
            .bind(room_id.as_str())
            .bind(txn_id)
            .fetch_optional(pool)
            .await?
        });
        row.map(parse_id).transpose()
    }

    /// Whether `sender` already reacted to `event_id` with `key` (a live annotation).
    pub async fn annotation_exists(&self, event_id: &EventId, sender: &UserId, key: &str) -> StorageResult<bool> {
        let rows: Vec<String> = on_reader!(self, pool => {
            sqlx::query_scalar(
                "SELECT json FROM events WHERE relates_to = $1 AND rel_type = 'm.annotation' AND sender = $2
                   AND redacted_by IS NULL AND NOT soft_failed",
            )
            .bind(event_id.as_str())
            .bind(sender.as_str())
            .fetch_all(pool)
            .await?
        });
        Ok(rows.iter().any(|json| {
            serde_json::from_str::<serde_json::Value>(json)
                .ok()
                .and_then(|v| v.pointer("/content/m.relates_to/key").and_then(|k| k.as_str().map(|k| k == key)))
                .unwrap_or(false)
        }))
    }
}
