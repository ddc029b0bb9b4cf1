"""The README and docs/ say what the code does: every setting in the configuration table,
every metric in the metrics table, and every relative link (file and heading) resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.config import Settings
from app.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def table_names(section: str) -> set[str]:
    """The backticked names in the first column of the README section's table."""
    text = README.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in body.splitlines():
        if line.startswith("| `"):
            names.update(re.findall(r"`([A-Za-z0-9_*]+)`", line.split(" | ")[0]))
    return names


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            found.add(slug(line.lstrip("#")))
    return found


def test_every_setting_is_in_the_configuration_table() -> None:
    documented = table_names("Configuration")
    missing = {name.upper() for name in Settings.model_fields} - documented
    assert not missing


def test_every_metric_is_in_the_metrics_table() -> None:
    documented = table_names("Metrics")
    exposed = {
        sample.name
        for family in Metrics().registry.collect()
        for sample in family.samples
        if not sample.name.startswith(("process_", "python_"))
    }
    histograms = {"request_latency_ms", "http_request_duration_seconds"}
    missing = {
        name
        for name in exposed
        if name not in documented
        and not any(name.startswith(h + "_") for h in histograms)
        and name.removesuffix("_created") not in documented
    }
    assert not missing


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_relative_links_resolve(document: Path) -> None:
    broken = []
    in_code = False
    for line in document.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            continue
        for target in LINK.findall(line):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            resolved = (document.parent / path).resolve() if path else document
            exists = resolved.exists()
            if not exists or (
                anchor and resolved.suffix == ".md" and anchor not in anchors(resolved)
            ):
                broken.append(target)
    assert not broken
