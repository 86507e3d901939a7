-- EDUs for other servers that must not be lost (to-device messages, receipts, device-list
-- updates), one row per (destination, EDU), deleted once a transaction carrying it was answered.
-- `id` orders a destination's EDUs and, with the PDU rows, names the transactions, so a
-- transaction resent after a restart keeps its ID. Typing and presence are not kept here: they
-- live in memory and only their latest state matters.
CREATE TABLE federation_outbox_edus (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    destination TEXT NOT NULL,
    edu_json TEXT NOT NULL,
    queued_ts BIGINT NOT NULL
);
CREATE INDEX federation_outbox_edus_destination ON federation_outbox_edus (destination, id);

-- To-device messages received from other servers, by origin and message_id, so a message sent
-- again (in a new transaction) reaches the devices only once.
CREATE TABLE federation_inbound_to_device (
    origin TEXT NOT NULL,
    message_id TEXT NOT NULL,
    received_ts BIGINT NOT NULL,
    PRIMARY KEY (origin, message_id)
);

-- What we know of remote users' device lists: the last `stream_id` applied (to notice a gap in
-- `prev_id`) and the devices (JSON array of {device_id, device_display_name}).
CREATE TABLE remote_device_lists (
    user_id TEXT PRIMARY KEY,
    stream_id BIGINT NOT NULL,
    devices_json TEXT NOT NULL,
    updated_ts BIGINT NOT NULL
);
