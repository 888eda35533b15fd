"""Where the conversation can come from, and which copy is the freshest.

Three copies can exist when a stop comes: the sidecar's durable copy (always current when the
sidecar runs), AgentAPI's own state file (current as of its last save), and AgentAPI's live
``GET /messages`` (current, if it answers in time). ``choose`` picks the freshest by content,
never by clock: a copy that extends another is newer; between copies that diverge, a current
one wins, and ``file_mark`` says whether AgentAPI's file was written since it last agreed with
the sidecar's copy. Every decision carries a sentence saying why.

The prompt fields (``initial_prompt``, ``initial_prompt_sent``) exist only in AgentAPI's state
file, so they are taken from there when it is readable and carried forward otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from .agentapi import AgentAPIClient
from .agentapi_state import read_agentapi_state, trim_prompt
from .budget import Budget
from .config import Settings
from .errors import AgentAPIUnreachable, PersistError, StateFileError
from .file_mark import unchanged_since_mark
from .models import (
    AgentAPIState,
    AgentStatus,
    Conversation,
    Message,
    Relation,
    compare,
    holds_user_message,
)
from .store import StateStore

log = structlog.get_logger(__name__)

#: A running sidecar's view: its copy when it is AgentAPI's conversation now, given a fresh
#: ``GET /status`` (``Follower.current_messages``), else ``None``.
StreamView = Callable[[AgentStatus], "tuple[Message, ...] | None"]
#: How long the stop waits for ``GET /status`` before it fetches the messages instead.
_STATUS_CAP_S = 0.3

__all__ = [
    "Candidate",
    "Choice",
    "Gathered",
    "choose",
    "gather",
    "prompt_was_sent",
    "with_prompt_fields",
]


@dataclass(frozen=True, slots=True)
class Candidate:
    """One copy of the conversation, and whether it is current right now."""

    name: str  # "live" (or "stream": the sidecar's copy, current), "sidecar", "agentapi_state"
    messages: tuple[Message, ...]
    current: bool = False
    """True for ``GET /messages`` and for a running sidecar's in-memory copy (it follows
    AgentAPI's event stream): as of now by construction."""


@dataclass(frozen=True, slots=True)
class Choice:
    """The winning copy and the reasons, for logs and summaries."""

    winner: Candidate | None
    reasons: tuple[str, ...] = field(default=())


def choose(candidates: Sequence[Candidate], *, file_unchanged: bool | None = None) -> Choice:
    """Pick the freshest copy: the one that extends the others; the live copy on equal terms.

    Order of preference among copies that agree: live, then sidecar, then AgentAPI's file (the
    list order). A copy that is strictly ahead of the current best replaces it. A copy with no
    user message (AgentAPI's start-up screen, before it loaded its file) never replaces one
    that has one. Divergent copies are settled without clocks: a current copy beats a stored
    one; between the stored copy and AgentAPI's file, ``file_unchanged`` (``file_mark``) says
    whether the file was written after the two last agreed (then the file is newer; with no
    record, the sidecar's checksummed copy wins: AgentAPI's file carries no checksum, so a
    damaged one can still parse). The loser is named in the reasons so that nothing is
    dropped silently (the store archives a replaced copy whole).
    """
    best: Candidate | None = None
    reasons: list[str] = []
    for candidate in candidates:
        if best is None:
            best = candidate
            continue
        spoken, best_spoken = (
            holds_user_message(candidate.messages),
            holds_user_message(best.messages),
        )
        if spoken != best_spoken:
            screen, kept = (best, candidate) if spoken else (candidate, best)
            reasons.append(
                f"{screen.name} holds only the agent's start-up screen ({len(screen.messages)} "
                f"messages, no user message): kept {kept.name}"
            )
            best = kept
            continue
        relation = compare(candidate.messages, best.messages)
        if relation is Relation.A_AHEAD:
            reasons.append(
                f"{candidate.name} ({len(candidate.messages)} messages) is ahead of "
                f"{best.name} ({len(best.messages)})"
            )
            best = candidate
        elif relation in (Relation.LAST_DIFFERS, Relation.DIVERGED):
            newer, why = _newer(best, candidate, file_unchanged)
            loser = best if newer is candidate else candidate
            reasons.append(
                f"{candidate.name} and {best.name} differ ({relation.value}); kept {newer.name} "
                f"({why}), {loser.name} was not used"
            )
            best = newer
    return Choice(winner=best, reasons=tuple(reasons))


def _newer(best: Candidate, other: Candidate, file_unchanged: bool | None) -> tuple[Candidate, str]:
    """The more recent of two diverging copies, and why; ``best`` came first in the list."""
    if best.current != other.current:
        return (best, "it is current") if best.current else (other, "it is current")
    if best.current:
        return best, "both are current; the first in order of preference"
    names = {best.name, other.name}
    if names == {"sidecar", "agentapi_state"}:
        by_name = {best.name: best, other.name: other}
        if file_unchanged is False:
            return by_name["agentapi_state"], "AgentAPI's file was written since the two agreed"
        if file_unchanged:
            return by_name["sidecar"], "AgentAPI's file was not written since the two agreed"
        return by_name["sidecar"], "no record says which is newer: the checksummed copy"
    return best, "the first in order of preference"


def _file_needed(live: tuple[Message, ...] | None, stored: Conversation | None) -> bool:
    """Whether AgentAPI's state file can change what the stop keeps (see ``gather``)."""
    if live is None or not holds_user_message(live) or stored is None:
        return True
    return not stored.prompt_settled


def prompt_was_sent(conversation: Conversation, prompt: str) -> bool:
    """Whether ``conversation`` shows that ``prompt`` (trimmed) already went to the agent: our
    copy recorded it sent, or it holds it as a user message (AgentAPI records the prompt it
    sends as a user message with exactly that text)."""
    if not prompt:
        return False
    if conversation.initial_prompt_sent and conversation.initial_prompt == prompt:
        return True
    return any(m.role == "user" and m.content == prompt for m in conversation.messages)


def with_prompt_fields(
    conversation: Conversation,
    *,
    from_file: AgentAPIState | None,
    environment_prompt: str | None,
) -> tuple[Conversation, str | None]:
    """Fill in the prompt fields the HTTP API cannot tell us. Returns the note to report, if any.

    AgentAPI's file wins when readable (it is the only true source of the prompt text), except
    that a prompt already sent is never marked unsent again: a save made before AgentAPI
    loaded its file says ``false``, and believing it re-runs the prompt. Otherwise the copy's
    own fields are kept. When the copy never saw the flag, the prompt is the one it learned
    from AgentAPI's process, else ``AGENTAPI_INITIAL_PROMPT`` (both trimmed as AgentAPI trims
    them), marked sent once the conversation holds a user message: re-sending the prompt costs
    the user money and can overwrite work.
    """
    if from_file is not None:
        prompt = from_file.initial_prompt
        sent = from_file.initial_prompt_sent or prompt_was_sent(conversation, prompt)
        updated = conversation.model_copy(
            update={
                "initial_prompt": prompt,
                "initial_prompt_sent": sent,
                "prompt_origin": "agentapi_state",
            }
        )
        note = None
        if sent and not from_file.initial_prompt_sent:
            note = (
                "AgentAPI's file says the initial prompt was not sent, but the conversation "
                "holds it (a save from before AgentAPI loaded its file): kept it marked sent"
            )
        return updated, note
    if conversation.initial_prompt is not None and conversation.initial_prompt_sent is not None:
        return conversation, None
    has_user_message = holds_user_message(conversation.messages)
    if conversation.initial_prompt is not None:
        prompt, origin, source = (
            conversation.initial_prompt,
            conversation.prompt_origin,
            "from AgentAPI's command line or environment",
        )
    elif environment_prompt:
        prompt, origin, source = (
            trim_prompt(environment_prompt),
            "environment",
            "from AGENTAPI_INITIAL_PROMPT",
        )
    else:
        prompt, origin, source = "", "unknown", "empty"
    updated = conversation.model_copy(
        update={
            "initial_prompt": prompt,
            "initial_prompt_sent": has_user_message,
            "prompt_origin": origin,
        }
    )
    note = (
        "AgentAPI's state file was never readable, so the initial prompt fields are assumed: "
        f"prompt {source}, "
        f"marked {'sent (the conversation has a user message)' if has_user_message else 'not sent'}"
    )
    return updated, note


@dataclass(frozen=True, slots=True)
class Gathered:
    """The freshest conversation and where it came from."""

    conversation: Conversation | None
    source: str  # "live", "stream", "sidecar", "agentapi_state" or "none"
    live_error: str | None
    file_state: AgentAPIState | None
    notes: tuple[str, ...]
    agentapi_view: tuple[Message, ...] | None = None
    """What AgentAPI itself holds now (``GET /messages``, else the sidecar's mirror of it):
    only its start-up screen while it has not loaded its file yet."""
    live_refused: bool = False
    """``GET /messages`` failed because nothing listens there (connection refused), not
    because AgentAPI answered too slowly or wrongly."""


async def gather(
    settings: Settings,
    *,
    store: StateStore,
    agent: AgentAPIClient | None,
    budget: Budget,
    live_copy: Conversation | None = None,
    process_prompt: str | None = None,
    state_file: Path | None = None,
    stream_view: StreamView | None = None,
) -> Gathered:
    """Collect every available copy concurrently and keep the freshest.

    ``live_copy`` is the running sidecar's in-memory copy (current by construction); without
    it the store is loaded from disk. AgentAPI's file is read but never written here: it
    belongs to AgentAPI while it runs. ``process_prompt`` is the initial prompt the running
    AgentAPI was started with, for a copy that never saw AgentAPI's file; ``state_file`` the
    file it really uses (default: the configured one). ``stream_view`` is the running
    sidecar's answer to "is your copy AgentAPI's conversation now?" given a fresh
    ``GET /status`` (``Follower.current_messages``): when it is sure, the full ``GET
    /messages`` is skipped and the copy is reported as ``stream``.
    """
    agentapi_file = state_file or settings.agentapi_state_file
    notes: list[str] = []

    async def load_store() -> Conversation | None:
        if live_copy is not None:
            return live_copy
        try:
            report = await store.aload()
        except StateFileError as exc:
            notes.append(f"the sidecar copy could not be read: {exc}")
            return None
        notes.extend(report.problems)
        return report.conversation

    async def load_file() -> AgentAPIState | None:
        path = agentapi_file
        try:
            return await asyncio.to_thread(
                read_agentapi_state, path, max_bytes=settings.max_body_bytes
            )
        except FileNotFoundError:
            return None
        except StateFileError as exc:
            notes.append(f"AgentAPI's state file is unusable ({exc}); `restore` will repair it")
            return None

    refused = False
    live_name = "live"

    async def fetch_live() -> tuple[tuple[Message, ...] | None, str | None]:
        nonlocal refused, live_name
        if agent is None:
            return None, "AgentAPI not queried"
        if stream_view is not None:
            with contextlib.suppress(PersistError):  # in doubt: the full fetch below
                status = await agent.status(budget=budget, cap_s=_STATUS_CAP_S)
                current = stream_view(status)
                if current is not None:
                    live_name = "stream"
                    log.info("shutdown.fetch_skipped", messages=len(current))
                    return current, None
        try:
            cap = max(min(2.0, budget.remaining() * 0.3), 0.05)
            return await agent.messages(budget=budget, cap_s=cap), None
        except PersistError as exc:
            refused = isinstance(exc, AgentAPIUnreachable)
            return None, str(exc)

    stored, (live, live_error) = await asyncio.gather(load_store(), fetch_live())
    # The cheapest sufficient copy: AgentAPI's file is parsed (as big as the conversation)
    # only when it can add something: the live answer is missing or only the start-up
    # screen, or our copy does not yet hold the prompt fields as AgentAPI saved them (sent).
    file_state = await load_file() if _file_needed(live, stored) else None
    if live_error is not None and agent is not None:
        notes.append(f"live messages unavailable: {live_error}")

    candidates: list[Candidate] = []
    if live is not None:
        candidates.append(Candidate(live_name, live, current=True))
    if stored is not None:
        candidates.append(Candidate("sidecar", stored.messages, current=live_copy is not None))
    unchanged: bool | None = None
    if file_state is not None:
        candidates.append(Candidate("agentapi_state", file_state.conversation_messages()))
        unchanged = unchanged_since_mark(settings.state_dir, agentapi_file)
    choice = choose(candidates, file_unchanged=unchanged)
    notes.extend(choice.reasons)
    view = live if live is not None else (live_copy.messages if live_copy is not None else None)
    if choice.winner is None:
        return Gathered(None, "none", live_error, file_state, tuple(notes), view, refused)
    base = stored if stored is not None else Conversation()
    if process_prompt is not None and base.prompt_origin in ("unknown", "environment"):
        base = base.model_copy(
            update={
                "initial_prompt": process_prompt,
                "initial_prompt_sent": None,
                "prompt_origin": "agentapi_process",
            }
        )
    conversation, prompt_note = with_prompt_fields(
        base.with_messages(choice.winner.messages),
        from_file=file_state,
        environment_prompt=settings.initial_prompt,
    )
    if prompt_note:
        notes.append(prompt_note)
    return Gathered(conversation, choice.winner.name, live_error, file_state, tuple(notes), view)
