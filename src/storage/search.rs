//! Full-text search over events (`POST /search`), in each engine's own index: SQLite FTS5
//! (`event_search`, BM25 ranking) and PostgreSQL tsvector under GIN (`ts_rank_cd`). Migration
//! 0016 keeps the index in step with `events`; this module only reads it.

use ruma::OwnedRoomId;

use super::{Backend, Db, StorageResult, on_reader};

/// How results are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchOrder {
    /// Best match first; pages by offset.
    Rank,
    /// Newest first; pages by stream position.
    Recent,
}

/// One full-text query.
#[derive(Debug, Clone)]
pub struct SearchQuery<'a> {
    /// The words to find: all of them, the last one also as a prefix.
    pub words: &'a [String],
    pub rooms: &'a [OwnedRoomId],
    /// Event types searched (`m.room.message` for `content.body` and so on).
    pub types: &'a [&'a str],
    pub senders: Option<&'a [String]>,
    pub not_senders: &'a [String],
    pub order: SearchOrder,
    /// Recent order: only events before this stream position.
    pub before: Option<i64>,
    /// Rank order: hits skipped.
    pub offset: i64,
    pub limit: i64,
}

/// A match: the event's stream position and its rank (higher is better).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SearchHit {
    pub stream_pos: i64,
    pub rank: f64,
}

/// The words as an FTS5 query: each a quoted string (so nothing in them is query syntax), all
/// required, the last one a prefix too.
fn fts5_query(words: &[String]) -> String {
    let mut query = String::new();
    for (i, word) in words.iter().enumerate() {
        if i > 0 {
            query.push(' ');
        }
        query.push('"');
        query.push_str(&word.replace('"', "\"\""));
        query.push('"');
        if i + 1 == words.len() {
            query.push('*');
        }
    }
    query
}

/// The words as a `to_tsquery` expression: each a quoted lexeme, joined with `&`, the last
/// one a prefix (`:*`).
fn tsquery(words: &[String]) -> String {
    let quoted: Vec<String> = words
        .iter()
        .enumerate()
        .map(|(i, word)| {
            let word = word.replace('\'', "''").replace('\\', "\\\\");
            if i + 1 == words.len() { format!("'{word}':*") } else { format!("'{word}'") }
        })
        .collect();
    quoted.join(" & ")
}

/// `$first, $first+1, …` for `count` bound parameters.
fn placeholders(first: usize, count: usize) -> String {
    (first..first + count).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ")
}

/// The filter part shared by the hit and count queries, with the parameters it binds after
/// the query text, in order.
fn conditions(q: &SearchQuery<'_>, first: usize) -> (String, Vec<String>) {
    let mut sql = String::new();
    let mut binds: Vec<String> = Vec::new();
    let mut next = first;
    let mut list = |sql: &mut String, column: &str, values: Vec<String>, negate: bool| {
        sql.push_str(&format!(
            " AND e.{column} {}IN ({})",
            if negate { "NOT " } else { "" },
            placeholders(next, values.len())
        ));
        next += values.len();
        binds.extend(values);
    };
    list(&mut sql, "room_id", q.rooms.iter().map(|r| r.as_str().to_owned()).collect(), false);
    list(&mut sql, "event_type", q.types.iter().map(|t| (*t).to_owned()).collect(), false);
    if let Some(senders) = q.senders {
        list(&mut sql, "sender", senders.to_vec(), false);
    }
    if !q.not_senders.is_empty() {
        list(&mut sql, "sender", q.not_senders.to_vec(), true);
    }
    (sql, binds)
}

impl Db {
    /// The matches of `q`, in its order, at most `q.limit`.
    pub async fn search_events(&self, q: &SearchQuery<'_>) -> StorageResult<Vec<SearchHit>> {
        if q.words.is_empty() || q.rooms.is_empty() || q.types.is_empty() {
            return Ok(Vec::new());
        }
        let sqlite = matches!(*self.backend, Backend::Sqlite { .. });
        let (filter, binds) = conditions(q, 4);
        let before = q.before.unwrap_or(i64::MAX);
        let sql = if sqlite {
            let order = match q.order {
                SearchOrder::Rank => "score DESC, s.rowid DESC",
                SearchOrder::Recent => "s.rowid DESC",
            };
            format!(
                "SELECT s.rowid, -bm25(event_search) AS score FROM event_search s
                 JOIN events e ON e.stream_pos = s.rowid
                 WHERE event_search MATCH $1 AND s.rowid < $2 {filter}
                 ORDER BY {order} LIMIT $3 OFFSET {}",
                q.offset.max(0)
            )
        } else {
            let order = match q.order {
                SearchOrder::Rank => "rank DESC, s.stream_pos DESC",
                SearchOrder::Recent => "s.stream_pos DESC",
            };
            format!(
                "SELECT s.stream_pos, ts_rank_cd(s.vector, q.query)::FLOAT8 AS rank
                 FROM event_search s JOIN events e ON e.stream_pos = s.stream_pos,
                      to_tsquery('english', $1) AS q(query)
                 WHERE s.vector @@ q.query AND s.stream_pos < $2 {filter}
                 ORDER BY {order} LIMIT $3 OFFSET {}",
                q.offset.max(0)
            )
        };
        let text = if sqlite { fts5_query(q.words) } else { tsquery(q.words) };
        let sql = sqlx::AssertSqlSafe(sql);
        let rows: Vec<(i64, f64)> = on_reader!(self, pool => {
            let mut query = sqlx::query_as(sql).bind(&text).bind(before).bind(q.limit);
            for value in &binds {
                query = query.bind(value);
            }
            query.fetch_all(pool).await?
        });
        Ok(rows.into_iter().map(|(stream_pos, rank)| SearchHit { stream_pos, rank }).collect())
    }

    /// How many events match `q` (paging aside).
    pub async fn search_count(&self, q: &SearchQuery<'_>) -> StorageResult<i64> {
        if q.words.is_empty() || q.rooms.is_empty() || q.types.is_empty() {
            return Ok(0);
        }
        let sqlite = matches!(*self.backend, Backend::Sqlite { .. });
        let (filter, binds) = conditions(q, 2);
        let sql = if sqlite {
            format!(
                "SELECT COUNT(*) FROM event_search s JOIN events e ON e.stream_pos = s.rowid
                 WHERE event_search MATCH $1 {filter}"
            )
        } else {
            format!(
                "SELECT COUNT(*) FROM event_search s JOIN events e ON e.stream_pos = s.stream_pos
                 WHERE s.vector @@ to_tsquery('english', $1) {filter}"
            )
        };
        let text = if sqlite { fts5_query(q.words) } else { tsquery(q.words) };
        let sql = sqlx::AssertSqlSafe(sql);
        let count: i64 = on_reader!(self, pool => {
            let mut query = sqlx::query_scalar(sql).bind(&text);
            for value in &binds {
                query = query.bind(value);
            }
            query.fetch_one(pool).await?
        });
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_quote_every_word_and_prefix_the_last() {
        let words = ["cake".to_owned(), "a\"b".to_owned(), "choc".to_owned()];
        assert_eq!(fts5_query(&words), "\"cake\" \"a\"\"b\" \"choc\"*");
        let words = ["it's".to_owned(), "x\\".to_owned(), "tart".to_owned()];
        assert_eq!(tsquery(&words), "'it''s' & 'x\\\\' & 'tart':*");
    }
}
