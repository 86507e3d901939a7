-- The outbound federation queue: one row per (destination, PDU) still to deliver. A row is
-- deleted once a transaction carrying it was answered, so what remains after a restart is
-- exactly what has not been delivered; `id` orders a destination's PDUs and names the
-- transactions (first and last row), so a transaction resent after a restart keeps its ID.
CREATE TABLE federation_outbox (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    destination TEXT NOT NULL,
    event_id TEXT NOT NULL,
    pdu_json TEXT NOT NULL,
    queued_ts BIGINT NOT NULL
);
CREATE INDEX federation_outbox_destination ON federation_outbox (destination, id);

-- Transactions received from other servers and our answer to each, so a retried transaction
-- (same origin and transaction ID) is answered again without being processed twice.
CREATE TABLE federation_inbound_txns (
    origin TEXT NOT NULL,
    txn_id TEXT NOT NULL,
    response_json TEXT NOT NULL,
    received_ts BIGINT NOT NULL,
    PRIMARY KEY (origin, txn_id)
);
