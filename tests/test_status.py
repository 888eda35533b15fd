"""`status` in-process: the facts it gathers and the problems it names."""

from __future__ import annotations

from agentapi_persist.errors import ExitCode
from agentapi_persist.models import Conversation
from agentapi_persist.status import collect_status
from agentapi_persist.store import StateStore
from agentapi_persist.testing.agentapi import FakeAgentAPI
from agentapi_persist.testing.server import free_port

from .conftest import Workspace, make_messages


async def test_status_reports_the_copy_and_a_reachable_agentapi(workspace: Workspace) -> None:
    """A stored copy and an answering AgentAPI: the counts, the agent's state, exit 0."""
    StateStore(workspace.state_dir).save(Conversation(messages=tuple(make_messages(4))))
    async with FakeAgentAPI(messages=make_messages(4)) as agent:
        report = await collect_status(workspace.settings(agentapi_url=agent.url))
    facts = report.as_dict()
    assert facts["checkpoint"]["messages"] == 4
    assert facts["agentapi"]["reachable"] is True
    assert facts["agentapi"]["status"] == "stable"
    assert facts["sidecar"] == {"running": False}
    assert report.exit_code is ExitCode.OK, report.problems


async def test_status_names_a_corrupt_state_file(workspace: Workspace) -> None:
    """AgentAPI's file is torn: the problem says so, exit 8, and nothing is changed."""
    StateStore(workspace.state_dir).save(Conversation(messages=tuple(make_messages(4))))
    workspace.state_file.write_bytes(b'{"version":1,"messages":[{"id":0,')
    async with FakeAgentAPI(messages=make_messages(4)) as agent:
        report = await collect_status(workspace.settings(agentapi_url=agent.url))
    assert report.exit_code is ExitCode.DEGRADED
    assert any(str(workspace.state_file) in problem for problem in report.problems)
    assert workspace.state_file.read_bytes() == b'{"version":1,"messages":[{"id":0,'
    assert "verdict" not in report.render().splitlines()[-1]


async def test_an_open_state_dir_is_reported_never_changed(workspace: Workspace) -> None:
    """`--state-dir` at an existing 0755 directory (its owner's choice, $HOME say): the
    mode is left as it is, and `status` says so."""
    workspace.state_dir.mkdir(parents=True)
    workspace.state_dir.chmod(0o755)
    settings = workspace.settings(agentapi_url=f"http://127.0.0.1:{free_port()}")
    report = await collect_status(settings)
    assert any("open to other users (mode 0755)" in p for p in report.problems), report.problems
    assert workspace.state_dir.stat().st_mode & 0o777 == 0o755


async def test_status_says_never_and_names_the_setting_as_a_setting(workspace: Workspace) -> None:
    """No upload ever: the row says "never" (it was blank); the snapshot's 30 is the setting
    (keeps_last), not a count of messages; no archive: "none"."""
    StateStore(workspace.state_dir).save(Conversation(messages=tuple(make_messages(4))))
    async with FakeAgentAPI(messages=make_messages(4)) as agent:
        report = await collect_status(workspace.settings(agentapi_url=agent.url))
    facts = report.as_dict()
    assert facts["last_upload"] == "never"
    assert facts["snapshot"]["keeps_last"] == 30
    assert "messages" not in facts["snapshot"]
    assert facts["archived"] == "none"
    lines = report.render().splitlines()
    assert "last_upload    never" in lines
    assert "archived       none" in lines
    (snapshot,) = [line for line in lines if line.startswith("snapshot ")]
    assert "keeps_last=30" in snapshot
