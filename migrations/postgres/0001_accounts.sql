-- Accounts: users and their profiles, devices, access and refresh tokens, registration tokens and
-- user-interactive auth sessions. Same shape as migrations/sqlite/0001_accounts.sql.

CREATE TABLE users (
    user_id       TEXT PRIMARY KEY NOT NULL,
    localpart     TEXT NOT NULL UNIQUE,
    password_hash TEXT,
    is_admin      BOOLEAN NOT NULL DEFAULT FALSE,
    is_guest      BOOLEAN NOT NULL DEFAULT FALSE,
    -- A deactivated user keeps its row forever so that its name is never handed out again.
    deactivated   BOOLEAN NOT NULL DEFAULT FALSE,
    created_ts    BIGINT NOT NULL,
    displayname   TEXT,
    avatar_url    TEXT
);

CREATE TABLE devices (
    user_id      TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    display_name TEXT,
    created_ts   BIGINT NOT NULL,
    last_seen_ts BIGINT,
    last_seen_ip TEXT,
    PRIMARY KEY (user_id, device_id)
);

CREATE TABLE refresh_tokens (
    id            BIGSERIAL PRIMARY KEY,
    token_hash    TEXT NOT NULL UNIQUE,
    user_id       TEXT NOT NULL,
    device_id     TEXT NOT NULL,
    created_ts    BIGINT NOT NULL,
    expires_ts    BIGINT,
    -- Set when this token was exchanged: the token that replaced it. The old one stays usable until
    -- its replacement (or the access token issued with it) is first used.
    next_token_id BIGINT
);
CREATE INDEX refresh_tokens_device ON refresh_tokens (user_id, device_id);
CREATE INDEX refresh_tokens_next ON refresh_tokens (next_token_id);

CREATE TABLE access_tokens (
    id               BIGSERIAL PRIMARY KEY,
    -- SHA-256 of the token: a leaked database does not leak live credentials.
    token_hash       TEXT NOT NULL UNIQUE,
    user_id          TEXT NOT NULL,
    device_id        TEXT NOT NULL,
    created_ts       BIGINT NOT NULL,
    expires_ts       BIGINT,
    refresh_token_id BIGINT,
    used             BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX access_tokens_device ON access_tokens (user_id, device_id);

CREATE TABLE registration_tokens (
    token        TEXT PRIMARY KEY NOT NULL,
    uses_allowed BIGINT,
    pending      BIGINT NOT NULL DEFAULT 0,
    completed    BIGINT NOT NULL DEFAULT 0,
    expiry_ts    BIGINT,
    created_ts   BIGINT NOT NULL
);

CREATE TABLE uia_sessions (
    session_id         TEXT PRIMARY KEY NOT NULL,
    -- What the session authorises, e.g. "register" or "deactivate:@alice:example.org"; a session
    -- is never accepted for another purpose.
    purpose            TEXT NOT NULL,
    completed          TEXT NOT NULL,
    registration_token TEXT,
    created_ts         BIGINT NOT NULL
);
