# A Coder template (Docker) whose AgentAPI conversation survives workspace stops.
#
#   coder templates push agentapi-persist --directory examples/coder-template
#
# At start, one run_on_start script installs agentapi-persist, repairs AgentAPI's state file,
# starts the sidecar (`agentapi-persist run`) and then AgentAPI, in that order. At stop, a
# run_on_stop script runs `agentapi-persist shutdown`: the sidecar saves the conversation and
# uploads the task's log snapshot within `persist_grace_seconds`. Docker must wait longer than
# that before it SIGKILLs the container: `stop_grace_seconds`, checked below.
#
# The Kubernetes variant is in kubernetes/. docs/DEPLOYING.md explains every choice.

terraform {
  required_providers {
    coder = {
      source  = "coder/coder"
      version = ">= 2.13"
    }
    docker = {
      source = "kreuzwerker/docker"
    }
  }
}

variable "image" {
  type        = string
  description = "Workspace image: bash, python3 (>= 3.11, with venv), AgentAPI and the agent's CLI. examples/docker/Dockerfile builds one."
  default     = "agentapi-persist-workspace:latest"
}

variable "agentapi_persist_source" {
  type        = string
  description = "What `pip install` installs at the first start: a git URL of this repository (git+https://...@tag) or the URL of a wheel built by scripts/wheel. Empty: the image already has agentapi-persist."
  default     = ""
}

variable "agent_command" {
  type        = string
  description = "The agent AgentAPI runs. Empty when a registry agent module starts AgentAPI instead."
  default     = "claude"
}

variable "agent_type" {
  type        = string
  description = "AgentAPI's --type for the agent."
  default     = "claude"
}

variable "persist_grace_seconds" {
  type        = number
  description = "Time agentapi-persist may take to save at stop (it usually needs tens of milliseconds)."
  default     = 20
}

variable "stop_grace_seconds" {
  type        = number
  description = "Time Docker waits after the stop signal before SIGKILL. Must exceed persist_grace_seconds by 5 s or more: the agent starts the stop script, and other stop scripts run too."
  default     = 30
}

variable "replica_url" {
  type        = string
  description = "Off-volume replica of the conversation, s3://bucket/prefix: each workspace gets its own place under it (its workspace id), each agent module its own under that. Empty: no replica. Installs agentapi-persist with its s3 extra."
  default     = ""
}

variable "replica_endpoint" {
  type        = string
  description = "Endpoint of an S3-compatible server (MinIO, Ceph, R2, ...). Empty: AWS S3."
  default     = ""
}

variable "replica_access_key_id" {
  type        = string
  description = "Access key for the replica's bucket. Empty: the AWS chain finds credentials elsewhere (AWS_PROFILE and a mounted config, an instance role)."
  default     = ""
}

variable "replica_secret_access_key" {
  type        = string
  description = "Secret key for the replica's bucket (never printed or logged by agentapi-persist)."
  default     = ""
  sensitive   = true
}

locals {
  home       = "/home/coder"
  module_dir = ".agentapi-module"
  # The replica's place: one per workspace under replica_url. Every workspace of a template has
  # the same module directory path, which is all agentapi-persist can tell them apart by.
  replica = var.replica_url == "" ? "" : "${trimsuffix(var.replica_url, "/")}/${data.coder_workspace.me.id}"
  # What every process of the workspace sees, the start and stop scripts and AgentAPI included.
  workspace_env = {
    # AgentAPI's own: where it saves its conversation, and its pid (>= 0.12.0 saves on SIGUSR1).
    AGENTAPI_STATE_FILE = "${local.home}/${local.module_dir}/agentapi-state.json"
    AGENTAPI_PID_FILE   = "${local.home}/${local.module_dir}/agentapi.pid"
    AGENTAPI_PORT       = "3284"
    # agentapi-persist's: the names the registry's agentapi module uses, and its own.
    ARG_MODULE_DIR_NAME            = local.module_dir
    ARG_TASK_ID                    = try(data.coder_task.me.id, "")
    AGENTAPI_PERSIST_GRACE         = tostring(var.persist_grace_seconds)
    AGENTAPI_PERSIST_STOP_AGENTAPI = "true"
    # The off-volume replica (docs/DEPLOYING.md): empty values mean "none".
    AGENTAPI_PERSIST_REPLICA          = local.replica
    AGENTAPI_PERSIST_REPLICA_ENDPOINT = var.replica_endpoint
    AWS_ACCESS_KEY_ID                 = var.replica_access_key_id
    AWS_SECRET_ACCESS_KEY             = var.replica_secret_access_key
    # The start script's arguments.
    ARG_AGENTAPI_PERSIST_SOURCE = var.agentapi_persist_source
    ARG_AGENT_COMMAND           = var.agent_command
    ARG_AGENT_TYPE              = var.agent_type
    ARG_WORKDIR                 = local.home
  }
}

provider "docker" {}

data "coder_provisioner" "me" {}

data "coder_workspace" "me" {}

data "coder_workspace_owner" "me" {}

data "coder_task" "me" {}

resource "coder_agent" "main" {
  arch = data.coder_provisioner.me.arch
  os   = "linux"
}

resource "coder_env" "agentapi_persist" {
  for_each = local.workspace_env
  agent_id = coder_agent.main.id
  name     = each.key
  value    = each.value
}

# Start: restore, then the sidecar, then AgentAPI.
resource "coder_script" "agentapi_persist_start" {
  agent_id           = coder_agent.main.id
  display_name       = "AgentAPI (with agentapi-persist)"
  icon               = "/icon/coder.svg"
  run_on_start       = true
  start_blocks_login = true
  script             = file("${path.module}/scripts/agentapi-persist-start.sh")
}

# Stop: save and upload within persist_grace_seconds.
resource "coder_script" "agentapi_persist_stop" {
  agent_id     = coder_agent.main.id
  display_name = "Save the AgentAPI conversation"
  icon         = "/icon/coder.svg"
  run_on_stop  = true
  script       = file("${path.module}/scripts/agentapi-persist-stop.sh")
}

resource "coder_app" "agentapi" {
  agent_id     = coder_agent.main.id
  slug         = "agentapi"
  display_name = "AgentAPI"
  icon         = "/icon/coder.svg"
  url          = "http://localhost:3284/"
  subdomain    = true
  healthcheck {
    url       = "http://localhost:3284/status"
    interval  = 3
    threshold = 20
  }
}

# The home volume holds AgentAPI's state file and agentapi-persist's copy: it must outlive the
# container.
resource "docker_volume" "home" {
  name = "coder-${data.coder_workspace.me.id}-home"
  lifecycle {
    ignore_changes = all
  }
}

resource "docker_container" "workspace" {
  count    = data.coder_workspace.me.start_count
  image    = var.image
  name     = "coder-${data.coder_workspace_owner.me.name}-${lower(data.coder_workspace.me.name)}"
  hostname = data.coder_workspace.me.name
  # The agent runs as PID 1; the access URL's localhost is the Docker host.
  entrypoint = ["sh", "-c", replace(coder_agent.main.init_script, "/localhost|127\\.0\\.0\\.1/", "host.docker.internal")]
  env        = ["CODER_AGENT_TOKEN=${coder_agent.main.token}"]
  host {
    host = "host.docker.internal"
    ip   = "host-gateway"
  }
  volumes {
    container_path = local.home
    volume_name    = docker_volume.home.name
    read_only      = false
  }

  # Stopping: Docker sends stop_signal to the agent, which runs the run_on_stop scripts, and
  # SIGKILLs the container after stop_timeout (docker stop) or destroy_grace_seconds (the
  # destroy a Coder stop build does). The agent shuts down gracefully on SIGINT.
  stop_signal           = "SIGINT"
  stop_timeout          = var.stop_grace_seconds
  destroy_grace_seconds = var.stop_grace_seconds

  lifecycle {
    precondition {
      condition     = var.stop_grace_seconds >= var.persist_grace_seconds + 5
      error_message = "stop_grace_seconds must exceed persist_grace_seconds by at least 5 s, or Docker may SIGKILL the workspace before agentapi-persist has saved."
    }
  }
}
