#!/bin/bash
# run_on_stop: save the conversation and upload the task's log snapshot, all within
# AGENTAPI_PERSIST_GRACE seconds. With the sidecar running this takes tens of milliseconds; the
# container's grace (stop_timeout, destroy_grace_seconds or termination_grace_period_seconds)
# must be longer. CODER_AGENT_URL and CODER_AGENT_TOKEN come from the agent.
venv="$HOME/.local/share/agentapi-persist/venv"
if [[ -x $venv/bin/agentapi-persist ]]; then
    PATH="$venv/bin:$PATH"
fi
exec agentapi-persist shutdown
