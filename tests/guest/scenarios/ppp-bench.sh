# ppp-bench: PPP against plain CRIU and FOAM (1 and 2 passes) on rpramfs: the KUP paper's Fig. 7,
# frozen time and outage against the working set, in one run. For every working set W (kup.sizes=,
# MiB) a fresh memsubject holding W MiB writes 50% of them once, at 25 MiB/s, from the moment the
# first pass of its checkpoint starts (SIGUSR2 to memsubject --dirty-on-signal): CRIU's pre-dump, or
# PPP's pins; for the one-pass dumps, as they start. That is the paper's "50% written during the
# pre-dump" (FOAM's pre-dump copies about as fast under TCG, so the burst lasts about as long), and a
# steady write load for PPP's passes before the freeze. It is checkpointed:
#   1. plain `criu dump` into tmpfs, then `criu restore -d` (the baseline);
#   2. `kup checkpoint --iterations 1` into rpramfs, `kup restore --lazy`;
#   3. `kup checkpoint --iterations 2` (a pre-dump while the burst runs), `kup restore --lazy`;
#   4. `kup update --ppp`: a real kexec to the other kernel, where `kup resume` maps the pages back
#      (CRCs checked) and the next stage measures, verifies and goes on with the next W.
# FOAM is skipped where its checkpoint does not fit the store (the paper's "RP-RAMFS fails beyond
# 56 GB"): PPP needs no room for the pages it keeps. After every restore the subject checks all of
# its memory (SIGUSR1 -> OK/BAD); BAD fails the scenario.
# Frozen times are CRIU's own (stats-dump: frozen_time_us). PPP's outage is the update record's
# frozen -> running; the others' outage is their frozen time + the switch PPP's update measured at
# the same W (checkpoint-done -> restore-start: kexec, boot, mounts) + their restore (same boot).
# At the end: `GUEST: TABLE` lines (the host plots them: ppp-bench.host.sh) and the line
# `ppp-bench: flat=X foam_over_ppp=Y`: X = PPP's frozen time at the largest W / at the smallest,
# Y = FOAM 2-pass's frozen time / PPP's at 1024 MiB. The line before it, `ppp-bench-parts:`, has
# kup_flat (X for kup's part of the frozen time), how much the frozen time grew, and how much
# reading the subject's smaps and pagemap grew over the same W (the kernel's walks that stock CRIU
# makes while the app is frozen; pagemap through mctool, an upper bound).
# (Stages run under set -e: commands whose failure is reported use `|| rc=$?`.)

. /bench/bench-lib.sh

# burst_when WHAT: SIGUSR2 to $PID (its burst of writes) as soon as WHAT is true (polled every 20 ms,
# for at most 120 s), in the background.
burst_when() {
    (
        i=0
        until eval "$1"; do
            i=$((i + 1))
            [ $i -gt 6000 ] && exit 0
            usleep 20000
        done
        kill -USR2 "$PID"
    ) &
}
RES=$MNT/ppp-bench.results # survives the kexecs (rpramfs)
SUBJ_OPTS="--dirty-on-signal --dirty-mib-per-s 25"
SUBJ_WARM=0
SUBJ_BURST=1
D=50

stage_a() {
    need rpramfs kup criu memsubject mctool
    ppp_bench_setup
    : >$RES
    run_size 1
}

# sizes: kup.sizes= as words.
sizes() { (cmdline_arg kup.sizes || echo 256,512,1024,1536) | tr , ' '; }

# size_at I: the I-th working set (1-based), empty past the last.
size_at() { sizes | awk -v i="$1" '{ print $i }'; }

# run_size I: the baselines at working set I, then the PPP update (which switches kernels).
run_size() {
    I=$1 W=$(size_at "$1")
    case $W in '' | *[!0-9]*) fail "kup.sizes: '$W' is not a number of MiB" ;; esac
    mkdir -p $KWORK
    # /tmp was sized (half of RAM) before the arena came online: room for plain CRIU's dump.
    mount -o remount,size=$((W + 512))m /tmp || fail "remounting /tmp with $((W + 512)) MiB failed"
    t_one=$(now_ms)

    # 1. Plain CRIU into tmpfs.
    plain_dump
    info "W=$W criu: frozen $P_FROZEN ms"
    plain_restore "W=$W criu"

    # 2. and 3.: FOAM, where the store holds the checkpoint.
    K1_FROZEN=- K1_LAZY=- K2_FROZEN=- K2_LAZY=-
    free_mib=$(df -m $MNT | awk 'NR == 2 { print $4 }')
    if [ "$free_mib" -gt $((W + 64)) ]; then
        for n in 1 2; do
            subj_start "$W" $D
            if [ $n = 1 ]; then kill -USR2 "$PID"; else burst_when "ps | grep -q '[c]riu pre-dump'"; fi
            kup_checkpoint $n
            frozen=$CK_FROZEN
            info "W=$W foam-${n}pass: frozen $CK_FROZEN ms: $(passes_line)"
            kup_restore lazy
            info "W=$W foam-${n}pass: $R_LINE"
            verify "W=$W foam-${n}pass" "$W"
            subj_stop
            rm -rf "${MNT:?}/$CK_ID" "$KWORK/$CK_ID"
            if [ $n = 1 ]; then K1_FROZEN=$frozen K1_LAZY=$R_RUNNING; else K2_FROZEN=$frozen K2_LAZY=$R_RUNNING; fi
        done
    else
        info "W=$W foam: skipped, the store has $free_mib MiB free for a $W MiB checkpoint (PPP needs no room for the pages it keeps)"
    fi
    echo "$W $P_FROZEN $P_RESTORE $K1_FROZEN $K1_LAZY $K2_FROZEN $K2_LAZY" >$MNT/ppp-bench.row
    info "W=$W baselines done in $((($(now_ms) - t_one) / 1000)) s"

    # 4. PPP: the update to the other kernel (where /tmp is a new tmpfs: the subject's output goes
    # nowhere).
    SUBJ_ERR=/dev/null subj_start "$W" $D
    out=$(mctool pfns --pid "$PID" --out $MNT/pfns-before) || fail "reading the subject's PFNs: $out"
    echo "$PID" >$MNT/ppp-bench.pid
    next=b
    [ "$(which_kernel)" = b ] && next=a
    burst_when "kup ppp status 2>/dev/null | grep -q provisionally"
    rc=0
    kup update --ppp --kernel "/boot/vmlinuz-$next" --initrd $MNT/initrd --append "$(next_cmdline r kup.i="$I")" --store ram --pid "$PID" \
        --old-kernel "/boot/vmlinuz-$(which_kernel)" --old-initrd $MNT/initrd --old-append "$(next_cmdline back)" || rc=$?
    fail "W=$W: kup update --ppp returned (exit $rc) instead of switching kernels"
}

# After each PPP update: measure, verify, then the next working set or the report.
stage_r() {
    I=$(cmdline_arg kup.i) || fail "no kup.i= on the command line"
    W=$(size_at "$I")
    rc=0
    kup resume || rc=$?
    [ $rc -eq 0 ] || fail "W=$W: kup resume exited $rc"
    kup ppp attach --if-reserved || fail "kup ppp attach after the resume failed"
    kup status | sed 's/^/GUEST: INFO status: /'
    PID=$(cat $MNT/ppp-bench.pid)
    verify "W=$W ppp" "$W"
    # What the kernel's walks of W MiB cost in this guest: CRIU reads /proc/PID/smaps (the kernel
    # visits every page to count RSS and PSS) and /proc/PID/pagemap on every final dump. The
    # pagemap figure is mctool's whole PFN read and file write, an upper bound of CRIU's walk.
    t0=$(now_ms)
    cat /proc/"$PID"/smaps >/dev/null
    smaps_ms=$(($(now_ms) - t0))
    t0=$(now_ms)
    out=$(mctool pfns --pid "$PID" --out /tmp/pfns-after) || fail "reading the subject's PFNs: $out"
    pagemap_ms=$(($(now_ms) - t0))
    in_place=$(mctool pfns-compare $MNT/pfns-before /tmp/pfns-after | sed -n 's/^in_place=//p')
    # The update record's timeline (seconds): frozen, checkpoint-done, restore-start, running.
    times=$(kup status | awk '$2 == "s" && $3 == "(+" { t[$6] = $1 } END { printf "%d %d %d", (t["checkpoint-done"] - t["frozen"]) * 1000, (t["restore-start"] - t["checkpoint-done"]) * 1000, (t["running"] - t["frozen"]) * 1000 }')
    set -- $times
    X_FROZEN=$1 SWITCH=$2 X_OUTAGE=$3
    line=$(kup status | grep '^  ppp: ') || fail "the update record does not say what PPP did"
    map_ms=$(echo "$line" | sed -n 's/.*, \([0-9.]*\) ms with\(out\)\{0,1\} CRC checks.*/\1/p')
    crc_frozen=$(echo "$line" | sed -n 's/.* \([0-9]*\) pages while frozen.*/\1/p')
    kup_fz=$(echo "$line" | sed -n 's/.*; frozen part \([0-9.]*\) ms.*/\1/p')
    [ -n "$kup_fz" ] || fail "the update record's ppp line has no 'frozen part': $line"
    info "W=$W ppp: frozen $X_FROZEN ms (kup's part $kup_fz ms), outage $X_OUTAGE ms (switch $SWITCH ms, map $map_ms ms), in place $in_place, pages pinned and checksummed again while frozen $crc_frozen; reading smaps $smaps_ms ms, pagemap $pagemap_ms ms"
    subj_stop
    echo "$(cat $MNT/ppp-bench.row) $X_FROZEN $X_OUTAGE $SWITCH $map_ms $in_place $crc_frozen $kup_fz $smaps_ms $pagemap_ms" >>$RES
    rm -f $MNT/ppp-bench.row $MNT/pfns-before
    if [ -n "$(size_at $((I + 1)))" ]; then
        run_size $((I + 1))
    fi
    report
}

# report: the table of $RES (ms), outages, and the line with X and Y.
report() {
    awk '
        function n(v) { return v == "-" ? "-" : sprintf("%.0f", v) }
        function out(f, r, s) { return (f == "-" || r == "-") ? "-" : sprintf("%.0f", f + s + r) }
        BEGIN { printf "GUEST: TABLE %6s | %9s %9s %9s %9s | %9s %9s %9s %9s | %7s %7s %7s | %8s %8s %10s %10s | %s\n", "W_MiB", "criu_fz", "foam1_fz", "foam2_fz", "ppp_fz", "criu_out", "foam1_out", "foam2_out", "ppp_out", "switch", "map", "written", "kup_fz", "criu_fz_rest", "smaps_ms", "pagemap_ms", "in_place" }
        { printf "GUEST: TABLE %6s | %9s %9s %9s %9s | %9s %9s %9s %9s | %7s %7s %7s | %8s %8s %10s %10s | %s\n", $1, n($2), n($4), n($6), n($8), out($2, $3, $10), out($4, $5, $10), out($6, $7, $10), n($9), n($10), n($11), $13, n($14), n($8 - $14), n($15), n($16), $12 }
    ' $RES
    # flat: CRIU's frozen time of the PPP dump at the largest W / at the smallest; kup_flat: the
    # same for kup's part of it (what PPP does while the app is frozen), the rest being CRIU's.
    summary=$(awk '
        NR == 1 || $1 + 0 < wmin { wmin = $1 + 0; fmin = $8; kmin = $14; s0 = $15; p0 = $16 }
        NR == 1 || $1 + 0 > wmax { wmax = $1 + 0; fmax = $8; kmax = $14; s1 = $15; p1 = $16 }
        $1 == 1024 && $6 != "-" && $8 > 0 { y = sprintf("%.1f", $6 / $8) }
        END {
            printf "kup_flat=%.2f frozen_growth_ms=%.0f smaps_growth_ms=%.0f pagemap_growth_ms=%.0f\n", (kmin > 0 ? kmax / kmin : 0), fmax - fmin, s1 - s0, p1 - p0
            printf "flat=%.2f foam_over_ppp=%s\n", (fmin > 0 ? fmax / fmin : 0), (y == "" ? "n/a" : y)
        }
    ' $RES)
    parts=$(echo "$summary" | sed -n 1p) summary=$(echo "$summary" | sed -n 2p)
    echo "GUEST: TABLE ppp-bench-parts: $parts"
    echo "GUEST: TABLE ppp-bench: $summary"
    pass "$(wc -l <$RES) working sets ($(sizes | tr ' ' ,) MiB), every restore verified OK; $summary $parts"
}

stage_back() {
    kup resume || true
    kup status
    fail "kup resume fell back to $(uname -r)"
}
