// Overview: totals and readiness, the top senders, and messages over time, as SVG drawn
// here (no chart library: a few hundred lines of markup weigh less than any of them).
import { getJSON, ready } from "./api.js";
import { byId, el, number, svg, toDate, when } from "./dom.js";

let lastStats = null;

export function setUpOverview() {
  for (const id of ["timeline-bucket", "timeline-range"]) {
    byId(id).addEventListener("change", () => {
      rangeChosen = true;
      drawTimeline();
    });
  }
}

let rangeChosen = false;

export async function refreshOverview(stats) {
  lastStats = stats;
  if (!rangeChosen && stats.first_message_ts) {
    // The first time: the shortest range that shows every message (a year at most).
    const span = (toDate(stats.last_message_ts) - toDate(stats.first_message_ts)) / 86400000;
    const fits = [...byId("timeline-range").options].find((option) => Number(option.value) > span);
    byId("timeline-range").value = fits ? fits.value : "365";
    byId("timeline-bucket").value = byId("timeline-range").value === "2" ? "hour" : "day";
    rangeChosen = true;
  }
  byId("stat-total").textContent = number(stats.total_messages);
  byId("stat-senders").textContent = number(stats.senders_count);
  byId("stat-first").textContent = stats.first_message_ts ? when(stats.first_message_ts, "full") : "–";
  byId("stat-last").textContent = stats.last_message_ts ? when(stats.last_message_ts, "full") : "–";
  const isReady = await ready();
  const readiness = byId("stat-ready");
  readiness.textContent = isReady ? "ready" : "unavailable";
  readiness.className = isReady ? "good" : "bad";
  drawSenders(stats.messages_per_sender);
  await drawTimeline();
}

function drawSenders(senders) {
  const box = byId("senders-chart");
  if (!senders.length) {
    box.replaceChildren(el("p", { class: "empty" }, "No senders yet."));
    return;
  }
  const row = 24;
  const width = 400;
  const label = 118;
  const max = Math.max(...senders.map((s) => s.count));
  const chart = svg("svg", {
    viewBox: `0 0 ${width} ${senders.length * row}`,
    role: "img",
    "aria-label": `Top ${senders.length} senders by messages: ${senders.map((s) => `${s.from} ${s.count}`).join(", ")}`,
  });
  senders.forEach((s, index) => {
    const y = index * row;
    const length = Math.max(2, ((width - label - 60) * s.count) / max);
    chart.append(
      svg("text", { x: label - 8, y: y + row / 2 + 4, class: "axis", "text-anchor": "end" }, s.from),
      svg("rect", { x: label, y: y + 4, width: length, height: row - 8, rx: 3, class: "bar" }, svg("title", {}, `${s.from}: ${s.count}`)),
      svg("text", { x: label + length + 6, y: y + row / 2 + 4, class: "value" }, number(s.count)),
    );
  });
  box.replaceChildren(chart);
}

// The chosen range, ending just after the newest message (or now, on an empty store), so
// that a store of older messages still shows them.
function range() {
  const days = Number(byId("timeline-range").value);
  const end = lastStats && lastStats.last_message_ts ? toDate(lastStats.last_message_ts) : new Date();
  end.setUTCSeconds(end.getUTCSeconds() + 1, 0);
  const start = new Date(end.getTime() - days * 86400 * 1000);
  const iso = (date) => date.toISOString().replace(/\.\d{3}Z$/, "Z");
  return { since: iso(start), until: iso(end) };
}

async function drawTimeline() {
  const bucket = byId("timeline-bucket").value;
  const { since, until } = range();
  const timeline = await getJSON("stats/timeline", { bucket, since, until });
  const box = byId("timeline-chart");
  const data = timeline.data;
  const width = 800;
  const height = 220;
  const left = 44;
  const bottom = 24;
  const max = Math.max(1, ...data.map((d) => d.count));
  const step = (width - left) / data.length;
  const peak = data.reduce((best, d) => (d.count > best.count ? d : best), data[0]);
  const chart = svg("svg", {
    viewBox: `0 0 ${width} ${height}`,
    role: "img",
    "aria-label": `Messages per ${bucket} from ${timeline.since} to ${timeline.until}: ${timeline.total} in all, at most ${peak.count} (${peak.start}).`,
  });
  const plot = height - bottom;
  chart.append(
    svg("line", { x1: left, y1: plot, x2: width, y2: plot, class: "grid" }),
    svg("line", { x1: left, y1: 8, x2: width, y2: 8, class: "grid faint" }),
    svg("text", { x: left - 6, y: 12, class: "axis", "text-anchor": "end" }, number(max)),
    svg("text", { x: left - 6, y: plot, class: "axis", "text-anchor": "end" }, "0"),
  );
  data.forEach((d, index) => {
    if (!d.count) return;
    const h = Math.max(1, ((plot - 8) * d.count) / max);
    chart.append(
      svg(
        "rect",
        { x: left + index * step + step * 0.1, y: plot - h, width: Math.max(0.5, step * 0.8), height: h, class: "bar" },
        svg("title", {}, `${label(d.start, bucket)}: ${d.count}`),
      ),
    );
  });
  for (const index of [0, Math.floor(data.length / 2), data.length - 1]) {
    const anchor = index === 0 ? "start" : index === data.length - 1 ? "end" : "middle";
    const x = index === data.length - 1 ? width : left + index * step + step / 2;
    chart.append(svg("text", { x, y: height - 6, class: "axis", "text-anchor": anchor }, label(data[index].start, bucket)));
  }
  box.replaceChildren(chart);
  byId("timeline-note").textContent = `${number(timeline.total)} messages, by ${bucket} of their timestamp (UTC), ${label(timeline.since, bucket)} to ${label(timeline.until, bucket)}.`;
}

function label(start, bucket) {
  return bucket === "hour" ? `${start.slice(5, 10)} ${start.slice(11, 16)}` : start.slice(0, 10);
}
