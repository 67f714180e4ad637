#!/usr/bin/env bash
# Builds the container image psync-server:<version> (and :latest) with
# buildah, from the Debian package built by contrib/deb/build.sh:
#   1. unpack the package's psync-server into a staging root;
#   2. copy in the shared libraries `ldd` says it needs, at the same paths
#      (glibc 2.34+ has the NSS files and DNS modules built into libc.so.6,
#      so name resolution works with /etc/resolv.conf and /etc/hosts from
#      the runtime; nothing is loaded with dlopen);
#   3. buildah bud contrib/container/Containerfile over that root.
# Prints the image name. Needs root (or a rootless buildah setup).
set -euo pipefail
cd "$(dirname "$0")/../.."

deb=$(ls -t target/debian/psync_*.deb 2>/dev/null | head -n1)
if [ -z "$deb" ]; then
    echo "container: no target/debian/psync_*.deb; run contrib/deb/build.sh first" >&2
    exit 1
fi
version=$(dpkg-deb -f "$deb" Version)
version=${version%-*}
stage=target/container
rm -rf "$stage"
mkdir -p "$stage/rootfs" "$stage/unpacked"
dpkg-deb -x "$deb" "$stage/unpacked"
install -D -m 0755 "$stage/unpacked/usr/bin/psync-server" "$stage/rootfs/usr/bin/psync-server"

# Every library the binary needs, and the dynamic loader, at their paths.
ldd "$stage/rootfs/usr/bin/psync-server" | awk '
    $2 == "=>" && $3 ~ /^\// { print $3 }
    $1 ~ /^\//               { print $1 }' | sort -u | while read -r lib; do
    install -D -m 0755 "$(readlink -f "$lib")" "$stage/rootfs$lib"
done

cp contrib/container/Containerfile "$stage/Containerfile"
image=localhost/psync-server:$version
buildah bud --quiet --layers=false -f "$stage/Containerfile" -t "$image" "$stage" >/dev/null
buildah tag "$image" localhost/psync-server:latest
echo "$image"
