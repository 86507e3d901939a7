-- Full-text search over message bodies, room names and topics (`POST /search`), in SQLite's
-- FTS5 with the Porter stemmer. The row ID is the event's stream position. Triggers keep the
-- index in step with `events`: soft-failed events are never indexed, redacted ones leave it.
CREATE VIRTUAL TABLE event_search USING fts5 (body, tokenize = 'porter unicode61 remove_diacritics 2');

CREATE TRIGGER event_search_insert AFTER INSERT ON events
WHEN NEW.soft_failed = 0 AND NEW.redacted_by IS NULL
    AND NEW.event_type IN ('m.room.message', 'm.room.name', 'm.room.topic')
BEGIN
    INSERT INTO event_search (rowid, body)
    SELECT NEW.stream_pos, text FROM (
        SELECT json_extract(NEW.json, CASE NEW.event_type
            WHEN 'm.room.message' THEN '$.content.body'
            WHEN 'm.room.name' THEN '$.content.name'
            ELSE '$.content.topic' END) AS text
    ) WHERE typeof(text) = 'text' AND text <> '';
END;

CREATE TRIGGER event_search_redact AFTER UPDATE OF redacted_by ON events
WHEN NEW.redacted_by IS NOT NULL AND OLD.redacted_by IS NULL
BEGIN
    DELETE FROM event_search WHERE rowid = NEW.stream_pos;
END;

CREATE TRIGGER event_search_delete AFTER DELETE ON events
BEGIN
    DELETE FROM event_search WHERE rowid = OLD.stream_pos;
END;

-- What is already stored.
INSERT INTO event_search (rowid, body)
SELECT stream_pos, text FROM (
    SELECT stream_pos, json_extract(json, CASE event_type
        WHEN 'm.room.message' THEN '$.content.body'
        WHEN 'm.room.name' THEN '$.content.name'
        ELSE '$.content.topic' END) AS text
    FROM events
    WHERE soft_failed = 0 AND redacted_by IS NULL
        AND event_type IN ('m.room.message', 'm.room.name', 'm.room.topic')
) WHERE typeof(text) = 'text' AND text <> '';
