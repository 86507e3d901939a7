-- The room graph as a DAG (issue 8): current state by stream position, outliers, rejected events
-- and redactions that may arrive before their target.

-- The room's current state (the resolved state of its forward extremities) is a state group; this
-- is the log of which group it was from which stream position on: one row per write that changed
-- it. "Room state at position P" is the latest row at or before P, never the state after the
-- newest event (a late side-branch event need not change current state).
CREATE TABLE room_state_changes (
    room_id     TEXT NOT NULL,
    stream_pos  BIGINT NOT NULL,
    state_group BIGINT NOT NULL,
    PRIMARY KEY (room_id, stream_pos)
);
-- Until now every room was a single chain: current state changed with every state event.
INSERT INTO room_state_changes (room_id, stream_pos, state_group)
SELECT room_id, stream_pos, state_after FROM events WHERE state_key IS NOT NULL AND NOT soft_failed;

-- Events from other servers arrive late: history is ordered by depth where stream order misleads.
CREATE INDEX events_room_depth ON events (room_id, depth);

-- Events known without their place in the graph (auth chains, the state of a join, an invite into
-- a remote room): no stream position, never in a timeline or a sync. When one later arrives with
-- its place in the graph, it moves to `events` in the same transaction.
CREATE TABLE outliers (
    event_id    TEXT PRIMARY KEY NOT NULL,
    room_id     TEXT NOT NULL,
    event_type  TEXT NOT NULL,
    state_key   TEXT,
    json        TEXT NOT NULL,
    received_ts BIGINT NOT NULL
);
CREATE INDEX outliers_room ON outliers (room_id);

-- Events that failed the checks on receipt (auth rules against their auth events or the state
-- before them): kept so they are never fetched, used or checked again.
CREATE TABLE rejected_events (
    event_id    TEXT PRIMARY KEY NOT NULL,
    room_id     TEXT NOT NULL,
    reason      TEXT NOT NULL,
    -- The state before it, when known: an event that points at a rejected event builds on it.
    state_group BIGINT,
    depth       BIGINT NOT NULL,
    json        TEXT NOT NULL,
    rejected_ts BIGINT NOT NULL
);

-- Every redaction by its target, written with the redaction even when the target is unknown, so
-- a target that arrives later is stored redacted.
CREATE TABLE redactions (
    target_id    TEXT NOT NULL,
    redaction_id TEXT NOT NULL,
    room_id      TEXT NOT NULL,
    PRIMARY KEY (target_id, redaction_id)
);
INSERT INTO redactions (target_id, redaction_id, room_id)
SELECT event_id, redacted_by, room_id FROM events WHERE redacted_by IS NOT NULL;
