// The console: four views over the JSON API, and a live loop that keeps them current.
import { getJSON, sessionState, signOut } from "./api.js";
import { byId, number } from "./dom.js";
import { loadConversations, refreshThread, setUpInbox } from "./inbox.js";
import { refreshOverview, setUpOverview } from "./overview.js";
import { refreshRefused, setUpRefused } from "./refused.js";
import { setUpSearch } from "./search.js";

const VIEWS = ["inbox", "search", "overview", "refused"];
const POLL_MS = 1000;
const RATE_WINDOW_MS = 60_000;

let view = "inbox";
let lastTotal = null;
const samples = []; // [time, total] over the last minute

function show(name) {
  view = VIEWS.includes(name) ? name : "inbox";
  for (const candidate of VIEWS) byId(`view-${candidate}`).hidden = candidate !== view;
  for (const link of document.querySelectorAll("[data-view]")) {
    link.toggleAttribute("aria-current", link.dataset.view === view);
    if (link.dataset.view === view) link.setAttribute("aria-current", "page");
  }
  refreshView();
}

async function refreshView() {
  try {
    if (view === "overview") await refreshOverview(lastStats || (await getJSON("stats")));
    else if (view === "refused") await refreshRefused();
  } catch (error) {
    console.warn("refresh failed:", error.message);
  }
}

let lastStats = null;

// Live arrivals: /stats' total is exact at every instant, so a change means new messages
// (whatever their timestamps); the conversation list and the open thread are read again.
// The rate is new messages over the last minute.
async function tick() {
  try {
    const stats = await getJSON("stats");
    lastStats = stats;
    const now = performance.now();
    samples.push([now, stats.total_messages]);
    while (samples.length > 1 && now - samples[0][0] > RATE_WINDOW_MS) samples.shift();
    const [startTime, startTotal] = samples[0];
    // Per minute, over what has been seen of the last one (at least ten seconds of it).
    const rate = ((stats.total_messages - startTotal) * RATE_WINDOW_MS) / Math.max(now - startTime, 10_000);
    byId("rate").textContent = number(Math.max(0, Math.round(rate)));
    byId("conversation-count").textContent = `${number(stats.senders_count)} senders · ${number(stats.total_messages)} messages`;
    setLive(true);
    if (lastTotal !== null && stats.total_messages !== lastTotal) {
      await Promise.all([loadConversations(true), refreshThread()]);
      if (view === "overview") await refreshOverview(stats);
    }
    lastTotal = stats.total_messages;
    if (view === "refused") await refreshRefused();
  } catch (error) {
    setLive(false);
  } finally {
    setTimeout(tick, document.hidden ? POLL_MS * 5 : POLL_MS);
  }
}

function setLive(up) {
  byId("live").classList.toggle("down", !up);
  byId("live-state").textContent = up ? "live" : "reconnecting";
}

async function start() {
  // The list first: it is what a visit comes for.
  const first = loadConversations(true);
  setUpInbox();
  setUpSearch();
  setUpOverview();
  setUpRefused();
  byId("sign-out").addEventListener("click", signOut);
  window.addEventListener("hashchange", () => show(location.hash.slice(1)));
  sessionState().then((state) => {
    byId("sign-out").hidden = !state.signed_in;
  });
  show(location.hash.slice(1));
  await first;
  tick();
}

start();
