"""AgentAPIClient against real loopback servers: FakeAgentAPI, plus raw SSE peers where the
exact bytes on the wire matter."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing

import aiohttp
import pytest
import structlog
from aiohttp import web

from agentapi_persist._http import make_session
from agentapi_persist.agentapi import (
    AgentAPIClient,
    AgentErrorEvent,
    AgentEvent,
    HeldUpdate,
    MessageUpdate,
    StatusChange,
    _interpret,
    _RawEvent,
    _SSEDecoder,
)
from agentapi_persist.budget import Budget
from agentapi_persist.errors import AgentAPIBodyError, AgentAPIError, EventTooLarge
from agentapi_persist.testing.agentapi import SUBSCRIBER_BUFFER, FakeAgentAPI
from agentapi_persist.testing.server import free_port

GO_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{9}Z")
T0 = "2025-01-02T03:04:05.123456789Z"
SLACK_S = 1.0


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with make_session() as session:
        yield session


@pytest.fixture
async def agent() -> AsyncIterator[FakeAgentAPI]:
    async with FakeAgentAPI(messages=[("user", "fix the build"), ("agent", "Done ┌─┐ ✓")]) as fake:
        yield fake


def client_for(agent: FakeAgentAPI, session: aiohttp.ClientSession, **kwargs) -> AgentAPIClient:
    return AgentAPIClient(agent.url, session=session, **kwargs)


def messages_body(*items: dict[str, object]) -> bytes:
    return json.dumps({"messages": list(items)}).encode()


# -- /status and /messages ------------------------------------------------------------------


async def test_status_reports_transport_from_0_12(agent, session):
    """0.12 answers ``transport``; the client passes it through."""
    status = await client_for(agent, session).status(budget=Budget(5))
    assert (status.status, status.agent_type, status.transport) == ("stable", "claude", "pty")


async def test_status_without_transport_before_0_12(session):
    """An AgentAPI before 0.12 has no ``transport`` field; it is not required."""
    async with FakeAgentAPI(version="0.11.0", status="running") as old:
        async with session.get(old.url + "/status") as raw:
            assert "transport" not in await raw.json()
        status = await client_for(old, session).status(budget=Budget(5))
    assert (status.status, status.transport) == ("running", None)


async def test_messages_roundtrip(agent, session):
    """``/messages`` comes back as typed messages, ids 0..n-1, Go-style nanosecond times."""
    messages = await client_for(agent, session).messages(budget=Budget(5))
    assert messages == agent.messages
    assert [(m.id, m.role, m.content) for m in messages] == [
        (0, "user", "fix the build"),
        (1, "agent", "Done ┌─┐ ✓"),
    ]
    assert all(GO_TIME.fullmatch(m.time) for m in messages)


async def test_empty_conversation(session):
    """No messages yet is a valid, empty answer."""
    async with FakeAgentAPI() as empty:
        assert await client_for(empty, session).messages(budget=Budget(5)) == ()


async def test_host_header_from_localhost_url_is_accepted(agent, session):
    """The Host header aiohttp derives from ``http://localhost:PORT`` passes AgentAPI's check."""
    client = AgentAPIClient(f"http://localhost:{agent.port}/", session=session)
    assert (await client.status(budget=Budget(5))).status == "stable"
    assert agent.requests[-1].host == f"localhost:{agent.port}"


# -- faults ---------------------------------------------------------------------------------


async def test_refused_port(session):
    """Nothing listening: AgentAPIError that says "refused", from the aiohttp cause."""
    client = AgentAPIClient(f"http://127.0.0.1:{free_port()}", session=session)
    with pytest.raises(AgentAPIError, match="refused") as caught:
        await client.status(budget=Budget(5))
    assert not isinstance(caught.value, AgentAPIBodyError)
    assert isinstance(caught.value.__cause__, aiohttp.ClientConnectorError)


async def test_reset_connection(agent, session):
    """A connection reset instead of an answer: AgentAPIError saying so."""
    agent.behaviour.reset = True
    with pytest.raises(AgentAPIError, match="reset the connection") as caught:
        await client_for(agent, session).status(budget=Budget(5))
    assert not isinstance(caught.value, AgentAPIBodyError)


async def test_connection_closed_without_answer(session):
    """A peer that accepts and hangs up at once: AgentAPIError, not a hang."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        client = AgentAPIClient(f"http://127.0.0.1:{port}", session=session)
        with pytest.raises(AgentAPIError, match="closed the connection without answering"):
            await client.status(budget=Budget(5))


@pytest.mark.parametrize("knob", ["delay", "hang"])
async def test_slow_or_hung_agentapi_is_cut_at_the_budget(agent, session, knob):
    """A server slower than the budget, or one that never answers, costs the budget only."""
    if knob == "delay":
        agent.behaviour.delay_s = 30
    else:
        agent.behaviour.hang = True
    started = time.monotonic()
    with pytest.raises(AgentAPIError, match=r"did not answer within 0\.3 s") as caught:
        await client_for(agent, session).messages(budget=Budget(0.3))
    assert time.monotonic() - started < 0.3 + SLACK_S
    assert isinstance(caught.value.__cause__, TimeoutError)


async def test_cap_s_bounds_one_call_below_the_budget(agent, session):
    """``cap_s`` limits a single call even when the budget has more."""
    agent.behaviour.delay_s = 30
    started = time.monotonic()
    with pytest.raises(AgentAPIError, match=r"within 0\.2 s"):
        await client_for(agent, session).status(budget=Budget(20), cap_s=0.2)
    assert time.monotonic() - started < 0.2 + SLACK_S


async def test_spent_budget_sends_no_request(agent, session):
    """With nothing left in the budget the request is not even started."""
    with pytest.raises(AgentAPIError, match="no time left"):
        await client_for(agent, session).messages(budget=Budget(0))
    assert agent.requests == []


async def test_truncated_body(agent, session):
    """A body cut short of its Content-Length is a body error, not a half conversation."""
    agent.behaviour.truncate = True
    with pytest.raises(AgentAPIBodyError, match="truncated") as caught:
        await client_for(agent, session).messages(budget=Budget(5))
    assert isinstance(caught.value.__cause__, aiohttp.ClientPayloadError)


async def test_error_status_carries_status_and_capped_body(agent, session):
    """Non-2xx: AgentAPIError with ``.status`` and the start of the body, capped."""
    agent.behaviour.error_status = 503
    agent.behaviour.error_body = "agent is restarting " + "x" * 5000
    with pytest.raises(AgentAPIError) as caught:
        await client_for(agent, session).status(budget=Budget(5))
    error = caught.value
    assert not isinstance(error, AgentAPIBodyError)
    assert error.status == 503
    assert "503" in str(error)
    assert "agent is restarting" in str(error)
    assert len(str(error)) < 500


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_huge_body_is_refused_by_the_cap_without_buffering_it(agent, session, declared):
    """A 100 MB body meets a 1 MiB cap: refused after at most a few MiB went over the wire."""
    agent.behaviour.stream_body_bytes = 100 * 2**20
    agent.behaviour.stream_declares_length = declared
    client = client_for(agent, session, max_body_bytes=2**20)
    with pytest.raises(AgentAPIBodyError, match="1048576-byte cap"):
        await client.messages(budget=Budget(10))
    assert agent.behaviour.bytes_streamed < 20 * 2**20


async def test_non_utf8_is_tolerated_with_replacement_characters(agent, session):
    """Invalid UTF-8 inside a string becomes U+FFFD, as AgentAPI's Go decoder does: one bad
    byte must not cost the whole conversation."""
    agent.behaviour.messages_body = (
        b'{"messages":[{"id":0,"content":"caf\xe9 \xff ok","role":"user","time":"' + T0.encode()
    ) + b'"}]}'
    (message,) = await client_for(agent, session).messages(budget=Budget(5))
    assert message.content == "caf\ufffd \ufffd ok"
    message.content.encode("utf-8")  # always encodable afterwards


async def test_lone_surrogates_become_replacement_characters(agent, session):
    """A lone surrogate escape (legal JSON, illegal UTF-8) becomes U+FFFD."""
    agent.behaviour.messages_body = messages_body(
        {"id": 0, "content": "x", "role": "agent", "time": T0}
    ).replace(b'"x"', b'"a\\ud800b\\udc00"')
    (message,) = await client_for(agent, session).messages(budget=Budget(5))
    assert message.content == "a\ufffdb\ufffd"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="deep-nesting-top"),
        pytest.param(
            b'{"messages":[{"id":0,"role":"user","time":"'
            + T0.encode()
            + b'","content":'
            + b"[" * 5000
            + b"]" * 5000
            + b"}]}",
            id="deep-nesting-in-content",
        ),
        pytest.param(b"<html>502 Bad Gateway</html>", id="not-json"),
        pytest.param(b'{"messages":[{"id":0,', id="cut-json"),
        pytest.param(b"", id="empty"),
        pytest.param(b'{"messages":"none"}', id="messages-not-a-list"),
        pytest.param(messages_body({"id": 0, "content": 5, "role": "user", "time": T0}), id="int"),
        pytest.param(
            messages_body({"id": 0.5, "content": "", "role": "user", "time": T0}), id="id"
        ),
        pytest.param(
            messages_body({"id": 0, "content": "", "role": "system", "time": T0}), id="role"
        ),
        pytest.param(
            messages_body({"id": 0, "content": "", "role": "user", "time": "yesterday"}),
            id="time",
        ),
        pytest.param(
            messages_body({"id": 0, "content": "", "role": "user", "time": "2025-01-02T03:04:05"}),
            id="time-without-offset",
        ),
        pytest.param(messages_body({"id": 0, "role": "user", "time": T0}), id="missing-content"),
    ],
)
async def test_unusable_bodies_are_body_errors(agent, session, body):
    """Not JSON, wrong shape, wrong types, deep nesting: AgentAPIBodyError, quickly."""
    agent.behaviour.messages_body = body
    with pytest.raises(AgentAPIBodyError, match="unusable body") as caught:
        await client_for(agent, session).messages(budget=Budget(5))
    assert caught.value.__cause__ is not None


@pytest.mark.parametrize("ids", [[0, 0], [1, 0], [0, 2, 1]])
async def test_message_ids_must_increase(agent, session, ids):
    """A duplicate or a reorder leaves no order to trust: refused."""
    agent.behaviour.messages_body = messages_body(
        *({"id": i, "content": "m", "role": "user", "time": T0} for i in ids)
    )
    with pytest.raises(AgentAPIBodyError, match="do not increase"):
        await client_for(agent, session).messages(budget=Budget(5))


@pytest.mark.parametrize("ids", [[0, 2], [1], [0, 1, 4, 5]])
async def test_skipping_ids_are_renumbered(agent, session, ids):
    """ACP mode skips ids after a failed prompt (the real v0.12.2 does): the conversation is
    kept in order, renumbered 0..n-1 (what AgentAPI's state file needs), with AgentAPI's ids
    alongside."""
    agent.behaviour.messages_body = messages_body(
        *({"id": i, "content": f"m{i}", "role": "user", "time": T0} for i in ids)
    )
    messages, agent_ids = await client_for(agent, session).messages_with_ids(budget=Budget(5))
    assert [m.id for m in messages] == list(range(len(ids)))
    assert [m.content for m in messages] == [f"m{i}" for i in ids]
    assert list(agent_ids) == ids


# -- /events ----------------------------------------------------------------------------------


async def next_event(events: AsyncIterator[AgentEvent], timeout: float = 5.0) -> AgentEvent:
    return await asyncio.wait_for(anext(events), timeout)


async def test_events_replay_then_status_then_deltas(agent, session):
    """On connect: every message, one status_change, then each change as it happens."""
    client = client_for(agent, session)
    async with aclosing(client.events(idle_timeout_s=5)) as events:
        first, second, status = [await next_event(events) for _ in range(3)]
        assert first == MessageUpdate(0, "user", "fix the build", agent.messages[0].time)
        assert second == MessageUpdate(1, "agent", "Done ┌─┐ ✓", agent.messages[1].time)
        assert status == StatusChange("stable", "claude")

        added = agent.add_message("user", "and the tests")
        agent.set_status("running")
        agent.add_message("agent", "On it")
        agent.update_last("On it: 3 failures")
        agent.set_status("stable")
        agent.emit_agent_error("agent crashed", level="error")
        deltas = [await next_event(events) for _ in range(6)]
    assert deltas[0] == MessageUpdate(2, "user", "and the tests", added.time)
    assert deltas[1] == StatusChange("running", "claude")
    assert isinstance(deltas[2], MessageUpdate)
    assert (deltas[2].id, deltas[2].content) == (3, "On it")
    assert isinstance(deltas[3], MessageUpdate)
    assert (deltas[3].id, deltas[3].content) == (3, "On it: 3 failures")
    assert deltas[4] == StatusChange("stable", "claude")
    assert isinstance(deltas[5], AgentErrorEvent)
    assert (deltas[5].message, deltas[5].level) == ("agent crashed", "error")
    assert deltas[3].as_message() == agent.messages[3]


async def test_post_message_shows_up_on_the_stream(agent, session):
    """``POST /message`` appends the user's message and the agent's reply, like AgentAPI."""
    async with aclosing(client_for(agent, session).events(idle_timeout_s=5)) as events:
        for _ in range(3):
            await next_event(events)
        async with session.post(
            agent.url + "/message", json={"content": "hello", "type": "user"}
        ) as response:
            assert (response.status, await response.json()) == (200, {"ok": True})
        seen = [await next_event(events) for _ in range(4)]
    kinds = [(type(e).__name__, getattr(e, "content", getattr(e, "status", ""))) for e in seen]
    assert kinds == [
        ("MessageUpdate", "hello"),
        ("StatusChange", "running"),
        ("MessageUpdate", "echo: hello"),
        ("StatusChange", "stable"),
    ]


async def test_dropped_subscription_ends_the_iterator(agent, session):
    """AgentAPI ending the stream ends the iterator; the caller reconnects."""
    received: list[AgentEvent] = []

    async def follow() -> None:
        async for event in client_for(agent, session).events(idle_timeout_s=5):
            received.append(event)

    task = asyncio.create_task(follow())
    while len(received) < 3:
        await asyncio.sleep(0.01)
    agent.drop_subscribers()
    await asyncio.wait_for(task, 5)
    assert len(received) == 3


async def test_subscriber_falling_1024_events_behind_is_dropped(agent, session):
    """A reader that stops reading gets what was queued (1024 events), then the end."""
    agent.stall_events = True
    received: list[AgentEvent] = []

    async def follow() -> None:
        async for event in client_for(agent, session).events(idle_timeout_s=10):
            received.append(event)

    task = asyncio.create_task(follow())
    while agent.subscribers == 0:
        await asyncio.sleep(0.01)
    for index in range(SUBSCRIBER_BUFFER + 50):
        agent.add_message("agent", f"line {index}")
    assert agent.subscribers == 0
    agent.stall_events = False
    await asyncio.wait_for(task, 10)
    assert len(received) == 3 + SUBSCRIBER_BUFFER
    last = received[-1]
    assert isinstance(last, MessageUpdate)
    assert last.content == f"line {SUBSCRIBER_BUFFER - 1}"


async def test_stalled_stream_raises_within_the_idle_timeout(agent, session):
    """A stream that goes silent raises AgentAPIError after ``idle_timeout_s``, not never."""
    agent.stall_events = True
    started = time.monotonic()
    with pytest.raises(AgentAPIError, match=r"went silent for 0\.3 s"):
        async with aclosing(client_for(agent, session).events(idle_timeout_s=0.3)) as events:
            await anext(events)
    assert time.monotonic() - started < 0.3 + SLACK_S


async def test_hung_events_endpoint_is_cut_at_the_connect_timeout(agent, session):
    """No response headers: the connect timeout bounds the wait."""
    agent.behaviour.hang = True
    started = time.monotonic()
    with pytest.raises(AgentAPIError, match=r"did not start its event stream within 0\.3 s"):
        async with aclosing(client_for(agent, session).events(connect_timeout_s=0.3)) as events:
            await anext(events)
    assert time.monotonic() - started < 0.3 + SLACK_S


async def test_events_refused(session):
    """Nothing listening: AgentAPIError saying so."""
    client = AgentAPIClient(f"http://127.0.0.1:{free_port()}", session=session)
    with pytest.raises(AgentAPIError, match="refused"):
        async with aclosing(client.events()) as events:
            await anext(events)


async def test_events_error_status(agent, session):
    """A non-200 answer to ``/events`` is an AgentAPIError with the status."""
    agent.behaviour.error_status = 500
    with pytest.raises(AgentAPIError) as caught:
        async with aclosing(client_for(agent, session).events()) as events:
            await anext(events)
    assert caught.value.status == 500


async def test_bad_json_in_one_event_raises_body_error(agent, session):
    """A malformed event is a reason to resync: AgentAPIBodyError."""
    async with aclosing(client_for(agent, session).events(idle_timeout_s=5)) as events:
        for _ in range(3):
            await next_event(events)
        agent.inject_raw(b'event: message_update\ndata: {"id": 0, "role": \n\n')
        with pytest.raises(AgentAPIBodyError, match="bad 'message_update' event"):
            await next_event(events)


async def test_oversized_event_raises_instead_of_buffering(agent, session):
    """A single event past the cap is refused while it is still arriving."""
    client = client_for(agent, session, max_event_bytes=4096)
    async with aclosing(client.events(idle_timeout_s=5)) as events:
        for _ in range(3):
            await next_event(events)
        agent.inject_raw(b"event: message_update\ndata: " + b"x" * 10_000)
        with pytest.raises(AgentAPIBodyError, match="4096-byte cap"):
            await next_event(events)


async def test_unknown_event_types_are_skipped_and_logged(agent, session):
    """Events we do not follow (screen_update, future types) are skipped at debug level."""
    async with aclosing(client_for(agent, session).events(idle_timeout_s=5)) as events:
        for _ in range(3):
            await next_event(events)
        with structlog.testing.capture_logs() as logs:
            agent.inject_raw(b'event: screen_update\ndata: {"screen": "..."}\n\n')
            agent.inject_raw(b"data: an unnamed event\n\n")
            agent.set_status("running")
            assert await next_event(events) == StatusChange("running", "claude")
    skipped = [e["event_type"] for e in logs if e["event"] == "agentapi.event_skipped"]
    assert skipped == ["screen_update", "message"]


RAW_STREAM = (
    b"\xef\xbb\xbf: a comment, then a multi-line data field\r\n"
    b"retry: 1000\r\n"
    b"id: 7\r\n"
    b"event: message_update\r\n"
    b'data: {"id": 0, "role": "agent",\r\n'
    b'data: "message": "line one\\nline two", "time": "2025-01-02T03:04:05.123456789Z"}\r\n'
    b"\r\n"
    b"event: status_change\r"
    b'data:{"status":"running","agent_type":"codex"}\r'
    b"\r"
    b"event: message_update\n"
    b'data: {"id": 1, "role": "user", "message": "caf\xc3\xa9", "time": "' + T0.encode() + b'"}\n'
    b"\n"
    b"event: status_change\n"
    b'data: {"status": "stable", "agent_type": "codex"}\n'
    # no blank line: an unfinished event at the end of the stream is discarded
)
RAW_EVENTS = [
    MessageUpdate(0, "agent", "line one\nline two", T0),
    StatusChange("running", "codex"),
    MessageUpdate(1, "user", "café", T0),
]


@pytest.fixture
async def raw_sse() -> AsyncIterator[Callable[[list[bytes]], Awaitable[str]]]:
    """A server that sends exactly the given chunks as an event stream, then ends it."""
    runners: list[web.AppRunner] = []

    async def start(chunks: list[bytes]) -> str:
        async def handler(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for chunk in chunks:
                await response.write(chunk)
                await asyncio.sleep(0)
            return response

        app = web.Application()
        app.router.add_get("/events", handler)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.mark.parametrize("chunk_size", [len(RAW_STREAM), 1, 2, 7])
async def test_sse_parsing_over_the_wire(raw_sse, session, chunk_size):
    """BOM, comments, retry and id lines, CRLF / CR / LF endings, multi-line data, any split
    of the bytes into chunks: the same events, and a trailing unfinished event is dropped."""
    chunks = [RAW_STREAM[i : i + chunk_size] for i in range(0, len(RAW_STREAM), chunk_size)]
    url = await raw_sse(chunks)
    client = AgentAPIClient(url, session=session)
    received = [event async for event in client.events(idle_timeout_s=5)]
    assert received == RAW_EVENTS


def test_sse_decoder_is_split_invariant():
    """Feeding the decoder byte by byte gives the same events as feeding it all at once."""
    whole = _SSEDecoder(max_event_bytes=2**20).feed(RAW_STREAM)
    split = _SSEDecoder(max_event_bytes=2**20)
    pieces = [event for byte in RAW_STREAM for event in split.feed(bytes([byte]))]
    assert pieces == whole
    assert [e.type for e in whole] == ["message_update", "status_change", "message_update"]
    assert whole[0].id == "7"
    assert split.pending  # the unfinished status_change


@pytest.mark.parametrize(
    "chunks",
    [
        [b"data: a\r\n", b"\n"],  # a CRLF line, then a bare LF: the blank line that dispatches
        [b"data: a\r", b"\n\n"],  # a CR whose LF comes in the next chunk, then the blank line
        [b"data: a\r", b"\r"],  # CR endings only
        [b"data: a\n\r", b"\n"],  # LF, then a CRLF blank line split across chunks
    ],
)
def test_sse_decoder_line_endings_across_chunk_boundaries(chunks: list[bytes]) -> None:
    """Mixed line endings where a chunk ends: exactly one event, ``a``, each time (an LF is
    swallowed only when it completes a CR that ended the previous chunk)."""
    decoder = _SSEDecoder(max_event_bytes=2**20)
    events = [event for chunk in chunks for event in decoder.feed(chunk)]
    assert [e.data for e in events] == [b"a"]
    assert not decoder.pending


def test_sse_decoder_finds_the_end_of_a_1_mb_line():
    """A long agent message comes whole in one data line: the decoder finds its end (and
    counts it) without scanning it again for every chunk."""
    line = b"data: " + b"x" * (1 << 20)
    decoder = _SSEDecoder(max_event_bytes=2 << 20)
    events = []
    for start in range(0, len(line), 65536):
        events += decoder.feed(line[start : start + 65536])
    events += decoder.feed(b"\n\n")
    assert [len(e.data) for e in events] == [1 << 20]


def test_sse_decoder_counts_a_long_line_against_the_cap():
    """One endless line (no newline ever) is refused once it passes the cap."""
    decoder = _SSEDecoder(max_event_bytes=1000)
    decoder.feed(b"data: " + b"x" * 900)
    with pytest.raises(AgentAPIBodyError, match="1000-byte cap"):
        decoder.feed(b"x" * 200)


async def test_non_event_stream_content_type_is_refused(agent, session):
    """Something answering ``/events`` with JSON is not AgentAPI's event stream."""

    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"hello": "world"})

    app = web.Application()
    app.router.add_get("/events", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        client = AgentAPIClient(f"http://{host}:{port}", session=session)
        with pytest.raises(AgentAPIBodyError, match="not an event stream"):
            async with aclosing(client.events()) as events:
                await anext(events)
    finally:
        await runner.cleanup()


async def test_the_event_cap_is_the_body_cap(session):
    """A message GET /messages can deliver fits in an event too: one cap for both (the
    default 256 MiB). A 65 MiB agent message streams through; before, events were capped at
    64 MiB and the sidecar reconnected for ever on it. Over the cap it is EventTooLarge."""
    big = "x" * (65 * 2**20)
    async with FakeAgentAPI(messages=[("user", "hi"), ("agent", big)]) as agent:
        client = client_for(agent, session)
        async with aclosing(client.events(idle_timeout_s=20)) as events:
            first, second = await next_event(events), await next_event(events)
        assert isinstance(second, HeldUpdate)  # large: decoded when read
        assert len(second.decode().content) == len(big)
        assert isinstance(first, MessageUpdate)
        small = client_for(agent, session, max_body_bytes=2**20)
        async with aclosing(small.events(idle_timeout_s=20)) as events:
            await next_event(events)
            with pytest.raises(EventTooLarge, match="1048576-byte cap"):
                await next_event(events)


def test_a_large_update_is_held_undecoded_and_checked_when_decoded() -> None:
    """Large message_update data whose id leads (as AgentAPI writes it) is handed on as a
    HeldUpdate; small data is decoded at once; decoding checks the id it started with."""
    from agentapi_persist.agentapi import LAZY_UPDATE_BYTES

    text = "w" * LAZY_UPDATE_BYTES
    data = json.dumps(
        {"id": 7, "role": "agent", "message": text, "time": "2025-01-02T03:04:05Z"},
        separators=(",", ":"),
    ).encode()
    held = _interpret(_RawEvent("message_update", data, ""), "http://agentapi")
    assert isinstance(held, HeldUpdate)
    assert held.id == 7
    update = held.decode()
    assert update == MessageUpdate(id=7, role="agent", content=text, time="2025-01-02T03:04:05Z")

    short = data.replace(text.encode(), b"short", 1)
    small = _interpret(_RawEvent("message_update", short, ""), "http://agentapi")
    assert isinstance(small, MessageUpdate)  # small: decoded at once
    reordered = data.replace(b'{"id":7,"role":"agent",', b'{"role":"agent","id":7,', 1)
    eager = _interpret(_RawEvent("message_update", reordered, ""), "http://agentapi")
    assert isinstance(eager, MessageUpdate)  # no leading id: decoded at once

    lying = data.replace(b'"time":', b'"id":8,"time":', 1)  # a later id wins in JSON
    held = _interpret(_RawEvent("message_update", lying, ""), "http://agentapi")
    assert isinstance(held, HeldUpdate)
    with pytest.raises(AgentAPIBodyError, match="whose id 8 is not the 7 it starts with"):
        held.decode()
