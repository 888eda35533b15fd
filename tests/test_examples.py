"""Each example runs, as a process, against the real loopback peers."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from agentapi_persist.models import Conversation
from agentapi_persist.store import StateStore
from agentapi_persist.testing.agentapi import FakeAgentAPI
from agentapi_persist.testing.coder import FakeCoder
from agentapi_persist.testing.server import free_port

from .conftest import Workspace, coder_env, make_messages

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


async def run_example(ws: Workspace, name: str, *args: str, **env: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / name),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=ws.process_env(**env),
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_persist_once(workspace: Workspace, coder: FakeCoder) -> None:
    """persist_once.py runs the whole sequence and reports success."""
    async with FakeAgentAPI(messages=make_messages(8)) as agent:
        code, out = await run_example(
            workspace,
            "persist_once.py",
            "--agentapi-url",
            agent.url,
            "--state-dir",
            str(workspace.state_dir),
            **coder_env(coder),
        )
    assert code == 0, out
    assert "shutdown ok" in out
    assert len(coder.uploads) == 1


async def test_restore_on_start(workspace: Workspace) -> None:
    """restore_on_start.py writes AgentAPI's missing file from the sidecar copy."""
    StateStore(workspace.state_dir).save(Conversation(messages=tuple(make_messages(4))))
    code, out = await run_example(
        workspace,
        "restore_on_start.py",
        "--agentapi-url",
        f"http://127.0.0.1:{free_port()}",
    )
    assert code == 0, out
    assert json.loads(out)["outcome"] == "written"
    assert workspace.state_file.exists()


async def test_custom_snapshot(workspace: Workspace) -> None:
    """custom_snapshot.py builds a bounded snapshot from its own messages."""
    code, out = await run_example(workspace, "custom_snapshot.py")
    assert code == 0, out
    assert "1 of 2 messages" in out  # the huge one pushes the older one out


async def test_embed_in_app(workspace: Workspace) -> None:
    """embed_in_app.py follows AgentAPI, checkpoints, and stops on its own trigger."""
    async with FakeAgentAPI(messages=make_messages(6)) as agent:
        code, out = await run_example(
            workspace,
            "embed_in_app.py",
            "--agentapi-url",
            agent.url,
            "--state-dir",
            str(workspace.state_dir),
            "--seconds",
            "1.0",
        )
    assert code == 0, out
    assert "shutdown ok" in out
    conversation = StateStore(workspace.state_dir).load().conversation
    assert conversation is not None
    assert len(conversation.messages) == 6
