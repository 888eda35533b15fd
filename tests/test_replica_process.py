"""The replica through the real CLI: the sidecar uploads, `shutdown` finishes it, `restore` on a
new volume brings it back, `status` and `doctor` show it, and faults of the object store
(down, killed mid-upload, slow, 503, wrong credentials) never touch the local copy.

The object store is a real S3-compatible server on loopback (``s3_support``); its faults are
a SIGKILL of the server, a truncated object file, and a TCP proxy that delays or answers 503.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentapi_persist.config import Settings
from agentapi_persist.errors import ReplicaError
from agentapi_persist.models import Conversation
from agentapi_persist.replica import replica_for
from agentapi_persist.store import StateStore
from agentapi_persist.testing.agentapi import FakeAgentAPI
from agentapi_persist.testing.coder import FakeCoder
from agentapi_persist.testing.server import free_port

from .cli_support import cli, cli_timed, run_cli
from .conftest import CANARY_TOKEN, TASK_ID, Workspace, coder_env, make_messages, new_workspace
from .faults_support import needs_strace, strace_prefix
from .real_agentapi import STATEFUL, real_agentapi
from .s3_support import ACCESS_KEY, BUCKET, SECRET_KEY, S3Server, fault_proxy, s3_server
from .sidecar_support import eventually, sidecar_process, stored_count
from .test_real_agentapi import (
    agentapi_env,
    assert_restored_and_reloaded,
    persist_env,
    start_conversation,
)

URL = f"s3://{BUCKET}/workspaces"


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[S3Server]:
    with s3_server(tmp_path / "s3") as server:
        yield server


def with_replica(ws: Workspace, server: S3Server, endpoint: str | None = None) -> None:
    ws.env.update(server.env(AWS_ENDPOINT_URL=endpoint or server.endpoint))
    ws.env["AGENTAPI_PERSIST_REPLICA"] = URL


async def replica_messages(ws: Workspace) -> int | None:
    """How many messages a fresh reader gets from the bucket right now (``None``: none)."""
    settings = Settings.load({}, env=ws.env)
    replica = replica_for(settings, StateStore(ws.root / "scratch-reader", read_only=True))
    assert replica is not None
    try:
        with pytest.MonkeyPatch.context() as env:
            for name, value in ws.env.items():
                if name.startswith("AWS_"):
                    env.setenv(name, value)
            copy = await replica.read_newest()
    finally:
        await replica.close()
    return None if copy.conversation is None else len(copy.conversation.messages)


async def replica_reaches(ws: Workspace, count: int, *, within: float) -> None:
    deadline = time.monotonic() + within
    while (held := await replica_messages(ws)) != count:
        if time.monotonic() > deadline:
            raise AssertionError(f"the replica holds {held} messages, not {count}, after {within}s")
        await asyncio.sleep(0.2)


def secret_free(*texts: str) -> None:
    for text in texts:
        assert SECRET_KEY not in text


async def test_sidecar_uploads_stop_finishes_and_a_new_volume_restores_it(
    workspace: Workspace, s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole life: the sidecar keeps the bucket current as the conversation grows, the
    stop's last upload succeeds, the volume is lost (state directory and AgentAPI's file
    deleted), and `restore` writes AgentAPI's file from the replica, saying so."""
    with_replica(workspace, s3)
    async with FakeAgentAPI(messages=make_messages(6)) as agent:
        env = {"AGENTAPI_PERSIST_AGENTAPI_URL": agent.url}
        debug = {**env, "AGENTAPI_PERSIST_LOG_LEVEL": "debug"}
        async with sidecar_process(workspace, env=debug) as sidecar:
            await eventually(lambda: stored_count(workspace) == 6)
            await replica_reaches(workspace, 6, within=15)
            agent.add_message("user", "one more")
            await replica_reaches(workspace, 7, within=15)
            status = await cli(workspace, "status", "--json", env=env)
            facts = json.loads(status.stdout)["replica"]
            assert facts["reachable"] is True, facts
            assert facts["lag_messages"] == 0, facts
            assert sidecar.saw("replica.pushed")
            agent.add_message("agent", "the last answer")
            await eventually(lambda: stored_count(workspace) == 8)
            stop = await cli(workspace, "shutdown", "--json", env=env)
            assert await sidecar.wait() == 0
        result = json.loads(stop.stdout)
        assert result["exit_code"] == 0, stop.stdout
        assert [s["name"] for s in result["steps"]][-1] == "replica"
        secret_free(stop.stdout, stop.stderr, json.dumps(sidecar.events), *sidecar.other)
        assert ACCESS_KEY not in json.dumps(sidecar.events)
        assert sidecar.saw("replica.pushed")
    for path in workspace.state_dir.rglob("*"):
        if path.is_file():
            secret_free(path.read_bytes().decode("utf-8", "replace"))
    assert await replica_messages(workspace) == 8

    shutil.rmtree(workspace.state_dir)  # a new volume: nothing of the old one is left
    workspace.state_file.unlink(missing_ok=True)
    run = await cli(workspace, "restore", "--json")
    assert run.code == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["copy_used"] == "replica", report
    assert report["outcome"] == "written", report
    assert any("there was no local copy" in line for line in report["did"]), report
    state = json.loads(workspace.state_file.read_text())
    assert len(state["messages"]) == 8
    assert stored_count(workspace) == 8
    secret_free(run.stdout, run.stderr)


async def test_a_store_down_at_start_is_reported_and_caught_up_later(
    workspace: Workspace, s3: S3Server
) -> None:
    """The object store is down when the sidecar starts: the conversation is kept locally as
    always, `status` says the replica cannot be read, and once the store is back the uploader
    catches up on its own (retries with backoff)."""
    s3.kill()
    with_replica(workspace, s3)
    async with FakeAgentAPI(messages=make_messages(4)) as agent:
        env = {"AGENTAPI_PERSIST_AGENTAPI_URL": agent.url}
        async with sidecar_process(workspace, env=env) as sidecar:
            await eventually(lambda: stored_count(workspace) == 4)
            await eventually(lambda: sidecar.saw("replica.push_failed"), within=15)
            status = await cli(workspace, "status", "--json", env=env)
            assert status.code == 8
            report = json.loads(status.stdout)
            assert report["replica"]["reachable"] is False
            assert any("cannot be read" in p for p in report["problems"]), report["problems"]
            agent.add_message("user", "written while the store is down")
            await eventually(lambda: stored_count(workspace) == 5)
            s3.start()
            await replica_reaches(workspace, 5, within=30)
            sidecar.proc.send_signal(signal.SIGTERM)
            assert await sidecar.wait() == 0


@pytest.mark.parametrize("fault", ["slow", "error"])
async def test_a_slow_or_failing_store_never_costs_the_local_copy(
    workspace: Workspace, s3: S3Server, fault: str
) -> None:
    """Behind a proxy that holds every answer 30 s, or answers 503: `shutdown --grace 3`
    makes the copy durable, ends inside its grace period, and says (exit 9) that the replica
    is behind; the local copy is complete."""
    async with fault_proxy(s3) as proxy, FakeAgentAPI(messages=make_messages(5)) as agent:
        with_replica(workspace, s3, endpoint=proxy.endpoint)
        proxy.mode = "slow" if fault == "slow" else "error"
        proxy.delay_s = 30.0
        env = {"AGENTAPI_PERSIST_AGENTAPI_URL": agent.url}
        # Timed by a stopwatch process (as every grace-bounded test is): a pause of this
        # process must not count as the stop's time.
        run = await cli_timed(workspace, "shutdown", "--grace", "3", "--json", env=env)
    result = json.loads(run.stdout)
    assert result["durable"] is True
    assert result["exit_code"] == 9, run.stdout
    replica_step = result["steps"][-1]
    assert replica_step["name"] == "replica"
    assert not replica_step["ok"]
    if fault == "error":
        assert "SlowDown" in replica_step["detail"] or "503" in replica_step["detail"]
    else:
        assert "not brought up to date" in replica_step["detail"]
    assert run.seconds < 3.0, run.seconds
    assert stored_count(workspace) == 5
    record = json.loads((workspace.state_dir / "replica.json").read_text())
    assert record["ok"] is False


@pytest.mark.faults
@needs_strace
async def test_a_slow_disk_and_a_slow_store_still_leave_the_stops_records(
    workspace: Workspace, s3: S3Server, tmp_path: Path
) -> None:
    """Every fsync 100 ms late (strace) and a store that holds every answer: the stop still
    writes what it keeps for `status` (`replica.json` saying why the replica is behind, and
    `last-shutdown.json`) and ends on its own, not by its watchdog.

    The records come once the result is out; the replica step spends what is left of the
    budget, so one after the other they had only the grace period's margin (0.15 s here), and
    at this disk's speed `replica.json` was never written (as in a CI run); side by side with
    no time kept for them, the watchdog still ends the clean-up."""
    log = tmp_path / "fsync.log"
    delay = "inject=fsync:delay_enter=100000"
    async with fault_proxy(s3) as proxy, FakeAgentAPI(messages=make_messages(5)) as agent:
        with_replica(workspace, s3, endpoint=proxy.endpoint)
        proxy.mode, proxy.delay_s = "slow", 30.0
        env = workspace.process_env(
            AGENTAPI_PERSIST_AGENTAPI_URL=agent.url, AGENTAPI_PERSIST_LOG_LEVEL="warning"
        )
        prefix = strace_prefix(log, "trace=fsync", delay)
        prefix.insert(1, "-ttt")  # each call's time, for the message below
        run = await run_cli(env, "shutdown", "--grace", "3", "--json", prefix=prefix)
    assert log.read_text().count("fsync(") >= 2, "the fault was not applied"
    result = json.loads(run.stdout)
    assert (result["durable"], result["exit_code"]) == (True, 9), run.stdout
    # The result's step times and the strace log say where the time went, if this fails.
    said = f"{run.stdout}\n{run.stderr[-2000:]}\n{log.read_text()[-3000:]}"
    assert "watchdog.exit_after_result" not in run.stderr, said
    assert stored_count(workspace) == 5
    record = json.loads((workspace.state_dir / "replica.json").read_text())
    assert record["ok"] is False
    assert "not brought up to date" in record["error"]
    last = json.loads((workspace.state_dir / "last-shutdown.json").read_text())
    assert last["exit_code"] == 9


async def test_a_store_killed_mid_upload_leaves_the_local_copy_and_no_bad_state(
    workspace: Workspace, s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL of the server while a 24 MB generation is going up (8 MB of it through the
    proxy): the push fails, the local copy is whole, whatever the server kept is never read
    as a state, and the next push (server back) completes and verifies."""
    async with fault_proxy(s3) as proxy:
        for name, value in s3.env(AWS_ENDPOINT_URL=proxy.endpoint).items():
            monkeypatch.setenv(name, value)
        settings = workspace.settings(replica=URL, replica_endpoint=proxy.endpoint)
        store = StateStore(workspace.state_dir, instance=settings.instance.as_dict())
        big = tuple(make_messages(24, size=1 << 20))
        store.save(Conversation(messages=big))
        replica = replica_for(settings, store)
        assert replica is not None
        try:
            pushing = asyncio.create_task(replica.push())
            await eventually(lambda: proxy.bytes_up > 8 << 20, within=30)
            s3.kill()
            with pytest.raises(ReplicaError):
                await pushing
            local = StateStore(workspace.state_dir, read_only=True).load().conversation
            assert local is not None
            assert local.messages == big
            assert not [k for k in s3.objects() if k.endswith(".gen")], "a partial object"
            s3.start()
            copy = await replica.read_newest()
            assert copy.conversation is None  # nothing complete was ever stored
            await replica.push()
            copy = await replica.read_newest()
            assert copy.conversation is not None
            assert copy.conversation.messages == big
        finally:
            await replica.close()


async def test_restore_never_takes_a_damaged_or_foreign_replica(
    workspace: Workspace, s3: S3Server, tmp_path: Path
) -> None:
    """The replica's only generation is truncated: `restore` on a new volume finds no good
    copy there and says so (nothing written from it). A replica whose instance.json names
    another module is not read at all."""
    with_replica(workspace, s3)
    async with FakeAgentAPI(messages=make_messages(3)) as agent:
        env = {"AGENTAPI_PERSIST_AGENTAPI_URL": agent.url, "AGENTAPI_PERSIST_STOP_AGENTAPI": "0"}
        run = await cli(workspace, "shutdown", "--json", env=env)
        assert json.loads(run.stdout)["exit_code"] == 0, run.stdout
    (generation,) = [k for k in s3.objects() if k.endswith(".gen")]
    path = s3.object_path(generation)
    path.write_bytes(path.read_bytes()[:-1])
    shutil.rmtree(workspace.state_dir)
    run = await cli(workspace, "restore", "--json")
    report = json.loads(run.stdout)
    assert report["copy_used"] == "local", report
    assert report["outcome"] == "nothing", report
    assert any("failed its checksum" in line for line in report["found"]), report
    assert not workspace.state_file.exists()

    (instance,) = [k for k in s3.objects() if k.endswith("instance.json")]
    record = json.loads(s3.object_path(instance).read_text())
    record["module_dir"] = "/home/someone-else/.agentapi-module"
    s3.object_path(instance).write_text(json.dumps(record))
    run = await cli(workspace, "restore", "--json")
    report = json.loads(run.stdout)
    assert any("belongs to another instance" in line for line in report["found"]), report
    assert report["copy_used"] == "local"


async def test_status_and_doctor_show_the_replica_and_bad_credentials(
    workspace: Workspace, s3: S3Server
) -> None:
    with_replica(workspace, s3)
    async with FakeAgentAPI(messages=make_messages(3)) as agent:
        env = {"AGENTAPI_PERSIST_AGENTAPI_URL": agent.url}
        run = await cli(workspace, "shutdown", "--json", env=env)
        assert json.loads(run.stdout)["exit_code"] == 0, run.stdout
        status = await cli(workspace, "status", env=env)
        assert "reachable=True" in status.stdout, status.stdout
        assert "restore_would=find the replica current" in status.stdout, status.stdout
        doctor = await cli(workspace, "doctor", "--json", env=env)
        (finding,) = [f for f in json.loads(doctor.stdout)["findings"] if f["name"] == "replica"]
        assert finding["verdict"] == "ok", finding
        bad = {**env, "AWS_SECRET_ACCESS_KEY": "wrong-secret-wrong-secret-000"}
        doctor = await cli(workspace, "doctor", "--json", env=bad)
        (finding,) = [f for f in json.loads(doctor.stdout)["findings"] if f["name"] == "replica"]
        assert finding["verdict"] == "fail", finding
        assert "wrong secret key" in finding["detail"], finding
        assert "wrong-secret-wrong" not in doctor.stdout + doctor.stderr


async def test_a_bad_replica_setting_is_a_usage_error(workspace: Workspace) -> None:
    run = await cli(workspace, "status", "--replica", "http://bucket/x")
    assert run.code == 2
    assert "--replica" in run.stderr, run.stderr
    assert "s3://" in run.stderr, run.stderr


@pytest.mark.real_agentapi
async def test_real_agentapi_loads_the_whole_conversation_from_the_replica(
    tmp_path: Path, s3: S3Server
) -> None:
    """The end-to-end case: a sidecar with a replica follows a real AgentAPI conversation,
    everything is SIGKILLed (no stop script runs), the volume is lost (state directory and
    AgentAPI's file deleted), `restore` takes the replica's copy, and a new real AgentAPI
    shows the whole conversation without re-running the initial prompt."""
    version = STATEFUL[0]
    ws = new_workspace(tmp_path / "workspace")
    with_replica(ws, s3)
    async with real_agentapi(version, ws.home, env=agentapi_env(ws)) as agent:
        env = persist_env(ws, agent)
        async with sidecar_process(ws, env=env) as sidecar:
            before = await start_conversation(agent, "one", "two")
            await replica_reaches(ws, len(before), within=20)
            os.killpg(sidecar.proc.pid, signal.SIGKILL)
            agent.kill()
    shutil.rmtree(ws.state_dir)
    ws.state_file.unlink(missing_ok=True)
    assert not ws.state_dir.exists()
    assert not ws.state_file.exists()
    await assert_restored_and_reloaded(version, ws, before)
    assert json.loads((await cli(ws, "status", "--json")).stdout)["replica"]["reachable"]


async def test_an_endpoint_with_credentials_in_it_is_refused_without_echoing_them(
    workspace: Workspace,
) -> None:
    run = await cli(
        workspace, "status", "--replica", URL, "--replica-endpoint", "http://ak:sekrit@h:9000"
    )
    assert run.code == 2
    assert "must not carry credentials" in run.stderr, run.stderr
    assert "sekrit" not in run.stderr + run.stdout


async def test_a_stop_whose_budget_ran_out_never_says_the_replica_is_current(
    workspace: Workspace, s3: S3Server
) -> None:
    """A hung Coder server takes the snapshot's whole slice of a 2 s grace: no time is left
    for the replica, and the result says so (`replica_ok: false`, a `cut` step), whatever
    else decides the exit code."""
    with_replica(workspace, s3)
    async with (
        FakeCoder(token=CANARY_TOKEN, task_ids={TASK_ID}, hang=True) as coder,
        FakeAgentAPI(messages=make_messages(4)) as agent,
    ):
        env = {"AGENTAPI_PERSIST_AGENTAPI_URL": agent.url, **coder_env(coder)}
        run = await cli(workspace, "shutdown", "--grace", "2", "--json", env=env)
    result = json.loads(run.stdout)
    assert result["durable"] is True, run.stdout
    assert result["replica_ok"] is False, run.stdout
    assert result["ok"] is False
    (step,) = [s for s in result["steps"] if s["name"] == "replica"]
    assert step["outcome"] == "cut", step
    record = json.loads((workspace.state_dir / "replica.json").read_text())
    assert record["ok"] is False, record


async def test_the_sidecar_started_before_agentapi_restores_from_the_replica(
    workspace: Workspace, s3: S3Server
) -> None:
    """A new volume, AgentAPI not up yet: the sidecar's own start reads the replica and
    writes AgentAPI's file from it, as `restore` would."""
    with_replica(workspace, s3)
    async with FakeAgentAPI(messages=make_messages(5)) as agent:
        run = await cli(
            workspace, "shutdown", "--json", env={"AGENTAPI_PERSIST_AGENTAPI_URL": agent.url}
        )
        assert json.loads(run.stdout)["exit_code"] == 0, run.stdout
    shutil.rmtree(workspace.state_dir)
    workspace.state_file.unlink(missing_ok=True)
    env = {"AGENTAPI_PERSIST_AGENTAPI_URL": f"http://localhost:{free_port()}"}
    async with sidecar_process(workspace, env=env) as sidecar:
        (restored,) = [e for e in sidecar.events if e.get("event") == "daemon.restored"]
        assert restored["outcome"] == "written", sidecar.events
        assert restored["messages"] == 5
        sidecar.proc.send_signal(signal.SIGTERM)
        await sidecar.wait()
    assert len(json.loads(workspace.state_file.read_text())["messages"]) == 5
