-- Streamed answers (Accept: text/event-stream): microseconds from the request to its
-- first text, NULL for answers that did not stream. Added to the partitioned parent,
-- so every partition, existing or future, has it.
ALTER TABLE request_events ADD COLUMN first_delta_us int8;
