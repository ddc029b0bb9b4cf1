// Live arrivals: the feed's server-sent events (GET /feed/stream), each message once, in
// the order the service stored them, and the arrival rate.
import { getJSON } from "./api.js";

// Events are handed over in batches, so that a burst redraws the list once, not per message.
const BATCH_MS = 50;
const REOPEN_MIN_MS = 1000;
const REOPEN_MAX_MS = 30_000;

// Follows the feed after `position`. The browser reconnects by itself when the stream ends
// or the network fails (after the `retry: 1000` the stream starts with), sending the last
// id it got as Last-Event-ID, so nothing is missed or repeated. After an HTTP error
// (a 401 once the session has expired, a 502 from a proxy while no replica answers) it
// gives up instead: then the page reopens the stream itself, after the last position it
// handled, once GET /feed/head answers (a 401 there opens the sign-in dialog), with backoff.
export function follow(position, { onMessages, onState }) {
  let source = null;
  let batch = [];
  let timer = null;
  let delay = REOPEN_MIN_MS;
  let last = position;

  function open() {
    onState("connecting");
    source = new EventSource(`feed/stream?after=${last}`);
    source.addEventListener("open", () => {
      delay = REOPEN_MIN_MS;
      onState("live");
    });
    source.addEventListener("message", (event) => {
      const item = JSON.parse(event.data);
      last = item.position;
      batch.push(item);
      if (timer === null) timer = setTimeout(handOver, BATCH_MS);
    });
    source.addEventListener("error", () => {
      onState("reconnecting");
      if (source.readyState === EventSource.CLOSED) {
        source = null;
        later();
      }
    });
  }

  function handOver() {
    timer = null;
    const messages = batch;
    batch = [];
    onMessages(messages);
  }

  function later() {
    setTimeout(reopen, delay);
    delay = Math.min(delay * 2, REOPEN_MAX_MS);
  }

  async function reopen() {
    try {
      await getJSON("feed/head");
    } catch {
      later();
      return;
    }
    open();
  }

  open();
}

// Messages per minute: arrivals counted per second over the last sixty.
export class Rate {
  constructor() {
    this.counts = new Array(60).fill(0);
    this.second = Math.floor(performance.now() / 1000);
  }

  add(count) {
    this.advance();
    this.counts[this.second % 60] += count;
  }

  perMinute() {
    this.advance();
    return this.counts.reduce((sum, count) => sum + count, 0);
  }

  advance() {
    const now = Math.floor(performance.now() / 1000);
    if (now - this.second >= 60) this.counts.fill(0);
    else for (let second = this.second + 1; second <= now; second++) this.counts[second % 60] = 0;
    this.second = now;
  }
}
