#!/bin/bash
# make deb: builds, from the workspace's release build, target/debian/kup_<version>_amd64.deb (kup,
# kup-criu-hook, rpramfs (also as mount.fuse.rpramfs), kup-resume.service, man pages generated from
# the clap definitions, the docs) and kup-ppp-dkms_<version>_all.deb (ppp.ko's source for DKMS in
# /usr/src/kup-ppp-<version>, built for every installed kernel that has its headers).
# Prints the two .debs' paths. KUP_DEB_VERSION overrides the version (the upgrade test builds a newer one);
# KUP_DEB_MAINTAINER names whoever builds the package for a fleet (default: a placeholder address).
set -euo pipefail
cd "$(dirname "$0")/../.."
say() { echo "deb: $*" >&2; }

need_pkgs=()
for tool in dpkg-deb:dpkg dpkg-shlibdeps:dpkg-dev fakeroot:fakeroot; do
    command -v "${tool%%:*}" >/dev/null || need_pkgs+=("${tool#*:}")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
    . scripts/apt-lists.sh
    apt_lists_fresh
    say "installing ${need_pkgs[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_pkgs[@]}" >&2
fi

maintainer=${KUP_DEB_MAINTAINER:-kup developers <kup@example.org>}
version=${KUP_DEB_VERSION:-$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)}
dkms_version=$(sed -n 's/^PACKAGE_VERSION="\(.*\)"/\1/p' kmod/dkms.conf)
arch=$(dpkg --print-architecture)
out=target/debian
root=$out/kup_${version}_$arch
dkms_root=$out/kup-ppp-dkms_${version}_all
rm -rf "$root" "$dkms_root"
mkdir -p "$root/DEBIAN" "$dkms_root/DEBIAN"

for bin in kup kup-criu-hook rpramfs; do
    [ -x "target/release/$bin" ] || { say "target/release/$bin missing: run make build first"; exit 1; }
    install -D -m 0755 "target/release/$bin" "$root/usr/sbin/$bin"
    strip --strip-unneeded --remove-section=.comment --remove-section=.note "$root/usr/sbin/$bin"
done
# mount(8) runs /sbin/mount.fuse.rpramfs for `mount -t fuse.rpramfs` (/sbin is /usr/sbin on Debian).
ln -s rpramfs "$root/usr/sbin/mount.fuse.rpramfs"

install -d "$root/usr/lib/systemd/system"
sed 's|/usr/local/sbin/|/usr/sbin/|g; s|Install: `make install`|Installed by the kup package|' dist/kup-resume.service \
    >"$root/usr/lib/systemd/system/kup-resume.service"
chmod 0644 "$root/usr/lib/systemd/system/kup-resume.service"

man=$root/usr/share/man/man1
mkdir -p "$man"
"$root/usr/sbin/kup" man-pages "$man"
"$root/usr/sbin/rpramfs" man-pages "$man"
# kup-criu-hook is no command for people; its page says what it is.
cat >"$man/kup-criu-hook.1" <<'EOF'
.TH KUP-CRIU-HOOK 1
.SH NAME
kup\-criu\-hook \- CRIU's action script while kup checkpoints
.SH DESCRIPTION
CRIU runs kup\-criu\-hook as its action script during a \fBkup checkpoint\fR or \fBkup update\fR.
At post\-dump it asks the kup that started CRIU whether every app's final dump is stored, and CRIU
undoes its dump unless the answer is to go on. It is not meant to be run by hand.
.SH SEE ALSO
.BR kup (1)
EOF
gzip -9n "$man"/*.1
ln -s rpramfs-mount.1.gz "$man/mount.fuse.rpramfs.1.gz"

doc=$root/usr/share/doc/kup
install -d "$doc"
install -m 0644 README.md "$doc/README.md"
for d in design operator-guide rpramfs ppp benchmarks criu-host guest-bench; do
    [ -f "docs/$d.md" ] && install -m 0644 "docs/$d.md" "$doc/$d.md"
done
gzip -9n "$doc"/*.md
{
    echo "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
    echo "Upstream-Name: kup"
    echo
    echo "Files: *"
    echo "Copyright: $(date +%Y -d "@$(git log -1 --format=%ct 2>/dev/null || date +%s)") the kup authors"
    echo "License: MIT or Apache-2.0"
    echo " See /usr/share/common-licenses/Apache-2.0 for the Apache License 2.0."
    echo
    echo "Files: usr/src/kup-ppp-*"
    echo "Copyright: $(date +%Y -d "@$(git log -1 --format=%ct 2>/dev/null || date +%s)") the kup authors"
    echo "License: GPL-2.0"
    echo " See /usr/share/common-licenses/GPL-2."
} >"$doc/copyright"
{
    echo "kup ($version) unstable; urgency=medium"
    echo
    echo "  * Built from the kup workspace ($(git rev-parse --short HEAD 2>/dev/null || echo unknown))."
    echo
    echo " -- $maintainer  $(date -R -d "@$(git log -1 --format=%ct 2>/dev/null || date +%s)")"
} | gzip -9n >"$doc/changelog.gz"
chmod 0644 "$doc"/*

# The DKMS package's own docs directory: a copyright file and a changelog, as Debian requires.
install -d "$dkms_root/usr/share/doc/kup-ppp-dkms"
cp "$doc/copyright" "$doc/changelog.gz" "$dkms_root/usr/share/doc/kup-ppp-dkms/"
src=$dkms_root/usr/src/kup-ppp-$dkms_version
install -d "$src/include"
install -m 0644 kmod/ppp.c kmod/Kbuild kmod/Makefile kmod/dkms.conf "$src/"
cp -r kmod/include/. "$src/include/"
find "$dkms_root/usr" -type d -exec chmod 0755 {} +
find "$dkms_root/usr" -type f -exec chmod 0644 {} +

# Shared-library dependencies as Debian computes them.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/debian"
printf 'Source: kup\n\nPackage: kup\nArchitecture: any\n' >"$work/debian/control"
shlibs=$(cd "$work" && dpkg-shlibdeps -O "$OLDPWD/$root"/usr/sbin/{kup,kup-criu-hook,rpramfs} 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
[ -n "$shlibs" ] || { say "dpkg-shlibdeps found no dependencies"; exit 1; }

# package ROOT NAME ARCH SCRIPT...: the control file (its last fields from stdin), the maintainer
# scripts from scripts/deb/NAME.SCRIPT, md5sums, then the .deb (its path on stdout).
package() {
    local root=$1 name=$2 arch=$3
    shift 3
    {
        echo "Package: $name"
        echo "Version: $version"
        echo "Architecture: $arch"
        echo "Maintainer: $maintainer"
        echo "Installed-Size: $(du -sk --exclude=DEBIAN "$root" | cut -f1)"
        cat
    } >"$root/DEBIAN/control"
    for s in "$@"; do
        sed "s/@DKMS_VERSION@/$dkms_version/g" "scripts/deb/$name.$s" >"$root/DEBIAN/$s"
        chmod 0755 "$root/DEBIAN/$s"
    done
    (cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) >"$root/DEBIAN/md5sums"
    chmod 0644 "$root/DEBIAN/md5sums" "$root/DEBIAN/control"
    local deb=$out/${name}_${version}_$arch.deb
    fakeroot dpkg-deb -Zxz --build "$root" "$deb" >&2
    say "built $deb"
    echo "$deb"
}

package "$root" kup "$arch" postinst postrm <<EOF
Depends: $shlibs, criu, kexec-tools
Recommends: kup-ppp-dkms (= $version)
Section: admin
Priority: optional
Description: instant kernel updates that keep applications and their memory
 kup updates the Linux kernel of a running machine in seconds: it checkpoints
 the applications with CRIU into a reboot-persistent RAM file system (rpramfs),
 switches kernels with kexec and restores them on the new kernel, so a cache
 such as memcached keeps its contents. With the ppp.ko module (kup-ppp-dkms)
 the applications' pages stay in place.
 Checkpoint images hold process memory: kup and its store are root-only.
EOF
package "$dkms_root" kup-ppp-dkms all postinst prerm <<EOF
Depends: dkms
Section: kernel
Priority: optional
Description: kup's PPP kernel module (ppp.ko) in DKMS source form
 ppp.ko keeps the pages of the applications kup updates where they are across
 kexec (docs/ppp.md in the kup package). DKMS builds it for every installed
 kernel whose headers are installed (apt-get install linux-headers-amd64).
EOF
