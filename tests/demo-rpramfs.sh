#!/usr/bin/env bash
# rpramfs demo: make a file system in a region file, mount it, write data, kill -9 the daemon
# (no unmount, no sync), mount again, check it and verify every byte.
set -euo pipefail
BIN=${RPRAMFS:-$(cd "$(dirname "$0")/.." && pwd)/target/release/rpramfs}
work=$(mktemp -d /tmp/rpramfs-demo.XXXXXX)
region=$work/region.img
mnt=$work/mnt
cleanup() { umount -l "$mnt" 2>/dev/null || true; pkill -9 -f "rpramfs mount $region" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
mkdir -p "$mnt"

step() { printf '\n== %s\n' "$*"; }
step "mkfs and mount a 256 MiB region"
"$BIN" mkfs "$region" --size 256M --label demo
"$BIN" mount "$region" "$mnt"

step "write 32 MiB of random data, a sparse file at 2^47 - 64 KiB, a tree, a hard link and a symlink"
head -c 32M /dev/urandom > "$mnt/random.bin"
printf 'top of the address space' | dd of="$mnt/sparse" bs=1 seek=$((0x7fffffff0000)) status=none
mkdir -p "$mnt/tree/a/b"
for i in $(seq 1 50); do echo "file $i" > "$mnt/tree/a/b/f$i"; done
ln "$mnt/random.bin" "$mnt/tree/hardlink"
ln -s ../random.bin "$mnt/tree/symlink"
(cd "$mnt" && find . -type f ! -name sparse -print0 | sort -z | xargs -0 md5sum) > "$work/sums"
sparse_tail() { dd if="$mnt/sparse" bs=64K skip=$((0x7fffffff0000 / 65536)) status=none | md5sum; }
sparse_tail > "$work/sparse.sum"
echo "$(wc -l < "$work/sums") files checksummed"

step "kill -9 the daemon (no unmount)"
pid=$(pgrep -f "rpramfs mount $region" | head -n1)
kill -9 "$pid"
sleep 0.2
ls "$mnt" 2>&1 | head -n1 || true
"$BIN" info "$region" | grep state

step "mount again: the stale mount is detected and the region recovered"
"$BIN" mount "$region" "$mnt"
(cd "$mnt" && md5sum --quiet -c "$work/sums") && echo "all checksums match"
[ "$(sparse_tail)" = "$(cat "$work/sparse.sum")" ] && echo "sparse file at 2^47 intact ($(stat -c %s "$mnt/sparse") bytes, $(stat -c %b "$mnt/sparse") blocks)"
[ "$(readlink "$mnt/tree/symlink")" = ../random.bin ]
[ "$(stat -c %h "$mnt/random.bin")" = 2 ]
umount "$mnt"
for _ in $(seq 50); do pgrep -f "rpramfs mount $region" >/dev/null || break; sleep 0.1; done

step "fsck after the clean unmount"
"$BIN" fsck --scrub "$region"
files=$(( $(wc -l < "$work/sums") + 1 ))
echo
echo "rpramfs demo: PASS files=$files/$files (survived kill -9 of the daemon)"
