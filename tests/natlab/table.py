#!/usr/bin/env python3
"""Summarises a PSYNC_NAT_LAB_RECORD file into the table of
docs/nat-traversal.md: per case, pairs connected, connect time p50/p99 over
the clients that connected (or, for cases where every client must exit 4,
the exit time), datagrams each side sent (p50 and p99), and the strategies
that won.

    python3 tests/natlab/table.py /tmp/lab.rec

Lines are `case TAB side TAB exit TAB elapsed_ms TAB datagrams_sent
[TAB strategy]`, written A then B for each pair (tests/natlab.rs, `record`).
"""
import sys
from collections import Counter, OrderedDict


def pct(values, p):
    """Nearest-rank percentile, as tests/natlab.rs computes it."""
    if not values:
        return 0
    v = sorted(values)
    rank = max(1, -(-p * len(v) // 100))
    return v[rank - 1]


def main(path):
    cases = OrderedDict()
    for line in open(path):
        f = line.rstrip("\n").split("\t")
        if len(f) < 5:
            continue
        case, side, code, ms, sent = f[:5]
        strategy = f[5] if len(f) > 5 else "?"
        cases.setdefault(case, []).append((side, int(code), int(ms), int(sent), strategy))
    print("| case | pairs connected | connect p50 / p99 | datagrams per client, p50 (p99): A / B | won by |")
    print("|---|---|---|---|---|")
    for case, rows in cases.items():
        pairs = list(zip(rows[0::2], rows[1::2]))
        ok = [(a, b) for a, b in pairs if a[1] == 0 and b[1] == 0]
        if ok:
            times = [c[2] for pair in ok for c in pair]
            sa = [a[3] for a, _ in ok]
            sb = [b[3] for _, b in ok]
            won = Counter(c[4] for pair in ok for c in pair)
            timing = f"{pct(times, 50)} / {pct(times, 99)} ms"
        else:
            codes = Counter(c[1] for pair in pairs for c in pair)
            times = [c[2] for pair in pairs for c in pair]
            sa = [a[3] for a, _ in pairs]
            sb = [b[3] for _, b in pairs]
            won = Counter()
            timing = (f"exit {', '.join(f'{k} x{v}' for k, v in sorted(codes.items()))} "
                      f"after p50 {pct(times, 50)}, max {max(times)} ms")
        won_s = ", ".join(f"{k} {v}" for k, v in won.most_common()) or "nothing"
        print(f"| {case} | {len(ok)}/{len(pairs)} | {timing} | "
              f"{pct(sa, 50)} ({pct(sa, 99)}) / {pct(sb, 50)} ({pct(sb, 99)}) | {won_s} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/lab.rec")
