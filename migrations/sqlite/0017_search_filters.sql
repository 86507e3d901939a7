-- Search filters without reading `events`: each indexed event's room, sender and type in a
-- narrow table keyed like `event_search`, so the room, sender and type filters of a search
-- touch small rows instead of whole stored events (a million events are a gigabyte of JSON;
-- this table is a few per cent of that). The triggers of 0016 are replaced by ones that keep
-- both in step.
CREATE TABLE event_search_filter (
    stream_pos INTEGER PRIMARY KEY NOT NULL,
    room_id    TEXT NOT NULL,
    sender     TEXT NOT NULL,
    event_type TEXT NOT NULL
);

DROP TRIGGER event_search_insert;
DROP TRIGGER event_search_redact;
DROP TRIGGER event_search_delete;

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
    INSERT INTO event_search_filter (stream_pos, room_id, sender, event_type)
    SELECT NEW.stream_pos, NEW.room_id, NEW.sender, NEW.event_type
    WHERE EXISTS (SELECT 1 FROM event_search WHERE rowid = NEW.stream_pos);
END;

CREATE TRIGGER event_search_redact AFTER UPDATE OF redacted_by ON events
WHEN NEW.redacted_by IS NOT NULL AND OLD.redacted_by IS NULL
BEGIN
    DELETE FROM event_search WHERE rowid = NEW.stream_pos;
    DELETE FROM event_search_filter WHERE stream_pos = NEW.stream_pos;
END;

CREATE TRIGGER event_search_delete AFTER DELETE ON events
BEGIN
    DELETE FROM event_search WHERE rowid = OLD.stream_pos;
    DELETE FROM event_search_filter WHERE stream_pos = OLD.stream_pos;
END;

-- What is already indexed.
INSERT INTO event_search_filter (stream_pos, room_id, sender, event_type)
SELECT e.stream_pos, e.room_id, e.sender, e.event_type
FROM event_search s JOIN events e ON e.stream_pos = s.rowid;
