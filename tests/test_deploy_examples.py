"""The deployment examples: wired as their tools read them, and run for real.

No Docker engine, Kubernetes cluster or Coder server runs here, so each example is checked in
two ways. Its files are parsed the way Terraform, compose and Kubernetes read them, and the
wiring is checked: grace periods longer than agentapi-persist's, the stop signal trapped,
state on the persistent volume, settings that load into the product's own ``Settings``. Then
its scripts and commands run as real processes with the environment the file gives them, in a
temp directory standing in for the container, with the fake AgentAPI program as ``agentapi``
and FakeCoder as the Coder server: restore before AgentAPI, save and upload on stop, in time.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agentapi_persist.config import Settings
from agentapi_persist.models import Conversation
from agentapi_persist.testing.coder import FakeCoder
from agentapi_persist.testing.server import free_port

from .conftest import TASK_ID, coder_env, make_messages
from .deploy_support import (
    EXAMPLES,
    REPO,
    Stage,
    Template,
    agentapi_get,
    eventually,
    load_yaml_documents,
    parse_duration,
    pid_alive,
    remap,
    say_to_agent,
    seed_copy,
    staged,
    stored_messages,
    tear,
    trapped_signals,
    wait_for_agentapi,
)

CODER_TEMPLATE = EXAMPLES / "coder-template"
TEMPLATES = {
    "docker": CODER_TEMPLATE / "main.tf",
    "kubernetes": CODER_TEMPLATE / "kubernetes" / "main.tf",
}
DOCKER = EXAMPLES / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"
KUBERNETES = EXAMPLES / "kubernetes" / "agentapi.yaml"
SCRIPTS = sorted(
    [
        ENTRYPOINT,
        *(CODER_TEMPLATE / "scripts").glob("*.sh"),
        *(CODER_TEMPLATE / "kubernetes" / "scripts").glob("*.sh"),
    ]
)
#: Time the stop needs beyond agentapi-persist's own grace: the runtime's signal reaching the
#: script, interpreters starting, AgentAPI's own exit. The examples promise at least this.
STOP_SLACK_S = 5
WORKSPACE_ID = "5f3e2a1b-0c4d-4e8f-9a7b-6c5d4e3f2a1b"


def template(name: str, **overrides: Any) -> Template:
    data = {"data.coder_task.me.id": TASK_ID, "data.coder_workspace.me.id": WORKSPACE_ID}
    return Template(TEMPLATES[name], data=data, overrides=overrides)


def workspace_env(tf: Template) -> dict[str, str]:
    """The environment the template's coder_env resources give every workspace process."""
    (env_resource,) = tf.resources("coder_env").values()
    assert env_resource["name"] == "${each.key}"
    assert env_resource["value"] == "${each.value}"
    env = tf.value(env_resource["for_each"])
    assert isinstance(env, dict)
    return {key: str(value) for key, value in env.items()}


def scripts_by_phase(tf: Template) -> dict[str, dict[str, Any]]:
    scripts: dict[str, dict[str, Any]] = {}
    for body in tf.resources("coder_script").values():
        phase = "start" if body.get("run_on_start") else "stop" if body.get("run_on_stop") else ""
        assert phase, f"a coder_script that runs neither on start nor on stop: {body}"
        assert phase not in scripts, f"two {phase} scripts"
        scripts[phase] = body
    return scripts


def script_path(tf: Template, body: dict[str, Any]) -> Path:
    raw = str(body["script"])
    prefix, suffix = '${file("${path.module}/', '")}'
    assert raw.startswith(prefix), raw
    assert raw.endswith(suffix), raw
    return tf.path.parent / raw[len(prefix) : -len(suffix)]


def compose_service() -> dict[str, Any]:
    (doc,) = load_yaml_documents(DOCKER / "compose.yaml")
    service: dict[str, Any] = doc["services"]["agentapi"]
    return service


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    raw = service["environment"]
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {str(k): str(v) for k, v in raw.items()}


def kubernetes_objects() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in load_yaml_documents(KUBERNETES)}


def container_env(container: dict[str, Any], objects: dict[str, dict[str, Any]]) -> dict[str, str]:
    """A container's environment: its envFrom ConfigMaps, then its own env entries."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        configmap = objects["ConfigMap"]
        assert configmap["metadata"]["name"] == name
        env.update({k: str(v) for k, v in configmap["data"].items()})
    env.update({item["name"]: str(item["value"]) for item in container.get("env", [])})
    return env


def is_under(path: str, directory: str) -> bool:
    return Path(path).is_relative_to(directory)


def last_shutdown(state_dir: Path) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((state_dir / "last-shutdown.json").read_text())
    return record


def step(record: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(s for s in record["steps"] if s["name"] == name)
    return found


def agentapi_state_messages(path: Path) -> list[str]:
    return [m["message"] for m in json.loads(path.read_bytes())["messages"]]


# -- static wiring ---------------------------------------------------------------------------------


def test_scripts_parse_and_pass_shellcheck() -> None:
    """Every shell script parses (bash -n), and passes shellcheck where it is installed."""
    for script in SCRIPTS:
        assert os.access(script, os.X_OK), f"{script.name} is not executable"
        done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (bash -n passed)")
    done = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_terraform_fmt() -> None:
    """`terraform fmt -check` accepts both templates (where a terraform binary exists; the
    providers they need cannot be fetched here, so `validate` cannot run)."""
    terraform = shutil.which("terraform")
    if terraform is None:
        pytest.skip("no terraform binary; the templates are checked through python-hcl2 only")
    env = {"PATH": os.environ["PATH"], "CHECKPOINT_DISABLE": "1", "TF_CLI_CONFIG_FILE": "/dev/null"}
    done = subprocess.run(
        [terraform, "fmt", "-check", "-diff", "-recursive", str(CODER_TEMPLATE)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_template_scripts_and_environment(name: str) -> None:
    """Start restores then runs the sidecar, stop runs `shutdown`; the workspace environment
    loads into the product's Settings with every path on the home volume."""
    tf = template(name)
    scripts = scripts_by_phase(tf)
    assert scripts["start"].get("start_blocks_login") is True
    start, stop = script_path(tf, scripts["start"]), script_path(tf, scripts["stop"])
    assert start.name == "agentapi-persist-start.sh"
    text = start.read_text()
    order = [text.find(step) for step in ("persist restore", "persist run", "agentapi server")]
    assert -1 not in order, order
    assert order == sorted(order), "restore, then the sidecar, then AgentAPI"
    assert "exec agentapi-persist shutdown" in stop.read_text()

    env = workspace_env(tf)
    home = tf.value(tf.locals["home"])
    settings = Settings.load({}, env={**env, "HOME": home})
    for path in (settings.state_dir, settings.agentapi_state_file, settings.agentapi_pid_file):
        assert is_under(str(path), home), f"{path} is not on the home volume {home}"
    assert str(settings.agentapi_state_file) == env["AGENTAPI_STATE_FILE"]
    assert str(settings.agentapi_pid_file) == env["AGENTAPI_PID_FILE"]
    assert settings.agentapi_state_file_explicit  # AgentAPI gets the variable: it saves
    assert settings.grace_s == tf.variables["persist_grace_seconds"]
    assert settings.task_id == TASK_ID
    assert settings.stop_agentapi  # like the bash script it replaces: AgentAPI is stopped
    assert "coder_task.me" in tf.data_sources()
    assert settings.replica is None  # off unless the template's replica_url is set
    assert settings.replica_endpoint is None


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_template_turns_the_replica_on(name: str) -> None:
    """replica_url (scoped to the workspace) and replica_endpoint reach the product's
    Settings; the empty endpoint of a template without one does not hide an AWS_ENDPOINT_URL
    the image sets."""
    tf = template(
        name, replica_url="s3://team-bucket/agents/", replica_endpoint="https://s3.example"
    )
    env = {**workspace_env(tf), "HOME": tf.value(tf.locals["home"])}
    settings = Settings.load({}, env=env)
    # One place per workspace: every workspace of the template has the same module directory.
    assert settings.replica == f"s3://team-bucket/agents/{WORKSPACE_ID}"
    assert settings.replica_endpoint == "https://s3.example"
    bare = {**workspace_env(template(name)), "HOME": "/home/coder"}
    settings = Settings.load({}, env={**bare, "AWS_ENDPOINT_URL": "http://minio:9000"})
    assert settings.replica is None
    assert settings.replica_endpoint == "http://minio:9000"


def test_docker_template_grace() -> None:
    """Docker waits longer than agentapi-persist may take, on stop and on destroy, and the
    agent gets the signal it shuts down on; a shorter grace fails the plan."""
    tf = template("docker")
    (container,) = tf.resources("docker_container").values()
    persist, stop = tf.variables["persist_grace_seconds"], tf.variables["stop_grace_seconds"]
    assert tf.value(container["stop_signal"]) == "SIGINT"
    assert tf.value(container["stop_timeout"]) == stop
    assert tf.value(container["destroy_grace_seconds"]) == stop
    assert stop >= persist + STOP_SLACK_S
    (home_mount,) = container["volumes"]
    assert tf.value(home_mount["container_path"]) == tf.value(tf.locals["home"])
    (check,) = container["lifecycle"][0]["precondition"]
    assert tf.value(check["condition"]) is True
    short = template("docker", stop_grace_seconds=persist + 1)
    assert short.value(check["condition"]) is False


def test_kubernetes_template_grace() -> None:
    """The pod's termination grace outlasts agentapi-persist's, and Terraform waits for the
    pod longer still (a pod, not a deployment: deleting a pod waits for it)."""
    tf = template("kubernetes")
    assert not tf.resources("kubernetes_deployment_v1")
    assert not tf.resources("kubernetes_deployment")
    (pod,) = tf.resources("kubernetes_pod_v1").values()
    spec = pod["spec"][0]
    persist, stop = tf.variables["persist_grace_seconds"], tf.variables["stop_grace_seconds"]
    assert tf.value(spec["termination_grace_period_seconds"]) == stop
    assert stop >= persist + STOP_SLACK_S
    delete = parse_duration(tf.value(pod["timeouts"][0]["delete"]))
    assert delete >= stop + 60
    (container,) = spec["container"]
    (mount,) = container["volume_mount"]
    assert tf.value(mount["mount_path"]) == tf.value(tf.locals["home"])
    (volume,) = spec["volume"]
    claim = volume["persistent_volume_claim"][0]["claim_name"]
    assert "kubernetes_persistent_volume_claim_v1.home" in claim
    (check,) = pod["lifecycle"][0]["precondition"]
    assert tf.value(check["condition"]) is True
    assert template("kubernetes", stop_grace_seconds=persist).value(check["condition"]) is False


def test_kubernetes_template_scripts_are_the_docker_ones() -> None:
    """A template directory is pushed on its own, so kubernetes/ has copies: identical ones."""
    docker, kubernetes = CODER_TEMPLATE / "scripts", CODER_TEMPLATE / "kubernetes" / "scripts"
    names = sorted(p.name for p in docker.glob("*.sh"))
    assert names == sorted(p.name for p in kubernetes.glob("*.sh"))
    for name in names:
        assert (docker / name).read_bytes() == (kubernetes / name).read_bytes(), name


def test_compose_wiring() -> None:
    """The stop signal is one the entrypoint traps, the stop grace outlasts agentapi-persist's,
    and every file lives on the named volume."""
    service = compose_service()
    (doc,) = load_yaml_documents(DOCKER / "compose.yaml")
    assert service["stop_signal"] in trapped_signals(ENTRYPOINT.read_text())
    env = compose_env(service)
    grace = float(env["AGENTAPI_PERSIST_GRACE"])
    assert parse_duration(service["stop_grace_period"]) >= grace + STOP_SLACK_S
    (volume,) = service["volumes"]
    name, mount = volume.split(":")[:2]
    assert name in doc["volumes"], "a named volume, declared at the top level"
    settings = Settings.load({}, env={**env, "HOME": "/home/coder"})
    for path in (settings.state_dir, settings.agentapi_state_file, settings.agentapi_pid_file):
        assert is_under(str(path), mount), f"{path} is not on the volume at {mount}"
    assert settings.stop_agentapi


def test_dockerfile_wiring() -> None:
    """The image runs the entrypoint, stops it with a signal it traps, and runs as the uid the
    Kubernetes examples expect."""
    lines = [line.strip() for line in (DOCKER / "Dockerfile").read_text().splitlines()]

    def instruction(name: str) -> str:
        return next(line.split(" ", 1)[1] for line in lines if line.startswith(name + " "))

    copy = next(line for line in lines if line.startswith("COPY ") and "entrypoint.sh" in line)
    copied_to = copy.split()[-1]
    assert copy.split()[-2] == "examples/docker/entrypoint.sh"
    assert json.loads(instruction("ENTRYPOINT")) == [copied_to]
    assert instruction("STOPSIGNAL") in trapped_signals(ENTRYPOINT.read_text())
    assert instruction("USER") != "root"
    assert any("--uid 1000" in line for line in lines)


def test_the_dockerfile_installs_what_this_repository_builds(tmp_path: Path) -> None:
    """No Docker engine runs here, so the Dockerfile's own install steps run outside it: the
    wheel its COPY takes is what scripts/wheel builds (and .dockerignore lets in), and its
    `pip install` line, run in a fresh virtual environment, gives a working agentapi-persist
    (the package is on no index: the example once said `pip install agentapi-persist`)."""
    lines = [line.strip() for line in (DOCKER / "Dockerfile").read_text().splitlines()]
    copies = [line.split()[1:] for line in lines if line.startswith("COPY ")]
    wheel_copy = next(args for args in copies if args[0].endswith(".whl"))
    allowed = [
        line[1:] for line in (REPO / ".dockerignore").read_text().splitlines() if line[:1] == "!"
    ]
    for args in copies:
        source = next(arg for arg in args if not arg.startswith("--"))
        assert source in allowed, f"{source} is not let in by .dockerignore"
    (install,) = [line for line in lines if line.startswith("RUN pip install")]

    built = subprocess.run(
        [str(REPO / "scripts" / "wheel"), str(tmp_path / "dist")],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob(Path(wheel_copy[0]).name)
    image_dir = wheel_copy[-1]  # where the COPY puts it in the image
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True)
    command = install.removeprefix("RUN ").replace(image_dir, f"{wheel.parent}/")
    command = command.replace("rm -rf /tmp/wheels", "true")  # the image's cleanup, not ours
    env = {**os.environ, "PATH": f"{tmp_path / 'venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    ran = subprocess.run(
        ["sh", "-ec", command], capture_output=True, text=True, timeout=600, env=env, check=False
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    program = tmp_path / "venv" / "bin" / "agentapi-persist"
    version = subprocess.run(
        [str(program), "--version"], capture_output=True, text=True, env=env, check=False
    )
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("agentapi-persist ")
    helped = subprocess.run(
        [str(program), "export", "--help"], capture_output=True, text=True, env=env, check=False
    )
    assert helped.returncode == 0, helped.stderr


def test_kubernetes_manifest_wiring() -> None:
    """Restore before the sidecar before AgentAPI; a preStop hook saves before AgentAPI's
    SIGTERM; the grace outlasts agentapi-persist's; every container shares the volume."""
    objects = kubernetes_objects()
    deployment = objects["Deployment"]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # one writer per state dir
    pod = deployment["spec"]["template"]["spec"]
    restore, sidecar = pod["initContainers"]
    (agentapi,) = pod["containers"]
    assert "restartPolicy" not in restore  # runs to completion first
    assert "agentapi-persist restore" in " ".join(restore["command"])
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar: stopped after AgentAPI
    assert sidecar["command"] == ["agentapi-persist", "run"]
    assert agentapi["command"][:2] == ["agentapi", "server"]
    assert agentapi["lifecycle"]["preStop"]["exec"]["command"] == ["agentapi-persist", "shutdown"]
    assert pod["shareProcessNamespace"] is True  # the sidecar checks and signals AgentAPI
    assert pod["securityContext"]["runAsUser"] == 1000

    claim = objects["PersistentVolumeClaim"]["metadata"]["name"]
    (volume,) = pod["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim
    envs = [container_env(c, objects) for c in (restore, sidecar, agentapi)]
    assert envs[0] == envs[1] == envs[2]
    for container in (restore, sidecar, agentapi):
        (mount,) = container["volumeMounts"]
        assert mount["name"] == volume["name"]
    mount_path = restore["volumeMounts"][0]["mountPath"]
    settings = Settings.load({}, env={**envs[0], "HOME": "/home/coder"})
    for path in (settings.state_dir, settings.agentapi_state_file, settings.agentapi_pid_file):
        assert is_under(str(path), mount_path), f"{path} is not on the volume"
    assert pod["terminationGracePeriodSeconds"] >= settings.grace_s + STOP_SLACK_S


# -- running them ---------------------------------------------------------------------------------


async def test_entrypoint_restores_then_saves_on_sigterm(tmp_path: Path, coder: FakeCoder) -> None:
    """The compose service's entrypoint and environment, for real: AgentAPI's torn state file is
    repaired before AgentAPI reads it, and SIGTERM saves, uploads and stops in time, exit 0."""
    service = compose_service()
    with staged(tmp_path) as stage:
        env, state_dir, state_file = entrypoint_env(stage, service, coder)
        seed_copy(state_dir, Conversation(messages=tuple(make_messages(8))))
        tear(state_file)
        url = f"http://127.0.0.1:{env['AGENTAPI_PORT']}"
        proc = await stage.start(str(ENTRYPOINT), *service["command"], env=env, log="container.log")
        await wait_for_agentapi(url, messages=8)
        await say_to_agent(url, "one more")
        await eventually(lambda: stored_messages(state_dir) == 10, what="checkpoint")

        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        grace = float(env["AGENTAPI_PERSIST_GRACE"])
        code = await asyncio.wait_for(proc.wait(), grace + 5)
        took = time.monotonic() - started
        log = stage.log("container.log")
        assert code == 0, log
        assert took < grace, log
        assert stage.processes() == [], "the sidecar and AgentAPI are gone"
    assert agentapi_state_messages(state_file)[-1] == "echo: one more"
    assert list(state_file.parent.glob(state_file.name + ".corrupt-*")), "torn bytes kept aside"
    record = last_shutdown(state_dir)
    assert record["notes"][0] == "stopped by control"
    assert step(record, "agentapi_save")["ok"]
    assert step(record, "snapshot")["outcome"] == "delivered"
    assert step(record, "stop")["outcome"] == "exited"
    assert coder.uploads[-1].json["messages"][-1]["content"] == "echo: one more"


async def test_entrypoint_ctrl_c_is_one_stop_request(tmp_path: Path, coder: FakeCoder) -> None:
    """A Ctrl-C signals the whole foreground process group; the children run in sessions of
    their own, so the sidecar still gets one request and delivers the snapshot."""
    service = compose_service()
    with staged(tmp_path) as stage:
        env, state_dir, _ = entrypoint_env(stage, service, coder)
        url = f"http://127.0.0.1:{env['AGENTAPI_PORT']}"
        proc = await stage.start(str(ENTRYPOINT), *service["command"], env=env, log="container.log")
        await wait_for_agentapi(url, messages=0)
        await say_to_agent(url, "hello")
        await eventually(lambda: stored_messages(state_dir) == 2, what="checkpoint")
        os.killpg(proc.pid, signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), float(env["AGENTAPI_PERSIST_GRACE"]) + 5)
        assert code == 0, stage.log("container.log")
    record = last_shutdown(state_dir)
    assert record["notes"][0] == "stopped by control", record
    assert step(record, "snapshot")["outcome"] == "delivered", record


async def test_entrypoint_saves_when_agentapi_dies(tmp_path: Path, coder: FakeCoder) -> None:
    """AgentAPI killed under the entrypoint: the conversation is saved and uploaded anyway, and
    the container exits with AgentAPI's status so a restart policy sees the crash."""
    service = compose_service()
    with staged(tmp_path) as stage:
        env, state_dir, _ = entrypoint_env(stage, service, coder)
        url = f"http://127.0.0.1:{env['AGENTAPI_PORT']}"
        proc = await stage.start(str(ENTRYPOINT), *service["command"], env=env, log="container.log")
        await wait_for_agentapi(url, messages=0)
        await say_to_agent(url, "hello")
        await eventually(lambda: stored_messages(state_dir) == 2, what="checkpoint")
        os.kill(int(Path(env["AGENTAPI_PID_FILE"]).read_text()), signal.SIGKILL)
        code = await asyncio.wait_for(proc.wait(), float(env["AGENTAPI_PERSIST_GRACE"]) + 5)
        assert code == 128 + signal.SIGKILL, stage.log("container.log")
        assert stage.processes() == []
    record = last_shutdown(state_dir)
    assert record["ok"], record
    assert record["messages"] == 2
    assert coder.uploads[-1].json["messages"][-1]["content"] == "echo: hello"


def entrypoint_env(
    stage: Stage, service: dict[str, Any], coder: FakeCoder
) -> tuple[dict[str, str], Path, Path]:
    """The compose service's environment, its volume moved into the stage, plus a Coder task."""
    env = remap(compose_env(service), "/data", stage.root / "data")
    env = stage.env(
        env, coder_env(coder), AGENTAPI_PORT=str(free_port()), HOME=str(stage.root / "home")
    )
    (stage.root / "data").mkdir(exist_ok=True)
    return env, Path(env["AGENTAPI_PERSIST_STATE_DIR"]), Path(env["AGENTAPI_STATE_FILE"])


async def test_coder_template_scripts_across_a_restart(tmp_path: Path, coder: FakeCoder) -> None:
    """The template's start and stop scripts with its coder_env environment, as the Coder agent
    runs them, over two workspace starts: the stop saves and uploads in time, and the next
    start repairs a torn state file before AgentAPI loads it."""
    tf = template("docker")
    scripts = scripts_by_phase(tf)
    start, stop = script_path(tf, scripts["start"]), script_path(tf, scripts["stop"])
    home = tmp_path / "home"
    home.mkdir()
    with staged(tmp_path) as stage:
        env = remap(workspace_env(tf), tf.value(tf.locals["home"]), home)
        # What the agent adds: HOME, and its URL and token for the snapshot upload.
        env = stage.env(env, coder_env(coder), AGENTAPI_PORT=str(free_port()), HOME=str(home))
        url = f"http://127.0.0.1:{env['AGENTAPI_PORT']}"
        state_dir, state_file = (
            Settings.load({}, env=env).state_dir,  # the default: this module's directory
            Path(env["AGENTAPI_STATE_FILE"]),
        )
        grace = float(env["AGENTAPI_PERSIST_GRACE"])

        # First start: nothing to restore.
        code, _ = await stage.run("bash", str(start), env=env, log="start-1.log")
        assert code == 0, stage.log("start-1.log")
        await wait_for_agentapi(url, messages=0)
        await say_to_agent(url, "hello")
        await eventually(lambda: stored_messages(state_dir) == 2, what="checkpoint")

        code, took = await stage.run("bash", str(stop), env=env, log="stop-1.log")
        assert code == 0, stage.log("stop-1.log") + stage.log(
            "home/.agentapi-module/agentapi-persist.log"
        )
        assert took < grace
        assert "shutdown ok" in stage.log("stop-1.log")
        assert coder.uploads[-1].json["messages"][-1]["content"] == "echo: hello"
        await eventually(
            lambda: stage.processes() == [], within=5, what="sidecar and AgentAPI gone"
        )

        # The container is gone; AgentAPI's file was torn on the way (a crash mid-save).
        tear(state_file)
        code, _ = await stage.run("bash", str(start), env=env, log="start-2.log")
        assert code == 0, stage.log("start-2.log")
        await wait_for_agentapi(url, messages=2)
        assert "restore exited 0" in stage.log("start-2.log")
        code, _ = await stage.run("bash", str(stop), env=env, log="stop-2.log")
        assert code == 0, stage.log("stop-2.log")
    assert agentapi_state_messages(state_file) == ["hello", "echo: hello"]


async def test_kubernetes_pod_lifecycle(tmp_path: Path) -> None:
    """The manifest's containers in the kubelet's order, with their commands and environment:
    restore, sidecar, AgentAPI; then on deletion the preStop hook saves while AgentAPI runs,
    AgentAPI gets SIGTERM, and all of it fits in terminationGracePeriodSeconds."""
    objects = kubernetes_objects()
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    restore, sidecar_spec = pod["initContainers"]
    (agentapi_spec,) = pod["containers"]
    mount_path = restore["volumeMounts"][0]["mountPath"]
    with staged(tmp_path) as stage:
        env = remap(container_env(restore, objects), mount_path, tmp_path / "data")
        env = stage.env(env, AGENTAPI_PORT=str(free_port()), HOME=str(tmp_path / "home"))
        (tmp_path / "data").mkdir()
        url = f"http://127.0.0.1:{env['AGENTAPI_PORT']}"
        state_dir, state_file = (
            Path(env["AGENTAPI_PERSIST_STATE_DIR"]),
            Path(env["AGENTAPI_STATE_FILE"]),
        )
        seed_copy(state_dir, Conversation(messages=tuple(make_messages(8))))
        tear(state_file)

        code, _ = await stage.run(*restore["command"], env=env, log="restore.log")
        assert code == 0, stage.log("restore.log")
        sidecar = await stage.start(*sidecar_spec["command"], env=env, log="sidecar.log")
        agentapi = await stage.start(*agentapi_spec["command"], env=env, log="agentapi.log")
        await wait_for_agentapi(url, messages=8)
        await say_to_agent(url, "one more")
        await eventually(lambda: stored_messages(state_dir) == 10, what="checkpoint")

        deleted = time.monotonic()
        pre_stop = agentapi_spec["lifecycle"]["preStop"]["exec"]["command"]
        code, _ = await stage.run(*pre_stop, env=env, log="prestop.log")
        assert code == 0, stage.log("prestop.log") + stage.log("sidecar.log")
        assert await agentapi_get(url, "/status") is not None, "AgentAPI ran through the save"
        assert await asyncio.wait_for(sidecar.wait(), 5) == 0, "the sidecar exits once saved"
        agentapi.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(agentapi.wait(), 5) == 0
        assert time.monotonic() - deleted <= pod["terminationGracePeriodSeconds"]
        assert stage.processes() == []
    assert agentapi_state_messages(state_file)[-1] == "echo: one more"
    record = last_shutdown(state_dir)
    assert record["notes"][0] == "stopped by control"
    assert step(record, "agentapi_save")["ok"]


async def test_custom_agent(tmp_path: Path, coder: FakeCoder) -> None:
    """examples/custom_agent.py restores, starts AgentAPI, embeds the sidecar, and on SIGTERM
    saves, uploads, stops AgentAPI and writes the final snapshot, in time, exit 0."""
    home, state_dir = tmp_path / "home", tmp_path / "state"
    state_file = home / ".agentapi-module" / "agentapi-state.json"
    seed_copy(state_dir, Conversation(messages=tuple(make_messages(8))))
    tear(state_file)
    port, grace, out = free_port(), 10.0, tmp_path / "snapshot.json"
    with staged(tmp_path) as stage:
        env = stage.env(coder_env(coder), HOME=str(home))
        argv = [sys.executable, str(EXAMPLES / "custom_agent.py"), "--state-dir", str(state_dir)]
        argv += ["--port", str(port), "--grace", str(grace), "--snapshot-out", str(out)]
        proc = await stage.start(*argv, "--", "claude", env=env, log="custom.log")
        url = f"http://127.0.0.1:{port}"
        await wait_for_agentapi(url, messages=8)
        await say_to_agent(url, "one more")
        await eventually(lambda: stored_messages(state_dir) == 10, what="checkpoint")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), grace + 5)
        log = stage.log("custom.log")
        assert code == 0, log
        assert time.monotonic() - started < grace
        assert stage.processes() == []
    assert "restore written" in log
    assert "shutdown ok" in log
    snapshot = json.loads(out.read_bytes())
    assert [m["content"] for m in snapshot["messages"]][-1] == "echo: one more"
    assert coder.uploads[-1].json == snapshot
    assert agentapi_state_messages(state_file)[-1] == "echo: one more"
    assert not pid_alive(int((home / ".agentapi-module" / "agentapi.pid").read_text()))


FAKE_PYTHON3 = """#!/bin/bash
# python3 -m venv DIR: a venv whose python, run as `-m pip install ...`, logs its arguments and
# installs an agentapi-persist that logs its own (no network, no real install).
[[ $1 == -m && $2 == venv ]] || exit 9
mkdir -p "$3/bin"
cat >"$3/bin/python" <<'PIP'
#!/bin/bash
bin="$(dirname "$0")"
echo "$*" >>"$bin/../pip.log"
printf '#!/bin/sh\\necho "$0 $*" >>"$(dirname "$0")/../calls.log"\\n' >"$bin/agentapi-persist"
chmod +x "$bin/agentapi-persist"
PIP
chmod +x "$3/bin/python"
"""


@pytest.mark.parametrize(
    ("source", "replica", "installed"),
    [
        ("agentapi-persist==0.1.0", "", "agentapi-persist==0.1.0"),
        ("agentapi-persist==0.1.0", "s3://b/p", "agentapi-persist[s3]==0.1.0"),
        ("git+https://git.example/a/agentapi-persist@v1", "s3://b/p",
         "agentapi-persist[s3] @ git+https://git.example/a/agentapi-persist@v1"),
    ],
    ids=["plain", "replica", "replica-from-git"],
)  # fmt: skip
async def test_coder_start_script_installs_once_per_source(
    tmp_path: Path, source: str, replica: str, installed: str
) -> None:
    """With agentapi_persist_source set, the start script installs it into a venv on the home
    volume once per source (not at every start), and uses that install for every step; with
    a replica configured, with the s3 extra its client needs."""
    tf = template("docker", agentapi_persist_source=source, agent_command="", replica_url=replica)
    start = script_path(tf, scripts_by_phase(tf)["start"])
    home, tools = tmp_path / "home", tmp_path / "tools"
    tools.mkdir()
    (tools / "python3").write_text(FAKE_PYTHON3)
    (tools / "python3").chmod(0o755)
    env = remap(workspace_env(tf), tf.value(tf.locals["home"]), home)
    venv = home / ".local" / "share" / "agentapi-persist" / "venv"
    with staged(tmp_path) as stage:
        env = stage.env(env, HOME=str(home), PATH=f"{tools}:/usr/bin:/bin")
        for boot in ("start-1.log", "start-2.log"):
            code, _ = await stage.run("bash", str(start), env=env, log=boot)
            assert code == 0, stage.log(boot)
        # The sidecar starts in the background: wait for both before the stage is cleared.
        await eventually(lambda: (venv / "calls.log").read_text().count(" run") == 2)
    assert (venv / "pip.log").read_text().splitlines() == [
        f"-m pip install --quiet --disable-pip-version-check --upgrade {installed}"
    ]
    calls = (venv / "calls.log").read_text().splitlines()
    assert all(line.startswith(str(venv / "bin" / "agentapi-persist")) for line in calls)
    assert sorted(line.split()[-1] for line in calls) == ["restore", "restore", "run", "run"]
