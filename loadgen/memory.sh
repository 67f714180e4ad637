#!/usr/bin/env bash
# Resident memory of a psync-server whose table is full: starts a release
# server on 127.0.0.1 and ::1 with the flags given (default: the defaults),
# fills its table with one-sided registrations from many 127.x sources
# within the default limits (examples/fill_table.rs), asks it for its
# counters (SIGUSR1), and prints VmRSS, the pending count, and bytes per
# unit of --capacity and per pending registration.
#
#   cargo build --release -p psync -p psync-loadgen --examples
#   loadgen/memory.sh                          # defaults, both families
#   loadgen/memory.sh -4 --max-pending-per-ip 0 --max-pending-per-v4-24 0 \
#       --max-pending-per-v6-56 0 --max-pending-per-v6-48 0   # limits off
#
# FILL sets how many registrations to send (default 1000000), CAPACITY the
# --capacity to pass (default: the server's, 1048576).
set -euo pipefail

BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release}
FILL=${FILL:-1000000}
CAPACITY=${CAPACITY:-1048576}
[[ -x $BIN/psync-server && -x $BIN/examples/fill_table ]] || {
    echo "$0: build first: cargo build --release -p psync --examples" >&2; exit 2; }
work=$(mktemp -d)
srv=
trap '[[ -n $srv ]] && kill $srv 2>/dev/null; rm -rf "$work"' EXIT

binds=(--bind 127.0.0.1 --bind ::1)
for a in "$@"; do [[ $a == -4 ]] && binds=(--bind 127.0.0.1); done
"$BIN/psync-server" -v -p 0 "${binds[@]}" --capacity "$CAPACITY" --ttl 1h "$@" 2>"$work/err" &
srv=$!
for _ in $(seq 100); do grep -q 'listening on udp 127' "$work/err" && break; sleep 0.05; done
addr=$(sed -n 's/.*listening on udp \(127[0-9.]*:[0-9]*\).*/\1/p' "$work/err" | head -1)
[[ -n $addr ]] || { cat "$work/err" >&2; exit 2; }
rss_idle=$(awk '/VmRSS/ {print $2}' "/proc/$srv/status")
"$BIN/examples/fill_table" "$addr" "$FILL"
# Losses in the kernel are made up by a second pass (refreshes), after the
# rate limiter's burst has refilled.
sleep 2.5
"$BIN/examples/fill_table" "$addr" "$FILL"
sleep 0.5
kill -USR1 "$srv"
sleep 0.5
pending=$(grep 'counters received' "$work/err" | tail -1 | sed -n 's/.* pending=\([0-9]*\).*/\1/p')
rss=$(awk '/VmRSS/ {print $2}' "/proc/$srv/status")
grep 'tables need' "$work/err" | sed 's/^.*\] //'
awk -v r="$rss" -v i="$rss_idle" -v p="${pending:-0}" -v c="$CAPACITY" 'BEGIN {
    printf "VmRSS %.1f MiB at start, %.1f MiB with %d pending: %.1f bytes per unit of --capacity (%d), %.1f per pending registration\n",
        i / 1024, r / 1024, p, r * 1024 / c, c, (p > 0 ? r * 1024 / p : 0)
}'
