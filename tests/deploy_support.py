"""Helpers for tests/test_deploy_examples.py: read the deployment examples as their tools would
(Terraform through python-hcl2, compose and Kubernetes files through PyYAML), and run their
scripts for real as processes, with the fake AgentAPI program standing in for ``agentapi``."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import hcl2
import yaml

from agentapi_persist.models import Conversation
from agentapi_persist.store import StateStore
from agentapi_persist.testing.agentapi_program import write_agentapi_script

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"

# -- Terraform ---------------------------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$\{([^{}]*)\}")
#: ``cond ? a : b`` whose branches are plain values or strings (no nested ``?``).
_TERNARY = re.compile(r'(.+?)\s*\?\s*((?:"[^"]*"|[^:"])+?)\s*:\s*(.+)', re.S)


@dataclass
class Template:
    """A Terraform file as python-hcl2 reads it, with an evaluator for the few expression forms
    the example templates use: literals, ``var.*`` (defaults), ``local.*``, ``data.*`` (given),
    arithmetic, comparisons, ``tostring`` and ``try``. Anything else raises, so a template that
    outgrows the evaluator fails loudly instead of being checked against a guess."""

    path: Path
    data: Mapping[str, Any] = field(default_factory=dict)
    """Values for ``data.*`` references, e.g. ``{"data.coder_task.me.id": "..."}``."""
    overrides: Mapping[str, Any] = field(default_factory=dict)
    """Variable values that replace the defaults."""

    def __post_init__(self) -> None:
        with self.path.open() as f:
            self.doc: dict[str, Any] = hcl2.load(f)
        self.variables: dict[str, Any] = {}
        for block in self.doc.get("variable", []):
            for name, body in block.items():
                self.variables[_unquote(name)] = self.value(body.get("default"))
        self.variables.update(self.overrides)
        self.locals: dict[str, Any] = {}
        for block in self.doc.get("locals", []):
            self.locals.update({k: v for k, v in block.items() if not k.startswith("__")})

    def resources(self, kind: str) -> dict[str, dict[str, Any]]:
        """Every ``resource "<kind>" "<name>"`` body, by name."""
        found: dict[str, dict[str, Any]] = {}
        for block in self.doc.get("resource", []):
            for raw_kind, named in block.items():
                if _unquote(raw_kind) == kind:
                    found.update({_unquote(n): body for n, body in named.items()})
        return found

    def data_sources(self) -> set[str]:
        return {
            f"{_unquote(kind)}.{_unquote(name)}"
            for block in self.doc.get("data", [])
            for kind, named in block.items()
            for name in named
        }

    def value(self, raw: Any) -> Any:
        """The value of an attribute as python-hcl2 returns it."""
        if raw is None or isinstance(raw, bool | int | float):
            return raw
        if isinstance(raw, list):
            return [self.value(item) for item in raw]
        if isinstance(raw, dict):
            return {_unquote(k): self.value(v) for k, v in raw.items() if not k.startswith("__")}
        text = str(raw)
        if text.startswith('"') and text.endswith('"'):  # a string, maybe with ${...} inside
            return _INTERPOLATION.sub(lambda m: str(self.expr(m.group(1))), text[1:-1])
        if text.startswith("${") and text.endswith("}"):
            return self.expr(text[2:-1])
        raise ValueError(f"{self.path.name}: cannot read {text!r}")

    def expr(self, text: str) -> Any:
        """Evaluate one expression (the inside of ``${...}``); one ``cond ? a : b`` at the top
        level is read as Python's ``a if cond else b``."""
        if (ternary := _TERNARY.fullmatch(text.strip())) is not None:
            condition, then, otherwise = ternary.groups()
            return self.expr(then) if self.expr(condition) else self.expr(otherwise)
        stripped = text.strip()
        inner = stripped[1:-1]
        if (
            len(stripped) >= 2
            and stripped[0] == stripped[-1] == '"'
            and '"' not in _INTERPOLATION.sub("", inner)
        ):  # one template string: "${a}/${b}"
            return _INTERPOLATION.sub(lambda m: str(self.expr(m.group(1))), inner)
        source = text.replace("&&", " and ").replace("||", " or ")
        source = re.sub(r"\btry\(", "try_(", source)  # `try` is a Python keyword
        return self._eval(ast.parse(source.strip(), mode="eval").body, text)

    def _eval(self, node: ast.AST, text: str) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Attribute):
            return self._reference(_dotted(node), text)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub | ast.Mult):
            left, right = self._eval(node.left, text), self._eval(node.right, text)
            if isinstance(node.op, ast.Add):
                return left + right
            return left - right if isinstance(node.op, ast.Sub) else left * right
        if isinstance(node, ast.Compare) and len(node.ops) == 1:
            left, right = self._eval(node.left, text), self._eval(node.comparators[0], text)
            ops: dict[type[ast.cmpop], Callable[[Any, Any], bool]] = {
                ast.GtE: lambda a, b: a >= b,
                ast.Gt: lambda a, b: a > b,
                ast.LtE: lambda a, b: a <= b,
                ast.Lt: lambda a, b: a < b,
                ast.Eq: lambda a, b: a == b,
                ast.NotEq: lambda a, b: a != b,
            }
            return ops[type(node.ops[0])](left, right)
        if isinstance(node, ast.BoolOp):
            values = [self._eval(v, text) for v in node.values]
            return all(values) if isinstance(node.op, ast.And) else any(values)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id == "tostring" and len(node.args) == 1:
                return _tostring(self._eval(node.args[0], text))
            if node.func.id == "trimsuffix" and len(node.args) == 2:
                value, suffix = (self._eval(arg, text) for arg in node.args)
                return str(value).removesuffix(str(suffix))
            if node.func.id == "try_":
                for arg in node.args:
                    with contextlib.suppress(KeyError):
                        return self._eval(arg, text)
                raise KeyError(f"no argument of try() evaluates in {text!r}")
        raise ValueError(f"{self.path.name}: unsupported expression {text!r}")

    def _reference(self, name: str, text: str) -> Any:
        kind, _, rest = name.partition(".")
        if kind == "var":
            return self.variables[rest]
        if kind == "local":
            return self.value(self.locals[rest])
        if kind == "data":
            return self.data[name]
        raise ValueError(f"{self.path.name}: unsupported reference {name!r} in {text!r}")


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Name):
        return node.id
    raise ValueError(f"not a reference: {ast.dump(node)}")


def _tostring(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _unquote(text: str) -> str:
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] == '"' else text


# -- YAML and shell ------------------------------------------------------------------------------


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def parse_duration(text: str | int | float) -> float:
    """Seconds in a compose or Terraform duration: ``30s``, ``1m30s``, ``10m``, ``500ms``."""
    if isinstance(text, int | float):
        return float(text)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def trapped_signals(script: str) -> set[str]:
    """Signal names a shell script installs a non-empty trap for (``trap '...' TERM INT``)."""
    names: set[str] = set()
    for match in re.finditer(r"^\s*trap\s+(['\"])(.+?)\1\s+([A-Z0-9 ]+)$", script, re.MULTILINE):
        names.update(f"SIG{name}" for name in match.group(3).split())
    return names


def remap(env: Mapping[str, str], old: str, new: Path) -> dict[str, str]:
    """``env`` with every path under ``old`` moved under ``new`` (container to temp dir)."""
    out = {}
    for key, value in env.items():
        if value == old or value.startswith(old.rstrip("/") + "/"):
            value = str(new) + value[len(old.rstrip("/")) :]
        out[key] = value
    return out


# -- running the examples --------------------------------------------------------------------------


@dataclass
class Stage:
    """A directory standing in for a container: ``bin`` holds ``agentapi`` (the fake AgentAPI
    program) and ``agentapi-persist`` (this checkout's CLI); every process started here carries
    a marker in its environment, so cleanup finds each one, whatever session it moved to."""

    root: Path
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        self.bin = self.root / "bin"
        write_agentapi_script(self.bin)
        shim = self.bin / "agentapi-persist"
        shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m agentapi_persist "$@"\n')
        shim.chmod(0o755)

    def env(self, *layers: Mapping[str, str], **extra: str) -> dict[str, str]:
        """A process environment: the basics, then each of ``layers``, then ``extra``."""
        keep = {k: v for k, v in os.environ.items() if k in ("LANG", "LC_ALL", "TMPDIR")}
        env = {
            **keep,
            "PATH": f"{self.bin}:/usr/local/bin:/usr/bin:/bin",
            "PYTHONPATH": str(REPO),
        }
        for layer in layers:
            env.update(layer)
        return {**env, **extra, "DEPLOY_TEST_MARKER": self.marker}

    async def start(
        self, *argv: str, env: Mapping[str, str], log: str, cwd: Path | None = None
    ) -> asyncio.subprocess.Process:
        """Start ``argv`` in a new session, stdout and stderr to ``root/<log>``."""
        with (self.root / log).open("ab") as out:
            return await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env=dict(env),
                cwd=cwd or self.root,
                start_new_session=True,
            )

    async def run(
        self, *argv: str, env: Mapping[str, str], log: str, timeout: float = 30
    ) -> tuple[int, float]:
        """Run ``argv`` to completion; its exit code and how long it took."""
        started = time.monotonic()
        proc = await self.start(*argv, env=env, log=log)
        code = await asyncio.wait_for(proc.wait(), timeout)
        return code, time.monotonic() - started

    def log(self, name: str) -> str:
        path = self.root / name
        return path.read_text(errors="replace") if path.exists() else ""

    def processes(self) -> list[int]:
        """Pids of live processes started here (zombies excluded)."""
        found = []
        needle = f"DEPLOY_TEST_MARKER={self.marker}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    stat = (entry / "stat").read_text()
                    if stat.rsplit(")", 1)[1].split()[0] != "Z":
                        found.append(int(entry.name))
        return found

    def kill_all(self) -> None:
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def staged(root: Path) -> Iterator[Stage]:
    """A ``Stage`` whose processes are all killed on the way out, pass or fail."""
    stage = Stage(root)
    try:
        yield stage
    finally:
        stage.kill_all()


async def eventually(check: Callable[[], bool], *, within: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what or check}")
        await asyncio.sleep(0.05)


def stored_messages(state_dir: Path) -> int:
    """Messages in agentapi-persist's durable copy (0 when there is none yet)."""
    with contextlib.suppress(Exception):
        conversation = StateStore(state_dir, read_only=True).load().conversation
        return len(conversation.messages) if conversation else 0
    return 0


def seed_copy(state_dir: Path, conversation: Conversation) -> None:
    """A durable copy as a previous run of the sidecar would have left it."""
    StateStore(state_dir).save(conversation)


def tear(path: Path) -> None:
    """Leave half of an AgentAPI state file, as a crash mid-write would."""
    data = json.dumps(
        {"version": 1, "messages": [{"id": 0, "message": "x" * 200, "role": "user"}]}
    ).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])


async def agentapi_get(url: str, path: str) -> Any:
    """GET from AgentAPI as a person's browser would; ``None`` while it does not answer."""
    try:
        timeout = aiohttp.ClientTimeout(total=2)
        async with (
            aiohttp.ClientSession() as session,
            session.get(url + path, timeout=timeout) as resp,
        ):
            return await resp.json() if resp.status == 200 else None
    except (aiohttp.ClientError, TimeoutError):
        return None


async def wait_for_agentapi(url: str, *, messages: int, within: float = 20.0) -> None:
    """Until AgentAPI answers with ``messages`` messages."""
    deadline = time.monotonic() + within
    while True:
        body = await agentapi_get(url, "/messages")
        if body is not None and len(body["messages"]) == messages:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"AgentAPI at {url} did not hold {messages} messages: {body}")
        await asyncio.sleep(0.1)


async def say_to_agent(url: str, text: str) -> None:
    """POST a user message (the fake answers with an echo: two new messages)."""
    async with aiohttp.ClientSession() as session:
        payload = {"content": text, "type": "user"}
        async with session.post(url + "/message", json=payload) as resp:
            assert resp.status == 200, await resp.text()


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
