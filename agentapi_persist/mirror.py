"""Mirror: what AgentAPI currently holds, and what changed since the last checkpoint.

Positions are ours, ids are AgentAPI's. In PTY mode they are equal; in ACP mode a failed
prompt consumes two ids and keeps one message, so later ids skip (coder/agentapi
x/acpio/acp_conversation.go: ``nextID`` advances, the agent's placeholder is removed, and no
event announces the removal; seen with the real v0.12.2). The mirror keeps the id of every
position, applies an update to the position of its id, and appends a message whose id is
beyond the last one. Everything we store is renumbered 0..n-1, which is what AgentAPI's own
state file requires.

The event stream gives a full replay on every connect, then deltas. Deltas are applied in
O(1) and recorded as *dirty* ids, so a checkpoint journals only what changed. A replay (or a
``GET /messages`` after a dropped stream) replaces the whole mirror and marks it *unsynced*:
the next checkpoint then compares it with the stored copy once (``sequence.persist``), because
AgentAPI may have restarted with less, or with another conversation, and a blind append
would be wrong.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .errors import EventGap
from .models import Message, renumber

__all__ = ["Mirror", "build_replay"]


@dataclass(slots=True)
class Mirror:
    """AgentAPI's conversation as last seen, with the ids changed since the last checkpoint."""

    messages: list[Message] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    """AgentAPI's id of the message at each position (increasing, possibly with gaps)."""
    dirty: dict[int, Message] = field(default_factory=dict)
    synced: bool = False
    """True once the stored copy is known to equal this mirror minus the dirty messages."""
    revision: int = 0
    """Bumped on every change; lets the uploader tell whether anything changed."""
    replacements: int = 0
    """Bumped by ``replace``: a checkpoint that compared an earlier mirror must not mark a
    newer replay synced."""

    def apply(self, message: Message) -> bool:
        """Upsert one message from a delta (``message.id`` is AgentAPI's id). Returns True if
        it changed anything.

        Raises ``EventGap`` for an id below the last one that is not known: the mirror and
        AgentAPI disagree, so it must be resynchronised.
        """
        agent_id = message.id
        index = self._position(agent_id)
        if index is None:
            if self.ids and agent_id < self.ids[-1]:
                raise EventGap(f"message id {agent_id} is unknown and older than the last one")
            index = len(self.messages)
        renumbered = message if message.id == index else message.model_copy(update={"id": index})
        if index < len(self.messages):
            current = self.messages[index]
            if (
                current.content == message.content
                and current.role == message.role
                and current.time == message.time
            ):
                return False
            self.messages[index] = renumbered
        else:
            self.messages.append(renumbered)
            self.ids.append(agent_id)
        self.dirty[index] = renumbered
        self.revision += 1
        return True

    def _position(self, agent_id: int) -> int | None:
        ids = self.ids
        if agent_id < len(ids) and ids[agent_id] == agent_id:
            return agent_id  # the common case: no gaps before it
        index = bisect.bisect_left(ids, agent_id)
        return index if index < len(ids) and ids[index] == agent_id else None

    def replace(self, messages: Iterable[Message], ids: Sequence[int] | None = None) -> None:
        """Take a full replay or ``GET /messages`` (renumbered 0..n-1, with AgentAPI's ``ids``
        when they differ) as the new truth (compared at checkpoint)."""
        self.messages = list(messages)
        self.ids = list(ids) if ids is not None else list(range(len(self.messages)))
        self.dirty.clear()
        self.synced = False
        self.revision += 1
        self.replacements += 1

    def take_dirty(self) -> list[Message]:
        """The changed messages in id order, clearing the set."""
        updates = [self.dirty[i] for i in sorted(self.dirty)]
        self.dirty.clear()
        return updates

    def requeue(self, updates: Sequence[Message]) -> None:
        """Put back updates whose write failed, unless a newer version arrived meanwhile."""
        for message in updates:
            current = self.messages[message.id] if message.id < len(self.messages) else None
            if current is not None and message.id not in self.dirty:
                self.dirty[message.id] = current


def build_replay(events: Iterable[Message]) -> tuple[list[Message], list[int]]:
    """Fold a replay (ids in any order, possibly repeated, possibly with gaps) into a list
    renumbered 0..n-1 in id order, and AgentAPI's ids of those positions."""
    by_id: dict[int, Message] = {}
    for message in events:
        by_id[message.id] = message
    ids = sorted(by_id)
    return renumber([by_id[i] for i in ids]), ids
