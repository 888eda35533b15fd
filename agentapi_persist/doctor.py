"""``doctor``: check a workspace the way a support engineer would, one verdict per check.

Each check is a small function that returns a ``Finding``: a name, a verdict (``ok``, ``warn``,
``fail`` or ``skip``), a sentence saying what was found, and for anything but ``ok`` the fix.
``fail`` means a stop will lose something (the copy is on a filesystem that does not survive
the stop, it cannot be written, the snapshot cannot reach Coder, the stop overruns its budget);
``warn`` means it works, but less well than it should; ``skip`` says why a check did not apply.

Nothing here changes the workspace: the only writes are a probe file and a rehearsal copy in a
private temp directory on the state directory's filesystem, both removed again (and a state
directory created for the probe is removed too). AgentAPI is never signalled. The Coder
endpoint gets one POST whose body is not JSON: by the contract (SPEC section 3) the server
checks the route, then the token, then rejects the body with 400 before it stores anything,
so the answer tells the route and the token apart without touching the task's snapshot.
Redirects are not followed and the token goes only to the configured URL. The token is
reported as "present (N chars)" at most.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ._fsutil import write_atomic
from .agent_process import (
    MIN_SIGUSR1_VERSION,
    AgentProcess,
    detect_version,
    find_agentapi,
    process_state,
    read_pid_file,
)
from .agentapi_save import persistence_enabled
from .budget import Budget
from .coder import UploadOutcome
from .config import Settings
from .copies import gather
from .errors import ConfigError, DurabilityError, ExitCode, PersistError, cap_text
from .models import AgentStatus, Conversation
from .peers import open_peers
from .replica import PROBE_S as REPLICA_PROBE_S
from .replica import describe_replica
from .replica_client import client_library_missing
from .snapshot import build_snapshot
from .status import sidecar_view
from .store import StateStore, bytes_on_disk

__all__ = [
    "PROBE_BODY",
    "VOLATILE_FSTYPES",
    "DoctorReport",
    "Finding",
    "Mount",
    "Runtime",
    "Verdict",
    "check_agentapi_http",
    "check_coder_config",
    "check_coder_endpoint",
    "check_filesystem",
    "check_grace",
    "check_persistence",
    "check_pid_file",
    "check_replica",
    "check_shutdown_timing",
    "check_sidecar",
    "check_space",
    "check_version",
    "check_writable",
    "detect_runtime",
    "find_mount",
    "read_mounts",
    "run_doctor",
]

#: Filesystems whose contents do not outlive the container (or the machine).
VOLATILE_FSTYPES = frozenset({"overlay", "aufs", "tmpfs", "ramfs", "devtmpfs", "rootfs"})
#: The Coder probe's body: not JSON, so the server must refuse it (400) and store nothing.
PROBE_BODY = b"agentapi-persist doctor: endpoint probe, deliberately not JSON"
#: Free space wanted on top of the copy: at least this much, whatever the copy's size.
MIN_FREE_BYTES = 1 << 20
_SPACE_FACTOR = 3
_PROBE_PREFIX = ".agentapi-persist-doctor-"
_VOLUME_HINT = "e.g. under /home/coder, which templates mount from a volume"
_OCTAL = re.compile(rb"\\([0-7]{3})")


class Verdict(StrEnum):
    """A check's verdict; stable strings for ``--json``."""

    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True, slots=True)
class Finding:
    """One check's result: what was found and, unless it is fine, what to do about it."""

    name: str
    verdict: Verdict
    detail: str
    fix: str = ""


@dataclass(slots=True)
class DoctorReport:
    """Every finding, in the order the checks ran."""

    findings: list[Finding] = field(default_factory=list)

    @property
    def exit_code(self) -> ExitCode:
        """8 when any check failed, else 0 (warnings do not change it)."""
        failed = any(f.verdict is Verdict.FAIL for f in self.findings)
        return ExitCode.DEGRADED if failed else ExitCode.OK

    def counts(self) -> dict[str, int]:
        """How many findings of each verdict."""
        return {v.value: sum(f.verdict is v for f in self.findings) for v in Verdict}

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "ok": self.exit_code is ExitCode.OK,
            "exit_code": int(self.exit_code),
            "counts": self.counts(),
            "findings": [
                {"name": f.name, "verdict": str(f.verdict), "detail": f.detail, "fix": f.fix}
                for f in self.findings
            ],
        }

    def render(self) -> str:
        """A person's view: one line per check, its fix indented below it, then a tally."""
        width = max((len(f.name) for f in self.findings), default=0)
        lines = []
        for f in self.findings:
            shown = f.verdict.value if f.verdict is Verdict.OK else f.verdict.value.upper()
            lines.append(f"{shown:<5} {f.name:<{width}}  {f.detail}")
            if f.fix:
                lines.append(f"{'':<5} {'':<{width}}  fix: {f.fix}")
        counts = self.counts()
        tally = ", ".join(f"{counts[v.value]} {v.value}" for v in Verdict)
        lines.append(f"doctor: {tally} (exit {int(self.exit_code)})")
        return "\n".join(lines)


# -- filesystems -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of ``/proc/self/mountinfo``."""

    mount_point: str
    fstype: str
    source: str
    read_only: bool


def read_mounts(path: Path = Path("/proc/self/mountinfo")) -> list[Mount]:
    """The mount table, in mount order (a later mount on the same point hides an earlier one)."""
    mounts = []
    for line in path.read_bytes().splitlines():
        fields = line.split(b" ")
        try:
            separator = fields.index(b"-", 6)
            mount_point, options = fields[4], fields[5]
            fstype, source, super_options = fields[separator + 1 : separator + 4]
        except (ValueError, IndexError):
            continue
        read_only = b"ro" in options.split(b",") or b"ro" in super_options.split(b",")
        mounts.append(
            Mount(_unescape(mount_point), _unescape(fstype), _unescape(source), read_only)
        )
    return mounts


def _unescape(raw: bytes) -> str:
    """mountinfo writes space, tab, newline and backslash as ``\\ooo`` octal escapes."""
    return os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m[1], 8)]), raw))


def find_mount(path: Path, mounts: Iterable[Mount]) -> Mount | None:
    """The mount ``path`` lives on: the longest mount point that is ``path`` or one of its
    parents (whole components, so ``/vol`` does not hold ``/volume``); the topmost on a tie.
    ``path`` is resolved first, symlinks included; parts that do not exist yet stay as given."""
    resolved = os.path.realpath(path)
    best: tuple[int, int, Mount] | None = None
    for index, mount in enumerate(mounts):
        point = mount.mount_point
        inside = point == "/" or resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if inside and (best is None or (len(point), index) >= best[:2]):
            best = (len(point), index, mount)
    return best[2] if best else None


def _is_volatile(fstype: str) -> bool:
    # fuse-overlayfs (rootless containers) shows up as "fuse.fuse-overlayfs".
    return fstype in VOLATILE_FSTYPES or "overlay" in fstype


def _existing_ancestor(path: Path) -> Path:
    """``path`` itself if it exists, else the nearest parent that does."""
    current = path
    while not os.path.lexists(current) and current != current.parent:
        current = current.parent
    return current


def check_filesystem(
    name: str,
    path: Path,
    *,
    what: str,
    fix_flag: str,
    mountinfo: Path = Path("/proc/self/mountinfo"),
    kept_elsewhere: str | None = None,
) -> Finding:
    """Is ``path`` on a filesystem that survives a workspace stop (not overlay, tmpfs, ...)?

    ``kept_elsewhere`` names a replica that keeps the copy off the volume: a filesystem that
    does not survive a stop is then what the replica is for, a warning (the ``replica``
    check says whether it works), not a failure."""
    try:
        mount = find_mount(path, read_mounts(mountinfo))
    except OSError as exc:
        return Finding(
            name,
            Verdict.WARN,
            f"cannot read the mount table ({exc.strerror or exc}): cannot tell whether {path} "
            "is persistent",
            f"check by hand that {what} is on the persistent volume",
        )
    if mount is None:
        return Finding(
            name,
            Verdict.WARN,
            f"no mount holds {path} in the mount table",
            f"check by hand that {what} is on the persistent volume",
        )
    where = f"{path} is on {mount.fstype} ({cap_text(mount.source, 60)}, mounted at "
    where += f"{mount.mount_point})"
    if _is_volatile(mount.fstype) and kept_elsewhere is not None:
        return Finding(
            name,
            Verdict.WARN,
            f"{where}: {mount.fstype} does not survive a workspace stop; the replica at "
            f"{kept_elsewhere} keeps {what} across stops",
            "keep the replica check passing; a persistent volume would also keep a copy when "
            "the replica cannot be reached",
        )
    if _is_volatile(mount.fstype):
        return Finding(
            name,
            Verdict.FAIL,
            f"{where}: {mount.fstype} does not survive a workspace stop, so {what} is lost",
            f"put {fix_flag} on the persistent volume ({_VOLUME_HINT})",
        )
    if mount.read_only:
        return Finding(
            name,
            Verdict.FAIL,
            f"{where}, read-only: {what} cannot be written",
            f"put {fix_flag} on a writable persistent volume ({_VOLUME_HINT})",
        )
    return Finding(name, Verdict.OK, where)


def check_writable(state_dir: Path) -> Finding:
    """Create, fsync and remove a probe file in the state directory, the way every write
    goes (``write_atomic``); a directory created for the probe is removed again."""
    name = "state_dir.writable"
    created = []
    current = state_dir
    while not os.path.lexists(current) and current != current.parent:
        created.append(current)
        current = current.parent
    probe = state_dir / f"{_PROBE_PREFIX}{secrets.token_hex(6)}"
    started = time.perf_counter()
    try:
        write_atomic(probe, b"agentapi-persist doctor probe\n")
        ms = (time.perf_counter() - started) * 1000
    except DurabilityError as exc:
        return Finding(
            name,
            Verdict.FAIL,
            str(exc),
            f"make {state_dir} writable by uid {os.getuid()}, or point --state-dir at a "
            f"writable directory on the persistent volume ({_VOLUME_HINT})",
        )
    finally:
        _remove_probe(probe, created)
    note = " (it did not exist: created for the probe and removed again)" if created else ""
    return Finding(
        name,
        Verdict.OK,
        f"created, fsynced and removed a probe file in {state_dir} in {ms:.1f} ms{note}",
    )


def _remove_probe(probe: Path, created: list[Path]) -> None:
    try:
        probe.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        return  # leave the directories alone too: the probe is still in one of them
    for directory in created:  # deepest first
        try:
            directory.rmdir()
        except OSError:
            return


def _copy_bytes(settings: Settings) -> tuple[int, str]:
    """The size of the conversation on disk (the newest generation plus its journal, or
    AgentAPI's state file if that is bigger), and which one it was."""
    ours = bytes_on_disk(settings.state_dir)
    theirs = _file_size(settings.agentapi_state_file)
    if theirs > ours:
        return theirs, "AgentAPI's state file"
    return ours, "the sidecar's copy"


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def check_space(settings: Settings) -> Finding:
    """Free space (``statvfs``) against three times the conversation's size on disk: a new
    generation is written next to the two kept ones before the oldest is deleted."""
    name = "state_dir.space"
    base = _existing_ancestor(settings.state_dir)
    try:
        st = os.statvfs(base)
    except OSError as exc:
        return Finding(
            name,
            Verdict.WARN,
            f"cannot statvfs {base}: {exc.strerror or exc}",
            f"check by hand that {base} has room for three copies of the conversation",
        )
    free = st.f_bavail * st.f_frsize
    size, which = _copy_bytes(settings)
    need = max(_SPACE_FACTOR * size, MIN_FREE_BYTES)
    facts = (
        f"{_size(free)} free on the filesystem of {settings.state_dir}; {which} is "
        f"{_size(size)}, so a new copy needs {_size(need)} ({_SPACE_FACTOR}x, at least "
        f"{_size(MIN_FREE_BYTES)})"
    )
    fix = (
        "free space on that volume or move --state-dir to a bigger persistent volume "
        f"({_VOLUME_HINT})"
    )
    if st.f_files > 0 and st.f_favail == 0:
        return Finding(name, Verdict.FAIL, f"no free inodes: no file can be created; {facts}", fix)
    if free < need:
        return Finding(name, Verdict.FAIL, f"not enough room: {facts}", fix)
    return Finding(name, Verdict.OK, facts)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


# -- AgentAPI ----------------------------------------------------------------------------------


def check_pid_file(
    settings: Settings, process: AgentProcess | None, reason: str, *, reachable: bool
) -> Finding:
    """Does the pid file name a live AgentAPI, or is it missing, stale, or reused?"""
    name = "agentapi.pid_file"
    pid_file = settings.agentapi_pid_file
    if process is not None:
        return Finding(name, Verdict.OK, reason)
    refresh = (
        "harmless for the stop (a pid is checked against /proc before any signal), but while "
        "it is wrong AgentAPI is not asked to save: "
    )
    elsewhere = (
        "AgentAPI answers, so it writes its pid elsewhere: point --agentapi-pid-file "
        "(AGENTAPI_PID_FILE, ARG_PID_FILE_PATH) at that file"
        if reachable
        else "AgentAPI rewrites it when it starts"
    )
    pid, _problem = read_pid_file(pid_file)
    if pid is None and not os.path.lexists(pid_file):
        if not reachable:
            return Finding(name, Verdict.SKIP, f"{reason}; AgentAPI does not answer either")
        return Finding(
            name,
            Verdict.WARN,
            f"{reason}, yet AgentAPI answers: the stop cannot ask it to save (SIGUSR1)",
            "start AgentAPI with AGENTAPI_PID_FILE (the registry module sets it from "
            "ARG_PID_FILE_PATH), or point --agentapi-pid-file at the file it writes",
        )
    if pid is None:
        return Finding(name, Verdict.WARN, f"invalid: {reason}", f"remove it; {elsewhere}")
    if process_state(pid) is None:
        return Finding(name, Verdict.WARN, f"stale: {reason}", refresh + elsewhere)
    return Finding(name, Verdict.WARN, f"reused by another process: {reason}", refresh + elsewhere)


async def check_agentapi_http(
    settings: Settings, process: AgentProcess | None, *, probe_s: float = 1.0
) -> tuple[Finding, bool]:
    """``GET /status`` within ``probe_s``; also returns whether AgentAPI answered."""
    name = "agentapi.reachable"
    url = settings.agentapi_url
    async with open_peers(settings, read_only=True, agent_timeout_s=probe_s) as peers:
        client = peers.agent
        started = time.perf_counter()
        status: AgentStatus | None = None
        error = ""
        try:
            status = await client.status(budget=Budget(probe_s))
        except PersistError as exc:
            error = cap_text(str(exc), 200)
    if status is not None:
        ms = (time.perf_counter() - started) * 1000
        transport = f", transport {status.transport}" if status.transport else ""
        agent = status.agent_type or "type not reported (AgentAPI < 0.10.1)"
        detail = f"{url} answered in {ms:.0f} ms: {status.status}, agent {agent}"
        return Finding(name, Verdict.OK, detail + transport), True
    port_fix = "check --agentapi-url (AGENTAPI_PERSIST_AGENTAPI_URL, ARG_AGENTAPI_PORT)"
    if process is not None:
        return (
            Finding(
                name,
                Verdict.FAIL,
                f"AgentAPI runs (pid {process.pid}) but {url} does not answer: {error}; the "
                "stop cannot fetch the newest messages from it",
                f"{port_fix}: it must name the port AgentAPI listens on",
            ),
            False,
        )
    return (
        Finding(
            name,
            Verdict.WARN,
            f"{url} does not answer and no running AgentAPI was found: {error}",
            f"start AgentAPI, or {port_fix} if it runs on another port",
        ),
        False,
    )


async def check_version(
    settings: Settings, process: AgentProcess | None, *, probe_s: float = 1.0
) -> Finding:
    """AgentAPI's version, and whether it saves on SIGUSR1 (>= 0.12.0; older ones ignore it)."""
    name = "agentapi.version"
    version = await detect_version(
        process, fallback_bin=settings.agentapi_bin, budget=Budget(2 * probe_s), cap_s=probe_s
    )
    whose = f"the running AgentAPI (pid {process.pid})" if process else f"`{settings.agentapi_bin}`"
    if version is None:
        return Finding(
            name,
            Verdict.WARN,
            f"the version of {whose} is unknown (`--version` did not answer with one): SIGUSR1 "
            "will not be sent, so AgentAPI saves its own file only when it is stopped",
            "install AgentAPI >= 0.12.0 where it can be run, or set --agentapi-bin "
            "(AGENTAPI_PERSIST_AGENTAPI_BIN) to its path",
        )
    if version < MIN_SIGUSR1_VERSION:
        return Finding(
            name,
            Verdict.WARN,
            f"{whose} is {version}: it has no state file and ignores SIGUSR1 (saving came "
            f"in {MIN_SIGUSR1_VERSION}), so only the sidecar's copy keeps the conversation",
            f"upgrade AgentAPI to {MIN_SIGUSR1_VERSION} or later",
        )
    return Finding(
        name,
        Verdict.OK,
        f"{whose} is {version}: it saves on SIGUSR1 (>= {MIN_SIGUSR1_VERSION}); the stop asks "
        "it to save and confirms the save",
    )


def check_persistence(settings: Settings, process: AgentProcess | None) -> Finding:
    """Does AgentAPI save and reload its own state file, and is it the file we repair?"""
    name = "agentapi.persistence"
    configured = settings.agentapi_state_file
    turn_on = (
        "set ARG_ENABLE_STATE_PERSISTENCE=true and AGENTAPI_STATE_FILE for AgentAPI "
        f"(agentapi-persist repairs {configured})"
    )
    if process is None:
        if settings.state_persistence is None:
            return Finding(
                name,
                Verdict.SKIP,
                "AgentAPI is not running: persistence is decided from its environment once it "
                "runs (on when it has AGENTAPI_STATE_FILE)",
            )
        if settings.state_persistence:
            return Finding(name, Verdict.OK, f"on by setting; AgentAPI's state file {configured}")
        return Finding(
            name,
            Verdict.WARN,
            "off by setting: AgentAPI neither saves nor reloads its own state file, so after a "
            "stop it starts empty (the sidecar's copy is kept)",
            turn_on,
        )
    enabled = persistence_enabled(
        process,
        setting=settings.state_persistence,
        state_file_explicit=settings.agentapi_state_file_explicit,
    )
    if not enabled:
        return Finding(
            name,
            Verdict.WARN,
            f"off for pid {process.pid}: AgentAPI neither saves nor reloads its state, so after "
            "a stop it starts empty (the sidecar's copy is kept)",
            turn_on,
        )
    theirs = process.state_file
    if theirs is not None and os.path.realpath(theirs) != os.path.realpath(configured):
        return Finding(
            name,
            Verdict.WARN,
            f"on, but AgentAPI (pid {process.pid}) uses {theirs} while agentapi-persist reads "
            f"and repairs {configured}",
            f"set --agentapi-state-file (AGENTAPI_STATE_FILE, ARG_STATE_FILE_PATH) to {theirs}",
        )
    return Finding(name, Verdict.OK, f"on: AgentAPI (pid {process.pid}) saves to {configured}")


def check_sidecar(settings: Settings) -> Finding:
    """Is a sidecar (``agentapi-persist run``) answering on the control socket?"""
    name = "sidecar"
    view = sidecar_view(settings)
    if view.get("running"):
        facts = ", ".join(
            f"{key} {view[key]}" for key in ("pid", "state", "stored_messages") if key in view
        )
        return Finding(name, Verdict.OK, f"running ({facts}): a stop only flushes the last change")
    return Finding(
        name,
        Verdict.WARN,
        f"no sidecar answers in {settings.state_dir}: a stop runs the whole sequence itself, "
        "and a SIGKILL keeps only what the last stop saved",
        "start `agentapi-persist run` at boot (a coder_script with run_on_start)",
    )


# -- Coder -------------------------------------------------------------------------------------


def _display_url(url: str | None) -> str:
    """The URL without any user:password part."""
    if not url:
        return "unset"
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def check_coder_config(settings: Settings) -> Finding:
    """Are the Coder URL, token and task id set? The token shows as its length at most."""
    name = "coder.config"
    token = settings.coder_token.get_secret_value() if settings.coder_token else ""
    facts = (
        f"task id {settings.task_id or 'unset'}; Coder URL {_display_url(settings.coder_url)}; "
        f"token {f'present ({len(token)} chars)' if token else 'absent'}"
    )
    if not settings.task_log_snapshot:
        return Finding(name, Verdict.SKIP, f"snapshots are switched off ({facts})")
    if not settings.task_id:
        return Finding(name, Verdict.SKIP, f"no task id, so no snapshot is uploaded ({facts})")
    try:
        settings.coder_target()
    except ConfigError as exc:
        return Finding(
            name,
            Verdict.FAIL,
            f"{exc} ({facts})",
            "the Coder agent sets CODER_AGENT_URL and CODER_AGENT_TOKEN: run the stop script "
            "with the agent's environment",
        )
    return Finding(name, Verdict.OK, facts)


async def check_coder_endpoint(settings: Settings, *, probe_s: float = 2.0) -> Finding:
    """Does the log-snapshot route exist, and is the token honoured now?

    One POST of ``PROBE_BODY`` (not JSON) to the snapshot URL, redirects refused: the server
    checks route, token, then rejects the body with 400 before storing anything.
    """
    name = "coder.endpoint"
    try:
        target = settings.coder_target()
    except ConfigError:
        return Finding(name, Verdict.SKIP, "not probed: the Coder settings are incomplete")
    if target is None:
        why = "no task id" if settings.task_log_snapshot else "snapshots are switched off"
        return Finding(name, Verdict.SKIP, f"not probed: {why}")
    async with open_peers(settings, read_only=True) as peers:
        if peers.coder is None:
            problem = peers.coder_problem or "no Coder client"
            return Finding(name, Verdict.FAIL, f"not probed: {problem}", "fix CODER_AGENT_TOKEN")
        result = await peers.coder.upload_snapshot(PROBE_BODY, budget=Budget(probe_s))
    where = _display_url(settings.coder_url)
    said = f"{result.status} in {result.duration_ms} ms"
    match result.outcome:
        case UploadOutcome.BAD_REQUEST:
            return Finding(
                name,
                Verdict.OK,
                f"{where} has the log-snapshot route and honours the token now: it refused the "
                f"probe's deliberately invalid body ({said}); nothing was stored",
            )
        case UploadOutcome.UNAUTHORIZED:
            return Finding(
                name,
                Verdict.WARN,
                f"{where} has the log-snapshot route but does not honour the token now ({said}): "
                "expected outside a stop build, since the token is only honoured while it runs",
                "nothing to do if the workspace is running; if stops report 401 too, check "
                "CODER_AGENT_TOKEN",
            )
        case UploadOutcome.ROUTE_MISSING:
            return Finding(
                name,
                Verdict.FAIL,
                f"route missing at {where} ({said}): Coder is too old for task log snapshots, "
                "or Tasks were removed (Coder >= 2.37)",
                "upgrade Coder, or set ARG_TASK_LOG_SNAPSHOT=false to stop trying",
            )
        case UploadOutcome.TASK_NOT_FOUND:
            return Finding(
                name,
                Verdict.FAIL,
                f"{where} does not know task {settings.task_id} ({said})",
                "check ARG_TASK_ID: the task may be deleted or belong to another workspace",
            )
        case UploadOutcome.DELIVERED:
            return Finding(
                name,
                Verdict.FAIL,
                f"{where} accepted a body that is not JSON ({said}): it does not behave like "
                "Coder's log-snapshot endpoint",
                "check CODER_AGENT_URL: it must be the Coder server's address",
            )
        case UploadOutcome.SERVER_ERROR | UploadOutcome.UNEXPECTED:
            return Finding(
                name, Verdict.WARN, result.detail, "check the Coder server's health and logs"
            )
        case _:  # redirect refused, transport error, timed out
            return Finding(
                name,
                Verdict.FAIL,
                result.detail,
                "set CODER_AGENT_URL to the Coder server's final address, reachable from here",
            )


# -- grace and timing --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Runtime:
    """The container runtime we seem to run under, and its default stop grace."""

    name: str
    grace_s: float
    hint: str


def detect_runtime(root: Path = Path("/")) -> Runtime | None:
    """Guess the container runtime from the files it leaves behind (``None``: no idea)."""
    if (root / "var/run/secrets/kubernetes.io").exists() or (
        root / "run/secrets/kubernetes.io"
    ).exists():
        return Runtime(
            "Kubernetes",
            30.0,
            "terminationGracePeriodSeconds defaults to 30 s, shared with preStop hooks and "
            "every other stop script",
        )
    if (root / ".dockerenv").exists():
        return Runtime(
            "Docker", 10.0, "`docker stop` waits 10 s unless the template sets a stop timeout"
        )
    if (root / "run/.containerenv").exists():
        return Runtime(
            "Podman", 10.0, "`podman stop` waits 10 s unless the container sets a stop timeout"
        )
    return None


async def check_replica(settings: Settings, *, probe_s: float = REPLICA_PROBE_S) -> Finding:
    """Can the configured replica be read with the credentials at hand, and is it this
    instance's? (Read-only: one listing, and the reads a restore would make.)"""
    name = "replica"
    if settings.replica is None:
        return Finding(name, Verdict.SKIP, "no replica configured (--replica)")
    if (missing := client_library_missing()) is not None:
        return Finding(name, Verdict.FAIL, missing, "pip install 'agentapi-persist[s3]'")
    store = StateStore(settings.state_dir, max_bytes=settings.max_body_bytes, read_only=True)
    loaded = await store.aload()
    facts, problems = await describe_replica(
        settings, store, local_saved_at=loaded.saved_at, probe_s=probe_s
    )
    where = facts.get("url", settings.replica)
    if facts.get("reachable") is False:
        return Finding(
            name,
            Verdict.FAIL,
            f"{where}: {facts.get('error')}",
            "check the bucket, --replica-endpoint (or AWS_ENDPOINT_URL) and the credentials "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the pod's web identity)",
        )
    detail = f"{where} reachable; it holds {facts.get('holds')}"
    if facts.get("last_upload"):
        detail += f"; last upload {facts['last_upload']}"
    if problems:
        return Finding(name, Verdict.WARN, f"{detail}; " + "; ".join(problems),
                       "see `agentapi-persist status` for the replica's lag")  # fmt: skip
    return Finding(name, Verdict.OK, detail)


def check_grace(settings: Settings, runtime: Runtime | None) -> Finding:
    """The budget arithmetic, and ``--grace`` against what the runtime likely allows."""
    name = "grace"
    arithmetic = (
        f"grace {settings.grace_s:g} s - margin {settings.margin_s:g} s = budget "
        f"{settings.budget_s:g} s for the whole stop"
    )
    if runtime is None:
        return Finding(
            name,
            Verdict.OK,
            f"{arithmetic}; container runtime not detected (Docker waits 10 s, Kubernetes 30 s "
            "by default)",
        )
    seen = f"{arithmetic}; {runtime.name} detected: {runtime.hint}"
    if settings.grace_s > runtime.grace_s:
        return Finding(
            name,
            Verdict.WARN,
            f"{seen}: with --grace {settings.grace_s:g} the runtime may SIGKILL before the "
            "budget ends",
            f"set --grace (AGENTAPI_PERSIST_GRACE) to the container's stop timeout "
            f"({runtime.grace_s:g} s by default), or raise that timeout in the template",
        )
    return Finding(name, Verdict.OK, seen)


async def check_shutdown_timing(settings: Settings) -> Finding:
    """Rehearse the stop without uploading or signalling, and measure it against the budget:
    gather (the sidecar's copy, AgentAPI's file, ``GET /messages``), build the snapshot, and
    write the copy durably to a temp directory on the state directory's filesystem."""
    name = "shutdown.timing"
    budget_ms = settings.budget_s * 1000
    started = time.perf_counter()
    async with open_peers(settings, read_only=True) as peers:
        gathered = await gather(
            settings, store=peers.store, agent=peers.agent, budget=Budget(settings.budget_s)
        )
    fetched = time.perf_counter()
    conversation = gathered.conversation
    messages = conversation.messages if conversation is not None else ()
    snapshot = build_snapshot(
        messages, max_messages=settings.snapshot_messages, max_bytes=settings.snapshot_max_bytes
    )
    built = time.perf_counter()
    written_bytes = 0
    if conversation is not None:
        try:
            written_bytes = await asyncio.to_thread(_rehearse_write, settings, conversation)
        except (DurabilityError, OSError) as exc:
            return Finding(
                name,
                Verdict.FAIL,
                f"the rehearsal's durable write failed: {exc}",
                "see state_dir.writable and state_dir.space",
            )
    done = time.perf_counter()
    total = (done - started) * 1000
    parts = (
        f"fetch {(fetched - started) * 1000:.0f} ms (from {gathered.source}), snapshot "
        f"{(built - fetched) * 1000:.0f} ms ({len(snapshot.messages)} messages, "
        f"{snapshot.size} bytes), durable write {(done - built) * 1000:.0f} ms "
        f"({len(messages)} messages, {written_bytes} bytes)"
    )
    left = budget_ms - total
    detail = (
        f"rehearsal {total:.0f} ms of the {budget_ms:.0f} ms budget (grace "
        f"{settings.grace_s:g} s - margin {settings.margin_s:g} s): {left:.0f} ms to spare, "
        f"{100 * total / budget_ms:.0f}% used; {parts}; nothing was uploaded or signalled"
    )
    if conversation is None:
        detail += "; no conversation anywhere yet, so only the reads were measured"
    fix = (
        "raise --grace (and the container's stop timeout), run the sidecar so a stop only "
        "flushes the last change, and look at the slowest part above"
    )
    if total > budget_ms:
        return Finding(name, Verdict.FAIL, f"over budget: {detail}", fix)
    if total > budget_ms / 2:
        return Finding(name, Verdict.WARN, f"more than half the budget: {detail}", fix)
    return Finding(name, Verdict.OK, detail)


def _rehearse_write(settings: Settings, conversation: Conversation) -> int:
    """Write ``conversation`` as a full generation into a private temp directory next to the
    state directory (same filesystem), then remove it. Returns the bytes written."""
    base = _existing_ancestor(settings.state_dir)
    scratch = Path(tempfile.mkdtemp(prefix=_PROBE_PREFIX, dir=base))
    try:
        report = StateStore(scratch, max_bytes=settings.max_body_bytes).save(conversation)
        return report.bytes_written
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# -- all of it ---------------------------------------------------------------------------------


async def run_doctor(
    settings: Settings, *, probe_s: float = 1.0, runtime_root: Path = Path("/")
) -> DoctorReport:
    """Run every check, one after the other (the timing rehearsal must not share the machine
    with the other probes), each bounded; never raises for what it finds."""
    report = DoctorReport()
    add = report.findings.append
    add(
        check_filesystem(
            "state_dir.filesystem",
            settings.state_dir,
            what="the sidecar's copy",
            fix_flag="--state-dir",
            kept_elsewhere=settings.replica,
        )
    )
    add(await asyncio.to_thread(check_writable, settings.state_dir))
    add(check_space(settings))
    add(
        check_filesystem(
            "agentapi_state_file.filesystem",
            settings.agentapi_state_file,
            what="AgentAPI's state file",
            fix_flag="AgentAPI's state file (AGENTAPI_STATE_FILE, ARG_STATE_FILE_PATH)",
        )
    )
    process, reason = find_agentapi(settings.agentapi_pid_file)
    reachable_finding, reachable = await check_agentapi_http(settings, process, probe_s=probe_s)
    add(check_pid_file(settings, process, reason, reachable=reachable))
    add(reachable_finding)
    add(await check_version(settings, process, probe_s=probe_s))
    add(check_persistence(settings, process))
    add(await asyncio.to_thread(check_sidecar, settings))
    add(check_coder_config(settings))
    add(await check_coder_endpoint(settings, probe_s=2 * probe_s))
    add(await check_replica(settings))
    add(check_grace(settings, detect_runtime(runtime_root)))
    add(await check_shutdown_timing(settings))
    return report
