"""Command line: ``agentapi-persist run | shutdown | restore | snapshot | status | doctor |
export``.

``main(argv) -> int`` is the only place that turns exceptions into exit codes (the table lives
with the error classes in ``errors.py``). Command modules are imported inside each command so
that a command pays only for what it uses: ``restore`` never loads aiohttp, for instance.
stdout carries the result (a summary line, or JSON with ``--json``); logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ._options import GROUPS, OPTIONS, quick_settings
from ._version import __version__
from .errors import ExitCode, PersistError

# Not `from typing import ...`: see _options (the `shutdown` client path counts imports).
TYPE_CHECKING = False

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path
    from typing import Any, NoReturn

    from .config import Settings
    from .shutdown import ShutdownReport

__all__ = ["build_parser", "main"]

_EPILOG = """\
exit codes: 0 ok; 1 error; 2 bad flags or environment; 3 state not durable (previous copy
kept); 4 snapshot not delivered (state durable); 5 grace budget ran out; 6 AgentAPI is
running (restore refused); 7 no good copy to restore (or nothing to export); 8 status
found problems, or doctor found a failing check; 9 the replica was not brought up to date
(state durable locally).
"""


def _process_age_s() -> float:
    """Seconds since this process started: the grace period was already running then."""
    try:
        with open("/proc/self/stat", "rb") as f:
            start_ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/uptime", "rb") as f:
            uptime = float(f.read().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return 0.0


def _add_settings(parser: argparse.ArgumentParser, command: str) -> None:
    """The settings ``command`` reads, as flags grouped under ``GROUPS``; a setting another
    command reads is not offered here (its variable is still read, and does nothing)."""
    groups = {name: parser.add_argument_group(f"{name} settings") for name in GROUPS}
    for option in OPTIONS:
        if command not in option.commands:
            continue
        env = ", ".join(f"${name}" for name in option.env)
        help_text = f"{option.help} [env: {env}; default: {option.default_text}]"
        group = groups[option.group]
        if option.kind == "bool":
            group.add_argument(
                option.flag,
                dest=option.field,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            group.add_argument(
                option.flag,
                dest=option.field,
                metavar=option.metavar,
                type=_CONVERTERS[option.kind],
                default=argparse.SUPPRESS,
                help=help_text,
            )
    groups["output"].add_argument(
        "--json", action="store_true", help="Print the result (or the error) as one JSON object."
    )


def _path(value: str) -> Path:
    from pathlib import Path

    try:
        return Path(value).expanduser()
    except RuntimeError:  # "~someone" for a user that does not exist: a usage error (exit 2)
        raise ValueError(f"cannot expand '~' in {value!r}: no such user") from None


_CONVERTERS: dict[str, Callable[[str], object]] = {
    "str": str,
    "int": int,
    "float": float,
    "path": _path,
}


class UsageError(Exception):
    """Bad flags: argparse's complaint, and the command whose ``--help`` to point at."""

    def __init__(self, message: str, prog: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """Reports a usage error as one line (``main`` prints it, or JSON under ``--json``)
    instead of argparse's usage block and exit."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.prog)


_COMMANDS = {
    "run": "The sidecar: restore, then keep the conversation durable until stopped "
    "(SIGTERM/SIGINT: shutdown sequence; SIGUSR1: checkpoint now).",
    "shutdown": "Run the shutdown sequence within the grace budget (the run_on_stop step).",
    "restore": "Validate AgentAPI's state file and repair it from the newest good copy "
    "(before AgentAPI starts).",
    "snapshot": "Build the log snapshot now and upload it (or print it with --dry-run).",
    "status": "Show sidecar, checkpoint, state file, last upload and AgentAPI facts.",
    "doctor": "Check this workspace (filesystem, AgentAPI, Coder, grace budget, a timed "
    "rehearsal of the stop) and print a verdict and a fix per check; changes nothing.",
    "export": "Print the saved conversation (or an archived one) as text, markdown, "
    "AgentAPI's JSON or one HTML page; reads only, and never waits for a running sidecar.",
}

_EXAMPLES = {
    "run": """\
examples:
  agentapi-persist run &                       # at boot, before AgentAPI starts
  agentapi-persist run --grace 30              # Kubernetes: 30 s to stop in
  kill -USR1 <pid of run>                      # checkpoint now""",
    "shutdown": """\
examples:
  agentapi-persist shutdown --grace 10         # the workspace's stop script (Docker)
  agentapi-persist shutdown --grace 30 --json  # Kubernetes, result as JSON
  agentapi-persist shutdown --stop-agentapi    # also stop AgentAPI once it saved""",
    "restore": """\
examples:
  agentapi-persist restore                     # at boot, before AgentAPI starts
  agentapi-persist restore --json              # the verdict as JSON
  agentapi-persist restore --force             # even if something listens on AgentAPI's port""",
    "snapshot": """\
examples:
  agentapi-persist snapshot --dry-run          # the exact bytes that would be uploaded
  agentapi-persist snapshot --snapshot-messages 50""",
    "status": """\
examples:
  agentapi-persist status                      # facts, problems, verdict
  agentapi-persist status --json | jq .checkpoint""",
    "doctor": """\
examples:
  agentapi-persist doctor                      # a verdict and a fix per check
  agentapi-persist doctor --grace 30 --json""",
    "export": """\
examples:
  agentapi-persist export                      # the stored conversation, for a terminal
  agentapi-persist export --format html --output chat.html
  agentapi-persist export --format json > agentapi-state.json   # AgentAPI loads this
  agentapi-persist export --archive <name from status> --format markdown""",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; each command's ``--help`` lists the settings it reads."""
    parser = _Parser(
        prog="agentapi-persist",
        description="Keeps an AgentAPI conversation durable across workspace stops.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"agentapi-persist {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, help_text in _COMMANDS.items():
        cmd = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=f"{_EXAMPLES[name]}\n\n{_EPILOG}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_settings(cmd, name)
        if name == "restore":
            cmd.add_argument(
                "--force",
                action="store_true",
                help="Restore even if something listens at AgentAPI's address.",
            )
        if name == "snapshot":
            cmd.add_argument(
                "--dry-run", action="store_true", help="Print the payload; upload nothing."
            )
        if name == "export":
            cmd.add_argument(
                "--format",
                choices=("text", "markdown", "json", "html"),
                default="text",
                help="text (default, for a terminal), markdown, json (AgentAPI's state file, "
                "loadable by AgentAPI) or html (one self-contained page).",
            )
            cmd.add_argument(
                "--output",
                metavar="FILE",
                type=_path,
                help="Write to FILE (atomically, mode 0600) instead of stdout.",
            )
            cmd.add_argument(
                "--archive",
                metavar="NAME",
                help="Export the archived conversation NAME (`status` lists them) instead of "
                "the current one.",
            )
    return parser


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv``; raises ``UsageError`` naming the bad flag and the command it was
    given to (argparse would name the missing command, or print the top-level usage)."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    command = getattr(args, "command", None)
    if command is None:
        extras = [extra for extra in extras if extra != "--json"]  # asked for JSON: it gets it
    if extras:
        prog = f"agentapi-persist {command}" if command else "agentapi-persist"
        raise UsageError(f"unrecognized arguments: {' '.join(extras)}{_hint(extras)}", prog)
    if command is None:
        raise UsageError(f"a command is required: {', '.join(_COMMANDS)}", "agentapi-persist")
    return args


def _hint(extras: Sequence[str]) -> str:
    """What an unrecognized flag probably meant: the version flag, or a setting that only
    other commands read."""
    if "-V" in extras:
        return " (the version is --version)"
    for extra in extras:
        flag = extra.split("=", 1)[0].replace("--no-", "--", 1)
        for option in OPTIONS:
            if option.flag == flag:
                users = sorted(option.commands, key=list(_COMMANDS).index)
                return f" ({option.flag} is read by {', '.join(users)} only)"
    return ""


def _usage_error(exc: UsageError, argv: Sequence[str]) -> int:
    command = exc.prog.removeprefix("agentapi-persist").strip()
    text = str(exc).removeprefix("argument ")
    message = f"{command}: {text}" if command else text
    message = f"{message} (see `{exc.prog} --help`)"
    _emit_error_text(message, ExitCode.USAGE, as_json="--json" in argv)
    return int(ExitCode.USAGE)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, configure, run one command, map errors to an exit code."""
    # The grace period was already running when this process started: anchor every budget on
    # the process start, not on when the (slow) imports finished.
    started_at = time.monotonic() - _process_age_s()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = _parse(argv)
    except UsageError as exc:
        return _usage_error(exc, argv)
    if args.command == "run":
        # Before the heavy imports: a stop signal in the next few hundred milliseconds must
        # run the stop sequence, not kill us (or, as PID 1, be dropped).
        from .early_signals import catch

        catch()
    flags = {o.field: getattr(args, o.field) for o in OPTIONS if hasattr(args, o.field)}
    as_json: bool = args.json
    command = args.command
    if command == "shutdown":
        answered = _shutdown_via_sidecar(flags, as_json=as_json, started_at=started_at)
        if answered is None:
            answered = _wait_for_a_starting_sidecar(flags, as_json=as_json, started_at=started_at)
        if answered is not None:
            return answered
    try:
        # One-shot commands print a result that states every problem; logs add only errors
        # unless asked for (--log-level or AGENTAPI_PERSIST_LOG_LEVEL). The sidecar logs info.
        default_level = "info" if command == "run" else "error"
        from .config import Settings

        settings = Settings.load(flags, default_log_level=default_level)
        from .log import configure_logging

        configure_logging(level=settings.log_level)
        if command == "run":
            import asyncio

            from .daemon import serve

            _freeze_what_was_imported()
            report = asyncio.run(serve(settings))
            # The stop it ran (on a signal, or for `shutdown`, which printed it too): said
            # here as every command says its result.
            _print(report.as_dict() if as_json else report.summary(), as_json=as_json)
            _exit_soon()
            return int(report.exit_code)
        if command == "shutdown":
            return _shutdown(settings, as_json=as_json, started_at=started_at)
        if command == "restore":
            return _restore(settings, as_json=as_json, force=args.force)
        if command == "snapshot":
            return _snapshot(settings, as_json=as_json, dry_run=args.dry_run)
        if command == "doctor":
            return _doctor(settings, as_json=as_json)
        if command == "export":
            return _export(settings, fmt=args.format, output=args.output, archive=args.archive)
        return _status(settings, as_json=as_json)
    except PersistError as exc:
        _emit_error(exc, as_json=as_json)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("agentapi-persist: interrupted", file=sys.stderr)
        return 130


def _emit_error(exc: PersistError, *, as_json: bool) -> None:
    _emit_error_text(str(exc), exc.exit_code, as_json=as_json)


def _print(payload: dict[str, Any] | str, *, as_json: bool) -> None:
    if as_json and isinstance(payload, dict):
        print(json.dumps(payload, ensure_ascii=False))
    else:
        print(payload)


def _shutdown_via_sidecar(flags: dict[str, Any], *, as_json: bool, started_at: float) -> int | None:
    """Ask a running sidecar to run the sequence; ``None`` if there is none (do it here).

    Imports only the standard library: with a sidecar, the whole command should take tens of
    milliseconds, and pydantic plus aiohttp alone cost a few hundred.
    """
    from .control_client import ask_sidecar
    from .errors import SidecarUnavailable

    state_dir, grace_s, instance = quick_settings(flags)
    elapsed = time.monotonic() - started_at
    request: dict[str, Any] = {
        "op": "shutdown",
        "grace_s": grace_s,
        "elapsed_s": elapsed,
        # The sidecar checks it is this instance's: another module's sidecar refuses.
        "instance": instance.as_dict(),
    }
    if "stop_agentapi" in flags:
        request["stop_agentapi"] = bool(flags["stop_agentapi"])
    from .waiting import WaitDisplay

    waits = WaitDisplay(
        lambda: "the sidecar's stop sequence", ends_at=started_at + grace_s, budget_s=grace_s
    )
    try:
        result = ask_sidecar(state_dir, request, timeout_s=max(grace_s - elapsed - 0.05, 0.1))
    except SidecarUnavailable:
        return None
    except TimeoutError as exc:
        waits.close()
        message = f"{exc}; the sidecar's last checkpoint is on disk"
        _emit_error_text(message, ExitCode.DEADLINE, as_json=as_json)
        return int(ExitCode.DEADLINE)
    finally:
        waits.close()
    if "summary" not in result:
        code = int(result.get("exit_code", ExitCode.ERROR))
        _emit_error_text(
            f"sidecar: {result.get('error', 'no result')}", ExitCode(code), as_json=as_json
        )
        return code
    _print(result["report"] if as_json else result["summary"] + " (via sidecar)", as_json=as_json)
    return int(result["exit_code"])


def _wait_for_a_starting_sidecar(
    flags: dict[str, Any], *, as_json: bool, started_at: float
) -> int | None:
    """No sidecar answered, but one holds the state directory: it is starting (its repair
    runs before it listens). Ask again until it answers, within part of the budget, rather
    than write beside it; ``None`` when no sidecar holds the directory (do the work here)."""
    from pathlib import Path

    from .ownership import held_by

    state_dir, grace_s, _ = quick_settings(flags)
    holder = held_by(Path(state_dir))
    if holder is None or holder.get("purpose") != "sidecar":
        return None
    give_up_at = started_at + grace_s * 0.5
    while time.monotonic() < give_up_at:
        time.sleep(0.05)
        answered = _shutdown_via_sidecar(flags, as_json=as_json, started_at=started_at)
        if answered is not None:
            return answered
    return None


def _emit_error_text(message: str, code: ExitCode, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"ok": False, "exit_code": int(code), "error": message}))
    print(f"agentapi-persist: {message}", file=sys.stderr)


def _shutdown(settings: Settings, *, as_json: bool, started_at: float) -> int:
    import asyncio
    import threading

    from .shutdown import ShutdownReport
    from .signals import arm_watchdog
    from .waiting import WaitDisplay, describe_steps

    known: list[int] = []
    said = threading.Lock()
    progress = ShutdownReport()
    # On a terminal, a line on stderr says what the stop waits for (erased before the result).
    waits = WaitDisplay(
        lambda: describe_steps(progress.in_progress.copy()),
        ends_at=started_at + settings.budget_s,
        budget_s=settings.budget_s,
    )

    def publish(report: ShutdownReport) -> None:
        # The result goes out as soon as it is known: what follows is cleaning up, and if
        # that runs into the deadline the watchdog exits with this code, not with a 5.
        waits.close()
        with said:
            _print(report.as_dict() if as_json else report.summary(), as_json=as_json)
            sys.stdout.flush()
            known.append(int(report.exit_code))

    def final_code() -> int | None:
        # Held until the process exits: a summary is either wholly out with its code, or
        # never printed (the watchdog's own line and exit 5). A run measured the window
        # between the two at the very moment the watchdog fired: "ok" printed, exit 5.
        if not said.acquire(timeout=settings.watchdog_margin_s / 2) or known:
            return known[0] if known else None
        # The sequence did not get to say it: say how far it got, so a stop never ends in
        # silence (a parse that holds the interpreter lock can keep the loop from its deadline).
        waits.close()
        partial = progress.cut_short()
        partial.total_ms = round((time.monotonic() - started_at) * 1000)
        _print(partial.as_dict() if as_json else partial.summary(), as_json=as_json)
        sys.stdout.flush()
        return int(partial.exit_code)

    # Exit on our own just before the runtime's SIGKILL, even if the loop is stuck.
    watchdog = arm_watchdog(
        started_at + settings.grace_s - settings.watchdog_margin_s, exit_code=final_code
    )
    try:
        report = asyncio.run(
            _shutdown_async(settings, started_at=started_at, publish=publish, progress=progress)
        )
    finally:
        watchdog.cancel()
        waits.close()
    _exit_soon()
    return int(report.exit_code)


def _freeze_what_was_imported() -> None:
    """Called once a command's modules are imported: what exists now (modules, classes,
    schemas, about 100,000 objects) lives as long as the process, so take it out of the
    garbage collector's sight (``gc.freeze``'s documented use). Otherwise the first full
    collection the work triggers walks all of it: a stop's first ``GET /messages`` of 1,000
    messages measured 45-50 ms in a fresh process, 15-22 ms with this."""
    import gc

    gc.freeze()


def _exit_soon() -> None:
    """The process ends next, and the runtime's SIGKILL may be a few hundred ms away: spare
    the interpreter's exit a garbage collection over every object (60-200 ms of CPU, more on
    a busy machine; about 20 ms without it)."""
    import gc

    gc.freeze()


async def _shutdown_async(
    settings: Settings,
    *,
    started_at: float,
    publish: Callable[[ShutdownReport], None],
    progress: ShutdownReport,
) -> ShutdownReport:
    from .errors import DurabilityError, StateDirBusy
    from .peers import open_peers
    from .shutdown import run_shutdown

    _freeze_what_was_imported()
    ends_at = started_at + settings.budget_s
    # One writer per state directory: a stop that is still finishing gets a moment, a sidecar
    # that did not answer keeps the directory (its copy is the latest durable one).
    wait_s = min(2.0, max(ends_at - time.monotonic(), 0.0) * 0.3)
    try:
        async with open_peers(settings, lock="shutdown", lock_wait_s=wait_s) as peers:
            return await run_shutdown(
                settings, peers=peers, ends_at=ends_at, publish=publish, report=progress
            )
    except StateDirBusy as exc:
        raise DurabilityError(f"{exc}; its holder keeps the latest durable copy") from None


def _restore(settings: Settings, *, as_json: bool, force: bool) -> int:
    from .restoring import restore

    _freeze_what_was_imported()
    replica = None
    if settings.replica is not None:
        from .replica import reader_for_restore
        from .store import StateStore

        store = StateStore(settings.state_dir, max_bytes=settings.max_body_bytes, read_only=True)
        replica = reader_for_restore(settings, store)
    report = restore(settings, force=force, replica=replica)
    _print(report.as_dict() if as_json else report.summary(), as_json=as_json)
    _exit_soon()  # boot waits for this process: its exit alone cost ~100 ms after 50 MB
    return int(report.exit_code)


def _status(settings: Settings, *, as_json: bool) -> int:
    import asyncio

    from .status import collect_status

    report = asyncio.run(collect_status(settings))
    _print(report.as_dict() if as_json else report.render(), as_json=as_json)
    return int(report.exit_code)


def _export(settings: Settings, *, fmt: str, output: Path | None, archive: str | None) -> int:
    from .export import load_for_export, render, write

    source = load_for_export(settings.state_dir, archive=archive, max_bytes=settings.max_body_bytes)
    for problem in source.problems:
        print(f"agentapi-persist: note: {problem}", file=sys.stderr)
    if output is not None:
        write(source, fmt, output)  # type: ignore[arg-type]  # argparse checked the choice
        count = len(source.conversation.messages)
        print(f"exported {count} messages as {fmt} to {output}", file=sys.stderr)
        return int(ExitCode.OK)
    out = sys.stdout.buffer
    for piece in render(source, fmt):  # type: ignore[arg-type]
        out.write(piece)
    out.flush()
    return int(ExitCode.OK)


def _doctor(settings: Settings, *, as_json: bool) -> int:
    import asyncio

    from .doctor import run_doctor

    report = asyncio.run(run_doctor(settings))
    _print(report.as_dict() if as_json else report.render(), as_json=as_json)
    return int(report.exit_code)


def _snapshot(settings: Settings, *, as_json: bool, dry_run: bool) -> int:
    import asyncio

    return asyncio.run(_snapshot_async(settings, as_json=as_json, dry_run=dry_run))


async def _snapshot_async(settings: Settings, *, as_json: bool, dry_run: bool) -> int:
    from .budget import Budget
    from .copies import gather
    from .errors import ConfigError
    from .peers import open_peers
    from .snapshot import build_snapshot

    budget = Budget(settings.budget_s)
    target = None if dry_run else settings.coder_target()
    if not dry_run and target is None:
        raise ConfigError("no snapshot is configured: set ARG_TASK_ID (or --task-id) to upload")
    # Read-only: a snapshot never writes the copy, so it needs no lock and moves nothing aside.
    async with open_peers(settings, read_only=True) as peers:
        gathered = await gather(settings, store=peers.store, agent=peers.agent, budget=budget)
        messages = gathered.conversation.messages if gathered.conversation else ()
        snapshot = build_snapshot(
            messages, max_messages=settings.snapshot_messages, max_bytes=settings.snapshot_max_bytes
        )
        facts = {
            "source": gathered.source,
            "messages": len(snapshot.messages),
            "of": snapshot.total,
            "bytes": snapshot.size,
            "truncated_bytes": snapshot.truncated_bytes,
        }
        if dry_run:
            if as_json:
                _print({**facts, "payload": json.loads(snapshot.payload)}, as_json=True)
            else:
                sys.stdout.write(snapshot.payload.decode("utf-8") + "\n")
                print(
                    f"snapshot (dry run): {facts['messages']} of {facts['of']} messages from "
                    f"{facts['source']}, {facts['bytes']} bytes",
                    file=sys.stderr,
                )
            return int(ExitCode.OK)
        if not snapshot.messages:
            _print(
                {**facts, "outcome": "skipped"} if as_json else "snapshot skipped: no messages",
                as_json=as_json,
            )
            return int(ExitCode.OK)
        assert peers.coder is not None  # coder_target() above found a target
        result = await peers.coder.upload_snapshot(snapshot.payload, budget=budget)
    outcome = {
        **facts,
        "outcome": str(result.outcome),
        "status": result.status,
        "detail": result.detail,
    }
    line = f"snapshot {result.outcome}: {facts['messages']} messages, {facts['bytes']} bytes"
    if not result.delivered:
        line += f" | {result.detail}"
    _print(outcome if as_json else line, as_json=as_json)
    return int(ExitCode.OK if result.delivered else ExitCode.SNAPSHOT_FAILED)
