"""One writer per state directory: the lock, its refusals, and the processes that take it."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest

from agentapi_persist.errors import StateDirBusy
from agentapi_persist.ownership import LOCK_NAME, held_by, take_lock
from agentapi_persist.testing.agentapi import FakeAgentAPI

from .cli_support import cli
from .conftest import Workspace, make_messages
from .sidecar_support import eventually, sidecar_process, stored_count


def test_a_second_writer_is_refused_with_the_holders_name(workspace: Workspace) -> None:
    """The second taker gets StateDirBusy naming the holder's pid and purpose; the lock file
    is 0600 in a 0700 directory; after release it can be taken again."""
    first = take_lock(workspace.state_dir, purpose="shutdown")
    try:
        with pytest.raises(StateDirBusy, match=rf"pid {os.getpid()} \(shutdown\)"):
            take_lock(workspace.state_dir, purpose="restore")
        assert held_by(workspace.state_dir) == {
            "pid": os.getpid(),
            "purpose": "shutdown",
            "since": pytest.approx(time.time(), abs=5),
        }
        assert (workspace.state_dir / LOCK_NAME).stat().st_mode & 0o777 == 0o600
        assert workspace.state_dir.stat().st_mode & 0o777 == 0o700
    finally:
        first.release()
    assert held_by(workspace.state_dir) is None
    take_lock(workspace.state_dir, purpose="restore").release()


def test_a_waiting_writer_gets_the_lock_when_it_is_released(workspace: Workspace) -> None:
    """Within its wait, a second writer takes over as soon as the first lets go."""
    first = take_lock(workspace.state_dir, purpose="shutdown")
    threading.Timer(0.2, first.release).start()
    started = time.monotonic()
    second = take_lock(workspace.state_dir, purpose="shutdown", wait_s=5)
    try:
        assert 0.15 < time.monotonic() - started < 4
    finally:
        second.release()


async def test_restore_refuses_while_a_sidecar_holds_the_directory(workspace: Workspace) -> None:
    """A sidecar runs (AgentAPI stopped): `restore` writes nothing under it, says who holds
    the directory, and works once the sidecar is gone, even after a SIGKILL (the kernel
    releases the lock)."""
    async with FakeAgentAPI(messages=make_messages(6)) as agent:
        env = {"AGENTAPI_PERSIST_AGENTAPI_URL": agent.url}
        async with sidecar_process(workspace, env=env) as sidecar:
            await eventually(lambda: stored_count(workspace) == 6)
            before = sorted(p.name for p in workspace.state_dir.iterdir())
            await agent.close()  # AgentAPI stopped; the sidecar still runs
            refused = await cli(workspace, "restore", env=env)
            assert refused.code == 1, refused.stdout + refused.stderr
            assert f"pid {sidecar.proc.pid} (sidecar)" in refused.stderr + refused.stdout
            assert "wrote nothing" in refused.stderr + refused.stdout
            assert sorted(p.name for p in workspace.state_dir.iterdir()) == before
            assert not workspace.state_file.exists()
            os.killpg(sidecar.proc.pid, signal.SIGKILL)
            await sidecar.proc.wait()
    restored = await cli(workspace, "restore", env=env)
    assert restored.code == 0, restored.stdout + restored.stderr
    assert workspace.state_file.exists()


async def test_two_shutdowns_at_once_take_turns(workspace: Workspace) -> None:
    """Two `shutdown` processes with no sidecar: one writes while the other waits for the
    lock; both finish, and what each reported durable is on disk."""
    async with FakeAgentAPI(messages=make_messages(30)) as agent:
        env = {"AGENTAPI_PERSIST_AGENTAPI_URL": agent.url}
        first, second = await asyncio.gather(
            cli(workspace, "shutdown", env=env), cli(workspace, "shutdown", env=env)
        )
    for run in (first, second):
        assert run.code == 0, run.stdout + run.stderr
        assert "30 messages durable" in run.stdout
    assert stored_count(workspace) == 30
    assert held_by(workspace.state_dir) is None
