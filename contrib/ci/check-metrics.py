#!/usr/bin/env python3
"""Checks the monitoring kit against a real psync-server.

Starts the server given on the command line (any command prefix: a path, or
`chroot ROOT /usr/bin/psync-server` for a container image), makes it match
a pair, then over HTTP:
  - /healthz and /readyz answer 200;
  - /metrics parses, and every metric name that the Grafana dashboard and
    the Prometheus rules use (psync_*, process_*) is one it exports, and
    every `reason` label value they name is one it exports;
then stops it with SIGTERM and expects exit 0 with its final counters.

    contrib/ci/check-metrics.py [--dashboard F] [--rules F] -- SERVER-COMMAND...
"""
import argparse
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

NAME = re.compile(r"\b((?:psync|process)_[a-z0-9_]+)\b")
REASON = re.compile(r'reason=~?"([^"]+)"')


def fail(msg):
    print(f"check-metrics: FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, r.read().decode()


def used(text):
    names = set(NAME.findall(text))
    reasons = set()
    for alternatives in REASON.findall(text):
        reasons.update(alternatives.split("|"))
    return names, reasons


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dashboard", default="contrib/grafana/psync-server.json")
    ap.add_argument("--rules", default="contrib/prometheus/psync.rules.yml")
    ap.add_argument("server", nargs="+")
    args = ap.parse_args()

    dashboard = json.load(open(args.dashboard))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    if not exprs:
        fail(f"{args.dashboard} has no queries")
    names, reasons = used("\n".join(exprs))
    n2, r2 = used(open(args.rules).read())
    names |= n2
    reasons |= r2

    cmd = args.server + ["-4", "-p", "0", "--bind", "127.0.0.1", "--metrics", "127.0.0.1:0"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    udp = metrics = None
    deadline = time.time() + 20
    while (udp is None or metrics is None) and time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            fail(f"the server exited before listening: {' '.join(cmd)}")
        m = re.search(r"listening on udp (\S+):(\d+)", line)
        if m:
            udp = (m.group(1), int(m.group(2)))
        m = re.search(r"metrics on http://(\S+?)/metrics", line)
        if m:
            metrics = m.group(1)
    if udp is None or metrics is None:
        proc.kill()
        fail("the server never said where it listens")
    try:
        # One real pair, so the counters move.
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for s in (a, b):
            s.settimeout(5)
        a.sendto(bytes([1, 0, 0, 0, 2, 0, 0, 0]), udp)
        time.sleep(0.05)
        b.sendto(bytes([2, 0, 0, 0, 1, 0, 0, 0]), udp)
        if len(a.recv(64)) != 20 or len(b.recv(64)) != 20:
            fail("the pair did not get 20-byte replies")

        for path, want in (("/healthz", "ok"), ("/readyz", "ready")):
            status, body = get(f"http://{metrics}{path}")
            if status != 200 or body.strip() != want:
                fail(f"{path}: {status} {body!r}")
        status, page = get(f"http://{metrics}/metrics")
        if status != 200:
            fail(f"/metrics: {status}")
        exported = set()
        exported_reasons = set()
        for line in page.splitlines():
            if not line or line.startswith("#"):
                continue
            series = line.rsplit(" ", 1)[0]
            exported.add(series.split("{", 1)[0])
            m = re.search(r'reason="([^"]+)"', series)
            if m:
                exported_reasons.add(m.group(1))
        if "psync_matched_total 1" not in page:
            fail("psync_matched_total is not 1 after one pair")
        missing = sorted(names - exported)
        if missing:
            fail(f"used by the dashboard or rules but not exported: {', '.join(missing)}")
        missing = sorted(reasons - exported_reasons)
        if missing:
            fail(f"drop reasons used but not exported: {', '.join(missing)}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, rest = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            fail("the server did not stop on SIGTERM")
    if proc.returncode != 0 or "final counters" not in rest:
        fail(f"SIGTERM: exit {proc.returncode}, stderr: {rest}")
    print(
        f"check-metrics: {len(names)} metric names and {len(reasons)} drop reasons used by "
        f"the dashboard and rules, all exported; /healthz, /readyz ok; {len(exported)} series names"
    )


if __name__ == "__main__":
    main()
