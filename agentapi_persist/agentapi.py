"""AgentAPIClient: the local AgentAPI's HTTP API (``/status``, ``/messages``, ``/events``).

Everything AgentAPI sends is untrusted: bodies are read through a byte cap, parsed with the
tolerant decoder in ``models`` and checked for the invariants we rely on (message ids equal
their index). Failures become our own errors at this boundary, ``from`` the aiohttp cause:

* the request did not complete (refused, reset, too slow) -> ``AgentAPIError``;
* AgentAPI answered with a non-2xx status -> ``AgentAPIError`` with ``.status`` and the body,
  capped;
* the body is unusable (too big, truncated, not JSON, wrong shape) -> ``AgentAPIBodyError``.

Non-UTF-8 bytes and lone surrogates are *tolerated*: they become U+FFFD, which is what
AgentAPI's own Go decoder does, so one odd byte in a long conversation does not cost the rest.

The request's Host header is the one aiohttp derives from the base URL (``localhost:3284``):
AgentAPI's host check accepts localhost, 127.0.0.1 and [::1], so we never override it.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import re
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import aiohttp
import structlog
from pydantic import BaseModel, ConfigDict

from ._http import client_timeout, read_capped
from ._options import DEFAULT_MAX_BODY_BYTES
from .budget import Budget
from .errors import (
    AgentAPIBodyError,
    AgentAPIError,
    AgentAPIUnreachable,
    BodyTooLarge,
    EventTooLarge,
    cap_text,
)
from .models import (
    AgentAPIStateMessage,
    AgentStatus,
    Message,
    MessagesResponse,
    Role,
    parse_untrusted_json,
    renumber,
    sanitize_text,
)

__all__ = [
    "AgentAPIClient",
    "AgentErrorEvent",
    "AgentEvent",
    "HeldUpdate",
    "MessageUpdate",
    "StatusChange",
]

log = structlog.get_logger(__name__)

#: Bodies larger than this are parsed in a worker thread (a thread hop costs more below it).
_PARSE_IN_LOOP_BYTES = 1 << 20
#: How much of an error body we read to quote it; the message keeps ~256 characters of it.
_ERROR_BODY_BYTES = 4096

_M = TypeVar("_M", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class MessageUpdate:
    """A message was added or changed. On the wire the text is ``message``; here ``content``."""

    id: int
    role: Role
    content: str
    time: str

    def as_message(self) -> Message:
        """The same message in the shape ``/messages`` uses."""
        return Message.model_construct(
            id=self.id, role=self.role, content=self.content, time=self.time
        )


@dataclass(frozen=True, slots=True)
class StatusChange:
    """The agent went ``running`` (the last message keeps changing) or ``stable``."""

    status: Literal["running", "stable"]
    agent_type: str | None
    """``None`` from AgentAPI before 0.10.1, which does not send it."""


@dataclass(frozen=True, slots=True)
class AgentErrorEvent:
    """AgentAPI reported a problem with the agent (``agent_error``)."""

    message: str
    level: str
    time: str


#: A ``message_update`` at least this large is handed on undecoded (``HeldUpdate``).
LAZY_UPDATE_BYTES = 64 * 1024
# AgentAPI writes the id first (coder/agentapi lib/httpapi/events.go, MessageUpdateBody: Id,
# Role, Message, Time, in that order; Go's encoder keeps the struct's order).
_LEADING_ID = re.compile(rb'\{"id":(0|[1-9][0-9]{0,9}),')


@dataclass(frozen=True, slots=True)
class HeldUpdate:
    """A large ``message_update``, not decoded yet: a running agent's last message is sent
    whole on every change, and when a later update of the same message comes before anyone
    needs this one, it is never decoded at all (a 10 MB message costs milliseconds to
    validate, several times a second). ``id`` is read from the data's first bytes;
    ``decode`` checks it against the whole."""

    id: int
    data: bytes = field(repr=False)
    url: str

    def decode(self) -> MessageUpdate:
        """The update, validated as any event is. Raises ``AgentAPIBodyError``."""
        update = _message_update(self.data, self.url)
        if update.id != self.id:
            raise AgentAPIBodyError(
                f"AgentAPI's event stream at {self.url} sent a message_update whose id "
                f"{update.id} is not the {self.id} it starts with",
                url=self.url,
            )
        return update


AgentEvent = MessageUpdate | HeldUpdate | StatusChange | AgentErrorEvent


class _AgentErrorWire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    message: str
    level: str = "error"
    time: str = ""


class _MessageWire(AgentAPIStateMessage):
    """``message_update`` data: ``{id, role, message, time}``, the state file's message shape.
    Unknown fields are dropped, not carried: nothing is rewritten from an event, and a model
    that carries extras must rescan its whole body for NaN (13 ms for every event of a 10 MB
    message, half the sidecar's CPU while such a message grew)."""

    model_config = ConfigDict(frozen=True, extra="ignore")


@dataclass(frozen=True, slots=True)
class _RawEvent:
    """One dispatched server-sent event before its data is interpreted."""

    type: str
    data: bytes
    """As sent: UTF-8, not yet decoded (the JSON parser decodes it)."""
    id: str


class AgentAPIClient:
    """Talks to one AgentAPI over a session the caller owns.

    Every call takes the caller's ``Budget``; ``cap_s`` bounds a single call further. Nothing
    here retries: the caller knows whether there is time for another attempt.
    """

    def __init__(
        self,
        base_url: str,
        *,
        session: aiohttp.ClientSession,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_event_bytes: int | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._session = session
        self._max_body_bytes = max_body_bytes
        # One cap for both by default: an event carries one message of what GET /messages
        # carries whole, so a message /messages can deliver must fit in an event too (a
        # smaller event cap made the sidecar reconnect for ever on a 70 MB message).
        self._max_event_bytes = max_event_bytes or max_body_bytes

    def __repr__(self) -> str:
        return f"AgentAPIClient({self.base_url!r})"

    async def status(self, *, budget: Budget, cap_s: float | None = None) -> AgentStatus:
        """``GET /status``: whether the agent is working (``running``) or idle (``stable``)."""
        return await self._get("/status", AgentStatus, budget=budget, cap_s=cap_s)

    async def messages(self, *, budget: Budget, cap_s: float | None = None) -> tuple[Message, ...]:
        """``GET /messages``: the whole conversation, renumbered ``0..n-1`` (see
        ``messages_with_ids``)."""
        messages, _ids = await self.messages_with_ids(budget=budget, cap_s=cap_s)
        return messages

    async def messages_with_ids(
        self, *, budget: Budget, cap_s: float | None = None
    ) -> tuple[tuple[Message, ...], tuple[int, ...]]:
        """``GET /messages`` renumbered ``0..n-1``, and AgentAPI's own ids.

        Ids must increase. In PTY mode they are ``0..n-1``; in ACP mode a failed prompt makes
        them skip (coder/agentapi x/acpio/acp_conversation.go), and the order is still the
        conversation's. A repeat or a reorder is refused: no order can be trusted then.
        """
        url = self.base_url + "/messages"
        response = await self._get("/messages", MessagesResponse, budget=budget, cap_s=cap_s)
        ids = tuple(m.id for m in response.messages)
        if any(later <= earlier for earlier, later in itertools.pairwise(ids)):
            raise AgentAPIBodyError(
                f"AgentAPI at {url} sent message ids that do not increase ({_show_ids(ids)})",
                url=url,
                status=200,
            )
        if ids and ids[-1] == len(ids) - 1:
            return response.messages, ids
        return tuple(renumber(response.messages)), ids

    async def _get(self, path: str, model: type[_M], *, budget: Budget, cap_s: float | None) -> _M:
        url = self.base_url + path
        seconds = budget.slice(cap_s)
        if seconds <= 0:
            raise AgentAPIError(f"no time left in the budget to ask AgentAPI at {url}", url=url)
        timeout = client_timeout(budget, cap_s)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with self._session.get(url, timeout=timeout) as response:
                if not 200 <= response.status < 300:
                    raise await _status_error(response, url)
                body = await read_capped(response, self._max_body_bytes)
        except BodyTooLarge as exc:
            raise AgentAPIBodyError(
                f"AgentAPI at {url} sent too much: {exc}", url=url, status=exc.status
            ) from exc
        except aiohttp.ClientPayloadError as exc:
            raise AgentAPIBodyError(
                f"AgentAPI at {url} cut its answer short (truncated body): {exc}", url=url
            ) from exc
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _transport_error(exc, url, seconds) from exc
        try:
            if len(body) > _PARSE_IN_LOOP_BYTES:
                # Seconds of CPU for a big conversation: off the loop, in batches, within
                # what is left of this request's slice (CPU is bounded like the network).
                left = max(seconds - (loop.time() - started), 0.0)
                parsed = await asyncio.to_thread(
                    parse_untrusted_json, body, model, deadline=time.monotonic() + left
                )
            else:
                parsed = parse_untrusted_json(body, model)
        except TimeoutError as exc:
            raise AgentAPIError(
                f"AgentAPI at {url} answered {len(body)} bytes, but reading them did not fit "
                f"in the {_fmt_s(seconds)} s slice: {exc}",
                url=url,
            ) from None
        except ValueError as exc:
            raise AgentAPIBodyError(
                f"AgentAPI at {url} sent an unusable body ({len(body)} bytes): {exc}",
                url=url,
                status=200,
            ) from exc
        log.debug(
            "agentapi.fetched",
            path=path,
            bytes=len(body),
            ms=round((loop.time() - started) * 1000),
        )
        return parsed

    async def events(
        self, *, connect_timeout_s: float = 5.0, idle_timeout_s: float | None = None
    ) -> AsyncGenerator[AgentEvent, None]:
        """Follow ``GET /events``: a replay of every message, one status, then deltas.

        ``connect_timeout_s`` bounds connecting and receiving the response headers;
        ``idle_timeout_s`` (``None``: wait forever) bounds the silence between two reads.
        The stream itself has no total timeout: it is meant to be followed for hours.

        The iterator ends when AgentAPI ends the stream (restart, or it dropped us for
        falling 1024 events behind): the caller reconnects and the replay resyncs it.
        Raises ``AgentAPIError`` when the stream breaks or stays silent too long, and
        ``AgentAPIBodyError`` for an event whose data is not what AgentAPI sends (also a
        reason to resync). Close it with ``contextlib.aclosing`` when stopping early.
        """
        url = self.base_url + "/events"
        timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=connect_timeout_s, sock_read=idle_timeout_s
        )
        try:
            async with asyncio.timeout(connect_timeout_s):
                response = await self._session.get(
                    url, headers={"Accept": "text/event-stream"}, timeout=timeout
                )
        except TimeoutError as exc:
            raise AgentAPIError(
                f"AgentAPI at {url} did not start its event stream within "
                f"{_fmt_s(connect_timeout_s)} s",
                url=url,
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise _transport_error(exc, url, connect_timeout_s) from exc
        try:
            if response.status != 200:
                raise await _status_error(response, url, read_timeout_s=connect_timeout_s)
            if response.content_type != "text/event-stream":
                raise AgentAPIBodyError(
                    f"AgentAPI at {url} answered {response.content_type!r}, "
                    "not an event stream (text/event-stream)",
                    url=url,
                    status=response.status,
                )
            decoder = _SSEDecoder(max_event_bytes=self._max_event_bytes, url=url)
            log.debug("agentapi.events_connected", url=url)
            while True:
                chunk = await _read_stream_chunk(response, url, idle_timeout_s)
                if not chunk:
                    break
                for raw in decoder.feed(chunk):
                    event = _interpret(raw, url)
                    if event is not None:
                        yield event
            log.debug("agentapi.events_ended", url=url, partial_event=decoder.pending)
        finally:
            response.close()


async def _read_stream_chunk(
    response: aiohttp.ClientResponse, url: str, idle_timeout_s: float | None
) -> bytes:
    """Next bytes of the stream, ``b""`` at its clean end; errors mapped to ours."""
    try:
        return await response.content.readany()
    except TimeoutError as exc:
        waited = "" if idle_timeout_s is None else f" for {_fmt_s(idle_timeout_s)} s"
        raise AgentAPIError(
            f"AgentAPI's event stream at {url} went silent{waited}", url=url
        ) from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise AgentAPIError(f"AgentAPI's event stream at {url} broke off: {exc}", url=url) from exc


def _show_ids(ids: tuple[int, ...]) -> str:
    """The first place where the ids go wrong, briefly."""
    for index, (earlier, later) in enumerate(itertools.pairwise(ids)):
        if later <= earlier:
            return f"id {later} after id {earlier} at position {index + 1}"
    return "in order"


def _event_data(event_type: str, data: bytes, model: type[_M], url: str) -> _M:
    """An event's data as ``model``; ``AgentAPIBodyError`` naming the event when it is not."""
    try:
        return parse_untrusted_json(data, model)
    except ValueError as exc:
        raise AgentAPIBodyError(
            f"AgentAPI's event stream at {url} sent a bad {event_type!r} event "
            f"({len(data)} bytes): {exc}",
            url=url,
        ) from exc


def _message_update(data: bytes, url: str) -> MessageUpdate:
    wire = _event_data("message_update", data, _MessageWire, url)
    return MessageUpdate(id=wire.id, role=wire.role, content=wire.message, time=wire.time)


def _interpret(raw: _RawEvent, url: str) -> AgentEvent | None:
    """Turn one SSE event into a typed event; ``None`` for types we do not follow. A large
    ``message_update`` whose id can be read cheaply comes as a ``HeldUpdate``."""
    if raw.type == "message_update":
        if len(raw.data) >= LAZY_UPDATE_BYTES and (lead := _LEADING_ID.match(raw.data)):
            return HeldUpdate(id=int(lead[1]), data=raw.data, url=url)
        return _message_update(raw.data, url)
    if raw.type == "status_change":
        status = _event_data(raw.type, raw.data, AgentStatus, url)
        return StatusChange(status=status.status, agent_type=status.agent_type)
    if raw.type == "agent_error":
        error = _event_data(raw.type, raw.data, _AgentErrorWire, url)
        return AgentErrorEvent(
            message=sanitize_text(error.message),
            level=sanitize_text(error.level),
            time=sanitize_text(error.time),
        )
    log.debug("agentapi.event_skipped", event_type=cap_text(raw.type, 64), bytes=len(raw.data))
    return None


def _next_line_end(buffer: bytearray, pos: int) -> tuple[int, int] | None:
    """Where the next line ending (CRLF, CR or LF) at or after ``pos`` starts and ends.

    Two ``find`` calls (memchr) rather than a regular expression: a 1 MB event (a long agent
    message, sent whole on every change) cost 13 ms to scan with ``\r\n|\r|\n`` and a
    fraction of a millisecond this way. The CR search stops at the next LF, so every byte is
    looked at about once however many lines a chunk holds."""
    lf = buffer.find(b"\n", pos)
    cr = buffer.find(b"\r", pos, lf if lf >= 0 else len(buffer))
    if cr >= 0:
        return cr, cr + 2 if cr + 1 == lf else cr + 1
    if lf >= 0:
        return lf, lf + 1
    return None


_BOM = b"\xef\xbb\xbf"


class _SSEDecoder:
    """Incremental server-sent events parser (WHATWG HTML "event stream interpretation").

    Lines end in CRLF, LF or CR (a CR at a chunk boundary may be followed by the LF in the
    next chunk). ``event:`` sets the type, ``data:`` lines are joined with ``\\n``, ``id:``
    is kept, lines starting with ``:`` are comments, a blank line dispatches. An event whose
    buffered size passes ``max_event_bytes`` raises instead of growing without bound. Pure:
    no I/O, so it can be fed any split of the stream.
    """

    def __init__(self, *, max_event_bytes: int, url: str = "") -> None:
        self._max = max_event_bytes
        self._url = url
        self._buffer = bytearray()
        self._scan_from = 0
        self._skip_lf = False
        self._first = True
        self._type = ""
        self._data: list[bytes] = []
        self._size = 0
        self._last_id = ""

    @property
    def pending(self) -> bool:
        """True when a partial event (or line) is buffered; it is dropped at stream end."""
        return bool(self._buffer) or bool(self._data) or bool(self._type)

    def feed(self, chunk: bytes) -> list[_RawEvent]:
        """Consume ``chunk`` and return the events it completed, in order."""
        if not chunk:
            return []  # nothing to see; above all, a CR's pending LF may still come next
        if self._skip_lf and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._skip_lf = False
        buffer = self._buffer
        buffer += chunk
        if self._first:
            if len(buffer) < len(_BOM) and _BOM.startswith(buffer):
                return []  # might still be the start of a byte-order mark
            self._first = False
            if buffer.startswith(_BOM):
                del buffer[: len(_BOM)]
        events: list[_RawEvent] = []
        start = 0
        while True:
            found = _next_line_end(buffer, max(start, self._scan_from))
            if found is None:
                break
            line_end, after = found
            if after == line_end + 1 == len(buffer) and buffer[line_end] == 0x0D:
                self._skip_lf = True  # the LF of a CRLF may arrive in the next chunk
            event = self._line(buffer, start, line_end)
            start = after
            self._scan_from = start
            if event is not None:
                events.append(event)
        del buffer[:start]
        self._scan_from = len(buffer)
        if self._size + len(buffer) > self._max:
            raise EventTooLarge(
                f"AgentAPI's event stream at {self._url} sent an event over the "
                f"{self._max}-byte cap (--max-body-bytes)",
                url=self._url or None,
            )
        return events

    def _line(self, buffer: bytearray, start: int, end: int) -> _RawEvent | None:
        """Take the line ``buffer[start:end]``. A data line's value is copied out once,
        as bytes: the JSON parser reads UTF-8 itself (and replaces what is invalid, as the
        decoding the spec asks for would), so a 10 MB message is not decoded, copied and
        encoded again on its way (that was most of the sidecar's CPU for a long message)."""
        if start == end:
            return self._dispatch()
        if buffer[start] == 0x3A:  # ":" starts a comment
            return None
        colon = buffer.find(b":", start, end)
        name_end = end if colon < 0 else colon
        value_at = end if colon < 0 else colon + 1
        if value_at < end and buffer[value_at] == 0x20:
            value_at += 1
        field = bytes(buffer[start:name_end])
        if field == b"data":
            with memoryview(buffer) as view:
                self._data.append(bytes(view[value_at:end]))
            self._size += end - start + 1
            if self._size > self._max:
                raise EventTooLarge(
                    f"AgentAPI's event stream at {self._url} sent an event over the "
                    f"{self._max}-byte cap (--max-body-bytes)",
                    url=self._url or None,
                )
        elif field == b"event":
            self._type = buffer[value_at:end].decode("utf-8", errors="replace")
        elif field == b"id" and buffer.find(b"\0", value_at, end) < 0:
            self._last_id = buffer[value_at:end].decode("utf-8", errors="replace")
        # "retry" and unknown fields are ignored, as the spec says.
        return None

    def _dispatch(self) -> _RawEvent | None:
        event_type, data = self._type or "message", self._data
        self._type, self._data, self._size = "", [], 0
        if not data:
            return None
        return _RawEvent(type=event_type, data=b"\n".join(data), id=self._last_id)


async def _status_error(
    response: aiohttp.ClientResponse, url: str, *, read_timeout_s: float | None = None
) -> AgentAPIError:
    """An error for a non-2xx answer, quoting (a capped part of) its body."""
    try:
        async with asyncio.timeout(read_timeout_s):
            head = await response.content.read(_ERROR_BODY_BYTES)
    except (aiohttp.ClientError, TimeoutError, OSError):
        head = b""
    text = cap_text(head.decode("utf-8", errors="replace").strip())
    reason = f" {response.reason}" if response.reason else ""
    quoted = f": {text}" if text else ""
    return AgentAPIError(
        f"AgentAPI at {url} answered {response.status}{reason}{quoted}",
        url=url,
        status=response.status,
    )


def _transport_error(exc: BaseException, url: str, seconds: float) -> AgentAPIError:
    """Say in words which way the request failed: refused, reset, or too slow."""
    if isinstance(exc, TimeoutError):
        what = f"did not answer within {_fmt_s(seconds)} s"
    elif isinstance(exc, aiohttp.ClientConnectorError) and (
        exc.os_error.errno in (errno.ECONNREFUSED, errno.EADDRNOTAVAIL)
        or "refused" in str(exc.os_error).lower()
    ):
        return AgentAPIUnreachable(
            f"AgentAPI at {url} refused the connection (is it running?)", url=url
        )
    elif isinstance(exc, aiohttp.ClientConnectorError):
        what = f"could not be reached: {exc.os_error.strerror or exc}"
    elif isinstance(exc, aiohttp.ServerDisconnectedError):
        what = "closed the connection without answering"
    elif isinstance(exc, ConnectionResetError) or getattr(exc, "errno", None) == errno.ECONNRESET:
        what = "reset the connection"
    else:
        what = f"failed: {type(exc).__name__}: {cap_text(str(exc), 160)}"
    return AgentAPIError(f"AgentAPI at {url} {what}", url=url)


def _fmt_s(seconds: float) -> str:
    """``0.8``, ``0.05``, ``10``: seconds as a person writes them."""
    return f"{seconds:.2f}".rstrip("0").rstrip(".") or "0"
