"""A real S3-compatible server on loopback for the replica's tests, and a proxy that breaks it.

The server is the Versity S3 Gateway (versitygw, Apache-2.0) built by
``scripts/install-s3server``: a real S3 API over a POSIX directory, so an object is a file we
can truncate to damage it, and the process is one we can SIGKILL mid-upload. Where Go is
installed (``AGENTAPI_PERSIST_REQUIRE_REAL_AGENTAPI=1``, set by ``scripts/test``) a missing
binary fails the test instead of skipping it.

``FaultProxy`` sits between the client and the server at the TCP level and, by mode, passes
bytes through, delays every answer, answers 503 (SlowDown) itself, or holds the connection
without ever answering: the client is never patched.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agentapi_persist.testing.server import free_port

from .real_agentapi import REQUIRE_ENV

VERSION = "v1.8.0"
ACCESS_KEY = "replica-test-access"
SECRET_KEY = "replica-test-secret-0123456789"
BUCKET = "conversations"


def binary() -> Path:
    """The installed server, or skip (fail where Go is installed) saying how to get it."""
    explicit = os.environ.get("AGENTAPI_PERSIST_S3_CACHE")
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    cache = Path(explicit) if explicit else Path(xdg) / "agentapi-persist" / "versitygw"
    path = cache / VERSION / "versitygw"
    if os.access(path, os.X_OK):
        return path
    reason = (
        f"the S3-compatible test server is not installed at {path}: run scripts/install-s3server"
    )
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1)")
    pytest.skip(reason)


def client_env(endpoint: str, *, secret: str = SECRET_KEY) -> dict[str, str]:
    """Credentials and endpoint as a workspace would set them; no shared config, no instance
    metadata lookups (the machine's own AWS setup must not leak into a test)."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_CONFIG_FILE": "/nonexistent/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@dataclass
class S3Server:
    """One running versitygw over ``root`` (each top-level directory is a bucket)."""

    root: Path
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = field(default=0)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, **overrides: str) -> dict[str, str]:
        return {**client_env(self.endpoint), **overrides}

    def object_path(self, key: str) -> Path:
        return self.root / BUCKET / key

    def objects(self, prefix: str = "") -> list[str]:
        """Every object key in the bucket under ``prefix``, from the directory itself."""
        base = self.root / BUCKET
        keys = [
            str(p.relative_to(base))
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        ]
        return sorted(k for k in keys if k.startswith(prefix))

    def start(self) -> None:
        self.starts += 1
        env = {
            "PATH": os.environ.get("PATH", ""),
            "ROOT_ACCESS_KEY": ACCESS_KEY,
            "ROOT_SECRET_KEY": SECRET_KEY,
        }
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(binary()), "--port", f"127.0.0.1:{self.port}", "posix", str(self.root)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"versitygw exited: {self.log.read_text()[-2000:]}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"versitygw did not listen: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no clean-up, connections cut mid-request."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


@contextlib.contextmanager
def s3_server(root: Path) -> Iterator[S3Server]:
    """A started server with the test bucket; killed on exit."""
    root.mkdir(parents=True, exist_ok=True)
    (root / BUCKET).mkdir(exist_ok=True)
    server = S3Server(root=root, port=free_port(), log=root.parent / f"{root.name}.log")
    server.start()
    try:
        yield server
    finally:
        server.kill()


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of ``upstream_port``; ``mode`` decides per
    connection: ``pass``, ``slow`` (every answer held ``delay_s``), ``error`` (a 503 SlowDown
    answered by the proxy), ``hang`` (the request read, no answer ever)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.mode = "pass"
        self.delay_s = 5.0
        self.port = 0
        self.requests = 0
        self.bytes_up = 0
        """Bytes forwarded to the server so far (an upload in progress shows here)."""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if self.mode == "pass" or self.mode == "slow":
                await self._forward(reader, writer)
            else:
                while await _read_request(reader):
                    self.requests += 1
                    if self.mode == "hang":
                        await asyncio.Event().wait()
                    body = (
                        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                        b"<Message>Please reduce your request rate.</Message></Error>"
                    )
                    writer.write(
                        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
                        + f"Content-Length: {len(body)}\r\n\r\n".encode()
                        + body
                    )
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, slow: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while chunk := await src.read(65536):
                    if slow and self.mode == "slow":
                        await asyncio.sleep(self.delay_s)
                    if not slow:
                        self.bytes_up += len(chunk)
                    dst.write(chunk)
                    await dst.drain()
            with contextlib.suppress(OSError):
                dst.write_eof()

        self.requests += 1
        try:
            await asyncio.gather(pump(reader, up_writer, False), pump(up_reader, writer, True))
        finally:
            up_writer.close()


async def _read_request(reader: asyncio.StreamReader) -> bool:
    """Read one HTTP request (head and Content-Length body); False at end of stream."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length:
        await reader.readexactly(length)
    return bool(head)


@contextlib.asynccontextmanager
async def fault_proxy(server: S3Server) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(server.port) as proxy:
        yield proxy
