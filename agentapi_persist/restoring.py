"""``restore``: the boot step that gives AgentAPI a complete, valid state file.

Runs before AgentAPI starts (AgentAPI owns its file while it runs, so we refuse if it is up).
AgentAPI treats a file that fails to load as "start empty" and later overwrites it, so a bad
file is the moment history gets lost for good. We look at both copies and decide:

=====================  ===========================  ======================================
AgentAPI's file        sidecar's copy               action
=====================  ===========================  ======================================
valid, current         any older or equal           nothing (adopt its prompt fields)
valid, behind          ahead (extends it)           rewrite the file from the copy
valid, ahead           behind                       adopt the file into the copy
valid, diverged        diverged                     the file if it was written since the
                                                    two last agreed (file_mark), else the
                                                    copy; the other is kept whole
                                                    (quarantined file, or copy archived)
missing                present                      write the file from the copy
corrupt/unknown ver.   present                      quarantine, write from the copy
corrupt/unknown ver.   absent                       quarantine; exit 7 (no good copy)
missing or corrupt     unusable (moved aside)       exit 7 (no good copy)
missing                absent                       nothing to do (first start)
=====================  ===========================  ======================================

Quarantine moves the bytes aside (``<file>.corrupt-<time>-<id>``); nothing is deleted.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import structlog

from ._fsutil import quarantine
from .agent_process import clear_stale_pid_file, find_agentapi
from .agentapi_state import conversation_from_state, read_agentapi_state, write_agentapi_state
from .config import Settings
from .copies import with_prompt_fields
from .errors import AgentRunningError, ExitCode, StateDirBusy, StateFileError
from .file_mark import remember, unchanged_since_mark
from .migration import adopt_legacy_copy
from .models import AgentAPIState, Conversation, Relation, compare, holds_user_message
from .ownership import claim, take_lock
from .store import StateStore

if TYPE_CHECKING:
    from collections.abc import Callable

    from .replica import ReplicaRead

__all__ = ["RestoreReport", "restore"]

log = structlog.get_logger(__name__)

#: How long ``restore`` waits for another writer (a stop finishing) before it refuses.
_LOCK_WAIT_S = 1.0

Outcome = Literal["unchanged", "written", "adopted", "nothing", "no_good_copy"]


@dataclass(slots=True)
class RestoreReport:
    """What ``restore`` found and did, in sentences a person can act on."""

    outcome: Outcome = "nothing"
    messages: int = 0
    found: list[str] = field(default_factory=list)
    did: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    copy_used: str = "local"
    """Which copy the file was checked against: ``local`` or ``replica`` (it won, and is now
    the local copy too)."""

    @property
    def exit_code(self) -> ExitCode:
        """7 when a bad file had no good copy to replace it; 0 otherwise."""
        return ExitCode.NO_GOOD_COPY if self.outcome == "no_good_copy" else ExitCode.OK

    def summary(self) -> str:
        """One line for people; ``as_dict`` for machines."""
        return (
            f"restore {self.outcome}: "
            + " ".join(self.found)
            + (" | did: " + " ".join(self.did) if self.did else "")
        )

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "outcome": self.outcome,
            "exit_code": int(self.exit_code),
            "messages": self.messages,
            "found": self.found,
            "did": self.did,
            "quarantined": self.quarantined,
            "copy_used": self.copy_used,
        }


def _listening(url: str, timeout_s: float = 0.2) -> bool:
    """True if something accepts connections at AgentAPI's address (it would be AgentAPI)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "localhost", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def restore(
    settings: Settings,
    *,
    force: bool = False,
    store: StateStore | None = None,
    locked: bool = False,
    replica: Callable[[], ReplicaRead | None] | None = None,
) -> RestoreReport:
    """Validate AgentAPI's state file and repair it from the newest good copy.

    Raises ``AgentRunningError`` if AgentAPI is running (unless ``force``): writing its file
    under it would be overwritten on its next save, or worse, read half-written. Takes the
    state directory's writer lock first (``locked``: the caller, the sidecar's start, holds
    it already, has recorded its instance there and adopted any earlier release's copy) and
    raises ``StateDirBusy`` naming the holder when a sidecar or a stop is writing there: a
    generation written under a running sidecar is one it never sees. Unlocked, it records
    the instance and adopts an earlier copy itself, under the lock.

    ``replica`` reads what the off-volume replica holds (``replica.reader_for_restore``); it
    is called once AgentAPI is known not to run, before the lock is taken. Its copy becomes
    the local copy when the local one is missing or behind it, decided by content and,
    between copies that diverge, by generation number (never by clock); a copy it replaces
    is archived whole.
    """
    report = RestoreReport()
    _refuse_while_agentapi_runs(settings, force=force)
    read = replica() if replica is not None else None
    if locked:
        return _restore(settings, report, force=force, store=store, replica=read)
    claim(settings.state_dir, settings.instance, write=False)  # another's: refused, not waited
    try:
        held = take_lock(settings.state_dir, purpose="restore", wait_s=_LOCK_WAIT_S)
    except StateDirBusy as exc:
        raise StateDirBusy(
            f"{exc}. restore runs before the sidecar starts (the sidecar repairs AgentAPI's "
            "file itself when it starts); stop the sidecar first"
        ) from None
    try:
        for note in (
            claim(settings.state_dir, settings.instance, write=True),
            adopt_legacy_copy(settings),
        ):
            if note is not None:
                report.found.append(note[0].upper() + note[1:] + ".")
        return _restore(settings, report, force=force, store=store, replica=read)
    finally:
        held.release()


def _refuse_while_agentapi_runs(settings: Settings, *, force: bool) -> None:
    if not force:
        process, _ = find_agentapi(settings.agentapi_pid_file)
        if process is not None:
            raise AgentRunningError(
                f"AgentAPI is running (pid {process.pid}); restore runs before it starts. "
                "Nothing was changed.",
                evidence=f"its pid file names the running pid {process.pid}",
            )
        if _listening(settings.agentapi_url):
            raise AgentRunningError(
                f"something is listening at {settings.agentapi_url} (AgentAPI?); restore runs "
                "before AgentAPI starts. Nothing was changed. Use --force if that is not AgentAPI.",
                evidence=f"something answers at {settings.agentapi_url}",
            )


def _restore(
    settings: Settings,
    report: RestoreReport,
    *,
    force: bool,
    store: StateStore | None,
    replica: ReplicaRead | None,
) -> RestoreReport:
    if not force:
        cleared = clear_stale_pid_file(settings.agentapi_pid_file)
        if cleared is not None:
            report.did.append(cleared)
    store = store or StateStore(
        settings.state_dir, max_bytes=settings.max_body_bytes, instance=settings.instance.as_dict()
    )
    loaded = store.load()
    report.found.extend(loaded.problems)
    report.quarantined.extend(str(p) for p in loaded.quarantined)
    stored = loaded.conversation
    if stored is not None:
        report.found.append(
            f"Sidecar copy: {len(stored.messages)} messages (generation {loaded.seq}, "
            f"saved {_age(loaded.saved_at)})."
        )
    else:
        report.found.append("Sidecar copy: none.")
    if replica is not None:
        stored = _consider_replica(store, stored, loaded.seq, replica, report)

    path = settings.agentapi_state_file
    file_state, file_problem = _read_file(path, settings.max_body_bytes, report)
    if file_problem is not None:
        moved = quarantine(path, reason=file_problem)
        report.quarantined.append(str(moved))
        report.did.append(f"Moved the unusable file to {moved} (bytes kept).")

    if file_state is None:
        if stored is None:
            # A sidecar copy that was there but unusable is no first start: nothing good is
            # left anywhere, and the exit code must say so, as for a bad file.
            lost = file_problem is not None or bool(loaded.problems)
            report.outcome = "no_good_copy" if lost else "nothing"
            if lost:
                report.did.append(
                    "No other copy exists: AgentAPI will start with an empty conversation."
                )
            return report
        _write_file(settings, path, stored, None, report)
        return report

    from_file = conversation_from_state(file_state)
    report.messages = len(from_file.messages)
    if stored is None:
        store.save(from_file)
        remember(settings.state_dir, path, from_file.messages)
        report.outcome = "adopted"
        report.did.append(
            f"Saved the file's {len(from_file.messages)} messages as the sidecar copy."
        )
        return report

    relation = compare(stored.messages, from_file.messages)
    if holds_user_message(stored.messages) and not holds_user_message(from_file.messages):
        # AgentAPI saved before it had loaded its file (a stop during the agent's start-up):
        # the file holds only the start-up screen and says the prompt was never sent.
        report.found.append(
            f"The file holds only the agent's start-up screen ({len(from_file.messages)} "
            f"messages, no user message): a save made before AgentAPI loaded the conversation "
            f"({len(stored.messages)} messages in the sidecar copy)."
        )
        moved = quarantine(path, reason="a start-up save replaced by the sidecar copy")
        report.quarantined.append(str(moved))
        report.did.append(f"Kept the start-up save's bytes at {moved}.")
        _write_file(settings, path, stored, file_state, report)
        return report
    if relation is Relation.SAME:
        report.outcome = "unchanged"
        report.found.append("The file is current.")
        _adopt_prompt_fields(store, stored, from_file, report)
        remember(settings.state_dir, path, from_file.messages)
    elif relation is Relation.A_AHEAD:
        report.found.append(
            f"The file is behind the sidecar copy ({len(from_file.messages)} vs "
            f"{len(stored.messages)} messages)."
        )
        _write_file(settings, path, stored, file_state, report)
    elif relation is Relation.B_AHEAD:
        report.found.append("The file is ahead of the sidecar copy.")
        store.save(from_file)
        remember(settings.state_dir, path, from_file.messages)
        report.outcome = "adopted"
        report.did.append("Updated the sidecar copy from the file.")
    else:
        report.found.append(f"The file and the sidecar copy differ ({relation.value}).")
        _settle_divergence(settings, store, stored, from_file, file_state, report)
    return report


def _consider_replica(
    store: StateStore,
    stored: Conversation | None,
    local_seq: int | None,
    replica: ReplicaRead,
    report: RestoreReport,
) -> Conversation | None:
    """Make the replica's copy the local copy when it is the newer one; return the local
    copy the rest of ``restore`` works from."""
    where = f"The replica at {replica.url}"
    if replica.error is not None:
        report.found.append(f"{where} could not be read ({replica.error}): not used.")
        return stored
    copy = replica.copy
    assert copy is not None
    report.found.extend(f"Replica: {problem}." for problem in copy.problems)
    if copy.foreign is not None:
        report.found.append(f"{where} belongs to another instance ({copy.foreign}): not used.")
        return stored
    if copy.conversation is None or copy.seq is None:
        report.found.append(f"{where} holds no usable copy.")
        return stored
    theirs = copy.conversation
    report.found.append(
        f"Replica copy: {len(theirs.messages)} messages (generation {copy.seq}, saved "
        f"{_age(copy.saved_at)})."
    )
    taken = (
        f"Took the replica's copy ({len(theirs.messages)} messages, verified) as the sidecar copy"
    )
    from .replica import replica_is_newer  # loaded only where a replica is configured

    newer, relation = replica_is_newer(theirs, copy.seq, stored, local_seq)
    if stored is None or relation is None:
        store.save(theirs, seq_at_least=copy.seq + 1)
        report.did.append(f"{taken}: there was no local copy.")
        report.copy_used = "replica"
        return store.conversation
    if relation is Relation.SAME:
        report.found.append("The replica is current.")
        return stored
    if relation is Relation.B_AHEAD:
        report.found.append(
            f"The replica is behind the sidecar copy ({len(theirs.messages)} vs "
            f"{len(stored.messages)} messages): kept the sidecar copy (the sidecar uploads it)."
        )
        return stored
    if relation is Relation.A_AHEAD:
        store.save(theirs, seq_at_least=copy.seq + 1)
        report.did.append(f"{taken}: it extends the local one ({len(stored.messages)} messages).")
        report.copy_used = "replica"
        return store.conversation
    # Neither extends the other: the later generation of the lineage won; the loser is kept.
    if newer:
        archived = store.archive(reason="replaced at restore by the replica's newer copy")
        store.save(theirs, allow_shrink=True, seq_at_least=copy.seq + 1)
        report.did.append(
            f"{taken}: the two differ ({relation.value}) and the replica's generation "
            f"{copy.seq} is newer than the local {local_seq}; the local copy's "
            f"{len(stored.messages)} messages were archived whole at {archived}."
        )
        report.copy_used = "replica"
        return store.conversation
    archived = store.archive(
        reason="the replica's diverging, older copy, not used at restore", conversation=theirs
    )
    report.did.append(
        f"Kept the sidecar copy: it and the replica differ ({relation.value}) and the local "
        f"generation {local_seq} is not older than the replica's {copy.seq}; the replica's "
        f"{len(theirs.messages)} messages were archived whole at {archived}."
    )
    return stored


def _settle_divergence(
    settings: Settings,
    store: StateStore,
    stored: Conversation,
    from_file: Conversation,
    file_state: AgentAPIState,
    report: RestoreReport,
) -> None:
    """Neither copy extends the other: keep the newer by what is known, not by clocks, and
    keep the other whole (AgentAPI's file quarantined beside it, or the sidecar's copy in its
    archive), so that no conversation is ever dropped from the home."""
    path = settings.agentapi_state_file
    unchanged = unchanged_since_mark(settings.state_dir, path)
    if unchanged is not False:
        report.found.append(
            "AgentAPI's file was not written since it last agreed with the sidecar copy: the "
            "copy is newer."
            if unchanged
            else "No record says which is newer: kept the sidecar's checksummed copy (AgentAPI's "
            "file has no checksum, so damage can still parse)."
        )
        moved = quarantine(path, reason="replaced by the sidecar copy")
        report.quarantined.append(str(moved))
        report.did.append(f"Kept the file's bytes at {moved}.")
        _write_file(settings, path, stored, file_state, report)
        return
    report.found.append(
        "AgentAPI's file was written since it last agreed with the sidecar copy: the file is newer."
    )
    archived = store.archive(reason="replaced at restore by AgentAPI's diverging file")
    store.save(from_file, allow_shrink=True)
    remember(settings.state_dir, path, from_file.messages)
    report.outcome = "adopted"
    report.did.append(
        f"Archived the sidecar copy's {len(stored.messages)} messages whole at {archived}, "
        "then updated the copy from the file."
    )


def _read_file(
    path: Path, max_bytes: int, report: RestoreReport
) -> tuple[AgentAPIState | None, str | None]:
    try:
        state = read_agentapi_state(path, max_bytes=max_bytes)
    except FileNotFoundError:
        report.found.append(f"AgentAPI's state file {path} is missing.")
        return None, None
    except StateFileError as exc:
        report.found.append(f"{exc}.")
        log.warning("restore.file_unusable", path=str(path), error=str(exc))
        return None, str(exc)
    report.found.append(f"AgentAPI's state file {path} is valid: {len(state.messages)} messages.")
    return state, None


def _write_file(
    settings: Settings,
    path: Path,
    stored: Conversation,
    file_state: AgentAPIState | None,
    report: RestoreReport,
) -> None:
    conversation, note = with_prompt_fields(
        stored, from_file=file_state, environment_prompt=settings.initial_prompt
    )
    if note:
        report.found.append(note + ".")
    write_agentapi_state(path, conversation, extra=file_state)
    remember(settings.state_dir, path, conversation.messages)
    report.outcome = "written"
    report.messages = len(conversation.messages)
    report.did.append(
        f"Wrote {path} with {len(conversation.messages)} messages from "
        + ("the replica's copy." if report.copy_used == "replica" else "the sidecar copy.")
    )
    log.info("restore.written", path=str(path), messages=len(conversation.messages))


def _adopt_prompt_fields(
    store: StateStore, stored: Conversation, from_file: Conversation, report: RestoreReport
) -> None:
    fields = (from_file.initial_prompt, from_file.initial_prompt_sent, from_file.prompt_origin)
    if fields != (stored.initial_prompt, stored.initial_prompt_sent, stored.prompt_origin):
        store.append((), prompt=from_file)
        report.did.append("Recorded the file's initial-prompt fields in the sidecar copy.")


def _age(when: datetime | None) -> str:
    if when is None:
        return "at an unknown time"
    seconds = (datetime.now(UTC) - when).total_seconds()
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"
