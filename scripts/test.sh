#!/usr/bin/env bash
# Set up a fresh virtual environment and run the whole test suite (what CI runs).
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CYTOEDGE_VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch==2.13.0 (CPU build) comes with the [train] extra for the training smoke runs.
"$VENV/bin/python" -m pip install --quiet -e ".[test,train]"

# The bench-display tests drive a real headless Chromium; install Debian's when we are allowed to.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium for the browser tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "could not install chromium: browser tests will skip"
fi

# The report tests look at the PDF as PNG and text (poppler-utils: pdftoppm, pdftotext, pdfimages).
if ! command -v pdftoppm >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's poppler-utils for the report tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq poppler-utils >/dev/null) \
        || echo "could not install poppler-utils: report PDF tests will skip"
fi

# The collector tests need PostgreSQL at 127.0.0.1:5432 (trust, database `test`) and a nats-server binary.
# The project's machines run PostgreSQL already; elsewhere, as root, install Debian's and start it
# (loopback trust for the postgres user only; the tests create and drop a database each). Without them
# those tests skip with the reason.
pg_up() { (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; }
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && { ! pg_up || ! command -v nats-server >/dev/null; }; then
    echo "installing Debian's postgresql and nats-server for the collector tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql nats-server >/dev/null \
        && if ! pg_up; then
            for hba in /etc/postgresql/*/main/pg_hba.conf; do break; done
            grep -q cytoedge-test "$hba" || sed -i '1i host all postgres 127.0.0.1/32 trust # cytoedge-test' "$hba"
            pg_ctlcluster "$(basename "$(dirname "$(dirname "$hba")")")" main restart
            su postgres -c "createdb test" 2>/dev/null || true
        fi) || echo "could not set up postgresql / nats-server: collector tests will skip"
fi

"$VENV/bin/ruff" check .
"$VENV/bin/python" -m pytest -q "$@"
