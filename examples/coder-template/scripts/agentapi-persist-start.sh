#!/bin/bash
# run_on_start: install agentapi-persist, repair AgentAPI's state file, start the sidecar, then
# start AgentAPI. The order matters: AgentAPI reads its state file once, when it starts, so the
# repair must be done before, and the sidecar must be there to follow it from its first message.
#
# Settings come from the environment the template sets (coder_env): AGENTAPI_STATE_FILE,
# AGENTAPI_PID_FILE, AGENTAPI_PERSIST_*, ARG_TASK_ID, ... The ARG_AGENT_* variables are this
# script's own arguments:
#   ARG_AGENTAPI_PERSIST_SOURCE  what `pip install` installs (a git URL of this repository, or a
#                                wheel built by scripts/wheel);
#                                empty: use the agentapi-persist already on PATH (in the image);
#                                with AGENTAPI_PERSIST_REPLICA set, its s3 extra is installed too
#   ARG_AGENT_COMMAND            the agent AgentAPI runs, e.g. `claude`; empty: something else
#                                starts AgentAPI (a registry agent module, with this script as its
#                                post_install_script)
#   ARG_AGENT_TYPE               AgentAPI's --type (default: claude)
#   ARG_WORKDIR                  where the agent works (default: $HOME)
set -euo pipefail

module_dir="$HOME/${ARG_MODULE_DIR_NAME:-.agentapi-module}"
mkdir -p "$module_dir"

# 1. Install, once per source, into a virtualenv on the persistent home volume.
venv="$HOME/.local/share/agentapi-persist/venv"
source_spec="${ARG_AGENTAPI_PERSIST_SOURCE:-}"
if [[ -n $source_spec && -n ${AGENTAPI_PERSIST_REPLICA:-} ]]; then
    # The replica's S3 client is the s3 extra: `name[extra] @ URL` for a git or wheel URL.
    case $source_spec in
        *://*) source_spec="agentapi-persist[s3] @ $source_spec" ;;
        agentapi-persist*) source_spec="agentapi-persist[s3]${source_spec#agentapi-persist}" ;;
    esac
fi
if [[ -n $source_spec && "$(cat "$venv/installed-from" 2>/dev/null)" != "$source_spec" ]]; then
    echo "Installing agentapi-persist from $source_spec"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "$source_spec"
    printf '%s\n' "$source_spec" >"$venv/installed-from"
fi
if [[ -x $venv/bin/agentapi-persist ]]; then
    PATH="$venv/bin:$PATH"
fi
if ! command -v agentapi-persist >/dev/null; then
    echo "agentapi-persist is not installed: set agentapi_persist_source, or install it in the image" >&2
    exit 1
fi

# 2. Repair AgentAPI's state file from the newest good copy (6: AgentAPI already runs and owns
#    its file; 7: no good copy anywhere, the bad bytes were kept aside: AgentAPI starts empty).
restored=0
agentapi-persist restore || restored=$?
case $restored in
    0 | 6 | 7) ;;
    *) echo "agentapi-persist restore exited $restored; continuing (the sidecar's copy is untouched)" >&2 ;;
esac

# 3. The sidecar, in a session of its own and writing to a log file: the agent waits for a
#    script's output to close, and must not take the sidecar down with the script.
nohup setsid agentapi-persist run </dev/null >>"$module_dir/agentapi-persist.log" 2>&1 &

# 4. AgentAPI, unless something else starts it.
if [[ -n ${ARG_AGENT_COMMAND:-} ]]; then
    cd "${ARG_WORKDIR:-$HOME}"
    read -r -a agent_command <<<"$ARG_AGENT_COMMAND"
    # Coder's proxy sends its own Host header; the sidecar talks to localhost.
    AGENTAPI_ALLOWED_HOSTS='*' nohup setsid agentapi server --type "${ARG_AGENT_TYPE:-claude}" \
        -- "${agent_command[@]}" </dev/null >>"$module_dir/agentapi.log" 2>&1 &
fi
echo "agentapi-persist: restore exited $restored; sidecar started (log: $module_dir/agentapi-persist.log)"
