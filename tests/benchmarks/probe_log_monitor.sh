#!/usr/bin/env bash
# The CPU a Ray node's log monitor spends while its log folder holds many worker log files
# (BENCHMARKS.md "The suite on an AVX2-only box"). Starts its own head node (a free port),
# adds N workers' worth of empty log files (3 each, as a worker leaves),
# reads the log monitor's CPU over 30 s, then `ray stop --force`, which stops EVERY Ray on the
# machine: run it alone. Environment variables pass through:
#   bash tests/benchmarks/probe_log_monitor.sh 230
#   RAY_LOG_MONITOR_MANY_FILES_THRESHOLD=0 bash tests/benchmarks/probe_log_monitor.sh 230
set -euo pipefail
n=${1:-230}
root=$(cd "$(dirname "$0")/../.." && pwd)
temp=$(mktemp -d /tmp/lmpXXXX)
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
"$root/.venv/bin/ray" start --head --node-ip-address=127.0.0.1 --port=0 --include-dashboard=false \
  --num-cpus=1 --temp-dir="$temp" --disable-usage-stats >/dev/null 2>&1
trap '"$root/.venv/bin/ray" stop --force >/dev/null 2>&1 || true; rm -rf "$temp"' EXIT
logs=$(ls -d "$temp"/session_*/logs | head -1)
for i in $(seq 1 "$n"); do
  id=$(printf %056d "$i"); pid=$((400000 + i))
  touch "$logs/worker-$id-01000000-$pid.out" "$logs/worker-$id-01000000-$pid.err" \
        "$logs/python-core-worker-${id}_$pid.log"
done
sleep 3
lm=$(pgrep -f "log_monitor.py.*$temp" | head -1)
t0=$(awk '{print $14 + $15}' "/proc/$lm/stat"); sleep 30; t1=$(awk '{print $14 + $15}' "/proc/$lm/stat")
tick=$(getconf CLK_TCK)
echo "log files: $(ls "$logs" | wc -l); log monitor CPU over 30 s: $(( (t1 - t0) * 1000 / tick )) ms;" \
     "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD=${RAY_LOG_MONITOR_MANY_FILES_THRESHOLD:-unset}"
