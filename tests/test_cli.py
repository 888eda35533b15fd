"""The real command line, as a process, against real peers: AgentAPI as a process with a pid
file and a state file, and the Coder endpoint on loopback."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from agentapi_persist._options import COMMANDS
from agentapi_persist.agentapi_state import read_agentapi_state
from agentapi_persist.cli import build_parser, main
from agentapi_persist.config import OPTIONS
from agentapi_persist.models import Conversation
from agentapi_persist.store import StateStore
from agentapi_persist.testing.agentapi import FakeAgentAPI
from agentapi_persist.testing.agentapi_program import (
    run_fake_agentapi_process,
    write_agentapi_script,
)
from agentapi_persist.testing.coder import FakeCoder
from agentapi_persist.testing.server import free_port

from .cli_support import cli
from .conftest import CANARY_TOKEN, TASK_ID, Workspace, coder_env, make_messages


@asynccontextmanager
async def agentapi_process(
    ws: Workspace, *, messages: int, version: str = "0.12.1", **env: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    """A fake AgentAPI process seeded with ``messages`` messages, writing the pid file."""
    seed = ws.root / "seed.json"
    seed.write_text(
        json.dumps([{"role": m.role, "content": m.content} for m in make_messages(messages)])
    )
    script = write_agentapi_script(ws.root / "bin", version=version)
    port = free_port()
    async with run_fake_agentapi_process(
        script,
        port=port,
        pid_file=ws.pid_file,
        env={**ws.env, "FAKE_AGENTAPI_SEED": str(seed), **env},
    ) as proc:
        yield proc, port


def assert_no_token(*texts: str) -> None:
    for text in texts:
        assert CANARY_TOKEN not in text
        assert CANARY_TOKEN[:12] not in text


async def test_shutdown_with_registry_environment(workspace: Workspace, coder: FakeCoder) -> None:
    """40 messages: last 30 uploaded, AgentAPI's own file complete via SIGUSR1, exit 0."""
    async with agentapi_process(workspace, messages=38, AGENTAPI_INITIAL_PROMPT="build it") as (
        proc,
        port,
    ):
        result = await cli(
            workspace, "shutdown", env={**coder_env(coder), "ARG_AGENTAPI_PORT": str(port)}
        )
        assert proc.returncode is None  # SIGUSR1 saved, did not kill it
    assert result.code == 0, result.stdout + result.stderr
    assert result.stdout.startswith("shutdown ok:")
    assert "agentapi_save=confirmed_changed" in result.stdout
    (upload,) = coder.uploads
    assert [m["id"] for m in upload.json["messages"]] == list(range(10, 40))
    state = read_agentapi_state(workspace.state_file, max_bytes=2**24)
    assert len(state.messages) == 40
    assert [m.id for m in state.messages] == list(range(40))
    assert state.initial_prompt == "build it"
    assert state.initial_prompt_sent is True
    own = StateStore(workspace.state_dir).load().conversation
    assert own is not None
    assert len(own.messages) == 40
    # The prompt fields come from the file AgentAPI saved on SIGUSR1, not from a guess.
    assert (own.initial_prompt, own.initial_prompt_sent, own.prompt_origin) == (
        "build it",
        True,
        "agentapi_state",
    )
    assert_no_token(result.stdout, result.stderr)
    for path in workspace.root.rglob("*"):
        if path.is_file():
            assert CANARY_TOKEN.encode() not in path.read_bytes(), path


async def test_a_late_status_answer_does_not_cost_the_early_save(
    workspace: Workspace, coder: FakeCoder
) -> None:
    """AgentAPI's first ``GET /status`` answers after 1 s, past the stop's 0.3 s wait for it
    (a busy AgentAPI, or our own process held by the parse of a big body), and ``GET
    /messages`` takes 1.5 s: the stop asks again and AgentAPI is asked to save while the
    copies are still being read, not once they are (a 100,000-message stop ran out of budget
    before that). Its debug events say so, in that order."""
    knobs = {"FAKE_AGENTAPI_STATUS_DELAYS": "1", "FAKE_AGENTAPI_MESSAGES_DELAY_S": "1.5"}
    async with agentapi_process(workspace, messages=8, **knobs) as (_proc, port):
        env = {
            **coder_env(coder),
            "ARG_AGENTAPI_PORT": str(port),
            "AGENTAPI_PERSIST_LOG_LEVEL": "debug",
        }
        result = await cli(workspace, "shutdown", env=env)
    assert result.code == 0, result.stdout + result.stderr
    assert "agentapi_save=confirmed_changed" in result.stdout
    logged = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    events = [entry["event"] for entry in logged]
    assert "shutdown.early_status" in events, result.stderr  # the late answer, given up on
    assert "shutdown.early_save" in events, result.stderr
    assert events.index("shutdown.early_save") < events.index("shutdown.fetch"), result.stderr
    assert len(read_agentapi_state(workspace.state_file, max_bytes=2**24).messages) == 8


async def test_shutdown_with_hung_coder_and_grace_3(workspace: Workspace) -> None:
    """A hung Coder server and --grace 3: non-zero exit within 3.5 s, state saved."""
    async with (
        FakeCoder(token=CANARY_TOKEN, task_ids={TASK_ID}, hang=True) as hung,
        agentapi_process(workspace, messages=40) as (_, port),
    ):
        result = await cli(
            workspace,
            "shutdown",
            "--grace",
            "3",
            env={**coder_env(hung), "ARG_AGENTAPI_PORT": str(port)},
        )
    assert result.code == 4, result.stdout + result.stderr
    assert result.seconds < 3.5
    assert "snapshot=timed_out" in result.stdout
    assert "40 messages durable" in result.stdout
    own = StateStore(workspace.state_dir).load().conversation
    assert own is not None
    assert len(own.messages) == 40


async def _shutdown_with_stderr_on_a_terminal(
    workspace: Workspace, env: dict[str, str], *args: str
) -> tuple[int, str, str]:
    """``shutdown`` with stderr on a pseudo-terminal (stdout a pipe): exit code, stdout, and
    everything the terminal received."""
    import pty

    controller, terminal = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentapi_persist", "shutdown", *args,
        stdout=asyncio.subprocess.PIPE, stderr=terminal,
        env=workspace.process_env(**env),
    )  # fmt: skip
    os.close(terminal)
    received = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the last writer closed the terminal
                return
            if not chunk:
                return
            received.extend(chunk)

    reader = asyncio.get_running_loop().run_in_executor(None, drain)
    assert proc.stdout is not None
    out = await proc.stdout.read()
    code = await proc.wait()
    await reader
    os.close(controller)
    return code, out.decode(), received.decode(errors="replace")


async def test_a_long_wait_is_said_on_a_terminal_and_only_there(workspace: Workspace) -> None:
    """A hung Coder server holds the upload: on a terminal, a line on stderr names what the
    stop waits for and the budget left, counting down, and is erased before the result;
    with stderr a pipe, nothing of it (what scripts read does not change)."""
    async with (
        FakeCoder(token=CANARY_TOKEN, task_ids={TASK_ID}, hang=True) as hung,
        agentapi_process(workspace, messages=4) as (_, port),
    ):
        env = {**coder_env(hung), "ARG_AGENTAPI_PORT": str(port)}
        code, out, terminal = await _shutdown_with_stderr_on_a_terminal(
            workspace, env, "--grace", "4"
        )
        piped = await cli(workspace, "shutdown", "--grace", "4", env=env)
    assert code == 4, out + terminal
    assert "snapshot=timed_out" in out
    lines = re.findall(r"waiting for ([^;]*); ([0-9.]+) s of the ([0-9.]+) s budget left", terminal)
    assert len(lines) >= 2, terminal
    assert {what for what, _, _ in lines} == {"the log snapshot upload to Coder"}
    left = [float(value) for _, value, _ in lines]
    assert left == sorted(left, reverse=True)  # counting down
    assert float(lines[0][2]) < 4
    assert terminal.rstrip().endswith("\x1b[K")  # the line erased before the exit
    assert piped.code == 4
    assert "waiting for" not in piped.stderr
    assert "\x1b" not in piped.stderr


async def test_old_agentapi_never_gets_sigusr1(workspace: Workspace, coder: FakeCoder) -> None:
    """AgentAPI 0.11 ignores SIGUSR1 and saves nothing on it: shutdown does not send it."""
    async with agentapi_process(workspace, messages=4, version="0.11.0") as (proc, port):
        result = await cli(
            workspace, "shutdown", env={**coder_env(coder), "ARG_AGENTAPI_PORT": str(port)}
        )
        await asyncio.sleep(0.1)
        assert proc.returncode is None
    assert result.code == 0, result.stdout + result.stderr
    assert "agentapi_save=skipped_old_version" in result.stdout


async def test_reused_pid_is_not_signalled(workspace: Workspace, coder: FakeCoder) -> None:
    """A pid file pointing at an unrelated process: nothing is signalled, the rest works."""
    sleeper = await asyncio.create_subprocess_exec("sleep", "30")
    try:
        workspace.pid_file.write_text(f"{sleeper.pid}\n")
        async with agentapi_process(workspace, messages=3) as (_, port):
            workspace.pid_file.write_text(f"{sleeper.pid}\n")  # the fake rewrote it
            result = await cli(
                workspace, "shutdown", env={**coder_env(coder), "ARG_AGENTAPI_PORT": str(port)}
            )
        assert result.code == 0, result.stdout + result.stderr
        assert "agentapi_save=skipped" in result.stdout
        assert sleeper.returncode is None
    finally:
        sleeper.kill()
        await sleeper.wait()


async def test_restore_repairs_a_truncated_state_file(workspace: Workspace) -> None:
    """restore rebuilds a truncated AgentAPI file from the sidecar copy and keeps the bad bytes."""
    full = Conversation(
        messages=tuple(make_messages(25)),
        initial_prompt="fix the bug",
        initial_prompt_sent=True,
        prompt_origin="agentapi_state",
    )
    StateStore(workspace.state_dir).save(full)
    from agentapi_persist.agentapi_state import render_agentapi_state

    good = render_agentapi_state(full)
    torn = good[: len(good) // 2]
    workspace.state_file.write_bytes(torn)
    result = await cli(workspace, "restore", "--json")
    assert result.code == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["outcome"] == "written"
    state = read_agentapi_state(workspace.state_file, max_bytes=2**24)
    assert len(state.messages) == 25
    assert state.initial_prompt == "fix the bug"
    assert state.initial_prompt_sent is True
    assert workspace.state_file.read_bytes() == good
    (kept,) = report["quarantined"]
    assert Path(kept).read_bytes() == torn


async def test_restore_refuses_while_agentapi_runs(workspace: Workspace) -> None:
    """AgentAPI owns its file while it runs: restore exits 6 and changes nothing."""
    async with agentapi_process(workspace, messages=2) as (_, port):
        before = workspace.state_file.read_bytes() if workspace.state_file.exists() else None
        result = await cli(workspace, "restore", env={"ARG_AGENTAPI_PORT": str(port)})
        after = workspace.state_file.read_bytes() if workspace.state_file.exists() else None
    assert result.code == 6
    assert "AgentAPI is running" in result.stderr
    assert before == after


async def test_snapshot_dry_run_of_box_drawing_tail(workspace: Workspace) -> None:
    """70,000 box-drawing characters still give a < 64 KiB snapshot ending in the real tail."""
    messages = make_messages(10)
    tail_text = "".join("─│┌┐└┘├┤┬┴┼"[i % 11] for i in range(70_000)) + "END"
    last = messages[-1].model_copy(update={"content": tail_text})
    StateStore(workspace.state_dir).save(Conversation(messages=(*messages[:-1], last)))
    result = await cli(
        workspace, "snapshot", "--dry-run", "--agentapi-url", f"http://127.0.0.1:{free_port()}"
    )
    assert result.code == 0, result.stderr
    payload = result.stdout.rstrip("\n").encode()
    assert len(payload) <= 65_536
    (kept,) = json.loads(payload)["messages"]
    assert kept["content"].endswith("END")
    assert tail_text.endswith(kept["content"].split("\n", 1)[1])


async def test_status_json_reports_facts_without_the_token(
    workspace: Workspace, coder: FakeCoder
) -> None:
    """status --json says what is stored and whether the snapshot is configured; no token."""
    StateStore(workspace.state_dir).save(Conversation(messages=tuple(make_messages(3))))
    result = await cli(
        workspace,
        "status",
        "--json",
        "--agentapi-url",
        f"http://127.0.0.1:{free_port()}",
        env=coder_env(coder),
    )
    facts = json.loads(result.stdout)
    assert facts["checkpoint"]["messages"] == 3
    assert facts["snapshot"]["token"] == "present"
    assert facts["agentapi"]["reachable"] is False
    assert facts["grace"]["grace_s"] == 10
    assert_no_token(result.stdout, result.stderr)


def _flag_in(flag: str, text: str) -> bool:
    """``flag`` as a whole flag (``--state-dir`` is not inside ``--state-persistence``)."""
    return re.search(re.escape(flag) + r"(?![\w-])", text) is not None


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_shows_the_settings_the_command_reads_grouped_with_examples(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each command's --help lists the settings it reads (with their variables and defaults)
    under their group, none that only other commands read, and examples of its own."""
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    text = " ".join(out.split())
    offered = [option for option in OPTIONS if command in option.commands]
    for option in OPTIONS:
        if option in offered:
            assert _flag_in(option.flag, text), option.flag
            for name in option.env:
                assert f"${name}" in text
        else:
            assert not _flag_in(option.flag, text), f"{command} --help offers {option.flag}"
    for group in {option.group for option in offered}:
        assert f"\n{group} settings:\n" in out
    examples = out.split("\nexamples:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(examples) >= 2
    assert all(
        line.strip().startswith(f"agentapi-persist {command}") or line.strip().startswith("kill")
        for line in examples
    )
    assert "exit codes:" in text
    assert "--stop-agentapi" not in text or command in ("run", "shutdown")


# Each bad command line, and what its one line must name.
BAD_ARGS = [
    (["shutdown", "--nope"], ["shutdown: unrecognized arguments: --nope", "shutdown --help"]),
    (["--bogus"], ["unrecognized arguments: --bogus", "agentapi-persist --help"]),
    (["-V"], ["unrecognized arguments: -V", "--version"]),
    ([], ["a command is required", "shutdown", "export"]),
    (["shutdown", "--grace", "abc"], ["shutdown: --grace: invalid float value: 'abc'"]),
    (["status", "--stop-agentapi"], ["--stop-agentapi is read by run, shutdown only"]),
    (["export", "--format", "pdf"], ["export: --format: invalid choice: 'pdf'"]),
    (["shutdown", "--grace", "nan"], ["--grace: Input should be a finite number"]),
    (["shutdown", "--grace", "-1"], ["--grace: Input should be greater than 0"]),
]


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
@pytest.mark.parametrize(
    ("argv", "names"), BAD_ARGS, ids=[" ".join(a) or "none" for a, _ in BAD_ARGS]
)
def test_every_usage_error_has_one_shape(
    argv: list[str],
    names: list[str],
    as_json: bool,
    workspace: Workspace,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bad flags, unknown commands and bad values alike: exit 2, one line on stderr naming
    the flag at fault (no usage block), and under --json one JSON object on stdout."""
    monkeypatch.setenv("HOME", str(workspace.home))
    code = main([*argv, *(["--json"] if as_json else [])])
    out, err = capsys.readouterr()
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("agentapi-persist: ")
    assert "usage:" not in err
    for name in names:
        assert name in lines[0]
    if as_json:
        result = json.loads(out)
        assert result == {
            "ok": False,
            "exit_code": 2,
            "error": lines[0].removeprefix("agentapi-persist: "),
        }
    else:
        assert out == ""


def test_a_task_id_given_as_a_flag_is_reported_as_the_flag() -> None:
    from agentapi_persist.config import Settings
    from agentapi_persist.errors import ConfigError

    env = {"HOME": "/home/u", "CODER_AGENT_URL": "http://c", "CODER_AGENT_TOKEN": "t"}
    flagged = Settings.load({"task_id": "not-a-uuid"}, env)
    with pytest.raises(ConfigError, match=r"\(--task-id\) is not a canonical UUID"):
        flagged.coder_target()
    from_env = Settings.load({}, {**env, "ARG_TASK_ID": "not-a-uuid"})
    with pytest.raises(ConfigError, match=r"\(ARG_TASK_ID\) is not a canonical UUID"):
        from_env.coder_target()


def test_bad_environment_is_a_usage_error(
    workspace: Workspace, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A malformed variable exits 2 and names it."""
    monkeypatch.setenv("HOME", str(workspace.home))
    monkeypatch.setenv("AGENTAPI_PERSIST_GRACE", "soon")
    assert main(["status"]) == 2
    assert "AGENTAPI_PERSIST_GRACE" in capsys.readouterr().err


def test_parser_has_every_command() -> None:
    """The parser offers every documented command, and no other."""
    parser = build_parser()
    commands = ("run", "shutdown", "restore", "status", "snapshot", "doctor", "export")
    for command in commands:
        assert parser.parse_args([command]).command == command
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert sorted(actions[0].choices) == sorted(commands)


async def test_wedged_sidecar_falls_back_to_doing_the_work(
    workspace: Workspace, coder: FakeCoder
) -> None:
    """A control socket that accepts but never answers must not cost the stop: the command
    notices within half a second and runs the sequence itself."""
    import socket

    from agentapi_persist.control_client import socket_address

    workspace.state_dir.mkdir(parents=True, mode=0o700)
    wedged = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with socket_address(workspace.state_dir / "control.sock") as address:
        wedged.bind(address)
    wedged.listen(8)  # accepts into the backlog, never reads or answers
    try:
        async with FakeAgentAPI(messages=make_messages(5)) as agent:
            result = await cli(
                workspace,
                "shutdown",
                env={**coder_env(coder), "AGENTAPI_PERSIST_AGENTAPI_URL": agent.url},
            )
    finally:
        wedged.close()
    assert result.code == 0, result.stdout + result.stderr
    assert "(via sidecar)" not in result.stdout
    assert "snapshot=delivered" in result.stdout


async def test_stop_during_agent_startup_then_restore(workspace: Workspace) -> None:
    """The fast twin of the real-binary scenario: AgentAPI restarted and its agent is still
    starting (only the start-up screen, its file not loaded yet). `shutdown` does not ask it
    to save; its own exit save writes the start-up screen with the prompt unsent; `restore`
    puts the conversation back with the prompt still sent."""
    async with agentapi_process(workspace, messages=6, AGENTAPI_INITIAL_PROMPT="build it") as (
        proc,
        port,
    ):
        first = await cli(workspace, "shutdown", env={"ARG_AGENTAPI_PORT": str(port)})
    assert first.code == 0, first.stdout + first.stderr
    full = read_agentapi_state(workspace.state_file, max_bytes=2**24)
    assert full.initial_prompt_sent is True
    async with agentapi_process(
        workspace, messages=0, FAKE_AGENTAPI_READY_AFTER_S="30", AGENTAPI_INITIAL_PROMPT="build it"
    ) as (proc, port):
        during = await cli(
            workspace, "shutdown", "--stop-agentapi", env={"ARG_AGENTAPI_PORT": str(port)}
        )
        await asyncio.wait_for(proc.wait(), 10)
    assert during.code == 0, during.stdout + during.stderr
    assert "agentapi_save=skipped_not_loaded" in during.stdout
    screen = read_agentapi_state(workspace.state_file, max_bytes=2**24)
    assert len(screen.messages) == 1
    assert screen.initial_prompt_sent is False
    restored = await cli(workspace, "restore")
    assert restored.code == 0, restored.stdout + restored.stderr
    again = read_agentapi_state(workspace.state_file, max_bytes=2**24)
    assert [m.message for m in again.messages] == [m.message for m in full.messages]
    assert again.initial_prompt_sent is True
