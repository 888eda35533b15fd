"""`restore`: every row of the decision table, on real files."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from agentapi_persist.agentapi_state import read_agentapi_state, render_agentapi_state
from agentapi_persist.errors import AgentRunningError, ExitCode
from agentapi_persist.file_mark import remember
from agentapi_persist.models import Conversation
from agentapi_persist.restoring import RestoreReport, restore
from agentapi_persist.store import StateStore
from agentapi_persist.testing.agentapi import FakeAgentAPI
from agentapi_persist.testing.server import free_port

from . import evidence
from .conftest import Workspace, make_messages


def conversation(n: int, *, prefix: str = "message", sent: bool = True) -> Conversation:
    return Conversation(
        messages=tuple(make_messages(n, prefix=prefix)),
        initial_prompt="do the thing",
        initial_prompt_sent=sent,
        prompt_origin="agentapi_state",
    )


def run(ws: Workspace) -> RestoreReport:
    return restore(ws.settings(agentapi_url=f"http://127.0.0.1:{free_port()}"))


def quarantined(ws: Workspace) -> list[Path]:
    return sorted(ws.module_dir.glob("agentapi-state.json.corrupt-*"))


BAD_FILES = {
    "empty": b"",
    "truncated": render_agentapi_state(conversation(6))[:-40],
    "zero-filled": b"\0" * 300,
    "garbage": b"\x89PNG\r\n\x1a\n not a state file",
    "wrong version": (
        b'{"version":2,"messages":[],"initial_prompt":"","initial_prompt_sent":false}\n'
    ),
    "ids with a gap": (
        b'{"version":1,"messages":[{"id":0,"message":"a","role":"user",'
        b'"time":"2025-01-02T03:04:05Z"},{"id":2,"message":"b","role":"agent",'
        b'"time":"2025-01-02T03:04:05Z"}],"initial_prompt":"","initial_prompt_sent":false}\n'
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_file_is_quarantined_and_rewritten_from_the_copy(
    workspace: Workspace, kind: str
) -> None:
    """Each kind of unusable file is moved aside byte-exact and replaced from the copy."""
    evidence.tally("damaged files at restore", "agentapi_file_kinds_with_a_copy")
    StateStore(workspace.state_dir).save(conversation(6))
    workspace.state_file.write_bytes(BAD_FILES[kind])
    report = run(workspace)
    assert report.outcome == "written"
    assert report.exit_code is ExitCode.OK
    (kept,) = quarantined(workspace)
    assert kept.read_bytes() == BAD_FILES[kind]
    state = read_agentapi_state(workspace.state_file, max_bytes=2**20)
    assert len(state.messages) == 6
    assert (state.initial_prompt, state.initial_prompt_sent) == ("do the thing", True)
    assert workspace.state_file.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_file_without_a_copy_exits_7_and_keeps_the_bytes(
    workspace: Workspace, kind: str
) -> None:
    """With nothing to restore from, the bad bytes are still kept and the exit code says so."""
    evidence.tally("damaged files at restore", "agentapi_file_kinds_without_a_copy")
    workspace.state_file.write_bytes(BAD_FILES[kind])
    report = run(workspace)
    assert report.outcome == "no_good_copy"
    assert report.exit_code is ExitCode.NO_GOOD_COPY
    (kept,) = quarantined(workspace)
    assert kept.read_bytes() == BAD_FILES[kind]
    assert not workspace.state_file.exists()


def test_missing_file_is_written_from_the_copy(workspace: Workspace) -> None:
    """A missing file (first start after a wipe) is written from the copy."""
    StateStore(workspace.state_dir).save(conversation(3))
    assert run(workspace).outcome == "written"
    assert len(read_agentapi_state(workspace.state_file, max_bytes=2**20).messages) == 3


def test_nothing_anywhere_is_a_first_start(workspace: Workspace) -> None:
    """No file and no copy: nothing to do, exit 0."""
    report = run(workspace)
    assert report.outcome == "nothing"
    assert report.exit_code is ExitCode.OK


def test_current_file_is_left_alone(workspace: Workspace) -> None:
    """A valid file equal to the copy is not touched."""
    StateStore(workspace.state_dir).save(conversation(4))
    data = render_agentapi_state(conversation(4))
    workspace.state_file.write_bytes(data)
    before = workspace.state_file.stat().st_ino
    assert run(workspace).outcome == "unchanged"
    assert workspace.state_file.stat().st_ino == before


def test_file_behind_the_copy_is_rewritten_keeping_its_prompt_fields(workspace: Workspace) -> None:
    """An older file is brought up to date; its prompt fields (the true ones) are kept."""
    StateStore(workspace.state_dir).save(conversation(9, sent=False))
    workspace.state_file.write_bytes(render_agentapi_state(conversation(5, sent=True)))
    assert run(workspace).outcome == "written"
    state = read_agentapi_state(workspace.state_file, max_bytes=2**20)
    assert len(state.messages) == 9
    assert state.initial_prompt_sent is True


def test_file_ahead_of_the_copy_updates_the_copy(workspace: Workspace) -> None:
    """A file newer than the copy (sidecar was not running) becomes the copy."""
    StateStore(workspace.state_dir).save(conversation(3))
    workspace.state_file.write_bytes(render_agentapi_state(conversation(8)))
    assert run(workspace).outcome == "adopted"
    stored = StateStore(workspace.state_dir).load().conversation
    assert stored is not None
    assert len(stored.messages) == 8


def archived(workspace: Workspace) -> list[bytes]:
    directory = workspace.state_dir / "archive"
    return [p.read_bytes() for p in directory.iterdir()] if directory.exists() else []


def test_diverged_file_written_after_the_last_agreement_wins_whatever_the_clocks(
    workspace: Workspace,
) -> None:
    """restore wrote the file from the copy (they agree); then AgentAPI saved a diverging
    conversation with its clock a day behind: the file is newer by what is known, so it
    wins, and the sidecar's copy is archived whole, not dropped."""
    StateStore(workspace.state_dir).save(conversation(4, prefix="old"))
    assert run(workspace).outcome == "written"
    workspace.state_file.unlink()  # AgentAPI saves by rename: a new file
    workspace.state_file.write_bytes(render_agentapi_state(conversation(3, prefix="new")))
    day_ago = time.time() - 86_400
    os.utime(workspace.state_file, (day_ago, day_ago))
    report = run(workspace)
    assert report.outcome == "adopted"
    assert any("written since" in line for line in report.found)
    assert workspace.stored().messages[0].content.startswith("new")
    (kept,) = archived(workspace)
    assert b"old 0" in kept
    assert quarantined(workspace) == []


def test_diverged_file_untouched_since_the_last_agreement_loses_whatever_the_clocks(
    workspace: Workspace,
) -> None:
    """The file is the version the copy last agreed with (its clock says tomorrow); the copy
    moved on and diverged (a new conversation followed by the sidecar): the copy wins, and
    the file's bytes are kept beside it."""
    store = StateStore(workspace.state_dir)
    store.save(conversation(4, prefix="old"))
    assert run(workspace).outcome == "written"
    tomorrow = time.time() + 86_400
    os.utime(workspace.state_file, (tomorrow, tomorrow))
    # os.utime changed the file's version: record it as agreed, as a confirmed save would.
    remember(workspace.state_dir, workspace.state_file)
    store.save(conversation(5, prefix="new"), allow_shrink=True)
    report = run(workspace)
    assert report.outcome == "written"
    assert any("not written since" in line for line in report.found)
    state = read_agentapi_state(workspace.state_file, max_bytes=2**20)
    assert state.messages[0].message.startswith("new")
    (kept,) = quarantined(workspace)
    assert b"old 0" in kept.read_bytes()


def test_diverged_copies_with_no_record_keep_the_checksummed_copy_whatever_the_clocks(
    workspace: Workspace,
) -> None:
    """Nobody can tell which is newer (no mark; the file's clock says it is an hour newer):
    the sidecar's checksummed copy is restored, and the file's bytes are kept beside it."""
    workspace.state_file.write_bytes(render_agentapi_state(conversation(4, prefix="file")))
    hour_ahead = time.time() + 3600
    os.utime(workspace.state_file, (hour_ahead, hour_ahead))
    StateStore(workspace.state_dir).save(conversation(6, prefix="copy"))
    report = run(workspace)
    assert report.outcome == "written"
    assert any("No record says which is newer" in line for line in report.found)
    state = read_agentapi_state(workspace.state_file, max_bytes=2**20)
    assert state.messages[0].message.startswith("copy")
    (kept,) = quarantined(workspace)
    assert b"file 0" in kept.read_bytes()


async def test_refuses_while_agentapi_answers(workspace: Workspace) -> None:
    """restore never writes under a running AgentAPI."""
    workspace.state_file.write_bytes(b"")
    async with FakeAgentAPI() as agent:
        with pytest.raises(AgentRunningError):
            restore(workspace.settings(agentapi_url=agent.url))
    assert workspace.state_file.read_bytes() == b""
    assert quarantined(workspace) == []
