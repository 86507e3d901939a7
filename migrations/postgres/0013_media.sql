-- The content repository. One row per mxc:// URI, local (`origin` is this server) or cached from
-- another server. The bytes live in the object store under the SHA-256 of the content, so rows
-- with the same `sha256` share one object; an object is deleted with the last row naming it.
-- `sha256` and `size` are NULL while a URI from /media/v1/create waits for its upload (until
-- `expires_ts`).
CREATE TABLE media (
    origin TEXT NOT NULL,
    media_id TEXT NOT NULL,
    -- The local uploader; NULL for remote media.
    uploader TEXT,
    content_type TEXT,
    filename TEXT,
    size BIGINT,
    sha256 TEXT,
    created_ts BIGINT NOT NULL,
    expires_ts BIGINT,
    -- Stored while `media.enable_authenticated_media` was on: the legacy unauthenticated
    -- endpoints do not serve it.
    authenticated BOOLEAN NOT NULL,
    quarantined BOOLEAN NOT NULL DEFAULT FALSE,
    last_access_ts BIGINT NOT NULL,
    PRIMARY KEY (origin, media_id)
);
CREATE INDEX media_uploader ON media (uploader, created_ts);
CREATE INDEX media_sha256 ON media (sha256);
CREATE INDEX media_remote_access ON media (last_access_ts) WHERE uploader IS NULL;

-- Thumbnails of a media row, each its own object (by SHA-256 too).
CREATE TABLE media_thumbnails (
    origin TEXT NOT NULL,
    media_id TEXT NOT NULL,
    width BIGINT NOT NULL,
    height BIGINT NOT NULL,
    -- "crop" or "scale", and "animated" thumbnails apart from still ones.
    method TEXT NOT NULL,
    animated BOOLEAN NOT NULL,
    content_type TEXT NOT NULL,
    size BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (origin, media_id, width, height, method, animated)
);
CREATE INDEX media_thumbnails_sha256 ON media_thumbnails (sha256);

-- URL previews served, by URL, until `expires_ts`.
CREATE TABLE media_url_previews (
    url TEXT PRIMARY KEY,
    og_json TEXT NOT NULL,
    expires_ts BIGINT NOT NULL
);
