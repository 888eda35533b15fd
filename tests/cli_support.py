"""Running the real CLI as a process, for tests: one runner, and a timed variant.

``run_cli`` starts ``python -m agentapi_persist ARGS`` with exactly the environment given while
the caller's event loop keeps serving the loopback peers; ``cli`` does the same with a
workspace's environment. ``run_timed`` (``run_cli_timed`` with a workspace's environment;
``timed`` and ``cli_timed`` from a worker thread) times the whole life of the process from a
stopwatch process of its own, for the tests that hold the exit to the grace period;
``ExitClock`` notes an exit from a pidfd, whatever the event loop is doing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .conftest import Workspace

__all__ = [
    "CliRun",
    "ExitClock",
    "Run",
    "cli",
    "cli_timed",
    "run_cli",
    "run_cli_timed",
    "run_timed",
    "timed",
]


@dataclass
class CliRun:
    code: int
    stdout: str
    stderr: str
    seconds: float
    """From the start to the exit of the process we started (a tracer included)."""
    said_last_s: float
    """From the start to the last line our program wrote: its exit, within a few ms, even when
    a tracer it runs under lingers after it."""


async def run_cli(
    env: dict[str, str], *args: str, prefix: list[str] | None = None, timeout_s: float = 60
) -> CliRun:
    """``[prefix] python -m agentapi_persist ARGS`` with exactly ``env``; peers keep serving."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *(prefix or []),
        *_cli_argv(args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**env, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    last = [started]

    async def read(stream: asyncio.StreamReader | None) -> str:
        assert stream is not None
        text = []
        while line := await stream.readline():
            decoded = line.decode(errors="replace")
            text.append(decoded)
            if decoded.startswith(("shutdown ", "agentapi-persist:", "{")):
                last[0] = time.monotonic()
        return "".join(text)

    try:
        out, err, _ = await asyncio.wait_for(
            asyncio.gather(read(proc.stdout), read(proc.stderr), proc.wait()), timeout_s
        )
    finally:
        if proc.returncode is None:
            # Timed out, or the test failed and cancelled us: never leave a child behind for
            # the loop's teardown to wait on (that hung the whole run instead of failing it).
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    ended = time.monotonic()
    return CliRun(proc.returncode, out, err, ended - started, last[0] - started)


async def cli(ws: Workspace, *args: str, env: dict[str, str] | None = None) -> CliRun:
    """``run_cli`` with the workspace's environment (plus ``env``)."""
    return await run_cli(ws.process_env(**(env or {})), *args)


@dataclass
class Run:
    """One CLI process's life: exit code, output, and times counted from its start."""

    code: int
    stdout: str
    stderr: str
    seconds: float
    """From the process's start to its exit."""
    startup_s: float
    """From its start to its first log event (only when asked to watch for it; else 0)."""


def run_cli_timed(
    ws: Workspace,
    args: Sequence[str],
    env: dict[str, str],
    on_started: Callable[[], None] | None = None,
) -> Run:
    """Run ``python -m agentapi_persist ARGS`` and time its whole life, in the calling thread
    (call it from a thread of its own: a busy event loop must not add to a process's time).

    The life is measured by a stopwatch process of its own (``_STOPWATCH``), from the kernel's
    record of the start to the moment its wait returned: this process's garbage collector
    pauses a full run for up to a quarter of a second at a time (measured: 55 pauses over
    50 ms in one run), and a clock read here after such a pause would charge it to the stop.

    With ``on_started``, stderr's first line is awaited first (run with logs at debug: it is
    the first event, logged as the sequence begins, so the imports are done) and
    ``on_started`` is called then.
    """
    return run_timed(ws.process_env(**env), args, on_started)


def run_timed(
    process_env: dict[str, str],
    args: Sequence[str],
    on_started: Callable[[], None] | None = None,
) -> Run:
    """``run_cli_timed`` with exactly the environment ``process_env``."""
    read_end, write_end = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", _STOPWATCH, str(write_end), *_cli_argv(args)],
            bufsize=0,  # unbuffered pipes: readline() below leaves nothing behind for communicate()
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=process_env,
            pass_fds=(write_end,),
        )
    finally:
        os.close(write_end)
    with os.fdopen(read_end, "rb") as timing:
        first = b""
        if on_started is not None:
            assert proc.stderr is not None
            try:
                first = proc.stderr.readline()  # b"" if it exits without a word
            finally:
                on_started()
        out, err = proc.communicate(timeout=120)
        measured = timing.read().split()
    assert len(measured) == 4, f"the stopwatch measured nothing: {err.decode()[-2000:]}"
    started_s, exited_s, code, first_line_s = measured
    startup_s = float(first_line_s) - float(started_s) if on_started is not None else 0.0
    seconds = float(exited_s) - float(started_s)
    return Run(int(code), out.decode(), (first + err).decode(), seconds, max(startup_s, 0.0))


def _cli_argv(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "agentapi_persist", *args]


_STOPWATCH = """
import os, subprocess, sys, threading, time
report = int(sys.argv[1])
child = subprocess.Popen(sys.argv[2:], stderr=subprocess.PIPE, bufsize=0)
with open(f"/proc/{child.pid}/stat", "rb") as f:
    ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
started = ticks / os.sysconf("SC_CLK_TCK")
first_at = [0.0]

def relay():
    line = child.stderr.readline()
    first_at[0] = time.monotonic()
    os.write(2, line)
    while chunk := child.stderr.read(65536):
        os.write(2, chunk)

relaying = threading.Thread(target=relay, daemon=True)
relaying.start()
code = child.wait()
exited = time.monotonic()
relaying.join(10)
os.write(report, f"{started} {exited} {code} {first_at[0]}".encode())
"""
"""Runs the CLI as its child and writes, to the descriptor it is given: the child's start (the
kernel's record, on the monotonic clock: both count from boot here), the moment its wait
returned, its exit code (negative: the signal that ended it), and when its first stderr line
came. Its stderr is relayed as it comes, so the caller's ``on_started`` still fires then."""


async def cli_timed(ws: Workspace, *args: str, env: dict[str, str] | None = None) -> Run:
    """``run_cli_timed`` from a worker thread, while the caller's loop keeps serving peers."""
    return await timed(ws.process_env(**(env or {})), *args)


async def timed(process_env: dict[str, str], *args: str) -> Run:
    """``run_timed`` from a worker thread, while the caller's loop keeps serving peers."""
    return await asyncio.to_thread(run_timed, process_env, args)


class ExitClock:
    """Notes when a process exits, from a thread of its own watching a pidfd (it does not reap
    the process: asyncio still does), so a busy event loop cannot add to the time."""

    def __init__(self, pid: int) -> None:
        self.exited_at: float | None = None
        self._fd = os.pidfd_open(pid)
        self._thread = threading.Thread(target=self._watch, name=f"exit-clock-{pid}", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        try:
            select.select([self._fd], [], [])
            self.exited_at = time.monotonic()
        finally:
            os.close(self._fd)

    def since(self, started: float, timeout: float = 5.0) -> float:
        """Seconds from ``started`` to the exit (call once the process has been waited for)."""
        self._thread.join(timeout)
        assert self.exited_at is not None, "the process has not exited"
        return self.exited_at - started
