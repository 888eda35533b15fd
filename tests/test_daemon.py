"""The sidecar in-process: follow, checkpoint, reconnect, resync, control channel, uploads.

Peers are real loopback servers; the daemon runs with ``shutdown_trigger`` (no signal
handlers), as an embedder would run it. Waits poll the daemon's own facts with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import structlog

from agentapi_persist.checkpointer import Checkpointer
from agentapi_persist.control_client import ask_sidecar
from agentapi_persist.daemon import Daemon, DaemonState
from agentapi_persist.errors import ExitCode
from agentapi_persist.mirror import Mirror
from agentapi_persist.shutdown import ShutdownReport
from agentapi_persist.store import StateStore
from agentapi_persist.testing.agentapi import FakeAgentAPI
from agentapi_persist.testing.coder import FakeCoder
from agentapi_persist.testing.server import free_port

from .conftest import TIME, Workspace, coder_env, make_messages


async def eventually(check: Callable[[], bool], *, within: float = 5.0) -> None:
    """Wait until ``check()`` holds, failing after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.02)


@dataclass
class Running:
    daemon: Daemon
    stop: asyncio.Event
    task: asyncio.Task[ShutdownReport]

    async def finish(self) -> ShutdownReport:
        self.stop.set()
        return await asyncio.wait_for(self.task, 15)


@asynccontextmanager
async def sidecar(ws: Workspace, **flags: object) -> AsyncIterator[Running]:
    flags.setdefault("checkpoint_interval_s", 0.05)
    settings = ws.settings(**flags)
    stop = asyncio.Event()
    async with Daemon(settings) as daemon:
        task = asyncio.create_task(daemon.serve(shutdown_trigger=stop.wait))
        running = Running(daemon, stop, task)
        try:
            await eventually(lambda: (ws.state_dir / "control.sock").exists() or task.done())
            yield running
        finally:
            if not task.done():
                stop.set()
                await asyncio.wait_for(task, 15)


async def test_follows_and_checkpoints_every_change(workspace: Workspace) -> None:
    """Replay, new messages and a growing last message all reach the disk within a second."""
    async with (
        FakeAgentAPI(messages=make_messages(5)) as agent,
        sidecar(workspace, agentapi_url=agent.url) as running,
    ):
        await eventually(lambda: len(workspace.stored().messages) == 5)
        agent.add_message("user", "and now?")
        agent.add_message("agent", "working")
        await eventually(lambda: len(workspace.stored().messages) == 7)
        agent.update_last("working... done")
        await eventually(lambda: workspace.stored().messages[-1].content == "working... done")
        assert running.daemon.store.journal_bytes > 0  # changes were journalled, not rewritten
        report = await running.finish()
    assert report.exit_code is ExitCode.OK
    assert running.daemon.state is DaemonState.CLOSED
    # On exit the journal was folded into a generation: the next start reads one file.
    loaded = StateStore(workspace.state_dir).load()
    assert loaded.journal_records == 0
    assert loaded.conversation is not None
    assert loaded.conversation.messages[-1].content == "working... done"


async def test_a_replay_during_a_full_checkpoint_is_stored_by_the_next(
    workspace: Workspace,
) -> None:
    """AgentAPI's truth replaces the mirror while the checkpoint comparing the previous one is
    being written (over ACP every turn ends with a resync): that checkpoint must not mark the
    newer mirror stored. Seen with the real AgentAPI 0.12.2 over ACP: the copy kept one message
    (a failed prompt AgentAPI then dropped) while AgentAPI held five, until something else
    changed."""
    settings = workspace.settings()
    mirror = Mirror()
    mirror.replace(make_messages(1))
    facts: dict[str, object] = {"checkpoints": 0, "checkpoint_errors": 0}
    checkpointer = Checkpointer(settings, StateStore(settings.state_dir), mirror, facts)
    writing = asyncio.create_task(checkpointer.checkpoint())
    await asyncio.sleep(0)  # the checkpoint has read the mirror and is writing it (a thread)
    assert checkpointer.write_lock.locked()
    assert not writing.done()
    mirror.replace(make_messages(5))  # the resync, as the write goes on
    await writing
    await checkpointer.checkpoint()  # the next one, which the resync asked for
    checkpointer.close()
    assert len(workspace.stored().messages) == 5


async def test_reconnects_after_a_dropped_subscription(workspace: Workspace) -> None:
    """When AgentAPI drops the stream, the daemon resyncs and keeps following."""
    async with (
        FakeAgentAPI(messages=make_messages(3)) as agent,
        sidecar(workspace, agentapi_url=agent.url) as running,
    ):
        await eventually(lambda: running.daemon.view()["connected"])
        agent.drop_subscribers()
        agent.add_message("user", "missed while dropped?")
        await eventually(lambda: len(workspace.stored().messages) == 4)
        await eventually(lambda: running.daemon.view()["connected"])
        assert running.daemon.view()["reconnects"] >= 1
        agent.add_message("agent", "after reconnect")
        await eventually(lambda: len(workspace.stored().messages) == 5)


async def test_agentapi_starting_late_and_restarting(workspace: Workspace) -> None:
    """AgentAPI may start after the sidecar and restart; the sidecar waits and reconnects."""
    port = free_port()
    async with sidecar(workspace, agentapi_url=f"http://127.0.0.1:{port}") as running:
        await eventually(lambda: running.daemon.view()["reconnects"] >= 1)  # it tried
        assert not running.daemon.view()["connected"]
        async with FakeAgentAPI(messages=make_messages(4), port=port):
            await eventually(lambda: len(workspace.stored().messages) == 4)
        # Restarted with its history reloaded plus one new message.
        async with FakeAgentAPI(messages=make_messages(5), port=port):
            await eventually(lambda: len(workspace.stored().messages) == 5, within=8)


async def test_agentapi_back_with_less_never_shrinks_the_copy(workspace: Workspace) -> None:
    """AgentAPI restarting empty must not wipe the durable copy."""
    port = free_port()
    async with sidecar(workspace, agentapi_url=f"http://127.0.0.1:{port}") as running:
        async with FakeAgentAPI(messages=make_messages(6), port=port):
            await eventually(lambda: len(workspace.stored().messages) == 6)
        async with FakeAgentAPI(messages=(), port=port):
            await eventually(lambda: running.daemon.view()["connected"], within=8)
            # A checkpoint after the reconnect compared the empty conversation with the copy.
            seen = running.daemon.view()["checkpoints"]
            await eventually(lambda: running.daemon.view()["checkpoints"] > seen)
            assert len(workspace.stored().messages) == 6


async def test_control_channel_status_checkpoint_and_shutdown(
    workspace: Workspace, coder: FakeCoder
) -> None:
    """The control socket answers status and checkpoint, and a shutdown ends the sidecar."""
    workspace.env.update(coder_env(coder))
    async with (
        FakeAgentAPI(messages=make_messages(40)) as agent,
        sidecar(workspace, agentapi_url=agent.url, snapshot_interval_s=0) as running,
    ):
        await eventually(lambda: running.daemon.view()["connected"])
        status = await asyncio.to_thread(
            ask_sidecar, workspace.state_dir, {"op": "status"}, timeout_s=2
        )
        assert status["status"]["live_messages"] == 40
        done = await asyncio.to_thread(
            ask_sidecar, workspace.state_dir, {"op": "checkpoint"}, timeout_s=2
        )
        assert done["status"]["stored_messages"] == 40
        result = await asyncio.to_thread(
            ask_sidecar,
            workspace.state_dir,
            {"op": "shutdown", "grace_s": 10, "elapsed_s": 0.1},
            timeout_s=10,
        )
        assert result["exit_code"] == 0, result
        assert "snapshot=delivered" in result["summary"]
        report = await asyncio.wait_for(running.task, 5)
    assert report.exit_code is ExitCode.OK
    assert [m["id"] for m in coder.uploads[-1].json["messages"]] == list(range(10, 40))
    assert not (workspace.state_dir / "control.sock").exists()


async def test_periodic_snapshot_when_stable_after_a_change(
    workspace: Workspace, coder: FakeCoder
) -> None:
    """A change followed by `stable` uploads a snapshot without waiting for the stop."""
    workspace.env.update(coder_env(coder))
    async with (
        FakeAgentAPI(messages=make_messages(3), status="stable") as agent,
        sidecar(workspace, agentapi_url=agent.url, snapshot_interval_s=0.2),
    ):
        await eventually(lambda: len(coder.uploads) == 1)
        agent.set_status("running")
        agent.add_message("agent", "more output")
        agent.set_status("stable")
        await eventually(lambda: len(coder.uploads) == 2)
        assert len(coder.uploads[-1].json["messages"]) == 4
        # An absence needs a window: 0.5 s is 2.5 snapshot intervals (a busier machine only
        # makes the window shorter in effect, never the check wrong).
        await asyncio.sleep(0.5)
        assert len(coder.uploads) == 2  # nothing changed: no more uploads


async def test_second_sidecar_on_the_same_directory_is_refused(workspace: Workspace) -> None:
    """One sidecar per state directory: a second one fails clearly instead of racing."""
    from agentapi_persist.errors import SidecarAlreadyRunning

    async with FakeAgentAPI() as agent, sidecar(workspace, agentapi_url=agent.url):
        with pytest.raises(SidecarAlreadyRunning):
            async with Daemon(workspace.settings(agentapi_url=agent.url)) as second:
                await second.serve(shutdown_trigger=asyncio.Event().wait)


async def test_a_daemon_is_used_once(workspace: Workspace) -> None:
    """Reusing a closed daemon raises instead of half-working."""
    stop = asyncio.Event()
    stop.set()
    daemon = Daemon(workspace.settings(agentapi_url=f"http://127.0.0.1:{free_port()}"))
    async with daemon:
        await daemon.serve(shutdown_trigger=stop.wait)
    with pytest.raises(RuntimeError, match="used once"):
        async with daemon:
            pass


async def test_agent_errors_replayed_on_reconnect_are_logged_once(workspace: Workspace) -> None:
    """AgentAPI replays its stored `agent_error`s after every connect: each is logged once,
    and the failed-load error is named, with what the copy kept."""
    with structlog.testing.capture_logs() as logs:
        async with (
            FakeAgentAPI(messages=make_messages(3)) as agent,
            sidecar(workspace, agentapi_url=agent.url) as running,
        ):
            await eventually(lambda: len(workspace.stored().messages) == 3)
            agent.emit_agent_error("Failed to restore previous session: unsupported version 2")
            await eventually(lambda: any(e["event"] == "agentapi.load_failed" for e in logs))
            reconnects = running.daemon.view()["reconnects"]
            agent.drop_subscribers()
            await eventually(lambda: running.daemon.view()["reconnects"] > reconnects)
            await eventually(lambda: running.daemon.view()["connected"] is True)
            agent.emit_agent_error("agent crashed")
            await eventually(lambda: sum(e["event"] == "agentapi.agent_error" for e in logs) == 2)
    errors = [e for e in logs if e["event"] == "agentapi.agent_error"]
    assert [e["message"] for e in errors] == [
        "Failed to restore previous session: unsupported version 2",
        "agent crashed",
    ]
    failed = next(e for e in logs if e["event"] == "agentapi.load_failed")
    assert failed["kept_messages"] == 3


async def test_id_gaps_are_appended_and_renumbered(workspace: Workspace) -> None:
    """ACP mode skips ids after a failed prompt: an update whose id is beyond the last one is
    a new message (stored renumbered 0..n-1), and no reconnect follows."""
    async with (
        FakeAgentAPI(messages=make_messages(3)) as agent,
        sidecar(workspace, agentapi_url=agent.url) as running,
    ):
        await eventually(lambda: len(workspace.stored().messages) == 3)
        reconnects = running.daemon.view()["reconnects"]
        for agent_id, text in ((5, "after a failed prompt"), (6, "and its answer")):
            update = {"id": agent_id, "role": "user", "message": text, "time": TIME}
            agent.inject_raw(
                b"event: message_update\ndata: " + json.dumps(update).encode() + b"\n\n"
            )
        await eventually(lambda: len(workspace.stored().messages) == 5)
        update = {"id": 6, "role": "user", "message": "its answer, grown", "time": TIME}
        agent.inject_raw(b"event: message_update\ndata: " + json.dumps(update).encode() + b"\n\n")
        await eventually(lambda: workspace.stored().messages[-1].content == "its answer, grown")
        assert running.daemon.view()["reconnects"] == reconnects
    stored = workspace.stored().messages
    assert [m.id for m in stored] == [0, 1, 2, 3, 4]
    assert [m.content for m in stored[3:]] == ["after a failed prompt", "its answer, grown"]


async def test_a_current_copy_is_not_fetched_again_at_the_stop(
    workspace: Workspace, coder: FakeCoder
) -> None:
    """Stable AgentAPI, a stream followed without a break for longer than AgentAPI's 2 s
    stability window: the stop takes the sidecar's copy as AgentAPI's conversation
    (``fetch=stream``) and sends no ``GET /messages``; every message is durable and uploaded.
    A stop while AgentAPI reports running fetches the messages whole."""
    workspace.env.update(coder_env(coder))
    async with (
        FakeAgentAPI(messages=make_messages(40), status="stable") as agent,
        sidecar(workspace, agentapi_url=agent.url, snapshot_interval_s=0) as running,
    ):
        await eventually(lambda: len(workspace.stored().messages) == 40)
        await asyncio.sleep(2.6)  # longer than the stability window: a lower bound
        before = len(agent.requests)
        report = await running.finish()
    during = [r.path for r in agent.requests[before:]]
    assert "/messages" not in during, during
    assert "/status" in during
    fetch = report.step("fetch")
    assert fetch is not None
    assert fetch.outcome == "stream", report.summary()
    assert report.exit_code is ExitCode.OK, report.summary()
    assert len(coder.uploads[-1].json["messages"]) == 30
    assert len(workspace.stored().messages) == 40


async def test_a_running_agent_is_fetched_whole_at_the_stop(
    workspace: Workspace, coder: FakeCoder
) -> None:
    """AgentAPI reports running at the stop: the stream may be behind, so the stop fetches
    the messages whole (``fetch=live``)."""
    workspace.env.update(coder_env(coder))
    async with (
        FakeAgentAPI(messages=make_messages(12), status="stable") as agent,
        sidecar(workspace, agentapi_url=agent.url, snapshot_interval_s=0) as running,
    ):
        await eventually(lambda: len(workspace.stored().messages) == 12)
        await asyncio.sleep(2.6)
        agent.set_status("running")
        await eventually(lambda: running.daemon.view()["agent_status"] == "running")
        before = len(agent.requests)
        report = await running.finish()
    assert "/messages" in [r.path for r in agent.requests[before:]]
    fetch = report.step("fetch")
    assert fetch is not None
    assert fetch.outcome == "live", report.summary()


# -- large updates held back undecoded ----------------------------------------------------------

BIG = 200_000  # over agentapi.LAZY_UPDATE_BYTES: such updates are held, decoded when read


async def test_a_large_message_changing_fast_is_decoded_only_as_it_is_read(
    workspace: Workspace,
) -> None:
    """A long agent message sent whole on every change, faster than the checkpoint interval:
    the versions a later one replaces are never decoded, and the copy gets the last one."""
    async with FakeAgentAPI(messages=make_messages(3)) as agent:
        with structlog.testing.capture_logs() as logs:
            async with sidecar(
                workspace, agentapi_url=agent.url, checkpoint_interval_s=1.0
            ) as running:
                await eventually(lambda: len(workspace.stored().messages) == 3)
                agent.add_message("agent", "x" * BIG)
                for i in range(12):
                    agent.update_last("x" * BIG + f" +{i}")
                final = "x" * BIG + " +11"
                await eventually(lambda: workspace.stored().messages[-1].content == final)
                view = running.daemon.view()
                assert view["live_messages"] == 4
                await running.finish()
    superseded = [e for e in logs if e["event"] == "agentapi.update_superseded"]
    assert len(superseded) >= 6, "updates replaced within the interval were decoded anyway"
    assert not [e for e in logs if e["event"] == "agentapi.bad_event"]
    loaded = StateStore(workspace.state_dir).load().conversation
    assert loaded is not None
    assert loaded.messages[-1].content == final


async def test_a_held_update_is_in_the_copy_the_stop_saves(workspace: Workspace) -> None:
    """The stop comes right after a large update, before any checkpoint could run: the
    update still held is applied and saved."""
    async with (
        FakeAgentAPI(messages=make_messages(3)) as agent,
        sidecar(workspace, agentapi_url=agent.url, checkpoint_interval_s=1.0) as running,
    ):
        await eventually(lambda: running.daemon.view()["connected"])
        agent.add_message("agent", "y" * BIG)
        agent.update_last("y" * BIG + " the last word")
        await eventually(lambda: running.daemon.follower is not None and bool(
            running.daemon.follower._held))  # fmt: skip
        report = await running.finish()
    assert report.exit_code is ExitCode.OK
    loaded = StateStore(workspace.state_dir).load().conversation
    assert loaded is not None
    assert loaded.messages[-1].content == "y" * BIG + " the last word"


async def test_a_held_update_that_does_not_decode_is_said_and_resynchronised(
    workspace: Workspace,
) -> None:
    """A large update with a good start and a broken body: logged when it is read, the
    stream resynchronised at its next event (GET /messages is the truth), nothing lost."""
    async with FakeAgentAPI(messages=make_messages(3)) as agent:
        with structlog.testing.capture_logs() as logs:
            async with sidecar(workspace, agentapi_url=agent.url) as running:
                await eventually(lambda: running.daemon.view()["connected"])
                broken = b'{"id":2,"role":"agent","message":"' + b"z" * BIG  # never closed
                agent._publish(b"event: message_update\ndata: " + broken + b"\n\n")
                await eventually(lambda: any(e["event"] == "agentapi.bad_event" for e in logs))
                agent.add_message("user", "still here?")  # the stream's next event
                await eventually(lambda: len(workspace.stored().messages) == 4)
                await eventually(lambda: running.daemon.view()["connected"])
                await running.finish()
    assert any(e["event"] == "agentapi.resynced" or e["event"] == "agentapi.unavailable"
               for e in logs)  # fmt: skip
    loaded = StateStore(workspace.state_dir).load().conversation
    assert loaded is not None
    assert [m.content for m in loaded.messages] == [m.content for m in agent.messages]
