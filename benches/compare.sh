#!/usr/bin/env bash
# One command for the Synapse comparison: builds Hearth and loadgen (release), installs the pinned
# Synapse and matplotlib into virtualenvs under target/bench/, runs every scenario against both
# servers alternately and rewrites BENCHMARKS.md, benches/results/ and benches/plots/.
#
# usage: benches/compare.sh [--backends sqlite,postgres] [--scenarios dm,rooms,...,sweep]
#                           [--duration S] [--report-only]
# PostgreSQL runs need a server on 127.0.0.1:5432 (user postgres, trust auth); without one, only
# SQLite is measured.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

plot_venv=target/bench/plot-venv
if [ ! -x "$plot_venv/bin/python" ] || ! "$plot_venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
    python3 -m venv "$plot_venv"
    "$plot_venv/bin/pip" install --quiet --disable-pip-version-check 'matplotlib==3.10.*'
fi

args=("$@")
if [[ " ${args[*]-} " != *" --report-only "* ]]; then
    cargo build --release --bin hearth
    cargo build --release --manifest-path benches/loadgen/Cargo.toml
    benches/synapse/setup.sh
    # 10,000 sockets need as many file descriptors, in loadgen and in the server.
    ulimit -n "$(ulimit -Hn)"
    if [[ " ${args[*]-} " != *" --backends "* ]] && ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
        echo "PostgreSQL is not answering on 127.0.0.1:5432: measuring SQLite only" >&2
        args+=(--backends sqlite)
    fi
fi
exec "$plot_venv/bin/python" benches/compare.py "${args[@]+"${args[@]}"}"
