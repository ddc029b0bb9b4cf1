// Small DOM helpers. Message text only ever becomes text nodes (never markup), so a
// hostile message cannot inject anything into the page.

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

const SVG = "http://www.w3.org/2000/svg";

export function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.setAttribute("class", value);
    else node.setAttribute(name, String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function byId(id) {
  return document.getElementById(id);
}

// `text` with every case-insensitive occurrence of `term` in <mark>: text nodes and mark
// elements only. Matching lower-cases both sides, close to the server's case folding.
export function highlighted(text, term) {
  const out = document.createDocumentFragment();
  if (!term) {
    out.append(text);
    return out;
  }
  const haystack = text.toLowerCase();
  const needle = term.toLowerCase();
  let at = 0;
  // Only when lower-casing keeps lengths: otherwise positions would not line up.
  if (haystack.length === text.length) {
    for (let found = haystack.indexOf(needle, at); found >= 0 && needle; found = haystack.indexOf(needle, at)) {
      out.append(text.slice(at, found), el("mark", {}, text.slice(found, found + needle.length)));
      at = found + needle.length;
    }
  }
  out.append(text.slice(at));
  return out;
}

// `ts` exactly as received can carry nine fractional digits; Date wants at most three.
export function toDate(ts) {
  return new Date(ts.replace(/(\.\d{3})\d+Z$/, "$1Z"));
}

const day = new Intl.DateTimeFormat(undefined, { day: "numeric", month: "short", year: "numeric" });
const time = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const full = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });

export function when(ts, style = "short") {
  const date = toDate(ts);
  if (Number.isNaN(date.getTime())) return ts;
  if (style === "full") return full.format(date);
  const today = new Date();
  return date.toDateString() === today.toDateString() ? time.format(date) : day.format(date);
}

// A <time> element: the local rendering, with the instant as received in its title.
export function timeEl(ts, style = "short") {
  return el("time", { datetime: toDate(ts).toISOString(), title: ts }, when(ts, style));
}

export function number(value) {
  return new Intl.NumberFormat().format(value);
}

// One of eight avatar colours, the same for a number every time.
export function colourClass(text) {
  let hash = 0;
  for (const char of text) hash = (hash * 31 + char.charCodeAt(0)) >>> 0;
  return `c${hash % 8}`;
}

export function avatar(msisdn) {
  return el("span", { class: `avatar ${colourClass(msisdn)}`, "aria-hidden": "true" }, msisdn.slice(-2));
}

// Calls `load` when `sentinel` scrolls into view inside `root` (infinite scrolling).
export function onVisible(sentinel, root, load) {
  const observer = new IntersectionObserver(
    (entries) => {
      if (entries.some((entry) => entry.isIntersecting)) load();
    },
    { root, rootMargin: "120px" },
  );
  observer.observe(sentinel);
  return observer;
}
