"""Message times: the product accepts exactly what AgentAPI's Go decoder accepts.

``restore`` must never approve a file that AgentAPI then fails to load (it would start empty
and overwrite it), nor quarantine one it could load. The judge is Go itself: the small program
in ``tests/go_time_oracle`` decodes each candidate with ``encoding/json`` into ``time.Time``,
as AgentAPI does. It needs the Go toolchain (skipped without it, required in CI).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from agentapi_persist.models import AgentAPIState, go_accepts_time, parse_untrusted_json

from .real_agentapi import REQUIRE_ENV, required

ORACLE = Path(__file__).with_name("go_time_oracle")
BASE = "2024-02-29T23:59:59.123456789+05:30"
HAND = [
    "2025-01-02T03:04:05Z",
    "2025-01-02t03:04:05Z",
    "2025-01-02T03:04:05z",
    "2025-01-02T3:04:05Z",
    "2025-01-02T03:04:05,123Z",
    "2025-01-02T03:04:05+24:00",
    "2025-01-02T03:04:05+24:60",
    "2025-01-02T03:04:05+25:00",
    "2025-01-02T03:04:05-00:61",
    "2025-02-29T03:04:05Z",
    "2100-02-29T03:04:05Z",
    "2000-02-29T03:04:05Z",
    "0000-02-29T00:00:00Z",
    "2024-02-29T03:04:05.1234567891234Z",
    "2025-01-02T24:00:00Z",
    "2025-01-02T03:60:00Z",
    "2025-01-02T03:04:60Z",
    "2025-01-02 03:04:05Z",
    "2025-01-02T03:04:05.Z",
    "2025-01-02T03:04:05",
    "2025-01-02T03:04:05+0530",
    "2025-13-02T03:04:05Z",
    "2025-00-02T03:04:05Z",
    "2025-04-31T03:04:05Z",
    "+2025-01-02T03:04:05Z",
    "2025-01-02T03:04:05.123456789Z",
    "२०२५-01-02T03:04:05Z",
    "",
]


def _corpus() -> list[str]:
    """Hand-picked edges, every one-character change of a full-featured time, and random
    well-shaped times with out-of-range fields."""
    alphabet = ["0", "1", "2", "3", "5", "6", "9", "T", "t", "Z", "z", ".", ",", ":", "-", "+", " "]
    cases = list(HAND)
    for index in range(len(BASE)):
        for char in alphabet:
            cases.append(BASE[:index] + char + BASE[index + 1 :])
            cases.append(BASE[:index] + char + BASE[index:])
        cases.append(BASE[:index] + BASE[index + 1 :])
    rng = random.Random(20261201)
    for _ in range(2000):
        year, month, day = rng.randint(0, 9999), rng.randint(0, 13), rng.randint(0, 32)
        hour, minute, second = rng.randint(0, 25), rng.randint(0, 61), rng.randint(0, 61)
        frac = rng.choice(["", ".", ",", ".5", ",25", "." + "7" * rng.randint(1, 15)])
        zone = rng.choice(["Z", "z", "+00:00", f"-{rng.randint(0, 26):02}:{rng.randint(0, 62):02}"])
        hour_text = rng.choice([f"{hour:02}", str(hour)])
        cases.append(
            f"{year:04}-{month:02}-{day:02}T{hour_text}:{minute:02}:{second:02}{frac}{zone}"
        )
    return list(dict.fromkeys(cases))


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    go = shutil.which("go")
    if go is None:
        if required():
            pytest.fail(f"no Go toolchain ({REQUIRE_ENV}=1)")
        pytest.skip("no Go toolchain: the Go time oracle cannot be built")
    out = tmp_path_factory.mktemp("oracle") / "go_time_oracle"
    env = {**os.environ, "GOFLAGS": "-buildvcs=false", "GOTOOLCHAIN": "local"}
    subprocess.run([go, "build", "-o", str(out), "."], cwd=ORACLE, env=env, check=True, timeout=300)
    return out


def test_times_match_go_exactly(oracle: Path) -> None:
    """Every case: accepted here if and only if Go accepts it."""
    cases = _corpus()
    lines = "".join(json.dumps(case) + "\n" for case in cases)
    result = subprocess.run(
        [str(oracle)], input=lines, capture_output=True, text=True, check=True, timeout=60
    )
    verdicts = result.stdout.split()
    assert len(verdicts) == len(cases)
    wrong = [
        (case, verdict)
        for case, verdict in zip(cases, verdicts, strict=True)
        if go_accepts_time(case) != (verdict == "ok")
    ]
    assert not wrong, f"{len(wrong)} of {len(cases)} differ from Go, e.g. {wrong[:10]}"
    accepted = verdicts.count("ok")
    assert 100 < accepted < len(cases) - 100  # the corpus tests both sides


def test_state_file_times_use_the_go_rule() -> None:
    """The state-file model applies the same rule, and `null` (Go's zero time) loads."""

    def doc(time: object) -> bytes:
        message = {"id": 0, "message": "hi", "role": "user", "time": time}
        body = {
            "version": 1,
            "messages": [message],
            "initial_prompt": "",
            "initial_prompt_sent": False,
        }
        return json.dumps(body).encode()

    for good in ("2025-01-02T3:04:05,5Z", "2025-01-02T03:04:05+24:00"):
        assert parse_untrusted_json(doc(good), AgentAPIState).messages[0].time == good
    for bad in ("2025-01-02t03:04:05Z", "2025-02-29T03:04:05Z", "2025-01-02T03:04:05+25:00"):
        with pytest.raises(ValueError, match="RFC 3339"):
            parse_untrusted_json(doc(bad), AgentAPIState)
    state = parse_untrusted_json(doc(None), AgentAPIState)
    assert state.messages[0].time == "0001-01-01T00:00:00Z"


def test_corpus_is_large() -> None:
    """The corpus really holds the mutations (a guard on the generator itself)."""
    assert len(_corpus()) > 1500
