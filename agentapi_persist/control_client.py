"""Client side of the sidecar's control channel, using only the standard library.

``agentapi-persist shutdown`` runs inside a grace period of a few seconds, and when a sidecar
is running all the work happens there; this module lets the command ask it without importing
aiohttp or pydantic (a few hundred milliseconds saved at every stop).

Protocol (one Unix stream socket, ``<state-dir>/control.sock``, directory 0700): the client
sends one JSON line ``{"op": ..., ...}``; the sidecar answers ``{"accepted": true}`` at once,
then one JSON line with the result. A sidecar that accepts the connection but does not say
``accepted`` within ``ACCEPT_TIMEOUT_S`` is treated as wedged, and the caller does the work
itself.
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager

from .errors import SidecarUnavailable

TYPE_CHECKING = False  # not `typing`: the client path counts every import
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

__all__ = [
    "ACCEPT_TIMEOUT_S",
    "SOCKET_NAME",
    "ask_sidecar",
    "socket_address",
]

SOCKET_NAME = "control.sock"
ACCEPT_TIMEOUT_S = 0.5
_MAX_REPLY_BYTES = 4 * 1024 * 1024


#: sun_path holds 108 bytes; longer paths go through a directory descriptor instead.
_SUN_PATH_MAX = 100


@contextmanager
def socket_address(path: str | os.PathLike[str]) -> Iterator[str]:
    """An address for ``path`` that fits a Unix socket, however deep the state directory.

    Long paths are reached as ``/proc/self/fd/<dir fd>/<name>``: still a filesystem socket,
    so the directory's 0700 mode keeps protecting it (an abstract socket would not).
    """
    text = os.fspath(path)
    if len(text.encode()) < _SUN_PATH_MAX:
        yield text
        return
    directory, name = os.path.split(text)
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


def ask_sidecar(
    state_dir: str | os.PathLike[str], request: dict[str, Any], *, timeout_s: float
) -> dict[str, Any]:
    """Send ``request`` to the sidecar and return its result, within ``timeout_s``.

    Raises ``SidecarUnavailable`` if nothing listens, it does not accept in time, or it dies
    before answering (safe to fall back), and ``TimeoutError`` if it accepted but did not
    finish in time (not safe to fall back: it may be writing right now).
    """
    deadline = time.monotonic() + timeout_s
    path = os.path.join(os.fspath(state_dir), SOCKET_NAME)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(min(ACCEPT_TIMEOUT_S, timeout_s))
        try:
            with socket_address(path) as address:
                sock.connect(address)
            sock.sendall(json.dumps(request).encode() + b"\n")
            reader = sock.makefile("rb")
            first = reader.readline(_MAX_REPLY_BYTES)
        except OSError as exc:
            raise SidecarUnavailable(f"no sidecar at {path}: {exc}") from None
        if not first or not json.loads(first).get("accepted"):
            raise SidecarUnavailable(f"the sidecar at {path} did not accept the request")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the sidecar accepted but the time ran out")
        sock.settimeout(remaining)
        try:
            line = reader.readline(_MAX_REPLY_BYTES)
        except TimeoutError:
            raise TimeoutError(
                f"the sidecar accepted the request but did not answer within {timeout_s:.1f}s"
            ) from None
        if not line:
            # It answers every request, errors included; a silent close means it died, and
            # a dead sidecar is not writing: the caller can safely do the work itself.
            raise SidecarUnavailable("the sidecar closed the connection without a result")
        result: dict[str, Any] = json.loads(line)
        return result
    finally:
        sock.close()
