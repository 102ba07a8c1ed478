#!/usr/bin/env bash
# The checks of kmod/ in `make test-host`: the kernel's scripts/checkpatch.pl (the kernel's coding
# style; any error or warning fails), then a W=1 -Werror build against the two newest Debian 6.1
# cloud kernels (the guest bench's default A and B) and the newest 6.12 one (scripts/kmod/build.sh),
# then a DKMS build for that 6.12 with kmod/dkms.conf as a real host's package would do it (dkms is
# installed with apt-get if missing; the build runs in a private tree and installs nothing).
# checkpatch.pl comes from Debian's linux-source-6.1 package (downloaded with apt-get, not
# installed; its three files are kept in KUP_KMOD_CACHE, default /var/cache/kup-kmod).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cache=${KUP_KMOD_CACHE:-/var/cache/kup-kmod}/checkpatch
die() { printf 'checkpatch: error: %s\n' "$*" >&2; exit 2; }

if [[ ! -s $cache/checkpatch.pl ]]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && apt-get download linux-source-6.1 >/dev/null 2>&1) \
        || { apt-get update -qq && (cd "$tmp" && apt-get download linux-source-6.1 >/dev/null); } \
        || die "apt-get download linux-source-6.1 failed"
    mkdir -p "$tmp/x"
    dpkg-deb --fsys-tarfile "$tmp"/linux-source-6.1_*.deb | tar -xO ./usr/src/linux-source-6.1.tar.xz |
        tar -xJ -C "$tmp/x" linux-source-6.1/scripts/checkpatch.pl linux-source-6.1/scripts/spelling.txt \
            linux-source-6.1/scripts/const_structs.checkpatch || die "extracting checkpatch.pl failed"
    mkdir -p "$cache"
    cp "$tmp"/x/linux-source-6.1/scripts/{spelling.txt,const_structs.checkpatch} "$cache/"
    cp "$tmp/x/linux-source-6.1/scripts/checkpatch.pl" "$cache/checkpatch.pl"
fi
out=$(cd "$repo" && perl "$cache/checkpatch.pl" --no-tree --terse --show-types -f kmod/ppp.c kmod/include/uapi/kup_ppp.h) || true
echo "$out"
grep -qE '(ERROR|WARNING):' <<<"$out" && die "kmod/ is not in the kernel's coding style (above)"
echo "checkpatch: kmod/ppp.c and kmod/include/uapi/kup_ppp.h are clean"
. "$repo/scripts/apt-lists.sh"
apt_lists_fresh || die "the apt lists could not be refreshed"
kernels=$(apt-cache search --names-only '^linux-image-6.1.0-.*-cloud-amd64$' | awk '{print $1}' | sort -V | tail -n 2)
[[ -n $kernels ]] || die "no linux-image-6.1.0-*-cloud-amd64 in the apt sources"
# And the newest 6.12 of this Debian (ppp-major's B).
k612=$(apt-cache search --names-only '^linux-image-6\.12\..*-cloud-amd64$' | awk '{print $1}' | sort -V | tail -n 1)
[[ -n $k612 ]] || die "no linux-image-6.12.*-cloud-amd64 in the apt sources"
kernels+=" $k612"
for k in $kernels; do
    k=${k#linux-image-}
    ko=$("$repo/scripts/kmod/build.sh" "$k") || die "building ppp.ko for $k failed"
    echo "kmod: $ko"
done

if ! command -v dkms >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dkms >/dev/null || die "apt-get install dkms failed"
fi
name=$(sed -n 's/^PACKAGE_NAME="\(.*\)"$/\1/p' "$repo/kmod/dkms.conf")
ver=$(sed -n 's/^PACKAGE_VERSION="\(.*\)"$/\1/p' "$repo/kmod/dkms.conf")
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir -p "$tree/src/$name-$ver" "$tree/dkms"
cp -r "$repo/kmod/." "$tree/src/$name-$ver/"
dkms add --dkmstree "$tree/dkms" --sourcetree "$tree/src" -m "$name" -v "$ver" >"$tree/dkms.log" 2>&1 &&
    dkms build --dkmstree "$tree/dkms" --sourcetree "$tree/src" -m "$name" -v "$ver" -k "$k" >>"$tree/dkms.log" 2>&1 ||
    { cat "$tree/dkms.log" >&2; die "the DKMS build of $name $ver for $k failed"; }
ko=$(find "$tree/dkms/$name/$ver/$k" -name 'ppp.ko*' | head -n 1)
[[ -n $ko ]] || { cat "$tree/dkms.log" >&2; die "the DKMS build for $k produced no ppp.ko"; }
echo "dkms: $name $ver builds ppp.ko for $k (kmod/dkms.conf)"
