"""A copy kept by a release before instance directories joins the instance it belongs to."""

from __future__ import annotations

import json
import os
from pathlib import Path

from agentapi_persist.agentapi_state import render_agentapi_state
from agentapi_persist.migration import MARKER_NAME
from agentapi_persist.models import Conversation
from agentapi_persist.restoring import restore
from agentapi_persist.store import StateStore
from agentapi_persist.testing.server import free_port

from .conftest import Workspace, make_messages, new_workspace


def conversation(n: int, prefix: str) -> Conversation:
    return Conversation(messages=tuple(make_messages(n, prefix=prefix)))


def legacy_dir(ws: Workspace) -> Path:
    """Where the earlier release kept its copy: the parent of the instance directories."""
    return ws.state_dir.parent


def restore_for(ws: Workspace) -> list[str]:
    return restore(ws.settings(agentapi_url=f"http://127.0.0.1:{free_port()}")).found


def test_the_copy_goes_to_the_module_whose_file_it_matches_and_no_other(tmp_path: Path) -> None:
    """Two modules, one earlier copy (module A's, 6 messages; A's file holds 4 of them):
    B's restore leaves it untouched and says why; A's adopts it whole, journal included."""
    a = new_workspace(tmp_path, ".claude-module")
    b = new_workspace(tmp_path, ".codex-module")
    old = StateStore(legacy_dir(a))
    old.save(conversation(5, "alpha"))
    old.append([make_messages(6, prefix="alpha")[5]])
    (legacy_dir(a) / "last-shutdown.json").write_text("{}")
    a.state_file.write_bytes(render_agentapi_state(conversation(4, "alpha")))
    b.state_file.write_bytes(render_agentapi_state(conversation(3, "beta")))

    found = restore_for(b)
    assert any("left untouched: it holds another conversation" in line for line in found), found
    assert [m.content for m in b.stored().messages] == [
        m.content for m in conversation(3, "beta").messages
    ]
    assert (legacy_dir(a) / "conversation-000000000001.json").exists()

    found = restore_for(a)
    assert any("Adopted the copy an earlier release kept" in line for line in found), found
    assert len(a.stored().messages) == 6
    assert (a.state_dir / "journal-000000000001.log").exists()
    assert (a.state_dir / "last-shutdown.json").exists()
    assert not any(p.name.startswith("conversation-") for p in legacy_dir(a).iterdir())
    assert not (a.state_dir / MARKER_NAME).exists()
    # B's copy is still B's alone.
    assert b.stored().messages[0].content.startswith("beta")


def test_nothing_shows_whose_it_is_without_a_state_file(tmp_path: Path) -> None:
    ws = new_workspace(tmp_path)
    StateStore(legacy_dir(ws)).save(conversation(4, "alpha"))
    found = restore_for(ws)
    assert any("is missing, so nothing shows whose it is" in line for line in found), found
    assert (legacy_dir(ws) / "conversation-000000000001.json").exists()
    assert ws.stored().messages == ()


def test_a_move_cut_half_way_is_finished_by_the_next_start(tmp_path: Path) -> None:
    """The marker is made durable before the first rename: a crash after the generation moved
    and before its journal did is completed, so the two never end up apart."""
    ws = new_workspace(tmp_path)
    old = StateStore(legacy_dir(ws))
    old.save(conversation(5, "alpha"))
    old.append([make_messages(6, prefix="alpha")[5]])
    ws.state_file.write_bytes(render_agentapi_state(conversation(5, "alpha")))
    # What a crash right after the first rename leaves behind.
    ws.state_dir.mkdir(mode=0o700, parents=True)
    (ws.state_dir / MARKER_NAME).write_text(json.dumps({"from": str(legacy_dir(ws))}))
    os.rename(
        legacy_dir(ws) / "conversation-000000000001.json",
        ws.state_dir / "conversation-000000000001.json",
    )
    found = restore_for(ws)
    assert any("Adopted" in line for line in found), found
    assert len(ws.stored().messages) == 6
    assert not (ws.state_dir / MARKER_NAME).exists()


def test_an_explicit_state_dir_is_never_filled_from_elsewhere(tmp_path: Path) -> None:
    """Only the default directory looks at the earlier default: a configured one was chosen
    by the user, and the earlier copy stays where it is."""
    ws = new_workspace(tmp_path)
    StateStore(legacy_dir(ws)).save(conversation(5, "alpha"))
    ws.state_file.write_bytes(render_agentapi_state(conversation(4, "alpha")))
    ws.env["AGENTAPI_PERSIST_STATE_DIR"] = str(tmp_path / "mine")
    restore_for(ws)
    assert (legacy_dir(ws) / "conversation-000000000001.json").exists()
    stored = StateStore(tmp_path / "mine", read_only=True).load().conversation
    assert stored is not None
    assert len(stored.messages) == 4  # from AgentAPI's file, not the earlier copy's 5


async def test_status_names_the_owner_and_an_earlier_copy_not_adopted_yet(tmp_path: Path) -> None:
    from agentapi_persist.status import collect_status

    ws = new_workspace(tmp_path)
    StateStore(legacy_dir(ws)).save(conversation(4, "alpha"))
    restore_for(ws)  # no state file: the earlier copy stays where it is
    report = await collect_status(ws.settings(agentapi_url=f"http://127.0.0.1:{free_port()}"))
    assert report.facts["checkpoint"]["owner"].startswith(f"the AgentAPI of {ws.module_dir} on")
    assert any("written by an earlier release" in problem for problem in report.problems)
