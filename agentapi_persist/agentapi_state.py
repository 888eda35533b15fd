"""AgentAPI's own state file (version 1): read it strictly, write it exactly as AgentAPI reads it.

The file is ``{"version":1,"messages":[{"id","message","role","time"}],"initial_prompt":str,
"initial_prompt_sent":bool}``: compact JSON and a trailing newline. AgentAPI starts *empty* when
its file fails to load and later overwrites it, so ``restore`` must know precisely whether a file
is good; each failure names the file and says what is wrong and where.

Decoding is as tolerant as AgentAPI's own Go decoder and no more: invalid UTF-8 inside a string
and lone surrogate escapes (``"\\ud800"``) become U+FFFD, exactly what AgentAPI itself would load,
so those files are *good* files and are not reported. Everything Go would reject is refused.

``initial_prompt_sent`` is the field that matters most: losing it makes AgentAPI re-run the
initial prompt (money, and possibly overwritten work). The renderer writes what the caller
decided; it never guesses.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, overload

from pydantic_core import PydanticSerializationError, to_json

from ._fsutil import read_capped_file, write_atomic
from .errors import StateFileCorrupt, StateFileVersionError
from .models import (
    AgentAPIState,
    Conversation,
    Message,
    dump_compact,
    iter_splice,
    parse_untrusted_json,
)

__all__ = [
    "GO_PROMPT_WHITESPACE",
    "STATE_VERSION",
    "agentapi_state_pieces",
    "conversation_from_state",
    "read_agentapi_state",
    "render_agentapi_state",
    "trim_prompt",
    "write_agentapi_state",
]

STATE_VERSION = 1
_KNOWN_KEYS = frozenset({"version", "messages", "initial_prompt", "initial_prompt_sent"})
_MISSING = object()
#: What AgentAPI strips from the initial prompt before saving and comparing it
#: (coder/agentapi lib/msgfmt/msgfmt.go ``WhiteSpaceChars``, applied by lib/httpapi/claude.go
#: ``FormatMessage``; a prompt with surrounding newlines is saved without them).
GO_PROMPT_WHITESPACE = " \t\n\r\f\v"


def trim_prompt(prompt: str) -> str:
    """The initial prompt as AgentAPI saves and compares it."""
    return prompt.strip(GO_PROMPT_WHITESPACE)


def _declared_version(data: bytes) -> object:
    """The top-level ``version`` if the file is JSON enough to say, else ``_MISSING``."""
    try:
        document = json.loads(data.decode("utf-8", errors="replace"))
    except (ValueError, RecursionError):
        return _MISSING
    if isinstance(document, dict):
        return document.get("version", _MISSING)
    return _MISSING


def read_agentapi_state(path: Path, *, max_bytes: int) -> AgentAPIState:
    """Read and validate AgentAPI's state file.

    Raises ``FileNotFoundError`` if it is missing; ``StateFileError`` if it is too big, a
    symlink, or unreadable; ``StateFileVersionError`` for a ``version`` other than 1;
    ``StateFileCorrupt`` for an empty, truncated, non-JSON or wrongly shaped file, or message ids
    that are not exactly 0..n-1 (AgentAPI would give a new message a colliding id).
    """
    data = read_capped_file(path, max_bytes)
    if not data.strip():
        raise StateFileCorrupt(
            f"AgentAPI state file {path} is empty ({len(data)} bytes)", path=str(path)
        )
    try:
        return parse_untrusted_json(data, AgentAPIState)
    except ValueError as exc:
        version = _declared_version(data)
        if version is not _MISSING and not (type(version) is int and version == STATE_VERSION):
            raise StateFileVersionError(
                f"AgentAPI state file {path} declares version {repr(version)[:40]}; this "
                f"release reads version {STATE_VERSION} only",
                path=str(path),
            ) from None
        hint = ""
        if not data.rstrip().endswith(b"}"):
            hint = f"; the file ({len(data)} bytes) ends mid-document, as a cut-short write would"
        raise StateFileCorrupt(
            f"AgentAPI state file {path} is corrupt: {exc}{hint}", path=str(path)
        ) from None


def render_agentapi_state(
    conversation: Conversation, *, extra: AgentAPIState | None = None
) -> bytes:
    """The file's bytes: compact JSON in AgentAPI's key order plus a trailing newline.

    Ids are rewritten as the positions 0..n-1 (what AgentAPI requires), times are copied
    verbatim (up to 9 fractional digits), and an unknown prompt becomes ``""``/``false``: the
    caller decides the prompt fields before calling. Unknown top-level fields of ``extra`` (a
    newer AgentAPI's additions) are carried after the known ones.
    """
    return b"".join(agentapi_state_pieces(conversation, extra))


class _Rendered(Sequence[dict[str, Any]]):
    """The file's message objects, built a batch at a time as the serialiser asks for them
    (a whole list of dicts for 50,000 messages held tens of megabytes at once)."""

    def __init__(self, messages: Sequence[Message]) -> None:
        self._messages = messages

    def __len__(self) -> int:
        return len(self._messages)

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[dict[str, Any]]: ...
    def __getitem__(self, index: int | slice) -> dict[str, Any] | Sequence[dict[str, Any]]:
        if isinstance(index, slice):
            start, stop, _ = index.indices(len(self._messages))
            return [self._one(i) for i in range(start, stop)]
        return self._one(index)

    def _one(self, index: int) -> dict[str, Any]:
        m = self._messages[index]
        return {"id": index, "message": m.content, "role": m.role, "time": m.time}


def agentapi_state_pieces(
    conversation: Conversation, extra: AgentAPIState | None = None
) -> Iterator[bytes]:
    """The file's bytes piece by piece, trailing newline included: the document around the
    messages is serialised now (where the only encoding error can arise), the messages a
    batch at a time as the writer takes them (``iter_splice``)."""
    messages = _Rendered(conversation.messages)
    document: dict[str, Any] = {
        "version": STATE_VERSION,
        "messages": [],
        "initial_prompt": conversation.initial_prompt or "",
        "initial_prompt_sent": bool(conversation.initial_prompt_sent),
    }
    if extra is not None and extra.model_extra:
        for key, value in extra.model_extra.items():
            if key not in _KNOWN_KEYS:
                document[key] = value
    dump: Callable[[Any], bytes]
    try:
        if len(document) == len(_KNOWN_KEYS):
            # Only strings, ints and bools: pydantic-core's serializer writes the same bytes
            # as ``dump_compact`` three times as fast (50 MB: 180 ms instead of 530 ms), and
            # ``restore`` at boot waits for it. Carried-over extras may hold floats, which
            # it formats differently (1e-07 vs 1e-7), so those keep the standard library.
            shell, dump = to_json(document), to_json
        else:
            shell, dump = dump_compact(document), dump_compact
    except (UnicodeEncodeError, PydanticSerializationError):
        # Only a carried-over extra can hold a lone surrogate (our own text is sanitised);
        # ASCII escapes keep the file valid JSON, and Go reads them as U+FFFD.
        document["messages"] = list(messages)
        return iter((json.dumps(document, separators=(",", ":")).encode("ascii"), b"\n"))
    return itertools.chain(iter_splice(shell, messages, dump), (b"\n",))


def write_agentapi_state(
    path: Path, conversation: Conversation, *, extra: AgentAPIState | None = None
) -> int:
    """Atomically replace AgentAPI's state file (0600) and return the bytes written.

    Only for when AgentAPI is not running: it owns the file while it runs.
    """
    written = 0

    def counted() -> Iterator[bytes]:
        nonlocal written
        for piece in agentapi_state_pieces(conversation, extra):
            written += len(piece)
            yield piece

    # Piece by piece: a 50 MB body is never joined, nor held whole as bytes.
    write_atomic(path, counted())
    return written


def conversation_from_state(state: AgentAPIState) -> Conversation:
    """Our conversation from AgentAPI's file; the prompt fields are marked as coming from it."""
    return Conversation.model_construct(
        messages=state.conversation_messages(),
        initial_prompt=state.initial_prompt,
        initial_prompt_sent=state.initial_prompt_sent,
        prompt_origin="agentapi_state",
    )
