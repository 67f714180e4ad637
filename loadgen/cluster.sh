#!/usr/bin/env bash
# What the cluster's forwarding hop costs: server CPU per pair and latency,
# a pair's halves sprayed over a three-member cluster (most halves then
# travel one hop) against the same load on one server alone. Alternates the
# two setups ROUNDS times in one run, as docs/performance.md asks.
#
#   loadgen/cluster.sh [RATE] [SECONDS] [ROUNDS]     (defaults 20000 10 3)
#
# Members on 127.0.30.2-4 (cluster port 7001), the lone server on
# 127.0.30.5, all on port 7000 with the per-source limits off (every
# synthetic peer is 127.0.0.1). Needs release builds of psync-server and
# psync-loadgen. Prints one line per run, then the means.
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-20000}
secs=${2:-10}
rounds=${3:-3}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release}
for b in psync-server psync-loadgen; do
    [[ -x $BIN/$b ]] || { echo "$0: no $BIN/$b; build with cargo build --release" >&2; exit 2; }
done
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
(umask 077; openssl rand -hex 32 >"$work/key" 2>/dev/null || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/key")
common=(-4 -p 7000 --rate-limit 0 --max-pending-per-ip 0 --max-pending-per-v4-24 0 --stats-interval 0)
members=(127.0.30.2 127.0.30.3 127.0.30.4)
for ip in "${members[@]}"; do
    "$BIN/psync-server" "${common[@]}" --bind "$ip" --cluster-bind "$ip:7001" \
        --cluster-peer "$(IFS=,; echo "${members[*]}")" --cluster-key-file "$work/key" \
        2>"$work/$ip.err" &
    pids+=($!)
done
cluster_pids=("${pids[@]}")
"$BIN/psync-server" "${common[@]}" --bind 127.0.30.5 2>"$work/lone.err" &
lone=$!
pids+=($lone)
sleep 1

# Clock ticks (utime + stime) of the given processes, summed.
ticks() {
    local t=0
    for p in "$@"; do
        t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat")))
    done
    echo "$t"
}
hz=$(getconf CLK_TCK)

run() { # NAME SERVERS PIDS...
    local name=$1 servers=$2
    shift 2
    local before after json
    before=$(ticks "$@")
    json=$("$BIN/psync-loadgen" --server "$servers" --rate "$rate" --duration "$secs" --json 2>/dev/null)
    after=$(ticks "$@")
    python3 - "$name" "$json" "$before" "$after" "$hz" <<'EOF'
import json, sys
name, j, before, after, hz = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
pairs = j["completed_total"]
cpu_us = (after - before) / hz * 1e6
lat = j["latency_us"]
print(f"{name:7} pairs={pairs:8} lost={j['lost']} wrong={j['wrong']} "
      f"server_cpu_us_per_pair={cpu_us / max(pairs, 1):6.2f} p50_us={lat['p50']:8.1f} p99_us={lat['p99']:9.1f}")
EOF
}

all=$(printf '%s:7000,' "${members[@]}")
all=${all%,}
for r in $(seq "$rounds"); do
    run direct 127.0.30.5:7000 "$lone"
    run spray "$all" "${cluster_pids[@]}"
done | tee "$work/runs"
python3 - "$work/runs" <<'EOF'
import re, sys
rows = {}
for line in open(sys.argv[1]):
    name = line.split()[0]
    vals = dict(re.findall(r"(\w+)=\s*([\d.]+)", line))
    rows.setdefault(name, []).append(vals)
mean = lambda name, k: sum(float(v[k]) for v in rows[name]) / len(rows[name])
for k in ["server_cpu_us_per_pair", "p50_us", "p99_us"]:
    d, s = mean("direct", k), mean("spray", k)
    print(f"mean {k}: direct {d:.2f}, spray {s:.2f}, spray/direct {s / d:.2f}")
EOF
# What the members counted: how many halves travelled.
for p in "${cluster_pids[@]}"; do kill -TERM "$p"; done
sleep 3
grep -h "final counters" "$work"/127.0.30.*.err | sed 's/.*received=\([0-9]*\).*forwarded_out=\([0-9]*\) forwarded_in=\([0-9]*\).*/received=\1 forwarded_out=\2 forwarded_in=\3/'
