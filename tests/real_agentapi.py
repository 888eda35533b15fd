"""The real AgentAPI binary in tests: where it is, how to start it around the scripted agent.

``scripts/install-agentapi`` (run by ``scripts/install --dev``) builds one binary per version
into the cache directory below. Without them the tests that need one skip, naming the missing
version and how to install it; when ``AGENTAPI_PERSIST_REQUIRE_REAL_AGENTAPI=1`` (``scripts/test``
sets it wherever Go is installed, so in CI) a missing binary fails the test instead, and the
session fails if no real-binary test ran at all (see ``conftest.pytest_sessionfinish``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agentapi_persist.testing.server import free_port

#: Newest first. v0.12.2 is the newest 0.12 release the Go module proxy serves.
VERSIONS = ("0.12.2", "0.11.8", "0.10.1", "0.10.0")
#: The versions that have a state file and a pid file and save on SIGUSR1.
STATEFUL = tuple(v for v in VERSIONS if tuple(map(int, v.split("."))) >= (0, 12, 0))
REQUIRE_ENV = "AGENTAPI_PERSIST_REQUIRE_REAL_AGENTAPI"
AGENT = Path(__file__).with_name("terminal_agent.py")


def cache_dir() -> Path:
    """Where ``scripts/install-agentapi`` puts the binaries (same rule as the script)."""
    explicit = os.environ.get("AGENTAPI_PERSIST_AGENTAPI_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "agentapi-persist" / "agentapi"


def required() -> bool:
    return os.environ.get(REQUIRE_ENV) == "1"


def binary(version: str) -> Path:
    """The installed binary of ``version``, or skip (fail where it is required) saying why."""
    path = cache_dir() / f"v{version}" / "agentapi"
    if os.access(path, os.X_OK):
        return path
    reason = (
        f"real AgentAPI v{version} is not installed at {path}: install Go and run "
        "scripts/install-agentapi"
    )
    if required():
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1)")
    pytest.skip(reason)


def acp_echo(version: str) -> Path:
    """AgentAPI's scripted ACP agent (its e2e/acp_echo.go), built next to the binary."""
    path = binary(version).with_name("acp_echo")
    if os.access(path, os.X_OK):
        return path
    reason = (
        f"AgentAPI's acp_echo for v{version} is not built at {path}: run scripts/install-agentapi"
    )
    if required():
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1)")
    pytest.skip(reason)


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


@dataclass
class RealAgentAPI:
    """One running ``agentapi server --type custom -- python terminal_agent.py``."""

    version: str
    program: Path
    port: int
    proc: subprocess.Popen[bytes]
    inputs_log: Path
    output_log: Path
    session: aiohttp.ClientSession
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://localhost:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def get(self, path: str) -> Any:
        async with self.session.get(self.url + path) as response:
            response.raise_for_status()
            return await response.json()

    async def status(self) -> str:
        body = await self.get("/status")
        return str(body["status"])

    async def messages(self) -> list[dict[str, Any]]:
        body = await self.get("/messages")
        return list(body["messages"])

    async def wait_answering(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"AgentAPI exited {self.proc.returncode}: {self.output()}")
            with suppress(aiohttp.ClientError):
                await self.status()
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"AgentAPI did not answer within {timeout}s: {self.output()}")
            await asyncio.sleep(0.05)

    async def wait_stable(self, *, at_least: int = 0, timeout: float = 30) -> list[dict[str, Any]]:
        """Wait until the agent is idle (``stable``) with ``at_least`` messages; return them."""
        deadline = time.monotonic() + timeout
        while True:
            with suppress(aiohttp.ClientError):
                if await self.status() == "stable":
                    messages = await self.messages()
                    if len(messages) >= at_least:
                        return messages
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"AgentAPI not stable with {at_least} messages within {timeout}s: "
                    f"{self.output()[-2000:]}"
                )
            await asyncio.sleep(0.1)

    async def say(self, text: str) -> list[dict[str, Any]]:
        """Send a user message once the agent waits for input; return the conversation after
        the agent's answer."""
        before = await self.wait_stable()
        async with self.session.post(
            self.url + "/message", json={"content": text, "type": "user"}
        ) as response:
            body = await response.text()
            assert response.status == 200, body
        return await self.wait_stable(at_least=len(before) + 2)

    def inputs(self) -> list[str]:
        """Every input the scripted agent received, in order (across restarts)."""
        if not self.inputs_log.exists():
            return []
        lines = self.inputs_log.read_text(encoding="utf-8").splitlines()
        return [json.loads(line)["input"] for line in lines]

    def output(self) -> str:
        return self.output_log.read_text(errors="replace") if self.output_log.exists() else ""

    def kill(self) -> None:
        """SIGKILL the whole group (AgentAPI and the agent), as a container runtime does."""
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.proc.pid, sig)

    async def exited(self, timeout: float = 15) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"AgentAPI still running after {timeout}s")
            await asyncio.sleep(0.05)
        return self.proc.returncode


def _spawn(argv: list[str], env: dict[str, str], output_log: Path) -> subprocess.Popen[bytes]:
    """AgentAPI in its own process group (so a kill reaches the agent too), output to a file."""
    with output_log.open("wb") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,  # a pipe on stdin would become the initial prompt
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


@asynccontextmanager
async def real_agentapi(
    version: str,
    workdir: Path,
    *,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
    agent_args: tuple[str, ...] = (),
    agent: tuple[str, ...] | None = None,
    port: int | None = None,
    wait: bool = True,
) -> AsyncIterator[RealAgentAPI]:
    """Start the real AgentAPI ``version`` around the scripted agent; kill it on exit.

    ``env`` is the whole AgentAPI-specific environment (``AGENTAPI_STATE_FILE``, ...); the
    agent's inputs go to ``workdir/inputs.log`` (appended, so a restart keeps the history).
    ``agent`` replaces the scripted terminal agent's command line (``agent_args`` then unused).
    """
    program = binary(version)
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    inputs_log = workdir / "inputs.log"
    output_log = workdir / f"agentapi-{port}-{time.monotonic_ns()}.log"
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TMPDIR")}
    full_env = {**keep, "HOME": str(workdir), **(env or {})}
    argv = [str(program), "server", "--port", str(port), "--type", "custom", *args, "--"]
    argv += agent or [sys.executable, str(AGENT), "--log", str(inputs_log), *agent_args]
    proc = _spawn(argv, full_env, output_log)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        real = RealAgentAPI(version, program, port, proc, inputs_log, output_log, session, full_env)
        try:
            if wait:
                await real.wait_answering()
            yield real
        finally:
            real.kill()
