"""The mirror: what AgentAPI holds, what changed since the last checkpoint, and AgentAPI's ids
beside our positions (ACP mode skips ids)."""

from __future__ import annotations

import pytest

from agentapi_persist.errors import EventGap
from agentapi_persist.mirror import Mirror, build_replay
from agentapi_persist.models import Message

from .conftest import TIME


def msg(agent_id: int, content: str, role: str = "user") -> Message:
    return Message(id=agent_id, role=role, content=content, time=TIME)  # type: ignore[arg-type]


def test_apply_appends_updates_and_records_dirty_positions() -> None:
    """A new id appends, a known id updates, an equal message changes nothing."""
    mirror = Mirror()
    mirror.replace([msg(0, "a"), msg(1, "b")])
    assert mirror.apply(msg(2, "c"))
    assert mirror.apply(msg(1, "b, grown"))
    assert not mirror.apply(msg(1, "b, grown"))
    assert [m.content for m in mirror.messages] == ["a", "b, grown", "c"]
    assert [m.id for m in mirror.take_dirty()] == [1, 2]
    assert mirror.take_dirty() == []


def test_ids_that_skip_are_renumbered_and_followed() -> None:
    """After a gap, AgentAPI's ids map to our positions: updates land where they belong."""
    messages, ids = build_replay([msg(0, "a"), msg(3, "b"), msg(4, "c"), msg(3, "b2")])
    assert ids == [0, 3, 4]
    assert [(m.id, m.content) for m in messages] == [(0, "a"), (1, "b2"), (2, "c")]
    mirror = Mirror()
    mirror.replace(messages, ids)
    assert mirror.apply(msg(4, "c, grown"))
    assert mirror.apply(msg(7, "d"))
    assert [(m.id, m.content) for m in mirror.messages] == [
        (0, "a"),
        (1, "b2"),
        (2, "c, grown"),
        (3, "d"),
    ]
    assert mirror.ids == [0, 3, 4, 7]


def test_an_unknown_older_id_is_a_gap() -> None:
    """An id below the last one that the mirror never saw: resynchronise."""
    mirror = Mirror()
    mirror.replace(*build_replay([msg(0, "a"), msg(5, "b")]))
    with pytest.raises(EventGap):
        mirror.apply(msg(2, "?"))


def test_replace_marks_unsynced_and_requeue_keeps_the_newest() -> None:
    """A replay is compared at the next checkpoint; a failed write's updates come back
    unless a newer version of the message arrived meanwhile."""
    mirror = Mirror()
    mirror.synced = True
    mirror.replace([msg(0, "a")])
    assert not mirror.synced
    mirror.apply(msg(1, "b"))
    failed = mirror.take_dirty()
    mirror.apply(msg(1, "b, newer"))
    mirror.requeue(failed)
    assert [m.content for m in mirror.take_dirty()] == ["b, newer"]
