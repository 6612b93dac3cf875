-- narrative-cache analytics schema. Applied by the `analytics` service at start-up
-- (sqlx migrations); gateways only read it. docs/analytics.md describes every table.
--
-- Events are partitioned by day on `at`. The analytics service creates each day's
-- partition ahead of time and drops those older than EVENT_RETENTION; a row outside
-- every partition lands in the default one, so no event is ever refused.

CREATE TABLE request_events (
    id              uuid        NOT NULL,
    at              timestamptz NOT NULL,
    outcome         text        NOT NULL
        CHECK (outcome IN ('hit_l1', 'hit_l2', 'stale', 'miss', 'fallback', 'error')),
    latency_us      bigint      NOT NULL,
    engine_version  text        NOT NULL,
    prompt_hash     text        NOT NULL,
    classification  text        NOT NULL,
    primary_system  text        NOT NULL,
    client          text        NOT NULL,
    -- The keyed hash of the user id (never the id itself), when one was sent.
    user_hash       text,
    key_digest      text        NOT NULL,
    -- sha256 of the canonical profile's JSON: the same across engine versions.
    profile_digest  text        NOT NULL,
    -- What the answered entry took to generate; a hit saves exactly that.
    entry_tokens    bigint      NOT NULL,
    entry_cost_usd  numeric(20, 10) NOT NULL,
    PRIMARY KEY (id, at)
) PARTITION BY RANGE (at);

CREATE TABLE request_events_default PARTITION OF request_events DEFAULT;
CREATE INDEX request_events_at ON request_events USING brin (at);

CREATE TABLE generation_events (
    id           uuid        NOT NULL,
    at           timestamptz NOT NULL,
    model        text        NOT NULL,
    tokens_in    bigint      NOT NULL,
    tokens_out   bigint      NOT NULL,
    cost_usd     numeric(20, 10) NOT NULL,
    duration_ms  bigint      NOT NULL,
    attempts     integer     NOT NULL,
    outcome      text        NOT NULL CHECK (outcome IN ('ok', 'failed')),
    trigger      text        NOT NULL CHECK (trigger IN ('miss', 'refresh', 'prewarm')),
    key_digest   text        NOT NULL,
    PRIMARY KEY (id, at)
) PARTITION BY RANGE (at);

CREATE TABLE generation_events_default PARTITION OF generation_events DEFAULT;
CREATE INDEX generation_events_at ON generation_events USING brin (at);

-- Rollups, maintained in the same statement that inserts the events, from the rows
-- that statement really inserted: a redelivered batch adds nothing.
CREATE TABLE request_rollup_minute (
    bucket          timestamptz PRIMARY KEY,
    requests        bigint NOT NULL,
    hits_l1         bigint NOT NULL,
    hits_l2         bigint NOT NULL,
    stale           bigint NOT NULL,
    misses          bigint NOT NULL,
    fallbacks       bigint NOT NULL,
    errors          bigint NOT NULL,
    latency_us_sum  bigint NOT NULL,
    tokens_saved    bigint NOT NULL,
    cost_saved_usd  numeric(20, 10) NOT NULL
);

CREATE TABLE request_rollup_hour (LIKE request_rollup_minute INCLUDING ALL);

-- Latency as a histogram per minute (mergeable, so any range's percentiles come from
-- it): `requests` answered in at most `le_us` microseconds and more than the bound
-- below. The last bound (9223372036854775807) is +Inf.
CREATE TABLE request_latency_minute (
    bucket    timestamptz NOT NULL,
    le_us     bigint      NOT NULL,
    requests  bigint      NOT NULL,
    PRIMARY KEY (bucket, le_us)
);

CREATE FUNCTION latency_le_us(latency_us bigint) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN latency_us <= 100 THEN 100
        WHEN latency_us <= 250 THEN 250
        WHEN latency_us <= 500 THEN 500
        WHEN latency_us <= 1000 THEN 1000
        WHEN latency_us <= 2500 THEN 2500
        WHEN latency_us <= 5000 THEN 5000
        WHEN latency_us <= 10000 THEN 10000
        WHEN latency_us <= 25000 THEN 25000
        WHEN latency_us <= 50000 THEN 50000
        WHEN latency_us <= 100000 THEN 100000
        WHEN latency_us <= 250000 THEN 250000
        WHEN latency_us <= 500000 THEN 500000
        WHEN latency_us <= 1000000 THEN 1000000
        WHEN latency_us <= 2500000 THEN 2500000
        WHEN latency_us <= 5000000 THEN 5000000
        WHEN latency_us <= 10000000 THEN 10000000
        WHEN latency_us <= 30000000 THEN 30000000
        ELSE 9223372036854775807
    END
$$;

CREATE TABLE generation_rollup_minute (
    bucket           timestamptz PRIMARY KEY,
    generations      bigint NOT NULL,
    failures         bigint NOT NULL,
    prewarms         bigint NOT NULL,
    -- Over successful generations only.
    duration_ms_sum  bigint NOT NULL,
    tokens_in        bigint NOT NULL,
    tokens_out       bigint NOT NULL,
    cost_usd         numeric(20, 10) NOT NULL
);

CREATE TABLE generation_rollup_hour (LIKE generation_rollup_minute INCLUDING ALL);

CREATE TABLE system_rollup_hour (
    bucket          timestamptz NOT NULL,
    primary_system  text        NOT NULL,
    requests        bigint      NOT NULL,
    hits            bigint      NOT NULL,
    PRIMARY KEY (bucket, primary_system)
);

-- Profile popularity for pre-warming: per canonical profile (no user data), by day,
-- independent of engine version, so it survives a version bump.
CREATE TABLE profiles (
    profile_digest  text        PRIMARY KEY,
    canonical       jsonb       NOT NULL,
    classification  text        NOT NULL,
    primary_system  text        NOT NULL,
    first_seen      timestamptz NOT NULL,
    last_seen       timestamptz NOT NULL
);

CREATE TABLE profile_popularity_daily (
    day             date   NOT NULL,
    profile_digest  text   NOT NULL,
    requests        bigint NOT NULL,
    PRIMARY KEY (day, profile_digest)
);

-- What was done to whom, by whom: erasures, pre-warms, admin actions. Append-only.
CREATE TABLE audit_log (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at       timestamptz NOT NULL DEFAULT now(),
    actor    text        NOT NULL,
    action   text        NOT NULL,
    -- A keyed hash when the subject is a user; never a user id.
    subject  text,
    detail   jsonb       NOT NULL DEFAULT '{}'
);

CREATE FUNCTION audit_log_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END
$$;

CREATE TRIGGER audit_log_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_refuse_change();
