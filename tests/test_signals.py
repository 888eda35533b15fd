"""Stop coordination: first request sets the deadline, a second one forces; the watchdog."""

from __future__ import annotations

import subprocess
import sys
import time

from agentapi_persist.signals import StopController


async def test_first_request_sets_stop_and_deadline() -> None:
    """1. A stop request sets the flag and a deadline ``grace`` from its start."""
    controller = StopController(hard_exit=False)
    assert controller.remaining() == float("inf")
    controller.request_stop("SIGTERM", grace_s=10)
    assert controller.stop.is_set()
    assert not controller.force.is_set()
    assert controller.request is not None
    assert controller.request.reason == "SIGTERM"
    assert 9 < controller.remaining() <= 10


async def test_second_request_forces_and_only_brings_the_deadline_closer() -> None:
    """2. A second request escalates to force; a later deadline never extends the first."""
    controller = StopController(hard_exit=False)
    controller.request_stop("SIGTERM", grace_s=5)
    controller.request_stop("SIGINT", grace_s=60)
    assert controller.force.is_set()
    assert controller.remaining() <= 5
    controller.request_stop("control", grace_s=1)
    assert controller.remaining() <= 1
    assert controller.request is not None
    assert controller.request.reason == "SIGTERM"


def test_watchdog_ends_a_blocked_process_with_exit_5() -> None:
    """3. A process whose main thread is stuck is ended by the watchdog thread, code 5."""
    code = (
        "import time; from agentapi_persist.signals import arm_watchdog;"
        "arm_watchdog(time.monotonic() + 0.3); time.sleep(30)"
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=20, check=False
    )
    assert result.returncode == 5
    assert "exiting before SIGKILL" in result.stderr
    assert time.monotonic() - started < 15


def test_cancelled_watchdog_does_nothing() -> None:
    """4. Disarming in time lets the process finish normally."""
    code = (
        "import time; from agentapi_persist.signals import arm_watchdog;"
        "t = arm_watchdog(time.monotonic() + 0.3); t.cancel(); time.sleep(0.6)"
    )
    result = subprocess.run([sys.executable, "-c", code], timeout=20, check=False)
    assert result.returncode == 0
