-- Room upgrades: written in the same transaction as the replacement room, so the replacement
-- exists exactly when this row does; the key on the old room makes a second replacement of the
-- same room impossible, and a retried upgrade (after a crash midway) finds the room it made.
CREATE TABLE room_upgrades (
    old_room_id TEXT PRIMARY KEY NOT NULL,
    new_room_id TEXT NOT NULL,
    room_version TEXT NOT NULL,
    user_id TEXT NOT NULL,
    created_ts BIGINT NOT NULL
);

-- The highest stream position handed out, kept by every stream commit: the rows that carry
-- positions can be deleted (confirmed to-device messages), and a restart must never hand out a
-- position a client's token already passed.
CREATE TABLE stream_high_water (
    id  INTEGER PRIMARY KEY NOT NULL,
    pos BIGINT NOT NULL
);
INSERT INTO stream_high_water (id, pos)
SELECT 1, COALESCE(MAX(p), 0) FROM (
    SELECT MAX(stream_pos) AS p FROM events
    UNION ALL SELECT MAX(stream_pos) FROM receipts
    UNION ALL SELECT MAX(stream_pos) FROM account_data
    UNION ALL SELECT MAX(stream_pos) FROM to_device_messages
    UNION ALL SELECT MAX(stream_pos) FROM device_list_changes
) AS positions;
