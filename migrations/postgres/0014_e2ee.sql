-- End-to-end encryption: the key directory, room key backups and dehydrated devices. The server
-- never sees plaintext; it stores what clients upload and hands it out by the spec's rules.

-- A device's identity keys (the signed `device_keys` object as uploaded, without signatures
-- other than the device's own; cross-signing signatures live in `e2e_signatures`).
CREATE TABLE e2e_device_keys (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    keys_json TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);

-- One-time keys, each handed out once (`/keys/claim` deletes the row it returns).
CREATE TABLE e2e_one_time_keys (
    id BIGSERIAL PRIMARY KEY,
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    key_id TEXT NOT NULL,
    key_json TEXT NOT NULL,
    UNIQUE (user_id, device_id, algorithm, key_id)
);

-- Fallback keys: the latest per (device, algorithm), handed out when no one-time key is left.
CREATE TABLE e2e_fallback_keys (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    key_id TEXT NOT NULL,
    key_json TEXT NOT NULL,
    used BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (user_id, device_id, algorithm)
);

-- Cross-signing keys (`master`, `self_signing`, `user_signing`), local users' and those other
-- servers sent us (`m.signing_key_update`, `/user/keys/query`).
CREATE TABLE e2e_cross_signing_keys (
    user_id TEXT NOT NULL,
    key_type TEXT NOT NULL,
    key_json TEXT NOT NULL,
    updated_ts BIGINT NOT NULL,
    PRIMARY KEY (user_id, key_type)
);

-- Signatures uploaded through `/keys/signatures/upload`: `signer`'s key `signer_key_id` over
-- `target_user`'s device or cross-signing key `target_key` (a device ID, or a key's public part).
CREATE TABLE e2e_signatures (
    target_user TEXT NOT NULL,
    target_key TEXT NOT NULL,
    signer TEXT NOT NULL,
    signer_key_id TEXT NOT NULL,
    signature TEXT NOT NULL,
    PRIMARY KEY (target_user, target_key, signer, signer_key_id)
);

-- Room key backups: versions per user (the latest undeleted one is current) and their keys.
CREATE TABLE e2e_backup_versions (
    user_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    algorithm TEXT NOT NULL,
    auth_data TEXT NOT NULL,
    etag BIGINT NOT NULL DEFAULT 0,
    deleted BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (user_id, version)
);

CREATE TABLE e2e_backup_keys (
    user_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    room_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    first_message_index BIGINT NOT NULL,
    forwarded_count BIGINT NOT NULL,
    is_verified BOOLEAN NOT NULL,
    session_data TEXT NOT NULL,
    PRIMARY KEY (user_id, version, room_id, session_id)
);

-- Dehydrated devices (MSC3814): at most one per user, a device row without access tokens.
CREATE TABLE e2e_dehydrated_devices (
    user_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    device_data TEXT NOT NULL
);

-- Client transaction IDs of `/sendToDevice` requests, so a retry after a restart is answered
-- without sending the messages again. Pruned after a day.
CREATE TABLE to_device_txns (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    txn_id TEXT NOT NULL,
    created_ts BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id, txn_id)
);
CREATE INDEX to_device_txns_created ON to_device_txns (created_ts);
