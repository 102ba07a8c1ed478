# persist: an rpramfs file system survives kexec A -> B -> A. Kernel A formats /dev/pmem0, writes random
# data, a sparse file with data just below 2^47, a directory tree, a hard link and a symlink, unmounts and
# kexecs into B with the same memmap=; B checks fsck and every checksum without mkfs, then kexecs back
# into A, which checks again. The SHA-256 of the tree's manifest travels on the kexec command line
# (kup.expect=), so the check does not trust the region; /kup/MANIFEST is a copy for diagnosis.

SPARSE_END=$((1 << 47)) # the sparse file's size; its last 64 KiB hold data

stage_a() {
    need rpramfs
    rpramfs mkfs "$REGION" || fail "rpramfs mkfs $REGION failed"
    rp_mount
    mkdir -p "$MNT/data" "$MNT/tree/a/b/c/d" "$MNT/tree/empty-dir"
    for i in 1 2 3 4; do
        dd if=/dev/urandom of="$MNT/data/r$i" bs=1M count=2 2>/dev/null || fail "writing data/r$i"
    done
    head -c 1234567 /dev/urandom >"$MNT/data/odd-size" || fail "writing data/odd-size"
    : >"$MNT/data/empty"
    dd if=/dev/urandom of="$MNT/sparse" bs=65536 count=1 seek=$((SPARSE_END / 65536 - 1)) 2>/dev/null ||
        fail "writing the sparse file at 2^47 - 64 KiB"
    for d in tree tree/a tree/a/b tree/a/b/c tree/a/b/c/d; do
        for i in 1 2 3 4 5; do echo "$d file $i" >"$MNT/$d/f$i"; done
    done
    ln "$MNT/data/r1" "$MNT/tree/hard-r1" || fail "hard link"
    ln -s ../data/r2 "$MNT/tree/sym-r2" || fail "symlink"
    sync

    [ "$(stat -c %s "$MNT/sparse")" = $SPARSE_END ] || fail "sparse file size $(stat -c %s "$MNT/sparse")"
    blocks=$(stat -c %b "$MNT/sparse")
    [ "$blocks" -lt 4096 ] || fail "the sparse file occupies $blocks blocks of 512 bytes"
    tree_manifest "$MNT" >/tmp/manifest || fail "manifest"
    cp /tmp/manifest "$MNT/MANIFEST"
    expect=$(sha256sum </tmp/manifest | cut -c1-64)
    info "wrote $(wc -l </tmp/manifest) entries, $(du -sk "$MNT" | cut -f1) KiB; manifest sha256 $expect"
    persist_check_links
    rp_umount
    rp_fsck
    rpramfs info "$REGION"
    kexec_to b b "kup.expect=$expect"
}

# The hard link shares the inode; the symlink resolves to the same bytes.
persist_check_links() {
    [ "$(stat -c %i "$MNT/data/r1")" = "$(stat -c %i "$MNT/tree/hard-r1")" ] || fail "hard link lost its inode"
    [ "$(stat -c %h "$MNT/data/r1")" = 2 ] || fail "data/r1 link count $(stat -c %h "$MNT/data/r1")"
    cmp "$MNT/tree/sym-r2" "$MNT/data/r2" || fail "the symlink does not lead to data/r2"
}

persist_verify() {
    expect=$(cmdline_arg kup.expect) || fail "no kup.expect= on the command line"
    rp_fsck
    rp_mount
    tree_manifest "$MNT" >/tmp/manifest || fail "manifest"
    got=$(sha256sum </tmp/manifest | cut -c1-64)
    if [ "$got" != "$expect" ]; then
        diff "$MNT/MANIFEST" /tmp/manifest
        fail "the tree differs after kexec (manifest sha256 $got, expected $expect)"
    fi
    persist_check_links
    rp_umount
    rp_fsck --scrub
    pass "$(wc -l </tmp/manifest) entries intact on $(uname -r) after kexec (manifest sha256 $got)"
}

stage_b() {
    persist_verify
    kexec_to a a2
}

stage_a2() {
    persist_verify
}
