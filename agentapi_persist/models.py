"""Data shapes: AgentAPI's wire models, its v1 state file, and our own conversation copy.

No behaviour lives here beyond validation. Everything that crosses a process boundary is
untrusted, so the models are strict about what we rely on (roles, ids, RFC 3339 times with an
offset) and tolerant about what we do not (unknown extra fields are ignored on the wire and
carried forward in AgentAPI's state file).

Numbers and booleans are strict, as in Go: an ``int`` field refuses ``1.0``, ``"1"`` and ``true``,
a ``bool`` refuses ``"true"`` and ``1``, and ``NaN``/``Infinity`` (not JSON) are refused anywhere.
AgentAPI refuses to load such a file and starts empty, so calling it good would lose history.

Text is sanitised once, on the way in: a lone UTF-16 surrogate (legal in JSON escapes, illegal
in UTF-8) becomes U+FFFD, which is what AgentAPI's own Go decoder does. After that every
string here encodes to UTF-8 without error, which the byte-exact snapshot limit relies on.
"""

from __future__ import annotations

import enum
import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import from_json

__all__ = [
    "AgentAPIState",
    "AgentAPIStateMessage",
    "AgentStatus",
    "Conversation",
    "Message",
    "MessagesResponse",
    "PromptOrigin",
    "Relation",
    "Role",
    "compare",
    "dump_compact",
    "holds_user_message",
    "iter_splice",
    "parse_batched",
    "parse_untrusted_json",
    "renumber",
    "sanitize_text",
    "splice_messages",
]

Role = Literal["user", "agent"]
PromptOrigin = Literal["agentapi_state", "agentapi_process", "environment", "unknown"]

_SURROGATE = re.compile("[\ud800-\udfff]")
# What Go's ``time.Time.UnmarshalJSON`` accepts, which is how AgentAPI reads every message time
# of its state file: the strict RFC 3339 fast path, else ``time.Parse(time.RFC3339, ...)`` with
# the extra checks switched off (Go src/time/format_rfc3339.go ``parseStrictRFC3339``, "Strict
# parsing is disabled for now"). So: upper-case ``T`` and ``Z`` only; a one- or two-digit hour;
# any number of fractional digits after ``.`` or ``,``; an offset hour up to 24 and minute up
# to 60; calendar-checked dates; years 0000-9999. tests/test_models.py checks this against Go.
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{1,2}):(\d{2}):(\d{2})(?:[.,]\d+)?(?:Z|[+-](\d{2}):(\d{2}))",
    flags=re.ASCII,
)
_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
#: Go's zero time, which ``null`` decodes to.
GO_ZERO_TIME = "0001-01-01T00:00:00Z"


def go_accepts_time(value: str) -> bool:
    """Whether AgentAPI (Go's JSON decoder) would accept ``value`` as a message time."""
    match = _RFC3339.fullmatch(value)
    if match is None:
        return False
    year, month, day, hour, minute, second = (int(match.group(i)) for i in range(1, 7))
    if not 1 <= month <= 12:
        return False
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    if not 1 <= day <= _DAYS[month - 1] + (1 if month == 2 and leap else 0):
        return False
    if hour > 23 or minute > 59 or second > 59:
        return False
    offset = match.group(7)  # Go checks the offset loosely: hour <= 24, minute <= 60
    return offset is None or (int(offset) <= 24 and int(match.group(8)) <= 60)


def sanitize_text(text: str) -> str:
    """Replace lone surrogates with U+FFFD so the text always encodes to UTF-8."""
    if text.isascii():
        return text
    return _SURROGATE.sub("\ufffd", text)


def _check_time(value: str) -> str:
    if not go_accepts_time(value):
        raise ValueError("time must be RFC 3339 with an offset, e.g. 2025-01-02T03:04:05.123Z")
    return value


Text = Annotated[str, AfterValidator(sanitize_text)]
Time = Annotated[str, AfterValidator(_check_time)]
MessageId = Annotated[int, Field(ge=0, lt=2**31, strict=True)]


class AgentStatus(BaseModel):
    """``GET /status``. Only ``status`` is required: ``agent_type`` is absent before AgentAPI
    0.10.1 (0.10.0 is still the registry module's default; checked against the real binary)
    and ``transport`` before 0.12.0. Bodies also carry ``$schema``, which is ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    status: Literal["running", "stable"]
    agent_type: str | None = None
    transport: str | None = None


class Message(BaseModel):
    """One conversation message as we hold it. ``time`` is kept verbatim (up to 9 digits)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: MessageId
    role: Role
    content: Text
    time: Time


class MessagesResponse(BaseModel):
    """``GET /messages``: ``{"messages": [{id, content, role, time}]}``."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    messages: tuple[Message, ...]


class AgentAPIStateMessage(BaseModel):
    """A message in AgentAPI's state file: the text field is ``message``, not ``content``."""

    model_config = ConfigDict(frozen=True, extra="allow")

    id: MessageId
    message: Text
    role: Role
    time: Time

    @field_validator("time", mode="before")
    @classmethod
    def _null_is_zero_time(cls, value: object) -> object:
        """Go decodes ``null`` into the zero time and AgentAPI loads the file; so do we."""
        return GO_ZERO_TIME if value is None else value


class AgentAPIState(BaseModel):
    """AgentAPI's own state file, version 1. Unknown fields are carried forward on rewrite."""

    model_config = ConfigDict(frozen=True, extra="allow")

    version: Literal[1]
    messages: tuple[AgentAPIStateMessage, ...]
    # Required, not defaulted: AgentAPI always writes both. A file without them (a damaged key
    # name, say) would otherwise read as "prompt not sent" and make AgentAPI re-run it.
    initial_prompt: Text
    initial_prompt_sent: StrictBool

    @field_validator("version", mode="before")
    @classmethod
    def _version_is_an_integer(cls, value: object) -> object:
        # Literal[1] alone would take true and 1.0, which AgentAPI's int field refuses.
        if type(value) is not int:
            raise ValueError(f"version must be the integer 1, not {repr(value)[:40]}")
        return value

    @model_validator(mode="after")
    def _ids_are_contiguous(self) -> AgentAPIState:
        # AgentAPI gives a new message id = len(messages): a gap would make it collide.
        for index, message in enumerate(self.messages):
            if message.id != index:
                raise ValueError(f"message ids must be 0..n-1; found id {message.id} at {index}")
        return self

    def conversation_messages(self) -> tuple[Message, ...]:
        """The messages in our own shape."""
        return tuple(
            Message.model_construct(id=m.id, role=m.role, content=m.message, time=m.time)
            for m in self.messages
        )


class Conversation(BaseModel):
    """The sidecar's durable copy of one conversation.

    ``initial_prompt`` and ``initial_prompt_sent`` exist only in AgentAPI's state file (the HTTP
    API does not expose them). ``None`` means "never seen"; ``prompt_origin`` records where the
    values came from so that ``restore`` can say what it assumed.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    messages: tuple[Message, ...] = ()
    initial_prompt: Text | None = None
    initial_prompt_sent: bool | None = None
    prompt_origin: PromptOrigin = "unknown"

    @model_validator(mode="after")
    def _ids_are_contiguous(self) -> Conversation:
        for index, message in enumerate(self.messages):
            if message.id != index:
                raise ValueError(f"message ids must be 0..n-1; found id {message.id} at {index}")
        return self

    @property
    def prompt_settled(self) -> bool:
        """The prompt fields are AgentAPI's own (from its state file) and say the prompt was
        sent: nothing AgentAPI saves later can change them, so its file need not be read
        for them again."""
        return self.prompt_origin == "agentapi_state" and self.initial_prompt_sent is True

    def with_messages(self, messages: Sequence[Message]) -> Conversation:
        """A copy holding ``messages`` (already validated and contiguous) and the same prompt."""
        return self.model_copy(update={"messages": tuple(messages)})


def renumber(messages: Sequence[Message]) -> list[Message]:
    """The messages with ids equal to their positions (AgentAPI's file needs ``0..n-1``)."""
    return [
        m if m.id == index else m.model_copy(update={"id": index})
        for index, m in enumerate(messages)
    ]


# -- comparing conversations (pure) ---------------------------------------------------------


class Relation(enum.Enum):
    """How copy ``a`` relates to copy ``b``."""

    SAME = "same"
    A_AHEAD = "a_ahead"  # a extends b (b is a prefix of a, its last message possibly shorter)
    B_AHEAD = "b_ahead"
    LAST_DIFFERS = "last_differs"  # same length, only the last message differs
    DIVERGED = "diverged"  # they disagree before their last common message


def _same(a: Message, b: Message) -> bool:
    return a.role == b.role and a.content == b.content and a.time == b.time


def compare(a: Sequence[Message], b: Sequence[Message]) -> Relation:
    """Relate two message lists by content.

    The last message of the shorter list may differ from its counterpart: AgentAPI keeps
    extending the last agent message while the agent is running, so an older copy holds a
    shorter version of it. Any earlier difference is a real divergence.
    """
    common = min(len(a), len(b))
    # Compare from the end of the common part backwards: the recent messages are the ones
    # most likely to differ, so divergence is usually found in a few steps.
    for index in range(common - 2, -1, -1):
        if a[index] is not b[index] and not _same(a[index], b[index]):
            return Relation.DIVERGED
    last_equal = common == 0 or _same(a[common - 1], b[common - 1])
    if len(a) == len(b):
        return Relation.SAME if last_equal else Relation.LAST_DIFFERS
    if len(a) > len(b):
        return (
            Relation.A_AHEAD
            if last_equal or a[common - 1].role == b[common - 1].role
            else Relation.DIVERGED
        )
    return (
        Relation.B_AHEAD
        if last_equal or a[common - 1].role == b[common - 1].role
        else Relation.DIVERGED
    )


def holds_user_message(messages: Sequence[Message]) -> bool:
    """Whether anyone ever spoke to the agent here.

    Before AgentAPI loads its state file (it waits until the agent shows its input box) it
    holds only the agent's start-up screen, and a save in that window writes exactly that
    with ``initial_prompt_sent: false`` (coder/agentapi lib/screentracker/pty_conversation.go,
    the snapshot loop and ``SaveState``; seen with the real v0.12.2). Such a copy must never
    replace one that holds a user message.
    """
    return any(m.role == "user" for m in messages)


_M = TypeVar("_M", bound=BaseModel)
_T = TypeVar("_T")


#: Bodies above this size are validated message by message in batches (see
#: ``parse_untrusted_json``); below it one call is cheaper.
BATCHED_PARSE_BYTES = 1 << 20
_BATCH = 2000
_ELEMENT_ADAPTERS: dict[type[BaseModel], TypeAdapter[list[Any]]] = {}


def parse_untrusted_json(body: bytes, model: type[_M], *, deadline: float | None = None) -> _M:
    """Validate ``body`` as ``model``, tolerating what AgentAPI's Go decoder tolerates.

    Fast path: pydantic's own JSON parser. It rejects invalid UTF-8 and lone surrogate
    escapes outright; Go replaces both with U+FFFD, so on that error we decode with
    replacement, parse with the standard library and validate the Python objects (the text
    validators then replace any lone surrogate). Raises ``ValueError`` with a short reason.

    A big body with a ``messages`` list (100,000 messages take seconds) is validated in
    batches: pydantic holds the interpreter lock for a whole call, so one call would stall
    every other thread and the event loop (where the stop's deadlines live); between batches
    they run, and past ``deadline`` (``time.monotonic``) it raises ``TimeoutError``.
    """
    if len(body) > BATCHED_PARSE_BYTES and "messages" in model.model_fields:
        batched = parse_batched(body, model, deadline)
        if batched is not None:
            return batched
    try:
        parsed = model.model_validate_json(body)
    except ValidationError as exc:
        if not any(err["type"] == "json_invalid" for err in exc.errors()):
            raise ValueError(_summarise(exc)) from None
    else:
        # pydantic's parser takes NaN and Infinity, which are not JSON (Go refuses them). Our
        # fields are ints, strings and bools, which refuse such a value anyway; only a model
        # that carries unknown fields along (AgentAPI's file, rewritten by ``restore``) could
        # pass one on. Its body is parsed again, strictly, if it holds those letters at all
        # (the scan is 1-3 ms a megabyte, too much for every event of a long agent message).
        if model.model_config.get("extra") == "allow" and (b"NaN" in body or b"Infinity" in body):
            try:
                from_json(body, allow_inf_nan=False)
            except ValueError as exc:
                raise ValueError(f"not valid JSON (NaN or Infinity?): {str(exc)[:120]}") from None
        return parsed
    try:
        data: Any = json.loads(
            body.decode("utf-8", errors="replace"), parse_constant=_refuse_constant
        )
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not valid JSON: {str(exc)[:120]}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ValueError(_summarise(exc)) from None


def parse_batched(
    body: bytes | bytearray,
    model: type[_M],
    deadline: float | None = None,
) -> _M | None:
    """``model`` from ``body`` with its messages validated ``_BATCH`` at a time; ``None``
    when the body is not plain JSON (the careful path then says why or repairs it)."""
    try:
        document = from_json(body, allow_inf_nan=False)
    except ValueError:
        return None
    items = document.get("messages") if isinstance(document, dict) else None
    if not isinstance(items, list):
        return None
    adapter = _element_adapter(model)
    validated: list[Any] = []
    for start in range(0, len(items), _BATCH):
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(
                f"validating {len(items)} messages did not finish in time ({start} done)"
            )
        try:
            validated.extend(adapter.validate_python(items[start : start + _BATCH]))
        except ValidationError as exc:
            first = exc.errors(include_url=False, include_input=False)[0]
            loc = list(first["loc"])
            if loc and isinstance(loc[0], int):
                loc[0] += start
            where = ".".join(str(part) for part in ["messages", *loc])
            raise ValueError(f"{where}: {first['msg']}") from None
    document["messages"] = tuple(validated)
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        raise ValueError(_summarise(exc)) from None


def _element_adapter(model: type[BaseModel]) -> TypeAdapter[list[Any]]:
    """A list adapter for the element type of ``model.messages`` (``tuple[X, ...]``)."""
    adapter = _ELEMENT_ADAPTERS.get(model)
    if adapter is None:
        annotation = model.model_fields["messages"].annotation
        (element, *_) = get_args(annotation)
        adapter = TypeAdapter(list[element])  # type: ignore[valid-type]
        _ELEMENT_ADAPTERS[model] = adapter
    return adapter


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _summarise(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"


def dump_compact(value: Any) -> bytes:
    """Compact UTF-8 JSON, as both AgentAPI and the Coder server write and count it."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


MESSAGES_ADAPTER: TypeAdapter[tuple[Message, ...]] = TypeAdapter(tuple[Message, ...])

_EMPTY_MESSAGES = b'"messages":[]'


def splice_messages(
    shell: bytes, items: Sequence[_T], dump: Callable[[Sequence[_T]], bytes]
) -> bytes:
    """``shell`` (a document serialised with an empty ``messages`` list, its first list) with
    ``items`` serialised into that list ``_BATCH`` at a time: the same bytes one call would
    write, but no single call holds the interpreter lock for long. One call over 100,000
    messages (39 MB) held it 110-300 ms, long enough to keep the stop's watchdog thread from
    running until after the grace period had ended."""
    return b"".join(iter_splice(shell, items, dump))


def iter_splice(
    shell: bytes, items: Sequence[_T], dump: Callable[[Sequence[_T]], bytes]
) -> Iterator[bytes]:
    """``splice_messages`` one piece at a time: a writer that takes them as they come
    holds one batch of the serialised messages, not all of them."""
    at = shell.index(_EMPTY_MESSAGES) + len(_EMPTY_MESSAGES) - 1
    yield shell[:at]
    for i in range(0, len(items), _BATCH):
        if i:
            yield b","
        yield dump(items[i : i + _BATCH])[1:-1]
    yield shell[at:]
