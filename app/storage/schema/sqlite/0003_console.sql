-- Version 3 of the SQLite schema: what the console reads. Conversations (each sender's
-- last message, so senders list most recent first from an index), messages per hour of
-- `ts` (the timeline), and the refused deliveries. Every aggregate is kept by triggers
-- in the inserting (or deleting) transaction, like the /stats ones of version 1.

-- A sender's last message: the greatest (ts_key, message_id) among its messages, the
-- same order /messages lists them in. Both columns are set whenever count > 0.
ALTER TABLE sender_counts ADD COLUMN last_ts_key TEXT;
ALTER TABLE sender_counts ADD COLUMN last_message_id TEXT;
UPDATE sender_counts SET (last_ts_key, last_message_id) = (
  SELECT ts_key, message_id FROM messages m WHERE m.from_msisdn = sender_counts.from_msisdn
   ORDER BY ts_key DESC, message_id DESC LIMIT 1);
-- /conversations: most recent first, keyset pages.
CREATE INDEX IF NOT EXISTS sender_counts_by_recency ON sender_counts (last_ts_key, last_message_id);

-- /stats/timeline: messages per UTC hour of `ts`, keyed 'YYYY-MM-DDTHH' (the first 13
-- characters of ts_key); a day is the sum of its 24 hours.
CREATE TABLE IF NOT EXISTS message_hours (
  hour  TEXT PRIMARY KEY,
  count INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO message_hours (hour, count)
SELECT substr(ts_key, 1, 13), count(*) FROM messages GROUP BY 1;

-- Version 1's insert trigger, plus the sender's last message and the hour: one upsert
-- per aggregate row, nothing read that the upserts do not touch anyway.
DROP TRIGGER IF EXISTS messages_after_insert;
CREATE TRIGGER messages_after_insert AFTER INSERT ON messages BEGIN
  UPDATE message_totals
     SET total = total + 1,
         senders = senders + NOT EXISTS (
           SELECT 1 FROM sender_counts WHERE from_msisdn = NEW.from_msisdn)
   WHERE id = 1;
  INSERT INTO sender_counts (from_msisdn, count, last_ts_key, last_message_id)
  VALUES (NEW.from_msisdn, 1, NEW.ts_key, NEW.message_id)
  ON CONFLICT (from_msisdn) DO UPDATE SET
    count = count + 1,
    last_ts_key = CASE WHEN (excluded.last_ts_key, excluded.last_message_id)
                            > (last_ts_key, last_message_id)
                       THEN excluded.last_ts_key ELSE last_ts_key END,
    last_message_id = CASE WHEN (excluded.last_ts_key, excluded.last_message_id)
                                > (last_ts_key, last_message_id)
                           THEN excluded.last_message_id ELSE last_message_id END;
  INSERT INTO message_hours (hour, count) VALUES (substr(NEW.ts_key, 1, 13), 1)
  ON CONFLICT (hour) DO UPDATE SET count = count + 1;
END;

-- Deleting a sender's last message makes the next-latest one the last: one probe of
-- messages_by_sender_ts. (Version 1's delete trigger keeps the counts; when it removes
-- the sender's row, this update finds nothing to do.)
CREATE TRIGGER IF NOT EXISTS messages_console_after_delete AFTER DELETE ON messages BEGIN
  UPDATE sender_counts SET (last_ts_key, last_message_id) = (
    SELECT ts_key, message_id FROM messages
     WHERE from_msisdn = OLD.from_msisdn ORDER BY ts_key DESC, message_id DESC LIMIT 1)
   WHERE from_msisdn = OLD.from_msisdn AND last_message_id = OLD.message_id;
  UPDATE message_hours SET count = count - 1 WHERE hour = substr(OLD.ts_key, 1, 13);
  DELETE FROM message_hours WHERE hour = substr(OLD.ts_key, 1, 13) AND count <= 0;
END;

-- Refused deliveries, newest REJECTIONS_KEPT only (the recorder prunes as it writes).
-- Never a body, a header value or a secret: what was refused, why, from where, how big.
-- AUTOINCREMENT: ids never come back after a prune, so a cursor stays meaningful.
CREATE TABLE IF NOT EXISTS rejections (
  id          INTEGER PRIMARY KEY AUTOINCREMENT,
  at          TEXT NOT NULL,     -- server time, ISO-8601
  endpoint    TEXT NOT NULL,     -- /webhook or /webhook/whatsapp
  reason      TEXT NOT NULL,
  field       TEXT,              -- invalid_field: where; conflict: which fields differ
  remote      TEXT,              -- the peer address (a proxy's, behind one)
  body_bytes  INTEGER NOT NULL,
  message_id  TEXT,              -- conflict: the reused id
  request_id  TEXT               -- the access line of the refused request
);
