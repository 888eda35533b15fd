#!/usr/bin/env python3
"""Build a log snapshot from your own messages, and check what would be sent.

The builder is pure: give it messages, get the exact bytes (at most 65,536) that the Coder
server would receive. Useful to preview, filter or redact before uploading yourself.

    .venv/bin/python examples/custom_snapshot.py
"""

from __future__ import annotations

import asyncio

from agentapi_persist import Message, build_snapshot


async def main() -> int:
    messages = [
        Message(id=0, role="user", content="Refactor the parser", time="2025-01-02T03:04:05Z"),
        Message(id=1, role="agent", content="─" * 70_000 + " done", time="2025-01-02T03:04:09Z"),
    ]
    # Redact before building: the builder never sees what you drop here.
    visible = [
        m.model_copy(update={"content": m.content.replace("parser", "[redacted]")})
        for m in messages
    ]
    snapshot = build_snapshot(visible, max_messages=30)
    print(
        f"{len(snapshot.messages)} of {snapshot.total} messages, {snapshot.size} bytes, "
        f"{snapshot.truncated_bytes} bytes cut from the head of the longest one"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
