#!/usr/bin/env python3
"""A custom agent integration: your own launcher for AgentAPI, its conversation kept durable.

One process you control does what the CLI's boot and stop steps do, with the library:

1. **restore on start**: repair AgentAPI's state file before AgentAPI reads it (``restore``);
2. start AgentAPI (``agentapi server --type T -- AGENT...``) with its state and pid files;
3. **embed the sidecar** (``serve``) stopped by the launcher's own trigger: SIGTERM or SIGINT
   to the launcher, or AgentAPI exiting. The sidecar installs no signal handlers of its own;
4. on stop the sidecar runs the shutdown sequence (AgentAPI saves, the copy is made durable,
   the log snapshot is uploaded when a Coder task is configured, AgentAPI is stopped) and
   returns its report. If the sidecar could not run at all, **persist once** instead
   (``run_shutdown``), so a stop still saves;
5. **build a snapshot** of what was saved (``build_snapshot``), here written to a file for an
   application's own "paused" page.

    .venv/bin/python examples/custom_agent.py --state-dir ./state \
        --snapshot-out ./last.json -- claude

Settings not given as options come from the environment, as for the CLI (``ARG_TASK_ID``,
``CODER_AGENT_URL``, ``CODER_AGENT_TOKEN``, ``AGENTAPI_PERSIST_*``, ...). Exit status: the
shutdown report's (0 saved), or AgentAPI's when it failed on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from agentapi_persist import (
    AgentRunningError,
    PersistError,
    Settings,
    ShutdownReport,
    StateStore,
    build_snapshot,
    configure_logging,
    open_peers,
    restore,
    run_shutdown,
    serve,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--state-dir", help="agentapi-persist's durable copy")
    parser.add_argument("--agentapi-state-file", help="AgentAPI's own state file")
    parser.add_argument("--agentapi-pid-file", help="AgentAPI's pid file")
    parser.add_argument("--agentapi-bin", help="the agentapi program (default: agentapi)")
    parser.add_argument("--port", type=int, default=3284, help="AgentAPI's port")
    parser.add_argument("--type", default="claude", help="AgentAPI's --type")
    parser.add_argument("--grace", type=float, help="seconds the stop may take")
    parser.add_argument("--snapshot-out", type=Path, help="write the final snapshot here")
    parser.add_argument("agent", nargs=argparse.REMAINDER, help="-- the agent command")
    return parser.parse_args()


async def start_agentapi(
    settings: Settings, agent_type: str, agent: list[str]
) -> asyncio.subprocess.Process:
    """``agentapi server`` with the state and pid files ``settings`` expects."""
    settings.agentapi_state_file.parent.mkdir(parents=True, exist_ok=True)
    settings.agentapi_pid_file.parent.mkdir(parents=True, exist_ok=True)
    port = urlsplit(settings.agentapi_url).port or 3284
    env = {
        **os.environ,
        "AGENTAPI_PORT": str(port),
        "AGENTAPI_STATE_FILE": str(settings.agentapi_state_file),
        "AGENTAPI_PID_FILE": str(settings.agentapi_pid_file),
    }
    command = [settings.agentapi_bin, "server", "--type", agent_type, "--", *agent]
    # Its own session: a Ctrl-C reaches this launcher only, which then stops it in order.
    return await asyncio.create_subprocess_exec(
        *command, stdin=asyncio.subprocess.DEVNULL, env=env, start_new_session=True
    )


async def persist_once(settings: Settings) -> ShutdownReport:
    """One shutdown sequence without a sidecar: the library equivalent of `shutdown`."""
    # One session per site, explicit timeouts and body caps: never a bare ClientSession.
    async with open_peers(settings) as peers:
        ends_at = time.monotonic() + settings.budget_s
        return await run_shutdown(settings, peers=peers, ends_at=ends_at)


async def stop_agentapi(process: asyncio.subprocess.Process, *, within_s: float) -> None:
    """SIGTERM (AgentAPI saves its file and exits), SIGKILL if it does not within the time."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), within_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


def write_snapshot(settings: Settings, path: Path) -> str:
    """The log snapshot of the durable copy, as the Coder server would receive it."""
    conversation = StateStore(settings.state_dir, read_only=True).load().conversation
    messages = conversation.messages if conversation is not None else ()
    snapshot = build_snapshot(
        messages, max_messages=settings.snapshot_messages, max_bytes=settings.snapshot_max_bytes
    )
    path.write_bytes(snapshot.payload)
    return f"snapshot: {len(snapshot.messages)} of {snapshot.total} messages, {snapshot.size} bytes"


async def main() -> int:
    args = parse_args()
    agent = args.agent[1:] if args.agent[:1] == ["--"] else args.agent
    configure_logging(level="warning")  # logs to stderr; stdout keeps the results
    settings = Settings.load(
        {
            "state_dir": args.state_dir,
            "agentapi_state_file": args.agentapi_state_file,
            "agentapi_pid_file": args.agentapi_pid_file,
            "agentapi_bin": args.agentapi_bin,
            "agentapi_url": f"http://localhost:{args.port}",
            "grace_s": args.grace,
            "stop_agentapi": True,  # the sequence stops AgentAPI, inside the same budget
        }
    )

    # 1. Restore: synchronous file work, off the event loop. Refused if AgentAPI already runs.
    try:
        restored = await asyncio.to_thread(restore, settings)
    except AgentRunningError as exc:
        print(f"not starting: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    print(restored.summary(), flush=True)

    # 2. AgentAPI, after the repair.
    try:
        agentapi = await start_agentapi(settings, args.type, agent)
    except OSError as exc:  # not installed, not executable: say so, the copy is untouched
        print(
            f"cannot start AgentAPI ({settings.agentapi_bin!r}: {exc.strerror or exc}); "
            "install it (go install github.com/coder/agentapi@latest) or give --agentapi-bin. "
            "Nothing was changed.",
            file=sys.stderr,
        )
        return 1

    # 3. The stop trigger: our own signals, or AgentAPI going away; the first reason counts.
    stop = asyncio.Event()
    reasons: list[str] = []

    def request_stop(reason: str) -> None:
        reasons.append(reason)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop, sig.name)
    exited = asyncio.create_task(agentapi.wait(), name="agentapi.exit")
    exited.add_done_callback(lambda _: request_stop("AgentAPI exited"))

    # 4. The embedded sidecar; persist once if it could not run.
    try:
        report = await serve(settings, shutdown_trigger=stop.wait)
    except PersistError as exc:
        print(f"sidecar unavailable ({exc}); saving once at stop", file=sys.stderr, flush=True)
        await stop.wait()
        report = await persist_once(settings)
    await stop_agentapi(agentapi, within_s=2.0)  # the sequence stopped it already, normally
    await exited
    print(report.summary(), flush=True)

    # 5. The snapshot, for your own UI.
    if args.snapshot_out is not None:
        print(write_snapshot(settings, args.snapshot_out), flush=True)

    status = agentapi.returncode or 0
    if reasons[0] == "AgentAPI exited" and status != 0:
        print(f"AgentAPI exited on its own with status {status}", file=sys.stderr)
        return status if status > 0 else 128 - status  # -N: killed by signal N
    return int(report.exit_code)


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
