# Host side of foam-bench-mc (sourced by tests/guest/run): items and samples, a guest whose region
# holds two checkpoints of the largest memcached, and the figures again at the end.
#
# KUP_BENCH_MC_SMALL_ITEMS: items of 50-3000 bytes (default 20000, ~30 MiB; `make bench-foam` uses
# the issue's 70000, ~107 MiB). KUP_BENCH_SAMPLES: plain `criu dump` samples (default 1).
BENCH_MC_SMALL_ITEMS=${KUP_BENCH_MC_SMALL_ITEMS:-20000}
[[ $BENCH_MC_SMALL_ITEMS =~ ^[0-9]+$ ]] && ((BENCH_MC_SMALL_ITEMS >= 1000 && BENCH_MC_SMALL_ITEMS <= 200000)) ||
    die "KUP_BENCH_MC_SMALL_ITEMS: $BENCH_MC_SMALL_ITEMS is not a number of items in 1000..200000"
BENCH_SAMPLES=${KUP_BENCH_SAMPLES:-1}
[[ $BENCH_SAMPLES =~ ^[1-9][0-9]*$ ]] || die "KUP_BENCH_SAMPLES: $BENCH_SAMPLES is not a positive count"
MEM=3G
MEMMAP=1G!1G
TIMEOUT=$((600 + BENCH_MC_SMALL_ITEMS / 100 * (1 + BENCH_SAMPLES)))
SCENARIO_APPEND="kup.mc_items=$BENCH_MC_SMALL_ITEMS kup.samples=$BENCH_SAMPLES"

host_report() {
    local log=$1
    grep -q 'GUEST: TABLE foam-bench-mc' "$log" || { echo "foam-bench-mc: no table in the console log"; return 1; }
    echo "--- foam-bench-mc (memcached, small items under a set load; ms, guest under TCG)"
    sed -n 's/^\[[ 0-9.]*\] GUEST: TABLE //p' "$log"
}
