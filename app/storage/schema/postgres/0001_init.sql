-- Version 1 of the PostgreSQL schema: the same tables and meaning as the SQLite one.
-- Applied once, inside one transaction, by app.migrations.

-- COLLATE "C" wherever rows are ordered or compared: byte order of UTF-8 is code point
-- order, as in SQLite, whatever locale the cluster was created with (en_US would sort
-- 'b' before 'C' and ignore punctuation).
CREATE TABLE messages (
  message_id  TEXT COLLATE "C" PRIMARY KEY,
  from_msisdn TEXT COLLATE "C" NOT NULL,
  to_msisdn   TEXT NOT NULL,
  ts          TEXT NOT NULL,  -- ISO-8601 UTC string, as received
  text        TEXT,
  created_at  TEXT NOT NULL,  -- server time, ISO-8601
  -- ts with exactly nine fractional digits, so that text order is time order
  ts_key      TEXT COLLATE "C" NOT NULL,
  -- Python's str.casefold() of text: what `q` searches, so every backend folds alike
  text_folded TEXT COLLATE "C"
);

-- Listing order, `since`, keyset pages, and first/last for /stats.
CREATE INDEX messages_by_ts ON messages (ts_key, message_id);
-- `from` with the listing order.
CREATE INDEX messages_by_sender_ts ON messages (from_msisdn, ts_key, message_id);

-- Aggregates for /stats. SQLite has one writer, so its triggers update the totals row
-- directly. Here many sessions insert at once, and a counter row updated by every insert
-- would be locked by each inserting transaction until its commit is flushed: inserts
-- from every replica would queue on it, one fsync at a time. So an insert only appends
-- to message_count_deltas (no row is ever updated, nothing to wait for), a folder merges
-- the deltas into the counts now and then (fold_message_counts below), and a reader adds
-- folded counts and pending deltas in one snapshot: exact at every instant.
CREATE TABLE message_count_deltas (
  from_msisdn TEXT COLLATE "C" NOT NULL,
  delta       BIGINT NOT NULL
);

CREATE TABLE sender_counts (
  from_msisdn TEXT COLLATE "C" PRIMARY KEY,
  count       BIGINT NOT NULL
);
CREATE INDEX sender_counts_by_rank ON sender_counts (count DESC, from_msisdn);

CREATE TABLE message_totals (
  id      INTEGER PRIMARY KEY CHECK (id = 1),
  total   BIGINT NOT NULL,
  senders BIGINT NOT NULL
);
INSERT INTO message_totals (id, total, senders) VALUES (1, 0, 0);

-- Statement triggers with transition tables: one delta row per sender per statement, and
-- none at all for a duplicate (ON CONFLICT DO NOTHING leaves the transition table empty).
CREATE FUNCTION messages_count_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO message_count_deltas (from_msisdn, delta)
  SELECT from_msisdn, count(*) FROM inserted_rows GROUP BY from_msisdn;
  RETURN NULL;
END
$$;

CREATE TRIGGER messages_after_insert AFTER INSERT ON messages
  REFERENCING NEW TABLE AS inserted_rows
  FOR EACH STATEMENT EXECUTE FUNCTION messages_count_inserted();

-- The service never deletes, but an operator's retention job may: keep the aggregates true.
CREATE FUNCTION messages_count_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO message_count_deltas (from_msisdn, delta)
  SELECT from_msisdn, -count(*) FROM deleted_rows GROUP BY from_msisdn;
  RETURN NULL;
END
$$;

CREATE TRIGGER messages_after_delete AFTER DELETE ON messages
  REFERENCING OLD TABLE AS deleted_rows
  FOR EACH STATEMENT EXECUTE FUNCTION messages_count_deleted();

-- Moves every committed delta into sender_counts and message_totals, in the caller's
-- transaction, so that a reader sees either the deltas or their sum, never both or
-- neither. One folder at a time across all replicas (the others return -1 at once);
-- inserts never wait for it: deleting delta rows does not block appending new ones.
CREATE FUNCTION fold_message_counts() RETURNS BIGINT LANGUAGE plpgsql AS $$
DECLARE
  batch_senders TEXT[];
  batch_deltas  BIGINT[];
  moved         BIGINT;
  known_before  BIGINT;
  known_after   BIGINT;
BEGIN
  IF NOT pg_try_advisory_xact_lock(hashtext('fold_message_counts')) THEN
    RETURN -1;
  END IF;
  WITH gone AS (DELETE FROM message_count_deltas RETURNING from_msisdn, delta),
       per_sender AS (
         SELECT from_msisdn, sum(delta)::BIGINT AS delta FROM gone GROUP BY from_msisdn)
  SELECT coalesce(array_agg(from_msisdn), '{}'), coalesce(array_agg(delta), '{}'),
         coalesce(sum(delta), 0)::BIGINT
    INTO batch_senders, batch_deltas, moved
    FROM per_sender;
  IF cardinality(batch_senders) = 0 THEN
    RETURN 0;
  END IF;
  SELECT count(*) INTO known_before FROM sender_counts WHERE from_msisdn = ANY (batch_senders);
  INSERT INTO sender_counts AS s (from_msisdn, count)
  SELECT d.from_msisdn, d.delta FROM unnest(batch_senders, batch_deltas) AS d (from_msisdn, delta)
   WHERE d.delta <> 0
  ON CONFLICT (from_msisdn) DO UPDATE SET count = s.count + excluded.count;
  -- A sender whose every message was deleted is no sender any more.
  DELETE FROM sender_counts WHERE from_msisdn = ANY (batch_senders) AND count <= 0;
  SELECT count(*) INTO known_after FROM sender_counts WHERE from_msisdn = ANY (batch_senders);
  UPDATE message_totals
     SET total = total + moved, senders = senders + known_after - known_before
   WHERE id = 1;
  RETURN cardinality(batch_senders);
END
$$;

-- Written by the readiness probe to prove that writes go through after a failed one.
CREATE TABLE write_probe (
  id    INTEGER PRIMARY KEY CHECK (id = 1),
  at    TEXT NOT NULL
);

-- Substring search: trigrams of the folded text, when the pg_trgm extension can be had
-- (it ships with PostgreSQL's contrib, and a database owner may create it since 13).
-- Without it `q` is answered by a scan: slower on a big table, the same answer.
DO $$
BEGIN
  BEGIN
    CREATE EXTENSION IF NOT EXISTS pg_trgm;
  EXCEPTION WHEN OTHERS THEN
    RAISE NOTICE 'pg_trgm is not available (%); q will scan', SQLERRM;
  END;
  IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm') THEN
    EXECUTE format(
      'CREATE INDEX messages_text_trgm ON messages USING gin (text_folded %s.gin_trgm_ops)',
      (SELECT extnamespace::regnamespace::TEXT FROM pg_extension WHERE extname = 'pg_trgm'));
  END IF;
END
$$;
