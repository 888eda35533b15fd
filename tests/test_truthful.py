"""Truthful under faults: a misconfigured snapshot never stops persistence, a Coder server
without the snapshot route is a valid skip, and "nothing to save" only when nothing exists.

Real CLI and sidecar processes against loopback peers that answer as the real ones do.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from agentapi_persist.testing.agentapi import FakeAgentAPI
from agentapi_persist.testing.coder import FakeCoder

from .cli_support import cli
from .conftest import CANARY_TOKEN, TASK_ID, Workspace, make_messages
from .peers_support import dead_url
from .sidecar_support import eventually, sidecar_process, stored_count

MISCONFIGURED_SNAPSHOT = [
    pytest.param({"CODER_AGENT_URL": "not-a-url"}, "is not an http(s) URL", id="url-not-a-url"),
    pytest.param(
        {"CODER_AGENT_URL": "coder.example.com"}, "is not an http(s) URL", id="url-no-scheme"
    ),
    pytest.param({"ARG_TASK_LOG_SNAPSHOT": "maybe"}, "is not a boolean", id="switch-maybe"),
    pytest.param(
        {"AGENTAPI_PERSIST_SNAPSHOT_MESSAGES": "0"},
        "greater than or equal to 1",
        id="messages-0",
    ),
]


def snapshot_env(**overrides: str) -> dict[str, str]:
    base = {
        "ARG_TASK_ID": TASK_ID,
        "CODER_AGENT_URL": "http://127.0.0.1:9",
        "CODER_AGENT_TOKEN": CANARY_TOKEN,
    }
    return {**base, **overrides}


@pytest.mark.parametrize(("bad", "says"), MISCONFIGURED_SNAPSHOT)
async def test_a_bad_snapshot_setting_never_stops_persistence(
    workspace: Workspace, bad: dict[str, str], says: str
) -> None:
    """A typo in a snapshot-only variable: the sidecar starts and keeps the conversation
    durable; the stop saves everything and reports only the snapshot as misconfigured
    (exit 4), naming the variable; the same for `shutdown` without a sidecar."""
    async with FakeAgentAPI(messages=make_messages(5)) as agent:
        env = {"AGENTAPI_PERSIST_AGENTAPI_URL": agent.url, **snapshot_env(**bad)}
        async with sidecar_process(workspace, env=env) as sidecar:
            agent.add_message("user", "one more")
            await eventually(lambda: stored_count(workspace) == 6)
            sidecar.proc.send_signal(signal.SIGTERM)
            assert await sidecar.wait() == 4
        record = json.loads((workspace.state_dir / "last-shutdown.json").read_text())
        assert record["durable"] is True
        snapshot = next(s for s in record["steps"] if s["name"] == "snapshot")
        assert snapshot["outcome"] == "misconfigured"
        assert says in snapshot["detail"]
        assert "still saved" in snapshot["detail"]
        agent.add_message("agent", "and another")
        run = await cli(workspace, "shutdown", env=env)
    assert run.code == 4, run.stdout + run.stderr
    assert "snapshot=misconfigured" in run.stdout
    assert "7 messages durable" in run.stdout
    assert stored_count(workspace) == 7
    assert CANARY_TOKEN not in run.stdout + run.stderr


async def test_a_bad_setting_given_as_a_flag_is_still_a_usage_error(workspace: Workspace) -> None:
    """Typed on the command line, the mistake is seen at once: exit 2, nothing run."""
    run = await cli(workspace, "shutdown", "--snapshot-messages", "0")
    assert run.code == 2, run.stdout + run.stderr
    assert "--snapshot-messages" in run.stderr


async def test_a_coder_server_without_the_route_is_a_valid_skip_for_the_sidecar(
    workspace: Workspace,
) -> None:
    """The sidecar's periodic uploads stop after the first 404 without a task error (no
    upload there can ever succeed); its stop exits 0 and the summary says why."""
    async with (
        FakeCoder(token=CANARY_TOKEN, task_ids={TASK_ID}, route_exists=False) as coder,
        FakeAgentAPI(messages=make_messages(4)) as agent,
    ):
        env = {
            "AGENTAPI_PERSIST_AGENTAPI_URL": agent.url,
            **snapshot_env(CODER_AGENT_URL=coder.url),
        }
        async with sidecar_process(workspace, "--snapshot-interval", "0.01", env=env) as sidecar:
            await eventually(lambda: len(coder.uploads) == 1)
            for n in range(3):
                agent.add_message("user", f"more {n}")
                await eventually(lambda n=n: stored_count(workspace) == 5 + n)
            await eventually(lambda: sidecar.saw("daemon.snapshot_route_missing"))
            assert len(coder.uploads) == 1
            run = await cli(workspace, "shutdown", env=env)
    assert run.code == 0, run.stdout + run.stderr
    assert "snapshot=route_missing" in run.stdout
    assert "no log-snapshot route" in run.stdout
    status = await cli(workspace, "status", "--json", env=env)
    assert "The last snapshot upload failed" not in status.stdout


@pytest.mark.parametrize(
    "knobs",
    [
        pytest.param({"error_status": 400, "error_body": "Invalid host header"}, id="host-400"),
        pytest.param({"hang": True}, id="hung"),
    ],
)
async def test_unknown_is_not_empty(workspace: Workspace, knobs: dict[str, object]) -> None:
    """First stop, no copy anywhere, AgentAPI there but unreadable (its Host check refuses, or
    it accepts and never answers): never "ok ... nothing to save", never an empty copy. The
    stop says AgentAPI could not be read and exits 3."""
    async with FakeAgentAPI(messages=make_messages(6)) as agent:
        for name, value in knobs.items():
            setattr(agent.behaviour, name, value)
        env = {"AGENTAPI_PERSIST_AGENTAPI_URL": agent.url}
        run = await cli(workspace, "shutdown", "--grace", "3", env=env)
    assert run.code == 3, run.stdout + run.stderr
    assert "nothing to save" not in run.stdout
    assert "fetch=unknown" in run.stdout
    assert "what it holds is unknown" in run.stdout
    assert not workspace.state_dir.exists() or stored_count(workspace) == 0
    assert not any(p.name.startswith("conversation-") for p in _listing(workspace))


async def test_nothing_listening_and_no_process_is_provably_nothing(workspace: Workspace) -> None:
    """Nobody listens at AgentAPI's address and no AgentAPI process exists: it is not running,
    so there is nothing to save (exit 0), and the line says so."""
    with dead_url() as dead:
        run = await cli(workspace, "shutdown", env={"AGENTAPI_PERSIST_AGENTAPI_URL": dead})
    assert run.code == 0, run.stdout + run.stderr
    assert "nothing to save" in run.stdout


def _listing(workspace: Workspace) -> list[Path]:
    return list(workspace.state_dir.iterdir()) if workspace.state_dir.exists() else []
