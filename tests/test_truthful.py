"""Truthful under faults: a misconfigured snapshot never stops persistence, a Coder server
without the snapshot route is a valid skip, and "nothing to save" only when nothing exists.

Real CLI and sidecar processes against loopback peers that answer as the real ones do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pytest

from agentapi_persist.testing.agentapi import FakeAgentAPI
from agentapi_persist.testing.coder import FakeCoder

from .cli_support import cli, run_cli
from .conftest import CANARY_TOKEN, TASK_ID, Workspace, make_messages
from .faults_support import tmpfs
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


def _as_a_uid_without_passwd_entry(argv: list[str]) -> tuple[int, str]:
    """``main(argv)`` in a forked child running as uid 12345 (no passwd entry) with HOME
    unset; the modules are imported first (that uid cannot read this checkout)."""
    import concurrent.futures.thread  # noqa: F401  # lazily imported by asyncio.to_thread
    import encodings.idna  # noqa: F401  # lazily imported by a connect to a host name

    import agentapi_persist.cli as cli_module
    import agentapi_persist.restoring  # noqa: F401  # imported lazily by the command

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            sys.stdout = sys.stderr = open(write, "w", closefd=False)  # noqa: SIM115
            os.environ.pop("HOME", None)
            os.setgroups([])
            os.setgid(12345)
            os.setuid(12345)
            code = cli_module.main(argv)
        except BaseException as exc:  # a traceback is what the test looks for
            import traceback

            traceback.print_exception(exc)
            code = 99
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    os.close(write)
    output = b""
    while chunk := os.read(read, 65536):
        output += chunk
    os.close(read)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to a uid with no passwd entry")
def test_no_home_and_no_passwd_entry() -> None:
    """HOME unset for a uid with no passwd entry: a clear error naming what to set, never a
    traceback; with every path given, the command works."""
    try:
        pwd.getpwuid(12345)
        pytest.skip("uid 12345 has a passwd entry here")
    except KeyError:
        pass
    code, output = _as_a_uid_without_passwd_entry(["status"])
    assert code == 2, output
    assert "HOME is not set and uid 12345 has no passwd entry" in output
    assert "Traceback" not in output
    shared = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's own temp root is root's alone
    try:
        shared.chmod(0o777)
        paths = [
            "--state-dir", str(shared / "state"),
            "--agentapi-state-file", str(shared / "agentapi-state.json"),
            "--agentapi-pid-file", str(shared / "agentapi.pid"),
        ]  # fmt: skip
        with dead_url() as dead:
            code, output = _as_a_uid_without_passwd_entry(
                ["restore", *paths, "--agentapi-url", dead]
            )
    finally:
        shutil.rmtree(shared)
    assert "Traceback" not in output, output
    assert code == 0, output
    assert "restore nothing" in output


@pytest.mark.parametrize("kind", ["directory", "regular file"])
async def test_whatever_is_at_the_socket_name_is_kept_and_the_sidecar_serves(
    workspace: Workspace, kind: str
) -> None:
    """A directory or a regular file where the control socket goes: moved aside (with what
    it holds) and logged, never deleted, never a traceback; the sidecar listens and answers
    `shutdown`."""
    if kind == "directory":
        (workspace.state_dir / "control.sock" / "inside").mkdir(parents=True)
    else:
        workspace.state_dir.mkdir(parents=True)
        (workspace.state_dir / "control.sock").write_text("someone's notes")
    async with FakeAgentAPI(messages=make_messages(3)) as agent:
        env = {"AGENTAPI_PERSIST_AGENTAPI_URL": agent.url}
        async with sidecar_process(workspace, env=env) as sidecar:
            assert sidecar.saw("control.moved_aside")
            run = await cli(workspace, "shutdown", env=env)
            assert run.code == 0, run.stdout + run.stderr
            assert "(via sidecar)" in run.stdout
            assert await sidecar.wait() == 0
    (aside,) = workspace.state_dir.glob("control.sock.not-a-socket-*")
    if kind == "directory":
        assert (aside / "inside").is_dir()
    else:
        assert aside.read_text() == "someone's notes"


async def test_a_state_dir_where_nothing_can_be_written_never_kills_the_sidecar(
    workspace: Workspace,
) -> None:
    """`run --state-dir /proc`: no lock, no socket, no copy can be made there. The sidecar
    says so, keeps following AgentAPI (retrying its checkpoint), and on SIGTERM reports the
    state not durable (exit 3) instead of dying at start with a traceback."""
    async with FakeAgentAPI(messages=make_messages(3)) as agent:
        env = {"AGENTAPI_PERSIST_AGENTAPI_URL": agent.url}
        async with sidecar_process(workspace, "--state-dir", "/proc", env=env) as sidecar:
            assert sidecar.saw("daemon.control_unavailable")
            await eventually(lambda: sidecar.saw("daemon.checkpoint_failed"))
            agent.add_message("user", "still followed")
            sidecar.proc.send_signal(signal.SIGTERM)
            assert await sidecar.wait() == 3
    assert not any("Traceback" in line for line in sidecar.other), sidecar.other
    stopped = [e for e in sidecar.events if e.get("event") == "daemon.stopped"]
    assert stopped
    assert stopped[0]["exit_code"] == 3


async def test_a_stream_that_sends_headers_and_then_nothing_is_bounded(
    workspace: Workspace,
) -> None:
    """AgentAPI's /events answers its headers and never its replay: within the replay bound
    the sidecar logs it, takes GET /messages as the truth (on disk), and reconnects later;
    once the stream works again it is followed as usual."""
    async with FakeAgentAPI(messages=make_messages(5)) as agent:
        agent.stall_events = True
        env = {"AGENTAPI_PERSIST_AGENTAPI_URL": agent.url}
        async with sidecar_process(workspace, env=env) as sidecar:
            await eventually(lambda: sidecar.saw("agentapi.replay_stalled"), within=8)
            await eventually(lambda: stored_count(workspace) == 5, within=3)
            agent.stall_events = False
            await eventually(lambda: sidecar.saw("agentapi.synced"), within=15)
            agent.add_message("user", "after the stall")
            await eventually(lambda: stored_count(workspace) == 6)
            sidecar.proc.send_signal(signal.SIGTERM)
            assert await sidecar.wait() == 0


async def test_status_is_not_ok_when_agentapi_or_the_disk_is_not(workspace: Workspace) -> None:
    """`status` with AgentAPI not answering, and with a state directory nothing can be
    written in (/proc): each says what needs attention (exit 8), never "verdict ok"."""
    with dead_url() as dead:
        run = await cli(workspace, "status", "--agentapi-url", dead)
    assert run.code == 8, run.stdout + run.stderr
    assert "AgentAPI is not answering" in run.stdout
    assert "verdict        ok" not in run.stdout
    async with FakeAgentAPI(messages=make_messages(2)) as agent:
        run = await cli(workspace, "status", "--agentapi-url", agent.url, "--state-dir", "/proc")
        assert run.code == 8, run.stdout + run.stderr
        assert "Nothing can be written in /proc" in run.stdout
        healthy = await cli(workspace, "status", "--agentapi-url", agent.url)
    assert healthy.code == 0, healthy.stdout + healthy.stderr


async def test_an_event_over_the_cap_is_said_once_and_never_a_hot_loop(
    workspace: Workspace,
) -> None:
    """A message over the body cap (here 64 KiB, to keep the test small): the sidecar warns
    once and tries the stream again only after a long pause (each try replays the same
    message): over 4 s, at most two stream requests, not one every backoff step."""
    async with FakeAgentAPI(messages=[("user", "hi"), ("agent", "y" * 100_000)]) as agent:
        env = {"AGENTAPI_PERSIST_AGENTAPI_URL": agent.url}
        async with sidecar_process(workspace, "--max-body-bytes", "65536", env=env) as sidecar:
            await eventually(lambda: sidecar.saw("agentapi.event_too_large"), within=5)
            await asyncio.sleep(4)
            streams = [r for r in agent.requests if r.path == "/events"]
            warnings = [e for e in sidecar.events if e["event"] == "agentapi.event_too_large"]
            sidecar.proc.send_signal(signal.SIGTERM)
            await sidecar.wait()
    assert len(streams) <= 2, len(streams)
    assert len(warnings) == 1


@pytest.mark.faults
async def test_no_free_inodes_at_start_never_kills_the_sidecar(
    workspace: Workspace, tmp_path: Path
) -> None:
    """A real tmpfs with every inode used (nr_inodes=8): no lock file, no socket, no copy
    can be made. The sidecar starts anyway, says why, follows AgentAPI, and its stop reports
    the state not durable (exit 3), with no traceback."""
    with tmpfs(tmp_path / "full", size="1m,nr_inodes=8") as full:
        (full / "state").mkdir()
        for n in range(16):
            with contextlib.suppress(OSError):
                (full / f"filler-{n}").touch()
        async with FakeAgentAPI(messages=make_messages(3)) as agent:
            env = {"AGENTAPI_PERSIST_AGENTAPI_URL": agent.url}
            async with sidecar_process(
                workspace, "--state-dir", str(full / "state"), env=env
            ) as sidecar:
                assert sidecar.saw("daemon.control_unavailable")
                await eventually(lambda: sidecar.saw("daemon.checkpoint_failed"))
                sidecar.proc.send_signal(signal.SIGTERM)
                assert await sidecar.wait() == 3
    assert not any("Traceback" in line for line in sidecar.other), sidecar.other
    failed = [e for e in sidecar.events if e.get("event") == "daemon.checkpoint_failed"]
    assert "No space left on device" in failed[0]["error"]


async def test_a_relative_xdg_state_home_is_ignored(workspace: Workspace, tmp_path: Path) -> None:
    """`XDG_STATE_HOME=state` (relative, invalid by the XDG spec): the sidecar started in one
    directory and the stop script run from another find the same state directory, so the
    stop reaches the sidecar; nothing is written under either working directory."""
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    async with FakeAgentAPI(messages=make_messages(4)) as agent:
        env = {"AGENTAPI_PERSIST_AGENTAPI_URL": agent.url, "XDG_STATE_HOME": "state"}
        async with sidecar_process(workspace, command=("env", "-C", str(here)), env=env) as side:
            await eventually(lambda: stored_count(workspace) == 4)
            run = await run_cli(
                workspace.process_env(**env), "shutdown", prefix=["env", "-C", str(there)]
            )
            assert run.code == 0, run.stdout + run.stderr
            assert "(via sidecar)" in run.stdout
            assert await side.wait() == 0
    assert not (here / "state").exists()
    assert not (there / "state").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the stop as another uid")
@pytest.mark.parametrize(
    ("mode", "held", "kept"),
    [
        (0o700, 8, "the copy in {dir} could not be read and was left as it was; "),
        (0o755, 0, "no earlier copy exists in {dir}; "),
        (0o755, 8, "previous copy intact in {dir} (8 messages); "),
    ],
    ids=["unreadable copy", "no copy ever", "readable copy"],
)
def test_a_stop_that_cannot_write_says_only_what_it_knows_was_kept(
    mode: int, held: int, kept: str
) -> None:
    """A uid that may not write the state directory: the line says exactly what is safe.
    A copy it cannot read is not "0 messages", and a copy that never existed is not
    "intact" (both were said before)."""
    from agentapi_persist.agentapi_state import render_agentapi_state
    from agentapi_persist.models import Conversation
    from agentapi_persist.store import StateStore

    shared = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's own temp root is root's alone
    try:
        shared.chmod(0o755)
        state_dir = shared / "state"
        state_dir.mkdir(mode=0o755)
        if held:
            StateStore(state_dir).save(Conversation(messages=tuple(make_messages(held))))
            for path in state_dir.iterdir():
                path.chmod(0o644)
        state_dir.chmod(mode)
        agentapi_file = shared / "agentapi-state.json"
        agentapi_file.write_bytes(
            render_agentapi_state(Conversation(messages=tuple(make_messages(9))))
        )
        agentapi_file.chmod(0o644)
        before = sorted(p.name for p in state_dir.iterdir())
        paths = [
            "--state-dir", str(state_dir),
            "--agentapi-state-file", str(agentapi_file),
            "--agentapi-pid-file", str(shared / "agentapi.pid"),
        ]  # fmt: skip
        with dead_url() as dead:
            code, output = _as_a_uid_without_passwd_entry(
                ["shutdown", *paths, "--agentapi-url", dead, "--grace", "5"]
            )
        assert sorted(p.name for p in state_dir.iterdir()) == before
    finally:
        shutil.rmtree(shared)
    assert "Traceback" not in output, output
    assert code == 3, output
    expected = kept.format(dir=state_dir) + "the newest changes (9 messages) were not saved"
    assert f"kept: {expected}" in output, output


@pytest.mark.parametrize("command", ["status", "restore", "export"])
async def test_a_file_given_as_the_state_directory_is_a_bad_setting(
    workspace: Workspace, tmp_path: Path, command: str
) -> None:
    """A file where the state directory should be: exit 2 (a setting to fix), one sentence
    that names it and says nothing was read or written there; the file is left as it is
    (it was exit 1, "cannot list ...: Not a directory")."""
    file = tmp_path / "a-file"
    file.write_text("not a directory")
    with dead_url() as dead:
        run = await cli(
            workspace, command, "--state-dir", str(file),
            env={"AGENTAPI_PERSIST_AGENTAPI_URL": dead},
        )  # fmt: skip
    assert run.code == 2, run.stdout + run.stderr
    assert f"the state directory {file} is a file, not a directory" in run.stderr
    assert "nothing was read or written there" in run.stderr
    assert "Traceback" not in run.stderr
    assert file.read_text() == "not a directory"
