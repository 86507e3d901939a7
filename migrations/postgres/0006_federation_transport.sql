-- Other servers' signing keys, fetched directly or through a notary and checked against the
-- server's own signature before they are stored. A key row is never deleted: events signed with
-- a key stay verifiable after the server rotated it. `valid_until_ts` is how long the key may be
-- used (the document's validity, at most 7 days after it was fetched; for an old key, when it
-- expired); `expired_ts` is set for keys the server lists in `old_verify_keys`.
CREATE TABLE server_signing_keys (
    server_name TEXT NOT NULL,
    key_id TEXT NOT NULL,
    public_key TEXT NOT NULL,
    valid_until_ts BIGINT NOT NULL,
    expired_ts BIGINT,
    fetched_ts BIGINT NOT NULL,
    PRIMARY KEY (server_name, key_id)
);

-- The latest key document of each server as received (its signatures included), which the
-- notary endpoints hand on with our signature added.
CREATE TABLE server_key_documents (
    server_name TEXT PRIMARY KEY NOT NULL,
    json TEXT NOT NULL,
    valid_until_ts BIGINT NOT NULL,
    fetched_ts BIGINT NOT NULL
);
