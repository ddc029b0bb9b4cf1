-- Version 4 of the PostgreSQL schema: the data lifecycle (docs/lifecycle.md), the same
-- tables and meaning as the SQLite one. Applied once, inside one transaction.

-- The key of every tombstone hash: random, made here, once per database, so that every
-- replica and every restore of a dump hash alike. gen_random_uuid() (core since 13) draws
-- from the server's strong random source: two of them give 244 random bits.
CREATE TABLE lifecycle_key (
  id  INTEGER PRIMARY KEY CHECK (id = 1),
  key BYTEA NOT NULL
);
INSERT INTO lifecycle_key (id, key)
VALUES (1, decode(replace(gen_random_uuid()::TEXT || gen_random_uuid()::TEXT, '-', ''), 'hex'));

-- One row per erased or purged message: the first 16 bytes of HMAC-SHA256(key,
-- message_id). An insert of an id whose hash is here stores nothing (postgres/sql.py);
-- an erasure or a purge locks this table (so every insert) while it deletes and writes
-- these, so no insert that started before can store the id again after it (see
-- postgres/lifecycle.py). expires_at NULL: an erasure, kept for good.
CREATE TABLE tombstones (
  hash       BYTEA PRIMARY KEY,
  created_at TEXT COLLATE "C" NOT NULL,
  expires_at TEXT COLLATE "C"
);
CREATE INDEX tombstones_by_expiry ON tombstones (expires_at) WHERE expires_at IS NOT NULL;

-- Retention deletes by received_at (created_at), oldest first.
CREATE INDEX messages_by_received ON messages (created_at COLLATE "C");
