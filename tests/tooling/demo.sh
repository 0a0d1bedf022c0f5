#!/usr/bin/env bash
# `make demo`: the whole path on one machine, no cloud account.
# Starts `sri serve` (SRI_BACKEND: `local`, or `emulator` for the exact Lambda zip under cargo
# lambda), launches template/plugin through the control plane exactly
# as the Dify daemon would (`sri deploy` → POST /v1/launch), invokes its streaming tool through
# the returned endpoint (the gateway signs it and calls the function), prints the chunks as they
# arrive, and shuts everything down.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

SRI=target/debug/sri
export SRI_SIGNING_KEYS="demo:$(head -c 32 /dev/urandom | base64)"
export DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY="demo-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export SRI_UV="${SRI_UV:-$PWD/.venv/tools/bin/uv}"
export SRI_PYTHON="${SRI_PYTHON:-$(PYENV_VERSION=3.12.1 python3 -c 'import sys; print(sys.executable)' 2>/dev/null || command -v python3.12 || command -v python3)}"
export SRI_DATA_DIR="$(mktemp -d)"
export SRI_BACKEND="${SRI_BACKEND:-local}"
if [ "$SRI_BACKEND" = emulator ]; then
  # The Lambda zip for this host (its own bootstrap inside), cached between runs; cargo lambda
  # from the project's tools; the interpreter above stands in for Lambda's managed runtime.
  export SRI_CARGO_LAMBDA="${SRI_CARGO_LAMBDA:-$PWD/.venv/tools/bin/cargo-lambda}"
  if [ -z "${SRI_LAMBDA_BOOTSTRAP:-}" ]; then
    # The debug build without its debug information: a few MiB to zip instead of ~200.
    strip --strip-debug -o target/debug/bootstrap-stripped target/debug/bootstrap
    export SRI_LAMBDA_BOOTSTRAP="$PWD/target/debug/bootstrap-stripped"
  fi
  export SRI_EMULATOR_PYTHON="${SRI_EMULATOR_PYTHON:-$SRI_PYTHON}"
  export SRI_CACHE_DIR="${SRI_CACHE_DIR:-$PWD/.sri-cache}"
fi
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
export SRI_URL="http://127.0.0.1:$PORT"

"$SRI" serve --listen "127.0.0.1:$PORT" 2> "$SRI_DATA_DIR/sri.log" &
SERVER=$!
cleanup() {
  kill -TERM "$SERVER" 2>/dev/null || true
  wait "$SERVER" 2>/dev/null || true
  rm -rf "$SRI_DATA_DIR"
}
trap cleanup EXIT

for _ in $(seq 1 200); do
  curl -fsS "$SRI_URL/healthz" >/dev/null 2>&1 && break
  kill -0 "$SERVER" 2>/dev/null || { cat "$SRI_DATA_DIR/sri.log"; exit 1; }
  sleep 0.05
done
echo "== sri serve on $SRI_URL (backend: $SRI_BACKEND, data: $SRI_DATA_DIR, python: $SRI_PYTHON)"
echo "== POST /ping → $(curl -fsS -X POST -H "Authorization: $DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY" "$SRI_URL/ping")"

echo "== launching template/plugin through the control plane"
RUN_LINE="$("$SRI" deploy template/plugin)"
NAME="$(sed -n 's/.*,name=\([^,]*\),.*/\1/p' <<<"$RUN_LINE")"
echo "== $RUN_LINE"

echo "== invoking the streaming tool through the endpoint (chunks as they arrive)"
START=$(date +%s%N)
"$SRI" invoke "$NAME" --provider sample --tool stream --params '{"n": 5, "delay_ms": 400}' |
  while IFS= read -r line; do
    printf '%6d ms  %s\n' $(( ($(date +%s%N) - START) / 1000000 )) "$line"
  done
echo "== done; stopping sri serve and its function"
