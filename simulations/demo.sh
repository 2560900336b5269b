#!/usr/bin/env bash
# The README's demo command: set up .venv if needed, then simulate the default
# federation (3 institutions, ICD-10-CM chapters, MiniLM BERT, DP-SGD ε = 8).
# Extra arguments go to simulations/run_simulation.py (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/setup.sh
exec .venv/bin/python simulations/run_simulation.py "$@"
