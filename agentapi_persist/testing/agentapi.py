"""FakeAgentAPI: a real HTTP server on 127.0.0.1 that behaves like AgentAPI 0.12.x.

It follows the contract in the SPEC (section 3, "AgentAPI"): ``GET /status``,
``GET /messages``, ``GET /events`` (server-sent events: a replay of every message as
``message_update``, one ``status_change``, then deltas; a subscriber 1024 events behind is
dropped), ``POST /message``, and the Host-header check. In-process use::

    async with FakeAgentAPI(messages=[("user", "hi"), ("agent", "hello")]) as agent:
        agent.add_message("user", "more")      # every live /events subscriber sees it
        agent.behaviour.delay_s = 2.0          # fault knobs apply to the next request
        ...

The same fake as an ``agentapi`` program (a real process with a pid file, a state file and
real signals) is ``agentapi_persist.testing.agentapi_program``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Literal

from aiohttp import web

from ..models import Message, Role, sanitize_text
from .server import LoopbackServer

__all__ = [
    "DEFAULT_VERSION",
    "SUBSCRIBER_BUFFER",
    "AgentAPIBehaviour",
    "FakeAgentAPI",
    "RecordedRequest",
    "rfc3339_nano",
]

Status = Literal["running", "stable"]

DEFAULT_VERSION = "0.12.1"
#: AgentAPI closes a subscriber's channel once this many events are waiting in it.
SUBSCRIBER_BUFFER = 1024
_ALLOWED_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_VERSION = re.compile(r"v?(\d+)\.(\d+)\.(\d+)")
# Go's encoding/json escapes these inside strings; we write the state file the same way.
_GO_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_GO_ESCAPE = re.compile("[<>&\u2028\u2029]")


def rfc3339_nano(ns: int | None = None) -> str:
    """A UTC time the way AgentAPI writes it: ``2025-01-02T03:04:05.123456789Z``."""
    ns = time.time_ns() if ns is None else ns
    seconds, fraction = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{fraction:09d}Z"


def _version_tuple(version: str) -> tuple[int, int, int]:
    match = _VERSION.match(version.strip())
    if match is None:
        return (0, 0, 0)
    return (int(match[1]), int(match[2]), int(match[3]))


@dataclass(slots=True)
class AgentAPIBehaviour:
    """Fault knobs; change them at any time, the next request sees the new values.

    ``delay_s``, ``hang``, ``reset`` and ``error_status`` apply to ``/status``,
    ``/messages`` and the start of ``/events``; the body knobs apply to ``/messages`` only.
    To stall a live event stream, set ``FakeAgentAPI.stall_events``.
    """

    delay_s: float = 0.0
    """Pause before answering."""
    status_delays: list[float] = field(default_factory=list)
    """Pauses before the next ``/status`` answers, one per request, in order: AgentAPI busy,
    or its client held up, for one answer."""
    messages_delay_s: float = 0.0
    """Pause before answering ``/messages`` only (a big conversation being read)."""
    hang: bool = False
    """Never answer; the request ends when the client goes away or the server stops."""
    reset: bool = False
    """Abort the connection with a TCP reset instead of answering."""
    error_status: int | None = None
    """Answer this status with ``error_body`` instead of the real answer."""
    error_body: str = "internal error"
    truncate: bool = False
    """Declare a Content-Length larger than the body, send half of it, then close."""
    messages_body: bytes | None = None
    """Send exactly these bytes as the ``/messages`` body (bad UTF-8, deep nesting, ...)."""
    stream_body_bytes: int | None = None
    """Send a ``/messages`` body this big, generated as it goes (for size-cap tests)."""
    stream_declares_length: bool = True
    """With ``stream_body_bytes``: declare the Content-Length (else send it chunked)."""
    bytes_streamed: int = 0
    """How much of ``stream_body_bytes`` went out before the client stopped reading."""


@dataclass(slots=True, eq=False)
class _Subscriber:
    queue: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as received."""

    method: str
    path: str
    host: str


class FakeAgentAPI(LoopbackServer):
    """AgentAPI's HTTP API over an in-memory conversation, driven by the test."""

    def __init__(
        self,
        *,
        messages: Iterable[Message | tuple[Role, str]] = (),
        status: Status = "stable",
        version: str = DEFAULT_VERSION,
        agent_type: str = "claude",
        initial_prompt: str = "",
        initial_prompt_sent: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(host=host, port=port)
        self.version = version
        self.agent_type = agent_type
        self.initial_prompt = initial_prompt
        self.initial_prompt_sent = initial_prompt_sent
        self.behaviour = AgentAPIBehaviour()
        self.requests: list[RecordedRequest] = []
        self.revision = 0
        """Bumped by every change to the conversation; a save records the one it wrote."""
        self._saved_revision = 0
        self._status: Status = status
        self._messages: list[Message] = []
        self._subscribers: set[_Subscriber] = set()
        self._errors: list[bytes] = []
        self._unstalled = asyncio.Event()
        self._unstalled.set()
        self._closing = asyncio.Event()
        for item in messages:
            if isinstance(item, Message):
                self._append(item.role, item.content, item.time)
            else:
                self._append(item[0], item[1], rfc3339_nano())

    # -- what a test reads ------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port it listens on (chosen by the kernel unless given)."""
        return int(self.url.rsplit(":", 1)[1])

    @property
    def messages(self) -> tuple[Message, ...]:
        """The conversation as ``/messages`` reports it."""
        return tuple(self._messages)

    @property
    def status(self) -> Status:
        """``running`` or ``stable``."""
        return self._status

    @property
    def subscribers(self) -> int:
        """Live ``/events`` subscriptions."""
        return len(self._subscribers)

    @property
    def stall_events(self) -> bool:
        """True: event streams send nothing (events queue up, as for a slow reader)."""
        return not self._unstalled.is_set()

    @stall_events.setter
    def stall_events(self, value: bool) -> None:
        if value:
            self._unstalled.clear()
        else:
            self._unstalled.set()

    # -- driving the conversation -------------------------------------------------------

    def add_message(self, role: Role, content: str) -> Message:
        """Append a message (id = its index) and tell every subscriber."""
        message = self._append(role, content, rfc3339_nano())
        self._publish(_message_event(message))
        return message

    def update_last(self, content: str) -> Message:
        """Change the last message's text, as a running agent does while it types."""
        if not self._messages:
            raise ValueError("there is no message to update")
        message = self._messages[-1].model_copy(update={"content": sanitize_text(content)})
        self._messages[-1] = message
        self.revision += 1
        self._publish(_message_event(message))
        return message

    def become_ready(self, state_file: Path | None, started_with: str) -> None:
        """What AgentAPI does once its agent shows an input box: load the state file over the
        start-up screen (telling subscribers what changed, and an ``agent_error`` if the load
        failed), then apply the initial-prompt rule (coder/agentapi
        lib/screentracker/pty_conversation.go, the snapshot loop)."""
        if state_file is not None and state_file.exists():
            problem = self.load_state(state_file)
            if problem is not None:
                self.emit_agent_error(f"Failed to restore previous session: {problem}")
            else:
                for message in self._messages:
                    self._publish(_message_event(message))
        _apply_initial_prompt(self, started_with)
        self.set_status("stable")  # ready: AgentAPI reports stable from now on when idle

    def set_status(self, status: Status) -> None:
        """Switch between ``running`` and ``stable``; subscribers hear of real changes only."""
        if status == self._status:
            return
        self._status = status
        self._publish(self._status_event())

    def emit_agent_error(self, message: str, *, level: str = "error") -> None:
        """Send an ``agent_error`` event to every subscriber, and keep it (the newest 100) for
        the replay every new subscriber gets after the ``status_change``, as AgentAPI does
        (coder/agentapi lib/httpapi/events.go, ``maxStoredErrors``)."""
        payload = {"message": message, "level": level, "time": rfc3339_nano()}
        event = _sse("agent_error", payload)
        self._errors = [*self._errors, event][-100:]
        self._publish(event)

    def inject_raw(self, data: bytes) -> None:
        """Send these exact bytes to every subscriber (malformed events, odd line endings)."""
        self._publish(data)

    def drop_subscribers(self) -> None:
        """End every event stream cleanly, as AgentAPI does to a subscriber it drops."""
        for subscriber in list(self._subscribers):
            self._drop(subscriber)

    # -- AgentAPI's state file ------------------------------------------------------------

    def state_document(self) -> dict[str, Any]:
        """The v1 state file's content for the current conversation."""
        return {
            "version": 1,
            "messages": [
                {"id": m.id, "message": m.content, "role": m.role, "time": m.time}
                for m in self._messages
            ],
            "initial_prompt": self.initial_prompt,
            "initial_prompt_sent": self.initial_prompt_sent,
        }

    def save_state(self, path: Path, *, force: bool = False) -> bool:
        """Write the state file like AgentAPI: compact JSON plus a newline, to the fixed name
        ``<path>.tmp``, fsync, rename, no directory fsync. Skipped (``False``) when nothing
        changed since the last save or load, unless ``force``."""
        if not force and self.revision == self._saved_revision:
            return False
        text = json.dumps(self.state_document(), ensure_ascii=False, separators=(",", ":"))
        data = (_GO_ESCAPE.sub(lambda m: _GO_ESCAPES[m.group()], text) + "\n").encode()
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self._saved_revision = self.revision
        return True

    def load_state(self, path: Path) -> str | None:
        """Replace the conversation with the file's; ``None`` on success, else why it was
        not loaded (AgentAPI then starts empty and later overwrites the file)."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            return f"cannot read {path}: {exc.strerror}"
        try:
            state = _decode_state_like_go(data)
        except ValueError as exc:
            return f"{path} is not a valid state file: {exc}"
        self._messages = [
            Message.model_construct(
                id=m["id"], role=m["role"], content=m["message"], time=m["time"]
            )
            for m in state["messages"]
        ]
        self.initial_prompt = state["initial_prompt"]
        self.initial_prompt_sent = state["initial_prompt_sent"]
        self.revision += 1
        self._saved_revision = self.revision
        return None

    # -- lifecycle ----------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        self._closing.clear()

        @web.middleware
        async def host_check(
            request: web.Request,
            handler: Any,
        ) -> web.StreamResponse:
            host = request.headers.get("Host", "")
            self.requests.append(RecordedRequest(request.method, request.path, host))
            if _hostname(host) not in _ALLOWED_HOSTS:
                return web.Response(
                    status=400,
                    text="Invalid host header. Allowed hosts: localhost, 127.0.0.1, [::1]\n",
                )
            response: web.StreamResponse = await handler(request)
            return response

        app = web.Application(middlewares=[host_check])
        app.router.add_get("/status", self._handle_status)
        app.router.add_get("/messages", self._handle_messages)
        app.router.add_get("/events", self._handle_events)
        app.router.add_post("/message", self._handle_message)
        return app

    async def _before_close(self) -> None:
        """Streams end, hung requests are released."""
        self._closing.set()
        self._unstalled.set()
        self.drop_subscribers()

    # -- handlers ---------------------------------------------------------------------------

    async def _handle_status(self, request: web.Request) -> web.StreamResponse:
        if self.behaviour.status_delays:
            await self._pause(self.behaviour.status_delays.pop(0))
        fault = await self._fault(request)
        if fault is not None:
            return fault
        body: dict[str, Any] = {"$schema": self._schema(request, "StatusResponseBody")}
        body.update(self._status_fields())
        if _version_tuple(self.version) >= (0, 12, 0):
            body["transport"] = "pty"
        return web.json_response(body)

    async def _handle_messages(self, request: web.Request) -> web.StreamResponse:
        await self._pause(self.behaviour.messages_delay_s)
        fault = await self._fault(request)
        if fault is not None:
            return fault
        behaviour = self.behaviour
        if behaviour.stream_body_bytes is not None:
            return await self._stream_body(request, behaviour.stream_body_bytes)
        if behaviour.messages_body is not None:
            body = behaviour.messages_body
        else:
            messages = [
                {"id": m.id, "content": m.content, "role": m.role, "time": m.time}
                for m in self._messages
            ]
            body = json.dumps({"messages": messages}, ensure_ascii=False).encode()
        if behaviour.truncate:
            return await self._truncated(request, body)
        return web.Response(body=body, content_type="application/json")

    async def _handle_events(self, request: web.Request) -> web.StreamResponse:
        fault = await self._fault(request)
        if fault is not None:
            return fault
        # Snapshot and subscribe with no await in between: nothing can fall in the gap.
        replay = b"".join(
            [*map(_message_event, self._messages), self._status_event(), *self._errors]
        )
        subscriber = _Subscriber()
        self._subscribers.add(subscriber)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        try:
            await response.prepare(request)
            await self._unstalled.wait()
            await response.write(replay)
            while True:
                await self._unstalled.wait()
                item = await subscriber.queue.get()
                if item is None:
                    break
                await response.write(item)
        except ConnectionError:
            pass  # the client went away
        finally:
            self._subscribers.discard(subscriber)
        return response

    async def _handle_message(self, request: web.Request) -> web.StreamResponse:
        try:
            payload = await request.json()
        except ValueError:
            return _problem(400, "the body is not JSON")
        if not isinstance(payload, dict):
            return _problem(400, "the body must be an object")
        content, kind = payload.get("content"), payload.get("type")
        if not isinstance(content, str) or kind not in ("user", "raw"):
            return _problem(422, 'expected {"content": str, "type": "user" | "raw"}')
        if kind == "user":
            if self._status != "stable":
                return _problem(400, "the agent is running; wait until it is stable")
            self.add_message("user", content)
            self.set_status("running")
            self.add_message("agent", f"echo: {content}")
            self.set_status("stable")
        return web.json_response({"ok": True})

    # -- internals ------------------------------------------------------------------------

    def _append(self, role: Role, content: str, at: str) -> Message:
        message = Message(id=len(self._messages), role=role, content=content, time=at)
        self._messages.append(message)
        self.revision += 1
        return message

    def _status_fields(self) -> dict[str, Any]:
        """``status``, and ``agent_type`` from 0.10.1 on (the real v0.10.0 sends none)."""
        fields: dict[str, Any] = {"status": self._status}
        if _version_tuple(self.version) >= (0, 10, 1):
            fields["agent_type"] = self.agent_type
        return fields

    @staticmethod
    def _schema(request: web.Request, name: str) -> str:
        """The ``$schema`` field every real body carries (huma's schema link)."""
        return f"http://{request.host}/schemas/{name}.json"

    def _status_event(self) -> bytes:
        return _sse("status_change", self._status_fields())

    def _publish(self, data: bytes) -> None:
        for subscriber in list(self._subscribers):
            if subscriber.queue.qsize() >= SUBSCRIBER_BUFFER:
                self._drop(subscriber)  # like AgentAPI: a full channel is closed
            else:
                subscriber.queue.put_nowait(data)

    def _drop(self, subscriber: _Subscriber) -> None:
        self._subscribers.discard(subscriber)
        subscriber.queue.put_nowait(None)  # what was queued is still delivered, then the end

    async def _fault(self, request: web.Request) -> web.StreamResponse | None:
        behaviour = self.behaviour
        if behaviour.reset:
            _reset(request)
            return web.Response(status=500, text="reset")  # never reaches the client
        if behaviour.hang:
            await self._closing.wait()
            return web.Response(status=503, text="shutting down")
        await self._pause(behaviour.delay_s)
        if behaviour.error_status is not None:
            return web.Response(status=behaviour.error_status, text=behaviour.error_body)
        return None

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds``, or less if the server is stopping."""
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), seconds)

    async def _truncated(self, request: web.Request, body: bytes) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(body) + max(len(body), 16)
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            await response.write(body[: len(body) // 2])
        if request.transport is not None:
            request.transport.close()
        return response

    async def _stream_body(self, request: web.Request, size: int) -> web.StreamResponse:
        behaviour = self.behaviour
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        if behaviour.stream_declares_length:
            response.content_length = size
        await response.prepare(request)
        head, tail, filler = b'{"messages":[', b"]}", b" " * 65536
        behaviour.bytes_streamed = 0
        try:
            await response.write(head)
            sent = len(head)
            while sent < size - len(tail):
                piece = filler[: min(len(filler), size - len(tail) - sent)]
                await response.write(piece)
                sent += len(piece)
                behaviour.bytes_streamed = sent
            await response.write(tail)
            behaviour.bytes_streamed = sent + len(tail)
        except ConnectionError:
            if request.transport is not None:
                request.transport.close()
        return response


def _sse(event_type: str, payload: Mapping[str, Any]) -> bytes:
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event_type}\ndata: {data}\n\n".encode()


def _message_event(message: Message) -> bytes:
    payload = {
        "id": message.id,
        "role": message.role,
        "message": message.content,
        "time": message.time,
    }
    return _sse("message_update", payload)


def _problem(status: int, detail: str) -> web.Response:
    """An RFC 9457 problem body, as AgentAPI's API framework answers errors."""
    body = {"title": HTTPStatus(status).phrase, "status": status, "detail": detail}
    return web.json_response(body, status=status, content_type="application/problem+json")


def _reset(request: web.Request) -> None:
    """Close with RST (linger 0) so the client sees a reset, not a clean end of stream."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _hostname(host: str) -> str:
    """The host part of a Host header, port ignored (``[::1]:3284`` -> ``::1``)."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else ""
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


# -- the `agentapi` program ------------------------------------------------------------------


_GO_TIME = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{1,2}:\d{2}:\d{2}(?:[.,]\d+)?(?:Z|[+-]\d{2}:\d{2})", flags=re.ASCII
)


def _decode_state_like_go(data: bytes) -> dict[str, Any]:
    """Decode a state file the way AgentAPI's ``json.Decoder`` does, independently of the
    product's own models (a fake that validated with them would only prove our reading):
    the first JSON value counts, unknown keys are ignored, a missing key is Go's zero value,
    a wrong type is an error, and ``version`` must be 1."""
    decoded, _end = json.JSONDecoder().raw_decode(data.decode("utf-8", errors="replace").lstrip())
    if not isinstance(decoded, dict):
        raise ValueError("not a JSON object")
    fields: dict[str, tuple[type, Any]] = {
        "version": (int, 0),
        "messages": (list, []),
        "initial_prompt": (str, ""),
        "initial_prompt_sent": (bool, False),
    }
    state: dict[str, Any] = {}
    for key, (kind, zero) in fields.items():
        value = decoded.get(key, zero)
        if value is None:
            value = zero
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{key} has the wrong type")
        state[key] = value
    if state["version"] != 1:
        raise ValueError(f"unsupported state file version {state['version']} (expected 1)")
    messages = []
    for item in state["messages"]:
        if not isinstance(item, dict):
            raise ValueError("a message is not an object")
        message = {
            "id": item.get("id", 0),
            "message": item.get("message", ""),
            "role": item.get("role", ""),
            "time": item.get("time"),
        }
        if not isinstance(message["id"], int) or isinstance(message["id"], bool):
            raise ValueError("a message id is not an integer")
        if not isinstance(message["message"], str) or not isinstance(message["role"], str):
            raise ValueError("a message text or role is not a string")
        when = message["time"]
        if when is None:
            message["time"] = "0001-01-01T00:00:00Z"
        elif not isinstance(when, str) or _GO_TIME.fullmatch(when) is None:
            raise ValueError(f"message time {when!r} is not RFC 3339")
        messages.append(message)
    state["messages"] = messages
    return state


def _apply_initial_prompt(fake: FakeAgentAPI, started_with: str) -> None:
    """AgentAPI's rule on load: a different prompt is sent again, the same one keeps the saved
    flag, none restores the saved one. An unsent prompt is sent now (user + agent reply). The
    prompt is trimmed first, as AgentAPI trims it (lib/httpapi/claude.go ``FormatMessage``)."""
    started_with = started_with.strip(" \t\n\r\f\v")
    if started_with and started_with != fake.initial_prompt:
        fake.initial_prompt, fake.initial_prompt_sent = started_with, False
    if fake.initial_prompt and not fake.initial_prompt_sent:
        fake.add_message("user", fake.initial_prompt)
        fake.add_message("agent", f"echo: {fake.initial_prompt}")
        fake.initial_prompt_sent = True
