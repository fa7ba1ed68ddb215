#!/bin/sh
# Thin wrapper so the comparison runs as `bench/compare.sh [--quick]`; the logic is in compare.py.
exec python3 "$(dirname "$0")/compare.py" "$@"
