#!/usr/bin/env bash
# The README's main command: a local Prefect server (SQLite, 127.0.0.1 only) -> work pool -> deployments
# -> worker -> `prefect deployment run 'curate-and-pretrain/local'`, waiting for the result.
# Extra arguments go to `prefect deployment run`, e.g. --param overrides='{"demo_size": "tiny"}' (profile
# fields change through `overrides`) --param refresh='["ingest"]'.
# The server keeps running afterwards so the UI can be browsed; `make stop` stops it.
set -euo pipefail
cd "$(dirname "$0")/.."

PORT="${PREFECT_PORT:-4200}"
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.prefect}"
export PREFECT_API_URL="http://127.0.0.1:${PORT}/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PATH="$PWD/.venv/bin:$PATH"
mkdir -p "$PREFECT_HOME"

# Quiet on success; on failure show what the command said.
quiet() {
  local out
  if ! out=$("$@" 2>&1); then
    echo "failed: $*" >&2
    echo "$out" | tail -n 20 >&2
    return 1
  fi
}

if ! prefect server status >/dev/null 2>&1; then
  echo "starting the Prefect server on 127.0.0.1:${PORT} (about 20 s on a fresh database; log: $PREFECT_HOME/server.log)"
  # Not `prefect server start --background`: that leaves the server writing its output into pipes that
  # nobody reads once the CLI has exited, so a later write can kill it (Prefect 3.9.1: the
  # server died 15 minutes into a demo run). A detached foreground server with its own log instead; the
  # pid file is where `prefect server stop` (`make stop`) looks for it.
  setsid nohup prefect server start --host 127.0.0.1 --port "$PORT" >"$PREFECT_HOME/server.log" 2>&1 </dev/null &
  echo $! >"$PREFECT_HOME/server.pid"
fi
quiet prefect server status --wait --timeout 240

quiet prefect work-pool create lvdflow-local --type process --overwrite
# The production deployment targets a GPU pool; its runs wait there until a GPU host starts a worker.
quiet prefect work-pool create lvdflow-gpu --type process --overwrite
quiet prefect deploy --all --no-prompt

# Job control on: without it bash starts background jobs with SIGINT ignored, and the worker (which turns
# SIGTERM into SIGINT for itself) would then never stop.
set -m
prefect worker start --pool lvdflow-local --type process --limit 1 >"$PREFECT_HOME/worker.log" 2>&1 &
worker_pid=$!
set +m
cleanup() {
  kill "$worker_pid" 2>/dev/null || true
  wait "$worker_pid" 2>/dev/null || true
  if [ -n "${STOP_SERVER:-}" ]; then prefect server stop >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

log="$PREFECT_HOME/last-run.log"
set +e
prefect deployment run 'curate-and-pretrain/local' --watch --watch-timeout "${WATCH_TIMEOUT:-7200}" "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
run_id=$(grep -oE 'UUID: [0-9a-f-]{36}' "$log" | head -n1 | cut -d' ' -f2 || true)
echo
if [ -n "$run_id" ]; then
  echo "Flow run in the Prefect UI: http://127.0.0.1:${PORT}/runs/flow-run/${run_id}"
fi
echo "All runs: http://127.0.0.1:${PORT}/runs   (server left running; 'make stop' stops it)"
exit "$rc"
