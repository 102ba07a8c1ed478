#!/usr/bin/env bash
# Builds kmod/ppp.ko for one Debian kernel release against that kernel's linux-headers package
# (apt-get installs it when missing) and prints the path of the module. The build is cached by the
# module's sources and the release: KUP_KMOD_CACHE (default /var/cache/kup-kmod).
#   scripts/kmod/build.sh 6.1.0-57-cloud-amd64
set -euo pipefail
kver=${1:?usage: scripts/kmod/build.sh KERNEL-RELEASE}
repo=$(cd "$(dirname "$0")/../.." && pwd)
cache=${KUP_KMOD_CACHE:-/var/cache/kup-kmod}
die() { printf 'kmod: error: %s\n' "$*" >&2; exit 2; }

hdr=/usr/src/linux-headers-$kver
if [[ ! -e $hdr/Makefile ]]; then
    pkg=linux-headers-$kver
    [[ $EUID -eq 0 ]] || die "need root to apt-get install $pkg"
    if [[ -z $(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ && $2 != "(none)"') ]]; then
        apt-get update -qq || die "apt-get update failed"
    fi
    printf 'kmod: installing %s\n' "$pkg" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null \
        || die "apt-get install $pkg failed (is $kver a kernel of this Debian release?)"
fi

key=$( (cd "$repo/kmod" && find . -type f ! -name '*.o' ! -name '*.ko' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-16)
out=$cache/$kver/$key
if [[ ! -s $out/ppp.ko ]]; then
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
    cp -r "$repo/kmod/." "$build/"
    # W=1: the kernel's extra warnings; any warning fails the build.
    make -s -C "$hdr" M="$build" W=1 KCFLAGS=-Werror modules >"$build/build.log" 2>&1 \
        || { cat "$build/build.log" >&2; die "building ppp.ko for $kver failed"; }
    mkdir -p "$out"
    install -m 0644 "$build/ppp.ko" "$out/ppp.ko.new"
    mv "$out/ppp.ko.new" "$out/ppp.ko"
fi
echo "$out/ppp.ko"
