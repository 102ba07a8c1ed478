#!/bin/sh
# /init of the kup guest bench (busybox ash). Common prelude for every boot stage: mounts, pmem and
# FUSE modules, then runs the function stage_<STAGE> of /bench/scenarios/<SCENARIO>.sh, where STAGE and
# SCENARIO come from kup.stage= and kup.scenario= on the kernel command line. A stage ends by switching
# kernels (kexec_to), by `finish`, or by returning (= finish); a failure powers the guest off.
export PATH=/usr/sbin:/usr/bin HOME=/root
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
. /bench/guest-lib.sh
STAGE=$(cmdline_arg kup.stage || echo a)
SCENARIO=$(cmdline_arg kup.scenario || echo none)
export STAGE SCENARIO
echo # the firmware's last line has no newline
mark "init stage=$STAGE kernel=$(uname -r) scenario=$SCENARIO uptime=$(cut -d' ' -f1 /proc/uptime)"

mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
hostname kup-guest
ip link set lo up 2>/dev/null

# dax_pmem and device_dax turn a region that was made a devdax namespace (rp_devdax) into /dev/dax0.0.
modprobe -a libnvdimm nd_btt nd_pmem nd_e820 dax_pmem device_dax fuse || fail "modprobe of the pmem/fuse modules failed"
i=0
until [ -e /dev/pmem0 ] || [ -e /dev/dax0.0 ]; do
    i=$((i + 1))
    [ $i -gt 100 ] && fail "no /dev/pmem0 or /dev/dax0.0 (memmap= missing from the command line?)"
    usleep 100000
done
[ -e /dev/dax0.0 ] && REGION=/dev/dax0.0
echo "GUEST: KERNEL $SCENARIO stage=$STAGE $(uname -r)"

[ -f "/bench/scenarios/$SCENARIO.sh" ] || fail "no scenario $SCENARIO in the initramfs"
. "/bench/scenarios/$SCENARIO.sh"
type "stage_$STAGE" >/dev/null 2>&1 || fail "scenario $SCENARIO has no stage $STAGE"
(
    set -e
    "stage_$STAGE"
)
rc=$?
[ $rc -eq 0 ] || fail "stage $STAGE stopped with status $rc"
finish
