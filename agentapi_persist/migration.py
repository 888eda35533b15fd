"""Adopting a copy left by a release before instance directories, by the instance it is for.

Before instance directories, the default state directory was ``<state home>/agentapi-persist``
itself, shared by every module in the home. The per-instance default is now a subdirectory
of it (``identity.default_state_dir``), so such a copy sits one level above. It is adopted
only when it provably belongs to this instance: its conversation and this instance's
AgentAPI state file hold the same conversation, one extending the other. Otherwise nobody
can know whose it is (two modules wrote there, or the file is gone), and it stays where it
is, untouched, with a sentence saying so (``restore`` and the sidecar's log report it).

The move is a rename of each file into the instance directory, under both directories'
locks. A marker (``migrating.json``) is made durable first and removed last, so a crash half
way is finished by the next writer of the instance before it loads anything: generations and
journals never end up split between the two directories.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import structlog

from ._fsutil import ensure_private_dir, fsync_dir, write_atomic
from .agentapi_state import conversation_from_state, read_agentapi_state
from .config import Settings
from .errors import PersistError, StateDirBusy
from .models import Relation, compare, holds_user_message
from .ownership import INSTANCE_NAME, take_lock
from .store import StateStore, holds_a_copy

__all__ = ["MARKER_NAME", "adopt_legacy_copy"]

log = structlog.get_logger(__name__)

MARKER_NAME = "migrating.json"
#: What a store of the earlier layout consists of (lock, socket and instance record stay).
_MOVED = re.compile(
    r"(conversation-\d{12}\.json|journal-\d{12}\.log|last-shutdown\.json|last-upload\.json"
    r"|agentapi-file\.json|archive)"
)
_RELATED = (Relation.SAME, Relation.A_AHEAD, Relation.B_AHEAD, Relation.LAST_DIFFERS)


def adopt_legacy_copy(settings: Settings) -> str | None:
    """Move an earlier release's copy into this instance's directory when it is this
    instance's; return a sentence for the report, ``None`` when there was nothing to do.

    The caller holds the instance directory's lock. Never raises for what it finds: a copy
    it cannot place is left untouched and reported.
    """
    if settings.state_dir_explicit:
        return None
    target = settings.state_dir
    legacy = target.parent
    marker = target / MARKER_NAME
    resuming = marker.exists()
    if not resuming and not holds_a_copy(legacy):
        return None
    try:
        held = take_lock(legacy, purpose="migration", wait_s=0.0)
    except StateDirBusy as exc:
        return f"a copy written by an earlier release is at {legacy}, in use ({exc}); left as is"
    try:
        if not resuming:
            why_not = _not_ours(settings, legacy, target)
            if why_not is not None:
                log.warning("migration.left", path=str(legacy), reason=why_not)
                return (
                    f"a copy written by an earlier release is at {legacy}; left untouched: "
                    f"{why_not}"
                )
            ensure_private_dir(target)
            write_atomic(marker, json.dumps({"from": str(legacy)}).encode() + b"\n")
        moved = _move_all(legacy, target)
        fsync_dir(legacy)
        fsync_dir(target)
        marker.unlink()
        fsync_dir(target)
    except (OSError, PersistError) as exc:
        log.error("migration.failed", path=str(legacy), error=str(exc))
        return (
            f"moving the earlier release's copy from {legacy} to {target} failed ({exc}); "
            "the next start finishes it"
        )
    finally:
        held.release()
    log.info("migration.adopted", source=str(legacy), target=str(target), files=moved)
    return f"adopted the copy an earlier release kept in {legacy} ({moved} files moved to {target})"


def _not_ours(settings: Settings, legacy: Path, target: Path) -> str | None:
    """Why the earlier copy cannot be shown to be this instance's (``None``: it is)."""
    if (legacy / INSTANCE_NAME).exists():
        return "it records another owner"
    if holds_a_copy(target):
        return f"{target} already holds a copy of its own"
    old = StateStore(legacy, max_bytes=settings.max_body_bytes, read_only=True).load().conversation
    if old is None:
        return "it holds no usable conversation"
    try:
        state = read_agentapi_state(settings.agentapi_state_file, max_bytes=settings.max_body_bytes)
    except FileNotFoundError:
        return f"{settings.agentapi_state_file} is missing, so nothing shows whose it is"
    except PersistError as exc:
        return f"{settings.agentapi_state_file} is unusable ({exc}), so nothing shows whose it is"
    mine = conversation_from_state(state).messages
    if not (holds_user_message(mine) and holds_user_message(old.messages)):
        return "neither it nor this instance's state file holds a user message to compare"
    relation = compare(old.messages, mine)
    if relation not in _RELATED:
        return f"it holds another conversation than {settings.agentapi_state_file}"
    return None


def _move_all(legacy: Path, target: Path) -> int:
    moved = 0
    for name in sorted(os.listdir(legacy)):
        if not _MOVED.fullmatch(name):
            continue
        source, dest = legacy / name, target / name
        if name == "archive" and dest.exists():
            for entry in os.listdir(source):
                os.rename(source / entry, dest / entry)
                moved += 1
            with contextlib.suppress(OSError):
                source.rmdir()
            continue
        os.rename(source, dest)
        moved += 1
    return moved
