"""`make bench-console`: the console at a million messages (also part of `make bench`).

One store of `--rows` messages from 10,000 senders, their timestamps spread over a year,
served by the service; then:

- /conversations (first page and a page by cursor) and /stats/timeline (a year of days,
  a month of hours): the service's own latency_ms for each, medians, one connection;
- the first render of `/` in a fresh headless Chromium per pass (an empty cache, as a
  first visit): Navigation Timing's response end, DOMContentLoaded and load, the first
  contentful paint, and the moment the conversation list is drawn (a performance mark
  the page sets), medians over the passes.

    python -m bench.console [--rows 1000000] [--passes 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.dataset import prefill_service
from bench.run import VARIANTS, fmt, serve, server_time_ms, settled_log_size, wrk
from tests.support.browser import chromium, why_unavailable

# Navigation Timing and the page's own mark, in ms since the navigation started.
TIMINGS_SCRIPT = """
const nav = performance.getEntriesByType('navigation')[0];
const paint = performance.getEntriesByName('first-contentful-paint')[0];
const drawn = performance.getEntriesByName('conversations-drawn')[0];
return JSON.stringify({
  response_end: nav.responseEnd,
  dom_content_loaded: nav.domContentLoadedEventEnd,
  load: nav.loadEventEnd,
  first_contentful_paint: paint ? paint.startTime : null,
  conversations_drawn: drawn ? drawn.startTime : null,
  transferred_bytes: performance.getEntriesByType('resource')
    .reduce((sum, r) => sum + r.decodedBodySize, nav.decodedBodySize),
});
"""
RENDER_LABELS = {
    "response_end": "HTML received",
    "dom_content_loaded": "DOMContentLoaded",
    "first_contentful_paint": "first contentful paint",
    "load": "load event",
    "conversations_drawn": "conversation list drawn",
}


def first_render(url: str) -> dict[str, float]:
    """One visit with an empty cache; waits until the conversation list is drawn."""
    with chromium() as driver:
        driver.get(url)
        deadline = time.monotonic() + 30
        while not driver.execute_script(
            "return performance.getEntriesByName('conversations-drawn').length"
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("the conversation list was not drawn within 30 s")
            time.sleep(0.02)
        timings: dict[str, float] = json.loads(driver.execute_script(TIMINGS_SCRIPT))
        return timings


def cursor_of(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310
        cursor: str = json.loads(response.read())["next_cursor"]
        return cursor


def run(args: argparse.Namespace, workdir: Path) -> list[str]:
    lines = []
    db = workdir / "console.db"
    started = time.monotonic()
    prefill_service(db, args.rows, span_days=365)
    lines.append(
        f"prefilled {args.rows:,} messages (10,000 senders, a year of timestamps)"
        f" in {time.monotonic() - started:.0f} s"
    )
    server_ms: dict[str, list[float]] = {}
    renders: list[dict[str, float]] = []
    with serve(VARIANTS["service"], workdir, db) as server:
        deep = cursor_of(server.url + "/conversations?limit=50")
        for _ in range(20):  # a deep cursor: page 21 of 200
            deep = cursor_of(server.url + f"/conversations?limit=50&cursor={deep}")
        loads = [
            ("GET /conversations first page", "/conversations?limit=50", "/conversations"),
            (
                "GET /conversations page 22 (cursor)",
                f"/conversations?limit=50&cursor={deep}",
                "/conversations",
            ),
            (
                "GET /stats/timeline 365 days by day",
                "/stats/timeline?bucket=day&since=2025-01-01T00:00:00Z&until=2026-01-01T00:00:00Z",
                "/stats/timeline",
            ),
            (
                "GET /stats/timeline 30 days by hour",
                "/stats/timeline?bucket=hour&since=2025-06-01T00:00:00Z&until=2025-07-01T00:00:00Z",
                "/stats/timeline",
            ),
            ("GET /stats", "/stats", "/stats"),
        ]
        for _ in range(args.passes):
            for label, path, route in loads:
                offset = settled_log_size(server)
                wrk(
                    server.url + path,
                    connections=1,
                    duration=args.query_duration,
                    workdir=workdir,
                )
                value = server_time_ms(server.log, offset, route)
                if value is not None:
                    server_ms.setdefault(label, []).append(value)
        reason = why_unavailable()
        if reason is None:
            for _ in range(args.passes):
                renders.append(first_render(server.url + "/"))
        else:
            lines.append(f"first render: skipped ({reason})")
        size = page_weight(server.url)
    lines.append("")
    lines.append(f"{'at ' + format(args.rows, ',') + ' rows, 1 connection':<40}{'server ms':>10}")
    for label, values in server_ms.items():
        lines.append(f"{label:<40}{fmt(statistics.median(values), 3):>10}")
    if renders:
        lines.append("")
        lines.append(f"{'first render of / (fresh browser, median)':<40}{'ms':>10}")
        for key, label in RENDER_LABELS.items():
            values = [r[key] for r in renders if r.get(key) is not None]
            lines.append(f"{label:<40}{fmt(statistics.median(values), 1) if values else '-':>10}")
    lines.append(f"page weight (HTML + CSS + JS, uncompressed): {size / 1024:.1f} KB")
    return lines


def page_weight(base: str) -> int:
    """The console's own files, as a browser fetches them on a first visit."""
    total = 0
    names = ["/", "/static/console/console.css", "/static/console/favicon.svg"]
    names += [
        f"/static/console/{module}.js"
        for module in ("console", "api", "dom", "inbox", "search", "overview", "refused")
    ]
    for name in names:
        with urllib.request.urlopen(base + name, timeout=30) as response:  # noqa: S310
            total += len(response.read())
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--query-duration", type=float, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-console-") as tmp:
        print("\n".join(run(args, Path(tmp))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
