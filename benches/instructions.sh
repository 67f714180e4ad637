#!/usr/bin/env bash
# Instructions per request of the engine bench, counted by valgrind's
# callgrind, at an earlier commit and at the working tree.
#
#   benches/instructions.sh BASE [CASE] [SECONDS]
#   benches/instructions.sh dc9de98 empty
#
# Counts only inside the bench's request loop (`Driver::window`: the engine's
# pipeline, matching, expiry and reply encoding), divided by the requests the
# engine received there. Unlike throughput, the count does not move with the
# machine's load, so it tells small changes apart on a shared machine; it
# says nothing about cache misses, which dominate the first engine (compare
# the two with `benches/ab.sh`). The count per request depends on how many
# requests a run handles (the table fills over the first few hundred
# thousand, and the sweep's work follows), so each build handles the same
# 300 windows (614,400 requests; `PSYNC_ENGINE_WINDOWS`, set here), and the
# count is then exact and repeatable. A BASE older than that variable
# (before the commit that added it) runs for SECONDS (default 10) of
# Criterion's `--profile-time` under valgrind instead: compare only runs
# that handled similar numbers of requests (the script prints them). Needs
# valgrind (`apt-get install valgrind`). Takes a few minutes, most of it
# building.
set -euo pipefail

base=${1:?usage: benches/instructions.sh BASE [CASE]}
case=${2:-empty}
seconds=${3:-10}
command -v valgrind >/dev/null || {
    echo "valgrind is not installed (apt-get install valgrind)" >&2
    exit 2
}
root=$(git rev-parse --show-toplevel)
work=$(mktemp -d)
trap 'git -C "$root" worktree remove --force "$work/base" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

# The built engine bench binary for the tree at $1 (cargo prints its path).
build() {
    (cd "$1" && cargo bench --bench engine --no-run --message-format json 2>/dev/null) |
        python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["kind"] == ["bench"] and m.get("executable"):
        print(m["executable"])' | tail -1
}

# Instructions per request of the binary $1 on the case.
count() {
    PSYNC_ENGINE_WINDOWS=300 valgrind --tool=callgrind --callgrind-out-file="$work/out" \
        --toggle-collect='engine::Driver::window' \
        "$1" --bench --profile-time "$seconds" "engine/requests/$case\$" >"$work/log" 2>&1
    python3 - "$work/log" "$case" <<'EOF'
import re, sys
log = open(sys.argv[1]).read()
ir = sum(int(x) for x in re.findall(r"Collected : (\d+)", log))
req = re.search(r"engine/requests/%s: (\d+) requests" % re.escape(sys.argv[2]), log)
if not req or int(req.group(1)) == 0:
    sys.exit("no requests counted: is the case name right?")
print("%d instructions / %s requests = %.0f per request" % (ir, req.group(1), ir / int(req.group(1))))
EOF
}

git -C "$root" worktree add --detach "$work/base" "$base" >/dev/null
echo "building the engine bench at $base and at the working tree ..." >&2
cp "$(build "$work/base")" "$work/A"
cp "$(build "$root")" "$work/B"
echo "A ($base): $(count "$work/A")"
echo "B (working tree): $(count "$work/B")"
