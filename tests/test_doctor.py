"""``agentapi-persist doctor``: each check's ok, warn and fail paths against real things.

Filesystems are real mounts (tmpfs, overlay, a read-only bind mount; root is needed, and a
test skips with the reason when the mount is refused); AgentAPI is ``FakeAgentAPI`` or the
fake AgentAPI process with its pid file and state file; Coder is ``FakeCoder``. The slow
paths of the timing rehearsal come from ``strace`` delaying every ``fsync``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentapi_persist.agent_process import find_agentapi
from agentapi_persist.cli import build_parser
from agentapi_persist.config import Settings
from agentapi_persist.doctor import (
    PROBE_BODY,
    Verdict,
    check_agentapi_http,
    check_coder_config,
    check_coder_endpoint,
    check_filesystem,
    check_grace,
    check_persistence,
    check_pid_file,
    check_shutdown_timing,
    check_sidecar,
    check_space,
    check_version,
    check_writable,
    detect_runtime,
    run_doctor,
)
from agentapi_persist.models import Conversation
from agentapi_persist.store import StateStore
from agentapi_persist.testing.agentapi import FakeAgentAPI
from agentapi_persist.testing.agentapi_program import write_agentapi_script
from agentapi_persist.testing.coder import FakeCoder
from agentapi_persist.testing.server import free_port

from .cli_support import cli, run_cli
from .conftest import CANARY_TOKEN, TASK_ID, Workspace, coder_env, make_messages
from .test_cli import agentapi_process, assert_no_token
from .test_daemon import sidecar

STRACE = shutil.which("strace")
VOLATILE = {"tmpfs", "ramfs", "devtmpfs", "overlay", "aufs", "rootfs"}
#: Every check, in the order doctor runs them.
NAMES = [
    "state_dir.filesystem",
    "state_dir.writable",
    "state_dir.space",
    "agentapi_state_file.filesystem",
    "agentapi.pid_file",
    "agentapi.reachable",
    "agentapi.version",
    "agentapi.persistence",
    "sidecar",
    "coder.config",
    "coder.endpoint",
    "replica",
    "grace",
    "shutdown.timing",
]


class Mounts:
    """Real mounts under a test's temp dir, all unmounted at teardown."""

    def __init__(self) -> None:
        self.points: list[Path] = []

    def _mount(self, target: Path, *args: str) -> Path:
        target.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", *args, str(target)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount here ({done.stderr.strip() or done.returncode})")
        self.points.append(target)
        return target

    def tmpfs(self, target: Path, *, size: str = "4m", read_only: bool = False) -> Path:
        options = f"size={size}" + (",ro" if read_only else "")
        return self._mount(target, "-t", "tmpfs", "-o", options, "tmpfs")

    def overlay(self, target: Path, scratch: Path) -> Path:
        for part in ("lower", "upper", "work"):
            (scratch / part).mkdir(parents=True)
        options = (
            f"lowerdir={scratch / 'lower'},upperdir={scratch / 'upper'},workdir={scratch / 'work'}"
        )
        return self._mount(target, "-t", "overlay", "-o", options, "overlay")

    def read_only_bind(self, source: Path, target: Path) -> Path:
        source.mkdir(parents=True, exist_ok=True)
        self._mount(target, "--bind", str(source))
        done = subprocess.run(
            ["mount", "-o", "remount,bind,ro", str(target)], capture_output=True, check=False
        )
        if done.returncode != 0:
            pytest.skip("cannot remount the bind mount read-only here")
        return target

    def cleanup(self) -> None:
        for point in reversed(self.points):
            if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    helper = Mounts()
    try:
        yield helper
    finally:
        helper.cleanup()


def fstype(path: Path) -> str:
    """An independent opinion on the filesystem type (util-linux ``findmnt``)."""
    found = shutil.which("findmnt")
    if found is None:
        pytest.skip("findmnt (util-linux) is not installed")
    done = subprocess.run(
        [found, "-n", "-o", "FSTYPE", "-T", str(path)], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


@pytest.fixture
def persistent(tmp_path: Path) -> Path:
    """``tmp_path``, when it is on a filesystem that survives a stop (the ok paths need one)."""
    kind = fstype(tmp_path)
    if kind in VOLATILE or "overlay" in kind:
        pytest.skip(f"the test temp dir is on {kind}; the ok path needs a persistent filesystem")
    return tmp_path


def tree(root: Path) -> list[str]:
    """Every path under ``root``, to show a check left nothing behind."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def base_flags(ws: Workspace, **flags: object) -> dict[str, object]:
    """Settings that never reach this machine's own AgentAPI or binary."""
    return {"agentapi_url": dead_url(), "agentapi_bin": str(ws.root / "no-agentapi"), **flags}


def store_copy(directory: Path, messages: int, *, size: int = 40) -> None:
    StateStore(directory).save(Conversation(messages=tuple(make_messages(messages, size=size))))


# -- filesystem ------------------------------------------------------------------------------


def fs_check(path: Path):
    return check_filesystem(
        "state_dir.filesystem", path, what="the sidecar's copy", fix_flag="--state-dir"
    )


def test_filesystem_ok_on_a_persistent_disk(persistent: Path) -> None:
    """A state dir (not created yet) on the disk: ok, naming the filesystem findmnt names."""
    finding = fs_check(persistent / "home" / ".local" / "state" / "agentapi-persist")
    assert finding.verdict is Verdict.OK, finding
    assert f"is on {fstype(persistent)} " in finding.detail
    assert finding.fix == ""


def test_filesystem_fails_on_tmpfs_and_matches_whole_components(
    tmp_path: Path, mounts: Mounts
) -> None:
    """tmpfs at ``vol``: a state dir under it fails with the fix; ``volume`` next to it is not
    under the mount (the longest mount point matching whole path components wins)."""
    mounts.tmpfs(tmp_path / "vol")
    finding = fs_check(tmp_path / "vol" / "state")
    assert finding.verdict is Verdict.FAIL
    assert "is on tmpfs" in finding.detail
    assert f"mounted at {tmp_path / 'vol'})" in finding.detail
    assert "does not survive a workspace stop" in finding.detail
    assert "put --state-dir on the persistent volume" in finding.fix
    assert "/home/coder" in finding.fix
    beside = fs_check(tmp_path / "volume" / "state")
    assert f"is on {fstype(tmp_path)} " in beside.detail


def test_a_replica_makes_a_volatile_state_dir_a_warning_not_a_read_only_one(
    tmp_path: Path, persistent: Path, mounts: Mounts
) -> None:
    """With a replica configured, a state dir on tmpfs is what the replica is for (warn, the
    replica named); a read-only one still cannot be written at all (fail)."""
    mounts.tmpfs(tmp_path / "vol")
    replica = "s3://bucket/workspaces"
    finding = check_filesystem(
        "state_dir.filesystem", tmp_path / "vol" / "state", what="the sidecar's copy",
        fix_flag="--state-dir", kept_elsewhere=replica,
    )  # fmt: skip
    assert finding.verdict is Verdict.WARN, finding
    assert f"the replica at {replica} keeps the sidecar's copy across stops" in finding.detail
    point = mounts.read_only_bind(persistent / "src", persistent / "ro")
    finding = check_filesystem(
        "state_dir.filesystem", point / "state", what="the sidecar's copy",
        fix_flag="--state-dir", kept_elsewhere=replica,
    )  # fmt: skip
    assert finding.verdict is Verdict.FAIL, finding


def test_filesystem_mount_point_with_a_space(tmp_path: Path, mounts: Mounts) -> None:
    """mountinfo escapes a space as ``\\040``: the mount is still found."""
    point = mounts.tmpfs(tmp_path / "my volume")
    finding = fs_check(point / "state")
    assert finding.verdict is Verdict.FAIL
    assert f"mounted at {point})" in finding.detail


def test_filesystem_fails_on_overlay(tmp_path: Path, mounts: Mounts) -> None:
    """A container's writable layer (overlay) does not survive the stop either."""
    point = mounts.overlay(tmp_path / "root", tmp_path / "layers")
    finding = fs_check(point / "home" / "state")
    assert finding.verdict is Verdict.FAIL
    assert "is on overlay" in finding.detail


def test_read_only_bind_mount_fails_filesystem_and_writable(
    persistent: Path, mounts: Mounts
) -> None:
    """A read-only mount of the persistent disk: both checks fail, and say why."""
    point = mounts.read_only_bind(persistent / "src", persistent / "ro")
    finding = fs_check(point / "state")
    assert finding.verdict is Verdict.FAIL
    assert "read-only" in finding.detail
    writable = check_writable(point)
    assert writable.verdict is Verdict.FAIL
    assert "Read-only file system" in writable.detail
    assert "--state-dir" in writable.fix


# -- writable and space ----------------------------------------------------------------------


def test_writable_probe_leaves_nothing_behind(tmp_path: Path) -> None:
    """A missing state dir is created for the probe and removed; an existing one is unchanged."""
    missing = tmp_path / "a" / "b" / "state"
    before = tree(tmp_path)
    finding = check_writable(missing)
    assert finding.verdict is Verdict.OK, finding
    assert "did not exist" in finding.detail
    assert tree(tmp_path) == before

    existing = tmp_path / "state"
    store_copy(existing, 3)
    before = tree(tmp_path)
    assert check_writable(existing).verdict is Verdict.OK
    assert tree(tmp_path) == before


@pytest.mark.parametrize(("size", "verdict"), [("2m", Verdict.FAIL), ("8m", Verdict.OK)])
def test_space_against_three_copies(
    workspace: Workspace, mounts: Mounts, size: str, verdict: Verdict
) -> None:
    """A ~0.7 MiB copy on a 2 MiB tmpfs has no room for three; on 8 MiB it has."""
    volume = mounts.tmpfs(workspace.root / "vol", size=size)
    settings = workspace.settings(state_dir=volume / "state")
    store_copy(settings.state_dir, 170, size=4000)
    finding = check_space(settings)
    assert finding.verdict is verdict, finding
    assert "the sidecar's copy is 6" in finding.detail  # 6xx KiB
    if verdict is Verdict.FAIL:
        assert finding.detail.startswith("not enough room")
        assert "--state-dir" in finding.fix


# -- AgentAPI ----------------------------------------------------------------------------------


def test_pid_file_missing_stale_reused_invalid(workspace: Workspace) -> None:
    """Each wrong pid file is named for what it is; nothing is signalled."""
    settings = workspace.settings(**base_flags(workspace))

    def check(*, reachable: bool = False):
        process, reason = find_agentapi(settings.agentapi_pid_file)
        assert process is None
        return check_pid_file(settings, process, reason, reachable=reachable)

    assert check().verdict is Verdict.SKIP
    missing = check(reachable=True)
    assert missing.verdict is Verdict.WARN
    assert "AGENTAPI_PID_FILE" in missing.fix

    exited = subprocess.Popen(["true"])
    exited.wait()
    workspace.pid_file.write_text(f"{exited.pid}\n")
    stale = check()
    assert (stale.verdict, stale.detail[:6]) == (Verdict.WARN, "stale:")
    assert "rewrites it when it starts" in stale.fix

    workspace.pid_file.write_text(f"{os.getpid()}\n")  # alive, and not AgentAPI
    reused = check(reachable=True)
    assert reused.verdict is Verdict.WARN
    assert reused.detail.startswith("reused by another process:")
    assert "not AgentAPI" in reused.detail
    assert "writes its pid elsewhere" in reused.fix

    workspace.pid_file.write_text("garbage\n")
    invalid = check()
    assert invalid.verdict is Verdict.WARN
    assert invalid.detail.startswith("invalid:")


async def test_live_agentapi_process_all_ok(workspace: Workspace) -> None:
    """AgentAPI 0.12.1 with a pid file and a state file: pid, HTTP, version and persistence
    are ok, and doctor sends it no signal (it is still running, its file untouched)."""
    async with agentapi_process(workspace, messages=4) as (proc, port):
        settings = workspace.settings(
            **base_flags(workspace, agentapi_url=f"http://localhost:{port}")
        )
        process, reason = find_agentapi(settings.agentapi_pid_file)
        assert process is not None
        reachable, answered = await check_agentapi_http(settings, process)
        assert answered
        assert reachable.verdict is Verdict.OK
        assert "stable, agent claude" in reachable.detail
        pid = check_pid_file(settings, process, reason, reachable=True)
        assert pid.verdict is Verdict.OK
        assert f"pid {proc.pid}" in pid.detail
        version = await check_version(settings, process)
        assert version.verdict is Verdict.OK, version
        assert "0.12.1: it saves on SIGUSR1" in version.detail
        persistence = check_persistence(settings, process)
        assert persistence.verdict is Verdict.OK, persistence
        assert str(workspace.state_file) in persistence.detail
        assert proc.returncode is None
    assert not workspace.state_file.exists()


async def test_old_agentapi_without_saving_on_another_port(workspace: Workspace) -> None:
    """AgentAPI 0.11.2 with saving off, while the URL names another port: version and
    persistence warn, HTTP fails (AgentAPI runs, the URL is wrong); it is not signalled."""
    async with agentapi_process(
        workspace, messages=2, version="0.11.2", AGENTAPI_SAVE_STATE="false"
    ) as (proc, _port):
        settings = workspace.settings(**base_flags(workspace))
        process, _ = find_agentapi(settings.agentapi_pid_file)
        assert process is not None
        reachable, answered = await check_agentapi_http(settings, process, probe_s=0.5)
        assert not answered
        assert reachable.verdict is Verdict.FAIL
        assert f"AgentAPI runs (pid {proc.pid})" in reachable.detail
        assert "ARG_AGENTAPI_PORT" in reachable.fix
        version = await check_version(settings, process)
        assert version.verdict is Verdict.WARN
        assert "0.11.2: it has no state file and ignores SIGUSR1" in version.detail
        assert "upgrade AgentAPI to 0.12.0" in version.fix
        persistence = check_persistence(settings, process)
        assert persistence.verdict is Verdict.WARN
        assert persistence.detail.startswith("off for pid")
        assert proc.returncode is None


async def test_persistence_state_file_mismatch(workspace: Workspace) -> None:
    """AgentAPI saves to one file while agentapi-persist repairs another: warned, with both."""
    elsewhere = workspace.root / "elsewhere" / "state.json"
    async with agentapi_process(workspace, messages=1, AGENTAPI_STATE_FILE=str(elsewhere)):
        settings = workspace.settings(**base_flags(workspace))
        process, _ = find_agentapi(settings.agentapi_pid_file)
        assert process is not None
        finding = check_persistence(settings, process)
    assert finding.verdict is Verdict.WARN
    assert str(elsewhere) in finding.detail
    assert str(workspace.state_file) in finding.detail
    assert f"--agentapi-state-file (AGENTAPI_STATE_FILE, ARG_STATE_FILE_PATH) to {elsewhere}" in (
        finding.fix
    )


def test_persistence_without_a_process(workspace: Workspace) -> None:
    """Not running: skipped unless set explicitly; explicitly off warns."""
    assert check_persistence(workspace.settings(), None).verdict is Verdict.SKIP
    on = check_persistence(workspace.settings(state_persistence=True), None)
    assert on.verdict is Verdict.OK
    off = check_persistence(workspace.settings(state_persistence=False), None)
    assert off.verdict is Verdict.WARN
    assert "ARG_ENABLE_STATE_PERSISTENCE=true" in off.fix


async def test_version_from_the_fallback_binary_or_unknown(workspace: Workspace) -> None:
    """No AgentAPI running: the fallback binary's version, or a warning when there is none."""
    script = write_agentapi_script(workspace.root / "bin", version="0.12.3")
    found = await check_version(workspace.settings(agentapi_bin=str(script)), None)
    assert found.verdict is Verdict.OK
    assert f"`{script}` is 0.12.3" in found.detail
    unknown = await check_version(workspace.settings(**base_flags(workspace)), None)
    assert unknown.verdict is Verdict.WARN
    assert "unknown" in unknown.detail
    assert "--agentapi-bin" in unknown.fix


async def test_agentapi_http_ok_and_hung(workspace: Workspace) -> None:
    """``GET /status`` answers: ok; a hung AgentAPI costs at most the probe time."""
    async with FakeAgentAPI(messages=make_messages(2), status="running") as agent:
        settings = workspace.settings(agentapi_url=agent.url)
        finding, answered = await check_agentapi_http(settings, None)
        assert answered
        assert finding.verdict is Verdict.OK
        assert "running, agent claude, transport" in finding.detail
        agent.behaviour.hang = True
        started = time.monotonic()
        finding, answered = await check_agentapi_http(settings, None, probe_s=0.3)
        assert time.monotonic() - started < 0.3 + 0.5
    assert not answered
    assert finding.verdict is Verdict.WARN
    assert "no running AgentAPI was found" in finding.detail
    assert [r.method for r in agent.requests] == ["GET", "GET"]


async def test_sidecar_running_or_not(workspace: Workspace) -> None:
    """The control socket answers: ok with its facts; nothing there: a warning with the fix."""
    async with FakeAgentAPI(messages=make_messages(3)) as agent:
        settings = workspace.settings(agentapi_url=agent.url)
        absent = await asyncio.to_thread(check_sidecar, settings)
        assert absent.verdict is Verdict.WARN
        assert "agentapi-persist run" in absent.fix
        async with sidecar(workspace, agentapi_url=agent.url) as running:
            present = await asyncio.to_thread(check_sidecar, settings)
            assert present.verdict is Verdict.OK, present
            assert f"pid {os.getpid()}" in present.detail
            await running.finish()


# -- Coder -------------------------------------------------------------------------------------


def test_coder_config_paths(workspace: Workspace) -> None:
    """No task id: skipped; half configured: fail; complete: ok. The token shows as a length."""
    none = check_coder_config(workspace.settings())
    assert none.verdict is Verdict.SKIP
    assert "token absent" in none.detail
    workspace.env.update(ARG_TASK_ID=TASK_ID, CODER_AGENT_URL="http://127.0.0.1:9")
    half = check_coder_config(workspace.settings())
    assert half.verdict is Verdict.FAIL
    assert "CODER_AGENT_TOKEN is missing" in half.detail
    workspace.env["CODER_AGENT_TOKEN"] = CANARY_TOKEN
    full = check_coder_config(workspace.settings())
    assert full.verdict is Verdict.OK
    assert f"token present ({len(CANARY_TOKEN)} chars)" in full.detail
    off = check_coder_config(workspace.settings(task_log_snapshot=False))
    assert off.verdict is Verdict.SKIP
    for finding in (none, half, full, off):
        assert_no_token(finding.detail, finding.fix)


def coder_settings(workspace: Workspace, server: FakeCoder) -> Settings:
    workspace.env.update(coder_env(server))
    return workspace.settings()


async def test_coder_endpoint_ok_stores_nothing(workspace: Workspace, coder: FakeCoder) -> None:
    """The probe is one POST of a non-JSON body: 400, the token matched, nothing stored."""
    finding = await check_coder_endpoint(coder_settings(workspace, coder))
    assert finding.verdict is Verdict.OK, finding
    assert "honours the token now" in finding.detail
    assert "nothing was stored" in finding.detail
    (request,) = coder.uploads
    assert (request.method, request.status, request.body) == ("POST", 400, PROBE_BODY)
    assert request.token_matched
    assert request.query == [("format", "agentapi")]
    assert coder.snapshots == {}
    assert_no_token(finding.detail, finding.fix)


@pytest.mark.parametrize(
    ("knob", "value", "verdict", "words"),
    [
        ("stop_build_finished", True, Verdict.WARN, "does not honour the token now (401"),
        ("route_exists", False, Verdict.FAIL, "route missing"),
        ("script", [404], Verdict.FAIL, f"does not know task {TASK_ID}"),
        ("script", [503] * 100, Verdict.WARN, "kept failing (503)"),
    ],
)
async def test_coder_endpoint_refusals(
    workspace: Workspace, coder: FakeCoder, knob: str, value: object, verdict: Verdict, words: str
) -> None:
    """401 outside a stop build warns; a missing route or an unknown task fails; 5xx warns.
    The fake stores nothing in any case."""
    setattr(coder.behaviour, knob, value)
    finding = await check_coder_endpoint(coder_settings(workspace, coder), probe_s=0.3)
    assert finding.verdict is verdict, finding
    assert words in finding.detail
    assert finding.fix
    assert coder.snapshots == {}
    assert coder.uploads
    assert_no_token(finding.detail, finding.fix)


async def test_coder_endpoint_redirect_not_followed(workspace: Workspace, coder: FakeCoder) -> None:
    """A redirect fails the check and the token never reaches the other server."""
    async with FakeCoder(token=CANARY_TOKEN, task_ids={TASK_ID}) as other:
        coder.behaviour.redirect_to = other.url
        finding = await check_coder_endpoint(coder_settings(workspace, coder))
    assert finding.verdict is Verdict.FAIL
    assert "redirect" in finding.detail
    assert other.uploads == []
    assert coder.snapshots == {}


async def test_coder_endpoint_hung_is_bounded(workspace: Workspace, coder: FakeCoder) -> None:
    """A Coder server that never answers fails the check within the probe time."""
    coder.behaviour.hang = True
    started = time.monotonic()
    finding = await check_coder_endpoint(coder_settings(workspace, coder), probe_s=0.4)
    assert time.monotonic() - started < 0.4 + 0.5
    assert finding.verdict is Verdict.FAIL
    assert "did not answer" in finding.detail


async def test_coder_endpoint_skipped_without_task_id(
    workspace: Workspace, coder: FakeCoder
) -> None:
    """No task id: not probed, and not a single request goes out."""
    workspace.env.update(CODER_AGENT_URL=coder.url, CODER_AGENT_TOKEN=CANARY_TOKEN)
    finding = await check_coder_endpoint(workspace.settings())
    assert finding.verdict is Verdict.SKIP
    assert "no task id" in finding.detail
    assert coder.uploads == []


# -- grace and timing --------------------------------------------------------------------------


def test_grace_against_the_runtime(tmp_path: Path, workspace: Workspace) -> None:
    """Docker (``/.dockerenv``) allows 10 s: --grace 30 warns, 10 is fine; the arithmetic shows."""
    assert detect_runtime(tmp_path) is None
    (tmp_path / ".dockerenv").touch()
    docker = detect_runtime(tmp_path)
    assert docker is not None
    assert (docker.name, docker.grace_s) == ("Docker", 10.0)
    (tmp_path / "var/run/secrets/kubernetes.io").mkdir(parents=True)
    kubernetes = detect_runtime(tmp_path)
    assert kubernetes is not None
    assert (kubernetes.name, kubernetes.grace_s) == ("Kubernetes", 30.0)

    fine = check_grace(workspace.settings(), docker)
    assert fine.verdict is Verdict.OK
    assert "grace 10 s - margin 1 s = budget 9 s" in fine.detail
    too_long = check_grace(workspace.settings(grace_s=30), docker)
    assert too_long.verdict is Verdict.WARN
    assert "may SIGKILL before the budget ends" in too_long.detail
    assert "--grace" in too_long.fix
    assert check_grace(workspace.settings(grace_s=30), kubernetes).verdict is Verdict.OK
    unknown = check_grace(workspace.settings(grace_s=2), None)
    assert unknown.verdict is Verdict.OK
    assert "grace 2 s - margin 0.25 s = budget 1.75 s" in unknown.detail


async def test_timing_rehearsal_uploads_signals_and_leaves_nothing(
    workspace: Workspace, persistent: Path
) -> None:
    """120 live messages: gathered, built and written durably well inside the budget; only
    GETs reach AgentAPI, and the rehearsal copy is gone afterwards."""
    async with FakeAgentAPI(messages=make_messages(120)) as agent:
        settings = workspace.settings(agentapi_url=agent.url)
        store_copy(settings.state_dir, 100)
        before = tree(workspace.root)
        finding = await check_shutdown_timing(settings)
    assert finding.verdict is Verdict.OK, finding
    assert "fetch" in finding.detail
    assert "(from live)" in finding.detail
    assert "(30 messages," in finding.detail
    assert "(120 messages," in finding.detail
    assert "of the 9000 ms budget (grace 10 s - margin 1 s)" in finding.detail
    assert "ms to spare" in finding.detail
    assert tree(workspace.root) == before
    assert {r.method for r in agent.requests} == {"GET"}


needs_strace = pytest.mark.skipif(
    STRACE is None, reason="strace is not installed (CI installs it to slow fsync down)"
)


@pytest.mark.faults
@needs_strace
@pytest.mark.parametrize(
    ("delay_s", "grace", "verdict", "words"),
    [
        # The rehearsal's write does two fsyncs (file, directory): 0.7 s of a 1.2 s budget.
        (0.35, "1.45", Verdict.WARN, "more than half the budget"),
        # 1 s of a 0.55 s budget.
        (0.5, "0.8", Verdict.FAIL, "over budget"),
    ],
)
async def test_timing_slow_fsync_warns_then_fails(
    workspace: Workspace, persistent: Path, delay_s: float, grace: str, verdict: Verdict, words: str
) -> None:
    """Every fsync delayed by strace: the measured rehearsal is judged against the budget,
    and the exit code is 8 only when it does not fit."""
    store_copy(workspace.state_dir, 20)
    assert STRACE is not None
    env = workspace.process_env(AGENTAPI_PERSIST_AGENTAPI_URL=dead_url())
    delay = f"inject=fsync:delay_enter={round(delay_s * 1_000_000)}"
    prefix = [STRACE, "-f", "-qq", "-o", os.devnull, "-e", "trace=fsync", "-e", delay]
    run = await run_cli(
        env,
        *("doctor", "--json", "--grace", grace, "--agentapi-bin", str(workspace.root / "none")),
        prefix=prefix,
        timeout_s=50,
    )
    out, err = run.stdout, run.stderr
    result = json.loads(out)
    timing = next(f for f in result["findings"] if f["name"] == "shutdown.timing")
    assert timing["verdict"] == verdict, timing
    assert timing["detail"].startswith(words)
    assert "--grace" in timing["fix"]
    assert run.code == (8 if verdict is Verdict.FAIL else 0), err


# -- the command -------------------------------------------------------------------------------


async def test_cli_json_shape_failure_and_no_token(
    workspace: Workspace, coder: FakeCoder, mounts: Mounts
) -> None:
    """State dir and AgentAPI's file on tmpfs: both filesystem checks fail, exit 8; the JSON
    has every check in order; the token shows nowhere and Coder stored nothing."""
    volume = mounts.tmpfs(workspace.root / "vol")
    env = {
        **coder_env(coder),
        "AGENTAPI_PERSIST_STATE_DIR": str(volume / "state"),
        "AGENTAPI_STATE_FILE": str(volume / "agentapi-state.json"),
        "AGENTAPI_PERSIST_AGENTAPI_URL": dead_url(),
    }
    result = await cli(workspace, "doctor", "--json", env=env)
    assert result.code == 8, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {"ok", "exit_code", "counts", "findings"}
    assert (report["ok"], report["exit_code"]) == (False, 8)
    assert [f["name"] for f in report["findings"]] == NAMES
    for finding in report["findings"]:
        assert set(finding) == {"name", "verdict", "detail", "fix"}
        assert finding["verdict"] in {"ok", "warn", "fail", "skip"}
        assert bool(finding["fix"]) == (finding["verdict"] in {"warn", "fail"}), finding
    verdicts = {f["name"]: f["verdict"] for f in report["findings"]}
    assert verdicts["state_dir.filesystem"] == "fail"
    assert verdicts["agentapi_state_file.filesystem"] == "fail"
    assert verdicts["coder.config"] == "ok"
    assert verdicts["coder.endpoint"] == "ok"
    assert sum(report["counts"].values()) == len(NAMES)
    assert report["counts"]["fail"] == 2
    assert_no_token(result.stdout, result.stderr)
    assert coder.snapshots == {}
    assert [u.status for u in coder.uploads] == [400]
    assert tree(volume) == []


async def test_cli_text_exit_0_without_failures(workspace: Workspace, persistent: Path) -> None:
    """Nothing failing (warnings and skips only): exit 0, one line per check, fixes indented,
    and a closing tally."""
    result = await cli(
        workspace,
        "doctor",
        "--agentapi-url",
        dead_url(),
        "--agentapi-bin",
        str(workspace.root / "none"),
        env={"CODER_AGENT_TOKEN": CANARY_TOKEN},
    )
    assert result.code == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    checks = [line for line in lines if not line.startswith(" ") and not line.startswith("doctor")]
    assert [line.split()[1] for line in checks] == NAMES
    assert {line.split()[0] for line in checks} <= {"ok", "WARN", "SKIP"}
    fixes = [line.strip() for line in lines if line.startswith(" ")]
    assert len(fixes) == sum(line.startswith("WARN") for line in checks)
    assert all(fix.startswith("fix: ") for fix in fixes)
    assert lines[-1].startswith("doctor: ")
    assert ", 0 fail, 5 skip (exit 0)" in lines[-1]  # the replica check: none configured
    assert_no_token(result.stdout, result.stderr)
    assert not workspace.state_dir.exists()


def test_help_lists_doctor_and_its_exit_code() -> None:
    """``doctor`` is a command with the common flags and --json; the epilog explains exit 8."""
    parser = build_parser()
    text = parser.format_help()
    assert "doctor" in text
    assert "doctor found a failing check" in text
    args = parser.parse_args(["doctor", "--json", "--grace", "3"])
    assert (args.command, args.json, args.grace_s) == ("doctor", True, 3.0)


async def test_run_doctor_in_process(workspace: Workspace, persistent: Path) -> None:
    """The library entry point runs every check in order and reports exit 0 with no failure."""
    report = await run_doctor(workspace.settings(**base_flags(workspace)), probe_s=0.3)
    assert [f.name for f in report.findings] == NAMES
    assert int(report.exit_code) == 0, report.render()
