"""The fake AgentAPI as an ``agentapi`` program, for tests that need a real process.

Write an executable script named ``agentapi`` (``write_agentapi_script``) and run
``agentapi server --port N``: it serves ``FakeAgentAPI``, writes its pid file, loads and saves
the v1 state file the way AgentAPI does (SIGUSR1 saves from 0.12.0 on; before that it is
ignored, as the real v0.10.0 and v0.11.8 ignore it), and prints ``ready`` once it listens.
Knobs that exist only in the fake come from ``FAKE_AGENTAPI_*`` environment variables (see
``main``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from ..models import Role
from .agentapi import DEFAULT_VERSION, FakeAgentAPI, _apply_initial_prompt, _version_tuple
from .server import free_port

__all__ = ["main", "run_fake_agentapi_process", "write_agentapi_script"]


def write_agentapi_script(directory: Path, *, version: str | None = None) -> Path:
    """Create an executable ``directory/agentapi`` that runs this fake with this interpreter.

    ``version`` is baked into the script, as the real binary has its version built in;
    without it the script reports ``FAKE_AGENTAPI_VERSION`` or the default. The script
    answers ``--version`` before importing anything heavy, so it is about as quick as the
    real binary (callers give ``--version`` about a second).
    """
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "agentapi"
    lines = [f"#!{sys.executable}", "import os", "import sys"]
    if version is not None:
        lines.append(f"os.environ['FAKE_AGENTAPI_VERSION'] = {version!r}")
    lines += [
        "if sys.argv[1:] == ['--version']:",
        f"    v = os.environ.get('FAKE_AGENTAPI_VERSION') or {DEFAULT_VERSION!r}",
        "    print('agentapi version ' + v)",
        "    raise SystemExit(0)",
        "from agentapi_persist.testing.agentapi_program import main",
        "raise SystemExit(main())",
        "",
    ]
    script.write_text("\n".join(lines))
    script.chmod(0o755)
    return script


@contextlib.asynccontextmanager
async def run_fake_agentapi_process(
    script: Path,
    *,
    port: int | None = None,
    pid_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    ready_timeout_s: float = 20.0,
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Start ``script server --port N`` and wait for ``ready``; killed on the way out."""
    args = [str(script), "server", "--port", str(port if port is not None else free_port())]
    if pid_file is not None:
        args += ["--pid-file", str(pid_file)]
    process = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(ready_timeout_s):
            while (line := await process.stdout.readline()) != b"ready\n":
                if not line:
                    raise RuntimeError(f"fake agentapi exited early ({await process.wait()})")
        yield process
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


def main(argv: list[str] | None = None) -> int:
    """``agentapi --version`` | ``agentapi server --port N [--pid-file F] [-- agent ...]``.

    Environment, as AgentAPI reads it: ``AGENTAPI_PID_FILE``, ``AGENTAPI_STATE_FILE``,
    ``AGENTAPI_LOAD_STATE`` / ``AGENTAPI_SAVE_STATE`` (default true when a state file is
    set), ``AGENTAPI_INITIAL_PROMPT``. Fake-only knobs: ``FAKE_AGENTAPI_VERSION`` (default
    0.12.1), ``FAKE_AGENTAPI_SEED`` (a JSON file: a list of ``{role, content}`` to start
    with), ``FAKE_AGENTAPI_SAVE_DELAY_S`` (pause before each save),
    ``FAKE_AGENTAPI_IGNORE_SIGTERM`` (true: SIGTERM is ignored, as by a wedged process),
    ``FAKE_AGENTAPI_READY_AFTER_S`` (the agent's start-up time: until then only a start-up
    screen, no state loaded, as the real AgentAPI does),
    ``FAKE_AGENTAPI_CHATTER_MS`` (change the conversation by itself at this interval),
    ``FAKE_AGENTAPI_CHATTER_LOG`` (a file logging each such change with its wall time),
    ``FAKE_AGENTAPI_STATUS_DELAYS`` (comma-separated pauses before the first ``/status``
    answers) and ``FAKE_AGENTAPI_MESSAGES_DELAY_S`` (pause before each ``/messages`` answer).
    """
    parser = argparse.ArgumentParser(prog="agentapi")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command")
    server = commands.add_parser("server", help="run the server")
    server.add_argument("--port", "-p", type=int, default=None)
    server.add_argument("--pid-file", default=None)
    server.add_argument("--state-file", default=None)
    server.add_argument("--type", "-t", default="claude")
    server.add_argument("--initial-prompt", "-I", default=None)
    server.add_argument("agent", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    version = os.environ.get("FAKE_AGENTAPI_VERSION") or DEFAULT_VERSION
    if args.version:
        print(f"agentapi version {version}")
        return 0
    if args.command != "server":
        parser.print_usage(sys.stderr)
        return 2
    fake, options = _prepare(args, version)
    return asyncio.run(_serve(fake, options))


def _env_bool(name: str, *, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    return value in {"1", "t", "true", "yes", "y", "on"}


def _say(text: str) -> None:
    print(f"agentapi: {text}", file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True)
class _ProcessOptions:
    version: str
    state_file: Path | None
    save: bool
    pid_file: Path | None
    save_delay_s: float
    ignore_sigterm: bool
    ready_after_s: float = 0.0
    """>0: the agent's start-up takes this long; until then message 0 is its start-up screen
    and the state file is not loaded (as with the real AgentAPI)."""
    load_from: Path | None = None
    prompt: str = ""


def _prepare(args: argparse.Namespace, version: str) -> tuple[FakeAgentAPI, _ProcessOptions]:
    """Read the environment, load the state file and the seed: all before serving."""
    env = os.environ
    port = args.port if args.port is not None else int(env.get("AGENTAPI_PORT") or 3284)
    state_path = args.state_file or env.get("AGENTAPI_STATE_FILE") or None
    state_file = Path(state_path) if state_path else None
    pid_path = args.pid_file or env.get("AGENTAPI_PID_FILE") or None
    options = _ProcessOptions(
        version=version,
        state_file=state_file,
        save=_env_bool("AGENTAPI_SAVE_STATE", default=state_file is not None),
        pid_file=Path(pid_path) if pid_path else None,
        save_delay_s=float(env.get("FAKE_AGENTAPI_SAVE_DELAY_S") or 0),
        ignore_sigterm=_env_bool("FAKE_AGENTAPI_IGNORE_SIGTERM", default=False),
        ready_after_s=float(env.get("FAKE_AGENTAPI_READY_AFTER_S") or 0),
    )
    fake = FakeAgentAPI(version=version, agent_type=args.type, port=port)
    delays = env.get("FAKE_AGENTAPI_STATUS_DELAYS") or ""
    fake.behaviour.status_delays = [float(d) for d in delays.split(",") if d.strip()]
    fake.behaviour.messages_delay_s = float(env.get("FAKE_AGENTAPI_MESSAGES_DELAY_S") or 0)
    load = _env_bool("AGENTAPI_LOAD_STATE", default=state_file is not None)
    prompt = args.initial_prompt or env.get("AGENTAPI_INITIAL_PROMPT") or ""
    if options.ready_after_s > 0:
        # Until the agent is ready: only its start-up screen, and a save in this window
        # writes exactly that with the prompt not sent.
        fake.add_message("agent", "Fake agent starting up...")
        # AgentAPI reports "changing" (HTTP "running") until its agent is ready
        # (lib/screentracker/pty_conversation.go statusLocked, initialPromptReady).
        fake.set_status("running")
        fake.initial_prompt = prompt.strip(" \t\n\r\f\v")
        fake.initial_prompt_sent = False
        load_from = state_file if load else None
        return fake, replace(options, load_from=load_from, prompt=prompt)
    if state_file is not None and load and state_file.exists():
        problem = fake.load_state(state_file)
        if problem is not None:
            _say(f"could not load state, starting empty: {problem}")
    _apply_initial_prompt(fake, args.initial_prompt or env.get("AGENTAPI_INITIAL_PROMPT") or "")
    if seed := env.get("FAKE_AGENTAPI_SEED"):
        for item in json.loads(Path(seed).read_text()):
            fake.add_message(item["role"], item["content"])
    return fake, options


def _write_pid_file(path: Path) -> None:
    path.write_text(f"{os.getpid()}\n")


async def _serve(fake: FakeAgentAPI, options: _ProcessOptions) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    save_lock = asyncio.Lock()
    saves: set[asyncio.Task[None]] = set()
    state_file = options.state_file

    async def save_now(reason: str) -> None:
        if state_file is None or not options.save:
            return
        async with save_lock:
            if options.save_delay_s > 0:
                await asyncio.sleep(options.save_delay_s)
            written = fake.save_state(state_file)
            _say(f"state {'saved' if written else 'unchanged, save skipped'} ({reason})")

    def on_save_signal() -> None:
        task = loop.create_task(save_now("SIGUSR1"))
        saves.add(task)
        task.add_done_callback(saves.discard)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        if sig == signal.SIGTERM and options.ignore_sigterm:
            signal.signal(sig, signal.SIG_IGN)
        else:
            loop.add_signal_handler(sig, stop.set)
    if _version_tuple(options.version) >= (0, 12, 0):
        loop.add_signal_handler(signal.SIGUSR1, on_save_signal)
    else:
        # Go ignores a signal the program never asked for: the real v0.10.0 and v0.11.8 live
        # on after SIGUSR1 and save nothing.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    await fake.start()
    chatter: asyncio.Task[None] | None = None
    try:
        if options.pid_file is not None:
            _write_pid_file(options.pid_file)
        if options.ready_after_s > 0:
            loop.call_later(
                options.ready_after_s, fake.become_ready, options.load_from, options.prompt
            )
        interval_ms = float(os.environ.get("FAKE_AGENTAPI_CHATTER_MS") or 0)
        if interval_ms > 0:
            log_path = os.environ.get("FAKE_AGENTAPI_CHATTER_LOG")
            chatter = loop.create_task(
                _chatter(fake, interval_ms / 1000, Path(log_path) if log_path else None)
            )
        print("ready", flush=True)
        await stop.wait()
        await save_now("shutdown")
    finally:
        if chatter is not None:
            chatter.cancel()
        await fake.close()
    return 0


async def _chatter(fake: FakeAgentAPI, interval_s: float, log_path: Path | None) -> None:
    """Change the conversation every ``interval_s``: alternately extend the last agent message
    and add a new one, like an agent streaming output. Each change is logged (wall time, id,
    content length) before the next, so a test that SIGKILLs everything knows what existed
    when. The log is written with plain ``write``: a SIGKILL does not lose the page cache."""
    log_file = log_path.open("a", buffering=1) if log_path is not None else None
    step = 0
    try:
        while True:
            await asyncio.sleep(interval_s)
            last = fake.messages[-1] if fake.messages else None
            if last is not None and last.role == "agent" and step % 2 == 1:
                message = fake.update_last(last.content + f" +{step}")
            else:
                role: Role = "user" if last is not None and last.role == "agent" else "agent"
                message = fake.add_message(role, f"chatter {step}")
            step += 1
            if log_file is not None:
                entry = {"t": time.time(), "id": message.id, "length": len(message.content)}
                log_file.write(json.dumps(entry) + "\n")
    finally:
        if log_file is not None:
            log_file.close()
