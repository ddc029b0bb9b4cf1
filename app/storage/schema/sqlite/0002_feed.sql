-- Version 2 of the SQLite schema: the feed (docs/feed.md). Applied once, inside one
-- transaction, by app.storage.migrations.

-- Every stored message gets a position: strictly increasing in commit order, never
-- reused. The writer thread assigns them as it builds each group (app/storage/
-- sqlite/writer.py); a duplicate burns a number, which leaves a gap, never a repeat.
-- Not the rowid: VACUUM may renumber the rowids of a table without an INTEGER PRIMARY
-- KEY, and the rowid of a deleted newest row is handed out again.
-- (SQLite cannot add a NOT NULL column without a default: the trigger below fills in a
-- position that an insert from elsewhere leaves out.)
ALTER TABLE messages ADD COLUMN position INTEGER;

-- Rows stored before this version, in the order they were received: created_at, and
-- within one group commit (which shares a created_at) the order of its insert.
UPDATE messages SET position = numbered.n
  FROM (SELECT rowid AS id, row_number() OVER (ORDER BY created_at, rowid) AS n
          FROM messages) AS numbered
 WHERE messages.rowid = numbered.id;

CREATE UNIQUE INDEX messages_by_position ON messages (position);
-- `from` with the feed order.
CREATE INDEX messages_by_sender_position ON messages (from_msisdn, position);

-- The highest position a deleted row held, so that deleting the newest rows (retention,
-- erasure) never lets their positions be handed out again, even after a restart: the
-- writer starts at max(high_water, max(position)) + 1.
CREATE TABLE feed_state (
  id         INTEGER PRIMARY KEY CHECK (id = 1),
  high_water INTEGER NOT NULL
);
INSERT INTO feed_state (id, high_water) VALUES (1, 0);

CREATE TRIGGER messages_feed_after_delete AFTER DELETE ON messages
WHEN OLD.position > (SELECT high_water FROM feed_state WHERE id = 1) BEGIN
  UPDATE feed_state SET high_water = OLD.position WHERE id = 1;
END;

-- A row inserted without a position (by hand, by another program) gets the next one,
-- under the write lock, so it too is in commit order. The service always sets it, and
-- pays only for this WHEN.
CREATE TRIGGER messages_position_default AFTER INSERT ON messages
WHEN NEW.position IS NULL BEGIN
  UPDATE messages
     SET position = 1 + max(
           coalesce((SELECT max(position) FROM messages), 0),
           (SELECT high_water FROM feed_state WHERE id = 1))
   WHERE rowid = NEW.rowid;
END;
