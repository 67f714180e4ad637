#!/usr/bin/env bash
# Server saturation with protocol v2 against the seed format, in one run,
# alternating: one release psync-server on 127.0.0.1 with an auth key file
# (both formats served on its port, limits off as for every load test), and
# psync-loadgen at --rate max taking turns: seed, v2, seed, v2, ... For each
# turn it prints pairs/s, the server's CPU per pair (from /proc, over the
# whole turn, warmup included) and the load generator's; then the medians
# and their ratios, and the load average (other work shares the machine).
#
#   cargo build --release --workspace
#   loadgen/v2-vs-seed.sh                # ROUNDS=5 turns of each, DURATION=5s
#
# The load generator issues a token per v2 request (one HMAC, on its side).
set -euo pipefail

BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release}
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5s}
[[ -x $BIN/psync-server && -x $BIN/psync-loadgen && -x $BIN/psync-token ]] || {
    echo "$0: build first: cargo build --release --workspace" >&2; exit 2; }
work=$(mktemp -d)
srv=
trap '[[ -n $srv ]] && kill $srv 2>/dev/null; rm -rf "$work"' EXIT

"$BIN/psync-token" --new-key 1 >"$work/keys"
chmod 600 "$work/keys"
"$BIN/psync-server" -4 -p 0 --bind 127.0.0.1 --auth-key-file "$work/keys" \
    --rate-limit 0 --max-pending-per-ip 0 --max-pending-per-v4-24 0 \
    --max-pending-per-v6-56 0 --max-pending-per-v6-48 0 2>"$work/err" &
srv=$!
for _ in $(seq 100); do grep -q 'listening on udp' "$work/err" && break; sleep 0.05; done
addr=$(sed -n 's/.*listening on udp \([0-9.]*:[0-9]*\).*/\1/p' "$work/err" | head -1)
[[ -n $addr ]] || { cat "$work/err" >&2; exit 2; }
hz=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$srv/stat"; }
field() { sed -n "s/.*\"$1\":\([0-9.e+-]*\).*/\1/p" "$2"; }

printf '%-6s %12s %18s %20s\n' format pairs/s server_us/pair loadgen_us/pair
for r in $(seq "$ROUNDS"); do
    for fmt in seed v2; do
        extra=()
        [[ $fmt == v2 ]] && extra=(--auth-key-file "$work/keys")
        before=$(cpu)
        "$BIN/psync-loadgen" -s "$addr" --rate max -d "$DURATION" --warmup 1s -q --json \
            "${extra[@]}" >"$work/out" 2>"$work/lg.err" || { cat "$work/lg.err" >&2; exit 1; }
        after=$(cpu)
        pps=$(field pairs_per_sec "$work/out")
        total=$(field completed_total "$work/out")
        lg=$(field loadgen_cpu_us_per_pair "$work/out")
        srv_us=$(awk -v c=$((after - before)) -v hz="$hz" -v n="$total" 'BEGIN { printf "%.2f", c / hz * 1e6 / n }')
        printf '%-6s %12.0f %18s %20.2f\n' "$fmt" "$pps" "$srv_us" "$lg" | tee -a "$work/table"
    done
done
awk '
    { pps[$1] = pps[$1] " " $2; cpu[$1] = cpu[$1] " " $3 }
    function median(s,   a, n, i, j, t) {
        n = split(s, a, " ")
        for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    END {
        ps = median(pps["seed"]); pv = median(pps["v2"]); cs = median(cpu["seed"]); cv = median(cpu["v2"])
        printf "medians: seed %.0f pairs/s, %.2f us/pair; v2 %.0f pairs/s, %.2f us/pair\n", ps, cs, pv, cv
        printf "v2/seed: pairs/s %.3f, server CPU per pair %.3f\n", pv / ps, cv / cs
    }' "$work/table"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) CPUs"
