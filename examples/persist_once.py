#!/usr/bin/env python3
"""Run the shutdown sequence from your own code: the library equivalent of `shutdown`.

A custom agent integration that manages its own lifecycle can call this when it is told to
stop. Settings come from the same environment the CLI reads (plus any overrides you pass);
the report says what each step did and which exit code the CLI would have used.

    .venv/bin/python examples/persist_once.py --agentapi-url http://localhost:3284 \
        --state-dir ./state
"""

from __future__ import annotations

import argparse
import asyncio
import time

from agentapi_persist import (
    Settings,
    ShutdownReport,
    configure_logging,
    open_peers,
    run_shutdown,
)


async def persist_once(settings: Settings) -> ShutdownReport:
    """One bounded shutdown sequence with the given settings."""
    # One session per site, explicit timeouts and body caps: never a bare ClientSession.
    async with open_peers(settings) as peers:
        ends_at = time.monotonic() + settings.budget_s
        return await run_shutdown(settings, peers=peers, ends_at=ends_at)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--agentapi-url")
    parser.add_argument("--state-dir")
    parser.add_argument("--grace", type=float)
    args = parser.parse_args()
    configure_logging(level="warning")  # logs to stderr; stdout keeps the result
    settings = Settings.load(
        {"agentapi_url": args.agentapi_url, "state_dir": args.state_dir, "grace_s": args.grace}
    )
    report = await persist_once(settings)
    print(report.summary())
    return int(report.exit_code)


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
