//! Full-text search over events (`POST /search`), in each engine's own index: SQLite FTS5
//! (`event_search`, BM25 ranking) and PostgreSQL tsvector under GIN (`ts_rank_cd`). Migrations
//! 0016 and 0017 keep the index, and each indexed event's room, sender and type (SQLite:
//! `event_search_filter`; PostgreSQL: beside the vector), in step with `events`; this module
//! only reads them.
//!
//! A word in a tenth of a million messages must not cost a tenth of a million row visits per
//! request, so two things are bounded by a window of matches rather than by the match count:
//! rank order ranks the newest `rank_window` matches together, then the next `rank_window`
//! below them, and so on (within a block, best first; for words that common, rank among
//! matches a year apart means little), and the count is exact up to `exact_count_up_to`
//! matches, beyond which it scales the share of the newest that many which pass the filters
//! to the index's match count (the spec asks for an approximate count).

use ruma::OwnedRoomId;

use super::{Backend, Db, StorageResult, on_reader};

/// Where a search reads from: the first page or a page's `next_batch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchFrom {
    /// Best match first: the block of matches below stream position `below` (the newest
    /// `rank_window` of them), skipping the first `skip` of its ranked hits.
    Rank { below: i64, skip: i64 },
    /// Newest first: matches below stream position `below`.
    Recent { below: i64 },
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
    pub from: SearchFrom,
    pub limit: i64,
    /// Rank order: matches ranked together in one block.
    pub rank_window: i64,
}

/// A match: the event's stream position, its rank (higher is better) and where a search
/// continues after it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SearchHit {
    pub stream_pos: i64,
    pub rank: f64,
    pub next: SearchFrom,
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
fn conditions(q: &SearchQuery<'_>, alias: &str, first: usize) -> (String, Vec<String>) {
    let mut sql = String::new();
    let mut binds: Vec<String> = Vec::new();
    let mut next = first;
    let mut list = |sql: &mut String, column: &str, values: Vec<String>, negate: bool| {
        sql.push_str(&format!(
            " AND {alias}.{column} {}IN ({})",
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
        if q.words.is_empty() || q.rooms.is_empty() || q.types.is_empty() || q.limit <= 0 {
            return Ok(Vec::new());
        }
        match q.from {
            SearchFrom::Recent { below } => self.search_recent(q, below).await,
            SearchFrom::Rank { mut below, mut skip } => {
                // Block after block until the page is full or the matches end.
                let mut hits = Vec::new();
                loop {
                    let block = self.search_rank_block(q, below, skip, q.limit - hits.len() as i64).await?;
                    let Some(&(_, _, size, lowest)) = block.first() else { break };
                    for (i, (stream_pos, rank, _, _)) in block.into_iter().enumerate() {
                        let taken = skip + i as i64 + 1;
                        let next = if taken == size && size == q.rank_window {
                            SearchFrom::Rank { below: lowest, skip: 0 }
                        } else {
                            SearchFrom::Rank { below, skip: taken }
                        };
                        hits.push(SearchHit { stream_pos, rank, next });
                    }
                    // A page that is not full used up its block: go on below it unless that
                    // was the last (short) block.
                    if hits.len() as i64 >= q.limit || size < q.rank_window {
                        break;
                    }
                    (below, skip) = (lowest, 0);
                }
                Ok(hits)
            }
        }
    }

    /// Newest first below `below`: the index walks its matches backwards and stops at the
    /// page's end.
    async fn search_recent(&self, q: &SearchQuery<'_>, below: i64) -> StorageResult<Vec<SearchHit>> {
        let sqlite = matches!(*self.backend, Backend::Sqlite { .. });
        let (filter, binds) = conditions(q, if sqlite { "f" } else { "s" }, 4);
        let sql = if sqlite {
            format!(
                "SELECT s.rowid, -bm25(event_search) FROM event_search s
                 JOIN event_search_filter f ON f.stream_pos = s.rowid
                 WHERE event_search MATCH $1 AND s.rowid < $2 {filter}
                 ORDER BY s.rowid DESC LIMIT $3"
            )
        } else {
            format!(
                "SELECT s.stream_pos, ts_rank_cd(s.vector, q.query)::FLOAT8
                 FROM event_search s, to_tsquery('english', $1) AS q(query)
                 WHERE s.vector @@ q.query AND s.stream_pos < $2 {filter}
                 ORDER BY s.stream_pos DESC LIMIT $3"
            )
        };
        let text = if sqlite { fts5_query(q.words) } else { tsquery(q.words) };
        let sql = sqlx::AssertSqlSafe(sql);
        let rows: Vec<(i64, f64)> = on_reader!(self, pool => {
            let mut query = sqlx::query_as(sql).bind(&text).bind(below).bind(q.limit);
            for value in &binds {
                query = query.bind(value);
            }
            query.fetch_all(pool).await?
        });
        Ok(rows
            .into_iter()
            .map(|(stream_pos, rank)| SearchHit { stream_pos, rank, next: SearchFrom::Recent { below: stream_pos } })
            .collect())
    }

    /// One block of rank order: the newest `rank_window` matches below `below`, best first,
    /// `limit` of them after `skip`; each row also carries the block's size and its lowest
    /// stream position (where the next block starts).
    async fn search_rank_block(
        &self,
        q: &SearchQuery<'_>,
        below: i64,
        skip: i64,
        limit: i64,
    ) -> StorageResult<Vec<(i64, f64, i64, i64)>> {
        let sqlite = matches!(*self.backend, Backend::Sqlite { .. });
        let (filter, binds) = conditions(q, if sqlite { "f" } else { "s" }, 5);
        let sql = if sqlite {
            format!(
                "SELECT pos, score, COUNT(*) OVER (), MIN(pos) OVER () FROM (
                     SELECT s.rowid AS pos, -bm25(event_search) AS score FROM event_search s
                     JOIN event_search_filter f ON f.stream_pos = s.rowid
                     WHERE event_search MATCH $1 AND s.rowid < $2 {filter}
                     ORDER BY s.rowid DESC LIMIT $3
                 ) ORDER BY score DESC, pos DESC LIMIT $4 OFFSET {}",
                skip.max(0)
            )
        } else {
            format!(
                "SELECT pos, score, COUNT(*) OVER (), MIN(pos) OVER () FROM (
                     SELECT s.stream_pos AS pos, ts_rank_cd(s.vector, q.query)::FLOAT8 AS score
                     FROM event_search s, to_tsquery('english', $1) AS q(query)
                     WHERE s.vector @@ q.query AND s.stream_pos < $2 {filter}
                     ORDER BY s.stream_pos DESC LIMIT $3
                 ) AS block ORDER BY score DESC, pos DESC LIMIT $4 OFFSET {}",
                skip.max(0)
            )
        };
        let text = if sqlite { fts5_query(q.words) } else { tsquery(q.words) };
        let sql = sqlx::AssertSqlSafe(sql);
        let rows: Vec<(i64, f64, i64, i64)> = on_reader!(self, pool => {
            let mut query = sqlx::query_as(sql).bind(&text).bind(below).bind(q.rank_window).bind(limit);
            for value in &binds {
                query = query.bind(value);
            }
            query.fetch_all(pool).await?
        });
        Ok(rows)
    }

    /// How many events match `q` (paging aside): exact up to `exact_up_to` matches in the
    /// index, beyond that the index's match count scaled by the share of its newest
    /// `exact_up_to` that pass the filters.
    pub async fn search_count(&self, q: &SearchQuery<'_>, exact_up_to: i64) -> StorageResult<i64> {
        if q.words.is_empty() || q.rooms.is_empty() || q.types.is_empty() {
            return Ok(0);
        }
        let sqlite = matches!(*self.backend, Backend::Sqlite { .. });
        let text = if sqlite { fts5_query(q.words) } else { tsquery(q.words) };
        let total_sql = if sqlite {
            "SELECT COUNT(*) FROM event_search WHERE event_search MATCH $1"
        } else {
            "SELECT COUNT(*) FROM event_search WHERE vector @@ to_tsquery('english', $1)"
        };
        let total: i64 = on_reader!(self, pool => sqlx::query_scalar(total_sql).bind(&text).fetch_one(pool).await?);
        if total == 0 {
            return Ok(0);
        }
        let sampled = total.min(exact_up_to.max(1));
        let (filter, binds) = conditions(q, if sqlite { "f" } else { "s" }, 3);
        let sql = if sqlite {
            format!(
                "SELECT COUNT(*) FROM (
                     SELECT rowid FROM event_search WHERE event_search MATCH $1 ORDER BY rowid DESC LIMIT $2
                 ) s JOIN event_search_filter f ON f.stream_pos = s.rowid WHERE TRUE {filter}"
            )
        } else {
            format!(
                "SELECT COUNT(*) FROM (
                     SELECT stream_pos, room_id, sender, event_type FROM event_search
                     WHERE vector @@ to_tsquery('english', $1)
                     ORDER BY stream_pos DESC LIMIT $2
                 ) AS s WHERE TRUE {filter}"
            )
        };
        let sql = sqlx::AssertSqlSafe(sql);
        let passing: i64 = on_reader!(self, pool => {
            let mut query = sqlx::query_scalar(sql).bind(&text).bind(sampled);
            for value in &binds {
                query = query.bind(value);
            }
            query.fetch_one(pool).await?
        });
        if sampled == total {
            return Ok(passing);
        }
        Ok(((passing as f64) * (total as f64) / (sampled as f64)).round() as i64)
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
