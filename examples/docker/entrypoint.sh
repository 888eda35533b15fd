#!/usr/bin/env bash
# Container entrypoint: AgentAPI plus the agentapi-persist sidecar, stopped within the grace period.
#
#   entrypoint.sh [agentapi server arguments]        e.g.  entrypoint.sh --type claude -- claude
#
# Start, in this order (AgentAPI reads its state file once, when it starts):
#   1. `agentapi-persist restore` repairs AgentAPI's state file from the newest good copy;
#   2. `agentapi-persist run`, the sidecar, follows AgentAPI and keeps the conversation durable;
#   3. `agentapi server "$@"`.
# Stop: SIGTERM, SIGINT or SIGHUP to this script (PID 1, or the child of `init: true`), or
# AgentAPI exiting on its own. `agentapi-persist shutdown` then asks the sidecar to fetch the last
# messages, have AgentAPI save, write its copy, upload the log snapshot (when a Coder task is
# configured) and stop AgentAPI, all within AGENTAPI_PERSIST_GRACE seconds. The container's own
# grace (compose `stop_grace_period`, Kubernetes `terminationGracePeriodSeconds`) must be longer.
#
# The children run in sessions of their own, so a Ctrl-C on `docker run -it` reaches this script
# only: the sidecar gets one stop request, not a signal and a request at once (which would force
# it to skip the best-effort steps). Signals that arrive while the stop runs change nothing: it
# ends within the grace period anyway.
#
# Exit status: AgentAPI's when it exited on its own with an error (so a restart policy sees a
# crash), else that of `agentapi-persist shutdown` (0: saved; see `agentapi-persist --help`).
set -u

export AGENTAPI_PERSIST_GRACE="${AGENTAPI_PERSIST_GRACE:-20}"
export AGENTAPI_PERSIST_STOP_AGENTAPI="${AGENTAPI_PERSIST_STOP_AGENTAPI:-true}"

say() { printf 'entrypoint: %s\n' "$*" >&2; }

# reap PID: wait until PID has exited, even when a signal interrupts `wait`.
reap() {
    while kill -0 "$1" 2>/dev/null; do
        wait "$1"
    done
}

stop_requested=""
trap 'stop_requested=${stop_requested:-SIGTERM}' TERM
trap 'stop_requested=${stop_requested:-SIGINT}' INT
trap 'stop_requested=${stop_requested:-SIGHUP}' HUP

if [[ -n ${AGENTAPI_STATE_FILE:-} ]]; then
    mkdir -p "$(dirname "$AGENTAPI_STATE_FILE")"
fi
if [[ -n ${AGENTAPI_PID_FILE:-} ]]; then
    mkdir -p "$(dirname "$AGENTAPI_PID_FILE")"
fi

# 1. Repair AgentAPI's state file before AgentAPI can read it.
setsid agentapi-persist restore </dev/null
restored=$?
case $restored in
    0) ;;
    2) say "bad configuration; not starting"; exit 2 ;;
    7) say "no valid copy of the conversation anywhere (bad bytes kept aside); starting empty" ;;
    *) say "restore exited $restored; starting anyway (the sidecar's copy is untouched)" ;;
esac
if [[ -n $stop_requested ]]; then
    say "$stop_requested before AgentAPI started; nothing to save"
    exit 0
fi

# 2. The sidecar.
setsid agentapi-persist run </dev/null &
sidecar=$!

# 3. AgentAPI.
setsid agentapi server "$@" </dev/null &
agent=$!

# Wait for a stop signal or for AgentAPI to exit. A trapped signal makes `wait` return early.
agent_status=""
while [[ -z $stop_requested ]]; do
    wait "$agent"
    status=$?
    if [[ -z $stop_requested ]]; then
        agent_status=$status
        stop_requested="AgentAPI exited with status $status"
    fi
done

say "$stop_requested: saving the conversation (grace ${AGENTAPI_PERSIST_GRACE}s)"
setsid agentapi-persist shutdown </dev/null
saved=$?

# The shutdown stopped AgentAPI (AGENTAPI_PERSIST_STOP_AGENTAPI=true); if it is still there
# (stopping it was switched off, or it ignored SIGTERM), give it 2 s to save, then kill it.
if kill -0 "$agent" 2>/dev/null; then
    kill -TERM "$agent" 2>/dev/null
    for _ in $(seq 20); do
        kill -0 "$agent" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$agent" 2>/dev/null
fi
reap "$agent"
# The sidecar exits once its stop is done; its own watchdog bounds that by the grace period.
reap "$sidecar"

if [[ $stop_requested == AgentAPI* && $agent_status -ne 0 ]]; then
    exit "$agent_status"
fi
exit "$saved"
