#!/usr/bin/env python3
"""Run the shutdown sequence from your own code: the library equivalent of `shutdown`.

A custom agent integration that manages its own lifecycle can call this when it is told to
stop. Settings come from the same environment the CLI reads (plus any overrides you pass);
the report says what each step did and which exit code the CLI would have used.

    python examples/persist_once.py --agentapi-url http://localhost:3284 --state-dir ./state
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp

from agentapi_persist import (
    AgentAPIClient,
    Budget,
    CoderClient,
    Settings,
    ShutdownReport,
    StateStore,
    configure_logging,
    run_sequence,
)


async def persist_once(settings: Settings) -> ShutdownReport:
    """One bounded shutdown sequence with the given settings."""
    budget = Budget(settings.budget_s)
    store = StateStore(settings.state_dir, max_bytes=settings.max_body_bytes)
    async with aiohttp.ClientSession() as agent_session, aiohttp.ClientSession() as coder_session:
        agent = AgentAPIClient(settings.agentapi_url, session=agent_session)
        target = settings.coder_target()  # None when no task id is configured
        coder = CoderClient(target, session=coder_session) if target else None
        return await run_sequence(settings, store=store, agent=agent, coder=coder, budget=budget)


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
