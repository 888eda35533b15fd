"""The lifecycle every loopback peer shares: serve an aiohttp app, know its URL, stop it.

A subclass builds its app (``_build_app``) and may release what it holds before the runner
stops (``_before_close``: hung requests, open streams). Handlers are cancelled when their
client goes away, so a peer told to hang ends with the connection.
"""

from __future__ import annotations

import socket
from types import TracebackType
from typing import Self

from aiohttp import web

__all__ = ["LoopbackServer", "free_port"]


class LoopbackServer:
    """An aiohttp application on ``host:port`` (port 0: a free one), used as
    ``async with Server(...) as server:``."""

    def __init__(
        self, *, host: str = "127.0.0.1", port: int = 0, shutdown_timeout_s: float = 1.0
    ) -> None:
        self._host = host
        self._port = port
        self._shutdown_timeout_s = shutdown_timeout_s
        self._runner: web.AppRunner | None = None
        self._url = ""

    @property
    def url(self) -> str:
        """``http://host:port`` once started."""
        if not self._url:
            raise RuntimeError("the server is not started")
        return self._url

    def _build_app(self) -> web.Application:
        raise NotImplementedError

    async def _before_close(self) -> None:
        """Release what would keep the runner from stopping (hung handlers, streams)."""

    async def start(self) -> None:
        """Listen on ``host:port`` and start answering."""
        self._runner = web.AppRunner(
            self._build_app(),
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=self._shutdown_timeout_s,
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()
        host, port = self._runner.addresses[0][:2]
        self._url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def close(self) -> None:
        """Stop listening (what ``_before_close`` releases first, then the runner)."""
        await self._before_close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for ``agentapi server --port``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
