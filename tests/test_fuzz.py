"""Property and fuzz tests (hypothesis) on everything that parses outside input.

Each parser gets arbitrary bytes and mutated valid documents, and must either return a value
that keeps the invariants the rest of the product relies on, or raise its one documented error.
Anything else (a ``TypeError``, a ``RecursionError``, a ``UnicodeError``) is a crash and a
product bug. Runs are deterministic (``derandomize=True``, no example database), so CI sees the
same examples every time; ``FUZZ_SCALE=10`` multiplies every example count for a deeper look.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr, TypeAdapter

from agentapi_persist import records
from agentapi_persist._options import OPTIONS, quick_settings
from agentapi_persist.agent_process import Version, read_pid_file
from agentapi_persist.agentapi import AgentEvent, _interpret, _RawEvent, _SSEDecoder
from agentapi_persist.agentapi_state import (
    conversation_from_state,
    read_agentapi_state,
    render_agentapi_state,
)
from agentapi_persist.coder import CoderClient, UploadOutcome, _Attempt, _classify
from agentapi_persist.config import CoderTarget, Settings
from agentapi_persist.control import ControlServer
from agentapi_persist.control_client import SOCKET_NAME, socket_address
from agentapi_persist.errors import AgentAPIBodyError, ConfigError, StateFileError
from agentapi_persist.generation_body import BodyReader, conversation_body
from agentapi_persist.models import (
    AgentAPIState,
    Conversation,
    Message,
    MessagesResponse,
    go_accepts_time,
    parse_untrusted_json,
    sanitize_text,
)
from agentapi_persist.store import StateStore

from . import evidence
from .conftest import CANARY_TOKEN, TASK_ID

SCALE = max(int(os.environ.get("FUZZ_SCALE", "1") or 1), 1)


def fuzz(examples: int) -> Callable[[Any], Any]:
    """Deterministic hypothesis settings for CI (same examples every run, no database), and
    every example run counted for the reliability notes (``tests/evidence.py``)."""
    chosen = _settings(examples)

    def apply(test: Any) -> Any:
        test = chosen(test)
        inner = test.hypothesis.inner_test  # hypothesis's documented hook around each example

        @functools.wraps(inner)
        def counted(*args: Any, **kwargs: Any) -> Any:
            evidence.tally("fuzzing", "examples")
            return inner(*args, **kwargs)

        test.hypothesis.inner_test = counted
        return test

    return apply


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples * SCALE,
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=False,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
            HealthCheck.filter_too_much,
        ],
    )


# The shape of a time; which of these Go accepts is ``go_accepts_time`` (tests/test_go_time.py
# holds that rule against Go itself).
RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{1,2}:\d{2}:\d{2}(?:[.,]\d{1,12})?(?:Z|[+-]\d{2}:\d{2})", re.ASCII
)
TIMES = ["2025-01-02T03:04:05Z", "2025-01-02T03:04:05.123456789Z", "2025-01-02T3:04:05,1+02:00"]
times = st.sampled_from(TIMES) | st.from_regex(RFC3339, fullmatch=True).filter(
    lambda s: s.isascii() and "\n" not in s and go_accepts_time(s)
)
# Every code point, lone surrogates included: JSON can carry them as \ud800 escapes.
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=24)
roles = st.sampled_from(["user", "agent"])


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` after 1-4 realistic damages: bit flips, overwritten or zeroed runs (a bad
    sector), a cut (a torn write), inserted, deleted or appended bytes."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "zero", "cut", "insert", "delete", "append"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            run = draw(st.binary(min_size=1, max_size=8))
            data[at : at + len(run)] = run
        elif kind == "zero":
            data[at : at + draw(st.integers(1, 64))] = b"\0" * draw(st.integers(1, 64))
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        else:
            data += draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


def _message_dicts(text_key: str) -> st.SearchStrategy[list[dict[str, Any]]]:
    one = st.fixed_dictionaries({"role": roles, text_key: any_text, "time": times})
    return st.lists(one, max_size=6).map(
        lambda items: [{"id": index, **item} for index, item in enumerate(items)]
    )


def _dump(document: Any, *, ascii_only: bool) -> bytes:
    # ensure_ascii turns lone surrogates into \udxxx escapes; without it they cannot be
    # UTF-8 encoded at all, so those documents are always written the ASCII way.
    text = json.dumps(document, ensure_ascii=ascii_only, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(document, separators=(",", ":")).encode("ascii")


@st.composite
def state_documents(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    document: dict[str, Any] = {
        "version": 1,
        "messages": draw(_message_dicts("message")),
        "initial_prompt": draw(any_text),
        "initial_prompt_sent": draw(st.booleans()),
    }
    if draw(st.booleans()):
        document["future_field"] = draw(st.recursive(st.none() | st.integers() | any_text,
                                                     lambda inner: st.lists(inner, max_size=3),
                                                     max_leaves=6))  # fmt: skip
    return _dump(document, ascii_only=draw(st.booleans())) + b"\n", document


@st.composite
def messages_documents(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    document = {"messages": draw(_message_dicts("content"))}
    return _dump(document, ascii_only=draw(st.booleans())), document


def assert_go_loadable(state: AgentAPIState) -> None:
    """What AgentAPI (Go) needs from a file we call valid, and what restore relies on."""
    assert state.version == 1
    assert type(state.initial_prompt_sent) is bool
    assert [m.id for m in state.messages] == list(range(len(state.messages)))
    for m in state.messages:
        assert type(m.id) is int
        assert m.role in ("user", "agent")
        assert go_accepts_time(m.time)
        m.message.encode("utf-8")  # sanitised: no lone surrogate survives
    state.initial_prompt.encode("utf-8")
    # Rendering it again gives strict JSON (no NaN/Infinity) that reads back the same.
    rendered = render_agentapi_state(conversation_from_state(state), extra=state)
    strict = json.loads(rendered, parse_constant=_refuse_constant)
    assert strict["version"] == 1
    assert [m["message"] for m in strict["messages"]] == [m.message for m in state.messages]


def go_would_accept(data: bytes) -> bool:
    """Whether AgentAPI's Go decoder loads these bytes into its state struct: strict JSON
    (no NaN or Infinity), and each known field of the type Go declares (an ``int`` field
    refuses ``1.0``, ``"1"`` and ``true``; a ``bool`` refuses ``"true"`` and ``1``)."""
    try:
        document = json.loads(data.decode("utf-8", errors="replace"), parse_constant=_nan)
    except (ValueError, RecursionError):
        return False
    if not isinstance(document, dict):
        return False
    kinds: dict[str, type] = {"version": int, "initial_prompt": str, "initial_prompt_sent": bool}
    for key, kind in kinds.items():
        if key in document and document[key] is not None and type(document[key]) is not kind:
            return False
    messages = document.get("messages")
    if messages is None:
        return True
    if not isinstance(messages, list):
        return False
    fields: dict[str, type] = {"id": int, "message": str, "role": str, "time": str}
    for message in messages:
        if message is None:
            continue
        if not isinstance(message, dict):
            return False
        for key, kind in fields.items():
            if message.get(key) is not None and type(message[key]) is not kind:
                return False
    return True


def _nan(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _refuse_constant(name: str) -> Any:
    raise AssertionError(f"{name} is not JSON: AgentAPI could not load this file")


def assert_short_reason(exc: BaseException) -> None:
    assert isinstance(exc, ValueError)
    assert len(str(exc)) < 600, str(exc)[:200]


# -- models.parse_untrusted_json --------------------------------------------------------------


DEEP = b'{"version":1,"messages":[],"x":' + b"[" * 900 + b"]" * 900 + b"}"


class TestParseUntrustedJson:
    @fuzz(300)
    @given(data=st.binary(max_size=300))
    @example(data=b"[" * 100_000)
    @example(data=DEEP)
    @example(data=b'{"version":1,"messages":[],"x":NaN}')
    @example(data=b'{"version":true,"messages":[]}')
    @example(data=b'{"version":1.0,"messages":[]}')
    @example(data=b'{"version":1,"messages":[],"initial_prompt_sent":"true"}')
    def test_state_from_arbitrary_bytes(self, data: bytes) -> None:
        """Arbitrary bytes: a state AgentAPI can load, or ValueError with a short reason."""
        try:
            state = parse_untrusted_json(data, AgentAPIState)
        except ValueError as exc:
            assert_short_reason(exc)
            return
        assert go_would_accept(data), "accepted a file AgentAPI would refuse to load"
        assert_go_loadable(state)

    @fuzz(300)
    @given(data=st.binary(max_size=300))
    @example(data=b"[" * 100_000)
    @example(
        data=b'{"messages":[{"id":0,"role":"user","content":"\\ud800","time":"2025-01-02T03:04:05Z"}]}'
    )
    @example(
        data=b'{"messages":[{"id":1.0,"role":"user","content":"","time":"2025-01-02T03:04:05Z"}]}'
    )
    def test_messages_from_arbitrary_bytes(self, data: bytes) -> None:  # fmt: skip
        """``GET /messages`` bodies: a response whose text encodes, or ValueError."""
        try:
            response = parse_untrusted_json(data, MessagesResponse)
        except ValueError as exc:
            assert_short_reason(exc)
            return
        for m in response.messages:
            assert type(m.id) is int
            assert m.role in ("user", "agent")
            m.content.encode("utf-8")

    @fuzz(150)
    @given(doc=state_documents())
    def test_valid_state_documents_parse_to_what_they_say(self, doc) -> None:
        """Every well-formed v1 document parses, its text sanitised and nothing else changed."""
        data, document = doc
        state = parse_untrusted_json(data, AgentAPIState)
        assert [(m.role, m.message, m.time) for m in state.messages] == [
            (m["role"], sanitize_text(m["message"]), m["time"]) for m in document["messages"]
        ]
        assert state.initial_prompt == sanitize_text(document["initial_prompt"])
        assert state.initial_prompt_sent is document["initial_prompt_sent"]
        assert_go_loadable(state)

    @fuzz(200)
    @given(data=state_documents().flatmap(lambda doc: mutated(doc[0])))
    def test_mutated_state_documents(self, data: bytes) -> None:
        """Damaged state files: a loadable state, or ValueError; never another exception."""
        try:
            state = parse_untrusted_json(data, AgentAPIState)
        except ValueError as exc:
            assert_short_reason(exc)
            return
        assert go_would_accept(data), "accepted a file AgentAPI would refuse to load"
        assert_go_loadable(state)

    @fuzz(150)
    @given(data=messages_documents().flatmap(lambda doc: mutated(doc[0])))
    def test_mutated_messages_documents(self, data: bytes) -> None:
        """Damaged ``/messages`` bodies: a response, or ValueError."""
        try:
            response = parse_untrusted_json(data, MessagesResponse)
        except ValueError as exc:
            assert_short_reason(exc)
            return
        for m in response.messages:
            m.content.encode("utf-8")


# -- agentapi_state.read_agentapi_state ---------------------------------------------------------


_counter = itertools.count()


def fresh_dir(base: Path) -> Path:
    """A new directory per hypothesis example (tmp_path is shared by all of them)."""
    path = base / f"ex{next(_counter)}"
    path.mkdir()
    return path


class TestReadAgentAPIState:
    @fuzz(150)
    @given(
        data=st.one_of(
            st.binary(max_size=400), state_documents().flatmap(lambda doc: mutated(doc[0]))
        ),
        cap=st.sampled_from([64, 1 << 20]),
    )
    def test_only_documented_errors(self, tmp_path: Path, data: bytes, cap: int) -> None:
        """Any file content: a loadable state, or StateFileError naming the file."""
        path = fresh_dir(tmp_path) / "agentapi-state.json"
        path.write_bytes(data)
        state: AgentAPIState | None = None
        error: StateFileError | None = None
        try:
            state = read_agentapi_state(path, max_bytes=cap)
        except StateFileError as exc:
            error = exc
        if state is None:
            assert error is not None
            assert error.path == str(path)
            assert str(path) in str(error)
            return
        assert len(data) <= cap
        assert go_would_accept(data)
        assert_go_loadable(state)


# -- store.StateStore.load --------------------------------------------------------------------


def _msg(i: int, text: str) -> Message:
    return Message(id=i, role="user" if i % 2 == 0 else "agent", content=text, time=TIME)


TIME = "2025-01-02T03:04:05.123456789Z"


class _Fixture:
    """Two generations with journals, built once by the real store; the states they hold."""

    def __init__(self, directory: Path) -> None:
        store = StateStore(directory)
        store.load()
        store.save(Conversation(messages=tuple(_msg(i, f"one {i}") for i in range(3))))
        store.append([_msg(3, "one 3")])
        store.append([_msg(3, "one 3, longer")])
        self.states: dict[int, list[tuple[Message, ...]]] = {1: [], 2: []}
        store.save(Conversation(messages=tuple(_msg(i, f"two {i}") for i in range(5))))
        store.append([_msg(5, "two 5")])
        store.append([_msg(5, "two 5, longer"), _msg(6, "two 6")])
        store.append([_msg(7, "two 7")])
        self.files = {name: (directory / name).read_bytes() for name in os.listdir(directory)}
        assert sorted(self.files) == [
            "conversation-000000000001.json",
            "conversation-000000000002.json",
            "journal-000000000001.log",
            "journal-000000000002.log",
        ]
        for seq in (1, 2):
            # The states a replay can stop at: the generation, then one record more each time.
            gen = self.files[f"conversation-{seq:012d}.json"]
            body = json.loads(gen.split(b"\n", 1)[1])
            messages = [Message(**m) for m in body["messages"]]
            self.states[seq].append(tuple(messages))
            for line in self.files[f"journal-{seq:012d}.log"].splitlines()[1:]:
                record = json.loads(line[9:])
                for put in record["put"]:
                    message = Message(**put)
                    if message.id < len(messages):
                        messages[message.id] = message
                    else:
                        messages.append(message)
                for grow in record.get("grow", ()):  # a message that only gained text
                    old = messages[grow["id"]]
                    assert len(old.content) == grow["from"]
                    messages[grow["id"]] = old.model_copy(
                        update={"content": old.content + grow["add"], "time": grow["time"]}
                    )
                self.states[seq].append(tuple(messages))
        loaded = StateStore(directory).load().conversation
        assert loaded is not None
        assert self.states[2][-1] == loaded.messages


@pytest.fixture(scope="module")
def store_fixture(tmp_path_factory: pytest.TempPathFactory) -> _Fixture:
    return _Fixture(tmp_path_factory.mktemp("store-fixture"))


FILE_NAMES = [
    "conversation-000000000001.json",
    "journal-000000000001.log",
    "conversation-000000000002.json",
    "journal-000000000002.log",
]


@st.composite
def damaged_dirs(draw: st.DrawFn, files: dict[str, bytes]) -> dict[str, tuple[str, bytes | None]]:
    """For each file: kept, mutated, replaced by arbitrary bytes, or missing."""
    plan: dict[str, tuple[str, bytes | None]] = {}
    for name in FILE_NAMES:
        how = draw(st.sampled_from(["keep", "mutate", "mutate", "arbitrary", "missing"]))
        if how == "keep":
            plan[name] = (how, files[name])
        elif how == "mutate":
            plan[name] = (how, draw(mutated(files[name])))
        elif how == "arbitrary":
            plan[name] = (how, draw(st.binary(max_size=200)))
        else:
            plan[name] = (how, None)
    return plan


def _kept_somewhere(directory: Path, name: str, data: bytes) -> bool:
    if (directory / name).exists() and (directory / name).read_bytes() == data:
        return True
    return any(path.read_bytes() == data for path in directory.glob(f"{name}.corrupt-*"))


class TestStoreLoad:
    @fuzz(150)
    @given(data=st.data())
    def test_newest_valid_state_or_none_and_bytes_never_lost(
        self, tmp_path: Path, store_fixture: _Fixture, data: st.DataObject
    ) -> None:
        """Any mix of kept, damaged, foreign and missing generation and journal files:
        ``load`` never raises, returns one of the states the files really held (the newest
        generation that verifies, never an older one while it is intact, and a prefix of its
        journal), moves unusable bytes aside unchanged, deletes nothing; the store then
        accepts a new change that the next load sees."""
        plan = data.draw(damaged_dirs(store_fixture.files))
        directory = fresh_dir(tmp_path)
        for name, (_, content) in plan.items():
            if content is not None:
                (directory / name).write_bytes(content)

        report = StateStore(directory).load()

        for name, (_, content) in plan.items():
            if content is not None:
                assert _kept_somewhere(directory, name, content), name
        for moved in report.quarantined:
            assert moved.exists()
        if report.quarantined:
            assert report.problems

        intact = {name for name, (how, _) in plan.items() if how == "keep"}
        if report.conversation is None:
            assert report.seq is None
            assert "conversation-000000000002.json" not in intact
            assert "conversation-000000000001.json" not in intact
            if any(c is not None for name, (_, c) in plan.items() if name.startswith("conv")):
                assert report.problems  # something was there and could not be used: said so
        else:
            assert report.seq in (1, 2)
            if "conversation-000000000002.json" in intact:
                assert report.seq == 2
            if report.seq == 1:
                assert plan["conversation-000000000002.json"][0] != "keep"
                if plan["conversation-000000000002.json"][1] is not None:
                    assert any("generation 2" in p for p in report.problems)
            states = store_fixture.states[report.seq]
            assert report.conversation.messages in states
            journal = f"journal-{report.seq:012d}.log"
            if journal in intact:
                assert report.conversation.messages == states[-1]
            elif plan[journal][0] == "mutate" and report.conversation.messages != states[-1]:
                damaged = plan[journal][1]
                assert damaged is not None
                clean_cut = store_fixture.files[journal].startswith(damaged) and (
                    damaged == b"" or damaged.endswith(b"\n")
                )  # a cut exactly at a record boundary is a shorter journal, indistinguishable
                if not clean_cut:
                    assert any(f"journal {report.seq}" in p for p in report.problems)

        # Loading is stable: a second look sees the same thing and moves nothing more.
        again = StateStore(directory).load()
        assert again.conversation == report.conversation
        assert again.quarantined == ()

        # And the store still works: one more message is durable and seen by the next load.
        store = StateStore(directory)
        loaded = store.load().conversation
        count = len(loaded.messages) if loaded else 0
        store.append([_msg(count, "after the damage")])
        final = StateStore(directory).load()
        assert final.conversation is not None
        assert final.conversation.messages[:count] == (loaded.messages if loaded else ())
        assert final.conversation.messages[count].content == "after the damage"


# -- agentapi._SSEDecoder ---------------------------------------------------------------------

line_text = st.text(
    st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=12
)  # a field value: anything but a line end
EOLS = ["\n", "\r", "\r\n"]


@st.composite
def sse_streams(draw: st.DrawFn) -> tuple[bytes, list[tuple[str, str, str]]]:
    """A valid event stream and the events (type, data, last id) it must produce."""
    lines: list[str] = []
    expected: list[tuple[str, str, str]] = []
    last_id = ""
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.booleans()):
            lines.append(":" + draw(line_text))
        if draw(st.booleans()):
            lines.append("retry: " + str(draw(st.integers(0, 10_000))))
        if draw(st.booleans()):
            last_id = draw(line_text.filter(lambda s: "\0" not in s))
            lines.append("id: " + last_id)
        event_type = draw(st.sampled_from(["", "message_update", "status_change"]) | line_text)
        if event_type or draw(st.booleans()):
            lines.append("event: " + event_type)
        values = draw(st.lists(line_text, max_size=3))
        for value in values:
            sep = draw(st.sampled_from([": ", ":"])) if not value.startswith(" ") else ": "
            lines.append("data" + sep + value)
        lines.append("")
        if values:
            expected.append((event_type or "message", "\n".join(values), last_id))
    if draw(st.booleans()):
        lines.append("data: an unfinished event at the end is dropped")
    out: list[str] = []
    previous = "\n"
    for line in lines:
        choices = EOLS if line or previous != "\r" else ["\r", "\r\n"]  # CR then LF is one EOL
        previous = draw(st.sampled_from(choices))
        out.append(line + previous)
    bom = "\ufeff" if draw(st.booleans()) else ""
    return (bom + "".join(out)).encode("utf-8"), expected


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]  # repeated cuts: empty chunks


def raw_events(chunks: list[bytes], *, cap: int = 1 << 20) -> list[_RawEvent]:
    decoder = _SSEDecoder(max_event_bytes=cap)
    return [e for chunk in chunks for e in decoder.feed(chunk)]


def decode(chunks: list[bytes], *, cap: int = 1 << 20) -> list[tuple[str, str, str]]:
    """Events with their data decoded as the spec decodes a stream (UTF-8, replacing what
    is invalid); the decoder itself hands the data on undecoded."""
    return [
        (e.type, e.data.decode("utf-8", errors="replace"), e.id)
        for e in raw_events(chunks, cap=cap)
    ]


BOUNDARIES = ['},{"id":1', '}],"initial_prompt":"']


class TestGenerationBody:
    """A generation's body is parsed as the file is read: any split of any body gives what
    one parse of the whole gives, a conversation or a ValueError, never another reading."""

    @staticmethod
    def whole(body: bytes) -> Conversation | type[ValueError]:
        try:
            return TypeAdapter(Conversation).validate_json(body)
        except ValueError:
            return ValueError

    @staticmethod
    def in_pieces(chunks: list[bytes]) -> Conversation | type[ValueError]:
        reader = BodyReader()
        try:
            for chunk in chunks:
                reader.feed(chunk)
            return reader.finish()
        except ValueError:
            return ValueError

    @fuzz(300)
    @given(
        texts=st.lists(
            any_text | st.sampled_from(['},{"id":1', '}],"initial_prompt":"']), max_size=6
        ),
        prompt=any_text,
        cuts=st.lists(st.integers(0, 600), max_size=10),
    )
    def test_any_split_reads_what_one_parse_reads(self, texts, prompt, cuts) -> None:
        conversation = Conversation(
            messages=tuple(
                Message(id=i, role=("user", "agent")[i % 2], content=text, time=TIMES[1])
                for i, text in enumerate(texts)
            ),
            initial_prompt=prompt,
        )
        body = conversation_body(conversation)
        assert self.in_pieces(chunked(body, cuts)) == conversation

    @fuzz(300)
    @given(data=st.data(), cuts=st.lists(st.integers(0, 600), max_size=10))
    def test_damaged_bodies_read_as_one_parse_or_are_refused(self, data, cuts) -> None:
        """Damage may turn a body into another valid one (then both read the same) or into
        one the pieces refuse; the pieces never read something one parse would not."""
        base = conversation_body(
            Conversation(
                messages=tuple(
                    Message(id=i, role="agent", content=f"m{i}", time=TIMES[0]) for i in range(4)
                ),
                initial_prompt="p",
            )
        )
        body = data.draw(mutated(base))
        pieces = self.in_pieces(chunked(body, cuts))
        assert pieces is ValueError or pieces == self.whole(body)


class TestSSEDecoder:
    @fuzz(300)
    @given(stream=sse_streams(), cuts=st.lists(st.integers(0, 400), max_size=12))
    # A chunk that ends with a CRLF, the blank line's bare LF starting the next: a line-ending
    # rewrite once swallowed that LF (taking it for the second half of a CRLF), and the random
    # streams never cut exactly there.
    @example(
        stream=(b"data: a\r\n\ndata: b\n\n", [("message", "a", ""), ("message", "b", "")]), cuts=[9]
    )
    def test_valid_streams_give_the_same_events_whatever_the_chunks(self, stream, cuts) -> None:
        """The events of a valid stream do not depend on where the network split it (empty
        chunks included), and match what the stream says."""
        data, expected = stream
        assert decode([data]) == expected
        assert decode(chunked(data, cuts)) == expected

    def test_byte_by_byte(self) -> None:
        """The extreme split: one byte per chunk, with an empty chunk after each."""
        data = b"event: a\r\ndata: 1\r\r: c\rdata:2\r\n\r\nid: 9\ndata:  3\n\n"
        whole = decode([data])
        assert whole == [("a", "1", ""), ("message", "2", ""), ("message", " 3", "9")]
        assert decode([bytes([b]) for b in data]) == whole
        assert decode([piece for b in data for piece in (bytes([b]), b"")]) == whole

    @fuzz(250)
    @given(
        data=st.binary(max_size=300) | sse_streams().flatmap(lambda s: mutated(s[0])),
        cuts=st.lists(st.integers(0, 400), max_size=12),
    )
    def test_garbage_is_split_invariant_and_never_crashes(self, data: bytes, cuts) -> None:
        """Garbage: events (the same for any split) or AgentAPIBodyError; then each event is
        a typed event, skipped, or AgentAPIBodyError."""
        events = raw_events([data])
        assert raw_events(chunked(data, cuts)) == events
        for event in events:
            try:
                typed = _interpret(event, "http://agentapi")
            except AgentAPIBodyError:
                continue
            assert typed is None or isinstance(typed, AgentEvent)

    @fuzz(200)
    @given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 400), max_size=8))
    def test_small_cap_raises_only_body_errors(self, data: bytes, cuts) -> None:
        """With a tiny per-event cap, the decoder raises AgentAPIBodyError and nothing else."""
        try:
            decode(chunked(data, cuts), cap=32)
        except AgentAPIBodyError as exc:
            message = str(exc)
        else:
            message = "32-byte cap"
        assert "32-byte cap" in message


# -- config.Settings.load ---------------------------------------------------------------------

ENV_NAMES = sorted(
    {name for option in OPTIONS for name in option.env}
    | {"XDG_STATE_HOME", "ARG_MODULE_DIR_NAME", "ARG_AGENTAPI_PORT", "AGENTAPI_PORT"}
    | {"CODER_AGENT_TOKEN", "AGENTAPI_INITIAL_PROMPT"}
)
# What an environment can hold: no NUL; undecodable bytes arrive as surrogate escapes.
env_text = st.text(
    st.characters(codec=None, exclude_characters="\0", exclude_categories=["Cs"])
    | st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF),
    max_size=30,
)
NEAR_MISSES = [
    "", " ", "0", "-1", "1", "3284", "65536", "99999", "nan", "inf", "-inf", "1e999", "1_0",
    "²", "٣", "\uff11\uff10", "0x10", "true", "yes", "maybe",
    TASK_ID, TASK_ID.upper(), "{" + TASK_ID + "}",
    "http://localhost:3284", "http://localhost:99999", "http://localhost:-1", "http://[::1",
    "http://[::1]:3284", "http://host:port", "https://coder.example", "ftp://x", "http://",
    "http://h/?q=1", "http://h/#f", "debug", "DEBUG", "verbose", "~/state", "9" * 5000,
]  # fmt: skip
env_values = st.sampled_from(NEAR_MISSES) | env_text


def _check_url(url: str | None) -> None:
    if url is None:
        return
    parts = urlsplit(url)
    assert parts.hostname
    assert parts.port is None or 0 <= parts.port < 65536  # .port raises if it is not a port


class TestSettings:
    @fuzz(500)
    @given(env=st.dictionaries(st.sampled_from(ENV_NAMES), env_values, max_size=8))
    @example(env={"ARG_AGENTAPI_PORT": "²"})
    @example(env={"AGENTAPI_PERSIST_AGENTAPI_URL": "http://localhost:99999"})
    @example(env={"AGENTAPI_PERSIST_CODER_URL": "http://coder:70000"})
    def test_only_config_errors(self, env: dict[str, str]) -> None:
        """Arbitrary environments: valid Settings whose URLs and Coder target the clients can
        use as they are, or ConfigError; never anything else."""
        full = {"HOME": "/home/coder", **env}
        state_dir, _, instance = quick_settings({}, full)  # the client path never raises
        try:
            settings = Settings.load({}, env=full)
        except ConfigError:
            return
        # The sidecar is found, and checks the instance, by what the fast path resolves.
        assert Path(state_dir) == settings.state_dir
        assert instance == settings.instance
        _check_url(settings.agentapi_url)
        _check_url(settings.coder_url)
        assert settings.budget_s > 0
        try:
            target = settings.coder_target()
        except ConfigError:
            return
        if target is not None:
            with contextlib.suppress(ConfigError):
                CoderClient(target, session=None)  # type: ignore[arg-type]  # never used here

    @fuzz(250)
    @given(flags=st.dictionaries(st.sampled_from([o.field for o in OPTIONS]), env_values))
    def test_flags_as_the_parser_hands_them_over(self, flags: dict[str, str]) -> None:
        """Flag values after argparse's conversion: Settings or ConfigError."""
        from agentapi_persist.cli import _CONVERTERS

        kinds = {o.field: o.kind for o in OPTIONS}
        converted: dict[str, object] = {}
        for field, raw in flags.items():
            kind = kinds[field]
            if kind == "bool":
                converted[field] = raw.lower() in ("1", "true", "yes")
                continue
            try:
                converted[field] = _CONVERTERS[kind](raw)
            except ValueError:
                continue  # argparse refuses it: exit 2 before Settings
        try:
            settings = Settings.load(converted, env={"HOME": "/home/coder"})
        except ConfigError:
            return
        _check_url(settings.agentapi_url)
        _check_url(settings.coder_url)


# -- coder: the response classifier ------------------------------------------------------------


def _client() -> CoderClient:
    target = CoderTarget("http://127.0.0.1:9", SecretStr(CANARY_TOKEN), TASK_ID)
    return CoderClient(target, session=None)  # type: ignore[arg-type]  # nothing is sent


bodies = st.one_of(
    st.binary(max_size=200),
    st.builds(
        lambda message, detail: json.dumps({"message": message, "detail": detail}).encode(),
        any_text | st.just(CANARY_TOKEN) | st.just("Route not found.") | st.integers(),
        any_text | st.just(f"token {CANARY_TOKEN} rejected") | st.none(),
    ),
    st.just(b'{"message":' + b"[" * 990 + b"]" * 990 + b"}"),
    st.just(CANARY_TOKEN.encode() + b" echoed back"),
)


class TestCoderClassifier:
    @fuzz(400)
    @given(status=st.integers(100, 599), body=bodies, location=any_text | st.just(CANARY_TOKEN))
    def test_every_answer_gets_an_outcome_and_a_safe_sentence(self, status, body, location):
        """Any status and body: one documented outcome; the sentence for it never raises,
        stays short, and never carries the token even when the server echoes it."""
        outcome = _classify(status, body)
        if status == 204:
            assert outcome is UploadOutcome.DELIVERED
        elif status == 404:
            assert outcome in (UploadOutcome.ROUTE_MISSING, UploadOutcome.TASK_NOT_FOUND)
        elif 300 <= status < 400:
            assert outcome is UploadOutcome.REDIRECT_REFUSED
        elif status >= 500:
            assert outcome is UploadOutcome.SERVER_ERROR
        client = _client()
        attempt = _Attempt(outcome, status, body, location)
        detail = client._final_detail(attempt, 1)
        assert CANARY_TOKEN not in detail
        assert len(detail) < 1200
        if outcome is UploadOutcome.SERVER_ERROR:
            from agentapi_persist.budget import Budget

            exhausted = client._exhausted_detail(attempt, 3, Budget(1.0))
            assert CANARY_TOKEN not in exhausted


# -- smaller parsers: pid file, version line, history records, control requests --------------


class TestSmallParsers:
    @fuzz(300)
    @given(data=st.binary(max_size=80))
    @example(data=b"12\n")
    @example(data="١٢".encode())
    def test_pid_file(self, tmp_path: Path, data: bytes) -> None:
        """A pid file with any content: a pid in range, or None with a reason."""
        path = fresh_dir(tmp_path) / "agentapi.pid"
        path.write_bytes(data)
        pid, reason = read_pid_file(path)
        if pid is None:
            assert reason
        else:
            assert 0 < pid <= 2**22
            assert str(pid).encode() in data

    @fuzz(250)
    @given(
        text=st.text(max_size=80)
        | st.from_regex(r"agentapi version v?\d{1,30}\.\d{1,3}\.\d{1,3}(-[a-z0-9.]{0,8})?")
    )
    def test_version_line(self, text: str) -> None:
        """``agentapi --version`` output: a Version that prints back parseably, or None."""
        version = Version.parse(text)
        if version is not None:
            assert Version.parse(str(version)) == version

    @fuzz(200)
    @given(data=st.binary(max_size=200) | st.just(b"[" * 5_000))
    def test_history_record(self, tmp_path: Path, data: bytes) -> None:
        """``last-*.json`` with any content: a dict or None (it is informational only)."""
        directory = fresh_dir(tmp_path)
        (directory / records.LAST_UPLOAD).write_bytes(data)
        record = records.read_record(directory, records.LAST_UPLOAD)
        assert record is None or isinstance(record, dict)


HOSTILE_REQUESTS = [
    b"\n",
    b"not json\n",
    b"[1, 2]\n",
    b'{"op": 7}\n',
    b"\xff\xfe\n",
    b"[" * 50_000 + b"\n",  # deeper than the interpreter's recursion limit
    b'{"op": "status", "x": ' + b"[" * 50_000 + b"}\n",
    b"x" * 70_000 + b"\n",  # over the request cap
]


async def test_control_server_answers_every_hostile_request(tmp_path: Path) -> None:
    """The control socket refuses each malformed request with a JSON answer and keeps
    serving; a good request still works after all of them."""
    state_dir = tmp_path / "state"

    async def handler(request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "op": request["op"]}

    server = ControlServer(state_dir, handler)
    await server.start()
    try:
        for request in [*HOSTILE_REQUESTS, b'{"op": "status"}\n']:
            with socket_address(state_dir / SOCKET_NAME) as address:
                reader, writer = await asyncio.open_unix_connection(address)
            writer.write(request)
            await writer.drain()
            first = await asyncio.wait_for(reader.readline(), 5)
            answer = json.loads(first)
            writer.close()
            await writer.wait_closed()
            if request.startswith(b'{"op": "status"}'):
                assert answer == {"accepted": True}
            else:
                assert answer["accepted"] is False, request[:40]
                assert answer["error"].startswith("bad request")
    finally:
        await server.close()
