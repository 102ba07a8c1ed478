# Guest side of the kup guest bench (busybox ash), sourced by /init before the scenario.
# Lines starting with "GUEST: " are the scenario's report (the host echoes them and judges PASS/FAIL);
# lines starting with "KUP: " are markers the host timestamps (boots, kexec, resets).

# cmdline_arg NAME: the value of NAME=... on the kernel command line (fails when absent).
cmdline_arg() {
    for w in $(cat /proc/cmdline); do
        case $w in "$1"=*) echo "${w#*=}"; return 0 ;; esac
    done
    return 1
}

mark() { echo "KUP: $*"; }
info() { echo "GUEST: INFO $SCENARIO stage=$STAGE $*"; }
pass() { echo "GUEST: PASS $SCENARIO $*"; }

# fail MESSAGE: reports and powers off at once (from any subshell).
fail() {
    echo "GUEST: FAIL $SCENARIO stage=$STAGE kernel=$(uname -r): $*"
    dmesg 2>/dev/null | tail -n 15 | sed 's/^/GUEST: dmesg: /'
    power_off
}

# figure NAME VALUE: fails the scenario unless VALUE is a number (digits with an optional fraction) or
# a count out of a total (N/M). For every figure a scenario parses and reports: an empty or garbled one
# (a changed output format) must not pass as a result.
figure() {
    case $2 in
        */*) _figure_part "$1" "${2%%/*}" "$2" && _figure_part "$1" "${2#*/}" "$2" ;;
        *) _figure_part "$1" "$2" "$2" ;;
    esac
}
_figure_part() {
    case $2 in
        '' | *[!0-9.]* | .* | *. | *.*.*) fail "figure $1 is '$3', not a number" ;;
    esac
}

# finish: the scenario's normal end.
finish() {
    echo "GUEST: END $SCENARIO"
    power_off
}

power_off() {
    sync
    poweroff -f
    sleep 60
}

# wait_for PATH [SECONDS]
wait_for() {
    i=0
    while [ ! -e "$1" ]; do
        i=$((i + 1))
        [ $i -gt $((${2:-10} * 10)) ] && return 1
        usleep 100000
    done
}

# kver a|b: the version of kernel A or B in this initramfs.
kver() { awk -v k="$1" '$1 == k { print $2 }' /boot/kernels; }

# which_kernel: a or b, for the running kernel.
which_kernel() { awk -v v="$(uname -r)" '$2 == v { print $1 }' /boot/kernels; }

# next_cmdline STAGE [KEY=VALUE...]: the running command line with kup.stage=STAGE and each KEY=VALUE
# set (replacing an earlier value).
next_cmdline() {
    next=$1
    shift
    line=
    for w in $(cat /proc/cmdline); do
        key=${w%%=*}
        [ "$key" = kup.stage ] && continue
        for kv in "$@"; do [ "${kv%%=*}" = "$key" ] && continue 2; done
        line="$line $w"
    done
    echo "${line# } kup.stage=$next${*:+ $*}"
}

# initrd_rebuild: /boot/initrd, this very initramfs for the next kernel (see kexec_to), built once.
initrd_rebuild() {
    if [ ! -s /boot/initrd ]; then
        mark "initramfs-rebuild"
        mkdir -p /run/rootfs
        mount -o bind / /run/rootfs || fail "bind mount of / for the initramfs rebuild"
        (cd /run/rootfs && cpio -o -H newc <bench/files >/boot/initrd) 2>/tmp/cpio.err ||
            fail "rebuilding the initramfs: $(tail -n 3 /tmp/cpio.err)"
        umount /run/rootfs
    fi
}

# kexec_to a|b STAGE [KEY=VALUE...]: loads kernel A or B with this very initramfs and the running
# command line with kup.stage set to STAGE and each KEY=VALUE set (replacing an earlier value), then
# switches to it. Never returns. The initramfs is rebuilt (uncompressed) from the member list the host
# wrote into it, /bench/files: the same files, read back from the rootfs the kernel unpacked, seen
# through a bind mount of / that does not show what is mounted on top (devtmpfs on /dev, a FUSE mount
# on /kup that may be dead after kill -9 of its daemon).
kexec_to() {
    k=$1 next=$2
    shift 2
    line=$(next_cmdline "$next" "$@")
    initrd_rebuild
    mark "kexec-load kernel=$k stage=$next"
    kexec -s -l "/boot/vmlinuz-$k" --initrd=/boot/initrd --append="$line" || fail "kexec -s -l /boot/vmlinuz-$k failed"
    mark "kexec-loaded"
    sync
    mark "kexec-e from=$(uname -r) to=$(kver "$k") stage=$next"
    kexec -e
    fail "kexec -e returned"
}

# A small note in the last 4 KiB of /dev/pmem0 that survives kexec and warm resets (it clobbers that
# block, so only for scenarios whose region content does not matter).
note_block() { echo $(($(blockdev --getsize64 /dev/pmem0) / 4096 - 1)); }
note_write() {
    printf 'KUPNOTE %s\n' "$*" | dd of=/dev/pmem0 bs=4096 seek="$(note_block)" conv=notrunc,sync 2>/dev/null
    sync
}
note_read() {
    dd if=/dev/pmem0 bs=4096 skip="$(note_block)" count=1 2>/dev/null | head -n 1 | sed -n 's/^KUPNOTE //p'
}
note_clear() {
    dd if=/dev/zero of=/dev/pmem0 bs=4096 seek="$(note_block)" count=1 conv=notrunc 2>/dev/null
    sync
}

# wait_gone NAME [SECONDS]: waits until no process NAME runs.
wait_gone() {
    i=0
    while pidof "$1" >/dev/null; do
        i=$((i + 1))
        [ $i -gt $((${2:-10} * 10)) ] && return 1
        usleep 100000
    done
}

# mc_start PORT MEGABYTES [SECONDS]: starts memcached on 127.0.0.1:PORT in its own session and waits
# (SECONDS, default 10) until it answers. Output goes to /dev/null: a log on /tmp (a tmpfs) would not
# exist after a kernel switch, and CRIU restores open files by path.
mc_start() {
    setsid memcached -u root -l 127.0.0.1 -p "$1" -m "$2" -c 256 </dev/null >/dev/null 2>&1 &
    i=0
    until mctool load --addr "127.0.0.1:$1" --items 0 >/dev/null 2>&1; do
        i=$((i + 1))
        [ $i -gt $((${3:-10} * 100)) ] && fail "memcached on port $1 does not answer"
        usleep 10000
    done
}

# need BINARY...: fails the scenario when a binary is not in the guest.
need() {
    for b in "$@"; do
        command -v "$b" >/dev/null || fail "$b is not in the guest (build it first, e.g. cargo build --release)"
    done
}

# --- rpramfs helpers (the region is /dev/pmem0 or, made a devdax namespace, /dev/dax0.0; the mount
# point /kup) ------------------------------------------------------------------------------------------

REGION=/dev/pmem0
MNT=/kup

# rp_devdax: makes the region a devdax namespace, as the operator guide recommends: stores go straight
# to the memory, without the block device's page cache and msync. Destroys what the region held; the
# namespace's info block survives kexec, so the next kernel finds /dev/dax0.0 again (init.sh).
rp_devdax() {
    need ndctl
    [ -e /dev/dax0.0 ] || ndctl create-namespace -f -e namespace0.0 -m devdax >/tmp/ndctl.out 2>&1 ||
        fail "ndctl create-namespace -f -e namespace0.0 -m devdax failed: $(tail -n 3 /tmp/ndctl.out)"
    wait_for /dev/dax0.0 10 || fail "no /dev/dax0.0 after ndctl create-namespace"
    REGION=/dev/dax0.0
    info "region: $REGION, $(($(cat /sys/bus/dax/devices/dax0.0/size) >> 20)) MiB (devdax namespace on memmap=$(cmdline_arg memmap))"
}

# region_mib: the size of $REGION in MiB.
region_mib() {
    case $REGION in
        /dev/dax*) echo $(($(cat /sys/bus/dax/devices/${REGION#/dev/}/size) >> 20)) ;;
        *) echo $(($(blockdev --getsize64 "$REGION") >> 20)) ;;
    esac
}

# rp_mount: mounts the existing file system (never formats); fails the scenario when mount fails.
rp_mount() {
    mkdir -p "$MNT"
    rpramfs mount "$REGION" "$MNT" >/tmp/rp-mount.out 2>&1 || {
        cat /tmp/rp-mount.out
        fail "rpramfs mount $REGION $MNT failed: $(tail -n 1 /tmp/rp-mount.out)"
    }
    cat /tmp/rp-mount.out
    grep -q " $MNT fuse" /proc/mounts || fail "$MNT is not in /proc/mounts after rpramfs mount"
}

# rp_umount: unmounts and waits until the daemon (which writes the clean-unmount record) has exited.
rp_umount() {
    umount "$MNT" || fail "umount $MNT failed"
    wait_gone rpramfs 30 || fail "the rpramfs daemon still runs 30 s after umount"
}

# rp_fsck [OPTIONS]: the region must check clean.
rp_fsck() {
    rpramfs fsck "$@" "$REGION" >/tmp/rp-fsck.out 2>&1
    rc=$?
    sed 's/^/fsck: /' /tmp/rp-fsck.out
    [ $rc -eq 0 ] || fail "rpramfs fsck $* $REGION exited $rc: $(tail -n 1 /tmp/rp-fsck.out)"
}

# rp_daemon_log: the daemon's log (recovery messages) into the console log.
rp_daemon_log() {
    for f in /run/rpramfs/*.log; do [ -e "$f" ] && sed "s|^|daemon($f): |" "$f"; done
}

# tree_manifest DIR: one sorted line per entry below DIR (except DIR/MANIFEST): path, type, size and
# link count, and the SHA-256 of a file's content (for files over 1 GiB, sparse files, of their first
# and last 64 KiB), a symlink's target.
tree_manifest() {
    (
        cd "$1" || exit 1
        find . -mindepth 1 ! -path ./MANIFEST | LC_ALL=C sort | while read -r p; do
            case $(stat -c %F "$p") in
                "regular file"|"regular empty file")
                    size=$(stat -c %s "$p")
                    if [ "$size" -gt $((1 << 30)) ]; then
                        head=$(dd if="$p" bs=65536 count=1 2>/dev/null | sha256sum | cut -c1-64)
                        tail=$(dd if="$p" bs=65536 skip=$((size / 65536 - 1)) 2>/dev/null | sha256sum | cut -c1-64)
                        sum="head:$head,tail:$tail"
                    else
                        sum=$(sha256sum <"$p" | cut -c1-64)
                    fi
                    echo "$p f $size $(stat -c %h "$p") $sum"
                    ;;
                directory) echo "$p d" ;;
                "symbolic link") echo "$p l $(readlink "$p")" ;;
                *) echo "$p ? $(stat -c %F "$p")" ;;
            esac
        done
    )
}
