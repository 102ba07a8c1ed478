# Host side of ppp-bench-mc (sourced by tests/guest/run): the guest of ppp-bench (a 1.5 GiB region
# for the FOAM store, a 4 GiB arena), one boot for the baselines and the first PPP update, one more
# per PPP update, and the plots at the end.
#
# KUP_BENCH_MC_ITEMS: items of 64 KiB per memcached instance (default 4096: 256 MiB; 4 instances
# must fit the store for FOAM: at most 5120). KUP_BENCH_PLOTS: where the plots go (default
# docs/plots).
BENCH_MC_ITEMS=${KUP_BENCH_MC_ITEMS:-4096}
[[ $BENCH_MC_ITEMS =~ ^[0-9]+$ ]] && ((BENCH_MC_ITEMS >= 256 && BENCH_MC_ITEMS <= 5120)) ||
    die "KUP_BENCH_MC_ITEMS: $BENCH_MC_ITEMS is not a number of items in 256..5120"
MEM=7G
MEMMAP='1536M!1G,4G$4G'
MAX_BOOTS=6
TIMEOUT=$((1200 + BENCH_MC_ITEMS / 4))
SCENARIO_APPEND="kup.mc_items=$BENCH_MC_ITEMS"
BENCH_PLOTS=${KUP_BENCH_PLOTS:-$GUEST_DIR/../../docs/plots}

host_report() {
    local log=$1 t4 t8
    t4=$(sed -n 's/^\[[ 0-9.]*\] GUEST: TABLE4 //p' "$log")
    t8=$(sed -n 's/^\[[ 0-9.]*\] GUEST: TABLE8 //p' "$log")
    if [[ -z $t4 || -z $t8 ]]; then
        echo "ppp-bench-mc: no tables in the console log"
        return 1
    fi
    echo "--- ppp-bench-mc: Fig. 4, memcached's downtime per technique (ms, guest under TCG: compare within the run only)"
    echo "$t4"
    echo "--- ppp-bench-mc: Fig. 8, memcached instances updated together (ms)"
    echo "$t8"
    mkdir -p "$BENCH_PLOTS"
    echo "$t4" >"$BENCH_PLOTS/ppp-fig4.txt"
    echo "$t8" >"$BENCH_PLOTS/ppp-fig8.txt"
    "$GUEST_DIR/../../scripts/plot/run.sh" ppp-bench-mc "$BENCH_PLOTS/ppp-fig4.txt" "$BENCH_PLOTS" || return 1
    echo "plots: $BENCH_PLOTS/ppp-fig4.png, $BENCH_PLOTS/ppp-fig8.png (tables: ppp-fig4.txt, ppp-fig8.txt)"
    sed -n 's/^\[[ 0-9.]*\] GUEST: TABLE ppp-bench-mc: /ppp-bench-mc: /p' "$log"
}
