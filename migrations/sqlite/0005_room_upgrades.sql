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
