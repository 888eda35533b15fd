#!/usr/bin/env python3
"""Repair AgentAPI's state file before starting AgentAPI: the library equivalent of `restore`.

Call it in your own launcher right before you exec AgentAPI. It refuses (raises
``AgentRunningError``) if AgentAPI is already running, because AgentAPI owns its file then.

    .venv/bin/python examples/restore_on_start.py --state-dir ./state \
        --agentapi-state-file ./agentapi-state.json
"""

from __future__ import annotations

import argparse
import asyncio
import json

from agentapi_persist import AgentRunningError, Settings, configure_logging, restore


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state-dir")
    parser.add_argument("--agentapi-state-file")
    parser.add_argument("--agentapi-url")
    parser.add_argument(
        "--force",
        action="store_true",
        help="restore even if something listens at AgentAPI's address (it is not AgentAPI)",
    )
    args = parser.parse_args()
    configure_logging(level="warning")  # logs to stderr; stdout keeps the result
    settings = Settings.load(
        {
            "state_dir": args.state_dir,
            "agentapi_state_file": args.agentapi_state_file,
            "agentapi_url": args.agentapi_url,
        }
    )
    try:
        # restore() is synchronous file work; keep the event loop free while it runs.
        report = await asyncio.to_thread(restore, settings, force=args.force)
    except AgentRunningError as exc:
        print(f"not restoring: {exc}")
        return int(exc.exit_code)
    print(json.dumps(report.as_dict(), indent=2))
    return int(report.exit_code)


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
