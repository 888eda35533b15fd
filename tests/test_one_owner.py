"""One owner per conversation: several agent modules in one home, as real processes.

Each module has its own module directory, port, state file and task, and every command runs
with the environment the registry module gives it (``ARG_MODULE_DIR_NAME``,
``ARG_AGENTAPI_PORT``, ...), default settings otherwise. The judge: no module's conversation
ever reaches another's store or file, no durable claim is false, and every refused command
says why. The real-AgentAPI run of the same story is in ``test_real_agentapi.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import pytest

from agentapi_persist.agentapi_state import read_agentapi_state, render_agentapi_state
from agentapi_persist.models import Conversation
from agentapi_persist.ownership import read_owner
from agentapi_persist.store import StateStore
from agentapi_persist.testing.agentapi import FakeAgentAPI
from agentapi_persist.testing.server import free_port

from .cli_support import cli, run_cli
from .conftest import Workspace, make_messages, new_workspace
from .faults_support import needs_strace, strace_prefix
from .sidecar_support import eventually, sidecar_process

MODULES = (".claude-module", ".codex-module", ".goose-module")


def contents(ws: Workspace) -> list[str]:
    return [m.content for m in ws.stored().messages]


def stored_in(directory: Path) -> list[str]:
    """What a fresh process would load from ``directory`` now (read-only)."""
    conversation = StateStore(directory, read_only=True).load().conversation
    return [m.content for m in conversation.messages] if conversation is not None else []


def module_env(agent: FakeAgentAPI, **extra: str) -> dict[str, str]:
    """What the registry gives a module's scripts: its port (the URL follows from it)."""
    return {"ARG_AGENTAPI_PORT": str(agent.port), **extra}


def prefixed(ws: Workspace) -> str:
    return ws.module.strip(".").split("-")[0]


async def test_three_modules_three_sidecars_each_stop_reaches_its_own(tmp_path: Path) -> None:
    """Three modules, default settings, one sidecar each (B's started before its AgentAPI
    answers): each copy holds its own conversation only; `shutdown` for B is answered by B's
    sidecar, stops B's sidecar only, and the others keep following and stop on their own."""
    spaces = [new_workspace(tmp_path, module) for module in MODULES]
    assert len({ws.state_dir for ws in spaces}) == 3
    ports = [free_port() for _ in spaces]
    agents = [
        FakeAgentAPI(messages=make_messages(4 + i, prefix=prefixed(ws)), port=port)
        for i, (ws, port) in enumerate(zip(spaces, ports, strict=True))
    ]
    for agent in (agents[0], agents[2]):
        await agent.start()
    try:
        a, b, c = spaces
        async with (
            sidecar_process(a, env=module_env(agents[0])) as side_a,
            sidecar_process(b, env={"ARG_AGENTAPI_PORT": str(ports[1])}) as side_b,
            sidecar_process(c, env=module_env(agents[2])) as side_c,
        ):
            await agents[1].start()  # B's sidecar was up first, as the docs suggest
            for i, ws in enumerate(spaces):
                await eventually(lambda ws=ws, n=4 + i: len(contents(ws)) == n)
            agents[1].add_message("user", "codex only")
            await eventually(lambda: contents(b)[-1] == "codex only")
            stop_b = await cli(b, "shutdown", env=module_env(agents[1]))
            assert stop_b.code == 0, stop_b.stdout + stop_b.stderr
            assert "(via sidecar)" in stop_b.stdout
            assert f"6 messages durable in {b.state_dir}" in stop_b.stdout
            assert await side_b.wait() == 0
            # A and C never stopped, and still follow their own AgentAPI.
            assert side_a.proc.returncode is None
            assert side_c.proc.returncode is None
            agents[0].add_message("user", "claude only")
            await eventually(lambda: contents(a)[-1] == "claude only")
            for ws, side, agent in ((a, side_a, agents[0]), (c, side_c, agents[2])):
                stop = await cli(ws, "shutdown", env=module_env(agent))
                assert stop.code == 0, stop.stdout + stop.stderr
                assert await side.wait() == 0
    finally:
        for agent in agents:
            await agent.close()
    for ws in spaces:
        own = prefixed(ws)
        assert all(text.startswith(own) or text.endswith(" only") for text in contents(ws))
        assert read_owner(ws.state_dir) is not None
        assert read_owner(ws.state_dir).module_dir == str(ws.module_dir)  # type: ignore[union-attr]
    assert contents(a)[-1] == "claude only"
    assert contents(b)[-1] == "codex only"
    assert "claude only" not in contents(c) + contents(b)


async def test_a_shared_state_dir_is_refused_and_the_other_sidecar_never_answers_for_it(
    tmp_path: Path,
) -> None:
    """Two modules given the same --state-dir: the second sidecar exits 2 naming both
    instances and writes nothing (not even into its own AgentAPI's file); a `shutdown` for
    the second module is refused by the first one's sidecar (exit 2, no "ok"), which neither
    saves nor stops, and keeps running."""
    a = new_workspace(tmp_path, MODULES[0])
    b = new_workspace(tmp_path, MODULES[1])
    shared = tmp_path / "shared-state"
    for ws in (a, b):
        ws.env["AGENTAPI_PERSIST_STATE_DIR"] = str(shared)
    b_file = render_agentapi_state(Conversation(messages=tuple(make_messages(3, prefix="codex"))))
    b.state_file.write_bytes(b_file)
    async with (
        FakeAgentAPI(messages=make_messages(5, prefix="claude")) as agent_a,
        FakeAgentAPI(messages=make_messages(3, prefix="codex")) as agent_b,
        sidecar_process(a, env=module_env(agent_a)) as side_a,
    ):
        await eventually(lambda: len(stored_in(shared)) == 5)
        before = sorted(p.name for p in shared.iterdir())
        second = await run_cli(
            b.process_env(**module_env(agent_b)), "run", "--log-level", "error", timeout_s=20
        )
        assert second.code == 2, second.stdout + second.stderr
        assert str(a.module_dir) in second.stderr
        assert str(b.module_dir) in second.stderr
        assert "nothing was read or written" in second.stderr
        assert b.state_file.read_bytes() == b_file
        stop_b = await cli(b, "shutdown", "--stop-agentapi", env=module_env(agent_b))
        assert stop_b.code == 2, stop_b.stdout + stop_b.stderr
        assert "ok" not in stop_b.stdout
        assert "another instance" in stop_b.stderr
        assert side_a.proc.returncode is None  # A's sidecar neither stopped nor saved for B
        assert sorted(p.name for p in shared.iterdir()) == before
        agent_a.add_message("user", "still followed")
        await eventually(lambda: stored_in(shared)[-1] == "still followed")
        for command in (("restore", "--force"), ("status",), ("snapshot", "--dry-run")):
            refused = await cli(b, *command, env=module_env(agent_b))
            assert refused.code == 2, (command, refused.stdout, refused.stderr)
            assert f"holds the conversation of the AgentAPI of {a.module_dir}" in refused.stderr
    owner = read_owner(shared)
    assert owner is not None
    assert owner.module_dir == str(a.module_dir)
    assert all(text.startswith(("claude", "still")) for text in stored_in(shared))


async def test_a_stale_socket_and_two_sidecars_racing_for_one_module(tmp_path: Path) -> None:
    """The sidecar is SIGKILLed (its socket stays behind); two sidecars for the same module
    then start at once: exactly one becomes ready, the other exits 1 naming it and writes no
    record; the winner's exit record is its own."""
    ws = new_workspace(tmp_path, MODULES[0])
    async with FakeAgentAPI(messages=make_messages(6, prefix="claude")) as agent:
        env = module_env(agent)
        async with sidecar_process(ws, env=env) as first:
            await eventually(lambda: len(contents(ws)) == 6)
            os.killpg(first.proc.pid, signal.SIGKILL)
            await first.proc.wait()
        assert (ws.state_dir / "control.sock").exists()
        racers = [
            asyncio.create_task(
                run_cli(ws.process_env(**env), "run", "--log-level", "info", timeout_s=30)
            )
            for _ in range(2)
        ]
        await eventually(lambda: any(t.done() for t in racers), within=20)
        loser = next(t for t in racers if t.done()).result()
        assert loser.code == 1, loser.stdout + loser.stderr
        assert "(sidecar)" in loser.stderr
        assert "wrote nothing" in loser.stderr
        agent.add_message("user", "after the race")
        await eventually(lambda: contents(ws)[-1] == "after the race")
        stop = await cli(ws, "shutdown", env=env)
        assert stop.code == 0, stop.stdout + stop.stderr
        results = await asyncio.gather(*racers)
    assert sorted(r.code for r in results) == [0, 1]
    record = json.loads((ws.state_dir / "last-shutdown.json").read_text())
    assert record["exit_code"] == 0
    assert record["messages"] == 7


@needs_strace
@pytest.mark.faults
async def test_two_stops_at_once_on_a_slow_disk_claim_only_what_is_stored(tmp_path: Path) -> None:
    """No sidecar, every fsync of the first stop slowed by 0.1 s (strace delay_enter): the
    agent adds four messages between the two stops. The second waits for the first's lock;
    each says durable only what the store held when it finished, and the store ends with
    all 31 messages; no journal record was cut."""
    ws = new_workspace(tmp_path, MODULES[0])
    log = tmp_path / "strace.log"
    async with FakeAgentAPI(messages=make_messages(27, prefix="claude")) as agent:
        env = ws.process_env(**module_env(agent))
        slow = asyncio.create_task(
            run_cli(
                env,
                "shutdown",
                prefix=strace_prefix(
                    log, "trace=fsync,fdatasync", "inject=fsync:delay_enter=100ms"
                ),
            )
        )
        await eventually(lambda: log.exists() and "fsync(" in log.read_text(), within=20)
        for n in range(4):
            agent.add_message("user" if n % 2 == 0 else "agent", f"late {n}")
        fast = await run_cli(env, "shutdown")
        first = await slow
    assert "delay_enter" not in first.stderr
    for run in (first, fast):
        assert run.code == 0, run.stdout + run.stderr
    durable = sorted(
        int(r.stdout.split(" messages durable")[0].rsplit(" ", 1)[1]) for r in (first, fast)
    )
    assert durable[-1] == 31
    assert len(contents(ws)) == 31
    assert contents(ws)[-1] == "late 3"
    assert "fsync(" in log.read_text()


async def test_sigkill_of_every_process_then_each_restore_writes_its_own_file(
    tmp_path: Path,
) -> None:
    """Two modules; both sidecars SIGKILLed mid-conversation (no stop ran), a stale socket
    and lock file left in each directory. Each module's `restore` writes its own AgentAPI
    file from its own copy, in either order, and never the other's."""
    a = new_workspace(tmp_path, MODULES[0])
    b = new_workspace(tmp_path, MODULES[1])
    async with (
        FakeAgentAPI(messages=make_messages(7, prefix="claude")) as agent_a,
        FakeAgentAPI(messages=make_messages(5, prefix="codex")) as agent_b,
        sidecar_process(a, env=module_env(agent_a)) as side_a,
        sidecar_process(b, env=module_env(agent_b)) as side_b,
    ):
        agent_a.add_message("agent", "claude last")
        agent_b.add_message("agent", "codex last")
        await eventually(lambda: contents(a)[-1:] == ["claude last"])
        await eventually(lambda: contents(b)[-1:] == ["codex last"])
        for side in (side_b, side_a):
            os.killpg(side.proc.pid, signal.SIGKILL)
            await side.proc.wait()
    for ws in (b, a):
        assert (ws.state_dir / "control.sock").exists()
        run = await cli(ws, "restore")
        assert run.code == 0, run.stdout + run.stderr
        state = read_agentapi_state(ws.state_file, max_bytes=1 << 24)
        assert [m.message for m in state.messages] == contents(ws)
    assert contents(a)[-1] == "claude last"
    assert all(text.startswith("claude") for text in contents(a))
    assert all(text.startswith("codex") for text in contents(b))
