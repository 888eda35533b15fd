"""Which version of AgentAPI's state file the sidecar's copy last agreed with.

When AgentAPI's file and the sidecar's copy diverge (neither extends the other), one of them
was written after the two last agreed, and that one is the newer conversation. Wall clocks
cannot say which: a clock set a day ahead, or a copy restored from a backup, would win for
ever. So whenever the two are known to hold the same conversation (``restore`` wrote the file
from the copy or the copy from the file, or AgentAPI confirmed a save on stop), we remember
the file's version in ``<state-dir>/agentapi-file.json``. Later:

- the file is still that version: it has not been written since, so the copy is newer;
- the file is another version: AgentAPI (or someone) wrote it after that, so it is newer;
- no mark: nobody can tell; the caller keeps AgentAPI's file (what AgentAPI itself would
  load) and archives the copy whole, so that nothing is lost either way.

The version is the file's identity as ``stat`` gives it (device, inode, size, modification
time in ns): AgentAPI replaces its file by rename (lib/screentracker/pty_conversation.go,
``os.Rename(tempFile, stateFile)``), as ``restore`` does, so every save is a new inode. The
times are only compared for equality, never ordered: a skewed clock cannot make a copy win.

The mark also holds a digest of the messages both held (ids, roles, text). At the next stop,
when AgentAPI had nothing new to save (it skips a save with no changes, and its file keeps its
version), a file still at the marked version holding a conversation with the digest of ours
is known to hold every message without parsing it: a file as big as the conversation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import structlog

from ._fsutil import read_json_record, write_atomic
from .errors import PersistError
from .models import Message

__all__ = ["MARK_NAME", "holds_as_agreed", "messages_digest", "remember", "unchanged_since_mark"]

log = structlog.get_logger(__name__)

MARK_NAME = "agentapi-file.json"
_MAX_BYTES = 64 * 1024


def _version(path: Path) -> dict[str, object] | None:
    try:
        info = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return {
        "path": os.path.abspath(path),
        "dev": info.st_dev,
        "ino": info.st_ino,
        "size": info.st_size,
        "mtime_ns": info.st_mtime_ns,
    }


def _read(state_dir: Path) -> dict[str, object] | None:
    return read_json_record(state_dir / MARK_NAME, _MAX_BYTES)


def messages_digest(messages: Sequence[Message]) -> str:
    """A digest of what a state file must hold for the messages to be in it: each message's
    id, role and text (what the save's confirmation compares), in order."""
    digest = hashlib.sha256()
    for m in messages:
        text = m.content.encode("utf-8", "surrogatepass")
        digest.update(b"%d\0%s\0%d\0" % (m.id, m.role.encode(), len(text)))
        digest.update(text)
    return digest.hexdigest()


def remember(state_dir: Path, state_file: Path, messages: Sequence[Message] | None = None) -> None:
    """Record that the copy in ``state_dir`` now agrees with ``state_file`` as it is on disk
    (``messages``: the conversation both hold, digested for ``holds_as_agreed``).

    Best effort (a mark that cannot be written only means a later divergence is settled the
    cautious way); never raises. Writes only when the record changed.
    """
    version = _version(state_file)
    if version is None:
        return
    record = dict(version)
    if messages is not None:
        record["messages"] = messages_digest(messages)
    if _read(state_dir) == record:
        return
    with contextlib.suppress(OSError, PersistError):
        write_atomic(state_dir / MARK_NAME, json.dumps(record).encode() + b"\n")
        log.debug("file_mark.remembered", path=str(state_file), size=version["size"])


def holds_as_agreed(state_dir: Path, state_file: Path, messages: Sequence[Message]) -> bool:
    """True when ``state_file`` is still the version the copy last agreed with and the
    conversation they agreed on was exactly ``messages``: the file holds them all."""
    mark = _read(state_dir)
    if mark is None or not isinstance(mark.get("messages"), str):
        return False
    return unchanged_since_mark(state_dir, state_file, mark=mark) is True and (
        mark["messages"] == messages_digest(messages)
    )


def unchanged_since_mark(
    state_dir: Path, state_file: Path, *, mark: dict[str, object] | None = None
) -> bool | None:
    """``True``: ``state_file`` is the version the copy last agreed with; ``False``: it was
    written since; ``None``: no mark for this file, or the file cannot be looked at."""
    mark = mark if mark is not None else _read(state_dir)
    if mark is None or mark.get("path") != os.path.abspath(state_file):
        return None
    version = _version(state_file)
    if version is None:
        return None
    return all(mark.get(key) == value for key, value in version.items())
