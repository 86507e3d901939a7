-- Push notifications: the pushers clients set (`/pushers/set`) and how far the push sender has
-- read the event stream. Push rules are account data (`m.push_rules`), as clients see them.

-- One pusher per (app, pushkey, user). `device_id` is the device whose access token set it:
-- removing the device removes its pushers, and the sender skips what that device already got.
CREATE TABLE pushers (
    user_id TEXT NOT NULL,
    app_id TEXT NOT NULL,
    pushkey TEXT NOT NULL,
    device_id TEXT,
    -- The pusher as clients read it back (`GET /pushers`): kind, data, names, lang.
    pusher_json TEXT NOT NULL,
    -- When the pushkey was last set (ms).
    pushkey_ts INTEGER NOT NULL,
    PRIMARY KEY (app_id, pushkey, user_id)
);
CREATE INDEX pushers_user ON pushers (user_id);

-- The last stream position the push sender has evaluated: after a restart it goes on from there.
CREATE TABLE push_progress (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    pos INTEGER NOT NULL
);
