"""Server side of the sidecar's control channel (the client is ``control_client``).

A Unix stream socket in the state directory (0700, socket 0600): only the workspace user can
reach it, and nothing listens on the network. Each connection carries one request line and
gets ``{"accepted": true}`` at once, then one result line. Every request gets a result, errors
included, so a client that sees the connection close without one knows the sidecar died.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from ._fsutil import ensure_private_dir
from .control_client import SOCKET_NAME, socket_address
from .errors import ControlUnavailable, PersistError, SidecarAlreadyRunning

__all__ = ["ControlServer", "ControlUnavailable", "Handler", "SidecarAlreadyRunning"]

log = structlog.get_logger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
_MAX_REQUEST_BYTES = 64 * 1024
_REQUEST_TIMEOUT_S = 5.0


class ControlServer:
    """Listen on ``<state_dir>/control.sock`` and hand each request to ``handler``."""

    def __init__(self, state_dir: Path, handler: Handler) -> None:
        self.path = state_dir / SOCKET_NAME
        self._state_dir = state_dir
        self._handler = handler
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind the socket, replacing a stale one; refuse if a live sidecar owns it.

        Raises ``ControlUnavailable`` saying why when nothing can listen there (a read-only
        or full filesystem, ``/proc``): the sidecar then goes on without a control channel.
        Something that is not a socket at the socket's name is moved aside, never deleted.
        """
        try:
            await asyncio.to_thread(ensure_private_dir, self._state_dir)
            await asyncio.to_thread(self._clear_the_name)
        except (OSError, PersistError) as exc:
            if isinstance(exc, SidecarAlreadyRunning):
                raise
            raise ControlUnavailable(f"cannot listen on {self.path}: {exc}") from None
        old_umask = os.umask(0o177)  # the socket is created 0600, with no window
        try:
            with socket_address(self.path) as address:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.bind(address)
                except OSError as exc:
                    sock.close()
                    why = exc.strerror or str(exc)
                    raise ControlUnavailable(f"cannot listen on {self.path}: {why}") from None
            self._server = await asyncio.start_unix_server(
                self._serve_connection, sock=sock, limit=_MAX_REQUEST_BYTES
            )
        finally:
            os.umask(old_umask)
        log.info("control.listening", path=str(self.path))

    def _clear_the_name(self) -> None:
        """A stale socket is removed; anything else there is kept under another name."""
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        if stat.S_ISSOCK(info.st_mode):
            if _answers(self.path):
                raise SidecarAlreadyRunning(
                    f"another sidecar is running on {self._state_dir} (its control socket "
                    "answers); one sidecar per state directory"
                )
            self.path.unlink()
            return
        aside = self.path.with_name(f"{self.path.name}.not-a-socket-{os.getpid()}-{time.time_ns()}")
        os.rename(self.path, aside)
        log.warning("control.moved_aside", path=str(self.path), moved_to=str(aside))

    async def close(self) -> None:
        """Stop listening, wait for requests in flight, remove the socket file."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=1.0)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._exchange(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            log.info("control.client_gone")
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT_S):
                line = await reader.readline()
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                raise ValueError("a request is a JSON object with a string 'op'")
        except (ValueError, RecursionError, TimeoutError, asyncio.LimitOverrunError) as exc:
            # RecursionError: JSON nested deeper than the interpreter's stack allows.
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
            await _send(writer, {"accepted": False, "error": f"bad request: {reason}"})
            return
        await _send(writer, {"accepted": True})
        log.info("control.request", op=request["op"])
        try:
            result = await self._handler(request)
        except PersistError as exc:
            result = {"ok": False, "error": str(exc), "exit_code": int(exc.exit_code)}
        await _send(writer, result)


async def _send(writer: asyncio.StreamWriter, payload: dict[str, Any]) -> None:
    writer.write(json.dumps(payload, ensure_ascii=False).encode() + b"\n")
    await writer.drain()


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock, socket_address(path) as address:
        sock.settimeout(0.5)
        try:
            sock.connect(address)
        except OSError:
            return False
    return True
