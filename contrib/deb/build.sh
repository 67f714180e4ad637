#!/usr/bin/env bash
# Builds the Debian package target/debian/psync_<version>-1_<arch>.deb:
# psync-server, psync-client and psync-token (release build), their man pages
# and bash completions generated from the binaries' own flag definitions,
# the systemd unit (binary path /usr/bin) and /etc/default/psync-server.
# Needs cargo-deb (`cargo install cargo-deb --locked`). Run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/../.."

bins=(psync-server psync-client psync-token)
build_args=()
for b in "${bins[@]}"; do build_args+=(--bin "$b"); done
cargo build --release --locked -p psync "${build_args[@]}"

out=target/deb-assets
rm -rf "$out"
mkdir -p "$out/man" "$out/bash-completion"
for b in "${bins[@]}"; do
    # A program without the generators (they come with psync::cli) is
    # packaged without a man page rather than failing the build.
    if "target/release/$b" --generate-man >"$out/man/$b.1" 2>/dev/null; then
        gzip -9n "$out/man/$b.1"
    else
        rm -f "$out/man/$b.1"
        echo "deb: $b has no --generate-man; no man page for it" >&2
    fi
    if ! "target/release/$b" --generate-completions bash >"$out/bash-completion/$b" 2>/dev/null; then
        rm -f "$out/bash-completion/$b"
    fi
done
sed 's|/usr/local/bin/psync-server|/usr/bin/psync-server|' contrib/psync-server.service \
    >"$out/psync-server.service"

cargo deb --no-build -p psync --strip
