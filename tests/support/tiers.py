"""The battery's tiers and the figures it prints.

The fast tier runs inside `make test`; `make soak` sets RELIABILITY_TIER=soak and the same
tests run longer. Tests record figures (kills survived, cases run, p99s) with `record`, and
conftest prints them at the end of the session.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Tier:
    name: str
    # Crash under load: SIGKILLs of the real service, and of the broken build.
    kills: int
    startup_kills: int
    broken_kills: int
    # Races: rounds of `race_width` concurrent deliveries of one fresh id.
    race_rounds: int
    race_width: int
    # Graceful shutdown: SIGTERMs under load.
    shutdowns: int
    # Property tests and fuzzing: examples per test (per API operation for schemathesis).
    examples: int
    fuzz_examples: int
    # Slow clients: attacking connections, and legitimate requests timed during the attack.
    slow_clients: int
    legit_requests: int


FAST = Tier(
    name="fast",
    kills=5,
    startup_kills=1,
    broken_kills=2,
    race_rounds=10,
    race_width=16,
    shutdowns=1,
    examples=300,
    fuzz_examples=40,
    slow_clients=200,
    legit_requests=200,
)
SOAK = Tier(
    name="soak",
    kills=100,
    startup_kills=10,
    broken_kills=5,
    race_rounds=200,
    race_width=32,
    shutdowns=10,
    examples=20_000,
    fuzz_examples=1000,
    slow_clients=600,
    legit_requests=2000,
)
TIER = SOAK if os.environ.get("RELIABILITY_TIER") == "soak" else FAST

# name -> value, printed by conftest's pytest_terminal_summary.
FIGURES: dict[str, str] = {}


def record(name: str, value: object) -> None:
    FIGURES[name] = str(value)
