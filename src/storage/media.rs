//! The content repository's records: media rows (local uploads and cached remote media), their
//! thumbnails and URL previews. The bytes themselves are in the object store
//! (`service::media::store`); these rows say which object (by SHA-256) each URI is.

use super::{Db, StorageResult, on_reader, on_writer};

/// One `mxc://origin/media_id`.
#[derive(Debug, Clone)]
pub struct MediaRow {
    pub origin: String,
    pub media_id: String,
    /// The local user who uploaded it; `None` for other servers' media.
    pub uploader: Option<String>,
    pub content_type: Option<String>,
    pub filename: Option<String>,
    /// `None` (with `sha256`) while a created URI waits for its upload.
    pub size: Option<i64>,
    pub sha256: Option<String>,
    pub created_ts: i64,
    pub expires_ts: Option<i64>,
    pub authenticated: bool,
    pub quarantined: bool,
    pub last_access_ts: i64,
}

/// A stored thumbnail of a media row.
#[derive(Debug, Clone)]
pub struct ThumbnailRow {
    pub width: i64,
    pub height: i64,
    pub method: String,
    pub animated: bool,
    pub content_type: String,
    pub size: i64,
    pub sha256: String,
}

/// What a user keeps uploaded.
#[derive(Debug, Clone)]
pub struct Usage {
    pub uploader: String,
    pub files: i64,
    pub bytes: i64,
}

/// `SELECT` of every media column, then `$rest`.
macro_rules! select_media {
    ($rest:literal) => {
        concat!(
            "SELECT origin, media_id, uploader, content_type, filename, size, sha256, created_ts, expires_ts, \
             authenticated, quarantined, last_access_ts FROM media ",
            $rest
        )
    };
}

/// A media row as selected by [`select_media!`].
type MediaTuple = (
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<String>,
    i64,
    Option<i64>,
    bool,
    bool,
    i64,
);

fn media_row(t: MediaTuple) -> MediaRow {
    MediaRow {
        origin: t.0,
        media_id: t.1,
        uploader: t.2,
        content_type: t.3,
        filename: t.4,
        size: t.5,
        sha256: t.6,
        created_ts: t.7,
        expires_ts: t.8,
        authenticated: t.9,
        quarantined: t.10,
        last_access_ts: t.11,
    }
}

impl Db {
    /// Records a new media row; `Conflict` if the URI exists (media IDs are random, so only a
    /// remote row fetched twice at once can collide, see [`Db::put_remote_media`]).
    pub async fn insert_media(&self, row: &MediaRow) -> StorageResult<()> {
        on_writer!(self, pool => {
            sqlx::query(
                "INSERT INTO media (origin, media_id, uploader, content_type, filename, size, sha256, created_ts, \
                 expires_ts, authenticated, quarantined, last_access_ts) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            )
            .bind(&row.origin)
            .bind(&row.media_id)
            .bind(&row.uploader)
            .bind(&row.content_type)
            .bind(&row.filename)
            .bind(row.size)
            .bind(&row.sha256)
            .bind(row.created_ts)
            .bind(row.expires_ts)
            .bind(row.authenticated)
            .bind(row.quarantined)
            .bind(row.last_access_ts)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Stores another server's media row, replacing what was cached for the URI before.
    pub async fn put_remote_media(&self, row: &MediaRow) -> StorageResult<()> {
        on_writer!(self, pool => {
            sqlx::query(
                "INSERT INTO media (origin, media_id, uploader, content_type, filename, size, sha256, created_ts, \
                 expires_ts, authenticated, quarantined, last_access_ts) \
                 VALUES ($1, $2, NULL, $3, $4, $5, $6, $7, NULL, $8, FALSE, $9) \
                 ON CONFLICT (origin, media_id) DO UPDATE SET content_type = excluded.content_type, \
                 filename = excluded.filename, size = excluded.size, sha256 = excluded.sha256, \
                 last_access_ts = excluded.last_access_ts",
            )
            .bind(&row.origin)
            .bind(&row.media_id)
            .bind(&row.content_type)
            .bind(&row.filename)
            .bind(row.size)
            .bind(&row.sha256)
            .bind(row.created_ts)
            .bind(row.authenticated)
            .bind(row.last_access_ts)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    pub async fn media(&self, origin: &str, media_id: &str) -> StorageResult<Option<MediaRow>> {
        let row = on_reader!(self, pool => {
            sqlx::query_as::<_, MediaTuple>(select_media!("WHERE origin = $1 AND media_id = $2"))
                .bind(origin)
                .bind(media_id)
                .fetch_optional(pool)
                .await?
        });
        Ok(row.map(media_row))
    }

    /// Created URIs of `uploader` still waiting for their upload at `now`.
    pub async fn count_pending_media(&self, uploader: &str, now: i64) -> StorageResult<i64> {
        let count = on_reader!(self, pool => {
            sqlx::query_scalar(
                "SELECT COUNT(*) FROM media WHERE uploader = $1 AND sha256 IS NULL AND expires_ts > $2",
            )
            .bind(uploader)
            .bind(now)
            .fetch_one(pool)
            .await?
        });
        Ok(count)
    }

    /// Fills in a created URI with its upload; false when it was uploaded already (or is gone).
    pub async fn complete_pending_media(
        &self,
        origin: &str,
        media_id: &str,
        content_type: Option<&str>,
        filename: Option<&str>,
        size: i64,
        sha256: &str,
    ) -> StorageResult<bool> {
        let updated = on_writer!(self, pool => {
            sqlx::query(
                "UPDATE media SET content_type = $3, filename = $4, size = $5, sha256 = $6, expires_ts = NULL \
                 WHERE origin = $1 AND media_id = $2 AND sha256 IS NULL",
            )
            .bind(origin)
            .bind(media_id)
            .bind(content_type)
            .bind(filename)
            .bind(size)
            .bind(sha256)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(updated == 1)
    }

    /// Created URIs whose upload never came by `now`; removed.
    pub async fn delete_expired_pending_media(&self, now: i64) -> StorageResult<u64> {
        let deleted = on_writer!(self, pool => {
            sqlx::query("DELETE FROM media WHERE sha256 IS NULL AND expires_ts <= $1")
                .bind(now)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(deleted)
    }

    /// Marks a remote row as used at `now` (for the cache's eviction order).
    pub async fn touch_media(&self, origin: &str, media_id: &str, now: i64) -> StorageResult<()> {
        on_writer!(self, pool => {
            sqlx::query("UPDATE media SET last_access_ts = $3 WHERE origin = $1 AND media_id = $2")
                .bind(origin)
                .bind(media_id)
                .bind(now)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Bytes `uploader` keeps uploaded.
    pub async fn media_usage(&self, uploader: &str) -> StorageResult<i64> {
        let bytes: Option<i64> = on_reader!(self, pool => {
            sqlx::query_scalar("SELECT CAST(SUM(size) AS BIGINT) FROM media WHERE uploader = $1")
                .bind(uploader)
                .fetch_one(pool)
                .await?
        });
        Ok(bytes.unwrap_or(0))
    }

    /// Every uploader's file count and bytes, the largest first.
    pub async fn media_usage_by_user(&self) -> StorageResult<Vec<Usage>> {
        let rows = on_reader!(self, pool => {
            sqlx::query_as::<_, (String, i64, i64)>(
                "SELECT uploader, COUNT(*) AS files, CAST(COALESCE(SUM(size), 0) AS BIGINT) AS bytes FROM media \
                 WHERE uploader IS NOT NULL GROUP BY uploader ORDER BY bytes DESC, uploader",
            )
            .fetch_all(pool)
            .await?
        });
        Ok(rows.into_iter().map(|(uploader, files, bytes)| Usage { uploader, files, bytes }).collect())
    }

    /// `uploader`'s media, the newest first.
    pub async fn media_of_user(&self, uploader: &str) -> StorageResult<Vec<MediaRow>> {
        let rows = on_reader!(self, pool => {
            sqlx::query_as::<_, MediaTuple>(select_media!("WHERE uploader = $1 ORDER BY created_ts DESC, media_id"))
                .bind(uploader)
                .fetch_all(pool)
                .await?
        });
        Ok(rows.into_iter().map(media_row).collect())
    }

    /// Quarantines (or releases) a URI; false when there is no such row.
    pub async fn set_media_quarantined(&self, origin: &str, media_id: &str, quarantined: bool) -> StorageResult<bool> {
        let updated = on_writer!(self, pool => {
            sqlx::query("UPDATE media SET quarantined = $3 WHERE origin = $1 AND media_id = $2")
                .bind(origin)
                .bind(media_id)
                .bind(quarantined)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(updated == 1)
    }

    /// Deletes a URI and its thumbnails; the SHA-256s they named (for the caller to delete the
    /// objects no other row names), or `None` when there was no such row.
    pub async fn delete_media(&self, origin: &str, media_id: &str) -> StorageResult<Option<Vec<String>>> {
        let shas = on_writer!(self, pool => {
            let mut tx = pool.begin().await?;
            let main: Option<Option<String>> =
                sqlx::query_scalar("DELETE FROM media WHERE origin = $1 AND media_id = $2 RETURNING sha256")
                    .bind(origin)
                    .bind(media_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            let thumbs: Vec<String> = sqlx::query_scalar(
                "DELETE FROM media_thumbnails WHERE origin = $1 AND media_id = $2 RETURNING sha256",
            )
            .bind(origin)
            .bind(media_id)
            .fetch_all(&mut *tx)
            .await?;
            tx.commit().await?;
            main.map(|sha| sha.into_iter().chain(thumbs).collect::<Vec<_>>())
        });
        Ok(shas)
    }

    /// Whether any media or thumbnail row still names the object `sha256`.
    pub async fn media_object_referenced(&self, sha256: &str) -> StorageResult<bool> {
        let found: Option<i64> = on_writer!(self, pool => {
            sqlx::query_scalar(
                "SELECT 1 FROM media WHERE sha256 = $1 UNION ALL SELECT 1 FROM media_thumbnails WHERE sha256 = $1 \
                 LIMIT 1",
            )
            .bind(sha256)
            .fetch_optional(pool)
            .await?
        });
        Ok(found.is_some())
    }

    /// Cached remote URIs last used before `before_ts` (all of them with `i64::MAX`).
    pub async fn remote_media_used_before(&self, before_ts: i64) -> StorageResult<Vec<(String, String)>> {
        let rows = on_reader!(self, pool => {
            sqlx::query_as::<_, (String, String)>(
                "SELECT origin, media_id FROM media WHERE uploader IS NULL AND last_access_ts < $1 \
                 ORDER BY last_access_ts",
            )
            .bind(before_ts)
            .fetch_all(pool)
            .await?
        });
        Ok(rows)
    }

    /// Bytes of cached remote media, thumbnails included.
    pub async fn remote_media_bytes(&self) -> StorageResult<i64> {
        let bytes: Option<i64> = on_reader!(self, pool => {
            sqlx::query_scalar(
                "SELECT CAST(COALESCE((SELECT SUM(size) FROM media WHERE uploader IS NULL), 0) + \
                 COALESCE((SELECT SUM(t.size) FROM media_thumbnails t JOIN media m \
                 ON m.origin = t.origin AND m.media_id = t.media_id WHERE m.uploader IS NULL), 0) AS BIGINT)",
            )
            .fetch_one(pool)
            .await?
        });
        Ok(bytes.unwrap_or(0))
    }

    /// The `limit` least recently used cached remote URIs, with their sizes.
    pub async fn least_used_remote_media(&self, limit: i64) -> StorageResult<Vec<(String, String, i64)>> {
        let rows = on_reader!(self, pool => {
            sqlx::query_as::<_, (String, String, i64)>(
                "SELECT origin, media_id, COALESCE(size, 0) FROM media WHERE uploader IS NULL \
                 ORDER BY last_access_ts LIMIT $1",
            )
            .bind(limit)
            .fetch_all(pool)
            .await?
        });
        Ok(rows)
    }

    pub async fn media_thumbnails(&self, origin: &str, media_id: &str) -> StorageResult<Vec<ThumbnailRow>> {
        let rows = on_reader!(self, pool => {
            sqlx::query_as::<_, (i64, i64, String, bool, String, i64, String)>(
                "SELECT width, height, method, animated, content_type, size, sha256 FROM media_thumbnails \
                 WHERE origin = $1 AND media_id = $2 ORDER BY width, height",
            )
            .bind(origin)
            .bind(media_id)
            .fetch_all(pool)
            .await?
        });
        Ok(rows
            .into_iter()
            .map(|(width, height, method, animated, content_type, size, sha256)| ThumbnailRow {
                width,
                height,
                method,
                animated,
                content_type,
                size,
                sha256,
            })
            .collect())
    }

    /// Records a thumbnail; one generated twice at once is kept once.
    pub async fn insert_media_thumbnail(
        &self,
        origin: &str,
        media_id: &str,
        thumb: &ThumbnailRow,
    ) -> StorageResult<()> {
        on_writer!(self, pool => {
            sqlx::query(
                "INSERT INTO media_thumbnails (origin, media_id, width, height, method, animated, content_type, size, \
                 sha256) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (origin, media_id, width, height, method, animated) DO NOTHING",
            )
            .bind(origin)
            .bind(media_id)
            .bind(thumb.width)
            .bind(thumb.height)
            .bind(&thumb.method)
            .bind(thumb.animated)
            .bind(&thumb.content_type)
            .bind(thumb.size)
            .bind(&thumb.sha256)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// A cached URL preview still valid at `now`.
    pub async fn url_preview(&self, url: &str, now: i64) -> StorageResult<Option<String>> {
        let json = on_reader!(self, pool => {
            sqlx::query_scalar("SELECT og_json FROM media_url_previews WHERE url = $1 AND expires_ts > $2")
                .bind(url)
                .bind(now)
                .fetch_optional(pool)
                .await?
        });
        Ok(json)
    }

    pub async fn put_url_preview(&self, url: &str, og_json: &str, expires_ts: i64) -> StorageResult<()> {
        on_writer!(self, pool => {
            sqlx::query(
                "INSERT INTO media_url_previews (url, og_json, expires_ts) VALUES ($1, $2, $3) \
                 ON CONFLICT (url) DO UPDATE SET og_json = excluded.og_json, expires_ts = excluded.expires_ts",
            )
            .bind(url)
            .bind(og_json)
            .bind(expires_ts)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Forgets previews expired at `now`.
    pub async fn prune_url_previews(&self, now: i64) -> StorageResult<u64> {
        let deleted = on_writer!(self, pool => {
            sqlx::query("DELETE FROM media_url_previews WHERE expires_ts <= $1")
                .bind(now)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(deleted)
    }
}
