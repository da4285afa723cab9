#!/usr/bin/env bash
# Starts N mirgen processes on this machine as one timely cluster (loopback).
#
#   scripts/launch_local.sh N WORKERS CONFIG OUTPUT
#
# Process 0 writes the dataset when all are done. If any process dies the
# others stop (timely is fail-stop): rerun the same command to resume.
set -euo pipefail
N=${1:?usage: launch_local.sh N WORKERS CONFIG OUTPUT}
W=${2:?usage}
CONFIG=${3:?usage}
OUTPUT=${4:?usage}
PORT=${MIRGEN_PORT:-24100}
MIRGEN=${MIRGEN_BIN:-mirgen}
HOSTFILE=$(mktemp)
trap 'rm -f "$HOSTFILE"' EXIT
for i in $(seq 0 $((N - 1))); do echo "127.0.0.1:$((PORT + i))"; done > "$HOSTFILE"
pids=()
for i in $(seq 0 $((N - 1))); do
  "$MIRGEN" run --config "$CONFIG" --output "$OUTPUT" -w "$W" -n "$N" -p "$i" -h "$HOSTFILE" --progress log &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
exit $status
