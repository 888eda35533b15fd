"""Mirror: what AgentAPI currently holds, and what changed since the last checkpoint.

The event stream gives a full replay on every connect, then deltas. Deltas are applied in
O(1) and recorded as *dirty* ids, so a checkpoint journals only what changed. A replay (or a
``GET /messages`` after a dropped stream) replaces the whole mirror and marks it *unsynced*:
the next checkpoint then compares it with the stored copy once (``sequence.persist``), because
AgentAPI may have restarted with less, or with another conversation, and a blind append
would be wrong.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .models import Message

__all__ = ["Gap", "Mirror"]


class Gap(Exception):
    """A delta skipped ids: events were missed, so the mirror must be resynchronised."""


@dataclass(slots=True)
class Mirror:
    """AgentAPI's conversation as last seen, with the ids changed since the last checkpoint."""

    messages: list[Message] = field(default_factory=list)
    dirty: dict[int, Message] = field(default_factory=dict)
    synced: bool = False
    """True once the stored copy is known to equal this mirror minus the dirty messages."""
    revision: int = 0
    """Bumped on every change; lets the uploader tell whether anything changed."""

    def apply(self, message: Message) -> bool:
        """Upsert one message from a delta. Returns True if it changed anything.

        Raises ``Gap`` when the id is beyond the end: a missed event.
        """
        index = message.id
        if index < len(self.messages):
            current = self.messages[index]
            if (
                current.content == message.content
                and current.role == message.role
                and current.time == message.time
            ):
                return False
            self.messages[index] = message
        elif index == len(self.messages):
            self.messages.append(message)
        else:
            raise Gap(f"message id {index} arrived while only {len(self.messages)} are known")
        self.dirty[index] = message
        self.revision += 1
        return True

    def replace(self, messages: Iterable[Message]) -> None:
        """Take a full replay or ``GET /messages`` as the new truth (compared at checkpoint)."""
        self.messages = list(messages)
        self.dirty.clear()
        self.synced = False
        self.revision += 1

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


def build_replay(events: Iterable[Message]) -> list[Message]:
    """Fold a replay (ids in any order, possibly repeated) into a contiguous list."""
    by_id: dict[int, Message] = {}
    for message in events:
        by_id[message.id] = message
    ordered = [by_id[i] for i in range(len(by_id)) if i in by_id]
    if len(ordered) != len(by_id):
        raise Gap("the replay skipped ids")
    return ordered
