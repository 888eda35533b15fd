"""The AgentAPI process: real processes (the fake ``agentapi`` program, ``sleep``), real pid
files, real signals, a real state file."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import structlog

from agentapi_persist._http import make_session
from agentapi_persist.agent_process import (
    MIN_SIGUSR1_VERSION,
    AgentProcess,
    StopOutcome,
    Version,
    _poll_exit,
    detect_version,
    find_agentapi,
    is_alive,
    stop,
)
from agentapi_persist.agentapi import AgentAPIClient
from agentapi_persist.agentapi_save import (
    SaveConfirmation,
    SaveOutcome,
    persistence_enabled,
    request_save,
)
from agentapi_persist.agentapi_state import read_agentapi_state
from agentapi_persist.budget import Budget
from agentapi_persist.models import Message
from agentapi_persist.testing.agentapi_program import (
    run_fake_agentapi_process,
    write_agentapi_script,
)
from agentapi_persist.testing.server import free_port

SLACK_S = 1.0
SEED = [
    {"role": "user", "content": "fix the build"},
    {"role": "agent", "content": "Done ┌─┐ ✓ <ok> & more"},
    {"role": "user", "content": "thanks"},
]


@dataclass
class Running:
    """One fake AgentAPI process started by a test."""

    process: asyncio.subprocess.Process
    script: Path
    pid_file: Path
    state_file: Path
    port: int

    @property
    def url(self) -> str:
        return f"http://localhost:{self.port}"

    def found(self) -> AgentProcess:
        process, reason = find_agentapi(self.pid_file)
        assert process is not None, reason
        return process

    async def exited_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self.process.wait(), seconds)
        except TimeoutError:
            return False
        return True


Spawn = Callable[..., Awaitable[Running]]


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawn]:
    """Start ``agentapi server`` (the fake, as a real process); every one is killed after."""
    async with AsyncExitStack() as stack:
        count = 0

        async def start(
            *,
            version: str = "0.12.1",
            seed: list[dict[str, str]] | None = None,
            env: dict[str, str] | None = None,
        ) -> Running:
            nonlocal count
            count += 1
            home = tmp_path / f"agent{count}"
            script = write_agentapi_script(home / "bin", version=version)
            pid_file, state_file = home / "agentapi.pid", home / "agentapi-state.json"
            full_env = {"AGENTAPI_STATE_FILE": str(state_file), **(env or {})}
            if seed is not None:
                seed_file = home / "seed.json"
                seed_file.write_text(json.dumps(seed))
                full_env["FAKE_AGENTAPI_SEED"] = str(seed_file)
            port = free_port()
            process = await stack.enter_async_context(
                run_fake_agentapi_process(script, port=port, pid_file=pid_file, env=full_env)
            )
            return Running(process, script, pid_file, state_file, port)

        yield start


def started(process: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    """Wait until the exec has finished: Popen returns while the kernel is still installing
    the new command line, and /proc/<pid>/cmdline reads empty for that instant."""
    deadline = time.monotonic() + 10
    while not Path(f"/proc/{process.pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline
        time.sleep(0.001)
    return process


@pytest.fixture
def unrelated(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process that is not AgentAPI (``sleep 30``), as a reused pid would be."""
    process = started(subprocess.Popen(["sleep", "30"]))
    try:
        yield process
    finally:
        process.kill()
        process.wait()


@pytest.fixture
def named_agentapi() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start Python under argv[0] ``agentapi`` (sleeping, with ``server`` in its arguments)."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(*args: str, **kwargs) -> subprocess.Popen[bytes]:
        argv = ["agentapi", "-c", "import time; time.sleep(30)", "server", *args]
        process = subprocess.Popen(argv, executable=sys.executable, **kwargs)
        processes.append(process)
        return started(process)

    try:
        yield start
    finally:
        for process in processes:
            process.kill()
            process.wait()


def still_running(process: subprocess.Popen[bytes], *, for_s: float = 0.2) -> bool:
    """True if ``process`` survives ``for_s`` seconds (a signal would have killed it)."""
    try:
        process.wait(timeout=for_s)
    except subprocess.TimeoutExpired:
        return True
    return False


async def fetch_messages(running: Running) -> tuple[Message, ...]:
    async with make_session() as session:
        client = AgentAPIClient(running.url, session=session)
        return await client.messages(budget=Budget(5))


# -- finding it ------------------------------------------------------------------------------


async def test_find_agentapi_finds_the_running_process(spawn):
    """The pid file names a live ``agentapi server``: identified, with its script and state."""
    running = await spawn()
    process, reason = find_agentapi(running.pid_file)
    assert process is not None, reason
    assert process.pid == running.process.pid
    assert "server" in process.argv
    assert process.program == running.script  # an interpreter running a script named agentapi
    assert process.state_file == running.state_file
    assert process.save_state is None
    assert process.start_ticks is not None
    assert is_alive(process)
    assert "is AgentAPI" in reason


async def test_unrelated_process_in_pid_file_is_not_agentapi_and_not_signalled(tmp_path, unrelated):
    """A reused pid (here ``sleep 30``) is refused with a reason, and never signalled."""
    pid_file = tmp_path / "agentapi.pid"
    pid_file.write_text(f"{unrelated.pid}\n")
    with structlog.testing.capture_logs() as logs:
        process, reason = find_agentapi(pid_file)
    assert process is None
    assert f"pid {unrelated.pid} from {pid_file} is `sleep 30`, not AgentAPI" in reason
    assert "not signalling" in reason
    assert [e["event"] for e in logs] == ["agentapi.not_ours"]
    assert still_running(unrelated)


async def test_stale_record_of_a_reused_pid_is_not_signalled(unrelated):
    """A record of an AgentAPI whose pid now runs something else: no SIGUSR1, no SIGTERM."""
    stale = AgentProcess(
        pid=unrelated.pid,
        argv=("agentapi", "server"),
        program=None,
        state_file=None,
        save_state=None,
    )
    saved = await request_save(
        stale,
        state_file=Path("/nonexistent"),
        expected=(),
        budget=Budget(2),
        version=Version(0, 12, 1),
    )
    stopped = await stop(stale, budget=Budget(2))
    assert (saved.outcome, saved.signalled) == (SaveOutcome.SKIPPED_NOT_OURS, False)
    assert (stopped.outcome, stopped.signalled) == (StopOutcome.NOT_OURS, False)
    assert "pid reused" in stopped.detail
    assert still_running(unrelated)


async def test_restarted_agentapi_on_the_same_pid_is_not_mistaken(unrelated):
    """Same pid and command line but a different start time: another process, not signalled."""
    real = AgentProcess(
        pid=unrelated.pid,
        argv=("sleep", "30"),
        program=None,
        state_file=None,
        save_state=None,
        start_ticks=None,
    )
    assert is_alive(real)
    earlier = replace(real, start_ticks=1)
    assert not is_alive(earlier)
    assert (await stop(earlier, budget=Budget(1))).outcome == StopOutcome.NOT_OURS
    assert still_running(unrelated)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "no pid file at"),
        (b"", "does not hold a pid (empty)"),
        (b"abc\n", "does not hold a pid"),
        (b"-5\n", "does not hold a pid"),
        (b"12 34\n", "does not hold a pid"),
        (b"1.5\n", "does not hold a pid"),
        (b"\xff\xfe", "does not hold a pid"),
        (b"7" * 100, "does not hold a pid"),
        (b"0\n", "not a valid pid"),
        (b"99999999999\n", "not a valid pid"),
        (b"1\n", "not AgentAPI"),  # pid 1 is only AgentAPI if its command line says so
    ],
)
def test_pid_file_garbage(tmp_path, content, reason):
    """Missing, empty, garbage, out-of-range: ``None`` with a reason, nothing signalled."""
    pid_file = tmp_path / "agentapi.pid"
    if content is not None:
        pid_file.write_bytes(content)
    process, why = find_agentapi(pid_file)
    assert process is None
    assert reason in why


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_pid_file_that_is_not_a_file(tmp_path, kind):
    """A FIFO (which would block a plain read) or a directory: refused at once."""
    pid_file = tmp_path / "agentapi.pid"
    if kind == "fifo":
        os.mkfifo(pid_file)
    else:
        pid_file.mkdir()
    process, reason = find_agentapi(pid_file)
    assert process is None
    assert "not a regular file" in reason


def test_pid_file_of_a_dead_process(tmp_path):
    """A pid that no longer runs: the pid file is stale."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    pid_file = tmp_path / "agentapi.pid"
    pid_file.write_text(f"{dead.pid}\n")
    process, reason = find_agentapi(pid_file)
    assert process is None
    assert "is not running (stale pid file)" in reason


@pytest.mark.parametrize("form", ["{pid}", "  {pid}  \n", "{pid}\r\n", "\n{pid}\n\n"])
async def test_pid_file_whitespace_is_tolerated(spawn, form):
    """No newline, padding, CRLF: still the pid."""
    running = await spawn()
    running.pid_file.write_text(form.format(pid=running.process.pid))
    assert running.found().pid == running.process.pid


async def test_agentapi_as_argv0_uses_proc_exe_and_reads_its_environment(tmp_path, named_agentapi):
    """argv[0] named agentapi: ``program`` is /proc/<pid>/exe; the state file comes from its
    environment, relative to its working directory; saving switched off is seen."""
    process = named_agentapi(
        "--port",
        "1",
        cwd=tmp_path,
        env={**os.environ, "AGENTAPI_STATE_FILE": "state/a.json", "AGENTAPI_SAVE_STATE": "0"},
    )
    pid_file = tmp_path / "agentapi.pid"
    pid_file.write_text(f"{process.pid}\n")
    found, reason = find_agentapi(pid_file)
    assert found is not None, reason
    assert found.program == Path(f"/proc/{process.pid}/exe")
    assert found.state_file == tmp_path / "state" / "a.json"
    assert found.save_state is False
    assert not persistence_enabled(found, setting=None, state_file_explicit=True)
    # /proc/<pid>/exe is the Python interpreter here, which prints "Python 3.x": not a
    # version of AgentAPI, so the fallback binary is asked instead.
    fallback = write_agentapi_script(tmp_path / "bin", version="0.12.7")
    version = await detect_version(found, fallback_bin=str(fallback), budget=Budget(5))
    assert version == Version(0, 12, 7)


def test_state_file_flag_wins_over_environment(tmp_path, named_agentapi):
    """``--state-file`` / ``--save-state`` on AgentAPI's command line beat its environment;
    what follows ``--`` belongs to the agent, not to AgentAPI."""
    process = named_agentapi(
        "--state-file=/data/flag.json",
        "--save-state",
        "--",
        "claude",
        "--state-file",
        "/not/ours.json",
        env={**os.environ, "AGENTAPI_STATE_FILE": "/data/env.json", "AGENTAPI_SAVE_STATE": "0"},
    )
    pid_file = tmp_path / "agentapi.pid"
    pid_file.write_text(str(process.pid))
    found = find_agentapi(pid_file)[0]
    assert found is not None
    assert (found.state_file, found.save_state) == (Path("/data/flag.json"), True)


# -- version ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.12.1", "0.11.0"])
async def test_detect_version_from_the_running_binary(spawn, version):
    """The process's own program answers ``--version``; the fallback is not needed."""
    running = await spawn(version=version)
    detected = await detect_version(
        running.found(), fallback_bin="/nonexistent/agentapi", budget=Budget(5)
    )
    assert detected == Version.parse(version)


async def test_detect_version_falls_back_to_the_configured_binary(tmp_path):
    """No process known: the configured binary answers."""
    script = write_agentapi_script(tmp_path, version="0.12.3")
    assert await detect_version(None, fallback_bin=str(script), budget=Budget(5)) == Version(
        0, 12, 3
    )


@pytest.mark.parametrize(
    "body",
    [
        "exit 3",  # prints nothing
        "echo 'Python 3.11.7'",  # something else's version
        "echo 'agentapi version banana'",
    ],
)
async def test_detect_version_unknown(tmp_path, body):
    """A binary that does not print ``agentapi version X.Y.Z`` gives no version."""
    script = tmp_path / "agentapi"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    assert await detect_version(None, fallback_bin=str(script), budget=Budget(5)) is None


async def test_detect_version_missing_binary():
    """Nothing to run: unknown, quickly."""
    assert (
        await detect_version(None, fallback_bin="/nonexistent/agentapi", budget=Budget(5)) is None
    )


async def test_detect_version_kills_a_hanging_binary_at_its_cap(tmp_path):
    """A ``--version`` that never returns is killed at the cap; the budget survives."""
    script = tmp_path / "agentapi"
    marker = tmp_path / "pid"
    script.write_text(f"#!/bin/sh\necho $$ > {marker}\nexec sleep 30\n")
    script.chmod(0o755)
    started = time.monotonic()
    version = await detect_version(None, fallback_bin=str(script), budget=Budget(10), cap_s=0.3)
    assert version is None
    assert time.monotonic() - started < 0.3 + SLACK_S
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(int(marker.read_text()), 0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("agentapi version 0.12.1", Version(0, 12, 1)),
        ("agentapi version 0.12.1\n", Version(0, 12, 1)),
        ("agentapi version v0.13.0", Version(0, 13, 0)),
        ("v0.12.1", Version(0, 12, 1)),
        ("0.12.1", Version(0, 12, 1)),
        ("agentapi version 0.12.0-rc.1", Version(0, 12, 0, "rc.1")),
        ("agentapi version 1.2.3+build.5", Version(1, 2, 3)),
        ("Python 3.11.7", None),
        ("agentapi version 0.12", None),
        ("agentapi version 0.12.1.4", None),
        ("", None),
    ],
)
def test_version_parse(text, expected):
    """The version line, a bare version, a ``v`` prefix, pre-release and build suffixes."""
    assert Version.parse(text) == expected


def test_version_ordering_and_the_sigusr1_gate():
    """0.12.0 is the first safe version; its pre-releases are not trusted."""
    assert Version(0, 11, 9) < MIN_SIGUSR1_VERSION <= Version(0, 12, 0) < Version(0, 12, 1)
    assert Version(0, 12, 0, "rc.1") < MIN_SIGUSR1_VERSION
    assert Version(1, 0, 0) > Version(0, 99, 99)
    assert sorted([Version(0, 12, 0), Version(0, 12, 0, "rc.2"), Version(0, 12, 0, "rc.1")]) == [
        Version(0, 12, 0, "rc.1"),
        Version(0, 12, 0, "rc.2"),
        Version(0, 12, 0),
    ]
    assert str(Version(0, 12, 0, "rc.1")) == "0.12.0-rc.1"


@pytest.mark.parametrize(
    ("setting", "state_file", "save_state", "known", "explicit", "expected"),
    [
        (True, None, False, True, False, False),  # it saves nothing: no wait, whatever we say
        (True, Path("/s.json"), False, True, True, False),
        (True, None, None, True, True, False),  # it has no state file to save into
        (True, Path("/s.json"), None, True, False, True),  # the setting
        (False, Path("/s.json"), True, True, True, False),
        (None, Path("/s.json"), None, True, False, True),  # its environment has a state file
        (None, Path("/s.json"), True, True, False, True),
        (None, Path("/s.json"), False, True, True, False),  # saving off: it would not save
        (True, None, None, False, False, True),  # environment unreadable: the setting
        (None, None, None, False, True, True),  # environment unreadable: our explicit file
        (None, None, None, False, False, False),
    ],
)
def test_persistence_enabled(setting, state_file, save_state, known, explicit, expected):
    """AgentAPI's own configuration where known, then the setting, then its state file, then
    whether a state file was configured."""
    process = AgentProcess(
        pid=1,
        argv=("agentapi", "server"),
        program=None,
        state_file=state_file,
        save_state=save_state,
        configuration_known=known,
    )
    assert persistence_enabled(process, setting=setting, state_file_explicit=explicit) is expected


# -- the version gate and the save ----------------------------------------------------------


async def test_old_version_is_never_sent_sigusr1(spawn):
    """0.11.0: the save is skipped and AgentAPI lives on."""
    running = await spawn(version="0.11.0", seed=SEED)
    process = running.found()
    version = await detect_version(process, fallback_bin="agentapi", budget=Budget(5))
    assert version == Version(0, 11, 0)
    result = await request_save(
        process, state_file=running.state_file, expected=(), budget=Budget(2), version=version
    )
    assert (result.outcome, result.signalled) == (SaveOutcome.SKIPPED_OLD_VERSION, False)
    assert "ignores SIGUSR1" in result.detail
    assert not await running.exited_within(0.3)
    assert is_alive(process)


async def test_unknown_version_is_never_sent_sigusr1(spawn):
    """Version unknown counts as "too old": no signal, AgentAPI lives on."""
    running = await spawn(version="0.11.0")
    process = running.found()
    result = await request_save(
        process, state_file=running.state_file, expected=(), budget=Budget(2), version=None
    )
    assert (result.outcome, result.signalled) == (SaveOutcome.SKIPPED_VERSION_UNKNOWN, False)
    assert not await running.exited_within(0.3)


async def test_save_is_confirmed_changed_then_unchanged(spawn):
    """0.12.1: SIGUSR1 makes it save; the file then holds every message. Asked again with no
    change, AgentAPI skips the save and the file is confirmed to hold everything already."""
    running = await spawn(seed=SEED)
    process = running.found()
    expected = await fetch_messages(running)
    assert not running.state_file.exists()

    first = await request_save(
        process,
        state_file=running.state_file,
        expected=expected,
        budget=Budget(5),
        version=Version(0, 12, 1),
    )
    assert (first.outcome, first.signalled, first.messages_in_file) == (
        SaveOutcome.CONFIRMED_CHANGED,
        True,
        3,
    )
    state = read_agentapi_state(running.state_file, max_bytes=2**20)
    assert [(m.id, m.role, m.message) for m in state.messages] == [
        (m.id, m.role, m.content) for m in expected
    ]
    raw = running.state_file.read_bytes()
    assert raw.endswith(b"}\n")
    assert b", " not in raw  # compact
    assert b"\\u003cok\\u003e" in raw  # Go's HTML-safe escaping
    assert not running.state_file.with_name("agentapi-state.json.tmp").exists()
    inode = running.state_file.stat().st_ino

    second = await request_save(
        process,
        state_file=running.state_file,
        expected=expected,
        budget=Budget(5),
        version=Version(0, 12, 1),
    )
    assert second.outcome == SaveOutcome.CONFIRMED_UNCHANGED
    assert second.confirmed
    assert running.state_file.stat().st_ino == inode  # AgentAPI did not rewrite it
    assert is_alive(process)

    async with (
        make_session() as session,
        session.post(running.url + "/message", json={"content": "more", "type": "user"}) as reply,
    ):
        assert reply.status == 200
    third = await request_save(
        process,
        state_file=running.state_file,
        expected=await fetch_messages(running),
        budget=Budget(5),
        version=Version(0, 12, 1),
    )
    # The change reached a new file and the product confirmed it. Usually by this signal's
    # save (changed); on a loaded machine the fake may still have been handling the second
    # signal when "more" arrived, and that save already wrote it (unchanged, as truly as it
    # gets: the file held all five when asked). Both are a saved, confirmed change.
    assert third.confirmed, third
    assert third.messages_in_file == 5
    assert running.state_file.stat().st_ino != inode
    if third.outcome is SaveOutcome.CONFIRMED_UNCHANGED:
        assert third.signalled


async def test_slow_save_is_not_confirmed_within_the_budget(spawn):
    """AgentAPI takes longer to save than we have: ``not_confirmed``, on time, saying why."""
    running = await spawn(seed=SEED, env={"FAKE_AGENTAPI_SAVE_DELAY_S": "30"})
    process = running.found()
    started = time.monotonic()
    result = await request_save(
        process,
        state_file=running.state_file,
        expected=await fetch_messages(running),
        budget=Budget(0.5),
        version=Version(0, 12, 1),
    )
    assert time.monotonic() - started < 0.5 + SLACK_S
    assert (result.outcome, result.signalled) == (SaveOutcome.NOT_CONFIRMED, True)
    assert "is absent" in result.detail
    assert "expected 3 messages" in result.detail
    assert not result.confirmed


async def test_save_to_a_process_that_exited(spawn):
    """The process is gone by the time we ask: ``process_gone``, nothing signalled."""
    running = await spawn()
    process = running.found()
    running.process.kill()
    await running.process.wait()
    result = await request_save(
        process,
        state_file=running.state_file,
        expected=(),
        budget=Budget(2),
        version=Version(0, 12, 1),
    )
    assert (result.outcome, result.signalled) == (SaveOutcome.PROCESS_GONE, False)


async def test_save_with_no_budget_left_sends_nothing(spawn):
    """A spent budget: the request is skipped before any signal."""
    running = await spawn(seed=SEED)
    result = await request_save(
        running.found(),
        state_file=running.state_file,
        expected=(),
        budget=Budget(0),
        version=Version(0, 12, 1),
    )
    assert result.outcome == SaveOutcome.SKIPPED_NO_BUDGET
    assert not running.state_file.exists()


# -- stopping it -----------------------------------------------------------------------------


async def test_stop_exits_and_the_state_is_saved_on_sigterm(spawn):
    """SIGTERM: AgentAPI saves its state and exits 0; ``stop`` sees it go."""
    running = await spawn(seed=SEED)
    process = running.found()
    result = await stop(process, budget=Budget(10))
    assert (result.outcome, result.signalled, result.stopped) == (StopOutcome.EXITED, True, True)
    assert await running.exited_within(5)
    assert running.process.returncode == 0
    state = read_agentapi_state(running.state_file, max_bytes=2**20)
    assert [m.message for m in state.messages] == [item["content"] for item in SEED]
    assert not is_alive(process)
    again = await stop(process, budget=Budget(1))
    assert (again.outcome, again.signalled) == (StopOutcome.NOT_RUNNING, False)


async def test_stop_gives_up_on_a_process_that_ignores_sigterm(spawn):
    """SIGTERM ignored: ``still_running`` once the budget is spent, and no harsher signal."""
    running = await spawn(env={"FAKE_AGENTAPI_IGNORE_SIGTERM": "1"})
    process = running.found()
    started = time.monotonic()
    result = await stop(process, budget=Budget(0.5))
    assert time.monotonic() - started < 0.5 + SLACK_S
    assert (result.outcome, result.stopped) == (StopOutcome.STILL_RUNNING, False)
    assert is_alive(process)
    assert running.process.returncode is None


async def test_poll_fallback_sees_the_exit_of_a_real_process(unrelated):
    """Without a pidfd the wait polls ``/proc``: it notices an exit (zombie included)."""
    record = AgentProcess(
        pid=unrelated.pid, argv=("sleep", "30"), program=None, state_file=None, save_state=None
    )
    assert not await _poll_exit(record, 0.1)
    unrelated.terminate()
    assert await _poll_exit(record, 5)


async def test_a_file_unchanged_since_it_agreed_with_the_copy_is_confirmed_unparsed(
    spawn, tmp_path
):
    """AgentAPI saved (the copy and the file agree, recorded with the messages' digest), then
    had nothing new: asked again, the file still at the recorded version is confirmed to
    hold every message from the record alone. A digest of other messages, or no record,
    reads the file as before."""
    from agentapi_persist.file_mark import remember

    running = await spawn(seed=SEED)
    process = running.found()
    expected = await fetch_messages(running)
    state_dir = tmp_path / "state"
    state_dir.mkdir()

    async def ask(messages: Sequence[Message], budget_s: float = 5.0) -> SaveConfirmation:
        return await request_save(
            process,
            state_file=running.state_file,
            expected=messages,
            budget=Budget(budget_s),
            version=Version(0, 12, 1),
            state_dir=state_dir,
        )

    first = await ask(expected)
    assert first.outcome == SaveOutcome.CONFIRMED_CHANGED
    remember(state_dir, running.state_file, expected)

    agreed = await ask(expected)
    assert agreed.outcome == SaveOutcome.CONFIRMED_UNCHANGED
    assert "last agreed with the sidecar copy" in agreed.detail
    assert agreed.state is None  # nothing was parsed

    other = [m.model_copy(update={"content": m.content + "!"}) for m in expected]
    differs = await ask(other, 0.5)  # the digest does not match: the file is read, and lacks them
    assert differs.outcome == SaveOutcome.NOT_CONFIRMED

    (state_dir / "agentapi-file.json").unlink()
    unrecorded = await ask(expected)
    assert unrecorded.outcome == SaveOutcome.CONFIRMED_UNCHANGED
    assert unrecorded.state is not None  # read and parsed
