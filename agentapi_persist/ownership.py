"""One writer per state directory: an exclusive lock, held by whoever writes.

The sidecar holds it for its whole life; a one-shot command that writes (``shutdown`` run
in-process, ``restore``) holds it while it works, and takes it before any repair or write. The
lock is ``flock(2)`` on ``<state-dir>/lock``: the kernel releases it when its holder exits,
however it exits, so a crashed holder never leaves a stale lock (the file itself stays; it is
not the lock, only where the lock lives). The holder writes its pid and what it is doing into
the file, so a refused second writer can say who holds the directory.

A second writer waits up to its ``wait_s`` and then refuses with ``StateDirBusy``: two writers
would interleave journal records and generations (one truncating the other's records), and a
``restore`` under a running sidecar would write a generation the sidecar never sees.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from ._fsutil import ensure_private_dir
from .errors import PersistError, StateDirBusy

__all__ = ["LOCK_NAME", "StateDirLock", "held_by", "take_lock"]

log = structlog.get_logger(__name__)

LOCK_NAME = "lock"
_POLL_S = 0.02
_HOLDER_MAX_BYTES = 4096


@dataclass(slots=True)
class StateDirLock:
    """A held lock; ``release`` (or process exit) gives it up."""

    path: Path
    fd: int | None

    def release(self) -> None:
        """Give the lock up (closing the descriptor releases it)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def take_lock(state_dir: Path, *, purpose: str, wait_s: float = 0.0) -> StateDirLock:
    """Take ``state_dir``'s writer lock for ``purpose`` (``"sidecar"``, ``"shutdown"``, ...).

    Waits up to ``wait_s`` for a holder to finish; raises ``StateDirBusy`` naming the holder
    if it does not. Creates the directory (0700) and the lock file (0600) when missing. When
    the lock file cannot be made at all (a read-only or full filesystem, a symlinked
    directory), nobody can write there either: the caller goes on unlocked, so that its own
    write reports the real failure and the rest of the stop (the snapshot) still runs.
    """
    path = state_dir / LOCK_NAME
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        ensure_private_dir(state_dir)
        fd = os.open(path, flags, 0o600)
    except (OSError, PersistError) as exc:
        log.warning("ownership.lock_unavailable", path=str(path), error=str(exc))
        return StateDirLock(path, None)
    deadline = time.monotonic() + max(wait_s, 0.0)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StateDirBusy(_refusal(state_dir, fd, purpose, wait_s)) from None
                time.sleep(_POLL_S)
        holder = {"pid": os.getpid(), "purpose": purpose, "since": time.time()}
        with contextlib.suppress(OSError):  # who holds it is for messages; the lock is held
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode() + b"\n", 0)
    except BaseException:
        os.close(fd)
        raise
    return StateDirLock(path, fd)


def held_by(state_dir: Path) -> dict[str, object] | None:
    """Who holds ``state_dir``'s lock right now (pid, purpose), ``{}`` if held by someone who
    did not say, ``None`` if nobody holds it. Takes nothing: a shared probe, let go at once."""
    try:
        fd = os.open(state_dir / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd) or {}
        except OSError:
            return None
        return None
    finally:
        os.close(fd)


def _read_holder(fd: int) -> dict[str, object] | None:
    try:
        data = json.loads(os.pread(fd, _HOLDER_MAX_BYTES, 0) or b"null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _refusal(state_dir: Path, fd: int, purpose: str, wait_s: float) -> str:
    holder = _read_holder(fd) or {}
    who = f"pid {holder.get('pid', '?')} ({holder.get('purpose', 'unknown')})"
    waited = f" after waiting {wait_s:.1f} s" if wait_s > 0 else ""
    return (
        f"{state_dir} is in use by {who}{waited}: one writer at a time, so this {purpose} "
        "wrote nothing there"
    )
