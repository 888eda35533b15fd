"""The shutdown sequence in-process, against real loopback peers and a real state directory."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from agentapi_persist.errors import ExitCode
from agentapi_persist.models import Conversation
from agentapi_persist.shutdown import ShutdownReport
from agentapi_persist.store import StateStore
from agentapi_persist.testing.agentapi import FakeAgentAPI
from agentapi_persist.testing.coder import FakeCoder
from agentapi_persist.testing.server import free_port

from .conftest import CANARY_TOKEN, TASK_ID, Workspace, coder_env, make_messages
from .peers_support import MIN_MARGIN_S, run_sequence_for


async def run(
    ws: Workspace,
    *,
    agent_url: str | None,
    coder: FakeCoder | None,
    budget_s: float = 5.0,
    force: asyncio.Event | None = None,
    **flags: object,
) -> ShutdownReport:
    if coder is not None:
        ws.env.update(coder_env(coder))
    if agent_url is not None:
        flags.setdefault("agentapi_url", agent_url)
    return await run_sequence_for(ws, budget_s=budget_s, force=force, **flags)


async def test_forty_messages_last_thirty_uploaded_and_all_durable(
    workspace: Workspace, coder: FakeCoder
) -> None:
    """The happy path: 40 live messages, the last 30 uploaded, all 40 durable, exit 0."""
    async with FakeAgentAPI(messages=make_messages(40)) as agent:
        report = await run(workspace, agent_url=agent.url, coder=coder)
    assert report.exit_code is ExitCode.OK, report.summary()
    assert [s.name for s in report.steps][:2] == ["fetch", "state"]
    assert report.step("fetch").outcome == "live"  # type: ignore[union-attr]
    (upload,) = coder.uploads
    sent = json.loads(upload.body)["messages"]
    assert [m["id"] for m in sent] == list(range(10, 40))
    assert sent[-1]["content"] == make_messages(40)[-1].content
    conversation = workspace.stored()
    assert len(conversation.messages) == 40
    assert "shutdown ok" in report.summary()


async def test_agentapi_down_uses_the_sidecar_copy(workspace: Workspace, coder: FakeCoder) -> None:
    """With AgentAPI gone, the durable copy is the source and the snapshot still goes out."""
    StateStore(workspace.state_dir).save(Conversation(messages=tuple(make_messages(12))))
    dead = f"http://127.0.0.1:{free_port()}"
    report = await run(workspace, agent_url=dead, coder=coder)
    assert report.exit_code is ExitCode.OK, report.summary()
    assert report.step("fetch").outcome == "sidecar"  # type: ignore[union-attr]
    assert len(json.loads(coder.uploads[0].body)["messages"]) == 12
    assert any("live messages unavailable" in n for n in report.notes)


async def test_agentapi_state_file_is_a_source_too(workspace: Workspace, coder: FakeCoder) -> None:
    """Without AgentAPI or a sidecar copy, AgentAPI's own file is saved and uploaded."""
    agent = FakeAgentAPI(
        messages=make_messages(5), initial_prompt="build it", initial_prompt_sent=True
    )
    assert agent.save_state(workspace.state_file, force=True)
    report = await run(workspace, agent_url=f"http://127.0.0.1:{free_port()}", coder=coder)
    assert report.exit_code is ExitCode.OK, report.summary()
    assert report.step("fetch").outcome == "agentapi_state"  # type: ignore[union-attr]
    conversation = workspace.stored()
    assert conversation.initial_prompt == "build it"
    assert conversation.initial_prompt_sent is True


async def test_hung_coder_exits_in_budget_with_state_saved(workspace: Workspace) -> None:
    """A Coder server that never answers costs the budget, not more; the state is durable."""
    async with (
        FakeCoder(token=CANARY_TOKEN, task_ids={TASK_ID}, hang=True) as hung,
        FakeAgentAPI(messages=make_messages(40)) as agent,
    ):
        started = time.monotonic()
        report = await run(workspace, agent_url=agent.url, coder=hung, budget_s=1.0)
        elapsed = time.monotonic() - started
    assert elapsed < 1.0 + MIN_MARGIN_S
    assert report.durable
    assert report.exit_code is ExitCode.SNAPSHOT_FAILED
    assert report.step("snapshot").outcome in ("timed_out", "cut")  # type: ignore[union-attr]
    conversation = workspace.stored()
    assert len(conversation.messages) == 40


async def test_no_task_id_skips_the_snapshot_validly(workspace: Workspace) -> None:
    """An empty task id means no snapshot, which is not a failure."""
    async with FakeAgentAPI(messages=make_messages(3)) as agent:
        report = await run(workspace, agent_url=agent.url, coder=None)
    assert report.exit_code is ExitCode.OK
    assert report.step("snapshot").outcome == "skipped"  # type: ignore[union-attr]


async def test_task_without_token_still_saves_and_says_why(workspace: Workspace) -> None:
    """A half-configured snapshot is reported (exit 4) while the state is still made durable."""
    workspace.env.update({"ARG_TASK_ID": TASK_ID, "CODER_AGENT_URL": "http://127.0.0.1:9"})
    async with FakeAgentAPI(messages=make_messages(3)) as agent:
        report = await run(workspace, agent_url=agent.url, coder=None)
    assert report.durable
    assert report.exit_code is ExitCode.SNAPSHOT_FAILED
    snapshot = report.step("snapshot")
    assert snapshot is not None
    assert snapshot.outcome == "misconfigured"
    assert "CODER_AGENT_TOKEN is missing" in snapshot.detail


async def test_nothing_anywhere_is_nothing_to_save(workspace: Workspace, coder: FakeCoder) -> None:
    """No AgentAPI, no copy, no file: exit 0 and no empty snapshot over a previous one."""
    report = await run(workspace, agent_url=f"http://127.0.0.1:{free_port()}", coder=coder)
    assert report.exit_code is ExitCode.OK
    assert coder.uploads == []
    assert "nothing to save" in report.kept


async def test_live_prefix_never_shrinks_the_copy(workspace: Workspace, coder: FakeCoder) -> None:
    """If AgentAPI reloaded an older state, the longer durable copy is kept and uploaded."""
    StateStore(workspace.state_dir).save(Conversation(messages=tuple(make_messages(20))))
    async with FakeAgentAPI(messages=make_messages(7)) as agent:
        report = await run(workspace, agent_url=agent.url, coder=coder)
    conversation = workspace.stored()
    assert len(conversation.messages) == 20
    assert report.step("fetch").outcome == "sidecar"  # type: ignore[union-attr]
    assert len(json.loads(coder.uploads[0].body)["messages"]) == 20


async def test_diverged_live_conversation_wins_and_the_old_one_is_archived(
    workspace: Workspace, coder: FakeCoder
) -> None:
    """A different, current conversation is saved; the replaced one is kept whole, not lost."""
    StateStore(workspace.state_dir).save(Conversation(messages=tuple(make_messages(20))))
    async with FakeAgentAPI(messages=make_messages(2, prefix="fresh")) as agent:
        report = await run(workspace, agent_url=agent.url, coder=coder)
    assert report.exit_code is ExitCode.OK
    conversation = workspace.stored()
    assert [m.content[:7] for m in conversation.messages] == ["fresh 0", "fresh 1"]
    (archived,) = (workspace.state_dir / "archive").iterdir()
    _header, body = archived.read_bytes().split(b"\n", 1)
    old = Conversation.model_validate_json(body)
    assert len(old.messages) == 20
    assert "kept at" in report.step("state").detail  # type: ignore[union-attr]


async def test_growing_last_message_is_journalled_not_rewritten(
    workspace: Workspace, coder: FakeCoder
) -> None:
    """A second shutdown after the last message grew appends just the change."""
    async with FakeAgentAPI(messages=make_messages(30)) as agent:
        first = await run(workspace, agent_url=agent.url, coder=coder)
        agent.update_last(agent.messages[-1].content + " and then some more")
        second = await run(workspace, agent_url=agent.url, coder=coder)
    assert first.exit_code is ExitCode.OK
    assert second.exit_code is ExitCode.OK
    assert "journal +1 messages" in second.step("state").detail  # type: ignore[union-attr]
    conversation = workspace.stored()
    assert conversation.messages[-1].content.endswith("and then some more")


async def test_write_failure_is_reported_and_snapshot_still_delivered(
    workspace: Workspace, coder: FakeCoder
) -> None:
    """When the state directory cannot be written, exit 3 says so and the upload still happens."""
    blocker = workspace.root / "not-a-dir"
    blocker.write_text("a file where a directory should be")
    async with FakeAgentAPI(messages=make_messages(4)) as agent:
        report = await run(workspace, agent_url=agent.url, coder=coder, state_dir=blocker / "state")
    assert report.exit_code is ExitCode.NOT_DURABLE
    assert not report.durable
    assert report.step("state").outcome == "failed"  # type: ignore[union-attr]
    assert len(coder.uploads) == 1
    assert (
        "could not be read and was left as it was; the newest changes (4 messages) were not saved"
        in report.kept
    )


async def test_forced_stop_skips_upload_but_not_the_write(
    workspace: Workspace, coder: FakeCoder
) -> None:
    """A second signal (force) skips best-effort steps; the durable write still happens."""
    force = asyncio.Event()
    force.set()
    async with FakeAgentAPI(messages=make_messages(4)) as agent:
        report = await run(workspace, agent_url=agent.url, coder=coder, force=force)
    assert report.durable
    assert coder.uploads == []
    assert report.step("snapshot").outcome == "skipped"  # type: ignore[union-attr]


@pytest.mark.parametrize("budget_s", [0.3, 1.0])
async def test_hung_agentapi_costs_a_bounded_slice(
    workspace: Workspace, coder: FakeCoder, budget_s: float
) -> None:
    """A hung /messages is given part of the budget; the copy on disk is then used."""
    StateStore(workspace.state_dir).save(Conversation(messages=tuple(make_messages(6))))
    async with FakeAgentAPI(messages=make_messages(6)) as agent:
        agent.behaviour.hang = True
        started = time.monotonic()
        report = await run(workspace, agent_url=agent.url, coder=coder, budget_s=budget_s)
        elapsed = time.monotonic() - started
    assert elapsed < budget_s + MIN_MARGIN_S
    assert report.durable
    assert report.step("fetch").outcome == "sidecar"  # type: ignore[union-attr]


def test_summary_is_one_line_with_every_step() -> None:
    """The summary names each step with its outcome and milliseconds on one line."""
    from agentapi_persist.shutdown import StepResult

    report = ShutdownReport(
        steps=[StepResult("fetch", "live", True, 3), StepResult("state", "durable", True, 4)],
        durable=True,
        snapshot_ok=True,
        total_ms=9,
        kept="2 messages durable",
    )
    line = report.summary()
    assert "\n" not in line
    assert line.startswith("shutdown ok: fetch=live 3ms; state=durable 4ms; total 9ms")
