"""Choosing the freshest copy by content, and carrying the prompt fields forward."""

from __future__ import annotations

import pytest

from agentapi_persist.copies import Candidate, choose, with_prompt_fields
from agentapi_persist.models import AgentAPIState, Conversation, Message, Relation, Role, compare

T = "2025-01-02T03:04:05.123456789Z"


def conv(*texts: str) -> tuple[Message, ...]:
    roles: tuple[Role, Role] = ("user", "agent")
    return tuple(Message(id=i, role=roles[i % 2], content=t, time=T) for i, t in enumerate(texts))


@pytest.mark.parametrize(
    ("a", "b", "relation"),
    [
        (conv("hi", "yo"), conv("hi", "yo"), Relation.SAME),
        (conv("hi", "yo", "more"), conv("hi", "yo"), Relation.A_AHEAD),
        (conv("hi"), conv("hi", "yo"), Relation.B_AHEAD),
        (conv("hi", "yo there"), conv("hi", "yo"), Relation.LAST_DIFFERS),
        (conv("hi", "yo there", "next"), conv("hi", "yo"), Relation.A_AHEAD),
        (conv("HI", "yo", "x"), conv("hi", "yo"), Relation.DIVERGED),
        ((), conv("hi"), Relation.B_AHEAD),
        ((), (), Relation.SAME),
    ],
)
def test_compare(a: tuple[Message, ...], b: tuple[Message, ...], relation: Relation) -> None:
    """A streaming last message is an older version, not a divergence."""
    assert compare(a, b) is relation


def test_live_wins_when_equal_and_longer_copy_wins_otherwise() -> None:
    """The copy that extends the others is chosen whatever the order."""
    live = Candidate("live", conv("a", "b"), current=True)
    sidecar = Candidate("sidecar", conv("a", "b", "c"))
    file = Candidate("agentapi_state", conv("a"))
    choice = choose([live, sidecar, file])
    assert choice.winner is sidecar
    assert any("ahead" in r for r in choice.reasons)
    assert choose([live, Candidate("sidecar", conv("a", "b"))]).winner is live


@pytest.mark.parametrize(
    ("file_unchanged", "winner", "why"),
    [
        (True, "sidecar", "not written since"),
        (False, "agentapi_state", "written since"),
        (None, "sidecar", "no record says which is newer"),
    ],
)
def test_diverged_stored_copies_are_settled_by_the_file_mark_not_clocks(
    file_unchanged: bool | None, winner: str, why: str
) -> None:
    """Between the stored copy and AgentAPI's file, whether the file was written since the
    two agreed decides; without a record, the checksummed copy; the loser is named."""
    sidecar = Candidate("sidecar", conv("x", "y"))
    file = Candidate("agentapi_state", conv("a", "b", "c"))
    for order in ([sidecar, file], [file, sidecar]):
        choice = choose(order, file_unchanged=file_unchanged)
        assert choice.winner is not None
        assert choice.winner.name == winner
        assert why in choice.reasons[0]
        loser = "agentapi_state" if winner == "sidecar" else "sidecar"
        assert f"{loser} was not used" in choice.reasons[0]


def test_a_current_copy_beats_a_stored_one_when_they_diverge() -> None:
    """The live copy (or a running sidecar's) is as of now: it wins a divergence."""
    live = Candidate("live", conv("new", "talk"), current=True)
    file = Candidate("agentapi_state", conv("a", "b", "c"))
    for order in ([live, file], [file, live]):
        choice = choose(order, file_unchanged=False)
        assert choice.winner is live
        assert "it is current" in choice.reasons[0]


def test_no_candidates() -> None:
    """Nothing anywhere gives no winner."""
    assert choose([]).winner is None


def test_prompt_fields_come_from_agentapi_file_first() -> None:
    """AgentAPI's file is the only true source of the prompt fields."""
    state = AgentAPIState.model_validate(
        {"version": 1, "messages": [], "initial_prompt": "p", "initial_prompt_sent": True}
    )
    updated, note = with_prompt_fields(
        Conversation(messages=conv("a")), from_file=state, environment_prompt="other"
    )
    assert (updated.initial_prompt, updated.initial_prompt_sent, updated.prompt_origin) == (
        "p",
        True,
        "agentapi_state",
    )
    assert note is None


def test_known_prompt_fields_are_carried_forward() -> None:
    """Without a readable file, the copy's own fields are kept."""
    c = Conversation(
        messages=conv("a"),
        initial_prompt="p",
        initial_prompt_sent=False,
        prompt_origin="agentapi_state",
    )
    assert with_prompt_fields(c, from_file=None, environment_prompt="x") == (c, None)


@pytest.mark.parametrize(
    ("messages", "env_prompt", "sent", "origin"),
    [
        (conv("a", "b"), "do it", True, "environment"),
        ((), "do it", False, "environment"),
        (conv("a"), None, True, "unknown"),
    ],
)
def test_never_seen_prompt_fields_are_assumed_and_reported(
    messages: tuple[Message, ...], env_prompt: str | None, sent: bool, origin: str
) -> None:
    """With no source at all, the environment prompt is used and sent once a user spoke."""
    updated, note = with_prompt_fields(
        Conversation(messages=messages), from_file=None, environment_prompt=env_prompt
    )
    assert updated.initial_prompt == (env_prompt or "")
    assert updated.initial_prompt_sent is sent
    assert updated.prompt_origin == origin
    assert note is not None
    assert "assumed" in note
