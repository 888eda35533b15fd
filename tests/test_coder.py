"""CoderClient against real loopback servers: FakeCoder, plus tiny ad-hoc peers where needed."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer
from pydantic import SecretStr

from agentapi_persist._http import make_session
from agentapi_persist.budget import Budget
from agentapi_persist.coder import CoderClient, UploadOutcome, UploadResult, raise_for_result
from agentapi_persist.config import CoderTarget
from agentapi_persist.errors import CoderAPIError, ConfigError
from agentapi_persist.models import dump_compact
from agentapi_persist.testing.coder import FakeCoder

TOKEN = "canary-7c1f0d9e-token-that-must-never-leak"
TASK = "0b6f3c1e-4a2d-4f5b-9c8e-1d2e3f4a5b6c"
ROUTE = f"/api/v2/workspaceagents/me/tasks/{TASK}/log-snapshot"
SNAPSHOT = {
    "messages": [
        {"id": 0, "content": "fix the build", "role": "user", "time": "2025-01-02T03:04:05.123Z"},
        {
            "id": 1,
            "content": "Done ┌─┐ ✓",
            "role": "agent",
            "time": "2025-01-02T03:04:06.123456789+02:00",
        },
    ]
}
PAYLOAD = dump_compact(SNAPSHOT)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with make_session() as session:
        yield session


@pytest.fixture
async def coder() -> AsyncIterator[FakeCoder]:
    async with FakeCoder(token=TOKEN, task_ids={TASK}) as fake:
        yield fake


def make_client(
    base_url: str,
    session: aiohttp.ClientSession,
    *,
    task_id: str = TASK,
    token: str = TOKEN,
) -> CoderClient:
    target = CoderTarget(base_url=base_url, token=SecretStr(token), task_id=task_id)
    return CoderClient(target, session=session)


def free_port_nobody_listens_on() -> socket.socket:
    """A bound but non-listening socket: connecting to its port is refused until it closes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


async def upload(
    client: CoderClient, payload: bytes = PAYLOAD, budget_s: float = 2.0
) -> UploadResult:
    return await client.upload_snapshot(payload, budget=Budget(budget_s))


# --- delivered -------------------------------------------------------------------------------


async def test_delivered_sends_exactly_the_contract(
    coder: FakeCoder, session: aiohttp.ClientSession
) -> None:
    """A 204 is DELIVERED, and the server saw the exact path, one query pair, headers and bytes."""
    client = make_client(coder.url, session)
    assert client.snapshot_url() == coder.snapshot_url(TASK)

    result = await upload(client)

    assert result.outcome is UploadOutcome.DELIVERED
    assert result.delivered
    assert (result.status, result.attempts) == (204, 1)
    assert "204" in result.detail
    [request] = coder.uploads
    assert request.method == "POST"
    assert request.path == ROUTE
    assert request.query == [("format", "agentapi")]
    assert request.content_type == "application/json"
    assert request.token_sent
    assert request.token_matched
    assert request.body == PAYLOAD
    assert request.status == 204
    assert coder.snapshots == {TASK: SNAPSHOT}
    assert coder.invalid_snapshots == []


async def test_payload_of_exactly_the_limit_is_delivered(
    coder: FakeCoder, session: aiohttp.ClientSession
) -> None:
    """65,536 bytes is allowed: the local refusal and the server agree on the boundary."""
    filler = 65_536 - len(dump_compact({"messages": [{**SNAPSHOT["messages"][0], "content": ""}]}))
    body = {"messages": [{**SNAPSHOT["messages"][0], "content": "x" * filler}]}
    payload = dump_compact(body)
    assert len(payload) == 65_536

    result = await upload(make_client(coder.url, session), payload)

    assert result.outcome is UploadOutcome.DELIVERED
    assert coder.uploads[0].body == payload


async def test_later_upload_replaces_the_snapshot(
    coder: FakeCoder, session: aiohttp.ClientSession
) -> None:
    """Each 204 replaces the task's stored snapshot, as uploads while running do."""
    client = make_client(coder.url, session)
    newer = {"messages": SNAPSHOT["messages"][1:]}

    assert (await upload(client)).delivered
    assert (await upload(client, dump_compact(newer))).delivered

    assert coder.snapshots == {TASK: newer}


# --- 400 -------------------------------------------------------------------------------------


async def test_oversize_payload_is_refused_locally(
    coder: FakeCoder, session: aiohttp.ClientSession
) -> None:
    """A body over 65,536 bytes is BAD_REQUEST without any request being sent."""
    result = await upload(make_client(coder.url, session), b"x" * 65_537)

    assert result.outcome is UploadOutcome.BAD_REQUEST
    assert (result.status, result.attempts, result.url) == (None, 0, None)
    assert "65,537 bytes" in result.detail
    assert "not sent" in result.detail
    assert coder.uploads == []


async def test_invalid_json_gets_the_servers_400(
    coder: FakeCoder, session: aiohttp.ClientSession
) -> None:
    """Invalid JSON is refused by the server with 400, reported once and not retried."""
    result = await upload(make_client(coder.url, session), b'{"messages": [')

    assert result.outcome is UploadOutcome.BAD_REQUEST
    assert (result.status, result.attempts) == (400, 1)
    assert "malformed" in result.detail
    assert "valid JSON" in result.detail  # the server's own message, quoted
    assert len(coder.uploads) == 1
    assert coder.snapshots == {}


# --- 401 -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "stop_build_finished"),
    [pytest.param("wrong-token", False, id="bad-token"), pytest.param(TOKEN, True, id="late")],
)
async def test_unauthorized_explains_the_stop_build_window(
    coder: FakeCoder, session: aiohttp.ClientSession, token: str, stop_build_finished: bool
) -> None:
    """401 (wrong token, or the stop build is over) says the token only works during the build."""
    coder.behaviour.stop_build_finished = stop_build_finished

    result = await upload(make_client(coder.url, session, token=token))

    assert result.outcome is UploadOutcome.UNAUTHORIZED
    assert (result.status, result.attempts) == (401, 1)
    assert "only honoured while the stop build runs: upload earlier" in result.detail
    assert coder.snapshots == {}


# --- 404 x2 ----------------------------------------------------------------------------------


async def test_missing_route_and_unknown_task_are_told_apart(
    coder: FakeCoder, session: aiohttp.ClientSession
) -> None:
    """Plain-text 404 is ROUTE_MISSING, JSON 404 is TASK_NOT_FOUND, with different advice."""
    unknown = str(uuid.uuid4())
    task_result = await upload(make_client(coder.url, session, task_id=unknown))
    coder.behaviour.route_exists = False
    route_result = await upload(make_client(coder.url, session))

    assert task_result.outcome is UploadOutcome.TASK_NOT_FOUND
    assert route_result.outcome is UploadOutcome.ROUTE_MISSING
    assert task_result.status == route_result.status == 404
    assert task_result.attempts == route_result.attempts == 1
    assert unknown in task_result.detail
    assert "another workspace" in task_result.detail
    assert "2.37" in route_result.detail
    assert "2.37" not in task_result.detail
    assert [u.status for u in coder.uploads] == [404, 404]


async def test_deleted_task_is_not_found(coder: FakeCoder, session: aiohttp.ClientSession) -> None:
    """A task that existed and was deleted answers a JSON 404."""
    client = make_client(coder.url, session)
    assert (await upload(client)).delivered
    coder.task_ids.clear()

    result = await upload(client)

    assert result.outcome is UploadOutcome.TASK_NOT_FOUND


async def test_coderd_json_route_not_found_counts_as_missing_route(
    session: aiohttp.ClientSession,
) -> None:
    """coderd's generic API 404 (JSON "Route not found.") means the route, not the task."""

    async def not_found(request: web.Request) -> web.Response:
        return web.json_response({"message": "Route not found."}, status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", not_found)
    async with TestServer(app, host="127.0.0.1") as server:
        result = await upload(make_client(str(server.make_url("")), session))

    assert result.outcome is UploadOutcome.ROUTE_MISSING


# --- retries ---------------------------------------------------------------------------------


async def test_two_503s_then_delivered_after_three_attempts(
    coder: FakeCoder, session: aiohttp.ClientSession
) -> None:
    """5xx is retried with a short backoff; the third attempt is stored and reported."""
    coder.behaviour.script = [503, 503, 204]

    with structlog.testing.capture_logs() as logs:
        result = await upload(make_client(coder.url, session))

    assert result.outcome is UploadOutcome.DELIVERED
    assert result.attempts == 3
    assert [u.status for u in coder.uploads] == [503, 503, 204]
    assert all(u.body == PAYLOAD for u in coder.uploads)
    assert coder.snapshots == {TASK: SNAPSHOT}
    retries = [e for e in logs if e["event"] == "coder.upload_retry"]
    assert [(e["attempt"], e["status"]) for e in retries] == [(1, 503), (2, 503)]
    [done] = [e for e in logs if e["event"] == "coder.upload_done"]
    assert done["outcome"] == "delivered"
    assert (done["status"], done["attempts"], done["bytes"]) == (204, 3, len(PAYLOAD))
    assert isinstance(done["ms"], int)


async def test_always_500_is_server_error_within_budget(
    coder: FakeCoder, session: aiohttp.ClientSession
) -> None:
    """A server that keeps failing is SERVER_ERROR once the budget is spent, not later."""
    coder.behaviour.script = [500] * 1000
    started = time.monotonic()

    result = await upload(make_client(coder.url, session), budget_s=0.6)

    elapsed = time.monotonic() - started
    assert result.outcome is UploadOutcome.SERVER_ERROR
    assert result.status == 500
    assert result.attempts >= 2
    assert result.attempts == len(coder.uploads)
    assert "500" in result.detail
    assert elapsed < 0.6 + 0.3


async def test_connection_reset_is_transport_error_and_retried(
    coder: FakeCoder, session: aiohttp.ClientSession
) -> None:
    """A reset connection is retried, then reported as TRANSPORT_ERROR when the budget ends."""
    coder.behaviour.reset = True
    started = time.monotonic()

    result = await upload(make_client(coder.url, session), budget_s=0.5)

    assert result.outcome is UploadOutcome.TRANSPORT_ERROR
    assert result.status is None
    assert result.attempts >= 2
    assert len(coder.uploads) == result.attempts
    assert all(u.status is None for u in coder.uploads)
    assert time.monotonic() - started < 0.5 + 0.3


async def test_connection_refused_is_transport_error_within_budget(
    session: aiohttp.ClientSession,
) -> None:
    """Nothing listening: retried until the budget ends, then TRANSPORT_ERROR with advice."""
    with free_port_nobody_listens_on() as sock:
        host, port = sock.getsockname()
        started = time.monotonic()
        result = await upload(make_client(f"http://{host}:{port}", session), budget_s=0.5)
        elapsed = time.monotonic() - started

    assert result.outcome is UploadOutcome.TRANSPORT_ERROR
    assert result.attempts >= 2
    assert "CODER_AGENT_URL" in result.detail
    # In words, and about the connection: aiohttp's "ssl:default" read like a TLS problem
    # on an http URL.
    assert f"cannot connect to {host}:{port}: Connection refused" in result.detail
    assert "ssl" not in result.detail
    assert elapsed < 0.5 + 0.3


async def test_hung_server_times_out_on_budget(
    coder: FakeCoder, session: aiohttp.ClientSession
) -> None:
    """A server that never answers costs the budget and no more: TIMED_OUT promptly."""
    coder.behaviour.hang = True
    started = time.monotonic()

    result = await upload(make_client(coder.url, session), budget_s=0.5)

    elapsed = time.monotonic() - started
    assert result.outcome is UploadOutcome.TIMED_OUT
    assert result.status is None
    assert result.attempts == 1
    assert len(coder.uploads) == 1
    assert elapsed < 0.5 + 0.3


async def test_caller_cancellation_propagates(
    coder: FakeCoder, session: aiohttp.ClientSession
) -> None:
    """Cancelling the caller cancels the upload; it is never swallowed into a result."""
    coder.behaviour.hang = True

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(upload(make_client(coder.url, session), budget_s=5.0), 0.2)


async def test_slow_server_within_budget_is_delivered(
    coder: FakeCoder, session: aiohttp.ClientSession
) -> None:
    """A delay shorter than the budget is just a slow success."""
    coder.behaviour.delay_s = 0.1

    result = await upload(make_client(coder.url, session), budget_s=2.0)

    assert result.outcome is UploadOutcome.DELIVERED


async def test_spent_budget_sends_nothing(coder: FakeCoder, session: aiohttp.ClientSession) -> None:
    """With no time left the upload is not attempted and says so."""
    result = await make_client(coder.url, session).upload_snapshot(PAYLOAD, budget=Budget(0))

    assert result.outcome is UploadOutcome.TIMED_OUT
    assert result.attempts == 0
    assert coder.uploads == []


# --- redirects -------------------------------------------------------------------------------


async def test_redirect_is_refused_and_the_target_gets_nothing(
    session: aiohttp.ClientSession,
) -> None:
    """A 307 is not followed, so the token never reaches the redirect target."""
    async with (
        FakeCoder(token=TOKEN, task_ids={TASK}) as target,
        FakeCoder(token=TOKEN, task_ids={TASK}, redirect_to=target.url) as moved,
    ):
        result = await upload(make_client(moved.url, session))

        assert result.outcome is UploadOutcome.REDIRECT_REFUSED
        assert (result.status, result.attempts) == (307, 1)
        assert target.url in result.detail
        assert len(moved.uploads) == 1
        assert target.uploads == []


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "task_id",
    [
        "",
        "not-a-uuid",
        "../../users/me",
        f"{TASK}/../x",
        f"{{{TASK}}}",
        f"urn:uuid:{TASK}",
        TASK.replace("-", ""),
        f" {TASK}",
    ],
)
async def test_bad_task_id_is_a_config_error_before_any_request(
    coder: FakeCoder, session: aiohttp.ClientSession, task_id: str
) -> None:
    """Only a canonical UUID may go into the URL; anything else fails at construction."""
    with pytest.raises(ConfigError, match="task id"):
        make_client(coder.url, session, task_id=task_id)
    assert coder.uploads == []


async def test_uppercase_task_id_is_canonicalised(
    coder: FakeCoder, session: aiohttp.ClientSession
) -> None:
    """An upper-case UUID is the same task; the URL carries the canonical lower-case form."""
    client = make_client(coder.url, session, task_id=TASK.upper())

    assert (await upload(client)).delivered
    assert coder.uploads[0].path == ROUTE


@pytest.mark.parametrize(
    "base_url", ["ftp://coder.example", "coder.example", "http://h/?q=1", "http://h/#f"]
)
async def test_bad_base_url_is_a_config_error(
    session: aiohttp.ClientSession, base_url: str
) -> None:
    """The base URL must be plain http(s) with a host and no query or fragment."""
    with pytest.raises(ConfigError, match="Coder URL"):
        make_client(base_url, session)


@pytest.mark.parametrize("token", ["", "two words", "line\r\nInjected: 1"])
async def test_unusable_token_is_a_config_error_without_echoing_it(
    session: aiohttp.ClientSession, token: str
) -> None:
    """A token a header cannot carry is refused, and the message does not repeat it."""
    with pytest.raises(ConfigError) as caught:
        make_client("http://127.0.0.1:1", session, token=token)
    assert "CODER_AGENT_TOKEN" in str(caught.value)
    if token:
        assert token not in str(caught.value)


# --- token hygiene ---------------------------------------------------------------------------


async def test_token_never_appears_in_details_repr_or_logs(session: aiohttp.ClientSession) -> None:
    """A peer that echoes the token back (body, Location) still cannot get it into our output."""

    async def echo(request: web.Request) -> web.Response:
        sent = request.headers.get("Coder-Session-Token", "")
        if "redirect" in request.path:
            return web.Response(status=302, headers={"Location": f"http://127.0.0.1/{sent}"})
        if "unauthorized" in request.path:
            return web.json_response({"message": "bad", "detail": sent}, status=401)
        # Padded so that the token straddles the 256-character cap on details.
        return web.Response(status=500, text="token was " + "." * 230 + sent)

    results: list[UploadResult] = []
    reprs: list[str] = []
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    with structlog.testing.capture_logs() as logs:
        async with TestServer(app, host="127.0.0.1") as server:
            base = str(server.make_url("")).rstrip("/")
            for prefix in ("/redirect", "/unauthorized", "/error"):
                client = make_client(base + prefix, session)
                reprs.append(repr(client))
                results.append(await upload(client, budget_s=0.3))
        async with FakeCoder(token=TOKEN, task_ids={TASK}) as fake:
            client = make_client(fake.url, session)
            reprs.append(repr(client))
            results.append(await upload(client))
            fake.behaviour.reset = True
            results.append(await upload(client, budget_s=0.2))
        with free_port_nobody_listens_on() as sock:
            host, port = sock.getsockname()
            results.append(
                await upload(make_client(f"http://{host}:{port}", session), budget_s=0.2)
            )

    outcomes = [r.outcome for r in results]
    assert outcomes == [
        UploadOutcome.REDIRECT_REFUSED,
        UploadOutcome.UNAUTHORIZED,
        UploadOutcome.SERVER_ERROR,
        UploadOutcome.DELIVERED,
        UploadOutcome.TRANSPORT_ERROR,
        UploadOutcome.TRANSPORT_ERROR,
    ]
    # The echo really happened: the scrubbed marker stands where the token would have been.
    assert "[redacted]" in results[0].detail
    assert "[redacted]" in results[1].detail
    assert "[redacted]" in results[2].detail
    everything = [*reprs, *(repr(r) for r in results), *(repr(e) for e in logs)]
    assert len(logs) >= len(results)
    for text in everything:
        assert TOKEN[:16] not in text  # not even a cut-off piece of it


async def test_url_with_credentials_is_shown_without_them(
    coder: FakeCoder, session: aiohttp.ClientSession
) -> None:
    """User info in the base URL never reaches the result's URL or the client's repr."""
    base = coder.url.replace("http://", "http://user:secret-pass@")
    client = make_client(base, session)

    result = await upload(client)

    assert "secret-pass" not in repr(client)
    assert result.url is not None
    assert "secret-pass" not in result.url


# --- raise_for_result ------------------------------------------------------------------------


async def test_raise_for_result_raises_coder_api_error(
    coder: FakeCoder, session: aiohttp.ClientSession
) -> None:
    """Exception-style callers get CoderAPIError with status, URL and the same detail."""
    coder.behaviour.stop_build_finished = True
    result = await upload(make_client(coder.url, session))

    with pytest.raises(CoderAPIError) as caught:
        raise_for_result(result)

    assert caught.value.status == 401
    assert caught.value.url == coder.snapshot_url(TASK)
    assert str(caught.value) == result.detail
    assert TOKEN not in str(caught.value)


async def test_raise_for_result_passes_a_delivery(
    coder: FakeCoder, session: aiohttp.ClientSession
) -> None:
    """A delivered result raises nothing."""
    raise_for_result(await upload(make_client(coder.url, session)))


def test_skipped_result_is_not_delivered() -> None:
    """A skipped upload is a valid outcome but not a delivery; it raises for strict callers."""
    result = UploadResult.skipped(detail="no task id configured")

    assert result.outcome is UploadOutcome.SKIPPED
    assert not result.delivered
    with pytest.raises(CoderAPIError, match="no task id"):
        raise_for_result(result)


async def test_an_upload_cut_while_retrying_keeps_its_reason(
    session: aiohttp.ClientSession,
) -> None:
    """The stop's deadline cancels an upload between retries of a resetting server: the
    client keeps the reason so far (transport_error, the attempts made), so that the stop's
    summary names it instead of a bare "cut"."""
    async with FakeCoder(token=TOKEN, task_ids={TASK}, reset=True) as fake:
        client = make_client(fake.url, session)
        task = asyncio.create_task(upload(client, budget_s=10.0))
        while len(fake.uploads) < 2:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert client.interrupted is not None
    assert client.interrupted.outcome is UploadOutcome.TRANSPORT_ERROR
    assert "could not reach the Coder server" in client.interrupted.detail
    assert client.interrupted.attempts >= 2
