"""Each example runs, as a process, against the real loopback peers."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
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


REPO = EXAMPLES.parent


def _readme_example_commands() -> list[str]:
    """The example commands the README and the examples' own usage lines tell a newcomer to
    run, as written (``.venv/bin/python examples/...``)."""
    texts = [(REPO / "README.md").read_text()]
    texts += [path.read_text() for path in sorted(EXAMPLES.glob("*.py"))]
    found = []
    for text in texts:
        for match in re.finditer(r"\.venv/bin/python (examples/\w+\.py)", text):
            found.append(match.group(1))
    return sorted(set(found))


def test_the_examples_run_as_the_readme_says() -> None:
    """Every example named with the project's interpreter starts from the repository's root
    as written (the shell's own python has no agentapi_persist: ModuleNotFoundError), and no
    instruction tells a newcomer to use a bare `python examples/...`."""
    commands = _readme_example_commands()
    assert {Path(c).name for c in commands} >= {p.name for p in EXAMPLES.glob("*.py")}
    interpreter = REPO / ".venv" / "bin" / "python"
    assert interpreter.exists(), "scripts/install makes .venv, as the README says"
    for command in commands:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        ran = subprocess.run(
            [str(interpreter), command, "--help"],
            cwd=REPO, capture_output=True, text=True, timeout=60, env=env, check=False,
        )  # fmt: skip
        assert ran.returncode == 0, f"{command}: {ran.stderr}"  # imported, ran, exited 0
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    docs += sorted(EXAMPLES.glob("*.py"))
    for doc in docs:
        assert not re.search(r"(?<![/\w])python3? examples/", doc.read_text()), doc


async def test_custom_agent_without_agentapi_says_how_to_get_it(
    workspace: Workspace, tmp_path: Path
) -> None:
    """No `agentapi` on PATH: one sentence saying what to install, exit 1, no traceback."""
    code, out = await run_example(
        workspace,
        "custom_agent.py",
        "--state-dir", str(tmp_path / "state"),
        "--agentapi-bin", "agentapi-that-is-not-installed",
        "--port", str(free_port()),
        "--", "true",
    )  # fmt: skip
    assert code == 1, out
    assert "cannot start AgentAPI ('agentapi-that-is-not-installed'" in out
    assert "go install github.com/coder/agentapi" in out
    assert "Traceback" not in out


async def test_restore_on_start_has_the_force_its_message_mentions(workspace: Workspace) -> None:
    """Something listens at AgentAPI's address: the refusal mentions --force, and --force
    (which the example now has) restores anyway."""
    StateStore(workspace.state_dir).save(Conversation(messages=tuple(make_messages(4))))
    async with FakeAgentAPI(messages=make_messages(4)) as agent:
        code, out = await run_example(workspace, "restore_on_start.py", "--agentapi-url", agent.url)
        assert code == 6, out
        assert "--force" in out
        code, out = await run_example(
            workspace, "restore_on_start.py", "--agentapi-url", agent.url, "--force"
        )
    assert code == 0, out
    assert json.loads(out)["outcome"] == "written"
