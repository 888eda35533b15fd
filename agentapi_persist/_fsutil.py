"""Durable file primitives: atomic replace, durable append, private dirs, quarantine, capped reads.

Each function does one job synchronously, so it works without an event loop and async callers
can run it in one executor hop (``asyncio.to_thread``). A thread cannot be cancelled half way,
and the ordering below makes that harmless: a file is either the old copy or the complete new one.

The atomic replace follows SPEC section 4 step by step:

1. open the parent directory without following a symlink (created 0700 if missing, and
   ``fchmod`` 0700 on every write even under umask 000);
2. refuse a symlink planted at the target;
3. create a temp file *exclusively*, with a random name, in that same directory;
4. write every byte (short writes loop), ``fsync`` the file, close it;
5. ``rename`` it over the target, then ``fsync`` the directory so the rename itself is durable;
6. delete this target's temp files that writes killed half way left behind (older than 5 min).

Any failure removes the temp file and raises ``DurabilityError`` naming the step. A failed
``fsync`` is never retried: after EIO the kernel may have dropped the dirty pages, so a second
``fsync`` that "succeeds" proves nothing. All paths are opened relative to the directory's file
descriptor, so a directory swapped for a symlink half way cannot redirect a write.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
import time
from collections.abc import Generator, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from .errors import DurabilityError, PersistError, StateFileError

__all__ = [
    "append_durable",
    "ensure_private_dir",
    "fsync_dir",
    "quarantine",
    "read_capped_chunks",
    "read_capped_file",
    "read_json_record",
    "write_atomic",
]

log = structlog.get_logger(__name__)

_DIR_MODE = 0o700
_FILE_MODE = 0o600
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Room for the ".", ".<random>.tmp" decoration inside NAME_MAX (255).
_TMP_NAME_KEEP = 200
# A temp file this old belongs to a write that was killed half way, never to one in flight.
_STALE_TEMP_AGE_S = 300.0


def _why(exc: OSError) -> str:
    """``Input/output error [EIO]``: the errno text a person reads plus the name they search."""
    name = errno.errorcode.get(exc.errno or 0)
    text = exc.strerror or str(exc)
    return f"{text} [{name}]" if name else text


def _open_private_dir(path: Path) -> int:
    """Create ``path`` (0700) if missing and open it without following a symlink.

    Returns an ``O_DIRECTORY`` descriptor that the caller closes. A symlink here could point
    the write anywhere on the machine, so it is refused rather than followed. The mode of a
    directory that already existed is never changed: it may be ``$HOME`` or a directory
    shared with other tools (``status`` reports a state directory others can read); the
    files written in it are 0600 whatever the directory's mode.
    """
    try:
        if path.is_symlink():
            raise DurabilityError(
                f"refusing to use directory {path}: it is a symlink (not following it); "
                "nothing was written"
            )
        created = _make_dirs(path)
        fd = os.open(path, _DIR_FLAGS)
    except DurabilityError:
        raise
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and path.is_symlink():
            raise DurabilityError(
                f"refusing to use directory {path}: it is a symlink (not following it); "
                "nothing was written"
            ) from None
        raise DurabilityError(
            f"cannot prepare directory {path}: {_why(exc)}; nothing was written"
        ) from exc
    if not created:
        return fd
    try:
        os.fchmod(fd, _DIR_MODE)  # exactly 0700, whatever the umask took away
    except OSError as exc:
        os.close(fd)
        raise DurabilityError(
            f"cannot make directory {path} private (chmod 0700): {_why(exc)}; nothing was written"
        ) from exc
    return fd


def _make_dirs(path: Path) -> bool:
    """``mkdir -p`` where every directory created, parents included, is 0700; True when
    ``path`` itself was created here.

    ``Path.mkdir(parents=True)`` makes missing parents 0777 minus the umask: world-writable
    under umask 000, and a writable parent lets anyone swap the private directory itself.
    """
    try:
        os.mkdir(path, _DIR_MODE)
    except FileExistsError:
        return False
    except FileNotFoundError:
        if path.parent == path:
            raise
        _make_dirs(path.parent)
        try:
            os.mkdir(path, _DIR_MODE)
        except FileExistsError:
            return False
    return True


def _open_dir(path: Path, *, doing: str) -> int:
    """Open an existing directory without following a symlink in its place."""
    try:
        return os.open(path, _DIR_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and path.is_symlink():
            raise DurabilityError(
                f"refusing to {doing} in {path}: it is a symlink (not following it); "
                "nothing was changed"
            ) from None
        raise DurabilityError(
            f"cannot open directory {path} to {doing}: {_why(exc)}; nothing was changed"
        ) from exc


def ensure_private_dir(path: Path) -> None:
    """``mkdir -p`` with mode 0700 for what is missing (an existing directory keeps its
    mode); refuse a symlink."""
    os.close(_open_private_dir(path))


def fsync_dir(path: Path) -> None:
    """Make renames, creations and deletions in ``path`` durable (the directory's own fsync)."""
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError as exc:
        raise DurabilityError(f"cannot open directory {path} to fsync it: {_why(exc)}") from exc
    try:
        os.fsync(fd)
    except OSError as exc:
        raise DurabilityError(f"directory fsync of {path} failed: {_why(exc)}") from exc
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """``write`` until every byte is in: a short write is legal and must not lose the rest."""
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _refuse_symlink_target(dir_fd: int, path: Path) -> None:
    try:
        info = os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise DurabilityError(f"cannot inspect {path}: {_why(exc)}; nothing was written") from exc
    if stat.S_ISLNK(info.st_mode):
        raise DurabilityError(
            f"refusing to write {path}: it is a symlink (not following it); "
            "its target was left untouched"
        )
    if not stat.S_ISREG(info.st_mode):
        raise DurabilityError(f"refusing to write {path}: it exists and is not a regular file")


def write_atomic(
    path: Path, data: bytes | bytearray | memoryview | Iterable[bytes], *, mode: int = _FILE_MODE
) -> None:
    """Replace ``path`` with ``data`` so that a crash at any instant leaves old or new, never
    a mix; return only once the new content and the rename are on disk.

    ``data`` may be chunks (a header and a body), or an iterator of them read once as they
    are written, so large bodies are not copied into one buffer first. Raises
    ``DurabilityError`` saying which step failed; on every failure
    before the rename the previous file is untouched and no temp file is left behind.
    """
    chunks: Iterable[bytes | bytearray | memoryview] = (
        (data,) if isinstance(data, bytes | bytearray | memoryview) else data
    )
    dir_fd = _open_private_dir(path.parent)
    tmp = f".{path.name[:_TMP_NAME_KEEP]}.{secrets.token_hex(8)}.tmp"
    created = renamed = False
    step = "create temp file"
    try:
        _refuse_symlink_target(dir_fd, path)
        fd = os.open(tmp, _TMP_FLAGS, _FILE_MODE, dir_fd=dir_fd)
        created = True
        try:
            step = "chmod"
            os.fchmod(fd, mode)
            step = "write"
            for chunk in chunks:
                _write_all(fd, chunk)
            step = "fsync"
            os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        step = "close"
        os.close(fd)
        step = "rename"
        os.replace(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        renamed = True
        step = "directory fsync"
        os.fsync(dir_fd)
        _sweep_stale_temps(dir_fd, path)
    except OSError as exc:
        if renamed:
            raise DurabilityError(
                f"wrote {path} but the directory fsync failed: {_why(exc)}; the new file is in "
                "place but not proven durable (a power loss could still undo the rename)"
            ) from exc
        raise DurabilityError(
            f"could not write {path}: {step} failed: {_why(exc)}; the previous copy was kept"
        ) from exc
    finally:
        if created and not renamed:
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except OSError as cleanup_exc:  # the real error is already on its way up
                log.warning(
                    "fs.temp_cleanup_failed", path=str(path.parent / tmp), error=_why(cleanup_exc)
                )
        os.close(dir_fd)


def _sweep_stale_temps(dir_fd: int, path: Path) -> None:
    """Delete temp files that earlier writes of ``path`` left when they were killed half way.

    Without this, every write killed mid-way (a SIGKILL at the end of a grace period, say)
    would leave a copy the size of the file behind for good. Only our own temp names for this
    target, only regular files, only older than ``_STALE_TEMP_AGE_S`` (a concurrent writer's
    temp is never touched). Best effort: a failure is logged, the write already succeeded.
    """
    prefix = f".{path.name[:_TMP_NAME_KEEP]}."
    try:
        names = os.listdir(dir_fd)
    except OSError as exc:
        log.warning("fs.temp_sweep_failed", path=str(path.parent), error=_why(exc))
        return
    now = time.time()
    for name in names:
        token = name[len(prefix) : -len(".tmp")]
        if not (name.startswith(prefix) and name.endswith(".tmp") and _is_token(token)):
            continue
        try:
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISREG(info.st_mode) and now - info.st_mtime > _STALE_TEMP_AGE_S:
                os.unlink(name, dir_fd=dir_fd)
                log.info("fs.stale_temp_removed", path=str(path.parent / name))
        except OSError as exc:
            log.warning("fs.temp_sweep_failed", path=str(path.parent / name), error=_why(exc))


def _is_token(text: str) -> bool:
    """``secrets.token_hex(8)``: exactly 16 lowercase hex digits."""
    return len(text) == 16 and all(c in "0123456789abcdef" for c in text)


def append_durable(
    path: Path,
    data: bytes,
    *,
    offset: int,
    expect_size: int | None = None,
    mode: int = _FILE_MODE,
) -> None:
    """Write ``data`` at ``offset`` of ``path`` (created if missing) and ``fsync`` it once.

    ``offset`` is where the caller's last known-good byte ends: anything after it (a torn record
    from a crash, or a write that failed half way) is cut off first, in the same fsync. Cost is
    the size of ``data``, whatever the size of the file. The directory is fsynced only when the
    file is new. A file shorter than ``offset`` means someone else changed it: refused.
    ``expect_size`` is the size the caller last saw (``None``: unknown, after a failed
    write): a file of another size was written by someone else, and cutting it would erase
    their records, so it is refused too.
    """
    dir_fd = _open_private_dir(path.parent)
    step = "open"
    try:
        created = False
        try:
            fd = os.open(path.name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except FileNotFoundError:
            fd = os.open(path.name, _TMP_FLAGS, _FILE_MODE, dir_fd=dir_fd)
            created = True
        try:
            step = "chmod"
            os.fchmod(fd, mode)
            size = os.fstat(fd).st_size
            if expect_size is not None and size != expect_size and size > offset:
                raise DurabilityError(
                    f"could not append to {path}: it holds {size} bytes where this writer left "
                    f"{expect_size}; another process wrote to it, so nothing was cut or appended"
                )
            if size < offset:
                raise DurabilityError(
                    f"could not append to {path}: it holds {size} bytes but {offset} were "
                    "written before; it changed under us, so nothing was appended"
                )
            if size > offset:
                step = "truncate"
                os.ftruncate(fd, offset)
            step = "write"
            _pwrite_all(fd, data, offset)
            step = "fsync"
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            step = "directory fsync"
            os.fsync(dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DurabilityError(
                f"refusing to append to {path}: it is a symlink (not following it)"
            ) from exc
        raise DurabilityError(
            f"could not append to {path}: {step} failed: {_why(exc)}; the records written "
            "before this append were kept"
        ) from exc
    finally:
        os.close(dir_fd)


def quarantine(path: Path, *, into: Path | None = None, reason: str) -> Path:
    """Move unusable bytes aside instead of deleting them; return where they went.

    The new name is ``<name>.corrupt-<UTC timestamp>-<random>`` next to the file (or in
    ``into``, which must be on the same filesystem: this is a rename, never a copy). The file is
    made 0600 and the directory fsynced, so the move survives a crash. Nothing is ever deleted.
    Like every write here it works through directory descriptors opened without following a
    symlink: a directory swapped for a symlink cannot make it move someone else's file.
    """
    target_dir = path.parent if into is None else into
    if into is not None:
        ensure_private_dir(into)
    src_fd = _open_dir(path.parent, doing=f"move {path.name} aside")
    try:
        dst_fd = src_fd if into is None else _open_dir(into, doing=f"move {path.name} aside")
        try:
            return _quarantine_at(path, src_fd, target_dir, dst_fd, reason)
        finally:
            if dst_fd != src_fd:
                os.close(dst_fd)
    finally:
        os.close(src_fd)


def _quarantine_at(path: Path, src_fd: int, target_dir: Path, dst_fd: int, reason: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    while True:
        name = f"{path.name}.corrupt-{stamp}-{secrets.token_hex(3)}"
        try:
            os.stat(name, dir_fd=dst_fd, follow_symlinks=False)
        except OSError:  # free (or unreadable: then the rename below says why)
            break
    dest = target_dir / name
    try:
        os.rename(path.name, name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
    except OSError as exc:
        raise DurabilityError(
            f"could not move {path} aside: {_why(exc)}; it was left where it was"
        ) from exc
    try:
        if not stat.S_ISLNK(os.stat(name, dir_fd=dst_fd, follow_symlinks=False).st_mode):
            os.chmod(name, _FILE_MODE, dir_fd=dst_fd)
    except OSError as exc:
        log.warning("fs.quarantine_chmod_failed", path=str(dest), error=_why(exc))
    try:
        os.fsync(dst_fd)
        if dst_fd != src_fd:
            os.fsync(src_fd)
    except OSError as exc:
        raise DurabilityError(
            f"moved {path} aside to {dest}, but the directory fsync failed: {_why(exc)}; "
            "the move is not proven durable"
        ) from exc
    log.warning("fs.quarantined", path=str(path), moved_to=str(dest), reason=reason)
    return dest


def read_json_record(path: Path, limit: int = 64 * 1024) -> dict[str, Any] | None:
    """A small JSON object kept beside the copy (a record, not the conversation): ``None``
    when it is missing, a symlink, over ``limit`` bytes, not JSON, or not an object.
    Never raises: every such record is advisory, and its absence has a safe meaning."""
    try:
        data = json.loads(read_capped_file(path, limit))
    except (OSError, PersistError, ValueError, RecursionError):  # RecursionError: too deep
        return None
    return data if isinstance(data, dict) else None


def read_capped_file(path: Path, limit: int) -> bytes:
    """Read a whole regular file of at most ``limit`` bytes, never following a symlink.

    ``FileNotFoundError`` passes through (callers treat "missing" differently from "bad").
    Opening non-blocking means a FIFO planted at ``path`` cannot hang us; it is refused after
    ``fstat`` like any other non-regular file. Everything else raises ``StateFileError``.
    """
    # One read of the whole file (and one more that sees its end): joining one chunk is free.
    return b"".join(read_capped_chunks(path, limit))


def read_capped_chunks(
    path: Path, limit: int, size: int | None = None
) -> Generator[bytes, None, None]:
    """``read_capped_file`` as chunks of up to ``size`` bytes (default: what is left of the
    file's size and 64 KiB more, so one read takes it all and a small one sees its end or its
    growth), for a
    reader that consumes a large file as it comes instead of holding it whole. Opened on the
    first ``next`` (``FileNotFoundError`` passes through then), closed when done or closed."""
    fd, info = _open_capped(path, limit)
    try:
        total = 0
        while True:
            want = size if size is not None else max(info.st_size - total, 0) + 65536
            chunk = os.read(fd, min(want, limit + 1 - total))
            if not chunk:
                break
            total += len(chunk)
            _refuse_past_cap(path, limit, total)  # it may have grown since the fstat
            yield chunk
    except OSError as exc:
        raise StateFileError(f"cannot read {path}: {_why(exc)}", path=str(path)) from exc
    finally:
        os.close(fd)


def _open_capped(path: Path, limit: int) -> tuple[int, os.stat_result]:
    """Open ``path`` for reading, refusing a symlink, a non-regular file or one over
    ``limit`` bytes (``StateFileError``; ``FileNotFoundError`` passes through)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StateFileError(
                f"{path} is a symlink; refusing to follow it", path=str(path)
            ) from None
        raise StateFileError(f"cannot open {path}: {_why(exc)}", path=str(path)) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise StateFileError(f"{path} is not a regular file", path=str(path))
        if info.st_size > limit:
            raise StateFileError(
                f"{path} is {info.st_size} bytes, over the {limit}-byte cap; not read",
                path=str(path),
            )
    except OSError as exc:
        os.close(fd)
        raise StateFileError(f"cannot read {path}: {_why(exc)}", path=str(path)) from exc
    except StateFileError:
        os.close(fd)
        raise
    return fd, info


def _refuse_past_cap(path: Path, limit: int, total: int) -> None:
    if total > limit:
        raise StateFileError(
            f"{path} grew past the {limit}-byte cap while being read", path=str(path)
        )
