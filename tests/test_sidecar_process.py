"""The sidecar as a real process: real signals, PID 1, the CLI through the control channel,
and a SIGKILL of everything while the conversation changes every 100 ms."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from agentapi_persist.agentapi_state import read_agentapi_state
from agentapi_persist.testing.agentapi import FakeAgentAPI
from agentapi_persist.testing.agentapi_program import (
    run_fake_agentapi_process,
    write_agentapi_script,
)
from agentapi_persist.testing.coder import FakeCoder
from agentapi_persist.testing.server import free_port

from .cli_support import cli
from .conftest import CANARY_TOKEN, TASK_ID, Workspace, coder_env, make_messages
from .sidecar_support import eventually, sidecar_process, stored_count


async def test_sigterm_runs_the_shutdown_sequence(workspace: Workspace, coder: FakeCoder) -> None:
    """SIGTERM: the sequence runs, the snapshot is uploaded, exit 0 (STYLE's e2e recipe)."""
    async with FakeAgentAPI(messages=make_messages(12)) as agent:
        env = {**coder_env(coder), "AGENTAPI_PERSIST_AGENTAPI_URL": agent.url}
        async with sidecar_process(workspace, env=env) as sidecar:
            await eventually(lambda: stored_count(workspace) == 12)
            agent.add_message("user", "one more")
            await eventually(lambda: stored_count(workspace) == 13)
            sidecar.proc.send_signal(signal.SIGTERM)
            code = await sidecar.wait()
    assert code == 0
    assert sidecar.saw("daemon.stopped")
    assert len(coder.uploads[-1].json["messages"]) == 13
    text = json.dumps(sidecar.events)
    assert CANARY_TOKEN not in text


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
async def test_run_says_its_result_when_it_stops(
    workspace: Workspace, coder: FakeCoder, as_json: bool
) -> None:
    """`run` ends as every command does: its result on stdout, one summary line, or one
    JSON object under --json (its help promised this; nothing was printed)."""
    async with FakeAgentAPI(messages=make_messages(5)) as agent:
        env = {**coder_env(coder), "AGENTAPI_PERSIST_AGENTAPI_URL": agent.url}
        args = ("--json",) if as_json else ()
        async with sidecar_process(workspace, *args, env=env) as sidecar:
            await eventually(lambda: stored_count(workspace) == 5)
            sidecar.proc.send_signal(signal.SIGTERM)
            assert await sidecar.wait() == 0
            assert sidecar.proc.stdout is not None
            out = (await sidecar.proc.stdout.read()).decode()
    lines = out.splitlines()
    assert len(lines) == 1, out
    # AgentAPI was up when the sidecar started (no pid file; it answers at its address): the
    # skipped restore says what showed it up, not "already running" after "not found".
    (skipped,) = [e for e in sidecar.events if e.get("event") == "daemon.restore_skipped"]
    assert skipped["reason"].startswith(
        f"AgentAPI is already up (something answers at {agent.url})"
    )
    if as_json:
        result = json.loads(lines[0])
        assert result["exit_code"] == 0
        assert result["messages"] == 5
    else:
        assert lines[0].startswith("shutdown ok: ")
        assert "5 messages durable" in lines[0]


async def test_sigusr1_forces_a_checkpoint(workspace: Workspace) -> None:
    """SIGUSR1 checkpoints now: with the longest grouping window (1 s), the change the
    sidecar already holds is written by a checkpoint whose trigger is the request, not the
    window running out (a SIGUSR1 that only logged would pass a test that waits for the
    change on disk: the window saves it a second later anyway)."""
    async with (
        FakeAgentAPI(messages=make_messages(2)) as agent,
        sidecar_process(
            workspace,
            "--checkpoint-interval",
            "1.0",
            "--log-level",
            "debug",
            env={"AGENTAPI_PERSIST_AGENTAPI_URL": agent.url},
        ) as sidecar,
    ):
        await eventually(lambda: stored_count(workspace) == 2)
        agent.add_message("user", "checkpoint me")
        await eventually(lambda: _live_messages(workspace) == 3)
        sidecar.proc.send_signal(signal.SIGUSR1)
        await eventually(lambda: stored_count(workspace) == 3)
        await eventually(lambda: sidecar.saw("daemon.checkpoint_requested"))
        sidecar.proc.send_signal(signal.SIGTERM)
        assert await sidecar.wait() == 0
    names = [e["event"] for e in sidecar.events]
    requested = names.index("daemon.checkpoint_requested")
    after = [e for e in sidecar.events[requested:] if e["event"] == "daemon.checkpoint"]
    assert after, names
    assert after[0]["trigger"] == "request", after[0]


def _live_messages(workspace: Workspace) -> int:
    """How many messages the running sidecar holds in memory (its `status` answer)."""
    from agentapi_persist.control_client import ask_sidecar

    try:
        view = ask_sidecar(workspace.state_dir, {"op": "status"}, timeout_s=1.0)["status"]
    except Exception:  # not listening yet
        return -1
    return int(view["live_messages"])


async def test_second_signal_skips_the_best_effort_steps(workspace: Workspace) -> None:
    """With a hung Coder server, a second SIGTERM ends the wait; the state is still durable."""
    async with (
        FakeCoder(token=CANARY_TOKEN, task_ids={TASK_ID}, hang=True) as hung,
        FakeAgentAPI(messages=make_messages(5)) as agent,
    ):
        env = {**coder_env(hung), "AGENTAPI_PERSIST_AGENTAPI_URL": agent.url}
        async with sidecar_process(
            workspace, "--grace", "30", "--snapshot-interval", "0", env=env
        ) as sidecar:
            await eventually(lambda: stored_count(workspace) == 5)
            started = time.monotonic()
            sidecar.proc.send_signal(signal.SIGTERM)
            await eventually(lambda: len(hung.uploads) >= 1)
            sidecar.proc.send_signal(signal.SIGTERM)
            code = await sidecar.wait()
            elapsed = time.monotonic() - started
    assert sidecar.saw("daemon.stop_forced")
    assert code == 4, "".join(sidecar.other)  # durable, snapshot not delivered
    assert elapsed < 10  # far from the 30 s budget the hung upload would have used
    assert stored_count(workspace) == 5


async def test_shutdown_command_goes_through_the_sidecar(
    workspace: Workspace, coder: FakeCoder
) -> None:
    """`agentapi-persist shutdown` asks the running sidecar, prints its result, and exits 0."""
    async with FakeAgentAPI(messages=make_messages(40)) as agent:
        env = {**coder_env(coder), "AGENTAPI_PERSIST_AGENTAPI_URL": agent.url}
        async with sidecar_process(workspace, env=env) as sidecar:
            await eventually(lambda: stored_count(workspace) == 40)
            status = await cli(workspace, "status", "--json", env=env)
            assert json.loads(status.stdout)["sidecar"]["running"] is True
            run = await cli(workspace, "shutdown", env=env)
            assert run.code == 0, run.stdout + run.stderr
            assert run.stdout.startswith("shutdown ok:")
            assert "(via sidecar)" in run.stdout
            assert await sidecar.wait() == 0
    assert [m["id"] for m in coder.uploads[-1].json["messages"]] == list(range(10, 40))


async def test_works_as_pid_1(workspace: Workspace, coder: FakeCoder) -> None:
    """As PID 1 of a PID namespace, SIGTERM still runs the sequence (handlers installed)."""
    unshare = await _pid_namespace_prefix()
    async with FakeAgentAPI(messages=make_messages(3)) as agent:
        env = {**coder_env(coder), "AGENTAPI_PERSIST_AGENTAPI_URL": agent.url}
        async with sidecar_process(workspace, command=unshare, env=env) as sidecar:
            children = Path(f"/proc/{sidecar.proc.pid}/task/{sidecar.proc.pid}/children")
            (child,) = (int(pid) for pid in children.read_text().split())
            status = Path(f"/proc/{child}/status").read_text()
            (ns_line,) = (line for line in status.splitlines() if line.startswith("NSpid:"))
            assert ns_line.split()[-1] == "1"  # it really is PID 1 in its namespace
            await eventually(lambda: stored_count(workspace) == 3)
            os.kill(child, signal.SIGTERM)
            code = await sidecar.wait()
    assert code == 0
    assert sidecar.saw("daemon.stopped")
    assert len(coder.uploads) >= 1


def _lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


async def test_sigkill_everything_loses_nothing_older_than_a_second(workspace: Workspace) -> None:
    """AgentAPI changes the conversation every 100 ms; SIGKILL it and the sidecar together.
    `restore` then gives AgentAPI a file with every change older than 1 s, ids 0..n-1."""
    script = write_agentapi_script(workspace.root / "bin", version="0.12.1")
    chatter_log = workspace.root / "chatter.log"
    port = free_port()
    agent_env = {
        **workspace.env,
        "FAKE_AGENTAPI_CHATTER_MS": "100",
        "FAKE_AGENTAPI_CHATTER_LOG": str(chatter_log),
    }
    async with (
        run_fake_agentapi_process(
            script, port=port, pid_file=workspace.pid_file, env=agent_env
        ) as agent_proc,
        sidecar_process(workspace, env={"ARG_AGENTAPI_PORT": str(port)}) as sidecar,
    ):
        # 30 changes (about 3 s), counted from AgentAPI's own log rather than slept for.
        await eventually(lambda: _lines(chatter_log) >= 30, within=30)
        killed_at = time.time()
        agent_proc.kill()
        sidecar.proc.kill()
        await agent_proc.wait()
        await sidecar.wait()
    changes = [json.loads(line) for line in chatter_log.read_text().splitlines() if line.strip()]
    assert len(changes) >= 20
    # AgentAPI is dead and never saved (SIGKILL): only the sidecar's copy can restore it.
    restore = await cli(workspace, "restore", "--force", "--json")
    assert restore.code == 0, restore.stdout
    state = read_agentapi_state(workspace.state_file, max_bytes=2**26)
    assert [m.id for m in state.messages] == list(range(len(state.messages)))
    old_enough = [c for c in changes if c["t"] <= killed_at - 1.0]
    assert old_enough
    for change in old_enough:
        assert change["id"] < len(state.messages), change
        assert len(state.messages[change["id"]].message) >= change["length"], change


def _catches_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has a handler for SIGTERM (its SigCgt mask), i.e. the CLI's
    first step ran; ``False`` while the interpreter itself is still starting."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    (caught,) = (line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught, 16) & (1 << (signal.SIGTERM - 1)))


async def _early_stop(workspace: Workspace, prefix: tuple[str, ...]) -> None:
    """Start `run`, SIGTERM it as soon as it catches the signal (long before it is ready:
    pydantic and aiohttp are still importing), and check the stop sequence ran in full."""
    async with FakeAgentAPI(messages=make_messages(4)) as agent:
        env = workspace.process_env(AGENTAPI_PERSIST_AGENTAPI_URL=agent.url)
        proc = await asyncio.create_subprocess_exec(
            *prefix,
            sys.executable, "-m", "agentapi_persist", "run",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )  # fmt: skip
        try:
            target = proc.pid
            if prefix:  # unshare forks: the sidecar is its child, PID 1 of the namespace
                children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
                await eventually(lambda: children.read_text().split() != [], within=10)
                target = int(children.read_text().split()[0])
            await eventually(lambda: _catches_sigterm(target), within=10)
            os.kill(target, signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), 20)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    events = [json.loads(line) for line in err.splitlines() if line.startswith(b"{")]
    names = [e["event"] for e in events]
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "daemon.stop_requested" in names
    assert names.index("daemon.stop_requested") < names.index("daemon.ready")
    assert "daemon.stopped" in names
    assert stored_count(workspace) == 4
    record = json.loads((workspace.state_dir / "last-shutdown.json").read_text())
    assert record["durable"] is True
    assert record["notes"][0] == "stopped by SIGTERM"


async def test_sigterm_while_still_importing_runs_the_stop(workspace: Workspace) -> None:
    """A SIGTERM in the first moments of `run` (before aiohttp and pydantic are loaded) is
    caught and honoured: the sidecar starts, runs the stop sequence, saves, exits 0."""
    await _early_stop(workspace, ())


async def test_sigterm_while_still_importing_as_pid_1(workspace: Workspace) -> None:
    """The same as PID 1 of a PID namespace, where a signal left at its default is dropped."""
    await _early_stop(workspace, await _pid_namespace_prefix())


async def _pid_namespace_prefix() -> tuple[str, ...]:
    """The command prefix that runs a process as PID 1 of a new PID namespace (or a skip
    saying why it cannot here)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = await asyncio.create_subprocess_exec(unshare, "-fp", "--mount-proc", "true")
    if await probe.wait() != 0:
        pytest.skip("PID namespaces are not permitted here")
    return (unshare, "-fp", "--mount-proc")


async def test_the_sidecar_knows_agentapis_version_before_the_stop(
    workspace: Workspace, coder: FakeCoder
) -> None:
    """AgentAPI's version is learnt when the sidecar connects; the stop (through `shutdown`)
    uses what it knows and runs no `agentapi --version` in its grace period, and AgentAPI is
    still asked to save (SIGUSR1, 0.12 and later)."""
    script = write_agentapi_script(workspace.root / "bin", version="0.12.2")
    port = free_port()
    env = {**coder_env(coder), "ARG_AGENTAPI_PORT": str(port)}
    agent_env = {**workspace.env, "AGENTAPI_STATE_FILE": str(workspace.state_file)}
    async with (
        run_fake_agentapi_process(script, port=port, pid_file=workspace.pid_file, env=agent_env),
        sidecar_process(workspace, "--log-level", "debug", env=env) as sidecar,
    ):
        await eventually(lambda: sidecar.saw("agentapi.version"), within=10)
        learnt = [e for e in sidecar.events if e["event"] == "agentapi.version"]
        assert learnt[0]["source"] == "process", learnt
        before = len(sidecar.events)
        run = await cli(workspace, "shutdown", env=env)
        assert run.code == 0, run.stdout + run.stderr
        assert await sidecar.wait() == 0
    during = sidecar.events[before:]
    versions = [e for e in during if e["event"] == "agentapi.version"]
    assert [e["source"] for e in versions] == ["cached"], versions
    assert any(e["event"] == "agentapi.save_requested" for e in during), during
