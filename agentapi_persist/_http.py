"""Shared HTTP plumbing: sessions with explicit timeouts, capped body reads, error mapping.

aiohttp's default total timeout is 300 s, far beyond any grace period, so every session and
every request here carries an explicit ``ClientTimeout`` derived from the caller's budget.
Peer bodies are read through ``read_capped`` so a peer that sends 100 MB (or never stops) costs
at most ``limit`` bytes of memory.
"""

from __future__ import annotations

import asyncio

import aiohttp

from .budget import Budget
from .errors import BodyTooLarge

__all__ = [
    "client_timeout",
    "make_session",
    "read_capped",
    "transport_errors",
]

#: The exceptions that mean "the request did not complete": refused, reset, hung, cut short.
transport_errors: tuple[type[BaseException], ...] = (
    aiohttp.ClientError,
    asyncio.TimeoutError,
    ConnectionError,
    OSError,
)


def client_timeout(budget: Budget, cap: float | None = None) -> aiohttp.ClientTimeout:
    """A per-request timeout: the whole request gets at most what the budget has left."""
    total = max(budget.slice(cap), 0.001)
    return aiohttp.ClientTimeout(total=total, sock_connect=total)


def make_session(*, total_timeout_s: float = 30.0) -> aiohttp.ClientSession:
    """One session per peer. ``trust_env`` stays off: a workspace proxy must not see loopback
    traffic or the Coder token, and redirects are refused per request where a token is sent."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=total_timeout_s),
        trust_env=False,
        connector=aiohttp.TCPConnector(limit=8, enable_cleanup_closed=False),
        raise_for_status=False,
    )


async def read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """Read the whole body, refusing (without buffering further) once it passes ``limit``."""
    declared = response.content_length
    if declared is not None and declared > limit:
        raise BodyTooLarge(
            f"body of {declared} bytes exceeds the {limit}-byte cap",
            url=str(response.url),
            status=response.status,
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(1 << 20):
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(
                f"body exceeds the {limit}-byte cap", url=str(response.url), status=response.status
            )
        chunks.append(chunk)
    return b"".join(chunks)
