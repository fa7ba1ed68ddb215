#!/bin/sh
# Thin wrapper so the cluster benchmark runs as `bench/cluster.sh [--quick]`; the logic is in cluster.py.
exec python3 "$(dirname "$0")/cluster.py" "$@"
