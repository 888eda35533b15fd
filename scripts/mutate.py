"""Mutation check: make the bugs a reviewer fears most, one at a time, and see a test fail.

Each mutation is one exact text replacement in a scratch copy of the repository (the working
tree is never touched). The tests named for it run against that copy; the mutation is
*caught* when they fail. Run on demand (it takes minutes), not in CI:

    .venv/bin/python scripts/mutate.py            # every mutation, then the table
    .venv/bin/python scripts/mutate.py journal    # only those whose name contains "journal"

Exit 0 when every mutation was caught, 1 otherwise; the table is what docs/RELIABILITY.md
shows.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    """One deliberate bug: where, what becomes what, and the tests that must catch it."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = (
    Mutation(
        "no directory fsync after a rename",
        "agentapi_persist/_fsutil.py",
        '        step = "directory fsync"\n        os.fsync(dir_fd)\n        _sweep_stale_temps',
        '        step = "directory fsync"\n        _sweep_stale_temps',
        ("tests/test_faults_crash.py", "tests/test_fsutil.py"),
    ),
    Mutation(
        "no journal fsync",
        "agentapi_persist/_fsutil.py",
        '            _pwrite_all(fd, data, offset)\n            step = "fsync"\n'
        "            os.fsync(fd)",
        '            _pwrite_all(fd, data, offset)\n            step = "fsync"',
        ("tests/test_faults_crash.py", "tests/test_fsutil.py", "tests/test_faults_disk.py"),
    ),
    Mutation(
        "no checksum check on a generation",
        "agentapi_persist/store.py",
        "        if hasher.hexdigest() != digest:",
        "        if False:",
        ("tests/test_store.py", "tests/test_faults_files.py"),
    ),
    Mutation(
        "the oldest generation loaded first",
        "agentapi_persist/store.py",
        "        for seq in sorted(generations, reverse=True):",
        "        for seq in sorted(generations):",
        ("tests/test_store.py",),
    ),
    Mutation(
        "a diverging conversation replaces the copy without archiving it",
        "agentapi_persist/store.py",
        '        kept = self.archive(reason="replaced by a diverging newer conversation")',
        "        kept = None",
        ("tests/test_store.py", "tests/test_sequence.py", "tests/test_security.py"),
    ),
    Mutation(
        "SIGUSR1 sent to AgentAPI older than 0.12.0",
        "agentapi_persist/agentapi_save.py",
        "    if version < MIN_SIGUSR1_VERSION:",
        "    if False:",
        ("tests/test_agent_process.py", "tests/test_sequence.py", "tests/test_cli.py"),
    ),
    Mutation(
        "401 taken as delivered",
        "agentapi_persist/coder.py",
        "    if status == 401:\n        return UploadOutcome.UNAUTHORIZED",
        "    if status == 401:\n        return UploadOutcome.DELIVERED",
        ("tests/test_coder.py",),
    ),
    Mutation(
        "the snapshot cut by characters, not bytes",
        "agentapi_persist/snapshot.py",
        '        cut = total_bytes - len(tail.encode("utf-8"))',
        "        cut = len(content) - len(tail)",
        ("tests/test_snapshot.py",),
    ),
    Mutation(
        "SIGUSR1 to the sidecar only logged",
        "agentapi_persist/checkpointer.py",
        '        log.info("daemon.checkpoint_requested")\n        self.changed.set()\n'
        "        self._now.set()",
        '        log.info("daemon.checkpoint_requested")',
        ("tests/test_sidecar_process.py",),
    ),
    Mutation(
        "the stop's watchdog fires 0.3 s after the grace",
        "agentapi_persist/cli.py",
        "        started_at + settings.grace_s - settings.watchdog_margin_s, exit_code=final_code",
        "        started_at + settings.grace_s + 0.3, exit_code=final_code",
        ("tests/test_faults_disk.py", "tests/test_faults_budgets.py", "tests/test_cli.py"),
    ),
)


def scratch_copy() -> Path:
    """The repository's tracked and untracked files (not .venv, caches or .git) in a temp dir."""
    target = Path(tempfile.mkdtemp(prefix="mutate-"))
    ignore = shutil.ignore_patterns(".venv", ".git", "__pycache__", ".mypy_cache", ".ruff_cache")
    shutil.copytree(REPO, target / "repo", ignore=ignore)
    return target / "repo"


def run(mutation: Mutation) -> tuple[bool, float, str]:
    """Apply ``mutation`` in a fresh copy and run its tests: (caught, seconds, first failure)."""
    copy = scratch_copy()
    try:
        path = copy / mutation.path
        text = path.read_text()
        if text.count(mutation.old) != 1:
            raise SystemExit(f"{mutation.name}: the text to replace is not in {mutation.path}")
        path.write_text(text.replace(mutation.old, mutation.new))
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutation.tests],
            cwd=copy,
            capture_output=True,
            text=True,
            check=False,
        )
        seconds = time.monotonic() - started
        failed = [line for line in done.stdout.splitlines() if line.startswith("FAILED")]
        return done.returncode != 0, seconds, failed[0][7:] if failed else ""
    finally:
        shutil.rmtree(copy.parent, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("only", nargs="?", default="", help="run mutations whose name has this")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if args.only in m.name]
    rows = []
    for mutation in chosen:
        caught, seconds, first = run(mutation)
        rows.append((mutation, caught, seconds, first))
        print(f"{'caught' if caught else 'MISSED'} {seconds:6.1f}s  {mutation.name}", flush=True)
    print("\n| Mutation | Caught | By |\n| --- | --- | --- |")
    for mutation, caught, _, first in rows:
        print(f"| {mutation.name} | {'yes' if caught else '**no**'} | {first or '-'} |")
    return 0 if all(caught for _, caught, _, _ in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
