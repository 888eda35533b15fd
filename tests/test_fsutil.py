"""Durable file primitives against real files, real symlinks and real injected disk faults."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agentapi_persist._fsutil import (
    append_durable,
    ensure_private_dir,
    fsync_dir,
    quarantine,
    read_capped_file,
    write_atomic,
)
from agentapi_persist.errors import DurabilityError, StateFileError

STRACE = shutil.which("strace")
needs_strace = pytest.mark.skipif(
    STRACE is None, reason="strace is not installed (CI installs it to inject EIO/ENOSPC)"
)

# Runs write_atomic in a child so a fault can be injected into that process alone. The outcome
# goes out through pwrite(2): an injected write(2) fault must not also swallow the report.
CHILD = """
import json, os, sys
from pathlib import Path
from agentapi_persist._fsutil import write_atomic
from agentapi_persist.errors import DurabilityError

target, result, size, setup = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
if setup == "fsize":
    import resource, signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
outcome = {"ok": True}
try:
    write_atomic(target, b"N" * size)
except DurabilityError as exc:
    outcome = {"ok": False, "type": type(exc).__name__, "error": str(exc)}
fd = os.open(result, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
os.pwrite(fd, json.dumps(outcome).encode(), 0)
os.close(fd)
"""


@pytest.fixture
def open_umask():
    """Run with umask 000, the worst case for permissions, and restore it afterwards."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def leftovers(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".tmp"))


def run_child(tmp_path: Path, target: Path, size: int, *, prefix: list[str], setup: str = ""):
    """Run CHILD (optionally under strace) and return its outcome dict."""
    result = tmp_path / "outcome.json"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    command = [*prefix, sys.executable, "-c", CHILD, str(target), str(result), str(size), setup]
    proc = subprocess.run(command, env=env, capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    return json.loads(result.read_bytes())


def strace(*qualifiers: str) -> list[str]:
    assert STRACE is not None
    args = [STRACE, "-f", "-qq", "-o", os.devnull]
    for qualifier in qualifiers:
        args += ["-e", qualifier]
    return args


class TestWriteAtomic:
    def test_content_lands_private_and_no_temp_left(self, tmp_path, open_umask):
        """New directories are 0700 and files 0600 even under umask 000; no temp file remains."""
        target = tmp_path / "a" / "b" / "state.json"
        write_atomic(target, b"hello")
        assert target.read_bytes() == b"hello"
        assert mode_of(target) == 0o600
        assert mode_of(target.parent) == 0o700
        assert leftovers(target.parent) == []

    def test_replaces_and_keeps_an_existing_directory_mode(self, tmp_path, open_umask):
        """An existing 0644 file comes out 0600; the existing 0755 directory keeps its mode
        (it may be $HOME or shared with other tools: reported by `status`, never changed)."""
        directory = tmp_path / "d"
        directory.mkdir(mode=0o755)
        target = directory / "f"
        target.write_bytes(b"old")
        target.chmod(0o644)
        write_atomic(target, [b"new ", b"", b"content"])
        assert target.read_bytes() == b"new content"
        assert mode_of(target) == 0o600
        assert mode_of(directory) == 0o755
        assert leftovers(directory) == []

    def test_large_payload_written_whole(self, tmp_path):
        """Several megabytes in chunks arrive complete and in order."""
        chunks = [bytes([i]) * (1 << 20) for i in range(5)]
        target = tmp_path / "big"
        write_atomic(target, chunks)
        assert target.read_bytes() == b"".join(chunks)

    def test_planted_symlink_at_target_is_refused(self, tmp_path):
        """A symlink at the target is never written through; its target keeps its bytes."""
        victim = tmp_path / "victim"
        victim.write_bytes(b"precious")
        directory = tmp_path / "state"
        directory.mkdir()
        (directory / "state.json").symlink_to(victim)
        with pytest.raises(DurabilityError, match="symlink"):
            write_atomic(directory / "state.json", b"evil")
        assert victim.read_bytes() == b"precious"
        assert (directory / "state.json").is_symlink()
        assert leftovers(directory) == []

    def test_symlinked_parent_is_refused(self, tmp_path):
        """A directory that is a symlink is refused and nothing lands where it points."""
        real = tmp_path / "real"
        real.mkdir()
        (tmp_path / "link").symlink_to(real)
        with pytest.raises(DurabilityError, match="symlink"):
            write_atomic(tmp_path / "link" / "state.json", b"data")
        assert os.listdir(real) == []

    def test_directory_at_target_is_refused(self, tmp_path):
        """A directory where the file should be is reported, not replaced."""
        (tmp_path / "state.json").mkdir()
        with pytest.raises(DurabilityError, match="not a regular file"):
            write_atomic(tmp_path / "state.json", b"data")
        assert leftovers(tmp_path) == []

    def test_concurrent_writers_leave_one_complete_copy(self, tmp_path):
        """Random temp names: concurrent writers never collide and the result is one whole copy."""
        target = tmp_path / "f"
        payloads = [bytes([65 + i]) * 200_000 for i in range(8)]
        threads = [threading.Thread(target=write_atomic, args=(target, p)) for p in payloads]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert target.read_bytes() in payloads
        assert leftovers(tmp_path) == []


@pytest.mark.faults
class TestWriteAtomicFaults:
    """Real faults in a child process: the old copy survives and no temp file is left."""

    def test_file_size_limit_fails_the_write(self, tmp_path):
        """RLIMIT_FSIZE makes write(2) fail with EFBIG part way through."""
        target = tmp_path / "state.json"
        target.write_bytes(b"old content")
        outcome = run_child(tmp_path, target, 200_000, prefix=[], setup="fsize")
        assert outcome["ok"] is False
        assert "write failed" in outcome["error"]
        assert "EFBIG" in outcome["error"]
        assert "previous copy was kept" in outcome["error"]
        assert target.read_bytes() == b"old content"
        assert leftovers(tmp_path) == []

    @needs_strace
    @pytest.mark.parametrize(
        ("qualifiers", "step", "code"),
        [
            (("trace=fsync", "inject=fsync:error=EIO"), "fsync failed", "EIO"),
            (("inject=/^rename:error=EIO",), "rename failed", "EIO"),
            (("trace=write", "inject=write:error=ENOSPC"), "write failed", "ENOSPC"),
        ],
        ids=["fsync-EIO", "rename-EIO", "write-ENOSPC"],
    )
    def test_injected_error_keeps_old_copy(self, tmp_path, qualifiers, step, code):
        """EIO on fsync or rename, ENOSPC on write: named in the error, old bytes intact."""
        target = tmp_path / "state.json"
        target.write_bytes(b"old content")
        outcome = run_child(tmp_path, target, 10_000, prefix=strace(*qualifiers))
        assert outcome == {
            "ok": False,
            "type": "DurabilityError",
            "error": outcome["error"],
        }
        assert step in outcome["error"]
        assert code in outcome["error"]
        assert "previous copy was kept" in outcome["error"]
        assert target.read_bytes() == b"old content"
        assert leftovers(tmp_path) == []

    @needs_strace
    def test_directory_fsync_failure_is_reported_not_hidden(self, tmp_path):
        """EIO on the second fsync (the directory's): the new file is in place, and we say it
        is not proven durable instead of claiming success."""
        target = tmp_path / "state.json"
        target.write_bytes(b"old content")
        outcome = run_child(
            tmp_path, target, 100, prefix=strace("trace=fsync", "inject=fsync:error=EIO:when=2")
        )
        assert outcome["ok"] is False
        assert "directory fsync failed" in outcome["error"]
        assert "not proven durable" in outcome["error"]
        assert target.read_bytes() == b"N" * 100
        assert leftovers(tmp_path) == []

    @needs_strace
    def test_child_without_fault_succeeds(self, tmp_path):
        """Control: the same child under strace with no injection writes the new content."""
        target = tmp_path / "state.json"
        target.write_bytes(b"old content")
        outcome = run_child(tmp_path, target, 100, prefix=strace("trace=fsync"))
        assert outcome == {"ok": True}
        assert target.read_bytes() == b"N" * 100


class TestPrivateDir:
    def test_creates_0700_under_open_umask(self, tmp_path, open_umask):
        """mkdir -p leaves the leaf 0700 whatever the umask."""
        directory = tmp_path / "x" / "y"
        ensure_private_dir(directory)
        assert mode_of(directory) == 0o700

    def test_never_changes_an_existing_directory(self, tmp_path, open_umask):
        """What exists keeps its mode; what is missing is made 0700 (under umask 000 too)."""
        directory = tmp_path / "open"
        directory.mkdir()
        directory.chmod(0o755)
        ensure_private_dir(directory)
        assert mode_of(directory) == 0o755
        ensure_private_dir(directory / "new" / "deeper")
        assert mode_of(directory / "new") == 0o700
        assert mode_of(directory / "new" / "deeper") == 0o700

    def test_refuses_symlink(self, tmp_path):
        """A symlinked directory is refused and its target's mode is left alone."""
        real = tmp_path / "real"
        real.mkdir(mode=0o755)
        real.chmod(0o755)
        (tmp_path / "link").symlink_to(real)
        with pytest.raises(DurabilityError, match="symlink"):
            ensure_private_dir(tmp_path / "link")
        assert mode_of(real) == 0o755

    def test_refuses_file(self, tmp_path):
        """A regular file where the directory should be gives a clear error."""
        (tmp_path / "f").write_bytes(b"")
        with pytest.raises(DurabilityError, match="cannot prepare directory"):
            ensure_private_dir(tmp_path / "f")

    def test_fsync_dir(self, tmp_path):
        """fsync_dir works on a directory and reports a missing one."""
        fsync_dir(tmp_path)
        with pytest.raises(DurabilityError, match="cannot open directory"):
            fsync_dir(tmp_path / "missing")


class TestAppendDurable:
    def test_creates_then_appends(self, tmp_path, open_umask):
        """Bytes land at the given offsets; the new file is 0600."""
        path = tmp_path / "j" / "journal.log"
        append_durable(path, b"one\n", offset=0)
        append_durable(path, b"two\n", offset=4)
        assert path.read_bytes() == b"one\ntwo\n"
        assert mode_of(path) == 0o600
        assert mode_of(path.parent) == 0o700

    def test_cuts_bytes_after_offset(self, tmp_path):
        """A torn tail after the last good byte is cut off before the new bytes go in."""
        path = tmp_path / "journal.log"
        path.write_bytes(b"good\ntorn-garbage-without-newline")
        append_durable(path, b"next\n", offset=5)
        assert path.read_bytes() == b"good\nnext\n"

    def test_refuses_file_shorter_than_offset(self, tmp_path):
        """A file that shrank under us is not written."""
        path = tmp_path / "journal.log"
        path.write_bytes(b"ab")
        with pytest.raises(DurabilityError, match="changed under us"):
            append_durable(path, b"x", offset=10)
        assert path.read_bytes() == b"ab"

    def test_refuses_symlink(self, tmp_path):
        """A symlink planted at the journal path is not followed."""
        victim = tmp_path / "victim"
        victim.write_bytes(b"keep")
        (tmp_path / "journal.log").symlink_to(victim)
        with pytest.raises(DurabilityError, match="symlink"):
            append_durable(tmp_path / "journal.log", b"x", offset=0)
        assert victim.read_bytes() == b"keep"


class TestQuarantine:
    def test_moves_bytes_aside(self, tmp_path):
        """The file is renamed (same bytes, 0600) and the original name is free."""
        bad = tmp_path / "state.json"
        bad.write_bytes(b"\x00garbage\xff")
        bad.chmod(0o644)
        inode = bad.stat().st_ino
        moved = quarantine(bad, reason="test")
        assert not bad.exists()
        assert moved.parent == tmp_path
        assert moved.name.startswith("state.json.corrupt-")
        assert moved.read_bytes() == b"\x00garbage\xff"
        assert moved.stat().st_ino == inode  # a rename, not a copy
        assert mode_of(moved) == 0o600

    def test_into_other_directory_and_never_overwrites(self, tmp_path):
        """Two quarantines of the same name in the same second keep both copies."""
        into = tmp_path / "aside"
        first = tmp_path / "f"
        first.write_bytes(b"1")
        a = quarantine(first, into=into, reason="one")
        first.write_bytes(b"2")
        b = quarantine(first, into=into, reason="two")
        assert a != b
        assert a.parent == into
        assert b.parent == into
        assert (a.read_bytes(), b.read_bytes()) == (b"1", b"2")
        assert mode_of(into) == 0o700

    def test_missing_file_raises(self, tmp_path):
        """Nothing to move is an error that says the file was left where it was."""
        with pytest.raises(DurabilityError, match="could not move"):
            quarantine(tmp_path / "missing", reason="test")


class TestReadCapped:
    def test_reads_whole_file(self, tmp_path):
        """A file under the cap is read entirely."""
        path = tmp_path / "f"
        path.write_bytes(b"x" * 300_000)
        assert read_capped_file(path, 300_000) == b"x" * 300_000

    def test_over_cap_is_refused(self, tmp_path):
        """A file one byte over the cap is refused with both numbers in the message."""
        path = tmp_path / "f"
        path.write_bytes(b"x" * 101)
        with pytest.raises(StateFileError, match=r"is 101 bytes, over the 100-byte cap"):
            read_capped_file(path, 100)

    def test_missing_passes_through(self, tmp_path):
        """A missing file is FileNotFoundError, not a StateFileError."""
        with pytest.raises(FileNotFoundError):
            read_capped_file(tmp_path / "missing", 100)

    def test_symlink_is_refused(self, tmp_path):
        """O_NOFOLLOW: a symlink is not read through."""
        (tmp_path / "target").write_bytes(b"data")
        (tmp_path / "link").symlink_to(tmp_path / "target")
        with pytest.raises(StateFileError, match="symlink"):
            read_capped_file(tmp_path / "link", 100)

    def test_fifo_is_refused_without_blocking(self, tmp_path):
        """A FIFO at the path would block a plain open(); it is refused at once."""
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        with pytest.raises(StateFileError, match="not a regular file"):
            read_capped_file(fifo, 100)

    def test_directory_is_refused(self, tmp_path):
        """A directory is not a state file."""
        with pytest.raises(StateFileError, match="not a regular file"):
            read_capped_file(tmp_path, 100)
