#!/usr/bin/env python3
"""Embed the sidecar in your own asyncio program, stopped by your own trigger.

With ``shutdown_trigger`` the sidecar installs no signal handlers and no hard-exit watchdog
(your process is yours): it follows AgentAPI and checkpoints until the trigger returns, then
runs the shutdown sequence and returns its report.

    .venv/bin/python examples/embed_in_app.py --agentapi-url http://localhost:3284 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio

from agentapi_persist import Settings, configure_logging, serve


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--agentapi-url")
    parser.add_argument("--state-dir")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to run")
    args = parser.parse_args()
    configure_logging(level="warning")  # logs to stderr; stdout keeps the result
    settings = Settings.load({"agentapi_url": args.agentapi_url, "state_dir": args.state_dir})

    stop = asyncio.Event()
    # Your application decides when to stop; here, a timer stands in for it.
    asyncio.get_running_loop().call_later(args.seconds, stop.set)
    report = await serve(settings, shutdown_trigger=stop.wait)
    print(report.summary())
    return int(report.exit_code)


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
