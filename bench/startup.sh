#!/usr/bin/env bash
# Seconds from `python server.py` to `/health` 200, three starts in a row on a fresh cache folder:
# the first converts the GGUF model, the next two start from the converted copy.
#   bash bench/startup.sh                     # the bundled model
#   bash bench/startup.sh --model x.gguf      # extra flags go to server.py
set -euo pipefail
cd "$(dirname "$0")/.."
cache=$(mktemp -d)
trap 'rm -rf "$cache"' EXIT
port=${PORT:-8811}
for i in 1 2 3; do
    start=$(date +%s.%N)
    .venv/bin/python server.py --port "$port" --cache-dir "$cache/models" "$@" > "$cache/server.log" 2>&1 &
    pid=$!
    until curl -sf "http://127.0.0.1:$port/health" > /dev/null; do
        if ! kill -0 "$pid" 2> /dev/null; then cat "$cache/server.log"; exit 1; fi
        sleep 0.2
    done
    echo "start $i: ready after $(echo "$(date +%s.%N) - $start" | bc | xargs printf '%.1f') s"
    kill -TERM "$pid"
    wait "$pid"
done
echo "converted copy: $(du -sh "$cache/models" | cut -f1)"
