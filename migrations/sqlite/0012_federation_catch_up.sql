-- Catch-up for a destination that stays unreachable: its queue is bounded. Past the bound only the
-- newest queued event of each room is kept (the destination pulls what lies before it with
-- get_missing_events and backfill), so the room of each row is recorded. Rows queued before
-- this migration have none and are kept one by one.
ALTER TABLE federation_outbox ADD COLUMN room_id TEXT;
