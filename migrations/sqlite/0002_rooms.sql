-- Rooms and everything that streams to clients.
--
-- Every persisted change a client can be told about (room events, receipts, account data,
-- to-device messages, device-list changes) gets a position from one global, gap-free, monotonic
-- counter assigned in commit order by the stream writer (`service::stream`). A sync token is that
-- position (plus the in-memory position of typing/presence), so "what changed since T" is a range
-- query on `stream_pos` in each table.

CREATE TABLE rooms (
    room_id      TEXT PRIMARY KEY NOT NULL,
    room_version TEXT NOT NULL,
    creator      TEXT NOT NULL,
    -- Listed in the public room directory.
    is_public    INTEGER NOT NULL DEFAULT 0,
    created_ts   INTEGER NOT NULL
);

-- Every event, stored once as the canonical JSON of its PDU (replaced by the redacted form when
-- it is redacted), with the columns that queries filter and sort on.
CREATE TABLE events (
    stream_pos       INTEGER PRIMARY KEY NOT NULL,
    event_id         TEXT NOT NULL UNIQUE,
    room_id          TEXT NOT NULL,
    sender           TEXT NOT NULL,
    event_type       TEXT NOT NULL,
    state_key        TEXT,
    depth            INTEGER NOT NULL,
    origin_server_ts INTEGER NOT NULL,
    json             TEXT NOT NULL,
    -- `content.m.relates_to`: the related event and the relation type.
    relates_to       TEXT,
    rel_type         TEXT,
    redacted_by      TEXT,
    -- Passed auth at its place in the DAG but not against current state: kept out of timelines.
    soft_failed      INTEGER NOT NULL DEFAULT 0,
    -- State groups (see state_groups) of the room state before and after this event.
    state_before     INTEGER NOT NULL,
    state_after      INTEGER NOT NULL,
    -- For state events: the event this one replaced at its (type, state_key), if any.
    replaces_state   TEXT
);
CREATE INDEX events_room_pos ON events (room_id, stream_pos);
CREATE INDEX events_room_ts ON events (room_id, origin_server_ts);
CREATE INDEX events_relates_to ON events (relates_to, rel_type) WHERE relates_to IS NOT NULL;
CREATE INDEX events_room_state ON events (room_id, event_type, state_key) WHERE state_key IS NOT NULL;

-- Client transaction IDs, so a retried send returns the same event and stores nothing new.
CREATE TABLE event_txns (
    user_id   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    room_id   TEXT NOT NULL,
    txn_id    TEXT NOT NULL,
    event_id  TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id, room_id, txn_id)
);
CREATE INDEX event_txns_event ON event_txns (event_id);

-- Room state as a chain of deltas: a group with no prev_group holds a full snapshot; otherwise its
-- entries are the changes on top of prev_group. A snapshot is taken every few dozen deltas so
-- resolving any group stays cheap.
CREATE TABLE state_groups (
    id         INTEGER PRIMARY KEY NOT NULL,
    room_id    TEXT NOT NULL,
    prev_group INTEGER,
    chain_len  INTEGER NOT NULL
);
CREATE TABLE state_group_entries (
    group_id   INTEGER NOT NULL,
    event_type TEXT NOT NULL,
    state_key  TEXT NOT NULL,
    event_id   TEXT NOT NULL,
    PRIMARY KEY (group_id, event_type, state_key)
);

-- The room's current state and the DAG's forward extremities (what the next event points at).
CREATE TABLE room_current_state (
    room_id    TEXT NOT NULL,
    event_type TEXT NOT NULL,
    state_key  TEXT NOT NULL,
    event_id   TEXT NOT NULL,
    PRIMARY KEY (room_id, event_type, state_key)
);
CREATE TABLE room_forward_extremities (
    room_id  TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (room_id, event_id)
);

-- Each user's current membership of each room, denormalised from room_current_state for the
-- queries clients make ("my rooms", "members of this room").
CREATE TABLE room_memberships (
    room_id     TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    membership  TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    stream_pos  INTEGER NOT NULL,
    sender      TEXT NOT NULL,
    displayname TEXT,
    avatar_url  TEXT,
    forgotten   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX room_memberships_user ON room_memberships (user_id, membership);

CREATE TABLE room_aliases (
    alias      TEXT PRIMARY KEY NOT NULL,
    room_id    TEXT NOT NULL,
    creator    TEXT NOT NULL,
    created_ts INTEGER NOT NULL
);
CREATE INDEX room_aliases_room ON room_aliases (room_id);

-- Latest receipt per (room, type, user, thread); '' is the unthreaded receipt.
CREATE TABLE receipts (
    room_id      TEXT NOT NULL,
    receipt_type TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    thread_id    TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    event_pos    INTEGER NOT NULL,
    ts           INTEGER NOT NULL,
    stream_pos   INTEGER NOT NULL,
    PRIMARY KEY (room_id, receipt_type, user_id, thread_id)
);
CREATE INDEX receipts_stream ON receipts (stream_pos);

-- Global ('' room) and per-room account data.
CREATE TABLE account_data (
    user_id    TEXT NOT NULL,
    room_id    TEXT NOT NULL,
    data_type  TEXT NOT NULL,
    content    TEXT NOT NULL,
    stream_pos INTEGER NOT NULL,
    PRIMARY KEY (user_id, room_id, data_type)
);
CREATE INDEX account_data_stream ON account_data (user_id, stream_pos);

CREATE TABLE filters (
    filter_id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id   TEXT NOT NULL,
    json      TEXT NOT NULL
);

CREATE TABLE to_device_messages (
    stream_pos INTEGER PRIMARY KEY NOT NULL,
    user_id    TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    sender     TEXT NOT NULL,
    event_type TEXT NOT NULL,
    content    TEXT NOT NULL
);
CREATE INDEX to_device_target ON to_device_messages (user_id, device_id, stream_pos);

-- A user's device list changed (device added, removed or renamed).
CREATE TABLE device_list_changes (
    stream_pos INTEGER PRIMARY KEY NOT NULL,
    user_id    TEXT NOT NULL
);
