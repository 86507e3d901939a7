-- Search filters without reading `events`: each indexed event's room, sender and type beside
-- its tsvector, so the room, sender and type filters of a search are checked on the rows the
-- GIN scan fetches anyway instead of on whole stored events.
ALTER TABLE event_search
    ADD COLUMN room_id TEXT,
    ADD COLUMN sender TEXT,
    ADD COLUMN event_type TEXT;

UPDATE event_search s SET room_id = e.room_id, sender = e.sender, event_type = e.event_type
FROM events e WHERE e.stream_pos = s.stream_pos;

ALTER TABLE event_search
    ALTER COLUMN room_id SET NOT NULL,
    ALTER COLUMN sender SET NOT NULL,
    ALTER COLUMN event_type SET NOT NULL;

CREATE OR REPLACE FUNCTION event_search_index() RETURNS TRIGGER
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
            INSERT INTO event_search (stream_pos, vector, room_id, sender, event_type)
            VALUES (NEW.stream_pos, to_tsvector('english', text), NEW.room_id, NEW.sender, NEW.event_type)
            ON CONFLICT (stream_pos) DO NOTHING;
        END IF;
    END IF;
    RETURN NEW;
END
$$;
