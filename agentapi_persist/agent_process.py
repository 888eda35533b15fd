"""The AgentAPI process: find it from its pid file, learn its version, signal it safely.

Three hazards shape this module:

* **Pids get reused.** The pid file lives on the persistent volume and outlives the process;
  after a restart its number may belong to anything. A pid is AgentAPI only if
  ``/proc/<pid>/cmdline`` says so, and it is checked again right before every signal, through
  a pidfd where the kernel has them so that the check and the signal hit the same process.
* **SIGUSR1 means nothing to AgentAPI before 0.12.0**: Go ignores a signal the program never
  asked for (checked with the real v0.10.0 and v0.11.8: they live on and save nothing), and only
  0.12.0 saves on it (coder/agentapi cmd/server/signals_unix.go). Sending it to an older one
  would be a wasted wait for a save that cannot come, so it is sent only when the version is
  known and new enough. Unknown means no.
* Asking AgentAPI to save (SIGUSR1) and confirming it is ``agentapi_save``'s job.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import shlex
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from stat import S_ISREG
from typing import Literal

import structlog

from .agentapi_state import trim_prompt
from .budget import Budget
from .errors import cap_text

__all__ = [
    "MIN_SIGUSR1_VERSION",
    "VERSION_CAP_S",
    "AgentProcess",
    "StopOutcome",
    "StopResult",
    "Version",
    "clear_stale_pid_file",
    "detect_version",
    "find_agentapi",
    "is_alive",
    "learn_version",
    "process_state",
    "read_pid_file",
    "send_signal",
    "stop",
]

log = structlog.get_logger(__name__)

_PROC = Path("/proc")
#: PID_MAX_LIMIT on 64-bit Linux: no pid is ever larger.
_PID_MAX = 2**22
_PID_FILE_MAX_BYTES = 64
#: ``agentapi --version`` answers in milliseconds; a binary that takes longer is not trusted.
VERSION_CAP_S = 1.0
_VERSION_OUTPUT_MAX = 4096
_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GONE_STATES = frozenset({"Z", "X", "x"})

_BARE_VERSION = r"v?(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?"
_VERSION_LINE = re.compile(r"\bagentapi version " + _BARE_VERSION + r"(?![0-9A-Za-z.+-])")
_VERSION_ONLY = re.compile(_BARE_VERSION)


@functools.total_ordering
@dataclass(frozen=True, slots=True)
class Version:
    """A semantic version. A pre-release sorts before its release (0.12.0-rc1 < 0.12.0), so
    a release candidate of the first SIGUSR1 version is not trusted with SIGUSR1."""

    major: int
    minor: int
    patch: int
    prerelease: str = ""

    @classmethod
    def parse(cls, text: str) -> Version | None:
        """``0.12.1``, ``v0.12.1``, ``0.12.0-rc.1`` or a line ``agentapi version 0.12.1``."""
        text = text.strip()
        match = _VERSION_ONLY.fullmatch(text) or _VERSION_LINE.search(text)
        if match is None:
            return None
        major, minor, patch, pre = match.groups()
        return cls(int(major), int(minor), int(patch), pre or "")

    def _key(self) -> tuple[int, int, int, int, str]:
        return (self.major, self.minor, self.patch, 0 if self.prerelease else 1, self.prerelease)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() < other._key()

    def __str__(self) -> str:
        pre = f"-{self.prerelease}" if self.prerelease else ""
        return f"{self.major}.{self.minor}.{self.patch}{pre}"


#: The first AgentAPI that saves on SIGUSR1 (without exiting). Older ones ignore it.
MIN_SIGUSR1_VERSION = Version(0, 12, 0)


@dataclass(frozen=True, slots=True)
class AgentProcess:
    """A running AgentAPI, as identified from ``/proc`` at one moment."""

    pid: int
    argv: tuple[str, ...]
    """From ``/proc/<pid>/cmdline``; compared again before every signal."""
    program: Path | None
    """What to run with ``--version``: ``/proc/<pid>/exe`` (works even when the binary was
    replaced on disk), or the script an interpreter runs; ``None`` if unknown."""
    state_file: Path | None
    """Its state file (``--state-file`` or ``AGENTAPI_STATE_FILE``), when readable."""
    save_state: bool | None
    """Its ``AGENTAPI_SAVE_STATE`` / ``--save-state`` (``None``: unset or unreadable)."""
    start_ticks: int | None = None
    """Start time in clock ticks since boot (``/proc/<pid>/stat`` field 22): with the pid
    it names one process for good, so a restarted AgentAPI is not mistaken for this one."""
    configuration_known: bool = False
    """Its environment was readable, so ``state_file`` and ``save_state`` are what it uses
    (an unset state file then means it has none and cannot save)."""
    initial_prompt: str | None = None
    """The initial prompt it was started with (``-I``/``--initial-prompt`` or
    ``AGENTAPI_INITIAL_PROMPT``), trimmed as AgentAPI trims it before saving and comparing;
    ``None`` when it has none or it cannot be read."""

    @property
    def command(self) -> str:
        """The command line, shell-quoted and shortened, for messages."""
        return _show(self.argv)


class StopOutcome(StrEnum):
    """What ``stop`` established."""

    EXITED = "exited"
    STILL_RUNNING = "still_running"
    NOT_RUNNING = "not_running"
    """It had already exited; nothing was signalled."""
    NOT_OURS = "not_ours"
    """The pid now belongs to another process; nothing was signalled."""
    NOT_PERMITTED = "not_permitted"


@dataclass(frozen=True, slots=True)
class StopResult:
    """The result of stopping AgentAPI."""

    outcome: StopOutcome
    detail: str
    ms: int
    signalled: bool = False

    @property
    def stopped(self) -> bool:
        """True when AgentAPI is no longer running."""
        return self.outcome in (StopOutcome.EXITED, StopOutcome.NOT_RUNNING)


# -- finding it ------------------------------------------------------------------------------


def find_agentapi(pid_file: Path) -> tuple[AgentProcess | None, str]:
    """The AgentAPI named by ``pid_file``, or ``None`` and a sentence saying why not."""
    pid, problem = read_pid_file(pid_file)
    if pid is None:
        log.info("agentapi.not_found", pid_file=str(pid_file), reason=problem)
        return None, problem
    source = f"pid {pid} from {pid_file}"
    stat = process_state(pid)
    try:
        argv = _read_cmdline(pid)
    except OSError as exc:
        reason = (
            f"cannot read /proc/{pid}/cmdline ({exc.strerror}): identity unknown; not signalling"
        )
        log.warning("agentapi.not_found", pid=pid, reason=reason)
        return None, reason
    if stat is None or argv is None:
        reason = f"{source} is not running (stale pid file)"
        log.info("agentapi.not_found", pid=pid, reason=reason)
        return None, reason
    if stat[0] in _GONE_STATES or not argv:
        reason = f"{source} has exited or is a kernel thread: not AgentAPI; not signalling"
        log.info("agentapi.not_found", pid=pid, reason=reason)
        return None, reason
    if not _looks_like_agentapi(argv):
        reason = f"{source} is `{_show(argv)}`, not AgentAPI: pid reused; not signalling"
        log.warning("agentapi.not_ours", pid=pid, reason=reason)
        return None, reason
    environ = _read_environ(pid)
    process = AgentProcess(
        pid=pid,
        argv=argv,
        program=_program(pid, argv),
        state_file=_state_file(pid, argv, environ),
        save_state=_save_state(argv, environ),
        start_ticks=stat[1] if stat[1] >= 0 else None,
        configuration_known=environ is not None,
        initial_prompt=_initial_prompt(argv, environ),
    )
    log.info(
        "agentapi.found",
        pid=pid,
        program=str(process.program) if process.program else None,
        state_file=str(process.state_file) if process.state_file else None,
    )
    return process, f"{source} is AgentAPI (`{process.command}`)"


def clear_stale_pid_file(pid_file: Path) -> str | None:
    """Remove ``pid_file`` when its pid is not a running AgentAPI; the sentence saying so.

    AgentAPI removes its pid file only on a clean exit, and at start refuses to run while the
    pid in it is *any* live process (coder/agentapi cmd/server/server.go ``writePIDFile``,
    process_unix.go ``isProcessRunning``: signal 0 succeeds or EPERM). After a container
    restart that number often belongs to something else, and AgentAPI would never start.
    Only a file that holds a valid pid is touched, only when that pid is gone or provably not
    AgentAPI, and only if it still holds the same bytes right before the unlink. ``None``
    when nothing was removed.
    """
    pid, _problem = read_pid_file(pid_file)
    if pid is None:
        return None
    stat = process_state(pid)
    try:
        argv = _read_cmdline(pid)
    except OSError:
        return None  # identity unknown: leave it alone
    alive = stat is not None and bool(argv) and stat[0] not in _GONE_STATES
    if alive and argv is not None and _looks_like_agentapi(argv):
        return None  # a running AgentAPI: its file is its own
    again, _ = read_pid_file(pid_file)
    if again != pid:
        return None
    try:
        pid_file.unlink()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("agentapi.pid_file_kept", pid_file=str(pid_file), error=str(exc))
        return None
    why = (
        f"pid {pid} is `{_show(argv or ())}`, not AgentAPI, and AgentAPI refuses to start "
        "while the pid in its file is any live process"
        if alive
        else f"pid {pid} is not running"
    )
    log.info("agentapi.pid_file_removed", pid_file=str(pid_file), pid=pid, reason=why)
    return f"Removed the stale pid file {pid_file} ({why})."


def read_pid_file(pid_file: Path) -> tuple[int | None, str]:
    """The pid in ``pid_file``, or ``None`` and why not (missing, not a file, not a pid)."""
    try:
        # O_NONBLOCK: a FIFO in its place must not block us until someone writes to it.
        fd = os.open(pid_file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, f"no pid file at {pid_file} (AgentAPI not started, or keeps no pid file)"
    except OSError as exc:
        return None, f"cannot read pid file {pid_file}: {exc.strerror or exc}"
    try:
        if not S_ISREG(os.fstat(fd).st_mode):
            return None, f"pid file {pid_file} is not a regular file"
        raw = os.read(fd, _PID_FILE_MAX_BYTES + 1)
    except OSError as exc:
        return None, f"cannot read pid file {pid_file}: {exc.strerror or exc}"
    finally:
        os.close(fd)
    text = raw.decode("ascii", errors="replace").strip()
    if len(raw) > _PID_FILE_MAX_BYTES or not text.isdigit() or not text.isascii():
        shown = cap_text(repr(raw[:40]), 60) if text else "empty"
        return None, f"pid file {pid_file} does not hold a pid ({shown})"
    pid = int(text)
    if not 0 < pid <= _PID_MAX:
        return None, f"pid file {pid_file} holds {cap_text(text, 24)}, which is not a valid pid"
    return pid, ""


def _looks_like_agentapi(argv: Sequence[str]) -> bool:
    """argv[0] is agentapi, or argv[1] is (an interpreter running a script of that name),
    and it runs the ``server`` subcommand."""
    names = [os.path.basename(arg) for arg in argv[:2]]
    return "agentapi" in names and "server" in argv[1:]


def _program(pid: int, argv: Sequence[str]) -> Path | None:
    if os.path.basename(argv[0]) == "agentapi":
        return _PROC / str(pid) / "exe"
    script = argv[1]
    if "/" not in script:
        return None  # found on PATH by the interpreter; the fallback binary is our best guess
    return _resolve(pid, script)


def _resolve(pid: int, path: str) -> Path | None:
    """``path`` as the process sees it: relative paths are relative to its working directory."""
    if os.path.isabs(path):
        return Path(path)
    try:
        return Path(os.readlink(_PROC / str(pid) / "cwd")) / path
    except OSError:
        return None


#: AgentAPI's own options we read (coder/agentapi cmd/server/server.go, the flag table), with
#: their one-letter forms; ``--save-state`` is a boolean flag (``--save-state=false`` to unset).
_VALUE_OPTIONS = {"--state-file": "--state-file", "-s": "--state-file"}
_VALUE_OPTIONS |= {"--initial-prompt": "--initial-prompt", "-I": "--initial-prompt"}
_BOOL_OPTIONS = frozenset({"--save-state"})


def _options(argv: Sequence[str]) -> dict[str, str]:
    """``--name value`` / ``--name=value`` / ``-s value`` options of AgentAPI itself (before
    ``--``), under their long names."""
    found: dict[str, str] = {}
    args = list(argv[1:])
    for index, arg in enumerate(args):
        if arg == "--":
            break
        name, equals, value = arg.partition("=")
        if name in _VALUE_OPTIONS:
            if equals:
                found[_VALUE_OPTIONS[name]] = value
            elif index + 1 < len(args):
                found[_VALUE_OPTIONS[name]] = args[index + 1]
        elif name in _BOOL_OPTIONS:
            found[name] = value if equals else "true"
    return found


def _state_file(pid: int, argv: Sequence[str], environ: dict[str, str] | None) -> Path | None:
    value = _options(argv).get("--state-file") or (environ or {}).get("AGENTAPI_STATE_FILE")
    return _resolve(pid, value) if value else None


def _save_state(argv: Sequence[str], environ: dict[str, str] | None) -> bool | None:
    # Go's strconv.ParseBool spellings; like viper, anything else (but empty) reads as false.
    value = _options(argv).get("--save-state") or (environ or {}).get("AGENTAPI_SAVE_STATE")
    if not value:
        return None
    return value in _GO_TRUE


def _initial_prompt(argv: Sequence[str], environ: dict[str, str] | None) -> str | None:
    value = _options(argv).get("--initial-prompt")
    if value is None and environ is not None:
        value = environ.get("AGENTAPI_INITIAL_PROMPT")
    if value is None:
        return None
    return trim_prompt(value) or None


def _read_cmdline(pid: int) -> tuple[str, ...] | None:
    """argv of ``pid`` (empty for a zombie or kernel thread), ``None`` if there is no such
    process; other ``OSError``s (a ``hidepid`` mount) propagate: identity unknown."""
    try:
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    parts = raw.split(b"\0")
    if parts[-1] == b"":
        parts.pop()
    return tuple(os.fsdecode(part) for part in parts)


def process_state(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in ticks), or ``None`` when there is no such process."""
    try:
        raw = (_PROC / str(pid) / "stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return ("?", -1)
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return fields[0].decode("ascii", "replace"), int(fields[19])
    except (IndexError, ValueError):
        return ("?", -1)


def _read_environ(pid: int) -> dict[str, str] | None:
    try:
        raw = (_PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return None  # another user's process: its environment is private
    environ: dict[str, str] = {}
    for entry in raw.split(b"\0"):
        key, equals, value = entry.partition(b"=")
        if equals:
            environ[os.fsdecode(key)] = os.fsdecode(value)
    return environ


def _show(argv: Sequence[str]) -> str:
    return cap_text(shlex.join(argv), 120)


# -- version -----------------------------------------------------------------------------


async def detect_version(
    process: AgentProcess | None,
    *,
    fallback_bin: str,
    budget: Budget,
    cap_s: float = VERSION_CAP_S,
) -> Version | None:
    """Run ``<program> --version`` (the running process's own binary first, then
    ``fallback_bin``) and parse ``agentapi version X.Y.Z``. ``None`` when no candidate
    answered that within its slice of the budget (at most ``cap_s`` each)."""
    key = _version_key(process)
    cached = _KNOWN_VERSIONS.get(key) if key is not None else None
    if cached is not None:
        log.info("agentapi.version", version=str(cached), source="cached", ms=0)
        return cached
    candidates: list[tuple[str, str]] = []
    if process is not None and process.program is not None:
        candidates.append((str(process.program), "process"))
    if fallback_bin and fallback_bin not in (command for command, _ in candidates):
        candidates.append((fallback_bin, "fallback"))
    problems: list[str] = []
    for command, source in candidates:
        seconds = budget.slice(cap_s)
        if seconds <= 0:
            problems.append("no time left in the budget")
            break
        started = time.monotonic()
        output, problem = await _run_version(command, seconds)
        version = Version.parse(output) if output is not None else None
        if version is not None:
            if key is not None and source == "process":
                _KNOWN_VERSIONS[key] = version
            log.info(
                "agentapi.version",
                version=str(version),
                source=source,
                program=command,
                ms=round((time.monotonic() - started) * 1000),
            )
            return version
        if output is not None:
            problem = f"`{command} --version` printed {cap_text(output.strip(), 80)!r}"
        problems.append(problem)
    log.warning("agentapi.version_unknown", problems=problems)
    return None


#: Versions learnt from a running process's own binary, by (pid, start time): that pair names
#: one process for good, and its binary's version cannot change while it runs. A sidecar
#: learns it when it connects (``learn_version``), so that the stop runs no subprocess.
_KNOWN_VERSIONS: dict[tuple[int, int], Version] = {}


def _version_key(process: AgentProcess | None) -> tuple[int, int] | None:
    if process is None or process.start_ticks is None or process.program is None:
        return None
    return (process.pid, process.start_ticks)


async def learn_version(pid_file: Path, *, fallback_bin: str) -> Version | None:
    """Find the running AgentAPI and learn its version ahead of a stop (cached for the life
    of that process). ``None`` when it is not running or does not say."""
    process, _ = find_agentapi(pid_file)
    if process is None:
        return None
    return await detect_version(process, fallback_bin=fallback_bin, budget=Budget(2.0))


async def _run_version(command: str, seconds: float) -> tuple[str | None, str]:
    """Output of ``command --version`` (``None`` and why, if it did not run or finish)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            command,
            "--version",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError as exc:
        return None, f"cannot run `{command} --version`: {exc.strerror or exc}"
    output = b""
    try:
        async with asyncio.timeout(seconds):
            assert proc.stdout is not None  # we asked for a pipe
            while len(output) < _VERSION_OUTPUT_MAX:
                chunk = await proc.stdout.read(_VERSION_OUTPUT_MAX - len(output))
                if not chunk:
                    break
                output += chunk
            await proc.wait()
    except TimeoutError:
        if not output:
            return None, f"`{command} --version` did not answer within {seconds:.2f} s"
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    return output.decode("utf-8", errors="replace"), ""


# -- signals -----------------------------------------------------------------------------

_Verdict = Literal["ours", "gone", "not_ours"]


def is_alive(process: AgentProcess) -> bool:
    """True while this very process (same pid *and* start time) runs and is not a zombie."""
    stat = process_state(process.pid)
    if stat is None or stat[0] in _GONE_STATES:
        return False
    return process.start_ticks is None or stat[1] in (process.start_ticks, -1)


def _identity(process: AgentProcess) -> tuple[_Verdict, str]:
    """Is ``process.pid`` still the AgentAPI we found? Checked right before a signal."""
    stat = process_state(process.pid)
    try:
        argv = _read_cmdline(process.pid)
    except OSError as exc:
        return "not_ours", f"cannot read /proc/{process.pid}/cmdline ({exc.strerror})"
    if stat is None or argv is None or stat[0] in _GONE_STATES:
        return "gone", f"pid {process.pid} has exited"
    if process.start_ticks is not None and stat[1] not in (process.start_ticks, -1):
        return "not_ours", f"pid {process.pid} is now `{_show(argv)}`, started later: pid reused"
    if argv != process.argv:
        return "not_ours", f"pid {process.pid} is now `{_show(argv)}`, not AgentAPI: pid reused"
    return "ours", ""


@contextlib.contextmanager
def _pidfd(pid: int) -> Iterator[int | None]:
    """A pidfd for ``pid`` (``None`` where the kernel has none): checking identity after
    opening it and signalling through it cannot hit a process that reused the pid."""
    try:
        fd: int | None = os.pidfd_open(pid)
    except ProcessLookupError:
        fd = None  # gone: the identity check says so
    except (OSError, AttributeError):
        fd = None
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def send_signal(process: AgentProcess, sig: signal.Signals) -> tuple[str, str]:
    """Send ``sig`` through a pidfd if the pid is still this AgentAPI: ``("sent" | "gone" |
    "not_ours" | "denied", why)``."""
    with _pidfd(process.pid) as fd:
        return _send(process, sig, fd)


def _send(process: AgentProcess, sig: signal.Signals, fd: int | None) -> tuple[str, str]:
    """Send ``sig`` if the pid is still ours: ("sent" | "gone" | "not_ours" | "denied", why)."""
    verdict, why = _identity(process)
    if verdict != "ours":
        return verdict, why
    try:
        if fd is not None:
            signal.pidfd_send_signal(fd, sig)
        else:
            os.kill(process.pid, sig)
    except ProcessLookupError:
        return "gone", f"pid {process.pid} exited before {sig.name} reached it"
    except PermissionError:
        return "denied", f"not permitted to signal pid {process.pid} (another user's process)"
    return "sent", ""


async def stop(process: AgentProcess, *, budget: Budget) -> StopResult:
    """SIGTERM AgentAPI (if the pid is still it) and wait for it to exit, within the budget.

    AgentAPI saves its state on SIGTERM and stops serving HTTP right after, so fetch what
    you need first. There is no SIGKILL here: killing it would lose that save.
    """
    started = time.monotonic()

    def done(outcome: StopOutcome, detail: str, *, signalled: bool = False) -> StopResult:
        ms = round((time.monotonic() - started) * 1000)
        log.info("agentapi.stopped", outcome=str(outcome), ms=ms, pid=process.pid, detail=detail)
        return StopResult(outcome, detail, ms, signalled)

    with _pidfd(process.pid) as fd:
        verdict, why = _send(process, signal.SIGTERM, fd)
        if verdict == "gone":
            return done(StopOutcome.NOT_RUNNING, why)
        if verdict == "not_ours":
            log.warning("agentapi.not_ours", pid=process.pid, reason=why)
            return done(StopOutcome.NOT_OURS, f"{why}; not signalling")
        if verdict == "denied":
            return done(StopOutcome.NOT_PERMITTED, why)
        exited = await _wait_exit(process, fd, budget.slice())
    seconds = time.monotonic() - started
    if exited:
        return done(
            StopOutcome.EXITED, f"exited {seconds * 1000:.0f} ms after SIGTERM", signalled=True
        )
    return done(
        StopOutcome.STILL_RUNNING,
        f"still running {seconds:.2f} s after SIGTERM (budget spent)",
        signalled=True,
    )


async def _wait_exit(process: AgentProcess, fd: int | None, seconds: float) -> bool:
    """Wait up to ``seconds`` for the process to exit: a pidfd turns readable when it does,
    so the loop sleeps in epoll rather than polling; without one, poll ``/proc``."""
    if fd is None:
        return await _poll_exit(process, seconds)
    loop = asyncio.get_running_loop()
    exited = loop.create_future()

    def on_readable() -> None:
        if not exited.done():
            exited.set_result(None)

    try:
        loop.add_reader(fd, on_readable)
    except (OSError, NotImplementedError, ValueError):
        return await _poll_exit(process, seconds)
    try:
        async with asyncio.timeout(max(seconds, 0.0)):
            await exited
        return True
    except TimeoutError:
        return not is_alive(process)
    finally:
        loop.remove_reader(fd)


async def _poll_exit(process: AgentProcess, seconds: float) -> bool:
    """The fallback wait: look at ``/proc`` every few milliseconds, within ``seconds``."""
    deadline = time.monotonic() + seconds
    while is_alive(process):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        await asyncio.sleep(min(0.02, left))
    return True
