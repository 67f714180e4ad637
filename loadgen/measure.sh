#!/usr/bin/env bash
# Starts a fresh psync-server on 127.0.0.1 (free port, per-source limits off),
# runs psync-loadgen against it with the arguments given, then stops the
# server and prints both processes' CPU per completed pair over the whole run.
#
#   cargo build --release -p psync -p psync-loadgen
#   loadgen/measure.sh --rate max --window 256 --duration 10
#   WORKERS=2 loadgen/measure.sh --threads 2 --rate max --window 256
#
# WORKERS gives the server --workers (default 1, or auto); the last line
# then shows how the pairs were spread over the workers. SERVER_CPUS and
# LOADGEN_CPUS pin each process to CPUs (taskset -c syntax), so that on a
# machine with many cores the two do not share any:
#   SERVER_CPUS=0-7 LOADGEN_CPUS=8-15 WORKERS=auto loadgen/measure.sh --threads 8 ...
#
# BIN overrides the directory holding the two release binaries
# (default: $CARGO_TARGET_DIR/release, else target/release).
set -euo pipefail

# shellcheck source=loadgen/server.sh
. "$(dirname "$0")/server.sh"
start_server --rate-limit 0 --max-pending-per-ip 0 --max-pending-per-v4-24 0 \
    --workers "${WORKERS:-1}"

status=0
${LOADGEN_CPUS:+taskset -c "$LOADGEN_CPUS"} "$BIN/psync-loadgen" --server "$addr" --json "$@" \
    >"$work/report.json" || status=$?
cat "$work/report.json"

ticks=$(getconf CLK_TCK)
srv_cpu=$(awk -v t="$ticks" '{ printf "%.3f", ($14 + $15) / t }' "/proc/$srv/stat")
kill -TERM "$srv"
wait "$srv" || true
srv=
matched=$(sed -n 's/.*matched=\([0-9]*\).*/\1/p' "$work/server.err" | tail -1)
field() { sed -n "s/.*\"$1\":\([0-9.]*\).*/\1/p" "$work/report.json"; }
lg_cpu=$(field loadgen_cpu_s_total)
lg_pairs=$(field completed_total)
awk -v sc="$srv_cpu" -v m="${matched:-0}" -v lc="$lg_cpu" -v lp="$lg_pairs" 'BEGIN {
    printf "server : %.3f s CPU, %d pairs matched, %.2f us CPU per pair\n", sc, m, (m > 0 ? sc * 1e6 / m : 0)
    printf "loadgen: %.3f s CPU, %d pairs completed, %.2f us CPU per pair\n", lc, lp, (lp > 0 ? lc * 1e6 / lp : 0)
}'
split=$(sed -n 's/^psync-server: per worker: //p' "$work/server.err" | tail -1)
[[ -n $split ]] && echo "server workers: $split"
exit "$status"
