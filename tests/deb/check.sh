#!/bin/bash
# The Debian packages, as an operator uses them: lintian has no error for them; `apt-get install
# ./kup_*.deb ./kup-ppp-dkms_*.deb` installs them with their dependencies, enables kup-resume.service,
# registers ppp.ko's source with DKMS and puts man pages generated from the clap definitions in place; the packaged rpramfs mounts
# a region through `mount -t fuse.rpramfs`; a newer package upgrades it; a purge leaves nothing behind.
# Run as root on a machine without kup installed (make test-deb; make test runs it).
set -euo pipefail
cd "$(dirname "$0")/../.."
fail() { echo "deb-test: FAIL: $*" >&2; exit 1; }
info() { echo "deb-test: $*" >&2; }
export DEBIAN_FRONTEND=noninteractive

for p in kup kup-ppp-dkms; do
    if dpkg-query -W -f '${Status}' $p 2>/dev/null | grep -q installed; then
        fail "the $p package is installed on this machine already; this test installs and purges it: remove it first (apt-get purge kup kup-ppp-dkms)"
    fi
done
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
dkms_version=$(sed -n 's/^PACKAGE_VERSION="\(.*\)"/\1/p' kmod/dkms.conf)
debs=($(scripts/deb/build.sh))
newer=($(KUP_DEB_VERSION="$version+upgrade1" scripts/deb/build.sh))
[ ${#debs[@]} -eq 2 ] && [ ${#newer[@]} -eq 2 ] || fail "scripts/deb/build.sh printed ${debs[*]}; expected the kup and kup-ppp-dkms packages"

# lintian, and the packages' dependencies (criu, kexec-tools, dkms), come from today's lists.
. scripts/apt-lists.sh
apt_lists_fresh
command -v lintian >/dev/null || apt-get install -y -q lintian >&2
lintian --fail-on error --tag-display-limit 0 "${debs[@]}" >/tmp/kup-lintian.txt 2>&1 || {
    cat /tmp/kup-lintian.txt >&2
    fail "lintian found errors in ${debs[*]}"
}
info "lintian: no errors ($(grep -c '^W:' /tmp/kup-lintian.txt || true) warnings: $(grep '^W:' /tmp/kup-lintian.txt | awk '{print $3}' | sort -u | tr '\n' ' '))"

tmp=$(mktemp -d)
trap 'umount "$tmp/mnt" 2>/dev/null || true; rm -rf "$tmp"' EXIT
cp "${debs[@]}" "${newer[@]}" "$tmp/"
in_tmp() { for d in "$@"; do echo "$tmp/$(basename "$d")"; done; }

# ---- install ------------------------------------------------------------------------------------
apt-get install -y -q $(in_tmp "${debs[@]}") >"$tmp/install.log" 2>&1 || { cat "$tmp/install.log" >&2; fail "apt-get install of ${debs[*]} failed"; }
for p in kup kup-ppp-dkms; do
    [ "$(dpkg-query -W -f '${Version}' $p)" = "$version" ] || fail "dpkg does not list $p $version after the install"
done
for f in /usr/sbin/kup /usr/sbin/kup-criu-hook /usr/sbin/rpramfs; do
    [ -x "$f" ] || fail "$f is not installed"
done
[ "$(readlink -f /usr/sbin/mount.fuse.rpramfs)" = /usr/sbin/rpramfs ] || fail "mount.fuse.rpramfs does not lead to rpramfs"
unit=/usr/lib/systemd/system/kup-resume.service
grep -q '^ExecStart=/usr/sbin/kup resume --store ram$' "$unit" || fail "$unit does not run the packaged kup: $(grep ExecStart "$unit")"
[ -L /etc/systemd/system/multi-user.target.wants/kup-resume.service ] || fail "kup-resume.service is not enabled after the install"
for page in kup kup-update kup-checkpoint kup-resume rpramfs rpramfs-mount kup-criu-hook; do
    [ -f "/usr/share/man/man1/$page.1.gz" ] || fail "no man page $page(1)"
done
# (Whole outputs are read before they are searched: `grep -q` in a pipe would cut its writer short.)
page=$(zcat /usr/share/man/man1/kup-update.1.gz)
grep -q -- '\\-\\-kernel' <<<"$page" || fail "kup-update(1) does not document --kernel"
[ ! -e /usr/share/man/man1/kup-man-pages.1.gz ] || fail "the hidden man-pages command got a page"
[ -f "/usr/src/kup-ppp-$dkms_version/dkms.conf" ] && [ -f "/usr/src/kup-ppp-$dkms_version/include/uapi/kup_ppp.h" ] || fail "ppp.ko's DKMS source is not in /usr/src"
grep -q kup-ppp <<<"$(dkms status -m kup-ppp)" || fail "DKMS does not know kup-ppp after the install: $(dkms status)"
out=$(/usr/sbin/kup --version)
grep -q "^kup $version" <<<"$out" || fail "kup --version: $out"
out=$(/usr/sbin/kup update --help)
grep -q -- "--kernel" <<<"$out" || fail "kup update --help does not list --kernel"

# The packaged rpramfs, mounted the way fstab does it.
mkdir "$tmp/mnt"
/usr/sbin/rpramfs mkfs "$tmp/region" --size 64M >/dev/null
mount -t fuse.rpramfs "$tmp/region" "$tmp/mnt" || fail "mount -t fuse.rpramfs failed"
echo "written through the packaged mount helper" >"$tmp/mnt/probe"
sync
umount "$tmp/mnt"
mount -t fuse.rpramfs "$tmp/region" "$tmp/mnt"
[ "$(cat "$tmp/mnt/probe")" = "written through the packaged mount helper" ] || fail "the file did not read back after a remount"
umount "$tmp/mnt"
info "installed $version: binaries, unit (enabled), $(ls /usr/share/man/man1 | grep -c -E '^(kup|rpramfs)') man pages, DKMS source; rpramfs mounted through mount -t fuse.rpramfs"

# ---- upgrade ------------------------------------------------------------------------------------
files=$(dpkg -L kup kup-ppp-dkms)
apt-get install -y -q $(in_tmp "${newer[@]}") >"$tmp/upgrade.log" 2>&1 || { cat "$tmp/upgrade.log" >&2; fail "the upgrade to $version+upgrade1 failed"; }
for p in kup kup-ppp-dkms; do
    [ "$(dpkg-query -W -f '${Version}' $p)" = "$version+upgrade1" ] || fail "dpkg does not list $p $version+upgrade1 after the upgrade"
done
[ -L /etc/systemd/system/multi-user.target.wants/kup-resume.service ] || fail "the upgrade disabled kup-resume.service"
grep -q kup-ppp <<<"$(dkms status -m kup-ppp)" || fail "DKMS lost kup-ppp in the upgrade"
/usr/sbin/kup --version >/dev/null || fail "kup does not run after the upgrade"
info "upgraded to $version+upgrade1: unit still enabled, DKMS source registered"

# ---- purge --------------------------------------------------------------------------------------
apt-get purge -y -q kup kup-ppp-dkms >"$tmp/purge.log" 2>&1 || { cat "$tmp/purge.log" >&2; fail "apt-get purge kup kup-ppp-dkms failed"; }
for p in kup kup-ppp-dkms; do
    dpkg-query -W -f '${Status}' $p 2>/dev/null | grep -q installed && fail "$p is still installed after the purge"
done
left=$(for f in $files; do [ -f "$f" ] || [ -L "$f" ] && echo "$f"; done; true)
[ -z "$left" ] || fail "the purge left files behind: $left"
[ ! -e /etc/systemd/system/multi-user.target.wants/kup-resume.service ] || fail "the purge left kup-resume.service enabled"
[ ! -e "/usr/src/kup-ppp-$dkms_version" ] || fail "the purge left /usr/src/kup-ppp-$dkms_version"
! grep -q kup-ppp <<<"$(dkms status -m kup-ppp)" || fail "DKMS still lists kup-ppp after the purge"
echo "deb-test: PASS $(for d in "${debs[@]}"; do basename "$d"; done | tr '\n' ' ')lintian clean of errors, installed, upgraded to $version+upgrade1, purged without a trace"
