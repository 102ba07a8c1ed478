# Host side of ppp-bench (sourced by tests/guest/run): a guest with a pmem region for the FOAM store
# and an arena for PPP, one boot per working set, and the plots at the end.
#
# KUP_BENCH_SIZES: working sets in MiB (default "256 512 1024 1536"). QEMU's pc machine maps guest
# RAM beyond 3 GiB from 4 GiB on: -m 7G gives [4G, 8G) above the PCI hole, all of it the arena
# (memmap=4G$4G); the region (1536M!1G) and the kernels' own memory stay below 3 GiB. The subject
# and plain CRIU's dump in tmpfs both live in the arena (movable memory): 2 W <= 4 GiB.
# KUP_BENCH_PLOTS: where the plots go (default docs/plots, the ones docs/ppp.md shows).
BENCH_SIZES=${KUP_BENCH_SIZES:-256 512 1024 1536}
for w in $BENCH_SIZES; do
    [[ $w =~ ^[0-9]+$ ]] && ((w >= 64 && w <= 1536)) || die "KUP_BENCH_SIZES: $w is not a number of MiB in 64..1536"
done
MEM=7G
MEMMAP='1536M!1G,4G$4G'
MAX_BOOTS=$(($(wc -w <<<"$BENCH_SIZES") + 2))
TIMEOUT=$((900 + 2 * $(tr ' ' '+' <<<"$BENCH_SIZES")))
SCENARIO_APPEND="kup.sizes=$(tr -s ' ' ',' <<<"$BENCH_SIZES")"
BENCH_PLOTS=${KUP_BENCH_PLOTS:-$GUEST_DIR/../../docs/plots}

host_report() {
    local log=$1 table
    table=$(sed -n 's/^\[[ 0-9.]*\] GUEST: TABLE //p' "$log")
    if ! grep -q '^ppp-bench: ' <<<"$table"; then
        echo "ppp-bench: no table in the console log"
        return 1
    fi
    echo "--- ppp-bench (times in ms, measured in the guest under TCG: compare within the run only)"
    grep -v '^ppp-bench' <<<"$table"
    mkdir -p "$BENCH_PLOTS"
    grep -v '^ppp-bench' <<<"$table" >"$BENCH_PLOTS/ppp-bench.txt"
    "$GUEST_DIR/../../scripts/plot/run.sh" ppp-bench "$BENCH_PLOTS/ppp-bench.txt" "$BENCH_PLOTS" || return 1
    echo "plots: $BENCH_PLOTS/ppp-fig7.png (table: $BENCH_PLOTS/ppp-bench.txt)"
    grep '^ppp-bench-parts: ' <<<"$table"
    grep '^ppp-bench: ' <<<"$table"
}
