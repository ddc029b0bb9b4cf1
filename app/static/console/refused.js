// Refused deliveries, newest first; older ones page by cursor.
import { getJSON } from "./api.js";
import { byId, el, number, timeEl } from "./dom.js";

const PAGE = 50;
let cursor = null;
let newest = 0;

export function setUpRefused() {
  byId("refused-more").addEventListener("click", older);
}

// The first page again: rows not shown yet go on top.
export async function refreshRefused() {
  const page = await getJSON("rejections", { limit: PAGE });
  const body = byId("refused-rows");
  if (!body.children.length) cursor = page.next_cursor;
  const fresh = page.data.filter((r) => r.id > newest);
  if (fresh.length) newest = fresh[0].id;
  body.prepend(...fresh.map(row));
  byId("refused-empty").hidden = body.children.length > 0;
  byId("refused-more").hidden = !cursor;
}

async function older() {
  if (!cursor) return;
  const page = await getJSON("rejections", { limit: PAGE, cursor });
  cursor = page.next_cursor;
  byId("refused-rows").append(...page.data.map(row));
  byId("refused-more").hidden = !cursor;
}

function row(r) {
  return el(
    "tr",
    { dataset: { id: r.id } },
    el("td", {}, timeEl(r.at, "full")),
    el("td", {}, el("span", { class: `reason ${r.reason}` }, r.reason)),
    el("td", {}, r.field === null ? "" : el("code", {}, r.field)),
    el("td", {}, el("code", {}, r.endpoint)),
    el("td", {}, r.remote || ""),
    el("td", { class: "num" }, number(r.body_bytes)),
    el("td", {}, r.message_id === null ? "" : el("code", {}, r.message_id)),
  );
}
