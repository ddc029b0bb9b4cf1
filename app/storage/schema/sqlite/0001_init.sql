-- Version 1 of the SQLite schema. Applied once, inside one transaction, by app.migrations.

CREATE TABLE IF NOT EXISTS messages (
  message_id  TEXT PRIMARY KEY,
  from_msisdn TEXT NOT NULL,
  to_msisdn   TEXT NOT NULL,
  ts          TEXT NOT NULL,  -- ISO-8601 UTC string, as received
  text        TEXT,
  created_at  TEXT NOT NULL,  -- server time, ISO-8601
  -- ts with exactly nine fractional digits, so that text order is time order
  ts_key      TEXT NOT NULL,
  -- Python's str.casefold() of text: what `q` searches, so every backend folds alike
  text_folded TEXT
);

-- Listing order, `since`, keyset pages, and first/last for /stats.
CREATE INDEX IF NOT EXISTS messages_by_ts ON messages (ts_key, message_id);
-- `from` with the listing order.
CREATE INDEX IF NOT EXISTS messages_by_sender_ts ON messages (from_msisdn, ts_key, message_id);

-- Aggregates for /stats, kept by the triggers below in the inserting transaction, so that
-- /stats costs the same at a million rows as at ten.
CREATE TABLE IF NOT EXISTS message_totals (
  id      INTEGER PRIMARY KEY CHECK (id = 1),
  total   INTEGER NOT NULL,
  senders INTEGER NOT NULL
);
INSERT INTO message_totals (id, total, senders) VALUES (1, 0, 0) ON CONFLICT (id) DO NOTHING;

CREATE TABLE IF NOT EXISTS sender_counts (
  from_msisdn TEXT PRIMARY KEY,
  count       INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sender_counts_by_rank ON sender_counts (count DESC, from_msisdn);

-- Substring search: trigrams of the folded text. Case-sensitive because the column is
-- already folded; the query is folded the same way.
CREATE VIRTUAL TABLE IF NOT EXISTS messages_fts USING fts5 (
  text_folded, content = 'messages', content_rowid = 'rowid', tokenize = 'trigram case_sensitive 1'
);

-- The index is filled behind the inserts, in large batches, by the writer when it has a
-- moment (indexing each row as it arrives would cost every webhook). Rows up to this
-- rowid are indexed; searches scan the few rows after it.
CREATE TABLE IF NOT EXISTS search_progress (
  id              INTEGER PRIMARY KEY CHECK (id = 1),
  indexed_through INTEGER NOT NULL
);
INSERT INTO search_progress (id, indexed_through) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;

CREATE TRIGGER IF NOT EXISTS messages_after_insert AFTER INSERT ON messages BEGIN
  UPDATE message_totals
     SET total = total + 1,
         senders = senders + NOT EXISTS (
           SELECT 1 FROM sender_counts WHERE from_msisdn = NEW.from_msisdn)
   WHERE id = 1;
  INSERT INTO sender_counts (from_msisdn, count) VALUES (NEW.from_msisdn, 1)
    ON CONFLICT (from_msisdn) DO UPDATE SET count = count + 1;
END;

-- The service never deletes, but an operator's retention job may: keep the aggregates true.
CREATE TRIGGER IF NOT EXISTS messages_after_delete AFTER DELETE ON messages BEGIN
  UPDATE sender_counts SET count = count - 1 WHERE from_msisdn = OLD.from_msisdn;
  DELETE FROM sender_counts WHERE from_msisdn = OLD.from_msisdn AND count <= 0;
  UPDATE message_totals
     SET total = total - 1,
         senders = senders - NOT EXISTS (
           SELECT 1 FROM sender_counts WHERE from_msisdn = OLD.from_msisdn)
   WHERE id = 1;
END;

CREATE TRIGGER IF NOT EXISTS messages_fts_after_delete AFTER DELETE ON messages
WHEN OLD.text_folded IS NOT NULL
 AND OLD.rowid <= (SELECT indexed_through FROM search_progress WHERE id = 1) BEGIN
  INSERT INTO messages_fts (messages_fts, rowid, text_folded)
  VALUES ('delete', OLD.rowid, OLD.text_folded);
END;

-- Written by the readiness probe to prove that writes go through after a failed one.
CREATE TABLE IF NOT EXISTS write_probe (
  id    INTEGER PRIMARY KEY CHECK (id = 1),
  at    TEXT NOT NULL
);
