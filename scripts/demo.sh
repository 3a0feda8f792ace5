#!/usr/bin/env bash
# Set everything up, then run the whole story on this machine with progress shown: stationary
# traffic, drifted traffic with corrections, drift verdict, retrain (Ray job), canary stepped
# up on Prometheus checks and promoted, a bad candidate rolled back, and a summary.
# Everything goes under out/demo (the data directory is fresh each run). Extra arguments go
# to `python -m loadtests.demo` (e.g. --work /tmp/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
exec .venv/bin/python -m loadtests.demo "$@"
