// Search: `q` across every message, with sender and date filters; pages by cursor.
import { ApiError, getJSON } from "./api.js";
import { avatar, byId, el, highlighted, number, onVisible, timeEl } from "./dom.js";

const PAGE = 50;
let current = null; // {params, cursor, term}
let loading = false;

export function setUpSearch() {
  byId("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    search(new FormData(event.target));
  });
  byId("results-more").addEventListener("click", more);
  onVisible(byId("results-more"), null, more);
}

// Dates are whole UTC days: from the start of `since` to the end of `until`.
function query(form) {
  const from = (form.get("from") || "").trim();
  const since = form.get("since");
  const until = form.get("until");
  let end = null;
  if (until) {
    const next = new Date(`${until}T00:00:00Z`);
    next.setUTCDate(next.getUTCDate() + 1);
    end = next.toISOString().replace(".000Z", "Z");
  }
  return {
    q: (form.get("q") || "").trim(),
    from: from && !from.startsWith("+") ? `+${from}` : from,
    since: since ? `${since}T00:00:00Z` : null,
    until: end,
    order: "desc",
    limit: PAGE,
  };
}

async function search(form) {
  const params = query(form);
  current = { params, cursor: null, term: params.q };
  byId("results").replaceChildren();
  byId("search-summary").textContent = "Searching…";
  await load();
}

async function more() {
  if (current && current.cursor) await load();
}

async function load() {
  if (loading) return;
  loading = true;
  const run = current;
  try {
    const page = await getJSON("messages", { ...run.params, cursor: run.cursor });
    if (run !== current) return;
    run.cursor = page.next_cursor;
    const list = byId("results");
    for (const m of page.data) list.append(result(m, run.term));
    byId("results-more").hidden = !run.cursor;
    const shown = list.children.length;
    byId("search-summary").textContent =
      page.total === 0
        ? "No messages match."
        : `${number(page.total)} message${page.total === 1 ? "" : "s"} match, newest first; showing ${number(shown)}.`;
  } catch (error) {
    byId("search-summary").textContent =
      error instanceof ApiError && error.status === 422 ? "Check the filters: a sender is + and 2 to 15 digits." : `Search failed: ${error.message}`;
  } finally {
    loading = false;
  }
}

function result(m, term) {
  return el(
    "li",
    { class: "result" },
    avatar(m.from),
    el(
      "div",
      { class: "body" },
      el("p", { class: "head" }, el("span", { class: "from" }, m.from), " → ", el("span", { class: "to" }, m.to), " · ", timeEl(m.ts, "full")),
      el("p", { class: "text" }, m.text === null ? el("em", {}, "no text") : highlighted(m.text, term)),
    ),
  );
}
