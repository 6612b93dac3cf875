-- Erasure by user: who was erased, when. Events of that user still in the queue at the
-- time of the erasure are stored without their user hash (see store.rs); the row
-- itself holds only the keyed hash, as the audit log does.
CREATE TABLE erased_users (
    user_hash  text        PRIMARY KEY,
    erased_at  timestamptz NOT NULL
);

-- An erasure finds a user's events without scanning every partition.
CREATE INDEX request_events_user_hash ON request_events (user_hash) WHERE user_hash IS NOT NULL;
