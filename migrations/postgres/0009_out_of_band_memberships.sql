-- Memberships of local users in rooms this server is not in (issue 8): an invite from another
-- server, a knock on a remote room, and the leave that ends either (a rejected invite, a
-- retracted or refused knock). The room has no graph here, so `room_memberships` (which follows
-- a room's current state) cannot hold them. One row per (room, user): the latest such
-- membership, with its stream position so incremental syncs see the change. `event_json` is the
-- member event (signed by both servers for an invite); `stripped_state` the JSON array of
-- events the inviting server sent along (`invite_room_state`, `knock_room_state`), shown to
-- the client; `servers` (JSON array) the servers to accept, reject or retract through. Once the
-- user joins the room, `room_memberships` has a newer row and takes over.
CREATE TABLE out_of_band_memberships (
    room_id        TEXT NOT NULL,
    user_id        TEXT NOT NULL,
    membership     TEXT NOT NULL,
    event_id       TEXT NOT NULL,
    sender         TEXT NOT NULL,
    room_version   TEXT NOT NULL,
    event_json     TEXT NOT NULL,
    stripped_state TEXT NOT NULL,
    servers        TEXT NOT NULL,
    stream_pos     BIGINT NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX out_of_band_memberships_user ON out_of_band_memberships (user_id);
