"""Shared pieces of the misbehaving-peer and budget-matrix fault tests.

A workspace per run (the matrix runs dozens at once), a good stored copy to start from and the
check that it was never replaced by worse, a port that refuses connections for as long as a
test needs it, the canary-token search over everything a run leaves behind, and a loopback
AgentAPI that stops half way through a body or an event (``FakeAgentAPI`` can delay, hang
before answering, or cut a body short, but not hang in the middle of one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from agentapi_persist.budget import Budget
from agentapi_persist.models import Conversation, Message, Relation, compare
from agentapi_persist.peers import open_peers
from agentapi_persist.shutdown import ShutdownReport, run_sequence
from agentapi_persist.store import StateStore
from agentapi_persist.testing.server import LoopbackServer

from .conftest import CANARY_TOKEN, Workspace, make_messages, new_workspace

__all__ = [
    "GOOD_MESSAGES",
    "StallingAgentAPI",
    "assert_good_or_superset",
    "assert_token_nowhere",
    "dead_url",
    "messages_body",
    "new_workspace",
    "run_sequence_for",
    "seed_good_copy",
]

#: Messages in the good stored copy every scenario starts from.
GOOD_MESSAGES = 12


def seed_good_copy(ws: Workspace, count: int = GOOD_MESSAGES) -> Conversation:
    """Save a good copy of ``count`` messages in the sidecar's store and return it."""
    good = Conversation(
        messages=tuple(make_messages(count)),
        initial_prompt="",
        initial_prompt_sent=True,
        prompt_origin="agentapi_state",
    )
    StateStore(ws.state_dir).save(good)
    return good


def assert_good_or_superset(ws: Workspace, good: Conversation) -> Conversation:
    """The stored copy loads cleanly and is ``good`` or extends it; returns what is stored."""
    report = StateStore(ws.state_dir, read_only=True).load()
    assert report.problems == (), report.problems
    stored = report.conversation
    assert stored is not None, "the good copy is gone"
    relation = compare(stored.messages, good.messages)
    assert relation in (Relation.SAME, Relation.A_AHEAD), (
        f"stored copy ({len(stored.messages)} messages) is {relation.value} "
        f"relative to the good one ({len(good.messages)})"
    )
    for message in stored.messages:
        message.content.encode("utf-8")  # no lone surrogate ever reaches the disk
    return stored


def assert_token_nowhere(root: Path, *texts: str | bytes) -> int:
    """The canary token (or its first 12 characters) is in none of ``texts`` and in no file
    under ``root``, quarantined, archived and history files included. Returns files searched."""
    needles = (CANARY_TOKEN.encode(), CANARY_TOKEN[:12].encode())
    for text in texts:
        data = text.encode() if isinstance(text, str) else text
        for needle in needles:
            assert needle not in data, "the token leaked into an output stream"
    searched = 0
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            searched += 1
            for needle in needles:
                assert needle not in data, f"the token leaked into {path}"
    return searched


@contextlib.contextmanager
def dead_url() -> Iterator[str]:
    """``http://127.0.0.1:<port>`` where the port is bound but never listened on: every
    connection is refused, and no other server can take the port while the block runs."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


#: The least the product keeps between the shutdown sequence's budget and the grace period
#: (``Settings.margin_s``: 10 % of the grace, at least 0.25 s). A sequence run in-process with
#: budget B has kept the promise when it ends before B plus this: where a grace period of
#: B + margin would end.
MIN_MARGIN_S = 0.25


async def run_sequence_for(
    ws: Workspace, *, budget_s: float, force: asyncio.Event | None = None, **flags: Any
) -> ShutdownReport:
    """The shutdown sequence in-process, its peers opened from ``ws``'s settings the way the
    ``shutdown`` command opens them (``open_peers``: body caps; a half-configured snapshot
    reaches the sequence as no client, which reports it). The one in-process wiring."""
    settings = ws.settings(**flags)
    async with open_peers(settings) as peers:
        return await run_sequence(
            settings,
            store=peers.store,
            agent=peers.agent,
            coder=peers.coder,
            budget=Budget(budget_s),
            force=force,
        )


def messages_body(messages: Sequence[Message]) -> bytes:
    """A ``GET /messages`` body for ``messages``, as AgentAPI writes it."""
    wire = [{"id": m.id, "content": m.content, "role": m.role, "time": m.time} for m in messages]
    return json.dumps({"messages": wire}, ensure_ascii=False).encode()


class StallingAgentAPI(LoopbackServer):
    """A loopback AgentAPI that starts answering and then goes silent, without closing.

    ``GET /messages`` declares the full length of a good body, sends half of it and stalls;
    ``GET /events`` sends the first half of a ``message_update`` event and stalls;
    ``GET /status`` answers normally. Stalled requests end when the client goes away or the
    server closes. ``stalled`` counts the requests left hanging.
    """

    def __init__(self, messages: Sequence[Message]) -> None:
        super().__init__(shutdown_timeout_s=0.5)
        self._body = messages_body(messages)
        self._release = asyncio.Event()
        self.stalled = 0

    def _build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/status", self._status)
        app.router.add_get("/messages", self._messages)
        app.router.add_get("/events", self._events)
        return app

    async def _before_close(self) -> None:
        self._release.set()

    async def _status(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "stable", "agent_type": "claude"})

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(self._body)
        await response.prepare(request)
        await response.write(self._body[: len(self._body) // 2])
        self.stalled += 1
        await self._release.wait()
        return response

    async def _events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'event: message_update\ndata: {"id":0,"role":"user","mess')
        self.stalled += 1
        await self._release.wait()
        return response
