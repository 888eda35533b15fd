"""The counts behind docs/RELIABILITY.md and docs/reliability/, recorded by the tests themselves.

A fault test that makes a claim in those pages ("240 bit flips, 222 fell back", "60 kills
inside `restore`") records what it actually did and saw here, instead of the page carrying a
figure nobody can trace. ``conftest.pytest_terminal_summary`` prints every line at the end of
the run, in a "reliability counts" section (no ``-s`` needed), and writes them as JSON to the
file named by ``AGENTAPI_PERSIST_EVIDENCE`` when it is set.

Two shapes: ``tally(title, key)`` adds one to a counter shared by every test that names the
same title (a parametrized family of cases adds up to its total), and ``record(title, counts)``
adds a whole test's counters at once. Both sum, so a title run twice (a rerun in one session)
shows both runs; the section says how many tests fed each line (a parametrized case is one test).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

EVIDENCE_ENV = "AGENTAPI_PERSIST_EVIDENCE"

_counts: dict[str, Counter[str]] = {}
_notes: dict[str, dict[str, str]] = {}
_tests: dict[str, set[str]] = {}


def _fed_by(title: str) -> None:
    """Remember which test fed ``title`` (pytest names the running test in the environment)."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
    _tests.setdefault(title, set()).add(test)


def tally(title: str, key: str = "cases", n: int = 1) -> None:
    """Add ``n`` to ``key`` under ``title``: one call per case of a family of tests."""
    _counts.setdefault(title, Counter())[key] += n
    _fed_by(title)


def record(title: str, counts: Mapping[str, int], **notes: str) -> None:
    """Add a whole test's counters under ``title``; ``notes`` are figures that do not sum
    (the slowest exit, a seed), kept as the last test gave them."""
    _counts.setdefault(title, Counter()).update(counts)
    if notes:
        _notes.setdefault(title, {}).update(notes)
    _fed_by(title)


def lines() -> list[str]:
    """One line per title, in a stable order."""
    out = []
    for title in sorted(_counts):
        counts = " ".join(f"{k}={v}" for k, v in sorted(_counts[title].items()))
        notes = " ".join(f"{k}={v}" for k, v in sorted(_notes.get(title, {}).items()))
        out.append(
            f"[{title}] {counts}{' ' + notes if notes else ''} (tests: {len(_tests[title])})"
        )
    return out


def dump(path: Path) -> None:
    """Write every title's counters and notes as JSON, for tooling that checks the docs."""
    data = {
        title: {
            "counts": dict(_counts[title]),
            "notes": _notes.get(title, {}),
            "tests": sorted(_tests[title]),
        }
        for title in sorted(_counts)
    }
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
