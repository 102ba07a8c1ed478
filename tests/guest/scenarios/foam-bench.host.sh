# Host side of foam-bench (sourced by tests/guest/run): the sizes to measure, a guest and a pmem region
# big enough for them, a long timeout, and the table again at the end of the run.
#
# KUP_BENCH_SIZES: working sets in MiB (default "256 1024"); KUP_BENCH_DIRTY: dirty fractions in %
# (default "10 50"); KUP_BENCH_SAMPLES: frozen-time samples of plain `criu dump` and of the 2-pass
# checkpoint per configuration, whose medians the table shows (default 3; the plain dump alone
# varies by ±30 % within one boot under TCG). For the largest working set W the region holds a checkpoint (W) plus, during an
# eager restore, CRIU's pages image (W); RAM holds the subject (W) and its plain dump in tmpfs (W).
# QEMU's pc machine maps guest RAM beyond 3 GiB from 4 GiB on, so the region goes at 4G and the guest
# gets 3 GiB below it, the region, and 512 MiB above it (W = 1 GiB: -m 6G, memmap=2560M!4G).
# KUP_GUEST_MEM / KUP_GUEST_MEMMAP / KUP_GUEST_TIMEOUT still override all of this.
BENCH_SIZES=${KUP_BENCH_SIZES:-256 1024}
BENCH_DIRTY=${KUP_BENCH_DIRTY:-10 50}
BENCH_SAMPLES=${KUP_BENCH_SAMPLES:-3}
[[ $BENCH_SAMPLES =~ ^[1-9][0-9]*$ ]] || die "KUP_BENCH_SAMPLES: $BENCH_SAMPLES is not a positive count"
bench_wmax=0
for w in $BENCH_SIZES; do
    [[ $w =~ ^[0-9]+$ ]] || die "KUP_BENCH_SIZES: $w is not a number of MiB"
    ((w > bench_wmax)) && bench_wmax=$w
done
for d in $BENCH_DIRTY; do
    [[ $d =~ ^[0-9]+$ ]] && ((d >= 1 && d <= 100)) || die "KUP_BENCH_DIRTY: $d is not a percentage (1..100)"
done
bench_region=$((bench_wmax * 5 / 2))
((bench_region < 2560)) && bench_region=2560
# Low RAM (3 GiB) holds the subject and its tmpfs dump up to W = 1 GiB; beyond that, more goes above the region.
bench_extra=$((2 * bench_wmax + 768 - 3072))
((bench_extra < 0)) && bench_extra=0
MEM=$((3072 + bench_region + 512 + bench_extra))M
MEMMAP=${bench_region}M!4G
# Under TCG memory moves at ~20-50 MB/s: the default run takes 10-25 minutes.
TIMEOUT=$((900 + (1 + BENCH_SAMPLES) * bench_wmax * $(wc -w <<<"$BENCH_DIRTY")))
SCENARIO_APPEND="kup.sizes=$(tr -s ' ' ',' <<<"$BENCH_SIZES") kup.dirty=$(tr -s ' ' ',' <<<"$BENCH_DIRTY") kup.samples=$BENCH_SAMPLES"

host_report() {
    local log=$1
    if ! grep -q 'GUEST: TABLE targets:' "$log"; then
        echo "foam-bench: no table in the console log"
        return 1
    fi
    echo "--- foam-bench (times in ms, measured in the guest under TCG: compare within the run only)"
    sed -n 's/^\[[ 0-9.]*\] GUEST: TABLE //p' "$log"
}
