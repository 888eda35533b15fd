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
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import structlog

from ._fsutil import read_json_record, write_atomic
from .errors import PersistError

__all__ = ["MARK_NAME", "remember", "unchanged_since_mark"]

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


def remember(state_dir: Path, state_file: Path) -> None:
    """Record that the copy in ``state_dir`` now agrees with ``state_file`` as it is on disk.

    Best effort (a mark that cannot be written only means a later divergence is settled the
    cautious way); never raises. Writes only when the version changed.
    """
    version = _version(state_file)
    if version is None or _read(state_dir) == version:
        return
    with contextlib.suppress(OSError, PersistError):
        write_atomic(state_dir / MARK_NAME, json.dumps(version).encode() + b"\n")
        log.debug("file_mark.remembered", path=str(state_file), size=version["size"])


def unchanged_since_mark(state_dir: Path, state_file: Path) -> bool | None:
    """``True``: ``state_file`` is the version the copy last agreed with; ``False``: it was
    written since; ``None``: no mark for this file, or the file cannot be looked at."""
    mark = _read(state_dir)
    if mark is None or mark.get("path") != os.path.abspath(state_file):
        return None
    version = _version(state_file)
    if version is None:
        return None
    return mark == version
