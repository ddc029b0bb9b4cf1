-- Version 4 of the SQLite schema: the data lifecycle (docs/lifecycle.md). Applied once,
-- inside one transaction, by app.migrations.

-- The key of every tombstone hash: random, made here, once per database, so that every
-- process on this file and every backup of it hash alike. randomblob() draws from
-- SQLite's generator, seeded by the operating system's.
CREATE TABLE IF NOT EXISTS lifecycle_key (
  id  INTEGER PRIMARY KEY CHECK (id = 1),
  key BLOB NOT NULL
);
INSERT INTO lifecycle_key (id, key) VALUES (1, randomblob(32)) ON CONFLICT (id) DO NOTHING;

-- One row per erased or purged message: the first 16 bytes of HMAC-SHA256(key,
-- message_id), never the id or anything of the message. An insert of an id whose hash is
-- here stores nothing (see sqlite/writer.py). expires_at NULL: an erasure, kept for good;
-- otherwise a retention purge's, deleted once expired.
CREATE TABLE IF NOT EXISTS tombstones (
  hash       BLOB PRIMARY KEY,
  created_at TEXT NOT NULL,
  expires_at TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tombstones_by_expiry ON tombstones (expires_at)
  WHERE expires_at IS NOT NULL;

-- Retention deletes by received_at (created_at), oldest first. Rows arrive in that order,
-- so the index grows at its end; an import of old rows lands in the middle, where it
-- belongs.
CREATE INDEX IF NOT EXISTS messages_by_received ON messages (created_at);

-- A purge leaves its rows' search entries for the indexer to delete in its quiet moments
-- (see SearchIndexer in sqlite/writer.py): the purge turns the delete trigger off for its
-- own transaction (defer_deletes, set and cleared inside it, so nobody else ever sees it
-- set) and queues the entries here instead. Erasures leave the trigger on: their text
-- leaves the index in the same transaction.
ALTER TABLE search_progress ADD COLUMN defer_deletes INTEGER NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS search_garbage (
  id          INTEGER PRIMARY KEY,
  doc_rowid   INTEGER NOT NULL,
  text_folded TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS search_garbage_by_doc ON search_garbage (doc_rowid);
DROP TRIGGER IF EXISTS messages_fts_after_delete;
CREATE TRIGGER messages_fts_after_delete AFTER DELETE ON messages
WHEN OLD.text_folded IS NOT NULL
 AND OLD.rowid <= (SELECT indexed_through FROM search_progress WHERE id = 1)
 AND NOT (SELECT defer_deletes FROM search_progress WHERE id = 1) BEGIN
  INSERT INTO messages_fts (messages_fts, rowid, text_folded)
  VALUES ('delete', OLD.rowid, OLD.text_folded);
END;
