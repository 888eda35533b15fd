"""The whole product against misbehaving peers on loopback.

Each AgentAPI misbehaviour starts from a good stored copy and runs the shutdown sequence twice:
in-process (``run_sequence``) and as the real ``agentapi-persist shutdown`` process. Afterwards
the stored copy is still the good one or a valid superset (never replaced by malformed data), the
exit code is right and the summary says why the live copy was not used. Each Coder misbehaviour
runs in-process, through ``shutdown`` and through the ``run`` sidecar stopped by SIGTERM: the
process exits inside its grace period, the state is durable, and the snapshot is delivered or
reported as not delivered with the reason. The sidecar also follows event streams that carry
malformed events, bodies that are malformed or 100 MB, and a stream that stalls. In every
scenario the canary token is searched for in stdout, stderr, logs and every file left behind.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog
from pydantic import SecretStr

from agentapi_persist._http import make_session
from agentapi_persist.coder import CoderClient
from agentapi_persist.config import CoderTarget
from agentapi_persist.errors import ConfigError, ExitCode
from agentapi_persist.models import Conversation
from agentapi_persist.store import StateStore
from agentapi_persist.testing.agentapi import FakeAgentAPI
from agentapi_persist.testing.coder import FakeCoder

from . import evidence
from .cli_support import ExitClock, cli_timed
from .conftest import CANARY_TOKEN, TASK_ID, TIME, Workspace, coder_env, make_messages
from .peers_support import (
    GOOD_MESSAGES,
    MIN_MARGIN_S,
    StallingAgentAPI,
    assert_good_or_superset,
    assert_token_nowhere,
    dead_url,
    messages_body,
    run_sequence_for,
    seed_good_copy,
)
from .sidecar_support import Sidecar, eventually, sidecar_process, stored_count

pytestmark = pytest.mark.faults

MiB = 2**20
#: AgentAPI's conversation in every AgentAPI scenario: the good copy plus two new messages.
LIVE = make_messages(GOOD_MESSAGES + 2)


# -- AgentAPI misbehaving ----------------------------------------------------------------------


def _body_with_raw_bytes_in_last_message() -> bytes:
    """LIVE as JSON, with bytes that are not UTF-8 in the newest message's content."""
    body = messages_body(LIVE)
    marker = LIVE[-1].content.encode()
    return body.replace(marker, marker[:10] + b"\xff\xfe\xc3(" + marker[10:], 1)


def _body_with_lone_surrogate_in_last_message() -> bytes:
    body = messages_body(LIVE)
    marker = LIVE[-1].content.encode()
    return body.replace(marker, marker[:10] + b"\\ud800 and \\udfff" + marker[10:], 1)


def _body_with_raw_bytes_in_an_old_message() -> bytes:
    body = messages_body(LIVE)
    marker = LIVE[3].content.encode()
    return body.replace(marker, marker[:10] + b"\xff" + marker[10:], 1)


def _wire(**overrides: Any) -> bytes:
    """LIVE's body with one field of message 5 replaced (wrong types and values)."""
    wire = [{"id": m.id, "content": m.content, "role": m.role, "time": m.time} for m in LIVE]
    wire[5].update(overrides)
    return json.dumps({"messages": wire}).encode()


def _gapped() -> bytes:
    """LIVE's body with ids that skip two after message 5, as ACP mode numbers them after a
    failed prompt (the real v0.12.2 does): the same conversation, renumbered."""
    wire = [
        {"id": m.id + (2 if m.id > 5 else 0), "content": m.content, "role": m.role, "time": m.time}
        for m in LIVE
    ]
    return json.dumps({"messages": wire}).encode()


def _ids(ids: list[int]) -> bytes:
    wire = [{"id": i, "content": f"m{i}", "role": "user", "time": TIME} for i in ids]
    return json.dumps({"messages": wire}).encode()


@dataclass(frozen=True)
class AgentCase:
    """One way AgentAPI misbehaves, and what the sequence must make of it."""

    id: str
    kind: str = "fake"  # "fake": FakeAgentAPI holding LIVE; "down"; "stalling"
    knobs: dict[str, Any] = field(default_factory=dict)
    fetch: str = "sidecar"
    """The copy the sequence must use: "sidecar" (the good one) or "live" (LIVE, a superset)."""
    says: str = ""
    """Words the result must carry about AgentAPI (notes in-process, the summary line in a CLI)."""
    flags: dict[str, Any] = field(default_factory=dict)
    check: Callable[[Conversation], None] | None = None


def _replacement_in_last(conversation: Conversation) -> None:
    assert "\ufffd" in conversation.messages[-1].content


AGENT_CASES = [
    AgentCase("down", kind="down", says="refused the connection"),
    AgentCase("slow-within-its-slice", knobs={"delay_s": 0.3}, fetch="live"),
    AgentCase("slow-past-its-slice", knobs={"delay_s": 30.0}, says="did not answer within"),
    AgentCase("hung", knobs={"hang": True}, says="did not answer within"),
    AgentCase("hung-mid-body", kind="stalling", says="did not answer within"),
    AgentCase("reset", knobs={"reset": True}, says="the connection"),  # reset, or closed
    AgentCase("error-500", knobs={"error_status": 500}, says="answered 500"),
    AgentCase("truncated-body", knobs={"truncate": True}, says="cut its answer short"),
    AgentCase(
        "truncated-json",
        knobs={"messages_body": messages_body(LIVE)[:-9]},
        says="not valid JSON",
    ),
    AgentCase(
        "non-utf8-in-new-message",
        knobs={"messages_body": _body_with_raw_bytes_in_last_message()},
        fetch="live",
        check=_replacement_in_last,
    ),
    AgentCase(
        "lone-surrogates-in-new-message",
        knobs={"messages_body": _body_with_lone_surrogate_in_last_message()},
        fetch="live",
        check=_replacement_in_last,
    ),
    AgentCase(
        "100mb-declared-over-the-cap",
        knobs={"stream_body_bytes": 100 * MiB},
        flags={"max_body_bytes": 16 * MiB},
        says="sent too much",
    ),
    AgentCase(
        "100mb-chunked-over-the-cap",
        knobs={"stream_body_bytes": 100 * MiB, "stream_declares_length": False},
        flags={"max_body_bytes": 16 * MiB},
        says="sent too much",
    ),
    AgentCase("100mb-within-the-default-cap", knobs={"stream_body_bytes": 100 * MiB}),
    AgentCase(
        "deep-nesting",
        knobs={"messages_body": b'{"messages":' + b"[" * 200_000 + b"]" * 200_000 + b"}"},
        says="unusable body",
    ),
    AgentCase(
        "content-not-a-string", knobs={"messages_body": _wire(content=7)}, says="unusable body"
    ),
    AgentCase("role-system", knobs={"messages_body": _wire(role="system")}, says="unusable body"),
    AgentCase("id-a-word", knobs={"messages_body": _wire(id="five")}, says="unusable body"),
    AgentCase("id-a-numeric-string", knobs={"messages_body": _wire(id="5")}, says="unusable body"),
    AgentCase("id-a-float", knobs={"messages_body": _wire(id=5.0)}, says="unusable body"),
    AgentCase("id-negative", knobs={"messages_body": _wire(id=-1)}, says="unusable body"),
    AgentCase(
        "time-without-offset",
        knobs={"messages_body": _wire(time="2025-01-02T03:04:05")},
        says="unusable body",
    ),
    AgentCase(
        "messages-an-object", knobs={"messages_body": b'{"messages":{}}'}, says="unusable body"
    ),
    AgentCase("top-level-null", knobs={"messages_body": b"null"}, says="unusable body"),
    # ACP mode skips ids after a failed prompt (the real v0.12.2 does): kept, renumbered.
    AgentCase("ids-with-gaps", knobs={"messages_body": _gapped()}, fetch="live"),
    AgentCase("ids-repeated", knobs={"messages_body": _ids([0, 1, 1])}, says="do not increase"),
    AgentCase("ids-reordered", knobs={"messages_body": _ids([0, 2, 1])}, says="do not increase"),
]


@asynccontextmanager
async def agentapi_for(case: AgentCase) -> AsyncIterator[tuple[str, FakeAgentAPI | None]]:
    """The AgentAPI of ``case``: its URL, and the fake when there is one."""
    if case.kind == "down":
        with dead_url() as url:
            yield url, None
    elif case.kind == "stalling":
        async with StallingAgentAPI(LIVE) as stalling:
            yield stalling.url, None
    else:
        async with FakeAgentAPI(messages=LIVE) as agent:
            for name, value in case.knobs.items():
                setattr(agent.behaviour, name, value)
            yield agent.url, agent


def check_stored_after(ws: Workspace, good: Conversation, case: AgentCase) -> None:
    stored = assert_good_or_superset(ws, good)
    if case.fetch == "live":
        assert len(stored.messages) == len(LIVE)
    else:
        assert stored.messages == good.messages
    if case.check is not None:
        case.check(stored)


def check_streamed(agent: FakeAgentAPI | None, case: AgentCase) -> None:
    """A 100 MB body over the cap is refused without being read to its end."""
    if agent is not None and "max_body_bytes" in case.flags:
        assert agent.behaviour.bytes_streamed < 100 * MiB


@pytest.mark.parametrize("case", AGENT_CASES, ids=lambda c: c.id)
async def test_agentapi_misbehaving_in_process(
    workspace: Workspace, coder: FakeCoder, case: AgentCase
) -> None:
    """run_sequence keeps the good copy (or a valid superset), delivers, and notes why."""
    evidence.tally("AgentAPI misbehaving", "in_process")
    good = seed_good_copy(workspace)
    budget_s = 3.0
    async with agentapi_for(case) as (url, agent):
        with structlog.testing.capture_logs() as logs:
            started = time.monotonic()
            workspace.env.update(coder_env(coder))
            report = await run_sequence_for(
                workspace, budget_s=budget_s, agentapi_url=url, **case.flags
            )
            elapsed = time.monotonic() - started
        check_streamed(agent, case)
    assert elapsed < budget_s + MIN_MARGIN_S
    assert report.exit_code is ExitCode.OK, report.summary()
    fetch = report.step("fetch")
    assert fetch is not None
    assert fetch.outcome == case.fetch, report.notes
    if case.says:
        assert any(case.says in note for note in report.notes), report.notes
        assert "live messages unavailable" in report.summary()
    check_stored_after(workspace, good, case)
    (upload,) = coder.uploads
    sent = [m["id"] for m in upload.json["messages"]]
    assert sent == list(range(len(LIVE) if case.fetch == "live" else GOOD_MESSAGES))
    assert_token_nowhere(workspace.root, repr(logs), report.summary(), json.dumps(report.as_dict()))


async def test_malformed_old_message_replaces_nothing_silently(
    workspace: Workspace, coder: FakeCoder
) -> None:
    """Bytes that are not UTF-8 inside an old message are read as U+FFFD (as AgentAPI's own
    decoder does): a conversation that now differs from the stored one. It is saved, and the
    good copy it replaces is kept whole in archive/, never lost."""
    evidence.tally("AgentAPI misbehaving", "malformed_old_message")
    good = seed_good_copy(workspace)
    async with FakeAgentAPI(messages=LIVE) as agent:
        agent.behaviour.messages_body = _body_with_raw_bytes_in_an_old_message()
        workspace.env.update(coder_env(coder))
        report = await run_sequence_for(workspace, budget_s=5.0, agentapi_url=agent.url)
    assert report.exit_code is ExitCode.OK, report.summary()
    state = report.step("state")
    assert state is not None
    assert "kept at" in state.detail
    (archived,) = (workspace.state_dir / "archive").iterdir()
    _header, body = archived.read_bytes().split(b"\n", 1)
    assert Conversation.model_validate_json(body).messages == good.messages


@pytest.mark.parametrize("case", AGENT_CASES, ids=lambda c: c.id)
async def test_agentapi_misbehaving_through_the_cli(
    workspace: Workspace, coder: FakeCoder, case: AgentCase
) -> None:
    """`agentapi-persist shutdown` as a process: exit 0 inside --grace, the good copy (or a
    valid superset) on disk, and the summary line says why AgentAPI's answer was not used."""
    evidence.tally("AgentAPI misbehaving", "shutdown_process")
    good = seed_good_copy(workspace)
    grace = 4.0
    args = ["shutdown", "--grace", str(grace)]
    if "max_body_bytes" in case.flags:
        args += ["--max-body-bytes", str(case.flags["max_body_bytes"])]
    async with agentapi_for(case) as (url, agent):
        result = await cli_timed(
            workspace, *args, env={**coder_env(coder), "AGENTAPI_PERSIST_AGENTAPI_URL": url}
        )
        check_streamed(agent, case)
    assert result.seconds < grace
    assert result.code == 0, result.stdout + result.stderr
    assert f"fetch={case.fetch} " in result.stdout
    if case.says:
        assert "live messages unavailable" in result.stdout
        assert case.says in result.stdout
    check_stored_after(workspace, good, case)
    assert len(coder.uploads) == 1
    last = json.loads((workspace.state_dir / "last-shutdown.json").read_text())
    assert last["exit_code"] == 0
    assert_token_nowhere(workspace.root, result.stdout, result.stderr)


# -- Coder misbehaving -------------------------------------------------------------------------


@dataclass(frozen=True)
class CoderCase:
    """One way the Coder server misbehaves, and what must be reported."""

    id: str
    knobs: dict[str, Any] = field(default_factory=dict)
    outcome: str = "delivered"
    says: str = ""
    """Words the snapshot step's detail must carry (the reason a person can act on)."""
    down: bool = False
    redirect: bool = False
    unknown_task: bool = False
    attempts: int | None = 1
    """Requests the server must have received (``None``: at least one, retried)."""

    @property
    def delivered(self) -> bool:
        return self.outcome == "delivered"

    @property
    def code(self) -> int:
        # A server without the route cannot take a snapshot at all (the registry's bash script
        # calls it "not supported by this Coder version" and succeeds): a valid skip.
        return 0 if self.delivered or self.outcome == "route_missing" else 4


CODER_CASES = [
    CoderCase("slow", knobs={"delay_s": 0.4}),
    CoderCase("hung", knobs={"hang": True}, outcome="timed_out", says="did not answer within"),
    CoderCase(
        "resetting",
        knobs={"reset": True},
        outcome="transport_error",
        says="could not reach the Coder server",
        attempts=None,
    ),
    CoderCase("5xx-then-204", knobs={"script": [503, 502]}, attempts=3),
    CoderCase(
        "401-stop-build-finished",
        knobs={"stop_build_finished": True},
        outcome="unauthorized",
        says="stop build already finished",
    ),
    CoderCase(
        "404-route-missing",
        knobs={"route_exists": False},
        outcome="route_missing",
        says="no log-snapshot route",
    ),
    CoderCase(
        "404-task-unknown", unknown_task=True, outcome="task_not_found", says="does not know task"
    ),
    CoderCase(
        "307-redirect",
        redirect=True,
        outcome="redirect_refused",
        says="redirects are not followed",
    ),
    CoderCase(
        "down",
        down=True,
        outcome="transport_error",
        says="could not reach the Coder server",
        attempts=0,
    ),
]


@dataclass
class CoderPeers:
    """The Coder server a case talks to, and where a redirect points (which must stay empty)."""

    server: FakeCoder
    elsewhere: FakeCoder
    env: dict[str, str]


@asynccontextmanager
async def coder_for(case: CoderCase) -> AsyncIterator[CoderPeers]:
    async with AsyncExitStack() as stack:
        elsewhere = await stack.enter_async_context(
            FakeCoder(token=CANARY_TOKEN, task_ids={TASK_ID})
        )
        knobs = dict(case.knobs)
        if case.redirect:
            knobs["redirect_to"] = elsewhere.url
        tasks = () if case.unknown_task else {TASK_ID}
        server = await stack.enter_async_context(
            FakeCoder(token=CANARY_TOKEN, task_ids=tasks, **knobs)
        )
        env = coder_env(server)
        if case.down:
            env["CODER_AGENT_URL"] = stack.enter_context(dead_url())
        yield CoderPeers(server, elsewhere, env)


def check_coder_side(case: CoderCase, peers: CoderPeers, messages: int) -> None:
    uploads = [] if case.down else peers.server.uploads
    if case.attempts is None:
        assert len(uploads) >= 1
    else:
        assert len(uploads) == case.attempts
    if case.delivered:
        stored = peers.server.snapshots[TASK_ID]["messages"]
        assert [m["id"] for m in stored] == list(range(messages))
    else:
        assert peers.server.snapshots == {}
    assert peers.elsewhere.uploads == []  # a redirect never carries the token anywhere


@pytest.mark.parametrize("case", CODER_CASES, ids=lambda c: c.id)
async def test_coder_misbehaving_in_process(workspace: Workspace, case: CoderCase) -> None:
    """run_sequence: durable state, the right outcome and reason, within the budget."""
    evidence.tally("Coder misbehaving", "in_process")
    good = seed_good_copy(workspace)
    budget_s = 1.5
    async with coder_for(case) as peers, FakeAgentAPI(messages=LIVE) as agent:
        with structlog.testing.capture_logs() as logs:
            workspace.env.update(peers.env)
            started = time.monotonic()
            report = await run_sequence_for(workspace, budget_s=budget_s, agentapi_url=agent.url)
            elapsed = time.monotonic() - started
        check_coder_side(case, peers, len(LIVE))
    assert elapsed < budget_s + MIN_MARGIN_S
    assert report.durable
    assert int(report.exit_code) == case.code, report.summary()
    snapshot = report.step("snapshot")
    assert snapshot is not None
    assert snapshot.outcome == case.outcome, report.summary()
    assert case.says in snapshot.detail
    assert len(assert_good_or_superset(workspace, good).messages) == len(LIVE)
    assert_token_nowhere(workspace.root, repr(logs), report.summary(), json.dumps(report.as_dict()))


@pytest.mark.parametrize("case", CODER_CASES, ids=lambda c: c.id)
async def test_coder_misbehaving_through_the_cli(workspace: Workspace, case: CoderCase) -> None:
    """`shutdown --grace 2` as a process: exits inside the grace period with 0 or 4, the
    state durable, and the summary line names the outcome and why."""
    evidence.tally("Coder misbehaving", "shutdown_process")
    good = seed_good_copy(workspace)
    grace = 2.0
    async with coder_for(case) as peers, FakeAgentAPI(messages=LIVE) as agent:
        env = {**peers.env, "AGENTAPI_PERSIST_AGENTAPI_URL": agent.url}
        result = await cli_timed(workspace, "shutdown", "--grace", str(grace), env=env)
        check_coder_side(case, peers, len(LIVE))
    assert result.seconds < grace
    assert result.code == case.code, result.stdout + result.stderr
    assert f"snapshot={case.outcome} " in result.stdout
    assert case.says in result.stdout
    assert f"{len(LIVE)} messages durable" in result.stdout
    assert len(assert_good_or_superset(workspace, good).messages) == len(LIVE)
    record = json.loads((workspace.state_dir / "last-upload.json").read_text())
    assert record["outcome"] == case.outcome
    assert_token_nowhere(workspace.root, result.stdout, result.stderr)


@pytest.mark.parametrize("case", CODER_CASES, ids=lambda c: c.id)
async def test_coder_misbehaving_under_the_sidecar(workspace: Workspace, case: CoderCase) -> None:
    """`run`, then SIGTERM: the sidecar's own sequence exits inside --grace with 0 or 4, the
    durable copy current, the outcome logged; the token is in no log line, file or title."""
    evidence.tally("Coder misbehaving", "under_the_sidecar")
    good = seed_good_copy(workspace)
    grace = 2.0
    async with coder_for(case) as peers, FakeAgentAPI(messages=LIVE) as agent:
        env = {**peers.env, "AGENTAPI_PERSIST_AGENTAPI_URL": agent.url}
        async with sidecar_process(
            workspace, "--grace", str(grace), "--snapshot-interval", "0", env=env
        ) as sidecar:
            await eventually(lambda: stored_count(workspace) == len(LIVE))
            title = Path(f"/proc/{sidecar.proc.pid}/cmdline").read_bytes()
            clock = ExitClock(sidecar.proc.pid)
            started = time.monotonic()
            sidecar.proc.send_signal(signal.SIGTERM)
            code = await sidecar.wait()
            elapsed = clock.since(started)
        check_coder_side(case, peers, len(LIVE))
    assert elapsed < grace
    assert code == case.code, sidecar.other
    (stopped,) = (e for e in sidecar.events if e.get("event") == "shutdown.snapshot")
    assert stopped["outcome"] == case.outcome
    last = json.loads((workspace.state_dir / "last-shutdown.json").read_text())
    (snapshot,) = (s for s in last["steps"] if s["name"] == "snapshot")
    assert case.says in snapshot["detail"]
    assert len(assert_good_or_superset(workspace, good).messages) == len(LIVE)
    assert_token_nowhere(workspace.root, title, json.dumps(sidecar.events), *sidecar.other)


# -- task ids that try to leave the route ------------------------------------------------------

TRAVERSALS = [
    "../../../etc",
    f"{TASK_ID}/../../../../etc/passwd",
    "..%2F..%2Fetc",
    f"{{{TASK_ID}}}",
    f"urn:uuid:{TASK_ID}",
    f"{TASK_ID}?format=json",
    f"{TASK_ID}#x",
    TASK_ID.replace("-", ""),
]


@pytest.mark.parametrize("task_id", TRAVERSALS)
async def test_traversal_task_id_is_refused_before_any_request(
    workspace: Workspace, coder: FakeCoder, task_id: str
) -> None:
    """A task id that is not a canonical UUID never reaches a URL: the client refuses it, the
    stop still saves the state and reports the snapshot as misconfigured (exit 4, naming the
    variable), and the server records nothing."""
    evidence.tally("traversal task ids", "refused")
    target = CoderTarget(base_url=coder.url, token=SecretStr(CANARY_TOKEN), task_id=task_id)
    async with make_session() as session:
        with pytest.raises(ConfigError, match="UUID") as refused:
            CoderClient(target, session=session)
    assert CANARY_TOKEN not in str(refused.value)
    StateStore(workspace.state_dir).save(Conversation(messages=tuple(make_messages(3))))
    env = {**coder_env(coder), "ARG_TASK_ID": task_id}
    result = await cli_timed(workspace, "shutdown", "--grace", "3", env=env)
    assert result.code == 4, result.stdout + result.stderr
    assert "snapshot=misconfigured" in result.stdout
    assert "ARG_TASK_ID" in result.stdout
    assert "3 messages durable" in result.stdout
    assert coder.uploads == []
    assert_token_nowhere(workspace.root, result.stdout, result.stderr)


async def test_traversal_task_id_leaves_the_sidecar_saving(
    workspace: Workspace, coder: FakeCoder
) -> None:
    """`run` with a traversal task id still keeps the state durable; it logs the
    misconfiguration, uploads nothing, and its stop reports the snapshot as not delivered."""
    evidence.tally("traversal task ids", "sidecar_keeps_saving")
    env = {**coder_env(coder), "ARG_TASK_ID": "../../../etc"}
    async with FakeAgentAPI(messages=make_messages(4)) as agent:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agentapi_persist", "run", "--grace", "3",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=workspace.process_env(**env, AGENTAPI_PERSIST_AGENTAPI_URL=agent.url),
        )  # fmt: skip
        assert proc.stderr is not None
        lines: list[bytes] = []
        try:
            async with asyncio.timeout(20):  # until the first checkpoint has written the copy
                while b"daemon.resync_checkpoint" not in (line := await proc.stderr.readline()):
                    assert line, b"".join(lines)
                    lines.append(line)
                lines.append(line)
            proc.send_signal(signal.SIGTERM)
            out, err = await asyncio.wait_for(proc.communicate(), 10)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    logged = b"".join(lines).decode() + err.decode()
    assert proc.returncode == 4, logged
    assert "daemon.snapshot_misconfigured" in logged
    stored = StateStore(workspace.state_dir).load().conversation
    assert stored is not None
    assert len(stored.messages) == 4
    assert coder.uploads == []
    assert_token_nowhere(workspace.root, out.decode(), logged)


# -- the sidecar following a misbehaving AgentAPI -----------------------------------------------


def _event(data: bytes, kind: bytes = b"message_update") -> bytes:
    return b"event: " + kind + b"\ndata: " + data + b"\n\n"


def _update(**fields: Any) -> bytes:
    wire: dict[str, Any] = {"id": 3, "role": "user", "message": "m", "time": TIME, **fields}
    return _event(json.dumps(wire).encode())


#: Events AgentAPI never sends; each must end the stream (then a resync), never reach the disk.
BAD_EVENTS = [
    ("not-json", _event(b"{not json")),
    ("role-system", _update(role="system")),
    ("id-negative", _update(id=-1)),
    ("deep-nesting", _event(b"[" * 100_000 + b"]" * 100_000)),
    ("bad-status", _event(b'{"status":"sleeping"}', b"status_change")),
    ("id-a-string", _update(id="3")),
    ("message-not-a-string", _update(message=7)),
    ("time-without-offset", _update(time="2025-01-02T03:04:05")),
]
#: What GET /messages answers meanwhile, so that each resync fails too, one way or another.
BAD_BODIES: list[dict[str, Any]] = [
    {"messages_body": b'{"messages":[{"id":0,"content":5}]}'},
    {"messages_body": b'{"messages":[{"id":0,"con'},
    {"messages_body": _ids([0, 0])},
    {"messages_body": None, "stream_body_bytes": 100 * MiB},
]


def synced(sidecar: Sidecar) -> int:
    """How many times the sidecar has (re)connected and taken AgentAPI's replay."""
    return sum(e.get("event") == "agentapi.synced" for e in sidecar.events)


async def test_sidecar_survives_malformed_events_and_bodies(workspace: Workspace) -> None:
    """Malformed events end the stream; the resync's /messages is malformed too, or 100 MB.
    The durable copy is never corrupted or shrunk, a healthy stream that breaks is followed
    again within a second, and real changes still reach the disk."""
    evidence.tally("sidecar with a bad stream", "scenarios")
    good = seed_good_copy(workspace)
    async with FakeAgentAPI(messages=good.messages) as agent:
        env = {"AGENTAPI_PERSIST_AGENTAPI_URL": agent.url}
        async with sidecar_process(workspace, "--max-body-bytes", str(1 * MiB), env=env) as sidecar:
            await eventually(lambda: synced(sidecar) >= 1)
            # A burst of failures: the reconnect backoff grows (0.05 s, 0.1 s, ... 0.8 s).
            for index, (name, raw) in enumerate(BAD_EVENTS):
                for knob, value in BAD_BODIES[index % len(BAD_BODIES)].items():
                    setattr(agent.behaviour, knob, value)
                before = synced(sidecar)
                if index == 5:
                    # Followed for over a second (a lower bound, whatever the machine's load):
                    # a healthy stream.
                    await asyncio.sleep(1.1)
                agent.inject_raw(raw)
                try:
                    await eventually(lambda before=before: synced(sidecar) > before)
                except AssertionError:
                    raise AssertionError(f"no reconnect after the {name} event") from None
                retry = [e["retry_in_s"] for e in sidecar.events if e.get("retry_in_s")]
                if index == 5:
                    assert max(retry) > 0.05, retry  # the burst before had grown the backoff
                    # A fresh failure after a healthy spell does not inherit the old backoff:
                    # the delay the sidecar chose, not a clock, says so.
                    assert retry[-1] == 0.05, retry
                assert_good_or_superset(workspace, good)
            assert agent.behaviour.bytes_streamed < 100 * MiB
            agent.behaviour.stream_body_bytes = None
            agent.behaviour.messages_body = None
            agent.add_message("user", "still followed")
            await eventually(lambda: stored_count(workspace) == GOOD_MESSAGES + 1)
            sidecar.proc.send_signal(signal.SIGTERM)
            assert await sidecar.wait() == 0, sidecar.other
    unavailable = [e for e in sidecar.events if e.get("event") == "agentapi.unavailable"]
    assert len(unavailable) == len(BAD_EVENTS)
    stored = assert_good_or_superset(workspace, good)
    assert stored.messages[-1].content == "still followed"
    assert_token_nowhere(workspace.root, json.dumps(sidecar.events), *sidecar.other)


async def test_sidecar_with_a_stalled_stream_still_saves_everything_at_stop(
    workspace: Workspace, coder: FakeCoder
) -> None:
    """The event stream goes silent without closing while AgentAPI keeps changing: the stop
    takes the last changes from GET /messages, inside the grace period."""
    evidence.tally("sidecar with a bad stream", "scenarios")
    good = seed_good_copy(workspace)
    grace = 3.0
    async with FakeAgentAPI(messages=good.messages) as agent:
        env = {**coder_env(coder), "AGENTAPI_PERSIST_AGENTAPI_URL": agent.url}
        async with sidecar_process(
            workspace, "--grace", str(grace), "--snapshot-interval", "0", env=env
        ) as sidecar:
            await eventually(lambda: sidecar.saw("agentapi.synced"))
            agent.stall_events = True
            agent.add_message("user", "typed while the stream stalled")
            agent.add_message("agent", "answered while the stream stalled")
            clock = ExitClock(sidecar.proc.pid)
            started = time.monotonic()
            sidecar.proc.send_signal(signal.SIGTERM)
            code = await sidecar.wait()
            elapsed = clock.since(started)
    assert elapsed < grace
    assert code == 0, sidecar.other
    stored = assert_good_or_superset(workspace, good)
    assert stored.messages[-1].content == "answered while the stream stalled"
    assert [m["id"] for m in coder.uploads[-1].json["messages"]] == list(range(GOOD_MESSAGES + 2))


@pytest.mark.parametrize("kind", ["hung-and-stalled", "stalled-mid-event-and-mid-body"])
async def test_sidecar_with_a_wedged_agentapi_stops_in_time(
    workspace: Workspace, coder: FakeCoder, kind: str
) -> None:
    """AgentAPI wedged (stream silent, /messages never finishing): SIGTERM still ends in the
    grace period with the durable copy intact, exit 0, and the summary says what happened."""
    evidence.tally("sidecar with a bad stream", "scenarios")
    good = seed_good_copy(workspace)
    grace = 3.0
    async with AsyncExitStack() as stack:
        agent: FakeAgentAPI | None = None
        stalling: StallingAgentAPI | None = None
        if kind == "hung-and-stalled":
            agent = await stack.enter_async_context(FakeAgentAPI(messages=good.messages))
            url = agent.url
        else:
            stalling = await stack.enter_async_context(StallingAgentAPI(LIVE))
            url = stalling.url
        env = {**coder_env(coder), "AGENTAPI_PERSIST_AGENTAPI_URL": url}
        sidecar = await stack.enter_async_context(
            sidecar_process(workspace, "--grace", str(grace), "--snapshot-interval", "0", env=env)
        )
        if agent is not None:
            await eventually(lambda: sidecar.saw("agentapi.synced"))
            agent.stall_events = True
            agent.behaviour.hang = True
        if stalling is not None:
            await eventually(lambda: stalling.stalled >= 1)  # connected, stalled mid-event
        clock = ExitClock(sidecar.proc.pid)
        started = time.monotonic()
        sidecar.proc.send_signal(signal.SIGTERM)
        code = await sidecar.wait()
        elapsed = clock.since(started)
    assert elapsed < grace
    assert code == 0, sidecar.other
    stored = assert_good_or_superset(workspace, good)
    assert stored.messages == good.messages
    last = json.loads((workspace.state_dir / "last-shutdown.json").read_text())
    (fetch,) = (s for s in last["steps"] if s["name"] == "fetch")
    assert fetch["outcome"] == "sidecar"
    assert "did not answer within" in fetch["detail"]
    assert_token_nowhere(workspace.root, json.dumps(sidecar.events), *sidecar.other)


async def test_sigterm_during_a_hung_periodic_upload(workspace: Workspace) -> None:
    """A periodic upload hangs on the Coder server; SIGTERM cuts it, the stop's own upload is
    bounded by the grace period: exit 4 in time, the state durable."""
    evidence.tally("sidecar with a bad stream", "scenarios")
    good = seed_good_copy(workspace)
    grace = 3.0
    async with (
        FakeCoder(token=CANARY_TOKEN, task_ids={TASK_ID}, hang=True) as hung,
        FakeAgentAPI(messages=LIVE) as agent,
    ):
        env = {**coder_env(hung), "AGENTAPI_PERSIST_AGENTAPI_URL": agent.url}
        async with sidecar_process(
            workspace, "--grace", str(grace), "--snapshot-interval", "0.5", env=env
        ) as sidecar:
            await eventually(lambda: len(hung.uploads) >= 1)  # the periodic upload hangs
            clock = ExitClock(sidecar.proc.pid)
            started = time.monotonic()
            sidecar.proc.send_signal(signal.SIGTERM)
            code = await sidecar.wait()
            elapsed = clock.since(started)
    assert elapsed < grace
    assert code == 4, sidecar.other
    assert len(hung.uploads) >= 2
    assert len(assert_good_or_superset(workspace, good).messages) == len(LIVE)
    assert_token_nowhere(workspace.root, json.dumps(sidecar.events), *sidecar.other)


async def test_shutdown_command_via_the_sidecar_with_a_hung_coder(workspace: Workspace) -> None:
    """`shutdown --grace 3` asks a sidecar (started with --grace 30) whose Coder server hangs:
    the command's own grace wins, both exit 4 in time, the state durable."""
    evidence.tally("sidecar with a bad stream", "scenarios")
    good = seed_good_copy(workspace)
    async with (
        FakeCoder(token=CANARY_TOKEN, task_ids={TASK_ID}, hang=True) as hung,
        FakeAgentAPI(messages=LIVE) as agent,
    ):
        env = {**coder_env(hung), "AGENTAPI_PERSIST_AGENTAPI_URL": agent.url}
        async with sidecar_process(
            workspace, "--grace", "30", "--snapshot-interval", "0", env=env
        ) as sidecar:
            await eventually(lambda: stored_count(workspace) == len(LIVE))
            result = await cli_timed(workspace, "shutdown", "--grace", "3", env=env)
            code = await sidecar.wait(timeout=5)
    assert result.seconds < 3.0
    assert result.code == 4, result.stdout + result.stderr
    assert "(via sidecar)" in result.stdout
    assert "snapshot=timed_out" in result.stdout
    # The upload had this stop's grace (3 s) minus its margin, not minus the sidecar's 2 s one.
    given = re.search(r"did not answer within the ([0-9.]+) s budget", result.stdout)
    assert given is not None, result.stdout
    assert float(given[1]) > 1.5
    assert code == 4
    assert len(assert_good_or_superset(workspace, good).messages) == len(LIVE)
    assert_token_nowhere(workspace.root, result.stdout, result.stderr, *sidecar.other)
