# Sourced by measure.sh and abuse.sh: start_server ARGS... starts a release
# psync-server on a free port of 127.0.0.1 with ARGS, and sets $srv (its pid),
# $addr (where it listens) and $work (a temporary directory removed on exit,
# with the server's stderr in $work/server.err). The server is killed on exit.

BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release}
for b in psync-server psync-loadgen; do
    [[ -x $BIN/$b ]] || { echo "$0: no $BIN/$b; build with cargo build --release" >&2; exit 2; }
done

work=$(mktemp -d)
srv=
cleanup() {
    [[ -n $srv ]] && kill "$srv" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

start_server() {
    # SERVER_CPUS: run the server on these CPUs only (taskset -c syntax).
    ${SERVER_CPUS:+taskset -c "$SERVER_CPUS"} "$BIN/psync-server" -4 -p 0 --bind 127.0.0.1 "$@" \
        2>"$work/server.err" &
    srv=$!
    for _ in $(seq 100); do
        grep -q 'listening on udp' "$work/server.err" && break
        sleep 0.05
    done
    addr=$(sed -n 's/.*listening on udp \([0-9.]*:[0-9]*\).*/\1/p' "$work/server.err" | head -1)
    [[ -n $addr ]] || { cat "$work/server.err" >&2; exit 2; }
}
