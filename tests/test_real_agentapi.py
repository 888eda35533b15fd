"""agentapi-persist against the real AgentAPI binary, every version where a behaviour applies.

Each test starts the real ``agentapi server`` (built by ``scripts/install-agentapi``) around the
scripted terminal agent (``tests/terminal_agent.py``), and drives the real CLI as processes: the
sidecar (``run``), ``shutdown``, ``restore``, ``status``. The judge is what the real AgentAPI
then shows over HTTP and what the scripted agent received (was the initial prompt sent twice?).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from agentapi_persist.agentapi_state import read_agentapi_state
from agentapi_persist.testing.coder import FakeCoder
from agentapi_persist.testing.server import free_port

from .cli_support import CliRun, Run, run_cli, timed
from .conftest import Workspace, coder_env, new_workspace
from .real_agentapi import (
    STATEFUL,
    VERSIONS,
    RealAgentAPI,
    acp_echo,
    real_agentapi,
    version_tuple,
)
from .sidecar_support import eventually, sidecar_process

pytestmark = pytest.mark.real_agentapi

PROMPT = "Summarise the repository"
MAX_BYTES = 1 << 28


def agentapi_env(ws: Workspace, *, prompt: str | None = PROMPT, **extra: str) -> dict[str, str]:
    """What the registry module's start script exports for AgentAPI (state persistence on)."""
    env = {"AGENTAPI_STATE_FILE": str(ws.state_file), "AGENTAPI_PID_FILE": str(ws.pid_file)}
    if prompt is not None:
        env["AGENTAPI_INITIAL_PROMPT"] = prompt
    return {**env, **extra}


def persist_env(ws: Workspace, agent: RealAgentAPI, **extra: str) -> dict[str, str]:
    """Our processes' environment: the workspace's plus AgentAPI's URL and persistence on."""
    binary_dir = str(agent.program.parent)
    return ws.process_env(
        AGENTAPI_PERSIST_AGENTAPI_URL=agent.url,
        ARG_ENABLE_STATE_PERSISTENCE="true",
        PATH=f"{binary_dir}{os.pathsep}{os.environ.get('PATH', '')}",  # as installed in a workspace
        **extra,
    )


def comparable(messages: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(m["id"], m["role"], m["content"], m["time"]) for m in messages]


def stored(ws: Workspace) -> list[tuple[Any, ...]]:
    """The durable copy in the shape of ``comparable``."""
    return [(i, m.role, m.content, m.time) for i, m in enumerate(ws.stored().messages)]


async def cli(env: dict[str, str], *args: str) -> CliRun:
    return await run_cli(env, *args, timeout_s=60)


def describe(run: CliRun | Run) -> str:
    return f"exit {run.code}\nstdout: {run.stdout}\nstderr: {run.stderr[-3000:]}"


async def start_conversation(agent: RealAgentAPI, *texts: str) -> list[dict[str, Any]]:
    """Wait for the initial prompt's answer, then say each text; return the conversation."""
    messages = await agent.wait_stable(at_least=3)
    for text in texts:
        messages = await agent.say(text)
    return messages


async def assert_restored_and_reloaded(
    version: str,
    ws: Workspace,
    before: list[dict[str, Any]],
    *,
    prompt: str = PROMPT,
    **restore_env: str,
) -> None:
    """`restore`, then a new real AgentAPI: it shows exactly ``before``, and the agent got
    the initial prompt once in all its lives (a re-sent prompt is typed within a snapshot tick
    or two of the agent being ready)."""
    run = await cli(ws.process_env(**restore_env), "restore")
    assert run.code == 0, describe(run)
    async with real_agentapi(version, ws.home, env=agentapi_env(ws, prompt=prompt)) as again:
        after = await again.wait_stable(at_least=len(before))
        assert comparable(after) == comparable(before)
        await asyncio.sleep(1.0)
        assert again.inputs().count(PROMPT) == 1, again.inputs()


# --- 1. Round trip -------------------------------------------------------------------------


@pytest.mark.parametrize("version", STATEFUL)
async def test_round_trip_reloads_the_whole_conversation(
    tmp_path: Path, coder: FakeCoder, version: str
) -> None:
    """Sidecar, `shutdown` (real SIGUSR1 save confirmed), SIGKILL, `restore`, a new AgentAPI:
    the same messages, and the agent never receives the initial prompt again."""
    ws = new_workspace(tmp_path)
    async with real_agentapi(version, ws.home, env=agentapi_env(ws)) as agent:
        before = await start_conversation(agent, "first question", "second question")
        env = persist_env(ws, agent, **coder_env(coder))
        async with sidecar_process(ws, env=env) as sidecar:
            await eventually(lambda: len(stored(ws)) == len(before), within=10)
            run = await cli(env, "shutdown")
            assert run.code == 0, describe(run)
            assert "agentapi_save=confirmed" in run.stdout, describe(run)
            assert await sidecar.wait() == 0
        agent.kill()  # the runtime's SIGKILL once the stop scripts are done
    assert coder.uploads, "the snapshot was not uploaded"

    await assert_restored_and_reloaded(version, ws, before)


@pytest.mark.parametrize("version", STATEFUL)
async def test_exported_json_is_a_file_agentapi_loads(tmp_path: Path, version: str) -> None:
    """`export --format json` of the stored copy, given to a new real AgentAPI as its state
    file in a fresh home: it shows exactly the conversation, and does not re-run the prompt."""
    ws = new_workspace(tmp_path / "first")
    async with real_agentapi(version, ws.home, env=agentapi_env(ws)) as agent:
        before = await start_conversation(agent, "a question to export")
        run = await cli(persist_env(ws, agent), "shutdown", "--stop-agentapi")
        assert run.code == 0, describe(run)
        await agent.exited()
    exported = tmp_path / "exported-state.json"
    run = await cli(ws.process_env(), "export", "--format", "json", "--output", str(exported))
    assert run.code == 0, describe(run)

    elsewhere = new_workspace(tmp_path / "second")
    env = {**agentapi_env(elsewhere), "AGENTAPI_STATE_FILE": str(exported)}
    async with real_agentapi(version, elsewhere.home, env=env) as again:
        after = await again.wait_stable(at_least=len(before))
        assert comparable(after) == comparable(before)
        await asyncio.sleep(1.0)
        assert PROMPT not in again.inputs(), again.inputs()


# --- 2. SIGKILL of everything mid-conversation ---------------------------------------------


@pytest.mark.parametrize("version", STATEFUL)
async def test_sigkill_of_everything_then_restore(tmp_path: Path, version: str) -> None:
    """AgentAPI and the sidecar SIGKILLed together (no stop script ran): `restore` writes a
    file that the real AgentAPI loads whole, and the prompt is not re-run."""
    ws = new_workspace(tmp_path)
    async with real_agentapi(version, ws.home, env=agentapi_env(ws)) as agent:
        env = persist_env(ws, agent)
        async with sidecar_process(ws, env=env) as sidecar:
            before = await start_conversation(agent, "one", "two")
            await asyncio.sleep(1.0)  # the promise: every change older than 1 s is durable
            os.killpg(sidecar.proc.pid, signal.SIGKILL)
            agent.kill()
    assert not ws.state_file.exists(), "AgentAPI saved although nothing asked it to"
    await assert_restored_and_reloaded(version, ws, before)


# --- 3. A stop during start-up, before AgentAPI loaded its file ----------------------------


@pytest.mark.parametrize("version", STATEFUL)
async def test_stop_during_startup_never_adopts_the_startup_screen(
    tmp_path: Path, version: str
) -> None:
    """A conversation exists; AgentAPI restarts with a slow agent and is stopped before the
    agent is ready: its save holds only the start-up screen with `initial_prompt_sent: false`.
    Neither `shutdown` nor `restore` adopts that; the next start has the whole conversation
    and the prompt is not re-run."""
    ws = new_workspace(tmp_path)
    async with real_agentapi(version, ws.home, env=agentapi_env(ws)) as agent:
        before = await start_conversation(agent, "one")
        run = await cli(persist_env(ws, agent), "shutdown", "--stop-agentapi")
        assert run.code == 0, describe(run)
        await agent.exited()
    full = read_agentapi_state(ws.state_file, max_bytes=MAX_BYTES)
    assert len(full.messages) == len(before)

    async with real_agentapi(
        version, ws.home, env=agentapi_env(ws), agent_args=("--ready-after", "30")
    ) as slow:
        await eventually(lambda: ws.pid_file.exists(), within=10)
        run = await cli(persist_env(ws, slow), "shutdown", "--stop-agentapi")
        await slow.exited()
        saved = read_agentapi_state(ws.state_file, max_bytes=MAX_BYTES)
        # What the real AgentAPI did: it overwrote its file with the start-up screen.
        assert len(saved.messages) == 1
        assert saved.initial_prompt_sent is False
        assert run.code == 0, describe(run)
        assert len(stored(ws)) == len(before), "the start-up screen replaced the copy"

    await assert_restored_and_reloaded(version, ws, before)
    assert read_agentapi_state(ws.state_file, max_bytes=MAX_BYTES).initial_prompt_sent is True


@pytest.mark.parametrize("version", STATEFUL)
async def test_sidecar_across_an_agentapi_restart_keeps_the_conversation(
    tmp_path: Path, version: str
) -> None:
    """The sidecar outlives an AgentAPI restart; the new AgentAPI shows only the agent's
    start-up screen for seconds before it loads its file. The copy is never replaced by that
    screen (nothing archived, nothing shrunk), and follows the conversation once it is back."""
    ws = new_workspace(tmp_path)
    async with real_agentapi(version, ws.home, env=agentapi_env(ws)) as first:
        port = first.port
        env = persist_env(ws, first)
        async with sidecar_process(ws, env=env) as sidecar:
            before = await start_conversation(first, "one")
            await eventually(lambda: stored(ws) == comparable(before), within=10)
            first.signal(signal.SIGTERM)  # a clean stop: AgentAPI saves and exits
            await first.exited()
            async with real_agentapi(
                version,
                ws.home,
                env=agentapi_env(ws),
                port=port,
                agent_args=("--ready-after", "4"),
            ) as second:
                screen = await second.messages()
                assert len(screen) == 1, screen  # the start-up screen, file not loaded yet
                await eventually(lambda: sidecar.saw("agentapi.synced"), within=10)
                for _ in range(20):
                    assert stored(ws) == comparable(before)
                    await asyncio.sleep(0.1)
                after = await second.wait_stable(at_least=len(before))
                assert comparable(after) == comparable(before)
                await eventually(lambda: stored(ws) == comparable(after), within=10)
    assert archived(ws) == []
    assert second.inputs().count(PROMPT) == 1


# --- 4. A stale pid file --------------------------------------------------------------------


@pytest.mark.parametrize("version", STATEFUL)
async def test_stale_pid_file_never_blocks_the_next_start(tmp_path: Path, version: str) -> None:
    """AgentAPI killed; its pid file names a pid that is now another live process (pids are
    reused after a container restart): `restore` removes the file and says so, and AgentAPI
    starts."""
    ws = new_workspace(tmp_path)
    async with real_agentapi(version, ws.home, env=agentapi_env(ws)) as agent:
        await agent.wait_stable(at_least=3)
        agent.kill()
    assert ws.pid_file.exists(), "AgentAPI removes its pid file only on a clean exit"
    other = await asyncio.create_subprocess_exec("sleep", "60")
    try:
        ws.pid_file.write_text(f"{other.pid}\n")
        refused = await _start_refused(version, ws)
        assert "another instance is already running" in refused
        run = await cli(ws.process_env(), "restore")
        assert run.code == 0, describe(run)
        assert not ws.pid_file.exists()
        assert "pid file" in run.stdout, describe(run)
        async with real_agentapi(version, ws.home, env=agentapi_env(ws)) as again:
            await again.wait_stable(at_least=3)
    finally:
        other.kill()
        await other.wait()


async def _start_refused(version: str, ws: Workspace) -> str:
    """Start AgentAPI and return its output once it exits (it must refuse to start)."""
    async with real_agentapi(version, ws.home, env=agentapi_env(ws), wait=False) as agent:
        code = await agent.exited(timeout=10)
        assert code != 0
        return agent.output()


# --- 5. Versions without agent_type ----------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
async def test_sidecar_status_and_doctor_follow_every_version(tmp_path: Path, version: str) -> None:
    """The sidecar follows the event stream of every version (v0.10.0 sends no `agent_type`);
    `status` and `doctor` read it; `shutdown` saves the conversation."""
    ws = new_workspace(tmp_path)
    env_for_agentapi = agentapi_env(ws) if version in STATEFUL else {}
    async with real_agentapi(version, ws.home, env=env_for_agentapi) as agent:
        before = await agent.wait_stable(at_least=1)
        before = await agent.say("hello there")
        env = persist_env(ws, agent)
        async with sidecar_process(ws, env=env) as sidecar:
            await eventually(lambda: len(stored(ws)) == len(before), within=10)
            status = await cli(env, "status", "--json")
            report = json.loads(status.stdout)
            assert report["agentapi"].get("status") == "stable", status.stdout
            doctor = await cli(env, "doctor", "--json")
            checks = {c["name"]: c for c in json.loads(doctor.stdout)["findings"]}
            assert checks["agentapi.reachable"]["verdict"] == "ok", doctor.stdout
            assert version in checks["agentapi.version"]["detail"], doctor.stdout
            run = await cli(env, "shutdown")
            assert run.code == 0, describe(run)
            await sidecar.wait()
        assert stored(ws) == comparable(before)


# --- 6. The initial prompt is trimmed -------------------------------------------------------


@pytest.mark.parametrize("version", STATEFUL)
async def test_prompt_with_surrounding_whitespace_is_not_rerun(
    tmp_path: Path, version: str
) -> None:
    """AgentAPI trims the prompt before saving and comparing; a file that `restore` wrote from
    the sidecar's copy (no AgentAPI save ever seen) must compare equal."""
    ws = new_workspace(tmp_path)
    padded = f"\n  {PROMPT}\t \n"
    async with real_agentapi(version, ws.home, env=agentapi_env(ws, prompt=padded)) as agent:
        env = persist_env(ws, agent, AGENTAPI_INITIAL_PROMPT=padded)
        async with sidecar_process(ws, env=env) as sidecar:
            before = await start_conversation(agent, "one")
            await eventually(lambda: len(stored(ws)) == len(before), within=10)
            os.killpg(sidecar.proc.pid, signal.SIGKILL)
            agent.kill()
    await assert_restored_and_reloaded(
        version, ws, before, prompt=padded, AGENTAPI_INITIAL_PROMPT=padded
    )


# --- 7. Persistence on for us, off in AgentAPI -----------------------------------------------


@pytest.mark.parametrize("version", STATEFUL)
async def test_no_wait_for_a_save_that_cannot_come(tmp_path: Path, version: str) -> None:
    """`ARG_ENABLE_STATE_PERSISTENCE=true` but AgentAPI runs with `AGENTAPI_SAVE_STATE=false`:
    no SIGUSR1 wait eats the budget; the stop is quick and says why nothing was asked."""
    ws = new_workspace(tmp_path)
    env_for_agentapi = agentapi_env(ws, AGENTAPI_SAVE_STATE="false")
    async with real_agentapi(version, ws.home, env=env_for_agentapi) as agent:
        await start_conversation(agent)
        run = await cli(persist_env(ws, agent), "shutdown", "--grace", "10")
        assert run.code == 0, describe(run)
        assert run.seconds < 3, describe(run)
        assert "agentapi_save=skipped" in run.stdout, describe(run)
        assert not ws.state_file.exists()


# --- 8. agent_error events -------------------------------------------------------------------


def archived(ws: Workspace) -> list[list[tuple[Any, ...]]]:
    """Every archived conversation, as comparable message lists."""
    found = []
    for path in sorted((ws.state_dir / "archive").glob("conversation-*.json")):
        body = json.loads(path.read_bytes().split(b"\n", 1)[1])
        found.append([(m["id"], m["role"], m["content"], m["time"]) for m in body["messages"]])
    return found


@pytest.mark.parametrize("version", STATEFUL)
async def test_failed_load_never_replaces_the_fuller_copy(tmp_path: Path, version: str) -> None:
    """AgentAPI fails to load its file (an unsupported version), says so in an `agent_error`,
    starts a new conversation and later saves it over its file: the sidecar logs the error
    once and names it, and the old conversation is kept whole in the archive."""
    ws = new_workspace(tmp_path)
    async with real_agentapi(version, ws.home, env=agentapi_env(ws)) as agent:
        before = await start_conversation(agent, "one", "two")
        run = await cli(persist_env(ws, agent), "shutdown", "--stop-agentapi")
        assert run.code == 0, describe(run)
        await agent.exited()
    assert stored(ws) == comparable(before)
    document = json.loads(ws.state_file.read_text())
    document["version"] = 2  # a file this AgentAPI refuses to load
    ws.state_file.write_text(json.dumps(document) + "\n")

    async with real_agentapi(version, ws.home, env=agentapi_env(ws)) as again:
        env = persist_env(ws, again)
        async with sidecar_process(ws, env=env) as sidecar:
            await eventually(lambda: sidecar.saw("agentapi.load_failed"), within=20)
            # Without its file AgentAPI starts a new conversation (and sends the prompt again).
            await again.wait_stable(at_least=3)
            after = await again.say("after the failed load")
            await eventually(lambda: stored(ws) == comparable(after), within=10)
            run = await cli(env, "shutdown", "--stop-agentapi")
            assert run.code == 0, describe(run)
            await sidecar.wait()
        await again.exited()
    errors = [e for e in sidecar.events if e.get("event") == "agentapi.agent_error"]
    assert len(errors) == 1, errors
    assert errors[0]["message"].startswith("Failed to restore previous session")
    assert comparable(before) in archived(ws)
    assert stored(ws) == comparable(after)


# --- 9. The real wire ----------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
async def test_real_wire_shapes(tmp_path: Path, version: str) -> None:
    """`--version`, `$schema` in bodies, the Host check, and the variables AgentAPI reads."""
    ws = new_workspace(tmp_path)
    async with real_agentapi(version, ws.home) as agent:
        await agent.wait_stable(at_least=1)
        proc = await asyncio.create_subprocess_exec(
            str(agent.program),
            "--version",
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        assert out.decode().strip() == f"agentapi version {version}"
        body = await agent.get("/status")
        assert "$schema" in body
        assert ("agent_type" in body) == (version_tuple(version) >= (0, 10, 1))
        async with agent.session.get(
            f"http://127.0.0.1:{agent.port}/status", headers={"Host": "example.com"}
        ) as response:
            assert response.status == 400


@pytest.mark.parametrize("version", STATEFUL)
async def test_state_and_pid_files_given_as_flags(tmp_path: Path, version: str) -> None:
    """AgentAPI started with `-s FILE --pid-file FILE` (no AGENTAPI_* variables): the stop
    finds its state file from its command line and confirms the save there."""
    ws = new_workspace(tmp_path)
    custom = ws.home / "elsewhere" / "state.json"
    flags = ("-s", str(custom), "--pid-file", str(ws.pid_file))
    env_for_agentapi = {"AGENTAPI_INITIAL_PROMPT": PROMPT}
    async with real_agentapi(version, ws.home, env=env_for_agentapi, args=flags) as agent:
        before = await start_conversation(agent, "one")
        run = await cli(persist_env(ws, agent), "shutdown", "--grace", "10")
        assert run.code == 0, describe(run)
        assert "agentapi_save=confirmed_changed" in run.stdout, describe(run)
        assert run.seconds < 3, describe(run)
    saved = read_agentapi_state(custom, max_bytes=MAX_BYTES)
    assert [m.message for m in saved.messages] == [m["content"] for m in before]


# --- 10. SIGUSR1 before 0.12.0 ---------------------------------------------------------------


@pytest.mark.parametrize("version", [v for v in VERSIONS if v not in STATEFUL])
async def test_sigusr1_is_ignored_before_0_12(tmp_path: Path, version: str) -> None:
    """Go ignores a signal the program never asked for: an older AgentAPI survives SIGUSR1
    (and saves nothing). The product still sends it only to versions that save on it."""
    ws = new_workspace(tmp_path)
    async with real_agentapi(version, ws.home) as agent:
        await agent.wait_stable(at_least=1)
        agent.signal(signal.SIGUSR1)
        await asyncio.sleep(0.5)
        assert agent.proc.poll() is None
        assert await agent.status() in ("stable", "running")
        run = await cli(persist_env(ws, agent), "shutdown")
        assert "agentapi_save=skipped" in run.stdout, describe(run)


# --- 11. ACP: ids skip after a failed prompt ---------------------------------------------------


@pytest.mark.parametrize("version", STATEFUL)
async def test_acp_id_gaps_are_followed_not_looped_on(tmp_path: Path, version: str) -> None:
    """ACP transport (AgentAPI's own scripted ACP agent): a failed prompt makes later ids skip.
    The sidecar follows without reconnecting in a loop, and keeps the conversation renumbered
    0..n-1 with nothing that AgentAPI no longer holds."""
    ws = new_workspace(tmp_path)
    script = tmp_path / "script.json"
    script.write_text(
        json.dumps(
            [
                {"expectMessage": "one", "responseMessage": "reply one"},
                {"expectMessage": "", "responseMessage": "reply two"},
            ]
        )
    )
    command = (str(acp_echo(version)), str(script))
    env_for_agentapi = {"AGENTAPI_PID_FILE": str(ws.pid_file)}
    async with real_agentapi(
        version, ws.home, env=env_for_agentapi, args=("--experimental-acp",), agent=command
    ) as agent:
        env = persist_env(ws, agent)
        async with sidecar_process(ws, env=env) as sidecar:
            await agent.wait_stable()
            async with agent.session.post(
                agent.url + "/message", json={"content": "wrong", "type": "user"}
            ) as response:
                assert response.status == 500  # the scripted agent refuses it: a failed prompt
            await agent.say("one")
            final = await agent.say("two")
            ids = [m["id"] for m in final]
            assert ids != list(range(len(ids))), "expected AgentAPI's ids to skip"
            expected = [(i, m["role"], m["content"], m["time"]) for i, m in enumerate(final)]
            try:
                await eventually(lambda: stored(ws) == expected, within=10)
            except AssertionError:
                assert stored(ws) == expected, json.dumps(sidecar.events[-12:])
            run = await cli(env, "shutdown")
            assert run.code == 0, describe(run)
            await sidecar.wait()
    names = [e.get("event") for e in sidecar.events]
    assert names.count("agentapi.synced") == 1, names
    assert "agentapi.events_missed" not in names
    assert stored(ws) == expected


# --- One owner per conversation: two modules in one home -------------------------------------


def registry_stop_env(ws: Workspace, agent: RealAgentAPI) -> dict[str, str]:
    """What the registry module's stop script is given: no state file path (it is not passed;
    registry agentapi/main.tf), the module's directory name, port and pid file."""
    env = ws.process_env(
        ARG_AGENTAPI_PORT=str(agent.port),
        ARG_ENABLE_STATE_PERSISTENCE="true",
        ARG_PID_FILE_PATH=str(ws.pid_file),
        PATH=f"{agent.program.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    del env["AGENTAPI_STATE_FILE"], env["AGENTAPI_PID_FILE"]
    return env


@pytest.mark.parametrize("version", STATEFUL)
async def test_two_modules_in_one_home_each_keep_their_own_conversation(
    tmp_path: Path, version: str
) -> None:
    """Two agent modules (own module directory, port, state file, prompt), default settings,
    a sidecar each (B's started before its AgentAPI). The registry's stop for B reaches B's
    sidecar and stops B's AgentAPI only; A keeps running until its own stop. After `restore`,
    each new real AgentAPI shows exactly its own conversation, its prompt sent once."""
    a = new_workspace(tmp_path, ".claude-module")
    b = new_workspace(tmp_path, ".codex-module")
    prompts = {a.module: "Summarise module A", b.module: "Summarise module B"}
    port_b = free_port()
    before: dict[str, list[dict[str, Any]]] = {}
    async with real_agentapi(
        version, a.module_dir, env=agentapi_env(a, prompt=prompts[a.module])
    ) as agent_a:
        env_a = persist_env(a, agent_a, ARG_AGENTAPI_PORT=str(agent_a.port))
        del env_a["AGENTAPI_PERSIST_AGENTAPI_URL"]  # the port decides, as in the registry
        env_b = {
            **b.process_env(ARG_AGENTAPI_PORT=str(port_b), ARG_ENABLE_STATE_PERSISTENCE="true")
        }
        env_b["PATH"] = env_a["PATH"]
        async with (
            sidecar_process(a, env=env_a) as side_a,
            sidecar_process(b, env=env_b) as side_b,
            real_agentapi(
                version, b.module_dir, env=agentapi_env(b, prompt=prompts[b.module]), port=port_b
            ) as agent_b,
        ):
            before[a.module] = await start_conversation(agent_a, "alpha question")
            before[b.module] = await start_conversation(agent_b, "beta question")
            for ws in (a, b):
                await eventually(lambda ws=ws: len(stored(ws)) == len(before[ws.module]), within=10)
            run = await cli(registry_stop_env(b, agent_b), "shutdown", "--stop-agentapi")
            assert run.code == 0, describe(run)
            assert "(via sidecar)" in run.stdout, describe(run)
            assert "agentapi_save=confirmed" in run.stdout, describe(run)
            assert await side_b.wait() == 0
            assert await agent_b.exited() is not None
            assert agent_a.proc.poll() is None, "A's AgentAPI was stopped by B's stop"
            assert side_a.proc.returncode is None, "A's sidecar answered B's stop"
            before[a.module] = await agent_a.say("alpha again")
            await eventually(lambda: len(stored(a)) == len(before[a.module]), within=10)
            run = await cli(registry_stop_env(a, agent_a), "shutdown", "--stop-agentapi")
            assert run.code == 0, describe(run)
            assert await side_a.wait() == 0
    for ws, other in ((a, b), (b, a)):
        assert stored(ws) == comparable(before[ws.module])
        assert not set(stored(ws)) & set(comparable(before[other.module])[1:])
        run = await cli(ws.process_env(), "restore")
        assert run.code == 0, describe(run)
        env = agentapi_env(ws, prompt=prompts[ws.module])
        async with real_agentapi(version, ws.module_dir, env=env) as again:
            after = await again.wait_stable(at_least=len(before[ws.module]))
            assert comparable(after) == comparable(before[ws.module])
            await asyncio.sleep(1.0)
            assert again.inputs().count(prompts[ws.module]) == 1, again.inputs()


@pytest.mark.parametrize("version", STATEFUL)
async def test_unreadable_agentapi_is_not_nothing_and_is_still_asked_to_save(
    tmp_path: Path, version: str
) -> None:
    """First stop, no copy of ours, and `--agentapi-url http://0.0.0.0:P`, which AgentAPI's
    Host check refuses (a plain-text 400): the stop does not claim "nothing to save" (exit 3,
    "unknown"), yet it asks AgentAPI to save (SIGUSR1, pid and version good) and the save is
    confirmed: AgentAPI's own file then holds the whole conversation."""
    ws = new_workspace(tmp_path)
    async with real_agentapi(version, ws.home, env=agentapi_env(ws)) as agent:
        before = await start_conversation(agent, "a question")
        env = persist_env(ws, agent)
        run = await cli(env, "shutdown", "--agentapi-url", f"http://0.0.0.0:{agent.port}")
        assert run.code == 3, describe(run)
        assert "fetch=unknown" in run.stdout, describe(run)
        assert "nothing to save" not in run.stdout, describe(run)
        assert "agentapi_save=confirmed_changed" in run.stdout, describe(run)
    saved = read_agentapi_state(ws.state_file, max_bytes=MAX_BYTES)
    assert [m.message for m in saved.messages] == [m["content"] for m in before]


@pytest.mark.parametrize("version", STATEFUL)
async def test_a_huge_conversation_under_a_short_grace_is_reported_truthfully(
    tmp_path: Path, version: str
) -> None:
    """100,000 messages (33 MB) loaded by the real AgentAPI, no sidecar, `shutdown --grace 3`:
    the process ends inside the grace with its summary printed (the exit code it states),
    AgentAPI was asked to save at the start (not cut before asking), and an "ok" means every
    message is durable. Before: the parse of three copies held the interpreter for seconds,
    the watchdog ended the process with no summary, AgentAPI never asked."""
    ws = new_workspace(tmp_path)
    messages = [
        {"id": i, "role": ("user", "agent")[i % 2], "message": f"m{i} " + "x" * 300,
         "time": "2025-01-02T03:04:05.123456789Z"}
        for i in range(100_000)
    ]  # fmt: skip
    document = {"version": 1, "messages": messages, "initial_prompt": PROMPT,
                "initial_prompt_sent": True}  # fmt: skip
    ws.state_file.write_text(json.dumps(document))
    async with real_agentapi(version, ws.home, env=agentapi_env(ws)) as agent:
        await agent.wait_stable(at_least=100_000, timeout=120)
        env = persist_env(ws, agent, AGENTAPI_PERSIST_LOG_LEVEL="debug")
        run = await timed(env, "shutdown", "--grace", "3")  # from outside this process
    assert run.seconds < 3.0, describe(run)
    verdict = "ok" if run.code == 0 else f"FAILED (exit {run.code})"
    assert run.stdout.startswith(f"shutdown {verdict}:"), describe(run)
    # What the early save saw, when it was not asked (its debug events).
    early = [line for line in run.stderr.splitlines() if "shutdown.early_" in line]
    assert "agentapi_save=cut 0ms" not in run.stdout, f"{describe(run)}\n{early}"
    assert "agentapi_save=skipped" not in run.stdout, describe(run)
    if run.code == 0:
        assert "100000 messages durable" in run.stdout, describe(run)
        assert len(ws.stored().messages) == 100_000
