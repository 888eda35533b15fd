"""The sidecar as a real process, for tests: start it, read its JSON events, wait on them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

from .conftest import Workspace


class Sidecar:
    """A running ``agentapi-persist run`` process and the JSON events it logged."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self.other: list[str] = []
        """stderr lines that are not JSON events (tracebacks), for failure messages."""
        self._reader = asyncio.create_task(self._read())
        self.ready = asyncio.Event()

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            try:
                event = json.loads(line)
            except ValueError:
                self.other.append(line.decode(errors="replace"))
                continue
            self.events.append(event)
            if event.get("event") == "daemon.ready":
                self.ready.set()

    def saw(self, name: str) -> bool:
        return any(e.get("event") == name for e in self.events)

    async def wait(self, timeout: float = 15) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(self._reader, 5)
        return code


@asynccontextmanager
async def sidecar_process(
    ws: Workspace,
    *args: str,
    command: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> AsyncIterator[Sidecar]:
    proc = await asyncio.create_subprocess_exec(
        *command,
        sys.executable,
        "-m",
        "agentapi_persist",
        "run",
        "--checkpoint-interval",
        "0.1",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=ws.process_env(**(env or {})),
        start_new_session=True,  # cleanup kills the group, namespaced children included
    )
    sidecar = Sidecar(proc)
    try:
        await asyncio.wait_for(sidecar.ready.wait(), 20)
        yield sidecar
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


async def eventually(check: Any, *, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.02)


def stored_count(ws: Workspace) -> int:
    """How many messages the durable copy holds now."""
    return len(ws.stored().messages)
