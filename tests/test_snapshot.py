"""The pure log-snapshot builder: message and byte limits, drops, and tail truncation."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from agentapi_persist.models import Message, dump_compact
from agentapi_persist.snapshot import (
    MIN_MAX_BYTES,
    TRUNCATION_MARKER,
    Snapshot,
    build_snapshot,
)

TIME = "2025-01-02T03:04:05.123456789Z"
LIMIT = 65_536
EMPTY = b'{"messages":[]}'
MARKER = re.compile(r"\[\.\.\. (\d+) bytes truncated by agentapi-persist \.\.\.\]\n")
# What the Coder server accepts (SPEC section 3): RFC 3339 with a mandatory offset.
OFFSET_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:Z|[+-]\d{2}:\d{2})")


def message(i: int, content: str, *, role: str | None = None, time: str = TIME) -> Message:
    """A validated message; roles alternate user/agent unless given."""
    return Message(
        id=i,
        role=role or ("user" if i % 2 == 0 else "agent"),  # type: ignore[arg-type]
        content=content,
        time=time,
    )


def conversation(contents: list[str]) -> list[Message]:
    """Messages with ids 0..n-1 holding ``contents``."""
    return [message(i, text) for i, text in enumerate(contents)]


def wire(m: Message, content: str | None = None) -> dict[str, Any]:
    """The server's shape of one message, keys in the required order."""
    return {
        "id": m.id,
        "content": m.content if content is None else content,
        "role": m.role,
        "time": m.time,
    }


def body(items: list[dict[str, Any]]) -> bytes:
    """The expected payload for ``items``, built independently of the builder."""
    return dump_compact({"messages": items})


def split_marker(content: str) -> tuple[int, str]:
    """The cut byte count and the kept tail of a truncated content."""
    match = MARKER.match(content)
    assert match is not None, content[:80]
    return int(match.group(1)), content[match.end() :]


def tail_body(m: Message, k: int) -> bytes:
    """The payload holding only ``m`` cut down to its last ``k`` characters."""
    tail = m.content[len(m.content) - k :] if k else ""
    cut = len(m.content.encode()) - len(tail.encode())
    return body([wire(m, TRUNCATION_MARKER.format(cut_bytes=cut) + tail)])


def assert_truncated_well(snap: Snapshot, original: Message, *, max_bytes: int) -> str:
    """Check every promise about a truncated snapshot and return the kept tail."""
    assert snap.size <= max_bytes
    assert len(snap.messages) == 1
    kept = snap.messages[0]
    assert kept.id == original.id
    assert (kept.role, kept.time) == (original.role, original.time)
    cut, tail = split_marker(kept.content)
    assert cut == snap.truncated_bytes > 0
    assert original.content.endswith(tail)
    # The cut lands exactly on a character boundary of the original's UTF-8 bytes.
    assert original.content.encode()[cut:] == tail.encode()
    assert snap.payload == body([wire(original, kept.content)])
    assert json.loads(snap.payload.decode("utf-8"))["messages"] == [wire(kept)]
    # Maximal: one more character of tail would not fit.
    assert len(tail_body(original, len(tail) + 1)) > max_bytes
    return tail


def test_empty_conversation_gives_the_empty_body() -> None:
    """No messages give exactly {"messages":[]} and nothing dropped."""
    snap = build_snapshot([])
    assert snap == Snapshot(payload=EMPTY, messages=(), total=0, dropped=0, truncated_bytes=0)
    assert snap.size == len(EMPTY)


@pytest.mark.parametrize(
    ("count", "max_messages", "kept"),
    [
        (40, 30, 30),
        (30, 30, 30),
        (31, 30, 30),
        (3, 30, 3),
        (40, 1, 1),
        (40, 5, 5),
        (1, 50, 1),
    ],
)
def test_keeps_the_last_max_messages_byte_exact(count: int, max_messages: int, kept: int) -> None:
    """Only the newest max_messages are kept, byte-exact and with their ids."""
    messages = conversation([f'message {i}: ü ─ 😀 "quoted"\n' for i in range(count)])
    snap = build_snapshot(messages, max_messages=max_messages)
    expected = messages[count - kept :]
    assert snap.payload == body([wire(m) for m in expected])
    assert snap.messages == tuple(expected)
    assert [m["id"] for m in json.loads(snap.payload)["messages"]] == list(
        range(count - kept, count)
    )
    assert (snap.total, snap.dropped, snap.truncated_bytes) == (count, count - kept, 0)


def test_default_keeps_thirty_within_sixty_four_kib() -> None:
    """The defaults are the server's: 30 messages, 65,536 bytes."""
    snap = build_snapshot(conversation(["x" * 1_000] * 40))
    assert [m.id for m in snap.messages] == list(range(10, 40))
    snap = build_snapshot(conversation(["x" * 3_000] * 40))
    assert snap.size <= LIMIT < snap.size + 3_000 + 70
    assert len(snap.messages) < 30


def test_keys_are_in_the_server_order() -> None:
    """Each message is serialised as id, content, role, time."""
    snap = build_snapshot([message(0, "hi", role="agent")])
    assert snap.payload == (
        b'{"messages":[{"id":0,"content":"hi","role":"agent","time":"' + TIME.encode() + b'"}]}'
    )


@pytest.mark.parametrize(
    ("char", "bytes_per_char", "kept"),
    [
        ("a", 1, 6),
        ("é", 2, 3),
        ("\n", 2, 3),
        ('"', 2, 3),
        ("\\", 2, 3),
        ("─", 3, 2),
        ("😀", 4, 1),
        ("\x01", 6, 1),
    ],
)
def test_size_drops_the_oldest_counting_bytes_as_sent(
    char: str, bytes_per_char: int, kept: int
) -> None:
    """The limit counts encoded, escaped bytes, so costlier characters keep fewer messages."""
    messages = conversation([char * 10_000] * 10)
    assert len(body([wire(messages[0])])) - len(EMPTY) - 10_000 * bytes_per_char < 100
    snap = build_snapshot(messages)
    assert [m.id for m in snap.messages] == list(range(10 - kept, 10))
    assert snap.size <= LIMIT
    assert snap.dropped == 10 - kept
    assert snap.truncated_bytes == 0
    assert json.loads(snap.payload)["messages"] == [wire(m) for m in messages[10 - kept :]]
    assert len(body([wire(m) for m in messages[9 - kept :]])) > LIMIT


def test_mixed_sizes_keep_the_longest_fitting_run_of_newest() -> None:
    """A big old message is dropped together with everything older than it."""
    messages = conversation(["old"] * 5 + ["b" * 50_000] + ["c" * 5_000] * 4)
    snap = build_snapshot(messages)
    assert [m.id for m in snap.messages] == [6, 7, 8, 9]
    assert snap.dropped == 6


def test_a_payload_of_exactly_max_bytes_is_kept_and_one_byte_less_drops() -> None:
    """The limit is inclusive: a body of exactly max_bytes fits."""
    messages = conversation(["é" * 500, "─" * 300, "😀\n" * 200])
    exact = len(body([wire(m) for m in messages]))
    assert build_snapshot(messages, max_bytes=exact).messages == tuple(messages)
    snap = build_snapshot(messages, max_bytes=exact - 1)
    assert snap.messages == tuple(messages[1:])
    assert snap.size <= exact - 1


def test_box_drawing_last_message_is_cut_to_its_tail() -> None:
    """70,000 box-drawing characters after 39 messages keep the real tail behind the marker."""
    original_text = "".join("─" if i % 1_000 else str(i // 1_000 % 10) for i in range(70_000))
    messages = conversation(["earlier"] * 39 + [original_text])
    original = messages[-1]
    snap = build_snapshot(messages)
    tail = assert_truncated_well(snap, original, max_bytes=LIMIT)
    kept = snap.messages[0].content
    assert kept.startswith(TRUNCATION_MARKER.format(cut_bytes=snap.truncated_bytes))
    assert kept.endswith(original_text[-len(tail) :])
    assert len(tail) > 21_000  # 3 bytes each: about 21,800 fit in 64 KiB
    assert snap.truncated_bytes == len(original_text.encode()) - len(tail.encode())
    assert (snap.total, snap.dropped) == (40, 39)
    assert snap.size > LIMIT - 3


def test_ten_megabyte_mixed_message_is_cut_on_a_character_boundary() -> None:
    """A 10 MB message of 1-4 byte characters and escapes is cut to the longest fitting tail."""
    unit = 'a é ─ 😀\n"\\\x00\x1f\t\u2028'
    text = unit * (10_000_000 // len(unit.encode()))
    assert len(text.encode()) > 9_900_000
    original = message(0, text, role="agent")
    snap = build_snapshot([original])
    tail = assert_truncated_well(snap, original, max_bytes=LIMIT)
    assert len(tail) > 4_000
    assert snap.payload.decode("utf-8")


@pytest.mark.parametrize("wide", ["é", "─", "😀"])
@pytest.mark.parametrize("lead", [0, 1, 2, 3])
@pytest.mark.parametrize("slack", [0, 1, 2, 3])
def test_cut_never_splits_a_multibyte_character(wide: str, lead: int, slack: int) -> None:
    """Whatever the byte offset of the limit, the kept tail is whole characters."""
    original = message(0, "a" * lead + (wide + "b") * 2_000, role="agent")
    max_bytes = 1_024 + slack
    snap = build_snapshot([original], max_bytes=max_bytes)
    assert_truncated_well(snap, original, max_bytes=max_bytes)
    assert snap.size > max_bytes - len(wide.encode()) * 2


@pytest.mark.parametrize(
    ("char", "cost"), [("\n", 2), ('"', 2), ("\x01", 6), ("\x00", 6), ("\x7f", 1)]
)
def test_escaping_is_counted_when_truncating(char: str, cost: int) -> None:
    """A tail of characters that JSON escapes is sized by its escaped bytes."""
    original = message(3, char * 100_000, role="agent")
    snap = build_snapshot([original], max_bytes=4_096)
    tail = assert_truncated_well(snap, original, max_bytes=4_096)
    assert 4_096 - 200 < len(tail) * cost <= 4_096


def test_marker_count_shrinking_a_digit_keeps_the_limit() -> None:
    """When the cut count loses a digit the size still never passes the limit."""
    original = message(0, "x" * 1_900, role="agent")
    digits = set()
    for size in range(1_000, 1_100):
        snap = build_snapshot([original], max_bytes=size)
        assert_truncated_well(snap, original, max_bytes=size)
        digits.add(len(str(snap.truncated_bytes)))
    assert digits == {3, 4}


def test_inputs_are_not_modified() -> None:
    """Truncation builds a new message; the caller's list and messages are unchanged."""
    messages = conversation(["first", "y" * 100_000])
    before = [m.model_dump() for m in messages]
    snap = build_snapshot(messages)
    assert [m.model_dump() for m in messages] == before
    assert snap.messages[0] is not messages[1]
    assert snap.messages[0].content != messages[1].content


def test_worst_case_valid_message_fits_the_smallest_limit() -> None:
    """The largest id and time the models allow still fit in MIN_MAX_BYTES with the marker."""
    original = message(
        2**31 - 1, "😀" * 3_000_000, role="agent", time="2025-01-02T03:04:05.123456789+14:00"
    )
    snap = build_snapshot([original], max_bytes=MIN_MAX_BYTES)
    assert_truncated_well(snap, original, max_bytes=MIN_MAX_BYTES)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_bytes": MIN_MAX_BYTES - 1}, "max_bytes"),
        ({"max_bytes": 0}, "max_bytes"),
        ({"max_bytes": -1}, "max_bytes"),
        ({"max_messages": 0}, "max_messages"),
        ({"max_messages": -3}, "max_messages"),
    ],
)
def test_absurd_limits_are_rejected(kwargs: dict[str, int], match: str) -> None:
    """Limits too small to hold one message raise ValueError naming the limit."""
    with pytest.raises(ValueError, match=match):
        build_snapshot([message(0, "hi")], **kwargs)


def test_an_envelope_too_big_for_the_limit_is_a_clear_error() -> None:
    """An unvalidated message whose time alone overflows the limit raises, never overshoots."""
    huge = Message.model_construct(id=0, role="agent", content="text" * 100, time="9" * 400)
    with pytest.raises(ValueError, match="does not fit"):
        build_snapshot([huge], max_bytes=MIN_MAX_BYTES)


@pytest.mark.parametrize(
    "contents",
    [
        [],
        ["hello", "world"],
        ["a"] * 40,
        ["early"] * 5 + ["─" * 70_000],
        ['\x00\x1f"\\\n' * 30_000],
    ],
)
def test_payload_follows_the_coder_server_rules(contents: list[str]) -> None:
    """Only "messages", roles user/agent, times with an offset, UTF-8 within 64 KiB."""
    times = ["2025-01-02T03:04:05Z", "2025-01-02T03:04:05.5+02:00", "2025-01-02T03:04:05-07:30"]
    messages = [message(i, text, time=times[i % 3]) for i, text in enumerate(contents)]
    snap = build_snapshot(messages)
    assert snap.size <= LIMIT
    decoded = json.loads(snap.payload.decode("utf-8"))
    assert list(decoded) == ["messages"]
    for item in decoded["messages"]:
        assert list(item) == ["id", "content", "role", "time"]
        assert isinstance(item["id"], int)
        assert isinstance(item["content"], str)
        assert item["role"] in {"user", "agent"}
        assert OFFSET_TIME.fullmatch(item["time"])


# --- properties ------------------------------------------------------------------------------

_chars = st.one_of(
    st.characters(codec="utf-8"),
    st.sampled_from(['"', "\\", "\n", "\t", "\x00", "\x1f", "\x7f", "é", "─", "😀", "\u2028"]),
)
_contents = st.one_of(
    st.text(_chars, max_size=40),
    # Repetition reaches sizes beyond the limit without generating megabytes character by
    # character.
    st.builds(
        lambda piece, times: piece * times,
        st.text(_chars, min_size=1, max_size=6),
        st.integers(min_value=1, max_value=25_000),
    ),
)
_times = st.builds(
    lambda y, mo, d, h, mi, s, frac, off: (
        f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{s:02d}{frac}{off}"
    ),
    st.integers(1970, 2100),
    st.integers(1, 12),
    st.integers(1, 28),
    st.integers(0, 23),
    st.integers(0, 59),
    st.integers(0, 59),
    st.sampled_from(["", ".1", ".123", ".123456", ".123456789"]),
    st.sampled_from(["Z", "+00:00", "-07:30", "+14:00"]),  # Go refuses a lower-case z
)


@st.composite
def _conversations(draw: st.DrawFn) -> list[Message]:
    contents = draw(st.lists(_contents, max_size=45))
    return [
        message(i, text, role=draw(st.sampled_from(["user", "agent"])), time=draw(_times))
        for i, text in enumerate(contents)
    ]


@settings(max_examples=150, deadline=None)
@given(
    messages=_conversations(),
    max_messages=st.integers(min_value=1, max_value=50),
    max_bytes=st.integers(min_value=1_024, max_value=LIMIT),
)
def test_snapshot_properties(messages: list[Message], max_messages: int, max_bytes: int) -> None:
    """Any conversation and limits give a suffix within both limits, exact or one cut, maximal."""
    snap = build_snapshot(messages, max_messages=max_messages, max_bytes=max_bytes)
    n = len(messages)
    assert snap.size <= max_bytes
    assert snap.total == n
    decoded = json.loads(snap.payload.decode("utf-8"))["messages"]
    ids = [item["id"] for item in decoded]
    assert ids == list(range(n - len(ids), n))
    assert len(ids) <= max_messages
    assert snap.dropped == n - len(ids)
    assert decoded == [wire(m) for m in snap.messages]
    assert snap.payload == body(decoded)
    if n == 0:
        assert snap.payload == EMPTY
        return
    assert ids  # the newest message is always there, whole or cut
    if snap.truncated_bytes:
        event("cut the newest message")
        original = messages[-1]
        assert len(body([wire(original)])) > max_bytes
        assert_truncated_well(snap, original, max_bytes=max_bytes)
        return
    assert decoded == [wire(m) for m in messages[n - len(ids) :]]
    if len(ids) < min(n, max_messages):
        event("dropped for size")
        one_more = messages[n - len(ids) - 1 :]
        assert len(body([wire(m) for m in one_more])) > max_bytes
