// The inbox: conversations (senders, most recent first) and the selected one's thread.
import { getJSON } from "./api.js";
import { avatar, byId, el, number, onVisible, timeEl } from "./dom.js";

const PAGE = 50;
// A flood of new senders must not grow the page without bound: past this many the list
// lets the oldest go, and "Load more" reads it from the top again.
const MAX_CONVERSATIONS = 2000;

const state = {
  conversations: new Map(), // from -> conversation, most recent last message first
  conversationsCursor: null,
  loaded: false,
  truncated: false,
  shown: PAGE, // rows drawn: arrivals push rows down, "Load more" shows them first
  loadingConversations: false,
  lookups: new Map(), // from -> arrivals waiting for that sender's conversation to be read
  flash: new Set(),
  totals: { senders: 0, messages: 0 },
  selected: null,
  threadIds: new Set(),
  threadCursor: null,
  threadTotal: 0,
  loadingThread: false,
};

export function setUpInbox() {
  byId("conversations-more").addEventListener("click", () => loadConversations(false));
  byId("back").addEventListener("click", closeThread);
  const scroller = byId("thread-scroll");
  scroller.addEventListener("scroll", () => {
    if (scroller.scrollTop < 80) loadOlder();
  });
  onVisible(byId("conversations-more"), byId("conversations"), () => loadConversations(false));
}

// The first page of conversations, or the next one (after the rows already drawn).
export async function loadConversations(first = true) {
  if (state.loadingConversations) return;
  if (!first && state.conversations.size > state.shown) {
    state.shown += PAGE;
    draw();
    return;
  }
  const restart = first || state.truncated;
  if (!restart && !state.conversationsCursor) return;
  state.loadingConversations = true;
  try {
    const page = await getJSON("conversations", {
      limit: PAGE,
      cursor: restart ? null : state.conversationsCursor,
    });
    if (restart) {
      state.conversations = new Map(page.data.map((c) => [c.from, c]));
      state.shown = PAGE;
      state.truncated = false;
    } else {
      // A sender already here was moved up by an arrival since: this row is older.
      for (const c of page.data) if (!state.conversations.has(c.from)) state.conversations.set(c.from, c);
      state.shown += PAGE;
    }
    state.conversationsCursor = page.next_cursor;
    state.loaded = true;
    draw();
    if (!performance.getEntriesByName("conversations-drawn").length && page.data.length) {
      performance.mark("conversations-drawn");
    }
  } finally {
    state.loadingConversations = false;
  }
}

// Totals for the list's heading, from /stats once; arrivals keep them current.
export function setTotals(stats) {
  state.totals = { senders: stats.senders_count, messages: stats.total_messages };
  drawTotals();
}

// Messages from the feed, in the order stored. The list was read after the feed's head, so
// one that arrived in between is in both: it is recognised by its message_id (the thread's
// bubbles, each sender's last message). Returns how many were new.
export function applyArrivals(messages) {
  let fresh = 0;
  const mine = [];
  for (const m of messages) {
    if (m.from === state.selected) mine.push(m);
    const waiting = state.lookups.get(m.from);
    if (waiting) {
      waiting.push(m);
      fresh += 1;
      continue;
    }
    const c = state.conversations.get(m.from);
    if (c) {
      if (c.last_message.message_id === m.message_id) continue;
      c.count += 1;
      if (sortKey(m) > sortKey(c.last_message)) {
        c.last_message = m;
        c.last_ts = m.ts;
      }
    } else if (state.loaded && !state.conversationsCursor && !state.truncated) {
      // Every sender is on the page: this one is new.
      state.conversations.set(m.from, { from: m.from, count: 1, first_ts: m.ts, last_ts: m.ts, last_message: m });
      state.totals.senders += 1;
    } else {
      // A sender on a page not read yet, or a new one: its count comes from the service.
      state.lookups.set(m.from, [m]);
      lookUp(m.from);
    }
    state.flash.add(m.from);
    fresh += 1;
  }
  state.totals.messages += fresh;
  if (mine.length) addToThread(mine);
  draw();
  drawTotals();
  return fresh;
}

// One sender's conversation as the service has it now: its count and newest message. The
// arrival that asked for it is counted in it (it was stored before the read began); one
// that came while it was read is counted unless it is that newest message.
async function lookUp(from) {
  let page = null;
  try {
    page = await getJSON("messages", { from, order: "desc", limit: 1 });
  } catch (error) {
    // Its row shows after a reload, or when the list pages down to it.
    console.warn("could not read a sender's conversation:", error.message);
  } finally {
    const waiting = state.lookups.get(from);
    state.lookups.delete(from);
    if (page && page.data.length && !state.conversations.has(from)) {
      const newest = page.data[0];
      const c = { from, count: page.total, first_ts: null, last_ts: newest.ts, last_message: newest };
      for (const m of waiting.slice(1)) {
        if (m.message_id === newest.message_id) continue;
        c.count += 1;
        if (sortKey(m) > sortKey(c.last_message)) {
          c.last_message = m;
          c.last_ts = m.ts;
        }
      }
      // Everything it ever sent arrived while the page was open: a new sender.
      if (page.total <= waiting.length) state.totals.senders += 1;
      state.conversations.set(from, c);
      state.flash.add(from);
      draw();
      drawTotals();
    }
  }
}

function drawTotals() {
  const { senders, messages } = state.totals;
  byId("conversation-count").textContent = `${number(senders)} senders · ${number(messages)} messages`;
}

// The list in the service's order (last message's ts, then its id, newest first).
function draw() {
  const sorted = [...state.conversations.values()]
    .map((c) => [sortKey(c.last_message), c])
    .sort((a, b) => (a[0] < b[0] ? 1 : a[0] > b[0] ? -1 : 0))
    .map(([, c]) => c);
  if (sorted.length > MAX_CONVERSATIONS) {
    sorted.length = MAX_CONVERSATIONS;
    state.truncated = true;
    state.conversationsCursor = null;
  }
  state.conversations = new Map(sorted.map((c) => [c.from, c]));
  render(byId("conversations"), sorted.slice(0, state.shown));
  state.flash.clear();
  byId("conversations-more").hidden = !(sorted.length > state.shown || state.conversationsCursor || state.truncated);
  byId("conversations-empty").hidden = sorted.length > 0;
}

// Rows that did not change are kept (a flash runs to its end), and focus stays on the
// sender it was on, wherever the row moved.
function render(list, conversations) {
  const existing = new Map([...list.children].map((item) => [item.dataset.from, item]));
  const active = list.contains(document.activeElement) ? document.activeElement.closest("li") : null;
  const items = conversations.map((c) => {
    const signature = `${c.last_message.message_id} ${c.count} ${state.selected === c.from}`;
    const old = existing.get(c.from);
    if (old && old.dataset.signature === signature && !state.flash.has(c.from)) return old;
    const changed = state.flash.has(c.from) || (old !== undefined && old.dataset.last !== c.last_message.message_id);
    return row(c, signature, changed);
  });
  list.replaceChildren(...items);
  if (active) {
    const again = items.find((item) => item.dataset.from === active.dataset.from);
    if (again) again.querySelector("button").focus({ preventScroll: true });
  }
}

function row(c, signature, changed) {
  const last = c.last_message;
  return el(
    "li",
    { dataset: { from: c.from, last: last.message_id, signature }, class: changed ? "flash" : null },
    el(
      "button",
      {
        type: "button",
        class: "conversation",
        "aria-current": state.selected === c.from ? "true" : null,
        onclick: () => openThread(c.from),
      },
      avatar(c.from),
      el(
        "span",
        { class: "who" },
        el("span", { class: "from" }, c.from),
        el("span", { class: "preview" }, last.text === null ? el("em", {}, "no text") : last.text),
      ),
      el(
        "span",
        { class: "side" },
        timeEl(c.last_ts),
        el("span", { class: "count", title: `${c.count} messages` }, number(c.count)),
      ),
    ),
  );
}

export async function openThread(from) {
  state.selected = from;
  state.threadIds = new Set();
  state.threadCursor = null;
  state.threadTotal = 0;
  byId("thread").replaceChildren();
  byId("thread-title").textContent = from;
  byId("thread-meta").textContent = "";
  byId("thread-start").hidden = true;
  byId("view-inbox").classList.add("reading");
  for (const button of byId("conversations").querySelectorAll("button")) {
    button.toggleAttribute("aria-current", button.closest("li").dataset.from === from);
  }
  await refreshThread();
  const scroller = byId("thread-scroll");
  scroller.scrollTop = scroller.scrollHeight;
  // On a narrow screen the list is gone now: focus moves to what replaced it.
  if (!byId("back").offsetParent) return;
  byId("back").focus();
}

function closeThread() {
  byId("view-inbox").classList.remove("reading");
  const current = byId("conversations").querySelector("[aria-current]");
  if (current) current.focus();
}

// The newest page of the open thread.
async function refreshThread() {
  const from = state.selected;
  if (!from) return;
  const page = await getJSON("messages", { from, order: "desc", limit: PAGE });
  if (from !== state.selected) return;
  if (state.threadIds.size === 0) state.threadCursor = page.next_cursor;
  state.threadTotal = page.total;
  addToThread(page.data, false);
  showStart();
}

// Bubbles not shown yet, in place, keeping the newest in view if it was. Arrivals add to
// the count; a page read brings its own.
function addToThread(messages, arrivals = true) {
  const scroller = byId("thread-scroll");
  const atBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 60;
  const added = insert(messages);
  if (arrivals) state.threadTotal += added;
  const total = state.threadTotal;
  byId("thread-meta").textContent = `${number(total)} message${total === 1 ? "" : "s"}`;
  if (atBottom) scroller.scrollTop = scroller.scrollHeight;
}

async function loadOlder() {
  if (!state.selected || !state.threadCursor || state.loadingThread) return;
  state.loadingThread = true;
  const from = state.selected;
  try {
    const page = await getJSON("messages", { from, order: "desc", limit: PAGE, cursor: state.threadCursor });
    if (from !== state.selected) return;
    state.threadCursor = page.next_cursor;
    const scroller = byId("thread-scroll");
    const before = scroller.scrollHeight;
    insert(page.data);
    // Keep what was on screen where it was.
    scroller.scrollTop += scroller.scrollHeight - before;
    showStart();
  } finally {
    state.loadingThread = false;
  }
}

function showStart() {
  const start = byId("thread-start");
  start.hidden = state.threadCursor !== null;
  start.textContent = "Start of the conversation";
}

// Bubbles in (ts, message_id) order, oldest at the top; returns how many were new.
function insert(messages) {
  const thread = byId("thread");
  let added = 0;
  for (const m of messages) {
    if (state.threadIds.has(m.message_id)) continue;
    state.threadIds.add(m.message_id);
    added += 1;
    const key = sortKey(m);
    const bubble = el(
      "li",
      { class: "bubble", dataset: { key } },
      el("p", { class: "text" }, m.text === null ? el("em", {}, "no text") : m.text),
      el("p", { class: "meta" }, "to ", el("span", { class: "to" }, m.to), " · ", timeEl(m.ts, "full")),
    );
    let after = null;
    for (const node of thread.children) {
      if (node.dataset.key > key) {
        after = node;
        break;
      }
    }
    thread.insertBefore(bubble, after);
  }
  return added;
}

// The instant as fixed-width text, then the id: the order /messages lists them in.
function sortKey(m) {
  const match = /^(.{19})(?:\.(\d+))?Z$/.exec(m.ts);
  const fraction = ((match && match[2]) || "").padEnd(9, "0");
  return `${match ? match[1] : m.ts}.${fraction}Z ${m.message_id}`;
}
