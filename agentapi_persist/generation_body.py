"""A generation's body, written and read back in pieces.

The body is ``Conversation`` as compact JSON (``{"messages":[...],"initial_prompt":...}``).
Both ways go a batch of messages at a time, for two reasons measured on a 50 MB copy:

- time: one C call over 100,000 messages held the interpreter lock for 110-300 ms, long
  enough to keep the stop's watchdog thread from running until the grace period had ended;
- memory: reading the whole file before parsing it held 50 MB of bytes next to the 83 MB of
  messages being built (``restore`` peaked at 166 MB). ``BodyReader`` takes the file as it is
  read and keeps only the bytes of the message being completed.

Reading in pieces relies on the layout ``conversation_body`` writes: messages first, each
object starting ``{"id":``. Splitting at ``},{"id":`` is exact for valid JSON, because a quote
inside a string is always escaped, so that sequence only ever separates two objects of the
array. A body laid out otherwise is parsed whole by the general parser, and a crafted body that
does not parse in pieces is refused, never misread.
"""

from __future__ import annotations

from pydantic import TypeAdapter, ValidationError
from pydantic_core import from_json

from .models import (
    BATCHED_PARSE_BYTES,
    MESSAGES_ADAPTER,
    Conversation,
    Message,
    parse_batched,
    splice_messages,
)

__all__ = ["BodyReader", "conversation_body"]

CONVERSATION_ADAPTER: TypeAdapter[Conversation] = TypeAdapter(Conversation)

_HEAD = b'{"messages":['
_ARRAY_END = b'}],"initial_prompt":'
_NEXT_MESSAGE = b'},{"id":'


def conversation_body(conversation: Conversation) -> bytes:
    """The body of a generation: the same bytes as one ``dump_json`` of the conversation, its
    messages serialised in batches."""
    shell = CONVERSATION_ADAPTER.dump_json(conversation.model_copy(update={"messages": ()}))
    return splice_messages(
        shell, conversation.messages, lambda batch: MESSAGES_ADAPTER.dump_json(tuple(batch))
    )


class BodyReader:
    """Parses a body fed to it in chunks as they are read; ``finish`` returns the conversation.

    Each ``feed`` validates every message completed so far (about a chunk's worth, so no call
    holds the interpreter lock for long) and keeps only the bytes after the last complete one.
    Raises ``ValueError`` naming the first message that does not validate.
    """

    __slots__ = ("_messages", "_ours", "_pending")

    def __init__(self) -> None:
        self._pending = bytearray()
        self._messages: list[Message] = []
        # None until the body's first bytes show whether it is laid out as we write it.
        self._ours: bool | None = None

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        before = len(self._pending)
        self._pending += chunk
        if self._ours is None:
            if len(self._pending) < len(_HEAD):
                return
            self._ours = self._pending.startswith(_HEAD)
            if self._ours:
                del self._pending[: len(_HEAD)]
                before = 0
        if not self._ours:
            return  # held whole for the general parser
        # The bytes kept from the last feed hold no boundary; look only where one can be new.
        cut = self._pending.rfind(_NEXT_MESSAGE, max(0, before - len(_NEXT_MESSAGE)))
        if cut >= 0:
            self._validate(cut + 1)
            del self._pending[: cut + 2]  # the messages and the comma after them

    def finish(self) -> Conversation:
        pending = self._pending
        if self._ours:
            end = pending.find(_ARRAY_END)
            if end >= 0:
                fields = from_json(b"{" + bytes(pending[end + 3 :]), allow_inf_nan=False)
                if not isinstance(fields, dict):
                    raise ValueError("the fields after the messages are not an object")
                self._validate(end + 1)
                pending.clear()
                fields["messages"] = tuple(self._messages)
                return CONVERSATION_ADAPTER.validate_python(fields)
            if self._messages:
                raise ValueError("the list of messages does not end where it should")
            pending[:0] = _HEAD  # no message yet (an empty list): the general parser reads it
        if len(pending) > BATCHED_PARSE_BYTES:
            batched = parse_batched(pending, Conversation)
            if batched is not None:
                return batched
        return CONVERSATION_ADAPTER.validate_json(pending)

    def _validate(self, end: int) -> None:
        """Validate the messages in the first ``end`` bytes of what is pending."""
        with memoryview(self._pending) as view:
            piece = b"".join((b"[", view[:end], b"]"))
        try:
            self._messages.extend(MESSAGES_ADAPTER.validate_json(piece))
        except ValidationError as exc:
            first = exc.errors(include_url=False, include_input=False)[0]
            loc = list(first["loc"])
            if loc and isinstance(loc[0], int):
                loc[0] += len(self._messages)
            where = ".".join(str(part) for part in ["messages", *loc])
            raise ValueError(f"{where}: {first['msg']}") from None
