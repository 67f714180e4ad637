#!/usr/bin/env bash
# What one source can do to a server: 127.0.0.2 floods it with one-sided
# registrations (psync-loadgen --pending), then 127.0.0.3 runs ordinary pairs
# at a rate under the default per-source limit. Prints both reports and the
# server's final counters. Extra arguments go to the server, e.g.
#
#   loadgen/abuse.sh --rate-limit 0 --max-pending-per-ip 0   # limits off
#   loadgen/abuse.sh                                         # the defaults
#
# BIN overrides the directory holding the release binaries.
set -euo pipefail

CAPACITY=${CAPACITY:-100000}
FLOOD=${FLOOD:-120000}
# shellcheck source=loadgen/server.sh
. "$(dirname "$0")/server.sh"
start_server --capacity "$CAPACITY" "$@"

echo "== attacker 127.0.0.2: $FLOOD one-sided registrations as fast as it can"
"$BIN/psync-loadgen" --server "$addr" --bind 127.0.0.2 --pending "$FLOOD" \
    --rate 1 --duration 1 --warmup 0 -q --json >"$work/attack.json" 2>/dev/null || true
echo "== victim 127.0.0.3: 40 pairs/s for 3 s"
status=0
"$BIN/psync-loadgen" --server "$addr" --bind 127.0.0.3 --rate 40 --duration 3 \
    --warmup 0 -q --json >"$work/victim.json" || status=$?
sed -n 's/.*"completed":\([0-9]*\),"lost":\([0-9]*\),.*/victim: completed \1, lost \2/p' "$work/victim.json"
kill -TERM "$srv"
wait "$srv" || true
srv=
grep 'final counters' "$work/server.err"
exit $status
