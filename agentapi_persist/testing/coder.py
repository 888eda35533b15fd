"""FakeCoder: a real HTTP server on 127.0.0.1 that answers log-snapshot uploads like coderd.

It follows the contract in the SPEC (section 3, "Coder server"), checked in coderd's order:
route, then token, then task id, query and body, then the task itself. It records every
request it receives, so a test can assert on exactly what went over the wire, and its
``behaviour`` knobs rehearse what a real deployment does to an upload::

    async with FakeCoder(token="t0k", task_ids={task}) as coder:
        coder.behaviour.script = [503, 503]       # then the normal logic answers
        ...
        assert coder.snapshots[task] == {...}

Like the real server it accepts roles other than user/agent (the page that reads the snapshot
breaks later) and lists them in ``invalid_snapshots``, so tests can prove a client never sends
them; a time Go cannot decode (no offset, say) makes the whole body a 400, and a route it does
not have gets coderd's JSON ``{"message": "Route not found."}`` 404.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import struct
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from aiohttp import web

from .server import LoopbackServer

__all__ = ["CoderBehaviour", "FakeCoder", "InvalidSnapshot", "RecordedRequest"]

SNAPSHOT_MAX_BYTES = 65_536
_ROUTE = re.compile(r"/api/v2/workspaceagents/me/tasks/(?P<task>[^/]+)/log-snapshot")
# What Go's time.Time JSON decoding accepts, roughly (coderd decodes each message time into a
# time.Time; a time it refuses makes the whole body a 400).
_TIME = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{1,2}:\d{2}:\d{2}(?:[.,]\d+)?(?:Z|[+-]\d{2}:\d{2})",
    flags=re.ASCII,
)
_TOKEN_HEADER = "Coder-Session-Token"


@dataclass(slots=True)
class CoderBehaviour:
    """Knobs; change them at any time, the next request sees the new values."""

    script: list[int] = field(default_factory=list)
    """Statuses answered, one per request, before the normal logic. A 2xx entry hands that
    request to the normal logic, so the fake never claims to store what it did not."""
    delay_s: float = 0.0
    """Pause before answering each request."""
    hang: bool = False
    """Never answer; the request ends when the client goes away or the server stops."""
    reset: bool = False
    """Abort the connection with a TCP reset instead of answering."""
    redirect_to: str | None = None
    """Answer 307 with ``Location: <redirect_to><path and query>``, like a moved server."""
    route_exists: bool = True
    """False: every request gets coderd's route-missing 404 (``{"message": "Route not
    found."}``), like an old Coder or one without Tasks."""
    stop_build_finished: bool = False
    """True: every request on the route gets 401, as after the stop build ends."""


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as received. The token itself is not kept, only whether it matched."""

    method: str
    path: str
    query: list[tuple[str, str]]
    content_type: str | None
    token_sent: bool
    token_matched: bool
    body: bytes
    json: Any
    """The parsed body, or ``None`` when it was not JSON."""
    status: int | None
    """What the fake answered; ``None`` when it hung or reset the connection."""


@dataclass(frozen=True, slots=True)
class InvalidSnapshot:
    """A stored message the real page cannot show: a bad role or a time without an offset."""

    task_id: str
    index: int
    problem: str


class FakeCoder(LoopbackServer):
    """The Coder log-snapshot endpoint on a free loopback port, as an async context manager."""

    def __init__(
        self,
        *,
        token: str,
        task_ids: Iterable[str] = (),
        script: Iterable[int] = (),
        delay_s: float = 0.0,
        hang: bool = False,
        reset: bool = False,
        redirect_to: str | None = None,
        route_exists: bool = True,
        stop_build_finished: bool = False,
    ) -> None:
        super().__init__()
        self.token = token
        self.task_ids: set[str] = {str(uuid.UUID(task)) for task in task_ids}
        self.behaviour = CoderBehaviour(
            script=list(script),
            delay_s=delay_s,
            hang=hang,
            reset=reset,
            redirect_to=redirect_to,
            route_exists=route_exists,
            stop_build_finished=stop_build_finished,
        )
        self.uploads: list[RecordedRequest] = []
        self.snapshots: dict[str, Any] = {}
        self.invalid_snapshots: list[InvalidSnapshot] = []
        self._stopping = asyncio.Event()

    def snapshot_url(self, task_id: str) -> str:
        """The full upload URL for ``task_id``, with its one query parameter."""
        return f"{self.url}/api/v2/workspaceagents/me/tasks/{task_id}/log-snapshot?format=agentapi"

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=4 * SNAPSHOT_MAX_BYTES)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _before_close(self) -> None:
        """Release hung requests."""
        self._stopping.set()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body, oversize = await _read_bounded(request)
        sent = request.headers.get(_TOKEN_HEADER)
        parsed = _parse_json(body) if not oversize else None
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            query=list(request.query.items()),
            content_type=request.headers.get("Content-Type"),
            token_sent=sent is not None,
            token_matched=sent == self.token,
            body=body,
            json=parsed,
            status=None,
        )
        behaviour = self.behaviour
        if behaviour.delay_s > 0:
            await asyncio.sleep(behaviour.delay_s)
        if behaviour.hang or behaviour.reset:
            self.uploads.append(record)
            if behaviour.reset:
                _reset(request)
            # Ends when the client goes away (handler cancellation) or the server stops.
            await self._stopping.wait()
            return web.Response(status=503)
        response = self._answer(request, oversize, parsed)
        self.uploads.append(replace(record, status=response.status))
        return response

    def _answer(self, request: web.Request, oversize: bool, parsed: Any) -> web.Response:
        behaviour = self.behaviour
        if behaviour.redirect_to is not None:
            location = behaviour.redirect_to.rstrip("/") + request.path_qs
            return web.Response(status=307, headers={"Location": location})
        if behaviour.script:
            status = behaviour.script.pop(0)
            if not 200 <= status < 300:
                return _scripted(status, self.url + request.path_qs)
        match = _ROUTE.fullmatch(request.path)
        if not behaviour.route_exists or match is None:
            # coderd answers a route it does not have with httpapi.RouteNotFound.
            return web.json_response({"message": "Route not found."}, status=404)
        if request.method != "POST":
            return web.Response(status=405, text="Method Not Allowed\n")
        if behaviour.stop_build_finished:
            return _error(401, "Workspace agent not authorized.", "The build is not running.")
        sent = request.headers.get(_TOKEN_HEADER)
        if sent is None:
            return _error(401, "Workspace agent not authorized.", "No session token provided.")
        if sent != self.token:
            return _error(401, "Workspace agent not authorized.", "Invalid session token.")
        task = match["task"]
        try:
            task_id = str(uuid.UUID(task))
        except ValueError:
            return _error(400, "Invalid UUID.", f"Invalid UUID {task!r}.")
        if task_id != task:
            return _error(400, "Invalid UUID.", f"Invalid UUID {task!r}.")
        if list(request.query.items()) != [("format", "agentapi")]:
            return _error(400, "Invalid query parameters.", 'Expected exactly "format=agentapi".')
        if oversize:
            return _error(400, "Request body too large.", f"Limit is {SNAPSHOT_MAX_BYTES} bytes.")
        problem = _shape_problem(parsed)
        if problem is not None:
            return _error(400, "Request body must be valid JSON.", problem)
        if task_id not in self.task_ids:
            return _error(404, "Task not found.", "")
        self.snapshots[task_id] = parsed
        self._note_invalid(task_id, parsed["messages"])
        return web.Response(status=204)

    def _note_invalid(self, task_id: str, messages: list[dict[str, Any]]) -> None:
        for index, message in enumerate(messages):
            role = message.get("role", "")
            if role not in ("user", "agent"):
                self.invalid_snapshots.append(InvalidSnapshot(task_id, index, f"role {role!r}"))
            when = message.get("time", "")
            if _TIME.fullmatch(when) is None:
                self.invalid_snapshots.append(
                    InvalidSnapshot(
                        task_id, index, f"time {when!r} has no offset or is not RFC 3339"
                    )
                )


async def _read_bounded(request: web.Request) -> tuple[bytes, bool]:
    """The body up to one byte past the limit, and whether it went past it."""
    chunks: list[bytes] = []
    size = 0
    while size <= SNAPSHOT_MAX_BYTES:
        chunk = await request.content.read(SNAPSHOT_MAX_BYTES + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks), size > SNAPSHOT_MAX_BYTES


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8", errors="replace"))
    except (ValueError, RecursionError):
        return None


def _shape_problem(parsed: Any) -> str | None:
    """Why Go's decoder would refuse the body for ``{"messages": [{id, content, role, time}]}``."""
    if not isinstance(parsed, dict) or not isinstance(parsed.get("messages"), list):
        return 'expected an object with a "messages" array'
    types = {"id": int, "content": str, "role": str, "time": str}
    for index, message in enumerate(parsed["messages"]):
        if not isinstance(message, dict):
            return f"messages[{index}] is not an object"
        for key, kind in types.items():
            value = message.get(key, kind())
            if not isinstance(value, kind) or isinstance(value, bool):
                return f"messages[{index}].{key} must be {kind.__name__}"
        if _TIME.fullmatch(message.get("time", "")) is None:
            return f"messages[{index}].time {message.get('time')!r} is not RFC 3339"
    return None


def _error(status: int, message: str, detail: str) -> web.Response:
    """coderd's error shape: ``{"message": ..., "detail": ...}``."""
    return web.json_response({"message": message, "detail": detail}, status=status)


def _scripted(status: int, location: str) -> web.Response:
    if 300 <= status < 400:
        return web.Response(status=status, headers={"Location": location})
    return _error(status, f"Scripted {status}.", "Set by FakeCoder.behaviour.script.")


def _reset(request: web.Request) -> None:
    """Close with RST (linger 0) so the client sees a reset, not a clean end of stream."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
