# A Coder template (Kubernetes) whose AgentAPI conversation survives workspace stops.
#
#   coder templates push agentapi-persist-k8s --directory examples/coder-template/kubernetes
#
# The same scripts as the Docker template (scripts/ is a copy: a template directory is pushed on
# its own). At stop, Kubernetes sends SIGTERM to the agent, which runs the run_on_stop script,
# and SIGKILLs the pod termination_grace_period_seconds later. Terraform waits for the pod to be
# gone (timeouts.delete), which keeps the stop build, and with it the agent's token that the log
# snapshot upload needs, alive until agentapi-persist has finished.
#
# docs/DEPLOYING.md explains every choice.

terraform {
  required_providers {
    coder = {
      source  = "coder/coder"
      version = ">= 2.13"
    }
    kubernetes = {
      source = "hashicorp/kubernetes"
    }
  }
}

variable "namespace" {
  type        = string
  description = "Kubernetes namespace for workspaces."
  default     = "coder-workspaces"
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
  description = "The pod's termination grace: SIGTERM to SIGKILL. Must exceed persist_grace_seconds by 5 s or more; every other stop script and preStop hook shares it."
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

variable "replica_service_account" {
  type        = string
  description = "Service account of the workspace pod, for the replica's credentials by web identity (EKS: annotate it with eks.amazonaws.com/role-arn). Empty: the namespace's default."
  default     = ""
}

variable "replica_credentials_secret" {
  type        = string
  description = "A Secret in the namespace whose keys become the workspace's environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) for a bucket without web identity. Empty: none."
  default     = ""
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
    # The start script's arguments.
    ARG_AGENTAPI_PERSIST_SOURCE = var.agentapi_persist_source
    ARG_AGENT_COMMAND           = var.agent_command
    ARG_AGENT_TYPE              = var.agent_type
    ARG_WORKDIR                 = local.home
  }
}

provider "kubernetes" {}

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
# pod. A block volume (ext4, xfs) also carries the sidecar's Unix control socket.
resource "kubernetes_persistent_volume_claim_v1" "home" {
  metadata {
    name      = "coder-${data.coder_workspace.me.id}-home"
    namespace = var.namespace
  }
  wait_until_bound = false
  spec {
    access_modes = ["ReadWriteOnce"]
    resources {
      requests = {
        storage = "10Gi"
      }
    }
  }
  lifecycle {
    ignore_changes = all
  }
}

# A pod, not a deployment: deleting a deployment returns as soon as the deployment object is
# gone, while its pod may still be running its stop scripts; deleting a pod waits for the pod.
resource "kubernetes_pod_v1" "workspace" {
  count = data.coder_workspace.me.start_count
  metadata {
    name      = "coder-${data.coder_workspace.me.id}"
    namespace = var.namespace
  }
  spec {
    # SIGTERM to SIGKILL. The agent (PID 1) handles SIGTERM by running the run_on_stop scripts.
    termination_grace_period_seconds = var.stop_grace_seconds
    # The replica's credentials by web identity: the pod gets AWS_ROLE_ARN and
    # AWS_WEB_IDENTITY_TOKEN_FILE from its service account (EKS IRSA), read by the AWS chain.
    service_account_name = var.replica_service_account
    security_context {
      run_as_user = 1000
      fs_group    = 1000
    }
    container {
      name    = "dev"
      image   = var.image
      command = ["sh", "-c", coder_agent.main.init_script]
      env {
        name  = "CODER_AGENT_TOKEN"
        value = coder_agent.main.token
      }
      dynamic "env_from" {
        for_each = var.replica_credentials_secret == "" ? [] : [var.replica_credentials_secret]
        content {
          secret_ref {
            name = env_from.value
          }
        }
      }
      volume_mount {
        mount_path = local.home
        name       = "home"
      }
    }
    volume {
      name = "home"
      persistent_volume_claim {
        claim_name = kubernetes_persistent_volume_claim_v1.home.metadata[0].name
      }
    }
  }
  # Longer than the termination grace: Terraform keeps waiting, so the stop build (and the
  # agent's token) lasts until the pod is gone.
  timeouts {
    delete = "10m"
  }
  lifecycle {
    precondition {
      condition     = var.stop_grace_seconds >= var.persist_grace_seconds + 5
      error_message = "stop_grace_seconds must exceed persist_grace_seconds by at least 5 s, or Kubernetes may SIGKILL the workspace before agentapi-persist has saved."
    }
  }
}
