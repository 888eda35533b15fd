#!/usr/bin/env python3
"""The main job end to end, against loopback peers that follow the AgentAPI and Coder contracts.

1. Starts a Coder log-snapshot endpoint and an AgentAPI (0.12.1) process with a 40-message
   conversation, a pid file and a state file, in a temporary workspace.
2. Starts the sidecar, ``agentapi-persist run``, as a boot script would, and shows its view.
3. Runs ``agentapi-persist shutdown`` as a stop script would, with the registry module's
   environment: the running sidecar does the work. Shows what the Coder server received.
4. Stops AgentAPI, tears its state file in half, and runs ``agentapi-persist restore``.
5. Runs ``agentapi-persist status``.
6. Reads what was saved with ``agentapi-persist export`` (its first lines shown).

Nothing leaves 127.0.0.1; the workspace is deleted at the end.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import tempfile
from pathlib import Path

from agentapi_persist.testing.agentapi_program import (
    run_fake_agentapi_process,
    write_agentapi_script,
)
from agentapi_persist.testing.coder import FakeCoder
from agentapi_persist.testing.server import free_port

TASK_ID = "0b6f3c1e-8d2a-4f5b-9c7e-2a1d3e4f5a6b"
TOKEN = "demo-token-not-a-real-secret"


def banner(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


async def command(env: dict[str, str], *args: str) -> int:
    print("$ agentapi-persist " + " ".join(args), flush=True)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentapi_persist", *args, env=env
    )
    code = await proc.wait()
    print(f"(exit {code})", flush=True)
    return code


async def main() -> int:
    with tempfile.TemporaryDirectory(prefix="agentapi-persist-demo-") as tmp:
        home = Path(tmp) / "home"
        module = home / ".agentapi-module"
        module.mkdir(parents=True)
        seed = Path(tmp) / "seed.json"
        seed.write_text(
            json.dumps(
                [
                    {
                        "role": "user" if i % 2 == 0 else "agent",
                        "content": f"message {i}: " + "x" * 200,
                    }
                    for i in range(40)
                ]
            )
        )
        port = free_port()
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(home),
            "ARG_MODULE_DIR_NAME": ".agentapi-module",
            "ARG_AGENTAPI_PORT": str(port),
            "AGENTAPI_STATE_FILE": str(module / "agentapi-state.json"),
            "AGENTAPI_PID_FILE": str(module / "agentapi.pid"),
            "ARG_TASK_ID": TASK_ID,
            "CODER_AGENT_TOKEN": TOKEN,
        }
        script = write_agentapi_script(Path(tmp) / "bin", version="0.12.1")
        async with FakeCoder(token=TOKEN, task_ids={TASK_ID}) as coder:
            env["CODER_AGENT_URL"] = coder.url
            banner(f"AgentAPI with 40 messages on 127.0.0.1:{port}; Coder at {coder.url}")
            async with run_fake_agentapi_process(
                script,
                port=port,
                pid_file=module / "agentapi.pid",
                env={**env, "FAKE_AGENTAPI_SEED": str(seed)},
            ) as agentapi:
                banner("Boot: the sidecar starts next to AgentAPI")
                print("$ agentapi-persist run &", flush=True)
                sidecar = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "agentapi_persist",
                    "run",
                    env={**env, "AGENTAPI_PERSIST_LOG_LEVEL": "warning"},
                )
                await asyncio.sleep(1.5)  # restore, connect, first checkpoint
                await command(env, "status")

                banner("Workspace stops: the run_on_stop script runs")
                shutdown = await command(env, "shutdown", "--grace", "10")
                await sidecar.wait()
                if coder.uploads:
                    sent = coder.uploads[-1].json["messages"]
                    ids = f"{sent[0]['id']}..{sent[-1]['id']}"
                    size = len(coder.uploads[-1].body)
                    print(f"Coder received {len(sent)} messages (ids {ids}), {size} bytes")
                agentapi.send_signal(signal.SIGTERM)
                await agentapi.wait()

            state_file = module / "agentapi-state.json"
            data = state_file.read_bytes()
            state_file.write_bytes(data[: len(data) // 2])
            half = len(data) // 2
            banner(f"Next start: AgentAPI's state file is torn to {half} of {len(data)} bytes")
            restored = await command(env, "restore")
            after = json.loads(state_file.read_bytes())
            print(f"AgentAPI's state file now holds {len(after['messages'])} messages")

            banner("status (AgentAPI is stopped now: status says so, exit 8)")
            env["ARG_AGENTAPI_PORT"] = str(free_port())
            await command(env, "status")

            banner("What was saved, as text (also: --format markdown, json or html)")
            text = Path(tmp) / "conversation.txt"
            exported = await command(env, "export", "--output", str(text))
            lines = text.read_text().splitlines() if exported == 0 else []
            print("\n".join(lines[:12]) + f"\n... ({len(lines)} lines in all)", flush=True)
    ok = shutdown == 0 and restored == 0 and exported == 0
    banner("demo " + ("succeeded" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
