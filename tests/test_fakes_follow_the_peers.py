"""The test doubles held to the real peers, side by side.

Most tests drive the product against loopback fakes (``agentapi_persist.testing``), so a fake
that drifts from the real peer makes them prove our reading of it instead of the product.
These tests judge the fakes, not the product (docs/RELIABILITY.md counts none of them): each
AgentAPI behaviour the suite relies on is asked of the real binary (the newest version
installed by ``scripts/install-agentapi``) and of the fake, the same request for both, and
both must answer the same. The Coder server has no binary that can run here; its fake is
held to coderd's source, cited per case.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from pydantic import SecretStr

from agentapi_persist.budget import Budget
from agentapi_persist.coder import CoderClient, UploadResult
from agentapi_persist.config import CoderTarget
from agentapi_persist.models import dump_compact
from agentapi_persist.testing.agentapi_program import (
    run_fake_agentapi_process,
    write_agentapi_script,
)
from agentapi_persist.testing.coder import FakeCoder, InvalidSnapshot
from agentapi_persist.testing.server import free_port

from .real_agentapi import VERSIONS, binary, real_agentapi

#: The real version the fake models (its default in these tests).
REAL = VERSIONS[0]
PEERS = ("real", "fake")


@dataclass(frozen=True)
class Peer:
    kind: str
    port: int
    program: Path
    pid: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@asynccontextmanager
async def agentapi(kind: str, root: Path, env: dict[str, str]) -> AsyncIterator[Peer]:
    """The real AgentAPI (around the scripted terminal agent) or the fake, as a process,
    answering on a port of its own with ``env`` (AgentAPI's variables)."""
    if kind == "real":
        async with real_agentapi(REAL, root / "real", env=env) as real:
            yield Peer(kind, real.port, real.program, real.pid)
        return
    script = write_agentapi_script(root / "fake-bin", version=REAL)
    port = free_port()
    async with run_fake_agentapi_process(script, port=port, env=env) as process:
        yield Peer(kind, port, script, process.pid)


async def messages(peer: Peer, session: aiohttp.ClientSession) -> list[dict[str, object]]:
    async with session.get(peer.url + "/messages") as response:
        assert response.status == 200
        body = await response.json()
    return list(body["messages"])


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as opened:
        yield opened


# -- AgentAPI: the real binary and the fake, the same question to both -------------------------


@pytest.mark.parametrize("kind", PEERS)
def test_version_line(kind: str, tmp_path: Path) -> None:
    """``agentapi --version`` prints one line, ``agentapi version X.Y.Z``, which the product
    parses to decide whether SIGUSR1 saves (0.12.0 and later)."""
    program = binary(REAL) if kind == "real" else write_agentapi_script(tmp_path, version=REAL)
    done = subprocess.run([str(program), "--version"], capture_output=True, text=True, timeout=10)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"agentapi version \d+\.\d+\.\d+\n", done.stdout), done.stdout
    assert REAL in done.stdout


@pytest.mark.parametrize("kind", PEERS)
@pytest.mark.parametrize(
    ("host", "expected"),
    [("localhost:1", 200), ("127.0.0.1", 200), ("evil.example", 400), ("0.0.0.0", 400)],
)
async def test_host_check(
    kind: str, host: str, expected: int, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A foreign Host header is refused with 400 (AgentAPI's DNS-rebinding guard), a local one
    served: the product's client must send a Host AgentAPI accepts."""
    async with (
        agentapi(kind, tmp_path, {}) as peer,
        session.get(peer.url + "/status", headers={"Host": host}) as response,
    ):
        assert response.status == expected, (kind, await response.text())


@pytest.mark.parametrize("kind", PEERS)
async def test_a_state_file_that_fails_to_load_starts_empty_and_is_left_alone(
    kind: str, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A state file that does not load: the conversation starts without it, and the file's
    bytes stay where they are until AgentAPI's next save (the product keeps them aside)."""
    corrupt = tmp_path / "corrupt.json"
    data = b'{"version":1,"messages":[{"id":0,'
    corrupt.write_bytes(data)
    env = {"AGENTAPI_STATE_FILE": str(corrupt)}
    async with agentapi(kind, tmp_path, env) as peer:
        shown = await messages(peer, session)
        assert all(m["role"] == "agent" for m in shown), shown  # no loaded user turn
        assert corrupt.read_bytes() == data


@pytest.mark.parametrize("kind", PEERS)
async def test_a_valid_state_file_is_loaded(
    kind: str, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A valid state file (with its prompt marked sent) is loaded: ``GET /messages`` shows
    its messages, ids and text as saved, which is what ``restore`` relies on."""
    state = tmp_path / "agentapi-state.json"
    saved = [
        {"id": 0, "message": "Welcome", "role": "agent", "time": "2025-01-02T03:04:05Z"},
        {"id": 1, "message": "build it", "role": "user", "time": "2025-01-02T03:04:06Z"},
        {"id": 2, "message": "done: built", "role": "agent", "time": "2025-01-02T03:04:07Z"},
    ]
    state.write_text(
        json.dumps(
            {
                "version": 1,
                "messages": saved,
                "initial_prompt": "build it",
                "initial_prompt_sent": True,
            }
        )
    )
    before = state.read_bytes()
    shown: list[dict[str, object]] = []
    async with agentapi(kind, tmp_path, {"AGENTAPI_STATE_FILE": str(state)}) as peer:
        for _ in range(100):  # the real one loads once its agent is ready
            shown = await messages(peer, session)
            if len(shown) >= len(saved):
                break
            await _pause()
        # Stopped with nothing changed since the load: no save, the file stays byte for byte
        # (the product's file-version record relies on it).
        os.kill(peer.pid, signal.SIGTERM)
        for _ in range(100):
            if not _alive(peer.pid):
                break
            await _pause()
    assert state.read_bytes() == before
    assert [(m["id"], m["role"], m["content"]) for m in shown[: len(saved)]] == [
        (m["id"], m["role"], m["message"]) for m in saved
    ], shown


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"


async def _pause() -> None:
    await asyncio.sleep(0.1)


# -- the Coder server: no binary here, so the fake is held to coderd's source ------------------

TOKEN = "fake-peer-test-token"
TASK = "0b6f3c1e-4a2d-4f5b-9c8e-1d2e3f4a5b6c"
ROUTE = f"/api/v2/workspaceagents/me/tasks/{TASK}/log-snapshot"
PAYLOAD = dump_compact(
    {"messages": [{"id": 0, "content": "fix it", "role": "user", "time": "2025-01-02T03:04:05Z"}]}
)


@pytest.fixture
async def coder() -> AsyncIterator[FakeCoder]:
    async with FakeCoder(token=TOKEN, task_ids={TASK}) as fake:
        yield fake


async def upload(base_url: str, session: aiohttp.ClientSession, payload: bytes) -> UploadResult:
    target = CoderTarget(base_url=base_url, token=SecretStr(TOKEN), task_id=TASK)
    return await CoderClient(target, session=session).upload_snapshot(payload, budget=Budget(2))


@pytest.mark.parametrize(
    ("path", "headers", "body", "status", "json_body"),
    [
        pytest.param(ROUTE + "?format=agentapi", {}, PAYLOAD, 401, True, id="no-token"),
        pytest.param(
            "/api/v2/workspaceagents/me/tasks/nope/log-snapshot?format=agentapi",
            {"Coder-Session-Token": TOKEN},
            PAYLOAD,
            400,
            True,
            id="task-not-uuid",
        ),
        pytest.param(
            ROUTE + "?format=agentapi&x=1",
            {"Coder-Session-Token": TOKEN},
            PAYLOAD,
            400,
            True,
            id="extra-query",
        ),
        pytest.param(
            ROUTE + "?format=json", {"Coder-Session-Token": TOKEN}, PAYLOAD, 400, True, id="query"
        ),
        pytest.param(ROUTE, {"Coder-Session-Token": TOKEN}, PAYLOAD, 400, True, id="no-query"),
        pytest.param(
            ROUTE + "?format=agentapi",
            {"Coder-Session-Token": TOKEN},
            b'{"messages": {}}',
            400,
            True,
            id="wrong-shape",
        ),
        pytest.param(
            ROUTE + "?format=agentapi",
            {"Coder-Session-Token": TOKEN},
            b"x" * 70_000,
            400,
            True,
            id="oversize",
        ),
        pytest.param(
            "/api/v2/other?format=agentapi",
            {"Coder-Session-Token": TOKEN},
            PAYLOAD,
            404,
            True,
            id="other-path",
        ),
    ],
)
async def test_coder_fake_follows_coderd(
    coder: FakeCoder,
    session: aiohttp.ClientSession,
    path: str,
    headers: dict[str, str],
    body: bytes,
    status: int,
    json_body: bool,
) -> None:
    """FakeCoder answers malformed requests as coderd does (coderd/aitasks.go,
    ``postWorkspaceAgentTaskLogSnapshot``: a task id that is not a UUID, a missing, other or
    extra query parameter, a body that does not decode or lacks ``messages``, or one over its
    64 KiB ``MaxBytesReader`` are 400; no token 401; any other path the router's 404)."""
    async with session.post(coder.url + path, data=body, headers=headers) as response:
        text = await response.text()
        content_type = response.content_type

    assert response.status == status
    assert (content_type == "application/json") is json_body
    if status == 404:
        assert json.loads(text) == {"message": "Route not found."}  # httpapi.RouteNotFound
    assert coder.snapshots == {}
    assert [u.status for u in coder.uploads] == [status]


async def test_coder_fake_flags_bad_roles_and_refuses_bad_times_as_coderd_does(
    coder: FakeCoder, session: aiohttp.ClientSession
) -> None:
    """Like coderd, a bad role is stored (204) and listed as invalid; a time without an
    offset fails Go's time decoding, so the whole body is a 400."""
    bad_role = {
        "messages": [{"id": 0, "content": "a", "role": "system", "time": "2025-01-02T03:04:05Z"}]
    }
    bad_time = {
        "messages": [{"id": 1, "content": "b", "role": "agent", "time": "2025-01-02T03:04:05"}]
    }

    stored = await upload(coder.url, session, dump_compact(bad_role))
    refused = await upload(coder.url, session, dump_compact(bad_time))

    assert stored.delivered
    assert not refused.delivered
    assert [u.status for u in coder.uploads] == [204, 400]
    assert coder.invalid_snapshots == [InvalidSnapshot(TASK, 0, "role 'system'")]
