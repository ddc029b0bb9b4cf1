"""Several commits' services side by side on the same fresh-insert load.

Each git ref's `app/` is extracted to a folder of its own and served in turns (the order
alternates from pass to pass) with this checkout's harness and virtualenv: what changed
in the ingest path between two builds, on one machine in one run.

    python -m bench.compare REF [REF ...] [--passes 3] [--connections 64]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.run import PYTHON, ROOT, Load, Variant, fmt, fresh_inserts, serve


def extract(ref: str, into: Path) -> Variant:
    tree = into / ref.replace("/", "_")
    tree.mkdir()
    archive = subprocess.run(
        ["git", "archive", ref, "app"], cwd=ROOT, capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    # -P: the working folder does not come first on sys.path, so `app` is the ref's.
    return Variant(
        ref,
        [PYTHON, "-P", "-m", "app", "serve"],
        log=True,
        queries=True,
        env={"PYTHONPATH": str(tree)},
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("refs", nargs="+")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=8, help="seconds per load")
    parser.add_argument("--fresh-bodies", type=int, default=200_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    try:
        variants = [extract(ref, work) for ref in args.refs]
        loads: dict[str, list[Load]] = {variant.name: [] for variant in variants}
        for pass_index in range(args.passes):
            order = variants if pass_index % 2 == 0 else list(reversed(variants))
            for variant in order:
                run = work / f"run-{pass_index}"
                run.mkdir()
                with serve(variant, run, run / "app.db") as server:
                    prefix = f"c{pass_index}{len(loads[variant.name])}"
                    load = fresh_inserts(server, run / "fresh.txt", prefix, args.connections, args)
                    loads[variant.name].append(load)
                shutil.rmtree(run)
            print(f"  pass {pass_index + 1} done", file=sys.stderr, flush=True)
        print(f"fresh inserts, {args.connections} connections; {args.passes} passes, medians")
        print(f"{'ref':<24}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'cpu us':>9}")
        for name, runs in loads.items():
            print(
                f"{name:<24}{fmt(statistics.median(r.rps for r in runs)):>9}"
                f"{fmt(statistics.median(r.p50_ms for r in runs), 2):>9}"
                f"{fmt(statistics.median(r.p99_ms for r in runs), 2):>9}"
                f"{fmt(statistics.median(r.cpu_us or 0 for r in runs), 1):>9}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
