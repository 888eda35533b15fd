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

The lock says who writes; ``claim`` says whose conversation the directory holds. The first
writer records its ``Instance`` in ``<state-dir>/instance.json``; from then on a command for
another instance (another module directory, port, state file or task) is refused with
``ForeignStateDir`` before it reads or writes anything there, so that module B's stop can never
upload, restore or overwrite module A's conversation.
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

from ._fsutil import ensure_private_dir, quarantine, read_json_record, write_atomic
from .errors import ForeignStateDir, PersistError, StateDirBusy
from .identity import Instance
from .store import holds_a_copy

__all__ = [
    "INSTANCE_NAME",
    "LOCK_NAME",
    "StateDirLock",
    "claim",
    "held_by",
    "read_owner",
    "take_lock",
]

log = structlog.get_logger(__name__)

LOCK_NAME = "lock"
INSTANCE_NAME = "instance.json"
_INSTANCE_FORMAT = "agentapi-persist-instance"
_INSTANCE_MAX_BYTES = 64 * 1024
_POLL_S = 0.02
_HOLDER_MAX_BYTES = 4096
_HOLDER_WAIT_POLLS = 10


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
    for _ in range(_HOLDER_WAIT_POLLS):
        if "pid" in holder:
            break
        # The holder writes who it is just after it takes the lock: a writer that lost a
        # race by microseconds would otherwise name "pid ? (unknown)".
        time.sleep(_POLL_S)
        holder = _read_holder(fd) or {}
    who = f"pid {holder.get('pid', '?')} ({holder.get('purpose', 'unknown')})"
    waited = f" after waiting {wait_s:.1f} s" if wait_s > 0 else ""
    return (
        f"{state_dir} is in use by {who}{waited}: one writer at a time, so this {purpose} "
        "wrote nothing there"
    )


def read_owner(state_dir: Path) -> Instance | None:
    """The instance ``state_dir`` belongs to, ``None`` when it records none (a new directory,
    one written before instance records, or an unreadable record). Never raises."""
    document = read_json_record(state_dir / INSTANCE_NAME, _INSTANCE_MAX_BYTES)
    if document is None or document.get("format") != _INSTANCE_FORMAT:
        return None
    return Instance.from_dict(document.get("instance"))


def claim(state_dir: Path, instance: Instance, *, write: bool) -> str | None:
    """Check that ``state_dir`` holds ``instance``'s conversation; record it when it records
    no owner (or knows less) and ``write`` (the caller holds the lock).

    Raises ``ForeignStateDir`` naming both instances when the directory belongs to another.
    Returns a sentence when it adopted a directory that had no owner yet but held a copy (a
    directory given with ``--state-dir`` to a release before instance records), else ``None``.
    A record that cannot be written is logged and left: the store's own write reports the
    real failure, and the snapshot still runs.
    """
    path = state_dir / INSTANCE_NAME
    owner = read_owner(state_dir)
    if owner is not None:
        differences = instance.differences(owner, by_port=False)
        if differences:
            raise ForeignStateDir(
                f"{state_dir} holds the conversation of {owner.describe()}, not of "
                f"{instance.describe()} (it records {'; '.join(differences)}): one state "
                "directory per instance, so nothing was read or written there. Give each "
                "instance its own --state-dir, or leave it unset (the default is one directory "
                "per module directory)"
            )
        record = instance.merged(owner)
        if not write or record == owner:
            return None
    elif not write:
        return None
    else:
        record = instance
    adopted = None
    if owner is None and holds_a_copy(state_dir):
        adopted = (
            f"{state_dir} held a copy with no owner recorded (written before instance records): "
            f"adopted it for {instance.describe()}"
        )
    if owner is None and _present(path):
        # A record that does not parse: its bytes are kept for a person, then replaced.
        with contextlib.suppress(OSError, PersistError):
            quarantine(path, reason="unreadable instance record")
    document = {"format": _INSTANCE_FORMAT, "format_version": 1, "instance": record.as_dict()}
    try:
        write_atomic(path, json.dumps(document, ensure_ascii=False).encode() + b"\n")
    except (OSError, PersistError) as exc:
        log.warning("ownership.claim_unwritten", path=str(path), error=str(exc))
        return adopted
    log.info("ownership.claimed", path=str(path), module_dir=record.module_dir, port=record.port)
    return adopted


def _present(path: Path) -> bool:
    """Whether something is at ``path``; a directory that cannot be searched holds nothing
    this process could read (the write that follows reports the real failure)."""
    try:
        os.lstat(path)
    except OSError:
        return False
    return True
