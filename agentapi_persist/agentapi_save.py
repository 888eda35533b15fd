"""Asking AgentAPI to save its own state file (SIGUSR1), and confirming that it did.

The policy, in the order it is checked (``ask_agentapi_to_save``):

* there is an AgentAPI process (from its pid file, identity checked through ``/proc``);
* it has loaded its conversation: until its agent is ready it holds only the start-up screen,
  and a save would overwrite its good file with that (coder/agentapi
  lib/screentracker/pty_conversation.go, the snapshot loop; seen with the real v0.12.2);
* it saves at all: a state file, and ``AGENTAPI_SAVE_STATE`` not false in its own environment
  (``persistence_enabled``);
* its version saves on SIGUSR1 (>= 0.12.0; older ones ignore the signal).

Saves are confirmed, not assumed: after SIGUSR1 the state file is watched until it changed and
parses, or until it is seen to hold every message already (AgentAPI skips a save when nothing
changed), within the caller's budget. The outcome is typed (``SaveOutcome``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import structlog

from ._options import DEFAULT_MAX_BODY_BYTES
from .agent_process import (
    MIN_SIGUSR1_VERSION,
    AgentProcess,
    Version,
    detect_version,
    send_signal,
)
from .agentapi_state import read_agentapi_state
from .budget import Budget
from .config import Settings
from .errors import StateFileError, cap_text
from .file_mark import holds_as_agreed
from .models import AgentAPIState, Conversation, Message, holds_user_message

__all__ = [
    "SaveConfirmation",
    "SaveOutcome",
    "ask_agentapi_to_save",
    "persistence_enabled",
    "request_save",
]

log = structlog.get_logger(__name__)

_POLL_S = 0.01


#: What the saved file must hold: the messages, a callable that gives them once known (the
#: stop asks AgentAPI to save before it has read the conversation), or ``None`` (unknown).
Expected = Sequence[Message] | Callable[[], Sequence[Message] | None] | None


class SaveOutcome(StrEnum):
    """What ``request_save`` established."""

    CONFIRMED_CHANGED = "confirmed_changed"
    """The state file changed after the signal and parses."""
    CONFIRMED_UNCHANGED = "confirmed_unchanged"
    """The state file already holds every expected message; AgentAPI had nothing to save."""
    NOT_CONFIRMED = "not_confirmed"
    """The budget ran out first; the detail says what the file holds."""
    PROCESS_GONE = "process_gone"
    """AgentAPI exited before it could be signalled."""
    SKIPPED_VERSION_UNKNOWN = "skipped_version_unknown"
    SKIPPED_OLD_VERSION = "skipped_old_version"
    SKIPPED_NOT_OURS = "skipped_not_ours"
    SKIPPED_NOT_PERMITTED = "skipped_not_permitted"
    SKIPPED_NO_BUDGET = "skipped_no_budget"
    SKIPPED = "skipped"
    """Nothing to ask: no AgentAPI process, or it does not save its state (the detail says)."""
    SKIPPED_NOT_LOADED = "skipped_not_loaded"
    """AgentAPI has not loaded its conversation yet: a save would overwrite its file."""


@dataclass(frozen=True, slots=True)
class SaveConfirmation:
    """The result of asking AgentAPI to save its state."""

    outcome: SaveOutcome
    detail: str
    ms: int
    signalled: bool = False
    messages_in_file: int | None = None
    state: AgentAPIState | None = None
    """The file as parsed to confirm the save, when it was: whoever needs its prompt fields
    next takes them from here instead of parsing a file as big as the conversation again."""

    @property
    def confirmed(self) -> bool:
        """True when the state file is known to hold the conversation."""
        return self.outcome in (SaveOutcome.CONFIRMED_CHANGED, SaveOutcome.CONFIRMED_UNCHANGED)

    @property
    def ok(self) -> bool:
        """False only when a save was asked for and not seen (or AgentAPI vanished first); a
        save rightly not asked for is fine."""
        return self.outcome not in (SaveOutcome.NOT_CONFIRMED, SaveOutcome.PROCESS_GONE)


async def ask_agentapi_to_save(
    settings: Settings,
    process: AgentProcess | None,
    *,
    reason: str,
    conversation: Conversation | None,
    agentapi_view: Sequence[Message] | None,
    budget: Budget,
    expected: Expected = None,
) -> SaveConfirmation:
    """Apply the policy above and, when it allows, ask and confirm. ``reason`` says why
    there is no ``process``; ``agentapi_view`` is what AgentAPI itself holds now."""
    if process is None:
        return SaveConfirmation(SaveOutcome.SKIPPED, reason, 0)
    if (
        agentapi_view is not None
        and conversation is not None
        and holds_user_message(conversation.messages)
        and not holds_user_message(agentapi_view)
    ):
        return SaveConfirmation(
            SaveOutcome.SKIPPED_NOT_LOADED,
            "AgentAPI has not loaded its conversation yet (it shows only the agent's start-up "
            "screen); a save now would overwrite its file with less",
            0,
        )
    if not persistence_enabled(
        process,
        setting=settings.state_persistence,
        state_file_explicit=settings.agentapi_state_file_explicit,
    ):
        return SaveConfirmation(SaveOutcome.SKIPPED, "AgentAPI state persistence is off", 0)
    # Leave room for the stop step when it is wanted; otherwise the rest of the budget.
    save_budget = budget.child(budget.remaining() * (0.5 if settings.stop_agentapi else 0.9))
    version = await detect_version(process, fallback_bin=settings.agentapi_bin, budget=save_budget)
    return await request_save(
        process,
        state_file=process.state_file or settings.agentapi_state_file,
        expected=conversation.messages if conversation is not None else expected,
        budget=save_budget,
        version=version,
        state_dir=settings.state_dir,
    )


def persistence_enabled(
    process: AgentProcess, *, setting: bool | None, state_file_explicit: bool
) -> bool:
    """Whether AgentAPI saves its own state, so that asking it to save means something.

    AgentAPI's own configuration wins where it is known, since it decides whether a save can
    happen at all: saving switched off (``AGENTAPI_SAVE_STATE=false``), or no state file,
    means no, whatever our ``setting`` says (a wait for a save that cannot come would eat
    the budget; coder/agentapi lib/screentracker/pty_conversation.go ``SaveState`` returns
    without writing). Then an explicit ``setting``; then its state file; when its
    environment is unreadable, an explicitly configured state file means yes.
    """
    if process.save_state is False:
        return False
    if process.configuration_known and process.state_file is None:
        return False
    if setting is not None:
        return setting
    if process.state_file is not None:
        return True
    return state_file_explicit


async def request_save(
    process: AgentProcess,
    *,
    state_file: Path,
    expected: Expected,
    budget: Budget,
    version: Version | None,
    max_bytes: int = DEFAULT_MAX_BODY_BYTES,
    state_dir: Path | None = None,
) -> SaveConfirmation:
    """Ask AgentAPI to save (SIGUSR1) and confirm the save landed in ``state_file``.

    Never signals a version that is unknown or older than 0.12.0: those do not save on it.
    Confirmation: the file changed after the signal and parses as a v1 state, or it holds
    every ``expected`` message (same count, ids, roles and text) already. ``expected=None``
    (what AgentAPI holds is unknown) confirms only a change. ``state_dir``: where the
    sidecar's copy records the file version it last agreed with (``file_mark``); a file
    still at that version, agreed on these very messages, is confirmed without parsing it.
    """
    started = time.monotonic()
    watch: _SaveWatch | None = None

    def done(
        outcome: SaveOutcome, detail: str, *, signalled: bool = False, held: int | None = None
    ) -> SaveConfirmation:
        ms = round((time.monotonic() - started) * 1000)
        parsed = watch.state if watch is not None else None
        result = SaveConfirmation(outcome, detail, ms, signalled, held, parsed)
        if result.confirmed:
            log.info("agentapi.save_confirmed", outcome=str(outcome), ms=ms, held=held)
        elif outcome.startswith("skipped"):
            log.info("agentapi.save_skipped", outcome=str(outcome), pid=process.pid, detail=detail)
        else:
            log.warning("agentapi.save_not_confirmed", outcome=str(outcome), ms=ms, detail=detail)
        return result

    if version is None:
        return done(
            SaveOutcome.SKIPPED_VERSION_UNKNOWN,
            "AgentAPI's version is unknown; only versions from "
            f"{MIN_SIGUSR1_VERSION} save on SIGUSR1, so it was not sent",
        )
    if version < MIN_SIGUSR1_VERSION:
        return done(
            SaveOutcome.SKIPPED_OLD_VERSION,
            f"AgentAPI {version} predates save-on-SIGUSR1 ({MIN_SIGUSR1_VERSION}); "
            "it ignores SIGUSR1, so it was not sent",
        )
    if budget.expired:
        return done(SaveOutcome.SKIPPED_NO_BUDGET, "no time left in the budget to ask for a save")
    before = _stat_key(state_file)
    verdict, why = send_signal(process, signal.SIGUSR1)
    if verdict == "gone":
        return done(SaveOutcome.PROCESS_GONE, why)
    if verdict == "not_ours":
        return done(SaveOutcome.SKIPPED_NOT_OURS, f"{why}; not signalling")
    if verdict == "denied":
        return done(SaveOutcome.SKIPPED_NOT_PERMITTED, why)
    log.info("agentapi.save_requested", pid=process.pid, version=str(version))
    watch = _SaveWatch(state_file, before, expected, max_bytes, state_dir)
    try:
        # The timeout also cuts a slow read of a big file (the read's thread finishes alone).
        async with asyncio.timeout(budget.remaining()):
            while True:
                found = await watch.check()
                if found is not None:
                    outcome, detail, held = found
                    return done(outcome, detail, signalled=True, held=held)
                await asyncio.sleep(_POLL_S)
    except TimeoutError:
        pass
    waited = (time.monotonic() - started) * 1000
    return done(
        SaveOutcome.NOT_CONFIRMED,
        f"no save seen within {waited:.0f} ms: {state_file} {watch.holds} " + watch.expecting(),
        signalled=True,
        held=watch.held,
    )


_StatKey = tuple[int, int, int]


def _stat_key(path: Path) -> _StatKey | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class _SaveWatch:
    """Watches a state file: cheap ``stat`` calls each poll, a full read only when it changed
    (and once at the start, for the "already holds everything" case)."""

    def __init__(
        self,
        path: Path,
        before: _StatKey | None,
        expected: Expected,
        max_bytes: int,
        state_dir: Path | None = None,
    ) -> None:
        self._path = path
        self._state_dir = state_dir
        self._before = before
        self._seen = before
        self._expected = expected
        self._max_bytes = max_bytes
        self._checked_initial = False
        self.holds = "is absent" if before is None else "was not checked"
        self.held: int | None = None
        self.state: AgentAPIState | None = None

    def _known(self) -> Sequence[Message] | None:
        return self._expected() if callable(self._expected) else self._expected

    def expecting(self) -> str:
        """For the not-confirmed sentence: what the file was expected to hold."""
        known = self._known()
        return f"(expected {len(known)} messages)" if known is not None else "(any change)"

    async def check(self) -> tuple[SaveOutcome, str, int | None] | None:
        expected = self._known()
        key = _stat_key(self._path)
        if key is None:
            self.holds = "is absent"
            if expected is not None and not expected and self._before is None:
                return SaveOutcome.CONFIRMED_UNCHANGED, "no messages and no state file", 0
            return None
        if key == self._seen and self._checked_initial:
            return None
        if expected is None:
            if key == self._before:
                return None  # not replaced yet; there is nothing to compare the content with
            # AgentAPI replaces its file by rename (lib/screentracker/pty_conversation.go:
            # os.Rename(tempFile, stateFile)): a new file at the path is a whole save. Parsing
            # it (seconds for a big conversation) would add nothing the rename does not say.
            return SaveOutcome.CONFIRMED_CHANGED, f"saved: {self._path} was replaced", None
        if not self._checked_initial and key == self._before and await self._agreed(expected):
            # Not written since it last agreed with our copy, on these messages: it holds
            # them all (AgentAPI skips a save when it has nothing new), no parse needed.
            self.held = len(expected)
            self.holds = f"holds {self.held} messages"
            return (
                SaveOutcome.CONFIRMED_UNCHANGED,
                f"{self._path} already holds all {self.held} messages (unchanged since it "
                "last agreed with the sidecar copy)",
                self.held,
            )
        self._checked_initial = True
        state = await self._read()
        after = _stat_key(self._path)
        self._seen = key if after == key else None  # changed under us: read again next poll
        if state is None:
            return None
        self.state = state if after == key else None
        self.held = len(state.messages)
        holds_all = _holds(state, expected)
        self.holds = f"holds {self.held} messages"
        if key != self._before:
            return SaveOutcome.CONFIRMED_CHANGED, f"saved: {self._path} {self.holds}", self.held
        if holds_all:
            return (
                SaveOutcome.CONFIRMED_UNCHANGED,
                f"{self._path} already holds all {self.held} messages",
                self.held,
            )
        return None

    async def _agreed(self, expected: Sequence[Message]) -> bool:
        """``holds_as_agreed`` off the event loop: it reads the record and digests the whole
        conversation (100 ms for 100,000 messages), which the stop's loop must not wait on."""
        if self._state_dir is None:
            return False
        return await asyncio.to_thread(holds_as_agreed, self._state_dir, self._path, expected)

    async def _read(self) -> AgentAPIState | None:
        try:
            return await asyncio.to_thread(
                read_agentapi_state, self._path, max_bytes=self._max_bytes
            )
        except FileNotFoundError:
            self.holds = "is absent"
        except (StateFileError, OSError) as exc:
            self.holds = f"does not parse ({cap_text(str(exc), 160)})"
        return None


def _holds(state: AgentAPIState, expected: Sequence[Message]) -> bool:
    if len(state.messages) != len(expected):
        return False
    return all(
        saved.id == want.id and saved.role == want.role and saved.message == want.content
        for saved, want in zip(state.messages, expected, strict=True)
    )
