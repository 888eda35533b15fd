"""The Coder log-snapshot client: one bounded, token-safe upload with a typed outcome.

Why a result object rather than exceptions: the shutdown sequence has to report every step's
outcome in its summary and decide the exit code from it, and a refused upload is an expected
event there, not a crash. Library users who prefer exceptions call ``raise_for_result``.

The token is honoured only while the stop build runs, so the client never waits long: transport
errors and 5xx are retried with a short backoff while the caller's budget lasts, everything else
is final at once. Redirects are never followed, because the token would travel with them.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import structlog

from ._http import client_timeout, transport_errors
from ._version import __version__
from .budget import Budget
from .config import SNAPSHOT_MAX_BYTES, CoderTarget
from .errors import CoderAPIError, ConfigError, cap_text

__all__ = ["CoderClient", "UploadOutcome", "UploadResult", "raise_for_result"]

log = structlog.get_logger(__name__)

#: Most bytes of any Coder answer we read: error bodies are small JSON, anything bigger is junk.
_RESPONSE_READ_CAP = 4096
#: First pause between retries; doubles after each failed attempt up to ``_BACKOFF_MAX_S``.
_BACKOFF_START_S = 0.05
_BACKOFF_MAX_S = 1.0
#: Least time worth starting another attempt with: a loopback round trip, with room to spare.
_MIN_ATTEMPT_S = 0.02
#: coderd's generic JSON answer for an /api/v2 route it does not have (``httpapi.RouteNotFound``).
_ROUTE_NOT_FOUND_MESSAGE = "Route not found."
_REDACTED = "[redacted]"


class UploadOutcome(StrEnum):
    """What became of one snapshot upload; stable strings for logs and ``status --json``."""

    DELIVERED = "delivered"
    """204: the server stored the snapshot (it replaces the previous one)."""
    SKIPPED = "skipped"
    """Not attempted, for a reason the caller gives (no task id, snapshots switched off)."""
    BAD_REQUEST = "bad_request"
    """400 (bad task id, query, JSON, or body over 64 KiB), or refused locally as oversize."""
    UNAUTHORIZED = "unauthorized"
    """401: bad token, or the stop build already finished."""
    ROUTE_MISSING = "route_missing"
    """404 without a task-level JSON answer: old Coder, or Coder >= 2.37 without Tasks."""
    TASK_NOT_FOUND = "task_not_found"
    """404 with a JSON body: the task is unknown, deleted, or another workspace's."""
    REDIRECT_REFUSED = "redirect_refused"
    """3xx: not followed, since the token would go with it."""
    SERVER_ERROR = "server_error"
    """5xx on every attempt until the budget ran out."""
    TRANSPORT_ERROR = "transport_error"
    """Refused, reset or cut short on every attempt until the budget ran out."""
    TIMED_OUT = "timed_out"
    """The budget ran out with no answer (a hung server, or nothing left to start with)."""
    UNEXPECTED = "unexpected"
    """A status the log-snapshot API does not use."""


@dataclass(frozen=True, slots=True)
class UploadResult:
    """One upload's outcome, with a sentence a person can act on. Never holds the token."""

    outcome: UploadOutcome
    status: int | None
    attempts: int
    duration_ms: int
    detail: str
    url: str | None = None
    """The endpoint without credentials, for error messages; ``None`` when nothing was sent."""

    @property
    def delivered(self) -> bool:
        """True only when the server stored the snapshot."""
        return self.outcome is UploadOutcome.DELIVERED

    @property
    def acceptable(self) -> bool:
        """Delivered, or the server has no log-snapshot route at all: no stop can ever
        upload there, so a stop must not fail on it (the registry's script succeeds too,
        "not supported by this Coder version"); the reason is still reported."""
        return self.outcome in (UploadOutcome.DELIVERED, UploadOutcome.ROUTE_MISSING)

    @classmethod
    def skipped(cls, *, detail: str) -> UploadResult:
        """A result for an upload the caller chose not to make, saying why."""
        return cls(UploadOutcome.SKIPPED, None, 0, 0, detail)


#: Failures that another attempt might fix; everything else is the server's final word.
_RETRYABLE = frozenset(
    {UploadOutcome.SERVER_ERROR, UploadOutcome.TRANSPORT_ERROR, UploadOutcome.TIMED_OUT}
)


def raise_for_result(result: UploadResult) -> None:
    """Raise ``CoderAPIError`` unless the snapshot was delivered, for exception-style callers."""
    if not result.delivered:
        raise CoderAPIError(result.detail, url=result.url, status=result.status)


@dataclass(slots=True)
class _Attempt:
    """What one request came back with, kept until we know whether another attempt follows."""

    outcome: UploadOutcome
    status: int | None = None
    body: bytes = b""
    location: str = ""
    error: str = ""


class CoderClient:
    """Uploads log snapshots for one task to one Coder server, within a caller's budget."""

    __slots__ = (
        "_display_url",
        "_headers",
        "_session",
        "_task_id",
        "_token",
        "_url",
        "interrupted",
    )

    def __init__(self, target: CoderTarget, *, session: aiohttp.ClientSession) -> None:
        # CoderTarget normally comes from validated Settings, but the class is public: check
        # again here, because the task id and base URL become part of a URL that carries a token.
        self._task_id = _canonical_task_id(target.task_id)
        base = _checked_base_url(target.base_url)
        self._token = target.token.get_secret_value()
        if (
            not self._token
            or not self._token.isascii()
            or not self._token.isprintable()
            or any(c.isspace() for c in self._token)
        ):
            raise ConfigError(
                "the Coder token is empty or holds characters an HTTP header cannot carry; "
                "check CODER_AGENT_TOKEN"
            )
        self.interrupted: UploadResult | None = None
        """The last upload's outcome so far when it was cancelled while retrying (the stop's
        deadline): its real reason, for the report."""
        path = f"/api/v2/workspaceagents/me/tasks/{self._task_id}/log-snapshot"
        self._url = f"{base}{path}?format=agentapi"
        parts = urlsplit(base)
        netloc = parts.hostname or ""
        if ":" in netloc:
            netloc = f"[{netloc}]"
        if parts.port is not None:
            netloc = f"{netloc}:{parts.port}"
        self._display_url = urlunsplit(
            (parts.scheme, netloc, parts.path + path, "format=agentapi", "")
        )
        self._session = session
        self._headers = {
            "Coder-Session-Token": self._token,
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": f"agentapi-persist/{__version__}",
        }

    def __repr__(self) -> str:
        return f"CoderClient(url={self._display_url!r})"

    def snapshot_url(self) -> str:
        """The upload URL: ``format=agentapi`` is its only query parameter."""
        return self._url

    async def upload_snapshot(self, payload: bytes, *, budget: Budget) -> UploadResult:
        """POST ``payload`` (compact UTF-8 JSON) and say what happened; never raises for HTTP.

        Retries transport errors and 5xx with a short backoff while ``budget`` lasts; returns
        promptly once it runs out, even when the server hangs. Cancellation propagates.
        """
        started = time.monotonic()
        size = len(payload)
        if size > SNAPSHOT_MAX_BYTES:
            detail = (
                f"the snapshot is {size:,} bytes, over the server's {SNAPSHOT_MAX_BYTES:,}-byte "
                "limit, so it was not sent: build it with the snapshot builder, which trims to fit"
            )
            return self._done(UploadOutcome.BAD_REQUEST, None, 0, started, size, detail, sent=False)

        attempts = 0
        backoff = _BACKOFF_START_S
        failures: list[_Attempt] = []
        self.interrupted = None
        try:
            while not budget.expired:
                attempts += 1
                attempt = await self._attempt(payload, budget)
                if attempt.outcome not in _RETRYABLE:
                    detail = self._final_detail(attempt, attempts)
                    return self._done(
                        attempt.outcome, attempt.status, attempts, started, size, detail
                    )
                failures.append(attempt)
                if not await self._pause_before_retry(attempt, attempts, backoff, budget):
                    break
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
        except asyncio.CancelledError:
            # Cut from outside (the stop's deadline) while retrying: what had failed so far is
            # the real reason, and the caller reports it rather than a bare "cut".
            worst = _most_telling(failures)
            if worst is not None:
                detail = self._exhausted_detail(worst, attempts, budget)
                self.interrupted = self._done(
                    worst.outcome, worst.status, attempts, started, size, detail
                )
            raise

        worst = _most_telling(failures)
        detail = self._exhausted_detail(worst, attempts, budget)
        outcome = worst.outcome if worst is not None else UploadOutcome.TIMED_OUT
        status = worst.status if worst is not None else None
        return self._done(outcome, status, attempts, started, size, detail, sent=attempts > 0)

    async def _pause_before_retry(
        self, attempt: _Attempt, attempts: int, backoff: float, budget: Budget
    ) -> bool:
        """Wait before the next attempt; ``False`` when no useful attempt fits any more."""
        # Shorten the pause so a last attempt still gets a useful slice; when even that
        # is not left, stop now and hand the rest of the budget back to the caller.
        pause = min(backoff, budget.remaining() - _MIN_ATTEMPT_S)
        log.info(
            "coder.upload_retry",
            attempt=attempts,
            outcome=str(attempt.outcome),
            status=attempt.status,
            error=attempt.error or None,
            retry_in_ms=round(pause * 1000) if pause > 0 else None,
        )
        if pause <= 0:
            return False
        await asyncio.sleep(pause)
        return True

    async def _attempt(self, payload: bytes, budget: Budget) -> _Attempt:
        """One POST, bounded twice: aiohttp's timeout, and a hard deadline around the body read."""
        timeout = client_timeout(budget)
        try:
            async with asyncio.timeout(budget.remaining()):
                async with self._session.post(
                    self._url,
                    data=payload,
                    headers=self._headers,
                    allow_redirects=False,
                    timeout=timeout,
                ) as response:
                    status = response.status
                    body = b"" if status == 204 else await _read_head(response)
                    location = response.headers.get("Location", "")
        except TimeoutError as exc:  # aiohttp's timeouts subclass it too
            return _Attempt(UploadOutcome.TIMED_OUT, error=type(exc).__name__)
        except transport_errors as exc:
            reason = cap_text(self._scrub(_transport_reason(exc)), 160)
            return _Attempt(UploadOutcome.TRANSPORT_ERROR, error=reason)
        return _Attempt(_classify(status, body), status, body, location)

    def _scrub(self, text: str) -> str:
        """Peer text goes into details and logs: make sure it cannot echo the token back.

        Scrub before capping, or a cut could leave half a token behind.
        """
        return text.replace(self._token, _REDACTED)

    def _server_said(self, body: bytes) -> str:
        """The server's own words, capped and scrubbed, as a clause to append to a sentence."""
        data = _json_object(body)
        if data is not None:
            parts = [str(data.get(key, "")) for key in ("message", "detail")]
            text = " ".join(part for part in parts if part)
        else:
            text = body.decode("utf-8", errors="replace").strip()
        return f' (server said: "{cap_text(self._scrub(text))}")' if text else ""

    def _final_detail(self, attempt: _Attempt, attempts: int) -> str:
        status = attempt.status
        said = self._server_said(attempt.body)
        tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
        match attempt.outcome:
            case UploadOutcome.DELIVERED:
                return f"the Coder server stored the log snapshot (204) after {tries}"
            case UploadOutcome.BAD_REQUEST:
                return (
                    "the Coder server rejected the upload as malformed (400: bad task id, query or "
                    f"JSON, or a body over 64 KiB){said}; retrying the same request will not help"
                )
            case UploadOutcome.UNAUTHORIZED:
                return (
                    "the Coder server refused the token (401): CODER_AGENT_TOKEN is wrong, or the "
                    "stop build already finished; the token is only honoured while the stop build "
                    f"runs: upload earlier{said}"
                )
            case UploadOutcome.ROUTE_MISSING:
                return (
                    "the Coder server has no log-snapshot route (404 without a task error): it is "
                    "older than task log snapshots, or Coder >= 2.37 where Tasks were removed; "
                    "retrying will not help, upgrade Coder or set ARG_TASK_LOG_SNAPSHOT=false"
                    f"{said}"
                )
            case UploadOutcome.TASK_NOT_FOUND:
                return (
                    f"the Coder server does not know task {self._task_id} (404 with a JSON body): "
                    "it was deleted, or belongs to another workspace; check ARG_TASK_ID"
                    f"{said}"
                )
            case UploadOutcome.REDIRECT_REFUSED:
                target = cap_text(self._scrub(attempt.location), 120) or "nowhere"
                return (
                    f"the Coder server answered {status} redirecting to {target}; redirects are "
                    "not followed because the token would go with them: set CODER_AGENT_URL to "
                    "the final address"
                )
            case _:
                return (
                    f"the Coder server answered {status}, which the log-snapshot API does not "
                    f"use, so the snapshot may not be stored{said}"
                )

    def _exhausted_detail(self, worst: _Attempt | None, attempts: int, budget: Budget) -> str:
        spent = f"{budget.total_s:g} s budget"
        if worst is None:
            return f"no time was left in the {spent}: the log snapshot was not sent"
        tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
        match worst.outcome:
            case UploadOutcome.SERVER_ERROR:
                said = self._server_said(worst.body)
                return (
                    f"the Coder server kept failing ({worst.status}) over {tries} within the "
                    f"{spent}; the log snapshot was not stored{said}"
                )
            case UploadOutcome.TRANSPORT_ERROR:
                return (
                    f"could not reach the Coder server over {tries} within the {spent} "
                    f"({worst.error}); check CODER_AGENT_URL and the network"
                )
            case _:
                return (
                    f"the Coder server did not answer within the {spent} ({tries}); "
                    "the log snapshot was probably not stored"
                )

    def _done(
        self,
        outcome: UploadOutcome,
        status: int | None,
        attempts: int,
        started: float,
        size: int,
        detail: str,
        *,
        sent: bool = True,
    ) -> UploadResult:
        ms = round((time.monotonic() - started) * 1000)
        level = log.info if outcome is UploadOutcome.DELIVERED else log.warning
        level(
            "coder.upload_done",
            outcome=str(outcome),
            status=status,
            attempts=attempts,
            ms=ms,
            bytes=size,
        )
        url = self._display_url if sent else None
        return UploadResult(outcome, status, attempts, ms, detail, url)


def _canonical_task_id(task_id: str) -> str:
    try:
        parsed = uuid.UUID(task_id)
    except (ValueError, TypeError, AttributeError):
        raise ConfigError(f"task id {cap_text(str(task_id), 64)!r} is not a UUID") from None
    if str(parsed) != task_id.lower():
        # uuid.UUID also takes braces, "urn:uuid:" and missing hyphens; only the canonical
        # form goes into a URL, so nothing can smuggle in a path segment.
        raise ConfigError(f"task id {cap_text(task_id, 64)!r} is not a canonical UUID")
    return str(parsed)


def _checked_base_url(base_url: str) -> str:
    parts = urlsplit(base_url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ConfigError("the Coder URL is not an http(s) URL with a host; check CODER_AGENT_URL")
    if parts.query or parts.fragment:
        raise ConfigError("the Coder URL must not carry a query or fragment (CODER_AGENT_URL)")
    return base_url.rstrip("/")


def _classify(status: int, body: bytes) -> UploadOutcome:
    if status == 204:
        return UploadOutcome.DELIVERED
    if status == 400:
        return UploadOutcome.BAD_REQUEST
    if status == 401:
        return UploadOutcome.UNAUTHORIZED
    if status == 404:
        data = _json_object(body)
        if data is None or data.get("message") == _ROUTE_NOT_FOUND_MESSAGE:
            return UploadOutcome.ROUTE_MISSING
        return UploadOutcome.TASK_NOT_FOUND
    if 300 <= status < 400:
        return UploadOutcome.REDIRECT_REFUSED
    if status >= 500:
        return UploadOutcome.SERVER_ERROR
    return UploadOutcome.UNEXPECTED


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body.decode("utf-8", errors="replace"))
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _most_telling(failures: list[_Attempt]) -> _Attempt | None:
    """A definite answer says more than silence: a 5xx, then a transport error, then the rest.

    The last attempt often starts with a sliver of budget and times out; reporting that would
    hide the 503s that came before it.
    """
    for kind in (UploadOutcome.SERVER_ERROR, UploadOutcome.TRANSPORT_ERROR):
        for attempt in reversed(failures):
            if attempt.outcome is kind:
                return attempt
    return failures[-1] if failures else None


async def _read_head(response: aiohttp.ClientResponse) -> bytes:
    """At most ``_RESPONSE_READ_CAP`` bytes of the body: enough for any error message."""
    chunks: list[bytes] = []
    size = 0
    while size < _RESPONSE_READ_CAP:
        chunk = await response.content.read(_RESPONSE_READ_CAP - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _transport_reason(exc: BaseException) -> str:
    """A failed connection in words. aiohttp's own text for a refused plain-HTTP connection
    reads "Cannot connect to host h:p ssl:default [...]", which sent people looking for a TLS
    problem on an http URL; TLS failures keep aiohttp's text, which is about TLS."""
    if isinstance(exc, aiohttp.ClientConnectorError) and not isinstance(
        exc, aiohttp.ClientSSLError
    ):
        error = exc.os_error
        # asyncio's strerror is "Connect call failed (addr)": the errno says it in words.
        why = os.strerror(error.errno) if error.errno else (error.strerror or str(error))
        return f"cannot connect to {exc.host}:{exc.port}: {why}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection without answering"
    return f"{type(exc).__name__}: {exc}"
