"""Contract fuzzing: schemathesis, every check, against the service's own OpenAPI document.

It runs the schemathesis command line (all phases: coverage, fuzzing, stateful) against a
real server, with tests/support/schemathesis_hooks.py signing webhook bodies. Passing means no 5xx
and no response that breaks the document. Afterwards the server's logs hold no signature
and no error, and its /metrics agree with what it logged and stored.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.battery import metrics_disagreements, scrape
from tests.support.clients import SECRET
from tests.support.servers import ROOT, SERVE, running_server
from tests.support.tiers import TIER, record

pytestmark = [pytest.mark.slow, pytest.mark.reliability]

HEX_64 = re.compile(r"[0-9a-fA-F]{64}")


def test_schemathesis_finds_nothing_against_the_openapi_document(tmp_path: Path) -> None:
    seed = 20261126 if TIER.name == "fast" else int.from_bytes(os.urandom(4), "big")
    with running_server(tmp_path, command=SERVE) as server:
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "schemathesis.cli",
                "run",
                f"{server.base_url}/openapi.json",
                "--checks",
                "all",
                "--max-examples",
                str(TIER.fuzz_examples),
                "--seed",
                str(seed),
                "--generation-database",
                "none",
                "--no-color",
            ],
            cwd=tmp_path,
            env={
                **os.environ,
                "SCHEMATHESIS_HOOKS": "tests.support.schemathesis_hooks",
                "PYTHONPATH": str(ROOT),
                "WEBHOOK_SECRET": SECRET,
            },
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        report = run.stdout + run.stderr
        assert run.returncode == 0, report[-6000:]
        samples = scrape(server.base_url, server.log_path)
        server.stop()
        lines = server.log_lines()
    conn = sqlite3.connect(tmp_path / "app.db")
    try:
        rows = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    finally:
        conn.close()

    parsed = [json.loads(line) for line in lines]
    assert not [line for line in parsed if line.get("status", 0) >= 500]
    assert not [
        line for line in parsed if line["level"] == "ERROR" and line["logger"] != "app.access"
    ]
    # Nothing in the logs looks like a signature (ids and paths are the sender's own choice,
    # and may look like anything), and the secret is not there either.
    chosen = ("message_id", "path")
    assert not [x for x in parsed if HEX_64.search(json.dumps({**x, **dict.fromkeys(chosen)}))]
    assert not [line for line in lines if SECRET in line]
    assert metrics_disagreements(samples, lines, rows) == []
    # ...and the comparison would notice a counter that is off by one.
    assert metrics_disagreements(samples, lines, rows + 1)

    generated = re.search(r"(\d+) generated", report)
    assert generated is not None, report[-2000:]
    record("contract fuzzing: schemathesis cases (all checks), failures", f"{generated[1]}, 0")
    record("contract fuzzing: webhook deliveries stored", rows)
