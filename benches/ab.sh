#!/usr/bin/env bash
# A/B of one Criterion bench between an earlier commit and the working tree,
# in one run: builds the bench at BASE (in a temporary git worktree) and
# here, then alternates the two binaries ROUNDS times and prints each
# case's throughput per round and the median ratio (this tree / BASE).
#
#   benches/ab.sh BASE [BENCH] [FILTER] [ROUNDS]
#   benches/ab.sh 3aa1ccc engine engine/requests 4    # the engine rewrite
#
# Alternating rounds put both builds under the same machine load; compare
# the ratios, not the absolute rates. Cases are matched by position, so a
# case renamed between the commits still lines up. Prints, per case, the
# median rate of each build and the median (with the range) of the
# per-round ratios B/A.
#
# AB_CPU=N binds both binaries to CPU N (`taskset`), so neither migrates
# between cores mid-run; AB_SECONDS sets Criterion's measurement time per
# case (default 2).
set -euo pipefail

base=${1:?usage: benches/ab.sh BASE [BENCH] [FILTER] [ROUNDS]}
bench=${2:-engine}
filter=${3:-}
rounds=${4:-4}
root=$(git rev-parse --show-toplevel)
work=$(mktemp -d)
trap 'git -C "$root" worktree remove --force "$work/base" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

# The built bench binary for the tree at $1 (cargo prints its path).
build() {
    (cd "$1" && cargo bench --bench "$bench" --no-run --message-format json 2>/dev/null) |
        python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["kind"] == ["bench"] and m.get("executable"):
        print(m["executable"])' | tail -1
}

git -C "$root" worktree add --detach "$work/base" "$base" >/dev/null
echo "building $bench at $base and at the working tree ..." >&2
cp "$(build "$work/base")" "$work/A"
cp "$(build "$root")" "$work/B"

for r in $(seq "$rounds"); do
    for v in A B; do
        ${AB_CPU:+taskset -c "$AB_CPU"} "$work/$v" --bench --warm-up-time 1 \
            --measurement-time "${AB_SECONDS:-2}" --noplot $filter 2>/dev/null |
            python3 -c '
import re, sys
name = None
out = []
for l in sys.stdin:
    m = re.match(r"^([\w.-]+/[\w/.-]+)(\s|$)", l)
    if m:
        name = m.group(1)
    m = re.search(r"thrpt:\s+\[\S+ \S+ (\S+) (\S?)elem/s", l)
    if m and name:
        scale = {"": 1e-6, "K": 1e-3, "M": 1, "G": 1e3}[m.group(2)]
        out.append("%s=%.3f" % (name, float(m.group(1)) * scale))
        name = None
print(" ".join(out))' | sed "s/^/$v r$r: /"
    done
done | tee "$work/rounds"

echo "median M elements/s (A = $base, B = working tree), and the per-round ratios B/A:"
python3 - "$work/rounds" <<'EOF'
import statistics, sys
runs = {"A": [], "B": []}
for line in open(sys.argv[1]):
    v, _, rest = line.partition(" ")
    runs[v].append([kv.split("=") for kv in rest.split(":", 1)[1].split()])
for i, case in enumerate(runs["B"][0]):
    a = [float(r[i][1]) for r in runs["A"] if i < len(r)]
    b = [float(r[i][1]) for r in runs["B"] if i < len(r)]
    if not a:
        print(f"  {case[0]:40} B {statistics.median(b):7.3f}  (no such case in A)")
        continue
    ratios = [y / x for x, y in zip(a, b)]
    names = runs["A"][0][i][0]
    print(
        f"  {case[0]:40} A {statistics.median(a):7.3f}  B {statistics.median(b):7.3f}  "
        f"B/A median {statistics.median(ratios):5.2f} ({min(ratios):.2f} to {max(ratios):.2f}, "
        f"{len(ratios)} rounds)   (A: {names})"
    )
EOF
