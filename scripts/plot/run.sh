#!/usr/bin/env bash
# Plots a benchmark's table with matplotlib, installed on first use into a virtualenv of its own
# (KUP_PLOT_VENV, default /var/cache/kup-plot/venv; pip from PyPI).
#   scripts/plot/run.sh ppp-bench TABLE OUTDIR
set -euo pipefail
kind=${1:?usage: scripts/plot/run.sh KIND TABLE OUTDIR} table=${2:?} out=${3:?}
here=$(cd "$(dirname "$0")" && pwd)
venv=${KUP_PLOT_VENV:-/var/cache/kup-plot/venv}
if ! "$venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
    echo "plot: installing matplotlib into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check 'matplotlib>=3.6,<4'
fi
MPLBACKEND=Agg "$venv/bin/python" "$here/${kind//-/_}.py" "$table" "$out"
