-- Version 2 of the PostgreSQL schema: the feed (docs/feed.md). Applied once, inside one
-- transaction, by app.storage.migrations.

-- Every stored message gets a position: (xid8 of the inserting transaction << 16) + the
-- row's ordinal within its INSERT statement (app/storage/postgres/sql.py). Every insert
-- the service makes is one autocommit statement, so one transaction holds one INSERT and
-- positions never collide. The feed hands out only positions below
-- pg_snapshot_xmin(pg_current_snapshot()) << 16: every transaction with an xid below
-- that horizon has finished, so no row can ever appear below it later, whatever order
-- the replicas' transactions commit in. xid8 never wraps; positions stay below 2^53
-- (exact in JavaScript) for 2^37 transactions.
ALTER TABLE messages ADD COLUMN position BIGINT;

-- Rows stored before this version get 1..N, in the order they were received (created_at,
-- then message_id: no other order was kept). They must all sit below any position a
-- transaction can still get: below the oldest running xid << 16.
DO $$
DECLARE
  existing BIGINT;
  floor    BIGINT;
BEGIN
  SELECT count(*) INTO existing FROM messages;
  floor := pg_snapshot_xmin(pg_current_snapshot())::TEXT::BIGINT << 16;
  IF existing >= floor THEN
    RAISE EXCEPTION 'cannot number % existing messages below the feed horizon % (xid too young)',
      existing, floor;
  END IF;
END
$$;

UPDATE messages AS m SET position = numbered.n
  FROM (SELECT message_id, row_number() OVER (ORDER BY created_at, message_id) AS n
          FROM messages) AS numbered
 WHERE m.message_id = numbered.message_id;

-- A row inserted by hand, one per transaction, gets a correct position by default (two
-- in one statement collide on the unique index: say which, as the service does).
ALTER TABLE messages
  ALTER COLUMN position SET DEFAULT (pg_current_xact_id()::TEXT::BIGINT << 16),
  ALTER COLUMN position SET NOT NULL;

CREATE UNIQUE INDEX messages_by_position ON messages (position);
-- `from` with the feed order.
CREATE INDEX messages_by_sender_position ON messages (from_msisdn, position);
