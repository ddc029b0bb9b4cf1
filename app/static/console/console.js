// The console: four views over the JSON API, kept current by the feed's stream.
import { getJSON, sessionState, signOut } from "./api.js";
import { byId, number } from "./dom.js";
import { applyArrivals, loadConversations, setTotals, setUpInbox } from "./inbox.js";
import { follow, Rate } from "./live.js";
import { refreshOverview, setUpOverview } from "./overview.js";
import { refreshRefused, setUpRefused } from "./refused.js";
import { setUpSearch } from "./search.js";

const VIEWS = ["inbox", "search", "overview", "refused"];
// Refusals are not in the feed: their list is read again this often while it is shown.
const REFUSED_POLL_MS = 1000;
// While the overview is shown, arrivals redraw it at most this often.
const OVERVIEW_MIN_MS = 2000;
const STATE_TEXT = { connecting: "connecting", live: "live", reconnecting: "reconnecting" };

let view = "inbox";
const rate = new Rate();
let refusedTimer = null;
let overviewDue = null;
let overviewAt = 0;

function show(name) {
  view = VIEWS.includes(name) ? name : "inbox";
  for (const candidate of VIEWS) byId(`view-${candidate}`).hidden = candidate !== view;
  for (const link of document.querySelectorAll("[data-view]")) {
    link.toggleAttribute("aria-current", link.dataset.view === view);
    if (link.dataset.view === view) link.setAttribute("aria-current", "page");
  }
  if (view === "overview") drawOverview();
  if (view === "refused" && refusedTimer === null) pollRefused();
}

async function drawOverview() {
  overviewAt = performance.now();
  try {
    await refreshOverview(await getJSON("stats"));
  } catch (error) {
    console.warn("overview failed:", error.message);
  }
}

async function pollRefused() {
  refusedTimer = null;
  if (view !== "refused") return;
  try {
    await refreshRefused();
  } catch (error) {
    console.warn("refusals failed:", error.message);
  }
  refusedTimer = setTimeout(pollRefused, document.hidden ? REFUSED_POLL_MS * 5 : REFUSED_POLL_MS);
}

function arrived(messages) {
  byId("live").dataset.position = messages[messages.length - 1].position;
  rate.add(applyArrivals(messages));
  showRate();
  if (view === "overview" && overviewDue === null) {
    const wait = Math.max(0, overviewAt + OVERVIEW_MIN_MS - performance.now());
    overviewDue = setTimeout(() => {
      overviewDue = null;
      if (view === "overview") drawOverview();
    }, wait);
  }
}

function showRate() {
  byId("rate").textContent = number(rate.perMinute());
}

function setLive(state) {
  const live = byId("live");
  live.dataset.state = state;
  live.classList.toggle("down", state !== "live");
  byId("live-state").textContent = STATE_TEXT[state];
}

// The feed's head first, then the list: a message stored after the head comes through the
// stream even if the list already has it (then it is recognised by its message_id), and
// none can fall between the two.
async function load(delay = 1000) {
  try {
    const head = await getJSON("feed/head");
    const [stats] = await Promise.all([getJSON("stats"), loadConversations(true)]);
    setTotals(stats);
    follow(head.position, { onMessages: arrived, onState: setLive });
  } catch (error) {
    console.warn("loading failed, trying again:", error.message);
    setLive("reconnecting");
    setTimeout(() => load(Math.min(delay * 2, 30_000)), delay);
  }
}

async function start() {
  // The list first: it is what a visit comes for.
  const loading = load();
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
  // The rate falls as the minute moves on, arrivals or not.
  setInterval(showRate, 1000);
  await loading;
}

start();
