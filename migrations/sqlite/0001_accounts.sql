-- Accounts: users and their profiles, devices, access and refresh tokens, registration tokens and
-- user-interactive auth sessions. Booleans are INTEGER 0/1 (SQLite has no boolean type).

CREATE TABLE users (
    user_id       TEXT PRIMARY KEY NOT NULL,
    localpart     TEXT NOT NULL UNIQUE,
    password_hash TEXT,
    is_admin      INTEGER NOT NULL DEFAULT 0,
    is_guest      INTEGER NOT NULL DEFAULT 0,
    -- A deactivated user keeps its row forever so that its name is never handed out again.
    deactivated   INTEGER NOT NULL DEFAULT 0,
    created_ts    INTEGER NOT NULL,
    displayname   TEXT,
    avatar_url    TEXT
);

CREATE TABLE devices (
    user_id      TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    display_name TEXT,
    created_ts   INTEGER NOT NULL,
    last_seen_ts INTEGER,
    last_seen_ip TEXT,
    PRIMARY KEY (user_id, device_id)
);

CREATE TABLE refresh_tokens (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    token_hash    TEXT NOT NULL UNIQUE,
    user_id       TEXT NOT NULL,
    device_id     TEXT NOT NULL,
    created_ts    INTEGER NOT NULL,
    expires_ts    INTEGER,
    -- Set when this token was exchanged: the token that replaced it. The old one stays usable until
    -- its replacement (or the access token issued with it) is first used.
    next_token_id INTEGER
);
CREATE INDEX refresh_tokens_device ON refresh_tokens (user_id, device_id);
CREATE INDEX refresh_tokens_next ON refresh_tokens (next_token_id);

CREATE TABLE access_tokens (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    -- SHA-256 of the token: a leaked database does not leak live credentials.
    token_hash       TEXT NOT NULL UNIQUE,
    user_id          TEXT NOT NULL,
    device_id        TEXT NOT NULL,
    created_ts       INTEGER NOT NULL,
    expires_ts       INTEGER,
    refresh_token_id INTEGER,
    used             INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX access_tokens_device ON access_tokens (user_id, device_id);

CREATE TABLE registration_tokens (
    token        TEXT PRIMARY KEY NOT NULL,
    uses_allowed INTEGER,
    pending      INTEGER NOT NULL DEFAULT 0,
    completed    INTEGER NOT NULL DEFAULT 0,
    expiry_ts    INTEGER,
    created_ts   INTEGER NOT NULL
);

CREATE TABLE uia_sessions (
    session_id         TEXT PRIMARY KEY NOT NULL,
    -- What the session authorises, e.g. "register" or "deactivate:@alice:example.org"; a session
    -- is never accepted for another purpose.
    purpose            TEXT NOT NULL,
    completed          TEXT NOT NULL,
    registration_token TEXT,
    created_ts         INTEGER NOT NULL
);
