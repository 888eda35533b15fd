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
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from agentapi_persist._http import make_session
from agentapi_persist.agentapi import AgentAPIClient
from agentapi_persist.budget import Budget
from agentapi_persist.coder import CoderClient
from agentapi_persist.errors import ConfigError
from agentapi_persist.models import Conversation, Message, Relation, compare
from agentapi_persist.shutdown import ShutdownReport, run_sequence
from agentapi_persist.store import StateStore
from agentapi_persist.testing.server import LoopbackServer

from .conftest import CANARY_TOKEN, Workspace, make_messages, new_workspace

__all__ = [
    "GOOD_MESSAGES",
    "ExitClock",
    "Run",
    "StallingAgentAPI",
    "assert_good_or_superset",
    "assert_token_nowhere",
    "cli_timed",
    "dead_url",
    "messages_body",
    "new_workspace",
    "run_cli_timed",
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


async def run_sequence_for(ws: Workspace, *, budget_s: float, **flags: Any) -> ShutdownReport:
    """The shutdown sequence in-process, wired from ``ws``'s settings the way the ``shutdown``
    command wires it (body cap included; a half-configured snapshot reaches the sequence as
    no client, which reports it)."""
    settings = ws.settings(**flags)
    try:
        target = settings.coder_target()
    except ConfigError:
        target = None
    async with make_session() as agent_session, make_session() as coder_session:
        agent = AgentAPIClient(
            settings.agentapi_url, session=agent_session, max_body_bytes=settings.max_body_bytes
        )
        coder = CoderClient(target, session=coder_session) if target is not None else None
        return await run_sequence(
            settings,
            store=StateStore(settings.state_dir, max_bytes=settings.max_body_bytes),
            agent=agent,
            coder=coder,
            budget=Budget(budget_s),
        )


@dataclass
class Run:
    """One CLI process's life: exit code, output, and times counted from its start."""

    code: int
    stdout: str
    stderr: str
    seconds: float
    """From the process's start to its exit."""
    startup_s: float
    """From its start to its first log event (only when asked to watch for it; else 0)."""


def run_cli_timed(
    ws: Workspace,
    args: Sequence[str],
    env: dict[str, str],
    on_started: Callable[[], None] | None = None,
) -> Run:
    """Run ``python -m agentapi_persist ARGS`` and time its whole life, in the calling thread
    (call it from a thread of its own: a busy event loop must not add to a process's time).

    With ``on_started``, stderr's first line is awaited first (run with logs at debug: it is
    the first event, logged as the sequence begins, so the imports are done) and
    ``on_started`` is called then.
    """
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentapi_persist", *args],
        bufsize=0,  # unbuffered pipes: readline() below leaves nothing behind for communicate()
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ws.process_env(**env),
    )
    # The kernel's record of the start is what the process's own budget counts from; take it,
    # or the moment before the spawn if that is earlier, so a time is never shorter than a life.
    origin = min(started, _start_time(proc.pid))
    first, startup_s = b"", 0.0
    if on_started is not None:
        assert proc.stderr is not None
        try:
            first = proc.stderr.readline()  # b"" if it exits without a word
            startup_s = time.monotonic() - origin
        finally:
            on_started()
    out, err = proc.communicate(timeout=120)
    seconds = time.monotonic() - origin
    return Run(proc.returncode, out.decode(), (first + err).decode(), seconds, startup_s)


async def cli_timed(ws: Workspace, *args: str, env: dict[str, str] | None = None) -> Run:
    """``run_cli_timed`` from a worker thread, while the caller's loop keeps serving peers."""
    return await asyncio.to_thread(run_cli_timed, ws, args, env or {})


def _start_time(pid: int) -> float:
    """When process ``pid`` started, on the monotonic clock (both count from boot here)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
    return ticks / os.sysconf("SC_CLK_TCK")


class ExitClock:
    """Notes when a process exits, from a thread of its own watching a pidfd (it does not reap
    the process: asyncio still does), so a busy event loop cannot add to the time."""

    def __init__(self, pid: int) -> None:
        self.exited_at: float | None = None
        self._fd = os.pidfd_open(pid)
        self._thread = threading.Thread(target=self._watch, name=f"exit-clock-{pid}", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        try:
            select.select([self._fd], [], [])
            self.exited_at = time.monotonic()
        finally:
            os.close(self._fd)

    def since(self, started: float, timeout: float = 5.0) -> float:
        """Seconds from ``started`` to the exit (call once the process has been waited for)."""
        self._thread.join(timeout)
        assert self.exited_at is not None, "the process has not exited"
        return self.exited_at - started


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
