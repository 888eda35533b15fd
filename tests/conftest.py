"""Shared fixtures: a workspace layout in a temp dir, settings built from its environment,
and real loopback peers (``agentapi_persist.testing``) that follow the SPEC contract."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agentapi_persist.config import Settings
from agentapi_persist.identity import default_state_dir
from agentapi_persist.models import Conversation, Message, Role
from agentapi_persist.store import StateStore
from agentapi_persist.testing.coder import FakeCoder

TASK_ID = "5f1c7a0e-3b2d-4c1e-9f00-1234567890ab"
#: A token that must never show up anywhere: tests search output and files for it.
CANARY_TOKEN = "coder-token-CANARY-7f3e9b21d4"
TIME = "2025-01-02T03:04:05.123456789Z"


def make_messages(count: int, *, size: int = 40, prefix: str = "message") -> list[Message]:
    """``count`` alternating user/agent messages with distinct, recognisable content."""
    roles: tuple[Role, Role] = ("user", "agent")
    out = []
    for i in range(count):
        body = f"{prefix} {i} "
        out.append(
            Message(
                id=i, role=roles[i % 2], content=(body * (size // len(body) + 1))[:size], time=TIME
            )
        )
    return out


@dataclass
class Workspace:
    """A Coder-like home directory: the module dir, AgentAPI's files, our state dir."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)
    module: str = ".agentapi-module"
    """The module directory's name (``ARG_MODULE_DIR_NAME``): several modules share a home."""

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def state_dir(self) -> Path:
        """The default: one directory per module directory (``identity``)."""
        return Path(default_state_dir(self.home / ".local" / "state", self.module_dir))

    @property
    def module_dir(self) -> Path:
        return self.home / self.module

    @property
    def state_file(self) -> Path:
        return self.module_dir / "agentapi-state.json"

    @property
    def pid_file(self) -> Path:
        return self.module_dir / "agentapi.pid"

    def settings(self, **flags: Any) -> Settings:
        return Settings.load(flags, env=self.env)

    def stored(self) -> Conversation:
        """What a fresh process would load from the state directory right now, read-only
        (an empty conversation when nothing is stored yet)."""
        loaded = StateStore(self.state_dir, read_only=True).load()
        return loaded.conversation or Conversation()

    def process_env(self, **extra: str) -> dict[str, str]:
        """The environment for a real CLI process: ours plus the interpreter's basics."""
        keep = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TMPDIR")}
        return {**keep, **self.env, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **extra}


def new_workspace(root: Path, module: str = ".agentapi-module") -> Workspace:
    """A fresh workspace under ``root`` whose environment uses the registry module's names;
    another ``module`` under the same ``root`` is a second agent module in the same home."""
    ws = Workspace(root=root, module=module)
    ws.module_dir.mkdir(parents=True)
    ws.env = {
        "HOME": str(ws.home),
        "ARG_MODULE_DIR_NAME": module,
        "AGENTAPI_STATE_FILE": str(ws.state_file),
        "AGENTAPI_PID_FILE": str(ws.pid_file),
    }
    return ws


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    """A fresh workspace (see ``new_workspace``) in the test's temp dir."""
    return new_workspace(tmp_path)


@pytest.fixture
async def coder() -> AsyncIterator[FakeCoder]:
    """A Coder server that knows ``TASK_ID`` and accepts ``CANARY_TOKEN``."""
    async with FakeCoder(token=CANARY_TOKEN, task_ids={TASK_ID}) as server:
        yield server


def coder_env(server: FakeCoder) -> dict[str, str]:
    """What the registry module sets for the snapshot upload."""
    return {
        "ARG_TASK_ID": TASK_ID,
        "CODER_AGENT_URL": server.url,
        "CODER_AGENT_TOKEN": CANARY_TOKEN,
    }


@pytest.fixture
def python() -> str:
    """The real interpreter, for subprocess tests."""
    return sys.executable


Factory = Callable[..., Settings]


_real_agentapi_passed: list[str] = []
_skipped: list[tuple[str, str]] = []

#: Set by CI (``.ci/run``), whose machine can run every test: a skip there means a fault
#: class went untested without anyone noticing, so any skip fails the run, naming the reason.
NO_SKIPS_ENV = "AGENTAPI_PERSIST_NO_SKIPS"


def pytest_collection_finish(session: pytest.Session) -> None:
    """Take what collection made (modules, test items, module-level conversations) out of the
    garbage collector's sight for the rest of the run (``gc.freeze``'s documented use). The
    tests that time a stop on this process's event loop read their clock after any pause of
    it: a full run counted 55 collections over 50 ms (the longest 247 ms); with this, 32
    (the longest 186 ms)."""
    import gc

    gc.collect()
    gc.freeze()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Count the real-AgentAPI tests that passed and every skip (see ``pytest_sessionfinish``)."""
    if report.when == "call" and report.passed and "real_agentapi" in report.keywords:
        _real_agentapi_passed.append(report.nodeid)
    if report.skipped:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append((report.nodeid, str(reason)))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the counts the fault suites recorded (``tests/evidence.py``): the figures of
    docs/reliability/ come from these lines, so every run shows them, not only ``-s`` runs."""
    from . import evidence

    found = evidence.lines()
    if found:
        terminalreporter.section("reliability counts")
        for line in found:
            terminalreporter.write_line(line)
    target = os.environ.get(evidence.EVIDENCE_ENV)
    if target:
        evidence.dump(Path(target))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Where the real AgentAPI is required (``scripts/test`` with Go installed), a run in which
    no real-binary test passed fails: a suite that silently skipped them proves nothing."""
    from .real_agentapi import REQUIRE_ENV, required

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if required() and not _real_agentapi_passed and exitstatus in (0, 5):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if reporter is not None:
            reporter.write_line(
                f"error: {REQUIRE_ENV}=1 but no real-AgentAPI test passed", red=True
            )
    if os.environ.get(NO_SKIPS_ENV) == "1" and _skipped and exitstatus in (0, 5):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if reporter is not None:
            reporter.write_line(
                f"error: {NO_SKIPS_ENV}=1 and {len(_skipped)} tests were skipped:", red=True
            )
            for nodeid, reason in _skipped:
                reporter.write_line(f"  {nodeid}: {reason}", red=True)
