"""The benchmark script runs end to end (``--quick``) and reports a figure on every row.

No speed is asserted here: the figures depend on the machine and its load. What is checked is
that every measurement ran against the real peers, the product answered correctly in each
(the script exits 1 otherwise), and the table is complete. Also here: the fast serializer that
``restore`` uses for AgentAPI's file writes exactly the bytes the standard library would.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agentapi_persist.agentapi_state import render_agentapi_state, write_agentapi_state
from agentapi_persist.models import AgentAPIState, Conversation, Message, dump_compact

from .conftest import TIME
from .real_agentapi import REQUIRE_ENV

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
AREAS = {"sequence", "command", "restore", "checkpoint", "growth", "idle", "snapshot"}


@pytest.mark.timeout(240)
def test_quick_run_prints_a_figure_for_every_row(tmp_path: Path) -> None:
    """`bench.py --quick` exits 0, covers every area, and every row has a finite figure."""
    out = tmp_path / "bench.json"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--tmp", str(scratch), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=220,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["failures"] == []
    rows = report["rows"]
    areas = AREAS
    if report["details"].get("replica") != "skipped: the S3-compatible server is not installed":
        areas = AREAS | {"replica"}
    elif os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"the replica's benchmark was skipped although {REQUIRE_ENV}=1")
    assert {row["section"] for row in rows} == areas
    for row in rows:
        assert isinstance(row["value"], int | float), row
        assert math.isfinite(row["value"]), row
        assert row["value"] >= 0, row
    # The headline targets are all judged (met or missed), never left blank.
    judged = {row["name"].strip() for row in rows if row["ok"] is not None}
    for fragment in (
        "in-process, 1,000",
        "ratio to the floor, 1,000",
        "sidecar running",
        "no sidecar",
        "restore()",
        "append 1 new message",
        "resident memory",
        *(("upload lag",) if "replica" in areas else ()),
    ):
        assert any(fragment in name for name in judged), fragment
    # The printed table has one line per row, each with a figure in its median column.
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    body = [line for line in table if line.split("|")[1].strip() in areas]
    assert len(body) == len(rows)
    for line in body:
        median = line.split("|")[3].strip()
        assert median[:1].isdigit(), line
    assert "Targets met:" in result.stdout
    assert "temp directory filesystem" in result.stdout
    # Nothing is left behind: the script removes its own temporary directory.
    assert list(scratch.iterdir()) == []


def _conversation(
    contents: list[str], *, prompt: str | None = None, sent: bool | None = None
) -> Conversation:
    messages = tuple(
        Message(id=i, role=("user", "agent")[i % 2], content=text, time=TIME)
        for i, text in enumerate(contents)
    )
    return Conversation(messages=messages, initial_prompt=prompt, initial_prompt_sent=sent)


def _stdlib_bytes(conversation: Conversation, extra: dict[str, object] | None = None) -> bytes:
    document: dict[str, object] = {
        "version": 1,
        "messages": [
            {"id": i, "message": m.content, "role": m.role, "time": m.time}
            for i, m in enumerate(conversation.messages)
        ],
        "initial_prompt": conversation.initial_prompt or "",
        "initial_prompt_sent": bool(conversation.initial_prompt_sent),
        **(extra or {}),
    }
    return dump_compact(document) + b"\n"


def test_fast_render_writes_the_standard_librarys_bytes(tmp_path: Path) -> None:
    """Every code point (controls, quotes, backslashes, U+2028, astral), as json.dumps writes it."""
    everything = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)
    contents = [everything, "", '"\\\n\t\r\b\f\x00\x1f\x7f', "─" * 1000, "😀 <>&"]
    conversation = _conversation(contents, prompt="go\n", sent=True)
    expected = _stdlib_bytes(conversation)
    assert render_agentapi_state(conversation) == expected
    path = tmp_path / "agentapi-state.json"
    assert write_agentapi_state(path, conversation) == len(expected)
    assert path.read_bytes() == expected


def test_render_with_carried_extras_keeps_the_standard_library_format(tmp_path: Path) -> None:
    """A newer AgentAPI's extra fields (floats among them) keep json.dumps' number format."""
    conversation = _conversation(["hi", "hello"])
    extra_fields = {"ratio": 1e-07, "small": 2.5e-05, "nested": {"k": [1, 0.1]}}
    state = AgentAPIState.model_validate(
        {"version": 1, "messages": [], "initial_prompt": "", "initial_prompt_sent": False}
        | extra_fields
    )
    data = render_agentapi_state(conversation, extra=state)
    assert data == _stdlib_bytes(conversation, extra_fields)
    assert b'"ratio":1e-07' in data
    path = tmp_path / "agentapi-state.json"
    write_agentapi_state(path, conversation, extra=state)
    assert path.read_bytes() == data


def test_render_of_a_lone_surrogate_falls_back_to_ascii_escapes() -> None:
    """An undecodable prompt from the environment (a lone surrogate) is written as an escape."""
    conversation = _conversation(["hi"]).model_copy(update={"initial_prompt": "go \udcff"})
    data = render_agentapi_state(conversation)
    assert b'"initial_prompt":"go \\udcff"' in data
    assert json.loads(data)["initial_prompt"] == "go \udcff"
