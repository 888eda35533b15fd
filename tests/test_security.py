"""Security promises, checked on the real commands as processes.

* Permissions: under ``umask 000`` (the worst case), every file the product creates is 0600
  and every directory 0700: the state directory and the parents it had to create, ``archive/``,
  generations, journals, history records, quarantined bytes, AgentAPI's rewritten state file
  and directory, and the control socket while the sidecar runs.
* The Coder token (a canary value) appears in no process title (``/proc/<pid>/cmdline`` and
  every thread's ``comm``; ``environ`` holds it by design: that is where it comes from), no
  log line at debug level, no error message or result, and no file, even when the Coder
  server echoes it back in an error body or a redirect.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web

from agentapi_persist.agentapi_state import render_agentapi_state
from agentapi_persist.models import Conversation
from agentapi_persist.store import StateStore
from agentapi_persist.testing.agentapi import FakeAgentAPI
from agentapi_persist.testing.coder import FakeCoder

from .cli_support import run_cli
from .conftest import CANARY_TOKEN, TASK_ID, coder_env, make_messages
from .peers_support import assert_token_nowhere, dead_url, new_workspace
from .sidecar_support import eventually, sidecar_process, stored_count

OPEN_UMASK = ("sh", "-c", 'umask 000; exec "$@"', "sh")
"""A command prefix: run the rest with umask 000."""


def conversation(n: int, prefix: str) -> Conversation:
    return Conversation(
        messages=tuple(make_messages(n, prefix=prefix)),
        initial_prompt="do the thing",
        initial_prompt_sent=True,
        prompt_origin="agentapi_state",
    )


def modes(root: Path, *, skip: set[Path]) -> dict[str, tuple[str, int]]:
    """Kind and permission bits of everything under ``root`` except ``skip``."""
    out: dict[str, tuple[str, int]] = {}
    for path in sorted(root.rglob("*")):
        if path in skip:
            continue
        info = path.lstat()
        kind = (
            "dir" if stat.S_ISDIR(info.st_mode)
            else "socket" if stat.S_ISSOCK(info.st_mode)
            else "link" if stat.S_ISLNK(info.st_mode)
            else "file"
        )  # fmt: skip
        out[str(path.relative_to(root))] = (kind, stat.S_IMODE(info.st_mode))
    return out


def assert_private(found: dict[str, tuple[str, int]]) -> None:
    wrong = {
        name: f"{kind} {mode:04o}"
        for name, (kind, mode) in found.items()
        if mode != (0o700 if kind == "dir" else 0o600)
    }
    assert not wrong, wrong


async def test_everything_created_under_umask_000_is_private(tmp_path: Path) -> None:
    """restore (quarantining bad bytes on both sides), shutdown (archiving a diverged copy,
    uploading, recording history) and the sidecar (journal, socket) all run with umask 000:
    every directory the product made or wrote in is 0700, every file and the socket 0600."""
    ws = new_workspace(tmp_path / "ws")
    ws.module_dir.chmod(0o755)  # AgentAPI's directory, made by the module: never changed
    planted: set[Path] = {ws.module_dir}

    # restore: a damaged generation on our side, a torn file on AgentAPI's.
    store = StateStore(ws.state_dir)
    store.save(conversation(4, "old"))
    store.save(conversation(5, "old"))
    (ws.state_dir / "conversation-000000000002.json").write_bytes(b"torn")
    ws.state_file.write_bytes(render_agentapi_state(conversation(5, "old"))[:-20])
    ws.state_file.chmod(0o644)
    for path in (ws.home / ".local", ws.home / ".local" / "state", ws.state_dir):
        path.chmod(0o755)  # as if chmodded by someone else: an existing mode is never changed
    planted |= {ws.home / ".local", ws.home / ".local" / "state", ws.state_dir}
    with dead_url() as dead:
        result = await run_cli(
            ws.process_env(), "restore", "--json", "--agentapi-url", dead, prefix=[*OPEN_UMASK]
        )
    assert result.code == 0, result.stdout + result.stderr
    assert len(json.loads(result.stdout)["quarantined"]) == 2

    # shutdown without a sidecar: AgentAPI now holds another conversation (archive/ is made).
    async with (
        FakeCoder(token=CANARY_TOKEN, task_ids={TASK_ID}) as coder,
        FakeAgentAPI(messages=make_messages(6, prefix="new")) as agent,
    ):
        env = {**coder_env(coder), "AGENTAPI_PERSIST_AGENTAPI_URL": agent.url}
        result = await run_cli(ws.process_env(**env), "shutdown", prefix=[*OPEN_UMASK])
        assert result.code == 0, result.stdout + result.stderr
        assert list((ws.state_dir / "archive").iterdir())

        # The sidecar for a moment: journal appends, the control socket, then a stop.
        async with sidecar_process(ws, command=OPEN_UMASK, env=env) as sidecar:
            agent.add_message("user", "one more")
            await eventually(lambda: stored_count(ws) == 7)
            socket_mode = stat.S_IMODE((ws.state_dir / "control.sock").lstat().st_mode)
            while_running = modes(ws.home, skip=planted)
            sidecar.proc.send_signal(signal.SIGTERM)
            assert await sidecar.wait() == 0

    assert socket_mode == 0o600
    socket_name = str((ws.state_dir / "control.sock").relative_to(ws.home))
    assert while_running[socket_name] == ("socket", 0o600)
    assert_private(while_running)
    after = modes(ws.home, skip=planted)
    assert any(name.endswith(".log") for name in after)  # a journal was written
    assert any(".corrupt-" in name for name in after)  # quarantined bytes on both sides
    assert "\n".join(after).count(".corrupt-") >= 2
    assert_private(after)
    for path in planted:  # what existed keeps its mode: never tightened, never loosened
        assert stat.S_IMODE(path.stat().st_mode) == 0o755, path


async def test_missing_parents_are_created_private(tmp_path: Path) -> None:
    """A fresh home without ``~/.local``: under umask 000 the parents the product has to
    create for its state directory are 0700 too, not world-writable (a writable parent would
    let anyone swap the state directory for a symlink)."""
    ws = new_workspace(tmp_path / "ws")
    ws.state_file.write_bytes(render_agentapi_state(conversation(3, "m")))
    with dead_url() as dead:
        result = await run_cli(
            ws.process_env(), "restore", "--agentapi-url", dead, prefix=[*OPEN_UMASK]
        )
    assert result.code == 0, result.stdout + result.stderr
    for path in (ws.home / ".local", ws.home / ".local" / "state", ws.state_dir):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    (generation,) = ws.state_dir.glob("conversation-*.json")
    assert stat.S_IMODE(generation.stat().st_mode) == 0o600


# -- the token canary ---------------------------------------------------------------------------


def process_title(pid: int) -> bytes:
    """What ``ps`` shows of a process: its command line and every thread's name."""
    proc = Path(f"/proc/{pid}")
    parts = [(proc / "cmdline").read_bytes(), (proc / "comm").read_bytes()]
    parts += [(task / "comm").read_bytes() for task in (proc / "task").iterdir()]
    return b"\n".join(parts)


def assert_no_token(data: bytes | str) -> None:
    raw = data.encode() if isinstance(data, str) else data
    assert CANARY_TOKEN.encode() not in raw
    assert CANARY_TOKEN[:12].encode() not in raw


@asynccontextmanager
async def echoing_coder() -> AsyncIterator[str]:
    """A Coder-like server that repeats the token it was sent: in a 401 body on the snapshot
    route, and in a redirect's ``Location`` on ``/moved`` (as a careless proxy would)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        token = request.headers.get("Coder-Session-Token", "")
        if request.path.startswith("/moved"):
            raise web.HTTPTemporaryRedirect(f"http://127.0.0.1:1/next?session={token}")
        return web.json_response(
            {"message": f"token {token} is not valid", "detail": f"got {token!r}"}, status=401
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def test_token_never_in_titles_logs_results_or_files(tmp_path: Path) -> None:
    """The sidecar (debug logs, a periodic upload), `shutdown` through it and without it (a
    hung Coder, so the process can be looked at while it runs), `snapshot` and `status`, and
    a Coder server that echoes the token back: the canary shows up in none of the process
    titles, log lines, results, error messages, or files left behind."""
    ws = new_workspace(tmp_path / "ws")
    debug = {"AGENTAPI_PERSIST_LOG_LEVEL": "debug"}
    outputs: list[str] = []
    async with (
        FakeCoder(token=CANARY_TOKEN, task_ids={TASK_ID}) as coder,
        FakeAgentAPI(messages=make_messages(8)) as agent,
    ):
        env = {**coder_env(coder), **debug, "AGENTAPI_PERSIST_AGENTAPI_URL": agent.url}
        async with sidecar_process(ws, "--snapshot-interval", "0.1", env=env) as sidecar:
            assert CANARY_TOKEN.encode() in Path(f"/proc/{sidecar.proc.pid}/environ").read_bytes()
            await eventually(lambda: stored_count(ws) == 8)
            agent.set_status("running")
            agent.add_message("agent", "working on it")
            agent.set_status("stable")
            await eventually(lambda: len(coder.uploads) >= 1)
            assert_no_token(process_title(sidecar.proc.pid))
            for command in (("status", "--json"), ("snapshot", "--dry-run"), ("shutdown",)):
                result = await run_cli(ws.process_env(**env), *command)
                assert result.code == 0, result.stdout + result.stderr
                outputs += [result.stdout, result.stderr]
            assert "(via sidecar)" in outputs[-2]
            assert await sidecar.wait() == 0
        outputs.append(json.dumps(sidecar.events) + "".join(sidecar.other))
        assert any(e.get("level") == "debug" for e in sidecar.events)

    # Without a sidecar, against a server that never answers: look at the live process.
    async with FakeCoder(token=CANARY_TOKEN, task_ids={TASK_ID}, hang=True) as hung:
        env = {**coder_env(hung), **debug, "AGENTAPI_PERSIST_AGENTAPI_URL": "http://127.0.0.1:9"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agentapi_persist", "shutdown", "--grace", "3",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=ws.process_env(**env),
        )  # fmt: skip
        await eventually(lambda: len(hung.uploads) >= 1, within=10)  # it is mid-upload now
        title = process_title(proc.pid)
        assert b"agentapi_persist" in title
        assert_no_token(title)
        out, err = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 4, out + err
        outputs += [out.decode(), err.decode()]

    # A server that echoes the token: in an error body, and in a redirect's target.
    async with echoing_coder() as url:
        for base in (url, url + "/moved"):
            env = {**debug, "ARG_TASK_ID": TASK_ID, "CODER_AGENT_URL": base}
            env |= {"CODER_AGENT_TOKEN": CANARY_TOKEN}
            for command in (("snapshot", "--json"), ("shutdown", "--json")):
                result = await run_cli(
                    ws.process_env(**env), *command, "--agentapi-url", "http://127.0.0.1:9"
                )
                assert result.code == 4, result.stdout + result.stderr
                outputs += [result.stdout, result.stderr]
    assert any("401" in text for text in outputs)
    assert any("redirect" in text for text in outputs)

    for text in outputs:
        assert_no_token(text)
    searched = assert_token_nowhere(ws.root, *outputs)
    assert searched >= 5  # generations, journal, history records were all searched
    assert os.path.exists(ws.state_dir / "last-upload.json")
