#!/usr/bin/env bash
# Set up a fresh virtual environment and run the demo: replay the bundled smear frames through the
# bundled model, publish over ZeroMQ on loopback, and show the live differential in this terminal.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CYTOEDGE_VENV:-.venv}
PYTHON=${PYTHON:-python3}
ENDPOINT=${CYTOEDGE_DEMO_ENDPOINT:-tcp://127.0.0.1:5555}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -e .

# The subscriber starts first so it sees the first frame; the publisher replays the 20 sample
# frames at 4 frames/s and the watcher exits when the replay's final status arrives.
rm -f "${TMPDIR:-/tmp}/cytoedge-demo-audit.jsonl"
"$VENV/bin/cytoedge" watch "$ENDPOINT" --exit-on-end --timeout 30 &
WATCH=$!
trap 'kill $WATCH 2>/dev/null || true' EXIT
"$VENV/bin/cytoedge" -q replay samples/bccd --publish "$ENDPOINT" --fps 4 --audit "${TMPDIR:-/tmp}/cytoedge-demo-audit.jsonl"
wait $WATCH
echo "every published cells message is in ${TMPDIR:-/tmp}/cytoedge-demo-audit.jsonl"
