"""The public surface: sorted, complete, importable, and cheap to import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import agentapi_persist


def test_all_is_sorted() -> None:
    """__all__ stays sorted so additions are reviewed in one obvious place."""
    assert agentapi_persist.__all__ == sorted(agentapi_persist.__all__)


def test_every_name_is_importable() -> None:
    """Each exported name resolves to a real object."""
    for name in agentapi_persist.__all__:
        assert getattr(agentapi_persist, name) is not None, name


def test_unknown_names_raise_attribute_error() -> None:
    """A typo is an AttributeError, as for any module."""
    with pytest.raises(AttributeError, match="NoSuchThing"):
        agentapi_persist.NoSuchThing  # noqa: B018


def test_restore_is_the_function_not_the_module() -> None:
    """`agentapi_persist.restore` is callable even after the CLI imported its module."""
    import agentapi_persist.cli

    assert callable(agentapi_persist.restore)


def test_importing_the_package_and_cli_stays_light() -> None:
    """The CLI entry point must not import aiohttp or pydantic before it needs them."""
    code = (
        "import sys, agentapi_persist, agentapi_persist._options, agentapi_persist.errors;"
        "print(sorted(m for m in ('aiohttp', 'pydantic') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_type_checkers_see_exactly_the_public_names() -> None:
    """The imports for type checkers in __init__ name the same objects as the runtime list
    (_HOME), each from the module it says: the public API is listed once, and checked."""
    # Parsed in a child interpreter: CPython 3.11's AST constructor keeps its recursion count
    # in module-wide state (gh-106905), which another thread's parse in this long test process
    # can corrupt ("AST constructor recursion depth mismatch", a SystemError).
    code = (
        "import ast, json, sys\n"
        "typed = {}\n"
        "for node in ast.walk(ast.parse(open(sys.argv[1]).read())):\n"
        "    if isinstance(node, ast.ImportFrom) and node.level == 1 "
        "and node.module != '_version':\n"
        "        typed.update((alias.name, str(node.module)) for alias in node.names)\n"
        "print(json.dumps(typed))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, agentapi_persist.__file__],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout) == agentapi_persist._HOME
