//! Out-of-band memberships: a local user's invite, knock or their leave in a room this server is
//! not in, so has no graph for (`out_of_band_memberships`). Written only through
//! `commit_stream_batch` (`StreamWrite::OutOfBand`), read by the stream's views at start and by
//! sync for the stripped state it shows.

use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId};

use super::{Db, StorageResult, on_reader, parse_id};

/// One out-of-band membership, as stored.
#[derive(Debug, Clone)]
pub struct OutOfBandMembership {
    pub room_id: OwnedRoomId,
    pub user_id: OwnedUserId,
    /// `invite`, `knock` or `leave`.
    pub membership: String,
    pub event_id: OwnedEventId,
    pub sender: OwnedUserId,
    pub room_version: String,
    /// The member event (PDU, canonical JSON).
    pub event_json: String,
    /// JSON array of the events the room's server sent along (full PDUs or stripped events).
    pub stripped_state: String,
    /// JSON array of server names to reach the room through.
    pub servers: String,
    /// Set by the stream writer when read back; ignored on write.
    pub stream_pos: i64,
}

const COLUMNS: &str =
    "room_id, user_id, membership, event_id, sender, room_version, event_json, stripped_state, servers, stream_pos";
type Tuple = (String, String, String, String, String, String, String, String, String, i64);

fn row(t: Tuple) -> StorageResult<OutOfBandMembership> {
    Ok(OutOfBandMembership {
        room_id: parse_id(t.0)?,
        user_id: parse_id(t.1)?,
        membership: t.2,
        event_id: parse_id(t.3)?,
        sender: parse_id(t.4)?,
        room_version: t.5,
        event_json: t.6,
        stripped_state: t.7,
        servers: t.8,
        stream_pos: t.9,
    })
}

impl Db {
    /// Every out-of-band membership, oldest first (the stream's views at start).
    pub async fn all_out_of_band_memberships(&self) -> StorageResult<Vec<OutOfBandMembership>> {
        let sql = sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM out_of_band_memberships ORDER BY stream_pos"));
        let rows: Vec<Tuple> = on_reader!(self, pool => sqlx::query_as(sql).fetch_all(pool).await?);
        rows.into_iter().map(row).collect()
    }

    /// The user's out-of-band membership of the room, if any.
    pub async fn out_of_band_membership(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
    ) -> StorageResult<Option<OutOfBandMembership>> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM out_of_band_memberships WHERE room_id = $1 AND user_id = $2"
        ));
        let found: Option<Tuple> = on_reader!(self, pool => {
            sqlx::query_as(sql).bind(room_id.as_str()).bind(user_id.as_str()).fetch_optional(pool).await?
        });
        found.map(row).transpose()
    }
}
