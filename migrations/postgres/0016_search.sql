-- Full-text search over message bodies, room names and topics (`POST /search`): a tsvector per
-- event (the `english` configuration: stemming and stop words) under a GIN index. Triggers keep
-- the index in step with `events`: soft-failed events are never indexed, redacted ones leave it.
CREATE TABLE event_search (
    stream_pos BIGINT PRIMARY KEY,
    vector TSVECTOR NOT NULL
);
CREATE INDEX event_search_vector ON event_search USING GIN (vector);

-- The searchable text of an event, or NULL.
CREATE FUNCTION event_search_text(event_type TEXT, json TEXT) RETURNS TEXT
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN jsonb_typeof(value) = 'string' THEN value #>> '{}' END
    FROM (SELECT (json::jsonb -> 'content') -> CASE event_type
        WHEN 'm.room.message' THEN 'body'
        WHEN 'm.room.name' THEN 'name'
        ELSE 'topic' END AS value) AS field
$$;

CREATE FUNCTION event_search_index() RETURNS TRIGGER
LANGUAGE plpgsql AS $$
DECLARE
    text TEXT;
BEGIN
    IF TG_OP = 'DELETE' THEN
        DELETE FROM event_search WHERE stream_pos = OLD.stream_pos;
        RETURN OLD;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        IF NEW.redacted_by IS NOT NULL AND OLD.redacted_by IS NULL THEN
            DELETE FROM event_search WHERE stream_pos = NEW.stream_pos;
        END IF;
        RETURN NEW;
    END IF;
    IF NOT NEW.soft_failed AND NEW.redacted_by IS NULL
        AND NEW.event_type IN ('m.room.message', 'm.room.name', 'm.room.topic') THEN
        text := event_search_text(NEW.event_type, NEW.json);
        IF text IS NOT NULL AND text <> '' THEN
            INSERT INTO event_search (stream_pos, vector) VALUES (NEW.stream_pos, to_tsvector('english', text))
            ON CONFLICT (stream_pos) DO NOTHING;
        END IF;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER event_search_index AFTER INSERT OR DELETE OR UPDATE OF redacted_by ON events
FOR EACH ROW EXECUTE FUNCTION event_search_index();

-- What is already stored.
INSERT INTO event_search (stream_pos, vector)
SELECT stream_pos, to_tsvector('english', text) FROM (
    SELECT stream_pos, event_search_text(event_type, json) AS text
    FROM events
    WHERE NOT soft_failed AND redacted_by IS NULL
        AND event_type IN ('m.room.message', 'm.room.name', 'm.room.topic')
) AS texts WHERE text IS NOT NULL AND text <> '';
