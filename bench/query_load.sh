#!/usr/bin/env bash
# Query load against a real server over the demo index: builds it (once), serves it on a free
# loopback port without keys, runs bench/query_load.py, and stops the server.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
export GRADINDEX_DATA_DIR=${GRADINDEX_DATA_DIR:-bench/.cache/demo}
PORT=${PORT:-8765}
"$BIN/gradindex" demo --build-only
GRADINDEX_AUTH=off "$BIN/gradindex" serve --port "$PORT" > bench/.cache/query_load_server.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$PORT/v1/health" >/dev/null && break
  sleep 1
done
"$BIN/python" bench/query_load.py --url "http://127.0.0.1:$PORT" --index digits "$@"
