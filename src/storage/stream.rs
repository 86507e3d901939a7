//! Stream writes and reads: everything that carries a stream position.
//!
//! [`Db::commit_stream_batch`] writes a batch of changes — events with their state and
//! membership bookkeeping, receipts, account data, to-device messages, device-list changes — in
//! one transaction. Positions are assigned by the caller (the single stream writer), in order, so
//! a committed batch is always a contiguous run of positions.

use std::{collections::HashMap, sync::Arc};

use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId};

use super::{Db, StorageResult, on_reader, on_writer, parse_id};
use crate::matrix::pdu::Pdu;

/// A new state group: a full snapshot (no `prev_group`) or the changes on top of `prev_group`.
#[derive(Debug, Clone)]
pub struct NewStateGroup {
    pub id: i64,
    pub prev_group: Option<i64>,
    pub chain_len: i64,
    pub entries: Vec<(String, String, OwnedEventId)>,
}

/// A membership change that comes with a change of the room's current state.
#[derive(Debug, Clone)]
pub struct MembershipChange {
    /// The member event now in the current state.
    pub event_id: OwnedEventId,
    pub user_id: OwnedUserId,
    pub membership: String,
    pub sender: OwnedUserId,
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
}

/// A new room row (with its create event).
#[derive(Debug, Clone)]
pub struct NewRoom {
    pub room_version: String,
    pub creator: OwnedUserId,
    pub is_public: bool,
    pub created_ts: i64,
    /// An alias to claim with the room (the room is not created if the alias is taken).
    pub alias: Option<String>,
    /// The room this one replaces (recorded in `room_upgrades`; the room is not created if the
    /// old room already has a replacement).
    pub upgrade_of: Option<OwnedRoomId>,
}

/// A change of the room's current state (the resolved state of its forward extremities), with
/// the membership rows that follow it.
#[derive(Debug, Clone)]
pub struct CurrentStateChange {
    /// The state group of the new current state.
    pub group: i64,
    /// The keys that changed: the event now there, or `None` when the key left the state.
    pub delta: Vec<(String, String, Option<OwnedEventId>)>,
    pub memberships: Vec<MembershipChange>,
    /// Whether the change is more than the event's own state entry (a resolution between
    /// branches): readers that take timeline events as the state changes must look at the log.
    pub resolved: bool,
}

/// One event and everything that must commit with it.
#[derive(Debug, Clone)]
pub struct EventWrite {
    /// The event as stored: its redacted form when its content hash did not match or a
    /// redaction of it arrived first.
    pub pdu: Arc<Pdu>,
    pub relates_to: Option<OwnedEventId>,
    pub rel_type: Option<String>,
    pub state_before: i64,
    pub state_after: i64,
    pub replaces_state: Option<OwnedEventId>,
    /// State groups this event introduces (a resolution of its prev events' states, its own
    /// state after, the room's new current state), in dependency order.
    pub new_state_groups: Vec<NewStateGroup>,
    /// The room's current state after this event, when it changed.
    pub current: Option<CurrentStateChange>,
    /// The room's forward extremities after this event.
    pub forward_extremities: Vec<OwnedEventId>,
    /// Passed auth at its place in the graph but not against the current state: stored, never
    /// served to clients, never a prev event.
    pub soft_failed: bool,
    /// The redaction it was stored redacted for, when that redaction arrived before it.
    pub redacted_by: Option<OwnedEventId>,
    /// It was stored as an outlier before: that row goes.
    pub was_outlier: bool,
    /// (user, device, txn_id) of the client request that sent it.
    pub txn: Option<(OwnedUserId, String, String)>,
    /// For redactions: the redacted form of the target event to store in its place.
    pub redaction_target: Option<(OwnedEventId, String)>,
    pub new_room: Option<NewRoom>,
    /// History fetched from another server (a negative position): it leaves the room's forward
    /// extremities as they are.
    pub backfilled: bool,
}

#[derive(Debug, Clone)]
pub struct ReceiptWrite {
    pub room_id: OwnedRoomId,
    pub receipt_type: String,
    pub user_id: OwnedUserId,
    pub thread_id: String,
    pub event_id: OwnedEventId,
    pub event_pos: i64,
    pub ts: i64,
    /// Not stored: for delivered receipts, the users woken for it (the receipted event's sender,
    /// who is waiting for it, and the receipt's user, whose other devices show it); everyone
    /// else in the room sees it with their next sync. `None` wakes the whole room.
    pub wake_only: Option<Vec<OwnedUserId>>,
}

#[derive(Debug, Clone)]
pub struct ToDeviceWrite {
    pub user_id: OwnedUserId,
    pub device_id: String,
    pub sender: OwnedUserId,
    pub event_type: String,
    pub content: String,
}

/// One change to persist, with its position.
#[derive(Debug, Clone)]
pub enum StreamWrite {
    Event(Box<EventWrite>),
    Receipt(ReceiptWrite),
    AccountData {
        user_id: OwnedUserId,
        room_id: Option<OwnedRoomId>,
        data_type: String,
        content: String,
    },
    ToDevice(ToDeviceWrite),
    /// A `/sendToDevice` request's transaction ID, committed with its messages so a retry after
    /// a restart is recognised.
    ToDeviceTxn {
        user_id: OwnedUserId,
        device_id: String,
        txn_id: String,
        ts: i64,
    },
    DeviceListChange {
        user_id: OwnedUserId,
    },
    /// A local user's membership of a room this server is not in (`storage::out_of_band`).
    OutOfBand(Box<super::out_of_band::OutOfBandMembership>),
}

/// Where each in-memory view of the stream stands at start.
#[derive(Debug, Default)]
pub struct ViewPositions {
    /// Per room: its current state group and the position it became current at.
    pub room_groups: Vec<(OwnedRoomId, i64, i64)>,
    pub room_relations: Vec<(OwnedRoomId, i64)>,
    pub account_data: Vec<(OwnedUserId, i64)>,
    pub to_device: Vec<(OwnedUserId, String, i64)>,
    pub device_change: i64,
    pub reads: Vec<(OwnedUserId, OwnedRoomId, String, i64)>,
    pub delivered: Vec<(OwnedUserId, OwnedRoomId, String, i64)>,
}

#[derive(Debug, Clone)]
pub struct ReceiptRow {
    pub room_id: OwnedRoomId,
    pub receipt_type: String,
    pub user_id: OwnedUserId,
    pub thread_id: String,
    pub event_id: OwnedEventId,
    pub event_pos: i64,
    pub ts: i64,
    pub stream_pos: i64,
}

type ReceiptTuple = (String, String, String, String, String, i64, i64, i64);

fn receipt_row(t: ReceiptTuple) -> StorageResult<ReceiptRow> {
    Ok(ReceiptRow {
        room_id: parse_id(t.0)?,
        receipt_type: t.1,
        user_id: parse_id(t.2)?,
        thread_id: t.3,
        event_id: parse_id(t.4)?,
        event_pos: t.5,
        ts: t.6,
        stream_pos: t.7,
    })
}

#[derive(Debug, Clone)]
pub struct AccountDataRow {
    pub room_id: Option<OwnedRoomId>,
    pub data_type: String,
    pub content: String,
    pub stream_pos: i64,
}

#[derive(Debug, Clone)]
pub struct ToDeviceRow {
    pub stream_pos: i64,
    pub sender: OwnedUserId,
    pub event_type: String,
    pub content: String,
}

/// Rows per multi-row INSERT (well under both engines' bound-parameter limits).
const ENTRIES_PER_INSERT: usize = 200;

/// `prefix` followed by `rows` groups of `columns` numbered placeholders.
fn multi_row_insert(prefix: &str, columns: usize, rows: usize) -> String {
    let mut sql = String::with_capacity(prefix.len() + rows * columns * 6);
    sql.push_str(prefix);
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for column in 0..columns {
            if column > 0 {
                sql.push_str(", ");
            }
            sql.push('$');
            sql.push_str(&(row * columns + column + 1).to_string());
        }
        sql.push(')');
    }
    sql
}

/// Applies one stream write inside a transaction.
/// `tip`: whether this is the room's last event in the batch (only its forward extremities
/// are written; earlier ones would be replaced in the same transaction).
macro_rules! apply_write {
    ($tx:expr, $pos:expr, $write:expr, $tip:expr) => {{
        let pos: i64 = $pos;
        let tip: bool = $tip;
        match $write {
            StreamWrite::Event(e) => {
                let pdu = &e.pdu;
                let room = pdu.room_id.as_str();
                if let Some(room_row) = &e.new_room {
                    sqlx::query(
                        "INSERT INTO rooms (room_id, room_version, creator, is_public, created_ts) VALUES ($1, $2, $3, $4, $5)",
                    )
                    .bind(room)
                    .bind(&room_row.room_version)
                    .bind(room_row.creator.as_str())
                    .bind(room_row.is_public)
                    .bind(room_row.created_ts)
                    .execute(&mut *$tx)
                    .await?;
                    if let Some(alias) = &room_row.alias {
                        sqlx::query("INSERT INTO room_aliases (alias, room_id, creator, created_ts) VALUES ($1, $2, $3, $4)")
                            .bind(alias)
                            .bind(room)
                            .bind(room_row.creator.as_str())
                            .bind(room_row.created_ts)
                            .execute(&mut *$tx)
                            .await?;
                    }
                    if let Some(old_room) = &room_row.upgrade_of {
                        sqlx::query(
                            "INSERT INTO room_upgrades (old_room_id, new_room_id, room_version, user_id, created_ts)
                             VALUES ($1, $2, $3, $4, $5)",
                        )
                        .bind(old_room.as_str())
                        .bind(room)
                        .bind(&room_row.room_version)
                        .bind(room_row.creator.as_str())
                        .bind(room_row.created_ts)
                        .execute(&mut *$tx)
                        .await?;
                    }
                }
                for group in &e.new_state_groups {
                    sqlx::query("INSERT INTO state_groups (id, room_id, prev_group, chain_len) VALUES ($1, $2, $3, $4)")
                        .bind(group.id)
                        .bind(room)
                        .bind(group.prev_group)
                        .bind(group.chain_len)
                        .execute(&mut *$tx)
                        .await?;
                    // Snapshots of big rooms have thousands of entries: insert them in
                    // multi-row statements rather than one round trip each.
                    for chunk in group.entries.chunks(ENTRIES_PER_INSERT) {
                        let sql = sqlx::AssertSqlSafe(multi_row_insert(
                            "INSERT INTO state_group_entries (group_id, event_type, state_key, event_id) VALUES ",
                            4,
                            chunk.len(),
                        ));
                        let mut query = sqlx::query(sql);
                        for (event_type, state_key, event_id) in chunk {
                            query = query.bind(group.id).bind(event_type).bind(state_key).bind(event_id.as_str());
                        }
                        query.execute(&mut *$tx).await?;
                    }
                }
                sqlx::query(
                    "INSERT INTO events (stream_pos, event_id, room_id, sender, event_type, state_key, depth,
                        origin_server_ts, json, relates_to, rel_type, state_before, state_after, replaces_state,
                        soft_failed, redacted_by)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
                )
                .bind(pos)
                .bind(pdu.event_id.as_str())
                .bind(room)
                .bind(pdu.sender.as_str())
                .bind(pdu.event_type.to_string())
                .bind(pdu.state_key.as_deref())
                .bind(pdu.depth as i64)
                .bind(i64::from(pdu.origin_server_ts.0))
                .bind(&pdu.json)
                .bind(e.relates_to.as_ref().map(|id| id.as_str()))
                .bind(e.rel_type.as_deref())
                .bind(e.state_before)
                .bind(e.state_after)
                .bind(e.replaces_state.as_ref().map(|id| id.as_str()))
                .bind(e.soft_failed)
                .bind(e.redacted_by.as_ref().map(|id| id.as_str()))
                .execute(&mut *$tx)
                .await?;
                // Backward extremities: this event closes the gaps it was missing from, and opens
                // one for each prev event we do not hold (earlier events of this batch are
                // already in `events`).
                sqlx::query("DELETE FROM room_backward_extremities WHERE missing_id = $1")
                    .bind(pdu.event_id.as_str())
                    .execute(&mut *$tx)
                    .await?;
                for prev in &pdu.prev_events {
                    sqlx::query(
                        "INSERT INTO room_backward_extremities (room_id, event_id, missing_id)
                         SELECT $1, $2, $3
                         WHERE NOT EXISTS (SELECT 1 FROM events WHERE event_id = $3)
                           AND NOT EXISTS (SELECT 1 FROM rejected_events WHERE event_id = $3)
                         ON CONFLICT (event_id, missing_id) DO NOTHING",
                    )
                    .bind(room)
                    .bind(pdu.event_id.as_str())
                    .bind(prev.as_str())
                    .execute(&mut *$tx)
                    .await?;
                }
                if e.was_outlier {
                    sqlx::query("DELETE FROM outliers WHERE event_id = $1")
                        .bind(pdu.event_id.as_str())
                        .execute(&mut *$tx)
                        .await?;
                }
                if let Some(current) = &e.current {
                    // A join over federation changes thousands of entries at once: multi-row
                    // statements keep the shared stream transaction short.
                    let upserts: Vec<(&String, &String, &OwnedEventId)> =
                        current.delta.iter().filter_map(|(t, k, e)| e.as_ref().map(|e| (t, k, e))).collect();
                    for chunk in upserts.chunks(ENTRIES_PER_INSERT) {
                        let sql = multi_row_insert(
                            "INSERT INTO room_current_state (room_id, event_type, state_key, event_id) VALUES ",
                            4,
                            chunk.len(),
                        ) + " ON CONFLICT (room_id, event_type, state_key) DO UPDATE SET event_id = EXCLUDED.event_id";
                        // Only placeholders are generated; every value is bound.
                        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
                        for (event_type, state_key, event_id) in chunk {
                            query = query.bind(room).bind(*event_type).bind(*state_key).bind(event_id.as_str());
                        }
                        query.execute(&mut *$tx).await?;
                    }
                    for (event_type, state_key, _) in current.delta.iter().filter(|(_, _, e)| e.is_none()) {
                        sqlx::query("DELETE FROM room_current_state WHERE room_id = $1 AND event_type = $2 AND state_key = $3")
                            .bind(room)
                            .bind(event_type)
                            .bind(state_key)
                            .execute(&mut *$tx)
                            .await?;
                    }
                    for chunk in current.memberships.chunks(ENTRIES_PER_INSERT) {
                        let sql = multi_row_insert(
                            "INSERT INTO room_memberships (room_id, user_id, membership, event_id, stream_pos, sender, displayname, avatar_url, forgotten) VALUES ",
                            9,
                            chunk.len(),
                        ) + " ON CONFLICT (room_id, user_id) DO UPDATE SET membership = EXCLUDED.membership,
                                event_id = EXCLUDED.event_id, stream_pos = EXCLUDED.stream_pos, sender = EXCLUDED.sender,
                                displayname = EXCLUDED.displayname, avatar_url = EXCLUDED.avatar_url, forgotten = FALSE";
                        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
                        for m in chunk {
                            query = query
                                .bind(room)
                                .bind(m.user_id.as_str())
                                .bind(&m.membership)
                                .bind(m.event_id.as_str())
                                .bind(pos)
                                .bind(m.sender.as_str())
                                .bind(m.displayname.as_deref())
                                .bind(m.avatar_url.as_deref())
                                .bind(false);
                        }
                        query.execute(&mut *$tx).await?;
                    }
                    sqlx::query("INSERT INTO room_state_changes (room_id, stream_pos, state_group) VALUES ($1, $2, $3)")
                        .bind(room)
                        .bind(pos)
                        .bind(current.group)
                        .execute(&mut *$tx)
                        .await?;
                }
                if tip && !e.backfilled {
                    sqlx::query("DELETE FROM room_forward_extremities WHERE room_id = $1")
                        .bind(room)
                        .execute(&mut *$tx)
                        .await?;
                    for extremity in &e.forward_extremities {
                        sqlx::query("INSERT INTO room_forward_extremities (room_id, event_id) VALUES ($1, $2)")
                            .bind(room)
                            .bind(extremity.as_str())
                            .execute(&mut *$tx)
                            .await?;
                    }
                }
                if let Some((user, device, txn)) = &e.txn {
                    sqlx::query(
                        "INSERT INTO event_txns (user_id, device_id, room_id, txn_id, event_id) VALUES ($1, $2, $3, $4, $5)",
                    )
                    .bind(user.as_str())
                    .bind(device)
                    .bind(room)
                    .bind(txn)
                    .bind(pdu.event_id.as_str())
                    .execute(&mut *$tx)
                    .await?;
                }
                if let Some(target) = pdu.redacts.as_ref().filter(|_| !e.soft_failed) {
                    // Recorded whether or not the target is here: one that arrives later is
                    // stored redacted.
                    sqlx::query(
                        "INSERT INTO redactions (target_id, redaction_id, room_id) VALUES ($1, $2, $3)
                         ON CONFLICT (target_id, redaction_id) DO NOTHING",
                    )
                    .bind(target.as_str())
                    .bind(pdu.event_id.as_str())
                    .bind(room)
                    .execute(&mut *$tx)
                    .await?;
                }
                if let Some((target, redacted_json)) = &e.redaction_target {
                    sqlx::query("UPDATE events SET json = $1, redacted_by = $2 WHERE event_id = $3 AND redacted_by IS NULL")
                        .bind(redacted_json)
                        .bind(pdu.event_id.as_str())
                        .bind(target.as_str())
                        .execute(&mut *$tx)
                        .await?;
                }
            }
            // Written together after the batch's other writes, by `write_receipts!`.
            StreamWrite::Receipt(_) => {}
            StreamWrite::AccountData { user_id, room_id, data_type, content } => {
                sqlx::query(
                    "INSERT INTO account_data (user_id, room_id, data_type, content, stream_pos) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (user_id, room_id, data_type) DO UPDATE SET content = EXCLUDED.content, stream_pos = EXCLUDED.stream_pos",
                )
                .bind(user_id.as_str())
                .bind(room_id.as_ref().map_or("", |r| r.as_str()))
                .bind(data_type)
                .bind(content)
                .bind(pos)
                .execute(&mut *$tx)
                .await?;
            }
            StreamWrite::ToDevice(m) => {
                sqlx::query(
                    "INSERT INTO to_device_messages (stream_pos, user_id, device_id, sender, event_type, content)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(pos)
                .bind(m.user_id.as_str())
                .bind(&m.device_id)
                .bind(m.sender.as_str())
                .bind(&m.event_type)
                .bind(&m.content)
                .execute(&mut *$tx)
                .await?;
            }
            StreamWrite::ToDeviceTxn { user_id, device_id, txn_id, ts } => {
                sqlx::query(
                    "INSERT INTO to_device_txns (user_id, device_id, txn_id, created_ts) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (user_id, device_id, txn_id) DO NOTHING",
                )
                .bind(user_id.as_str())
                .bind(device_id)
                .bind(txn_id)
                .bind(ts.to_owned())
                .execute(&mut *$tx)
                .await?;
            }
            StreamWrite::DeviceListChange { user_id } => {
                sqlx::query("INSERT INTO device_list_changes (stream_pos, user_id) VALUES ($1, $2)")
                    .bind(pos)
                    .bind(user_id.as_str())
                    .execute(&mut *$tx)
                    .await?;
            }
            StreamWrite::OutOfBand(m) => {
                sqlx::query(
                    "INSERT INTO out_of_band_memberships (room_id, user_id, membership, event_id, sender,
                        room_version, event_json, stripped_state, servers, stream_pos)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                     ON CONFLICT (room_id, user_id) DO UPDATE SET membership = EXCLUDED.membership,
                        event_id = EXCLUDED.event_id, sender = EXCLUDED.sender,
                        room_version = EXCLUDED.room_version, event_json = EXCLUDED.event_json,
                        stripped_state = EXCLUDED.stripped_state, servers = EXCLUDED.servers,
                        stream_pos = EXCLUDED.stream_pos",
                )
                .bind(m.room_id.as_str())
                .bind(m.user_id.as_str())
                .bind(m.membership.as_str())
                .bind(m.event_id.as_str())
                .bind(m.sender.as_str())
                .bind(m.room_version.as_str())
                .bind(m.event_json.as_str())
                .bind(m.stripped_state.as_str())
                .bind(m.servers.as_str())
                .bind(pos)
                .execute(&mut *$tx)
                .await?;
            }
        }
    }};
}

/// Upserts a batch's receipts with multi-row statements: a message in a room of N members brings
/// up to N delivered receipts, and one statement each was most of the writer's work. Only the
/// latest receipt per key is written (the table keeps one row per key).
macro_rules! write_receipts {
    ($tx:expr, $receipts:expr) => {{
        let receipts: &[(i64, &ReceiptWrite)] = $receipts;
        for chunk in receipts.chunks(ENTRIES_PER_INSERT) {
            let sql = multi_row_insert(
                "INSERT INTO receipts (room_id, receipt_type, user_id, thread_id, event_id, event_pos, ts, stream_pos) VALUES ",
                8,
                chunk.len(),
            ) + " ON CONFLICT (room_id, receipt_type, user_id, thread_id) DO UPDATE SET event_id = EXCLUDED.event_id,
                    event_pos = EXCLUDED.event_pos, ts = EXCLUDED.ts, stream_pos = EXCLUDED.stream_pos";
            // Only placeholders are generated; every value is bound.
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (pos, r) in chunk {
                query = query
                    .bind(r.room_id.as_str())
                    .bind(&r.receipt_type)
                    .bind(r.user_id.as_str())
                    .bind(&r.thread_id)
                    .bind(r.event_id.as_str())
                    .bind(r.event_pos)
                    .bind(r.ts)
                    .bind(*pos);
            }
            query.execute(&mut *$tx).await?;
        }
    }};
}

impl Db {
    /// Commits `writes` in one transaction; `writes[i]` gets position `first_pos + i`.
    pub async fn commit_stream_batch(&self, first_pos: i64, writes: &[&StreamWrite]) -> StorageResult<()> {
        // The latest receipt per (room, type, user, thread), in position order.
        let mut latest: HashMap<(&str, &str, &str, &str), (i64, &ReceiptWrite)> = HashMap::new();
        for (offset, write) in writes.iter().enumerate() {
            if let StreamWrite::Receipt(r) = write {
                let key = (r.room_id.as_str(), r.receipt_type.as_str(), r.user_id.as_str(), r.thread_id.as_str());
                latest.insert(key, (first_pos + offset as i64, r));
            }
        }
        let mut receipts: Vec<(i64, &ReceiptWrite)> = latest.into_values().collect();
        receipts.sort_by_key(|(pos, _)| *pos);
        // Each room's last event in the batch: the forward extremities after it are the room's.
        let mut tips: HashMap<&str, usize> = HashMap::new();
        for (index, write) in writes.iter().enumerate() {
            if let StreamWrite::Event(e) = write {
                tips.insert(e.pdu.room_id.as_str(), index);
            }
        }
        on_writer!(self, pool => {
            let mut tx = pool.begin().await?;
            for (offset, write) in writes.iter().enumerate() {
                let tip = match write {
                    StreamWrite::Event(e) => tips.get(e.pdu.room_id.as_str()) == Some(&offset),
                    _ => false,
                };
                apply_write!(tx, first_pos + offset as i64, *write, tip);
            }
            write_receipts!(tx, &receipts);
            if !writes.is_empty() {
                sqlx::query("UPDATE stream_high_water SET pos = $1 WHERE id = 1 AND pos < $1")
                    .bind(first_pos + writes.len() as i64 - 1)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// The highest stream position handed out (the stream writer resumes after it): the high
    /// water mark, which outlives deleted rows, or the highest stored, whichever is higher.
    pub async fn max_stream_pos(&self) -> StorageResult<i64> {
        let max: Option<i64> = on_reader!(self, pool => {
            sqlx::query_scalar(
                "SELECT MAX(p) FROM (
                    SELECT MAX(stream_pos) AS p FROM events
                    UNION ALL SELECT MAX(stream_pos) FROM receipts
                    UNION ALL SELECT MAX(stream_pos) FROM account_data
                    UNION ALL SELECT MAX(stream_pos) FROM to_device_messages
                    UNION ALL SELECT MAX(stream_pos) FROM device_list_changes
                    UNION ALL SELECT MAX(pos) FROM stream_high_water
                 ) AS positions",
            )
            .fetch_one(pool)
            .await?
        });
        Ok(max.unwrap_or(0))
    }

    /// The lowest stream position stored (backfilled events count down from below 0).
    pub async fn min_stream_pos(&self) -> StorageResult<i64> {
        let min: Option<i64> = on_reader!(self, pool => {
            sqlx::query_scalar("SELECT MIN(stream_pos) FROM events").fetch_one(pool).await?
        });
        Ok(min.unwrap_or(0))
    }

    /// Positions the stream's in-memory views start from.
    pub async fn view_positions(&self) -> StorageResult<ViewPositions> {
        type Pair = (String, i64);
        type Triple = (String, String, i64);
        type Triple2 = (String, i64, i64);
        /// Rows as read, before the ids are parsed.
        type Raw = (
            Vec<Triple2>,
            Vec<Pair>,
            Vec<Pair>,
            Vec<Triple>,
            Option<i64>,
            Vec<(String, String, String, i64)>,
            Vec<(String, String, String, i64)>,
        );
        let (groups, relations, account_data, to_device, device_change, reads, delivered): Raw = on_reader!(self, pool => {
            let mut conn = pool.acquire().await?;
            let groups: Vec<Triple2> = sqlx::query_as(
                "SELECT c.room_id, c.state_group, c.stream_pos FROM room_state_changes c
                 JOIN (SELECT room_id, MAX(stream_pos) AS p FROM room_state_changes GROUP BY room_id) latest
                   ON c.room_id = latest.room_id AND c.stream_pos = latest.p",
            )
            .fetch_all(&mut *conn)
            .await?;
            let relations: Vec<Pair> = sqlx::query_as(
                "SELECT room_id, MAX(stream_pos) FROM events WHERE rel_type IN ('m.replace', 'm.reference', 'm.thread')
                 GROUP BY room_id",
            )
            .fetch_all(&mut *conn)
            .await?;
            let account_data: Vec<Pair> = sqlx::query_as("SELECT user_id, MAX(stream_pos) FROM account_data GROUP BY user_id")
                .fetch_all(&mut *conn)
                .await?;
            let to_device: Vec<(String, String, i64)> = sqlx::query_as(
                "SELECT user_id, device_id, MAX(stream_pos) FROM to_device_messages GROUP BY user_id, device_id",
            )
            .fetch_all(&mut *conn)
            .await?;
            let device_change: Option<i64> =
                sqlx::query_scalar("SELECT MAX(stream_pos) FROM device_list_changes").fetch_one(&mut *conn).await?;
            let reads: Vec<(String, String, String, i64)> = sqlx::query_as(
                "SELECT user_id, room_id, thread_id, MAX(event_pos) FROM receipts
                 WHERE receipt_type IN ('m.read', 'm.read.private') GROUP BY user_id, room_id, thread_id",
            )
            .fetch_all(&mut *conn)
            .await?;
            let delivered: Vec<(String, String, String, i64)> = sqlx::query_as(
                "SELECT user_id, room_id, thread_id, event_pos FROM receipts WHERE receipt_type = 'org.hearth.delivered'",
            )
            .fetch_all(&mut *conn)
            .await?;
            (groups, relations, account_data, to_device, device_change, reads, delivered)
        });
        Ok(ViewPositions {
            room_groups: groups.into_iter().map(|(r, g, p)| Ok((parse_id(r)?, g, p))).collect::<StorageResult<_>>()?,
            room_relations: relations.into_iter().map(|(r, p)| Ok((parse_id(r)?, p))).collect::<StorageResult<_>>()?,
            account_data: account_data.into_iter().map(|(u, p)| Ok((parse_id(u)?, p))).collect::<StorageResult<_>>()?,
            to_device: to_device.into_iter().map(|(u, d, p)| Ok((parse_id(u)?, d, p))).collect::<StorageResult<_>>()?,
            device_change: device_change.unwrap_or(0),
            reads: reads
                .into_iter()
                .map(|(u, r, t, p)| Ok((parse_id(u)?, parse_id(r)?, t, p)))
                .collect::<StorageResult<_>>()?,
            delivered: delivered
                .into_iter()
                .map(|(u, r, t, p)| Ok((parse_id(u)?, parse_id(r)?, t, p)))
                .collect::<StorageResult<_>>()?,
        })
    }

    /// Receipts in `room_id` that changed in `(after, upto]` (all of them when `after` is 0).
    pub async fn room_receipts_since(&self, room_id: &RoomId, after: i64, upto: i64) -> StorageResult<Vec<ReceiptRow>> {
        let rows: Vec<ReceiptTuple> = on_reader!(self, pool => {
            sqlx::query_as(
                "SELECT room_id, receipt_type, user_id, thread_id, event_id, event_pos, ts, stream_pos FROM receipts
                 WHERE room_id = $1 AND stream_pos > $2 AND stream_pos <= $3",
            )
            .bind(room_id.as_str())
            .bind(after)
            .bind(upto)
            .fetch_all(pool)
            .await?
        });
        rows.into_iter().map(receipt_row).collect()
    }

    /// Rooms with receipt changes in `(after, upto]`.
    pub async fn rooms_with_receipts_since(&self, after: i64, upto: i64) -> StorageResult<Vec<OwnedRoomId>> {
        let rows: Vec<String> = on_reader!(self, pool => {
            sqlx::query_scalar("SELECT DISTINCT room_id FROM receipts WHERE stream_pos > $1 AND stream_pos <= $2")
                .bind(after)
                .bind(upto)
                .fetch_all(pool)
                .await?
        });
        rows.into_iter().map(parse_id).collect()
    }

    /// A user's receipt of one type in a room and thread.
    pub async fn receipt(
        &self,
        room_id: &RoomId,
        receipt_type: &str,
        user_id: &UserId,
        thread_id: &str,
    ) -> StorageResult<Option<ReceiptRow>> {
        let row: Option<ReceiptTuple> = on_reader!(self, pool => {
            sqlx::query_as(
                "SELECT room_id, receipt_type, user_id, thread_id, event_id, event_pos, ts, stream_pos FROM receipts
                 WHERE room_id = $1 AND receipt_type = $2 AND user_id = $3 AND thread_id = $4",
            )
            .bind(room_id.as_str())
            .bind(receipt_type)
            .bind(user_id.as_str())
            .bind(thread_id)
            .fetch_optional(pool)
            .await?
        });
        row.map(receipt_row).transpose()
    }

    /// The furthest position a user's read receipts (public or private, any thread) reach in a room.
    pub async fn read_up_to(&self, room_id: &RoomId, user_id: &UserId) -> StorageResult<i64> {
        let pos: Option<i64> = on_reader!(self, pool => {
            sqlx::query_scalar(
                "SELECT MAX(event_pos) FROM receipts WHERE room_id = $1 AND user_id = $2
                   AND receipt_type IN ('m.read', 'm.read.private') AND thread_id IN ('', 'main')",
            )
            .bind(room_id.as_str())
            .bind(user_id.as_str())
            .fetch_one(pool)
            .await?
        });
        Ok(pos.unwrap_or(0))
    }

    /// A user's account data changed in `(after, upto]`.
    pub async fn account_data_since(
        &self,
        user_id: &UserId,
        after: i64,
        upto: i64,
    ) -> StorageResult<Vec<AccountDataRow>> {
        let rows: Vec<(String, String, String, i64)> = on_reader!(self, pool => {
            sqlx::query_as(
                "SELECT room_id, data_type, content, stream_pos FROM account_data
                 WHERE user_id = $1 AND stream_pos > $2 AND stream_pos <= $3 ORDER BY stream_pos",
            )
            .bind(user_id.as_str())
            .bind(after)
            .bind(upto)
            .fetch_all(pool)
            .await?
        });
        rows.into_iter()
            .map(|(room, data_type, content, stream_pos)| {
                Ok(AccountDataRow {
                    room_id: if room.is_empty() { None } else { Some(parse_id(room)?) },
                    data_type,
                    content,
                    stream_pos,
                })
            })
            .collect()
    }

    pub async fn account_data(
        &self,
        user_id: &UserId,
        room_id: Option<&RoomId>,
        data_type: &str,
    ) -> StorageResult<Option<String>> {
        let row: Option<String> = on_reader!(self, pool => {
            sqlx::query_scalar("SELECT content FROM account_data WHERE user_id = $1 AND room_id = $2 AND data_type = $3")
                .bind(user_id.as_str())
                .bind(room_id.map_or("", |r| r.as_str()))
                .bind(data_type)
                .fetch_optional(pool)
                .await?
        });
        Ok(row)
    }

    /// To-device messages for a device in `(after, upto]`, oldest first.
    pub async fn to_device_since(
        &self,
        user_id: &UserId,
        device_id: &str,
        after: i64,
        upto: i64,
        limit: i64,
    ) -> StorageResult<Vec<ToDeviceRow>> {
        let rows: Vec<(i64, String, String, String)> = on_reader!(self, pool => {
            sqlx::query_as(
                "SELECT stream_pos, sender, event_type, content FROM to_device_messages
                 WHERE user_id = $1 AND device_id = $2 AND stream_pos > $3 AND stream_pos <= $4
                 ORDER BY stream_pos LIMIT $5",
            )
            .bind(user_id.as_str())
            .bind(device_id)
            .bind(after)
            .bind(upto)
            .bind(limit)
            .fetch_all(pool)
            .await?
        });
        rows.into_iter()
            .map(|(stream_pos, sender, event_type, content)| {
                Ok(ToDeviceRow { stream_pos, sender: parse_id(sender)?, event_type, content })
            })
            .collect()
    }

    /// Deletes to-device messages a device has acknowledged (by syncing past them).
    pub async fn delete_to_device_upto(&self, user_id: &UserId, device_id: &str, upto: i64) -> StorageResult<()> {
        on_writer!(self, pool => {
            sqlx::query("DELETE FROM to_device_messages WHERE user_id = $1 AND device_id = $2 AND stream_pos <= $3")
                .bind(user_id.as_str())
                .bind(device_id)
                .bind(upto)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Users whose device lists changed in `(after, upto]`.
    pub async fn device_list_changes_since(&self, after: i64, upto: i64) -> StorageResult<Vec<OwnedUserId>> {
        let rows: Vec<String> = on_reader!(self, pool => {
            sqlx::query_scalar("SELECT DISTINCT user_id FROM device_list_changes WHERE stream_pos > $1 AND stream_pos <= $2")
                .bind(after)
                .bind(upto)
                .fetch_all(pool)
                .await?
        });
        rows.into_iter().map(parse_id).collect()
    }

    pub async fn create_filter(&self, user_id: &UserId, json: &str) -> StorageResult<i64> {
        let id: i64 = on_writer!(self, pool => {
            sqlx::query_scalar("INSERT INTO filters (user_id, json) VALUES ($1, $2) RETURNING filter_id")
                .bind(user_id.as_str())
                .bind(json)
                .fetch_one(pool)
                .await?
        });
        Ok(id)
    }

    pub async fn filter(&self, user_id: &UserId, filter_id: i64) -> StorageResult<Option<String>> {
        let row: Option<String> = on_reader!(self, pool => {
            sqlx::query_scalar("SELECT json FROM filters WHERE user_id = $1 AND filter_id = $2")
                .bind(user_id.as_str())
                .bind(filter_id)
                .fetch_optional(pool)
                .await?
        });
        Ok(row)
    }
}
