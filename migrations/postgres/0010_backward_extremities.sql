-- History across servers (issue 9): the room graph's backward extremities, where history we hold
-- stops. One row per timeline event and each of its prev events we do not hold — neither in
-- `events` nor rejected (an outlier has no place in the timeline, so it counts as missing). A
-- room joined through send_join starts with one: its join, whose history is unknown. Rows are
-- written with the events by the stream writer and go when the missing event arrives.
CREATE TABLE room_backward_extremities (
    room_id    TEXT NOT NULL,
    event_id   TEXT NOT NULL,
    missing_id TEXT NOT NULL,
    PRIMARY KEY (event_id, missing_id)
);
CREATE INDEX room_backward_extremities_missing ON room_backward_extremities (missing_id);
CREATE INDEX room_backward_extremities_room ON room_backward_extremities (room_id);

-- The gaps of the rooms stored so far.
INSERT INTO room_backward_extremities (room_id, event_id, missing_id)
SELECT DISTINCT e.room_id, e.event_id, p.value
FROM events e, jsonb_array_elements_text(e.json::jsonb -> 'prev_events') AS p(value)
WHERE NOT EXISTS (SELECT 1 FROM events k WHERE k.event_id = p.value)
  AND NOT EXISTS (SELECT 1 FROM rejected_events r WHERE r.event_id = p.value);
