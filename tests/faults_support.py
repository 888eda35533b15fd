"""Helpers for the crash-point and disk-fault tests (test_faults_crash.py, test_faults_disk.py).

Four tools, each doing one real thing:

- **Mounts**: a tiny tmpfs (disk full), a read-only bind remount, and ``fill`` to use up the
  last byte of a filesystem. Tests that need them skip with the reason when mounting is not
  allowed here (CI runs as root).
- **strace**: the command prefix that injects a fault into chosen syscalls of the real
  interpreter, with a log of every traced call (``-y``: each fd is shown with its path) so a
  test can prove *which* call was hit and that it was not retried.
- **The crash zygote**: a process that imports everything once, then for each trial forks a
  writer, lets it write for a chosen number of microseconds and SIGKILLs it. The states the
  writers write are pure functions of a step number (``big_state``, ``journal_state``), so
  the test knows exactly what each survivor must hold.
- **PowerLossRecorder**: runs one write in this thread and records, just before each
  file-system call it makes, every directory image a power loss at that instant could leave:
  directory operations kept or lost (not yet made durable by a directory fsync) times unsynced
  file data kept, dropped, torn or garbled.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import linecache
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from agentapi_persist.agentapi_state import write_agentapi_state
from agentapi_persist.models import Conversation, Message
from agentapi_persist.store import StateStore

MB = 1024 * 1024
TIME = "2025-01-02T03:04:05.123456789Z"
REPO = Path(__file__).resolve().parents[1]

# -- strace ------------------------------------------------------------------------------------

STRACE = shutil.which("strace")
needs_strace = pytest.mark.skipif(
    STRACE is None, reason="strace is not installed (CI installs it to inject EIO/ENOSPC)"
)


def strace_prefix(log: Path, *qualifiers: str, per_thread: bool = False) -> list[str]:
    """``strace -f`` on the real interpreter: trace/inject per ``qualifiers``, log to ``log``.

    ``-y`` shows the path behind each fd. ``per_thread`` (``-ff``) writes one log per thread
    instead (``<log>.<tid>``, read with ``thread_logs``): no call is then split across lines
    by another thread's, and per-thread order is plain to see.
    """
    assert STRACE is not None
    follow = "-ff" if per_thread else "-f"
    args = [STRACE, follow, "-qq", "-y", "--seccomp-bpf", "-e", "signal=none", "-o", str(log)]
    for qualifier in qualifiers:
        args += ["-e", qualifier]
    return args


def thread_logs(log: Path) -> list[list[str]]:
    """Each traced thread's log lines (``strace_prefix(..., per_thread=True)``)."""
    return [
        path.read_text(errors="replace").splitlines()
        for path in sorted(log.parent.glob(f"{log.name}.*"))
    ]


def injected_calls(log: Path) -> list[str]:
    """The syscalls strace made fail on purpose, from per-thread logs (any thread)."""
    return [line for lines in thread_logs(log) for line in lines if "(INJECTED)" in line]


def fsync_retried(log: Path, failed: str) -> bool:
    """Did the thread whose fsync ``failed`` (a log line) fsync the same file again next?

    A new write to another file fsyncs that file first, so the same thread's next fsync on the
    same path can only be a retry of the failed one.
    """
    path = failed.split("<", 1)[1].split(">", 1)[0]
    for lines in thread_logs(log):
        if failed in lines:
            later = [line for line in lines[lines.index(failed) + 1 :] if "fsync(" in line]
            return bool(later) and f"<{path}>" in later[0]
    raise AssertionError(f"{failed!r} is not in the strace logs")


# -- mounts ------------------------------------------------------------------------------------


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, check=False)


def _umount(path: Path) -> None:
    done = subprocess.run(["umount", str(path)], capture_output=True, check=False)
    if done.returncode != 0:  # something still holds it open: detach it now, free it later
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@contextmanager
def tmpfs(path: Path, *, size: str) -> Iterator[Path]:
    """A fresh tmpfs of ``size`` mounted at ``path`` (created), unmounted afterwards."""
    if shutil.which("mount") is None:
        pytest.skip("mount(8) is not available")
    path.mkdir(parents=True, exist_ok=True)
    done = _mount("-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path))
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here (needs CAP_SYS_ADMIN): {done.stderr.strip()}; a full "
            "disk is still tried without mounts (strace ENOSPC, RLIMIT_FSIZE in test_faults_disk)"
        )
    try:
        yield path
    finally:
        _umount(path)


@contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """``path`` bind-mounted over itself and remounted read-only; writable again afterwards."""
    if shutil.which("mount") is None:
        pytest.skip("mount(8) is not available")
    done = _mount("--bind", str(path), str(path))
    if done.returncode != 0:
        pytest.skip(
            f"cannot bind-mount here (needs CAP_SYS_ADMIN): {done.stderr.strip()}; a read-only "
            "volume is still tried without mounts (strace EROFS: journal-open-EROFS)"
        )
    try:
        done = _mount("-o", "remount,bind,ro", str(path))
        if done.returncode != 0:
            pytest.skip(
                f"cannot remount read-only here: {done.stderr.strip()}; a read-only volume is "
                "still tried without mounts (strace EROFS: journal-open-EROFS)"
            )
        yield path
    finally:
        _umount(path)


def fill(directory: Path) -> Path:
    """Use up every free byte of the filesystem holding ``directory``; return the filler.

    Writes shrinking chunks until even one byte gets ENOSPC, so what is left is at most the
    slack in the last page of files that already exist (real disks have that too).
    """
    filler = directory / "filler.bin"
    chunk = 1 << 20
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while chunk:
            try:
                os.write(fd, b"\0" * chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                chunk //= 2
    finally:
        os.close(fd)
    return filler


def temp_files(directory: Path) -> list[str]:
    """Temp files ``write_atomic`` would leave behind (``.<name>.<random>.tmp``)."""
    if not directory.exists():
        return []
    return sorted(name for name in os.listdir(directory) if name.endswith(".tmp"))


# -- the CLI as a process -----------------------------------------------------------------------


def fsize_prefix(limit: int) -> list[str]:
    """Exec the command with RLIMIT_FSIZE = ``limit``: a write past it fails with EFBIG.

    Python ignores SIGXFSZ at startup, so the write reports EFBIG instead of killing us.
    """
    code = (
        "import os, resource, sys; "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    return [sys.executable, "-c", code]


# -- states the crash writers write: pure functions of a step number -----------------------------

_BODY = 16 * 1024
JOURNAL_BASE_MESSAGES = 10 * MB // _BODY


@functools.cache
def _bulk(i: int) -> Message:
    text = (f"m{i} " + "0123456789abcdef" * (_BODY // 16))[:_BODY]
    return Message(id=i, role="user" if i % 2 == 0 else "agent", content=text, time=TIME)


@functools.cache
def _final(i: int) -> Message:
    return Message(
        id=i, role="user" if i % 2 == 0 else "agent", content=f"extra {i} final " * 30, time=TIME
    )


def big_state(k: int) -> Conversation:
    """Step ``k``: 5-30 MB of 16 KiB messages (the size hops around with k), then a marker."""
    size = 5 * MB + (k * 7_919_993) % (25 * MB)
    count = size // _BODY
    last = Message(id=count, role="agent", content=f"step {k}|" + "z" * (k % 997), time=TIME)
    return Conversation.model_construct(
        messages=(*(_bulk(i) for i in range(count)), last),
        initial_prompt="build it",
        initial_prompt_sent=k >= 3,
        prompt_origin="agentapi_state",
    )


def journal_state(k: int) -> Conversation:
    """Step ``k`` on a 10 MB base: a new message every third step, the last one growing."""
    extra = k // 3
    base = JOURNAL_BASE_MESSAGES
    last_id = base + extra
    last = Message(
        id=last_id,
        role="agent",
        content=f"step {k}|" + "y" * ((k * 7919) % 30_000),
        time=TIME,
    )
    return Conversation.model_construct(
        messages=(
            *(_bulk(i) for i in range(base)),
            *(_final(i) for i in range(base, last_id)),
            last,
        ),
        initial_prompt="build it",
        initial_prompt_sent=k >= 2,
        prompt_origin="agentapi_state",
    )


def step_of(messages: tuple[Message, ...] | None) -> int:
    """The step a state was built for (0 when nothing is stored)."""
    if not messages:
        return 0
    return int(messages[-1].content.split("|", 1)[0].split()[1])


# -- the writers the zygote forks (they run in the child; ``ack`` is a pipe) ---------------------


_READY_AT = [0.0]


def _ack(fd: int, text: str) -> None:
    """``r`` once ready (the kill delay counts from here); then ``<label>@<µs since ready>``."""
    if text == "r":
        _READY_AT[0] = time.monotonic()
        os.write(fd, b"r\n")
        return
    elapsed_us = round((time.monotonic() - _READY_AT[0]) * 1e6)
    os.write(fd, f"{text}@{elapsed_us}\n".encode())


def write_generations(directory: Path, ack: int, last: int) -> None:
    """Save ever newer 5-30 MB generations until killed; ack each step once it returned."""
    store = StateStore(directory)
    conversation = store.load().conversation
    k = step_of(conversation.messages if conversation else None)
    _ack(ack, "r")
    while True:
        k += 1
        store.save(big_state(k), allow_shrink=True)
        _ack(ack, str(k))


def write_journal(directory: Path, ack: int, last: int) -> None:
    """Append each step's change to the journal; every 4th step also compact (fold it into a
    new generation). Acks ``k`` after an append, ``c<k>`` after a compaction."""
    store = StateStore(directory)
    conversation = store.load().conversation
    k = step_of(conversation.messages if conversation else None)
    _ack(ack, "r")
    while True:
        k += 1
        target = journal_state(k)
        store.append(target.messages[-2:], prompt=target)
        _ack(ack, str(k))
        if k % 4 == 0:
            store.compact()
            _ack(ack, f"c{k}")


def write_agentapi_files(path: Path, ack: int, last: int) -> None:
    """Rewrite AgentAPI's state file with ever newer 5-30 MB states until killed, starting
    after ``last`` (the step the test found in the file: reading 30 MB here would only make
    each trial slower)."""
    k = last
    _ack(ack, "r")
    while True:
        k += 1
        write_agentapi_state(path, big_state(k))
        _ack(ack, str(k))


def run_restore(settings_json: Path, ack: int, last: int) -> None:
    """One ``restore`` (the boot step) with the settings in ``settings_json``; ack when done."""
    from agentapi_persist.config import Settings
    from agentapi_persist.restoring import restore

    settings = Settings.load(json.loads(settings_json.read_text()), env={})
    _ack(ack, "r")
    report = restore(settings, force=True)
    _ack(ack, report.outcome)
    os._exit(0)


WRITERS: dict[str, Callable[[Path, int, int], None]] = {
    "generations": write_generations,
    "journal": write_journal,
    "agentapi_state": write_agentapi_files,
    "restore": run_restore,
}


def warm(mode: str) -> None:
    """Build the shared message objects once, in the zygote, so every fork inherits them."""
    if mode in ("generations", "agentapi_state"):
        big_state(0)
        for i in range(30 * MB // _BODY + 1):
            _bulk(i)
    elif mode == "journal":
        journal_state(0)


ZYGOTE = r"""
import json, logging, os, signal, sys, time
from pathlib import Path
import structlog
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
from tests import faults_support as support

mode, target = sys.argv[1], Path(sys.argv[2])
writer = support.WRITERS[mode]
support.warm(mode)
print("warm", flush=True)
for line in sys.stdin:
    delay_us, last = map(int, line.split())
    delay = delay_us / 1_000_000
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            writer(target, w, last)
        finally:
            os._exit(1)
    os.close(w)
    ready = os.read(r, 2)  # b"r\n": loaded, about to write; the delay counts from here
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    rest = b""
    while chunk := os.read(r, 65536):
        rest += chunk
    os.close(r)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    print(json.dumps({"ready": ready == b"r\n", "acks": rest.decode().split(), "killed": killed}),
          flush=True)
"""


@dataclass
class Trial:
    ready: bool
    """The writer got as far as its first write (a writer that failed to start says False)."""
    raw: list[str]
    killed: bool
    delay_us: int

    @property
    def acks(self) -> list[str]:
        """What the writer reported done before it died, in order."""
        return [entry.split("@", 1)[0] for entry in self.raw]

    @property
    def times_us(self) -> list[int]:
        """When each of ``acks`` was done, in µs since the writer was ready."""
        return [int(entry.split("@", 1)[1]) for entry in self.raw]


class KillClock:
    """Kill delays: a seeded random fraction of how long one write takes here, now.

    A fixed range would land every kill before the first write on a loaded machine, or after
    the last on a fast one; so the range follows the measured time per write (learned from
    the writers' acknowledgements: the time a writer lived divided by the writes it finished,
    in-flight time included, so a slow compaction between appends counts) and ``span`` says
    how many writes it covers.
    """

    MAX_DELAY_US = 3_000_000

    def __init__(self, rng: random.Random, *, span: float, initial_us: int = 200_000) -> None:
        self.rng = rng
        self.span = span
        self.write_us = float(initial_us)

    def next(self) -> int:
        return min(int(self.rng.random() * self.span * self.write_us), self.MAX_DELAY_US)

    def learn(self, trial: Trial) -> None:
        steps = sum(1 for label in trial.acks if not label.startswith("c"))
        if not trial.killed:  # it finished on its own: exact
            measured = trial.times_us[-1] / max(steps, 1)
        elif steps:
            measured = trial.delay_us / steps
        else:  # killed before one write finished: a write takes at least that long
            measured = max(trial.delay_us, self.write_us * 1.15)
        self.write_us = 0.7 * self.write_us + 0.3 * measured


class Zygote:
    """The crash zygote as a context manager: ``zygote.trial(delay_us)`` runs one kill."""

    def __init__(self, mode: str, target: Path) -> None:
        self.mode = mode
        self.target = target
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Zygote:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        self._proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE, self.mode, str(self.target)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            bufsize=1,
        )
        assert self._proc.stdout is not None
        assert self._proc.stdout.readline().strip() == "warm"
        return self

    def trial(self, delay_us: int, *, last: int = 0) -> Trial:
        """Fork a writer, SIGKILL it ``delay_us`` after it is ready; ``last`` is the step the
        test last verified (writers that cannot cheaply find it themselves start there)."""
        assert self._proc is not None
        assert self._proc.stdin is not None
        assert self._proc.stdout is not None
        self._proc.stdin.write(f"{delay_us} {last}\n")
        line = self._proc.stdout.readline()
        assert line, "the crash zygote died"
        outcome = json.loads(line)
        return Trial(outcome["ready"], outcome["acks"], outcome["killed"], delay_us)

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        finally:
            if self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait()
            if self._proc.stdout is not None:
                self._proc.stdout.close()


# -- power loss, step by step -------------------------------------------------------------------

_OPS = frozenset(
    {"open", "write", "pwrite", "ftruncate", "fsync", "close", "replace", "rename", "unlink"}
)


@dataclass(frozen=True)
class Image:
    """What the directory could hold after a power loss at ``point``."""

    point: str
    """Where the write was: ``#<n> <function>: before <call> [<step>]``, or ``#<n> returned``
    once the write returned (the caller was told it is durable)."""
    variant: str
    """``dir=<kept|lost>,data=<kept|dropped|torn|garbled>``."""
    files: dict[str, bytes]
    durable_only: bool
    """True for the image that holds exactly what was made durable (nothing unsynced)."""
    digest: str
    """Same digest, same files: checkers run each distinct image once."""


@dataclass
class PowerLossRecorder:
    """Run a write here and record every image a power loss during it could leave behind.

    The model, per the POSIX/Linux rules the write protocol relies on: file data is on disk
    only once that file was fsynced; a create, rename or unlink in ``directory`` is on disk only
    once the directory was fsynced. Before that, each may or may not have happened: "dir=lost"
    takes the directory as of its last fsync, "dir=kept" as it is now. Unsynced data is
    "kept", "dropped" (back to its last fsynced bytes: empty for a new file), "torn" (cut at a
    random point) or "garbled" (random bytes over the unsynced tail). Top-level regular files
    only. The write runs unmodified: the recorder only looks (``sys.setprofile``) before each
    call and after each fsync.
    """

    directory: Path
    seed: int
    images: list[Image] = field(default_factory=list)
    points: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._dir_ino = os.stat(self.directory).st_ino
        names, data = self._live()
        self._durable_names: dict[str, int] = names
        self._durable_data: dict[int, bytes] = data
        self._seen_inodes = set(data)
        self._freed: set[int] = set()

    def run(self, write: Callable[[], Any]) -> Any:
        """Call ``write()`` with the recorder watching; the last point is "returned"."""
        previous = sys.getprofile()
        sys.setprofile(self._profile)
        try:
            result = write()
        finally:
            sys.setprofile(previous)
        self._checkpoint("returned")
        return result

    def _profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if event not in ("c_call", "c_return") or getattr(arg, "__module__", None) != "posix":
            return
        name = getattr(arg, "__name__", "")
        if name not in _OPS:
            return
        if event == "c_call":
            step = frame.f_locals.get("step")
            where = f"{frame.f_code.co_name}: before {name}" + (f" [{step}]" if step else "")
            self._checkpoint(where)
        elif name == "fsync":
            self._fsynced(frame)

    def _fsynced(self, frame: FrameType) -> None:
        # The profiler is not told the arguments: read them off the calling line instead.
        line = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
        match = re.search(r"\bfsync\((\w+)\)", line)
        assert match is not None, f"cannot tell which fd this fsync is for: {line.strip()!r}"
        fd = frame.f_locals[match[1]]
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            if info.st_ino == self._dir_ino:
                self._durable_names, _ = self._live()
            return
        with open(f"/proc/self/fd/{fd}", "rb") as f:
            self._durable_data[info.st_ino] = f.read()

    def _live(self) -> tuple[dict[str, int], dict[int, bytes]]:
        names: dict[str, int] = {}
        data: dict[int, bytes] = {}
        for name in os.listdir(self.directory):
            path = self.directory / name
            try:
                info = os.lstat(path)
                if not stat.S_ISREG(info.st_mode):
                    continue
                data[info.st_ino] = path.read_bytes()
            except FileNotFoundError:
                continue
            names[name] = info.st_ino
        return names, data

    def _checkpoint(self, point: str) -> None:
        names, data = self._live()
        for gone in self._seen_inodes - set(data):
            self._freed.add(gone)
        reused = self._freed & set(data)
        assert not reused, f"inode reused at {point}; the model cannot tell the files apart"
        self._seen_inodes |= set(data)
        point = f"#{len(self.points)} {point}"
        self.points.append(point)
        for dir_variant, mapping in (("kept", names), ("lost", self._durable_names)):
            for data_variant in ("kept", "dropped", "torn", "garbled"):
                files = {
                    name: self._content(ino, data, data_variant) for name, ino in mapping.items()
                }
                durable_only = dir_variant == "lost" and data_variant == "dropped"
                variant = f"dir={dir_variant},data={data_variant}"
                self.images.append(Image(point, variant, files, durable_only, _digest(files)))

    def _content(self, ino: int, live: dict[int, bytes], variant: str) -> bytes:
        durable = self._durable_data.get(ino)
        current = live.get(ino)
        if current is None:  # replaced or unlinked since: its last durable bytes
            return durable if durable is not None else b""
        if current == durable or variant == "kept":
            return current
        base = durable or b""
        if variant == "dropped":
            return base
        common = 0
        limit = min(len(base), len(current))
        while common < limit and base[common] == current[common]:
            common += 1
        if variant == "torn":
            return current[: self._rng.randint(common, max(common, len(current) - 1))]
        return current[:common] + self._rng.randbytes(len(current) - common)


def _digest(files: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return digest.hexdigest()


def materialize(image: Image, directory: Path) -> Path:
    """Write ``image`` as a fresh directory (0700, files 0600) and return it."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(mode=0o700, parents=True)
    for name, data in image.files.items():
        path = directory / name
        path.write_bytes(data)
        path.chmod(0o600)
    return directory


def bytes_kept(image: Image, directory: Path) -> list[str]:
    """Names from ``image`` whose bytes are no longer anywhere in ``directory`` (should be [])."""
    present: dict[bytes, int] = {}
    for path in directory.iterdir():
        if path.is_file():
            key = hashlib.sha256(path.read_bytes()).digest()
            present[key] = present.get(key, 0) + 1
    lost = []
    for name, data in image.files.items():
        key = hashlib.sha256(data).digest()
        if present.get(key, 0) == 0:
            lost.append(name)
        else:
            present[key] -= 1
    return lost


def age(paths: list[Path], seconds: float) -> None:
    """Make ``paths`` look ``seconds`` old (the stale-temp sweeps go by modification time)."""
    then = time.time() - seconds
    for path in paths:
        with suppress(FileNotFoundError):
            os.utime(path, (then, then))
