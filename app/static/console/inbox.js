// The inbox: conversations (senders, most recent first) and the selected one's thread.
import { getJSON } from "./api.js";
import { avatar, byId, el, number, onVisible, timeEl } from "./dom.js";

const PAGE = 50;

const state = {
  conversations: new Map(), // from -> conversation, in list order
  conversationsCursor: null,
  loadingConversations: false,
  selected: null,
  threadIds: new Set(),
  threadCursor: null,
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

// The first page of conversations (again): senders on it move to the top, in order.
export async function loadConversations(first = true) {
  if (state.loadingConversations || (!first && !state.conversationsCursor)) return;
  state.loadingConversations = true;
  try {
    const page = await getJSON("conversations", {
      limit: PAGE,
      cursor: first ? null : state.conversationsCursor,
    });
    const list = byId("conversations");
    if (first) {
      const fresh = new Map(page.data.map((c) => [c.from, c]));
      const rest = [...state.conversations.values()].filter((c) => !fresh.has(c.from));
      state.conversations = new Map([...fresh, ...rest.map((c) => [c.from, c])]);
      if (state.conversations.size === fresh.size) state.conversationsCursor = page.next_cursor;
    } else {
      for (const c of page.data) state.conversations.set(c.from, c);
      state.conversationsCursor = page.next_cursor;
    }
    render(list);
    byId("conversations-more").hidden = !state.conversationsCursor;
    byId("conversations-empty").hidden = state.conversations.size > 0;
    if (!performance.getEntriesByName("conversations-drawn").length && page.data.length) {
      performance.mark("conversations-drawn");
    }
  } finally {
    state.loadingConversations = false;
  }
}

function render(list) {
  const previous = new Map([...list.children].map((item) => [item.dataset.from, item.dataset.last]));
  const items = [];
  for (const c of state.conversations.values()) {
    const last = c.last_message;
    const changed = previous.has(c.from) && previous.get(c.from) !== last.message_id;
    const item = el(
      "li",
      { dataset: { from: c.from, last: last.message_id }, class: changed ? "flash" : null },
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
    items.push(item);
  }
  list.replaceChildren(...items);
}

export async function openThread(from) {
  state.selected = from;
  state.threadIds = new Set();
  state.threadCursor = null;
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

// The newest page of the open thread; messages not shown yet are added in place.
export async function refreshThread() {
  const from = state.selected;
  if (!from) return;
  const page = await getJSON("messages", { from, order: "desc", limit: PAGE });
  if (from !== state.selected) return;
  if (state.threadIds.size === 0) state.threadCursor = page.next_cursor;
  const scroller = byId("thread-scroll");
  const atBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 60;
  insert(page.data);
  byId("thread-meta").textContent = `${number(page.total)} message${page.total === 1 ? "" : "s"}`;
  showStart();
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

// Bubbles in (ts, message_id) order, oldest at the top; `messages` come newest first.
function insert(messages) {
  const thread = byId("thread");
  for (const m of messages) {
    if (state.threadIds.has(m.message_id)) continue;
    state.threadIds.add(m.message_id);
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
}

// The instant as fixed-width text, then the id: the order /messages lists them in.
function sortKey(m) {
  const match = /^(.{19})(?:\.(\d+))?Z$/.exec(m.ts);
  const fraction = ((match && match[2]) || "").padEnd(9, "0");
  return `${match ? match[1] : m.ts}.${fraction}Z ${m.message_id}`;
}

export function selectedSender() {
  return state.selected;
}
