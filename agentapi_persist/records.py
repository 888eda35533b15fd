"""Small records of what happened, kept in the state directory for ``status``.

``last-upload.json`` says when the last snapshot upload ran and how it ended; ``last-shutdown.json``
holds the last shutdown report. Both are written atomically (0600) and never hold the token:
they are built from outcome objects that do not carry it.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from ._fsutil import read_json_record, write_atomic
from .coder import UploadOutcome, UploadResult
from .errors import PersistError

__all__ = ["LAST_SHUTDOWN", "LAST_UPLOAD", "read_record", "record_upload", "write_record"]

log = structlog.get_logger(__name__)

LAST_UPLOAD = "last-upload.json"
LAST_SHUTDOWN = "last-shutdown.json"
_MAX_RECORD_BYTES = 64 * 1024


def write_record(state_dir: Path, name: str, record: dict[str, Any]) -> None:
    """Atomically replace the record ``name`` in ``state_dir``."""
    data = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
    write_atomic(state_dir / name, data)


def read_record(state_dir: Path, name: str) -> dict[str, Any] | None:
    """The record ``name``, or ``None`` if missing or unreadable (it is informational only)."""
    return read_json_record(state_dir / name, _MAX_RECORD_BYTES)


async def record_upload(
    state_dir: Path, result: UploadResult, *, messages: int, size: int, periodic: bool = False
) -> None:
    """Keep the upload's outcome in ``last-upload.json`` for ``status`` (never the token)."""
    record = {
        "at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "outcome": str(result.outcome),
        "delivered": result.outcome is UploadOutcome.DELIVERED,
        "status": result.status,
        "attempts": result.attempts,
        "messages": messages,
        "bytes": size,
        "detail": result.detail,
        "periodic": periodic,
    }
    try:
        await asyncio.to_thread(write_record, state_dir, LAST_UPLOAD, record)
    except PersistError as exc:
        log.warning("records.write_failed", error=str(exc))
