"""Logging: JSON events with stable names on stderr, nothing on stdout, levels honoured."""

from __future__ import annotations

import json
import logging

import pytest
import structlog

from agentapi_persist.log import configure_logging


@pytest.fixture(autouse=True)
def _restore_structlog():
    yield
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


def test_json_events_go_to_stderr_only(capsys: pytest.CaptureFixture[str]) -> None:
    """An event is one JSON object on stderr with its name, level and time; stdout stays
    free for command results."""
    configure_logging(level="info", json=True)
    structlog.get_logger("x").info("store.saved", seq=3)
    out, err = capsys.readouterr()
    assert out == ""
    event = json.loads(err.strip())
    assert event["event"] == "store.saved"
    assert event["seq"] == 3
    assert event["level"] == "info"
    assert event["timestamp"].endswith("Z")


def test_levels_and_stdlib_logs(capsys: pytest.CaptureFixture[str]) -> None:
    """Below the level nothing is written; aiohttp's stdlib logs come out as JSON too, from
    warnings up (their info chatter is not ours to show)."""
    configure_logging(level="error", json=True)
    structlog.get_logger("x").warning("quiet")
    logging.getLogger("aiohttp.client").warning("also quiet at error")
    assert capsys.readouterr().err == ""
    configure_logging(level="info", json=True)
    logging.getLogger("aiohttp.client").info("stdlib chatter")
    logging.getLogger("aiohttp.client").warning("a stdlib warning")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["event"] for line in lines] == ["a stdlib warning"]
